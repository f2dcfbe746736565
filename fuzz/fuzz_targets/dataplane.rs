#![no_main]
//! The whole data path on arbitrary traffic: steps chosen by the fuzzer (bursts of packets,
//! SYN floods, time advances, housekeeping, health changes) drive two identical pairs of data
//! paths: an IP-link pair (nat, dnat, tunnel ipip / 4in6 / ip6ip6 / gue, both families, TCP and
//! UDP, SIP Call-ID affinity, wlc / p2c policies, admission thresholds, outlier ejection,
//! persistence) and an Ethernet-link pair (dr, and nat over Ethernet). In each pair `one` takes
//! every packet through `Dataplane::process`, `many` takes the same packets in bursts through
//! `Dataplane::process_batch`, every other burst classified first by a `Classifier` with a
//! fast path of 8 plans (`Classifier::forward_cached`, then
//! `Dataplane::process_batch_classified`). Checked:
//!
//! 1. no panic;
//! 2. every `Forward` / `Reply` lies inside its buffer and parses with the pair's `Link`; when
//!    the input's checksums were right (a full recompute leaves it unchanged), so are the
//!    output's: a full recompute (`lb_packet::checksum::recompute`) of the output changes
//!    nothing, for a tunnel packet the outer header and the decapsulated inner packet (which
//!    must be the input, unchanged);
//! 3. `forwarded + icmp_generated + dropped() == rx_packets` after every call;
//! 4. the burst path gives the same verdicts, the same output bytes, the same counters, table
//!    figures, housekeeping results and load events as one by one;
//! 5. a packet addressed to a service that cannot start a flow (a TCP segment without SYN or
//!    with SYN and ACK, an ICMP error) goes where `Dataplane::explain_mid_flow` said just before:
//!    in modes tunnel and dr only to the backend named (its flow's, or the consistent hash's),
//!    in modes nat and dnat only if its flow is tracked.
//!
//! Replies and ICMP errors are built from earlier outputs (addresses and ports swapped), so that
//! they hit tracked flows.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arbitrary::Arbitrary;
use lb_core::{Duration, HashKey, Instant, MacAddr};
use lb_dataplane::{
    Affinity, ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Decision, DropReason,
    MidFlow, Mode, OutlierSpec, Proto, SchedulerKind, ServiceSpec, Tables, TunnelKind, Verdict,
    HEADROOM,
};
use lb_health::OutlierConfig;
use lb_packet::checksum::recompute;
use lb_packet::tunnel;
use lb_packet::{parse, Family, Link, PacketBuf};
use lb_sched::policy::PolicyKind;
use libfuzzer_sys::fuzz_target;

/// Conntrack capacity: small, so that floods evict.
const CAPACITY: usize = 256;
/// SNAT source ports per address and backend.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 40_000..=40_127;
/// GUE destination port of the GUE services.
const GUE_PORT: u16 = 6080;
/// Outputs kept for building replies and ICMP errors, per link.
const HISTORY: usize = 32;
/// Bytes after each packet in its buffer.
const TAIL: usize = 64;
/// The balancer's MAC (DataplaneSpec::default) and a client-side router's.
const LB_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xcc];

#[derive(Arbitrary, Debug)]
struct Input {
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Packets through both data paths of a pair: `one` by `process`, `many` by
    /// `process_batch` in chunks of `chunk` packets (1..=32), with `headroom` bytes in front.
    Burst {
        eth: bool,
        headroom: u8,
        chunk: u8,
        pkts: Vec<Pkt>,
    },
    /// `count` new flows (clients `base..`) to one service in one burst: fills the table.
    Flood {
        eth: bool,
        svc: u8,
        base: u16,
        count: u8,
        flags: u8,
        chunk: u8,
    },
    /// The clock moves on by `n` × 10 ms.
    Advance(u16),
    /// `Dataplane::housekeeping` with this budget.
    Housekeeping(u8),
    /// A backend (by index among the pair's backends) goes down or up: new tables installed.
    Health { eth: bool, backend: u8, up: bool },
}

