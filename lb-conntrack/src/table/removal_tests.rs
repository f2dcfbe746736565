//! Tests of removal records: one per way a flow leaves, the ring's bounds, `Hit::was`.

use std::net::{Ipv4Addr, SocketAddr};

use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};

use crate::sync::{apply, RecordOp, SyncReceiver, SyncRecord, SyncSender};
use crate::{
    Config, ConnTable, Direction, EvictReason, FlowState, Insert, Lookup, NewFlow, Packet, Removal,
    RemovalReason, ShardedConnTable, SnatPool, TcpFlags, TcpState,
};

const KEY: HashKey = HashKey::from_bytes(*b"removal-test-key");

fn key(i: u32, proto: IpProto) -> FlowKey {
    FlowKey::v4(
        Ipv4Addr::from(0x0a00_0000 + i),
        2000 + i as u16,
        Ipv4Addr::new(203, 0, 113, 10),
        80,
        proto,
    )
}

fn pkt(flags: TcpFlags, bytes: u32) -> Packet {
    Packet::original(flags, bytes)
}

fn table(cfg: Config) -> ConnTable {
    ConnTable::new(cfg, KEY).unwrap()
}

fn secs(s: u64) -> Instant {
    Instant::from_secs(s)
}

fn drain(t: &mut ConnTable) -> Vec<Removal> {
    t.drain_removals().collect()
}

/// The one removal pending, checked to be alone.
fn only(t: &mut ConnTable) -> Removal {
    let v = drain(t);
    assert_eq!(v.len(), 1, "{v:?}");
    v[0]
}

/// An established TCP flow (SYN at `t0`, ACK of 52 B at `t1`): 2 packets, 112 bytes.
fn established(t: &mut ConnTable, k: FlowKey, b: u32, t0: Instant, t1: Instant) {
    let first = pkt(TcpFlags::SYN, 60);
    assert!(t
        .insert_with(NewFlow::new(k, BackendId(b)).with_first(first), t0)
        .is_inserted());
    let h = t.track(&k, pkt(TcpFlags::ACK, 52), t1).unwrap();
    assert_eq!(h.state, FlowState::Tcp(TcpState::Established));
}

#[test]
fn expire_records_idle_flow_with_its_counters_and_times() {
    let mut t = table(Config::with_capacity(16));
    let k = key(1, IpProto::Udp);
    let t0 = Instant::from_millis(10_500);
    let first = pkt(TcpFlags::NONE, 100);
    t.insert_with(NewFlow::new(k, BackendId(4)).with_first(first), t0);
    t.track(&k, Packet::reply(TcpFlags::NONE, 200), secs(12));
    t.track(&k, pkt(TcpFlags::NONE, 300), secs(13));
    assert_eq!(t.pending_removals(), 0);
    // UDP: 5 min after the last packet.
    assert_eq!(t.expire(secs(13 + 299), 64), 0);
    assert_eq!(t.expire(secs(13 + 300), 64), 1);
    assert_eq!(t.pending_removals(), 1);
    let r = t.poll_removal().unwrap();
    assert_eq!(t.poll_removal(), None);
    assert_eq!(
        r,
        Removal {
            key: k,
            backend: BackendId(4),
            reason: RemovalReason::Expired,
            state: FlowState::Udp,
            nat: None,
            opened: t0,
            last_seen: secs(13),
            packets: 3,
            bytes: 600,
        }
    );
    assert!(r.was_active());
    assert_eq!(t.counters().removals_lost, 0);
}

