//! Backend ids are recycled: a retired backend's id is released once nothing refers to it,
//! never before, and a reused id never carries an old flow or template to its new backend.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use lb_core::{FlowKey, HashKey, Instant, IpProto};
use lb_packet::{parse, Link};
use proptest::prelude::*;

use super::*;

const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

const VIP: &str = "203.0.113.10:80";

/// The destination of a forwarded packet.
fn dst_of(pkt: &[u8]) -> SocketAddr {
    let p = parse(pkt, Link::Ip).unwrap();
    SocketAddr::new(p.key.dst(), p.key.dst_port())
}

/// The source of a forwarded packet.
fn src_of(pkt: &[u8]) -> SocketAddr {
    let p = parse(pkt, Link::Ip).unwrap();
    SocketAddr::new(p.key.src(), p.key.src_port())
}

/// A backend address from a large pool.
fn pooled(i: u32) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080))
}

impl Rig {
    /// Applies `spec`, installs the tables, then runs one release cycle (what `tun-balancer`
    /// does on every control-loop turn): returns the ids released.
    fn reload(&mut self, spec: DataplaneSpec) -> Reload {
        let r = self.cp.apply(spec).unwrap();
        self.rebuild();
        r
    }

    fn release_cycle(&mut self) -> Vec<BackendId> {
        let freed = self.dp.release_retired();
        if self.cp.release(&freed) > 0 {
            self.rebuild();
        }
        freed
    }

    fn id_of(&self, addr: &str) -> Option<BackendId> {
        self.cp.backend_id(sa(VIP), Proto::Tcp, sa(addr))
    }
}

/// An established TCP flow from `client` through the rig; returns (backend, SNAT tuple).
fn establish(r: &mut Rig, client: SocketAddr) -> (SocketAddr, SocketAddr) {
    let vip = sa(VIP);
    let out = r.forward(&tcp(client, vip, SYN, b""));
    let (backend, snat) = (dst_of(&out), src_of(&out));
    r.forward(&tcp(backend, snat, SYNACK, b""));
    r.forward(&tcp(client, vip, ACK, b"GET /"));
    (backend, snat)
}

#[test]
fn a_retired_id_is_reused_only_after_its_last_flow_ends() {
    let (a, b) = ("198.51.100.11:8080", "198.51.100.12:8080");
    let mut r = Rig::new(nat_spec(VIP, Proto::Tcp, &[a]), Link::Ip);
    let vip = sa(VIP);
    let client = sa("192.0.2.2:40000");
    let (backend, snat) = establish(&mut r, client);
    assert_eq!(backend, sa(a));
    let id_a = r.id_of(a).unwrap();

    // A leaves; B comes. A's flow continues, so its id stays.
    let rel = r.reload(nat_spec(VIP, Proto::Tcp, &[b]));
    assert_eq!(rel.removed, vec![id_a]);
    assert!(r.release_cycle().is_empty());
    assert_eq!(r.dp.backend_flows(id_a), 1);

    // Churn: each reload brings a fresh backend and retires the previous one, which holds no
    // flow: their ids are recycled, A's never.
    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        let c = pooled(i).to_string();
        r.reload(nat_spec(VIP, Proto::Tcp, &[b, &c]));
        let id_c = r.id_of(&c).unwrap();
        assert_ne!(id_c, id_a, "reload {i}: A's id reused while its flow lives");
        seen.insert(id_c);
        r.release_cycle();
        assert!(r.cp.ids_in_use() <= 3, "A, B and the fresh one");
        // The old flow still goes to A, from its SNAT tuple, and A's replies reach the client.
        let out = r.forward(&tcp(client, vip, ACK, b"more"));
        assert_eq!((dst_of(&out), src_of(&out)), (sa(a), snat));
        let back = r.forward(&tcp(sa(a), snat, ACK, b"data"));
        assert_eq!((src_of(&back), dst_of(&back)), (vip, client));
    }
    assert!(
        seen.len() <= 2,
        "fresh backends share recycled ids: {seen:?}"
    );
    assert!(r.cp.ids_recycled() >= 199);
    assert_eq!(r.dp.stats().backend_ids_released, r.cp.ids_recycled());

    // The flow ends; then, and only then, A's id is released and reused.
    r.forward(&tcp(client, vip, RST, b""));
    r.now += lb_core::Duration::from_secs(600);
    r.dp.housekeeping(r.now, 10_000);
    assert_eq!(r.dp.backend_flows(id_a), 0);
    let freed = r.release_cycle();
    assert!(freed.contains(&id_a), "{freed:?}");
    assert!(r.dp.tables().backend(id_a).is_none());
    let d = "198.51.100.14:8080";
    let rel = r.reload(nat_spec(VIP, Proto::Tcp, &[b, d]));
    assert_eq!(r.id_of(d), Some(id_a), "the lowest free id");
    assert_eq!(rel.added, vec![id_a]);
    // A late reply from A to the old SNAT tuple finds no flow: it is not translated.
    let (v, _) = r.run(&tcp(sa(a), snat, ACK, b"late"));
    assert!(matches!(v, Verdict::Drop(_)), "{v:?}");
    // New flows to the reused id go to D, with fresh counters.
    let id_d = id_a;
    assert_eq!(r.dp.stats().backends[id_d.get() as usize].flows, 0);
    let mut to_d = 0;
    for port in 41_000..41_020 {
        let (backend, _) = establish(&mut r, SocketAddr::new(client.ip(), port));
        assert!(backend == sa(b) || backend == sa(d));
        to_d += u64::from(backend == sa(d));
    }
    assert_eq!(r.dp.stats().backends[id_d.get() as usize].flows, to_d);
}

