//! Crafted packets through the whole data path: client packet → backend packet → reply → the
//! client sees the VIP; every mode, both families, bad input.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use lb_core::{HashKey, Instant, MacAddr};
use lb_packet::checksum::recompute;
use lb_packet::{parse, Link};

use super::*;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYNACK: u8 = 0x12;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An IP packet with transport header `l4` (checksums filled in).
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut v = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4.len()) as u16;
            let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            h.push(proto);
            h.push(64);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => panic!("mixed families"),
    };
    v.extend_from_slice(l4);
    let p = parse(&v, Link::Ip).unwrap();
    recompute(&mut v, &p).unwrap();
    v
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), 6, &l4)
}

fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), 17, &l4)
}

/// Asserts that every checksum of an IP packet is what a full recompute gives.
fn assert_checksums(pkt: &[u8], link: Link) {
    let p = parse(pkt, link).unwrap();
    let mut c = pkt.to_vec();
    recompute(&mut c[p.l3..], &parse(&pkt[p.l3..], Link::Ip).unwrap()).unwrap();
    assert_eq!(c, pkt, "checksums differ from a full recompute");
}

struct Rig {
    cp: ControlPlane,
    dp: Dataplane,
    buf: Vec<u8>,
    now: Instant,
}

impl Rig {
    fn new(spec: DataplaneSpec, link: Link) -> Rig {
        Rig::with_key(spec, link, HashKey::from_bytes([9; 16]))
    }

    fn with_key(spec: DataplaneSpec, link: Link, key: HashKey) -> Rig {
        let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
        let mut opts = DataplaneOptions::new(key);
        opts.link = link;
        let dp = Dataplane::new(&spec, cp.build().unwrap(), opts).unwrap();
        Rig {
            cp,
            dp,
            buf: vec![0; 4096],
            now: Instant::from_secs(1),
        }
    }

    /// Runs a packet; returns the verdict and the output bytes (empty on drop).
    fn run(&mut self, pkt: &[u8]) -> (Verdict, Vec<u8>) {
        self.buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
        let v = self
            .dp
            .process(&mut self.buf, HEADROOM, pkt.len(), self.now);
        let out = match v {
            Verdict::Forward { start, len } | Verdict::Reply { start, len } => {
                self.buf[start..start + len].to_vec()
            }
            Verdict::Drop(_) | Verdict::Segment | Verdict::Held => Vec::new(),
        };
        (v, out)
    }

    fn forward(&mut self, pkt: &[u8]) -> Vec<u8> {
        let (v, out) = self.run(pkt);
        assert!(
            matches!(v, Verdict::Forward { .. }),
            "expected Forward, got {v:?}"
        );
        out
    }

    fn rebuild(&mut self) {
        let t = self.cp.build().unwrap();
        self.dp.set_tables(t, self.now);
    }
}

fn nat_spec(vip: &str, proto: Proto, backends: &[&str]) -> DataplaneSpec {
    let mut s = ServiceSpec::new(sa(vip), proto, Mode::Nat);
    for b in backends {
        s = s.with_backend(sa(b), 1);
    }
    DataplaneSpec {
        snat_addrs: vec![
            "203.0.113.100".parse().unwrap(),
            "2001:db8:100::100".parse().unwrap(),
        ],
        conntrack_capacity: 4096,
        services: vec![s],
        ..DataplaneSpec::default()
    }
}

const B3: [&str; 3] = [
    "198.51.100.11:8080",
    "198.51.100.12:8080",
    "198.51.100.13:8080",
];

#[test]
fn nat_round_trip_ipv4_tcp() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let out = r.forward(&tcp(client, vip, SYN, b""));
    assert_checksums(&out, Link::Ip);
    let p = parse(&out, Link::Ip).unwrap();
    assert_eq!(p.key.src(), "203.0.113.100".parse::<IpAddr>().unwrap());
    assert!(B3
        .iter()
        .any(|b| sa(b) == SocketAddr::new(p.key.dst(), p.key.dst_port())));
    let backend = SocketAddr::new(p.key.dst(), p.key.dst_port());
    let snat = SocketAddr::new(p.key.src(), p.key.src_port());

    // The backend answers the SNAT address: the client sees the VIP.
    let back = r.forward(&tcp(backend, snat, SYNACK, b""));
    assert_checksums(&back, Link::Ip);
    let q = parse(&back, Link::Ip).unwrap();
    assert_eq!(
        q.key,
        lb_core::FlowKey::new(vip.ip(), 80, client.ip(), 40000, lb_core::IpProto::Tcp).unwrap()
    );

    // The rest of the flow keeps its backend and SNAT port.
    let out2 = r.forward(&tcp(client, vip, ACK, b"GET / HTTP/1.0\r\n\r\n"));
    assert_checksums(&out2, Link::Ip);
    let p2 = parse(&out2, Link::Ip).unwrap();
    assert_eq!(p2.key, p.key);
    let s = r.dp.stats();
    assert_eq!(s.forwarded, 3);
    assert_eq!(s.backends.iter().map(|b| b.flows).sum::<u64>(), 1);
    assert_eq!(s.backends.iter().map(|b| b.reply_packets).sum::<u64>(), 1);
}

