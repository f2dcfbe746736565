//! Tests of SNAT port pressure: an empty pool reclaims the oldest half-open flow holding one
//! of its pairs, never an established one, through the removal stream, with counters that add
//! up (unit tests, then a proptest against the table's own entries).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};
use proptest::prelude::*;

use super::ConnTable;
use crate::entry::{F_LIVE, F_POOL, F_POOL_HALF, NIL};
use crate::evict::class_is_half_open;
use crate::sync::{apply, RecordOp, SyncReceiver, SyncRecord, SyncSender};
use crate::{
    Config, EvictReason, FlowState, Insert, NewFlow, Packet, Refusal, RemovalReason, SnatPool,
    TcpFlags, TcpState,
};

const KEY: HashKey = HashKey::from_bytes(*b"pressure-test-k!");

fn key(i: u32, proto: IpProto) -> FlowKey {
    FlowKey::v4(
        Ipv4Addr::from(0x0a00_0000 + i),
        1024 + (i % 60_000) as u16,
        Ipv4Addr::new(203, 0, 113, 10),
        80,
        proto,
    )
}

fn backend_addr(b: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, b as u8)), 8080)
}

fn secs(s: u64) -> Instant {
    Instant::from_secs(s)
}

fn ms(m: u64) -> Instant {
    Instant::from_millis(m)
}

const SYN: Packet = Packet::original(TcpFlags::SYN, 60);
const ACK: Packet = Packet::original(TcpFlags::ACK, 52);
const DGRAM: Packet = Packet::original(TcpFlags::NONE, 100);

/// A NAT table of `cap` entries whose backends `backends` each have `ports` SNAT ports.
fn table(cap: usize, ports: u16, backends: &[u32]) -> ConnTable {
    let cfg = Config {
        nat: true,
        ..Config::with_capacity(cap)
    };
    let mut t = ConnTable::new(cfg, KEY).unwrap();
    let snat: IpAddr = "198.51.100.1".parse().unwrap();
    let mut pool = SnatPool::new(vec![snat], 40000..=40000 + ports - 1).unwrap();
    for &b in backends {
        pool.add_backend(BackendId(b));
    }
    t.set_snat_pool(pool);
    t
}

fn open(t: &mut ConnTable, k: FlowKey, b: u32, first: Packet, now: Instant) -> Insert {
    let flow = NewFlow::new(k, BackendId(b)).with_first(first);
    t.insert_snat(flow, backend_addr(b), now).0
}

/// The slots in `b`'s pool list, head first.
fn pool_list(t: &ConnTable, b: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let mut i = t
        .snat
        .as_ref()
        .and_then(|p| p.oldest_half_open(BackendId(b)))
        .unwrap_or(NIL);
    while i != NIL && v.len() <= t.capacity() {
        v.push(i);
        i = t.pool_links[i as usize][1];
    }
    v
}

/// The pool lists hold exactly the live, pool-holding, half-open entries of their backend,
/// each once, with consistent back links.
fn check_lists(t: &ConnTable, backends: &[u32]) -> Result<(), TestCaseError> {
    let mut linked = HashSet::new();
    for &b in backends {
        let l = pool_list(t, b);
        prop_assert!(l.len() <= t.capacity(), "pool list of {} loops", b);
        let mut prev = NIL;
        for &i in &l {
            let s = t.slots[i as usize];
            prop_assert_eq!(s.backend(), b);
            prop_assert!(
                s.flags & (F_LIVE | F_POOL | F_POOL_HALF) == F_LIVE | F_POOL | F_POOL_HALF
            );
            prop_assert!(
                class_is_half_open(s.class),
                "established entry {} in the list",
                i
            );
            prop_assert_eq!(t.pool_links[i as usize][0], prev);
            prop_assert!(linked.insert(i));
            prev = i;
        }
    }
    for (i, s) in t.slots.iter().enumerate() {
        let want = s.flags & (F_LIVE | F_POOL) == F_LIVE | F_POOL && class_is_half_open(s.class);
        prop_assert_eq!(want, linked.contains(&(i as u32)), "slot {}", i);
        prop_assert_eq!(want, s.flags & F_POOL_HALF != 0, "slot {} flag", i);
    }
    Ok(())
}

