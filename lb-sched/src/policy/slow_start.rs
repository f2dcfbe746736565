//! Slow start and the panic threshold: two pool options that change which backends and what
//! weights the policies see.
//!
//! - **Slow start** (Envoy `slow_start_config`, HAProxy `slowstart`): a backend that becomes
//!   healthy (or is added) ramps its effective weight linearly from `min_percent` of its weight to
//!   the full weight over `window`, so a cold server (empty caches, JIT, connection pools) is not
//!   handed its whole share at once.
//! - **Panic threshold** (Envoy `healthy_panic_threshold`, default 50 %): when fewer than this
//!   percentage of the usable backends (admin-active, weight > 0) are healthy, health is ignored
//!   and flows spread over all of them, rather than crushing the few survivors. Admin-down,
//!   draining and weight-0 backends stay excluded even in panic.

use lb_core::{Duration, Instant};

/// Fixed-point scale of effective weights: a backend of weight `w` out of slow start has an
/// effective weight of `w * WEIGHT_SCALE`. The scale lets the ramp be finer than one unit of
/// weight.
pub const WEIGHT_SCALE: u64 = 256;

/// Slow-start configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStart {
    /// Length of the ramp. Zero disables slow start.
    pub window: Duration,
    /// Effective weight at the start of the ramp, in percent of the full weight (clamped to
    /// 1..=100).
    pub min_percent: u8,
}

impl Default for SlowStart {
    /// A 30 s linear ramp from 10 %.
    fn default() -> Self {
        SlowStart {
            window: Duration::from_secs(30),
            min_percent: 10,
        }
    }
}

impl SlowStart {
    /// The effective (scaled) weight of a backend of weight `weight` whose ramp started at
    /// `since`, at time `now`: `weight * WEIGHT_SCALE * max(min, elapsed / window)`, at least 1
    /// when `weight > 0`.
    ///
    /// ```
    /// use lb_core::{Duration, Instant};
    /// use lb_sched::policy::slow_start::{SlowStart, WEIGHT_SCALE};
    /// let s = SlowStart { window: Duration::from_secs(10), min_percent: 10 };
    /// let t0 = Instant::from_secs(100);
    /// assert_eq!(s.effective_weight(4, t0, t0), 4 * WEIGHT_SCALE / 10);
    /// assert_eq!(s.effective_weight(4, t0, Instant::from_secs(105)), 4 * WEIGHT_SCALE / 2);
    /// assert_eq!(s.effective_weight(4, t0, Instant::from_secs(200)), 4 * WEIGHT_SCALE);
    /// ```
    pub fn effective_weight(&self, weight: u32, since: Instant, now: Instant) -> u64 {
        let full = u64::from(weight) * WEIGHT_SCALE;
        let window = u128::from(u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX));
        if weight == 0 || window == 0 {
            return full;
        }
        let elapsed = u128::from((now - since).as_nanos().min(window) as u64);
        let min = u128::from(self.min_percent.clamp(1, 100));
        // fraction in 1/100 * window units: max(min * window, 100 * elapsed) / (100 * window)
        let num = (min * window).max(100 * elapsed);
        let eff = u128::from(full) * num / (100 * window);
        (eff as u64).clamp(1, full)
    }

    /// When a ramp that started at `since` ends.
    pub fn ends_at(&self, since: Instant) -> Instant {
        since + self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_is_monotone_and_bounded() {
        let s = SlowStart {
            window: Duration::from_millis(1000),
            min_percent: 0,
        };
        let t0 = Instant::from_secs(1);
        let mut prev = 0;
        for ms in (0..=1200).step_by(50) {
            let w = s.effective_weight(3, t0, t0 + Duration::from_millis(ms));
            assert!(w >= prev && (1..=3 * WEIGHT_SCALE).contains(&w));
            prev = w;
        }
        assert_eq!(prev, 3 * WEIGHT_SCALE);
        assert_eq!(s.effective_weight(0, t0, t0), 0);
        let off = SlowStart {
            window: Duration::ZERO,
            min_percent: 10,
        };
        assert_eq!(off.effective_weight(2, t0, t0), 2 * WEIGHT_SCALE);
        // `now` before `since` saturates to the start of the ramp.
        // `now` before `since` saturates to the start of the ramp (min percent 0 clamps to 1 %).
        assert_eq!(s.effective_weight(1, t0, Instant::ZERO), WEIGHT_SCALE / 100);
    }
}
