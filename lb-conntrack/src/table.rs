//! The connection table: a fixed-capacity slab of compact entries indexed by a cache-line
//! hash index (`index.rs`) under a keyed flow hash.
//!
//! Layout (see `entry.rs` for the slot):
//! - `index` (`index.rs`): cache-line buckets of (16-bit hash tag, slot id) under the keyed
//!   hash of the flow key, so a probe reads one line and compares a full key only on a tag
//!   match; removals find their way by hash and slot id, never by comparing keys.
//! - `slots`: `capacity` slots of 40 bytes (key, state, backend, list links, times, counters),
//!   preallocated; free slots are chained through `next`.
//! - class lists (`evict.rs`): one intrusive list per state class, ordered by the time each
//!   entry was queued (lazy re-queueing: a hit marks its entry, `expire` moves it).
//! - side arrays: IPv6 address pairs, exact counters of the few flows that outgrow a slot's
//!   (the elephant store), and when NAT is on, reply tuples (compact, see `entry.rs`) and a
//!   second index of the same kind over them.
//!
//! Nothing allocates after construction, and removal leaves no tombstones (see `index.rs`),
//! so no operation ever pauses to rebuild.

use std::net::SocketAddr;

use lb_core::{BackendId, FlowHasher, FlowKey, HashKey, Instant, KeyedHash, SipHash13};

use crate::entry::{
    slot_key, Counts, EntryInfo, Hit, Nat4, Nat6, Packet, Probe, Slot, F_BIDIR, F_LIVE, F_NAT,
    F_PERSIST, F_POOL, F_POOL_HALF, F_SEEN, F_V6, NIL,
};
use crate::evict::Lists;
use crate::index::Index;
use crate::nat_pool::SnatPool;
use crate::persist::{PersistTable, Service, TemplateKey};
use crate::removal::{RemovalReason, RemovalRing};
use crate::stats::{Counters, EvictReason, Refusal, SessionStats};
use crate::tcp_state::{Direction, TcpState};
use crate::timeout::{next_class, FlowState, Timeouts, CLASSES};
use crate::ConntrackError;

mod config;
mod handle;
mod insert;
mod pressure;
mod removals;

pub use config::{Config, Insert, NewFlow, MAX_BACKEND_ID, MAX_CAPACITY};
pub use handle::{EntryRef, Lookup, MemoryUsage};
pub(crate) use insert::Upserted;

/// A fixed-capacity connection-tracking table.
///
/// Drive order, per packet: [`ConnTable::lookup`] (or [`ConnTable::track`]); on a hit,
/// [`EntryRef::update`]; on a miss, schedule and [`ConnTable::insert_with`]. Replies in NAT modes:
/// [`ConnTable::track_reply`]. Periodically (every millisecond or so, or when
/// [`ConnTable::next_deadline`] passes): [`ConnTable::expire`] with a budget. After every burst
/// and every `expire`: [`ConnTable::poll_removal`] until `None`.
///
/// `now` must not go backwards; an earlier `now` is treated as the latest seen.
#[derive(Debug)]
pub struct ConnTable<H: KeyedHash = SipHash13> {
    pub(crate) hasher: FlowHasher<H>,
    index: Index,
    reply_index: Index,
    pub(crate) slots: Vec<Slot>,
    free: u32,
    len: usize,
    lists: Lists,
    v6: Vec<[u8; 32]>,
    v6_free: Vec<u32>,
    elephants: Vec<[u64; 2]>,
    elephant_free: Vec<u32>,
    nat: Vec<Nat4>,
    nat6: Vec<Nat6>,
    timeouts: Timeouts,
    timeout_ms: [u32; CLASSES],
    clock: u64,
    cfg: Config,
    counters: Counters,
    /// Sessions that ended: live slots removed, and TIME_WAIT / CLOSE entries reused by a new
    /// SYN ([`ConnTable::departures`]).
    departed: u64,
    sessions: SessionStats,
    persist: PersistTable<H>,
    snat: Option<SnatPool>,
    /// `[prev, next]` links of the per-backend-pool half-open lists (`evict::PoolList`), one
    /// per slot; allocated when an SNAT pool is installed.
    pool_links: Vec<[u32; 2]>,
    /// The next list head to leave and its key's hashes (forward, reply), computed when its
    /// predecessor left: see `remove_slot`.
    next_out: NextOut,
    /// Flows that left, for [`ConnTable::poll_removal`].
    removals: RemovalRing,
    /// The next slot [`ConnTable::sweep`] looks at.
    sweep_cursor: u32,
}

/// A live slot's hashes (its key's, and its NAT reply tuple's or 0), computed with its index
/// lines asked for: a list head's, ahead of its removal.
#[derive(Debug, Clone, Copy)]
struct NextOut {
    slot: u32,
    hash: u64,
    reply: u64,
}

impl NextOut {
    const NONE: NextOut = NextOut {
        slot: NIL,
        hash: 0,
        reply: 0,
    };
}

/// What a lookup's slot is at the table's clock ([`ConnTable::live`]).
enum Found {
    /// A live entry's slot.
    Live(u32),
    /// No entry.
    Miss,
    /// A timed-out entry, removed; the backend it was bound to.
    Expired(BackendId),
}

/// One key of a prefetched burst (from [`ConnTable::candidate`]): its flow hash, the slot its
/// index line pointed at, and whether the line said the key was absent (with the table's
/// insertion count then). Only a hint: lookups through it, in the table that gave it, return
/// what they would without it. (A hint that said absent, used in another table, could make a
/// lookup miss a key that table holds.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetched {
    hash: u64,
    slot: u32,
    /// 0, or the index's [`Index::stamp`] + 1 at a candidate that found the key absent: while
    /// the stamp stays there, a lookup through this hint misses without reading the line
    /// again.
    absent_at: u64,
}

impl Prefetched {
    /// A key known only by its hash ([`ConnTable::flow_hash`]): no candidate slot.
    #[inline]
    pub fn of_hash(hash: u64) -> Prefetched {
        Prefetched {
            hash,
            slot: NIL,
            absent_at: 0,
        }
    }

    /// The flow hash.
    #[inline]
    pub fn hash(&self) -> u64 {
        self.hash
    }
}

/// How many keys ahead [`ConnTable::track_batch`] works at each stage: its slot prefetch runs
/// this many keys ahead of the key being processed, and its index prefetch twice as far. At
/// ~25 ns of work per key, 8 keys cover a ~200 ns memory latency.
pub const PIPELINE: usize = 8;

/// How many list heads seen again since they were queued [`ConnTable::expire`] moves to their
/// list's tail per class and call, besides what it removes (lazy re-queueing). The work a
/// call does stays bounded; the moves are work every hit used to do, each now done at most
/// once per trip of an entry through its list.
pub const SETTLE_PER_EXPIRE: usize = 256;

