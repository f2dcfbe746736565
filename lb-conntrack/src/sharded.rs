//! A sharded table for several data-path threads.
//!
//! The key space is split over `n` shards by bits 32..63 of the keyed flow hash (the shard
//! tables index with the low bits and hashbrown's tags use the top 7, so the three are
//! independent). Each shard is a [`ConnTable`] behind its own `parking_lot::Mutex`; the flow hash
//! is computed once, outside any lock, and handed to the shard.
//!
//! Contention: two threads contend only when they touch the same shard at the same time; with
//! `n` shards and uniformly hashed flows that happens on about `1/n` of simultaneous operations,
//! and a critical section is a single probe (tens of nanoseconds), so a shard count of 4–8 × the
//! number of threads makes waiting rare. The uncontended cost is one atomic
//! compare-and-swap to lock and one store to unlock per call. Capacity, eviction and expiry
//! are per shard: a flood that fills one shard sheds that shard's half-open entries.
//!
//! Persistence (client affinity, SIP Call-ID bindings) is not sharded with the flows: each
//! shard's [`ConnTable`] has its own [`crate::PersistTable`], reachable only through
//! [`ShardedConnTable::with_shard`] by a *flow* key, so two connections of one client that hash
//! to different shards see different templates; and [`ShardedConnTable::expire`] /
//! [`ShardedConnTable::sweep`] do not touch them. An embedder that needs affinity keeps one
//! [`ConnTable`] (as `lb-dataplane` does) or its own persistence table beside this one.

use parking_lot::Mutex;

use lb_core::{FlowHasher, FlowKey, HashKey, Instant, KeyedHash, SipHash13};

use crate::entry::{Hit, Packet};
use crate::removal::Removal;
use crate::stats::Counters;
use crate::table::{Config, ConnTable, Insert, NewFlow};
use crate::ConntrackError;

/// A connection table split into independently locked shards.
///
/// ```
/// use lb_conntrack::{Config, NewFlow, Packet, ShardedConnTable, TcpFlags};
/// use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};
/// let t = ShardedConnTable::new(4, Config::with_capacity(4096), HashKey::from_bytes([1; 16])).unwrap();
/// let k = FlowKey::v4([192, 0, 2, 1].into(), 1000, [203, 0, 113, 1].into(), 53, IpProto::Udp);
/// let now = Instant::from_secs(1);
/// assert!(t.track(&k, Packet::original(TcpFlags::NONE, 80), now).is_none());
/// assert!(t.insert_with(NewFlow::new(k, BackendId(2)), now).is_inserted());
/// assert_eq!(t.track(&k, Packet::original(TcpFlags::NONE, 80), now).map(|h| h.backend), Some(BackendId(2)));
/// assert_eq!(t.len(), 1);
/// ```
#[derive(Debug)]
pub struct ShardedConnTable<H: KeyedHash = SipHash13> {
    hasher: FlowHasher<H>,
    shards: Box<[Mutex<ConnTable<H>>]>,
}

impl ShardedConnTable<SipHash13> {
    /// `shards` shards, each a [`ConnTable`] with `cfg` divided by the shard count (capacity,
    /// IPv6 capacity, persistence capacity, elephant store and removal ring, rounded up). Each shard may hold
    /// up to [`crate::MAX_CAPACITY`] entries, so a sharded table can exceed it.
    ///
    /// # Errors
    /// [`ConntrackError::InvalidCapacity`] for zero shards, else as [`Config::validate`].
    pub fn new(shards: usize, cfg: Config, key: HashKey) -> Result<Self, ConntrackError> {
        Self::with_hasher(shards, cfg, key)
    }
}