#[derive(Arbitrary, Debug)]
struct Pkt {
    what: What,
    flags: u8,
    payload: Payload,
    /// Byte XORs at offsets (taken modulo the length) after building.
    mutate: Vec<(u16, u8)>,
    /// Recompute the checksums after the mutations (so they test fields, not checksums).
    refix: bool,
    /// Cut the packet to this many bytes.
    cut: Option<u16>,
    /// Hand a length one past the buffer's end.
    overlong: bool,
}

#[derive(Arbitrary, Debug)]
enum What {
    /// Client → a service's VIP.
    ToService { svc: u8, client: u16 },
    /// The answer to an earlier output: addresses and ports swapped (backend → SNAT address or
    /// client; client → VIP for an earlier reply).
    Reply { hist: u8 },
    /// An ICMP error about an earlier output, from its destination to its source.
    IcmpAbout { hist: u8, kind: u8, quote: u8 },
    /// An earlier output sent again as it is.
    Replay { hist: u8 },
    /// Raw bytes (an Ethernet header is added on the Ethernet pair).
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Empty,
    Bytes(Vec<u8>),
    Fill { byte: u8, len: u16 },
    Sip { form: u8, call: u8, tail: Vec<u8> },
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc(vip: &str, proto: Proto, mode: Mode, backends: &[&str]) -> ServiceSpec {
    let mut s = ServiceSpec::new(sa(vip), proto, mode);
    for b in backends {
        s = s.with_backend(sa(b), 1);
    }
    // Small Maglev tables: built per input.
    s.maglev_size = Some(251);
    s
}

fn policy(mut s: ServiceSpec, p: PolicyKind) -> ServiceSpec {
    s.scheduler = SchedulerKind::Policy(p);
    // A policy has a (small) Maglev table only to place mid-flow packets (tunnel, dr).
    s.maglev_size = s.mid_flow.places(s.mode).then_some(251);
    s
}

fn base_spec(services: Vec<ServiceSpec>) -> DataplaneSpec {
    DataplaneSpec {
        snat_addrs: vec![
            "203.0.113.100".parse().unwrap(),
            "203.0.113.101".parse().unwrap(),
            "2001:db8:100::100".parse().unwrap(),
        ],
        conntrack_capacity: CAPACITY,
        mtu: 1400,
        persist_capacity: 32,
        // Few SNAT ports: cheap pools (built per input), and a flood can exhaust them.
        snat_ports: SNAT_PORTS,
        services,
        ..DataplaneSpec::default()
    }
}

/// The IP-link configuration: every mode but dr, both families, TCP and UDP.
fn ip_spec() -> DataplaneSpec {
    let mut nat80 = svc(
        "203.0.113.10:80",
        Proto::Tcp,
        Mode::Nat,
        &[
            "198.51.100.11:8080",
            "198.51.100.12:8080",
            "198.51.100.13:8080",
        ],
    );
    nat80.outlier = Some(OutlierSpec {
        detector: OutlierConfig {
            consecutive_failures: 2,
            min_requests: 4,
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        },
        syn_timeout: Duration::from_millis(500),
    });
    // The same two servers as `nat80` (one farm behind two services): their SNAT pool is
    // shared, so the two services' flows must never get the same reply tuple.
    let mut wlc = policy(
        svc(
            "203.0.113.10:443",
            Proto::Tcp,
            Mode::Nat,
            &["198.51.100.11:8080", "198.51.100.12:8080"],
        ),
        PolicyKind::Wlc,
    );
    wlc.upper_conns = 3;
    wlc.lower_conns = 1;
    wlc.slow_start = Duration::from_secs(2);
    let mut dns = svc(
        "203.0.113.11:53",
        Proto::Udp,
        Mode::Dnat,
        &["198.51.100.31:5353", "198.51.100.32:5353"],
    );
    dns.persistence_timeout = Duration::from_secs(30);
    dns.persistence_netmask.v4 = 24;
    let mut sip = svc(
        "203.0.113.12:5060",
        Proto::Udp,
        Mode::Nat,
        &[
            "198.51.100.41:5060",
            "198.51.100.42:5060",
            "198.51.100.43:5060",
        ],
    );
    sip.affinity = Affinity::SipCallId;
    let ipip = svc(
        "203.0.113.13:80",
        Proto::Tcp,
        Mode::Tunnel,
        &["198.51.100.51:0", "198.51.100.52:0"],
    );
    let mut gue = svc(
        "203.0.113.13:53",
        Proto::Udp,
        Mode::Tunnel,
        &["198.51.100.61:0", "198.51.100.62:0"],
    );
    gue.tunnel = TunnelKind::Gue { port: GUE_PORT };
    let four_in_six = svc(
        "203.0.113.14:80",
        Proto::Tcp,
        Mode::Tunnel,
        &["[2001:db8:b::51]:0"],
    );
    let mut dnat_tcp = policy(
        svc(
            "203.0.113.15:80",
            Proto::Tcp,
            Mode::Dnat,
            &["198.51.100.71:80", "198.51.100.72:80"],
        ),
        PolicyKind::P2c,
    );
    dnat_tcp.affinity = Affinity::Source;
    let nat6 = svc(
        "[2001:db8:10::10]:80",
        Proto::Tcp,
        Mode::Nat,
        &["[2001:db8:b::11]:8080", "[2001:db8:b::12]:8080"],
    );
    let dnat6 = svc(
        "[2001:db8:10::11]:53",
        Proto::Udp,
        Mode::Dnat,
        &["[2001:db8:b::21]:5353"],
    );
    let ip6ip6 = svc(
        "[2001:db8:10::12]:80",
        Proto::Tcp,
        Mode::Tunnel,
        &["[2001:db8:b::31]:0", "[2001:db8:b::32]:0"],
    );
    let mut gue6 = svc(
        "[2001:db8:10::13]:5060",
        Proto::Udp,
        Mode::Tunnel,
        &["[2001:db8:b::41]:0"],
    );
    gue6.tunnel = TunnelKind::Gue { port: GUE_PORT };
    // Mid-flow packets of a policy service: placed by the Maglev table built beside it.
    let tunnel_rr = policy(
        svc(
            "203.0.113.16:80",
            Proto::Tcp,
            Mode::Tunnel,
            &["198.51.100.101:0", "198.51.100.102:0", "198.51.100.103:0"],
        ),
        PolicyKind::RoundRobin,
    );
    let mut sip6 = policy(
        svc(
            "[2001:db8:10::14]:5060",
            Proto::Udp,
            Mode::Nat,
            &["[2001:db8:b::61]:5060", "[2001:db8:b::62]:5060"],
        ),
        PolicyKind::RoundRobin,
    );
    sip6.affinity = Affinity::SipCallId;
    base_spec(vec![
        nat80,
        wlc,
        dns,
        sip,
        ipip,
        gue,
        four_in_six,
        dnat_tcp,
        nat6,
        dnat6,
        ip6ip6,
        gue6,
        sip6,
        tunnel_rr,
    ])
}

/// The Ethernet-link configuration: dr in both families, and full NAT over Ethernet.
fn eth_spec() -> DataplaneSpec {
    let mut dr = svc(
        "203.0.113.20:80",
        Proto::Tcp,
        Mode::Dr,
        &["198.51.100.81:0", "198.51.100.82:0"],
    );
    dr.backends[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x81]));
    dr.backends[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x82]));
    let mut dr6 = policy(
        svc(
            "[2001:db8:10::20]:53",
            Proto::Udp,
            Mode::Dr,
            &["[2001:db8:b::81]:0", "[2001:db8:b::82]:0"],
        ),
        PolicyKind::Wlc,
    );
    dr6.backends[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x91]));
    dr6.backends[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x92]));
    let nat = svc(
        "203.0.113.21:80",
        Proto::Tcp,
        Mode::Nat,
        &["198.51.100.91:8080", "198.51.100.92:8080"],
    );
    let mut dr_wlc = policy(
        svc(
            "203.0.113.22:80",
            Proto::Tcp,
            Mode::Dr,
            &["198.51.100.83:0", "198.51.100.84:0"],
        ),
        PolicyKind::Wlc,
    );
    dr_wlc.backends[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x83]));
    dr_wlc.backends[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x84]));
    // IPVS's behaviour: mid-flow packets of untracked flows are dropped.
    let mut dr_drop = svc(
        "203.0.113.23:80",
        Proto::Tcp,
        Mode::Dr,
        &["198.51.100.85:0", "198.51.100.86:0"],
    );
    dr_drop.mid_flow = MidFlow::Drop;
    dr_drop.backends[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x85]));
    dr_drop.backends[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 0x86]));
    base_spec(vec![dr, dr6, nat, dr_wlc, dr_drop])
}

