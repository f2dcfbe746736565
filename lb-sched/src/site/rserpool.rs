//! RSerPool pool-element selection policies (RFC 5356, "Reliable Server Pooling Policies").
//!
//! A pool user (or an ENRP server answering a handle resolution) picks a pool element (PE) by the
//! pool's policy. Each PE carries the policy parameters of RFC 5356 §3: a weight, a load
//! (`0` = idle … `0xFFFF_FFFF` = fully loaded) and, for the degradation policies, a load
//! degradation (the load one more request adds, same scale).
//!
//! | policy | RFC 5356 | selection |
//! |---|---|---|
//! | [`PePolicy::RoundRobin`] | §4.1 | next reachable PE in turn |
//! | [`PePolicy::WeightedRoundRobin`] | §4.2 | in turn, each PE `weight` times per round (smooth) |
//! | [`PePolicy::Random`] | §4.3 | uniformly at random |
//! | [`PePolicy::WeightedRandom`] | §4.4 | with probability `weight / Σ weight` |
//! | [`PePolicy::LeastUsed`] | §5.1 | least load; equal loads in round-robin order |
//! | [`PePolicy::LeastUsedDegradation`] | §5.2 | as LU, and the chosen PE's local load grows by its degradation until its next load report |
//! | [`PePolicy::PriorityLeastUsed`] | §5.3 | least `load + degradation` (the load it would have after this request); ties round robin |
//! | [`PePolicy::RandomizedLeastUsed`] | §5.4 | at random with probability ∝ unused capacity (`0xFFFF_FFFF − load`) |

use rand::RngCore;

use crate::policy::{uniform, uniform_inclusive};

/// A pool element with its RFC 5356 policy parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PoolElement {
    /// Identifier (the PE identifier of RFC 5351).
    pub id: u32,
    /// Weight (WRR, weighted random). 0 = never chosen by the weighted policies.
    pub weight: u32,
    /// Current load, 0 (idle) to `u32::MAX` (full).
    pub load: u32,
    /// Load increment per selection (LUD, PLU).
    pub load_degradation: u32,
    /// Whether the PE is reachable (the caller's health verdict).
    pub reachable: bool,
}

/// RFC 5356 policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PePolicy {
    /// Round robin (§4.1).
    RoundRobin,
    /// Weighted round robin (§4.2).
    WeightedRoundRobin,
    /// Random (§4.3).
    Random,
    /// Weighted random (§4.4).
    WeightedRandom,
    /// Least used (§5.1).
    LeastUsed,
    /// Least used with degradation (§5.2).
    LeastUsedDegradation,
    /// Priority least used (§5.3).
    PriorityLeastUsed,
    /// Randomized least used (§5.4).
    RandomizedLeastUsed,
}

/// Selection state for one pool: the round-robin cursor and the smooth-WRR credits.
#[derive(Debug, Clone)]
pub struct PeSelector {
    policy: PePolicy,
    cursor: usize,
    credits: Vec<i64>,
}

impl PeSelector {
    /// A selector for `policy`.
    pub const fn new(policy: PePolicy) -> Self {
        PeSelector {
            policy,
            cursor: 0,
            credits: Vec::new(),
        }
    }

    /// The policy.
    pub const fn policy(&self) -> PePolicy {
        self.policy
    }

    /// Selects a reachable PE (its index in `pes`), or `None`. Least used with degradation adds
    /// the chosen PE's degradation to its `load` (saturating), as RFC 5356 §5.2 asks of the
    /// selecting side until the PE reports a new load.
    pub fn select<R: RngCore + ?Sized>(
        &mut self,
        pes: &mut [PoolElement],
        rng: &mut R,
    ) -> Option<usize> {
        let n = pes.len();
        if n == 0 {
            return None;
        }
        let chosen = match self.policy {
            PePolicy::RoundRobin => self.round_robin(pes, |_| true),
            PePolicy::WeightedRoundRobin => self.smooth(pes),
            PePolicy::Random => {
                let count = pes.iter().filter(|p| p.reachable).count() as u64;
                if count == 0 {
                    None
                } else {
                    let k = uniform(rng, count) as usize;
                    pes.iter()
                        .enumerate()
                        .filter(|(_, p)| p.reachable)
                        .nth(k)
                        .map(|(i, _)| i)
                }
            }
            PePolicy::WeightedRandom => weighted(pes, rng, |p| u64::from(p.weight)),
            PePolicy::LeastUsed | PePolicy::LeastUsedDegradation => {
                let min = pes.iter().filter(|p| p.reachable).map(|p| p.load).min();
                min.and_then(|m| self.round_robin(pes, |p| p.load == m))
            }
            PePolicy::PriorityLeastUsed => {
                let cost = |p: &PoolElement| u64::from(p.load) + u64::from(p.load_degradation);
                let min = pes.iter().filter(|p| p.reachable).map(cost).min();
                min.and_then(|m| self.round_robin(pes, |p| cost(p) == m))
            }
            PePolicy::RandomizedLeastUsed => {
                weighted(pes, rng, |p| u64::from(u32::MAX - p.load) + 1)
            }
        };
        if self.policy == PePolicy::LeastUsedDegradation {
            if let Some(p) = chosen.and_then(|i| pes.get_mut(i)) {
                p.load = p.load.saturating_add(p.load_degradation);
            }
        }
        chosen
    }

