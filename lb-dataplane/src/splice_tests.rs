//! Unit tests of the splice path: a scripted client and scripted backends exchange segments
//! through a data path, every output parsed and checked (addresses, sequence spaces, options,
//! checksums against a full recompute).

use std::net::SocketAddr;

use lb_core::{HashKey, Instant};
use lb_packet::checksum::recompute;
use lb_packet::tcpseg::{self, flags, TcpHeader, TcpOptions};
use lb_packet::{parse, Link};
use proptest::prelude::*;

use crate::{
    Affinity, ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec,
    SpliceRule, SpliceSpec, Verdict, HEADROOM,
};
use lb_core::Duration;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const VIP: &str = "203.0.113.10:80";
const SNAT: &str = "203.0.113.100";
const BACKENDS: [&str; 3] = ["198.51.100.11:80", "198.51.100.12:80", "198.51.100.13:80"];

struct Rig {
    cp: ControlPlane,
    dp: Dataplane,
    buf: Vec<u8>,
    now: Instant,
}

/// A segment as seen on the wire.
#[derive(Debug, Clone)]
struct Seg {
    src: SocketAddr,
    dst: SocketAddr,
    h: TcpHeader,
    o: TcpOptions,
    data: Vec<u8>,
}

fn rules() -> Vec<SpliceRule> {
    vec![
        SpliceRule {
            host: Some("api.example".into()),
            path_prefix: "/".into(),
            backends: vec![sa(BACKENDS[0])],
        },
        SpliceRule {
            host: Some("www.example".into()),
            path_prefix: "/static/".into(),
            backends: vec![sa(BACKENDS[1])],
        },
    ]
}

impl Rig {
    fn new(affinity: Affinity, edit: impl FnOnce(&mut DataplaneSpec)) -> Rig {
        let mut svc = ServiceSpec::new(sa(VIP), Proto::Tcp, Mode::Nat);
        svc.affinity = affinity;
        svc.splice = Some(SpliceSpec {
            rules: rules(),
            head_max: 512,
            ..SpliceSpec::default()
        });
        for b in BACKENDS {
            svc = svc.with_backend(sa(b), 1);
        }
        let mut spec = DataplaneSpec {
            snat_addrs: vec![SNAT.parse().unwrap()],
            conntrack_capacity: 4096,
            splice_capacity: 64,
            services: vec![svc],
            ..DataplaneSpec::default()
        };
        edit(&mut spec);
        let key = HashKey::from_bytes([9; 16]);
        let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
        let dp = Dataplane::new(&spec, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap();
        Rig {
            cp,
            dp,
            buf: vec![0; 4096],
            now: Instant::from_secs(1_000),
        }
    }

    fn decode(out: &[u8]) -> Seg {
        let p = parse(out, Link::Ip).unwrap();
        let mut c = out.to_vec();
        recompute(&mut c, &p).unwrap();
        assert_eq!(c, out, "checksums differ from a full recompute");
        let (h, o) = tcpseg::read(out, &p).unwrap();
        Seg {
            src: SocketAddr::new(p.key.src(), p.key.src_port()),
            dst: SocketAddr::new(p.key.dst(), p.key.dst_port()),
            h,
            o,
            data: p.payload(out).to_vec(),
        }
    }

    /// Sends `s` through; returns what comes out (None: held or dropped) and the verdict.
    fn send(&mut self, s: &Seg) -> (Option<Seg>, Verdict) {
        let mut tmp = [0u8; 2048];
        let n = tcpseg::build(&mut tmp, s.src, s.dst, &s.h, &s.o, &s.data).unwrap();
        self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&tmp[..n]);
        let v = self.dp.process(&mut self.buf, HEADROOM, n, self.now);
        match v {
            Verdict::Forward { start, len } => {
                (Some(Rig::decode(&self.buf[start..start + len])), v)
            }
            _ => (None, v),
        }
    }

    fn poll(&mut self) -> Option<Seg> {
        let mut out = [0u8; 2048];
        let n = self.dp.splice_poll(&mut out, self.now)?;
        Some(Rig::decode(&out[..n]))
    }
}

fn seg(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, fl: u8, data: &[u8]) -> Seg {
    Seg {
        src,
        dst,
        h: TcpHeader {
            seq,
            ack,
            flags: fl,
            window: 500,
        },
        o: TcpOptions::default(),
        data: data.to_vec(),
    }
}

