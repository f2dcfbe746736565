//! Consistent hashing: a flow hash in, a backend out.
//!
//! Stateless switching sends every packet of a flow to the same backend by hashing the flow. A
//! plain `hash % N` ([`Modulo`]) replays almost every session when N changes; the schemes here
//! move few flows when a backend leaves or joins:
//!
//! | scheme | lookup | on removal of X | weights | notes |
//! |---|---|---|---|---|
//! | [`Maglev`] | O(1), one table load | X's flows + churn: 1.0–1.5/N for N ≤ 100 at M = 65537, ~6/N at N = 1000 | yes | the data-path default; ±1 slot balance |
//! | [`Ring`] | O(1) expected (bucketed index) | only X's flows | yes (points ∝ weight) | Ketama-style |
//! | [`Rendezvous`] | O(N) | only X's flows | yes (weighted HRW) | small N |
//! | [`Jump`] | O(log N) | only X's flows if X is the last id | no | Lamping & Veach |
//! | [`Modulo`] | O(1) (O(log N) weighted) | almost everything | yes | the bad baseline |
//!
//! Every scheme implements [`ConsistentHash`]: it is built from a set of
//! [`Backend`]s (sorted by id internally, so input order never matters;
//! duplicate ids are rejected; weight-0 backends are drained and never answered), answers
//! [`ConsistentHash::lookup`] without allocating, and exposes each flow's *preference list*
//! ([`ConsistentHash::preference`]): the sequence of backends the flow falls back to. Walking it
//! past backends that health checks report down ([`ConsistentHash::lookup_eligible`]) drains a
//! backend without a rebuild and moves only that backend's flows; [`ConsistentHash::preferred`]
//! gives the k distinct fallback candidates (IPVS `mh-fallback`);
//! [`ConsistentHash::lookup_bounded`] implements consistent hashing with bounded loads (Mirrokni
//! et al.). [`AnyHash`] is the enum a balancer stores to pick the scheme at run time without
//! `dyn`.
//!
//! Draining through health state moves exactly the drained backend's flows with every scheme; a
//! rebuild without the backend moves Maglev's a little more (its cascade grows with N: prefer
//! `lookup_eligible` for short outages, and conntrack keeps established flows across rebuilds).
//!
//! The input `flow_hash` must already be a keyed hash of the flow (see
//! [`lb_core::FlowHasher`]): the schemes spread it, they do not protect it.

mod any;
mod bounded;
mod jump;
mod maglev;
mod modulo;
mod rendezvous;
mod ring;

pub use any::{AnyHash, AnyPreference, HashAlgorithm};
pub use bounded::{BackendLoads, LoadBound};
pub use jump::Jump;
pub use maglev::{Maglev, MaglevConfig, MaglevSize};
pub use modulo::Modulo;
pub use rendezvous::{Rendezvous, RendezvousPreference};
pub use ring::{Ring, RingConfig, RingPreference};

use lb_core::{Backend, BackendId};

use crate::SchedError;

/// How many rehash probes a preference list makes before falling back to a scan of all backends.
///
/// With a fraction `f` of backends down, a probe sequence misses every live backend with
/// probability `f^PROBES`; the scan then guarantees an answer whenever any backend is up.
pub const PROBES: u32 = 32;

/// "A flow hash in, a backend out": the interface every consistent-hashing scheme implements.
///
/// Indexes refer to [`ConsistentHash::backends`]: the eligible (weight > 0) backends, sorted by
/// id. A balancer keeps its per-backend state (health, load, counters) in arrays in that order.
/// Methods taking closures are generic (static dispatch); none allocates.
pub trait ConsistentHash {
    /// The iterator returned by [`ConsistentHash::preference`].
    type Preference<'a>: Iterator<Item = usize>
    where
        Self: 'a;

    /// The eligible backends (weight > 0), sorted by id.
    fn backends(&self) -> &[Backend];

