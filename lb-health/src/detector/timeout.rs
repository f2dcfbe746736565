//! The fixed-timeout failure detector.

use lb_core::{Duration, Instant};

use super::FailureDetector;
use crate::HealthError;

/// Suspects a peer when no heartbeat arrived for `timeout`.
///
/// ```
/// use lb_core::{Duration, Instant};
/// use lb_health::detector::{FailureDetector, TimeoutDetector};
/// let mut d = TimeoutDetector::new(Duration::from_secs(3), Instant::ZERO).unwrap();
/// d.heartbeat(Instant::from_secs(1));
/// assert!(d.is_available(Instant::from_millis(3_999)));
/// assert!(!d.is_available(Instant::from_secs(4)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutDetector {
    timeout: Duration,
    last: Instant,
}

impl TimeoutDetector {
    /// A detector that starts observing at `now`. `timeout` must be non-zero.
    pub fn new(timeout: Duration, now: Instant) -> Result<Self, HealthError> {
        if timeout.is_zero() {
            return Err(HealthError::InvalidConfig {
                field: "timeout",
                reason: "must be non-zero",
            });
        }
        Ok(TimeoutDetector { timeout, last: now })
    }

    /// The time of the last heartbeat (or of creation).
    pub fn last_heartbeat(&self) -> Instant {
        self.last
    }
}

impl FailureDetector for TimeoutDetector {
    #[inline]
    fn heartbeat(&mut self, now: Instant) {
        self.last = self.last.max(now);
    }

    #[inline]
    fn is_available(&self, now: Instant) -> bool {
        now < self.suspect_at()
    }

    #[inline]
    fn suspect_at(&self) -> Instant {
        self.last + self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_after_timeout_only() {
        assert!(TimeoutDetector::new(Duration::ZERO, Instant::ZERO).is_err());
        let mut d =
            TimeoutDetector::new(Duration::from_millis(300), Instant::from_secs(1)).unwrap();
        assert_eq!(d.suspect_at(), Instant::from_millis(1_300));
        assert!(d.is_available(Instant::from_millis(1_299)));
        assert!(!d.is_available(Instant::from_millis(1_300)));
        d.heartbeat(Instant::from_millis(1_200));
        d.heartbeat(Instant::from_millis(1_100)); // reordered: ignored
        assert_eq!(d.last_heartbeat(), Instant::from_millis(1_200));
        assert!(d.is_available(Instant::from_millis(1_499)));
        assert!(!d.is_available(Instant::from_millis(1_500)));
    }
}