impl<H: KeyedHash> ShardedConnTable<H> {
    /// As [`ShardedConnTable::new`] with hash function `H`.
    ///
    /// # Errors
    /// As [`ShardedConnTable::new`].
    pub fn with_hasher(shards: usize, cfg: Config, key: HashKey) -> Result<Self, ConntrackError> {
        if shards == 0 || shards > 4096 {
            return Err(ConntrackError::InvalidCapacity { capacity: shards });
        }
        let per = Config {
            capacity: cfg.capacity.div_ceil(shards),
            ipv6_capacity: cfg.ipv6_capacity.div_ceil(shards),
            persist_capacity: cfg.persist_capacity.div_ceil(shards),
            elephants: cfg.elephants.div_ceil(shards),
            removal_queue: cfg.removal_queue.div_ceil(shards),
            ..cfg
        };
        let mut v = Vec::with_capacity(shards);
        for _ in 0..shards {
            v.push(Mutex::new(ConnTable::with_hasher(per, key)?));
        }
        Ok(ShardedConnTable {
            hasher: FlowHasher::with_key(key),
            shards: v.into_boxed_slice(),
        })
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    #[inline]
    fn shard_of(&self, hash: u64) -> usize {
        ((hash >> 32) as usize) % self.shards.len()
    }

    #[inline]
    fn hash_unlocked(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_flow(key)
    }

    /// Lookup and update (see [`ConnTable::track`]).
    #[inline]
    pub fn track(&self, key: &FlowKey, pkt: Packet, now: Instant) -> Option<Hit> {
        let h = self.hash_unlocked(key);
        self.shards
            .get(self.shard_of(h))?
            .lock()
            .track_hashed(h, key, pkt, now)
    }

    /// Inserts a flow (see [`ConnTable::insert_with`]).
    pub fn insert_with(&self, flow: NewFlow, now: Instant) -> Insert {
        let h = self.hash_unlocked(&flow.key);
        match self.shards.get(self.shard_of(h)) {
            Some(s) => s.lock().insert_with(flow, now),
            None => Insert::Refused(crate::Refusal::TableFull),
        }
    }

    /// Removes a flow (see [`ConnTable::remove`]).
    pub fn remove(&self, key: &FlowKey, now: Instant) -> bool {
        let h = self.hash_unlocked(key);
        self.shards
            .get(self.shard_of(h))
            .is_some_and(|s| s.lock().remove(key, now))
    }

    /// Expires up to `budget` entries in every shard (each capped by its removal ring's free
    /// space, see [`ConnTable::expire`]), locking one shard at a time.
    pub fn expire(&self, now: Instant, budget_per_shard: usize) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expire(now, budget_per_shard))
            .sum()
    }

    /// [`ConnTable::sweep`] of `slots_per_shard` slots in every shard, removing up to
    /// `budget_per_shard` timed-out entries in each, locking one shard at a time.
    pub fn sweep(&self, now: Instant, slots_per_shard: usize, budget_per_shard: usize) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().sweep(now, slots_per_shard, budget_per_shard))
            .sum()
    }

    /// Earliest deadline over all shards.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.shards
            .iter()
            .filter_map(|s| s.lock().next_deadline())
            .min()
    }

    /// Total entries.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether every shard is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total capacity.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(|s| s.lock().capacity()).sum()
    }

    /// Runs `f` on the shard that owns `key` (for operations not mirrored here).
    pub fn with_shard<R>(
        &self,
        key: &FlowKey,
        f: impl FnOnce(&mut ConnTable<H>) -> R,
    ) -> Option<R> {
        let h = self.hash_unlocked(key);
        self.shards.get(self.shard_of(h)).map(|s| f(&mut s.lock()))
    }

    /// Counters summed over the shards (hits, misses, inserts, evictions, refusals, …).
    pub fn counters(&self) -> Counters {
        let mut t = Counters::default();
        for s in self.shards.iter() {
            t.merge(s.lock().counters());
        }
        t
    }

    /// The oldest unread removal record of the first shard that has one (see
    /// [`ConnTable::poll_removal`]); `None` when every shard's ring is empty. Locks shards one
    /// at a time.
    #[must_use]
    pub fn poll_removal(&self) -> Option<Removal> {
        self.shards.iter().find_map(|s| s.lock().poll_removal())
    }

    /// Every unread removal record, shard by shard (each shard's oldest first). Locks one
    /// shard per record, never across calls to `next`; records that arrive meanwhile in a
    /// shard already passed wait for the next drain.
    pub fn drain_removals(&self) -> impl Iterator<Item = Removal> + '_ {
        let mut shard = 0;
        core::iter::from_fn(move || loop {
            let r = self.shards.get(shard)?.lock().poll_removal();
            if r.is_some() {
                return r;
            }
            shard += 1;
        })
    }

    /// How many removal records wait in all shards.
    pub fn pending_removals(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().pending_removals())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FlowState, TcpFlags, TcpState};
    use lb_core::{BackendId, IpProto};
    use std::net::Ipv4Addr;

    fn k(t: u32, i: u32) -> FlowKey {
        FlowKey::v4(
            Ipv4Addr::from(t << 24 | i),
            1000,
            Ipv4Addr::new(203, 0, 113, 1),
            80,
            IpProto::Tcp,
        )
    }

    #[test]
    fn zero_shards_rejected_and_capacity_split() {
        let key = HashKey::from_bytes([1; 16]);
        assert!(ShardedConnTable::new(0, Config::default(), key).is_err());
        let t = ShardedConnTable::new(3, Config::with_capacity(10), key).unwrap();
        assert_eq!(t.capacity(), 12);
        assert_eq!(t.shards(), 3);
        let elephants = ShardedConnTable::new(
            4,
            Config {
                elephants: 10,
                ..Config::with_capacity(16)
            },
            key,
        )
        .unwrap();
        let per_shard = elephants.with_shard(&k(0, 1), |s| s.config().elephants);
        assert_eq!(per_shard, Some(3));
    }

    // Threads are banned in the library by clippy.toml; this test needs two to exercise the
    // locks, and spawns them through std::thread::scope.
    #[test]
    #[allow(clippy::disallowed_methods)]
    fn two_threads_share_the_table() {
        let t = ShardedConnTable::new(
            8,
            Config::with_capacity(40_000),
            HashKey::from_bytes([1; 16]),
        )
        .unwrap();
        let now = Instant::from_secs(1);
        std::thread::scope(|s| {
            for th in 0..2u32 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..5_000 {
                        let f = NewFlow::new(k(th, i), BackendId(th))
                            .with_first(Packet::original(TcpFlags::SYN, 60));
                        assert!(t.insert_with(f, now).is_inserted());
                    }
                    for i in 0..5_000 {
                        let h = t
                            .track(&k(th, i), Packet::original(TcpFlags::ACK, 52), now)
                            .unwrap();
                        assert_eq!(h.backend, BackendId(th));
                        assert_eq!(h.state, FlowState::Tcp(TcpState::Established));
                    }
                });
            }
        });
        assert_eq!(t.len(), 10_000);
        let c = t.counters();
        assert_eq!((c.inserts, c.hits), (10_000, 10_000));
        assert_eq!(
            t.with_shard(&k(0, 1), |s| s.get(&k(0, 1), now).map(|e| e.backend)),
            Some(Some(BackendId(0)))
        );
        assert!(t.remove(&k(0, 1), now));
        assert_eq!(t.drain_removals().count(), 1);
        // Each shard's expire stops at its removal ring's room (4096 / 8 records): drain and
        // go on.
        let mut expired = 0;
        let mut removals = 0;
        while !t.is_empty() {
            expired += t.expire(Instant::from_secs(10_000), 100_000);
            removals += t.drain_removals().count();
        }
        assert_eq!((expired, removals), (9_999, 9_999));
        assert_eq!(t.counters().removals_lost, 0);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn the_sweep_visits_every_shard() {
        let t = ShardedConnTable::new(4, Config::with_capacity(64), HashKey::from_bytes([2; 16]))
            .unwrap();
        for i in 0..40 {
            let f =
                NewFlow::new(k(0, i), BackendId(0)).with_first(Packet::original(TcpFlags::SYN, 60));
            assert!(t.insert_with(f, Instant::from_secs(1)).is_inserted());
        }
        // Not due yet: nothing leaves.
        assert_eq!(t.sweep(Instant::from_secs(2), 16, 100), 0);
        // Every shard's 16 slots looked at once more, all timed out: all 40 leave.
        assert_eq!(t.sweep(Instant::from_secs(1_000), 16, 100), 40);
        assert_eq!(t.drain_removals().count(), 40);
        assert!(t.is_empty());
    }
}
