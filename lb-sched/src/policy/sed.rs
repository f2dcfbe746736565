//! Shortest expected delay and never queue, IPVS semantics.
//!
//! - [`Sed`] (`ip_vs_sed.c`): the least `(activeconns + 1) / weight` — the expected delay if the
//!   new connection joins that server — compared by cross-multiplication; inactive connections
//!   are ignored. Ties go to the first.
//! - [`Nq`] (`ip_vs_nq.c`): the first idle available backend (no active connection) if any —
//!   it need not queue at all — else as SED.

use lb_core::Instant;

use super::{ratio_less, Pick};
use crate::pool::{LeastKey, Pool};

/// IPVS `sed`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sed;

fn sed_scan(pool: &Pool, now: Instant, nq: bool) -> Pick {
    let mut best: Option<(usize, u64, u64)> = None;
    for (i, h) in pool.hot().iter().enumerate() {
        if !h.available() {
            continue;
        }
        let w = pool.weight_of(i, h, now);
        if w == 0 {
            continue;
        }
        if nq && h.active == 0 {
            return Pick::Backend(pool.id_at(i));
        }
        let oh = u64::from(h.active) + 1;
        if best.is_none_or(|(_, boh, bw)| ratio_less(oh, w, boh, bw)) {
            best = Some((i, oh, w));
        }
    }
    pool.pick_at(best.map(|(i, _, _)| i))
}

impl Sed {
    /// A shortest-expected-delay scheduler.
    pub const fn new() -> Self {
        Sed
    }

    /// Picks the available backend with the least `(active + 1) / effective weight`.
    pub fn pick(&self, pool: &Pool, now: Instant) -> Pick {
        if let Some(i) = pool.indexed_least(LeastKey::ExpectedDelay) {
            return pool.pick_at(i);
        }
        sed_scan(pool, now, false)
    }
}

/// IPVS `nq`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Nq;

impl Nq {
    /// A never-queue scheduler.
    pub const fn new() -> Self {
        Nq
    }

    /// Picks the first idle available backend, else as [`Sed`].
    pub fn pick(&self, pool: &Pool, now: Instant) -> Pick {
        sed_scan(pool, now, true)
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
    fn nq_prefers_idle_over_fast() {
        let mut p = pool(&[10, 1]);
        p.conn_opened(BackendId(0)).unwrap();
        // SED: 2/10 < 1/1 → the heavy one; NQ: backend 1 is idle.
        assert_eq!(Sed.pick(&p, Instant::ZERO), Pick::Backend(BackendId(0)));
        assert_eq!(Nq.pick(&p, Instant::ZERO), Pick::Backend(BackendId(1)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn sed_picks_a_minimiser(p in arb_pool()) {
            let got = Sed.pick(&p, Instant::ZERO);
            let want = cost_minimiser(&p, |i| (u64::from(p.active_conns(i)) + 1, p.effective_weight(i, Instant::ZERO)));
            prop_assert_eq!(got, want);
        }

        #[test]
        fn nq_picks_idle_or_sed_minimiser(p in arb_pool()) {
            let got = Nq.pick(&p, Instant::ZERO);
            let idle = (0..p.len()).find(|&i| p.is_available(i) && p.active_conns(i) == 0);
            let want = match idle {
                Some(i) => Pick::Backend(p.id_at(i)),
                None => cost_minimiser(&p, |i| (u64::from(p.active_conns(i)) + 1, p.effective_weight(i, Instant::ZERO))),
            };
            prop_assert_eq!(got, want);
        }
    }
}
