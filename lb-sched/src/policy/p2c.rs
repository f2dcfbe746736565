//! Weighted power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized Load
//! Balancing", 2001; tower `balance::p2c`; HAProxy `random(2)`; Envoy least-request).
//!
//! Draw two distinct available backends uniformly at random and send the flow to the one with the
//! lower weighted load, `(load + 1) / effective weight` (cross-multiplied; ties go to the first
//! draw). The load is chosen by [`P2cLoad`]. With two choices the maximum load drops from
//! `log n / log log n` to `log log n`, at O(1) cost per pick and with no global state to keep
//! consistent — which is why it scales to many balancers sharing one pool.
//!
//! Drawing: up to [`P2c::RETRIES`] uniform draws over the pool for an available backend; if all
//! miss (a mostly unavailable pool), the first available backend at or after a uniform start
//! position. The randomness comes from the caller's RNG.

use lb_core::Instant;
use rand::RngCore;

use super::{ratio_less, uniform, Pick};
use crate::pool::Pool;

/// The load P2C compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum P2cLoad {
    /// IPVS connection overhead (`active * 256 + inactive`).
    #[default]
    Connections,
    /// In-flight requests (layer 5).
    InFlight,
    /// Peak-EWMA cost, `(outstanding + 1) * peak_ewma` (Finagle's P2C + peak-EWMA).
    PeakEwma,
}

/// Weighted power of two choices.
#[derive(Debug, Clone, Copy, Default)]
pub struct P2c {
    load: P2cLoad,
}

impl P2c {
    /// Uniform draws tried before falling back to a scan.
    pub const RETRIES: usize = 4;

    /// P2C comparing `load`.
    pub const fn new(load: P2cLoad) -> Self {
        P2c { load }
    }

    /// The load compared.
    pub const fn load(&self) -> P2cLoad {
        self.load
    }

    fn draw_one<R: RngCore + ?Sized>(
        pool: &Pool,
        rng: &mut R,
        not: Option<usize>,
    ) -> Option<usize> {
        let n = pool.len() as u64;
        if n == 0 {
            return None;
        }
        for _ in 0..Self::RETRIES {
            let i = uniform(rng, n) as usize;
            if pool.is_available(i) && Some(i) != not {
                return Some(i);
            }
        }
        let start = uniform(rng, n) as usize;
        let n = pool.len();
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| pool.is_available(i) && Some(i) != not)
    }

    /// The two draws a pick would make with this RNG state: two distinct available positions,
    /// or the same one twice if only one is available; `None` if none is.
    pub fn draws<R: RngCore + ?Sized>(&self, pool: &Pool, rng: &mut R) -> Option<(usize, usize)> {
        let a = Self::draw_one(pool, rng, None)?;
        let b = Self::draw_one(pool, rng, Some(a)).unwrap_or(a);
        Some((a, b))
    }

    /// Whether the backend at `a` is strictly less loaded than at `b`, per weight.
    pub fn less_loaded(&self, pool: &Pool, now: Instant, a: usize, b: usize) -> bool {
        let (wa, wb) = (pool.effective_weight(a, now), pool.effective_weight(b, now));
        match self.load {
            P2cLoad::Connections => {
                ratio_less(pool.conn_overhead(a) + 1, wa, pool.conn_overhead(b) + 1, wb)
            }
            P2cLoad::InFlight => ratio_less(
                u64::from(pool.outstanding(a)) + 1,
                wa,
                u64::from(pool.outstanding(b)) + 1,
                wb,
            ),
            P2cLoad::PeakEwma => {
                let ca = (f64::from(pool.outstanding(a)) + 1.0) * pool.peak_ewma_ns(a, now);
                let cb = (f64::from(pool.outstanding(b)) + 1.0) * pool.peak_ewma_ns(b, now);
                // ca / wa < cb / wb
                ca * (wb as f64) < cb * (wa as f64)
            }
        }
    }

    /// The better of two draws: `b` if strictly less loaded, else `a`.
    #[inline]
    pub fn choose(&self, pool: &Pool, now: Instant, a: usize, b: usize) -> usize {
        if self.less_loaded(pool, now, b, a) {
            b
        } else {
            a
        }
    }

    /// Picks the less loaded of two random available backends.
    pub fn pick<R: RngCore + ?Sized>(&self, pool: &Pool, now: Instant, rng: &mut R) -> Pick {
        match self.draws(pool, rng) {
            Some((a, b)) => pool.pick_at(Some(self.choose(pool, now, a, b))),
            None => pool.no_pick(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{arb_pool, legal};
    use crate::pool::tests::pool;
    use lb_core::BackendId;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn spreads_and_prefers_the_idle() {
        let mut p = pool(&[1, 1, 1, 1]);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        let p2c = P2c::new(P2cLoad::Connections);
        for _ in 0..400 {
            let id = p2c.pick(&p, Instant::ZERO, &mut rng).backend().unwrap();
            p.conn_opened(id).unwrap();
        }
        let max = (0..4).map(|i| p.active_conns(i)).max().unwrap();
        let min = (0..4).map(|i| p.active_conns(i)).min().unwrap();
        assert!(max - min <= 2, "{max} {min}");
        let one = pool(&[0, 5]);
        assert_eq!(
            p2c.pick(&one, Instant::ZERO, &mut rng),
            Pick::Backend(BackendId(1))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// P2C never picks the worse of its two draws, and picks only available backends.
        #[test]
        fn never_the_worse_draw(p in arb_pool(), seed in any::<u64>(), load in 0u8..3) {
            let load = [P2cLoad::Connections, P2cLoad::InFlight, P2cLoad::PeakEwma][load as usize];
            let p2c = P2c::new(load);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut replay = rng.clone();
            let got = p2c.pick(&p, Instant::ZERO, &mut rng);
            prop_assert!(legal(&p, got));
            match p2c.draws(&p, &mut replay) {
                Some((a, b)) => {
                    let id = got.backend().unwrap();
                    prop_assert!(id == p.id_at(a) || id == p.id_at(b));
                    let (chosen, other) = if id == p.id_at(a) { (a, b) } else { (b, a) };
                    prop_assert!(!p2c.less_loaded(&p, Instant::ZERO, other, chosen));
                    if a != b {
                        prop_assert!(p.is_available(a) && p.is_available(b));
                    }
                }
                None => prop_assert!(got.backend().is_none()),
            }
        }
    }
}
