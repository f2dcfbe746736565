//! [`DataplaneSpec::validate`]: every refusal that [`crate::ControlPlane::new`] and
//! [`crate::Dataplane::new`] can raise from a spec, found without allocating the tables.
//!
//! A configuration checker (`tun-balancer --check`) calls it so that a spec it accepts starts.
//! It calls the crates' own cheap validators where they exist (`lb_conntrack::Config::validate`,
//! `Timeouts::validate`, `SnatPool::new` over a few addresses, `MaglevSize::new`, `Pool::new`
//! of an empty pool, `OutlierDetector::new`) and repeats the arithmetic of those that only
//! check while building (a ring's point count, Maglev's backend limit, backend ids).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use lb_conntrack::{ConntrackError, FlowState, SnatPool, MAX_BACKEND_ID, MAX_CAPACITY};
use lb_core::HashKey;
use lb_health::{HealthError, OutlierDetector};
use lb_sched::hash::{HashAlgorithm, Maglev, MaglevSize, RingConfig};
use lb_sched::policy::slow_start::SlowStart;
use lb_sched::pool::{Pool, PoolConfig};
use lb_sched::SchedError;

use crate::spec::{DataplaneSpec, SchedulerKind, ServiceSpec};

/// The most SNAT addresses of one family (`lb_conntrack::SnatPool::new`).
const MAX_SNAT_ADDRS: usize = 256;

