//! Least expected response time from peak-EWMA (Finagle `PeakEwma`, Linkerd's balancer).
//!
//! Each backend's cost is `(outstanding + 1) × peak-EWMA latency` (outstanding: requests in
//! flight plus active connections, [`Pool::outstanding`]), divided by its effective weight:
//! the time a new request is expected to take there if the backend serves its queue at its
//! recent worst-case speed. The estimate itself ([`Pool::observe_latency`]) jumps up to any
//! slower sample at once and decays towards faster ones with a time constant, so a backend that
//! slows down is avoided immediately and trusted again gradually.
//!
//! As in Finagle, a backend whose estimate has decayed to zero but which has requests in flight
//! gets a large penalty (`PENALTY + in_flight`): a silent backend is not a fast one.
//!
//! This module scans all backends (O(N)); for O(1) use [`P2c`](super::p2c::P2c) with
//! [`P2cLoad::PeakEwma`](super::p2c::P2cLoad), Finagle's default pairing.

use lb_core::Instant;

use super::Pick;
use crate::pool::Pool;

/// Cost given to a backend with requests in flight but no latency estimate left (Finagle uses
/// `Long.MaxValue >> 16` nanoseconds).
pub const PENALTY: f64 = (i64::MAX >> 16) as f64;

/// Least expected response time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakEwma;

impl PeakEwma {
    /// A peak-EWMA least-expected-response-time scheduler.
    pub const fn new() -> Self {
        PeakEwma
    }

    /// The expected response time of a new request at position `i` (before weighting), in ns.
    pub fn cost(pool: &Pool, i: usize, now: Instant) -> f64 {
        let pending = f64::from(pool.outstanding(i));
        let est = pool.peak_ewma_ns(i, now);
        if est < 1.0 && pending > 0.0 {
            PENALTY + pending
        } else {
            est * (pending + 1.0)
        }
    }

    /// Picks the available backend with the least `cost / effective weight` (ties: first).
    pub fn pick(&self, pool: &Pool, now: Instant) -> Pick {
        let mut best: Option<(usize, f64)> = None;
        for i in 0..pool.len() {
            if !pool.is_available(i) {
                continue;
            }
            let w = pool.effective_weight(i, now);
            if w == 0 {
                continue;
            }
            let c = Self::cost(pool, i, now) / w as f64;
            if best.is_none_or(|(_, b)| c < b) {
                best = Some((i, c));
            }
        }
        pool.pick_at(best.map(|(i, _)| i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use lb_core::{BackendId, Duration};

    #[test]
    fn avoids_the_slow_then_forgives() {
        let mut p = pool(&[1, 1]);
        let t = Instant::from_secs(1);
        p.observe_latency(BackendId(0), Duration::from_millis(100), t)
            .unwrap();
        p.observe_latency(BackendId(1), Duration::from_millis(10), t)
            .unwrap();
        assert_eq!(PeakEwma.pick(&p, t), Pick::Backend(BackendId(1)));
        // 12 queued requests at 10 ms cost more than an idle 100 ms backend.
        for _ in 0..12 {
            p.request_started(BackendId(1)).unwrap();
        }
        assert_eq!(PeakEwma.pick(&p, t), Pick::Backend(BackendId(0)));
    }

    #[test]
    fn penalty_for_silent_backends() {
        let mut p = pool(&[1, 1]);
        let t = Instant::from_secs(1);
        p.request_started(BackendId(0)).unwrap();
        // After a long silence both estimates decayed to ~0; the one with a request pending
        // is penalised.
        let later = t + Duration::from_secs(100_000);
        assert!(PeakEwma::cost(&p, 0, later) >= PENALTY);
        assert_eq!(PeakEwma.pick(&p, later), Pick::Backend(BackendId(1)));
    }
}
