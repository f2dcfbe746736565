//! The hash index of the slab: cache-line buckets of (tag, slot id) entries.
//!
//! Each bucket is one 64-byte cache line holding [`WAYS`] (15) entries of 32 bits and an
//! overflow count. An entry is the slot id in the low bits (as many as the table's capacity
//! needs: 20 at 2^20 flows, at most 24) and a tag from the top of the flow hash in the rest
//! (12 bits at 2^20, at least 8; never zero, which marks an empty way). A key's home bucket
//! comes from the low 32 bits of its hash (Lemire's multiply-shift, so any bucket count
//! works); when the home bucket is full, the entry goes to the next bucket with room and every
//! full bucket it passed counts one more overflow. A lookup therefore reads one cache line in
//! the common case and stops at the first bucket whose overflow count is zero. Removal clears
//! the way and decrements the counts it had raised, so there are no tombstones and the index
//! never needs rebuilding (unlike open addressing with deletion markers, which degrades under
//! churn).
//!
//! Why not `hashbrown`: its control bytes and its buckets live in two separate arrays, so a
//! lookup touches two cache lines before it even reaches the slab, and it offers no way to
//! split a lookup into "load the bucket" and "compare" stages that a burst can interleave.
//! Here one line gives both the tags and the slot ids, and [`Index::candidate`] lets
//! [`ConnTable::track_batch`](crate::ConnTable::track_batch) issue the bucket loads of a whole
//! burst back to back.
//!
//! Sizing: `ceil(1.25 × capacity / WAYS)` buckets, so the index is at most 80 % full and costs
//! 5.33 bytes per entry of capacity (hashbrown: 10 at 2^20, up to 20 just above a power of
//! two). Packing tag and id in 32 bits (15 ways a line instead of 10 of a 16-bit tag and a
//! 32-bit id) made the index of a 2^20-flow table 5.3 MiB instead of 8: more of it stays in the
//! last-level cache while the slab's lines stream through, so a lone hit more often waits for
//! one memory line instead of two (benches/results/conntrack.md; 90 % full instead of 80 %
//! was measured too, and lost to its overflow chains). A sparser index (2/3 full, 9.6 B) was
//! measured and was not faster on the bench machine.
//!
//! Matching: [`Index::find`] and [`Index::candidate`] match a line's 15 tags at once, four
//! 4-lane compares narrowed to one bit mask (SSE2 on x86-64, through the `wide` crate: the
//! library crates forbid `unsafe`), then visit only the matching ways. That is half the
//! instructions of the compiler's own vectorisation of the plain loop, and a lookup that
//! misses is little more than the hash and this match. (Burst misses measured 0.88-0.93× in
//! four code layouts; `process_batch` moved 0.96-1.11× with it, inside the ±12 % that code
//! layout alone moves it by on the bench machine: benches/results/conntrack.md.)

use crate::entry::NIL;
use wide::{i16x8, i32x4, i8x16, u32x4};

/// Entries per bucket.
pub(crate) const WAYS: usize = 15;

/// One cache line of the index.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    /// Lanes `0..WAYS`: entries, the tag in the bits above the index's id bits and the slot id
    /// below (0 = empty). Lane [`OVERFLOW`]: how many entries homed at or before this bucket
    /// were placed after it (saturating: at `u32::MAX` it stays, which only costs longer
    /// probes). One array of 16 so that tag matching runs over whole vectors.
    lanes: [u32; 16],
}

/// The lane of a bucket holding its overflow count.
const OVERFLOW: usize = WAYS;

/// The bits of a match mask that are ways (not the overflow lane).
const WAY_BITS: u32 = (1 << WAYS) - 1;

/// The index: buckets, the number of entries, and the mask of an entry's slot id bits.
#[derive(Debug, Clone)]
pub(crate) struct Index {
    buckets: Vec<Bucket>,
    len: usize,
    /// Insertions so far: a key found absent stays absent while this does not move.
    stamp: u64,
    /// The low bits of an entry that hold the slot id (enough for every id below the
    /// capacity); the bits above hold the tag.
    id_mask: u32,
}

