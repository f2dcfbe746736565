//! "Why this backend": what the data path would do with a flow, answered without changing any
//! state (no lookup refreshes an entry, the scheduler runs on copies of its state).

use std::net::SocketAddr;

use lb_conntrack::FlowState;
use lb_core::{BackendId, Duration, FlowKey, Instant, IpProto};
use lb_sched::policy::slow_start::WEIGHT_SCALE;
use lb_sched::policy::PolicyKind;

use crate::load::BackendLoad;
use crate::spec::{Affinity, MidFlow, Mode, SchedulerKind};
use crate::{
    addr_hash, mid_flow_backend, mid_flow_hash, BackendInfo, Dataplane, DropReason, ServiceTable,
};

/// The service a flow is addressed to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceView {
    /// VIP and port.
    pub vip: SocketAddr,
    /// Protocol.
    pub proto: IpProto,
    /// Forwarding mode.
    pub mode: Mode,
    /// Scheduler.
    pub scheduler: SchedulerKind,
    /// Affinity.
    pub affinity: Affinity,
    /// Packets that cannot start a flow, of untracked flows, as configured.
    pub mid_flow: MidFlow,
    /// Whether such packets are placed by the consistent hash (modes `tunnel` and `dr` with
    /// [`MidFlow::Hash`]) rather than dropped.
    pub places_mid_flow: bool,
}

/// The flow's entry in the flow table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowView {
    /// Its backend.
    pub backend: BackendId,
    /// Its state.
    pub state: FlowState,
    /// Since its last packet.
    pub idle: Duration,
    /// Until it times out if nothing more is seen.
    pub idle_left: Duration,
    /// Packets counted (both directions).
    pub packets: u64,
    /// Bytes counted (both directions).
    pub bytes: u64,
}

/// What decides the flow's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The flow is tracked: its packets go to its backend.
    Flow(BackendId),
    /// A persistence template of the client names an eligible backend.
    Persistence(BackendId),
    /// The scheduler would pick this backend now.
    Scheduler(BackendId),
    /// A packet that cannot start the flow (a TCP segment without SYN, an ICMP error about
    /// it) of this untracked flow goes to this backend by the service's consistent hash, as
    /// on every peer ([`MidFlow::Hash`]; see [`Explanation::mid_flow`]).
    ConsistentHash(BackendId),
    /// Placed per message by the SIP Call-ID, which only the message itself carries.
    PerMessage,
    /// Not addressed to a service.
    NoService,
    /// The packet would be dropped: a new flow's in [`Explanation::decision`], a mid-flow
    /// packet's in [`Explanation::mid_flow`].
    Drop(DropReason),
}

impl Decision {
    /// The backend named, if any.
    pub fn backend(&self) -> Option<BackendId> {
        match *self {
            Decision::Flow(b)
            | Decision::Persistence(b)
            | Decision::Scheduler(b)
            | Decision::ConsistentHash(b) => Some(b),
            _ => None,
        }
    }
}

/// One backend of the service, as the scheduler sees it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendView {
    /// The backend.
    pub info: BackendInfo,
    /// Its live load (connections, admission, latency, ejection).
    pub load: BackendLoad,
    /// Its score under the service's scheduler, per unit of weight, lower is better: the
    /// IPVS connection overhead (`active × 256 + inactive`) for LC and WLC, `active + 1` for SED
    /// and NQ, the expected response time in ms (peak-EWMA × (outstanding + 1)) for peak-EWMA,
    /// `outstanding + 1` for least-request; `None` for schedulers that do not rank by load.
    pub cost: Option<f64>,
}

/// The answer to "why this backend".
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The service matched.
    pub service: Option<ServiceView>,
    /// The flow's entry, if tracked.
    pub flow: Option<FlowView>,
    /// The backend a persistence template names (eligible or not).
    pub persistence: Option<BackendId>,
    /// What decides the backend of a packet that may start the flow (a TCP SYN, a UDP
    /// datagram), or of any packet of a tracked flow.
    pub decision: Decision,
    /// What decides the backend of a packet that cannot start the flow (a TCP segment without
    /// SYN, an ICMP error about the flow): behind ECMP, the packets a balancer sees of a flow a
    /// peer started. [`Decision::Flow`] for a tracked flow; otherwise, in modes `tunnel` and
    /// `dr` with [`MidFlow::Hash`], [`Decision::Persistence`] or
    /// [`Decision::ConsistentHash`] (the same answer on every peer), else [`Decision::Drop`]:
    /// [`DropReason::MidFlowUnknown`] for a TCP flow (an ICMP error about it is counted as
    /// [`DropReason::NoFlow`]), [`DropReason::NoFlow`] for a UDP flow (of which only ICMP errors
    /// cannot start one), [`DropReason::NoBackend`] when no backend may take it.
    pub mid_flow: Decision,
    /// Every backend of the service with its eligibility and score.
    pub backends: Vec<BackendView>,
}

/// The score of a backend under `kind` (see [`BackendView::cost`]).
fn cost(kind: Option<PolicyKind>, l: &BackendLoad, weight: u32) -> Option<f64> {
    let w = f64::from(weight.max(1));
    let (a, i) = (f64::from(l.active_conns), f64::from(l.inactive_conns));
    let eff = (l.effective_weight as f64 / WEIGHT_SCALE as f64).max(f64::MIN_POSITIVE);
    Some(match kind? {
        PolicyKind::LeastConn => a * 256.0 + i,
        PolicyKind::Wlc | PolicyKind::Lblc | PolicyKind::Lblcr | PolicyKind::P2c => {
            (a * 256.0 + i) / w
        }
        PolicyKind::Sed | PolicyKind::Nq => (a + 1.0) / w,
        PolicyKind::PeakEwma => l.peak_ewma_ms * (a + 1.0) / eff,
        PolicyKind::LeastRequest => (a + 1.0) / eff,
        _ => return None,
    })
}

