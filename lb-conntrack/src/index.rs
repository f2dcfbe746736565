//! The hash index of the slab: cache-line buckets of (tag, slot id) pairs.
//!
//! Each bucket is one 64-byte cache line holding [`WAYS`] entries: a 16-bit tag taken from the
//! top of the flow hash (never zero; zero marks an empty way) and the 32-bit slot id, plus an
//! overflow count. A key's home bucket comes from the low 32 bits of its hash (Lemire's
//! multiply-shift, so any bucket count works); when the home bucket is full, the entry goes to
//! the next bucket with room and every full bucket it passed counts one more overflow. A lookup
//! therefore reads one cache line in the common case and stops at the first bucket whose
//! overflow count is zero. Removal clears the way and decrements the counts it had raised, so
//! there are no tombstones and the index never needs rebuilding (unlike open addressing with
//! deletion markers, which degrades under churn).
//!
//! Why not `hashbrown`: its control bytes and its buckets live in two separate arrays, so a
//! lookup touches two cache lines before it even reaches the slab, and it offers no way to
//! split a lookup into "load the bucket" and "compare" stages that a burst can interleave.
//! Here one line gives both the tags and the slot ids, and [`Index::candidate`] lets
//! [`ConnTable::track_batch`](crate::ConnTable::track_batch) issue the bucket loads of a whole
//! burst back to back.
//!
//! Sizing: `ceil(1.25 × capacity / WAYS)` buckets, so the index is at most 80 % full and costs
//! 8 bytes per entry of capacity (hashbrown: 10 at 2^20, up to 20 just above a power of two).
//! A sparser index (2/3 full, 9.6 B) and branch-free tag matching in [`Index::find`] were
//! measured and were not faster on the bench machine: the tag loop's branches are cheap next to
//! the line's miss. ([`Index::candidate`], which runs on a line a burst prefetched, builds a
//! branch-free match mask.)

use crate::entry::NIL;

/// Entries per bucket.
pub(crate) const WAYS: usize = 10;

/// One cache line of the index.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    /// Tags; 0 = empty way.
    tags: [u16; WAYS],
    /// How many entries homed at or before this bucket were placed after it (saturating: at
    /// `u16::MAX` it stays, which only costs longer probes).
    overflow: u16,
    _pad: u16,
    /// Slot ids.
    ids: [u32; WAYS],
}

/// The index: buckets and the number of entries.
#[derive(Debug, Clone)]
pub(crate) struct Index {
    buckets: Vec<Bucket>,
    len: usize,
}

#[inline(always)]
fn tag_of(hash: u64) -> u16 {
    ((hash >> 48) as u16) | 1
}

impl Index {
    /// An index for up to `capacity` entries (at most 80 % of its ways used).
    pub(crate) fn with_capacity(capacity: usize) -> Index {
        let n = (capacity.saturating_mul(5) / 4).div_ceil(WAYS).max(1);
        Index {
            buckets: vec![Bucket::default(); n],
            len: 0,
        }
    }

    /// Entries stored.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes allocated.
    pub(crate) fn allocation_size(&self) -> usize {
        self.buckets.capacity() * core::mem::size_of::<Bucket>()
    }

    #[inline(always)]
    fn home(&self, hash: u64) -> usize {
        (((hash & 0xffff_ffff) * self.buckets.len() as u64) >> 32) as usize
    }

    #[inline(always)]
    fn next(&self, b: usize) -> usize {
        if b + 1 == self.buckets.len() {
            0
        } else {
            b + 1
        }
    }

    /// Prefetches `hash`'s home bucket (a hint: no load waits for it).
    #[inline(always)]
    pub(crate) fn prefetch(&self, hash: u64) {
        prefetch_index::prefetch_index(&self.buckets, self.home(hash));
    }

    /// The first slot id in `hash`'s home bucket whose tag matches, or `NIL`: the line a
    /// lookup reads first, without key comparison. A hint for burst lookups; [`Index::find`]
    /// is the truth.
    #[inline(always)]
    pub(crate) fn candidate(&self, hash: u64) -> u32 {
        let t = tag_of(hash);
        let Some(b) = self.buckets.get(self.home(hash)) else {
            return NIL;
        };
        // The lowest matching way.
        let mask = Self::matches(b, t);
        if mask == 0 {
            return NIL;
        }
        b.ids
            .get(mask.trailing_zeros() as usize)
            .copied()
            .unwrap_or(NIL)
    }

    /// The ways of bucket `b` whose tag is `t`, as a bit mask, built without branches (the
    /// compiler turns it into a vector compare).
    #[inline(always)]
    fn matches(b: &Bucket, t: u16) -> u32 {
        let mut mask = 0u32;
        for (w, &x) in b.tags.iter().enumerate() {
            mask |= u32::from(x == t) << w;
        }
        mask
    }