/// The mask of the bits for slot ids 0..`capacity` (at least one), leaving at least 8 for
/// the tag (the table's capacity is below 2^24).
fn id_mask_for(capacity: usize) -> u32 {
    let bits = (usize::BITS - capacity.saturating_sub(1).leading_zeros()).clamp(1, 24);
    (1u32 << bits) - 1
}

impl Index {
    /// An index for up to `capacity` entries (at most 80 % of its ways used), whose slot ids
    /// are below `capacity`.
    pub(crate) fn with_capacity(capacity: usize) -> Index {
        let n = (capacity.saturating_mul(5) / 4).div_ceil(WAYS).max(1);
        Index {
            buckets: vec![Bucket::default(); n],
            len: 0,
            stamp: 0,
            id_mask: id_mask_for(capacity),
        }
    }

    /// Entries stored.
    #[cfg(any(test, feature = "model"))]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes allocated.
    pub(crate) fn allocation_size(&self) -> usize {
        self.buckets.capacity() * core::mem::size_of::<Bucket>()
    }

    /// `hash`'s tag, in place: the hash's top bits above the id bits, never zero (zero marks
    /// an empty way).
    #[inline(always)]
    fn tag(&self, hash: u64) -> u32 {
        ((hash >> 32) as u32 & !self.id_mask).max(self.id_mask + 1)
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

    /// Insertions so far (see [`Index::candidate`]).
    #[inline(always)]
    pub(crate) fn stamp(&self) -> u64 {
        self.stamp
    }

    /// The first slot id in `hash`'s home bucket whose tag matches, or `NIL`: the line a
    /// lookup reads first, without key comparison; and whether nothing is stored under
    /// `hash` at all (no tag matches and no entry overflowed past the bucket), which stays
    /// true until [`Index::stamp`] moves. A hint for burst lookups; [`Index::find`] is the
    /// truth.
    #[inline(always)]
    pub(crate) fn candidate(&self, hash: u64) -> (u32, bool) {
        let t = self.tag(hash);
        let Some(b) = self.buckets.get(self.home(hash)) else {
            return (NIL, false);
        };
        // The lowest matching way.
        let mask = self.matches(b, t);
        if mask == 0 {
            return (NIL, b.lanes[OVERFLOW] == 0);
        }
        let id = b
            .lanes
            .get(mask.trailing_zeros() as usize)
            .map_or(NIL, |&x| x & self.id_mask);
        (id, false)
    }

    /// The ways of bucket `b` whose tag is `t`, as a bit mask, built without branches: four
    /// 4-lane compares, narrowed to 16 bytes and move-masked (on x86-64: SSE2 `pcmpeqd`,
    /// `packssdw`, `packsswb`, `pmovmskb`; 21 instructions). LLVM's own vectorisation of the
    /// scalar loop (`matches_scalar` in the tests, the reference the property test compares
    /// with) took about 50: it left lanes scalar and or-reduced the vectors.
    #[inline(always)]
    fn matches(&self, b: &Bucket, t: u32) -> u32 {
        let tags = u32x4::splat(!self.id_mask);
        let t = u32x4::splat(t);
        let l = &b.lanes;
        let quad = |i: usize| -> i32x4 {
            let v = u32x4::new([l[i], l[i + 1], l[i + 2], l[i + 3]]);
            bytemuck::cast((v & tags).simd_eq(t))
        };
        // Lanes are 0 or -1: saturating narrowing keeps them, in order.
        let lo = i16x8::from_i32x8_saturate(bytemuck::cast([quad(0), quad(4)]));
        let hi = i16x8::from_i32x8_saturate(bytemuck::cast([quad(8), quad(12)]));
        i8x16::from_i16x16_saturate(bytemuck::cast([lo, hi])).to_bitmask() & WAY_BITS
    }

    /// The slot id stored under `hash` for which `eq` holds.
    ///
    /// The tags of a line are matched into a bit mask and only the matching ways are
    /// visited: the branches then depend on whether a way matches at all (almost always
    /// one way for a hit, none for a miss), not on which way it is, so they predict well and
    /// the core can run ahead of the line's arrival.
    #[inline(always)]
    pub(crate) fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let t = self.tag(hash);
        let mut b = self.home(hash);
        for _ in 0..self.buckets.len() {
            let bucket = self.buckets.get(b)?;
            let mut mask = self.matches(bucket, t);
            while mask != 0 {
                let id = bucket.lanes.get(mask.trailing_zeros() as usize)? & self.id_mask;
                if eq(id) {
                    return Some(id);
                }
                mask &= mask - 1;
            }
            if bucket.lanes[OVERFLOW] == 0 {
                return None;
            }
            b = self.next(b);
        }
        None
    }

