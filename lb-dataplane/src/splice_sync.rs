//! State sync of spliced connections, so that a backup that takes over goes on translating
//! them instead of dropping them (a spliced connection's backend side was opened by the
//! balancer itself: without its sequence and timestamp offsets no other node can forward a
//! byte of it).
//!
//! - **What is sent**: a connection once it is spliced (the backend acknowledged the held
//!   head), when a side closes, and when it ends (a delete); the changes are logged by key on
//!   those transitions only (nothing per segment) and turned into
//!   [`SpliceRecord`]s by [`Dataplane::splice_sync_drain`], each key looked up once then.
//!   [`Dataplane::splice_sync_export`] gives every spliced connection (a bulk dump) or those
//!   with traffic since an instant (a refresh pass: the backup's idle deadline moves on).
//! - **What the receiver does** ([`Dataplane::apply_sync`]): it puts the connection in the
//!   slot its SNAT port names (both nodes derive the port from the slot and its round, so the
//!   backend's segments find the slot by port on either), with the sender's offsets. Both
//!   nodes need the same spliced services, SNAT addresses, `snat_ports` and
//!   `splice_capacity`; a record that does not fit this node's is refused and counted.
//! - **Active-active**: the peers' slots overlap (each node numbers its own from the same
//!   SNAT port base). A peer's connection is installed only in a free slot, or over an older
//!   synced or closing one; never over a live connection spliced here (counted ignored). A
//!   connection whose slot is taken on a node cannot move to it.
//! - **Not synced**: connections still reading their head or connecting to a backend (a
//!   takeover loses those: their client retransmits into a node that never saw them, and
//!   gets no answer until its connection times out); the SYN cookies need nothing (the pair
//!   shares the hash key they are keyed by).

use std::collections::HashSet;
use std::net::SocketAddr;

use lb_conntrack::sync::{
    SpliceRecord, SPLICE_CLOSING, SPLICE_FIN_BACKEND, SPLICE_FIN_CLIENT, SPLICE_SACK, SPLICE_TS,
};
use lb_conntrack::{FlowState, TcpState};
use lb_core::{BackendId, Duration, FlowKey, Instant, IpProto};

use super::{Splicer, State, LINGER, MAX_TRIES};
use crate::{Dataplane, Tables};

/// What applying one splice record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adopted {
    /// Installed, refreshed or deleted.
    Applied,
    /// Merge mode and the slot or key is in use here; or a delete of nothing.
    Ignored,
    /// It does not fit this node's configuration.
    Refused,
}

/// What the live load counts for a slot in `state` (IPVS: handshake and closing states are
/// inactive connections, an established one is active).
fn counted_state(state: State) -> Option<FlowState> {
    match state {
        State::Free | State::Head => None,
        State::Connecting | State::Sent => Some(FlowState::Tcp(TcpState::SynSent)),
        State::Spliced => Some(FlowState::Tcp(TcpState::Established)),
        State::Closing => Some(FlowState::Tcp(TcpState::TimeWait)),
    }
}

impl Splicer {
    /// Notes what changed in what the live load should count for slot `s` (its backend and
    /// state): a connection opened, moved between states or backends, or closed. Called
    /// after every change of a slot's state or backend; the data path applies the notes
    /// ([`Dataplane::splice_counts`]), so spliced connections count in their backends'
    /// connection counts like tracked flows, and hold a retired backend's id until they end.
    pub(super) fn recount(&mut self, s: usize) {
        let Some(x) = self.slots.get_mut(s) else {
            return;
        };
        let now = counted_state(x.state).and_then(|st| Some((x.backend?, st)));
        if now == x.counted {
            return;
        }
        match (x.counted, now) {
            (Some((a, w)), Some((b, n))) if a == b => self.counts.push((a, Some(w), Some(n))),
            (was, now) => {
                if let Some((a, w)) = was {
                    self.counts.push((a, Some(w), None));
                }
                if let Some((b, n)) = now {
                    self.counts.push((b, None, Some(n)));
                }
            }
        }
        x.counted = now;
    }

    /// Logs slot `s`'s connection for the sync sender.
    pub(super) fn log(&mut self, s: usize) {
        if self.log_cap == 0 {
            return;
        }
        if self.log.len() >= self.log_cap {
            self.stats.sync_lost += 1;
            return;
        }
        if let Some(x) = self.slots.get(s) {
            self.log.push_back(x.key);
        }
    }

