//! Least outstanding requests with an active-request bias (Envoy `LEAST_REQUEST`).
//!
//! Envoy's documented semantics:
//! - **All weights equal**: pick `choice_count` (default 2) random available hosts and take the one
//!   with the fewest active requests (power of N choices). Ties go to the first draw.
//! - **Weights differ**: weighted round robin (Envoy uses an EDF scheduler) over dynamic weights
//!   `weight / (active_requests + 1) ^ active_request_bias`. Bias 0 is plain WRR; bias 1
//!   (default) divides by the queue; larger values shun busy hosts harder.
//!
//! Here the weighted case is a smooth WRR (the EDF's deterministic equivalent) over those `f64`
//! weights, with effective weights (slow start). O(N) per pick; O(choice_count) when equal.

use lb_core::Instant;
use rand::RngCore;

use super::{uniform, Pick};
use crate::pool::Pool;
use crate::SchedError;

/// Envoy-style least request.
#[derive(Debug, Clone)]
pub struct LeastRequest {
    choice_count: u32,
    bias: f64,
    current: Vec<f64>,
    generation: u64,
}

impl Default for LeastRequest {
    /// `choice_count` 2, bias 1.0 (Envoy's defaults).
    fn default() -> Self {
        LeastRequest {
            choice_count: 2,
            bias: 1.0,
            current: Vec::new(),
            generation: 0,
        }
    }
}

impl LeastRequest {
    /// Least request with `choice_count` draws (≥ 2) and an active-request bias (finite, ≥ 0).
    ///
    /// # Errors
    /// [`SchedError::InvalidPolicyConfig`] if out of range.
    pub fn new(choice_count: u32, active_request_bias: f64) -> Result<Self, SchedError> {
        if choice_count < 2 {
            return Err(SchedError::InvalidPolicyConfig("choice_count must be >= 2"));
        }
        if !(active_request_bias.is_finite() && active_request_bias >= 0.0) {
            return Err(SchedError::InvalidPolicyConfig(
                "active_request_bias must be finite and >= 0",
            ));
        }
        Ok(LeastRequest {
            choice_count,
            bias: active_request_bias,
            ..LeastRequest::default()
        })
    }

    /// The dynamic weight of position `i`: `w / (outstanding + 1) ^ bias` ([`Pool::outstanding`]).
    pub fn dynamic_weight(&self, pool: &Pool, i: usize, now: Instant) -> f64 {
        let w = pool.effective_weight(i, now) as f64;
        if self.bias == 0.0 {
            return w;
        }
        let q = f64::from(pool.outstanding(i)) + 1.0;
        if self.bias == 1.0 {
            w / q
        } else {
            w / q.powf(self.bias)
        }
    }

    /// Picks a backend per Envoy's least-request rules.
    pub fn pick<R: RngCore + ?Sized>(&mut self, pool: &Pool, now: Instant, rng: &mut R) -> Pick {
        let mut first_w = None;
        let mut equal = true;
        let mut any = false;
        for i in 0..pool.len() {
            if !pool.is_available(i) {
                continue;
            }
            any = true;
            let w = pool.effective_weight(i, now);
            match first_w {
                None => first_w = Some(w),
                Some(f) if f != w => {
                    equal = false;
                    break;
                }
                _ => {}
            }
        }
        if !any {
            return pool.no_pick();
        }
        if equal {
            self.pick_n(pool, rng)
        } else {
            self.pick_weighted(pool, now)
        }
    }

    fn pick_n<R: RngCore + ?Sized>(&self, pool: &Pool, rng: &mut R) -> Pick {
        let n = pool.len() as u64;
        let mut best: Option<usize> = None;
        let mut draws = 0u32;
        let mut tries = 0u32;
        let max_tries = self.choice_count.saturating_mul(4);
        while draws < self.choice_count && tries < max_tries {
            tries += 1;
            let i = uniform(rng, n) as usize;
            if !pool.is_available(i) {
                continue;
            }
            draws += 1;
            if best.is_none_or(|b| pool.outstanding(i) < pool.outstanding(b)) {
                best = Some(i);
            }
        }
        if best.is_none() {
            // A mostly unavailable pool: the first available after a random start.
            let start = uniform(rng, n) as usize;
            let len = pool.len();
            best = (0..len)
                .map(|k| (start + k) % len)
                .find(|&i| pool.is_available(i));
        }
        pool.pick_at(best)
    }

    fn pick_weighted(&mut self, pool: &Pool, now: Instant) -> Pick {
        if self.current.len() != pool.len() || self.generation != pool.generation() {
            self.current.clear();
            self.current.resize(pool.len(), 0.0);
            self.generation = pool.generation();
        }
        let mut total = 0.0;
        let mut best: Option<usize> = None;
        let mut best_cur = f64::NEG_INFINITY;
        for i in 0..pool.len() {
            if !pool.is_available(i) {
                continue;
            }
            let w = self.dynamic_weight(pool, i, now);
            let Some(cur) = self.current.get_mut(i) else {
                continue;
            };
            *cur += w;
            total += w;
            if *cur > best_cur {
                best_cur = *cur;
                best = Some(i);
            }
        }
        if let Some(c) = best.and_then(|b| self.current.get_mut(b)) {
            *c -= total;
        }
        pool.pick_at(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use lb_core::BackendId;
    use rand::SeedableRng;

    #[test]
    fn equal_weights_prefer_fewer_requests() {
        let mut p = pool(&[1, 1]);
        for _ in 0..5 {
            p.request_started(BackendId(0)).unwrap();
        }
        let mut lr = LeastRequest::default();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let n1 = (0..100)
            .filter(|_| lr.pick(&p, Instant::ZERO, &mut rng) == Pick::Backend(BackendId(1)))
            .count();
        // Two draws: backend 0 wins only when both draws hit it (~1/4, it never has fewer).
        assert!(n1 > 60, "{n1}");
    }

    #[test]
    fn weighted_bias_shifts_share() {
        let mut p = pool(&[2, 1]);
        let mut lr = LeastRequest::default();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let count = |lr: &mut LeastRequest, p: &Pool, rng: &mut rand::rngs::SmallRng| {
            (0..300)
                .filter(|_| lr.pick(p, Instant::ZERO, rng) == Pick::Backend(BackendId(0)))
                .count()
        };
        assert_eq!(count(&mut lr, &p, &mut rng), 200); // 2:1 when idle
        for _ in 0..3 {
            p.request_started(BackendId(0)).unwrap();
        }
        // Dynamic weights 2/4 vs 1/1 → backend 0 gets a third.
        assert_eq!(count(&mut lr, &p, &mut rng), 100);
        assert!(LeastRequest::new(1, 1.0).is_err());
        assert!(LeastRequest::new(2, f64::NAN).is_err());
    }
}