    /// Stores `id` under `hash` (the caller ensures it is not already there). Returns false
    /// only if every way is taken, which sizing rules out while `len < capacity`, or if `id`
    /// is not below the capacity the index was made for.
    pub(crate) fn insert(&mut self, hash: u64, id: u32) -> bool {
        if self.len >= self.buckets.len() * WAYS || id & !self.id_mask != 0 {
            return false;
        }
        let x = self.tag(hash) | id;
        let mut b = self.home(hash);
        for _ in 0..self.buckets.len() {
            let Some(bucket) = self.buckets.get_mut(b) else {
                return false;
            };
            if let Some(w) = bucket.lanes[..WAYS].iter_mut().find(|w| **w == 0) {
                *w = x;
                self.len += 1;
                self.stamp += 1;
                return true;
            }
            bucket.lanes[OVERFLOW] = bucket.lanes[OVERFLOW].saturating_add(1);
            b = self.next(b);
        }
        false
    }

    /// Removes `id` stored under `hash`. Returns whether it was there.
    pub(crate) fn remove(&mut self, hash: u64, id: u32) -> bool {
        if id & !self.id_mask != 0 {
            return false;
        }
        let x = self.tag(hash) | id;
        let home = self.home(hash);
        let mut b = home;
        for _ in 0..self.buckets.len() {
            let Some(bucket) = self.buckets.get_mut(b) else {
                return false;
            };
            if let Some(w) = bucket.lanes[..WAYS].iter_mut().find(|w| **w == x) {
                *w = 0;
                self.len -= 1;
                // Undo the overflow counts this entry raised on its way from home.
                let mut o = home;
                while o != b {
                    if let Some(ob) = self.buckets.get_mut(o) {
                        let o = &mut ob.lanes[OVERFLOW];
                        if *o != u32::MAX {
                            *o = o.saturating_sub(1);
                        }
                    }
                    o = self.next(o);
                }
                return true;
            }
            if bucket.lanes[OVERFLOW] == 0 {
                return false;
            }
            b = self.next(b);
        }
        false
    }

    /// Sum of the overflow counts (0 when every entry sits in its home bucket); for tests.
    #[cfg(test)]
    pub(crate) fn total_overflow(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| u64::from(b.lanes[OVERFLOW]))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// The plain loop `matches` replaced: the reference for its vector form.
    fn matches_scalar(ix: &Index, b: &Bucket, t: u32) -> u32 {
        let mut mask = 0u32;
        for (w, &x) in b.lanes.iter().enumerate() {
            mask |= u32::from(x & !ix.id_mask == t) << w;
        }
        mask & WAY_BITS
    }

