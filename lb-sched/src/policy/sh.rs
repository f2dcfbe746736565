//! Source hashing and destination hashing, IPVS semantics (`ip_vs_sh.c`, `ip_vs_dh.c`).
//!
//! A table of `2^bits` buckets (IPVS: 256) is filled in pool order, each backend taking as many
//! consecutive buckets as its weight (`sh_reassign`: `if (++d_count >= weight) next dest`),
//! cycling until the table is full. A flow goes to bucket `hash & mask`, where the hash is the
//! caller's keyed hash of the source (SH) or destination (DH) address. If that backend is
//! unavailable (down, draining, weight 0, overloaded) and fallback is on (IPVS `sh-fallback`),
//! the following buckets are probed in turn (`roffset = 0..size`) and the first available backend
//! is taken; with fallback off the answer is no backend, as IPVS does.
//!
//! Differences from IPVS: weight-0 backends take no bucket (IPVS gives them one, which only
//! forces a fallback); the hash is keyed (IPVS's `hash_32` is not), so clients cannot aim at one
//! backend. As in IPVS, when `Σ weight` exceeds the table size the backends late in the order get
//! no bucket: choose `bits` so that `2^bits ≥ Σ weight`.
//!
//! The table is rebuilt when [`Pool::generation`] changes (membership or weights); health and
//! admin changes need no rebuild (the fallback handles them). Lookup is O(1) plus probes.

use super::Pick;
use crate::pool::Pool;
use crate::SchedError;

const NONE: u32 = u32::MAX;

/// The bucket table shared by [`SourceHash`] and [`DestinationHash`].
#[derive(Debug, Clone)]
pub struct HashBuckets {
    buckets: Vec<u32>,
    mask: usize,
    fallback: bool,
    generation: u64,
    built: bool,
}

impl HashBuckets {
    /// A table of `2^bits` buckets (`bits` in 1..=20).
    ///
    /// # Errors
    /// [`SchedError::InvalidPolicyConfig`] if `bits` is out of range.
    pub fn new(bits: u8, fallback: bool) -> Result<Self, SchedError> {
        if !(1..=20).contains(&bits) {
            return Err(SchedError::InvalidPolicyConfig(
                "hash table bits must be in 1..=20",
            ));
        }
        let size = 1usize << bits;
        Ok(HashBuckets {
            buckets: vec![NONE; size],
            mask: size - 1,
            fallback,
            generation: 0,
            built: false,
        })
    }

    fn sync(&mut self, pool: &Pool) {
        if self.built && self.generation == pool.generation() {
            return;
        }
        self.buckets.fill(NONE);
        let weighted: Vec<usize> = (0..pool.len()).filter(|&i| pool.weight(i) > 0).collect();
        if !weighted.is_empty() {
            let mut d = 0usize;
            let mut count = 0u32;
            for b in self.buckets.iter_mut() {
                let Some(&i) = weighted.get(d) else { break };
                *b = u32::try_from(i).unwrap_or(NONE);
                count += 1;
                if count >= pool.weight(i) {
                    d = (d + 1) % weighted.len();
                    count = 0;
                }
            }
        }
        self.generation = pool.generation();
        self.built = true;
    }

    /// Looks `hash` up, with fallback probing if enabled.
    pub fn pick(&mut self, pool: &Pool, hash: u64) -> Pick {
        self.sync(pool);
        let start = hash as usize;
        let probes = if self.fallback { self.buckets.len() } else { 1 };
        for k in 0..probes {
            let b = self
                .buckets
                .get(start.wrapping_add(k) & self.mask)
                .copied()
                .unwrap_or(NONE);
            if b != NONE && pool.is_available(b as usize) {
                return Pick::Backend(pool.id_at(b as usize));
            }
            if !self.fallback {
                // The hashed backend is down or drained (Unavailable) or over its threshold
                // (Overloaded); IPVS answers no backend either way.
                return if b != NONE && pool.is_eligible(b as usize) {
                    Pick::Overloaded
                } else {
                    Pick::Unavailable
                };
            }
        }
        pool.no_pick()
    }

