//! Insertion and room-making: the flood-resistance policy.

use lb_core::{BackendId, Duration, FlowKey, Instant, KeyedHash};

use super::config::V6_VICTIM_WALK;
use super::{ConnTable, Insert, NewFlow};
use crate::entry::{Probe, Slot, F_BIDIR, F_LIVE, F_NAT, F_PERSIST, F_POOL, F_SEEN, F_V6, NIL};
use crate::evict::class_is_half_open;
use crate::persist::{Service, TemplateKey};
use crate::stats::{EvictReason, Refusal};
use crate::timeout::{FlowState, CLASSES};
use crate::MAX_BACKEND_ID;

impl<H: KeyedHash> ConnTable<H> {
    /// The insertion engine. `pool`: the reply tuple's port came from the SNAT pool.
    /// `install`: (state, remaining ms) for entries installed by sync.
    pub(crate) fn insert_inner(
        &mut self,
        flow: NewFlow,
        pool: bool,
        install: Option<(FlowState, u32)>,
        now: Instant,
    ) -> Insert {
        let now32 = self.advance(now);
        if flow.backend.get() > MAX_BACKEND_ID {
            return self.refuse(Refusal::BackendId);
        }
        let hash = self.hasher.hash_flow(&flow.key);
        let probe = Probe::of(&flow.key);
        if let Some(i) = self.find(hash, &probe) {
            if !self.slot_expired(i) {
                self.counters.exists += 1;
                return Insert::Exists;
            }
            self.counters.expired += 1;
            self.remove_timed_out(i);
        }
        let reply_hash = match flow.nat {
            Some(r) if r.is_ipv4() != flow.key.is_ipv4() || r.proto() != flow.key.proto() => {
                return self.refuse(Refusal::FamilyMismatch);
            }
            Some(r) if self.cfg.nat => {
                let h = self.hasher.hash_flow(&r);
                if let Some(j) = self.find_reply(h, &r) {
                    if !self.slot_expired(j) {
                        return self.refuse(Refusal::NatConflict);
                    }
                    self.counters.expired += 1;
                    self.remove_timed_out(j);
                }
                Some(h)
            }
            Some(_) => return self.refuse(Refusal::NatDisabled),
            None => None,
        };
        let is_v6 = matches!(probe, Probe::V6 { .. });
        let mut outcome = Insert::New;
        if is_v6 && self.v6_free.is_empty() {
            match self.make_room(true) {
                Ok(o) => outcome = o,
                Err(r) => return self.refuse(r),
            }
        }
        if self.free == NIL {
            match self.make_room(false) {
                Ok(o) => outcome = o,
                Err(r) => return self.refuse(r),
            }
        }
        let i = self.free;
        let Some(next_free) = self.slots.get(i as usize).map(Slot::next) else {
            return self.refuse(Refusal::TableFull);
        };
        let mut slot = Slot {
            last: now32,
            flags: F_LIVE,
            ..Slot::default()
        };
        slot.set_backend(flow.backend.get());
        match probe {
            Probe::V4 {
                a,
                b,
                sport,
                dport,
                proto,
            } => {
                (slot.a, slot.b, slot.sport, slot.dport, slot.proto) = (a, b, sport, dport, proto);
            }
            Probe::V6 {
                addrs,
                sport,
                dport,
                proto,
            } => {
                let Some(pair) = self.v6_free.pop() else {
                    return self.refuse(Refusal::Ipv6Full);
                };
                if let Some(p) = self.v6.get_mut(pair as usize) {
                    *p = addrs;
                }
                (slot.a, slot.sport, slot.dport, slot.proto) = (pair, sport, dport, proto);
                slot.flags |= F_V6;
            }
        }
        let state = match install {
            Some((st, _)) => st,
            None => FlowState::initial(flow.key.proto()),
        };
        slot.class = state.class();
        if let Some(rh) = reply_hash {
            slot.flags |= F_NAT | F_BIDIR;
            if pool {
                slot.flags |= F_POOL;
            }
            self.reply_index.insert(rh, i);
        }
        if let Some(prefix) = flow.persist_prefix {
            let tk = TemplateKey::client(flow.key.src(), prefix, Service::of_flow(&flow.key));
            if self.persist.attach(&tk) {
                slot.flags |= F_PERSIST;
                slot.persist = prefix;
            }
        }
        if let Some((_, remaining)) = install {
            // Installed by sync: set last-seen so that the entry times out `remaining` from now.
            let t = self.timeout_of(slot.class);
            slot.last = now32.wrapping_sub(t.saturating_sub(remaining));
        }
        slot.created = slot.last;
        self.free = next_free;
        if let Some(s) = self.slots.get_mut(i as usize) {
            *s = slot;
        }
        if let (Some(r), Some(_)) = (flow.nat, reply_hash) {
            // Fits: the family and protocol were checked above.
            self.store_nat(i, &r);
        }
        if install.is_some() {
            self.link_installed(i);
        } else {
            self.lists.push_back(&mut self.slots, slot.class, i);
        }
        if pool {
            self.pool_track(i);
        }
        // Cannot fail: the index is sized for the capacity and holds one way per live slot.
        self.index.insert(hash, i);
        self.len += 1;
        self.counters.inserts += 1;
        if let Some(pkt) = flow.first {
            self.apply_packet(i, pkt, now32, true);
        }
        outcome
    }