/// A spec that the control plane or the data path would refuse at start. Each variant names
/// the spec field (and the service or backend index) it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// `conntrack_capacity` above what the flow table indexes.
    #[error("conntrack_capacity: {capacity} is above the flow table's maximum {max}")]
    ConntrackCapacity {
        /// The configured capacity.
        capacity: usize,
        /// [`lb_conntrack::MAX_CAPACITY`].
        max: usize,
    },
    /// `persist_capacity` zero or above what the persistence table indexes.
    #[error("persist_capacity: {capacity} is out of range 1..={max}")]
    PersistCapacity {
        /// The configured capacity.
        capacity: usize,
        /// [`lb_conntrack::MAX_CAPACITY`].
        max: usize,
    },
    /// An idle timeout below 1 ms or above [`lb_conntrack::MAX_TIMEOUT`].
    #[error("timeouts: the timeout of {state:?} is out of range 1 ms..=24 days")]
    Timeout {
        /// The flow state whose timeout is wrong.
        state: FlowState,
    },
    /// More SNAT addresses of one family than a SNAT pool takes.
    #[error("snat_addrs: {count} IPv{} addresses, at most {max} per family", if *.ipv6 { 6 } else { 4 })]
    SnatAddrs {
        /// Which family.
        ipv6: bool,
        /// How many were given.
        count: usize,
        /// The limit (256).
        max: usize,
    },
    /// An empty SNAT port range, or one that includes port 0.
    #[error("snat_ports: {start}-{end} is not a port range within 1-65535")]
    SnatPorts {
        /// First port.
        start: u16,
        /// Last port.
        end: u16,
    },
    /// The flow table rejected its configuration for another reason.
    #[error("conntrack: {0}")]
    Conntrack(#[from] ConntrackError),
    /// More backends in all than the flow table has backend ids.
    #[error("{count} backends in all, at most {max}")]
    TooManyBackends {
        /// Backends configured.
        count: usize,
        /// The limit ([`lb_conntrack::MAX_BACKEND_ID`] + 1).
        max: usize,
    },
    /// Two services with the same VIP, port and protocol.
    #[error("services[{service}].vip: {vip} is the same service as services[{first}]")]
    DuplicateService {
        /// The second one.
        service: usize,
        /// The first one.
        first: usize,
        /// Their VIP and port.
        vip: SocketAddr,
    },
    /// Two backends of one service at the same address (they would share a backend id).
    #[error("services[{service}].backends[{backend}].addr: {addr} is listed twice")]
    DuplicateBackend {
        /// The service.
        service: usize,
        /// The second backend.
        backend: usize,
        /// Its address.
        addr: SocketAddr,
    },
    /// A `maglev_size` that is not a prime in range, or smaller than the eligible backends.
    #[error("services[{service}].maglev_size: {reason}")]
    MaglevSize {
        /// The service.
        service: usize,
        /// lb-sched's refusal.
        reason: SchedError,
    },
    /// A `maglev_size` for a service without a Maglev table: a consistent hash other than
    /// Maglev, or a policy that does not place mid-flow packets.
    #[error(
        "services[{service}].maglev_size: only with scheduler maglev, or a policy placing \
         mid-flow packets (modes tunnel and dr), not {scheduler}"
    )]
    MaglevSizeWithoutMaglev {
        /// The service.
        service: usize,
        /// Its scheduler.
        scheduler: SchedulerKind,
    },
    /// The scheduler refuses the weighted backend set (too many backends, ring weights that
    /// call for too many points); `backend` is the heaviest.
    #[error("services[{service}].backends[{backend}].weight: {reason}")]
    Weights {
        /// The service.
        service: usize,
        /// Its heaviest backend.
        backend: usize,
        /// lb-sched's refusal.
        reason: SchedError,
    },
    /// A persistence prefix longer than the address.
    #[error("services[{service}].persistence_netmask.{}: /{prefix} is out of range 0..={}",
        if *.ipv6 { "v6" } else { "v4" }, if *.ipv6 { 128 } else { 32 })]
    Netmask {
        /// The service.
        service: usize,
        /// Which family.
        ipv6: bool,
        /// The prefix length.
        prefix: u8,
    },
    /// A panic threshold above 100 %.
    #[error("services[{service}].panic_threshold_percent: {percent} is above 100")]
    PanicThreshold {
        /// The service.
        service: usize,
        /// The threshold.
        percent: u8,
    },
    /// Slow start with a consistent hash (it ramps policies' weights only).
    #[error(
        "services[{service}].slow_start: only with a policy scheduler, not the hash {scheduler}"
    )]
    SlowStartNeedsPolicy {
        /// The service.
        service: usize,
        /// Its scheduler.
        scheduler: SchedulerKind,
    },
    /// A lower connection threshold not below the upper one (`backend`: `None` for the
    /// service's own thresholds, else the backend whose effective thresholds clash).
    #[error("{}lower_conns: {lower} must be below upper_conns {upper}", at(*.service, *.backend))]
    ConnThresholds {
        /// The service.
        service: usize,
        /// The backend, if the clash is in its (partly inherited) thresholds.
        backend: Option<usize>,
        /// The upper threshold in force.
        upper: u32,
        /// The lower threshold in force.
        lower: u32,
    },
    /// The policy pool rejected its configuration.
    #[error("services[{service}]: {reason}")]
    Pool {
        /// The service.
        service: usize,
        /// lb-sched's refusal.
        reason: SchedError,
    },
    /// An ICMP rate limit out of range: a rate or burst above
    /// [`MAX_ICMP_RATE`](crate::MAX_ICMP_RATE), or a per-destination one above the global one
    /// (it could never be reached).
    #[error("icmp.{field}: {value} {reason}")]
    IcmpLimit {
        /// `rate`, `burst`, `peer_rate` or `peer_burst`.
        field: &'static str,
        /// The configured value.
        value: u32,
        /// Why.
        reason: &'static str,
    },
    /// The outlier detector rejected its settings; `field` is the [`lb_health::OutlierConfig`]
    /// field, or `syn_timeout`.
    #[error("services[{service}].outlier.{field}: {reason}")]
    Outlier {
        /// The service.
        service: usize,
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

fn at(service: usize, backend: Option<usize>) -> String {
    match backend {
        Some(b) => format!("services[{service}].backends[{b}]."),
        None => format!("services[{service}]."),
    }
}

impl SpecError {
    /// The index of the service the error is about, if it is about one.
    pub fn service(&self) -> Option<usize> {
        match *self {
            SpecError::DuplicateService { service, .. }
            | SpecError::DuplicateBackend { service, .. }
            | SpecError::MaglevSize { service, .. }
            | SpecError::MaglevSizeWithoutMaglev { service, .. }
            | SpecError::Weights { service, .. }
            | SpecError::Netmask { service, .. }
            | SpecError::PanicThreshold { service, .. }
            | SpecError::SlowStartNeedsPolicy { service, .. }
            | SpecError::ConnThresholds { service, .. }
            | SpecError::Pool { service, .. }
            | SpecError::Outlier { service, .. } => Some(service),
            _ => None,
        }
    }
}

/// Greatest common divisor.
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl DataplaneSpec {
    /// Checks everything [`crate::ControlPlane::new`] and [`crate::Dataplane::new`] (with
    /// [`crate::DataplaneOptions::snat_ports`] = [`DataplaneSpec::snat_ports`]) would refuse,
    /// and the ranges the data path relies on, without allocating any table.
    ///
    /// # Errors
    /// The first problem found, as a [`SpecError`] naming its field.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_conntrack()?;
        self.validate_snat()?;
        self.validate_icmp()?;
        let mut backends = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            if let Some(first) = self
                .services
                .iter()
                .take(i)
                .position(|f| (f.vip, f.proto) == (s.vip, s.proto))
            {
                return Err(SpecError::DuplicateService {
                    service: i,
                    first,
                    vip: s.vip,
                });
            }
            validate_service(i, s)?;
            backends += s.backends.len();
        }
        // Ids are what the flow table stores (see `ControlPlane::apply`): 0..=MAX_BACKEND_ID.
        let max = MAX_BACKEND_ID as usize + 1;
        if backends > max {
            return Err(SpecError::TooManyBackends {
                count: backends,
                max,
            });
        }
        Ok(())
    }

    /// The flow tables' configurations, built as [`crate::Dataplane::new`] builds them.
    fn validate_conntrack(&self) -> Result<(), SpecError> {
        let cap = self.conntrack_capacity.max(16);
        if cap > MAX_CAPACITY {
            return Err(SpecError::ConntrackCapacity {
                capacity: self.conntrack_capacity,
                max: MAX_CAPACITY,
            });
        }
        let persist = self.persist_capacity.max(1);
        if persist > MAX_CAPACITY {
            return Err(SpecError::PersistCapacity {
                capacity: self.persist_capacity,
                max: MAX_CAPACITY,
            });
        }
        if let Err(ConntrackError::InvalidTimeout { state }) = self.timeouts.validate() {
            return Err(SpecError::Timeout { state });
        }
        // What the data path builds: anything left is reported as is.
        let (cfg, cfg6) = self.conntrack_configs();
        cfg.validate()?;
        cfg6.validate()?;
        Ok(())
    }

    /// The ICMP error limits.
    fn validate_icmp(&self) -> Result<(), SpecError> {
        let l = &self.icmp;
        let max = crate::MAX_ICMP_RATE;
        for (field, value) in [
            ("rate", l.global.rate),
            ("burst", l.global.burst),
            ("peer_rate", l.peer.rate),
            ("peer_burst", l.peer.burst),
        ] {
            if value > max {
                return Err(SpecError::IcmpLimit {
                    field,
                    value,
                    reason: "is above the maximum 10000000",
                });
            }
        }
        if l.peer.rate > l.global.rate {
            return Err(SpecError::IcmpLimit {
                field: "peer_rate",
                value: l.peer.rate,
                reason: "is above the global rate",
            });
        }
        if l.peer.burst > l.global.burst {
            return Err(SpecError::IcmpLimit {
                field: "peer_burst",
                value: l.peer.burst,
                reason: "is above the global burst",
            });
        }
        Ok(())
    }

    /// The SNAT pools, one per family (mirrors `Dataplane::new`).
    fn validate_snat(&self) -> Result<(), SpecError> {
        let (start, end) = (*self.snat_ports.start(), *self.snat_ports.end());
        if start == 0 || start > end {
            return Err(SpecError::SnatPorts { start, end });
        }
        for ipv6 in [false, true] {
            let addrs: Vec<IpAddr> = self
                .snat_addrs
                .iter()
                .copied()
                .filter(|a| a.is_ipv6() == ipv6)
                .collect();
            if addrs.is_empty() {
                continue;
            }
            if addrs.len() > MAX_SNAT_ADDRS {
                return Err(SpecError::SnatAddrs {
                    ipv6,
                    count: addrs.len(),
                    max: MAX_SNAT_ADDRS,
                });
            }
            // Cheap: the pool allocates per backend, and none is registered here.
            SnatPool::new(addrs, self.snat_ports.clone())?;
        }
        Ok(())
    }
}

