//! The fast path: a queue thread forwarding the packets of established flows without the data
//! path's lock ([`Classifier::enable_fast_path`], [`Classifier::forward_cached`]).
//!
//! With several queues sharing one [`Dataplane`] behind a lock, the lock's serial share bounds
//! what more queues give (and on a busy machine a holder that is preempted makes every other
//! queue wait). Most packets need little of the data path: a packet of an established TCP
//! connection or of a confirmed UDP flow, without SYN, FIN or RST, is rewritten (NAT, DNAT),
//! encapsulated (tunnel) or re-addressed (DR) exactly as the flow's previous packet was, and
//! changes nothing in the flow table but its counters and its last-seen time. The fast path
//! keeps, per queue thread, a small direct-mapped cache of what the data path did with such
//! flows (a `Plan`: the addresses and ports to write, the encapsulation or the MAC addresses,
//! made by the locked path when it forwards such a packet), forwards their packets by it, and
//! hands their effect on the table and the counters back the next time the thread takes the
//! lock.
//!
//! **Order.** A burst's packets up to the first one that needs the lock are forwarded without
//! it, and what they did is handed back first thing under the lock
//! ([`Dataplane::process_batch_classified`]), so they reach the table before anything the
//! lock does for that burst: a burst of established flows only takes no lock at all. When
//! both flow tables can take [`FAST_PATH_ROOM`] new flows before one would evict a flow past
//! its handshake (free places plus half-open entries, [`lb_conntrack::ConnTable::spare`],
//! published under the lock; [`crate::DataplaneOptions::fast_path_room`]), a later packet
//! with a usable plan goes without the lock too, unless a packet of its flow (either
//! direction) needed the lock earlier in the burst: handing its effect back before those
//! earlier packets changes nothing they do, since none of them can evict its flow (each
//! lowers the spare by at most one; an insertion evicts a half-open entry while there is one,
//! and may remove a timed-out entry, never a flow with a usable plan), and what they do to
//! their own flows does not touch it. (Beside new connections arriving about 2 000 a second,
//! a stream's datagrams went by plan 42 % of the time in burst order only, 99 % with this.)
//! Counting the half-open entries keeps this under a SYN flood that fills a table: each
//! spoofed SYN evicts a half-open entry and adds one, so the spare stays where it was, where
//! free places alone would have been none and established flows back to burst order
//! exactly when the lock is busiest. Otherwise a packet after
//! that point goes through the lock in its turn; if it had a usable plan in the
//! fast pass it is forwarded by it there (no lookup of its service, no scheduling), provided
//! the plan is still usable then (below), else the locked path takes it as it came. So
//! every packet sees the table as the locked path alone would have shown it, in burst order:
//! a flow evicted by a new flow earlier in the same burst is not forwarded by its old plan.
//! A property test (`fast_tests.rs`) runs random traffic, clock steps, evictions and health
//! changes through both and compares every verdict, byte and counter.
//!
//! **When a plan is usable.** The data path keeps *epochs* (`Epochs`, shared with its
//! classifiers; written only under the lock): one per bucket of flows (16 Ki buckets by the
//! hash of the flow's client → service 5-tuple, which a plan of either direction knows), and
//! a generation for the whole data path. A flow's epoch moves, before the lock is released,
//! when the flow leaves either table (timeout, eviction, removal, a SYN reusing a finished
//! entry: the data path reads each one's removal record), when it leaves a steady state (a
//! FIN, a RST) and when, timed, it starts waiting for its response. The generation moves
//! when the tables change (reload, health), sync is applied, the splices are reconfigured,
//! retired backends are released, or a flow left without a record the data path read (a full
//! removal queue: [`lb_conntrack::ConnTable::departures`] moved further than the records
//! said). A plan is used only while its flow's epoch and the generation are those it was made
//! under, for at most [`FAST_PATH_TTL`] or its flow's timeout, whichever is shorter, and not
//! for a packet of a flow that needed the lock earlier in the same burst. So connections
//! closing or timing out beside established flows retire only their own plans (and, 1 in
//! 16 Ki, those of a flow sharing their bucket); the first design, one generation for all,
//! retired every plan at each departure: with one connection closing per burst beside 256
//! established flows it forwarded 0.003 % of their packets without the lock.
//!
//! **What is deferred.** The table's update (packets, bytes, last-seen: one aggregated
//! [`lb_conntrack::ConnTable::track_aggregate`] per flow) and the data path's counters (packets,
//! bytes, forwarded, per-backend, offload) wait in the cache entry until the thread next holds
//! the lock, which the embedder makes happen at least every few milliseconds (tun-balancer:
//! every 10 ms, with its housekeeping). Between two of those the flow's last-seen time in the
//! table lags by that much. With several threads, another thread may remove a flow (evict it,
//! apply a peer's sync delete) while this one still holds packets of it to hand back: they
//! stay in the data path's counters but not in the flow's ([`crate::Stats::fast_path_orphaned`]).
//!
//! **Which flows get plans.** The locked path leaves a plan for every steady packet it
//! forwards while the thread's plans forward at least as many packets as are made (counted
//! over a window); when they do not (more busy flows than places, each plan pushed out before
//! its flow comes back), for one such packet in 16: making and placing a plan per packet
//! cost more under the lock than the few packets it then forwarded saved. Sampled, the flows
//! with the most packets still get places, and once the plans pay, every flow gets one again.
//!
//! **What is never cached.** New flows, anything with SYN, FIN or RST, fragments, ICMP errors,
//! the SIP per-message path, spliced services and the replies of a data path that splices: those
//! always take the lock. In mode `tunnel` a plan is the encapsulation (outer addresses, kind,
//! path MTU, the flow's label and entropy port): a packet that would not fit the path MTU once
//! encapsulated (the lock answers it "too big") and a GSO super-packet (the lock asks for it
//! to be cut) take the lock; a partial checksum is completed without it, as the lock would.
//! In mode `dr` a plan is the frame's two MAC addresses. Of a flow timed for the response-time
//! estimates, the packets that move its timing on (the client's data while its request is
//! awaited, the backend's while its response is) take the lock too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use lb_conntrack::{FlowState, Packet, TcpFlags, TcpState};
use lb_core::{BackendId, Duration, FlowKey, Instant, IpProto, MacAddr};
use lb_packet::dr;
use lb_packet::offload::{self, L4Csum, VnetHdr};
use lb_packet::tunnel::Encap;