    /// The index of the backend that owns `flow_hash`, or `None` if the table is empty.
    fn lookup_index(&self, flow_hash: u64) -> Option<usize>;

    /// The flow's preference list: backend indexes in the order the flow falls back to them.
    ///
    /// The first item is [`ConsistentHash::lookup_index`]. The list is finite, may repeat
    /// indexes, and contains every backend at least once, so a walk that skips down backends
    /// finds a live one whenever there is one. Removing an item's backend from consideration
    /// never changes the items before it: that is why draining moves only the drained flows.
    fn preference(&self, flow_hash: u64) -> Self::Preference<'_>;

    /// Bytes of heap memory the structure holds (capacity, not length).
    fn heap_bytes(&self) -> usize;

    /// Number of eligible backends.
    #[inline]
    fn len(&self) -> usize {
        self.backends().len()
    }

    /// Whether there is no eligible backend.
    #[inline]
    fn is_empty(&self) -> bool {
        self.backends().is_empty()
    }

    /// The id of the backend that owns `flow_hash`.
    #[inline]
    fn lookup(&self, flow_hash: u64) -> Option<BackendId> {
        self.lookup_backend(flow_hash).map(|b| b.id)
    }

    /// The backend that owns `flow_hash`.
    #[inline]
    fn lookup_backend(&self, flow_hash: u64) -> Option<&Backend> {
        self.lookup_index(flow_hash)
            .and_then(|i| self.backends().get(i))
    }

    /// The first backend index on the flow's preference list for which `is_up(index)` holds.
    #[inline]
    fn lookup_eligible_index(
        &self,
        flow_hash: u64,
        mut is_up: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        match self.lookup_index(flow_hash) {
            Some(i) if is_up(i) => Some(i),
            Some(_) => self.preference(flow_hash).find(|&i| is_up(i)),
            None => None,
        }
    }

    /// The first backend on the flow's preference list for which `is_up(id)` holds: drains
    /// backends through health state without a rebuild, moving only the drained backends' flows.
    #[inline]
    fn lookup_eligible(
        &self,
        flow_hash: u64,
        is_up: impl Fn(BackendId) -> bool,
    ) -> Option<BackendId> {
        let backends = self.backends();
        self.lookup_eligible_index(flow_hash, |i| backends.get(i).is_some_and(|b| is_up(b.id)))
            .and_then(|i| backends.get(i))
            .map(|b| b.id)
    }

    /// Writes up to `out.len()` distinct backends from the flow's preference list, most preferred
    /// first (IPVS `mh-fallback` candidates). Returns how many were written: `min(out.len(),
    /// len())`.
    fn preferred(&self, flow_hash: u64, out: &mut [BackendId]) -> usize {
        let backends = self.backends();
        let want = out.len().min(backends.len());
        let mut n = 0;
        for i in self.preference(flow_hash) {
            if n >= want {
                break;
            }
            let Some(b) = backends.get(i) else { continue };
            let seen = out.get(..n).is_some_and(|s| s.contains(&b.id));
            if !seen {
                if let Some(slot) = out.get_mut(n) {
                    *slot = b.id;
                    n += 1;
                }
            }
        }
        n
    }

    /// The sum of the eligible backends' weights.
    #[inline]
    fn total_weight(&self) -> u64 {
        self.backends()
            .iter()
            .map(|b| u64::from(b.weight.get()))
            .sum()
    }