#[test]
fn closed_tcp_flows_expire_as_closed() {
    let mut t = table(Config::with_capacity(16));
    let (a, b) = (key(1, IpProto::Tcp), key(2, IpProto::Tcp));
    established(&mut t, a, 1, secs(1), secs(2));
    established(&mut t, b, 2, secs(1), secs(2));
    // a: reset → CLOSE (10 s); b: FIN → FIN_WAIT (2 min), which ends as a plain expiry.
    t.track(&a, pkt(TcpFlags::RST, 40), secs(3));
    t.track(&b, pkt(TcpFlags::FIN | TcpFlags::ACK, 40), secs(3));
    assert_eq!(t.expire(secs(13), 64), 1);
    let r = only(&mut t);
    assert_eq!((r.key, r.backend), (a, BackendId(1)));
    assert_eq!(r.reason, RemovalReason::Closed);
    assert_eq!(r.state, FlowState::Tcp(TcpState::Close));
    assert_eq!(
        (r.packets, r.bytes, r.opened, r.last_seen),
        (3, 152, secs(1), secs(3))
    );
    assert!(!r.was_active());
    assert_eq!(t.expire(secs(123), 64), 1);
    let r = only(&mut t);
    assert_eq!((r.key, r.reason), (b, RemovalReason::Expired));
    assert_eq!(r.state, FlowState::Tcp(TcpState::FinWait));
}

#[test]
fn reuse_by_a_new_syn_records_the_old_session() {
    let mut t = table(Config::with_capacity(16));
    let k = key(1, IpProto::Tcp);
    established(&mut t, k, 7, secs(1), secs(2));
    let h = t.track(&k, pkt(TcpFlags::RST, 40), secs(3)).unwrap();
    assert_eq!(h.state, FlowState::Tcp(TcpState::Close));
    assert_eq!(t.pending_removals(), 0);
    // A new SYN on the CLOSE entry: the old session ends, the entry lives on.
    let h = t.track(&k, pkt(TcpFlags::SYN, 64), secs(5)).unwrap();
    assert_eq!(h.was, None);
    assert_eq!(h.state, FlowState::Tcp(TcpState::SynRecv));
    assert!(h.changed);
    let r = only(&mut t);
    assert_eq!(
        r,
        Removal {
            key: k,
            backend: BackendId(7),
            reason: RemovalReason::Closed,
            state: FlowState::Tcp(TcpState::Close),
            nat: None,
            opened: secs(1),
            last_seen: secs(3),
            packets: 3,
            bytes: 152,
        }
    );
    assert_eq!(t.len(), 1);
    assert_eq!(t.counters().reused, 1);
    // The new session's own counters and start time.
    let e = t.get(&k, secs(5)).unwrap();
    assert_eq!((e.packets, e.bytes), (1, 64));
    t.remove(&k, secs(6));
    let r = only(&mut t);
    assert_eq!(
        (r.reason, r.opened, r.packets, r.bytes),
        (RemovalReason::Removed, secs(5), 1, 64)
    );
}

#[test]
fn eviction_records_half_open_then_lru() {
    let cfg = Config {
        ipv6_capacity: 0,
        ..Config::with_capacity(2)
    };
    let mut t = table(cfg);
    let (a, b, c, d) = (
        key(1, IpProto::Tcp),
        key(2, IpProto::Tcp),
        key(3, IpProto::Tcp),
        key(4, IpProto::Tcp),
    );
    established(&mut t, a, 1, secs(1), secs(2));
    t.insert_with(
        NewFlow::new(b, BackendId(2)).with_first(pkt(TcpFlags::SYN, 60)),
        secs(3),
    );
    let got = t.insert_with(
        NewFlow::new(c, BackendId(3)).with_first(pkt(TcpFlags::ACK, 40)),
        secs(4),
    );
    assert_eq!(
        got,
        Insert::Evicted {
            victim: b,
            reason: EvictReason::HalfOpen
        }
    );
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.backend, r.reason),
        (b, BackendId(2), RemovalReason::EvictedHalfOpen)
    );
    assert_eq!(r.state, FlowState::Tcp(TcpState::SynRecv));
    assert_eq!(
        (r.packets, r.bytes, r.opened, r.last_seen),
        (1, 60, secs(3), secs(3))
    );
    // Only established flows left (a, c): the least recently used goes.
    let got = t.insert_with(NewFlow::new(d, BackendId(4)), secs(5));
    assert!(matches!(got, Insert::Evicted { victim, reason: EvictReason::Lru } if victim == a));
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.backend, r.reason),
        (a, BackendId(1), RemovalReason::EvictedLru)
    );
    assert_eq!(r.state, FlowState::Tcp(TcpState::Established));
    assert_eq!(
        (r.packets, r.bytes, r.opened, r.last_seen),
        (2, 112, secs(1), secs(2))
    );
    assert_eq!(t.len(), 2);
}

