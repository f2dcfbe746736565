//! A reference model of [`ConnTable`]: a `BTreeMap` that applies the table's rules for
//! timeouts, state, lazy re-queueing, eviction and removal records the slow, obvious way, and
//! a check that compares a table with it after each operation.
//!
//! One model serves the crate's property test and the `conntrack_ops` fuzz target (built with
//! the `model` feature), so that a change to the table's rules is written into one model, not
//! two. It is test code: every operation scans the whole map.
//!
//! Drive a table and a model with the same operations, then call [`Model::check`]:
//!
//! ```
//! use lb_conntrack::model::Model;
//! use lb_conntrack::{Config, ConnTable, NewFlow, Packet, TcpFlags};
//! use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};
//! let cfg = Config::with_capacity(4);
//! let mut t = ConnTable::new(cfg, HashKey::from_bytes([7; 16])).unwrap();
//! let mut m = Model::new(&cfg);
//! let k = FlowKey::v4([192, 0, 2, 1].into(), 1000, [203, 0, 113, 1].into(), 53, IpProto::Udp);
//! let now = Instant::from_secs(1);
//! m.advance(now);
//! assert_eq!(t.insert_with(NewFlow::new(k, BackendId(2)), now), m.insert(NewFlow::new(k, BackendId(2))));
//! let p = Packet::original(TcpFlags::NONE, 80);
//! let got = t.track(&k, p, now).map(|h| (h.backend.get(), h.state, h.was));
//! assert_eq!(got, m.track(&k, p));
//! m.check(&mut t, now).unwrap();
//! ```

use std::collections::BTreeMap;

use lb_core::{BackendId, FlowKey, Instant};

use crate::evict::class_is_half_open;
use crate::tcp_state::{Direction, TcpState};
use crate::timeout::{FlowState, Timeouts, CLASSES};
use crate::{
    Config, ConnTable, EvictReason, Insert, NewFlow, Packet, Refusal, Removal, RemovalReason,
    SETTLE_PER_EXPIRE, SETTLE_PER_INSERT,
};

/// A flow of the model.
#[derive(Debug, Clone, Copy)]
pub struct ModelFlow {
    /// Its backend id.
    pub backend: u32,
    /// Its state.
    pub state: FlowState,
    /// Last seen (ms).
    pub last: u64,
    /// Its place in its class list: smaller is nearer the head.
    pub pos: u64,
    /// When it was queued at `pos` (ms).
    pub queued: u64,
    /// Seen again since it was queued (lazy re-queueing: the table moves it to the tail when it
    /// reaches the head).
    pub seen: bool,
    /// An IPv6 flow (counted against the IPv6 capacity).
    pub v6: bool,
    /// A reply has been seen.
    pub bidir: bool,
    /// When its session started (ms).
    pub opened: u64,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// The reference model of a [`ConnTable`] built with the same [`Config`] (capacity, IPv6
/// capacity, timeouts, `evict_established`; no NAT, no persistence).
#[derive(Debug, Clone)]
pub struct Model {
    /// The flows, by key (timed-out ones included until the table would have removed them).
    pub map: BTreeMap<FlowKey, ModelFlow>,
    /// The clock (ms), as set by [`Model::advance`].
    pub clock: u64,
    seq: u64,
    timeouts: Timeouts,
    capacity: usize,
    ipv6_capacity: usize,
    evict_established: bool,
    /// Removal records not yet compared, in the order the table should queue them.
    removed: Vec<Removal>,
    /// The keys present after the last check.
    before: Vec<FlowKey>,
    /// Removal records drained so far.
    drained: u64,
}

impl Model {
    /// An empty model of a table built with `cfg`.
    pub fn new(cfg: &Config) -> Model {
        Model {
            map: BTreeMap::new(),
            clock: 0,
            seq: 0,
            timeouts: cfg.timeouts,
            capacity: cfg.capacity,
            ipv6_capacity: cfg.ipv6_capacity,
            evict_established: cfg.evict_established,
            removed: Vec::new(),
            before: Vec::new(),
            drained: 0,
        }
    }

    /// Sets the clock to `now` (the table's clock moves with the time of each call).
    pub fn advance(&mut self, now: Instant) {
        self.clock = now.as_millis();
    }