/// Two full-NAT services with one backend in common (two VIPs, or one VIP on two ports, in front
/// of the same servers): their flows to that backend draw SNAT (address, port) pairs from one
/// pool, so no two live flows get the same reply tuple. Each service's backend has its own id;
/// with a pool per id, both pools handed out the same first pair and every second service's
/// flow was refused (counted as `table_full`).
#[test]
fn services_sharing_a_backend_share_its_snat_ports() {
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3[..1]);
    for vip in ["203.0.113.11:80", "203.0.113.10:8080"] {
        spec.services
            .push(ServiceSpec::new(sa(vip), Proto::Tcp, Mode::Nat).with_backend(sa(B3[0]), 1));
    }
    // One pair per port: 4 ports in all, 4 flows fit whatever service they come through.
    spec.snat_ports = 40_000..=40_003;
    let mut r = Rig::new(spec, Link::Ip);
    let vips = [
        sa("203.0.113.10:80"),
        sa("203.0.113.11:80"),
        sa("203.0.113.10:8080"),
    ];
    let mut replies = HashMap::new();
    for i in 0..4u16 {
        let client = SocketAddr::new("192.0.2.2".parse().unwrap(), 10_000 + i);
        let vip = vips[usize::from(i) % 3];
        let out = r.forward(&tcp(client, vip, SYN, b""));
        let p = parse(&out, Link::Ip).unwrap();
        let snat = SocketAddr::new(p.key.src(), p.key.src_port());
        assert!(
            replies.insert(snat, (client, vip)).is_none(),
            "{snat} handed out twice"
        );
    }
    // Each backend answer reaches its own client, from the VIP it asked.
    for (snat, (client, vip)) in &replies {
        let back = r.forward(&tcp(sa(B3[0]), *snat, SYNACK, b""));
        let q = parse(&back, Link::Ip).unwrap();
        assert_eq!(SocketAddr::new(q.key.src(), q.key.src_port()), *vip);
        assert_eq!(SocketAddr::new(q.key.dst(), q.key.dst_port()), *client);
    }
    // The fifth flow finds the shared pool empty (all four hold established-to-be flows that are
    // half-open: the oldest makes way, as under SNAT pressure).
    let (v, _) = r.run(&tcp(sa("192.0.2.2:10004"), vips[1], SYN, b""));
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(r.dp.stats().drops.iter().sum::<u64>(), 0);
}

#[test]
fn nat_round_trip_ipv6_udp() {
    let backends = ["[2001:db8:b::11]:5353", "[2001:db8:b::12]:5353"];
    let mut r = Rig::new(
        nat_spec("[2001:db8:10::10]:53", Proto::Udp, &backends),
        Link::Ip,
    );
    let client = sa("[2001:db8:c::2]:5000");
    let vip = sa("[2001:db8:10::10]:53");
    let out = r.forward(&udp(client, vip, b"query"));
    assert_checksums(&out, Link::Ip);
    let p = parse(&out, Link::Ip).unwrap();
    assert_eq!(p.key.src(), "2001:db8:100::100".parse::<IpAddr>().unwrap());
    let backend = SocketAddr::new(p.key.dst(), p.key.dst_port());
    assert!(backends.iter().any(|b| sa(b) == backend));
    let back = r.forward(&udp(
        backend,
        SocketAddr::new(p.key.src(), p.key.src_port()),
        b"answer",
    ));
    assert_checksums(&back, Link::Ip);
    let q = parse(&back, Link::Ip).unwrap();
    assert_eq!((q.key.src(), q.key.src_port()), (vip.ip(), 53));
    assert_eq!((q.key.dst(), q.key.dst_port()), (client.ip(), 5000));
    assert_eq!(q.payload(&back), b"answer");
}

#[test]
fn maglev_spreads_new_flows_evenly() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let vip = sa("203.0.113.10:80");
    let mut per: HashMap<IpAddr, usize> = HashMap::new();
    let n = 3000;
    for i in 0..n {
        let client = SocketAddr::new("192.0.2.2".parse().unwrap(), 10_000 + i as u16);
        let out = r.forward(&tcp(client, vip, SYN, b""));
        *per.entry(parse(&out, Link::Ip).unwrap().key.dst())
            .or_default() += 1;
    }
    assert_eq!(per.len(), 3);
    for (b, c) in per {
        assert!(
            (c as f64 / n as f64 - 1.0 / 3.0).abs() < 0.05,
            "{b}: {c} of {n}"
        );
    }
}

#[test]
fn health_and_reload_keep_established_flows() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let vip = sa("203.0.113.10:80");
    let flows: Vec<(SocketAddr, IpAddr)> = (0..60)
        .map(|i| {
            let c = SocketAddr::new("192.0.2.2".parse().unwrap(), 20_000 + i);
            let out = r.forward(&tcp(c, vip, SYN, b""));
            (c, parse(&out, Link::Ip).unwrap().key.dst())
        })
        .collect();
    // Backend .13 goes down: new flows avoid it, established flows to the others are untouched.
    let down = r.cp.backend_id(vip, Proto::Tcp, sa(B3[2])).unwrap();
    assert!(r.cp.set_healthy(down, false));
    r.rebuild();
    for i in 0..200 {
        let c = SocketAddr::new("192.0.2.3".parse().unwrap(), 30_000 + i);
        let out = r.forward(&tcp(c, vip, SYN, b""));
        assert_ne!(parse(&out, Link::Ip).unwrap().key.dst(), sa(B3[2]).ip());
    }
    for (c, b) in &flows {
        let out = r.forward(&tcp(*c, vip, ACK, b"x"));
        assert_eq!(
            parse(&out, Link::Ip).unwrap().key.dst(),
            *b,
            "flow {c} moved"
        );
    }
    // Reload without .12: its flows still reach it (retired, not reset); others unchanged.
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &[B3[0], B3[2]]);
    spec.conntrack_capacity = 4096;
    let reload = r.cp.apply(spec).unwrap();
    assert_eq!(reload.removed.len(), 1);
    r.rebuild();
    for (c, b) in &flows {
        let out = r.forward(&tcp(*c, vip, ACK, b"y"));
        assert_eq!(parse(&out, Link::Ip).unwrap().key.dst(), *b);
    }
    for i in 0..100 {
        let c = SocketAddr::new("192.0.2.4".parse().unwrap(), 30_000 + i);
        let out = r.forward(&tcp(c, vip, SYN, b""));
        assert_eq!(parse(&out, Link::Ip).unwrap().key.dst(), sa(B3[0]).ip());
    }
}

