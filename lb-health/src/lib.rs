//! # lb-health
//!
//! Health checks, failure detectors, a heartbeat protocol and an active/backup election for the lb
//! load balancer, as no-I/O state machines driven by explicit time (`now: lb_core::Instant`) and
//! injected randomness. The caller moves the bytes (probes, heartbeats, gratuitous ARP); this crate
//! decides.
//!
//! | module | what | drive |
//! |---|---|---|
//! | [`check`] | active probes of backends, rise/fall, slow start | `poll(now, rng)` → [`Action`], `on_result`, `next_deadline` |
//! | [`outlier`] | passive ejection from data-path errors | `record(b, obs, now)` → [`Ejection`], `poll(now)` |
//! | [`heartbeat`] | authenticated status messages, gap repair, replay protection, membership | `handle(bytes, now)`, `poll_transmit(now)`, `poll_event(now)` |
//! | [`election`] | VRRP-like active/backup election, who holds the VIP | `handle_advert(from, prio, now)`, `poll(now)` → [`ElectionAction`] |
//! | [`watchdog`] | deadline monitor for a component | `kick(now)`, `poll(now)` → [`WatchdogEvent`] |
//! | [`detector`] | fixed-timeout and φ accrual failure detectors | `heartbeat(now)`, `is_available(now)`, `suspect_at()` |
//!
//! Every state machine follows the same drive contract: feed inputs with `handle_*` / `on_*` /
//! `record` as they happen, then call its `poll*` methods until they return `None` and carry out
//! what they say, then sleep until the earliest `next_deadline()`. Nothing happens between calls;
//! the same inputs at the same instants give the same outputs (the simulation harness in
//! `tests/sim.rs` relies on it).
//!
//! Combining heartbeat and election: announce the election's role and priority in the heartbeat
//! status (`HeartbeatNode::set_status`), send a status at once on
//! [`ElectionAction::SendAdvert`] (`HeartbeatNode::send_now`), and feed every newly received status
//! whose role is `Master` to [`Election::handle_advert`]. Key the heartbeat MAC with a sub-key of
//! the cluster secret, e.g. `HashKey::from_passphrase(secret).derive("heartbeat-mac")`.
//!
//! ```
//! use lb_core::{BackendId, Duration, Instant};
//! use lb_health::{Action, CheckConfig, Health, HealthChecker, ProbeOutcome};
//! use rand::{rngs::SmallRng, SeedableRng};
//!
//! let mut rng = SmallRng::seed_from_u64(1);
//! let mut hc = HealthChecker::new();
//! let cfg = CheckConfig { rise: 2, fall: 3, jitter: Duration::ZERO, ..CheckConfig::default() };
//! hc.add(BackendId(7), cfg, Instant::ZERO).unwrap();
//!
//! let mut now = Instant::ZERO;
//! let mut transitions = Vec::new();
//! for _ in 0..2 {
//!     now = hc.next_deadline().unwrap();
//!     let Some(Action::Probe(probe)) = hc.poll(now, &mut rng) else { unreachable!() };
//!     // ... the caller connects to the backend here ...
//!     transitions.extend(hc.on_result(probe.backend, probe.token, ProbeOutcome::Success, now));
//! }
//! assert_eq!(transitions.len(), 1);
//! assert_eq!(transitions[0].to, Health::Up);
//! assert_eq!(hc.state(BackendId(7)), Some(Health::Up));
//! ```
#![forbid(unsafe_code)]

pub mod check;
pub mod detector;
pub mod election;
mod error;
pub mod heartbeat;
pub mod outlier;
pub mod watchdog;

pub use check::{
    Action, CheckConfig, FailureReason, Health, HealthChecker, Probe, ProbeKind, ProbeOutcome,
    Transition,
};
pub use detector::{
    Detector, DetectorConfig, FailureDetector, PhiAccrual, PhiConfig, TimeoutDetector,
};
pub use election::{Election, ElectionAction, ElectionConfig, ElectionState};
pub use error::HealthError;
pub use heartbeat::{HeartbeatNode, MembershipEvent, Message, NodeConfig, NodeId, Role};
pub use outlier::{EjectReason, Ejection, Observation, OutlierConfig, OutlierDetector};
pub use watchdog::{Watchdog, WatchdogEvent};
