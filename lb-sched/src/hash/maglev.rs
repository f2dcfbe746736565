//! Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016), weighted, order-independent, with a rebuild that reuses its buffers.
//!
//! Each backend gets a permutation of the `M` table slots from two keyed hashes of its id:
//! `offset = h₁(id) mod M`, `skip = h₂(id) mod (M − 1) + 1`, slot `j` of the permutation being
//! `(offset + j · skip) mod M` (M prime, so every permutation visits every slot). Backends take
//! turns claiming the next free slot of their permutation until the table is full. The
//! permutation matrix is never materialised: each backend keeps a cursor that advances by `skip`
//! with one add and one conditional subtract, so a build needs the table plus 16 bytes per backend
//! (a few hundred KiB at M = 65537), where crates.io `maglev` allocates the N × M matrix.
//!
//! Weights (as in Katran's and Envoy's weighted Maglev): in every round each backend adds its
//! weight to a credit and claims a slot only when the credit reaches the largest weight, which it
//! then pays. The heaviest backends claim a slot every round; a backend of half their weight every
//! other round; so slot shares follow weight ratios.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use lb_core::{Backend, BackendId, FlowHasher, HashKey};

use super::{eligible_sorted, id_hash, mul_hi, ConsistentHash, Rehash};
use crate::SchedError;

/// Slot value of an unclaimed slot during a build; also why at most `u16::MAX` backends fit.
const EMPTY: u16 = u16::MAX;

/// A Maglev table size: a prime between [`MaglevSize::MIN`] and [`MaglevSize::MAX`].
///
/// The paper recommends M ≥ 100 · N for slot shares within about 1 % of each other.
///
/// ```
/// use lb_sched::hash::MaglevSize;
/// assert_eq!(MaglevSize::default().get(), 65537);
/// assert!(MaglevSize::new(65536).is_err()); // not a prime
/// assert_eq!(MaglevSize::at_least(100_000).unwrap().get(), 100_003);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevSize(u32);

impl MaglevSize {
    /// The smallest size accepted.
    pub const MIN: u32 = 3;
    /// The largest size accepted (2²⁴: a 32 MiB table).
    pub const MAX: u32 = 1 << 24;
    /// 65537, the paper's size for small deployments and the default.
    pub const DEFAULT: MaglevSize = MaglevSize(65_537);
    /// 655373, the paper's size for large deployments (up to ~6500 backends at M ≥ 100 N).
    pub const LARGE: MaglevSize = MaglevSize(655_373);

    /// A size of `m` slots.
    ///
    /// # Errors
    /// [`SchedError::TableSizeOutOfRange`] or [`SchedError::TableSizeNotPrime`].
    pub fn new(m: u64) -> Result<Self, SchedError> {
        if m < u64::from(Self::MIN) || m > u64::from(Self::MAX) {
            return Err(SchedError::TableSizeOutOfRange {
                size: m,
                min: u64::from(Self::MIN),
                max: u64::from(Self::MAX),
            });
        }
        if !is_prime(m) {
            return Err(SchedError::TableSizeNotPrime { size: m });
        }
        Ok(MaglevSize(m as u32))
    }

    /// The smallest prime size `≥ n` (and `≥ MIN`), e.g. `at_least(100 * backends)`.
    ///
    /// # Errors
    /// [`SchedError::TableSizeOutOfRange`] if no such prime is `≤ MAX`.
    pub fn at_least(n: u64) -> Result<Self, SchedError> {
        let mut m = n.max(u64::from(Self::MIN));
        while m <= u64::from(Self::MAX) {
            if is_prime(m) {
                return Ok(MaglevSize(m as u32));
            }
            m += 1;
        }
        Err(SchedError::TableSizeOutOfRange {
            size: n,
            min: u64::from(Self::MIN),
            max: u64::from(Self::MAX),
        })
    }