#[test]
fn explicit_removal_both_ways() {
    let mut t = table(Config::with_capacity(16));
    let (a, b) = (key(1, IpProto::Udp), key(2, IpProto::Icmp));
    t.insert_with(
        NewFlow::new(a, BackendId(1)).with_first(pkt(TcpFlags::NONE, 10)),
        secs(1),
    );
    t.insert_with(
        NewFlow::new(b, BackendId(2)).with_first(pkt(TcpFlags::NONE, 20)),
        secs(2),
    );
    assert!(t.remove(&a, secs(3)));
    assert!(!t.remove(&a, secs(3)));
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.backend, r.reason, r.state),
        (
            a,
            BackendId(1),
            RemovalReason::Removed,
            FlowState::UdpUnconfirmed
        )
    );
    assert_eq!(
        (r.packets, r.bytes, r.opened, r.last_seen),
        (1, 10, secs(1), secs(1))
    );
    match t.lookup(&b, secs(4)) {
        Lookup::Hit(e) => e.remove(),
        other => panic!("{other:?}"),
    }
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.reason, r.state, r.bytes),
        (b, RemovalReason::Removed, FlowState::Icmp, 20)
    );
    assert!(t.is_empty());
}

#[test]
fn lookups_and_inserts_meeting_timed_out_entries_record_them() {
    let mut t = table(Config::with_capacity(16));
    let (a, b, c) = (
        key(1, IpProto::Udp),
        key(2, IpProto::Tcp),
        key(3, IpProto::Udp),
    );
    let first = pkt(TcpFlags::NONE, 10);
    t.insert_with(NewFlow::new(a, BackendId(1)).with_first(first), secs(1));
    established(&mut t, b, 2, secs(1), secs(1));
    t.track(&b, pkt(TcpFlags::RST, 40), secs(1));
    t.insert_with(NewFlow::new(c, BackendId(3)).with_first(first), secs(1));
    let late = secs(1000);
    // lookup: UDP unconfirmed (30 s) timed out.
    assert!(matches!(
        t.lookup(&a, late),
        Lookup::Expired {
            backend: BackendId(1)
        }
    ));
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.reason, r.state, r.last_seen),
        (
            a,
            RemovalReason::Expired,
            FlowState::UdpUnconfirmed,
            secs(1)
        )
    );
    // track: a timed-out CLOSE entry ends as closed.
    assert!(t.track(&b, pkt(TcpFlags::ACK, 40), late).is_none());
    let r = only(&mut t);
    assert_eq!((r.key, r.reason, r.packets), (b, RemovalReason::Closed, 3));
    // insert of the same key: the old entry is recorded, the new one starts afresh.
    assert_eq!(
        t.insert_with(NewFlow::new(c, BackendId(9)), late),
        Insert::New
    );
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.backend, r.reason, r.opened),
        (c, BackendId(3), RemovalReason::Expired, secs(1))
    );
    assert_eq!(t.counters().expired_on_lookup, 2);
    assert_eq!(t.len(), 1);
}