/// Two data paths built alike: `one` runs packets one by one, `many` in bursts.
struct Pair {
    link: Link,
    cp: ControlPlane,
    one: Dataplane,
    many: Dataplane,
    /// (vip, proto) by service index.
    vips: Vec<(SocketAddr, Proto)>,
    /// Earlier outputs (IP packets, link header stripped).
    history: Vec<Vec<u8>>,
    next: usize,
}

impl Pair {
    fn new(spec: DataplaneSpec, link: Link) -> Pair {
        let key = HashKey::from_bytes([7; 16]);
        let mut cp = ControlPlane::new(spec.clone(), key).expect("the spec is valid");
        let tables: Arc<Tables> = cp.build().expect("tables build");
        let mut opts = DataplaneOptions::new(key);
        opts.link = link;
        opts.seed = 0x5eed;
        opts.snat_ports = SNAT_PORTS;
        // A margin the small tables reach (bursts classify at most 16 packets, so at most 15
        // insertions precede a packet sent by plan out of burst order): both orders are
        // fuzzed, out of order while the tables have free places or half-open entries to
        // evict (`ConnTable::spare`), burst order once established flows would be next.
        opts.fast_path_room = 16;
        let one = Dataplane::new(&spec, tables.clone(), opts.clone()).expect("data path");
        let many = Dataplane::new(&spec, tables, opts).expect("data path");
        let vips = spec.services.iter().map(|s| (s.vip, s.proto)).collect();
        Pair {
            link,
            cp,
            one,
            many,
            vips,
            history: Vec::new(),
            next: 0,
        }
    }