    /// The number of slots.
    #[inline]
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for MaglevSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u64> for MaglevSize {
    type Error = SchedError;
    fn try_from(m: u64) -> Result<Self, SchedError> {
        MaglevSize::new(m)
    }
}

/// Trial division; sizes are at most 2²⁴, so at most ~2000 divisions.
fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// How to build a [`Maglev`] table.
///
/// There is deliberately no `Default`: the key must be the cluster's secret, shared by every
/// balancer that should agree on flow placement (a public default key would let anyone predict
/// the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevConfig {
    /// Table size (a prime; default 65537).
    pub size: MaglevSize,
    /// Key of the backend permutations; sub-keys `"maglev-offset"` and `"maglev-skip"` are
    /// derived from it.
    pub key: HashKey,
}

impl MaglevConfig {
    /// A configuration with the default size.
    pub fn new(key: HashKey) -> Self {
        MaglevConfig {
            size: MaglevSize::DEFAULT,
            key,
        }
    }

    /// The same configuration with another table size.
    #[must_use]
    pub fn with_size(mut self, size: MaglevSize) -> Self {
        self.size = size;
        self
    }
}

/// A backend's cursor through its permutation during a build.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    pos: u32,
    skip: u32,
    weight: u64,
    credit: u64,
}

/// Claims for backend `i` the next free slot of its permutation, advancing its cursor.
#[inline(always)]
fn claim(c: &mut Cursor, i: u16, m: u32, taken: &mut [u64], table: &mut [u16]) {
    // Terminates: the permutation visits every slot, and the caller only claims while some
    // slot is free.
    loop {
        let p = c.pos as usize;
        c.pos += c.skip;
        if c.pos >= m {
            c.pos -= m;
        }
        let bit = 1u64 << (p % 64);
        let Some(word) = taken.get_mut(p / 64) else {
            return; // unreachable: pos < m is an invariant
        };
        if *word & bit == 0 {
            *word |= bit;
            if let Some(slot) = table.get_mut(p) {
                *slot = i;
            }
            return;
        }
    }
}

/// A Maglev lookup table: `lookup` is one multiply and one load.
///
/// ```
/// use lb_core::{Backend, BackendId, FlowHasher, FlowKey, HashKey, IpProto, Weight};
/// use lb_sched::hash::{ConsistentHash, Maglev, MaglevConfig};
///
/// let key = HashKey::from_passphrase("cluster secret 5b0e1f7c");
/// let backends: Vec<Backend> = (1..=4)
///     .map(|i| Backend::new(BackendId(i), format!("10.0.0.{i}:80").parse().unwrap()))
///     .collect();
/// let maglev = Maglev::new(&backends, MaglevConfig::new(key.derive("maglev")))?;
///
/// let hasher = FlowHasher::new(key.derive("flow"));
/// let flow = FlowKey::v4([192, 0, 2, 1].into(), 40000, [203, 0, 113, 10].into(), 80, IpProto::Tcp);
/// let h = hasher.hash_flow(&flow);
/// let owner = maglev.lookup(h).unwrap();
///
/// // Backend `owner` fails its health check: its flows walk on, everyone else's stay.
/// let fallback = maglev.lookup_eligible(h, |id| id != owner).unwrap();
/// assert_ne!(fallback, owner);
/// # Ok::<(), lb_sched::SchedError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Maglev {
    size: MaglevSize,
    offset_hasher: FlowHasher,
    skip_hasher: FlowHasher,
    /// Eligible backends sorted by id.
    backends: Vec<Backend>,
    /// Their ids, compact for the lookup path.
    ids: Vec<BackendId>,
    /// Sum of their weights.
    weight_sum: u64,
    /// Slot → backend index.
    table: Vec<u16>,
    /// Scratch buffers reused by `rebuild`.
    scratch: Vec<Backend>,
    cursors: Vec<Cursor>,
    /// One bit per slot during a build (8 KiB at M = 65537: stays in L1 while the 128 KiB
    /// table does not).
    taken: Vec<u64>,
    /// Heap of the skewed-weights build, kept for its buffer.
    heap: Vec<Reverse<(u64, u32)>>,
}

