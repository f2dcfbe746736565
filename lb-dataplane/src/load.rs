//! Live load: what the data path learns from traffic, kept apart from membership.
//!
//! Membership (which backends a service has, their weights, admin and health state, their
//! admission thresholds) lives in the immutable [`Tables`] and is swapped whole on every reload
//! or health change. Live load (active and inactive connections, latency estimates, scheduler
//! cursors and LBLC tables, outlier state) lives here, one [`LiveService`] per service, and
//! survives every swap: [`Live::reconcile`] folds a new membership into it on the control path.
//!
//! Every count comes from the flow table's own events: a new flow opens a connection in the
//! state its first packet left it in; a hit whose state crosses the active / inactive line
//! ([`FlowState::is_active`], IPVS's definition) moves it; a [`Removal`] closes it. The counts are
//! therefore exactly what the table holds (see the `counts_match_the_table` proptest), and the
//! per-packet updates cannot fail: a backend is removed from its pool only once its counts are
//! zero.

use std::collections::HashMap;
use std::net::SocketAddr;

use lb_conntrack::{FlowState, Removal, TcpState};
use lb_core::{Backend, BackendId, Duration, Instant, IpProto};
use lb_health::{Observation, OutlierDetector};
use lb_sched::policy::admission::Thresholds;
use lb_sched::policy::slow_start::SlowStart;
use lb_sched::policy::{Policy, PolicyKind};
use lb_sched::pool::{AdminState, ConnPhase, Pool, PoolConfig};

use crate::spec::SchedulerKind;
use crate::tables::{BackendInfo, ServiceTable, Tables};

/// No service (a backend id never configured, or whose service left the configuration).
const NONE: u32 = u32::MAX;

/// Smoothing of the per-backend latency EWMAs shown in the stats: each sample weighs 1/5.
const EWMA_ALPHA: f64 = 0.2;

/// An exponentially weighted moving average of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    value: f64,
    samples: u64,
}

impl Ewma {
    /// Adds a sample.
    #[inline]
    pub fn record(&mut self, d: Duration) {
        let ms = d.as_nanos() as f64 / 1e6;
        self.value = if self.samples == 0 {
            ms
        } else {
            self.value + EWMA_ALPHA * (ms - self.value)
        };
        self.samples += 1;
    }

    /// The average in milliseconds, `None` before the first sample.
    pub fn millis(&self) -> Option<f64> {
        (self.samples > 0).then_some(self.value)
    }

    /// Samples recorded.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

/// What the data path observed about one backend, beyond its connection counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observed {
    /// Handshake time: the client's SYN to the backend's SYN-ACK (modes `nat`, `dnat`).
    pub handshake: Ewma,
    /// Response time: the client's first data segment to the backend's first data segment
    /// (a slow application shows here, not in the handshake, which the kernel answers).
    pub response: Ewma,
    /// Ejected by passive outlier detection now.
    pub ejected: bool,
    /// Ejections so far.
    pub ejections: u64,
    /// Failures observed: a RST answering a SYN, a SYN left unanswered, an ICMP error from it.
    pub failures: u64,
}

/// A backend's live load, for reports and explanations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BackendLoad {
    /// Connections counted active (TCP ESTABLISHED; UDP, ICMP and other flows while they live).
    pub active_conns: u32,
    /// Connections counted inactive (TCP handshake and closing states).
    pub inactive_conns: u32,
    /// Above its admission threshold (takes no new flow until below the lower one).
    pub overloaded: bool,
    /// May take a new flow now: configured, weight > 0, healthy (or the pool in panic), not
    /// ejected, not overloaded.
    pub available: bool,
    /// Effective weight now (slow start ramps it), in lb-sched's scaled units.
    pub effective_weight: u64,
    /// The peak-EWMA response estimate the policies use, in milliseconds.
    pub peak_ewma_ms: f64,
    /// What the data path observed.
    pub observed: Observed,
}

/// A backend leaving or re-entering rotation by passive outlier detection: data for the
/// embedder to log ([`crate::Dataplane::poll_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadEvent {
    /// Ejected until `until` (`count`: its ejections so far, after decay).
    Ejected {
        /// The backend.
        backend: BackendId,
        /// When it returns.
        until: Instant,
        /// How many times it has been ejected.
        count: u32,
    },
    /// Back in rotation.
    Returned {
        /// The backend.
        backend: BackendId,
    },
}

/// One service's live state.
#[derive(Debug, Clone)]
pub(crate) struct LiveService {
    key: (SocketAddr, IpProto),
    /// The policy (`None` for a consistent hash), with its cursors and tables.
    pub(crate) policy: Option<Policy>,
    /// Members (and retired backends still holding flows) with their counts and estimates.
    pub(crate) pool: Pool,
    outlier: Option<OutlierDetector>,
    /// How long a SYN may wait for its SYN-ACK before it counts as a failure.
    pub(crate) syn_timeout: Duration,
}