fn validate_service(i: usize, s: &ServiceSpec) -> Result<(), SpecError> {
    let mut addrs = HashSet::new();
    for (j, b) in s.backends.iter().enumerate() {
        if !addrs.insert(b.addr) {
            return Err(SpecError::DuplicateBackend {
                service: i,
                backend: j,
                addr: b.addr,
            });
        }
    }
    let nm = s.persistence_netmask;
    for (ipv6, prefix, max) in [(false, nm.v4, 32), (true, nm.v6, 128)] {
        if prefix > max {
            return Err(SpecError::Netmask {
                service: i,
                ipv6,
                prefix,
            });
        }
    }
    if s.panic_threshold_percent > 100 {
        return Err(SpecError::PanicThreshold {
            service: i,
            percent: s.panic_threshold_percent,
        });
    }
    validate_thresholds(i, s)?;
    validate_scheduler(i, s)?;
    if let Some(o) = &s.outlier {
        let outlier = |field, reason| SpecError::Outlier {
            service: i,
            field,
            reason,
        };
        match OutlierDetector::new(o.detector) {
            Ok(_) => {}
            Err(HealthError::InvalidConfig { field, reason }) => {
                return Err(outlier(field, reason))
            }
            Err(_) => return Err(outlier("detector", "rejected")),
        }
        if o.syn_timeout.is_zero() {
            return Err(outlier("syn_timeout", "must be non-zero"));
        }
    }
    Ok(())
}

