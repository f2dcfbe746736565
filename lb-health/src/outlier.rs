//! Passive outlier detection (in the manner of Envoy's outlier detection).
//!
//! The data path reports what it observes about each backend — connections that succeeded, failed,
//! were reset or timed out — with [`OutlierDetector::record`]. A backend is *ejected* (taken out of
//! rotation without waiting for the active checker) when either
//! - it has `consecutive_failures` failures in a row, or
//! - within the current window of `window` length it saw at least `min_requests` observations and
//!   the share of failures exceeds `failure_rate`.
//!
//! The ejection lasts `base_ejection × n`, where `n` counts this backend's ejections (capped at
//! `max_ejection`); `n` decays by one for every `max_ejection` spent without a new ejection. No
//! ejection happens if it would leave more than `max_ejection_percent` % of the pool ejected
//! (rounded down: with 10 backends and 25 %, at most 2 are ejected at once).
//!
//! # Drive loop
//! `record(backend, observation, now)` from the data path (returns the ejection it caused);
//! `poll(now)` until `None` to learn which ejections expired; `next_deadline()` for the timer.
//! `record` costs O(log N) and does not allocate.

use std::collections::BTreeMap;

use lb_core::{BackendId, Duration, Instant};

use crate::HealthError;

/// Outlier detection settings. Validated by [`OutlierDetector::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject a backend (0: disabled).
    pub consecutive_failures: u32,
    /// Failure share in `(0, 1]` above which a backend is ejected (`None`: disabled).
    pub failure_rate: Option<f64>,
    /// Observations needed in a window before the failure rate is judged.
    pub min_requests: u32,
    /// Length of a failure-rate window. Non-zero.
    pub window: Duration,
    /// Ejection time of a first ejection. Non-zero.
    pub base_ejection: Duration,
    /// Longest ejection. At least `base_ejection`.
    pub max_ejection: Duration,
    /// Most of the pool that may be ejected at once, in percent (0..=100).
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    /// 5 consecutive failures, or more than 50 % failures over ≥ 20 observations in 10 s; 30 s base
    /// ejection, 300 s max; at most 10 % of the pool (Envoy's defaults, plus a rate threshold).
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            failure_rate: Some(0.5),
            min_requests: 20,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// One observation of the data path about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Observation {
    /// A connection or request succeeded.
    Success,
    /// The connection attempt failed (refused, unreachable).
    ConnectFailed,
    /// The connection was reset.
    Reset,
    /// The connection or request timed out.
    Timeout,
}

impl Observation {
    const fn is_failure(self) -> bool {
        !matches!(self, Observation::Success)
    }
}

/// Why a backend was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EjectReason {
    /// `consecutive_failures` in a row.
    Consecutive,
    /// The failure rate of the window exceeded the threshold.
    FailureRate,
}

/// A backend taken out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ejection {
    /// The backend.
    pub backend: BackendId,
    /// Why.
    pub reason: EjectReason,
    /// When it returns (reported by [`OutlierDetector::poll`]).
    pub until: Instant,
    /// How many times it has been ejected (after decay), including this one.
    pub count: u32,
}

#[derive(Debug, Clone, Default)]
struct Stats {
    consecutive: u32,
    window_start: Instant,
    requests: u32,
    failures: u32,
    ejections: u32,
    last_ejection: Option<Instant>,
    ejected_until: Option<Instant>,
}

/// Ejects backends from passive observations. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct OutlierDetector {
    cfg: OutlierConfig,
    backends: BTreeMap<BackendId, Stats>,
    ejected: usize,
}

impl OutlierDetector {
    /// A detector with no backends.
    pub fn new(cfg: OutlierConfig) -> Result<Self, HealthError> {
        let bad = |field, reason| Err(HealthError::InvalidConfig { field, reason });
        if cfg.window.is_zero() {
            return bad("window", "must be non-zero");
        }
        if cfg.base_ejection.is_zero() {
            return bad("base_ejection", "must be non-zero");
        }
        if cfg.max_ejection < cfg.base_ejection {
            return bad("max_ejection", "must be at least base_ejection");
        }
        if cfg.max_ejection_percent > 100 {
            return bad("max_ejection_percent", "must be at most 100");
        }
        if let Some(r) = cfg.failure_rate {
            if !(r > 0.0 && r <= 1.0) {
                return bad("failure_rate", "must be in (0, 1]");
            }
        }
        Ok(OutlierDetector {
            cfg,
            backends: BTreeMap::new(),
            ejected: 0,
        })
    }