#[test]
fn an_empty_pool_reclaims_the_oldest_half_open_flow_of_that_pool() {
    let mut t = table(64, 3, &[1, 2]);
    // Backend 2's half-open flow is the oldest of the table, but holds another pool's pair.
    assert_eq!(
        open(&mut t, key(100, IpProto::Tcp), 2, SYN, secs(1)),
        Insert::New
    );
    let (a, b, c) = (
        key(1, IpProto::Tcp),
        key(2, IpProto::Tcp),
        key(3, IpProto::Tcp),
    );
    for (i, k) in [a, b, c].into_iter().enumerate() {
        assert_eq!(open(&mut t, k, 1, SYN, secs(2 + i as u64)), Insert::New);
    }
    // a completes its handshake: established, never a victim.
    let hit = t.track(&a, ACK, secs(5)).unwrap();
    assert_eq!(hit.state, FlowState::Tcp(TcpState::Established));
    // Backend 1's pool is empty: the next flow takes b's pair.
    let port_b = t.get(&b, secs(6)).unwrap().nat.unwrap().dst_port();
    let d = key(4, IpProto::Tcp);
    let flow = NewFlow::new(d, BackendId(1)).with_first(SYN);
    let (r, reply) = t.insert_snat(flow, backend_addr(1), secs(6));
    assert_eq!(
        r,
        Insert::Evicted {
            victim: b,
            reason: EvictReason::SnatPressure
        }
    );
    assert_eq!(reply.unwrap().dst_port(), port_b);
    assert!(t.get(&b, secs(6)).is_none());
    // The removal stream says so, with the victim's tuple (what live load and sync read).
    let gone = t.poll_removal().unwrap();
    assert_eq!(
        (gone.key, gone.backend, gone.reason, gone.state),
        (
            b,
            BackendId(1),
            RemovalReason::EvictedSnatPressure,
            FlowState::Tcp(TcpState::SynRecv)
        )
    );
    assert_eq!(gone.nat.unwrap().dst_port(), port_b);
    assert!(gone.state.is_half_open() && !gone.was_active());
    assert!(t.poll_removal().is_none());
    // A reply from the backend (SYN-ACK) does not confirm a flow: c goes next, then d.
    let reply_c = t.get(&c, secs(7)).unwrap().nat.unwrap();
    let (_, hit) = t
        .track_reply(
            &reply_c,
            Packet::reply(TcpFlags::SYN | TcpFlags::ACK, 60),
            secs(7),
        )
        .unwrap();
    assert_eq!(hit.state, FlowState::Tcp(TcpState::SynRecv));
    let victims: Vec<Insert> = (5..7)
        .map(|i| open(&mut t, key(i, IpProto::Tcp), 1, SYN, secs(8)))
        .collect();
    assert_eq!(
        victims,
        [c, d].map(|victim| Insert::Evicted {
            victim,
            reason: EvictReason::SnatPressure
        })
    );
    // Only established flows left in pool 1 once the last two complete: refused as before.
    for i in 5..7 {
        t.track(&key(i, IpProto::Tcp), ACK, secs(9)).unwrap();
    }
    assert_eq!(
        open(&mut t, key(7, IpProto::Tcp), 1, SYN, secs(10)),
        Insert::Refused(Refusal::PortsExhausted)
    );
    assert!(t.get(&a, secs(10)).is_some());
    assert!(t.get(&key(100, IpProto::Tcp), secs(10)).is_some());
    let c = t.counters();
    assert_eq!((c.evicted_snat_pressure, c.refused_ports), (3, 1));
    assert_eq!(c.evicted_half_open, 0);
    assert_eq!(t.snat.as_ref().unwrap().available(BackendId(1)), 0);
    assert_eq!(t.len(), 4);
}

#[test]
fn udp_without_a_second_packet_is_half_open_and_reclaimed() {
    let mut t = table(64, 2, &[1]);
    let (a, b) = (key(1, IpProto::Udp), key(2, IpProto::Udp));
    assert_eq!(open(&mut t, a, 1, DGRAM, secs(1)), Insert::New);
    assert_eq!(open(&mut t, b, 1, DGRAM, secs(2)), Insert::New);
    // a's backend answers: confirmed. b stays unconfirmed and makes way.
    let ra = t.get(&a, secs(3)).unwrap().nat.unwrap();
    let (_, hit) = t
        .track_reply(&ra, Packet::reply(TcpFlags::NONE, 80), secs(3))
        .unwrap();
    assert_eq!(hit.state, FlowState::Udp);
    let c = key(3, IpProto::Udp);
    assert_eq!(
        open(&mut t, c, 1, DGRAM, secs(4)),
        Insert::Evicted {
            victim: b,
            reason: EvictReason::SnatPressure
        }
    );
    assert_eq!(t.poll_removal().unwrap().state, FlowState::UdpUnconfirmed);
    // A second datagram from the client confirms c too: nothing left to reclaim.
    t.track(&c, DGRAM, secs(5)).unwrap();
    assert_eq!(
        open(&mut t, key(4, IpProto::Udp), 1, DGRAM, secs(6)),
        Insert::Refused(Refusal::PortsExhausted)
    );
}

