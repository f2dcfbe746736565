//! Jump consistent hash (Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm",
//! 2014).
//!
//! No table at all: `O(ln N)` steps of a linear congruential generator pick a bucket in `0..N`.
//! Buckets are the eligible backends sorted by id. Growing N by one moves exactly the flows that
//! land on the new last bucket, and removing the *last* bucket (the highest id) moves only its
//! flows; removing any other backend renumbers the buckets after it and moves many more. To take
//! a backend out of service cheaply, keep it in the set and skip it through health state
//! ([`ConsistentHash::lookup_eligible`]), which moves only its flows. Weights are not supported
//! beyond zero (drained, left out).

use lb_core::{Backend, BackendId};

use super::{eligible_sorted, ConsistentHash, Rehash};
use crate::SchedError;

/// Jump consistent hash over the eligible backends sorted by id.
///
/// ```
/// use lb_core::{Backend, BackendId};
/// use lb_sched::hash::{ConsistentHash, Jump};
/// let backends: Vec<Backend> = (0..10)
///     .map(|i| Backend::new(BackendId(i), "10.0.0.1:80".parse().unwrap()))
///     .collect();
/// let jump = Jump::new(&backends)?;
/// assert!(jump.lookup(0xdead_beef).is_some());
/// # Ok::<(), lb_sched::SchedError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Jump {
    backends: Vec<Backend>,
    ids: Vec<BackendId>,
}

impl Jump {
    /// The most backends (buckets are `i32` in the original algorithm).
    pub const MAX_BACKENDS: usize = i32::MAX as usize;

    /// Builds the bucket list from `backends` (any order).
    ///
    /// # Errors
    /// [`SchedError::NoBackends`], [`SchedError::DuplicateBackend`].
    pub fn new(backends: &[Backend]) -> Result<Self, SchedError> {
        let mut v = Vec::new();
        eligible_sorted(backends, &mut v, Self::MAX_BACKENDS)?;
        let ids = v.iter().map(|b| b.id).collect();
        Ok(Jump { backends: v, ids })
    }
}

/// The algorithm as published: `ch(key, num_buckets)`.
#[inline]
pub(crate) fn jump_bucket(mut key: u64, buckets: usize) -> usize {
    let n = buckets as i64;
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < n {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

impl ConsistentHash for Jump {
    type Preference<'a> = Rehash<'a, Jump>;

    #[inline]
    fn backends(&self) -> &[Backend] {
        &self.backends
    }

    #[inline]
    fn lookup_index(&self, flow_hash: u64) -> Option<usize> {
        if self.backends.is_empty() {
            return None;
        }
        Some(jump_bucket(flow_hash, self.backends.len()))
    }

    #[inline]
    fn lookup(&self, flow_hash: u64) -> Option<BackendId> {
        self.ids
            .get(jump_bucket(flow_hash, self.ids.len()))
            .copied()
    }

    #[inline]
    fn preference(&self, flow_hash: u64) -> Rehash<'_, Jump> {
        Rehash::new(self, flow_hash)
    }

    fn heap_bytes(&self) -> usize {
        self.backends.capacity() * std::mem::size_of::<Backend>()
            + self.ids.capacity() * std::mem::size_of::<BackendId>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::testutil::{backend, backends, hashes};
    use proptest::prelude::*;

    #[test]
    fn growing_moves_keys_only_to_the_new_bucket() {
        // The defining property: growing from n to n + 1 buckets either keeps a key or moves it
        // to the new bucket n.
        for k in hashes(2_000, 9) {
            for n in 1..64 {
                let (a, b) = (jump_bucket(k, n), jump_bucket(k, n + 1));
                assert!(a < n && (b == a || b == n), "k={k} n={n}");
            }
        }
        assert_eq!(jump_bucket(0xdead_beef, 1), 0);
        assert_eq!(jump_bucket(42, 0), 0);
        assert!(Jump::new(&[]).is_err());
        assert!(Jump::new(&[backend(1, 0)]).is_err());
    }

    #[test]
    fn spreads_evenly() {
        let j = Jump::new(&backends(10)).unwrap();
        let mut c = [0u32; 10];
        for h in hashes(100_000, 3) {
            c[j.lookup_index(h).unwrap()] += 1;
        }
        assert!(c.iter().all(|&x| (9_000..11_000).contains(&x)), "{c:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn removing_the_last_moves_only_its_flows(n in 2u32..200, hs in proptest::collection::vec(any::<u64>(), 64)) {
            let all = backends(n);
            let a = Jump::new(&all).unwrap();
            let b = Jump::new(&all[..all.len() - 1]).unwrap();
            let last = all[all.len() - 1].id;
            for h in hs {
                let before = a.lookup(h).unwrap();
                let after = b.lookup(h).unwrap();
                prop_assert!(before == last || before == after);
                prop_assert_ne!(after, last);
            }
        }

        #[test]
        fn draining_any_moves_only_its_flows(n in 2u32..100, x in any::<prop::sample::Index>(), hs in proptest::collection::vec(any::<u64>(), 64)) {
            let all = backends(n);
            let a = Jump::new(&all).unwrap();
            let down = all[x.index(all.len())].id;
            for h in hs {
                let before = a.lookup(h).unwrap();
                let after = a.lookup_eligible(h, |id| id != down).unwrap();
                prop_assert!(before == down || before == after);
                prop_assert_ne!(after, down);
            }
        }
    }
}