    /// The slot id stored under `hash` for which `eq` holds.
    ///
    /// The tags of a line are matched into a bit mask and only the matching ways are
    /// visited: the branches then depend on whether a way matches at all (almost always
    /// one way for a hit, none for a miss), not on which way it is, so they predict well and
    /// the core can run ahead of the line's arrival.
    #[inline(always)]
    pub(crate) fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let t = tag_of(hash);
        let mut b = self.home(hash);
        for _ in 0..self.buckets.len() {
            let bucket = self.buckets.get(b)?;
            let mut mask = Self::matches(bucket, t);
            while mask != 0 {
                let id = bucket.ids.get(mask.trailing_zeros() as usize).copied()?;
                if eq(id) {
                    return Some(id);
                }
                mask &= mask - 1;
            }
            if bucket.overflow == 0 {
                return None;
            }
            b = self.next(b);
        }
        None
    }

    /// Stores `id` under `hash` (the caller ensures it is not already there). Returns false
    /// only if every way is taken, which sizing rules out while `len < capacity`.
    pub(crate) fn insert(&mut self, hash: u64, id: u32) -> bool {
        if self.len >= self.buckets.len() * WAYS {
            return false;
        }
        let t = tag_of(hash);
        let mut b = self.home(hash);
        for _ in 0..self.buckets.len() {
            let Some(bucket) = self.buckets.get_mut(b) else {
                return false;
            };
            if let Some(w) = bucket.tags.iter().position(|&x| x == 0) {
                bucket.tags[w] = t;
                bucket.ids[w] = id;
                self.len += 1;
                return true;
            }
            bucket.overflow = bucket.overflow.saturating_add(1);
            b = self.next(b);
        }
        false
    }

    /// Removes `id` stored under `hash`. Returns whether it was there.
    pub(crate) fn remove(&mut self, hash: u64, id: u32) -> bool {
        let t = tag_of(hash);
        let home = self.home(hash);
        let mut b = home;
        for _ in 0..self.buckets.len() {
            let Some(bucket) = self.buckets.get_mut(b) else {
                return false;
            };
            if let Some(w) = (0..WAYS).find(|&w| bucket.tags[w] == t && bucket.ids[w] == id) {
                bucket.tags[w] = 0;
                bucket.ids[w] = 0;
                self.len -= 1;
                // Undo the overflow counts this entry raised on its way from home.
                let mut o = home;
                while o != b {
                    if let Some(ob) = self.buckets.get_mut(o) {
                        if ob.overflow != u16::MAX {
                            ob.overflow = ob.overflow.saturating_sub(1);
                        }
                    }
                    o = self.next(o);
                }
                return true;
            }
            if bucket.overflow == 0 {
                return false;
            }
            b = self.next(b);
        }
        false
    }

    /// Sum of the overflow counts (0 when every entry sits in its home bucket); for tests.
    #[cfg(test)]
    pub(crate) fn total_overflow(&self) -> u64 {
        self.buckets.iter().map(|b| u64::from(b.overflow)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn bucket_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<Bucket>(), 64);
        assert_eq!(core::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn sizing_is_eight_bytes_per_entry() {
        let ix = Index::with_capacity(1 << 20);
        assert_eq!(ix.allocation_size(), (1 << 20) * 8);
    }

    #[test]
    fn collisions_overflow_and_unwind() {
        // 3 buckets; every hash homes in bucket 0 with the same tag.
        let mut ix = Index::with_capacity(24);
        assert_eq!(ix.buckets.len(), 3);
        let h = 0xabcd_0000_0000_0000u64;
        for id in 0..25 {
            assert!(ix.insert(h, id));
        }
        assert_eq!(ix.buckets[0].overflow, 15);
        assert_eq!(ix.buckets[1].overflow, 5);
        for id in 0..25 {
            assert_eq!(ix.find(h, |x| x == id), Some(id));
        }
        // Full: 30 ways.
        for id in 25..30 {
            assert!(ix.insert(h, id));
        }
        assert!(!ix.insert(h, 30));
        for id in (0..30).rev() {
            assert!(ix.remove(h, id), "{id}");
            assert_eq!(ix.find(h, |x| x == id), None);
        }
        assert_eq!(ix.len(), 0);
        assert_eq!(ix.total_overflow(), 0);
        assert!(!ix.remove(h, 3));
    }

    #[test]
    fn wraps_around_the_end() {
        let mut ix = Index::with_capacity(24);
        let h = 0xffff_ffffu64; // homes in the last bucket
        for id in 0..15 {
            assert!(ix.insert(h, id));
        }
        assert_eq!(ix.buckets[2].overflow, 5);
        assert_eq!(ix.find(h, |x| x == 14), Some(14));
        assert!(ix.remove(h, 14));
        assert_eq!(ix.total_overflow(), 4);
    }

    proptest! {
        /// Under any sequence of inserts and removes (with deliberately colliding hashes) the
        /// index agrees with a map, and the overflow counts return to zero when it empties.
        #[test]
        fn matches_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..200, 0u64..64), 1..600)) {
            let mut ix = Index::with_capacity(160);
            let mut model: HashMap<u32, u64> = HashMap::new();
            for (ins, id, h) in ops {
                // Few distinct hashes: heavy collisions in home buckets and tags.
                let hash = h.wrapping_mul(0x9e37_79b9_7f4a_7c15) | (h << 50);
                if ins && !model.contains_key(&id) && model.len() < 160 {
                    prop_assert!(ix.insert(hash, id));
                    model.insert(id, hash);
                } else if let Some(hh) = model.remove(&id) {
                    prop_assert!(ix.remove(hh, id));
                }
                prop_assert_eq!(ix.len(), model.len());
            }
            for (&id, &h) in &model {
                prop_assert_eq!(ix.find(h, |x| x == id), Some(id));
            }
            for (id, h) in model.clone() {
                prop_assert!(ix.remove(h, id));
            }
            prop_assert_eq!(ix.total_overflow(), 0);
        }
    }
}