    /// `state`'s timeout (ms).
    fn timeout(&self, state: FlowState) -> u64 {
        self.timeouts.get(state).as_millis() as u64
    }

    /// Whether `f` has timed out at the model's clock.
    pub fn expired(&self, f: &ModelFlow) -> bool {
        self.clock - f.last >= self.timeout(f.state)
    }

    fn record(&mut self, k: FlowKey, f: &ModelFlow, reason: RemovalReason) {
        self.removed.push(Removal {
            key: k,
            backend: BackendId(f.backend),
            reason,
            state: f.state,
            nat: None,
            opened: Instant::from_millis(f.opened),
            last_seen: Instant::from_millis(f.last),
            packets: f.packets,
            bytes: f.bytes,
        });
    }

    /// Removes `k` (if present) and records it.
    fn take(&mut self, k: &FlowKey, reason: RemovalReason) -> bool {
        match self.map.remove(k) {
            Some(f) => {
                self.record(*k, &f, reason);
                true
            }
            None => false,
        }
    }

    /// Removes timed-out `k` (present) and records it.
    fn take_timed_out(&mut self, k: &FlowKey) {
        if let Some(f) = self.map.get(k) {
            let r = RemovalReason::timed_out(f.state);
            self.take(k, r);
        }
    }

    /// The head of class list `c` (of its IPv6 flows only, with `need_v6`).
    pub fn head(&self, c: u8, need_v6: bool) -> Option<FlowKey> {
        self.map
            .iter()
            .filter(|(_, f)| f.state.class() == c && (!need_v6 || f.v6))
            .min_by_key(|(_, f)| f.pos)
            .map(|(k, _)| *k)
    }

    /// Moves class `c`'s head to the tail if it was seen since it was queued.
    fn settle(&mut self, c: u8) -> bool {
        let Some(k) = self.head(c, false) else {
            return false;
        };
        let (seq, clock) = (self.seq, self.clock);
        match self.map.get_mut(&k) {
            Some(f) if f.seen => {
                (f.seen, f.pos, f.queued) = (false, seq, clock);
                self.seq += 1;
                true
            }
            _ => false,
        }
    }

    /// Frees a place for a new flow (an IPv6 one with `need_v6`): a timed-out head, else the
    /// oldest half-open head, else (if allowed) the least recently used head.
    fn make_room(&mut self, need_v6: bool) -> Result<Insert, Refusal> {
        for c in 0..CLASSES as u8 {
            for _ in 0..SETTLE_PER_INSERT {
                if !self.settle(c) {
                    break;
                }
            }
        }
        for c in 0..CLASSES as u8 {
            if let Some(k) = self.head(c, need_v6) {
                if self.expired(&self.map[&k]) {
                    self.take_timed_out(&k);
                    return Ok(Insert::New);
                }
            }
        }
        for (reason, half) in [(EvictReason::HalfOpen, true), (EvictReason::Lru, false)] {
            if !half && !self.evict_established {
                break;
            }
            let mut best: Option<(FlowKey, u64)> = None;
            for c in 0..CLASSES as u8 {
                if half && !class_is_half_open(c) {
                    continue;
                }
                if let Some(k) = self.head(c, need_v6) {
                    let age = self.clock - self.map[&k].last;
                    if best.is_none_or(|(_, a)| age > a) {
                        best = Some((k, age));
                    }
                }
            }
            if let Some((k, _)) = best {
                self.take(&k, reason.into());
                return Ok(Insert::Evicted { victim: k, reason });
            }
        }
        Err(if need_v6 {
            Refusal::Ipv6Full
        } else {
            Refusal::TableFull
        })
    }

    /// Feeds `p` to `k`; returns the state before it (`None` if it started a new session).
    fn apply(&mut self, k: &FlowKey, p: Packet, first: bool) -> Option<FlowState> {
        let (clock, seq) = (self.clock, self.seq);
        let mut f = *self.map.get(k)?;
        if p.dir == Direction::Reply {
            f.bidir = true;
        }
        let old = f.state;
        let new = match f.state {
            FlowState::Tcp(s) => FlowState::Tcp(s.next(p.dir, p.tcp_flags, f.bidir)),
            FlowState::UdpUnconfirmed if !first || p.dir == Direction::Reply => FlowState::Udp,
            o => o,
        };
        let reused = matches!(old, FlowState::Tcp(TcpState::TimeWait | TcpState::Close))
            && new == FlowState::Tcp(TcpState::SynRecv);
        if reused {
            self.record(*k, &f, RemovalReason::Closed);
            (f.opened, f.packets, f.bytes) = (clock, 0, 0);
        }
        if new.class() != f.state.class() {
            f.pos = seq;
            self.seq += 1;
            (f.seen, f.queued) = (false, clock);
        } else if clock != f.last {
            f.seen = true;
        }
        f.state = new;
        f.last = clock;
        f.packets += p.count();
        f.bytes += u64::from(p.bytes);
        self.map.insert(*k, f);
        (!reused).then_some(old)
    }

