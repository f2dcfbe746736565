//! Tests of the table: behaviour, a reference model, the flood scenario, memory.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_core::{BackendId, Duration, FlowKey, HashKey, Instant, IpProto};
use proptest::prelude::*;

use super::SETTLE_PER_EXPIRE;
use crate::entry::Packet;
use crate::entry::NIL;
use crate::model::Model;
use crate::persist::{Service, TemplateKey};
use crate::tcp_state::{Direction, TcpFlags, TcpState};
use crate::timeout::{FlowState, Timeouts};
use crate::{
    Config, ConnTable, EvictReason, Insert, Lookup, NewFlow, Prefetched, Refusal, RemovalReason,
    SnatPool,
};

const KEY: HashKey = HashKey::from_bytes(*b"conntrack-test-k");

fn k4(i: u32, proto: IpProto) -> FlowKey {
    FlowKey::v4(
        Ipv4Addr::from(0x0a00_0000 + i),
        1024 + (i % 50_000) as u16,
        Ipv4Addr::new(203, 0, 113, 10),
        80,
        proto,
    )
}

fn k6(i: u32) -> FlowKey {
    FlowKey::v6(
        Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)),
        5000,
        "2001:db8::10".parse().unwrap(),
        443,
        IpProto::Tcp,
    )
}

fn syn() -> Packet {
    Packet::original(TcpFlags::SYN, 60)
}

fn ack() -> Packet {
    Packet::original(TcpFlags::ACK, 52)
}

fn table(cap: usize) -> ConnTable {
    ConnTable::new(Config::with_capacity(cap), KEY).unwrap()
}

#[test]
fn insert_lookup_update_remove() {
    let mut t = table(16);
    let k = k4(1, IpProto::Tcp);
    let now = Instant::from_secs(5);
    assert!(matches!(t.lookup(&k, now), Lookup::Miss));
    assert_eq!(
        t.insert_with(NewFlow::new(k, BackendId(9)).with_first(syn()), now),
        Insert::New
    );
    assert_eq!(t.insert(k, BackendId(1), None, now), Insert::Exists);
    match t.lookup(&k, now) {
        Lookup::Hit(mut e) => {
            assert_eq!(e.backend(), BackendId(9));
            assert_eq!(e.state(), FlowState::Tcp(TcpState::SynRecv));
            let h = e.update(ack(), now);
            assert!(h.changed);
            assert_eq!(e.info().packets, 2);
            assert_eq!(e.info().bytes, 112);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        t.get(&k, now).map(|e| e.state),
        Some(FlowState::Tcp(TcpState::Established))
    );
    assert!(t.remove(&k, now));
    assert!(!t.remove(&k, now));
    assert!(t.is_empty());
    let c = t.counters();
    assert_eq!(
        (c.hits, c.misses, c.inserts, c.exists, c.removed),
        (1, 1, 1, 1, 1)
    );
}

#[test]
fn lookup_reports_expired_and_removes() {
    let mut t = table(16);
    let k = k4(2, IpProto::Udp);
    t.insert_with(
        NewFlow::new(k, BackendId(4)).with_first(Packet::original(TcpFlags::NONE, 100)),
        Instant::ZERO,
    );
    // Unconfirmed UDP: 30 s.
    assert!(t
        .track(
            &k,
            Packet::original(TcpFlags::NONE, 1),
            Instant::from_secs(29)
        )
        .is_some());
    // Now confirmed: 300 s from the last packet.
    assert!(matches!(
        t.lookup(&k, Instant::from_secs(300)),
        Lookup::Hit(_)
    ));
    assert!(matches!(
        t.lookup(&k, Instant::from_secs(329)),
        Lookup::Expired {
            backend: BackendId(4)
        }
    ));
    assert!(t.is_empty());
}

#[test]
fn time_wait_is_reused_by_syn() {
    let mut t = table(8);
    let k = k4(3, IpProto::Tcp);
    let t0 = Instant::from_secs(1);
    t.insert_with(NewFlow::new(k, BackendId(1)).with_first(syn()), t0);
    for p in [
        ack(),
        Packet::reply(TcpFlags::FIN, 52),
        Packet::original(TcpFlags::FIN, 52),
    ] {
        t.track(&k, p, t0);
    }
    assert_eq!(
        t.get(&k, t0).map(|e| e.state),
        Some(FlowState::Tcp(TcpState::TimeWait))
    );
    let h = t.track(&k, syn(), Instant::from_secs(2)).unwrap();
    assert_eq!(h.state, FlowState::Tcp(TcpState::SynRecv));
    assert_eq!(h.backend, BackendId(1));
    assert_eq!(t.counters().reused, 1);
    assert_eq!(t.get(&k, Instant::from_secs(2)).map(|e| e.packets), Some(1));
    assert_eq!(t.sessions().overall().packets.count(), 1);
}

#[test]
fn expire_is_bounded_and_deadline_is_exact() {
    let mut t = table(64);
    for i in 0..50 {
        t.insert_with(
            NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn()),
            Instant::from_millis(u64::from(i)),
        );
    }
    // SYN_RECV: 60 s after each insert.
    assert_eq!(t.next_deadline(), Some(Instant::from_secs(60)));
    let late = Instant::from_secs(100);
    assert_eq!(t.expire(late, 20), 20);
    assert_eq!(t.next_deadline(), Some(Instant::from_millis(60_020)));
    assert_eq!(t.expire(late, 1000), 30);
    assert_eq!(t.next_deadline(), None);
    assert_eq!(t.counters().expired, 50);
}

#[test]
fn a_hit_leaves_its_entry_in_place_and_expire_moves_it() {
    // Lazy re-queueing: 300 flows seen again at 1 s wait at the head of the SYN_RECV list in
    // front of an idle flow queued after them. Each `expire` moves at most
    // SETTLE_PER_EXPIRE of them, so the idle flow (due at 60 s) goes in the second call at
    // 60.5 s; the busy ones (due at 61 s) are never removed early.
    let busy = SETTLE_PER_EXPIRE as u32 + 44;
    let mut t = table(1024);
    let t0 = Instant::ZERO;
    for i in 0..busy {
        let flow = NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn());
        assert!(t.insert_with(flow, t0).is_inserted());
    }
    let idle = k4(busy, IpProto::Tcp);
    assert!(t
        .insert_with(NewFlow::new(idle, BackendId(0)).with_first(syn()), t0)
        .is_inserted());
    let t1 = Instant::from_secs(1);
    for i in 0..busy {
        let h = t.track(&k4(i, IpProto::Tcp), syn(), t1).expect("tracked");
        assert_eq!(h.state, FlowState::Tcp(TcpState::SynRecv));
    }
    // The head was seen since it was queued: "due now, call expire".
    assert_eq!(t.next_deadline(), Some(t1));
    let t2 = Instant::from_millis(60_500);
    assert_eq!(t.expire(t2, 10_000), 0);
    assert_eq!(t.expire(t2, 10_000), 1);
    assert!(matches!(t.lookup(&idle, t2), Lookup::Miss));
    assert_eq!(t.expire(t2, 10_000), 0);
    assert_eq!(t.len(), busy as usize);
    // Every busy flow has been moved behind: the head is the first of them, due at 61 s.
    assert_eq!(t.next_deadline(), Some(Instant::from_secs(61)));
    assert_eq!(
        t.expire(Instant::from_millis(61_500), 10_000),
        busy as usize
    );
    assert_eq!(t.counters().expired, u64::from(busy) + 1);
}