#[test]
fn bad_traffic_is_dropped_and_counted() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let vip = sa("203.0.113.10:80");
    let client = sa("192.0.2.2:40000");
    // Not a SYN, unknown flow: full NAT cannot place it (its own reason since issue 17; it
    // was counted as `NoFlow` before).
    assert_eq!(
        r.run(&tcp(client, vip, ACK, b"")).0,
        Verdict::Drop(DropReason::MidFlowUnknown)
    );
    // A non-first fragment (offset 128) whose first fragment was never seen (a first
    // fragment is forwarded since issue 18: frag.rs).
    let mut frag = tcp(client, vip, SYN, b"");
    frag[7] = 0x10;
    assert_eq!(r.run(&frag).0, Verdict::Drop(DropReason::Fragment));
    // Truncated and garbage.
    let good = tcp(client, vip, SYN, b"");
    for n in 0..good.len() {
        assert!(
            matches!(r.run(&good[..n]).0, Verdict::Drop(_)),
            "prefix of {n} bytes"
        );
    }
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x44;
    assert_eq!(r.run(&bad_ihl).0, Verdict::Drop(DropReason::Malformed));
    // To no service.
    assert_eq!(
        r.run(&udp(client, sa("203.0.113.11:80"), b"")).0,
        Verdict::Drop(DropReason::NoService)
    );
    // Pseudo-random bytes never panic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..600 {
        let mut pkt = vec![0u8; len];
        for b in &mut pkt {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if let Some(b) = pkt.first_mut() {
            *b = if len % 2 == 0 { 0x45 } else { 0x60 };
        }
        let _ = r.run(&pkt);
    }
    // Length beyond the buffer.
    assert_eq!(
        r.dp.process(&mut [0u8; 10], 4, 100, r.now),
        Verdict::Drop(DropReason::Malformed)
    );
    let s = r.dp.stats();
    assert_eq!(s.drops_for(DropReason::MidFlowUnknown), 1);
    assert_eq!(s.drops_for(DropReason::NoFlow), 0);
    assert!(s.drops_for(DropReason::Fragment) >= 1);
    assert!(s.drops_for(DropReason::Malformed) >= good.len() as u64);
    assert_eq!(s.forwarded, 0);
}

fn backend_of(p: &lb_packet::Parsed) -> SocketAddr {
    SocketAddr::new(p.key.dst(), p.key.dst_port())
}

#[test]
fn icmp_error_from_backend_follows_its_flow() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let out = r.forward(&tcp(client, vip, SYN, b""));
    let p = parse(&out, Link::Ip).unwrap();
    // The backend answers with "port unreachable" quoting the packet it got.
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&out[..28]);
    let err = ip_packet(p.key.dst(), p.key.src(), 1, &icmp);
    let back = r.forward(&err);
    assert_checksums(&back, Link::Ip);
    let q = parse(&back, Link::Ip).unwrap();
    // Outer: VIP → client; the quote is the client's original packet again.
    assert_eq!(q.key.dst(), client.ip());
    let e = q.icmp.unwrap();
    assert_eq!(e.key.src(), client.ip());
    assert_eq!((e.key.dst(), e.key.dst_port()), (vip.ip(), 80));
    // An ICMP error for no known flow is dropped, not scheduled.
    let other = tcp(sa("203.0.113.100:9"), backend_of(&p), SYN, b"");
    let mut icmp2 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp2.extend_from_slice(&other[..28]);
    let stray = ip_packet(p.key.dst(), p.key.src(), 1, &icmp2);
    assert!(matches!(r.run(&stray).0, Verdict::Drop(_)));
}