use crate::{nat_rewrite, tcp_flags, Classifier, Dataplane, DropReason, TunnelTo, Verdict};

/// The longest a cached plan is used before its flow goes through the locked path again.
pub const FAST_PATH_TTL: Duration = Duration::from_secs(1);

/// Hand-backs between the stages of [`Dataplane::fast_flush`]'s pipeline.
const FLUSH_PIPELINE: usize = 4;

/// Buckets of [`Epochs::flows`] (a power of two; 64 KiB of counters).
const FLOW_BUCKETS: usize = 1 << 14;

/// What makes cached plans unusable, shared by a data path and its classifiers, written only
/// by the holder of the data path (stores, no read-modify-write across threads): a
/// generation for everything (the tables, the splices, sync, a lost departure record) and
/// one per bucket of flows, which moves when a flow of the bucket leaves a table or changes
/// its steady state. A plan is usable while both of its are as they were when it was made.
#[derive(Debug)]
pub(crate) struct Epochs {
    global: AtomicU64,
    /// Both flow tables can take at least `fast_path_room` new flows before one evicts a flow
    /// past its handshake ([`lb_conntrack::ConnTable::spare`]: free places and half-open
    /// entries), so the packets of a burst that take the lock cannot evict an established
    /// flow: module notes, "Order".
    room: AtomicBool,
    flows: Box<[AtomicU32]>,
}

/// The default [`crate::DataplaneOptions::fast_path_room`]: new flows each flow table must be
/// able to take before one evicts a flow past its handshake (free places and half-open
/// entries, [`lb_conntrack::ConnTable::spare`]) for a burst's packets with a usable plan to
/// go without the lock wherever they stand in the burst (else only those before its first
/// packet that needs the lock). More than any burst inserts, with a margin for the other
/// threads' bursts.
pub const FAST_PATH_ROOM: usize = 1024;

