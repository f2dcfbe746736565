//! Weighted round robin, two ways.
//!
//! - [`SmoothWrr`] — nginx's smooth WRR (`ngx_http_upstream_get_peer`): on each pick every
//!   available backend's `current` grows by its weight, the largest `current` wins and is reduced
//!   by the total weight. Over `Σ w` picks each backend gets exactly `w` picks, spread out rather
//!   than in bursts (weights {5, 1, 1} give `a a b a c a a`, not `a a a a a b c`). Uses effective
//!   weights (slow start). O(N) per pick.
//! - [`IpvsWrr`] — IPVS `ip_vs_wrr.c`: a current weight `cw` starts at the maximum weight and
//!   steps down by the gcd of the weights each time the cursor wraps; a backend is picked when its
//!   weight ≥ `cw`. Over one cycle (`Σ w / gcd` picks) each backend gets `w / gcd` picks, heavy
//!   backends first. Uses configured weights. Amortised O(1) when all are available.
//!
//! Both restart their cycle when the pool's membership or weights change
//! ([`Pool::generation`]).

use lb_core::Instant;

use super::Pick;
use crate::pool::Pool;

/// nginx-style smooth weighted round robin.
#[derive(Debug, Clone, Default)]
pub struct SmoothWrr {
    current: Vec<i64>,
    generation: u64,
}

impl SmoothWrr {
    /// A smooth WRR with an empty state (sized on the first pick).
    pub const fn new() -> Self {
        SmoothWrr {
            current: Vec::new(),
            generation: 0,
        }
    }

    fn sync(&mut self, pool: &Pool) {
        if self.current.len() != pool.len() || self.generation != pool.generation() {
            self.current.clear();
            self.current.resize(pool.len(), 0);
            self.generation = pool.generation();
        }
    }

    /// Picks the next backend of the smooth sequence. Allocates only when the pool changed size.
    pub fn pick(&mut self, pool: &Pool, now: Instant) -> Pick {
        self.sync(pool);
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_cur = i64::MIN;
        for (i, cur) in self.current.iter_mut().enumerate() {
            if !pool.is_available(i) {
                continue;
            }
            let w = i64::try_from(pool.effective_weight(i, now)).unwrap_or(i64::MAX);
            if w == 0 {
                continue;
            }
            *cur = cur.saturating_add(w);
            total = total.saturating_add(w);
            if *cur > best_cur {
                best_cur = *cur;
                best = Some(i);
            }
        }
        if let Some(b) = best {
            if let Some(c) = self.current.get_mut(b) {
                *c = c.saturating_sub(total);
            }
        }
        pool.pick_at(best)
    }
}