#[test]
fn dnat_round_trip() {
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    spec.services[0].mode = Mode::Dnat;
    let mut r = Rig::new(spec, Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let out = r.forward(&tcp(client, vip, SYN, b""));
    assert_checksums(&out, Link::Ip);
    let p = parse(&out, Link::Ip).unwrap();
    assert_eq!(p.key.src(), client.ip());
    let backend = SocketAddr::new(p.key.dst(), p.key.dst_port());
    let back = r.forward(&tcp(backend, client, SYNACK, b""));
    assert_checksums(&back, Link::Ip);
    let q = parse(&back, Link::Ip).unwrap();
    assert_eq!((q.key.src(), q.key.src_port()), (vip.ip(), 80));
    assert_eq!(q.key.dst(), client.ip());
}

#[test]
fn tunnel_encapsulates_into_headroom_and_answers_too_big() {
    let mut spec = nat_spec(
        "203.0.113.10:80",
        Proto::Tcp,
        &["198.51.100.11:0", "198.51.100.12:0"],
    );
    spec.services[0].mode = Mode::Tunnel;
    spec.mtu = 1400;
    let mut r = Rig::new(spec, Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let inner = tcp(client, vip, SYN, b"");
    let (v, out) = r.run(&inner);
    assert_eq!(
        v,
        Verdict::Forward {
            start: HEADROOM - 20,
            len: inner.len() + 20
        }
    );
    let p = parse(&out, Link::Ip).unwrap();
    assert_eq!(p.proto, lb_core::IpProto::Other(4));
    assert_eq!(p.key.src(), "203.0.113.100".parse::<IpAddr>().unwrap());
    assert_eq!(&out[20..], &inner[..], "inner packet unchanged");
    assert_checksums(&out, Link::Ip);
    // A later, too-large packet of the same flow (DF set) gets "fragmentation needed".
    let big = tcp(client, vip, ACK, &[0u8; 1400]);
    let (v, reply) = r.run(&big);
    assert!(matches!(v, Verdict::Reply { .. }), "{v:?}");
    let q = parse(&reply, Link::Ip).unwrap();
    assert_eq!(q.key.dst(), client.ip(), "the error goes to the client");
    assert_eq!(&reply[12..16], &[203, 0, 113, 10], "from the VIP");
    assert_eq!(&reply[20..22], &[3, 4]);
    assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), 1380);
    assert_eq!(r.dp.stats().icmp_generated, 1);
    // IPv6 in IPv6.
    let mut spec6 = nat_spec("[2001:db8:10::10]:80", Proto::Tcp, &["[2001:db8:b::11]:0"]);
    spec6.services[0].mode = Mode::Tunnel;
    let mut r6 = Rig::new(spec6, Link::Ip);
    let inner6 = tcp(
        sa("[2001:db8:c::2]:4000"),
        sa("[2001:db8:10::10]:80"),
        SYN,
        b"",
    );
    let out6 = r6.forward(&inner6);
    assert_eq!(out6[6], 41);
    assert_eq!(&out6[40..], &inner6[..]);
}

#[test]
fn gue_encapsulation() {
    let mut spec = nat_spec("203.0.113.10:53", Proto::Udp, &["198.51.100.11:0"]);
    spec.services[0].mode = Mode::Tunnel;
    spec.services[0].tunnel = TunnelKind::Gue { port: 6080 };
    let mut r = Rig::new(spec, Link::Ip);
    let inner = udp(sa("192.0.2.2:5000"), sa("203.0.113.10:53"), b"q");
    let out = r.forward(&inner);
    let p = parse(&out, Link::Ip).unwrap();
    assert_eq!(p.key.dst_port(), 6080);
    assert_eq!(p.key.dst(), sa("198.51.100.11:0").ip());
    assert!(out.ends_with(&inner));
}

#[test]
fn dr_rewrites_the_destination_mac() {
    let mut spec = nat_spec(
        "203.0.113.10:80",
        Proto::Tcp,
        &["198.51.100.11:0", "198.51.100.12:0"],
    );
    spec.services[0].mode = Mode::Dr;
    spec.services[0].backends[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x11]));
    spec.services[0].backends[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x12]));
    let mut r = Rig::new(spec, Link::Ethernet);
    let ip = tcp(sa("192.0.2.2:40000"), sa("203.0.113.10:80"), SYN, b"");
    let mut frame = vec![2, 0, 0x5e, 0x10, 0, 1, 2, 0, 0, 0, 0, 0xcc, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    let out = r.forward(&frame);
    assert!(out[..6] == [2, 0, 0, 0, 0, 0x11] || out[..6] == [2, 0, 0, 0, 0, 0x12]);
    assert_eq!(out[6..12], [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01]);
    assert_eq!(&out[14..], &ip[..], "IP packet untouched");
    // ARP is not IP.
    let mut arp = frame.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(r.run(&arp).0, Verdict::Drop(DropReason::NotIp));
}

#[test]
fn persistence_and_policies() {
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    spec.services[0].persistence_timeout = lb_core::Duration::from_secs(60);
    let mut r = Rig::new(spec, Link::Ip);
    let vip = sa("203.0.113.10:80");
    let first = parse(
        &r.forward(&tcp(sa("192.0.2.7:1000"), vip, SYN, b"")),
        Link::Ip,
    )
    .unwrap()
    .key
    .dst();
    for port in 1001..1050 {
        let out = r.forward(&tcp(
            SocketAddr::new("192.0.2.7".parse().unwrap(), port),
            vip,
            SYN,
            b"",
        ));
        assert_eq!(parse(&out, Link::Ip).unwrap().key.dst(), first);
    }
    // Round robin cycles through the backends.
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    spec.services[0].scheduler = "rr".parse().unwrap();
    let mut r = Rig::new(spec, Link::Ip);
    let picks: Vec<IpAddr> = (0..6)
        .map(|i| {
            let out = r.forward(&tcp(
                SocketAddr::new("192.0.2.8".parse().unwrap(), 2000 + i),
                vip,
                SYN,
                b"",
            ));
            parse(&out, Link::Ip).unwrap().key.dst()
        })
        .collect();
    assert_eq!(picks[0..3], picks[3..6]);
    assert_ne!(picks[0], picks[1]);
    assert_ne!(picks[1], picks[2]);
}