    /// Number of buckets.
    pub fn size(&self) -> usize {
        self.buckets.len()
    }
}

/// IPVS `sh`: source hashing. Feed it [`Request::src_hash`](super::Request).
#[derive(Debug, Clone)]
pub struct SourceHash(HashBuckets);

impl SourceHash {
    /// A source-hash scheduler with a table of `2^bits` buckets and the given fallback.
    ///
    /// # Errors
    /// As [`HashBuckets::new`].
    pub fn new(bits: u8, fallback: bool) -> Result<Self, SchedError> {
        HashBuckets::new(bits, fallback).map(SourceHash)
    }

    /// Picks the backend for a source hash.
    #[inline]
    pub fn pick(&mut self, pool: &Pool, src_hash: u64) -> Pick {
        self.0.pick(pool, src_hash)
    }
}

impl Default for SourceHash {
    /// 256 buckets (IPVS default) with fallback.
    fn default() -> Self {
        SourceHash(HashBuckets::new(8, true).unwrap_or_else(|_| unreachable_buckets()))
    }
}

/// IPVS `dh`: destination hashing. Feed it [`Request::dst_hash`](super::Request).
#[derive(Debug, Clone)]
pub struct DestinationHash(HashBuckets);

impl DestinationHash {
    /// A destination-hash scheduler with a table of `2^bits` buckets and the given fallback.
    ///
    /// # Errors
    /// As [`HashBuckets::new`].
    pub fn new(bits: u8, fallback: bool) -> Result<Self, SchedError> {
        HashBuckets::new(bits, fallback).map(DestinationHash)
    }

    /// Picks the backend for a destination hash.
    #[inline]
    pub fn pick(&mut self, pool: &Pool, dst_hash: u64) -> Pick {
        self.0.pick(pool, dst_hash)
    }
}

impl Default for DestinationHash {
    /// 256 buckets (IPVS default) with fallback.
    fn default() -> Self {
        DestinationHash(HashBuckets::new(8, true).unwrap_or_else(|_| unreachable_buckets()))
    }
}

/// An empty one-bucket table; only reachable if the constant bits above were invalid.
fn unreachable_buckets() -> HashBuckets {
    HashBuckets {
        buckets: vec![NONE],
        mask: 0,
        fallback: true,
        generation: 0,
        built: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use lb_core::{BackendId, Instant};

    #[test]
    fn table_follows_weights_and_is_sticky() {
        let p = pool(&[1, 3]);
        let mut sh = SourceHash::default();
        let mut n = [0; 2];
        for h in 0..256u64 {
            n[sh.pick(&p, h).backend().unwrap().get() as usize] += 1;
        }
        assert_eq!(n, [64, 192]);
        assert_eq!(sh.pick(&p, 12345), sh.pick(&p, 12345));
    }

    #[test]
    fn fallback_only_moves_the_unavailable_ones() {
        let mut p = pool(&[1, 1, 1, 1]);
        let mut sh = SourceHash::default();
        let before: Vec<Pick> = (0..256u64).map(|h| sh.pick(&p, h)).collect();
        p.set_healthy(BackendId(2), false, Instant::ZERO).unwrap();
        for h in 0..256u64 {
            let now = sh.pick(&p, h);
            assert_ne!(now, Pick::Backend(BackendId(2)));
            if before[h as usize] != Pick::Backend(BackendId(2)) {
                assert_eq!(now, before[h as usize]);
            }
        }
        let mut dh = DestinationHash::new(8, false).unwrap();
        let lost = (0..256u64)
            .filter(|&h| dh.pick(&p, h) == Pick::Unavailable)
            .count();
        assert_eq!(lost, 64); // backend 2's buckets, without fallback
    }

    #[test]
    fn bad_bits() {
        assert!(SourceHash::new(0, true).is_err());
        assert!(DestinationHash::new(21, true).is_err());
    }
}