    proptest! {
        #[test]
        fn vector_match_is_the_scalar_match(
            capacity in 1usize..(1 << 24),
            tags in proptest::collection::vec(0u32..4, 16),
            ids in proptest::collection::vec(any::<u32>(), 16),
            hash in any::<u64>(),
        ) {
            let ix = Index {
                buckets: Vec::new(),
                len: 0,
                stamp: 0,
                id_mask: id_mask_for(capacity),
            };
            let t = ix.tag(hash);
            // Lanes drawn from four tags (the key's own, its neighbours, none) so that
            // matches are common; id bits random.
            let mut b = Bucket::default();
            for (w, lane) in b.lanes.iter_mut().enumerate() {
                let tag = match tags[w] {
                    0 => t,
                    1 => t.wrapping_add(ix.id_mask + 1),
                    2 => t ^ (ix.id_mask + 1),
                    _ => 0,
                };
                *lane = (tag & !ix.id_mask) | (ids[w] & ix.id_mask);
            }
            prop_assert_eq!(ix.matches(&b, t), matches_scalar(&ix, &b, t));
        }
    }

    #[test]
    fn bucket_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<Bucket>(), 64);
        assert_eq!(core::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn sizing_is_under_five_and_a_half_bytes_per_entry() {
        let ix = Index::with_capacity(1 << 20);
        // ceil(1.25 × 2^20 / 15) lines of 64 bytes.
        assert_eq!(ix.allocation_size(), 87_382 * 64);
        assert!(ix.allocation_size() * 10 < (1 << 20) * 54);
    }

    #[test]
    fn ids_take_the_bits_the_capacity_needs_and_tags_the_rest() {
        for (capacity, mask) in [
            (1, 1),
            (2, 1),
            (36, 63),
            (1 << 20, (1 << 20) - 1),
            ((1 << 20) + 1, (1 << 21) - 1),
            ((1 << 24) - 1, (1 << 24) - 1),
        ] {
            let ix = Index {
                buckets: Vec::new(),
                len: 0,
                stamp: 0,
                id_mask: id_mask_for(capacity),
            };
            assert_eq!(ix.id_mask, mask, "capacity {capacity}");
            // Tags are never zero and never touch the id bits.
            for h in [0u64, u64::MAX, 0x0000_0001_0000_0000, 0x8000_0000_0000_0000] {
                let t = ix.tag(h);
                assert_ne!(t, 0);
                assert_eq!(t & mask, 0);
            }
        }
        // An id the capacity does not cover is refused, not stored under another's bits.
        let mut ix = Index::with_capacity(36);
        assert!(!ix.insert(7, 64));
        assert!(ix.insert(7, 63));
        assert_eq!(ix.find(7, |x| x == 63), Some(63));
        assert!(!ix.remove(7, 64 | 63));
    }

    #[test]
    fn collisions_overflow_and_unwind() {
        // 3 buckets; every hash homes in bucket 0 with the same tag.
        let mut ix = Index::with_capacity(36);
        assert_eq!(ix.buckets.len(), 3);
        let h = 0xabcd_0000_0000_0000u64;
        for id in 0..40 {
            assert!(ix.insert(h, id));
        }
        assert_eq!(ix.buckets[0].lanes[OVERFLOW], 25);
        assert_eq!(ix.buckets[1].lanes[OVERFLOW], 10);
        for id in 0..40 {
            assert_eq!(ix.find(h, |x| x == id), Some(id));
        }
        // Full: 45 ways.
        for id in 40..45 {
            assert!(ix.insert(h, id));
        }
        assert!(!ix.insert(h, 45));
        for id in (0..45).rev() {
            assert!(ix.remove(h, id), "{id}");
            assert_eq!(ix.find(h, |x| x == id), None);
        }
        assert_eq!(ix.len(), 0);
        assert_eq!(ix.total_overflow(), 0);
        assert!(!ix.remove(h, 3));
    }

    #[test]
    fn wraps_around_the_end() {
        let mut ix = Index::with_capacity(36);
        let h = 0xffff_ffffu64; // homes in the last bucket
        for id in 0..25 {
            assert!(ix.insert(h, id));
        }
        assert_eq!(ix.buckets[2].lanes[OVERFLOW], 10);
        assert_eq!(ix.find(h, |x| x == 24), Some(24));
        assert!(ix.remove(h, 24));
        assert_eq!(ix.total_overflow(), 9);
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
