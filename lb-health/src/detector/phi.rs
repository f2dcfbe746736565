//! The φ accrual failure detector (Hayashibara, Défago, Yared, Katayama, "The φ Accrual Failure
//! Detector", SRDS 2004), with the refinements of Akka's implementation: a minimum standard
//! deviation, an acceptable pause added to the mean, and a logistic approximation of the normal
//! CDF.
//!
//! φ(t) = −log10(1 − F(t − t_last)), where F is the CDF of a normal distribution with the mean and
//! standard deviation of the last `max_samples` inter-arrival times. φ = 1 means a 10 % chance that
//! a heartbeat this late would still come; φ = 8 means 10⁻⁸.

use lb_core::{Duration, Instant};

use super::FailureDetector;
use crate::HealthError;

/// φ accrual parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhiConfig {
    /// Suspect when φ reaches this value (Akka: 8, Cassandra: 8). Finite, > 0.
    pub threshold: f64,
    /// Inter-arrival samples kept (sliding window). 2..=10 000.
    pub max_samples: usize,
    /// Lower bound of the standard deviation, so that very regular heartbeats do not make the
    /// detector hair-triggered. Non-zero.
    pub min_std_dev: Duration,
    /// Added to the mean: a pause (GC, scheduling) that is tolerated without suspicion.
    pub acceptable_pause: Duration,
    /// The assumed mean interval before any sample exists (the heartbeat interval).
    pub first_heartbeat_estimate: Duration,
}

impl Default for PhiConfig {
    /// Threshold 8 (as Akka and Cassandra); the window, standard-deviation floor and first
    /// estimate sized for a 100 ms heartbeat: 200 samples, 50 ms, 100 ms; no acceptable pause.
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            max_samples: 200,
            min_std_dev: Duration::from_millis(50),
            acceptable_pause: Duration::ZERO,
            first_heartbeat_estimate: Duration::from_millis(100),
        }
    }
}

/// The φ accrual detector. Memory: `max_samples` × 8 bytes, allocated once; `heartbeat` and `phi`
/// are O(1) and do not allocate.
///
/// ```
/// use lb_core::{Duration, Instant};
/// use lb_health::detector::{FailureDetector, PhiAccrual, PhiConfig};
/// let mut d = PhiAccrual::new(PhiConfig::default(), Instant::ZERO).unwrap();
/// let mut t = Instant::ZERO;
/// for _ in 0..100 {
///     t += Duration::from_millis(100);
///     d.heartbeat(t);
/// }
/// assert!(d.phi(t + Duration::from_millis(100)) < 1.0);
/// assert!(d.is_available(t + Duration::from_millis(200)));
/// assert!(!d.is_available(t + Duration::from_secs(2)));
/// ```
#[derive(Debug, Clone)]
pub struct PhiAccrual {
    cfg: PhiConfig,
    /// Ring buffer of inter-arrival times in milliseconds.
    samples: Vec<f64>,
    next: usize,
    sum: f64,
    sum_sq: f64,
    last: Instant,
    /// Whether a real heartbeat has been seen (before that, `last` is the creation time).
    started: bool,
}

impl PhiAccrual {
    /// A detector that starts observing at `now`.
    pub fn new(cfg: PhiConfig, now: Instant) -> Result<Self, HealthError> {
        let bad = |field, reason| Err(HealthError::InvalidConfig { field, reason });
        if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
            return bad("threshold", "must be finite and positive");
        }
        if !(2..=10_000).contains(&cfg.max_samples) {
            return bad("max_samples", "must be in 2..=10000");
        }
        if cfg.min_std_dev.is_zero() {
            return bad("min_std_dev", "must be non-zero");
        }
        if cfg.first_heartbeat_estimate.is_zero() {
            return bad("first_heartbeat_estimate", "must be non-zero");
        }
        let mut d = PhiAccrual {
            cfg,
            samples: Vec::with_capacity(cfg.max_samples),
            next: 0,
            sum: 0.0,
            sum_sq: 0.0,
            last: now,
            started: false,
        };
        // Akka's bootstrap: two samples around the estimate, std-dev = mean / 4.
        let mean = ms(cfg.first_heartbeat_estimate);
        d.push(mean - mean / 4.0);
        d.push(mean + mean / 4.0);
        Ok(d)
    }

    fn push(&mut self, x: f64) {
        if self.samples.len() < self.cfg.max_samples {
            self.samples.push(x);
        } else if let Some(old) = self.samples.get_mut(self.next) {
            self.sum -= *old;
            self.sum_sq -= *old * *old;
            *old = x;
            self.next = (self.next + 1) % self.cfg.max_samples;
        }
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Mean inter-arrival time plus the acceptable pause, and the (floored) standard deviation,
    /// both in milliseconds.
    fn params(&self) -> (f64, f64) {
        let n = self.samples.len().max(1) as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let std = var.sqrt().max(ms(self.cfg.min_std_dev));
        (mean + ms(self.cfg.acceptable_pause), std)
    }

    /// The suspicion level at `now`.
    pub fn phi(&self, now: Instant) -> f64 {
        let (mean, std) = self.params();
        phi_of(ms(now - self.last), mean, std)
    }

    /// The number of inter-arrival samples held (including the two bootstrap samples until the
    /// window fills).
    pub fn samples(&self) -> usize {
        self.samples.len()
    }
}

impl FailureDetector for PhiAccrual {
    fn heartbeat(&mut self, now: Instant) {
        if now < self.last {
            return; // reordered: ignore
        }
        if self.started {
            self.push(ms(now - self.last));
        }
        self.started = true;
        self.last = now;
    }