/// IPVS's gcd-stepped weighted round robin.
#[derive(Debug, Clone, Default)]
pub struct IpvsWrr {
    /// Position of the last pick; `None` = before the first backend (the list head).
    cursor: Option<usize>,
    cw: i64,
    mw: i64,
    di: i64,
    generation: u64,
    synced: bool,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl IpvsWrr {
    /// An IPVS WRR (state built on the first pick).
    pub const fn new() -> Self {
        IpvsWrr {
            cursor: None,
            cw: 0,
            mw: 0,
            di: 1,
            generation: 0,
            synced: false,
        }
    }

    /// `ip_vs_wrr_init_svc` / `ip_vs_wrr_dest_changed`: gcd and max over positive weights,
    /// `mw = max - (gcd - 1)`, `cw = mw`, cursor at the head.
    fn sync(&mut self, pool: &Pool) {
        if self.synced && self.generation == pool.generation() {
            return;
        }
        let mut g = 0u64;
        let mut max = 0u64;
        for i in 0..pool.len() {
            let w = u64::from(pool.weight(i));
            if w > 0 {
                g = gcd(g, w);
                max = max.max(w);
            }
        }
        self.di = i64::try_from(g.max(1)).unwrap_or(1);
        self.mw = i64::try_from(max).unwrap_or(i64::MAX) - (self.di - 1);
        self.cw = self.mw;
        self.cursor = None;
        self.generation = pool.generation();
        self.synced = true;
    }

    /// Picks the next backend (`ip_vs_wrr_schedule`): scan on from the cursor for an available
    /// backend with weight ≥ `cw`; at the end of the list lower `cw` by the gcd (wrapping to the
    /// maximum) and start over. Gives up after one full cycle without a candidate.
    pub fn pick(&mut self, pool: &Pool) -> Pick {
        self.sync(pool);
        let n = pool.len();
        if n == 0 || self.mw <= 0 {
            return pool.no_pick();
        }
        // One full cycle visits every position once per cw level: (mw / di + 1) levels.
        let levels = u64::try_from(self.mw / self.di).unwrap_or(0) + 2;
        let budget = levels.saturating_mul(n as u64 + 1);
        let mut i = self.cursor.map_or(0, |c| c + 1);
        for _ in 0..budget {
            if i >= n {
                self.cw -= self.di;
                if self.cw <= 0 {
                    self.cw = self.mw;
                }
                i = 0;
                continue;
            }
            if pool.is_available(i) && i64::from(pool.weight(i)) >= self.cw {
                self.cursor = Some(i);
                return Pick::Backend(pool.id_at(i));
            }
            i += 1;
        }
        self.cursor = None;
        pool.no_pick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use lb_core::BackendId;
    use proptest::prelude::*;

    fn run_smooth(weights: &[u32], n: usize) -> Vec<u32> {
        let p = pool(weights);
        let mut s = SmoothWrr::new();
        (0..n)
            .map(|_| s.pick(&p, Instant::ZERO).backend().unwrap().get())
            .collect()
    }

    #[test]
    fn nginx_sequence() {
        assert_eq!(run_smooth(&[5, 1, 1], 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn ipvs_sequence() {
        // ipvsadm docs example: weights 4, 3, 2 → A A B A B C A B C per cycle (cw 4, 3, 2, 1).
        let p = pool(&[4, 3, 2]);
        let mut w = IpvsWrr::new();
        let ids: Vec<u32> = (0..9)
            .map(|_| w.pick(&p).backend().unwrap().get())
            .collect();
        assert_eq!(ids, [0, 0, 1, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn unavailable_and_zero() {
        let mut p = pool(&[0, 0]);
        assert_eq!(SmoothWrr::new().pick(&p, Instant::ZERO), Pick::Unavailable);
        assert_eq!(IpvsWrr::new().pick(&p), Pick::Unavailable);
        p.set_weight(BackendId(1), lb_core::Weight::new(3)).unwrap();
        assert_eq!(IpvsWrr::new().pick(&p), Pick::Backend(BackendId(1)));
        assert_eq!(
            SmoothWrr::new().pick(&p, Instant::ZERO),
            Pick::Backend(BackendId(1))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Over one full cycle (Σ w picks) each backend gets exactly its weight.
        #[test]
        fn smooth_cycle_is_exact(weights in prop::collection::vec(0u32..12, 1..10)) {
            let total: u32 = weights.iter().sum();
            prop_assume!(total > 0);
            let seq = run_smooth(&weights, total as usize * 2);
            for cycle in seq.chunks(total as usize) {
                for (i, &w) in weights.iter().enumerate() {
                    let got = cycle.iter().filter(|&&b| b == i as u32).count();
                    prop_assert_eq!(got, w as usize, "backend {} in {:?}", i, cycle);
                }
            }
        }

        /// Smoothness: in every prefix of the sequence each backend's count stays within one of
        /// its exact share, so it is never sent more than one extra in a row beyond its share.
        #[test]
        fn smooth_never_bursts(weights in prop::collection::vec(1u32..12, 1..10)) {
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            let seq = run_smooth(&weights, total as usize);
            let mut count = vec![0u64; weights.len()];
            for (t, &b) in seq.iter().enumerate() {
                count[b as usize] += 1;
                let t = t as u64 + 1;
                for (i, &w) in weights.iter().enumerate() {
                    // count_i(t) ≤ ceil(t * w_i / W) + 1 … checked as count*W ≤ t*w + 2W - 1
                    let share_x = t * u64::from(w);
                    prop_assert!(count[i] * total <= share_x + total + (total - 1),
                        "backend {} after {} picks: {} of share {}/{}", i, t, count[i], share_x, total);
                    // … and never more than one pick behind its floor share.
                    prop_assert!(count[i] * total + 2 * total > share_x,
                        "backend {} starved after {} picks", i, t);
                }
            }
        }

        /// IPVS WRR: over one cycle of Σ w / gcd picks each backend gets w / gcd.
        #[test]
        fn ipvs_cycle_is_exact(weights in prop::collection::vec(0u32..12, 1..10)) {
            let g = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w)));
            prop_assume!(g > 0);
            let cycle: u64 = weights.iter().map(|&w| u64::from(w) / g).sum();
            let p = pool(&weights);
            let mut wrr = IpvsWrr::new();
            for _ in 0..2 {
                let mut count = vec![0u64; weights.len()];
                for _ in 0..cycle {
                    let id = wrr.pick(&p).backend().unwrap();
                    count[id.get() as usize] += 1;
                }
                for (i, &w) in weights.iter().enumerate() {
                    prop_assert_eq!(count[i], u64::from(w) / g);
                }
            }
        }
    }
}