#[test]
fn a_flow_seen_then_idle_waits_in_its_list_and_the_sweep_removes_it() {
    // SYN_RECV entries, 60 s. `a` queued at 0 and idle; `b` queued at 0, seen at 1 s, idle
    // (due at 61 s); `c` queued at 30 s and seen every 10 s; `d` queued at 59 s, idle (due at
    // 119 s). At 60.5 s `expire` removes `a` and moves the seen `b` and `c` behind `d`, so `b`
    // waits for `d`: `expire` alone would remove it at 119 s, 58 s late.
    let mut t = table(64);
    let f = |i| NewFlow::new(k4(i, IpProto::Tcp), BackendId(i)).with_first(syn());
    let s = Instant::from_secs;
    assert!(t.insert_with(f(0), s(0)).is_inserted());
    assert!(t.insert_with(f(1), s(0)).is_inserted());
    assert!(t.track(&k4(1, IpProto::Tcp), syn(), s(1)).is_some());
    assert!(t.insert_with(f(2), s(30)).is_inserted());
    for at in [40, 50, 59] {
        assert!(t.track(&k4(2, IpProto::Tcp), syn(), s(at)).is_some());
    }
    assert!(t.insert_with(f(3), s(59)).is_inserted());
    let r: Vec<_> = t.drain_removals().collect();
    assert!(r.is_empty());
    assert_eq!(t.expire(Instant::from_millis(60_500), 100), 1);
    assert_eq!(
        t.drain_removals().map(|r| r.key).collect::<Vec<_>>(),
        [k4(0, IpProto::Tcp)]
    );
    let late = Instant::from_millis(61_500);
    assert_eq!(t.expire(late, 100), 0);
    assert_eq!(
        t.len(),
        3,
        "b is still counted, a second after its deadline"
    );
    // The sweep finds it where it is.
    let expired = t.counters().expired;
    assert_eq!(t.sweep(late, 64, 100), 1);
    let r: Vec<_> = t.drain_removals().collect();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].key, k4(1, IpProto::Tcp));
    assert_eq!(r[0].reason, RemovalReason::Expired);
    assert_eq!(r[0].backend, BackendId(1));
    assert_eq!(r[0].last_seen, s(1));
    assert_eq!(t.counters().expired, expired + 1);
    assert_eq!(t.counters().swept, 1);
    assert_eq!(t.len(), 2);
    // The others are live: the sweep leaves them, and `expire` takes `d` at its deadline.
    assert_eq!(t.sweep(late, 64, 100), 0);
    assert!(t.get(&k4(2, IpProto::Tcp), late).is_some());
    assert!(t.track(&k4(2, IpProto::Tcp), syn(), s(110)).is_some());
    assert_eq!(t.expire(s(120), 100), 1);
    assert_eq!(
        t.drain_removals().map(|r| r.key).collect::<Vec<_>>(),
        [k4(3, IpProto::Tcp)]
    );
}

#[test]
fn the_sweep_resumes_where_it_stopped_within_its_budget_and_the_ring() {
    let cfg = Config {
        removal_queue: 4,
        ..Config::with_capacity(16)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let s = Instant::from_secs;
    // Ten flows in slots 0..10 (a fresh table hands out its slots in order), due at 60 s,
    // and two more, due at 130 s.
    for i in 0..12 {
        let at = if i < 10 { s(0) } else { s(70) };
        let flow = NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn());
        assert!(t.insert_with(flow, at).is_inserted());
    }
    let now = s(100);
    let slot = |t: &ConnTable, i: u32| t.slot_of(&k4(i, IpProto::Tcp));
    assert_eq!(slot(&t, 0), Some(0));
    assert_eq!(slot(&t, 9), Some(9));
    // Budget 0: nothing looked at.
    assert_eq!(t.sweep(now, 16, 0), 0);
    assert_eq!(t.sweep_cursor(), 0);
    // Three slots: three removed.
    assert_eq!(t.sweep(now, 3, 100), 3);
    assert_eq!(t.sweep_cursor(), 3);
    // The ring holds four records: one more, then it is full and the sweep stops at once.
    assert_eq!(t.sweep(now, 16, 100), 1);
    assert_eq!(t.sweep_cursor(), 4);
    assert_eq!(t.sweep(now, 16, 100), 0);
    assert_eq!(t.sweep_cursor(), 4);
    assert_eq!(t.drain_removals().count(), 4);
    // A budget of 2 stops after the second removal, at the slot after it.
    assert_eq!(t.sweep(now, 16, 2), 2);
    assert_eq!(t.sweep_cursor(), 6);
    assert_eq!(t.drain_removals().count(), 2);
    // The rest: four, which fill the ring again, so the sweep stops after slot 9.
    assert_eq!(t.sweep(now, 100, 100), 4);
    assert_eq!(t.sweep_cursor(), 10);
    assert_eq!(t.len(), 2);
    assert_eq!((t.counters().expired, t.counters().swept), (10, 10));
    let keys: Vec<_> = t.drain_removals().map(|r| r.key).collect();
    assert_eq!(
        keys,
        (6..10).map(|i| k4(i, IpProto::Tcp)).collect::<Vec<_>>()
    );
    // A whole turn from 10 (wrapping around) ends at 10; the two young flows stay.
    assert_eq!(t.sweep(now, 100, 100), 0);
    assert_eq!(t.sweep_cursor(), 10);
    assert_eq!(t.len(), 2);
}