/// The live load of every service.
#[derive(Debug, Clone, Default)]
pub(crate) struct Live {
    /// By service index (aligned with `Tables::services`).
    pub(crate) services: Vec<LiveService>,
    /// Service index of each backend id ([`NONE`] if none).
    svc_of: Vec<u32>,
    /// Observations by backend id.
    pub(crate) observed: Vec<Observed>,
    /// Entries in the flow tables by backend id, whatever their service (a retired backend's
    /// service may have left the configuration): opened minus closed, the reference count
    /// that says when a retired backend's id may be released.
    flows: Vec<u32>,
    /// Health as configured or checked (before ejection), by backend id.
    healthy: Vec<bool>,
    /// Ejection and return events not yet polled (bounded: the oldest is dropped past
    /// [`EVENTS`]).
    pub(crate) events: std::collections::VecDeque<LoadEvent>,
}

/// Events kept for the embedder.
const EVENTS: usize = 256;

fn pool_config(svc: &ServiceTable) -> PoolConfig {
    PoolConfig {
        slow_start: (!svc.slow_start.is_zero()).then_some(SlowStart {
            window: svc.slow_start,
            min_percent: 10,
        }),
        panic_threshold_percent: svc.panic_threshold_percent.min(100),
        ..PoolConfig::default()
    }
}

fn thresholds(b: &BackendInfo) -> Thresholds {
    Thresholds {
        upper_conns: b.upper_conns,
        lower_conns: b.lower_conns,
        max_utilisation: None,
    }
}

/// A TCP connection still in its handshake: counted inactive (IPVS), but work the backend has
/// been given, so it is also a request in flight for least-request and peak-EWMA (without it a
/// burst of SYNs would all go to the backend that looks idle).
#[inline]
fn handshaking(s: FlowState) -> bool {
    matches!(
        s,
        FlowState::Tcp(TcpState::None | TcpState::SynRecv | TcpState::SynSent)
    )
}

fn phase(s: FlowState) -> ConnPhase {
    if s.is_active() {
        ConnPhase::Active
    } else {
        ConnPhase::Inactive
    }
}

impl Live {
    /// Folds the membership of `tables` into the live state (control path: allocates). Pools
    /// and policies of services that stay (same VIP and protocol) keep their counts, estimates
    /// and cursors; new backends join, retired ones leave once they hold no connection.
    pub(crate) fn reconcile(&mut self, tables: &Tables, now: Instant) {
        let mut old: HashMap<(SocketAddr, IpProto), LiveService> =
            self.services.drain(..).map(|s| (s.key, s)).collect();
        let n = tables.backends.len();
        self.svc_of = vec![NONE; n];
        if self.observed.len() < n {
            self.observed.resize(n, Observed::default());
        }
        if self.flows.len() < n {
            self.flows.resize(n, 0);
        }
        self.healthy = tables
            .backends
            .iter()
            .map(|b| b.is_some_and(|b| b.healthy))
            .collect();
        for (si, svc) in tables.services.iter().enumerate() {
            let key = (svc.vip, svc.proto);
            let cfg = pool_config(svc);
            let mut live = match old.remove(&key) {
                Some(mut l) => {
                    // Counts survive; a changed ramp or panic threshold applies from now.
                    if l.pool.reconfigure(cfg).is_err() {
                        l.pool = Pool::new(PoolConfig::default()).unwrap_or_default();
                    }
                    l
                }
                None => LiveService {
                    key,
                    policy: None,
                    pool: Pool::new(cfg).unwrap_or_default(),
                    outlier: None,
                    syn_timeout: Duration::from_secs(1),
                },
            };
            // The policy keeps its cursors while its kind is unchanged.
            live.policy = match (svc.scheduler, live.policy.take()) {
                (SchedulerKind::Policy(k), Some(p)) if p.kind() == k => Some(p),
                (SchedulerKind::Policy(k), _) => Some(Policy::new(k)),
                (SchedulerKind::Hash(_), _) => None,
            };
            // Membership: every configured backend of the service.
            let members: Vec<&BackendInfo> = tables
                .backends
                .iter()
                .flatten()
                .filter(|b| b.vip == svc.vip && b.ip_proto() == svc.proto)
                .collect();
            for b in &members {
                let id = b.id;
                if let Some(x) = self.svc_of.get_mut(id.get() as usize) {
                    *x = si as u32;
                }
                let pool = &mut live.pool;
                if pool.index_of(id).is_none() {
                    let _ = pool.insert(Backend::new(id, b.addr).with_weight(b.weight), now);
                }
                let _ = pool.set_weight(id, b.weight);
                let admin = if b.live {
                    AdminState::Active
                } else {
                    AdminState::Down
                };
                let _ = pool.set_admin(id, admin);
                let ejected = self
                    .observed
                    .get(id.get() as usize)
                    .is_some_and(|o| o.ejected);
                let _ = pool.set_healthy(id, b.healthy && !ejected, now);
                let _ = pool.set_thresholds(id, thresholds(b));
            }
            // Retired backends leave once idle; so do backends no longer in the service.
            let gone: Vec<BackendId> = live
                .pool
                .iter()
                .filter(|r| {
                    let info = tables.backend(r.id());
                    let member =
                        info.is_some_and(|b| b.vip == svc.vip && b.ip_proto() == svc.proto);
                    let retired = info.is_none_or(|b| !b.live);
                    (!member || retired) && r.active_conns() == 0 && r.inactive_conns() == 0
                })
                .map(|r| r.id())
                .collect();
            for id in gone {
                let _ = live.pool.remove(id);
            }
            // Outlier detection: a detector per service, its members added.
            live.outlier = match svc.outlier {
                Some(o) => {
                    live.syn_timeout = o.syn_timeout;
                    let mut d = match live.outlier.take() {
                        Some(d) => d,
                        None => match OutlierDetector::new(o.detector) {
                            Ok(d) => d,
                            Err(_) => {
                                self.services.push(live);
                                continue;
                            }
                        },
                    };
                    for b in &members {
                        if b.live {
                            d.add(b.id, now); // a no-op for members already there
                        } else {
                            d.remove(b.id);
                        }
                    }
                    Some(d)
                }
                None => None,
            };
            self.services.push(live);
        }
    }

