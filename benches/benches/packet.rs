//! lb-packet (issue 5): parse, NAT rewrite, IPIP / GUE encapsulation, splice, SIP Call-ID,
//! checksums and GSO segmentation; parse and checksums side by side with `etherparse` on the
//! same bytes.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, Throughput};
use lb_core::{FlowKey, IpProto};
use lb_packet::gro::{coalesce_udp, Outgoing};
use lb_packet::offload::{GsoType, Segmenter, VnetHdr};
use lb_packet::tunnel::{self, TunnelParams};
use lb_packet::{checksum, nat, parse, sip, splice, Link, PacketBuf};

/// A 64-byte IPv4/TCP packet (20 + 20 + 24 bytes payload) with valid checksums.
fn ipv4_tcp_64() -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 64, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 203, 0, 113,
        10, // IPv4
        0x9c, 0x40, 0, 80, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x50, 0x18, 0xff, 0xff,
        0, 0, 0, 0, // TCP
    ];
    p.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n");
    p.truncate(64);
    let parsed = parse(&p, Link::Ip).expect("valid");
    checksum::recompute(&mut p, &parsed).expect("valid");
    p
}

/// An IPv6/TCP packet with 24 bytes of payload (84 bytes).
fn ipv6_tcp() -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 44, 6, 64];
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    p.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x50, 0x18, 0xff, 0xff,
        0, 0, 0, 0,
    ]);
    p.extend_from_slice(b"GET / HTTP/1.1\r\nHost: xx");
    p.truncate(84);
    let parsed = parse(&p, Link::Ip).expect("valid");
    checksum::recompute(&mut p, &parsed).expect("valid");
    p
}

/// The flow key of an IP packet via etherparse (what a balancer would have to do with it).
fn etherparse_key(pkt: &[u8]) -> Option<FlowKey> {
    let s = etherparse::SlicedPacket::from_ip(pkt).ok()?;
    let (sp, dp, proto) = match s.transport? {
        etherparse::TransportSlice::Tcp(t) => (t.source_port(), t.destination_port(), IpProto::Tcp),
        etherparse::TransportSlice::Udp(u) => (u.source_port(), u.destination_port(), IpProto::Udp),
        _ => return None,
    };
    match s.net? {
        etherparse::NetSlice::Ipv4(v) => Some(FlowKey::v4(
            v.header().source_addr(),
            sp,
            v.header().destination_addr(),
            dp,
            proto,
        )),
        etherparse::NetSlice::Ipv6(v) => Some(FlowKey::v6(
            v.header().source_addr(),
            sp,
            v.header().destination_addr(),
            dp,
            proto,
        )),
    }
}