#[test]
fn a_backend_back_while_referenced_keeps_its_id() {
    let (a, b) = ("198.51.100.11:8080", "198.51.100.12:8080");
    let mut r = Rig::new(nat_spec(VIP, Proto::Tcp, &[a]), Link::Ip);
    establish(&mut r, sa("192.0.2.2:40000"));
    let id_a = r.id_of(a).unwrap();
    r.reload(nat_spec(VIP, Proto::Tcp, &[b]));
    assert!(r.release_cycle().is_empty());
    let rel = r.reload(nat_spec(VIP, Proto::Tcp, &[a, b]));
    assert_eq!(r.id_of(a), Some(id_a));
    assert!(rel.added.is_empty());
    assert!(r.dp.tables().backend(id_a).unwrap().live);
    // Retired and idle: released at once, and A coming back later gets a fresh id.
    let (_, b2) = (a, "198.51.100.13:8080");
    r.reload(nat_spec(VIP, Proto::Tcp, &[b]));
    r.forward(&tcp(sa("192.0.2.2:40000"), sa(VIP), RST, b""));
    r.now += lb_core::Duration::from_secs(600);
    r.dp.housekeeping(r.now, 10_000);
    assert_eq!(r.release_cycle(), vec![id_a]);
    assert_eq!(r.id_of(a), None);
    r.reload(nat_spec(VIP, Proto::Tcp, &[b, b2]));
    assert_eq!(r.id_of(b2), Some(id_a));
}