#[test]
fn syn_flood_stays_within_capacity() {
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    spec.conntrack_capacity = 256;
    let mut r = Rig::new(spec, Link::Ip);
    let vip = sa("203.0.113.10:80");
    // An established flow first.
    let c = sa("192.0.2.2:40000");
    let out = r.forward(&tcp(c, vip, SYN, b""));
    let p = parse(&out, Link::Ip).unwrap();
    let backend = SocketAddr::new(p.key.dst(), p.key.dst_port());
    r.forward(&tcp(
        backend,
        SocketAddr::new(p.key.src(), p.key.src_port()),
        SYNACK,
        b"",
    ));
    r.forward(&tcp(c, vip, ACK, b""));
    for i in 0..10_000u32 {
        let src = SocketAddr::new(
            IpAddr::from([198, 18, (i >> 8) as u8, i as u8]),
            1024 + (i % 60000) as u16,
        );
        let _ = r.run(&tcp(src, vip, SYN, b""));
    }
    let t = r.dp.table_stats();
    assert!(t.entries <= t.capacity, "{t:?}");
    assert!(t.evicted_half_open > 0);
    // The established flow survived the flood.
    let out = r.forward(&tcp(c, vip, ACK, b"after"));
    assert_eq!(parse(&out, Link::Ip).unwrap().key.dst(), backend.ip());
}