pub fn register(c: &mut Criterion) {
    let v4 = ipv4_tcp_64();
    let v6 = ipv6_tcp();

    let mut g = c.benchmark_group("packet/parse");
    g.throughput(Throughput::Elements(1));
    for (name, pkt) in [("ipv4_tcp_64B", &v4), ("ipv6_tcp_84B", &v6)] {
        g.bench_function(format!("lb_packet/{name}"), |b| {
            b.iter(|| parse(black_box(pkt), Link::Ip).ok().map(|p| p.key))
        });
        // The same work: validate and produce the flow key.
        g.bench_function(format!("etherparse/{name}"), |b| {
            b.iter(|| etherparse_key(black_box(pkt)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("packet/nat");
    g.throughput(Throughput::Elements(1));
    for (name, pkt, a, b2) in [
        (
            "full_nat_ipv4_tcp",
            &v4,
            ("10.0.0.1:50000", "10.0.0.7:8080"),
            ("192.0.2.1:40000", "203.0.113.10:80"),
        ),
        (
            "full_nat_ipv6_tcp",
            &v6,
            ("[2001:db8:1::1]:50000", "[2001:db8:2::7]:8080"),
            ("[2001:db8::1]:40000", "[2001:db8::100]:80"),
        ),
    ] {
        let mut buf = pkt.clone();
        let p = parse(&buf, Link::Ip).expect("valid");
        let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let (s1, d1, s0, d0) = (sa(a.0), sa(a.1), sa(b2.0), sa(b2.1));
        let mut flip = false;
        g.bench_function(format!("lb_packet_incremental/{name}"), |b| {
            b.iter(|| {
                flip = !flip;
                let (s, d) = if flip { (s1, d1) } else { (s0, d0) };
                nat::rewrite(black_box(&mut buf), &p, Some(s), Some(d))
            })
        });
        // Baseline: the same rewrite followed by full checksum recomputation.
        g.bench_function(format!("full_recompute/{name}"), |b| {
            b.iter(|| {
                flip = !flip;
                let (s, d) = if flip { (s1, d1) } else { (s0, d0) };
                let _ = nat::rewrite(black_box(&mut buf), &p, Some(s), Some(d));
                checksum::recompute(&mut buf, &p)
            })
        });
    }
    let mut buf = v4.clone();
    let p = parse(&buf, Link::Ip).expect("valid");
    let (d1, d0): (SocketAddr, SocketAddr) = (
        "10.0.0.7:8080".parse().expect("a"),
        "203.0.113.10:80".parse().expect("a"),
    );
    let mut flip = false;
    g.bench_function("lb_packet_incremental/dnat_ipv4_tcp", |b| {
        b.iter(|| {
            flip = !flip;
            nat::set_dst(black_box(&mut buf), &p, if flip { d1 } else { d0 })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("packet/encap");
    g.throughput(Throughput::Elements(1));
    let t = TunnelParams {
        decrement_ttl: false,
        ..TunnelParams::default()
    };
    let mut storage = vec![0u8; tunnel::MAX_OVERHEAD + v4.len()];
    storage[tunnel::MAX_OVERHEAD..].copy_from_slice(&v4);
    let mut pb = PacketBuf::new(&mut storage[..], tunnel::MAX_OVERHEAD, v4.len()).expect("room");
    g.bench_function("ipip_ipv4_64B", |b| {
        b.iter(|| {
            let r = tunnel::encap_ipip(
                black_box(&mut pb),
                [10, 0, 0, 1].into(),
                [10, 0, 0, 7].into(),
                &t,
            );
            let _ = pb.advance(tunnel::IPV4_HEADER);
            r
        })
    });
    g.bench_function("gue_ipv4_64B", |b| {
        b.iter(|| {
            let r = tunnel::encap_gue(
                black_box(&mut pb),
                [10, 0, 0, 1].into(),
                [10, 0, 0, 7].into(),
                6080,
                tunnel::entropy_port(0x1234_5678),
                &t,
            );
            let _ = pb.advance(tunnel::IPV4_HEADER + tunnel::GUE_OVERHEAD);
            r
        })
    });
    g.bench_function("ipip_encap_decap_ipv4_64B", |b| {
        b.iter(|| {
            let r = tunnel::encap_ipip(
                black_box(&mut pb),
                [10, 0, 0, 1].into(),
                [10, 0, 0, 7].into(),
                &t,
            );
            let _ = tunnel::decap(&mut pb, None);
            r
        })
    });
    g.finish();

    let mut g = c.benchmark_group("packet/l5");
    g.throughput(Throughput::Elements(1));
    let mut buf = v4.clone();
    let p = parse(&buf, Link::Ip).expect("valid");
    let sh = splice::SeqShift::new(0x1000_0001, 0x2000_0002);
    let mut flip = false;
    g.bench_function("splice_ipv4_tcp", |b| {
        b.iter(|| {
            flip = !flip;
            splice::translate(
                black_box(&mut buf),
                &p,
                if flip { sh } else { sh.inverse() },
            )
        })
    });
    let invite: &[u8] = b"INVITE sip:bob@biloxi.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.com>\r\n\
From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 142\r\n\r\n";
    g.bench_function("sip_call_id_rfc3261_invite", |b| {
        b.iter(|| sip::call_id(black_box(invite)).map(<[u8]>::len))
    });
    g.finish();

    // UDP coalescing of a batch of 32 64-byte IPv4 datagrams (partial checksums, as a TUN with
    // offloads hands them over) in 64 KiB buffers: one flow (one super-packet), 16 flows
    // interleaved (pairs), 32 flows (nothing to merge: the cost on traffic it cannot help).
    // Each iteration first copies the batch back into its buffers; `reset_only` is that copy.
    let mut g = c.benchmark_group("packet/gro");
    g.throughput(Throughput::Elements(32));
    let dgram = |flow: u16| {
        let mut p = vec![
            0x45, 0, 0, 92, 0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 203, 0, 113, 10,
        ];
        p.extend_from_slice(&(40_000 + flow).to_be_bytes());
        p.extend_from_slice(&[0x14, 0xb4, 0, 72, 0, 0]);
        p.extend_from_slice(&[0xab; 64]);
        let parsed = parse(&p, Link::Ip).expect("valid");
        checksum::recompute(&mut p, &parsed).expect("valid");
        p
    };
    let hdr = VnetHdr {
        needs_csum: true,
        csum_start: 20,
        csum_offset: 6,
        ..VnetHdr::NONE
    };
    let reset = |pkts: &[Vec<u8>], bufs: &mut [Vec<u8>], out: &mut [Option<Outgoing>]| {
        for (i, p) in pkts.iter().enumerate() {
            bufs[i][64..64 + p.len()].copy_from_slice(p);
            out[i] = Some(Outgoing {
                start: 64,
                len: p.len(),
                hdr,
            });
        }
    };
    for (name, flows) in [("one_flow", 1u16), ("16_flows", 16), ("32_flows", 32)] {
        let pkts: Vec<Vec<u8>> = (0..32).map(|i| dgram(i % flows)).collect();
        let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 64 + 65_600]).collect();
        let mut out = [None; 32];
        g.bench_function(name, |b| {
            b.iter(|| {
                reset(&pkts, &mut bufs, &mut out);
                coalesce_udp(black_box(&mut bufs), &mut out, Link::Ip)
            })
        });
        if flows == 1 {
            g.bench_function("reset_only", |b| {
                b.iter(|| {
                    reset(&pkts, &mut bufs, &mut out);
                    black_box(&mut out);
                })
            });
        }
    }
    g.finish();

    // The Internet checksum of a header, an MTU-sized segment and a GSO super-packet's worth,
    // side by side with etherparse's (which sums 8 bytes at a time with carries). One byte in,
    // so that the words are not 8-byte aligned.
    let mut g = c.benchmark_group("packet/checksum");
    let data: Vec<u8> = (0..65_001usize).map(|i| (i * 7_919 % 251) as u8).collect();
    for len in [20usize, 1448, 65_000] {
        let d = &data[1..=len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("lb_packet/{len}B"), |b| {
            b.iter(|| checksum::checksum(black_box(d)))
        });
        g.bench_function(format!("etherparse/{len}B"), |b| {
            b.iter(|| {
                etherparse::checksum::Sum16BitWords::new()
                    .add_slice(black_box(d))
                    .ones_complement()
            })
        });
    }
    // SCTP's CRC32c: ours (the `crc` crate's slicing-by-16 tables) against the same crate
    // with one 256-entry table, a byte per step (what lb-packet computed before 2026-12-06).
    const CRC_BYTEWISE: crc::Crc<u32, crc::Table<1>> =
        crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_ISCSI);
    let d = &data[1..=1448];
    g.throughput(Throughput::Bytes(1448));
    g.bench_function("crc32c/1448B", |b| {
        b.iter(|| checksum::crc32c(black_box(d)))
    });
    g.bench_function("crc32c_bytewise/1448B", |b| {
        b.iter(|| CRC_BYTEWISE.checksum(black_box(d)))
    });
    g.finish();

    // A 64 000-byte IPv4 TCP super-packet (partial checksum, as a TUN with offloads hands it
    // over) cut into 45 segments of 1 448 bytes, each with its full TCP checksum: what tunnel
    // mode does to every super-packet before encapsulating it.
    let mut g = c.benchmark_group("packet/offload");
    let mut sp = vec![
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 203, 0, 113, 10,
    ];
    sp.extend_from_slice(&[0x9c, 0x40, 0, 80, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1]);
    sp.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    sp.extend((0..64_000usize).map(|i| (i * 31 % 253) as u8));
    let total = u16::try_from(sp.len()).expect("fits");
    sp[2..4].copy_from_slice(&total.to_be_bytes());
    let parsed = parse(&sp, Link::Ip).expect("valid");
    checksum::recompute(&mut sp, &parsed).expect("valid");
    let ps = checksum::pseudo_v4([192, 0, 2, 1], [203, 0, 113, 10], 6, total - 20);
    sp[36..38].copy_from_slice(&checksum::fold(ps).to_be_bytes());
    let h = VnetHdr {
        needs_csum: true,
        gso: GsoType::TcpV4,
        hdr_len: 40,
        gso_size: 1448,
        csum_start: 20,
        csum_offset: 16,
        ..VnetHdr::NONE
    };
    let mut seg = vec![0u8; 1600];
    let cut = |seg: &mut [u8]| {
        let mut s = Segmenter::new(&sp, &parsed, &h).expect("valid");
        let mut n = 0;
        while let Ok(Some(len)) = s.next_into(&sp, seg) {
            n += len;
        }
        n
    };
    assert_eq!(
        cut(&mut seg),
        64_000 + 45 * 40,
        "45 segments of 40 header bytes"
    );
    g.throughput(Throughput::Bytes(64_000));
    g.bench_function("segment_tcp4_64000B_mss1448", |b| {
        b.iter(|| black_box(cut(&mut seg)))
    });
    g.finish();
}