#[test]
fn a_backend_of_a_removed_service_is_released_after_its_last_flow() {
    let (a, c) = ("198.51.100.11:8080", "198.51.100.13:8080");
    let two = || {
        let mut s = nat_spec(VIP, Proto::Tcp, &[a]);
        s.services.push(
            ServiceSpec::new(sa("203.0.113.11:80"), Proto::Tcp, Mode::Nat).with_backend(sa(c), 1),
        );
        s
    };
    let mut r = Rig::new(two(), Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip2 = sa("203.0.113.11:80");
    let out = r.forward(&tcp(client, vip2, SYN, b""));
    assert_eq!(dst_of(&out), sa(c));
    let id_c = r.cp.backend_id(vip2, Proto::Tcp, sa(c)).unwrap();
    // The whole service leaves (its packets find no service now), but its backend's flow is
    // still in the table until it times out, and holds the id.
    r.reload(nat_spec(VIP, Proto::Tcp, &[a]));
    assert!(r.release_cycle().is_empty());
    assert_eq!(r.dp.backend_flows(id_c), 1);
    assert!(r.dp.tables().backend(id_c).is_some());
    r.now += lb_core::Duration::from_secs(600);
    r.dp.housekeeping(r.now, 10_000);
    assert_eq!(r.release_cycle(), vec![id_c]);
    assert_eq!(r.cp.ids_in_use(), 1);
}

#[test]
fn templates_of_a_released_backend_are_purged() {
    let (a, b, c) = (
        "198.51.100.11:8080",
        "198.51.100.12:8080",
        "198.51.100.13:8080",
    );
    let spec = |bs: &[&str]| {
        let mut s = nat_spec(VIP, Proto::Tcp, bs);
        s.services[0].persistence_timeout = lb_core::Duration::from_secs(3600);
        s
    };
    let mut r = Rig::new(spec(&[a, b]), Link::Ip);
    let client = sa("192.0.2.2:40000");
    let (x, snat) = establish(&mut r, client);
    let other = if x == sa(a) { b } else { a };
    let id_x = r.cp.backend_id(sa(VIP), Proto::Tcp, x).unwrap();
    r.forward(&tcp(client, sa(VIP), FIN_ACK, b""));
    r.forward(&tcp(x, snat, FIN_ACK, b""));
    r.forward(&tcp(client, sa(VIP), ACK, b""));
    // X leaves. Its template outlives its flow (the persistence timeout is an hour).
    r.reload(spec(&[other]));
    r.now += lb_core::Duration::from_secs(600);
    r.dp.housekeeping(r.now, 10_000);
    assert_eq!(r.dp.backend_flows(id_x), 0);
    assert_eq!(r.dp.ct4.persist().len(), 1);
    assert_eq!(r.release_cycle(), vec![id_x]);
    assert_eq!(r.dp.ct4.persist().len(), 0, "the template naming X is gone");
    // C takes X's id; the client's next connection is scheduled, not sent to C by X's
    // template.
    r.reload(spec(&[other, c]));
    assert_eq!(r.id_of(c), Some(id_x));
    let next = FlowKey::new(client.ip(), 40001, sa(VIP).ip(), 80, IpProto::Tcp).unwrap();
    let e = r.dp.explain(&next, r.now);
    assert!(
        matches!(e.decision, Decision::Scheduler(_)),
        "{:?}",
        e.decision
    );
}

#[test]
fn sync_installs_nothing_for_a_released_backend() {
    use lb_conntrack::sync::{RecordOp, SyncReceiver, SyncRecord, SyncSender};
    let (a, b) = ("198.51.100.11:8080", "198.51.100.12:8080");
    let mut r = Rig::new(nat_spec(VIP, Proto::Tcp, &[a, b]), Link::Ip);
    let id_a = r.id_of(a).unwrap();
    r.reload(nat_spec(VIP, Proto::Tcp, &[b]));
    // Released by the data path, not yet dropped by the control plane.
    assert_eq!(r.dp.release_retired(), vec![id_a]);
    let key = FlowKey::new(
        "192.0.2.9".parse::<IpAddr>().unwrap(),
        5000,
        sa(VIP).ip(),
        80,
        IpProto::Tcp,
    )
    .unwrap();
    let rec = SyncRecord {
        op: RecordOp::Update,
        key,
        backend: id_a,
        backend_tag: None,
        state: lb_conntrack::FlowState::Tcp(lb_conntrack::TcpState::Established),
        remaining_ms: 60_000,
        nat: None,
        persist: None,
    };
    let mac = HashKey::from_bytes([3; 16]);
    let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
    tx.set_echo(1);
    let mut rx = SyncReceiver::new(mac, 1);
    let mut out = Vec::new();
    tx.encode_items(&[rec], &[], 0, &mut out);
    let msg = rx.receive(&out[0]).unwrap().message;
    let got = r.dp.apply_sync(&msg, r.now, false);
    assert_eq!((got.installed, got.refused), (0, 1));
    assert_eq!(r.dp.backend_flows(id_a), 0);
}

/// 100 000 reloads, each with a fresh backend address (more than the 65 536 ids): all
/// succeed, and ids stay bounded while a flow pinned on an early retired backend holds its id.
#[test]
fn a_hundred_thousand_fresh_backends_fit_in_a_few_ids() {
    let key = HashKey::from_bytes([9; 16]);
    let fixed = "198.51.100.11:8080";
    let spec = |extra: &[SocketAddr]| {
        let mut s = ServiceSpec::new(sa(VIP), Proto::Tcp, Mode::Nat).with_backend(sa(fixed), 1);
        s.scheduler = "rr".parse().unwrap();
        for x in extra {
            s = s.with_backend(*x, 1);
        }
        DataplaneSpec {
            snat_addrs: vec!["203.0.113.100".parse().unwrap()],
            conntrack_capacity: 1024,
            services: vec![s],
            ..DataplaneSpec::default()
        }
    };
    let mut cp = ControlPlane::new(spec(&[pooled(0)]), key).unwrap();
    let mut opts = DataplaneOptions::new(key);
    opts.snat_ports = 1024..=1279;
    let mut r = Rig {
        dp: Dataplane::new(&spec(&[]), cp.build().unwrap(), opts).unwrap(),
        cp,
        buf: vec![0; 4096],
        now: Instant::from_secs(1),
    };
    // Pin a flow on pooled(0): round robin from the fixed backend, so try a few clients.
    let pinned = (0..4)
        .map(|i| sa(&format!("192.0.2.2:{}", 40_000 + i)))
        .find(|&c| establish(&mut r, c).0 == pooled(0))
        .unwrap();
    let id0 = r.cp.backend_id(sa(VIP), Proto::Tcp, pooled(0)).unwrap();
    let mut max_in_use = 0;
    for i in 1..=100_000u32 {
        r.reload(spec(&[pooled(i)]));
        r.release_cycle();
        max_in_use = max_in_use.max(r.cp.ids_in_use());
        assert_ne!(r.cp.backend_id(sa(VIP), Proto::Tcp, pooled(i)), Some(id0));
    }
    assert!(max_in_use <= 4, "ids in use peaked at {max_in_use}");
    assert!(r.dp.tables().backends.len() <= 4);
    assert!(r.dp.stats().backends.len() <= 4);
    assert_eq!(r.cp.ids_recycled(), 99_999);
    // The pinned flow still reaches pooled(0).
    let out = r.forward(&tcp(pinned, sa(VIP), ACK, b"still here"));
    assert_eq!(dst_of(&out), pooled(0));
}

#[derive(Debug, Clone)]
enum Op {
    /// Reload with the fixed backend and these pooled ones.
    Reload(Vec<u32>),
    /// A new UDP flow from this client port.
    Open(u16),
    /// Another datagram of the `n`-th flow opened (modulo their number).
    Again(usize),
    /// Time passes; housekeeping.
    Advance(u64),
    /// A release cycle.
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => proptest::collection::vec(0u32..24, 0..4).prop_map(Op::Reload),
        4 => any::<u16>().prop_map(|p| Op::Open(p | 1024)),
        3 => any::<usize>().prop_map(Op::Again),
        1 => (1u64..400).prop_map(Op::Advance),
        2 => Just(Op::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random reloads (backends leave and come back), flows, time and release cycles: a
    /// tracked flow always reaches the address it started with, a backend retired and back
    /// keeps its id while referenced, an id is released only when no flow is bound to it, and
    /// the ids in use are the configured backends plus retired ones holding flows.
    #[test]
    fn recycling_never_moves_a_flow(ops in proptest::collection::vec(op(), 1..120)) {
        let vip = "203.0.113.10:53";
        let fixed = "198.51.100.11:53";
        let udp_addr = |i: u32| SocketAddr::from(([10, 0, 0, i as u8], 53));
        let spec = |extra: &[u32]| {
            let mut s = nat_spec(vip, Proto::Udp, &[fixed]);
            s.services[0].scheduler = "rr".parse().unwrap();
            for &x in extra {
                if !s.services[0].backends.iter().any(|b| b.addr == udp_addr(x)) {
                    s.services[0] = s.services[0].clone().with_backend(udp_addr(x), 1);
                }
            }
            s
        };
        let mut r = Rig::new(spec(&[]), Link::Ip);
        let mut flows: Vec<(FlowKey, SocketAddr)> = Vec::new();
        let mut configured = 1;
        for op in ops {
            match op {
                Op::Reload(extra) => {
                    let s = spec(&extra);
                    configured = s.services[0].backends.len();
                    // Retired backends still present keep their ids if they come back.
                    let before: HashMap<SocketAddr, BackendId> = r.cp.backends()
                        .map(|b| (b.addr, b.id)).collect();
                    r.reload(s.clone());
                    for b in &s.services[0].backends {
                        if let Some(&id) = before.get(&b.addr) {
                            prop_assert_eq!(
                                r.cp.backend_id(sa(vip), Proto::Udp, b.addr), Some(id));
                        }
                    }
                }
                Op::Open(port) => {
                    let client = SocketAddr::new("192.0.2.7".parse().unwrap(), port);
                    let key = FlowKey::new(client.ip(), port, sa(vip).ip(), 53, IpProto::Udp)
                        .unwrap();
                    if r.dp.flow_backend(&key, r.now).is_none() {
                        let out = r.forward(&udp(client, sa(vip), b"q"));
                        flows.retain(|(k, _)| *k != key);
                        flows.push((key, dst_of(&out)));
                    }
                }
                Op::Again(n) if !flows.is_empty() => {
                    let (key, to) = flows[n % flows.len()];
                    if r.dp.flow_backend(&key, r.now).is_some() {
                        let client = SocketAddr::new(key.src(), key.src_port());
                        let out = r.forward(&udp(client, sa(vip), b"q"));
                        prop_assert_eq!(dst_of(&out), to, "a tracked flow changed backend");
                    }
                }
                Op::Again(_) => {}
                Op::Advance(s) => {
                    r.now += lb_core::Duration::from_secs(s);
                    r.dp.housekeeping(r.now, 100_000);
                    // Reference counts are what the tables hold: every entry counts once, and
                    // each live flow counts for its backend. (An entry seen again and moved on
                    // by `expire` before its deadline may be removed late, up to the time it
                    // was moved less its last-seen time: lookups already call it gone, and its
                    // backend stays referenced until it is removed.)
                    let mut held: HashMap<BackendId, u32> = HashMap::new();
                    for (k, to) in &flows {
                        if let Some(id) = r.dp.flow_backend(k, r.now) {
                            *held.entry(id).or_default() += 1;
                            prop_assert_eq!(r.dp.tables().backend(id).unwrap().addr, *to);
                        }
                    }
                    let mut counted = 0u64;
                    for b in r.dp.tables().backends.iter().flatten() {
                        let n = r.dp.backend_flows(b.id);
                        prop_assert!(n >= held.get(&b.id).copied().unwrap_or(0));
                        counted += u64::from(n);
                    }
                    prop_assert_eq!(counted, r.dp.table_stats().entries);
                }
                Op::Release => {
                    let freed = r.release_cycle();
                    for (k, _) in &flows {
                        if let Some(id) = r.dp.flow_backend(k, r.now) {
                            prop_assert!(!freed.contains(&id), "released {id:?} under a flow");
                        }
                    }
                    // Now: configured backends plus retired ones holding flows, nothing else.
                    let retired_held = r.cp.backends()
                        .filter(|b| !b.live)
                        .inspect(|b| assert!(r.dp.backend_flows(b.id) > 0))
                        .count();
                    prop_assert_eq!(r.cp.ids_in_use(), configured + retired_held);
                }
            }
        }
    }
}
