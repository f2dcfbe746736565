//! Active-active placement behind ECMP (issue 17): several balancers share a VIP and the router
//! may move a flow from one to another in mid-flow. Balancers built from the same spec and key
//! place every new flow alike under a consistent-hash scheduler; a packet that cannot start a
//! flow, of a flow another balancer started, is placed by the service's consistent hash in modes
//! `tunnel` and `dr` (the same answer on every balancer, whatever the scheduler) and dropped in
//! `nat` and `dnat`; a backend removal moves only that backend's share of new flows, and no
//! established flow.

use lb_core::{FlowHasher, FlowKey, IpProto};

use super::*;

const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;
const PSH_ACK: u8 = 0x18;

/// Backends of the group tests.
const N: u8 = 10;

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";

/// Backend `i`: 198.51.100.(11 + i) or 2001:db8:b::(11 + i) (hex), MAC 02:00:00:00:00:(11 + i);
/// the last byte of its address (or MAC) identifies it in the output.
fn backend_addr(i: u8, v6: bool, port: u16) -> SocketAddr {
    let ip = if v6 {
        IpAddr::from([0x2001, 0xdb8, 0xb, 0, 0, 0, 0, u16::from(11 + i)])
    } else {
        IpAddr::from([198, 51, 100, 11 + i])
    };
    SocketAddr::new(ip, port)
}

/// One service: `n` backends of weight `weights[i]` (1 when absent).
fn service(vip: SocketAddr, proto: Proto, mode: Mode, sched: &str, weights: &[u32]) -> ServiceSpec {
    let port = if matches!(mode, Mode::Nat | Mode::Dnat) {
        8080
    } else {
        0
    };
    let mut s = ServiceSpec::new(vip, proto, mode).with_scheduler(sched.parse().unwrap());
    for (i, &w) in weights.iter().enumerate() {
        let i = i as u8;
        s = s.with_backend(backend_addr(i, vip.is_ipv6(), port), w);
        s.backends[usize::from(i)].mac = Some(MacAddr([2, 0, 0, 0, 0, 11 + i]));
    }
    s
}

/// Four services on the two VIPs, all in `mode` under `sched`: TCP :80 and UDP :53 of each
/// family, `N` backends each.
fn spec(mode: Mode, sched: &str) -> DataplaneSpec {
    let w = [1; N as usize];
    let mut services = Vec::new();
    for vip in [VIP4, VIP6] {
        let ip: IpAddr = vip.parse().unwrap();
        services.push(service(
            SocketAddr::new(ip, 80),
            Proto::Tcp,
            mode,
            sched,
            &w,
        ));
        services.push(service(
            SocketAddr::new(ip, 53),
            Proto::Udp,
            mode,
            sched,
            &w,
        ));
    }
    DataplaneSpec {
        snat_addrs: vec![
            "203.0.113.100".parse().unwrap(),
            "2001:db8:100::100".parse().unwrap(),
        ],
        conntrack_capacity: 1 << 16,
        services,
        ..DataplaneSpec::default()
    }
}

/// A balancer: its own control plane and data path from `spec` and `key`, its own seed (as
/// separate processes have).
fn balancer(spec: &DataplaneSpec, link: Link, key: HashKey, seed: u64) -> Rig {
    let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
    let mut opts = DataplaneOptions::new(key);
    opts.link = link;
    opts.seed = seed;
    let dp = Dataplane::new(spec, cp.build().unwrap(), opts).unwrap();
    Rig {
        cp,
        dp,
        buf: vec![0; 4096],
        now: Instant::from_secs(1),
    }
}

/// Three balancers behind ECMP, and a single one given every flow.
struct Group {
    link: Link,
    peers: Vec<Rig>,
    single: Rig,
    /// The router's hash (its own seed: it knows nothing of the balancers' key).
    router: FlowHasher,
}