#[test]
fn nat_flows_report_their_tuple_on_every_path() {
    let cfg = Config {
        nat: true,
        ..Config::with_capacity(16)
    };
    let mut t = table(cfg);
    let snat: std::net::IpAddr = "198.51.100.1".parse().unwrap();
    let mut pool = SnatPool::new(vec![snat], 40000..=40001).unwrap();
    pool.add_backend(BackendId(5));
    t.set_snat_pool(pool);
    let k = key(1, IpProto::Tcp);
    let backend: SocketAddr = "192.0.2.50:8080".parse().unwrap();
    let flow = NewFlow::new(k, BackendId(5)).with_first(pkt(TcpFlags::SYN, 60));
    assert_eq!(flow.initial_state(), FlowState::Tcp(TcpState::SynRecv));
    let (out, reply) = t.insert_snat(flow, backend, secs(1));
    assert!(out.is_inserted());
    let reply = reply.unwrap();
    // The reply path meets the entry timed out (SYN_RECV: 1 min).
    assert!(t
        .track_reply(&reply, Packet::reply(TcpFlags::ACK, 40), secs(100))
        .is_none());
    let r = only(&mut t);
    assert_eq!(
        (r.key, r.nat, r.reason),
        (k, Some(reply), RemovalReason::Expired)
    );
    assert_eq!(r.state, FlowState::Tcp(TcpState::SynRecv));
}

#[test]
fn sync_deletes_are_recorded_as_such() {
    let mac = HashKey::from_bytes([3; 16]);
    let now = secs(10);
    let mut backup = table(Config::with_capacity(16));
    let k = key(1, IpProto::Tcp);
    let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
    tx.set_echo(1);
    let mut rx = SyncReceiver::new(mac, 1);
    let rec = SyncRecord {
        op: RecordOp::New,
        key: k,
        backend: BackendId(3),
        backend_tag: None,
        state: FlowState::Tcp(TcpState::Established),
        remaining_ms: 60_000,
        nat: None,
        persist: None,
    };
    let mut msgs = Vec::new();
    tx.encode(&[rec], &mut msgs);
    tx.encode(
        &[SyncRecord {
            op: RecordOp::Delete,
            ..rec
        }],
        &mut msgs,
    );
    let m0 = rx.receive(&msgs[0]).unwrap();
    assert_eq!(apply(&mut backup, &m0.message, now).installed, 1);
    assert_eq!(backup.pending_removals(), 0);
    let m1 = rx.receive(&msgs[1]).unwrap();
    assert_eq!(apply(&mut backup, &m1.message, secs(11)).deleted, 1);
    let r = only(&mut backup);
    assert_eq!(
        (r.key, r.backend, r.reason),
        (k, BackendId(3), RemovalReason::SyncDelete)
    );
    assert_eq!(r.state, FlowState::Tcp(TcpState::Established));
    assert!(backup.is_empty());
}

#[test]
fn expire_never_overflows_a_small_ring() {
    let cfg = Config {
        removal_queue: 8,
        ..Config::with_capacity(256)
    };
    let mut t = table(cfg);
    for i in 0..100 {
        t.insert_with(NewFlow::new(key(i, IpProto::Udp), BackendId(1)), secs(1));
    }
    let late = secs(10_000);
    let mut seen = std::collections::BTreeSet::new();
    let mut calls = 0;
    while !t.is_empty() {
        calls += 1;
        let free = 8 - t.pending_removals();
        let n = t.expire(late, 1_000);
        assert!(n <= free, "{n} > {free}");
        assert_eq!(n, 8.min(100 - seen.len()));
        // A full ring stops expire until drained.
        assert_eq!(t.expire(late, 1_000), 0);
        for r in t.drain_removals() {
            assert_eq!(r.reason, RemovalReason::Expired);
            assert!(seen.insert(r.key), "reported twice: {:?}", r.key);
        }
        assert!(calls <= 13);
    }
    assert_eq!(seen.len(), 100);
    assert_eq!(t.counters().expired, 100);
    assert_eq!(t.counters().removals_lost, 0);
}

