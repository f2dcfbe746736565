//! Packet builders and proptest strategies shared by the unit tests.

use proptest::prelude::*;

use crate::parse::{parse, Fragment, Link};

/// What to build.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub v6: bool,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sp: u16,
    pub dp: u16,
    pub payload: Vec<u8>,
    /// IPv4 option words (NOPs) / IPv6 destination-options headers.
    pub opts: usize,
    pub frag: Fragment,
    pub ttl: u8,
    pub df: bool,
    /// For ICMP: build an error quoting this packet (truncated to `quote` bytes) instead of echo.
    pub inner: Option<(Box<Spec>, usize)>,
    pub echo_reply: bool,
    pub tcp_opts: usize,
}

impl Spec {
    pub(crate) fn simple(v6: bool, proto: u8) -> Spec {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        if v6 {
            src = "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets();
            dst = "2001:db8::100"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets();
        } else {
            src[..4].copy_from_slice(&[192, 0, 2, 1]);
            dst[..4].copy_from_slice(&[203, 0, 113, 10]);
        }
        Spec {
            v6,
            proto,
            src,
            dst,
            sp: 40000,
            dp: 80,
            payload: b"hello".to_vec(),
            opts: 0,
            frag: Fragment::None,
            ttl: 64,
            df: true,
            inner: None,
            echo_reply: false,
            tcp_opts: 0,
        }
    }
}

fn l4_bytes(s: &Spec) -> Vec<u8> {
    let mut l4 = Vec::new();
    if s.frag == Fragment::NonFirst {
        l4.extend_from_slice(&s.payload);
        return l4;
    }
    match s.proto {
        6 => {
            l4.extend_from_slice(&s.sp.to_be_bytes());
            l4.extend_from_slice(&s.dp.to_be_bytes());
            l4.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            l4.extend_from_slice(&0x9abc_def0u32.to_be_bytes());
            l4.push(((5 + s.tcp_opts) as u8) << 4);
            l4.push(0x18);
            l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            for _ in 0..s.tcp_opts {
                l4.extend_from_slice(&[1, 1, 1, 1]);
            }
        }
        17 => {
            l4.extend_from_slice(&s.sp.to_be_bytes());
            l4.extend_from_slice(&s.dp.to_be_bytes());
            l4.extend_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        132 => {
            l4.extend_from_slice(&s.sp.to_be_bytes());
            l4.extend_from_slice(&s.dp.to_be_bytes());
            l4.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0]);
        }
        1 | 58 => {
            if let Some((inner, quote)) = &s.inner {
                l4.push(if s.v6 { 1 } else { 3 });
                l4.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0]);
                let mut q = build(inner);
                q.truncate(*quote);
                l4.extend_from_slice(&q);
                return l4;
            }
            let ty = match (s.v6, s.echo_reply) {
                (false, false) => 8,
                (false, true) => 0,
                (true, false) => 128,
                (true, true) => 129,
            };
            l4.extend_from_slice(&[ty, 0, 0, 0]);
            l4.extend_from_slice(&s.sp.to_be_bytes());
            l4.extend_from_slice(&[0, 1]);
        }
        _ => {}
    }
    l4.extend_from_slice(&s.payload);
    l4
}