    /// The service of backend `id`, if it has one.
    #[inline]
    fn service_mut(&mut self, id: BackendId) -> Option<&mut LiveService> {
        let si = *self.svc_of.get(id.get() as usize)?;
        self.services.get_mut(si as usize)
    }

    /// A new flow bound to `id`, in state `s` after its first packet.
    #[inline]
    pub(crate) fn opened(&mut self, id: BackendId, s: FlowState) {
        if let Some(c) = self.flows.get_mut(id.get() as usize) {
            *c = c.saturating_add(1);
        }
        if let Some(l) = self.service_mut(id) {
            let _ = if s.is_active() {
                l.pool.conn_opened(id)
            } else {
                l.pool.conn_opened_inactive(id)
            };
            if handshaking(s) {
                let _ = l.pool.request_started(id);
            }
        }
    }

    /// A packet of a flow of `id` moved it from `was` (`None`: a new session in a reused entry)
    /// to `now`.
    #[inline]
    pub(crate) fn moved(&mut self, id: BackendId, was: Option<FlowState>, now: FlowState) {
        if let (Some(w), Some(l)) = (was, self.service_mut(id)) {
            if handshaking(w) && !handshaking(now) {
                let _ = l.pool.request_ended(id);
            }
        }
        match was {
            None => self.opened(id, now),
            Some(w) if w.is_active() != now.is_active() => {
                if let Some(l) = self.service_mut(id) {
                    let _ = if now.is_active() {
                        l.pool.conn_active(id)
                    } else {
                        l.pool.conn_inactive(id)
                    };
                }
            }
            Some(_) => {}
        }
    }

    /// A flow left the table.
    #[inline]
    pub(crate) fn removed(&mut self, r: &Removal) {
        self.closed(r.backend, r.state);
    }

    /// A flow of `id` in state `s` left the table (or, synced, moved to another backend).
    #[inline]
    pub(crate) fn closed(&mut self, id: BackendId, s: FlowState) {
        if let Some(c) = self.flows.get_mut(id.get() as usize) {
            *c = c.saturating_sub(1);
        }
        if let Some(l) = self.service_mut(id) {
            let _ = l.pool.conn_closed(id, phase(s));
            if handshaking(s) {
                let _ = l.pool.request_ended(id);
            }
        }
    }

    /// Flows in the tables bound to `id`.
    #[inline]
    pub(crate) fn flows(&self, id: BackendId) -> u32 {
        self.flows.get(id.get() as usize).copied().unwrap_or(0)
    }