/// `process_batch` is `process` on each packet in turn: same verdicts, same bytes, same
/// counters, over bursts that mix new flows, established flows, replies, both families and
/// garbage, duplicates inside a burst (a retransmitted SYN whose flow the first copy creates
/// after the second copy's lookup was prefetched), with burst sizes below, around and above
/// the pipeline's depth (2 × [`PIPELINE`]).
#[test]
fn batch_matches_one_by_one() {
    let spec = |vip4: &str| {
        let mut s = nat_spec(vip4, Proto::Tcp, &B3);
        let mut v6 = ServiceSpec::new(sa("[2001:db8::10]:80"), Proto::Tcp, Mode::Nat);
        for b in ["[2001:db8:1::11]:8080", "[2001:db8:1::12]:8080"] {
            v6 = v6.with_backend(sa(b), 1);
        }
        s.services.push(v6);
        s
    };
    let mut one = Rig::new(spec("203.0.113.10:80"), Link::Ip);
    let mut many = Rig::new(spec("203.0.113.10:80"), Link::Ip);
    // The same bursts classified first, by a classifier smaller than the largest burst (the
    // packets past its capacity are classified when processed).
    let mut classified = Rig::new(spec("203.0.113.10:80"), Link::Ip);
    let mut cl = classified.dp.classifier(24);
    let vip4 = sa("203.0.113.10:80");
    let vip6 = sa("[2001:db8::10]:80");
    let mut replies: Vec<Vec<u8>> = Vec::new();
    for round in 0..4u16 {
        let mut pkts: Vec<Vec<u8>> = Vec::new();
        for c in 0..30u16 {
            let port = 20_000 + c;
            let (client, vip) = if c % 3 == 0 {
                (
                    SocketAddr::new("2001:db8:2::2".parse().unwrap(), port),
                    vip6,
                )
            } else {
                (SocketAddr::new("192.0.2.2".parse().unwrap(), port), vip4)
            };
            // Round 0 opens the flows, later rounds continue them (and open a few more).
            let flags = if round == 0 || c % 7 == round {
                SYN
            } else {
                ACK
            };
            pkts.push(tcp(client, vip, flags, b"x"));
            if c % 5 == 0 {
                pkts.push(tcp(client, vip, flags, b"x"));
            }
            if c % 11 == 0 {
                pkts.push(vec![0x45, 0, 0, 8, 1, 2]); // truncated
            }
        }
        pkts.append(&mut replies);
        // One by one.
        let mut outs_one = Vec::new();
        for p in &pkts {
            outs_one.push(one.run(p));
        }
        // In bursts through process_batch, and classified then processed.
        let mut outs_many = Vec::new();
        let mut outs_classified = Vec::new();
        for chunk in pkts.chunks([13, 5, 1, 32][usize::from(round)]) {
            let bufs: Vec<Vec<u8>> = chunk
                .iter()
                .map(|p| {
                    let mut b = vec![0u8; HEADROOM + p.len() + 64];
                    b[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
                    b
                })
                .collect();
            let lens: Vec<usize> = chunk.iter().map(Vec::len).collect();
            for by_classifier in [false, true] {
                let mut bufs = bufs.clone();
                let mut verdicts = vec![Verdict::Drop(DropReason::Malformed); chunk.len()];
                let outs = if by_classifier {
                    cl.classify(&bufs, HEADROOM, &lens);
                    classified.dp.process_batch_classified(
                        &mut cl,
                        &mut bufs,
                        &lens,
                        None,
                        classified.now,
                        &mut verdicts,
                    );
                    &mut outs_classified
                } else {
                    many.dp
                        .process_batch(&mut bufs, HEADROOM, &lens, many.now, &mut verdicts);
                    &mut outs_many
                };
                for (b, v) in bufs.iter().zip(&verdicts) {
                    let out = match *v {
                        Verdict::Forward { start, len } | Verdict::Reply { start, len } => {
                            b[start..start + len].to_vec()
                        }
                        Verdict::Drop(_) | Verdict::Segment | Verdict::Held => Vec::new(),
                    };
                    outs.push((*v, out));
                }
            }
        }
        assert_eq!(outs_one, outs_many, "round {round}");
        assert_eq!(outs_one, outs_classified, "round {round}, classified");
        // The backends answer every forwarded client packet: next round's replies.
        for (v, out) in &outs_one {
            if matches!(v, Verdict::Forward { .. }) {
                let p = parse(out, Link::Ip).unwrap();
                if p.key.dst_port() == 8080 {
                    let backend = SocketAddr::new(p.key.dst(), 8080);
                    let snat = SocketAddr::new(p.key.src(), p.key.src_port());
                    replies.push(tcp(backend, snat, SYNACK, b"y"));
                }
            }
        }
        assert!(!replies.is_empty());
    }
    let (a, b) = (one.dp.stats(), many.dp.stats());
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(format!("{a:?}"), format!("{:?}", classified.dp.stats()));
    assert!(a.forwarded > 200, "{a:?}");
    assert!(a.backends.iter().map(|b| b.reply_packets).sum::<u64>() >= 60);
}

/// A classifier's work is used only while it is valid: classified against tables that have
/// since changed (a service removed, so the others' indexes moved), or by another data path
/// (other hash keys, so its hashes would miss every tracked flow), the burst is classified
/// again and goes where `process_batch` sends it.
#[test]
fn a_stale_or_foreign_classification_is_not_used() {
    let vip1 = sa("203.0.113.11:80");
    let mut spec = nat_spec("203.0.113.10:80", Proto::Tcp, &B3[..1]);
    spec.services.push(
        ServiceSpec::new(vip1, Proto::Tcp, Mode::Nat).with_backend(sa("198.51.100.21:8080"), 1),
    );
    let burst = |flags: u8| -> (Vec<Vec<u8>>, Vec<usize>) {
        let pkts: Vec<Vec<u8>> = (0..6u16)
            .map(|c| {
                tcp(
                    SocketAddr::new("192.0.2.7".parse().unwrap(), 30_000 + c),
                    vip1,
                    flags,
                    b"",
                )
            })
            .collect();
        let lens = pkts.iter().map(Vec::len).collect();
        let bufs = pkts
            .iter()
            .map(|p| {
                let mut b = vec![0u8; HEADROOM + p.len() + 64];
                b[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
                b
            })
            .collect();
        (bufs, lens)
    };
    let backend_of = |bufs: &[Vec<u8>], v: &[Verdict]| -> Vec<Option<IpAddr>> {
        bufs.iter()
            .zip(v)
            .map(|(b, v)| match *v {
                Verdict::Forward { start, len } => {
                    Some(parse(&b[start..start + len], Link::Ip).unwrap().key.dst())
                }
                _ => None,
            })
            .collect()
    };
    let b21: Option<IpAddr> = Some("198.51.100.21".parse().unwrap());

    // Stale: classified with vip1 as service 1; the reload removes service 0.
    let mut r = Rig::new(spec.clone(), Link::Ip);
    let mut cl = r.dp.classifier(8);
    let (mut bufs, lens) = burst(SYN);
    cl.classify(&bufs, HEADROOM, &lens);
    let mut only1 = spec.clone();
    only1.services.remove(0);
    r.cp.apply(only1).unwrap();
    r.rebuild();
    let mut v = vec![Verdict::Held; bufs.len()];
    r.dp.process_batch_classified(&mut cl, &mut bufs, &lens, None, r.now, &mut v);
    assert_eq!(backend_of(&bufs, &v), vec![b21; 6], "{v:?}");
    // The classifier took the new tables: the next burst's classifications are valid.
    let (mut bufs, lens) = burst(ACK);
    cl.classify(&bufs, HEADROOM, &lens);
    r.dp.process_batch_classified(&mut cl, &mut bufs, &lens, None, r.now, &mut v);
    assert_eq!(backend_of(&bufs, &v), vec![b21; 6], "{v:?}");

    // Foreign: flows opened on `r2`, their ACKs classified by the classifier of another data
    // path over the same tables, with other hash keys.
    let mut r2 = Rig::new(spec.clone(), Link::Ip);
    let other_key = HashKey::from_bytes([10; 16]);
    let other = Dataplane::new(
        &spec,
        r2.dp.tables.clone(),
        DataplaneOptions::new(other_key),
    )
    .unwrap();
    let (mut syns, lens) = burst(SYN);
    let mut v = vec![Verdict::Held; syns.len()];
    r2.dp
        .process_batch(&mut syns, HEADROOM, &lens, r2.now, &mut v);
    assert_eq!(backend_of(&syns, &v), vec![b21; 6]);
    let mut foreign = other.classifier(8);
    let (mut acks, lens) = burst(ACK);
    foreign.classify(&acks, HEADROOM, &lens);
    r2.dp
        .process_batch_classified(&mut foreign, &mut acks, &lens, None, r2.now, &mut v);
    assert_eq!(backend_of(&acks, &v), vec![b21; 6], "{v:?}");
    let t = r2.dp.table_stats();
    assert_eq!(t.entries, 6, "the ACKs found their flows: {t:?}");
    // A packet whose length changed since it was classified is classified again.
    let mut cl2 = r2.dp.classifier(8);
    let (mut acks, mut lens) = burst(ACK);
    cl2.classify(&acks, HEADROOM, &lens);
    lens[0] = 3; // truncated after classification: now malformed
    r2.dp
        .process_batch_classified(&mut cl2, &mut acks, &lens, None, r2.now, &mut v);
    assert_eq!(v[0], Verdict::Drop(DropReason::Malformed));
    assert_eq!(backend_of(&acks[1..], &v[1..]), vec![b21; 5]);
}

/// Balancers given the same key (tun-balancer's `balancer.hash_key`) send every new flow to the
/// same backend, as a cluster behind ECMP must; under another key the placement differs. Two
/// processes, or one restarted, therefore keep their flows' backends only with a shared key.
#[test]
fn balancers_sharing_a_key_agree_on_backends() {
    let spec = || nat_spec("203.0.113.10:80", Proto::Tcp, &B3);
    let key = HashKey::from_passphrase("cluster secret for the test");
    let mut a = Rig::with_key(spec(), Link::Ip, key);
    let mut b = Rig::with_key(spec(), Link::Ip, key);
    let mut c = Rig::with_key(
        spec(),
        Link::Ip,
        HashKey::from_passphrase("another cluster's secret"),
    );
    let vip = sa("203.0.113.10:80");
    let mut differ = 0;
    for port in 0..200u16 {
        let client = SocketAddr::new("192.0.2.7".parse().unwrap(), 10_000 + port);
        let pkt = tcp(client, vip, SYN, b"");
        let dst = |r: &mut Rig| parse(&r.forward(&pkt), Link::Ip).unwrap().key.dst();
        let (da, db, dc) = (dst(&mut a), dst(&mut b), dst(&mut c));
        assert_eq!(da, db, "client port {}", 10_000 + port);
        differ += usize::from(da != dc);
    }
    // Three backends: an unrelated key agrees on about a third of the flows.
    assert!(differ > 80, "only {differ} of 200 flows placed differently");
}

/// Flows that end show up in the session histograms of `table_stats` (what the stats endpoint
/// renders): one sample per flow, its duration first packet to last, its packets both ways.
#[test]
fn finished_flows_feed_the_session_histograms() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let vip = sa("203.0.113.10:80");
    for i in 0..3u16 {
        // Flow i: first packet at 1 + 10 i s, last 500 (i + 1) ms later (time never goes back).
        r.now = Instant::from_secs(1 + 10 * u64::from(i));
        let c = SocketAddr::new("192.0.2.2".parse().unwrap(), 40_000 + i);
        let p = parse(&r.forward(&tcp(c, vip, SYN, b"")), Link::Ip).unwrap();
        let backend = SocketAddr::new(p.key.dst(), p.key.dst_port());
        let snat = SocketAddr::new(p.key.src(), p.key.src_port());
        r.forward(&tcp(backend, snat, SYNACK, b""));
        r.now += lb_core::Duration::from_millis(500 * (u64::from(i) + 1));
        r.forward(&tcp(c, vip, ACK, b""));
    }
    assert_eq!(r.dp.table_stats().sessions.duration_ms.count(), 0);
    // Far past every timeout: all three leave.
    assert_eq!(r.dp.housekeeping(Instant::from_secs(100_000), 100), 3);
    let s = r.dp.table_stats().sessions;
    assert_eq!(s.duration_ms.count(), 3);
    assert_eq!(s.duration_ms.sum(), 500 + 1_000 + 1_500);
    assert_eq!(s.packets.sum(), 9);
    assert_eq!(s.packets.max(), 3);
    // Per backend: the same three sessions, split by where they went.
    let per = r.dp.table_stats().backend_sessions;
    assert_eq!(per.iter().map(|h| h.duration_ms.count()).sum::<u64>(), 3);
    assert_eq!(per.iter().map(|h| h.duration_ms.sum()).sum::<u64>(), 3_000);
    let flows: Vec<u64> = r.dp.stats().backends.iter().map(|b| b.flows).collect();
    for (id, f) in flows.iter().enumerate() {
        assert_eq!(per[id].duration_ms.count(), *f, "backend {id}");
    }
}

#[path = "load_tests.rs"]
mod load;

#[path = "sync_tests.rs"]
mod sync_tests;

#[path = "place_tests.rs"]
mod place;

#[path = "snat_pressure_tests.rs"]
mod snat_pressure;

#[path = "recycle_tests.rs"]
mod recycle;

// --- Offloads (virtio-net headers): GSO super-packets and partial checksums. ---

use lb_packet::offload::{GsoType, Segmenter, VnetHdr};

/// Makes `pkt` (IPv4 TCP with a full checksum) what a sender with offloads hands over: the
/// TCP checksum field holds the pseudo-header's sum; returns the header that says so.
pub(crate) fn offloaded(pkt: &mut [u8], gso: Option<u16>) -> VnetHdr {
    let p = parse(pkt, Link::Ip).unwrap();
    let mut s = [0u8; 4];
    let mut d = [0u8; 4];
    s.copy_from_slice(&pkt[12..16]);
    d.copy_from_slice(&pkt[16..20]);
    let ps = lb_packet::checksum::pseudo_v4(s, d, 6, (p.end - p.l4) as u16);
    let f = lb_packet::checksum::fold(ps);
    pkt[p.l4 + 16..p.l4 + 18].copy_from_slice(&f.to_be_bytes());
    VnetHdr {
        needs_csum: true,
        csum_start: p.l4 as u16,
        csum_offset: 16,
        gso: if gso.is_some() {
            GsoType::TcpV4
        } else {
            GsoType::None
        },
        gso_size: gso.unwrap_or(0),
        ..VnetHdr::NONE
    }
}

impl Rig {
    /// Runs one packet with its offload header through `process_batch_offload`.
    fn run_offload(&mut self, pkt: &[u8], hdr: VnetHdr) -> (Verdict, Vec<u8>, VnetHdr) {
        let mut bufs = vec![vec![0u8; HEADROOM + pkt.len()]];
        bufs[0][HEADROOM..].copy_from_slice(pkt);
        let mut hdrs = [hdr];
        let mut v = [Verdict::Drop(DropReason::Malformed)];
        self.dp.process_batch_offload(
            &mut bufs,
            HEADROOM,
            &[pkt.len()],
            &mut hdrs,
            self.now,
            &mut v,
        );
        let out = match v[0] {
            Verdict::Forward { start, len } | Verdict::Reply { start, len } => {
                bufs[0][start..start + len].to_vec()
            }
            _ => Vec::new(),
        };
        (v[0], out, hdrs[0])
    }
}

/// Cuts a super-packet as the kernel would and checks every segment's checksums.
fn cut_and_check(pkt: &[u8], hdr: &VnetHdr) -> Vec<Vec<u8>> {
    let p = parse(pkt, Link::Ip).unwrap();
    let mut seg = Segmenter::new(pkt, &p, hdr).unwrap();
    let mut out = vec![0u8; 70_000];
    let mut segs = Vec::new();
    while let Some(n) = seg.next_into(pkt, &mut out).unwrap() {
        assert_checksums(&out[..n], Link::Ip);
        segs.push(out[..n].to_vec());
    }
    segs
}

#[test]
fn nat_rewrites_a_gso_super_packet_whole_and_counts_its_segments() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let syn = r.forward(&tcp(client, vip, SYN, b""));
    let backend = parse(&syn, Link::Ip).unwrap().key;
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mut sp = tcp(client, vip, ACK, &payload);
    let hdr = offloaded(&mut sp, Some(1000));
    let (v, out, h) = r.run_offload(&sp, hdr);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(
        h, hdr,
        "the offload header goes out as it came (same offsets)"
    );
    let segs = cut_and_check(&out, &h);
    assert_eq!(segs.len(), 3);
    for s in &segs {
        let k = parse(s, Link::Ip).unwrap().key;
        assert_eq!((k.src(), k.src_port()), (backend.src(), backend.src_port()));
        assert_eq!((k.dst(), k.dst_port()), (backend.dst(), backend.dst_port()));
    }
    let st = r.dp.stats();
    assert_eq!((st.gso_packets, st.gso_segments), (1, 3));
    let b: u64 = st.backends.iter().map(|b| b.packets).sum();
    assert_eq!(b, 1 + 3, "the SYN and the super-packet's three segments");
    // The reply direction: a super-packet from the backend comes out addressed to the client.
    let mut reply = tcp(
        SocketAddr::new(backend.dst(), backend.dst_port()),
        SocketAddr::new(backend.src(), backend.src_port()),
        ACK,
        &payload,
    );
    let rh = offloaded(&mut reply, Some(1448));
    let (v, out, h) = r.run_offload(&reply, rh);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    for s in cut_and_check(&out, &h) {
        let k = parse(&s, Link::Ip).unwrap().key;
        assert_eq!((k.src(), k.src_port()), (vip.ip(), vip.port()));
        assert_eq!((k.dst(), k.dst_port()), (client.ip(), client.port()));
    }
}