    /// [`ConnTable::insert_with`] (a flow without a NAT tuple or persistence, with a backend id
    /// the table can hold).
    pub fn insert(&mut self, flow: NewFlow) -> Insert {
        let key = flow.key;
        if let Some(f) = self.map.get(&key).copied() {
            if !self.expired(&f) {
                return Insert::Exists;
            }
            self.take_timed_out(&key);
        }
        let mut out = Insert::New;
        let v6 = !key.is_ipv4();
        if v6 && self.map.values().filter(|f| f.v6).count() >= self.ipv6_capacity {
            match self.make_room(true) {
                Ok(o) => out = o,
                Err(r) => return Insert::Refused(r),
            }
        }
        if self.map.len() >= self.capacity {
            match self.make_room(false) {
                Ok(o) => out = o,
                Err(r) => return Insert::Refused(r),
            }
        }
        let pos = self.seq;
        self.seq += 1;
        let clock = self.clock;
        self.map.insert(
            key,
            ModelFlow {
                backend: flow.backend.get(),
                state: FlowState::initial(key.proto()),
                last: clock,
                pos,
                queued: clock,
                seen: false,
                v6,
                bidir: false,
                opened: clock,
                packets: 0,
                bytes: 0,
            },
        );
        if let Some(p) = flow.first {
            self.apply(&key, p, true);
        }
        out
    }

    /// [`ConnTable::track`]: (backend, state after, state before or `None` for a new session),
    /// as a [`crate::Hit`]'s `backend`, `state` and `was`.
    pub fn track(
        &mut self,
        key: &FlowKey,
        p: Packet,
    ) -> Option<(u32, FlowState, Option<FlowState>)> {
        match self.map.get(key).copied() {
            Some(f) if self.expired(&f) => {
                self.take_timed_out(key);
                None
            }
            Some(f) => {
                let was = self.apply(key, p, false);
                Some((f.backend, self.map[key].state, was))
            }
            None => None,
        }
    }

    /// [`ConnTable::expire`] with `budget` already capped by the removal ring's room.
    pub fn expire(&mut self, budget: usize) -> usize {
        let mut n = 0;
        for c in 0..CLASSES as u8 {
            let mut settled = 0;
            while n < budget {
                match self.head(c, false) {
                    Some(k) if self.expired(&self.map[&k]) => {
                        self.take_timed_out(&k);
                        n += 1;
                    }
                    Some(_) if settled < SETTLE_PER_EXPIRE && self.settle(c) => settled += 1,
                    _ => break,
                }
            }
        }
        n
    }

    /// [`ConnTable::sweep`] over `slots` slots of table `t` (of capacity `capacity`) from its
    /// cursor, with `budget` already capped by the removal ring's room, called before the
    /// table's own sweep: which slot each flow sits in is the table's (`slot_of`), the rest
    /// the model's. Returns what the sweep removes and the cursor it leaves.
    pub fn sweep<H: lb_core::KeyedHash>(
        &mut self,
        t: &ConnTable<H>,
        capacity: usize,
        slots: usize,
        budget: usize,
    ) -> (usize, u32) {
        let mut at: BTreeMap<u32, FlowKey> = BTreeMap::new();
        for k in self.map.keys() {
            if let Some(i) = t.slot_of(k) {
                at.insert(i, *k);
            }
        }
        let mut i = t.sweep_cursor() as usize % capacity.max(1);
        let mut n = 0;
        for _ in 0..slots.min(capacity) {
            if n >= budget {
                break;
            }
            if let Some(k) = at.get(&(i as u32)).copied() {
                if self.expired(&self.map[&k]) {
                    self.take_timed_out(&k);
                    n += 1;
                }
            }
            i = if i + 1 == capacity { 0 } else { i + 1 };
        }
        (n, i as u32)
    }