    fn remember(&mut self, out: &[u8]) {
        let Ok(p) = parse(out, self.link) else {
            return;
        };
        let ip = out[p.l3..p.end].to_vec();
        if self.history.len() < HISTORY {
            self.history.push(ip);
        } else {
            self.history[self.next % HISTORY] = ip;
        }
        self.next += 1;
    }

    fn hist(&self, i: u8) -> Option<&[u8]> {
        if self.history.is_empty() {
            return None;
        }
        Some(&self.history[usize::from(i) % self.history.len()])
    }

    /// Adds the link header.
    fn frame(&self, ip: Vec<u8>) -> Vec<u8> {
        match self.link {
            Link::Ip => ip,
            _ => {
                let et: [u8; 2] = if ip.first().is_some_and(|b| b >> 4 == 6) {
                    [0x86, 0xdd]
                } else {
                    [0x08, 0x00]
                };
                let mut f = Vec::with_capacity(ip.len() + 14);
                f.extend_from_slice(&LB_MAC);
                f.extend_from_slice(&ROUTER_MAC);
                f.extend_from_slice(&et);
                f.extend_from_slice(&ip);
                f
            }
        }
    }
}

/// An IP packet (checksums filled in when it parses).
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut v = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4.len()).min(0xffff) as u16;
            let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(l4.len().min(0xffff) as u16).to_be_bytes());
            h.push(proto);
            h.push(64);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        // Mixed families: not a packet the helpers make; the caller's bytes as they are.
        _ => Vec::new(),
    };
    v.extend_from_slice(l4);
    fix(&mut v, Link::Ip);
    v
}

/// Recomputes every checksum of a packet that parses.
fn fix(pkt: &mut [u8], link: Link) {
    if let Ok(p) = parse(pkt, link) {
        if let Ok(q) = parse(&pkt[p.l3..], Link::Ip) {
            let _ = recompute(&mut pkt[p.l3..], &q);
        }
    }
}

/// A transport segment: TCP (6) or UDP (17) with ports and payload.
fn segment(src: SocketAddr, dst: SocketAddr, tcp: bool, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20 + payload.len());
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    if tcp {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()).min(0xffff) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), if tcp { 6 } else { 17 }, &l4)
}