impl Dataplane {
    /// Where a packet that cannot start flow `key` (original direction) goes at `now`: a TCP
    /// segment without SYN, an ICMP error about the flow. The [`Explanation::mid_flow`] part of
    /// [`Dataplane::explain`] alone: it allocates nothing and runs no scheduler, so an
    /// embedder may ask it per packet (e.g. to log where ECMP-moved flows land).
    /// [`Decision::NoService`] when no service listens on the flow's destination.
    pub fn explain_mid_flow(&self, key: &FlowKey, now: Instant) -> Decision {
        let tables = &*self.tables;
        let Some(svc) = tables
            .service_index(key.dst(), key.dst_port(), key.proto())
            .and_then(|si| tables.services.get(si))
        else {
            return Decision::NoService;
        };
        let ct = if key.is_ipv4() { &self.ct4 } else { &self.ct6 };
        let tracked = ct.get(key, now).map(|e| e.backend);
        let template = crate::persist_key(svc, key)
            .and_then(|(_, tk)| ct.persist().peek(&tk, now))
            .filter(|b| tables.backend(*b).is_some_and(BackendInfo::eligible));
        self.mid_flow_decision(svc, key, tracked, template)
    }

    /// The mid-flow decision for flow `key` of `svc`, given its entry's backend and the
    /// backend of the client's eligible persistence template, if any.
    fn mid_flow_decision(
        &self,
        svc: &ServiceTable,
        key: &FlowKey,
        tracked: Option<BackendId>,
        template: Option<BackendId>,
    ) -> Decision {
        match (tracked, template) {
            (Some(b), _) => Decision::Flow(b),
            _ if !svc.places_mid_flow() => Decision::Drop(if svc.proto == IpProto::Tcp {
                DropReason::MidFlowUnknown
            } else {
                DropReason::NoFlow
            }),
            (None, Some(b)) => Decision::Persistence(b),
            (None, None) => {
                let h = mid_flow_hash(&self.flows, svc, key);
                match svc
                    .fallback
                    .as_deref()
                    .and_then(|t| mid_flow_backend(t, &self.tables, h))
                {
                    Some(b) => Decision::ConsistentHash(b),
                    None => Decision::Drop(DropReason::NoBackend),
                }
            }
        }
    }

    /// Explains what happens to a packet of flow `key` (original direction) at `now`: the
    /// service it matches, its flow entry or persistence template if any, otherwise the
    /// backend the scheduler would pick for it now, where a packet that cannot start the flow
    /// would go (behind ECMP: the consistent hash every peer agrees on, or a drop), and every
    /// backend's eligibility and score.
    /// Changes nothing: a packet of that flow sent next goes where this says, unless other
    /// flows change the load in between.
    pub fn explain(&self, key: &FlowKey, now: Instant) -> Explanation {
        let tables = &*self.tables;
        let found = tables
            .service_index(key.dst(), key.dst_port(), key.proto())
            .and_then(|si| Some((si, tables.services.get(si)?)));
        let Some((si, svc)) = found else {
            return Explanation {
                service: None,
                flow: None,
                persistence: None,
                decision: Decision::NoService,
                mid_flow: Decision::NoService,
                backends: Vec::new(),
            };
        };
        let ct = if key.is_ipv4() { &self.ct4 } else { &self.ct6 };
        let flow = ct.get(key, now).map(|e| FlowView {
            backend: e.backend,
            state: e.state,
            idle: now - e.last_seen,
            idle_left: e.deadline - now,
            packets: e.packets,
            bytes: e.bytes,
        });
        let persistence =
            crate::persist_key(svc, key).and_then(|(_, tk)| ct.persist().peek(&tk, now));
        let eligible_template =
            persistence.filter(|b| tables.backend(*b).is_some_and(BackendInfo::eligible));
        let decision = if let Some(f) = &flow {
            Decision::Flow(f.backend)
        } else if let Some(b) = eligible_template {
            Decision::Persistence(b)
        } else if svc.affinity == Affinity::SipCallId {
            Decision::PerMessage
        } else {
            // The scheduler, on copies of its state and of the random generator.
            let mut probe = self.live.clone();
            let mut rng = self.rng.clone();
            let src_hash = addr_hash(&self.flows, key.src());
            let h = match svc.affinity {
                Affinity::Source => src_hash,
                _ => self.flows.hash_flow(key),
            };
            let want = crate::Placing {
                flow_hash: h,
                src_hash,
                key,
                now,
            };
            match crate::choose_in(svc, si, &mut probe, &mut rng, &self.flows, &want) {
                Ok(b) => Decision::Scheduler(b),
                Err(r) => Decision::Drop(r),
            }
        };
        let mid_flow = self.mid_flow_decision(svc, key, flow.map(|f| f.backend), eligible_template);
        let kind = self.live.policy_kind(si);
        let backends = tables
            .backends
            .iter()
            .flatten()
            .filter(|b| b.vip == svc.vip && b.ip_proto() == svc.proto && b.live)
            .map(|b| {
                let load = self.live.load(b.id, now).unwrap_or_default();
                BackendView {
                    info: *b,
                    load,
                    cost: cost(kind, &load, b.weight.get()),
                }
            })
            .collect();
        Explanation {
            service: Some(ServiceView {
                vip: svc.vip,
                proto: svc.proto,
                mode: svc.mode,
                scheduler: svc.scheduler,
                affinity: svc.affinity,
                mid_flow: svc.mid_flow,
                places_mid_flow: svc.places_mid_flow(),
            }),
            flow,
            persistence,
            decision,
            mid_flow,
            backends,
        }
    }
}