    /// Links an installed entry (whose last-seen may be in the past) near its place: at the head
    /// if it is older than the head, else at the tail.
    fn link_installed(&mut self, i: u32) {
        let Some(s) = self.slots.get_mut(i as usize) else {
            return;
        };
        // Placed by its last-seen time: not a seen entry waiting to move.
        s.flags &= !F_SEEN;
        let s = *s;
        let c = usize::from(s.class) % CLASSES;
        let head = self.lists.head[c];
        let older_than_head = self
            .slots
            .get(head as usize)
            .is_some_and(|h| self.age(&s) > self.age(h));
        if older_than_head {
            if let Some(x) = self.slots.get_mut(i as usize) {
                x.set_prev(NIL);
                x.set_next(head);
            }
            if let Some(h) = self.slots.get_mut(head as usize) {
                h.set_prev(i);
            }
            self.lists.head[c] = i;
            self.lists.len[c] += 1;
        } else {
            self.lists.push_back(&mut self.slots, s.class, i);
        }
    }

    fn refuse(&mut self, r: Refusal) -> Insert {
        self.counters.refused(r);
        Insert::Refused(r)
    }

    /// Frees one slot (and, with `need_v6`, one IPv6 pair): a timed-out entry first, then the
    /// oldest half-open one, then the least recently used.
    fn make_room(&mut self, need_v6: bool) -> Result<Insert, Refusal> {
        // A head seen again since it was queued goes to the tail first (lazy re-queueing; up
        // to `SETTLE_PER_INSERT` per class), so that the heads looked at below are likelier the
        // oldest entries of their classes.
        for c in 0..CLASSES {
            for _ in 0..super::SETTLE_PER_INSERT {
                if !self.settle_head(c) {
                    break;
                }
            }
        }
        let full = if need_v6 {
            Refusal::Ipv6Full
        } else {
            Refusal::TableFull
        };
        let walk = if need_v6 { V6_VICTIM_WALK } else { 1 };
        // 1. A timed-out entry.
        for c in 0..CLASSES as u8 {
            if let Some(i) = self.first_matching(c, walk, need_v6) {
                if self.slot_expired(i) {
                    self.counters.expired += 1;
                    self.remove_timed_out(i);
                    return Ok(Insert::New);
                }
            }
        }
        // 2. The oldest half-open entry, 3. the least recently used.
        for (reason, pick_half) in [(EvictReason::HalfOpen, true), (EvictReason::Lru, false)] {
            if !pick_half && !self.cfg.evict_established {
                return Err(full);
            }
            let mut best: Option<(u32, u32)> = None;
            for c in 0..CLASSES as u8 {
                if pick_half && !class_is_half_open(c) {
                    continue;
                }
                if let Some(i) = self.first_matching(c, walk, need_v6) {
                    let a = self.slots.get(i as usize).map_or(0, |s| self.age(s));
                    if best.is_none_or(|(_, ba)| a > ba) {
                        best = Some((i, a));
                    }
                }
            }
            if let Some((i, _)) = best {
                let victim = self.key_of(i);
                self.counters.evicted(reason);
                self.remove_slot(i, reason.into());
                return Ok(match victim {
                    Some(victim) => Insert::Evicted { victim, reason },
                    None => Insert::New,
                });
            }
        }
        Err(full)
    }

    /// The first entry of list `c` (looking at most `walk` entries deep) that is IPv6 if
    /// `need_v6`.
    fn first_matching(&self, c: u8, walk: usize, need_v6: bool) -> Option<u32> {
        let mut i = *self.lists.head.get(usize::from(c))?;
        for _ in 0..walk {
            let s = self.slots.get(i as usize)?;
            if !need_v6 || s.flags & F_V6 != 0 {
                return Some(i);
            }
            i = s.next();
        }
        None
    }

