//! Rendezvous (highest random weight) hashing (Thaler & Ravishankar, 1998), weighted with the
//! logarithmic method (Schindelhauer & Schomaker, 2005).
//!
//! Each backend `i` scores a flow `h` with `wᵢ / −ln(uᵢ(h))`, `uᵢ(h) ∈ (0, 1)` a hash of the flow
//! and of the backend's identity; the highest score wins. A backend's score does not depend on
//! the others, so removing backend X moves exactly X's flows and adding one moves only the flows
//! it wins; shares follow weights exactly in expectation. Lookups cost O(N): for small sets.

use lb_core::{Backend, FlowHasher, HashKey};

use super::{eligible_sorted, fmix64, id_hash, ConsistentHash};
use crate::SchedError;

/// Weighted rendezvous hashing.
///
/// ```
/// use lb_core::{Backend, BackendId, HashKey, Weight};
/// use lb_sched::hash::{ConsistentHash, Rendezvous};
/// let backends = [
///     Backend::new(BackendId(1), "10.0.0.1:80".parse().unwrap()),
///     Backend::new(BackendId(2), "10.0.0.2:80".parse().unwrap()).with_weight(Weight::new(2)),
/// ];
/// let hrw = Rendezvous::new(&backends, HashKey::from_passphrase("cluster secret 0c4e9d21"))?;
/// assert!(hrw.lookup(12345).is_some());
/// # Ok::<(), lb_sched::SchedError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Rendezvous {
    backends: Vec<Backend>,
    /// Keyed hash of each backend's id.
    seeds: Vec<u64>,
    /// Whether all weights are equal (then the score is the hash itself).
    uniform: bool,
}

impl Rendezvous {
    /// Builds from `backends` (any order); `key` keys the backends' identity hashes (the
    /// sub-key `"rendezvous"` is derived from it).
    ///
    /// # Errors
    /// [`SchedError::NoBackends`], [`SchedError::DuplicateBackend`].
    pub fn new(backends: &[Backend], key: HashKey) -> Result<Self, SchedError> {
        let mut v = Vec::new();
        eligible_sorted(backends, &mut v, usize::MAX)?;
        let hasher = FlowHasher::new(key.derive("rendezvous"));
        let seeds = v.iter().map(|b| id_hash(&hasher, b.id, 0)).collect();
        let first = v.first().map(|b| b.weight);
        let uniform = v.iter().all(|b| Some(b.weight) == first);
        Ok(Rendezvous {
            backends: v,
            seeds,
            uniform,
        })
    }

    /// The score of backend `i` for `h`, as an order-preserving `u64` (for positive finite
    /// `f64`s the bit pattern orders like the value).
    #[inline]
    fn score(&self, i: usize, seed: u64, h: u64) -> u64 {
        let x = fmix64(h ^ seed);
        if self.uniform {
            return x;
        }
        let w = self.backends.get(i).map_or(0, |b| b.weight.get());
        // u in (0, 1): never 0, never 1, so -ln(u) is finite and > 0.
        let u = ((x >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        (f64::from(w) / -u.ln()).to_bits()
    }

    /// The best backend strictly ranked after `after` (score descending, then index ascending).
    #[inline]
    fn best_after(&self, h: u64, after: Option<(u64, usize)>) -> Option<(u64, usize)> {
        let mut best: Option<(u64, usize)> = None;
        for (i, &seed) in self.seeds.iter().enumerate() {
            let s = self.score(i, seed, h);
            if let Some((ls, li)) = after {
                // Skip everything ranked at or before `after`.
                if s > ls || (s == ls && i <= li) {
                    continue;
                }
            }
            if best.is_none_or(|(bs, _)| s > bs) {
                best = Some((s, i));
            }
        }
        best
    }
}

impl ConsistentHash for Rendezvous {
    type Preference<'a> = RendezvousPreference<'a>;

    #[inline]
    fn backends(&self) -> &[Backend] {
        &self.backends
    }

    #[inline]
    fn lookup_index(&self, flow_hash: u64) -> Option<usize> {
        self.best_after(flow_hash, None).map(|(_, i)| i)
    }

    #[inline]
    fn preference(&self, flow_hash: u64) -> RendezvousPreference<'_> {
        RendezvousPreference {
            table: self,
            hash: flow_hash,
            last: None,
            done: false,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.backends.capacity() * std::mem::size_of::<Backend>()
            + self.seeds.capacity() * std::mem::size_of::<u64>()
    }
}

/// A flow's rendezvous preference list: every backend once, by descending score. Each step
/// costs O(N).
#[derive(Debug, Clone)]
pub struct RendezvousPreference<'a> {
    table: &'a Rendezvous,
    hash: u64,
    last: Option<(u64, usize)>,
    done: bool,
}

impl Iterator for RendezvousPreference<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.done {
            return None;
        }
        match self.table.best_after(self.hash, self.last) {
            Some((s, i)) => {
                self.last = Some((s, i));
                Some(i)
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::testutil::{backend, backends, hashes, KEY};
    use lb_core::{BackendId, Weight};
    use proptest::prelude::*;

    #[test]
    fn preference_is_a_ranking_of_all() {
        let r = Rendezvous::new(&backends(12), KEY).unwrap();
        for h in hashes(200, 6) {
            let p: Vec<usize> = r.preference(h).collect();
            assert_eq!(p.len(), 12);
            assert_eq!(p[0], r.lookup_index(h).unwrap());
            let mut s = p.clone();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 12);
        }
    }

    #[test]
    fn weighted_shares() {
        let bs = [backend(1, 1), backend(2, 2), backend(3, 5)];
        let r = Rendezvous::new(&bs, KEY).unwrap();
        let mut c = [0f64; 3];
        let n = 80_000;
        for h in hashes(n, 7) {
            c[r.lookup_index(h).unwrap()] += 1.0;
        }
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let want = n as f64 * w / 8.0;
            assert!((c[i] - want).abs() < want * 0.05, "{c:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn removal_moves_only_the_removed(
            ws in proptest::collection::vec(1u32..6, 2..30),
            x in any::<prop::sample::Index>(),
            hs in proptest::collection::vec(any::<u64>(), 64),
        ) {
            let bs: Vec<_> = ws.iter().enumerate().map(|(i, &w)| backend(i as u32, w)).collect();
            let a = Rendezvous::new(&bs, KEY).unwrap();
            let mut less = bs.clone();
            let gone = less.remove(x.index(bs.len())).id;
            let b = Rendezvous::new(&less, KEY).unwrap();
            for h in hs {
                let before = a.lookup(h).unwrap();
                let after = b.lookup(h).unwrap();
                prop_assert!(before == gone || before == after);
                prop_assert_ne!(after, gone);
                // Draining through health agrees with removal.
                prop_assert_eq!(a.lookup_eligible(h, |id| id != gone), Some(after));
            }
        }

        #[test]
        fn zero_weight_never_answered(hs in proptest::collection::vec(any::<u64>(), 32)) {
            let mut bs = backends(5);
            bs[2].weight = Weight::ZERO;
            let r = Rendezvous::new(&bs, KEY).unwrap();
            for h in hs {
                prop_assert_ne!(r.lookup(h), Some(bs[2].id));
                prop_assert_ne!(r.lookup(h), Some(BackendId(0)));
            }
        }
    }
}