impl Group {
    fn new(spec: &DataplaneSpec, link: Link, key: HashKey) -> Group {
        Group {
            link,
            peers: (0..3).map(|i| balancer(spec, link, key, 100 + i)).collect(),
            single: balancer(spec, link, key, 7),
            router: FlowHasher::new(HashKey::from_bytes([0xec; 16])),
        }
    }

    /// The peer ECMP sends `key` to, and the one it moves the flow to when the route changes.
    fn route(&self, key: &FlowKey) -> (usize, usize) {
        let h = self.router.hash_flow(key);
        let a = (h % 3) as usize;
        (a, (a + 1 + ((h >> 8) % 2) as usize) % 3)
    }

    /// Runs an IP packet through `r` (framed for the link); the backend it went to, or the
    /// drop reason.
    fn place(&mut self, who: Who, ip: &[u8]) -> Result<u8, DropReason> {
        let link = self.link;
        let r = match who {
            Who::Peer(i) => &mut self.peers[i],
            Who::Single => &mut self.single,
        };
        let (v, out) = r.run(&frame(link, ip));
        match v {
            Verdict::Forward { .. } => Ok(placed(&out, link)),
            Verdict::Drop(d) => Err(d),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Who {
    Peer(usize),
    Single,
}

/// An IP packet framed for `link` (an Ethernet header from a router to the balancer).
pub(super) fn frame(link: Link, ip: &[u8]) -> Vec<u8> {
    match link {
        Link::Ip => ip.to_vec(),
        Link::Ethernet => {
            let mut f = vec![2, 0, 0x5e, 0x10, 0, 1, 2, 0, 0, 0, 0, 0xcc];
            f.extend_from_slice(if ip[0] >> 4 == 6 {
                &[0x86, 0xdd]
            } else {
                &[0x08, 0x00]
            });
            f.extend_from_slice(ip);
            f
        }
    }
}

/// The backend a forwarded packet went to: the last byte of its (outer) destination address,
/// or of its destination MAC for a frame.
fn placed(out: &[u8], link: Link) -> u8 {
    match link {
        Link::Ip => match parse(out, Link::Ip).unwrap().key.dst() {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        },
        Link::Ethernet => out[5],
    }
}

/// Flow `i` (below 2^24) of the mixed workloads: both families, TCP or UDP; clients spread
/// over addresses and ports.
fn flow(i: u32, proto: Proto) -> FlowKey {
    let v6 = i % 2 == 1;
    let port = 1024 + (i / 512) as u16;
    let (src, vip): (IpAddr, IpAddr) = if v6 {
        (
            IpAddr::from([
                0x2001,
                0xdb8,
                0xc,
                0,
                0,
                0,
                (i >> 16) as u16,
                i as u16 & 0x1ff,
            ]),
            VIP6.parse().unwrap(),
        )
    } else {
        (
            IpAddr::from([192, 0, (2 + (i >> 17)) as u8, (i >> 1) as u8]),
            VIP4.parse().unwrap(),
        )
    };
    let (dport, p) = match proto {
        Proto::Tcp => (80, IpProto::Tcp),
        Proto::Udp => (53, IpProto::Udp),
    };
    FlowKey::new(src, port, vip, dport, p).unwrap()
}

fn ends(k: &FlowKey) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(k.src(), k.src_port()),
        SocketAddr::new(k.dst(), k.dst_port()),
    )
}

/// A client packet of flow `k`: a TCP segment with `flags`, or a UDP datagram.
fn client_pkt(k: &FlowKey, flags: u8) -> Vec<u8> {
    let (c, v) = ends(k);
    match k.proto() {
        IpProto::Tcp => tcp(c, v, flags, if flags & SYN != 0 { b"" } else { b"data" }),
        _ => udp(c, v, b"datagram"),
    }
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" from a router on the path back to
/// the client, about a reply of flow `k` that its backend sent straight to the client (direct
/// server return, from the VIP): it reaches whichever balancer ECMP hashes the router's
/// packet to, which must send it to the backend that owns the flow.
fn too_big_about(k: &FlowKey) -> Vec<u8> {
    let (c, v) = ends(k);
    let reply = match k.proto() {
        IpProto::Tcp => tcp(v, c, ACK, &[0; 64]),
        _ => udp(v, c, &[0; 64]),
    };
    if k.is_ipv4() {
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
        icmp.extend_from_slice(&reply[..28]);
        ip_packet("192.0.2.254".parse().unwrap(), v.ip(), 1, &icmp)
    } else {
        let mut icmp = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
        icmp.extend_from_slice(&reply[..48]);
        ip_packet("2001:db8:c::fe".parse().unwrap(), v.ip(), 58, &icmp)
    }
}

const HASHES: [&str; 4] = ["maglev", "ring", "rendezvous", "jump"];

/// Item 2 of the issue, new flows: 10 000 new flows (TCP SYNs and first UDP datagrams, both
/// families) spread over three balancers by the router's hash land, every one, on the backend
/// a single balancer given all of them picks, under every consistent-hash scheduler and in
/// every mode. Later packets of the flows, moved by the router to another balancer (tunnel,
/// dr), and ICMP errors about them reaching the third, still reach that backend.
#[test]
fn new_flows_agree_across_an_ecmp_group() {
    let key = HashKey::from_passphrase("issue 17: one cluster's secret");
    for sched in HASHES {
        for (mode, link) in [
            (Mode::Tunnel, Link::Ip),
            (Mode::Dr, Link::Ethernet),
            (Mode::Nat, Link::Ip),
        ] {
            let mut g = Group::new(&spec(mode, sched), link, key);
            let mut moved = 0;
            for i in 0..10_000u32 {
                let proto = if (i / 2) % 2 == 0 {
                    Proto::Tcp
                } else {
                    Proto::Udp
                };
                let k = flow(i, proto);
                let (a, b) = g.route(&k);
                let first = client_pkt(&k, SYN);
                let want = g.place(Who::Single, &first).unwrap();
                let got = g.place(Who::Peer(a), &first).unwrap();
                assert_eq!(got, want, "{sched} {mode}: flow {i} {k:?}");
                if mode == Mode::Nat {
                    continue;
                }
                // The route moves: the flow's next packet reaches peer b, which never saw it.
                let next = client_pkt(&k, PSH_ACK);
                assert_eq!(
                    g.place(Who::Peer(b), &next),
                    Ok(want),
                    "{sched} {mode}: {k:?}"
                );
                let c = 3 - a - b;
                assert_eq!(
                    g.place(Who::Peer(c), &too_big_about(&k)),
                    Ok(want),
                    "{sched} {mode}: ICMP error about {k:?}"
                );
                moved += 1;
            }
            let placed: u64 = g.peers.iter().map(|p| p.dp.stats().mid_flow_placed).sum();
            if mode != Mode::Nat {
                // Peer b placed the moved TCP segments, peer c every ICMP error; b's UDP
                // datagrams were new flows to it (scheduled, by the same hash).
                assert_eq!(placed, moved + moved / 2, "{sched} {mode}");
            } else {
                assert_eq!(placed, 0);
            }
        }
    }
}

/// Item 2 of the issue, mid-flow packets, every scheduler (policies included) in modes
/// `tunnel` and `dr`: 10 000 TCP flows (both families) opened on the balancer the router
/// picks, then moved to another one. The two balancers that never saw a flow place its
/// mid-flow packets on the same backend, the one `explain` names on a third data path before it
/// saw the flow, and keep it there (the flow is tracked from then on); the balancer that opened
/// it keeps its backend. Under a consistent-hash scheduler that backend is the flow's own; under
/// a policy it is so only by chance, one flow in N (printed): such flows need sync.
#[test]
fn mid_flow_packets_agree_for_every_scheduler() {
    let key = HashKey::from_passphrase("issue 17: one cluster's secret");
    for (mode, link) in [(Mode::Tunnel, Link::Ip), (Mode::Dr, Link::Ethernet)] {
        for kind in SchedulerKind::all() {
            let sched = kind.name();
            let hash = matches!(kind, SchedulerKind::Hash(_));
            let mut g = Group::new(&spec(mode, sched), link, key);
            let n = if hash || matches!(sched, "rr" | "wlc") {
                10_000
            } else {
                2_000
            };
            let mut same = 0u32;
            let mut refused = 0u32;
            for i in 0..n {
                let k = flow(i, Proto::Tcp);
                let (a, b) = g.route(&k);
                let c = 3 - a - b;
                let e = g.single.dp.explain(&k, g.single.now);
                let Decision::ConsistentHash(id) = e.mid_flow else {
                    panic!("{sched} {mode}: {:?}", e.mid_flow)
                };
                let expected = g.single.cp.backend(id).unwrap().addr;
                let expected = match expected.ip() {
                    IpAddr::V4(x) => x.octets()[3],
                    IpAddr::V6(x) => x.octets()[15],
                };
                // The single data path opens it too, by its own scheduler. (Overflow refuses
                // new flows once every backend holds its weight in connections: such a flow
                // never starts, and its stray segments are placed all the same.)
                let _ = g.place(Who::Single, &client_pkt(&k, SYN));
                let orig = match g.place(Who::Peer(a), &client_pkt(&k, SYN)) {
                    Ok(b) => b,
                    Err(DropReason::Overloaded) if sched == "ovf" => {
                        refused += 1;
                        expected
                    }
                    Err(r) => panic!("{sched} {mode}: {r:?}"),
                };
                let moved = g.place(Who::Peer(b), &client_pkt(&k, ACK)).unwrap();
                let third = g.place(Who::Peer(c), &client_pkt(&k, PSH_ACK)).unwrap();
                assert_eq!(moved, expected, "{sched} {mode}: flow {i}");
                assert_eq!(third, expected, "{sched} {mode}: flow {i}");
                // Tracked now: later packets stay, on every balancer.
                assert_eq!(g.place(Who::Peer(b), &client_pkt(&k, PSH_ACK)), Ok(moved));
                assert_eq!(g.place(Who::Peer(a), &client_pkt(&k, PSH_ACK)), Ok(orig));
                assert!(g.peers[b].dp.flow_backend(&k, g.peers[b].now).is_some());
                if hash {
                    assert_eq!(moved, orig, "{sched} {mode}: flow {i}");
                }
                same += u32::from(moved == orig);
            }
            let share = f64::from(same - refused) / f64::from(n - refused);
            if !hash {
                println!(
                    "{mode} {sched}: a moved flow reaches the backend the policy chose for {:.1} % \
                     of {n} flows (1/{N} = {:.1} %); every balancer agrees on the rest",
                    100.0 * share,
                    100.0 / f64::from(N)
                );
                assert!(share < 0.5, "{sched}: {share}");
            }
        }
    }
}

/// Modes `nat` and `dnat` cannot place a packet of a flow another balancer started (the flow's
/// SNAT tuple or route is that balancer's): a TCP segment without SYN is dropped and counted as
/// `MidFlowUnknown`, an ICMP error as `NoFlow`, whatever `mid_flow` says; a UDP datagram starts
/// a flow here. Both families.
#[test]
fn nat_and_dnat_drop_mid_flow_packets_of_unknown_flows() {
    let key = HashKey::from_bytes([4; 16]);
    for mode in [Mode::Nat, Mode::Dnat] {
        for setting in [MidFlow::Hash, MidFlow::Drop] {
            let mut spec = spec(mode, "maglev");
            for s in &mut spec.services {
                s.mid_flow = setting;
            }
            let mut r = balancer(&spec, Link::Ip, key, 1);
            assert!(r.dp.tables().services.iter().all(|s| !s.places_mid_flow()));
            for i in 0..4 {
                let k = flow(i, Proto::Tcp);
                let e = r.dp.explain(&k, r.now);
                assert_eq!(e.mid_flow, Decision::Drop(DropReason::MidFlowUnknown));
                assert_eq!(r.dp.explain_mid_flow(&k, r.now), e.mid_flow);
                assert!(matches!(e.decision, Decision::Scheduler(_)));
                assert!(!e.service.unwrap().places_mid_flow);
                for flags in [ACK, PSH_ACK, FIN_ACK, RST, SYNACK] {
                    assert_eq!(
                        r.run(&client_pkt(&k, flags)).0,
                        Verdict::Drop(DropReason::MidFlowUnknown),
                        "{mode} {k:?} flags {flags:#x}"
                    );
                }
                assert_eq!(
                    r.run(&too_big_about(&k)).0,
                    Verdict::Drop(DropReason::NoFlow)
                );
                let u = flow(i, Proto::Udp);
                assert_eq!(
                    r.dp.explain(&u, r.now).mid_flow,
                    Decision::Drop(DropReason::NoFlow)
                );
                assert_eq!(
                    r.run(&too_big_about(&u)).0,
                    Verdict::Drop(DropReason::NoFlow)
                );
                assert!(matches!(
                    r.run(&client_pkt(&u, 0)).0,
                    Verdict::Forward { .. }
                ));
                // The SYN still opens the flow, and then its segments pass.
                r.forward(&client_pkt(&k, SYN));
                r.forward(&client_pkt(&k, ACK));
            }
            let s = r.dp.stats();
            assert_eq!(s.drops_for(DropReason::MidFlowUnknown), 4 * 5);
            assert_eq!(s.drops_for(DropReason::NoFlow), 4 * 2);
            assert_eq!(s.mid_flow_placed, 0);
            assert_eq!(r.dp.table_stats().entries, 4 * 2);
        }
    }
}

/// `mid_flow = "drop"` in modes `tunnel` and `dr` (IPVS's behaviour): a packet that cannot
/// start a flow of an untracked flow is dropped (TCP: `MidFlowUnknown`; ICMP error: `NoFlow`),
/// a SYN or UDP datagram is scheduled as always, and no consistent hash is built for a policy.
#[test]
fn mid_flow_drop_setting_restores_ipvs_behaviour() {
    let key = HashKey::from_bytes([4; 16]);
    for (mode, link) in [(Mode::Tunnel, Link::Ip), (Mode::Dr, Link::Ethernet)] {
        for sched in ["maglev", "wlc"] {
            let mut spec = spec(mode, sched);
            for s in &mut spec.services {
                s.mid_flow = MidFlow::Drop;
            }
            let mut r = balancer(&spec, link, key, 1);
            for s in &r.dp.tables().services {
                assert!(!s.places_mid_flow() && s.fallback.is_none());
                assert_eq!(s.mid_flow, MidFlow::Drop);
            }
            for i in 0..4 {
                for proto in [Proto::Tcp, Proto::Udp] {
                    let k = flow(i, proto);
                    let e = r.dp.explain(&k, r.now);
                    assert_eq!(e.service.unwrap().mid_flow, MidFlow::Drop);
                    let want = match proto {
                        Proto::Tcp => DropReason::MidFlowUnknown,
                        Proto::Udp => DropReason::NoFlow,
                    };
                    assert_eq!(e.mid_flow, Decision::Drop(want));
                    if proto == Proto::Tcp {
                        assert_eq!(
                            r.run(&frame(link, &client_pkt(&k, ACK))).0,
                            Verdict::Drop(want)
                        );
                    }
                    assert_eq!(
                        r.run(&frame(link, &too_big_about(&k))).0,
                        Verdict::Drop(DropReason::NoFlow)
                    );
                    r.forward(&frame(link, &client_pkt(&k, SYN)));
                    r.forward(&frame(link, &client_pkt(&k, ACK)));
                }
            }
            assert_eq!(r.dp.stats().drops_for(DropReason::MidFlowUnknown), 4);
            assert_eq!(r.dp.stats().drops_for(DropReason::NoFlow), 8);
            assert_eq!(r.dp.stats().mid_flow_placed, 0);
        }
    }
}

/// Every mid-flow path on one balancer, as the backend receives it: tunnel (IPIP, IP6IP6,
/// GUE) and dr over Ethernet, both families, TCP segments (tracked, counted as connections)
/// and ICMP errors about TCP and UDP flows (forwarded, not tracked); the bytes are the input's
/// (encapsulated, or with new MACs) with checksums a full recompute leaves alone.
#[test]
fn mid_flow_paths_forward_and_track() {
    let key = HashKey::from_bytes([6; 16]);
    for (mode, link, tunnel) in [
        (Mode::Tunnel, Link::Ip, TunnelKind::Ipip),
        (Mode::Tunnel, Link::Ip, TunnelKind::Gue { port: 6080 }),
        (Mode::Dr, Link::Ethernet, TunnelKind::Ipip),
    ] {
        for sched in ["maglev", "rr"] {
            let mut spec = spec(mode, sched);
            for s in &mut spec.services {
                s.tunnel = tunnel;
            }
            let mut r = balancer(&spec, link, key, 1);
            for i in 0..8u32 {
                for proto in [Proto::Tcp, Proto::Udp] {
                    let k = flow(i, proto);
                    let e = r.dp.explain(&k, r.now);
                    assert!(e.service.unwrap().places_mid_flow);
                    assert_eq!(r.dp.explain_mid_flow(&k, r.now), e.mid_flow);
                    let Decision::ConsistentHash(id) = e.mid_flow else {
                        panic!("{:?}", e.mid_flow)
                    };
                    let b = *r.cp.backend(id).unwrap();
                    let before = r.dp.stats().clone();
                    let entries = r.dp.table_stats().entries;
                    // An ICMP error: forwarded to the owner, not tracked.
                    let err = too_big_about(&k);
                    let out = r.forward(&frame(link, &err));
                    check_out(&out, &err, link, mode, tunnel, &b);
                    assert_eq!(r.dp.table_stats().entries, entries);
                    assert_eq!(r.dp.flow_backend(&k, r.now), None);
                    if proto == Proto::Udp {
                        assert_eq!(r.dp.stats().mid_flow_placed, before.mid_flow_placed + 1);
                        continue;
                    }
                    // A segment of the established connection: forwarded and tracked.
                    let seg = client_pkt(&k, PSH_ACK);
                    let out = r.forward(&frame(link, &seg));
                    check_out(&out, &seg, link, mode, tunnel, &b);
                    assert_eq!(r.dp.flow_backend(&k, r.now), Some(id));
                    assert_eq!(r.dp.explain(&k, r.now).mid_flow, Decision::Flow(id));
                    assert_eq!(r.dp.explain_mid_flow(&k, r.now), Decision::Flow(id));
                    assert_eq!(r.dp.explain(&k, r.now).decision, Decision::Flow(id));
                    let s = r.dp.stats();
                    assert_eq!(s.mid_flow_placed, before.mid_flow_placed + 2);
                    assert_eq!(
                        s.backends[id.get() as usize].flows,
                        before.backends[id.get() as usize].flows + 1
                    );
                    let load = r.dp.backend_load(id, r.now).unwrap();
                    assert!(
                        load.active_conns >= 1,
                        "an ACK joins an established connection"
                    );
                    // Its next segment is a hit (no second placement); a FIN, RST closes it.
                    r.forward(&frame(link, &client_pkt(&k, FIN_ACK)));
                    assert_eq!(r.dp.stats().mid_flow_placed, before.mid_flow_placed + 2);
                }
            }
            // RST and FIN of flows never seen are placed the same way.
            for flags in [RST, FIN_ACK, SYNACK] {
                let k = flow(100 + u32::from(flags), Proto::Tcp);
                let Decision::ConsistentHash(id) = r.dp.explain(&k, r.now).mid_flow else {
                    panic!()
                };
                let out = r.forward(&frame(link, &client_pkt(&k, flags)));
                check_out(
                    &out,
                    &client_pkt(&k, flags),
                    link,
                    mode,
                    tunnel,
                    r.cp.backend(id).unwrap(),
                );
            }
            assert_eq!(r.dp.stats().dropped(), 0);
        }
    }
}

/// What the backend receives for the client's IP packet `ip`: for dr the same packet in a
/// frame to its MAC; for tunnel the packet encapsulated to its address.
fn check_out(out: &[u8], ip: &[u8], link: Link, mode: Mode, tunnel: TunnelKind, b: &BackendInfo) {
    if tunnel == TunnelKind::Ipip {
        // (GUE over IPv4 sends no UDP checksum, which a recompute would fill in.)
        assert_checksums(out, link);
    }
    match mode {
        Mode::Dr => {
            assert_eq!(out[..6], b.mac.unwrap().0);
            assert_eq!(&out[14..], ip);
        }
        _ => {
            let p = parse(out, Link::Ip).unwrap();
            assert_eq!(p.key.dst(), b.addr.ip());
            match tunnel {
                TunnelKind::Gue { port } => assert_eq!(p.key.dst_port(), port),
                TunnelKind::Ipip => {}
            }
            assert!(
                out.ends_with(ip),
                "the inner packet is the input, unchanged"
            );
        }
    }
}

/// Mode `dr` rewrites a frame's MAC addresses: a device that delivers IP packets (TUN) has no
/// frame header, so every packet of a dr service is dropped (`RewriteFailed`), new flows and
/// mid-flow packets alike; over Ethernet the same packets pass. (Before issue 17 the MACs were
/// written over the IP header.)
#[test]
fn dr_needs_ethernet_frames() {
    let key = HashKey::from_bytes([6; 16]);
    let spec = spec(Mode::Dr, "maglev");
    let mut ip = balancer(&spec, Link::Ip, key, 1);
    let mut eth = balancer(&spec, Link::Ethernet, key, 1);
    for i in 0..4 {
        for (proto, flags) in [(Proto::Tcp, SYN), (Proto::Tcp, ACK), (Proto::Udp, 0)] {
            let k = flow(i, proto);
            let pkt = client_pkt(&k, flags);
            assert_eq!(
                ip.run(&pkt).0,
                Verdict::Drop(DropReason::RewriteFailed),
                "{k:?} {flags:#x}"
            );
            eth.forward(&frame(Link::Ethernet, &pkt));
        }
        let err = too_big_about(&flow(i, Proto::Tcp));
        assert_eq!(ip.run(&err).0, Verdict::Drop(DropReason::RewriteFailed));
        eth.forward(&frame(Link::Ethernet, &err));
    }
}

/// A mid-flow packet follows the client's persistence template when one exists here (it is
/// synced state); a backend that is down, retired or drained is skipped along the flow's
/// preference list, the same way on every balancer; with no backend left the packet is dropped.
#[test]
fn mid_flow_follows_persistence_and_health() {
    let key = HashKey::from_bytes([8; 16]);
    let mut spec = spec(Mode::Tunnel, "wlc");
    for s in &mut spec.services {
        s.persistence_timeout = lb_core::Duration::from_secs(300);
    }
    let mut a = balancer(&spec, Link::Ip, key, 1);
    let mut b = balancer(&spec, Link::Ip, key, 2);
    // Persistence: a client's first flow writes its template on `a`; another of its flows,
    // moved to `a` mid-flow, follows the template rather than the hash.
    let mut followed = 0;
    for i in 0..40u32 {
        let k = flow(2 * i, Proto::Tcp); // IPv4 clients, one flow each so far
        let first = a.forward(&client_pkt(&k, SYN));
        let pinned = placed(&first, Link::Ip);
        let other = FlowKey::new(k.src(), k.src_port() + 1, k.dst(), 80, IpProto::Tcp).unwrap();
        let e = a.dp.explain(&other, a.now);
        assert!(
            matches!(e.mid_flow, Decision::Persistence(_)),
            "{:?}",
            e.mid_flow
        );
        assert_eq!(a.dp.explain_mid_flow(&other, a.now), e.mid_flow);
        assert_eq!(
            placed(&a.forward(&client_pkt(&other, ACK)), Link::Ip),
            pinned
        );
        let on_b = b.dp.explain(&other, b.now).mid_flow;
        followed += usize::from(on_b.backend() == e.mid_flow.backend());
    }
    // `b` has no template (no sync here): the hash, which agrees with the template 1 in N.
    assert!(followed < 20, "{followed}");

    // Health: the owner of a flow goes down on both balancers; both move its mid-flow packets
    // to the same next backend; then every backend is down.
    let k = flow(4242, Proto::Tcp);
    let Decision::ConsistentHash(owner) = a.dp.explain(&k, a.now).mid_flow else {
        panic!()
    };
    for r in [&mut a, &mut b] {
        assert!(r.cp.set_healthy(owner, false));
        r.rebuild();
    }
    let next = a.dp.explain(&k, a.now).mid_flow;
    assert!(
        matches!(next, Decision::ConsistentHash(n) if n != owner),
        "{next:?}"
    );
    assert_eq!(b.dp.explain(&k, b.now).mid_flow, next);
    let got = placed(&b.forward(&client_pkt(&k, ACK)), Link::Ip);
    assert_eq!(
        Some(got),
        next.backend()
            .map(|n| match b.cp.backend(n).unwrap().addr.ip() {
                IpAddr::V4(x) => x.octets()[3],
                IpAddr::V6(x) => x.octets()[15],
            })
    );
    let ids: Vec<BackendId> = a.cp.backends().map(|x| x.id).collect();
    for id in ids {
        a.cp.set_healthy(id, false);
    }
    a.rebuild();
    let k2 = flow(4244, Proto::Tcp);
    assert_eq!(
        a.dp.explain(&k2, a.now).mid_flow,
        Decision::Drop(DropReason::NoBackend)
    );
    assert_eq!(
        a.dp.explain_mid_flow(&k2, a.now),
        Decision::Drop(DropReason::NoBackend)
    );
    let nowhere = FlowKey::new(k2.src(), 1, k2.dst(), 81, IpProto::Tcp).unwrap();
    assert_eq!(a.dp.explain_mid_flow(&nowhere, a.now), Decision::NoService);
    assert_eq!(a.dp.explain(&nowhere, a.now).mid_flow, Decision::NoService);
    assert_eq!(
        a.run(&client_pkt(&k2, ACK)).0,
        Verdict::Drop(DropReason::NoBackend)
    );
}

/// `affinity = "source"` under a consistent hash: a client's flows share a backend, placed by
/// the hash of its address; a moved flow's mid-flow packets are placed by the same hash, so
/// they reach that backend on every balancer. (The `sh` policy keeps its own table in each
/// balancer's live pool: its mid-flow packets fall back to the flow's Maglev hash, which
/// agrees with it one flow in N.)
#[test]
fn source_affinity_moves_with_the_client() {
    let key = HashKey::from_bytes([12; 16]);
    let mut spec = spec(Mode::Tunnel, "maglev");
    for s in &mut spec.services {
        s.affinity = Affinity::Source;
    }
    let mut g = Group::new(&spec, Link::Ip, key);
    for i in 0..2_000u32 {
        let k = flow(i, Proto::Tcp);
        let (a, b) = g.route(&k);
        let orig = g.place(Who::Peer(a), &client_pkt(&k, SYN)).unwrap();
        assert_eq!(g.place(Who::Peer(b), &client_pkt(&k, ACK)), Ok(orig));
        // Another flow of the same client, started on `b`: the same backend.
        let k2 = FlowKey::new(k.src(), k.src_port() ^ 0x8000, k.dst(), 80, IpProto::Tcp).unwrap();
        assert_eq!(g.place(Who::Peer(b), &client_pkt(&k2, SYN)), Ok(orig));
    }
}

#[path = "place_change_tests.rs"]
mod change;