/// Builds the packet with every checksum valid (full computation).
pub(crate) fn build(s: &Spec) -> Vec<u8> {
    let l4 = l4_bytes(s);
    let mut pkt = Vec::new();
    if s.v6 {
        pkt.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 0, s.ttl]);
        pkt.extend_from_slice(&s.src);
        pkt.extend_from_slice(&s.dst);
        let mut exts: Vec<(u8, Vec<u8>)> = Vec::new();
        for i in 0..s.opts {
            // Destination options with a PadN filling 6 + 8i bytes.
            let mut h = vec![0, i as u8, 1, (4 + 8 * i) as u8];
            h.resize(8 + 8 * i, 0);
            exts.push((60, h));
        }
        if s.frag != Fragment::None {
            let off: u16 = if s.frag == Fragment::NonFirst {
                185 << 3
            } else {
                1
            };
            let mut h = vec![0, 0];
            h.extend_from_slice(&off.to_be_bytes());
            h.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
            exts.push((44, h));
        }
        let mut next = s.proto;
        for (ty, h) in exts.iter_mut().rev() {
            h[0] = next;
            next = *ty;
        }
        pkt[6] = next;
        for (_, h) in &exts {
            pkt.extend_from_slice(h);
        }
        pkt.extend_from_slice(&l4);
        let plen = (pkt.len() - 40) as u16;
        pkt[4..6].copy_from_slice(&plen.to_be_bytes());
    } else {
        let ihl = 5 + s.opts;
        pkt.push(0x40 | ihl as u8);
        pkt.push(0);
        let total = (ihl * 4 + l4.len()) as u16;
        pkt.extend_from_slice(&total.to_be_bytes());
        pkt.extend_from_slice(&[0x12, 0x34]);
        let mut f: u16 = if s.df { 0x4000 } else { 0 };
        match s.frag {
            Fragment::None => {}
            Fragment::First => f = 0x2000,
            Fragment::NonFirst => f = 185,
        }
        pkt.extend_from_slice(&f.to_be_bytes());
        pkt.push(s.ttl);
        pkt.push(s.proto);
        pkt.extend_from_slice(&[0, 0]);
        pkt.extend_from_slice(&s.src[..4]);
        pkt.extend_from_slice(&s.dst[..4]);
        for _ in 0..s.opts {
            pkt.extend_from_slice(&[1, 1, 1, 1]);
        }
        pkt.extend_from_slice(&l4);
    }
    if let Ok(p) = parse(&pkt, Link::Ip) {
        crate::checksum::recompute(&mut pkt, &p).unwrap();
    }
    pkt
}

fn addr_pair(v6: bool) -> impl Strategy<Value = ([u8; 16], [u8; 16])> {
    (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(move |(mut a, mut b)| {
        if !v6 {
            a[4..].fill(0);
            b[4..].fill(0);
        }
        (a, b)
    })
}

fn frag() -> impl Strategy<Value = Fragment> {
    prop_oneof![
        6 => Just(Fragment::None),
        1 => Just(Fragment::First),
        1 => Just(Fragment::NonFirst),
    ]
}

/// Random valid packets without ICMP errors.
pub(crate) fn arb_plain(v6: bool) -> impl Strategy<Value = Spec> {
    (
        addr_pair(v6),
        prop::sample::select(vec![6u8, 17, 132, 1, 58, 47]),
        any::<(u16, u16)>(),
        proptest::collection::vec(any::<u8>(), 0..64),
        0usize..3,
        frag(),
        (1u8..=255, any::<bool>(), any::<bool>(), 0usize..4),
    )
        .prop_map(
            move |((src, dst), proto, (sp, dp), payload, opts, frag, (ttl, df, er, to))| {
                let proto = match (proto, v6) {
                    (1, true) => 58,
                    (58, false) => 1,
                    (p, _) => p,
                };
                // ICMP fragments are rare and uninteresting: keep them whole.
                let frag = if proto == 1 || proto == 58 {
                    Fragment::None
                } else {
                    frag
                };
                Spec {
                    v6,
                    proto,
                    src,
                    dst,
                    sp,
                    dp,
                    payload,
                    opts,
                    frag,
                    ttl,
                    df,
                    inner: None,
                    echo_reply: er,
                    tcp_opts: to,
                }
            },
        )
}

/// Random valid packets of every kind, ICMP errors included.
pub(crate) fn arb_spec() -> impl Strategy<Value = Spec> {
    any::<bool>().prop_flat_map(|v6| {
        prop_oneof![
            3 => arb_plain(v6),
            1 => (arb_plain(v6), arb_plain(v6), 28usize..120).prop_map(move |(outer, mut inner, q)| {
                inner.frag = Fragment::None;
                let mut o = outer;
                o.proto = if v6 { 58 } else { 1 };
                o.frag = Fragment::None;
                // An error goes back to the quoted packet's source (RFC 792 / RFC 4443), from
                // either its destination or a router on the way.
                o.dst = inner.src;
                if o.echo_reply {
                    o.src = inner.dst;
                }
                let min = if v6 { 48 + 8 * inner.opts * (inner.opts + 1) / 2 + 8 * inner.opts } else { 28 + 4 * inner.opts };
                o.inner = Some((Box::new(inner), q.max(min)));
                o
            }),
        ]
    })
}