impl Epochs {
    pub(crate) fn new() -> Epochs {
        Epochs {
            global: AtomicU64::new(1),
            room: AtomicBool::new(false),
            flows: (0..FLOW_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The bucket of the flow whose client → service 5-tuple has flow-table hash `h` (high
    /// bits: the plan caches' sets take the low ones).
    #[inline(always)]
    fn bucket(&self, h: u64) -> Option<&AtomicU32> {
        self.flows.get((h >> 32) as usize & (FLOW_BUCKETS - 1))
    }

    /// The generation (0 never: an empty cache entry has 0).
    #[inline(always)]
    pub(crate) fn global(&self) -> u64 {
        self.global.load(Ordering::Acquire)
    }

    /// The epoch of the flow of hash `h` (client → service).
    #[inline(always)]
    fn flow(&self, h: u64) -> u32 {
        self.bucket(h).map_or(0, |b| b.load(Ordering::Acquire))
    }

    /// Whether both flow tables could take `fast_path_room` new flows without evicting one
    /// past its handshake when the lock was last released.
    #[inline(always)]
    pub(crate) fn room(&self) -> bool {
        self.room.load(Ordering::Acquire)
    }

    fn set_room(&self, room: bool) {
        // (Written only when it changes: the line is read by every thread's fast pass.)
        if self.room.load(Ordering::Relaxed) != room {
            self.room.store(room, Ordering::Release);
        }
    }

    fn bump_global(&self) {
        let g = self.global.load(Ordering::Relaxed);
        self.global
            .store(g.wrapping_add(1).max(1), Ordering::Release);
    }

    fn bump_flow(&self, h: u64) {
        if let Some(b) = self.bucket(h) {
            b.store(b.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
        }
    }
}

/// What the data path did with a packet of an established flow: enough to do it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Client → service (else a reply, looked up by its reply tuple).
    pub(crate) forward: bool,
    /// The packet's own 5-tuple (the reply tuple for a reply).
    pub(crate) key: FlowKey,
    /// Its flow-table hash, and that of the other direction's 5-tuple.
    pub(crate) hash: u64,
    pub(crate) other_hash: u64,
    /// The flow's backend.
    pub(crate) backend: BackendId,
    /// What to do to the packet.
    pub(crate) action: Action,
    /// Not used from this time on.
    pub(crate) deadline: Instant,
    /// Packets with payload go through the lock: the flow is timed for the response-time
    /// estimates, and such a packet moves its timing on (a request from the client, the
    /// first response from the backend).
    pub(crate) slow_data: bool,
}

impl Plan {
    /// The flow-table hash of the flow's client → service 5-tuple (its epoch's bucket).
    #[inline(always)]
    fn flow_hash(&self) -> u64 {
        if self.forward {
            self.hash
        } else {
            self.other_hash
        }
    }
}

/// What a plan does to its flow's packets: the rewrite of each forwarding mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Modes `nat` and `dnat`: the source and destination to write (`nat_rewrite`'s
    /// arguments).
    Nat(Option<SocketAddr>, Option<SocketAddr>),
    /// Mode `tunnel`: encapsulate, when the packet fits the path MTU encapsulated (a packet
    /// too big for it takes the lock, which answers it); a partial checksum is completed
    /// first, and the offload header cleared.
    Tunnel(TunnelTo),
    /// Mode `dr`: the frame's destination and source MAC addresses.
    Dr {
        /// The backend's.
        dst: MacAddr,
        /// The balancer's.
        src: MacAddr,
    },
}

/// Whether packets of a flow in state `s` that carry no SYN, FIN or RST leave it unchanged
/// (so that forwarding them changes nothing but counters and the last-seen time).
#[inline]
pub(crate) fn steady(s: FlowState) -> bool {
    matches!(s, FlowState::Tcp(TcpState::Established) | FlowState::Udp)
}

/// The deadline of a plan made at `now` for a flow in `state`.
#[inline]
pub(crate) fn plan_deadline(
    dp: &Dataplane,
    key: &FlowKey,
    state: FlowState,
    now: Instant,
) -> Instant {
    let ct = if key.is_ipv4() { &dp.ct4 } else { &dp.ct6 };
    let t = ct.timeouts().get(state);
    now + if t < FAST_PATH_TTL { t } else { FAST_PATH_TTL }
}

/// The effect of the packets forwarded from one entry since the thread last held the lock.
#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    /// Packets (rewritten or not).
    packets: u32,
    /// Of those, dropped because the rewrite failed.
    failed: u32,
    /// Their lengths as given.
    rx_bytes: u64,
    /// Wire segments and IP bytes (the conntrack and per-backend counters).
    segs: u32,
    wire: u32,
    /// Their TCP flags, or'ed.
    flags: u8,
    /// GSO super-packets among them, and their segments.
    gso_packets: u32,
    gso_segments: u32,
    /// Partial checksums completed (tunnel mode).
    csum_completed: u32,
    /// The time of the last one.
    last: Instant,
}

impl Pending {
    /// Adds `o`'s packets (the later ones: its time is kept).
    #[inline]
    fn add(&mut self, o: &Pending) {
        self.packets += o.packets;
        self.failed += o.failed;
        self.rx_bytes += o.rx_bytes;
        self.segs += o.segs;
        self.wire += o.wire;
        self.flags |= o.flags;
        self.gso_packets += o.gso_packets;
        self.gso_segments += o.gso_segments;
        self.csum_completed += o.csum_completed;
        self.last = o.last;
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The generation the plan was made in (0: empty; generations start at 1), and its
    /// flow's epoch then.
    gen: u64,
    epoch: u32,
    plan: Plan,
    pending: Pending,
    dirty: bool,
}

/// Plans per set of a [`FastCache`].
const WAYS: usize = 4;

/// One thread's cache of plans (sets of [`WAYS`] by flow hash) and what its packets left to
/// hand back. A clone starts empty (a copy of the pending counts would be handed back twice).
#[derive(Debug)]
pub(crate) struct FastCache {
    entries: Box<[Entry]>,
    /// Sets − 1 (a power of two).
    mask: usize,
    /// Per set: the way the next fill takes when none is free.
    victim: Box<[u8]>,
    /// Entries with something pending (an entry may appear twice; `dirty` says whether it
    /// still has something).
    dirty: Vec<usize>,
    /// The data path's epochs.
    gen: Arc<Epochs>,
    /// Per packet of the burst: forwarded from the cache (the locked pass skips it).
    pub(crate) done: Vec<bool>,
    /// Per packet of the burst after its first one that needs the lock: the place of the
    /// plan it may be forwarded by, in order, under the lock, if the generation is still `g0`
    /// and its flow's epoch the plan's then (and the place still holds that plan);
    /// `u32::MAX`: none.
    pub(crate) cand: Vec<u32>,
    /// The generation the burst's fast pass saw.
    pub(crate) g0: u64,
    /// Admission (`FastCache::admit`): packets forwarded by plan and plans made, both halved
    /// whenever their sum reaches [`ADMIT_WINDOW`]; and a tick for sampling.
    hits: u32,
    fills: u32,
    tick: u32,
}

/// While the plans forward fewer packets than are made (more flows than places: each plan
/// is pushed out before its flow's next packet), only one locked packet in `ADMIT_SAMPLE`
/// leaves a plan: making and placing one for every packet cost more under the lock than the
/// few it then forwarded saved (32 Ki flows over 1 024 places: 1.6× the serial time of no
/// fast path at all). Sampled, the flows with the most packets still get places.
const ADMIT_SAMPLE: u32 = 16;

/// The window of [`FastCache::admit`]'s counts.
const ADMIT_WINDOW: u32 = 4096;

/// Plans [`FastCache::admit`] lets be made ahead of the packets they forward (a new cache's
/// first flows, a quiet thread's).
const ADMIT_SLACK: u32 = 64;

const EMPTY: Entry = Entry {
    gen: 0,
    epoch: 0,
    plan: Plan {
        forward: false,
        key: FlowKey::v4_bits(0, 0, 0, 0, 0),
        hash: 0,
        other_hash: 0,
        backend: BackendId(0),
        action: Action::Nat(None, None),
        deadline: Instant::ZERO,
        slow_data: true,
    },
    pending: Pending {
        packets: 0,
        failed: 0,
        rx_bytes: 0,
        segs: 0,
        wire: 0,
        flags: 0,
        gso_packets: 0,
        gso_segments: 0,
        csum_completed: 0,
        last: Instant::ZERO,
    },
    dirty: false,
};

impl Clone for FastCache {
    fn clone(&self) -> FastCache {
        FastCache::new(self.entries.len(), self.gen.clone(), self.done.len())
    }
}

impl FastCache {
    fn new(entries: usize, gen: Arc<Epochs>, batch: usize) -> FastCache {
        let n = entries.clamp(WAYS, 1 << 20).next_power_of_two();
        FastCache {
            entries: vec![EMPTY; n].into_boxed_slice(),
            mask: n / WAYS - 1,
            victim: vec![0; n / WAYS].into_boxed_slice(),
            dirty: Vec::with_capacity(n),
            gen,
            done: vec![false; batch],
            cand: vec![u32::MAX; batch],
            g0: 0,
            hits: 0,
            fills: 0,
            tick: 0,
        }
    }

    /// Whether the locked path should leave a plan for the packet it is about to forward:
    /// always while plans forward at least as many packets as are made (less
    /// [`ADMIT_SLACK`]), else one packet in [`ADMIT_SAMPLE`].
    #[inline(always)]
    pub(crate) fn admit(&mut self) -> bool {
        self.tick = self.tick.wrapping_add(1);
        self.hits.saturating_add(ADMIT_SLACK) >= self.fills || self.tick % ADMIT_SAMPLE == 0
    }

    /// Counts `n` packets forwarded by plan (`fill`: a plan made), over [`ADMIT_WINDOW`].
    #[inline(always)]
    fn count(&mut self, n: u32, fill: bool) {
        self.hits = self.hits.saturating_add(n);
        self.fills += u32::from(fill);
        if self.hits.saturating_add(self.fills) >= ADMIT_WINDOW {
            self.hits /= 2;
            self.fills /= 2;
        }
    }

    /// A packet forwarded by plan in its turn under the lock.
    #[inline(always)]
    pub(crate) fn hit(&mut self) {
        self.count(1, false);
    }

    /// The place of the plan for `key` (of flow-table hash `hash`), if there is one.
    #[inline(always)]
    fn find(&self, hash: u64, key: &FlowKey) -> Option<usize> {
        let base = (hash as usize & self.mask) * WAYS;
        (base..base + WAYS).find(|&i| {
            self.entries
                .get(i)
                .is_some_and(|e| e.gen != 0 && e.plan.hash == hash && e.plan.key == *key)
        })
    }

    /// Where a plan for `plan.key` goes: its old place, else a free or outdated way of its
    /// set (`gen`: the generation in force; or its flow's epoch moved), else the set's next
    /// victim in turn.
    fn place_for(&mut self, plan: &Plan, gen: u64) -> usize {
        if let Some(i) = self.find(plan.hash, &plan.key) {
            return i;
        }
        let set = plan.hash as usize & self.mask;
        let base = set * WAYS;
        let free = (base..base + WAYS).find(|&i| {
            self.entries
                .get(i)
                .is_some_and(|e| !e.dirty && (e.gen != gen || !self.current(e)))
        });
        free.unwrap_or_else(|| {
            let v = self.victim.get_mut(set).map_or(0, |v| {
                let w = *v;
                *v = (w + 1) % WAYS as u8;
                w
            });
            base + usize::from(v)
        })
    }

    /// Whether `e`'s flow is in the epoch its plan was made in.
    #[inline(always)]
    fn current(&self, e: &Entry) -> bool {
        self.gen.flow(e.plan.flow_hash()) == e.epoch
    }

    /// The plan packet `c` of the burst (classified as `x`) was marked for by the fast pass,
    /// if its place still holds it, with its flow's epoch when it was made.
    #[inline]
    pub(crate) fn candidate(&self, c: usize, x: &crate::Pre) -> Option<(&Plan, u32)> {
        let slot = *self.cand.get(c)?;
        if slot == u32::MAX {
            return None;
        }
        let e = self.entries.get(slot as usize)?;
        (e.gen == self.g0 && e.plan.hash == x.hash.hash() && e.plan.key == x.p.key)
            .then_some((&e.plan, e.epoch))
    }

    /// Forgets every plan and what is pending (for another data path's classifier).
    pub(crate) fn clear(&mut self) {
        self.entries.fill(EMPTY);
        self.dirty.clear();
    }
}

impl Classifier {
    /// Gives this classifier a fast path of `entries` plans (rounded up to a power of two;
    /// about 200 bytes each; allocates: control path): from now on
    /// [`Dataplane::process_batch_classified`] remembers how it forwarded the packets of
    /// established flows, and [`Classifier::forward_cached`] forwards more of them without the
    /// data path. See the module's notes (`fast.rs`) for what is cached and when a plan is
    /// used.
    pub fn enable_fast_path(&mut self, entries: usize) {
        let batch = self.capacity();
        self.fast = Some(Box::new(FastCache::new(entries, self.gen.clone(), batch)));
    }

    /// Whether [`Classifier::enable_fast_path`] was called.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// After [`Classifier::classify`], and without the data path's lock: forwards the packets
    /// of the burst whose flow has a valid cached plan (rewriting them in place, `out[i]`
    /// set as [`Dataplane::process_batch_classified`] would set it) and returns how many
    /// packets are left for that call, which skips the ones done here (call it anyway when
    /// none are left, at least every few milliseconds: it hands the table what was forwarded
    /// here). `now` is the time, as the data path would be given it; `hdrs` the packets'
    /// offload headers, if the device has them (a packet encapsulated here, in tunnel mode,
    /// has its header cleared, as [`Dataplane::process_batch_classified`] clears it). Without
    /// a fast path, does nothing.
    pub fn forward_cached<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        lens: &[usize],
        mut hdrs: Option<&mut [VnetHdr]>,
        now: Instant,
        out: &mut [Verdict],
    ) -> usize {
        let n = self.n.min(bufs.len()).min(lens.len()).min(out.len());
        let Some(fast) = self.fast.as_deref_mut() else {
            return n;
        };
        let n = n.min(fast.done.len()).min(fast.cand.len());
        let g = fast.gen.global();
        let room = fast.gen.room();
        fast.g0 = g;
        let start = self.start;
        let mut left = n;
        // The burst's packets up to the first one that needs the lock are forwarded here:
        // they precede everything the lock will do for this burst, and what they did is
        // handed back first. So are later ones with a usable plan while the tables have room
        // (module notes, "Order"). Every other later packet goes through the lock in its turn;
        // those with a usable plan are marked, to be forwarded by it there, unless something
        // changed by then. The flows (by either direction's hash, `SLOW_BUCKETS` buckets) with a packet
        // that needs the lock are noted, and their later packets need it too; after a packet
        // that could not be classified, every later one does.
        let mut slow = Slow::default();
        let mut prefix = true;
        for j in 0..n {
            if let (Some(d), Some(c)) = (fast.done.get_mut(j), fast.cand.get_mut(j)) {
                *d = false;
                *c = u32::MAX;
            }
            if slow.all {
                continue;
            }
            let Some(Some(x)) = self.pres.get(j) else {
                slow.all = true;
                prefix = false;
                continue;
            };
            let (Some(&len), Some(&clen), Some(b), Some(o)) = (
                lens.get(j),
                self.lens.get(j),
                bufs.get_mut(j),
                out.get_mut(j),
            ) else {
                slow.all = true;
                prefix = false;
                continue;
            };
            let mut none = VnetHdr::NONE;
            let hdr = match hdrs.as_deref_mut().and_then(|h| h.get_mut(j)) {
                Some(h) => h,
                None => &mut none,
            };
            let buf = b.as_mut();
            let checked = start
                .checked_add(len)
                .and_then(|end| buf.get(start..end))
                .filter(|_| len == clen)
                .and_then(|pkt| check(fast, &slow, g, now, x, pkt, hdr, start));
            match checked {
                None => {
                    slow.add(x.hash.hash());
                    prefix = false;
                }
                Some(c) if prefix || room => {
                    *o = fast.forward(&c, &x.p, buf, start, len, hdr, now);
                    if let Some(d) = fast.done.get_mut(j) {
                        *d = true;
                    }
                    left -= 1;
                }
                Some(c) => {
                    if let Some(cd) = fast.cand.get_mut(j) {
                        *cd = u32::try_from(c.slot).unwrap_or(u32::MAX);
                    }
                }
            }
        }
        fast.count(u32::try_from(n - left).unwrap_or(u32::MAX), false);
        left
    }
}

/// Flows with a packet that went through the lock, earlier in a burst: a bit per bucket of
/// [`SLOW_BUCKETS`] by flow hash. A packet whose flow shares a bucket with one of those goes
/// through the lock too, so the buckets must be many next to the flows that take the lock in
/// one burst: in a SYN flood's bursts, a flow per spoofed SYN.
#[derive(Default)]
struct Slow {
    bits: [u64; SLOW_BUCKETS / 64],
    /// Everything from here on goes through the lock.
    all: bool,
}

/// Buckets of [`Slow`] (a power of two).
const SLOW_BUCKETS: usize = 1024;

impl Slow {
    #[inline(always)]
    fn add(&mut self, h: u64) {
        let b = (h as usize) & (SLOW_BUCKETS - 1);
        if let Some(w) = self.bits.get_mut(b / 64) {
            *w |= 1 << (b % 64);
        }
    }

    #[inline(always)]
    fn has(&self, h: u64) -> bool {
        let b = (h as usize) & (SLOW_BUCKETS - 1);
        self.bits
            .get(b / 64)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }
}

/// What [`check`] found for a packet: its plan's place, and its offload figures.
struct Checked {
    slot: usize,
    csum: L4Csum,
    segs: u32,
    /// Its IP bytes on the wire (all segments').
    wire: u32,
    flags: TcpFlags,
    /// A GSO super-packet.
    gso: bool,
}

/// Whether `pkt` (classified as `x`; at `start` in its buffer) has a plan in `fast` usable
/// now, and its figures.
#[inline]
#[allow(clippy::too_many_arguments)]
fn check(
    fast: &FastCache,
    slow: &Slow,
    g: u64,
    now: Instant,
    x: &crate::Pre,
    pkt: &[u8],
    hdr: &VnetHdr,
    start: usize,
) -> Option<Checked> {
    let p = &x.p;
    if p.icmp.is_some() || !matches!(p.proto, IpProto::Tcp | IpProto::Udp) {
        return None;
    }
    let flags = tcp_flags(pkt, p);
    if flags.0 & (TcpFlags::SYN.0 | TcpFlags::FIN.0 | TcpFlags::RST.0) != 0 {
        return None;
    }
    let slot = fast.find(x.hash.hash(), &p.key)?;
    let e = fast.entries.get(slot)?;
    if e.gen != g
        || !fast.current(e)
        || e.plan.forward != x.si.is_some()
        || now >= e.plan.deadline
        || (e.plan.slow_data && p.payload < p.end)
        || slow.has(e.plan.hash)
        || slow.has(e.plan.other_hash)
    {
        return None;
    }
    if let Action::Tunnel(to) = &e.plan.action {
        if !tunnel_fits(to, hdr, pkt.len(), start) {
            return None;
        }
    }
    let (csum, segs) = offload_of(p, hdr)?;
    let q = &e.pending;
    let wire = wire_bytes(p, segs)?;
    // Room in the entry's counts: else this one goes through the lock, which hands the rest
    // back first.
    q.wire.checked_add(wire)?;
    q.segs.checked_add(segs)?;
    q.packets.checked_add(1)?;
    Some(Checked {
        slot,
        csum,
        segs,
        wire,
        flags,
        gso: hdr.is_gso(),
    })
}

/// How a packet's L4 checksum stands and how many wire segments it stands for, as
/// `Dataplane::offload` finds them; `None` where that completes the checksum or drops.
#[inline]
fn offload_of(p: &lb_packet::Parsed, hdr: &VnetHdr) -> Option<(L4Csum, u32)> {
    if !hdr.needs_csum && !hdr.is_gso() {
        return Some((L4Csum::Full, 1));
    }
    match offload::classify(p, hdr) {
        Ok(L4Csum::Elsewhere) | Err(_) => None,
        Ok(c) => Some((c, offload::segments(p, hdr))),
    }
}

/// A packet's IP bytes on the wire, all segments' (as `Dataplane::process_inner` counts).
#[inline]
fn wire_bytes(p: &lb_packet::Parsed, segs: u32) -> Option<u32> {
    let ip = p.end - p.l3;
    u32::try_from(ip + (segs as usize).saturating_sub(1) * (p.payload - p.l3)).ok()
}

/// Whether a packet of `len` bytes at `start` with offload header `hdr` can be encapsulated
/// by `to` without the lock: no super-packet (the lock has it cut), and it fits the path MTU
/// encapsulated (else the lock answers "too big") and the headroom.
#[inline]
fn tunnel_fits(to: &TunnelTo, hdr: &VnetHdr, len: usize, start: usize) -> bool {
    !hdr.is_gso() && to.fits(len) && start >= to.overhead()
}

/// The rewrite of the packet `buf[start..start + len]` by `plan`, and the effect it waits to
/// hand back.
#[inline]
#[allow(clippy::too_many_arguments)]
fn by_plan(
    plan: &Plan,
    c: &Checked,
    p: &lb_packet::Parsed,
    buf: &mut [u8],
    start: usize,
    len: usize,
    hdr: &mut VnetHdr,
    now: Instant,
) -> (Verdict, Pending) {
    let failed = Verdict::Drop(DropReason::RewriteFailed);
    let mut completed = 0;
    let end = start.saturating_add(len);
    // (By reference: the action is larger than what each arm reads.)
    let v = match (&plan.action, buf.get_mut(start..end)) {
        (_, None) => failed,
        (&Action::Nat(src, dst), Some(pkt)) => match nat_rewrite(pkt, p, src, dst, c.csum) {
            Ok(()) => Verdict::Forward { start, len },
            Err(_) => failed,
        },
        (&Action::Dr { dst, src }, Some(pkt)) => match dr::set_macs(pkt, dst, Some(src)) {
            Ok(_) => Verdict::Forward { start, len },
            Err(_) => failed,
        },
        (Action::Tunnel(to), Some(pkt)) => {
            // As the locked path: a partial checksum completed, the offload header cleared
            // (a new outer header), then the encapsulation (`check` made sure it fits). (The
            // completion cannot fail: `offload_of` found the checksum's place inside the
            // transport part.)
            let done = c.csum != L4Csum::Partial || {
                let udp = p.proto == IpProto::Udp && usize::from(hdr.csum_start) == p.l4;
                completed = 1;
                offload::complete_csum(pkt, hdr, p.end, udp).is_ok()
            };
            *hdr = VnetHdr::NONE;
            match to.encap(buf, start, end, p.family) {
                Ok((Encap::Done, start, len)) if done => Verdict::Forward { start, len },
                _ => failed,
            }
        }
    };
    let gso = c.gso;
    let one = Pending {
        packets: 1,
        failed: u32::from(matches!(v, Verdict::Drop(_))),
        rx_bytes: len as u64,
        segs: c.segs,
        wire: c.wire,
        flags: c.flags.0,
        gso_packets: u32::from(gso),
        gso_segments: if gso { c.segs } else { 0 },
        csum_completed: completed,
        last: now,
    };
    (v, one)
}

impl FastCache {
    /// Forwards a packet [`check`] passed, without the lock: rewritten by its plan, its
    /// effect added to the entry's pending.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        c: &Checked,
        p: &lb_packet::Parsed,
        buf: &mut [u8],
        start: usize,
        len: usize,
        hdr: &mut VnetHdr,
        now: Instant,
    ) -> Verdict {
        let Some(e) = self.entries.get_mut(c.slot) else {
            return Verdict::Drop(DropReason::RewriteFailed);
        };
        let (v, one) = by_plan(&e.plan, c, p, buf, start, len, hdr, now);
        e.pending.add(&one);
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(c.slot);
        }
        v
    }
}