fn payload_bytes(p: &Payload) -> Vec<u8> {
    match p {
        Payload::Empty => Vec::new(),
        Payload::Bytes(b) => b.clone(),
        Payload::Fill { byte, len } => vec![*byte; usize::from(*len % 1600)],
        Payload::Sip { form, call, tail } => {
            const METHODS: [&str; 5] = ["INVITE", "ACK", "BYE", "OPTIONS", "REGISTER"];
            let m = METHODS[usize::from(form % 5)];
            let start = if form & 0x08 != 0 {
                "SIP/2.0 200 OK".to_owned()
            } else {
                format!("{m} sip:bob@example.com SIP/2.0")
            };
            let hdr = if form & 0x10 != 0 { "i" } else { "Call-ID" };
            let mut s = format!(
                "{start}\r\nVia: SIP/2.0/UDP 192.0.2.2:5060\r\n{hdr}: call-{call}@example.com\r\n\
                 CSeq: 1 {m}\r\nContent-Length: {}\r\n\r\n",
                tail.len()
            )
            .into_bytes();
            if form & 0x20 != 0 {
                // Folded or cut short.
                s.truncate(s.len() / 2 + usize::from(*call));
            }
            s.extend_from_slice(tail);
            s
        }
    }
}

/// A client of a VIP's family.
fn client(vip: IpAddr, c: u16) -> SocketAddr {
    let port = 1024 + (c % 4096);
    match vip {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::from([198, 18, (c >> 8) as u8, c as u8]), port),
        IpAddr::V6(_) => {
            let a: std::net::Ipv6Addr = "2001:db8:c::".parse().unwrap();
            SocketAddr::new(IpAddr::V6((u128::from(a) | u128::from(c)).into()), port)
        }
    }
}

/// A packet as the fuzzer described it, with its link header.
fn build(pair: &Pair, pkt: &Pkt) -> Vec<u8> {
    let payload = payload_bytes(&pkt.payload);
    let ip = match &pkt.what {
        What::ToService { svc, client: c } => {
            let (vip, proto) = pair.vips[usize::from(*svc) % pair.vips.len()];
            let src = client(vip.ip(), *c);
            segment(src, vip, proto == Proto::Tcp, pkt.flags, &payload)
        }
        What::Reply { hist } => match pair.hist(*hist).map(|h| (h, parse(h, Link::Ip))) {
            Some((_, Ok(p))) if p.icmp.is_none() => {
                let (s, d) = (p.key.dst(), p.key.src());
                let (sp, dp) = (p.key.dst_port(), p.key.src_port());
                let tcp = p.proto == lb_core::IpProto::Tcp;
                segment(
                    SocketAddr::new(s, sp),
                    SocketAddr::new(d, dp),
                    tcp,
                    pkt.flags,
                    &payload,
                )
            }
            Some((h, _)) => h.to_vec(),
            None => Vec::new(),
        },
        What::IcmpAbout { hist, kind, quote } => match pair.hist(*hist) {
            Some(h) => {
                let v4 = h.first().is_some_and(|b| b >> 4 == 4);
                let (src, dst) = match parse(h, Link::Ip) {
                    // From the quoted packet's destination to its source (outer addresses).
                    Ok(_) if v4 && h.len() >= 20 => (
                        IpAddr::from(<[u8; 4]>::try_from(&h[16..20]).unwrap()),
                        IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).unwrap()),
                    ),
                    Ok(_) if !v4 && h.len() >= 40 => (
                        IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap()),
                        IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap()),
                    ),
                    _ => return pair.frame(h.to_vec()),
                };
                let (t, code) = if v4 {
                    [(3, 3), (3, 4), (11, 0), (3, 1), (3, 13)][usize::from(kind % 5)]
                } else {
                    [(1, 4), (2, 0), (3, 0), (1, 0), (4, 0)][usize::from(kind % 5)]
                };
                let mut l4 = vec![t, code, 0, 0, 0, 0, 0x05, 0x00];
                let q = (if v4 { 28 } else { 48 }) + usize::from(*quote);
                l4.extend_from_slice(&h[..h.len().min(q)]);
                ip_packet(src, dst, if v4 { 1 } else { 58 }, &l4)
            }
            None => Vec::new(),
        },
        What::Replay { hist } => pair.hist(*hist).map(<[u8]>::to_vec).unwrap_or_default(),
        What::Raw(b) => b.clone(),
    };
    let mut f = pair.frame(ip);
    if !f.is_empty() {
        let n = f.len();
        for &(off, x) in &pkt.mutate {
            f[usize::from(off) % n] ^= x;
        }
        if pkt.refix {
            fix(&mut f, pair.link);
        }
    }
    if let Some(c) = pkt.cut {
        f.truncate(usize::from(c));
    }
    f
}