impl Maglev {
    /// The most eligible backends a table holds (its slots store 16-bit indexes).
    pub const MAX_BACKENDS: usize = EMPTY as usize;

    /// Builds a table from `backends` (any order; weight-0 backends are left out).
    ///
    /// # Errors
    /// [`SchedError::NoBackends`] (empty, or every weight zero), [`SchedError::DuplicateBackend`],
    /// [`SchedError::TooManyBackends`], [`SchedError::TableTooSmall`] (fewer slots than eligible
    /// backends).
    pub fn new(backends: &[Backend], cfg: MaglevConfig) -> Result<Self, SchedError> {
        let mut m = Maglev {
            size: cfg.size,
            offset_hasher: FlowHasher::new(cfg.key.derive("maglev-offset")),
            skip_hasher: FlowHasher::new(cfg.key.derive("maglev-skip")),
            backends: Vec::new(),
            ids: Vec::new(),
            weight_sum: 0,
            table: Vec::new(),
            scratch: Vec::new(),
            cursors: Vec::new(),
            taken: Vec::new(),
            heap: Vec::new(),
        };
        m.rebuild(backends)?;
        Ok(m)
    }

    /// Rebuilds the table for a new set of backends, reusing every buffer (no allocation once the
    /// buffers have grown to the largest set seen). On error the table is left unchanged.
    ///
    /// # Errors
    /// As [`Maglev::new`].
    pub fn rebuild(&mut self, backends: &[Backend]) -> Result<(), SchedError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let checked = eligible_sorted(backends, &mut scratch, Self::MAX_BACKENDS).and_then(|()| {
            if scratch.len() as u64 > u64::from(self.size.get()) {
                Err(SchedError::TableTooSmall {
                    size: u64::from(self.size.get()),
                    backends: scratch.len(),
                })
            } else {
                Ok(())
            }
        });
        if let Err(e) = checked {
            self.scratch = scratch;
            return Err(e);
        }
        self.scratch = std::mem::replace(&mut self.backends, scratch);
        self.ids.clear();
        self.ids.extend(self.backends.iter().map(|b| b.id));
        self.weight_sum = self
            .backends
            .iter()
            .map(|b| u64::from(b.weight.get()))
            .sum();
        self.populate();
        Ok(())
    }

    /// Fills the table (the paper's Pseudocode 1, weighted, with incremental permutations).
    fn populate(&mut self) {
        let n = self.backends.len() as u64;
        let (wmax, wsum) = self.backends.iter().fold((0u64, 0u64), |(mx, sum), b| {
            let w = u64::from(b.weight.get());
            (mx.max(w), sum + w)
        });
        // Round-robin costs N per round and there are about M · wmax / Σw rounds: fine unless a
        // few heavy backends dominate (then up to N · M steps). Past that point, visit only the
        // backends that claim, in the same order, from a heap: O(M log N) whatever the weights.
        let skewed = wmax.saturating_mul(n) > wsum.saturating_mul(4);
        self.populate_with(skewed);
    }

    fn populate_with(&mut self, skewed: bool) {
        let m = self.size.get();
        self.table.clear();
        self.table.resize(m as usize, EMPTY);
        self.cursors.clear();
        let mut wmax = 0u64;
        for b in &self.backends {
            let offset = id_hash(&self.offset_hasher, b.id, 0) % u64::from(m);
            let skip = id_hash(&self.skip_hasher, b.id, 0) % u64::from(m - 1) + 1;
            let weight = u64::from(b.weight.get());
            wmax = wmax.max(weight);
            self.cursors.push(Cursor {
                pos: offset as u32,
                skip: skip as u32,
                weight,
                credit: 0,
            });
        }
        if self.cursors.is_empty() || wmax == 0 {
            return;
        }
        self.taken.clear();
        self.taken.resize((m as usize).div_ceil(64), 0);
        let taken = self.taken.as_mut_slice();
        let table = self.table.as_mut_slice();
        let mut filled = 0u32;
        if !skewed {
            // Each round the heaviest backend claims a slot, so this ends after at most M
            // rounds; each claim finds a free slot because every permutation visits every slot.
            'rounds: loop {
                for (i, c) in self.cursors.iter_mut().enumerate() {
                    c.credit += c.weight;
                    if c.credit < wmax {
                        continue;
                    }
                    c.credit -= wmax;
                    claim(c, i as u16, m, taken, table);
                    filled += 1;
                    if filled == m {
                        break 'rounds;
                    }
                }
            }
            return;
        }
        // With credits, backend i's credit after r rounds is r·wᵢ − wmax·claims ∈ [0, wmax), so
        // its k-th claim falls in round ⌈k·wmax / wᵢ⌉; within a round, lower indexes go first.
        // Popping (round, index) from a min-heap replays exactly the round-robin order. Here
        // `credit` counts claims.
        let mut heap = BinaryHeap::from(std::mem::take(&mut self.heap));
        heap.clear();
        for (i, c) in self.cursors.iter().enumerate() {
            if c.weight > 0 {
                heap.push(Reverse((wmax.div_ceil(c.weight), i as u32)));
            }
        }
        while let Some(Reverse((_, i))) = heap.pop() {
            let Some(c) = self.cursors.get_mut(i as usize) else {
                break;
            };
            claim(c, i as u16, m, taken, table);
            filled += 1;
            if filled == m {
                break;
            }
            c.credit += 1;
            // (k + 1) · wmax ≤ (M + 1) · 2³² < 2⁶⁴.
            heap.push(Reverse((((c.credit + 1) * wmax).div_ceil(c.weight), i)));
        }
        self.heap = heap.into_vec();
    }

    /// The table size.
    #[inline]
    pub fn size(&self) -> MaglevSize {
        self.size
    }

    /// The slots: each is an index into [`ConsistentHash::backends`]. Two balancers given the same
    /// backends (in any order) and the same key have identical slots.
    #[inline]
    pub fn slots(&self) -> &[u16] {
        &self.table
    }

    /// How many slots each backend owns, by index.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.backends.len()];
        for &s in &self.table {
            if let Some(c) = counts.get_mut(usize::from(s)) {
                *c += 1;
            }
        }
        counts
    }

    /// The slot a flow hash falls in.
    #[inline(always)]
    fn slot(&self, flow_hash: u64) -> usize {
        mul_hi(flow_hash, u64::from(self.size.get())) as usize
    }
}