fn with_ts(mut s: Seg, v: u32, e: u32) -> Seg {
    s.o.timestamps = Some((v, e));
    s
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n").into_bytes()
}

/// A connection through to its backend's SYN: returns (client's ISN, our ISN, the SYN).
fn open(r: &mut Rig, client: SocketAddr, head: &[u8], ts: bool) -> (u32, u32, Seg) {
    let vip = sa(VIP);
    let c = 0xffff_fff0u32; // wraps during the test
    let mut syn = seg(client, vip, c, 0, flags::SYN, b"");
    syn.o = TcpOptions {
        mss: Some(1460),
        wscale: ts.then_some(9),
        sack_permitted: ts,
        timestamps: ts.then_some((777, 0)),
    };
    let (sa_, _) = r.send(&syn);
    let synack = sa_.expect("SYN-ACK");
    assert_eq!((synack.src, synack.dst), (vip, client));
    assert_eq!(synack.h.flags, flags::SYN | flags::ACK);
    assert_eq!(synack.h.ack, c.wrapping_add(1));
    assert_eq!(synack.o.sack_permitted, ts);
    assert_eq!(synack.o.wscale, ts.then_some(crate::OUR_WSCALE));
    let l = synack.h.seq;
    let our_ts = synack.o.timestamps.map_or(0, |t| t.0);
    let mk = |s: Seg| if ts { with_ts(s, 778, our_ts) } else { s };
    let (out, v) = r.send(&mk(seg(
        client,
        vip,
        c.wrapping_add(1),
        l.wrapping_add(1),
        flags::ACK,
        b"",
    )));
    assert!(out.is_none() && v == Verdict::Held, "{v:?}");
    let (out, _) = r.send(&mk(seg(
        client,
        vip,
        c.wrapping_add(1),
        l.wrapping_add(1),
        flags::ACK | flags::PSH,
        head,
    )));
    let bsyn = out.expect("SYN to a backend");
    assert_eq!(bsyn.h.flags, flags::SYN);
    assert_eq!(bsyn.h.seq, c, "the backend sees the client's ISN");
    assert_eq!(bsyn.src.ip(), SNAT.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(bsyn.o.mss, Some(1460));
    assert_eq!(bsyn.o.wscale, ts.then_some(9));
    assert_eq!(bsyn.o.sack_permitted, ts);
    assert_eq!(bsyn.o.timestamps, ts.then_some((778, 0)));
    (c, l, bsyn)
}

#[test]
fn host_and_path_rules_pick_the_group() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let cases = [
        ("api.example", "/x", BACKENDS[0]),
        ("API.example:80", "/", BACKENDS[0]),
        ("www.example", "/static/a.png", BACKENDS[1]),
    ];
    for (i, (host, path, want)) in cases.iter().enumerate() {
        let client = SocketAddr::new("192.0.2.2".parse().unwrap(), 40_000 + i as u16);
        let (_, _, syn) = open(&mut r, client, &get(host, path), false);
        assert_eq!(syn.dst, sa(want), "{host}{path}");
    }
    // www.example outside /static/ and unknown hosts: the default group (any backend).
    let mut seen = std::collections::HashSet::new();
    for i in 0..40u16 {
        let client = SocketAddr::new("192.0.2.3".parse().unwrap(), 1000 + i);
        let (_, _, syn) = open(&mut r, client, &get("www.example", "/index.html"), false);
        seen.insert(syn.dst);
    }
    assert_eq!(seen.len(), 3, "the default group spreads: {seen:?}");
}

#[test]
fn http_host_affinity_is_consistent() {
    let mut r = Rig::new(Affinity::HttpHost, |s| {
        s.services[0].splice.as_mut().unwrap().rules.clear()
    });
    let mut by_host = std::collections::HashMap::new();
    for i in 0..60u16 {
        let host = format!("h{}.example", i % 6);
        let client = SocketAddr::new("192.0.2.4".parse().unwrap(), 2000 + i);
        let (_, _, syn) = open(&mut r, client, &get(&host, "/"), false);
        let b = *by_host.entry(host.clone()).or_insert(syn.dst);
        assert_eq!(b, syn.dst, "{host} moved");
    }
    let distinct: std::collections::HashSet<_> = by_host.values().collect();
    assert!(
        distinct.len() >= 2,
        "6 hosts all on one backend: {by_host:?}"
    );
}

