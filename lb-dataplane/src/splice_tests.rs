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
    /// The data path's `clock_base_ms`.
    clock: u64,
    /// The configuration it was built from.
    spec: DataplaneSpec,
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
        Rig::with_clock(affinity, edit, 0)
    }

    /// [`Rig::new`] with [`DataplaneOptions::clock_base_ms`] set.
    fn with_clock(
        affinity: Affinity,
        edit: impl FnOnce(&mut DataplaneSpec),
        clock_base_ms: u64,
    ) -> Rig {
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
        let mut opts = DataplaneOptions::new(key);
        opts.clock_base_ms = clock_base_ms;
        opts.sync_log = 1024;
        let dp = Dataplane::new(&spec, cp.build().unwrap(), opts).unwrap();
        Rig {
            cp,
            dp,
            buf: vec![0; 4096],
            now: Instant::from_secs(1_000),
            clock: clock_base_ms,
            spec,
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

/// The backend's SYN-ACK to the balancer's SYN `bsyn`: ISN `s`, window scale 5, SACK, its
/// own clock (TSval 50 000) echoing `bts`.
fn backend_synack(bsyn: &Seg, s: u32, c: u32, bts: u32) -> Seg {
    let mut synack = with_ts(
        seg(
            bsyn.dst,
            bsyn.src,
            s,
            c.wrapping_add(1),
            flags::SYN | flags::ACK,
            b"",
        ),
        50_000,
        bts,
    );
    synack.o.wscale = Some(5);
    synack.o.sack_permitted = true;
    synack
}

/// A backend's RST to the balancer's SYN `syn` (client ISN `c`).
fn refusal(syn: &Seg, c: u32) -> Seg {
    seg(
        syn.dst,
        syn.src,
        0,
        c.wrapping_add(1),
        flags::RST | flags::ACK,
        b"",
    )
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
    // The backend connection's TSvals run on the balancer's clock (PAWS on reused SNAT
    // tuples): the client's 778 becomes the balancer's millisecond count.
    let clock = (r.clock + r.now.as_millis()) as u32;
    assert_eq!(bsyn.o.timestamps, ts.then_some((clock, 0)));
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
    // What the backend echoes: the TSval of the balancer's SYN (the client's 778, moved).
    let bts = bsyn.o.timestamps.unwrap().0;
    let s = 0x1000_0000u32;
    let synack = backend_synack(&bsyn, s, c, bts);
    let (out, _) = r.send(&synack);
    let data = out.expect("held head to the backend");
    assert_eq!((data.src, data.dst), (snat, b));
    assert_eq!(data.h.seq, c.wrapping_add(1));
    assert_eq!(data.h.ack, s.wrapping_add(1));
    assert_eq!(data.data, head);
    assert_eq!(data.o.timestamps, Some((bts, 50_000)));
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
        bts,
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
    assert_eq!(to_b.o.timestamps, Some((bts + 12, 50_010)));
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
        let (out, _) = r.send(&refusal(&syn, c));
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

/// A head whose blank line arrives split over segments, a byte at the end of one and three in
/// the next (and a lone byte between): each partial segment is ACKed, and the segment that
/// completes the blank line starts the backend connection (only the new bytes and the three
/// before them are searched on each arrival).
#[test]
fn a_blank_line_split_over_segments_completes_the_head() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:43100");
    let vip = sa(VIP);
    let (sa_, _) = r.send(&seg(client, vip, 10, 0, flags::SYN, b""));
    let l = sa_.unwrap().h.seq.wrapping_add(1);
    let head = get("api.example", "/");
    let n = head.len();
    // ..."t\r" | "\n" | "\r\n": the blank line ends in the third piece.
    let pieces = [&head[..n - 3], &head[n - 3..n - 2], &head[n - 2..]];
    let mut seq = 11u32;
    for (i, piece) in pieces.iter().enumerate() {
        let (out, _) = r.send(&seg(client, vip, seq, l, flags::ACK, piece));
        let out = out.expect("an answer to every piece");
        seq = seq.wrapping_add(piece.len() as u32);
        if i + 1 < pieces.len() {
            assert_eq!(
                (out.dst, out.h.flags, out.h.ack),
                (client, flags::ACK, seq),
                "piece {i} held and ACKed"
            );
        } else {
            assert_eq!(
                out.h.flags,
                flags::SYN,
                "the complete head opens the backend"
            );
            assert_eq!(out.h.seq, 10, "the backend sees the client's ISN");
        }
    }
    assert_eq!(r.dp.splice_stats().head_too_large, 0);
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

// --- Offloads: partial checksums and GSO super-packets through a splice. ---

use lb_packet::offload::{GsoType, Segmenter, VnetHdr};

/// Both sides of a spliced connection close: the backend's FIN (a server closing first), then
/// the client's. `c_next` / `l_ack`: the client's next sequence number and acknowledgement;
/// `s_next`: the backend's next sequence number.
fn fin_both(
    r: &mut Rig,
    (client, c_next, l_ack): (SocketAddr, u32, u32),
    (b, snat, s_next): (SocketAddr, SocketAddr, u32),
) {
    r.send(&seg(b, snat, s_next, c_next, flags::FIN | flags::ACK, b""));
    r.send(&seg(
        client,
        sa(VIP),
        c_next,
        l_ack,
        flags::FIN | flags::ACK,
        b"",
    ));
}

impl Rig {
    /// Sends `s` as a sender with offloads hands it over (partial checksum; a TCPv4 GSO
    /// super-packet when `gso` is set) through `process_batch_offload`; returns the verdict,
    /// the bytes out and the header to write with them.
    fn send_offload(&mut self, s: &Seg, gso: Option<u16>) -> (Verdict, Vec<u8>, VnetHdr) {
        let mut pkt = vec![0u8; 70_000];
        let n = tcpseg::build(&mut pkt, s.src, s.dst, &s.h, &s.o, &s.data).unwrap();
        pkt.truncate(n);
        let hdr = crate::tests::offloaded(&mut pkt, gso);
        let mut bufs = vec![vec![0u8; HEADROOM + 70_000]];
        bufs[0][HEADROOM..HEADROOM + n].copy_from_slice(&pkt);
        let mut hdrs = [hdr];
        let mut v = [Verdict::Held];
        self.dp
            .process_batch_offload(&mut bufs, HEADROOM, &[n], &mut hdrs, self.now, &mut v);
        let out = match v[0] {
            Verdict::Forward { start, len } => bufs[0][start..start + len].to_vec(),
            _ => Vec::new(),
        };
        (v[0], out, hdrs[0])
    }
}

/// Cuts a translated super-packet as the kernel would: every segment decoded (checksums
/// checked against a full recompute).
/// Also: the super-packet's checksum field must hold the pseudo-header sum of what it became
/// (the kernel's segmentation adjusts that field per segment rather than summing afresh), so
/// completing it as one packet must give a valid checksum.
fn cut(pkt: &[u8], hdr: &VnetHdr) -> Vec<Seg> {
    let p = parse(pkt, Link::Ip).unwrap();
    let mut whole = pkt.to_vec();
    lb_packet::offload::complete_csum(&mut whole, hdr, p.end, false).unwrap();
    Rig::decode(&whole);
    let mut seg = Segmenter::new(pkt, &p, hdr).unwrap();
    let mut out = vec![0u8; 70_000];
    let mut segs = Vec::new();
    while let Some(n) = seg.next_into(pkt, &mut out).unwrap() {
        segs.push(Rig::decode(&out[..n]));
    }
    segs
}

#[test]
fn spliced_super_packets_are_translated_whole_and_plain_ones_before() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:40000");
    let vip = sa(VIP);
    let head = get("api.example", "/big");
    let hl = head.len() as u32;
    // Before the splice, a super-packet is handed back to be cut, untouched and uncounted
    // by the splice (here: a client that sends data right after its SYN's cookie).
    let early = seg(client, vip, 5, 6, flags::ACK, &[b'x'; 3000]);
    let (v, _, _) = r.send_offload(&early, Some(1000));
    assert_eq!(v, Verdict::Segment);
    assert_eq!(r.dp.splice_stats().cookies_bad, 0, "nothing was read");
    // A lone partial checksum before the splice is completed and read: a SYN gets its cookie.
    let (v, out, h) = r.send_offload(&seg(client, vip, 1, 0, flags::SYN, b""), None);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(h, VnetHdr::NONE, "a packet the splice wrote goes out plain");
    let synack = Rig::decode(&out);
    assert_eq!(synack.h.flags, flags::SYN | flags::ACK);
    assert_eq!(r.dp.stats().csum_completed, 1);
    // A spliced connection (another client), timestamps on.
    let client = sa("192.0.2.3:40001");
    let (c, l, bsyn) = open(&mut r, client, &head, true);
    let (snat, b) = (bsyn.src, bsyn.dst);
    let bts = bsyn.o.timestamps.unwrap().0;
    let s = 0x7000_0000u32;
    let synack = backend_synack(&bsyn, s, c, bts);
    // The backend's SYN-ACK as a partial checksum: completed, the held head goes out plain.
    let (v, out, h) = r.send_offload(&synack, None);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(h, VnetHdr::NONE);
    assert_eq!(Rig::decode(&out).data, head);
    // The backend's answer as one super-packet of 3 × 1000 bytes.
    let body: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mut resp = with_ts(
        seg(
            b,
            snat,
            s.wrapping_add(1),
            c.wrapping_add(1 + hl),
            flags::ACK | flags::PSH,
            &body,
        ),
        50_010,
        bts,
    );
    resp.h.window = 1000;
    let (v, out, h) = r.send_offload(&resp, Some(1000));
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(h.gso, GsoType::TcpV4, "the super-packet goes out whole");
    assert_eq!(h.gso_size, 1000);
    let segs = cut(&out, &h);
    assert_eq!(segs.len(), 3);
    let mut got = Vec::new();
    for (i, x) in segs.iter().enumerate() {
        assert_eq!((x.src, x.dst), (vip, client));
        assert_eq!(
            x.h.seq,
            l.wrapping_add(1 + 1000 * i as u32),
            "our ISN space"
        );
        assert_eq!(x.h.ack, c.wrapping_add(1 + hl));
        assert_eq!(x.h.window, 1000 << 5 >> 7, "window rescaled");
        assert_eq!(
            x.o.timestamps.map(|t| t.1),
            Some(778),
            "TSecr in the client's clock"
        );
        got.extend_from_slice(&x.data);
    }
    assert_eq!(got, body);
    let tsv = segs[0].o.timestamps.unwrap().0;
    // The client's upload as a super-packet: into the backend's space.
    let up: Vec<u8> = (0..4000u32).map(|i| (i % 13) as u8).collect();
    let req = with_ts(
        seg(
            client,
            vip,
            c.wrapping_add(1 + hl),
            l.wrapping_add(3001),
            flags::ACK,
            &up,
        ),
        790,
        tsv,
    );
    let (v, out, h) = r.send_offload(&req, Some(1400));
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    let segs = cut(&out, &h);
    assert_eq!(segs.len(), 3);
    for (i, x) in segs.iter().enumerate() {
        assert_eq!((x.src, x.dst), (snat, b));
        assert_eq!(x.h.seq, c.wrapping_add(1 + hl + 1400 * i as u32));
        assert_eq!(x.h.ack, s.wrapping_add(3001), "the backend's space");
        assert_eq!(x.o.timestamps, Some((bts + 12, 50_010)));
    }
    let st = r.dp.splice_stats();
    assert_eq!(st.gso_translated, 2);
    assert_eq!((st.to_backend, st.to_client), (1, 1));
    assert_eq!(
        r.dp.stats().gso_cut,
        1,
        "only the early super-packet was cut"
    );
}

#[test]
fn a_body_in_the_head_segment_beyond_head_max_follows_once_spliced() {
    // head_max is 512 here: a POST whose head and first body bytes share one 900-byte
    // segment is bound on the first 512 bytes; the rest, not acknowledged, comes again and
    // is translated through.
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:45000");
    let vip = sa(VIP);
    let mut post =
        b"POST /up HTTP/1.1\r\nHost: api.example\r\nContent-Length: 850\r\n\r\n".to_vec();
    post.resize(900, b'b');
    let (c, l, bsyn) = open(&mut r, client, &post, false);
    let (snat, b) = (bsyn.src, bsyn.dst);
    let s = 0x2000_0000u32;
    let (out, _) = r.send(&seg(
        b,
        snat,
        s,
        c.wrapping_add(1),
        flags::SYN | flags::ACK,
        b"",
    ));
    let held = out.expect("the held head");
    assert_eq!(held.data, &post[..512], "the first head_max bytes");
    assert_eq!(held.h.seq, c.wrapping_add(1));
    // The client's TCP sends the unacknowledged rest again.
    let (out, _) = r.send(&seg(
        client,
        vip,
        c.wrapping_add(513),
        l.wrapping_add(1),
        flags::ACK | flags::PSH,
        &post[512..],
    ));
    let rest = out.expect("the rest, translated");
    assert_eq!((rest.src, rest.dst), (snat, b));
    assert_eq!(rest.h.seq, c.wrapping_add(513));
    assert_eq!(rest.data, &post[512..]);
    assert_eq!(r.dp.splice_stats().head_too_large, 0);
}

#[test]
fn a_syn_on_a_closing_connections_port_opens_a_new_one() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let client = sa("192.0.2.2:46000");
    let vip = sa(VIP);
    let head = get("api.example", "/");
    let hl = head.len() as u32;
    let (c, l, bsyn) = open(&mut r, client, &head, false);
    let (snat, b) = (bsyn.src, bsyn.dst);
    let s = 0x3000_0000u32;
    r.send(&seg(
        b,
        snat,
        s,
        c.wrapping_add(1),
        flags::SYN | flags::ACK,
        b"",
    ));
    // Both sides close.
    fin_both(
        &mut r,
        (client, c.wrapping_add(1 + hl), l.wrapping_add(2)),
        (b, snat, s.wrapping_add(1)),
    );
    assert_eq!(r.dp.splice_stats().active, 1, "the slot lingers");
    // The same client port, a new connection at once: answered with a cookie, not
    // translated to the old backend connection.
    let (out, _) = r.send(&seg(client, vip, 0x0bad_cafe, 0, flags::SYN, b""));
    let synack = out.expect("a SYN-ACK");
    assert_eq!((synack.src, synack.dst), (vip, client));
    assert_eq!(synack.h.flags, flags::SYN | flags::ACK);
    assert_eq!(synack.h.ack, 0x0bad_cafe + 1);
    let st = r.dp.splice_stats();
    assert_eq!((st.reopened, st.active), (1, 0));
    // And it goes through to a backend as usual.
    let l2 = synack.h.seq;
    r.send(&seg(
        client,
        vip,
        0x0bad_caff,
        l2.wrapping_add(1),
        flags::ACK,
        b"",
    ));
    let (out, _) = r.send(&seg(
        client,
        vip,
        0x0bad_caff,
        l2.wrapping_add(1),
        flags::ACK | flags::PSH,
        &head,
    ));
    let syn2 = out.expect("a SYN to a backend");
    assert_eq!(syn2.h.flags, flags::SYN);
    assert_eq!(syn2.h.seq, 0x0bad_cafe);
    assert_ne!(syn2.src, snat, "a fresh SNAT port");
}

#[test]
fn a_full_table_takes_a_closing_slot_but_never_a_live_one() {
    let mut r = Rig::new(Affinity::None, |s| s.splice_capacity = 2);
    let vip = sa(VIP);
    let head = get("api.example", "/");
    let hl = head.len() as u32;
    // Two spliced connections fill the table.
    let mut conns = Vec::new();
    for port in [47000u16, 47001] {
        let client = SocketAddr::new(sa("192.0.2.2:1").ip(), port);
        let (c, l, bsyn) = open(&mut r, client, &head, false);
        let s = 0x4000_0000u32 + u32::from(port);
        r.send(&seg(
            bsyn.dst,
            bsyn.src,
            s,
            c.wrapping_add(1),
            flags::SYN | flags::ACK,
            b"",
        ));
        conns.push((client, c, l, bsyn, s));
    }
    assert_eq!(r.dp.splice_stats().active, 2);
    // A third client completes its handshake: no slot free, none closing: dropped.
    let third = sa("192.0.2.9:48000");
    let (out, _) = r.send(&seg(third, vip, 100, 0, flags::SYN, b""));
    let l3 = out.unwrap().h.seq;
    let ack3 = seg(third, vip, 101, l3.wrapping_add(1), flags::ACK, b"");
    let (_, v) = r.send(&ack3);
    assert_eq!(v, Verdict::Drop(crate::DropReason::TableFull));
    assert_eq!(r.dp.splice_stats().table_full, 1);
    // The first connection closes both ways: its slot lingers, and the third client's next
    // ACK takes it.
    let (client, c, l, bsyn, s) = conns[0].clone();
    fin_both(
        &mut r,
        (client, c.wrapping_add(1 + hl), l.wrapping_add(2)),
        (bsyn.dst, bsyn.src, s.wrapping_add(1)),
    );
    let (_, v) = r.send(&ack3);
    assert_eq!(v, Verdict::Held, "a slot for the third connection");
    let st = r.dp.splice_stats();
    assert_eq!((st.reclaimed, st.active, st.table_full), (1, 2, 1));
    // The second connection is untouched: it still translates.
    let (client, c, l, bsyn, _) = conns[1].clone();
    let (out, _) = r.send(&seg(
        client,
        vip,
        c.wrapping_add(1 + hl),
        l.wrapping_add(1),
        flags::ACK,
        b"more",
    ));
    let to_b = out.expect("still spliced");
    assert_eq!((to_b.src, to_b.dst), (bsyn.src, bsyn.dst));
}

#[test]
fn backend_timestamps_count_from_the_clock_base_whatever_the_clients_clock() {
    // Two balancer processes in a row (a restart, or a takeover by the peer) that reuse a
    // SNAT 4-tuple: the second one's SYN must carry a newer TSval than the first one's
    // connection left in the backend's TIME_WAIT, whatever TSvals the clients chose.
    let head = get("api.example", "/");
    let client = sa("192.0.2.2:49000");
    let wall = 1_764_000_000_000u64; // ms since the Unix epoch at the first start
    let mut first = Rig::with_clock(Affinity::None, |_| {}, wall);
    let (_, _, a) = open(&mut first, client, &head, true);
    let ta = a.o.timestamps.unwrap().0;
    assert_eq!(
        ta,
        (wall + first.now.as_millis()) as u32,
        "the balancer's clock, not the client's 778"
    );
    // Restarted 5 s after that connection: its Instant starts again near zero.
    let restart = wall + first.now.as_millis() + 5_000;
    let mut second = Rig::with_clock(Affinity::None, |_| {}, restart);
    second.now = Instant::from_secs(1);
    let (_, _, b) = open(&mut second, client, &head, true);
    let tb = b.o.timestamps.unwrap().0;
    assert_eq!(
        a.src, b.src,
        "the same SNAT 4-tuple (the same slot and port)"
    );
    assert!(
        (tb.wrapping_sub(ta) as i32) > 0,
        "PAWS: {tb} must be newer than {ta}"
    );
}

#[test]
fn a_reload_changes_rules_for_new_connections_and_keeps_spliced_ones() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let vip = sa(VIP);
    let head = get("api.example", "/");
    let hl = head.len() as u32;
    // A connection spliced under the old rule (api.example -> b1).
    let client = sa("192.0.2.2:50000");
    let (c, l, bsyn) = open(&mut r, client, &head, false);
    assert_eq!(bsyn.dst, sa(BACKENDS[0]));
    let s = 0x5000_0000u32;
    r.send(&backend_synack(&bsyn, s, c, 0));
    // The rule now sends api.example to b3.
    let mut spec = r.spec.clone();
    spec.services[0].splice.as_mut().unwrap().rules[0].backends = vec![sa(BACKENDS[2])];
    r.dp.set_splice(&spec).unwrap();
    let (_, _, syn) = open(&mut r, sa("192.0.2.2:50001"), &head, false);
    assert_eq!(
        syn.dst,
        sa(BACKENDS[2]),
        "new connections follow the new rule"
    );
    let more = seg(
        client,
        vip,
        c.wrapping_add(1 + hl),
        l.wrapping_add(1),
        flags::ACK,
        b"more",
    );
    let (out, _) = r.send(&more);
    assert_eq!(out.expect("still spliced").dst, sa(BACKENDS[0]));
    // The service stops splicing: a new SYN is not answered with a cookie any more (it is
    // the tables' business now), the spliced connection runs on.
    spec.services[0].splice = None;
    r.dp.set_splice(&spec).unwrap();
    let sent = r.dp.splice_stats().cookies_sent;
    let (out, _) = r.send(&seg(sa("192.0.2.2:50002"), vip, 9, 0, flags::SYN, b""));
    assert!(
        out.as_ref().is_none_or(|o| o.src != vip),
        "no cookie SYN-ACK: {out:?}"
    );
    assert_eq!(r.dp.splice_stats().cookies_sent, sent);
    let (out, _) = r.send(&more);
    assert_eq!(out.expect("still spliced").dst, sa(BACKENDS[0]));
    // Back again: the VIP's entry is reused.
    r.dp.set_splice(&r.spec.clone()).unwrap();
    let (_, _, syn) = open(&mut r, sa("192.0.2.2:50003"), &head, false);
    assert_eq!(syn.dst, sa(BACKENDS[0]));
}

#[test]
fn a_reload_that_needs_new_slots_is_refused() {
    let mut r = Rig::new(Affinity::None, |_| {});
    let mut spec = r.spec.clone();
    spec.splice_capacity *= 2;
    assert_eq!(
        r.dp.set_splice(&spec),
        Err(crate::SpliceReloadError::Capacity)
    );
    // A data path built without a spliced service has no slots to splice with.
    let mut plain = r.spec.clone();
    plain.services[0].splice = None;
    let key = HashKey::from_bytes([9; 16]);
    let mut cp = ControlPlane::new(plain.clone(), key).unwrap();
    let mut dp = Dataplane::new(&plain, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap();
    assert_eq!(dp.set_splice(&plain), Ok(()));
    assert_eq!(
        dp.set_splice(&r.spec),
        Err(crate::SpliceReloadError::NoSlots)
    );
}

#[path = "splice_sync_tests.rs"]
mod sync_tests;

#[path = "splice_place_tests.rs"]
mod place_tests;