impl Dataplane {
    /// Leaves the plan of the packet just forwarded (client → service; a caller for a reply
    /// sets `forward` false) for the burst to hand to its fast path: `key` of hash `hash`, the
    /// other direction's 5-tuple `other` (none in modes `tunnel` and `dr`, whose replies do
    /// not come back), what was done to the packet, and (deadline, `slow_data`). Out of line:
    /// the per-packet path only tests for it.
    #[inline(never)]
    pub(crate) fn keep_plan(
        &mut self,
        key: &FlowKey,
        hash: u64,
        other: Option<&FlowKey>,
        backend: BackendId,
        action: Action,
        (deadline, slow_data): (Instant, bool),
    ) {
        // (Without another direction, its hash is the flow's own.)
        let other_hash = other.map_or(hash, |o| self.table_hash(o));
        self.plan = Some(Plan {
            forward: true,
            key: *key,
            hash,
            other_hash,
            backend,
            action,
            deadline,
            slow_data,
        });
    }

    /// Moves the generation if flows left the tables without a removal record the data path
    /// read (a full removal queue; after each packet, and at the end of every call that can
    /// remove flows, once the records are drained): the flows concerned are unknown.
    #[inline]
    pub(crate) fn publish_gen(&mut self) {
        let d = self.ct4.departures().wrapping_add(self.ct6.departures());
        if d != self.departed_seen {
            self.departed_seen = d;
            self.invalidate_plans();
        }
        if self.plans_made {
            let room = self.fast_room;
            self.gen
                .set_room(self.ct4.spare() >= room && self.ct6.spare() >= room);
        }
    }