#[test]
fn full_table_evicts_half_open_then_lru_or_refuses() {
    let mut t = table(4);
    let now = Instant::from_secs(1);
    for i in 0..3 {
        t.insert_with(
            NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn()),
            now,
        );
        t.track(&k4(i, IpProto::Tcp), ack(), now);
    }
    t.insert_with(
        NewFlow::new(k4(10, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    let r = t.insert_with(
        NewFlow::new(k4(11, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    assert_eq!(
        r,
        Insert::Evicted {
            victim: k4(10, IpProto::Tcp),
            reason: EvictReason::HalfOpen
        }
    );
    // Make k4(11) established too: no half-open left, LRU goes (k4(0) is the oldest touched).
    t.track(&k4(11, IpProto::Tcp), ack(), Instant::from_secs(2));
    for i in 1..3 {
        t.track(&k4(i, IpProto::Tcp), ack(), Instant::from_secs(2));
    }
    let r = t.insert_with(
        NewFlow::new(k4(12, IpProto::Tcp), BackendId(0)),
        Instant::from_secs(2),
    );
    assert_eq!(
        r,
        Insert::Evicted {
            victim: k4(0, IpProto::Tcp),
            reason: EvictReason::Lru
        }
    );
    assert_eq!(t.counters().evicted_half_open, 1);
    assert_eq!(t.counters().evicted_lru, 1);

    let cfg = Config {
        evict_established: false,
        ..Config::with_capacity(1)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    t.insert_with(
        NewFlow::new(k4(1, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    t.track(&k4(1, IpProto::Tcp), ack(), now);
    let r = t.insert(k4(2, IpProto::Tcp), BackendId(0), None, now);
    assert_eq!(r, Insert::Refused(Refusal::TableFull));
    assert_eq!(t.counters().refused_full, 1);
}

#[test]
fn ipv6_store_is_bounded_and_evicts_v6() {
    let cfg = Config {
        ipv6_capacity: 2,
        ..Config::with_capacity(8)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let now = Instant::from_secs(1);
    for i in 0..4 {
        t.insert_with(
            NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn()),
            now,
        );
    }
    t.insert_with(NewFlow::new(k6(1), BackendId(0)).with_first(syn()), now);
    t.insert_with(NewFlow::new(k6(2), BackendId(0)).with_first(syn()), now);
    let r = t.insert_with(NewFlow::new(k6(3), BackendId(0)).with_first(syn()), now);
    assert_eq!(
        r,
        Insert::Evicted {
            victim: k6(1),
            reason: EvictReason::HalfOpen
        }
    );
    assert!(t.get(&k6(3), now).is_some());
    assert_eq!(t.get(&k6(3), now).map(|e| e.key), Some(k6(3)));
    assert_eq!(t.len(), 6);
}

/// `room` counts the insertions left before one must evict: free slots, and with an IPv6
/// store the free address pairs if fewer; at 0 the next insertion evicts.
#[test]
fn room_counts_insertions_before_an_eviction() {
    let cfg = Config {
        ipv6_capacity: 2,
        ..Config::with_capacity(8)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let now = Instant::from_secs(1);
    assert_eq!(t.room(), 2, "two IPv6 pairs");
    t.insert_with(NewFlow::new(k6(1), BackendId(0)).with_first(syn()), now);
    assert_eq!(t.room(), 1);
    t.insert_with(
        NewFlow::new(k4(1, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    assert_eq!(t.room(), 1, "slots are not the bound yet");
    let cfg = Config {
        ipv6_capacity: 0,
        ..Config::with_capacity(4)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    for i in 0..4 {
        assert_eq!(t.room(), 4 - i as usize);
        let r = t.insert_with(
            NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn()),
            now,
        );
        assert_eq!(r, Insert::New);
    }
    assert_eq!(t.room(), 0);
    let r = t.insert_with(
        NewFlow::new(k4(9, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    assert!(matches!(r, Insert::Evicted { .. }), "{r:?}");
    assert!(t.remove(&k4(9, IpProto::Tcp), now));
    assert_eq!(t.room(), 1);
}

/// A 16-entry full-NAT table with an SNAT pool of `ports` on one address (returned) for
/// `backends`.
fn nat_table(
    ports: std::ops::RangeInclusive<u16>,
    backends: &[u32],
) -> (ConnTable, std::net::IpAddr) {
    let cfg = Config {
        nat: true,
        ..Config::with_capacity(16)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let snat: std::net::IpAddr = "198.51.100.1".parse().unwrap();
    let mut pool = SnatPool::new(vec![snat], ports).unwrap();
    for &b in backends {
        pool.add_backend(BackendId(b));
    }
    t.set_snat_pool(pool);
    (t, snat)
}

/// A reply that finds its flow timed out removes it there (as a forward lookup would): no
/// hit, no reply miss, one `expired_on_lookup`, and the SNAT port free for the next flow.
#[test]
fn a_reply_to_a_timed_out_flow_removes_it() {
    let (mut t, _) = nat_table(40000..=40000, &[5]);
    let backend_addr = "10.1.0.5:8080".parse().unwrap();
    let now = Instant::from_secs(1);
    let (r, reply) = t.insert_snat(
        NewFlow::new(k4(1, IpProto::Tcp), BackendId(5)).with_first(syn()),
        backend_addr,
        now,
    );
    assert_eq!(r, Insert::New);
    let reply = reply.unwrap();
    let late = Instant::from_secs(1000);
    assert!(t
        .track_reply(&reply, Packet::reply(TcpFlags::ACK, 40), late)
        .is_none());
    let c = t.counters();
    assert_eq!(
        (c.reply_hits, c.reply_misses, c.expired_on_lookup),
        (0, 0, 1)
    );
    assert_eq!(t.len(), 0);
    let r = t.poll_removal().unwrap();
    assert_eq!(
        (r.key, r.reason),
        (k4(1, IpProto::Tcp), RemovalReason::Expired)
    );
    // Gone now: a second reply is a plain miss.
    assert!(t
        .track_reply(&reply, Packet::reply(TcpFlags::ACK, 40), late)
        .is_none());
    assert_eq!(t.counters().reply_misses, 1);
    let (r2, reply2) = t.insert_snat(
        NewFlow::new(k4(2, IpProto::Tcp), BackendId(5)),
        backend_addr,
        late,
    );
    assert_eq!((r2, reply2), (Insert::New, Some(reply)));
}

#[test]
fn full_nat_reply_lookup_and_port_release() {
    let (mut t, snat) = nat_table(40000..=40000, &[5]);
    let k = k4(1, IpProto::Tcp);
    let now = Instant::from_secs(1);
    let backend_addr = "10.1.0.5:8080".parse().unwrap();
    let (r, reply) = t.insert_snat(
        NewFlow::new(k, BackendId(5)).with_first(syn()),
        backend_addr,
        now,
    );
    assert_eq!(r, Insert::New);
    let reply = reply.unwrap();
    assert_eq!((reply.dst(), reply.dst_port()), (snat, 40000));
    assert_eq!(reply.src_port(), 8080);
    // No pool for a backend that was not registered. (A registered backend's empty pool would
    // reclaim this half-open flow's port: see `pressure_tests`.)
    let (r2, _) = t.insert_snat(
        NewFlow::new(k4(2, IpProto::Tcp), BackendId(6)),
        backend_addr,
        now,
    );
    assert_eq!(r2, Insert::Refused(Refusal::PortsExhausted));
    let (orig, hit) = t
        .track_reply(
            &reply,
            Packet::reply(TcpFlags::SYN | TcpFlags::ACK, 60),
            now,
        )
        .unwrap();
    assert_eq!(orig, k);
    assert_eq!(hit.nat, Some(reply));
    assert_eq!(t.counters().reply_hits, 1);
    // The burst path: prefetch the reply's lines, then look it up by its precomputed hash.
    let h = t.flow_hash(&reply);
    t.prefetch_replies(&[h, h ^ (1 << 63)]);
    t.prefetch(&[t.flow_hash(&k)]);
    let (orig2, hit2) = t
        .track_reply_hashed(
            h,
            &reply,
            Packet::reply(TcpFlags::SYN | TcpFlags::ACK, 60),
            now,
        )
        .unwrap();
    assert_eq!((orig2, hit2.backend), (k, BackendId(5)));
    assert!(t
        .track_reply_hashed(h ^ (1 << 63), &reply, Packet::reply(TcpFlags::SYN, 60), now)
        .is_none());
    assert_eq!(t.counters().reply_hits, 2);
    // A conflicting manual reply tuple is refused.
    let r3 = t.insert(k4(3, IpProto::Tcp), BackendId(5), Some(reply), now);
    assert_eq!(r3, Insert::Refused(Refusal::NatConflict));
    // Expiry releases the port: the next flow gets it.
    assert_eq!(t.expire(Instant::from_secs(100), 10), 1);
    assert!(t
        .track_reply(
            &reply,
            Packet::reply(TcpFlags::ACK, 1),
            Instant::from_secs(100)
        )
        .is_none());
    let (r4, reply4) = t.insert_snat(
        NewFlow::new(k4(2, IpProto::Tcp), BackendId(5)),
        backend_addr,
        Instant::from_secs(100),
    );
    assert_eq!(r4, Insert::New);
    assert_eq!(reply4, Some(reply));
    // NAT disabled table refuses reply tuples.
    let mut plain = table(4);
    assert_eq!(
        plain.insert(k, BackendId(0), Some(reply), now),
        Insert::Refused(Refusal::NatDisabled)
    );
}

#[test]
fn persistence_template_pinned_by_connections() {
    let mut t = table(16);
    let k = k4(7, IpProto::Tcp);
    let now = Instant::from_secs(1);
    let tk = TemplateKey::client(k.src(), 24, Service::of_flow(&k));
    t.persist_mut()
        .insert(tk, BackendId(3), Duration::from_secs(5), now);
    t.insert_with(
        NewFlow::new(k, BackendId(3))
            .with_persist(24)
            .with_first(syn()),
        now,
    );
    assert_eq!(t.persist().refs(&tk), 1);
    // Pinned: survives its own timeout while the connection lives.
    assert_eq!(t.persist_mut().expire(Instant::from_secs(30), 10), 0);
    t.remove(&k, Instant::from_secs(30));
    assert_eq!(t.persist().refs(&tk), 0);
    assert_eq!(
        t.persist().peek(&tk, Instant::from_secs(34)),
        Some(BackendId(3))
    );
    assert_eq!(t.persist().peek(&tk, Instant::from_secs(36)), None);
}

#[test]
fn index_survives_churn_without_reallocating() {
    let mut t = table(64);
    let before = t.memory();
    let mut now = Instant::ZERO;
    for i in 0..20_000u32 {
        now += Duration::from_millis(1);
        t.insert(k4(i, IpProto::Udp), BackendId(i), None, now);
        if i >= 50 {
            assert!(t.remove(&k4(i - 50, IpProto::Udp), now));
        }
    }
    assert_eq!(t.len(), 50);
    for i in 19_950..20_000 {
        assert_eq!(
            t.get(&k4(i, IpProto::Udp), now).map(|e| e.backend),
            Some(BackendId(i))
        );
    }
    assert_eq!(t.memory(), before, "no reallocation");
    for i in 19_950..20_000 {
        assert!(t.remove(&k4(i, IpProto::Udp), now));
    }
    assert_eq!(t.index.len(), 0);
    assert_eq!(
        t.index.total_overflow(),
        0,
        "removals undo every overflow count"
    );
}

#[test]
fn batch_matches_single() {
    let mut a = table(256);
    let mut b = table(256);
    let keys: Vec<FlowKey> = (0..100).map(|i| k4(i, IpProto::Tcp)).collect();
    let now = Instant::from_secs(1);
    for k in keys.iter().step_by(2) {
        a.insert_with(NewFlow::new(*k, BackendId(1)).with_first(syn()), now);
        b.insert_with(NewFlow::new(*k, BackendId(1)).with_first(syn()), now);
    }
    let pkts = vec![ack(); keys.len()];
    let mut out = vec![None; keys.len()];
    a.track_batch(&keys, &pkts, now, &mut out);
    for (k, o) in keys.iter().zip(&out) {
        assert_eq!(*o, b.track(k, ack(), now));
    }
    assert_eq!(out.iter().filter(|o| o.is_some()).count(), 50);
}

proptest! {
    /// `track_batch` (pipelined, hints taken keys ahead) equals `track` key by key, for bursts
    /// shorter and longer than the pipeline, with duplicates and with entries that time out
    /// (removed on lookup) between a key's hint and its turn.
    #[test]
    fn batch_equals_single_under_expiry_and_duplicates(
        present in proptest::collection::vec(0u32..64, 0..64),
        keys in proptest::collection::vec(0u32..80, 0..70),
        ages in proptest::collection::vec(0u64..20, 64),
        at in 0u64..25,
    ) {
        let timeouts = Timeouts {
            udp: Duration::from_secs(10),
            udp_unconfirmed: Duration::from_secs(10),
            ..Timeouts::default()
        };
        let cfg = Config { timeouts, ..Config::with_capacity(128) };
        let mut a = ConnTable::new(cfg, KEY).unwrap();
        let mut b = ConnTable::new(cfg, KEY).unwrap();
        for &i in &present {
            let t = Instant::from_secs(ages[i as usize]);
            let f = NewFlow::new(k4(i, IpProto::Udp), BackendId(i));
            a.insert_with(f, t);
            b.insert_with(NewFlow::new(k4(i, IpProto::Udp), BackendId(i)), t);
        }
        let now = Instant::from_secs(20 + at);
        let ks: Vec<FlowKey> = keys.iter().map(|&i| k4(i, IpProto::Udp)).collect();
        let pkts = vec![Packet::original(TcpFlags::default(), 100); ks.len()];
        let mut out = vec![None; ks.len()];
        a.track_batch(&ks, &pkts, now, &mut out);
        for (k, (o, p)) in ks.iter().zip(out.iter().zip(&pkts)) {
            prop_assert_eq!(*o, b.track(k, *p, now));
        }
        prop_assert_eq!(a.len(), b.len());
        prop_assert_eq!(a.counters(), b.counters());
    }
}

/// A hint is only a hint: one pointing at another flow's slot (a tag collision), at a slot
/// freed and reused since, or at nothing (the flow was created after the prefetch) gives the
/// same result as a plain lookup. Forward and reply directions.
#[test]
fn wrong_and_stale_hints_are_ignored() {
    let (mut t, _) = nat_table(40000..=40100, &[1, 2]);
    let now = Instant::from_secs(1);
    let (a, b, c) = (
        k4(1, IpProto::Tcp),
        k4(2, IpProto::Tcp),
        k4(3, IpProto::Tcp),
    );
    let backend = "10.1.0.5:8080".parse().unwrap();
    // Created after its hint was taken: the hint has no slot.
    let hint_a = t.candidate(t.flow_hash(&a));
    assert_eq!((hint_a.hash, hint_a.slot), (t.flow_hash(&a), NIL));
    assert_ne!(hint_a.absent_at, 0, "A's home line says absent");
    let (_, reply_a) = t.insert_snat(NewFlow::new(a, BackendId(1)), backend, now);
    let reply_a = reply_a.unwrap();
    assert_eq!(
        t.track_prefetched(hint_a, &a, ack(), now).unwrap().backend,
        BackendId(1)
    );
    let backend2 = "10.1.0.6:8080".parse().unwrap();
    let (_, reply_b) = t.insert_snat(NewFlow::new(b, BackendId(2)), backend2, now);
    let reply_b = reply_b.unwrap();
    // B's hash with A's slot: a collision must not hand B A's entry, in either direction.
    let slot_a = t.candidate(t.flow_hash(&a)).slot;
    let rslot_a = t.reply_candidate(t.flow_hash(&reply_a)).slot;
    assert_ne!(slot_a, NIL);
    assert_eq!(slot_a, rslot_a);
    let lie = Prefetched {
        hash: t.flow_hash(&b),
        slot: slot_a,
        absent_at: 0,
    };
    assert_eq!(
        t.track_prefetched(lie, &b, ack(), now).unwrap().backend,
        BackendId(2)
    );
    let rlie = Prefetched {
        hash: t.flow_hash(&reply_b),
        slot: slot_a,
        absent_at: 0,
    };
    let (orig, hit) = t
        .track_reply_prefetched(rlie, &reply_b, ack(), now)
        .unwrap();
    assert_eq!((orig, hit.backend), (b, BackendId(2)));
    // A's slot freed and reused by C: A's old hint finds nothing, in either direction.
    let hint_a = t.candidate(t.flow_hash(&a));
    let rhint_a = t.reply_candidate(t.flow_hash(&reply_a));
    assert!(t.remove(&a, now));
    t.insert_snat(NewFlow::new(c, BackendId(1)), backend, now);
    assert_eq!(
        t.candidate(t.flow_hash(&c)).slot,
        slot_a,
        "C reuses A's slot"
    );
    assert_eq!(t.track_prefetched(hint_a, &a, ack(), now), None);
    assert_eq!(
        t.track_reply_prefetched(rhint_a, &reply_a, ack(), now),
        None
    );
    // A free slot is zeroed, which looks like the all-zero key of protocol 0: a hint to it
    // must still miss.
    let zero = FlowKey::v4(
        Ipv4Addr::UNSPECIFIED,
        0,
        Ipv4Addr::UNSPECIFIED,
        0,
        IpProto::Other(0),
    );
    let free = Prefetched {
        hash: t.flow_hash(&zero),
        slot: 15,
        absent_at: 0,
    };
    assert_eq!(t.track_prefetched(free, &zero, ack(), now), None);
    // An out-of-range slot is harmless.
    let wild = Prefetched {
        hash: t.flow_hash(&c),
        slot: u32::MAX - 1,
        absent_at: 0,
    };
    assert_eq!(
        t.track_prefetched(wild, &c, ack(), now).unwrap().backend,
        BackendId(1)
    );
    // A hint taken while D was absent: a miss while nothing is inserted (removals cannot
    // make it present), found once D (or any flow) is inserted after the hint.
    let d = k4(4, IpProto::Tcp);
    let hint_d = t.candidate(t.flow_hash(&d));
    assert_ne!(hint_d.absent_at, 0, "D's home line says absent");
    assert!(t.remove(&c, now));
    assert_eq!(t.track_prefetched(hint_d, &d, ack(), now), None);
    t.insert_snat(NewFlow::new(d, BackendId(2)), backend2, now);
    assert_eq!(
        t.track_prefetched(hint_d, &d, ack(), now).unwrap().backend,
        BackendId(2)
    );
}

#[test]
fn memory_per_ipv4_entry() {
    // Capacity-based: total heap / capacity, with the parts the table reports from the actual
    // allocations (Vec capacities, the index's buckets).
    // Per-flow counters are in the slot: turning session statistics on costs nothing per flow.
    // The elephant store is a fixed size (1 024 × 20 B by default), not per flow.
    let cap = 1 << 20;
    let cfg = Config {
        ipv6_capacity: 0,
        flow_stats: true,
        persist_capacity: 1,
        stats_backends: 0,
        ..Config::with_capacity(cap)
    };
    let t = ConnTable::new(cfg, KEY).unwrap();
    let m = t.memory();
    assert_eq!(m.slots, cap * 40);
    // ceil(1.25 × capacity / 15) lines of 64 bytes: 5.33 B per entry of capacity.
    assert_eq!(m.index, (cap * 5 / 4).div_ceil(15) * 64, "{m:?}");
    assert!(m.index * 100 < cap * 534, "{m:?}");
    // The rest is per table, not per flow: the elephant store, one empty reply-index line,
    // one persistence template, the overall session histograms, and the removal ring
    // (4 096 records of 120 B by default: 480 KiB, or 0 with `removal_queue: 0`).
    assert_eq!(m.elephants, 1024 * 20);
    assert_eq!(core::mem::size_of::<crate::Removal>(), 120);
    assert_eq!(m.removals, 4096 * 120);
    let fixed = m.total - m.slots - m.index - m.removals;
    assert!(fixed < 24 * 1024, "{m:?}");
    let quiet = ConnTable::new(
        Config {
            removal_queue: 0,
            ..cfg
        },
        KEY,
    )
    .unwrap();
    assert_eq!(quiet.memory().total, m.total - m.removals);
    let lean = ConnTable::new(
        Config {
            flow_stats: false,
            ..cfg
        },
        KEY,
    )
    .unwrap();
    assert_eq!(lean.memory(), m);
}

#[test]
fn session_statistics_per_backend() {
    let cfg = Config {
        stats_backends: 4,
        ..Config::with_capacity(64)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    // Backend 1: three sessions of 2 s and 3 packets; backend 2: one of 100 s and 51 packets.
    let t0 = Instant::from_secs(10);
    let first = Packet::original(TcpFlags::NONE, 10);
    for i in 0..3 {
        t.insert_with(
            NewFlow::new(k4(i, IpProto::Udp), BackendId(1)).with_first(first),
            t0,
        );
    }
    let k = k4(9, IpProto::Udp);
    t.insert_with(NewFlow::new(k, BackendId(2)).with_first(first), t0);
    for i in 0..3 {
        t.track(
            &k4(i, IpProto::Udp),
            Packet::reply(TcpFlags::NONE, 10),
            Instant::from_secs(11),
        );
    }
    for i in 0..3 {
        t.track(&k4(i, IpProto::Udp), first, Instant::from_secs(12));
    }
    for s in 0..50 {
        t.track(&k, first, Instant::from_secs(12 + s * 2));
    }
    assert_eq!(t.expire(Instant::from_secs(10_000), 100), 4);
    let b1 = t.sessions().backend(BackendId(1)).unwrap();
    assert_eq!(b1.duration_ms.count(), 3);
    assert_eq!(b1.duration_ms.max(), 2_000);
    assert_eq!(b1.packets.max(), 3);
    let b2 = t.sessions().backend(BackendId(2)).unwrap();
    assert_eq!(b2.duration_ms.max(), 110_000 - 10_000);
    assert_eq!(b2.packets.max(), 51);
    assert_eq!(t.sessions().overall().packets.count(), 4);
    assert!(t.sessions().backend(BackendId(9)).is_none());
}

// ---- the flood ----

fn flood(cap: usize, established: u32, syns: u32) {
    let cfg = Config {
        ipv6_capacity: 0,
        ..Config::with_capacity(cap)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let mem = t.memory();
    let t0 = Instant::from_secs(1);
    for i in 0..established {
        let k = k4(i, IpProto::Tcp);
        t.insert_with(NewFlow::new(k, BackendId(i % 7)).with_first(syn()), t0);
        t.track(&k, ack(), t0);
    }
    let mut now = t0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..syns {
        // xorshift: deterministic spoofed sources.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = FlowKey::v4(
            Ipv4Addr::from((x >> 32) as u32 | 0x8000_0000),
            x as u16,
            Ipv4Addr::new(203, 0, 113, 10),
            80,
            IpProto::Tcp,
        );
        if n % 1000 == 0 {
            now += Duration::from_millis(1);
        }
        let r = t.insert_with(NewFlow::new(k, BackendId(0)).with_first(syn()), now);
        assert!(
            !matches!(
                r,
                Insert::Evicted {
                    reason: EvictReason::Lru,
                    ..
                }
            ),
            "{r:?}"
        );
        assert!(t.len() <= cap);
    }
    assert_eq!(t.len(), cap);
    for i in 0..established {
        let e = t
            .get(&k4(i, IpProto::Tcp), now)
            .expect("established flow survives");
        assert_eq!(e.state, FlowState::Tcp(TcpState::Established));
    }
    assert_eq!(t.memory(), mem);
    assert_eq!(t.counters().evicted_lru, 0);
    assert!(t.counters().evicted_half_open >= u64::from(syns) - cap as u64);
}

#[test]
fn syn_flood_spares_established_flows() {
    // The full scale of the issue: 1 M spoofed SYNs, 100 k entries, 10 k established.
    flood(100_000, 10_000, 1_000_000);
}

// ---- the reference model (crate::model) ----

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, u32, Option<(bool, u8)>),
    Track(u8, bool, u8),
    Advance(u32),
    Expire(u8),
    Remove(u8),
    Sweep(u8, u8),
}

fn key_of(i: u8) -> FlowKey {
    match i % 4 {
        0 | 1 => k4(u32::from(i), IpProto::Tcp),
        2 => k4(u32::from(i), IpProto::Udp),
        _ => k6(u32::from(i)),
    }
}

fn op() -> impl Strategy<Value = Op> {
    let pkt = (
        any::<bool>(),
        prop::sample::select(vec![0u8, 0x02, 0x10, 0x01, 0x11, 0x04, 0x12]),
    );
    prop_oneof![
        3 => (0u8..14, 0u32..4, prop::option::of(pkt.clone())).prop_map(|(k, b, p)| Op::Insert(k, b, p)),
        4 => (0u8..14, pkt).prop_map(|(k, (r, f))| Op::Track(k, r, f)),
        2 => (0u32..40_000).prop_map(Op::Advance),
        1 => (0u8..5).prop_map(Op::Expire),
        1 => (0u8..14).prop_map(Op::Remove),
        1 => (0u8..40, 0u8..5).prop_map(|(s, b)| Op::Sweep(s, b)),
    ]
}

fn packet(reply: bool, flags: u8) -> Packet {
    let dir = if reply {
        Direction::Reply
    } else {
        Direction::Original
    };
    Packet {
        dir,
        tcp_flags: TcpFlags(flags),
        bytes: 10,
        segments: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn table_matches_model(
        ops in proptest::collection::vec(op(), 1..120),
        evict_est in any::<bool>(),
        ring in 3usize..=8,
    ) {
        let s = Duration::from_secs;
        let timeouts = Timeouts {
            tcp_none: s(2), tcp_established: s(50), tcp_syn_sent: s(12), tcp_syn_recv: s(6),
            tcp_fin_wait: s(9), tcp_time_wait: s(8), tcp_close: s(1), tcp_close_wait: s(7),
            tcp_last_ack: s(3), udp_unconfirmed: s(4), udp: s(30), icmp: s(5), other: s(5),
        };
        let cap = 6;
        // The ring is drained after every step; one step removes at most 3 flows (an insert:
        // its own timed-out key, an IPv6 victim, a slot victim) or `ring` (expire).
        let cfg = Config { capacity: cap, ipv6_capacity: 2, timeouts, evict_established: evict_est, removal_queue: ring, ..Config::default() };
        let mut t = ConnTable::new(cfg, KEY).unwrap();
        let mut m = Model::new(&cfg);
        let mut now = Instant::ZERO;
        for op in ops {
            match op {
                Op::Insert(k, b, p) => {
                    let key = key_of(k);
                    let mut flow = NewFlow::new(key, BackendId(b));
                    flow.first = p.map(|(r, f)| packet(r, f));
                    let got = t.insert_with(flow, now);
                    prop_assert_eq!(got, m.insert(flow));
                    if got.is_inserted() {
                        // The state after the first packet is known without a lookup.
                        prop_assert_eq!(m.map[&key].state, flow.initial_state());
                    }
                }
                Op::Track(k, r, f) => {
                    let key = key_of(k);
                    let got = t.track(&key, packet(r, f), now).map(|h| (h.backend.get(), h.state, h.was));
                    prop_assert_eq!(got, m.track(&key, packet(r, f)));
                }
                Op::Advance(ms) => {
                    now += Duration::from_millis(u64::from(ms));
                    m.advance(now);
                }
                Op::Expire(budget) => {
                    let got = t.expire(now, usize::from(budget));
                    // Capped by the ring's room (all of it: the ring is drained every step).
                    prop_assert_eq!(got, m.expire(usize::from(budget).min(ring)));
                }
                Op::Remove(k) => {
                    let key = key_of(k);
                    prop_assert_eq!(t.remove(&key, now), m.remove(&key));
                }
                Op::Sweep(slots, budget) => {
                    let (slots, budget) = (usize::from(slots), usize::from(budget));
                    let (n, cursor) = m.sweep(&t, cfg.capacity, slots, budget.min(ring));
                    prop_assert_eq!(t.sweep(now, slots, budget), n);
                    prop_assert_eq!(t.sweep_cursor(), cursor);
                }
            }
            // Removals exactly the model's, in order; entries, index, counters and the next
            // deadline as the model has them.
            if let Err(e) = m.check(&mut t, now) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `spare` (which the data path's fast path publishes, issue 19): while it is above zero
    /// no insertion evicts a flow past its handshake, it is never below `room`, and no call
    /// lowers it by more than one.
    #[test]
    fn spare_keeps_established_flows_from_eviction(
        ops in proptest::collection::vec(op(), 1..160),
        v6_everywhere in any::<bool>(),
    ) {
        let cap = 6;
        let cfg = Config {
            capacity: cap,
            ipv6_capacity: if v6_everywhere { cap } else { 0 },
            removal_queue: 16,
            ..Config::default()
        };
        let mut t = ConnTable::new(cfg, KEY).unwrap();
        let mut now = Instant::ZERO;
        for op in ops {
            let spare = t.spare();
            prop_assert!(spare >= t.room());
            match op {
                Op::Insert(k, b, p) => {
                    let mut flow = NewFlow::new(key_of(k), BackendId(b));
                    flow.first = p.map(|(r, f)| packet(r, f));
                    let got = t.insert_with(flow, now);
                    if spare > 0 {
                        prop_assert!(
                            !matches!(got, Insert::Evicted { reason: EvictReason::Lru, .. }),
                            "{:?} with {} spare", got, spare
                        );
                    }
                }
                Op::Track(k, r, f) => {
                    t.track(&key_of(k), packet(r, f), now);
                }
                Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
                Op::Expire(budget) => {
                    t.expire(now, usize::from(budget));
                }
                Op::Remove(k) => {
                    t.remove(&key_of(k), now);
                }
                Op::Sweep(slots, budget) => {
                    t.sweep(now, usize::from(slots), usize::from(budget));
                }
            }
            for r in t.drain_removals() {
                if spare > 0 && matches!(r.reason, RemovalReason::EvictedLru | RemovalReason::EvictedHalfOpen) {
                    prop_assert!(r.state.is_half_open(), "{:?} evicted with {} spare", r, spare);
                }
            }
            prop_assert_eq!(t.counters().removals_lost, 0);
            prop_assert!(t.spare() + 1 >= spare, "{:?}: spare {} -> {}", op, spare, t.spare());
        }
    }
}

/// A full table: `spare` counts its half-open entries, a SYN flood (each SYN evicting the
/// oldest half-open entry) leaves it as it was, and once no half-open entry is left the next
/// insertion evicts the least recently used established flow.
#[test]
fn spare_counts_half_open_entries_a_flood_replaces() {
    let cfg = Config {
        ipv6_capacity: 0,
        ..Config::with_capacity(8)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let now = Instant::from_secs(1);
    for i in 0..4 {
        let k = k4(i, IpProto::Tcp);
        assert!(t
            .insert_with(NewFlow::new(k, BackendId(0)).with_first(syn()), now)
            .is_inserted());
        t.track(&k, Packet::reply(TcpFlags(0x12), 1), now);
        t.track(&k, ack(), now);
    }
    assert_eq!(t.spare(), 4, "four free places, four established flows");
    for i in 4..8 {
        t.insert_with(
            NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn()),
            now,
        );
    }
    assert_eq!((t.room(), t.spare()), (0, 4), "full: four half-open");
    for i in 100..110 {
        let r = t.insert_with(
            NewFlow::new(k4(i, IpProto::Tcp), BackendId(0)).with_first(syn()),
            now,
        );
        assert!(
            matches!(
                r,
                Insert::Evicted {
                    reason: EvictReason::HalfOpen,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(t.spare(), 4, "a spoofed SYN replaces a half-open entry");
    }
    // The flood's last four complete their handshakes: nothing half-open is left.
    for i in 106..110 {
        let k = k4(i, IpProto::Tcp);
        t.track(&k, Packet::reply(TcpFlags(0x12), 1), now);
        assert_eq!(
            t.track(&k, ack(), now).map(|h| h.state),
            Some(FlowState::Tcp(TcpState::Established))
        );
    }
    assert_eq!(t.spare(), 0);
    let r = t.insert_with(
        NewFlow::new(k4(200, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    assert!(
        matches!(
            r,
            Insert::Evicted {
                reason: EvictReason::Lru,
                ..
            }
        ),
        "{r:?}"
    );
    // A table with fewer IPv6 pairs than slots counts its room only.
    let cfg = Config {
        ipv6_capacity: 2,
        ..Config::with_capacity(8)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    t.insert_with(
        NewFlow::new(k4(1, IpProto::Tcp), BackendId(0)).with_first(syn()),
        now,
    );
    assert_eq!((t.room(), t.spare()), (2, 2));
}

#[test]
fn nat_tuples_round_trip_in_compact_form() {
    let cfg = Config {
        nat: true,
        ipv6_capacity: 4,
        ..Config::with_capacity(16)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let now = Instant::from_secs(1);
    let k6 = FlowKey::v6(
        "2001:db8::1".parse().unwrap(),
        40000,
        "2001:db8::10".parse().unwrap(),
        443,
        IpProto::Udp,
    );
    let r6 = FlowKey::v6(
        "2001:db8:1::5".parse().unwrap(),
        8443,
        "2001:db8:2::1".parse().unwrap(),
        61000,
        IpProto::Udp,
    );
    let k = k4(7, IpProto::Tcp);
    let r4 = FlowKey::v4(
        [10, 1, 0, 5].into(),
        8080,
        [198, 51, 100, 1].into(),
        50000,
        IpProto::Tcp,
    );
    assert_eq!(t.insert(k6, BackendId(1), Some(r6), now), Insert::New);
    assert_eq!(t.insert(k, BackendId(2), Some(r4), now), Insert::New);
    assert_eq!(t.get(&k6, now).unwrap().nat, Some(r6));
    assert_eq!(t.get(&k, now).unwrap().nat, Some(r4));
    let (orig, _) = t
        .track_reply(&r6, Packet::reply(TcpFlags(0), 1), now)
        .unwrap();
    assert_eq!(orig, k6);
    let (orig, _) = t
        .track_reply(&r4, Packet::reply(TcpFlags::ACK, 1), now)
        .unwrap();
    assert_eq!(orig, k);
    // A reply tuple of another family or protocol than its flow's is refused, not truncated.
    assert_eq!(
        t.insert(k4(8, IpProto::Tcp), BackendId(2), Some(r6), now),
        Insert::Refused(Refusal::FamilyMismatch)
    );
    let r4udp = FlowKey::v4(
        [10, 1, 0, 5].into(),
        8080,
        [198, 51, 100, 1].into(),
        50001,
        IpProto::Udp,
    );
    assert_eq!(
        t.insert(k4(9, IpProto::Tcp), BackendId(2), Some(r4udp), now),
        Insert::Refused(Refusal::FamilyMismatch)
    );
    assert_eq!(t.len(), 2);
}

// ---- per-flow counters in the slot ----

#[test]
fn backend_ids_beyond_a_slot_are_refused() {
    let mut t = table(8);
    let now = Instant::from_secs(1);
    let k = k4(1, IpProto::Tcp);
    assert_eq!(
        t.insert(k, BackendId(65_536), None, now),
        Insert::Refused(Refusal::BackendId)
    );
    assert_eq!(t.counters().refused_backend, 1);
    assert_eq!(t.len(), 0);
    assert!(t.insert(k, BackendId(65_535), None, now).is_inserted());
    assert_eq!(t.get(&k, now).map(|e| e.backend), Some(BackendId(65_535)));
}

#[test]
fn capacity_is_bounded_by_the_links() {
    let too_big = Config {
        ipv6_capacity: 0,
        ..Config::with_capacity(crate::MAX_CAPACITY + 1)
    };
    assert!(ConnTable::new(too_big, KEY).is_err());
}

#[test]
fn elephants_keep_exact_counters_and_give_them_back() {
    let cfg = Config {
        elephants: 1,
        ..Config::with_capacity(8)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let now = Instant::from_secs(1);
    let (a, b) = (k4(1, IpProto::Udp), k4(2, IpProto::Udp));
    let big = Packet::original(TcpFlags::NONE, u32::MAX);
    for k in [a, b] {
        t.insert(k, BackendId(1), None, now);
    }
    // 40 × 4 GiB outgrows the slot's 2^37 − 1 bytes: `a` takes the only elephant entry.
    for _ in 0..40 {
        t.track(&a, big, now);
        t.track(&b, big, now);
    }
    let info = |t: &ConnTable, k| t.get(&k, now).map(|e| (e.packets, e.bytes));
    assert_eq!(info(&t, a), Some((40, 40 * u64::from(u32::MAX))));
    // `b` found the store full: saturated, and counted.
    assert_eq!(info(&t, b), Some((40, (1 << 37) - 1)));
    assert_eq!(t.counters().elephants, 1);
    assert!(t.counters().counts_saturated > 0);
    // `a` leaves: its entry goes back, and `b`'s next packet takes it.
    assert!(t.remove(&a, now));
    t.track(&b, big, now);
    assert_eq!(info(&t, b), Some((41, (1 << 37) - 1 + u64::from(u32::MAX))));
    assert_eq!(t.counters().elephants, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Counters are exact while they fit the slot or the flow holds an elephant entry, and
    /// saturate (then resume exactly from the saturated values once an entry is free) otherwise;
    /// removal and re-insertion start from zero and give the entry back.
    #[test]
    fn counters_match_a_model(
        ops in proptest::collection::vec((0u32..3, prop::bool::weighted(0.8), prop::bool::weighted(0.03)), 1..300),
        store in 0usize..3,
    ) {
        const PMAX: u64 = (1 << 26) - 1;
        const BMAX: u64 = (1 << 37) - 1;
        let cfg = Config { elephants: store, ..Config::with_capacity(8) };
        let mut t = ConnTable::new(cfg, KEY).unwrap();
        let now = Instant::from_secs(1);
        // Model: per flow (packets, bytes, holds an elephant entry); free entries.
        let mut m = [(0u64, 0u64, false); 3];
        let mut free = store;
        for f in 0..3 {
            t.insert(k4(f, IpProto::Udp), BackendId(f), None, now);
        }
        for (f, big, remove) in ops {
            let k = k4(f, IpProto::Udp);
            let e = &mut m[f as usize];
            if remove {
                prop_assert!(t.remove(&k, now));
                prop_assert!(t.insert(k, BackendId(f), None, now).is_inserted());
                if e.2 { free += 1; }
                *e = (0, 0, false);
                continue;
            }
            let bytes: u32 = if big { u32::MAX } else { 1500 };
            t.track(&k, Packet::original(TcpFlags::NONE, bytes), now);
            let (p, b) = (e.0 + 1, e.1 + u64::from(bytes));
            if e.2 || (p <= PMAX && b <= BMAX) {
                (e.0, e.1) = (p, b);
            } else if free > 0 {
                free -= 1;
                *e = (p, b, true);
            } else {
                (e.0, e.1) = (p.min(PMAX), b.min(BMAX));
            }
            for g in 0..3u32 {
                let want = m[g as usize];
                let got = t.get(&k4(g, IpProto::Udp), now).map(|i| (i.packets, i.bytes));
                prop_assert_eq!(got, Some((want.0, want.1)));
            }
        }
    }
}

/// Issue 18: a per-backend histogram bound past the largest backend id (which `vec!` would try
/// to allocate at any size) is refused; the largest useful one is accepted.
#[test]
fn stats_backends_beyond_the_backend_ids_are_refused() {
    let mut c = crate::Config {
        stats_backends: crate::MAX_BACKEND_ID as usize + 1,
        ..crate::Config::default()
    };
    assert_eq!(c.validate(), Ok(()));
    c.stats_backends = usize::MAX;
    assert_eq!(
        c.validate(),
        Err(crate::ConntrackError::InvalidCapacity {
            capacity: usize::MAX
        })
    );
}