    fn is_available(&self, now: Instant) -> bool {
        self.phi(now) < self.cfg.threshold
    }

    /// Computed by inverting φ: solve the logistic approximation for the standardised delay `y`
    /// at which φ equals the threshold (Newton's method on a convex increasing cubic).
    fn suspect_at(&self) -> Instant {
        let (mean, std) = self.params();
        let p = 10f64.powf(-self.cfg.threshold);
        // 1 - F = e / (1 + e) = p  ⇒  y (1.5976 + 0.070566 y²) = ln((1 - p) / p) =: c
        let c = ((1.0 - p) / p).ln();
        let mut y = c / 1.5976; // to the right of the root: Newton converges monotonically
        for _ in 0..30 {
            let f = y * (1.5976 + 0.070566 * y * y) - c;
            let df = 1.5976 + 3.0 * 0.070566 * y * y;
            let step = f / df;
            y -= step;
            if step.abs() < 1e-9 {
                break;
            }
        }
        let delay_ms = (mean + y * std).max(0.0);
        // Round up a nanosecond so that φ(suspect_at) ≥ threshold despite rounding.
        let nanos = (delay_ms * 1e6).ceil() + 1.0;
        let nanos = if nanos.is_finite() && nanos < u64::MAX as f64 {
            nanos as u64
        } else {
            u64::MAX
        };
        self.last + Duration::from_nanos(nanos)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// φ for a delay `t` given the distribution, with Akka's logistic approximation of the normal CDF
/// (error < 1e-4), computed on the side that avoids cancellation.
fn phi_of(t: f64, mean: f64, std: f64) -> f64 {
    let y = (t - mean) / std;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if t > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    let phi = -p_later.log10();
    if phi.is_nan() {
        f64::INFINITY
    } else {
        phi.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regular(n: u32, every: Duration) -> (PhiAccrual, Instant) {
        let mut d = PhiAccrual::new(PhiConfig::default(), Instant::ZERO).unwrap();
        let mut t = Instant::ZERO;
        for _ in 0..n {
            t += every;
            d.heartbeat(t);
        }
        (d, t)
    }

    #[test]
    fn validates() {
        let c = PhiConfig {
            threshold: f64::NAN,
            ..PhiConfig::default()
        };
        assert!(PhiAccrual::new(c, Instant::ZERO).is_err());
        let c = PhiConfig {
            max_samples: 1,
            ..PhiConfig::default()
        };
        assert!(PhiAccrual::new(c, Instant::ZERO).is_err());
        let c = PhiConfig {
            min_std_dev: Duration::ZERO,
            ..PhiConfig::default()
        };
        assert!(PhiAccrual::new(c, Instant::ZERO).is_err());
    }

    #[test]
    fn phi_grows_with_silence() {
        let (d, t) = regular(300, Duration::from_millis(100));
        assert_eq!(d.samples(), 200);
        let mut prev = -1.0;
        for ms in (0..2_000).step_by(50) {
            let p = d.phi(t + Duration::from_millis(ms));
            assert!(p >= prev, "phi must be monotone: {p} < {prev} at {ms}");
            prev = p;
        }
        // At the mean, half the mass is later: φ = log10(2).
        let at_mean = d.phi(t + Duration::from_millis(100));
        assert!((at_mean - 2f64.log10()).abs() < 0.01, "{at_mean}");
        assert!(d.phi(t + Duration::from_secs(2)) > 8.0);
    }

    #[test]
    fn suspect_at_matches_phi() {
        let (d, t) = regular(50, Duration::from_millis(100));
        let s = d.suspect_at();
        assert!(s > t);
        assert!(d.is_available(s - Duration::from_micros(100)));
        assert!(!d.is_available(s));
        // With σ floored at 50 ms and threshold 8, the root of the cubic is y ≈ 5.4.
        let delay = (s - t).as_secs_f64() * 1e3;
        assert!((360.0..420.0).contains(&delay), "{delay}");
    }

    #[test]
    fn adapts_to_jittery_heartbeats() {
        let mut d = PhiAccrual::new(PhiConfig::default(), Instant::ZERO).unwrap();
        let mut t = Instant::ZERO;
        for i in 0..200u64 {
            t += Duration::from_millis(if i % 2 == 0 { 50 } else { 350 });
            d.heartbeat(t);
        }
        // Mean 200 ms, σ 150 ms: a 600 ms gap is not yet suspicious here, but is for a regular peer.
        assert!(d.is_available(t + Duration::from_millis(600)));
        let (r, rt) = regular(200, Duration::from_millis(200));
        assert!(!r.is_available(rt + Duration::from_millis(600)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// φ is finite-or-infinite, never NaN or negative, and monotone in the delay; suspect_at is
        /// exactly where availability ends.
        #[test]
        fn phi_sane(gaps in proptest::collection::vec(1u64..2_000, 1..100), probe in 0u64..10_000) {
            let mut d = PhiAccrual::new(PhiConfig::default(), Instant::ZERO).unwrap();
            let mut t = Instant::ZERO;
            for g in gaps { t += Duration::from_millis(g); d.heartbeat(t); }
            let a = d.phi(t + Duration::from_millis(probe));
            let b = d.phi(t + Duration::from_millis(probe + 1));
            prop_assert!(a >= 0.0 && b >= a);
            let s = d.suspect_at();
            prop_assert!(!d.is_available(s));
            prop_assert!(d.is_available(s - Duration::from_millis(1)) || s - t <= Duration::from_millis(1));
        }
    }
}
