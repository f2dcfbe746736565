#![no_main]
//! Connection-table operations from an arbitrary byte string, compared step by step with the
//! crate's reference model (`lb_conntrack::model`, the one its property test uses): results,
//! removal records in order, live entries, counters and the next deadline.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_conntrack::model::Model;
use lb_conntrack::{
    Config, ConnTable, Direction, Insert, NewFlow, Packet, Prefetched, Refusal, TcpFlags, Timeouts,
    MAX_BACKEND_ID,
};
use lb_core::{BackendId, Duration, FlowKey, HashKey, Instant, IpProto};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 6;
const V6CAP: usize = 2;

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
    let mut m = Model::new(&cfg);
    let mut now = Instant::ZERO;
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
                    assert_eq!(got, m.insert(f));
                }
            }
            2 => {
                // One key through `track`, or (high bit of b) two through `track_batch`: the
                // burst must give what tracking them one after the other gives.
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
                        .map(|h| (h.backend.get(), h.state, h.was));
                    assert_eq!(got, m.track(&key, packet(c)));
                    let other = b ^ (c >> 4);
                    hints[usize::from(other % 4)] =
                        Some((other, table.candidate(table.flow_hash(&key_of(other)))));
                } else if b & 0x80 == 0 {
                    let key = key_of(b);
                    let got = table
                        .track(&key, packet(c), now)
                        .map(|h| (h.backend.get(), h.state, h.was));
                    assert_eq!(got, m.track(&key, packet(c)));
                } else {
                    let keys = [key_of(b), key_of((b >> 2) ^ c)];
                    let pkts = [packet(c), packet(c >> 1)];
                    let mut out = [None; 2];
                    table.track_batch(&keys, &pkts, now, &mut out);
                    for j in 0..2 {
                        let got = out[j].map(|h| (h.backend.get(), h.state, h.was));
                        assert_eq!(got, m.track(&keys[j], pkts[j]));
                    }
                }
            }
            3 => {
                now += Duration::from_millis(u64::from(u16::from_le_bytes([b, c])) * 2);
                m.advance(now);
            }
            4 if a & 0x80 != 0 => {
                // The sweep: `c` slots from the table's cursor, removing what has timed out.
                let (slots, budget) = (usize::from(c), usize::from(b % 6));
                let (n, cursor) = m.sweep(&table, CAP, slots, budget);
                assert_eq!(table.sweep(now, slots, budget), n);
                assert_eq!(table.sweep_cursor(), cursor);
            }
            4 => {
                let budget = usize::from(b % 6);
                assert_eq!(table.expire(now, budget), m.expire(budget));
            }
            _ => {
                let key = key_of(b);
                assert_eq!(table.remove(&key, now), m.remove(&key));
            }
        }
        if let Err(e) = m.check(&mut table, now) {
            panic!("table and model differ: {e}");
        }
    }
});