    /// Consistent hashing with bounded loads (Mirrokni, Thorup & Zadimoghaddam, 2018): the first
    /// backend on the flow's preference list whose load is below its capacity
    /// `⌈c · (total + 1) · wᵢ / Σw⌉`, where `loads` holds the live load (e.g. open connections)
    /// of each backend and their total.
    ///
    /// Since `c > 1`, some backend is always below capacity, so the answer is `None` only when
    /// the table is empty. Cost: the preference walk (a few probes unless most backends are
    /// full); no O(N) pass for Maglev and the ring, which keep their weight sum.
    fn lookup_bounded(
        &self,
        flow_hash: u64,
        loads: &BackendLoads,
        bound: LoadBound,
    ) -> Option<usize> {
        let backends = self.backends();
        let caps = bound.capacity_fn(loads.total(), self.total_weight());
        let under = |i: usize| {
            backends
                .get(i)
                .is_some_and(|b| (loads.get(i) as f64) < caps(b.weight.get()))
        };
        if let Some(i) = self.lookup_eligible_index(flow_hash, under) {
            return Some(i);
        }
        // Unreachable when `loads` is consistent (see above); the least loaded otherwise.
        (0..backends.len()).min_by_key(|&i| loads.get(i))
    }
}

/// Sorts `backends` by id into `out`, rejects duplicate ids, drops weight-0 backends and checks
/// that between 1 and `max` remain.
pub(crate) fn eligible_sorted(
    backends: &[Backend],
    out: &mut Vec<Backend>,
    max: usize,
) -> Result<(), SchedError> {
    out.clear();
    out.extend_from_slice(backends);
    out.sort_unstable_by_key(|b| b.id);
    if let Some(w) = out.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(SchedError::DuplicateBackend { id: w[0].id });
    }
    out.retain(|b| !b.weight.is_zero());
    if out.is_empty() {
        return Err(SchedError::NoBackends);
    }
    if out.len() > max {
        return Err(SchedError::TooManyBackends {
            count: out.len(),
            max,
        });
    }
    Ok(())
}

/// `⌊h · n / 2⁶⁴⌋`: maps a uniform 64-bit hash onto `0..n` without a division (Lemire).
#[inline(always)]
pub(crate) fn mul_hi(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

/// A 64-bit finaliser (MurmurHash3 `fmix64`): a bijection that mixes every input bit into every
/// output bit.
#[inline(always)]
pub(crate) fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The `attempt`-th rehash of a flow hash (attempt 0 is the hash itself).
#[inline(always)]
pub(crate) fn rehash(h: u64, attempt: u32) -> u64 {
    if attempt == 0 {
        h
    } else {
        fmix64(h ^ u64::from(attempt).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

/// The preference list of the table-driven schemes ([`Maglev`], [`Jump`], [`Modulo`]): the
/// owner of the flow hash, then the owners of [`PROBES`]` - 1` rehashes of it (as IPVS
/// `mh-fallback` rehashes with a new offset), then every backend once, starting at a position
/// derived from the hash.
#[derive(Debug, Clone)]
pub struct Rehash<'a, T: ?Sized> {
    table: &'a T,
    hash: u64,
    attempt: u32,
    scanned: usize,
}

impl<'a, T: ConsistentHash + ?Sized> Rehash<'a, T> {
    pub(crate) fn new(table: &'a T, hash: u64) -> Self {
        Rehash {
            table,
            hash,
            attempt: 0,
            scanned: 0,
        }
    }
}

impl<T: ConsistentHash + ?Sized> Iterator for Rehash<'_, T> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.attempt < PROBES {
            let h = rehash(self.hash, self.attempt);
            self.attempt += 1;
            return self.table.lookup_index(h);
        }
        let n = self.table.len();
        if self.scanned >= n {
            return None;
        }
        let start = mul_hi(self.hash, n as u64) as usize;
        let i = (start + self.scanned) % n;
        self.scanned += 1;
        Some(i)
    }
}

/// Hashes a backend id under a sub-key: the identity hash every scheme derives its placement
/// from (never the list position, so that input order does not matter).
#[inline]
pub(crate) fn id_hash(hasher: &lb_core::FlowHasher, id: BackendId, extra: u32) -> u64 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&id.0.to_be_bytes());
    b[4..].copy_from_slice(&extra.to_be_bytes());
    hasher.hash_bytes(&b)
}

#[cfg(test)]
pub(crate) mod testutil;