#[test]
fn a_full_ring_loses_per_packet_removals_and_counts_them() {
    let cfg = Config {
        removal_queue: 1,
        ..Config::with_capacity(16)
    };
    let mut t = table(cfg);
    for i in 0..3 {
        t.insert_with(NewFlow::new(key(i, IpProto::Udp), BackendId(1)), secs(1));
    }
    for i in 0..3 {
        assert!(t
            .track(&key(i, IpProto::Udp), pkt(TcpFlags::NONE, 1), secs(100))
            .is_none());
    }
    assert_eq!(t.pending_removals(), 1);
    assert_eq!(t.counters().removals_lost, 2);
    assert_eq!(t.poll_removal().map(|r| r.key), Some(key(0, IpProto::Udp)));
    assert!(t.is_empty());
}

#[test]
fn recording_off_costs_nothing_and_expire_is_uncapped() {
    let cfg = Config {
        removal_queue: 0,
        ..Config::with_capacity(64)
    };
    let mut t = table(cfg);
    assert_eq!(t.memory().removals, 0);
    for i in 0..40 {
        t.insert_with(NewFlow::new(key(i, IpProto::Udp), BackendId(1)), secs(1));
    }
    assert_eq!(t.expire(secs(10_000), 1_000), 40);
    assert_eq!((t.pending_removals(), t.poll_removal()), (0, None));
    assert_eq!(t.counters().removals_lost, 0);
    let on = table(Config::with_capacity(64));
    assert_eq!(on.memory().removals, 4096 * core::mem::size_of::<Removal>());
    assert!(Config {
        removal_queue: crate::MAX_CAPACITY + 1,
        ..Config::default()
    }
    .validate()
    .is_err());
}

#[test]
fn hit_was_reports_every_transition() {
    let mut t = table(Config::with_capacity(16));
    let k = key(1, IpProto::Tcp);
    let syn = pkt(TcpFlags::SYN, 60);
    let flow = NewFlow::new(k, BackendId(1)).with_first(syn);
    assert_eq!(flow.initial_state(), FlowState::Tcp(TcpState::SynRecv));
    t.insert_with(flow, secs(1));
    assert_eq!(t.get(&k, secs(1)).unwrap().state, flow.initial_state());
    use Direction::{Original as O, Reply as R};
    use TcpState::{CloseWait, Established, SynRecv, TimeWait};
    let steps = [
        (R, TcpFlags::SYN | TcpFlags::ACK, SynRecv, SynRecv),
        (O, TcpFlags::ACK, SynRecv, Established),
        (O, TcpFlags::ACK, Established, Established),
        (O, TcpFlags::FIN | TcpFlags::ACK, Established, CloseWait),
        (R, TcpFlags::FIN | TcpFlags::ACK, CloseWait, TimeWait),
        (O, TcpFlags::ACK, TimeWait, TimeWait),
    ];
    for (n, (dir, flags, was, now)) in steps.into_iter().enumerate() {
        let p = Packet {
            dir,
            tcp_flags: flags,
            bytes: 40,
            segments: 1,
        };
        let h = t.track(&k, p, secs(2 + n as u64)).unwrap();
        assert_eq!(h.was, Some(FlowState::Tcp(was)), "step {n}");
        assert_eq!(h.state, FlowState::Tcp(now), "step {n}");
        assert_eq!(h.changed, was != now, "step {n}");
        assert_eq!(h.state.is_active(), now == Established);
    }
    assert_eq!(t.pending_removals(), 0);
    let h = t.track(&k, syn, secs(20)).unwrap();
    assert_eq!((h.was, h.state), (None, FlowState::Tcp(SynRecv)));
    assert_eq!(only(&mut t).state, FlowState::Tcp(TimeWait));
    // UDP: unconfirmed until a reply.
    let u = key(2, IpProto::Udp);
    let first = pkt(TcpFlags::NONE, 10);
    let flow = NewFlow::new(u, BackendId(1)).with_first(first);
    assert_eq!(flow.initial_state(), FlowState::UdpUnconfirmed);
    t.insert_with(flow, secs(30));
    let h = t
        .track(&u, Packet::reply(TcpFlags::NONE, 10), secs(31))
        .unwrap();
    assert_eq!(
        (h.was, h.state, h.changed),
        (Some(FlowState::UdpUnconfirmed), FlowState::Udp, true)
    );
}