    /// Slot `s` as a record, if it holds a spliced (or closing) connection.
    fn record(&self, s: usize, now: Instant) -> Option<SpliceRecord> {
        let x = self.slots.get(s)?;
        if !matches!(x.state, State::Spliced | State::Closing) {
            return None;
        }
        let mut flags = 0;
        for (on, bit) in [
            (x.c_ts, SPLICE_TS),
            (x.c_sack, SPLICE_SACK),
            (x.fin_c, SPLICE_FIN_CLIENT),
            (x.fin_s, SPLICE_FIN_BACKEND),
            (x.state == State::Closing, SPLICE_CLOSING),
        ] {
            if on {
                flags |= bit;
            }
        }
        // (Capped as the wire requires.)
        let rem = x
            .deadline
            .saturating_duration_since(now)
            .min(lb_conntrack::MAX_TIMEOUT)
            .as_millis();
        Some(SpliceRecord {
            delete: false,
            key: x.key,
            backend: x.backend?,
            backend_tag: None,
            snat: x.snat,
            remaining_ms: u32::try_from(rem).unwrap_or(u32::MAX),
            local_isn: x.l_isn,
            backend_isn: x.s_isn,
            client_ts0: x.ts0,
            backend_ts0: x.b_ts0,
            ts_shift: x.ts_d,
            client_wscale: x.c_ws,
            backend_wscale: x.b_ws,
            flags,
        })
    }

    /// Runs `f` with the change log off: what a peer sent is not sent back.
    fn unlogged<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let cap = std::mem::replace(&mut self.log_cap, 0);
        let r = f(self);
        self.log_cap = cap;
        r
    }

    /// Installs, refreshes or deletes a peer's spliced connection (`backend`: this node's id
    /// for the record's backend). With `merge` (a node that is master itself), only a
    /// connection whose slot and key are free here is installed, and nothing is deleted.
    pub(crate) fn adopt(
        &mut self,
        r: &SpliceRecord,
        backend: BackendId,
        tables: &Tables,
        now: Instant,
        merge: bool,
    ) -> Adopted {
        if self.slots.is_empty() || r.key.proto() != IpProto::Tcp {
            return Adopted::Refused;
        }
        let hash = self.hasher.hash_flow(&r.key);
        let found = self.find(&r.key, hash);
        if r.delete {
            return match found {
                Some(s) if !merge => {
                    self.unlogged(|sp| sp.release(s));
                    Adopted::Applied
                }
                _ => Adopted::Ignored,
            };
        }
        let vip = SocketAddr::new(r.key.dst(), r.key.dst_port());
        let Some(si) = self.svcs.iter().position(|v| v.vip == vip) else {
            return Adopted::Refused;
        };
        let Some(b) = tables.backend(backend).filter(|b| b.vip == vip) else {
            return Adopted::Refused;
        };
        let baddr = if b.addr.port() == 0 {
            SocketAddr::new(b.addr.ip(), vip.port())
        } else {
            b.addr
        };
        // The slot the SNAT port names, as `choose` derives the port from slot and round.
        let n = self.slots.len();
        let Some(d) = r.snat.port().checked_sub(self.port_base).map(usize::from) else {
            return Adopted::Refused;
        };
        let (s, round) = (d % n, d / n);
        if round >= self.ports_per_slot || tables.snat_for(baddr.ip()) != Some(r.snat.ip()) {
            return Adopted::Refused;
        }
        if let Some(f) = found.filter(|&f| f != s) {
            // The key sits in another slot here (an older connection of the same 4-tuple).
            if merge {
                return Adopted::Ignored;
            }
            self.unlogged(|sp| sp.release(f));
        }
        let cur = &self.slots[s];
        if cur.state != State::Free && (merge || cur.key != r.key) {
            // The slot holds another connection. One this node spliced itself and still live
            // is never evicted (in an active-active group the peers' slots overlap: the peer's
            // connection is not taken over); one a peer sent earlier (its delete was lost) or
            // a closing one gives way.
            if merge || !(cur.from_peer || cur.state == State::Closing) {
                return Adopted::Ignored;
            }
            self.unlogged(|sp| sp.release(s));
        }
        if self.slots[s].state == State::Free {
            if let Some(i) = self.free.iter().position(|&f| f as usize == s) {
                self.free.remove(i);
            }
            self.stats.active += 1;
            let x = &mut self.slots[s];
            x.key = r.key;
            x.hash = hash;
            // This node's part of the session starts now.
            (x.opened, x.seen, x.packets) = (now, now, 0);
            x.from_peer = true;
            self.index_insert(hash, s);
        }
        let closing = r.flags & SPLICE_CLOSING != 0;
        let left = Duration::from_millis(u64::from(r.remaining_ms));
        let x = &mut self.slots[s];
        x.state = if closing {
            State::Closing
        } else {
            State::Spliced
        };
        x.client = SocketAddr::new(r.key.src(), r.key.src_port());
        x.vip = vip;
        x.svc = si as u16;
        x.deadline = now + if closing { left.min(LINGER) } else { left };
        x.head_len = 0;
        x.c_isn = 0;
        x.l_isn = r.local_isn;
        x.s_isn = r.backend_isn;
        x.c_ws = r.client_wscale;
        x.b_ws = r.backend_wscale;
        x.c_sack = r.flags & SPLICE_SACK != 0;
        x.c_ts = r.flags & SPLICE_TS != 0;
        x.ts0 = r.client_ts0;
        x.b_ts0 = r.backend_ts0;
        x.ts_d = r.ts_shift;
        x.c_tsval = 0;
        x.group = None;
        x.place_hash = 0;
        x.backend = Some(backend);
        x.baddr = baddr;
        x.snat = r.snat;
        x.tried = [None; MAX_TRIES];
        x.tried[0] = Some(backend);
        x.tries = 1;
        x.retrans = 0;
        x.fin_c = r.flags & SPLICE_FIN_CLIENT != 0;
        x.fin_s = r.flags & SPLICE_FIN_BACKEND != 0;
        // The next use of the slot moves on from the sender's round.
        x.gen = round as u16;
        self.recount(s);
        self.stats.synced_in += 1;
        Adopted::Applied
    }
}