#[test]
fn sip_call_id_affinity_places_by_call() {
    let mut r = Rig::new(Affinity::SipCallId, |s| {
        s.services[0].splice.as_mut().unwrap().rules.clear()
    });
    let mut seen = std::collections::HashMap::new();
    for i in 0..30u16 {
        let call = format!("call-{}", i % 10);
        let m = format!("INVITE sip:b@x SIP/2.0\r\nVia: SIP/2.0/TCP a\r\nCall-ID: {call}\r\nContent-Length: 0\r\n\r\n");
        let client = SocketAddr::new("192.0.2.5".parse().unwrap(), 3000 + i);
        let (_, _, syn) = open(&mut r, client, m.as_bytes(), false);
        assert_eq!(*seen.entry(call).or_insert(syn.dst), syn.dst);
    }
    let distinct: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(distinct.len(), 3);
}

/// A whole spliced exchange with timestamps and window scaling: sequence and
/// acknowledgement numbers, SACK blocks, timestamps and windows are translated both ways.
#[test]
fn spliced_exchange_translates_both_ways() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:40000");
    let vip = sa(VIP);
    let head = get("api.example", "/big");
    let (c, l, bsyn) = open(&mut r, client, &head, true);
    let (snat, b) = (bsyn.src, bsyn.dst);
    let s = 0x1000_0000u32;
    // Backend's SYN-ACK, window scale 5, its own clock.
    let mut synack = with_ts(
        seg(b, snat, s, c.wrapping_add(1), flags::SYN | flags::ACK, b""),
        50_000,
        778,
    );
    synack.o.wscale = Some(5);
    synack.o.sack_permitted = true;
    let (out, _) = r.send(&synack);
    let data = out.expect("held head to the backend");
    assert_eq!((data.src, data.dst), (snat, b));
    assert_eq!(data.h.seq, c.wrapping_add(1));
    assert_eq!(data.h.ack, s.wrapping_add(1));
    assert_eq!(data.data, head);
    assert_eq!(data.o.timestamps, Some((778, 50_000)));
    let hl = head.len() as u32;
    // Backend ACKs the head and answers, with a window of 1000 << 5.
    let mut resp = with_ts(
        seg(
            b,
            snat,
            s.wrapping_add(1),
            c.wrapping_add(1 + hl),
            flags::ACK | flags::PSH,
            b"HTTP/1.1 200 OK\r\n\r\n",
        ),
        50_010,
        778,
    );
    resp.h.window = 1000;
    let (out, _) = r.send(&resp);
    let to_c = out.unwrap();
    assert_eq!((to_c.src, to_c.dst), (vip, client));
    assert_eq!(
        to_c.h.seq,
        l.wrapping_add(1),
        "backend seq moved into our ISN space"
    );
    assert_eq!(to_c.h.ack, c.wrapping_add(1 + hl));
    assert_eq!(
        to_c.h.window,
        1000 << 5 >> 7,
        "window rescaled to our scale"
    );
    let (tsv, tse) = to_c.o.timestamps.unwrap();
    assert_eq!(tse, 778);
    // The client's TSecr of that TSval must come back as the backend's.
    let mut ack = with_ts(
        seg(
            client,
            vip,
            c.wrapping_add(1 + hl),
            l.wrapping_add(20),
            flags::ACK,
            b"",
        ),
        790,
        tsv,
    );
    // A SACK block in our space (built by hand after the fixed options).
    ack.o.timestamps = Some((790, tsv));
    let (out, _) = r.send(&ack);
    let to_b = out.unwrap();
    assert_eq!((to_b.src, to_b.dst), (snat, b));
    assert_eq!(to_b.h.seq, c.wrapping_add(1 + hl), "client seq untouched");
    assert_eq!(to_b.h.ack, s.wrapping_add(20));
    assert_eq!(to_b.o.timestamps, Some((790, 50_010)));
    assert_eq!(r.dp.splice_stats().spliced, 1);
    // FIN both ways, then the slot lingers and goes.
    r.send(&seg(
        client,
        vip,
        c.wrapping_add(1 + hl),
        l.wrapping_add(20),
        flags::FIN | flags::ACK,
        b"",
    ));
    r.send(&seg(
        b,
        snat,
        s.wrapping_add(20),
        c.wrapping_add(2 + hl),
        flags::FIN | flags::ACK,
        b"",
    ));
    assert_eq!(r.dp.splice_stats().active, 1);
    r.now += Duration::from_secs(3);
    assert!(r.poll().is_none());
    assert_eq!(r.dp.splice_stats().active, 0);
}