#[test]
fn initial_state_matches_the_inserted_entry() {
    let flags = [0u8, 0x02, 0x10, 0x01, 0x12, 0x04, 0x11];
    let mut n = 0;
    for proto in [
        IpProto::Tcp,
        IpProto::Udp,
        IpProto::Icmp,
        IpProto::Other(47),
    ] {
        for nat in [false, true] {
            for reply in [false, true] {
                for f in [None].into_iter().chain(flags.map(Some)) {
                    let cfg = Config {
                        nat: true,
                        ..Config::with_capacity(4)
                    };
                    let mut t = table(cfg);
                    n += 1;
                    let k = key(n, proto);
                    let mut flow = NewFlow::new(k, BackendId(1));
                    if nat {
                        flow = flow.with_nat(FlowKey::v4(
                            [192, 0, 2, 9].into(),
                            80,
                            [198, 51, 100, 1].into(),
                            n as u16,
                            proto,
                        ));
                    }
                    if let Some(f) = f {
                        let dir = if reply {
                            Direction::Reply
                        } else {
                            Direction::Original
                        };
                        flow = flow.with_first(Packet {
                            dir,
                            tcp_flags: TcpFlags(f),
                            bytes: 1,
                            segments: 1,
                        });
                    }
                    assert!(t.insert_with(flow, secs(1)).is_inserted());
                    assert_eq!(
                        t.get(&k, secs(1)).unwrap().state,
                        flow.initial_state(),
                        "{flow:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn active_states_follow_ipvs() {
    for s in TcpState::ALL {
        assert_eq!(
            FlowState::Tcp(s).is_active(),
            s == TcpState::Established,
            "{s}"
        );
    }
    for s in [
        FlowState::UdpUnconfirmed,
        FlowState::Udp,
        FlowState::Icmp,
        FlowState::Other,
    ] {
        assert!(s.is_active());
    }
}

#[test]
fn sharded_tables_drain_every_shard() {
    let cfg = Config {
        removal_queue: 64,
        ..Config::with_capacity(256)
    };
    let t = ShardedConnTable::new(4, cfg, KEY).unwrap();
    for i in 0..40 {
        assert!(t
            .insert_with(NewFlow::new(key(i, IpProto::Udp), BackendId(i)), secs(1))
            .is_inserted());
    }
    assert!(t.remove(&key(0, IpProto::Udp), secs(2)));
    // 16 records per shard: expire takes at most the ring's room in each.
    let mut n = t.expire(secs(10_000), 1_000);
    assert_eq!(t.pending_removals(), n + 1);
    let first = t.poll_removal().unwrap();
    let mut got: Vec<Removal> = vec![first];
    got.extend(t.drain_removals());
    while !t.is_empty() {
        n += t.expire(secs(10_000), 1_000);
        got.extend(t.drain_removals());
    }
    assert_eq!(n, 39);
    assert_eq!(t.pending_removals(), 0);
    assert_eq!(t.poll_removal(), None);
    let mut keys: Vec<FlowKey> = got.iter().map(|r| r.key).collect();
    keys.sort();
    let mut want: Vec<FlowKey> = (0..40).map(|i| key(i, IpProto::Udp)).collect();
    want.sort();
    assert_eq!(keys, want);
    assert!(got
        .iter()
        .all(|r| r.backend.get() == u32::from(r.key.src_port() - 2000)));
    assert_eq!(
        got.iter()
            .filter(|r| r.reason == RemovalReason::Removed)
            .count(),
        1
    );
    assert_eq!(t.counters().removals_lost, 0);
}
