//! Weighted random: each available backend with probability proportional to its effective
//! weight (HAProxy `balance random(1)`, RFC 5356 "Weighted Random"). O(N) per pick.

use lb_core::Instant;
use rand::RngCore;

use super::{uniform, Pick};
use crate::pool::Pool;

/// Weighted random selection.
#[derive(Debug, Clone, Copy, Default)]
pub struct WeightedRandom;

impl WeightedRandom {
    /// A weighted random selector.
    pub const fn new() -> Self {
        WeightedRandom
    }

    /// Picks an available backend with probability `w_i / Σ w` (effective weights at `now`).
    pub fn pick<R: RngCore + ?Sized>(&self, pool: &Pool, now: Instant, rng: &mut R) -> Pick {
        let total: u64 = (0..pool.len())
            .filter(|&i| pool.is_available(i))
            .map(|i| pool.effective_weight(i, now))
            .fold(0u64, u64::saturating_add);
        if total == 0 {
            return pool.no_pick();
        }
        let mut r = uniform(rng, total);
        let mut last = None;
        for i in 0..pool.len() {
            if !pool.is_available(i) {
                continue;
            }
            let w = pool.effective_weight(i, now);
            if w == 0 {
                continue;
            }
            last = Some(i);
            if r < w {
                return pool.pick_at(Some(i));
            }
            r -= w;
        }
        pool.pick_at(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use rand::SeedableRng;

    #[test]
    fn frequencies_follow_weights() {
        let p = pool(&[1, 0, 3]);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut n = [0u32; 3];
        for _ in 0..40_000 {
            let id = WeightedRandom
                .pick(&p, Instant::ZERO, &mut rng)
                .backend()
                .unwrap();
            n[id.get() as usize] += 1;
        }
        assert_eq!(n[1], 0);
        let share = f64::from(n[2]) / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }

    #[test]
    fn empty_pool() {
        let p = pool(&[]);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        assert_eq!(
            WeightedRandom.pick(&p, Instant::ZERO, &mut rng),
            Pick::Unavailable
        );
    }
}