/// Whether a full recompute leaves every checksum of `pkt` as it is.
fn checksums_ok(pkt: &[u8], link: Link) -> bool {
    let Ok(p) = parse(pkt, link) else {
        return false;
    };
    let Ok(q) = parse(&pkt[p.l3..], Link::Ip) else {
        return false;
    };
    let mut c = pkt.to_vec();
    recompute(&mut c[p.l3..], &q).is_ok() && c == pkt
}

/// Checks one output: it parses; when the input's checksums were right, so are its own (outer
/// and inner of a tunnel packet, whose inner packet is the input unchanged).
fn check_output(v: Verdict, out: &[u8], input: &[u8], link: Link, headroom: usize, input_ok: bool) {
    // An ICMP error the data path generated replaces the packet: an IP packet, or on an
    // Ethernet link what `process` wrote at the buffer's start.
    let p = parse(out, link).unwrap_or_else(|e| panic!("{v:?} does not parse: {e:?}"));
    if !input_ok {
        return;
    }
    let ip = &out[p.l3..];
    let q = parse(ip, Link::Ip).expect("the IP packet parses");
    let mut c = ip.to_vec();
    recompute(&mut c, &q).expect("recompute");
    // Encapsulated: the packet grew into the headroom.
    let tunnel = matches!(v, Verdict::Forward { start, .. } if start < headroom);
    if tunnel && q.family == Family::V4 && q.proto == lb_core::IpProto::Udp {
        // RFC 768: an IPv4 UDP checksum of 0 is "none", which the encapsulation writes.
        let off = q.l4 + 6;
        if ip[off..off + 2] == [0, 0] {
            c[off..off + 2].copy_from_slice(&[0, 0]);
        }
    }
    assert_eq!(c, ip, "{v:?}: checksums differ from a full recompute");
    if tunnel {
        let mut copy = ip.to_vec();
        let n = copy.len();
        let mut pb = PacketBuf::new(&mut copy[..], 0, n).expect("buffer");
        tunnel::decap(&mut pb, Some(GUE_PORT)).expect("our encapsulation decapsulates");
        let inner = pb.data();
        let pi = parse(input, link).expect("the input parsed");
        assert!(
            input[pi.l3..].starts_with(inner),
            "the inner packet is the input, unchanged"
        );
        assert!(
            checksums_ok(inner, Link::Ip),
            "inner checksums differ from a full recompute"
        );
    }
}

/// What `explain_mid_flow` says of a packet addressed to a service that cannot start a flow (a
/// TCP segment without SYN or with SYN and ACK, an ICMP error). `None` for any other packet.
fn mid_flow_decision(dp: &Dataplane, pkt: &[u8], link: Link, now: Instant) -> Option<Decision> {
    let p = parse(pkt, link).ok()?;
    if p.fragment != lb_packet::Fragment::None {
        return None;
    }
    let starts = p.icmp.is_none()
        && (p.proto != lb_core::IpProto::Tcp
            || pkt.get(p.l4 + 13).is_some_and(|f| f & 0x12 == 0x02));
    if starts {
        return None;
    }
    match dp.explain_mid_flow(&p.key, now) {
        Decision::NoService => None,
        d => Some(d),
    }
}

/// The outer destination address of an IP packet (or of the one in a frame).
fn outer_dst(out: &[u8], link: Link) -> Option<IpAddr> {
    let p = parse(out, link).ok()?;
    let ip = out.get(p.l3..)?;
    match p.family {
        Family::V4 => Some(IpAddr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?)),
        Family::V6 => Some(IpAddr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?)),
    }
}