#[test]
fn syn_flood_creates_no_state_and_bad_acks_are_dropped() {
    let mut r = Rig::new(Affinity::None, |_| {});
    for i in 0..5000u32 {
        let client = SocketAddr::new(
            std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
            1024 + (i % 50_000) as u16,
        );
        let (out, _) = r.send(&seg(
            client,
            sa(VIP),
            i.wrapping_mul(7919),
            0,
            flags::SYN,
            b"",
        ));
        assert!(out.is_some());
    }
    let st = r.dp.splice_stats();
    assert_eq!(st.cookies_sent, 5000);
    assert_eq!(st.active, 0);
    assert_eq!(r.dp.table_stats().entries, 0, "{:?}", r.dp.table_stats());
    // Blind ACKs: dropped, no state.
    for i in 0..1000u32 {
        let client = SocketAddr::new("192.0.2.9".parse().unwrap(), 5000 + i as u16);
        let (out, v) = r.send(&seg(
            client,
            sa(VIP),
            1,
            i.wrapping_mul(104_729),
            flags::ACK,
            b"",
        ));
        assert!(out.is_none() && matches!(v, Verdict::Drop(_)));
    }
    assert!(r.dp.splice_stats().cookies_bad >= 999);
    assert_eq!(r.dp.splice_stats().active, 0);
}

#[test]
fn refused_backends_are_skipped_then_the_client_is_reset() {
    let mut r = Rig::new(Affinity::None, |s| {
        s.services[0].splice.as_mut().unwrap().rules.clear()
    });
    let client = sa("192.0.2.2:41000");
    let (c, _, mut syn) = open(&mut r, client, &get("x", "/"), false);
    let mut tried = vec![syn.dst];
    for _ in 0..2 {
        let rst = seg(
            syn.dst,
            syn.src,
            0,
            c.wrapping_add(1),
            flags::RST | flags::ACK,
            b"",
        );
        let (out, _) = r.send(&rst);
        syn = out.unwrap();
        assert_eq!(syn.h.flags, flags::SYN);
        assert!(!tried.contains(&syn.dst));
        tried.push(syn.dst);
    }
    // The third refuses too: no eligible backend left, the client gets an RST.
    let (out, _) = r.send(&seg(
        syn.dst,
        syn.src,
        0,
        c.wrapping_add(1),
        flags::RST | flags::ACK,
        b"",
    ));
    let rst = out.unwrap();
    assert_eq!((rst.src, rst.dst), (sa(VIP), client));
    assert_eq!(rst.h.flags & flags::RST, flags::RST);
    let st = r.dp.splice_stats();
    assert_eq!((st.backend_refused, st.client_resets, st.active), (3, 1, 0));
}

#[test]
fn silent_backend_times_out_to_the_next() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:42000");
    let (_, _, syn) = open(&mut r, client, &get("x", "/"), false);
    r.now += Duration::from_millis(1100);
    let next = r.poll().expect("SYN to the next backend");
    assert_eq!(next.h.flags, flags::SYN);
    assert_ne!(next.dst, syn.dst);
    assert_eq!(r.dp.splice_stats().backend_timeouts, 1);
}

#[test]
fn head_timeout_and_oversize_and_junk() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let vip = sa(VIP);
    // A handshake, then nothing: freed after the head timeout, counted.
    let client = sa("192.0.2.2:43000");
    let (sa_, _) = r.send(&seg(client, vip, 10, 0, flags::SYN, b""));
    let l = sa_.unwrap().h.seq;
    r.send(&seg(client, vip, 11, l.wrapping_add(1), flags::ACK, b""));
    assert_eq!(r.dp.splice_stats().active, 1);
    r.now += Duration::from_secs(6);
    assert!(r.poll().is_none());
    let st = r.dp.splice_stats();
    assert_eq!((st.head_timeouts, st.active), (1, 0));
    // A partial head is ACKed; past head_max (512) it is reset.
    let client = sa("192.0.2.2:43001");
    let (sa_, _) = r.send(&seg(client, vip, 10, 0, flags::SYN, b""));
    let l = sa_.unwrap().h.seq;
    let chunk = [b'a'; 300];
    let (out, _) = r.send(&seg(
        client,
        vip,
        11,
        l.wrapping_add(1),
        flags::ACK,
        b"GET / HTTP/1.1\r\nX: ",
    ));
    let ack = out.unwrap();
    assert_eq!(ack.h.ack, 11 + 19);
    let (out, _) = r.send(&seg(client, vip, 30, l.wrapping_add(1), flags::ACK, &chunk));
    assert_eq!(out.unwrap().h.ack, 30 + 300);
    let (out, _) = r.send(&seg(
        client,
        vip,
        330,
        l.wrapping_add(1),
        flags::ACK,
        &chunk,
    ));
    assert_eq!(out.unwrap().h.flags & flags::RST, flags::RST);
    assert_eq!(r.dp.splice_stats().head_too_large, 1);
    // TLS (not HTTP/1.x, not SIP) — once complete by a blank line — is reset.
    let client = sa("192.0.2.2:43002");
    let (sa_, _) = r.send(&seg(client, vip, 10, 0, flags::SYN, b""));
    let l = sa_.unwrap().h.seq;
    let (out, _) = r.send(&seg(
        client,
        vip,
        11,
        l.wrapping_add(1),
        flags::ACK,
        b"\x16\x03\x01 junk\r\n\r\n",
    ));
    assert_eq!(out.unwrap().h.flags & flags::RST, flags::RST);
    assert_eq!(r.dp.splice_stats().head_invalid, 1);
    assert_eq!(r.dp.splice_stats().active, 0);
}