#[test]
fn a_timed_out_half_open_flow_is_reclaimed_as_expired() {
    let mut t = table(64, 1, &[1]);
    let a = key(1, IpProto::Tcp);
    assert_eq!(open(&mut t, a, 1, SYN, secs(1)), Insert::New);
    // SYN_RECV times out after 60 s: past it, the pair is reclaimed as expired, not evicted.
    assert_eq!(
        open(&mut t, key(2, IpProto::Tcp), 1, SYN, secs(62)),
        Insert::New
    );
    let gone = t.poll_removal().unwrap();
    assert_eq!((gone.key, gone.reason), (a, RemovalReason::Expired));
    assert_eq!(t.counters().evicted_snat_pressure, 0);
    assert_eq!(t.counters().expired, 1);
}

#[test]
fn a_reused_time_wait_entry_is_half_open_again() {
    let mut t = table(64, 1, &[1]);
    let a = key(1, IpProto::Tcp);
    assert_eq!(open(&mut t, a, 1, SYN, secs(1)), Insert::New);
    t.track(&a, ACK, secs(1)).unwrap();
    // Closed, then a new SYN on the same tuple restarts the entry in SYN_RECV.
    let fin = Packet::original(TcpFlags::FIN | TcpFlags::ACK, 52);
    t.track(&a, fin, secs(2)).unwrap();
    let ra = t.get(&a, secs(2)).unwrap().nat.unwrap();
    t.track_reply(
        &ra,
        Packet::reply(TcpFlags::FIN | TcpFlags::ACK, 52),
        secs(2),
    )
    .unwrap();
    assert_eq!(pool_list(&t, 1), [] as [u32; 0]);
    let hit = t.track(&a, SYN, secs(3)).unwrap();
    assert_eq!(hit.state, FlowState::Tcp(TcpState::SynRecv));
    assert_eq!(pool_list(&t, 1).len(), 1);
    assert_eq!(
        open(&mut t, key(2, IpProto::Tcp), 1, SYN, secs(4)),
        Insert::Evicted {
            victim: a,
            reason: EvictReason::SnatPressure
        }
    );
}

#[test]
fn synced_half_open_flows_holding_a_pair_are_reclaimable_until_established() {
    let mac = HashKey::from_bytes([9; 16]);
    let mut t = table(64, 1, &[1]);
    let a = key(1, IpProto::Tcp);
    let snat: IpAddr = "198.51.100.1".parse().unwrap();
    let nat = FlowKey::new(backend_addr(1).ip(), 8080, snat, 40000, IpProto::Tcp).unwrap();
    let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
    tx.set_echo(1);
    let mut rx = SyncReceiver::new(mac, 1);
    let mut send = |t: &mut ConnTable, op, state, now| {
        let rec = SyncRecord {
            op,
            key: a,
            backend: BackendId(1),
            backend_tag: None,
            state,
            remaining_ms: 30_000,
            nat: Some(nat),
            persist: None,
        };
        let mut msgs = Vec::new();
        tx.encode(&[rec], &mut msgs);
        let m = rx.receive(&msgs[0]).unwrap();
        apply(t, &m.message, now);
    };
    send(
        &mut t,
        RecordOp::New,
        FlowState::Tcp(TcpState::SynRecv),
        secs(1),
    );
    assert_eq!(
        pool_list(&t, 1).len(),
        1,
        "the reserved pair is reclaimable"
    );
    send(
        &mut t,
        RecordOp::Update,
        FlowState::Tcp(TcpState::Established),
        secs(2),
    );
    assert!(pool_list(&t, 1).is_empty());
    assert_eq!(
        open(&mut t, key(2, IpProto::Tcp), 1, SYN, secs(3)),
        Insert::Refused(Refusal::PortsExhausted)
    );
}