    /// A flow left a table, and the data path read its record: its plans become unusable
    /// (if plans were ever made).
    #[inline]
    pub(crate) fn departed(&mut self, key: &FlowKey) {
        self.departed_seen = self.departed_seen.wrapping_add(1);
        if self.plans_made {
            let h = self.table_hash(key);
            self.gen.bump_flow(h);
        }
    }

    /// The plans of the flow whose client → service 5-tuple has flow-table hash `h` become
    /// unusable (it changed from a steady state, or a timed flow of it started waiting for
    /// its response).
    #[inline]
    pub(crate) fn retire_flow(&mut self, h: u64) {
        if self.plans_made {
            self.gen.bump_flow(h);
        }
    }

    /// Moves the generation now: every cached plan becomes unusable (the tables, the
    /// splices, the retired backends or a peer's sync changed).
    #[inline]
    pub(crate) fn invalidate_plans(&mut self) {
        self.gen.bump_global();
    }

    /// Hands back everything `fast` forwarded since the last call (under the lock).
    pub(crate) fn fast_flush(&mut self, fast: &mut FastCache) {
        // Oldest last packet first: a flow table's clock does not go back, so an entry handed
        // back after a later one would have its flow's last-seen time dated by that one's.
        // (Unstable sort: no allocation; entries of the same time commute.)
        let entries = &fast.entries;
        fast.dirty.sort_unstable_by_key(|&slot| {
            entries.get(slot).map_or(Instant::ZERO, |e| e.pending.last)
        });
        let mut dirty = core::mem::take(&mut fast.dirty);
        // Software-pipelined, as `ConnTable::track_batch`: while entry k is handed back, the
        // slot of entry k + D and the index line of entry k + 2D are on their way (in a
        // large table each hand-back would otherwise wait, under the lock, for two random
        // lines in a row).
        const D: usize = FLUSH_PIPELINE;
        let n = dirty.len();
        for k in 0..n + 2 * D {
            let plan_at = |j: usize| {
                dirty
                    .get(j)
                    .and_then(|&slot| fast.entries.get(slot))
                    .filter(|e| e.dirty)
                    .map(|e| &e.plan)
            };
            if let Some(plan) = plan_at(k) {
                self.prefetch_plan(plan, false);
            }
            if let Some(plan) = k.checked_sub(D).and_then(plan_at) {
                self.prefetch_plan(plan, true);
            }
            let Some(&slot) = k.checked_sub(2 * D).and_then(|j| dirty.get(j)) else {
                continue;
            };
            if let Some(e) = fast.entries.get_mut(slot).filter(|e| e.dirty) {
                e.dirty = false;
                let (plan, pending) = (e.plan, core::mem::take(&mut e.pending));
                self.hand_back(&plan, &pending, true);
            }
        }
        dirty.clear();
        fast.dirty = dirty;
    }