/// How many seen list heads per class an insertion into a full table moves first, so that it
/// is likelier to find a timed-out entry, or the least recently used one, at a head rather
/// than a busy one that had reached it. One: a full table's churn (a SYN flood) must not pay a
/// re-queue per class and insert; `expire` moves the rest.
pub const SETTLE_PER_INSERT: usize = 1;

impl ConnTable<SipHash13> {
    /// A table keyed with SipHash-1-3 under `key` (derive a dedicated key, e.g.
    /// `cluster_key.derive("conntrack")`).
    ///
    /// # Errors
    /// As [`Config::validate`].
    pub fn new(cfg: Config, key: HashKey) -> Result<Self, ConntrackError> {
        Self::with_hasher(cfg, key)
    }
}

impl<H: KeyedHash> ConnTable<H> {
    /// A table using hash function `H` (e.g. [`lb_core::FastHash`]).
    ///
    /// # Errors
    /// As [`Config::validate`].
    pub fn with_hasher(cfg: Config, key: HashKey) -> Result<Self, ConntrackError> {
        cfg.validate()?;
        let cap = cfg.capacity;
        let slots: Vec<Slot> = (0..cap)
            .map(|i| Slot::free(if i + 1 < cap { (i + 1) as u32 } else { NIL }))
            .collect();
        let v6_free: Vec<u32> = (0..cfg.ipv6_capacity as u32).rev().collect();
        Ok(ConnTable {
            hasher: FlowHasher::with_key(key),
            index: Index::with_capacity(cap),
            reply_index: Index::with_capacity(if cfg.nat { cap } else { 0 }),
            slots,
            free: 0,
            len: 0,
            lists: Lists::new(),
            v6: vec![[0; 32]; cfg.ipv6_capacity],
            v6_free,
            elephants: vec![[0; 2]; cfg.elephants],
            elephant_free: (0..cfg.elephants as u32).rev().collect(),
            nat: if cfg.nat {
                vec![Nat4::default(); cap]
            } else {
                Vec::new()
            },
            nat6: if cfg.nat {
                vec![[0; 36]; cfg.ipv6_capacity]
            } else {
                Vec::new()
            },
            timeouts: cfg.timeouts,
            timeout_ms: cfg.timeouts.class_millis(),
            clock: 0,
            cfg,
            counters: Counters::default(),
            departed: 0,
            sessions: SessionStats::new(cfg.stats_backends),
            persist: PersistTable::with_hasher(cfg.persist_capacity, key.derive("persist"))?,
            snat: None,
            pool_links: Vec::new(),
            next_out: NextOut::NONE,
            removals: RemovalRing::new(cfg.removal_queue),
            sweep_cursor: 0,
        })
    }

    // ---- getters ----

    /// Number of entries (live, or timed out but not yet reclaimed).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Number of ways the key index holds (one per entry, when every removal found its way).
    #[cfg(any(test, feature = "model"))]
    pub(crate) fn index_len(&self) -> usize {
        self.index.len()
    }