    /// [`ConnTable::remove`].
    pub fn remove(&mut self, key: &FlowKey) -> bool {
        self.take(key, RemovalReason::Removed)
    }

    /// Compares `t` with the model after an operation at `now` (the time of the table's last
    /// call) and drains `t`'s removal records: the records are exactly the model's, in order,
    /// none lost, every flow that left reported once; the live entries, their count, the index
    /// and the counters agree; [`ConnTable::next_deadline`] is the earliest list head's (the
    /// clock for a head seen since it was queued) and never later than any flow's queueing
    /// time plus its timeout. `Err` says what differs.
    pub fn check<H: lb_core::KeyedHash>(
        &mut self,
        t: &mut ConnTable<H>,
        now: Instant,
    ) -> Result<(), String> {
        let got: Vec<Removal> = t.drain_removals().collect();
        let want = core::mem::take(&mut self.removed);
        if got != want {
            return Err(format!("removals {got:?}, model {want:?}"));
        }
        if t.counters().removals_lost != 0 {
            return Err("removal records lost".into());
        }
        self.drained += got.len() as u64;
        // Every key that left is reported, once; a reported key that is still here was
        // restarted (reuse) or replaced (an insert over its timed-out entry).
        let mut reported: Vec<FlowKey> = got.iter().map(|r| r.key).collect();
        reported.sort();
        let n = reported.len();
        reported.dedup();
        if reported.len() != n {
            return Err(format!("a key reported twice: {got:?}"));
        }
        for k in &self.before {
            if !self.map.contains_key(k) && reported.binary_search(k).is_err() {
                return Err(format!("{k:?} left unreported"));
            }
        }
        if let Some(k) = reported.iter().find(|k| !self.before.contains(k)) {
            return Err(format!("{k:?} reported but was not there"));
        }
        self.before = self.map.keys().copied().collect();
        // Entries: sessions started (inserts, and SYNs that restarted a finished entry) less
        // those reported ended.
        let c = t.counters();
        if t.len() != self.map.len()
            || t.len() > self.capacity
            || t.len() as u64 != c.inserts + c.reused - self.drained
            || t.index_len() != t.len()
        {
            return Err(format!(
                "len {} (index {}), model {}, inserts {} + reused {} - removed {}",
                t.len(),
                t.index_len(),
                self.map.len(),
                c.inserts,
                c.reused,
                self.drained
            ));
        }
        let mut live: Vec<(FlowKey, u32, FlowState)> = t
            .entries(now)
            .iter()
            .map(|e| (e.key, e.backend.get(), e.state))
            .collect();
        live.sort_by_key(|e| e.0);
        let want: Vec<(FlowKey, u32, FlowState)> = self
            .map
            .iter()
            .filter(|(_, f)| !self.expired(f))
            .map(|(k, f)| (*k, f.backend, f.state))
            .collect();
        if live != want {
            return Err(format!("live {live:?}, model {want:?}"));
        }
        // (The table's clock is the time of its last call, at most the model's.)
        let got = t.next_deadline().map(|d| d.as_millis());
        let heads: Vec<&ModelFlow> = (0..CLASSES as u8)
            .filter_map(|c| self.head(c, false))
            .map(|k| &self.map[&k])
            .collect();
        if heads.iter().any(|f| f.seen) {
            if got.is_none_or(|d| d > self.clock) {
                return Err(format!("next deadline {got:?} with a seen head"));
            }
        } else {
            let hd = heads.iter().map(|f| f.last + self.timeout(f.state)).min();
            if got != hd {
                return Err(format!("next deadline {got:?}, model {hd:?}"));
            }
        }
        // Not later than any flow's place implies: its queueing time plus its timeout (its
        // deadline, for a flow queued when last seen; a busy flow moved to the tail when it
        // reached the head may be removed up to that much late), or "now".
        let nd = self
            .map
            .values()
            .map(|f| f.queued + self.timeout(f.state))
            .min();
        if !(got <= nd || got <= Some(self.clock)) {
            return Err(format!("next deadline {got:?} after {nd:?}"));
        }
        Ok(())
    }
}