    /// Brings a plan's flow-table lines into cache for its hand-back: its index line
    /// (`slot` false), then, that line read, the slot (and NAT tuple) it points at.
    #[inline(always)]
    fn prefetch_plan(&self, plan: &Plan, slot: bool) {
        let ct = if plan.key.is_ipv4() {
            &self.ct4
        } else {
            &self.ct6
        };
        match (plan.forward, slot) {
            (true, false) => ct.prefetch_bucket(plan.hash),
            (true, true) => {
                ct.candidate(plan.hash);
            }
            (false, false) => ct.prefetch_reply_bucket(plan.hash),
            (false, true) => {
                ct.reply_candidate(plan.hash);
            }
        }
    }

    /// Remembers `plan` in `fast` (under the lock), handing back what the entry it replaces
    /// had pending.
    pub(crate) fn fast_fill(&mut self, fast: &mut FastCache, plan: Plan) {
        self.plans_made = true;
        let gen = self.gen.global();
        let slot = fast.place_for(&plan, gen);
        let Some(e) = fast.entries.get_mut(slot) else {
            return;
        };
        if e.dirty {
            e.dirty = false;
            let (old, pending) = (e.plan, core::mem::take(&mut e.pending));
            self.hand_back(&old, &pending, true);
        }
        // (After the hand-back, which may have moved the plan's own flow on.)
        let epoch = self.gen.flow(plan.flow_hash());
        if let Some(e) = fast.entries.get_mut(slot) {
            *e = Entry {
                gen,
                epoch,
                plan,
                pending: Pending::default(),
                dirty: false,
            };
        }
        self.stats.fast_path_plans += 1;
        fast.count(0, true);
    }