/// Check 5: a mid-flow packet that was forwarded went to the backend `explain` named.
fn check_mid_flow(dp: &Dataplane, mid: Decision, v: Verdict, out: &[u8], link: Link) {
    if !matches!(v, Verdict::Forward { .. }) {
        return;
    }
    let id = mid
        .backend()
        .unwrap_or_else(|| panic!("a mid-flow packet explained as {mid:?} was forwarded"));
    let b = dp.tables().backend(id).expect("the backend named exists");
    match b.mode {
        Mode::Dr => assert_eq!(Some(&out[..6]), b.mac.as_ref().map(|m| &m.0[..]), "{mid:?}"),
        Mode::Tunnel => assert_eq!(outer_dst(out, link), Some(b.addr.ip()), "{mid:?}"),
        _ => assert!(
            matches!(mid, Decision::Flow(_)),
            "nat / dnat forwarded a mid-flow packet of an untracked flow: {mid:?}"
        ),
    }
}

fn check_counters(dp: &Dataplane) {
    let s = dp.stats();
    assert_eq!(
        s.forwarded + s.icmp_generated + s.dropped(),
        s.rx_packets,
        "per-reason counters do not add up: {s:?}"
    );
}

fn output(buf: &[u8], v: Verdict) -> Vec<u8> {
    match v {
        Verdict::Forward { start, len } | Verdict::Reply { start, len } => {
            assert!(
                start + len <= buf.len(),
                "{v:?} outside a buffer of {}",
                buf.len()
            );
            buf[start..start + len].to_vec()
        }
        Verdict::Drop(_) | Verdict::Held => Vec::new(),
        other => panic!("unexpected verdict {other:?}"),
    }
}

/// Runs packets through both data paths of `pair` and compares.
fn run(pair: &mut Pair, pkts: &[(Vec<u8>, bool)], headroom: usize, chunk: usize, now: Instant) {
    let link = pair.link;
    let bufs: Vec<Vec<u8>> = pkts
        .iter()
        .map(|(p, _)| {
            let mut b = vec![0u8; headroom + p.len() + TAIL];
            b[headroom..headroom + p.len()].copy_from_slice(p);
            b
        })
        .collect();
    let lens: Vec<usize> = pkts
        .iter()
        .zip(&bufs)
        .map(|((p, overlong), b)| {
            if *overlong {
                b.len() - headroom + 1
            } else {
                p.len()
            }
        })
        .collect();
    // One by one.
    let mut outs_one = Vec::with_capacity(pkts.len());
    for (b, &len) in bufs.iter().zip(&lens) {
        let mut b = b.clone();
        let rx = pair.one.stats().rx_packets;
        let mid = b
            .get(headroom..headroom + len)
            .and_then(|pkt| mid_flow_decision(&pair.one, pkt, link, now));
        let v = pair.one.process(&mut b, headroom, len, now);
        assert_eq!(pair.one.stats().rx_packets, rx + 1);
        check_counters(&pair.one);
        let out = output(&b, v);
        if let Some(mid) = mid {
            check_mid_flow(&pair.one, mid, v, &out, link);
        }
        outs_one.push((v, out));
    }
    // In bursts: every other one classified first (`Classifier`, capacity 16, so that a
    // longer burst's tail is classified while processed).
    let mut outs_many = Vec::with_capacity(pkts.len());
    let idx: Vec<usize> = (0..pkts.len()).collect();
    let mut cl = pair.many.classifier(16);
    cl.enable_fast_path(8);
    for (k, c) in idx.chunks(chunk).enumerate() {
        let mut bs: Vec<Vec<u8>> = c.iter().map(|&i| bufs[i].clone()).collect();
        let ls: Vec<usize> = c.iter().map(|&i| lens[i]).collect();
        let mut vs = vec![Verdict::Drop(DropReason::NotIp); c.len()];
        let rx = pair.many.stats().rx_packets;
        if k % 2 == 1 {
            cl.classify(&bs, headroom, &ls);
            // Established flows' packets by their plans (the burst's head without the lock);
            // the lock then hands them back, so the counters below include them.
            cl.forward_cached(&mut bs, &ls, None, now, &mut vs);
            pair.many
                .process_batch_classified(&mut cl, &mut bs, &ls, None, now, &mut vs);
        } else {
            pair.many
                .process_batch(&mut bs, headroom, &ls, now, &mut vs);
        }
        assert_eq!(pair.many.stats().rx_packets, rx + c.len() as u64);
        check_counters(&pair.many);
        for (b, v) in bs.iter().zip(&vs) {
            outs_many.push((*v, output(b, *v)));
        }
    }
    for (i, ((a, b), (input, _))) in outs_one.iter().zip(&outs_many).zip(pkts).enumerate() {
        assert_eq!(a, b, "packet {i}: process and process_batch differ");
        if let Verdict::Forward { .. } | Verdict::Reply { .. } = a.0 {
            let ok = checksums_ok(input, link);
            check_output(a.0, &a.1, input, link, headroom, ok);
        }
    }
    for (v, out) in &outs_one {
        if !matches!(v, Verdict::Drop(_)) {
            pair.remember(out);
        }
    }
    compare(pair, now);
}

