//! Plain modulo: `hash mod Σw`, the bad baseline.
//!
//! Balanced and fast, but not consistent: when the set of backends changes, nearly every flow
//! moves (a fraction `1 − 1/N` of them when one of N equal backends leaves), so every session
//! without conntrack state is replayed. Kept so that users (and `lb-sim`) can see why not.

use lb_core::{Backend, BackendId};

use super::{eligible_sorted, ConsistentHash, Rehash};
use crate::SchedError;

/// `hash mod N` (or, with unequal weights, `hash mod Σw` over the cumulative weights).
///
/// ```
/// use lb_core::{Backend, BackendId};
/// use lb_sched::hash::{ConsistentHash, Modulo};
/// let backends: Vec<Backend> = (0..3)
///     .map(|i| Backend::new(BackendId(i), "10.0.0.1:80".parse().unwrap()))
///     .collect();
/// assert_eq!(Modulo::new(&backends)?.lookup(7), Some(BackendId(1)));
/// # Ok::<(), lb_sched::SchedError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Modulo {
    backends: Vec<Backend>,
    /// Running sums of the weights (inclusive); empty when all weights are equal.
    cumulative: Vec<u64>,
    total: u64,
}

impl Modulo {
    /// Builds from `backends` (any order).
    ///
    /// # Errors
    /// [`SchedError::NoBackends`], [`SchedError::DuplicateBackend`].
    pub fn new(backends: &[Backend]) -> Result<Self, SchedError> {
        let mut v = Vec::new();
        eligible_sorted(backends, &mut v, usize::MAX)?;
        let first = v.first().map(|b| b.weight);
        let uniform = v.iter().all(|b| Some(b.weight) == first);
        let mut cumulative = Vec::new();
        let mut total = v.len() as u64;
        if !uniform {
            total = 0;
            for b in &v {
                total += u64::from(b.weight.get());
                cumulative.push(total);
            }
        }
        Ok(Modulo {
            backends: v,
            cumulative,
            total,
        })
    }
}

impl ConsistentHash for Modulo {
    type Preference<'a> = Rehash<'a, Modulo>;

    #[inline]
    fn backends(&self) -> &[Backend] {
        &self.backends
    }

    #[inline]
    fn lookup_index(&self, flow_hash: u64) -> Option<usize> {
        let x = flow_hash.checked_rem(self.total)?;
        if self.cumulative.is_empty() {
            Some(x as usize)
        } else {
            Some(self.cumulative.partition_point(|&c| c <= x))
        }
    }

    #[inline]
    fn lookup(&self, flow_hash: u64) -> Option<BackendId> {
        self.lookup_backend(flow_hash).map(|b| b.id)
    }

    #[inline]
    fn preference(&self, flow_hash: u64) -> Rehash<'_, Modulo> {
        Rehash::new(self, flow_hash)
    }

    fn heap_bytes(&self) -> usize {
        self.backends.capacity() * std::mem::size_of::<Backend>()
            + self.cumulative.capacity() * std::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::testutil::{backend, backends, hashes};

    #[test]
    fn weighted_shares_and_replay() {
        let m = Modulo::new(&[backend(1, 1), backend(2, 3), backend(3, 0)]).unwrap();
        assert_eq!(m.len(), 2);
        let mut c = [0u32; 2];
        for h in hashes(40_000, 4) {
            c[m.lookup_index(h).unwrap()] += 1;
        }
        assert!((9_000..11_000).contains(&c[0]), "{c:?}");
        // Removing one of 10 equal backends moves ~90 % of flows: why not to use it.
        let a = Modulo::new(&backends(10)).unwrap();
        let b = Modulo::new(&backends(10)[1..]).unwrap();
        let hs = hashes(10_000, 5);
        let moved = hs.iter().filter(|&&h| a.lookup(h) != b.lookup(h)).count();
        assert!(moved > 8_000, "{moved}");
        assert!(Modulo::new(&[]).is_err());
    }
}