    /// Adds a backend to the pool (a no-op if present).
    pub fn add(&mut self, backend: BackendId, now: Instant) {
        self.backends.entry(backend).or_insert_with(|| Stats {
            window_start: now,
            ..Stats::default()
        });
    }

    /// Removes a backend; returns whether it was present.
    pub fn remove(&mut self, backend: BackendId) -> bool {
        match self.backends.remove(&backend) {
            Some(s) => {
                if s.ejected_until.is_some() {
                    self.ejected = self.ejected.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    /// Whether `backend` is currently ejected.
    pub fn is_ejected(&self, backend: BackendId) -> bool {
        self.backends
            .get(&backend)
            .is_some_and(|s| s.ejected_until.is_some())
    }

    /// The number of backends ejected now.
    pub fn ejected_count(&self) -> usize {
        self.ejected
    }

    /// The number of backends in the pool.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// How many backends may be ejected at once.
    pub fn max_ejected(&self) -> usize {
        self.backends.len() * usize::from(self.cfg.max_ejection_percent) / 100
    }

    /// Records an observation; returns the ejection it caused, if any. Unknown backends are
    /// ignored (`Err`); observations about an ejected backend update nothing.
    pub fn record(
        &mut self,
        backend: BackendId,
        obs: Observation,
        now: Instant,
    ) -> Result<Option<Ejection>, HealthError> {
        let max = self.max_ejected();
        let cfg = self.cfg;
        let s = self
            .backends
            .get_mut(&backend)
            .ok_or(HealthError::UnknownBackend(backend))?;
        if s.ejected_until.is_some() {
            return Ok(None);
        }
        if now - s.window_start >= cfg.window {
            s.window_start = now;
            s.requests = 0;
            s.failures = 0;
        }
        s.requests = s.requests.saturating_add(1);
        if obs.is_failure() {
            s.failures = s.failures.saturating_add(1);
            s.consecutive = s.consecutive.saturating_add(1);
        } else {
            s.consecutive = 0;
        }
        let reason = if cfg.consecutive_failures > 0 && s.consecutive >= cfg.consecutive_failures {
            Some(EjectReason::Consecutive)
        } else {
            match cfg.failure_rate {
                Some(rate)
                    if s.requests >= cfg.min_requests.max(1)
                        && f64::from(s.failures) > rate * f64::from(s.requests) =>
                {
                    Some(EjectReason::FailureRate)
                }
                _ => None,
            }
        };
        let Some(reason) = reason else {
            return Ok(None);
        };
        if self.ejected >= max {
            return Ok(None); // the pool cap protects availability
        }
        // Decay: one step per max_ejection spent without an ejection.
        if let Some(last) = s.last_ejection {
            let quiet = (now - last).as_nanos() / cfg.max_ejection.as_nanos().max(1);
            let quiet = u32::try_from(quiet).unwrap_or(u32::MAX);
            s.ejections = s.ejections.saturating_sub(quiet);
        }
        s.ejections = s.ejections.saturating_add(1);
        s.last_ejection = Some(now);
        let time = cfg
            .base_ejection
            .checked_mul(s.ejections)
            .unwrap_or(cfg.max_ejection)
            .min(cfg.max_ejection);
        let until = now + time;
        s.ejected_until = Some(until);
        s.consecutive = 0;
        s.requests = 0;
        s.failures = 0;
        s.window_start = now;
        self.ejected += 1;
        Ok(Some(Ejection {
            backend,
            reason,
            until,
            count: s.ejections,
        }))
    }

    /// Returns a backend whose ejection has expired at `now` (it is back in rotation), or `None`.
    /// Call until `None`. Costs O(N) per call; ejections are rare and few (capped by
    /// `max_ejection_percent`).
    #[must_use]
    pub fn poll(&mut self, now: Instant) -> Option<BackendId> {
        let (b, s) = self
            .backends
            .iter_mut()
            .find(|(_, s)| s.ejected_until.is_some_and(|u| u <= now))?;
        s.ejected_until = None;
        s.window_start = now;
        self.ejected = self.ejected.saturating_sub(1);
        Some(*b)
    }

    /// When the next ejection expires, if any backend is ejected.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backends.values().filter_map(|s| s.ejected_until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn det(pct: u8) -> OutlierDetector {
        let cfg = OutlierConfig {
            consecutive_failures: 3,
            failure_rate: Some(0.5),
            min_requests: 10,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(100),
            max_ejection_percent: pct,
        };
        OutlierDetector::new(cfg).unwrap()
    }

    #[test]
    fn validates() {
        let c = OutlierConfig {
            failure_rate: Some(1.5),
            ..OutlierConfig::default()
        };
        assert!(OutlierDetector::new(c).is_err());
        let c = OutlierConfig {
            max_ejection: Duration::from_secs(1),
            ..OutlierConfig::default()
        };
        assert!(OutlierDetector::new(c).is_err());
        let c = OutlierConfig {
            failure_rate: Some(f64::NAN),
            ..OutlierConfig::default()
        };
        assert!(OutlierDetector::new(c).is_err());
    }

    #[test]
    fn consecutive_failures_eject_and_time_grows() {
        let mut d = det(50);
        for i in 0..4 {
            d.add(BackendId(i), Instant::ZERO);
        }
        let b = BackendId(1);
        let t0 = Instant::from_secs(1);
        assert_eq!(d.record(b, Observation::Reset, t0), Ok(None));
        assert_eq!(d.record(b, Observation::Success, t0), Ok(None));
        assert_eq!(d.record(b, Observation::Reset, t0), Ok(None));
        assert_eq!(d.record(b, Observation::Timeout, t0), Ok(None));
        let e = d
            .record(b, Observation::ConnectFailed, t0)
            .unwrap()
            .unwrap();
        assert_eq!(e.reason, EjectReason::Consecutive);
        assert_eq!(e.until, t0 + Duration::from_secs(30));
        assert!(d.is_ejected(b));
        assert_eq!(d.next_deadline(), Some(e.until));
        assert_eq!(d.poll(e.until - Duration::from_nanos(1)), None);
        assert_eq!(d.poll(e.until), Some(b));
        assert!(!d.is_ejected(b));
        // Second ejection soon after: twice as long.
        let t1 = e.until;
        for _ in 0..2 {
            assert_eq!(d.record(b, Observation::Reset, t1), Ok(None));
        }
        let e2 = d.record(b, Observation::Reset, t1).unwrap().unwrap();
        assert_eq!(e2.count, 2);
        assert_eq!(e2.until, t1 + Duration::from_secs(60));
        assert_eq!(
            d.record(BackendId(99), Observation::Reset, t1),
            Err(HealthError::UnknownBackend(BackendId(99)))
        );
    }

    #[test]
    fn failure_rate_ejects() {
        let mut d = det(50);
        d.add(BackendId(1), Instant::ZERO);
        d.add(BackendId(2), Instant::ZERO);
        let b = BackendId(1);
        let mut got = None;
        for i in 0..20u64 {
            let obs = if i % 3 == 0 {
                Observation::Success
            } else {
                Observation::Reset
            };
            if let Some(e) = d.record(b, obs, Instant::from_millis(i)).unwrap() {
                got = Some((i, e));
                break;
            }
        }
        let (i, e) = got.expect("ejected");
        assert_eq!(e.reason, EjectReason::FailureRate);
        assert_eq!(i, 9); // the tenth observation (min_requests) decides
    }

    #[test]
    fn pool_cap_holds() {
        let mut d = det(25);
        for i in 0..8 {
            d.add(BackendId(i), Instant::ZERO);
        }
        assert_eq!(d.max_ejected(), 2);
        let mut ejected = 0;
        for i in 0..8 {
            for _ in 0..3 {
                if d.record(BackendId(i), Observation::Reset, Instant::ZERO)
                    .unwrap()
                    .is_some()
                {
                    ejected += 1;
                }
            }
        }
        assert_eq!(ejected, 2);
        assert_eq!(d.ejected_count(), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the observations and timing, the ejected share never exceeds the cap, and the
        /// ejected count matches the per-backend flags.
        #[test]
        fn never_ejects_more_than_cap(
            n in 1u32..20,
            pct in 0u8..=100,
            events in proptest::collection::vec((0u32..20, 0u8..4, 0u64..5_000), 0..300),
        ) {
            let mut d = det(pct);
            for i in 0..n { d.add(BackendId(i), Instant::ZERO); }
            let mut now = Instant::ZERO;
            for (b, o, dt) in events {
                now += Duration::from_millis(dt * 10);
                while d.poll(now).is_some() {}
                let obs = [Observation::Success, Observation::Reset, Observation::Timeout, Observation::ConnectFailed][usize::from(o)];
                let _ = d.record(BackendId(b % n), obs, now);
                let flagged = (0..n).filter(|i| d.is_ejected(BackendId(*i))).count();
                prop_assert_eq!(flagged, d.ejected_count());
                prop_assert!(flagged * 100 <= n as usize * usize::from(pct));
            }
        }
    }
}