    /// Drops everything known about `id` (it holds no flow; its id is about to name another
    /// backend): its place in its service's pool (counts, estimates, slow start), its
    /// outlier state and observations.
    pub(crate) fn forget(&mut self, id: BackendId) {
        for l in &mut self.services {
            if l.pool.index_of(id).is_some() {
                let _ = l.pool.remove(id);
            }
            if let Some(d) = l.outlier.as_mut() {
                d.remove(id);
            }
        }
        if let Some(o) = self.observed.get_mut(id.get() as usize) {
            *o = Observed::default();
        }
        if let Some(c) = self.flows.get_mut(id.get() as usize) {
            *c = 0;
        }
        if let Some(s) = self.svc_of.get_mut(id.get() as usize) {
            *s = NONE;
        }
    }

    /// A handshake answered after `d`. Not yet a success for outlier detection: the kernel
    /// answers SYNs for an application that may then reset every connection.
    pub(crate) fn handshake(&mut self, id: BackendId, d: Duration) {
        if let Some(o) = self.observed.get_mut(id.get() as usize) {
            o.handshake.record(d);
        }
    }

    /// A first response after `d`: fed to the peak-EWMA of the policies, and a success for
    /// outlier detection.
    pub(crate) fn response(&mut self, id: BackendId, d: Duration, now: Instant) {
        if let Some(o) = self.observed.get_mut(id.get() as usize) {
            o.response.record(d);
        }
        if let Some(l) = self.service_mut(id) {
            let _ = l.pool.observe_latency(id, d, now);
        }
        self.observe(id, Observation::Success, now);
    }

    /// A failure (or success) seen by the data path: fed to the service's outlier detector; an
    /// ejection takes the backend out of its pool's rotation.
    pub(crate) fn observe(&mut self, id: BackendId, obs: Observation, now: Instant) {
        if obs != Observation::Success {
            if let Some(o) = self.observed.get_mut(id.get() as usize) {
                o.failures += 1;
            }
        }
        let Some(l) = self.service_mut(id) else {
            return;
        };
        let Some(d) = l.outlier.as_mut() else {
            return;
        };
        if let Ok(Some(e)) = d.record(id, obs, now) {
            let _ = l.pool.set_healthy(id, false, now);
            if let Some(o) = self.observed.get_mut(id.get() as usize) {
                o.ejected = true;
                o.ejections += 1;
            }
            self.push_event(LoadEvent::Ejected {
                backend: id,
                until: e.until,
                count: e.count,
            });
        }
    }

    /// Returns ejected backends whose time is up to rotation (slow start applies to them).
    pub(crate) fn poll_outliers(&mut self, now: Instant) {
        let mut back = Vec::new();
        for l in &mut self.services {
            let Some(d) = l.outlier.as_mut() else {
                continue;
            };
            while let Some(id) = d.poll(now) {
                let healthy = self.healthy.get(id.get() as usize).copied().unwrap_or(true);
                let _ = l.pool.set_healthy(id, healthy, now);
                back.push(id);
            }
        }
        for id in back {
            if let Some(o) = self.observed.get_mut(id.get() as usize) {
                o.ejected = false;
            }
            self.push_event(LoadEvent::Returned { backend: id });
        }
    }

    fn push_event(&mut self, e: LoadEvent) {
        if self.events.len() >= EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// The SYN timeout of backend `id`'s service, if it has outlier detection.
    #[inline]
    pub(crate) fn syn_timeout(&self, id: BackendId) -> Option<Duration> {
        let si = *self.svc_of.get(id.get() as usize)?;
        let l = self.services.get(si as usize)?;
        l.outlier.as_ref().map(|_| l.syn_timeout)
    }

    /// Backend `id`'s live load at `now`.
    pub(crate) fn load(&self, id: BackendId, now: Instant) -> Option<BackendLoad> {
        let si = *self.svc_of.get(id.get() as usize)?;
        let l = self.services.get(si as usize)?;
        let i = l.pool.index_of(id)?;
        let t = l.pool.thresholds(i);
        let total = u64::from(l.pool.active_conns(i)) + u64::from(l.pool.inactive_conns(i));
        Some(BackendLoad {
            active_conns: l.pool.active_conns(i),
            inactive_conns: l.pool.inactive_conns(i),
            overloaded: l.pool.is_eligible(i) && !l.pool.is_available(i)
                || (t.upper_conns > 0 && total >= u64::from(t.upper_conns)),
            available: l.pool.is_available(i),
            effective_weight: l.pool.effective_weight(i, now),
            peak_ewma_ms: l.pool.peak_ewma_ns(i, now) / 1e6,
            observed: self
                .observed
                .get(id.get() as usize)
                .copied()
                .unwrap_or_default(),
        })
    }

    /// The policy kind of service `si`, if it uses one.
    pub(crate) fn policy_kind(&self, si: usize) -> Option<PolicyKind> {
        self.services.get(si)?.policy.as_ref().map(Policy::kind)
    }
}
