#![no_main]
//! Connection-table operations from an arbitrary byte string, compared step by step with a
//! `BTreeMap` model that applies the same timeout, state and eviction rules (the same model as
//! the crate's proptest, written against the public API).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use lb_conntrack::{
    Config, ConnTable, Direction, EvictReason, FlowState, Insert, NewFlow, Packet, Prefetched,
    Refusal, TcpFlags, TcpState, Timeouts, MAX_BACKEND_ID, SETTLE_PER_EXPIRE, SETTLE_PER_INSERT,
};
use lb_core::{BackendId, Duration, FlowKey, HashKey, Instant, IpProto};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 6;
const V6CAP: usize = 2;

/// The class order of the table's expiry lists: TCP states by discriminant, then UDP
/// unconfirmed, UDP, ICMP, other.
fn class(s: FlowState) -> u8 {
    match s {
        FlowState::Tcp(t) => t as u8,
        FlowState::UdpUnconfirmed => 9,
        FlowState::Udp => 10,
        FlowState::Icmp => 11,
        FlowState::Other => 12,
    }
}

#[derive(Clone, Copy)]
struct M {
    backend: u32,
    state: FlowState,
    last: u64,
    pos: u64,
    /// When it was queued at `pos`.
    q: u64,
    /// Seen again since it was queued (lazy re-queueing: the table moves it when it reaches
    /// the head).
    seen: bool,
    v6: bool,
    bidir: bool,
}

struct Model {
    map: BTreeMap<FlowKey, M>,
    clock: u64,
    seq: u64,
    t: Timeouts,
    evict_est: bool,
}

impl Model {
    fn expired(&self, m: &M) -> bool {
        self.clock - m.last >= self.t.get(m.state).as_millis() as u64
    }
    fn head(&self, c: u8, need_v6: bool) -> Option<FlowKey> {
        self.map
            .iter()
            .filter(|(_, m)| class(m.state) == c && (!need_v6 || m.v6))
            .min_by_key(|(_, m)| m.pos)
            .map(|(k, _)| *k)
    }
    /// Moves class `c`'s head to the tail if it was seen since it was queued.
    fn settle(&mut self, c: u8) -> bool {
        let Some(k) = self.head(c, false) else {
            return false;
        };
        let (seq, clock) = (self.seq, self.clock);
        match self.map.get_mut(&k) {
            Some(m) if m.seen => {
                (m.seen, m.pos, m.q) = (false, seq, clock);
                self.seq += 1;
                true
            }
            _ => false,
        }
    }
    fn make_room(&mut self, need_v6: bool) -> Result<Insert, Refusal> {
        for c in 0..13 {
            for _ in 0..SETTLE_PER_INSERT {
                if !self.settle(c) {
                    break;
                }
            }
        }
        for c in 0..13 {
            if let Some(k) = self.head(c, need_v6) {
                if self.expired(&self.map[&k]) {
                    self.map.remove(&k);
                    return Ok(Insert::New);
                }
            }
        }
        for (reason, half) in [(EvictReason::HalfOpen, true), (EvictReason::Lru, false)] {
            if !half && !self.evict_est {
                break;
            }
            let mut best: Option<(FlowKey, u64)> = None;
            for c in 0..13u8 {
                let hk = self.head(c, need_v6);
                let Some(k) = hk else { continue };
                if half && !self.map[&k].state.is_half_open() {
                    continue;
                }
                let age = self.clock - self.map[&k].last;
                if best.is_none_or(|(_, a)| age > a) {
                    best = Some((k, age));
                }
            }
            if let Some((k, _)) = best {
                self.map.remove(&k);
                return Ok(Insert::Evicted { victim: k, reason });
            }
        }
        Err(if need_v6 {
            Refusal::Ipv6Full
        } else {
            Refusal::TableFull
        })
    }
    fn apply(&mut self, k: &FlowKey, p: Packet, first: bool) {
        let (clock, seq) = (self.clock, self.seq);
        let Some(m) = self.map.get_mut(k) else { return };
        if p.dir == Direction::Reply {
            m.bidir = true;
        }
        let new = match m.state {
            FlowState::Tcp(s) => FlowState::Tcp(s.next(p.dir, p.tcp_flags, m.bidir)),
            FlowState::UdpUnconfirmed if !first || p.dir == Direction::Reply => FlowState::Udp,
            o => o,
        };
        if class(new) != class(m.state) {
            m.pos = seq;
            self.seq += 1;
            (m.seen, m.q) = (false, clock);
        } else if clock != m.last {
            m.seen = true;
        }
        m.state = new;
        m.last = clock;
    }
    fn insert(&mut self, key: FlowKey, b: u32, first: Option<Packet>) -> Insert {
        if let Some(e) = self.map.get(&key).copied() {
            if !self.expired(&e) {
                return Insert::Exists;
            }
            self.map.remove(&key);
        }
        let mut out = Insert::New;
        if !key.is_ipv4() && self.map.values().filter(|e| e.v6).count() >= V6CAP {
            match self.make_room(true) {
                Ok(o) => out = o,
                Err(r) => return Insert::Refused(r),
            }
        }
        if self.map.len() >= CAP {
            match self.make_room(false) {
                Ok(o) => out = o,
                Err(r) => return Insert::Refused(r),
            }
        }
        let pos = self.seq;
        self.seq += 1;
        let state = FlowState::initial(key.proto());
        let m = M {
            backend: b,
            state,
            last: self.clock,
            pos,
            q: self.clock,
            seen: false,
            v6: !key.is_ipv4(),
            bidir: false,
        };
        self.map.insert(key, m);
        if let Some(p) = first {
            self.apply(&key, p, true);
        }
        out
    }
}