impl Dataplane {
    /// Applies the splice path's notes of what the live load counts (see `recount`).
    #[inline]
    pub(crate) fn splice_counts(&mut self) {
        if self.splice.counts.is_empty() && self.splice.ended.is_empty() {
            return;
        }
        let mut notes = std::mem::take(&mut self.splice.counts);
        for &(b, was, now) in &notes {
            match (was, now) {
                (None, Some(n)) => self.flow_opened(b, n),
                (Some(w), None) => self.live.closed(b, w),
                (w, Some(n)) => self.live.moved(b, w, n),
                (None, None) => {}
            }
        }
        notes.clear();
        self.splice.counts = notes;
        let mut ended = std::mem::take(&mut self.splice.ended);
        for &(b, ms, packets) in &ended {
            self.sessions.record(b, ms, packets);
        }
        ended.clear();
        self.splice.ended = ended;
    }

    /// Turns the spliced connections that changed since the last call into records appended
    /// to `out` (an upsert for one spliced or closing now, a delete for one that ended), each
    /// key looked up once at `now`. Returns the changes consumed. Control path: call it with
    /// [`Dataplane::sync_drain`], and send the records with
    /// [`SyncSender::encode_splices`](lb_conntrack::sync::SyncSender::encode_splices).
    pub fn splice_sync_drain(&mut self, now: Instant, out: &mut Vec<SpliceRecord>) -> usize {
        let sp = &mut self.splice;
        let n = sp.log.len();
        let mut seen: HashSet<FlowKey> = HashSet::with_capacity(n);
        let o0 = out.len();
        while let Some(k) = sp.log.pop_front() {
            if !seen.insert(k) {
                continue;
            }
            let h = sp.hasher.hash_flow(&k);
            let rec = sp.find(&k, h).and_then(|s| sp.record(s, now));
            out.push(rec.unwrap_or_else(|| SpliceRecord::delete(k)));
        }
        self.tag_splices(&mut out[o0..]);
        n
    }

    /// Every spliced connection as a record appended to `out` (a bulk dump), or with `since`
    /// only those that saw traffic since then (a refresh pass: their idle deadlines moved).
    pub fn splice_sync_export(
        &self,
        since: Option<Instant>,
        now: Instant,
        out: &mut Vec<SpliceRecord>,
    ) {
        let sp = &self.splice;
        let o0 = out.len();
        for s in 0..sp.slots.len() {
            let x = &sp.slots[s];
            if let Some(t) = since {
                let idle = sp
                    .svcs
                    .get(usize::from(x.svc))
                    .map_or(Duration::ZERO, |v| v.spec.idle_timeout);
                if x.state != State::Spliced || x.deadline.saturating_sub(idle) < t {
                    continue;
                }
            }
            if let Some(r) = sp.record(s, now) {
                out.push(r);
            }
        }
        self.tag_splices(&mut out[o0..]);
    }

    fn tag_splices(&self, recs: &mut [SpliceRecord]) {
        for r in recs.iter_mut().filter(|r| !r.delete) {
            r.backend_tag = self.tables.backend(r.backend).map(crate::BackendInfo::tag);
        }
    }

    /// Applies a peer's splice record (see [`Dataplane::apply_sync`]).
    pub(crate) fn apply_splice(
        &mut self,
        r: &SpliceRecord,
        now: Instant,
        merge: bool,
        out: &mut crate::SyncApplied,
    ) {
        let backend = if r.delete {
            r.backend
        } else {
            match self.local_backend(r.backend, r.backend_tag, out) {
                Some(b) if !self.is_released(b) => b,
                Some(_) => {
                    out.refused += 1;
                    self.splice.stats.sync_refused += 1;
                    return;
                }
                None => {
                    self.splice.stats.sync_refused += 1;
                    return;
                }
            }
        };
        let a = self.splice.adopt(r, backend, &self.tables, now, merge);
        self.splice_counts();
        match a {
            Adopted::Applied => out.splices += 1,
            Adopted::Ignored => out.ignored += 1,
            Adopted::Refused => {
                out.refused += 1;
                self.splice.stats.sync_refused += 1;
            }
        }
    }
}