    /// Packet `c` of a burst, marked by the fast pass (`plan`, made in its flow's `epoch`),
    /// in its turn under the lock: forwarded by the plan, its effect handed back at once, if
    /// the generation is still the one the fast pass saw, the flow's epoch still the plan's,
    /// and the plan still in time; else `None` (the locked path takes it: it is as it came).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fast_in_turn(
        &mut self,
        (plan, epoch): (&Plan, u32),
        g0: u64,
        x: &crate::Pre,
        buf: &mut [u8],
        start: usize,
        len: usize,
        hdr: &mut VnetHdr,
        now: Instant,
    ) -> Option<Verdict> {
        if self.gen.global() != g0
            || self.gen.flow(plan.flow_hash()) != epoch
            || now >= plan.deadline
        {
            return None;
        }
        let p = &x.p;
        let pkt = buf.get(start..start.checked_add(len)?)?;
        if let Action::Tunnel(to) = &plan.action {
            if !tunnel_fits(to, hdr, len, start) {
                return None;
            }
        }
        let flags = tcp_flags(pkt, p);
        let (csum, segs) = offload_of(p, hdr)?;
        let c = Checked {
            slot: 0,
            csum,
            segs,
            wire: wire_bytes(p, segs)?,
            flags,
            gso: hdr.is_gso(),
        };
        let (v, one) = by_plan(plan, &c, p, buf, start, len, hdr, now);
        self.hand_back(plan, &one, false);
        Some(v)
    }

    /// What `p`'s packets would have done to the table and the counters, done now (`outside`:
    /// they were forwarded without the lock).
    fn hand_back(&mut self, plan: &Plan, p: &Pending, outside: bool) {
        if p.packets == 0 {
            return;
        }
        let st = &mut self.stats;
        st.rx_packets += u64::from(p.packets);
        st.rx_bytes += p.rx_bytes;
        st.forwarded += u64::from(p.packets - p.failed);
        if outside {
            st.fast_path += u64::from(p.packets);
        } else {
            st.fast_path_locked += u64::from(p.packets);
        }
        st.gso_packets += u64::from(p.gso_packets);
        st.gso_segments += u64::from(p.gso_segments);
        st.csum_completed += u64::from(p.csum_completed);
        if let Some(d) = st.drops.get_mut(DropReason::RewriteFailed as usize) {
            *d += u64::from(p.failed);
        }
        let ct = if plan.key.is_ipv4() {
            &mut self.ct4
        } else {
            &mut self.ct6
        };
        let flags = TcpFlags(p.flags);
        if plan.forward {
            let pkt = Packet::original(flags, p.wire).with_segments(p.segs);
            match ct.track_aggregate(plan.hash, &plan.key, pkt, p.packets, p.last) {
                Some(hit) if hit.changed => self.flow_moved(plan.key, Some(plan.hash), &hit),
                Some(_) => {}
                None => self.stats.fast_path_orphaned += u64::from(p.packets),
            }
        } else {
            let pkt = Packet::reply(flags, p.wire).with_segments(p.segs);
            match ct.track_reply_aggregate(plan.hash, &plan.key, pkt, p.packets, p.last) {
                Some((orig, hit)) if hit.changed || hit.was.is_none() => {
                    self.flow_moved(orig, Some(plan.other_hash), &hit);
                }
                Some(_) => {}
                None => self.stats.fast_path_orphaned += u64::from(p.packets),
            }
        }
        if let Some(s) = self.stats.backends.get_mut(plan.backend.get() as usize) {
            if outside {
                s.fast_packets += u64::from(p.segs);
            }
            let (n, bytes) = if plan.forward {
                (&mut s.packets, &mut s.bytes)
            } else {
                (&mut s.reply_packets, &mut s.reply_bytes)
            };
            *n += u64::from(p.segs);
            *bytes += u64::from(p.wire);
        }
        self.drain_removals();
    }
}