fn key_of(i: u8) -> FlowKey {
    let i = i % 16;
    match i % 4 {
        0 | 1 => FlowKey::v4(
            Ipv4Addr::new(10, 0, 0, i),
            1000,
            Ipv4Addr::new(203, 0, 113, 1),
            80,
            IpProto::Tcp,
        ),
        2 => FlowKey::v4(
            Ipv4Addr::new(10, 0, 0, i),
            1000,
            Ipv4Addr::new(203, 0, 113, 1),
            53,
            IpProto::Udp,
        ),
        _ => FlowKey::v6(
            Ipv6Addr::from(u128::from(i) + 1),
            1000,
            Ipv6Addr::LOCALHOST,
            443,
            IpProto::Tcp,
        ),
    }
}

fn packet(b: u8) -> Packet {
    let flags = [0u8, 0x02, 0x10, 0x01, 0x11, 0x04, 0x12, 0x14][usize::from(b & 7)];
    let dir = if b & 8 != 0 {
        Direction::Reply
    } else {
        Direction::Original
    };
    Packet {
        dir,
        tcp_flags: TcpFlags(flags),
        bytes: 1,
        // 0 counts as 1; up to 15 stands for a GSO super-packet's segments.
        segments: u32::from(b >> 4),
    }
}

fuzz_target!(|data: &[u8]| {
    let s = Duration::from_secs;
    let t = Timeouts {
        tcp_none: s(2),
        tcp_established: s(50),
        tcp_syn_sent: s(12),
        tcp_syn_recv: s(6),
        tcp_fin_wait: s(9),
        tcp_time_wait: s(8),
        tcp_close: s(1),
        tcp_close_wait: s(7),
        tcp_last_ack: s(3),
        udp_unconfirmed: s(4),
        udp: s(30),
        icmp: s(5),
        other: s(5),
    };
    let evict_est = data.first().is_some_and(|b| b & 1 == 1);
    let cfg = Config {
        capacity: CAP,
        ipv6_capacity: V6CAP,
        timeouts: t,
        evict_established: evict_est,
        ..Config::default()
    };
    let Ok(mut table) = ConnTable::new(cfg, HashKey::from_bytes([9; 16])) else {
        return;
    };
    let mut m = Model {
        map: BTreeMap::new(),
        clock: 0,
        seq: 0,
        t,
        evict_est,
    };
    let mut now = Instant::ZERO;
    let mut removals = 0u64;
    // Prefetch hints kept across ops, by key byte.
    let mut hints: [Option<(u8, Prefetched)>; 4] = [None; 4];
    for op in data.chunks_exact(3).skip(1) {
        let (a, b, c) = (op[0], op[1], op[2]);
        match a % 6 {
            0 | 1 => {
                let key = key_of(b);
                let first = (c & 0x80 != 0).then(|| packet(c));
                // Now and then a backend id above what a slot stores: refused, nothing changes.
                let too_big = a % 6 == 1 && c & 0x04 != 0;
                let backend = u32::from(c & 3) + if too_big { MAX_BACKEND_ID + 1 } else { 0 };
                let mut f = NewFlow::new(key, BackendId(backend));
                f.first = first;
                let got = table.insert_with(f, now);
                if too_big {
                    assert_eq!(got, Insert::Refused(Refusal::BackendId));
                } else {
                    assert_eq!(got, m.insert(key, backend, first));
                }
            }
            2 => {
                // One key through `track`, or (high bit of b) two through `track_batch`: the
                // burst must give what tracking them one after the other gives.
                let want_of =
                    |m: &mut Model, key: FlowKey, p: Packet| match m.map.get(&key).copied() {
                        Some(e) if m.expired(&e) => {
                            m.map.remove(&key);
                            None
                        }
                        Some(e) => {
                            m.apply(&key, p, false);
                            Some((e.backend, m.map[&key].state))
                        }
                        None => None,
                    };
                if b & 0x80 == 0 && c & 0x40 != 0 {
                    // Through a hint taken some ops ago (if one was kept for this key), which
                    // inserts, removals and expiry since may have made stale: a hint never
                    // changes the result. Then keep a fresh hint for a later op.
                    let key = key_of(b);
                    let hint = match hints[usize::from(b % 4)] {
                        Some((kb, h)) if kb == b => h,
                        _ => Prefetched::of_hash(table.flow_hash(&key)),
                    };
                    let got = table
                        .track_prefetched(hint, &key, packet(c), now)
                        .map(|h| (h.backend.get(), h.state));
                    assert_eq!(got, want_of(&mut m, key, packet(c)));
                    let other = b ^ (c >> 4);
                    hints[usize::from(other % 4)] =
                        Some((other, table.candidate(table.flow_hash(&key_of(other)))));
                } else if b & 0x80 == 0 {
                    let key = key_of(b);
                    let got = table
                        .track(&key, packet(c), now)
                        .map(|h| (h.backend.get(), h.state));
                    assert_eq!(got, want_of(&mut m, key, packet(c)));
                } else {
                    let keys = [key_of(b), key_of((b >> 2) ^ c)];
                    let pkts = [packet(c), packet(c >> 1)];
                    let mut out = [None; 2];
                    table.track_batch(&keys, &pkts, now, &mut out);
                    for j in 0..2 {
                        let got = out[j].map(|h| (h.backend.get(), h.state));
                        assert_eq!(got, want_of(&mut m, keys[j], pkts[j]));
                    }
                }
            }
            3 => {
                now += Duration::from_millis(u64::from(u16::from_le_bytes([b, c])) * 2);
                m.clock = now.as_millis();
            }
            4 => {
                let budget = usize::from(b % 6);
                let got = table.expire(now, budget);
                let mut n = 0;
                for cl in 0..13 {
                    let mut settled = 0;
                    while n < budget {
                        match m.head(cl, false) {
                            Some(k) if m.expired(&m.map[&k]) => {
                                m.map.remove(&k);
                                n += 1;
                            }
                            Some(_) if settled < SETTLE_PER_EXPIRE && m.settle(cl) => settled += 1,
                            _ => break,
                        }
                    }
                }
                assert_eq!(got, n);
            }
            _ => {
                let key = key_of(b);
                assert_eq!(table.remove(&key, now), m.map.remove(&key).is_some());
            }
        }
        assert!(table.len() <= CAP);
        assert_eq!(table.len(), m.map.len());
        let mut live: Vec<_> = table
            .entries(now)
            .iter()
            .map(|e| (e.key, e.backend.get(), e.state))
            .collect();
        live.sort_by_key(|e| e.0);
        let want: Vec<_> = m
            .map
            .iter()
            .filter(|(_, e)| !m.expired(e))
            .map(|(k, e)| (*k, e.backend, e.state))
            .collect();
        assert_eq!(live, want);
        // The next deadline: the earliest of the list heads' (for a head seen since it was
        // queued, the table's clock: at most the model's), and never later than any entry's
        // place implies (queueing time plus timeout), or "now".
        let got = table.next_deadline().map(|d| d.as_millis());
        let heads: Vec<&M> = (0..13)
            .filter_map(|c| m.head(c, false))
            .map(|k| &m.map[&k])
            .collect();
        if heads.iter().any(|e| e.seen) {
            assert!(got.is_some_and(|d| d <= m.clock));
        } else {
            let hd = heads
                .iter()
                .map(|e| e.last + m.t.get(e.state).as_millis() as u64)
                .min();
            assert_eq!(got, hd);
        }
        let nd = m
            .map
            .values()
            .map(|e| e.q + m.t.get(e.state).as_millis() as u64)
            .min();
        assert!(got <= nd || got <= Some(m.clock));
        // Every flow that left was reported once, each reused entry counted as a session that
        // ended: entries = sessions started − sessions reported ended.
        removals += table.drain_removals().count() as u64;
        let c = table.counters();
        assert_eq!(c.removals_lost, 0);
        assert_eq!(table.len() as u64, c.inserts + c.reused - removals);
    }
    let _ = TcpState::None;
});