    /// Whether the table is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fixed capacity.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.cfg.capacity
    }

    /// How many new flows can be inserted before an insertion has to evict one: the free
    /// slots, and in a table with IPv6 address pairs the free pairs, whichever is fewer. (An
    /// insertion may still remove a timed-out entry it meets, or, under SNAT pressure, a
    /// half-open one; never a live established flow while this is above zero.)
    #[inline]
    pub fn room(&self) -> usize {
        let slots = self.cfg.capacity.saturating_sub(self.len);
        if self.cfg.ipv6_capacity > 0 {
            slots.min(self.v6_free.len())
        } else {
            slots
        }
    }

    /// How many new flows can be inserted before an insertion has to evict a flow that is
    /// past its handshake: [`ConnTable::room`] plus the half-open entries (TCP before its
    /// handshake completed, unconfirmed UDP), which eviction takes, oldest first, before any
    /// other live entry. Each insertion lowers it by at most one, and so does each packet
    /// that moves an entry out of the half-open states (a TCP handshake completing or reset,
    /// an unconfirmed UDP flow's next packet); removals never lower it. So while it is above zero no
    /// insertion evicts an established flow or a confirmed UDP flow (it may remove a
    /// timed-out entry): a SYN flood that fills the table keeps it up, since each
    /// spoofed SYN evicts a half-open entry and adds one. In a table with fewer IPv6 address
    /// pairs than slots it is `room()`: there an IPv6 insertion needs an IPv6 victim, which
    /// the half-open entries need not be.
    #[inline]
    pub fn spare(&self) -> usize {
        let room = self.room();
        if self.cfg.ipv6_capacity > 0 && self.cfg.ipv6_capacity < self.cfg.capacity {
            return room;
        }
        let half_open: usize = (0..CLASSES as u8)
            .filter(|&c| crate::evict::class_is_half_open(c))
            .filter_map(|c| self.lists.len.get(usize::from(c)))
            .map(|&n| n as usize)
            .sum();
        room.saturating_add(half_open)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Operation counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How many sessions have ended so far: entries removed for any reason (timeout,
    /// eviction, [`ConnTable::remove`], a sync delete) and TIME_WAIT / CLOSE entries whose
    /// session a new SYN replaced. Counted whether or not removals are recorded: a caller
    /// that keeps what it learnt about flows elsewhere (a per-thread cache of their
    /// forwarding) knows from a change of this figure that some of it may be stale.
    #[inline]
    pub fn departures(&self) -> u64 {
        self.departed
    }

    /// Session statistics (recorded when entries leave; needs `flow_stats`).
    pub fn sessions(&self) -> &SessionStats {
        &self.sessions
    }

    /// Number of entries in each state class, by state.
    pub fn state_counts(&self) -> impl Iterator<Item = (FlowState, usize)> + '_ {
        (0..CLASSES as u8).filter_map(move |c| {
            let n = self.lists.len.get(usize::from(c)).copied().unwrap_or(0) as usize;
            FlowState::from_class(c).map(|s| (s, n))
        })
    }

    /// The persistence templates.
    pub fn persist(&self) -> &PersistTable<H> {
        &self.persist
    }

    /// The persistence templates, to look up and insert templates.
    pub fn persist_mut(&mut self) -> &mut PersistTable<H> {
        &mut self.persist
    }

    /// Installs the SNAT port pool used by [`ConnTable::insert_snat`] (control path: the
    /// first call allocates the pools' half-open list links, 8 bytes per slot). Entries holding
    /// pairs of a pool this one replaces stay in the table but can no longer be reclaimed
    /// under SNAT pressure (a scan of every slot, once).
    pub fn set_snat_pool(&mut self, pool: SnatPool) {
        if self.pool_links.is_empty() {
            self.pool_links = vec![[NIL, NIL]; self.cfg.capacity];
        } else {
            for s in &mut self.slots {
                s.flags &= !F_POOL_HALF;
            }
            self.pool_links.fill([NIL, NIL]);
        }
        self.snat = Some(pool);
    }

    /// The SNAT pool, to register or remove backends (control path).
    pub fn snat_pool_mut(&mut self) -> Option<&mut SnatPool> {
        self.snat.as_mut()
    }

    /// Heap memory in use, by part. Everything is allocated at construction, so this is also
    /// the steady-state footprint.
    pub fn memory(&self) -> MemoryUsage {
        use core::mem::size_of;
        let slots = self.slots.capacity() * size_of::<Slot>();
        let index = self.index.allocation_size();
        let ipv6 = self.v6.capacity() * 32 + self.v6_free.capacity() * 4;
        let elephants = self.elephants.capacity() * 16 + self.elephant_free.capacity() * 4;
        let nat = self.nat.capacity() * size_of::<Nat4>()
            + self.nat6.capacity() * size_of::<Nat6>()
            + self.reply_index.allocation_size()
            + self.pool_links.capacity() * size_of::<[u32; 2]>();
        let persist = self.persist.capacity() * crate::persist::TEMPLATE_BYTES;
        let sessions = (self.cfg.stats_backends + 1) * size_of::<crate::stats::SessionHistograms>();
        let removals = self.removals.allocation_size();
        MemoryUsage {
            slots,
            index,
            ipv6,
            elephants,
            nat,
            removals,
            total: slots + index + ipv6 + elephants + nat + persist + sessions + removals,
        }
    }

    /// The keyed hash the table indexes `key` under (for [`ConnTable::track_hashed`] and for
    /// sharding).
    #[inline]
    pub fn flow_hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_flow(key)
    }

    /// The keyed hasher behind [`ConnTable::flow_hash`]: a copy computes the same hashes
    /// elsewhere, e.g. on another thread before the table's lock is taken.
    #[inline]
    pub fn flow_hasher(&self) -> &FlowHasher<H> {
        &self.hasher
    }

    // ---- time ----

    #[inline]
    pub(crate) fn advance(&mut self, now: Instant) -> u32 {
        let m = now.as_millis();
        if m > self.clock {
            self.clock = m;
        }
        self.clock as u32
    }

    #[inline]
    fn age(&self, s: &Slot) -> u32 {
        (self.clock as u32).wrapping_sub(s.last)
    }

    /// The clock as it would be after `now` (for `&self` queries).
    #[inline]
    fn clock_at(&self, now: Instant) -> u64 {
        self.clock.max(now.as_millis())
    }

    #[inline]
    fn timeout_of(&self, class: u8) -> u32 {
        self.timeout_ms
            .get(usize::from(class))
            .copied()
            .unwrap_or(0)
    }

    #[inline]
    fn slot_expired(&self, i: u32) -> bool {
        self.slot_expired_at(i, self.clock)
    }

    #[inline]
    fn slot_expired_at(&self, i: u32, clock: u64) -> bool {
        match self.slots.get(i as usize) {
            Some(s) => (clock as u32).wrapping_sub(s.last) >= self.timeout_of(s.class),
            None => true,
        }
    }

    fn deadline_of(&self, s: &Slot) -> Instant {
        let age = u64::from(self.age(s));
        let t = u64::from(self.timeout_of(s.class));
        Instant::from_millis((self.clock + t).saturating_sub(age))
    }

    // ---- finding ----

    #[inline(always)]
    fn find(&self, hash: u64, probe: &Probe) -> Option<u32> {
        let (slots, v6) = (&self.slots, &self.v6);
        self.index.find(hash, |i| {
            slots.get(i as usize).is_some_and(|s| probe.matches(s, v6))
        })
    }

    /// [`ConnTable::find`], trying the prefetched candidate slot first. Keys are unique among
    /// live slots, so a live candidate holding the key is the slot `find` would return; any
    /// other candidate (a tag collision, a slot freed or reused since the prefetch, none)
    /// falls back to the full probe.
    #[inline(always)]
    fn find_hinted(&self, p: Prefetched, probe: &Probe) -> Option<u32> {
        if p.absent_at == self.index.stamp() + 1 {
            // Absent at the candidate, and nothing inserted since.
            return None;
        }
        if let Some(s) = self.slots.get(p.slot as usize) {
            if s.flags & F_LIVE != 0 && probe.matches(s, &self.v6) {
                return Some(p.slot);
            }
        }
        self.find(p.hash, probe)
    }

    fn find_reply(&self, hash: u64, reply: &FlowKey) -> Option<u32> {
        self.reply_index
            .find(hash, |i| self.nat_of(i).as_ref() == Some(reply))
    }

    /// [`ConnTable::find_reply`], trying the prefetched candidate first (as
    /// [`ConnTable::find_hinted`]).
    #[inline(always)]
    fn find_reply_hinted(&self, p: Prefetched, reply: &FlowKey) -> Option<u32> {
        let live = self
            .slots
            .get(p.slot as usize)
            .is_some_and(|s| s.flags & (F_LIVE | F_NAT) == (F_LIVE | F_NAT));
        if live && self.nat_of(p.slot).as_ref() == Some(reply) {
            return Some(p.slot);
        }
        self.find_reply(p.hash, reply)
    }

    #[inline]
    fn nat_of(&self, i: u32) -> Option<FlowKey> {
        let s = self.slots.get(i as usize)?;
        if s.flags & F_NAT == 0 {
            return None;
        }
        if s.flags & F_V6 == 0 {
            let n = self.nat.get(i as usize)?;
            Some(FlowKey::v4_bits(
                n.backend,
                n.backend_port,
                n.snat,
                n.snat_port,
                s.proto,
            ))
        } else {
            let n = self.nat6.get(s.a as usize)?;
            let addr = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&n[o..o + 16]);
                a
            };
            Some(FlowKey::v6_octets(
                addr(0),
                u16::from_be_bytes([n[32], n[33]]),
                addr(16),
                u16::from_be_bytes([n[34], n[35]]),
                s.proto,
            ))
        }
    }

    /// Stores reply tuple `r` for slot `i` (live, with its key's family and `a` set). False if
    /// `r` does not fit: another family than the flow's, or NAT storage off.
    pub(crate) fn store_nat(&mut self, i: u32, r: &FlowKey) -> bool {
        let Some(s) = self.slots.get(i as usize).copied() else {
            return false;
        };
        match (s.flags & F_V6 != 0, r.v4_addr_bits()) {
            (false, Some((b, n))) => {
                let Some(slot) = self.nat.get_mut(i as usize) else {
                    return false;
                };
                *slot = Nat4 {
                    backend: b,
                    snat: n,
                    backend_port: r.src_port(),
                    snat_port: r.dst_port(),
                };
                true
            }
            (true, None) => {
                let Some(slot) = self.nat6.get_mut(s.a as usize) else {
                    return false;
                };
                slot[..16].copy_from_slice(r.src_octets());
                slot[16..32].copy_from_slice(r.dst_octets());
                slot[32..34].copy_from_slice(&r.src_port().to_be_bytes());
                slot[34..].copy_from_slice(&r.dst_port().to_be_bytes());
                true
            }
            _ => false,
        }
    }

    fn key_of(&self, i: u32) -> Option<FlowKey> {
        self.slots.get(i as usize).map(|s| slot_key(s, &self.v6))
    }

    pub(crate) fn info(&self, i: u32) -> EntryInfo {
        let s = self.slots.get(i as usize).copied().unwrap_or_default();
        let (packets, bytes) = self.counts_of(&s);
        EntryInfo {
            key: slot_key(&s, &self.v6),
            backend: BackendId(s.backend()),
            state: FlowState::from_class(s.class).unwrap_or(FlowState::Other),
            nat: self.nat_of(i),
            persist: (s.flags & F_PERSIST != 0).then_some(s.persist),
            last_seen: Instant::from_millis(self.clock.saturating_sub(u64::from(self.age(&s)))),
            deadline: self.deadline_of(&s),
            packets,
            bytes,
        }
    }

    /// The (packets, bytes) counters of slot `s`.
    fn counts_of(&self, s: &Slot) -> (u64, u64) {
        match s.counts.elephant_index() {
            Some(e) => self
                .elephants
                .get(e as usize)
                .map_or((0, 0), |&[p, b]| (p, b)),
            None => s.counts.small_values(),
        }
    }

    /// Counts a packet of `bytes` in slot `i`'s counters whose small form overflowed (or
    /// which live in the elephant store already).
    #[cold]
    #[inline(never)]
    fn count_slow(&mut self, i: u32, bytes: u32, packets: u64) {
        let Some(s) = self.slots.get(i as usize).copied() else {
            return;
        };
        let (p, b) = self.counts_of(&s);
        let (p, b) = (
            p.saturating_add(packets),
            b.saturating_add(u64::from(bytes)),
        );
        let counts = match s.counts.elephant_index() {
            Some(e) => {
                if let Some(x) = self.elephants.get_mut(e as usize) {
                    *x = [p, b];
                }
                s.counts
            }
            None => match self.elephant_free.pop() {
                Some(e) => {
                    if let Some(x) = self.elephants.get_mut(e as usize) {
                        *x = [p, b];
                    }
                    self.counters.elephants += 1;
                    Counts::elephant(e)
                }
                None => {
                    self.counters.counts_saturated += 1;
                    Counts::small(p, b)
                }
            },
        };
        if let Some(m) = self.slots.get_mut(i as usize) {
            m.counts = counts;
        }
    }

    /// Returns slot `s`'s elephant-store entry, if it holds one, to the free list (the caller
    /// resets or frees the slot).
    #[inline]
    fn release_counts(&mut self, s: &Slot) {
        if let Some(e) = s.counts.elephant_index() {
            self.elephant_free.push(e);
        }
    }

    // ---- the data path ----

    /// Looks `key` up. A timed-out entry is removed (one [`crate::Removal`] record at most)
    /// and reported as [`Lookup::Expired`]. Does not refresh the entry: call
    /// [`EntryRef::update`] with the packet.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: Instant) -> Lookup<'_, H> {
        let hash = self.hasher.hash_flow(key);
        self.lookup_hashed(hash, key, now)
    }

    /// [`ConnTable::lookup`] with a precomputed `hash` (which must be
    /// [`ConnTable::flow_hash`] of `key`; with another hash the lookup may miss).
    #[inline]
    pub fn lookup_hashed(&mut self, hash: u64, key: &FlowKey, now: Instant) -> Lookup<'_, H> {
        self.lookup_prefetched(Prefetched::of_hash(hash), key, now)
    }

    /// [`ConnTable::lookup`] for a key of a burst prefetched with
    /// [`ConnTable::candidate`]: the candidate slot found then is checked first, so the
    /// index line is not scanned again on a hit. Same result as [`ConnTable::lookup`] (for a
    /// `p` whose hash is [`ConnTable::flow_hash`] of `key`, from this table), whatever changed
    /// in between.
    #[inline(always)]
    pub fn lookup_prefetched(
        &mut self,
        p: Prefetched,
        key: &FlowKey,
        now: Instant,
    ) -> Lookup<'_, H> {
        self.advance(now);
        let found = self.find_hinted(p, &Probe::of(key));
        match self.live(found) {
            Found::Miss => {
                self.counters.misses += 1;
                Lookup::Miss
            }
            Found::Expired(backend) => Lookup::Expired { backend },
            Found::Live(i) => {
                self.counters.hits += 1;
                Lookup::Hit(EntryRef {
                    table: self,
                    idx: i,
                })
            }
        }
    }

    /// What a lookup's `found` slot is at the table's clock: live, absent, or timed out (then
    /// removed here, counted in [`Counters::expired_on_lookup`], its backend kept). The one
    /// place the data path's lookups ([`ConnTable::lookup_prefetched`],
    /// [`ConnTable::track_prefetched`], [`ConnTable::track_reply_prefetched`]) decide this;
    /// each counts its own hits and misses.
    #[inline(always)]
    fn live(&mut self, found: Option<u32>) -> Found {
        match found {
            None => Found::Miss,
            Some(i) if self.slot_expired(i) => {
                let backend = BackendId(self.slots.get(i as usize).map_or(0, Slot::backend));
                self.counters.expired_on_lookup += 1;
                self.remove_timed_out(i);
                Found::Expired(backend)
            }
            Some(i) => Found::Live(i),
        }
    }

    /// Lookup and update in one call: the per-packet entry point. `None` on a miss (or a
    /// timed-out entry, which is removed).
    #[inline]
    pub fn track(&mut self, key: &FlowKey, pkt: Packet, now: Instant) -> Option<Hit> {
        let hash = self.hasher.hash_flow(key);
        self.track_hashed(hash, key, pkt, now)
    }

    /// [`ConnTable::track`] with a precomputed hash (see [`ConnTable::lookup_hashed`]).
    #[inline]
    pub fn track_hashed(
        &mut self,
        hash: u64,
        key: &FlowKey,
        pkt: Packet,
        now: Instant,
    ) -> Option<Hit> {
        self.track_prefetched(Prefetched::of_hash(hash), key, pkt, now)
    }

    /// [`ConnTable::track`] for a key of a burst prefetched with [`ConnTable::candidate`]
    /// (see [`ConnTable::lookup_prefetched`]).
    #[inline(always)]
    pub fn track_prefetched(
        &mut self,
        p: Prefetched,
        key: &FlowKey,
        pkt: Packet,
        now: Instant,
    ) -> Option<Hit> {
        // `lookup_prefetched` and `EntryRef::update` in one: the clock advanced once.
        let now32 = self.advance(now);
        let found = self.find_hinted(p, &Probe::of(key));
        match self.live(found) {
            Found::Live(i) => {
                self.counters.hits += 1;
                Some(self.apply_packet(i, pkt, now32, false))
            }
            Found::Miss => {
                self.counters.misses += 1;
                None
            }
            Found::Expired(_) => None,
        }
    }

    /// Tracks a burst: looks up and updates each key in order, as [`ConnTable::track`] would,
    /// `out[i]` receiving the result for `keys[i]` (`pkts[i]`); the burst is cut to the
    /// shortest of the three slices. Removes at most one timed-out entry (or records one
    /// reused TIME_WAIT / CLOSE session) per key: drain [`ConnTable::poll_removal`] after each
    /// burst, with a ring ([`Config::removal_queue`]) of a few bursts.
    ///
    /// Software-pipelined: while key `i` is processed, the slot of key `i + D` is being
    /// fetched (its index line has arrived) and the index line of key `i + 2D` is on its way,
    /// with `D` = [`PIPELINE`] keys. A hit then costs its share of memory bandwidth and
    /// compute instead of two cache misses in a row.
    pub fn track_batch(
        &mut self,
        keys: &[FlowKey],
        pkts: &[Packet],
        now: Instant,
        out: &mut [Option<Hit>],
    ) {
        const D: usize = PIPELINE;
        const RING: usize = 4 * PIPELINE;
        let n = keys.len().min(pkts.len()).min(out.len());
        let mut ring = [Prefetched::of_hash(0); RING];
        for j in 0..n + 2 * D {
            if let Some(k) = keys.get(j).filter(|_| j < n) {
                let hash = self.hasher.hash_flow(k);
                self.prefetch_bucket(hash);
                ring[j % RING] = Prefetched::of_hash(hash);
            }
            if let Some(c) = j.checked_sub(D).filter(|&c| c < n) {
                let p = &mut ring[c % RING];
                *p = self.candidate(p.hash);
            }
            if let Some(c) = j.checked_sub(2 * D).filter(|&c| c < n) {
                if let (Some(k), Some(&pkt), Some(o)) = (keys.get(c), pkts.get(c), out.get_mut(c)) {
                    *o = self.track_prefetched(ring[c % RING], k, pkt, now);
                }
            }
        }
    }

    /// First stage of a pipelined lookup: prefetches the index line of flow hash `hash` (a
    /// hint; nothing waits for it). Some keys later, call [`ConnTable::candidate`].
    #[inline(always)]
    pub fn prefetch_bucket(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Second stage of a pipelined lookup: reads `hash`'s index line (best prefetched with
    /// [`ConnTable::prefetch_bucket`] a few keys earlier), prefetches the slot it points at,
    /// and returns the hint for [`ConnTable::track_prefetched`] /
    /// [`ConnTable::lookup_prefetched`] some keys later.
    #[inline(always)]
    pub fn candidate(&self, hash: u64) -> Prefetched {
        let (slot, absent) = self.index.candidate(hash);
        self.prefetch_slot(slot);
        Prefetched {
            hash,
            slot,
            absent_at: if absent { self.index.stamp() + 1 } else { 0 },
        }
    }

    /// [`ConnTable::prefetch_bucket`] for a NAT reply tuple's hash.
    #[inline(always)]
    pub fn prefetch_reply_bucket(&self, hash: u64) {
        self.reply_index.prefetch(hash);
    }

    /// [`ConnTable::candidate`] for a NAT reply tuple's hash (for
    /// [`ConnTable::track_reply_prefetched`]).
    #[inline(always)]
    pub fn reply_candidate(&self, hash: u64) -> Prefetched {
        let (slot, _) = self.reply_index.candidate(hash);
        self.prefetch_slot(slot);
        Prefetched {
            hash,
            slot,
            absent_at: 0,
        }
    }

    /// Brings into cache, for a burst of flow hashes (from [`ConnTable::flow_hash`]), the
    /// lines their lookups will touch: every hash's index line, then the slot (and per-flow
    /// counters and NAT tuple) each index line points at. Waits for the index lines (all in
    /// flight at once), not for the slots: process the burst after the call and the slot
    /// lines arrive meanwhile. Purely a performance hint: results never depend on it. (The
    /// pipelined form, [`ConnTable::prefetch_bucket`] then [`ConnTable::candidate`] some keys
    /// later, also hides the wait for the index lines.)
    #[inline]
    pub fn prefetch(&self, hashes: &[u64]) {
        for &h in hashes {
            self.prefetch_bucket(h);
        }
        for &h in hashes {
            self.candidate(h);
        }
    }

    /// [`ConnTable::prefetch`] for a burst of NAT reply tuples' hashes (for
    /// [`ConnTable::track_reply_hashed`]).
    #[inline]
    pub fn prefetch_replies(&self, hashes: &[u64]) {
        for &h in hashes {
            self.prefetch_reply_bucket(h);
        }
        for &h in hashes {
            self.reply_candidate(h);
        }
    }

    /// Prefetches the lines of slot `i` (one or two: a 40-byte slot straddles a line boundary
    /// three times in eight) and of its NAT tuple (a hint).
    #[inline(always)]
    fn prefetch_slot(&self, i: u32) {
        if i == NIL {
            return;
        }
        let i = i as usize;
        prefetch_index::prefetch_index(&self.slots, i);
        // The slot's second line if it straddles, else its first again: no branch (a branch
        // taken three times in eight at random mispredicts, and costs more than the prefetch).
        let start = (self.slots.as_ptr() as usize).wrapping_add(i * size_of::<Slot>());
        let straddles = usize::from(start % 64 > 64 - size_of::<Slot>());
        prefetch_index::prefetch_index(&self.slots, i + straddles);
        if !self.nat.is_empty() {
            prefetch_index::prefetch_index(&self.nat, i);
        }
    }

    /// Looks a NAT reply tuple up (a packet from a backend to the SNAT address) and feeds it
    /// the packet (as [`Direction::Reply`]). Returns the original flow key and the hit.
    #[inline]
    pub fn track_reply(
        &mut self,
        reply: &FlowKey,
        pkt: Packet,
        now: Instant,
    ) -> Option<(FlowKey, Hit)> {
        let hash = self.hasher.hash_flow(reply);
        self.track_reply_hashed(hash, reply, pkt, now)
    }

    /// [`ConnTable::track_hashed`] for `packets` packets of one flow taken together: `pkt`
    /// carries their summed segments and bytes and their TCP flags or'ed, and a hit counts as
    /// `packets` hits. For a caller that forwarded packets of established flows on its own
    /// (a per-thread cache of their forwarding) and hands their effect on the table back
    /// later; for packets that cannot change the flow's state (no SYN, FIN or RST) the entry
    /// ends as the packets one by one would have left it, with the table's clock as its
    /// last-seen time.
    pub fn track_aggregate(
        &mut self,
        hash: u64,
        key: &FlowKey,
        pkt: Packet,
        packets: u32,
        now: Instant,
    ) -> Option<Hit> {
        let h = self.track_hashed(hash, key, pkt, now);
        if h.is_some() {
            self.counters.hits += u64::from(packets.saturating_sub(1));
        }
        h
    }

    /// [`ConnTable::track_aggregate`] for the replies of a flow ([`ConnTable::track_reply`]).
    pub fn track_reply_aggregate(
        &mut self,
        hash: u64,
        reply: &FlowKey,
        pkt: Packet,
        packets: u32,
        now: Instant,
    ) -> Option<(FlowKey, Hit)> {
        let h = self.track_reply_hashed(hash, reply, pkt, now);
        if h.is_some() {
            self.counters.reply_hits += u64::from(packets.saturating_sub(1));
        }
        h
    }

    /// [`ConnTable::track_reply`] with a precomputed hash ([`ConnTable::flow_hash`] of
    /// `reply`).
    pub fn track_reply_hashed(
        &mut self,
        hash: u64,
        reply: &FlowKey,
        pkt: Packet,
        now: Instant,
    ) -> Option<(FlowKey, Hit)> {
        self.track_reply_prefetched(Prefetched::of_hash(hash), reply, pkt, now)
    }

    /// [`ConnTable::track_reply`] for a reply tuple of a burst prefetched with
    /// [`ConnTable::reply_candidate`].
    pub fn track_reply_prefetched(
        &mut self,
        p: Prefetched,
        reply: &FlowKey,
        pkt: Packet,
        now: Instant,
    ) -> Option<(FlowKey, Hit)> {
        let now32 = self.advance(now);
        let found = self.find_reply_hinted(p, reply);
        let i = match self.live(found) {
            Found::Live(i) => i,
            Found::Miss => {
                self.counters.reply_misses += 1;
                return None;
            }
            Found::Expired(_) => return None,
        };
        self.counters.reply_hits += 1;
        let key = self.key_of(i)?;
        let pkt = Packet {
            dir: Direction::Reply,
            ..pkt
        };
        Some((key, self.apply_packet(i, pkt, now32, false)))
    }

    /// A snapshot of the entry of `key`, if live at `now`. Does not refresh it.
    pub fn get(&self, key: &FlowKey, now: Instant) -> Option<EntryInfo> {
        let i = self.find(self.hasher.hash_flow(key), &Probe::of(key))?;
        (!self.slot_expired_at(i, self.clock_at(now))).then(|| self.info(i))
    }

    /// Removes the entry of `key` (recorded as a [`RemovalReason::Removed`] removal). Returns
    /// whether there was one.
    pub fn remove(&mut self, key: &FlowKey, now: Instant) -> bool {
        self.remove_for(key, now, RemovalReason::Removed)
    }

    /// Inserts a flow bound to `backend`, with an optional NAT reply tuple. The entry starts in
    /// its protocol's initial state; prefer [`ConnTable::insert_with`] with the first packet.
    #[inline]
    pub fn insert(
        &mut self,
        key: FlowKey,
        backend: BackendId,
        nat: Option<FlowKey>,
        now: Instant,
    ) -> Insert {
        self.insert_with(
            NewFlow {
                nat,
                ..NewFlow::new(key, backend)
            },
            now,
        )
    }

    /// Inserts a new flow. When the table is full, reclaims a timed-out entry, else evicts the
    /// oldest half-open entry, else (if allowed) the least recently used one. Each flow that
    /// leaves is recorded as a [`crate::Removal`]: at most four per call (a timed-out entry of
    /// the key, one of the NAT tuple, an IPv6 victim and a slot victim). The state the new
    /// flow is in is [`NewFlow::initial_state`].
    pub fn insert_with(&mut self, flow: NewFlow, now: Instant) -> Insert {
        self.insert_inner(flow, false, None, now)
    }

    /// Full NAT: allocates an SNAT (address, port) from `flow.backend`'s pool (see
    /// [`ConnTable::set_snat_pool`]), builds the reply tuple `backend_addr → SNAT`, and inserts
    /// the flow with it. The port returns to the pool when the entry leaves. Returns the
    /// outcome and the reply tuple (whose `dst` is the SNAT source to write into the packet).
    ///
    /// SNAT pressure: when the backend's pool is empty, the oldest half-open entry holding one
    /// of its pairs (TCP without a completed handshake, UDP without a second packet, oldest by
    /// when it became half-open) leaves and its pair serves the new flow: the outcome is
    /// [`Insert::Evicted`] with [`EvictReason::SnatPressure`] (counted in
    /// [`Counters::evicted_snat_pressure`], recorded as a
    /// [`RemovalReason::EvictedSnatPressure`] removal), or [`Insert::New`] if that entry had
    /// timed out. O(1): the pool heads its list. Established entries are never taken; with
    /// none half-open, the insertion is refused ([`Refusal::PortsExhausted`]) as before. The
    /// victim frees the slot (and an IPv6 victim the address pair) the new flow needs, so an
    /// insertion still records at most four removals.
    pub fn insert_snat(
        &mut self,
        flow: NewFlow,
        backend_addr: SocketAddr,
        now: Instant,
    ) -> (Insert, Option<FlowKey>) {
        let mut pair = self.snat.as_mut().and_then(|p| p.allocate(flow.backend));
        let mut reclaimed = None;
        if pair.is_none() && self.snat.is_some() {
            // Port pressure: the oldest half-open flow holding one of this pool's pairs makes
            // way, as the oldest half-open entry does when the table is full.
            self.advance(now);
            reclaimed = self.reclaim_snat(flow.backend);
            pair = self.snat.as_mut().and_then(|p| p.allocate(flow.backend));
        }
        let Some((addr, port)) = pair else {
            self.counters.refused(Refusal::PortsExhausted);
            return (Insert::Refused(Refusal::PortsExhausted), None);
        };
        let reply = match FlowKey::new(
            backend_addr.ip(),
            backend_addr.port(),
            addr,
            port,
            flow.key.proto(),
        ) {
            Ok(r) => r,
            Err(_) => {
                if let Some(pool) = self.snat.as_mut() {
                    pool.release(flow.backend, addr, port);
                }
                self.counters.refused(Refusal::FamilyMismatch);
                return (Insert::Refused(Refusal::FamilyMismatch), None);
            }
        };
        let r = self.insert_inner(
            NewFlow {
                nat: Some(reply),
                ..flow
            },
            true,
            None,
            now,
        );
        if r.is_inserted() {
            let r = match (r, reclaimed) {
                (Insert::New, Some(victim)) => Insert::Evicted {
                    victim,
                    reason: EvictReason::SnatPressure,
                },
                _ => r,
            };
            (r, Some(reply))
        } else {
            if let Some(pool) = self.snat.as_mut() {
                pool.release(flow.backend, addr, port);
            }
            (r, None)
        }
    }

    /// Applies one packet to live slot `i`.
    #[inline(always)]
    pub(crate) fn apply_packet(&mut self, i: u32, pkt: Packet, now32: u32, first: bool) -> Hit {
        // Only the fields needed: a copy of the whole 40-byte slot costs more than the reads.
        let Some((class0, flags0, last0, counts0, backend)) = self
            .slots
            .get(i as usize)
            .map(|s| (s.class, s.flags, s.last, s.counts, s.backend()))
        else {
            return Hit {
                backend: BackendId(0),
                state: FlowState::Other,
                was: None,
                nat: None,
                changed: false,
            };
        };
        let mut flags = flags0;
        let reply = pkt.dir == Direction::Reply;
        if reply {
            flags |= F_BIDIR;
        }
        // The state machine as one table lookup on the class byte (`timeout::next_class`).
        let class = next_class(class0, reply, flags & F_BIDIR != 0, first, pkt.tcp_flags);
        let reused = (class0 == TcpState::TimeWait as u8 || class0 == TcpState::Close as u8)
            && class == TcpState::SynRecv as u8;
        let mut counts = counts0;
        if reused {
            self.reuse(i);
            counts = Counts::ZERO;
        }
        if class != class0 {
            // Another list (another timeout): moved now, to its tail.
            self.lists.requeue(&mut self.slots, class0, class, i);
            flags &= !F_SEEN;
        } else if now32 != last0 {
            // Lazy re-queueing: the entry keeps its place and is marked; `expire` moves it
            // to the tail if it reaches the head before it is due (`settle_head`).
            flags |= F_SEEN;
        }
        let bumped = counts.bumped(pkt.bytes, pkt.count());
        if let Some(m) = self.slots.get_mut(i as usize) {
            m.class = class;
            m.flags = flags;
            m.last = now32;
            if reused {
                m.created = now32;
            }
            m.counts = bumped.unwrap_or(counts);
        }
        if class != class0 && flags & F_POOL != 0 {
            self.pool_track(i);
        }
        if bumped.is_none() {
            self.count_slow(i, pkt.bytes, pkt.count());
        }
        Hit {
            backend: BackendId(backend),
            state: FlowState::from_class(class).unwrap_or(FlowState::Other),
            was: if reused {
                None
            } else {
                Some(FlowState::from_class(class0).unwrap_or(FlowState::Other))
            },
            nat: self.nat_of(i),
            changed: class != class0,
        }
    }

    /// A TIME_WAIT / CLOSE entry reused by a new SYN: the old session ends here (recorded as
    /// a [`RemovalReason::Closed`] removal; the entry lives on with the new session).
    #[cold]
    fn reuse(&mut self, i: u32) {
        if let Some(s) = self.slots.get(i as usize).copied() {
            self.counters.reused += 1;
            self.departed += 1;
            self.record_session(&s);
            let nat = if s.flags & F_NAT != 0 {
                self.nat_of(i)
            } else {
                None
            };
            self.record_removal(&s, nat, RemovalReason::Closed);
            self.release_counts(&s);
        }
    }

    fn record_session(&mut self, s: &Slot) {
        if self.cfg.flow_stats {
            let dur = u64::from(s.last.wrapping_sub(s.created));
            let (packets, _) = self.counts_of(s);
            self.sessions.record(BackendId(s.backend()), dur, packets);
        }
    }

    /// Removes live slot `i` from every structure, returns it to the free list, and records
    /// its [`Removal`] for `reason`.
    pub(crate) fn remove_slot(&mut self, i: u32, reason: RemovalReason) {
        let Some(s) = self.slots.get(i as usize).copied() else {
            return;
        };
        if s.flags & F_LIVE == 0 {
            return;
        }
        self.departed += 1;
        // The index lines to edit are random memory: ask for them first, do the bookkeeping
        // that touches lines already here, edit the index last. A list head's hashes were
        // computed, and its lines asked for, when its predecessor left.
        let lines = if self.next_out.slot == i {
            core::mem::replace(&mut self.next_out, NextOut::NONE)
        } else {
            self.ask_index_lines(i, &s)
        };
        let h = lines.hash;
        let reply = if s.flags & F_NAT != 0 {
            self.nat_of(i).map(|r| (r, lines.reply))
        } else {
            None
        };
        if s.flags & F_PERSIST != 0 {
            let key = slot_key(&s, &self.v6);
            let tk = TemplateKey::client(key.src(), s.persist, Service::of_flow(&key));
            let now = Instant::from_millis(self.clock);
            self.persist.detach(&tk, now);
        }
        self.record_session(&s);
        self.record_removal(&s, reply.map(|(r, _)| r), reason);
        self.release_counts(&s);
        if s.flags & F_POOL_HALF != 0 {
            self.pool_unlink(i, &s);
        }
        if s.flags & F_V6 != 0 {
            self.v6_free.push(s.a);
        }
        self.lists.unlink(&mut self.slots, s.class, i);
        if s.prev() == NIL {
            // A list head left (expiry, eviction): its successor is the next to go. Its lines
            // were asked for when this one became head; now fetch the one after it, and hash
            // the successor's key and ask for its index lines.
            self.prepare_next_out(s.next());
        }
        self.index.remove(h, i);
        if let Some((r, rh)) = reply {
            self.reply_index.remove(rh, i);
            if s.flags & F_POOL != 0 {
                if let Some(pool) = self.snat.as_mut() {
                    pool.release(BackendId(s.backend()), r.dst(), r.dst_port());
                }
            }
        }
        let free = self.free;
        if let Some(m) = self.slots.get_mut(i as usize) {
            *m = Slot::free(free);
        }
        self.free = i;
        self.len = self.len.saturating_sub(1);
    }

    /// For list head `n` (whose slot lines were prefetched when it reached second place):
    /// prefetches its successor's slot, and computes `n`'s hashes and asks for its index lines,
    /// so that removing `n` later waits for nothing.
    fn prepare_next_out(&mut self, n: u32) {
        let Some(ns) = self.slots.get(n as usize).copied() else {
            return;
        };
        self.prefetch_slot(ns.next());
        self.next_out = self.ask_index_lines(n, &ns);
    }

    /// The hashes of live slot `i` (`s`): its key's and, with a NAT tuple, the reply tuple's;
    /// prefetches the index lines they lead to.
    fn ask_index_lines(&self, i: u32, s: &Slot) -> NextOut {
        let hash = self.hasher.hash_flow(&slot_key(s, &self.v6));
        self.index.prefetch(hash);
        let reply = match (s.flags & F_NAT != 0).then(|| self.nat_of(i)).flatten() {
            Some(r) => {
                let rh = self.hasher.hash_flow(&r);
                self.reply_index.prefetch(rh);
                rh
            }
            None => 0,
        };
        NextOut {
            slot: i,
            hash,
            reply,
        }
    }

    // ---- timers ----

    /// Removes timed-out entries, at most `budget` of them and at most as many as the removal
    /// ring has room for (so none of their records is lost: drain with
    /// [`ConnTable::poll_removal`] and call again to continue). Bounded work: each removal is
    /// O(1), plus a look at one list head per state class and at most [`SETTLE_PER_EXPIRE`]
    /// O(1) moves per class (below). Returns how many were removed.
    ///
    /// A hit leaves its entry where it is in its class list and marks it seen (lazy
    /// re-queueing); a list head found seen and not due is moved to the tail here, at most
    /// [`SETTLE_PER_EXPIRE`] per class and call, and the head after it looked at. So an entry
    /// not seen since it was queued is removed by the first call after its deadline, unless
    /// more than that many seen entries queued before it reach the head in that call (then in
    /// a later call); an entry seen, then idle, and moved on before its deadline may go up to
    /// the time it was moved minus its last-seen time late (module `evict`), which
    /// [`ConnTable::sweep`] bounds by its period. Never before its deadline.
    pub fn expire(&mut self, now: Instant, budget: usize) -> usize {
        self.advance(now);
        let budget = budget.min(self.removals.room());
        let mut n = 0;
        for c in 0..CLASSES {
            let mut settled = 0;
            while n < budget {
                let h = self.lists.head[c];
                if h == NIL {
                    break;
                }
                if self.slot_expired(h) {
                    self.counters.expired += 1;
                    self.remove_timed_out(h);
                    n += 1;
                } else if settled < SETTLE_PER_EXPIRE && self.settle_head(c) {
                    settled += 1;
                } else {
                    break;
                }
            }
        }
        n
    }

    /// Looks at up to `slots` slots from where the last call stopped (in slot order, wrapping
    /// around) and removes each entry there that has timed out, at most `budget` of them and
    /// at most as many as the removal ring has room for; the next call continues at the first
    /// slot not looked at. Returns how many were removed.
    ///
    /// [`ConnTable::expire`] removes entries in their class lists' order, and an entry seen
    /// again and then idle can wait there behind entries queued after its last packet, up to
    /// one timeout past its deadline (module `evict`): its backend's connection count, the
    /// table's length and its removal record lag by as much. The sweep bounds that lag by its
    /// period: a table of capacity *C* swept *s* slots per call, *r* calls a second, looks at
    /// every slot every *C* / (*s* · *r*) seconds (1 Mi slots, 1 024 per call every 10 ms:
    /// 10 s). It reads the slots in address order, which the hardware prefetcher follows.
    /// Removals are recorded and counted as [`ConnTable::expire`]'s.
    pub fn sweep(&mut self, now: Instant, slots: usize, budget: usize) -> usize {
        self.advance(now);
        let cap = self.slots.len();
        if cap == 0 {
            return 0;
        }
        let budget = budget.min(self.removals.room());
        let mut i = self.sweep_cursor as usize % cap;
        let mut n = 0;
        for _ in 0..slots.min(cap) {
            if n >= budget {
                break;
            }
            let due = self.slots.get(i).is_some_and(|s| s.flags & F_LIVE != 0)
                && self.slot_expired(i as u32);
            if due {
                self.counters.expired += 1;
                self.counters.swept += 1;
                self.remove_timed_out(i as u32);
                n += 1;
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
        self.sweep_cursor = i as u32;
        n
    }

    /// The slot [`ConnTable::sweep`] looks at next (for the reference model).
    #[cfg(any(test, feature = "model"))]
    pub fn sweep_cursor(&self) -> u32 {
        self.sweep_cursor
    }

    /// The slot holding `key`'s entry, live or timed out (for the reference model, which
    /// predicts [`ConnTable::sweep`] from it).
    #[cfg(any(test, feature = "model"))]
    pub fn slot_of(&self, key: &FlowKey) -> Option<u32> {
        self.find(self.hasher.hash_flow(key), &Probe::of(key))
    }

    /// If the head of class list `c` was seen since it was queued, moves it to the tail
    /// (its place then agrees with its last-seen time) and returns true.
    pub(crate) fn settle_head(&mut self, c: usize) -> bool {
        let h = self.lists.head.get(c).copied().unwrap_or(NIL);
        let Some(s) = self.slots.get_mut(h as usize) else {
            return false;
        };
        if s.flags & F_SEEN == 0 {
            return false;
        }
        s.flags &= !F_SEEN;
        let class = s.class;
        self.lists.requeue(&mut self.slots, class, class, h);
        true
    }

    /// When the next entry times out (`None` when empty). May be in the past if
    /// [`ConnTable::expire`] is behind; a list head seen again since it was queued (see
    /// [`ConnTable::expire`]) makes it the table's clock: the entries behind that head are
    /// known only once `expire` has moved it.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lists
            .head
            .iter()
            .filter_map(|&h| self.slots.get(h as usize))
            .map(|s| {
                if s.flags & F_SEEN != 0 {
                    Instant::from_millis(self.clock)
                } else {
                    self.deadline_of(s)
                }
            })
            .min()
    }

    /// Snapshots up to `max` entries live at `now` from slot `cursor` on, appending them to
    /// `out`, and returns the cursor to continue from (`None` when done). Bounded work: at most
    /// `max` entries and `4 × max` slots are visited per call. Used for bulk sync.
    pub fn export_chunk(
        &self,
        cursor: u32,
        max: usize,
        now: Instant,
        out: &mut Vec<EntryInfo>,
    ) -> Option<u32> {
        let clock = self.clock_at(now);
        let mut i = cursor as usize;
        let mut visited = 0;
        let mut taken = 0;
        while i < self.slots.len() && taken < max && visited < max.saturating_mul(4).max(1) {
            if let Some(s) = self.slots.get(i) {
                if s.flags & F_LIVE != 0 && !self.slot_expired_at(i as u32, clock) {
                    out.push(self.info(i as u32));
                    taken += 1;
                }
            }
            i += 1;
            visited += 1;
        }
        (i < self.slots.len()).then_some(i as u32)
    }

    /// Every entry live at `now` (allocates a vector: for tests and inspection, not the data
    /// path).
    pub fn entries(&self, now: Instant) -> Vec<EntryInfo> {
        let mut v = Vec::with_capacity(self.len);
        let mut c = Some(0);
        while let Some(cur) = c {
            c = self.export_chunk(cur, 4096, now, &mut v);
        }
        v
    }
}

#[cfg(test)]
mod pressure_tests;
#[cfg(test)]
mod removal_tests;
#[cfg(test)]
mod tests;
