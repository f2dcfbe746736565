//! Least connections, IPVS semantics.
//!
//! - [`LeastConn`] (`ip_vs_lc.c`): the available backend with the least
//!   `overhead = activeconns * 256 + inactconns` (`ip_vs_dest_conn_overhead`); weights only
//!   exclude (weight 0). Ties go to the first in pool order.
//! - [`Wlc`] (`ip_vs_wlc.c`): the least `overhead / weight`, compared by cross-multiplication
//!   (`loh * dw > doh * lw` — no division), with effective weights (slow start). Ties go to the
//!   first.
//!
//! Both are one O(N) scan over a dense 20-byte-per-backend array, no allocation — or O(1) when
//! the pool maintains a least-cost index for their key
//! ([`PoolConfig::least_index`](crate::pool::PoolConfig)).

use lb_core::Instant;

use super::{ratio_less, Pick};
use crate::pool::{LeastKey, Pool};

/// IPVS `lc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastConn;

impl LeastConn {
    /// A least-connections scheduler.
    pub const fn new() -> Self {
        LeastConn
    }

    /// Picks the available backend with the least connection overhead.
    pub fn pick(&self, pool: &Pool) -> Pick {
        if let Some(i) = pool.indexed_least(LeastKey::Conns) {
            return pool.pick_at(i);
        }
        let mut best: Option<(usize, u64)> = None;
        for (i, h) in pool.hot().iter().enumerate() {
            if !h.available() {
                continue;
            }
            let oh = h.overhead();
            if best.is_none_or(|(_, b)| oh < b) {
                best = Some((i, oh));
            }
        }
        pool.pick_at(best.map(|(i, _)| i))
    }
}

/// IPVS `wlc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wlc;

impl Wlc {
    /// A weighted-least-connections scheduler.
    pub const fn new() -> Self {
        Wlc
    }

    /// Picks the available backend with the least `overhead / effective weight`.
    pub fn pick(&self, pool: &Pool, now: Instant) -> Pick {
        if let Some(i) = pool.indexed_least(LeastKey::WeightedConns) {
            return pool.pick_at(i);
        }
        let mut best: Option<(usize, u64, u64)> = None;
        for (i, h) in pool.hot().iter().enumerate() {
            if !h.available() {
                continue;
            }
            let w = pool.weight_of(i, h, now);
            if w == 0 {
                continue;
            }
            let oh = h.overhead();
            if best.is_none_or(|(_, boh, bw)| ratio_less(oh, w, boh, bw)) {
                best = Some((i, oh, w));
            }
        }
        pool.pick_at(best.map(|(i, _, _)| i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{arb_pool, cost_minimiser};
    use crate::pool::tests::pool;
    use lb_core::BackendId;
    use proptest::prelude::*;

    #[test]
    fn ipvs_overhead_weights_active_over_inactive() {
        let mut p = pool(&[1, 1]);
        p.conn_opened(BackendId(0)).unwrap(); // 256
        for _ in 0..255 {
            p.conn_opened_inactive(BackendId(1)).unwrap(); // 255
        }
        assert_eq!(LeastConn.pick(&p), Pick::Backend(BackendId(1)));
        p.conn_opened_inactive(BackendId(1)).unwrap(); // 256: tie → first
        assert_eq!(LeastConn.pick(&p), Pick::Backend(BackendId(0)));
    }

    #[test]
    fn wlc_uses_weights() {
        let mut p = pool(&[1, 3]);
        for _ in 0..2 {
            p.conn_opened(BackendId(1)).unwrap();
        }
        p.conn_opened(BackendId(0)).unwrap();
        // 256/1 vs 512/3 → backend 1.
        assert_eq!(Wlc.pick(&p, Instant::ZERO), Pick::Backend(BackendId(1)));
        assert_eq!(LeastConn.pick(&p), Pick::Backend(BackendId(0)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn lc_picks_a_minimiser(p in arb_pool()) {
            let got = LeastConn.pick(&p);
            let want = cost_minimiser(&p, |i| (p.conn_overhead(i), 1));
            prop_assert_eq!(got, want);
        }

        #[test]
        fn wlc_picks_a_minimiser(p in arb_pool()) {
            let got = Wlc.pick(&p, Instant::ZERO);
            let want = cost_minimiser(&p, |i| (p.conn_overhead(i), p.effective_weight(i, Instant::ZERO)));
            prop_assert_eq!(got, want);
        }
    }
}