impl ConsistentHash for Maglev {
    type Preference<'a> = Rehash<'a, Maglev>;

    #[inline]
    fn backends(&self) -> &[Backend] {
        &self.backends
    }

    #[inline(always)]
    fn lookup_index(&self, flow_hash: u64) -> Option<usize> {
        self.table
            .get(self.slot(flow_hash))
            .map(|&i| usize::from(i))
    }

    #[inline(always)]
    fn lookup(&self, flow_hash: u64) -> Option<BackendId> {
        let i = *self.table.get(self.slot(flow_hash))?;
        self.ids.get(usize::from(i)).copied()
    }

    #[inline]
    fn preference(&self, flow_hash: u64) -> Rehash<'_, Maglev> {
        Rehash::new(self, flow_hash)
    }

    #[inline]
    fn total_weight(&self) -> u64 {
        self.weight_sum
    }

    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.table.capacity() * size_of::<u16>()
            + (self.backends.capacity() + self.scratch.capacity()) * size_of::<Backend>()
            + self.ids.capacity() * size_of::<BackendId>()
            + self.cursors.capacity() * size_of::<Cursor>()
            + self.taken.capacity() * size_of::<u64>()
            + self.heap.capacity() * size_of::<Reverse<(u64, u32)>>()
    }
}

#[cfg(test)]
#[path = "maglev_tests.rs"]
mod tests;