#[derive(Debug, Clone)]
enum Op {
    /// A new flow (TCP SYN or a UDP datagram) to backend `b`.
    Open { b: u32, udp: bool },
    /// The client's ACK (TCP) or second datagram (UDP) on the n-th live flow.
    Confirm(usize),
    /// The backend's SYN-ACK or datagram on the n-th live flow (confirms UDP only).
    Reply(usize),
    /// An RST from the client on the n-th live flow.
    Reset(usize),
    /// Explicit removal of the n-th live flow.
    Remove(usize),
    /// Time passes (milliseconds), then expiry.
    Wait(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..3, any::<bool>()).prop_map(|(b, udp)| Op::Open { b, udp }),
        2 => any::<usize>().prop_map(Op::Confirm),
        1 => any::<usize>().prop_map(Op::Reply),
        1 => any::<usize>().prop_map(Op::Reset),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => (0u32..40_000).prop_map(Op::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pressure_reclaims_only_the_oldest_half_open_and_counters_add_up(
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        const PORTS: usize = 4;
        let backends = [1u32, 2];
        let mut t = table(32, PORTS as u16, &backends);
        let mut now = 1_000u64;
        let mut next = 0u32;
        // Live flows (key → backend), for picking targets, and every removal seen.
        let mut live: BTreeMap<FlowKey, u32> = BTreeMap::new();
        let mut pressure_removals = 0u64;
        for op in ops {
            now += 1;
            let nth = |n: usize| live.keys().nth(n % live.len().max(1)).copied();
            // What a pool's list says before the operation: its oldest half-open flow.
            let heads: Vec<Option<FlowKey>> = backends
                .iter()
                .map(|&b| pool_list(&t, b).first().and_then(|&i| t.key_of(i)))
                .collect();
            match op {
                Op::Open { b, udp } => {
                    next += 1;
                    let k = key(next, if udp { IpProto::Udp } else { IpProto::Tcp });
                    let full = t.snat.as_ref().unwrap().available(BackendId(b)) == 0;
                    let r = open(&mut t, k, b, if udp { DGRAM } else { SYN }, ms(now));
                    let head = heads[(b - 1) as usize];
                    match r {
                        Insert::Evicted { victim, reason: EvictReason::SnatPressure } => {
                            prop_assert!(full);
                            prop_assert_eq!(Some(victim), head, "not the oldest half-open");
                        }
                        Insert::Refused(Refusal::PortsExhausted) => {
                            prop_assert!(full);
                            prop_assert_eq!(head, None, "refused with a half-open flow to take");
                        }
                        Insert::New => prop_assert!(!full || head.is_some()),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                    if r.is_inserted() {
                        live.insert(k, b);
                    }
                }
                Op::Confirm(n) | Op::Reply(n) | Op::Reset(n) | Op::Remove(n) => {
                    let Some(k) = nth(n) else { continue };
                    let tcp = k.proto() == IpProto::Tcp;
                    match op {
                        Op::Confirm(_) => {
                            let _ = t.track(&k, if tcp { ACK } else { DGRAM }, ms(now));
                        }
                        Op::Reply(_) => {
                            if let Some(r) = t.get(&k, ms(now)).and_then(|e| e.nat) {
                                let f = if tcp { TcpFlags::SYN | TcpFlags::ACK } else { TcpFlags::NONE };
                                let _ = t.track_reply(&r, Packet::reply(f, 60), ms(now));
                            }
                        }
                        Op::Reset(_) => {
                            let _ = t.track(&k, Packet::original(TcpFlags::RST, 40), ms(now));
                        }
                        _ => {
                            t.remove(&k, ms(now));
                        }
                    }
                }
                Op::Wait(d) => {
                    now += u64::from(d);
                    t.expire(ms(now), 64);
                }
            }
            for r in t.drain_removals().collect::<Vec<_>>() {
                prop_assert_eq!(live.remove(&r.key), Some(r.backend.get()));
                if r.reason == RemovalReason::EvictedSnatPressure {
                    pressure_removals += 1;
                    prop_assert!(r.state.is_half_open(), "an established flow was reclaimed");
                }
            }
            check_lists(&t, &backends)?;
            // Counters add up: pressure evictions = their removals; pairs held + free = pool.
            prop_assert_eq!(t.counters().evicted_snat_pressure, pressure_removals);
            prop_assert_eq!(t.len(), live.len());
            for &b in &backends {
                let held = live.values().filter(|&&x| x == b).count();
                prop_assert_eq!(t.snat.as_ref().unwrap().available(BackendId(b)) + held, PORTS);
            }
        }
    }
}