    /// The first reachable PE satisfying `ok` at or after the cursor; advances the cursor past it.
    fn round_robin(
        &mut self,
        pes: &[PoolElement],
        ok: impl Fn(&PoolElement) -> bool,
    ) -> Option<usize> {
        let n = pes.len();
        let start = self.cursor % n;
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| pes.get(i).is_some_and(|p| p.reachable && ok(p)))?;
        self.cursor = (i + 1) % n;
        Some(i)
    }

    /// Smooth weighted round robin over the reachable PEs with weight > 0.
    fn smooth(&mut self, pes: &[PoolElement]) -> Option<usize> {
        if self.credits.len() != pes.len() {
            self.credits.clear();
            self.credits.resize(pes.len(), 0);
        }
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, (p, c)) in pes.iter().zip(self.credits.iter_mut()).enumerate() {
            if !p.reachable || p.weight == 0 {
                continue;
            }
            let w = i64::from(p.weight);
            *c = c.saturating_add(w);
            total = total.saturating_add(w);
            if best.is_none_or(|(_, b)| *c > b) {
                best = Some((i, *c));
            }
        }
        let (i, _) = best?;
        if let Some(c) = self.credits.get_mut(i) {
            *c = c.saturating_sub(total);
        }
        Some(i)
    }
}

/// Weighted random over reachable PEs with `weight(p) > 0`.
fn weighted<R: RngCore + ?Sized>(
    pes: &[PoolElement],
    rng: &mut R,
    weight: impl Fn(&PoolElement) -> u64,
) -> Option<usize> {
    let total: u64 = pes
        .iter()
        .filter(|p| p.reachable)
        .map(&weight)
        .fold(0, u64::saturating_add);
    if total == 0 {
        return None;
    }
    let mut r = uniform_inclusive(rng, total - 1);
    for (i, p) in pes.iter().enumerate() {
        if !p.reachable {
            continue;
        }
        let w = weight(p);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn pe(id: u32, weight: u32, load: u32) -> PoolElement {
        PoolElement {
            id,
            weight,
            load,
            load_degradation: 0,
            reachable: true,
        }
    }

    fn run(policy: PePolicy, pes: &mut [PoolElement], n: usize) -> Vec<usize> {
        let mut s = PeSelector::new(policy);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        (0..n).filter_map(|_| s.select(pes, &mut rng)).collect()
    }

    #[test]
    fn round_robins() {
        let mut pes = [pe(0, 1, 0), pe(1, 3, 0), pe(2, 1, 0)];
        pes[2].reachable = false;
        assert_eq!(run(PePolicy::RoundRobin, &mut pes, 4), [0, 1, 0, 1]);
        assert_eq!(run(PePolicy::WeightedRoundRobin, &mut pes, 4), [1, 0, 1, 1]);
    }

    #[test]
    fn least_used_and_degradation() {
        let mut pes = [pe(0, 1, 500), pe(1, 1, 100), pe(2, 1, 100)];
        // Equal least loads alternate.
        assert_eq!(run(PePolicy::LeastUsed, &mut pes, 4), [1, 2, 1, 2]);
        for p in pes.iter_mut() {
            p.load_degradation = 150;
        }
        // LUD: 1 → 250, 2 → 250, 1 → 400, 2 → 400, 1 → 550, 2 → 550, then 0 (500) at last.
        assert_eq!(
            run(PePolicy::LeastUsedDegradation, &mut pes, 7),
            [1, 2, 1, 2, 1, 2, 0]
        );
        assert_eq!(pes[0].load, 650);
        let mut plu = [pe(0, 1, 100), pe(1, 1, 120)];
        plu[0].load_degradation = 50;
        assert_eq!(run(PePolicy::PriorityLeastUsed, &mut plu, 1), [1]);
    }

    #[test]
    fn randomized_least_used_prefers_capacity() {
        let mut pes = [pe(0, 1, u32::MAX), pe(1, 1, 0)];
        let picks = run(PePolicy::RandomizedLeastUsed, &mut pes, 1000);
        assert!(picks.iter().all(|&i| i == 1));
        let mut none = [PoolElement::default()];
        assert!(run(PePolicy::Random, &mut none, 3).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Every policy selects only reachable PEs, and (weights aside) one whenever any is.
        #[test]
        fn only_reachable(
            pes in prop::collection::vec((0u32..4, any::<u32>(), any::<u32>(), any::<bool>()), 0..10),
            which in 0usize..8, seed in any::<u64>(),
        ) {
            let policies = [PePolicy::RoundRobin, PePolicy::WeightedRoundRobin, PePolicy::Random,
                PePolicy::WeightedRandom, PePolicy::LeastUsed, PePolicy::LeastUsedDegradation,
                PePolicy::PriorityLeastUsed, PePolicy::RandomizedLeastUsed];
            let policy = policies[which];
            let mut pes: Vec<PoolElement> = pes.iter().enumerate().map(|(i, &(w, l, d, r))| PoolElement {
                id: i as u32, weight: w, load: l, load_degradation: d, reachable: r }).collect();
            let mut s = PeSelector::new(policy);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            for _ in 0..20 {
                let got = s.select(&mut pes, &mut rng);
                let weighted = matches!(policy, PePolicy::WeightedRoundRobin | PePolicy::WeightedRandom);
                let any = pes.iter().any(|p| p.reachable && (!weighted || p.weight > 0));
                match got {
                    Some(i) => prop_assert!(pes[i].reachable && (!weighted || pes[i].weight > 0)),
                    None => prop_assert!(!any),
                }
            }
        }
    }
}