/// Admission thresholds, the service's and each backend's effective pair (IPVS `-x`/`-y`).
fn validate_thresholds(i: usize, s: &ServiceSpec) -> Result<(), SpecError> {
    let check = |backend, upper: u32, lower: u32| {
        if upper > 0 && lower >= upper {
            Err(SpecError::ConnThresholds {
                service: i,
                backend,
                upper,
                lower,
            })
        } else {
            Ok(())
        }
    };
    check(None, s.upper_conns, s.lower_conns)?;
    for (j, b) in s.backends.iter().enumerate() {
        if b.upper_conns.is_some() || b.lower_conns.is_some() {
            check(
                Some(j),
                b.upper_conns.unwrap_or(s.upper_conns),
                b.lower_conns.unwrap_or(s.lower_conns),
            )?;
        }
    }
    Ok(())
}

/// What `ControlPlane::build` asks of lb-sched for this service.
fn validate_scheduler(i: usize, s: &ServiceSpec) -> Result<(), SpecError> {
    let weights = |reason| SpecError::Weights {
        service: i,
        backend: s
            .backends
            .iter()
            .enumerate()
            .max_by_key(|(j, b)| (b.weight.get(), core::cmp::Reverse(*j)))
            .map_or(0, |(j, _)| j),
        reason,
    };
    let eligible: Vec<u32> = s
        .backends
        .iter()
        .map(|b| b.weight.get())
        .filter(|&w| w > 0)
        .collect();
    match s.scheduler {
        SchedulerKind::Hash(algo) => {
            if algo != HashAlgorithm::Maglev && s.maglev_size.is_some() {
                return Err(SpecError::MaglevSizeWithoutMaglev {
                    service: i,
                    scheduler: s.scheduler,
                });
            }
            if !s.slow_start.is_zero() {
                return Err(SpecError::SlowStartNeedsPolicy {
                    service: i,
                    scheduler: s.scheduler,
                });
            }
            match algo {
                HashAlgorithm::Maglev => {
                    validate_maglev(i, s.maglev_size, eligible.len(), weights)?
                }
                HashAlgorithm::Ring => {
                    // `Ring::new`: points = Σ weight / gcd × points per weight unit.
                    let cfg = RingConfig::new(HashKey::from_bytes([0; 16]));
                    let g = eligible.iter().fold(0, |g, &w| gcd(g, w)).max(1);
                    let need = eligible
                        .iter()
                        .map(|&w| u64::from(w / g) * u64::from(cfg.points_per_weight))
                        .fold(0u64, u64::saturating_add);
                    if need > u64::from(cfg.max_points) {
                        return Err(weights(SchedError::TooManyPoints {
                            need,
                            max: u64::from(cfg.max_points),
                        }));
                    }
                }
                _ => {}
            }
        }
        SchedulerKind::Policy(_) => {
            // A policy has a Maglev table only to place mid-flow packets (modes tunnel, dr).
            if s.maglev_size.is_some() && !s.mid_flow.places(s.mode) {
                return Err(SpecError::MaglevSizeWithoutMaglev {
                    service: i,
                    scheduler: s.scheduler,
                });
            }
            let cfg = PoolConfig {
                panic_threshold_percent: s.panic_threshold_percent,
                slow_start: (!s.slow_start.is_zero()).then_some(SlowStart {
                    window: s.slow_start,
                    ..SlowStart::default()
                }),
                ..PoolConfig::default()
            };
            Pool::new(cfg).map_err(|reason| SpecError::Pool { service: i, reason })?;
            // The Maglev table that places the service's mid-flow packets.
            if s.mid_flow.places(s.mode) {
                validate_maglev(i, s.maglev_size, eligible.len(), weights)?;
            }
        }
    }
    Ok(())
}

