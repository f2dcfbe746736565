//! The software side of a watchdog timer: a monitored component must [`kick`](Watchdog::kick) it
//! within `timeout`; when it does not, [`poll`](Watchdog::poll) reports the miss once, so the caller
//! can restart or fence the component (for example a balancer whose data path stalled should stop
//! advertising itself as master).
//!
//! ```
//! use lb_core::{Duration, Instant};
//! use lb_health::{Watchdog, WatchdogEvent};
//! let mut w = Watchdog::new(Duration::from_millis(500), Instant::ZERO).unwrap();
//! w.kick(Instant::from_millis(400));
//! assert_eq!(w.poll(Instant::from_millis(899)), None);
//! assert_eq!(
//!     w.poll(Instant::from_millis(1_000)),
//!     Some(WatchdogEvent::Expired { deadline: Instant::from_millis(900), late_by: Duration::from_millis(100) })
//! );
//! assert_eq!(w.poll(Instant::from_millis(2_000)), None); // reported once
//! w.kick(Instant::from_millis(2_000));
//! assert_eq!(w.poll(Instant::from_millis(2_100)), Some(WatchdogEvent::Recovered));
//! ```

use lb_core::{Duration, Instant};

use crate::HealthError;

/// What the watchdog reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchdogEvent {
    /// The component missed its deadline.
    Expired {
        /// The deadline it missed.
        deadline: Instant,
        /// How late the check found it.
        late_by: Duration,
    },
    /// The component kicked again after an expiry.
    Recovered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum State {
    Armed,
    Expired,
    Recovered,
    Disarmed,
}

/// A watchdog for one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Watchdog {
    timeout: Duration,
    deadline: Instant,
    state: State,
    misses: u64,
}

impl Watchdog {
    /// An armed watchdog whose first deadline is `now + timeout`. `timeout` must be non-zero.
    pub fn new(timeout: Duration, now: Instant) -> Result<Self, HealthError> {
        if timeout.is_zero() {
            return Err(HealthError::InvalidConfig {
                field: "timeout",
                reason: "must be non-zero",
            });
        }
        Ok(Watchdog {
            timeout,
            deadline: now + timeout,
            state: State::Armed,
            misses: 0,
        })
    }

    /// The component is alive at `now`: the deadline moves to `now + timeout` (re-arming a
    /// disarmed watchdog).
    pub fn kick(&mut self, now: Instant) {
        self.deadline = now + self.timeout;
        self.state = match self.state {
            State::Expired | State::Recovered => State::Recovered,
            State::Armed | State::Disarmed => State::Armed,
        };
    }

    /// Stops watching (for a planned stop of the component) until the next kick.
    pub fn disarm(&mut self) {
        self.state = State::Disarmed;
    }

    /// Reports an expiry (once per miss) or a recovery; `None` otherwise.
    #[must_use]
    pub fn poll(&mut self, now: Instant) -> Option<WatchdogEvent> {
        match self.state {
            State::Disarmed | State::Expired => None,
            State::Recovered => {
                self.state = State::Armed;
                Some(WatchdogEvent::Recovered)
            }
            State::Armed if now >= self.deadline => {
                self.state = State::Expired;
                self.misses = self.misses.saturating_add(1);
                Some(WatchdogEvent::Expired {
                    deadline: self.deadline,
                    late_by: now - self.deadline,
                })
            }
            State::Armed => None,
        }
    }

    /// The current deadline while armed (or a recovery is to be reported: [`Instant::ZERO`]).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Armed => Some(self.deadline),
            State::Recovered => Some(Instant::ZERO),
            State::Disarmed | State::Expired => None,
        }
    }

    /// Whether the component is currently overdue (expired and not kicked since).
    pub fn is_expired(&self) -> bool {
        self.state == State::Expired
    }

    /// How many deadlines have been missed in total.
    pub fn misses(&self) -> u64 {
        self.misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        assert!(Watchdog::new(Duration::ZERO, Instant::ZERO).is_err());
        let mut w = Watchdog::new(Duration::from_secs(1), Instant::ZERO).unwrap();
        assert_eq!(w.next_deadline(), Some(Instant::from_secs(1)));
        for s in 1..5 {
            w.kick(Instant::from_millis(s * 900));
            assert_eq!(w.poll(Instant::from_millis(s * 900 + 999)), None);
        }
        assert!(matches!(
            w.poll(Instant::from_secs(10)),
            Some(WatchdogEvent::Expired { .. })
        ));
        assert!(w.is_expired());
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.misses(), 1);
        w.disarm();
        assert_eq!(w.poll(Instant::from_secs(100)), None);
        w.kick(Instant::from_secs(100));
        assert_eq!(w.poll(Instant::from_secs(100)), None); // disarmed → armed, no recovery event
        assert!(w.poll(Instant::from_secs(101)).is_some());
        assert_eq!(w.misses(), 2);
    }
}