    /// Installs or refreshes an entry received by state sync: `state`, and a deadline
    /// `remaining_ms` from `now`. An existing live entry is updated in place (backend, state,
    /// deadline; its counters, NAT tuple and persistence are kept), or with `merge` left alone.
    ///
    /// A new entry whose NAT reply tuple's destination (the SNAT address and port) is a pair of
    /// the table's [`SnatPool`](crate::SnatPool) reserves it there, and releases it when it
    /// leaves, as [`ConnTable::insert_snat`] does with the pairs it allocates (a pair that
    /// cannot be reserved is counted in [`crate::Counters::sync_nat_conflicts`]). A new entry
    /// with a persistence prefix pins its client template, installing a placeholder bound to
    /// its backend if there is none yet (see the `persist` module).
    pub(crate) fn sync_upsert(
        &mut self,
        flow: NewFlow,
        state: FlowState,
        remaining_ms: u32,
        now: Instant,
        merge: bool,
    ) -> Upserted {
        let now32 = self.advance(now);
        if flow.backend.get() > MAX_BACKEND_ID {
            return Upserted::Refused(self.refuse(Refusal::BackendId));
        }
        let hash = self.hasher.hash_flow(&flow.key);
        let probe = Probe::of(&flow.key);
        match self.find(hash, &probe) {
            Some(i) if !self.slot_expired(i) => {
                let Some(old) = self.slots.get(i as usize).copied() else {
                    return Upserted::Kept;
                };
                if merge {
                    return Upserted::Kept;
                }
                // Out of its pool list while its backend and state change; back in below.
                self.pool_detach(i);
                self.lists.unlink(&mut self.slots, old.class, i);
                let class = state.class();
                let t = self.timeout_of(class);
                if let Some(s) = self.slots.get_mut(i as usize) {
                    s.class = class;
                    s.set_backend(flow.backend.get());
                    s.last = now32.wrapping_sub(t.saturating_sub(remaining_ms));
                }
                self.link_installed(i);
                if old.flags & F_POOL != 0 && old.backend() != flow.backend.get() {
                    self.move_reservation(i, BackendId(old.backend()), flow.backend);
                }
                self.pool_track(i);
                Upserted::Updated(FlowState::from_class(old.class).unwrap_or(FlowState::Other))
            }
            _ => {
                if let Some(prefix) = flow.persist_prefix {
                    let tk =
                        TemplateKey::client(flow.key.src(), prefix, Service::of_flow(&flow.key));
                    // Merge: a live template is kept; else a placeholder that goes with its
                    // last flow unless the template itself is synced meanwhile.
                    self.persist.install(
                        tk,
                        flow.backend,
                        Duration::ZERO,
                        Duration::ZERO,
                        now,
                        true,
                        false,
                    );
                }
                let r = self.insert_inner(flow, false, Some((state, remaining_ms)), now);
                if !r.is_inserted() {
                    return Upserted::Refused(r);
                }
                if let Some(reply) = flow.nat {
                    if let Some(i) = self.find(hash, &probe) {
                        self.reserve_synced(i, flow.backend, &reply);
                    }
                }
                Upserted::Installed(r)
            }
        }
    }

    /// Reserves the SNAT pair of synced entry `i` (NAT tuple `reply`) in `backend`'s pool, if
    /// it is one of the pool's pairs, and marks the entry as holding it.
    fn reserve_synced(&mut self, i: u32, backend: BackendId, reply: &FlowKey) {
        let Some(pool) = self.snat.as_mut() else {
            return;
        };
        let nat = self
            .slots
            .get(i as usize)
            .is_some_and(|s| s.flags & F_NAT != 0);
        if !nat || !pool.contains(reply.dst(), reply.dst_port()) {
            return;
        }
        if pool.reserve(backend, reply.dst(), reply.dst_port()) {
            if let Some(s) = self.slots.get_mut(i as usize) {
                s.flags |= F_POOL;
            }
            self.pool_track(i);
        } else {
            self.counters.sync_nat_conflicts += 1;
        }
    }

    /// Synced entry `i`, holding a pool pair, moved from backend `from` to `to`: the pair goes
    /// back to `from`'s pool and is reserved in `to`'s.
    fn move_reservation(&mut self, i: u32, from: BackendId, to: BackendId) {
        let Some(reply) = self.nat_of(i) else {
            return;
        };
        if let Some(pool) = self.snat.as_mut() {
            pool.release(from, reply.dst(), reply.dst_port());
        }
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.flags &= !F_POOL;
        }
        self.reserve_synced(i, to, &reply);
    }
}

/// What [`ConnTable::sync_upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upserted {
    /// A new entry (the insertion's outcome: new, or after an eviction).
    Installed(Insert),
    /// A live entry was updated; its state before.
    Updated(FlowState),
    /// Merging: a live entry exists and was left alone.
    Kept,
    /// Refused (the insertion's outcome).
    Refused(Insert),
}