#[test]
fn tunnel_mode_asks_for_super_packets_to_be_cut_and_completes_partial_checksums() {
    let mut spec = nat_spec(
        "203.0.113.10:80",
        Proto::Tcp,
        &["198.51.100.11:0", "198.51.100.12:0"],
    );
    spec.services[0].mode = Mode::Tunnel;
    let mut r = Rig::new(spec, Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let mut sp = tcp(client, vip, ACK, &[7u8; 2500]);
    let hdr = offloaded(&mut sp, Some(1000));
    let (v, _, _) = r.run_offload(&sp, hdr);
    assert_eq!(v, Verdict::Segment);
    let st = r.dp.stats();
    assert_eq!((st.rx_packets, st.gso_cut, st.forwarded), (0, 1, 0));
    // A plain packet with a partial checksum: completed, then encapsulated.
    let mut one = tcp(client, vip, ACK, &[7u8; 500]);
    let want = one.clone();
    let h = offloaded(&mut one, None);
    let (v, out, h) = r.run_offload(&one, h);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(h, VnetHdr::NONE);
    assert_eq!(
        &out[20..],
        &want[..],
        "the inner packet with its checksum complete"
    );
    assert_eq!(r.dp.stats().csum_completed, 1);
}

#[test]
fn an_offload_header_that_does_not_fit_its_packet_is_dropped_and_counted() {
    let mut r = Rig::new(nat_spec("203.0.113.10:80", Proto::Tcp, &B3), Link::Ip);
    let client = sa("192.0.2.2:40000");
    let vip = sa("203.0.113.10:80");
    let _ = r.forward(&tcp(client, vip, SYN, b""));
    let mut sp = tcp(client, vip, ACK, &[1u8; 2000]);
    let mut hdr = offloaded(&mut sp, Some(1000));
    hdr.gso = GsoType::TcpV6;
    let (v, _, _) = r.run_offload(&sp, hdr);
    assert_eq!(v, Verdict::Drop(DropReason::BadOffload));
    assert_eq!(r.dp.stats().drops_for(DropReason::BadOffload), 1);
}

#[path = "fast_tests.rs"]
mod fast_tests;