fn compare(pair: &mut Pair, now: Instant) {
    // The same counters, but the fast path's own (how many packets went by plans).
    let mut many = pair.many.stats().clone();
    assert_eq!(pair.one.stats().fast_path_plans, 0);
    many.fast_path = 0;
    many.fast_path_locked = 0;
    many.fast_path_plans = 0;
    for b in &mut many.backends {
        b.fast_packets = 0;
    }
    assert_eq!(
        many.fast_path_orphaned, 0,
        "one thread: nothing handed back late"
    );
    assert_eq!(pair.one.stats(), &many, "counters differ");
    let (a, b) = (pair.one.table_stats(), pair.many.table_stats());
    assert_eq!(a, b, "table figures differ");
    assert!(a.entries <= a.capacity, "{a:?}");
    loop {
        let (x, y) = (pair.one.poll_event(), pair.many.poll_event());
        assert_eq!(x, y, "load events differ");
        if x.is_none() {
            break;
        }
    }
    for info in pair.cp.backends() {
        assert_eq!(
            pair.one.backend_load(info.id, now),
            pair.many.backend_load(info.id, now),
            "live load of {:?} differs",
            info.id
        );
    }
}

fuzz_target!(|input: Input| {
    let mut ip = Pair::new(ip_spec(), Link::Ip);
    let mut eth = Pair::new(eth_spec(), Link::Ethernet);
    let mut now = Instant::from_secs(1);
    for step in input.steps.iter().take(64) {
        match step {
            Step::Burst {
                eth: e,
                headroom,
                chunk,
                pkts,
            } => {
                let pair = if *e { &mut eth } else { &mut ip };
                let pkts: Vec<(Vec<u8>, bool)> = pkts
                    .iter()
                    .take(64)
                    .map(|p| (build(pair, p), p.overlong))
                    .collect();
                let h = usize::from(*headroom) % (HEADROOM + 8);
                let chunk = usize::from(chunk % 32) + 1;
                run(pair, &pkts, h, chunk, now);
            }
            Step::Flood {
                eth: e,
                svc,
                base,
                count,
                flags,
                chunk,
            } => {
                let pair = if *e { &mut eth } else { &mut ip };
                let (vip, proto) = pair.vips[usize::from(*svc) % pair.vips.len()];
                let pkts: Vec<(Vec<u8>, bool)> = (0..u16::from(*count))
                    .map(|i| {
                        let src = client(vip.ip(), base.wrapping_add(i));
                        let p = segment(src, vip, proto == Proto::Tcp, *flags, b"");
                        (pair.frame(p), false)
                    })
                    .collect();
                run(pair, &pkts, HEADROOM, usize::from(chunk % 32) + 1, now);
            }
            Step::Advance(n) => now += Duration::from_millis(u64::from(*n) * 10),
            Step::Housekeeping(budget) => {
                for pair in [&mut ip, &mut eth] {
                    let b = usize::from(*budget);
                    assert_eq!(
                        pair.one.housekeeping(now, b),
                        pair.many.housekeeping(now, b),
                        "housekeeping differs"
                    );
                    compare(pair, now);
                }
            }
            Step::Health {
                eth: e,
                backend,
                up,
            } => {
                let pair = if *e { &mut eth } else { &mut ip };
                let ids: Vec<_> = pair.cp.backends().map(|b| b.id).collect();
                let id = ids[usize::from(*backend) % ids.len()];
                if pair.cp.set_healthy(id, *up) {
                    let t = pair.cp.build().expect("tables build");
                    pair.one.set_tables(t.clone(), now);
                    pair.many.set_tables(t, now);
                    compare(pair, now);
                }
            }
        }
    }
});
