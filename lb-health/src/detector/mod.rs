//! Failure detectors for peers: given the arrival times of a peer's heartbeats, decide whether the
//! peer should be suspected dead.
//!
//! - [`TimeoutDetector`]: suspect when no heartbeat arrived for a fixed time (keepalived, VRRP).
//! - [`PhiAccrual`]: the φ accrual detector of Hayashibara et al. (2004), as in Cassandra and Akka:
//!   suspicion grows continuously with the time since the last heartbeat, measured against a normal
//!   distribution fitted to recent inter-arrival times.
//!
//! Both implement [`FailureDetector`]; [`Detector`] is the enum the heartbeat node stores (no `dyn`).

mod phi;
mod timeout;

pub use phi::{PhiAccrual, PhiConfig};
pub use timeout::TimeoutDetector;

use lb_core::{Duration, Instant};

use crate::HealthError;

/// The common interface of failure detectors. Time is always an argument.
pub trait FailureDetector {
    /// Records a heartbeat that arrived at `now`.
    fn heartbeat(&mut self, now: Instant);
    /// Whether the peer is considered alive at `now`.
    fn is_available(&self, now: Instant) -> bool;
    /// The instant from which the peer will be suspected if no further heartbeat arrives.
    fn suspect_at(&self) -> Instant;
}

/// Which detector to use, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DetectorConfig {
    /// Suspect after this long without a heartbeat.
    Timeout(Duration),
    /// φ accrual.
    Phi(PhiConfig),
}

impl DetectorConfig {
    /// Validates the parameters and builds a detector whose observation starts at `now` (a peer
    /// that never sends is suspected as if its first heartbeat had arrived at `now`).
    pub fn build(&self, now: Instant) -> Result<Detector, HealthError> {
        Ok(match *self {
            DetectorConfig::Timeout(t) => Detector::Timeout(TimeoutDetector::new(t, now)?),
            DetectorConfig::Phi(c) => Detector::Phi(PhiAccrual::new(c, now)?),
        })
    }
}

/// A failure detector of either kind.
#[derive(Debug, Clone)]
pub enum Detector {
    /// Fixed timeout.
    Timeout(TimeoutDetector),
    /// φ accrual.
    Phi(PhiAccrual),
}

impl FailureDetector for Detector {
    #[inline]
    fn heartbeat(&mut self, now: Instant) {
        match self {
            Detector::Timeout(d) => d.heartbeat(now),
            Detector::Phi(d) => d.heartbeat(now),
        }
    }

    #[inline]
    fn is_available(&self, now: Instant) -> bool {
        match self {
            Detector::Timeout(d) => d.is_available(now),
            Detector::Phi(d) => d.is_available(now),
        }
    }

    #[inline]
    fn suspect_at(&self) -> Instant {
        match self {
            Detector::Timeout(d) => d.suspect_at(),
            Detector::Phi(d) => d.suspect_at(),
        }
    }
}