/// What `Maglev::new` asks of a table of `size` slots (`None`: the default size) over
/// `eligible` backends.
fn validate_maglev(
    i: usize,
    size: Option<u64>,
    eligible: usize,
    weights: impl Fn(SchedError) -> SpecError,
) -> Result<(), SpecError> {
    let size = match size {
        Some(m) => {
            MaglevSize::new(m).map_err(|reason| SpecError::MaglevSize { service: i, reason })?
        }
        None => MaglevSize::at_least((100 * eligible as u64).max(65_537)).map_err(&weights)?,
    };
    if eligible > Maglev::MAX_BACKENDS {
        return Err(weights(SchedError::TooManyBackends {
            count: eligible,
            max: Maglev::MAX_BACKENDS,
        }));
    }
    if eligible as u64 > u64::from(size.get()) {
        return Err(SpecError::MaglevSize {
            service: i,
            reason: SchedError::TableTooSmall {
                size: u64::from(size.get()),
                backends: eligible,
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Mode, OutlierSpec, Proto};
    use crate::{ControlPlane, Dataplane, DataplaneOptions};
    use lb_core::Duration;
    use lb_core::Weight;
    use lb_sched::policy::PolicyKind;

    fn spec() -> DataplaneSpec {
        DataplaneSpec {
            snat_addrs: vec!["203.0.113.100".parse().unwrap()],
            conntrack_capacity: 1024,
            persist_capacity: 64,
            services: vec![ServiceSpec::new(
                "203.0.113.10:80".parse().unwrap(),
                Proto::Tcp,
                Mode::Nat,
            )
            .with_backend("198.51.100.11:80".parse().unwrap(), 1)
            .with_backend("198.51.100.12:80".parse().unwrap(), 1)],
            ..DataplaneSpec::default()
        }
    }

    /// What the spec does at start, for comparison with `validate`.
    fn starts(s: &DataplaneSpec) -> bool {
        let key = HashKey::from_bytes([7; 16]);
        let Ok(mut cp) = ControlPlane::new(s.clone(), key) else {
            return false;
        };
        let Ok(t) = cp.build() else { return false };
        let mut opts = DataplaneOptions::new(key);
        opts.snat_ports = s.snat_ports.clone();
        Dataplane::new(s, t, opts).is_ok()
    }

    #[test]
    fn startup_refusals_are_found_without_building() {
        assert_eq!(spec().validate(), Ok(()));
        assert!(starts(&spec()));
        let mut cases: Vec<(DataplaneSpec, &str)> = Vec::new();
        let mut s = spec();
        s.conntrack_capacity = MAX_CAPACITY + 1;
        cases.push((s, "conntrack_capacity"));
        let mut s = spec();
        s.persist_capacity = MAX_CAPACITY + 1;
        cases.push((s, "persist_capacity"));
        let mut s = spec();
        s.timeouts.tcp_close = Duration::ZERO;
        cases.push((s, "timeouts"));
        let mut s = spec();
        s.snat_addrs = (0..=256u32)
            .map(|n| IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + n)))
            .collect();
        cases.push((s, "snat_addrs"));
        let mut s = spec();
        let (lo, hi) = (2000, 1000);
        s.snat_ports = lo..=hi;
        cases.push((s, "snat_ports"));
        let mut s = spec();
        s.services[0].maglev_size = Some(65_536);
        cases.push((s, "maglev_size"));
        let mut s = spec();
        s.services[0].maglev_size = Some(3);
        for n in 13..=14 {
            let b = s.services[0].backends[0];
            s.services[0].backends.push(b);
            s.services[0].backends.last_mut().unwrap().addr =
                format!("198.51.100.{n}:80").parse().unwrap();
        }
        cases.push((s, "maglev_size"));
        let mut s = spec();
        s.services[0].scheduler = SchedulerKind::Hash(HashAlgorithm::Ring);
        s.services[0].backends[1].weight = Weight::new(1_000_000);
        cases.push((s, "backends[1].weight"));
        let mut s = spec();
        s.services[0].backends[1].addr = s.services[0].backends[0].addr;
        s.services[0].scheduler = SchedulerKind::Policy(PolicyKind::RoundRobin);
        cases.push((s, "backends[1].addr"));
        let mut s = spec();
        s.services[0].panic_threshold_percent = 101;
        s.services[0].scheduler = SchedulerKind::Policy(PolicyKind::RoundRobin);
        cases.push((s, "panic_threshold_percent"));
        for (s, field) in &cases {
            let e = s.validate().unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        // Each of these fails at start; the consistent-hash ones already in the control plane,
        // which does not call `validate` (a policy's pool lives in the data path, which merges
        // a duplicate address into one backend and checks the panic threshold in `validate`).
        for (s, field) in &cases {
            assert!(!starts(s), "{field} starts");
        }
        for (s, field) in &cases[5..cases.len() - 2] {
            assert!(
                ControlPlane::new(s.clone(), HashKey::from_bytes([7; 16])).is_err(),
                "{field}"
            );
        }
    }

    #[test]
    fn icmp_limits_in_range() {
        assert_eq!(spec().validate(), Ok(()));
        let mut s = spec();
        s.icmp.global.rate = crate::MAX_ICMP_RATE + 1;
        s.icmp.peer.rate = 1;
        let e = s.validate().unwrap_err();
        assert!(e.to_string().starts_with("icmp.rate: 10000001"), "{e}");
        let mut s = spec();
        s.icmp.peer.burst = s.icmp.global.burst + 1;
        let e = s.validate().unwrap_err();
        assert!(e.to_string().starts_with("icmp.peer_burst"), "{e}");
        let mut s = spec();
        s.icmp.peer.rate = s.icmp.global.rate + 1;
        let e = s.validate().unwrap_err();
        assert!(e.to_string().starts_with("icmp.peer_rate"), "{e}");
        // Off: no error ever.
        let mut s = spec();
        s.icmp = crate::IcmpLimits {
            global: crate::IcmpLimit { rate: 0, burst: 0 },
            peer: crate::IcmpLimit { rate: 0, burst: 0 },
        };
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn snat_ports_exclude_port_zero() {
        let mut s = spec();
        s.snat_ports = 0..=1000;
        assert_eq!(
            s.validate(),
            Err(SpecError::SnatPorts {
                start: 0,
                end: 1000
            })
        );
    }

    #[test]
    fn service_rules_name_the_service() {
        let mut s = spec();
        s.services.push(s.services[0].clone());
        let e = s.validate().unwrap_err();
        assert_eq!(e.service(), Some(1), "{e}");
        let mut s = spec();
        s.services[0].scheduler = SchedulerKind::Hash(HashAlgorithm::Jump);
        s.services[0].maglev_size = Some(65_537);
        assert!(matches!(
            s.validate(),
            Err(SpecError::MaglevSizeWithoutMaglev { service: 0, .. })
        ));
        // A policy has a Maglev table (and a size for it) only where it places mid-flow
        // packets; there its size is checked as scheduler maglev's.
        let mut s = spec();
        s.services[0].scheduler = SchedulerKind::Policy(PolicyKind::Wlc);
        s.services[0].maglev_size = Some(251);
        assert!(matches!(
            s.validate(),
            Err(SpecError::MaglevSizeWithoutMaglev { service: 0, .. })
        ));
        s.services[0].mode = Mode::Tunnel;
        assert_eq!(s.validate(), Ok(()));
        assert!(starts(&s));
        s.services[0].maglev_size = Some(65_536);
        assert!(matches!(
            s.validate(),
            Err(SpecError::MaglevSize { service: 0, .. })
        ));
        assert!(!starts(&s));
        let mut s = spec();
        s.services[0].persistence_netmask.v6 = 129;
        assert!(matches!(
            s.validate(),
            Err(SpecError::Netmask { ipv6: true, .. })
        ));
        let mut s = spec();
        s.services[0].upper_conns = 10;
        s.services[0].lower_conns = 10;
        assert!(matches!(
            s.validate(),
            Err(SpecError::ConnThresholds { backend: None, .. })
        ));
        s.services[0].lower_conns = 8;
        s.services[0].backends[1].upper_conns = Some(5);
        assert!(matches!(
            s.validate(),
            Err(SpecError::ConnThresholds {
                backend: Some(1),
                upper: 5,
                lower: 8,
                ..
            })
        ));
        let mut s = spec();
        s.services[0].slow_start = Duration::from_secs(10);
        assert!(matches!(
            s.validate(),
            Err(SpecError::SlowStartNeedsPolicy { .. })
        ));
        s.services[0].scheduler = SchedulerKind::Policy(PolicyKind::LeastConn);
        assert_eq!(s.validate(), Ok(()));
        let mut s = spec();
        let mut o = OutlierSpec::default();
        o.detector.max_ejection = Duration::from_secs(1);
        s.services[0].outlier = Some(o);
        assert!(matches!(
            s.validate(),
            Err(SpecError::Outlier {
                field: "max_ejection",
                ..
            })
        ));
    }
}