#[test]
fn backend_gone_resets_the_client() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:44000");
    let vip = sa(VIP);
    let head = get("api.example", "/");
    let (c, l, syn) = open(&mut r, client, &head, false);
    let s = 5u32;
    r.send(&seg(
        syn.dst,
        syn.src,
        s,
        c.wrapping_add(1),
        flags::SYN | flags::ACK,
        b"",
    ));
    let id = r.cp.backend_id(vip, Proto::Tcp, syn.dst).unwrap();
    r.cp.set_healthy(id, false);
    let t = r.cp.build().unwrap();
    r.dp.set_tables(t, r.now);
    let hl = head.len() as u32;
    let (out, _) = r.send(&seg(
        client,
        vip,
        c.wrapping_add(1 + hl),
        l.wrapping_add(1),
        flags::ACK,
        b"more",
    ));
    let rst = out.unwrap();
    assert_eq!((rst.dst, rst.h.flags & flags::RST), (client, flags::RST));
}

#[test]
fn non_splice_services_are_untouched() {
    let mut r = Rig::new(Affinity::None, |s| {
        s.services.push(
            ServiceSpec::new(sa("203.0.113.10:81"), Proto::Tcp, Mode::Nat)
                .with_backend(sa(BACKENDS[0]), 1),
        );
    });
    let (out, _) = r.send(&seg(
        sa("192.0.2.2:45000"),
        sa("203.0.113.10:81"),
        1,
        0,
        flags::SYN,
        b"",
    ));
    let o = out.unwrap();
    assert_eq!(o.dst, sa(BACKENDS[0]), "layer-4 NAT as before");
    assert_eq!(r.dp.splice_stats().cookies_sent, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Whatever the ISNs and offsets: a client byte numbered n reaches the backend as n, the
    /// backend's acknowledgement of it reaches the client as n, and a backend byte m reaches
    /// the client at the matching offset from our ISN, whose acknowledgement returns as m.
    #[test]
    fn sequence_spaces_are_consistent_both_ways(s: u32, off_c in 0u32..1_000_000, off_s in 0u32..1_000_000) {
        let mut r = Rig::new(Affinity::None, |_| {});
        let client = sa("192.0.2.2:46000");
        let vip = sa(VIP);
        let head = get("api.example", "/");
        let (c, l, syn) = open(&mut r, client, &head, false);
        let (snat, b) = (syn.src, syn.dst);
        r.send(&seg(b, snat, s, c.wrapping_add(1), flags::SYN | flags::ACK, b""));
        let n = c.wrapping_add(1).wrapping_add(off_c);
        let m = s.wrapping_add(1).wrapping_add(off_s);
        let (to_b, _) = r.send(&seg(client, vip, n, l.wrapping_add(1).wrapping_add(off_s), flags::ACK, b"x"));
        let to_b = to_b.unwrap();
        prop_assert_eq!(to_b.h.seq, n);
        prop_assert_eq!(to_b.h.ack, m);
        let (to_c, _) = r.send(&seg(b, snat, m, n.wrapping_add(1), flags::ACK, b"y"));
        let to_c = to_c.unwrap();
        prop_assert_eq!(to_c.h.seq, l.wrapping_add(1).wrapping_add(off_s));
        prop_assert_eq!(to_c.h.ack, n.wrapping_add(1));
    }
}

/// A reused slot moves to another SNAT port, so that the backend does not see the 4-tuple of a
/// connection it may still hold in TIME_WAIT; a full pool refuses the cookie's ACK, counted.
#[test]
fn reused_slots_rotate_their_snat_port_and_a_full_pool_refuses() {
    let mut r = Rig::new(Affinity::None, |s| {
        s.splice_capacity = 1;
        s.services[0].splice.as_mut().unwrap().rules.clear();
    });
    let vip = sa(VIP);
    let mut ports = Vec::new();
    for i in 0..3u16 {
        let client = SocketAddr::new("192.0.2.7".parse().unwrap(), 6000 + i);
        let (c, _, syn) = open(&mut r, client, &get("x", "/"), false);
        ports.push(syn.src.port());
        // The client gives up while the balancer connects: the slot is free at once.
        r.send(&seg(client, vip, c.wrapping_add(1), 0, flags::RST, b""));
        assert_eq!(r.dp.splice_stats().active, 0);
    }
    assert!(ports[0] != ports[1] && ports[1] != ports[2], "{ports:?}");
    // One slot: a second connection's valid ACK finds none.
    let _ = open(&mut r, sa("192.0.2.7:7000"), &get("x", "/"), false);
    let client = sa("192.0.2.7:7001");
    let (sa_, _) = r.send(&seg(client, vip, 10, 0, flags::SYN, b""));
    let l = sa_.unwrap().h.seq;
    let (out, v) = r.send(&seg(client, vip, 11, l.wrapping_add(1), flags::ACK, b""));
    assert!(out.is_none() && matches!(v, Verdict::Drop(_)), "{v:?}");
    assert_eq!(r.dp.splice_stats().table_full, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Hostile segments in any order, mixed with valid steps (SYN, the cookie's ACK with a head,
    /// a backend's SYN-ACK to the balancer's SYN, backend segments on a live 4-tuple), with
    /// timers run in between: no panic, every packet the data path writes parses with valid
    /// checksums (checked by `Rig::decode`), and the slot count stays within the pool.
    #[test]
    fn hostile_segments_never_panic(ops in proptest::collection::vec(
        (0u8..7, any::<u16>(), any::<u32>(), any::<u32>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..80), any::<bool>()),
        1..80,
    )) {
        let mut r = Rig::new(Affinity::HttpHost, |s| s.splice_capacity = 4);
        let vip = sa(VIP);
        let mut cookies = std::collections::HashMap::new();
        let mut last_syn: Option<Seg> = None;
        for (kind, port, seq, ack, fl, data, ts) in ops {
            let client = SocketAddr::new("192.0.2.2".parse().unwrap(), port % 4 + 1);
            let mut s = match kind {
                0 => seg(client, vip, seq, ack, fl, &data),
                1 => seg(client, vip, seq, 0, flags::SYN, b""),
                2 => {
                    let Some(&(c, l)) = cookies.get(&client) else { continue };
                    let body: Vec<u8> = if ts { get("h", "/").into_iter().chain(data).collect() } else { data };
                    seg(client, vip, u32::wrapping_add(c, 1), u32::wrapping_add(l, 1), flags::ACK, &body)
                }
                3 => seg(sa(BACKENDS[usize::from(port % 3)]), SocketAddr::new(SNAT.parse().unwrap(), 65535 - port % 64), seq, ack, fl, &data),
                4 => {
                    let Some(b) = &last_syn else { continue };
                    seg(b.dst, b.src, seq, b.h.seq.wrapping_add(1), flags::SYN | flags::ACK, b"")
                }
                5 => {
                    let Some(b) = &last_syn else { continue };
                    seg(b.dst, b.src, seq, ack, fl, &data)
                }
                _ => {
                    r.now += Duration::from_millis(u64::from(port) * 4);
                    while let Some(o) = r.poll() {
                        if o.h.flags == flags::SYN {
                            last_syn = Some(o);
                        }
                    }
                    continue;
                }
            };
            if ts && kind != 2 {
                s.o.timestamps = Some((seq, ack));
            }
            let (out, _) = r.send(&s);
            if let Some(o) = out {
                if o.h.flags == flags::SYN | flags::ACK && o.dst == client {
                    cookies.insert(client, (s.h.seq, o.h.seq));
                }
                if o.h.flags == flags::SYN {
                    last_syn = Some(o);
                }
            }
            prop_assert!(r.dp.splice_stats().active <= 4);
        }
    }
}
