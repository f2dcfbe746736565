use super::*;
use crate::checksum::{pseudo_sum, recompute};
use crate::nat::{rewrite, rewrite_partial};
use crate::parse::{parse, Link};
use crate::testutil::{arb_plain, build, Spec};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Turns a packet with a full L4 checksum into what a sender with checksum offload hands over:
/// the field holds the pseudo-header's sum, folded, not complemented.
fn make_partial(pkt: &mut [u8]) -> VnetHdr {
    let p = parse(pkt, Link::Ip).unwrap();
    let (off, proto) = match p.proto {
        IpProto::Tcp => (16, 6),
        IpProto::Udp => (6, 17),
        other => panic!("not TCP/UDP: {other:?}"),
    };
    let ps = pseudo_sum(pkt, &p, proto, p.end - p.l4);
    put16(pkt, p.l4 + off, fold(ps)).unwrap();
    VnetHdr {
        needs_csum: true,
        csum_start: p.l4 as u16,
        csum_offset: off as u16,
        ..VnetHdr::NONE
    }
}

fn gso_spec(v6: bool, proto: u8, payload: usize) -> Spec {
    let mut s = Spec::simple(v6, proto);
    s.payload = (0..payload).map(|i| (i * 7 + i / 251) as u8).collect();
    s
}

/// Every segment parses, has valid checksums (a full recompute changes nothing), and the
/// payloads concatenate to the super-packet's.
fn check_segments(pkt: &[u8], h: &VnetHdr) -> Vec<Vec<u8>> {
    let p = parse(pkt, Link::Ip).unwrap();
    let mut seg = Segmenter::new(pkt, &p, h).unwrap();
    let expect = seg.remaining();
    let mut out = vec![0u8; 70_000];
    let mut all = Vec::new();
    let mut payload = Vec::new();
    while let Some(n) = seg.next_into(pkt, &mut out).unwrap() {
        let s = out[..n].to_vec();
        let q = parse(&s, Link::Ip).unwrap();
        let mut full = s.clone();
        recompute(&mut full, &q).unwrap();
        assert_eq!(full, s, "segment {} has a bad checksum", all.len());
        if h.is_gso() {
            assert!(q.end - q.payload <= usize::from(h.gso_size));
        }
        payload.extend_from_slice(q.payload(&s));
        all.push(s);
    }
    assert_eq!(all.len() as u32, expect);
    assert_eq!(all.len() as u32, segments(&p, h));
    assert_eq!(payload, p.payload(pkt));
    all
}

#[test]
fn header_round_trips_and_refuses_unknown_gso_types() {
    let h = VnetHdr {
        needs_csum: true,
        data_valid: false,
        gso: GsoType::TcpV6,
        ecn: true,
        hdr_len: 74,
        gso_size: 1428,
        csum_start: 40,
        csum_offset: 16,
    };
    let mut b = [0u8; VNET_HDR_LEN];
    h.encode(&mut b).unwrap();
    assert_eq!(b, [1, 0x84, 74, 0, 0x94, 5, 40, 0, 16, 0]);
    assert_eq!(VnetHdr::decode(&b).unwrap(), h);
    b[1] = 3; // UFO
    assert_eq!(
        VnetHdr::decode(&b),
        Err(PacketError::BadOffload("unknown GSO type"))
    );
    assert!(matches!(
        VnetHdr::decode(&b[..9]),
        Err(PacketError::Truncated { .. })
    ));
    assert!(h.encode(&mut [0u8; 9]).is_err());
}

#[test]
fn tcp_v4_super_packet_is_cut_like_the_kernel_cuts_it() {
    let mut pkt = build(&gso_spec(false, 6, 5000));
    pkt[33] |= 0x01 | 0x80; // FIN and CWR on the super-packet (PSH is set by the builder)
    let p = parse(&pkt, Link::Ip).unwrap();
    recompute(&mut pkt, &p).unwrap();
    let ip_id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let mut h = make_partial(&mut pkt);
    h.gso = GsoType::TcpV4;
    h.gso_size = 1448;
    let segs = check_segments(&pkt, &h);
    assert_eq!(segs.len(), 4); // 1448 * 3 + 656
    for (i, s) in segs.iter().enumerate() {
        let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
        assert_eq!(seq, 0x1234_5678u32.wrapping_add(1448 * i as u32));
        let flags = s[33];
        let last = i == segs.len() - 1;
        assert_eq!(flags & 0x09 != 0, last, "FIN/PSH on segment {i}");
        assert_eq!(flags & 0x80 != 0, i == 0, "CWR on segment {i}");
        assert_eq!(
            u16::from_be_bytes([s[4], s[5]]),
            ip_id.wrapping_add(i as u16)
        );
    }
}

#[test]
fn tcp_v6_and_udp_super_packets_segment_with_valid_checksums() {
    for (v6, proto, gso) in [
        (true, 6, GsoType::TcpV6),
        (false, 17, GsoType::UdpL4),
        (true, 17, GsoType::UdpL4),
    ] {
        let mut pkt = build(&gso_spec(v6, proto, 4000));
        let mut h = make_partial(&mut pkt);
        h.gso = gso;
        h.gso_size = 1000;
        let segs = check_segments(&pkt, &h);
        assert_eq!(segs.len(), 4, "{gso:?}");
    }
}

#[test]
fn an_ordinary_packet_comes_out_once_with_its_checksum_completed() {
    let mut pkt = build(&gso_spec(false, 6, 300));
    let want = pkt.clone();
    let h = make_partial(&mut pkt);
    assert_ne!(pkt, want);
    let segs = check_segments(&pkt, &h);
    assert_eq!(segs, vec![want.clone()]);
    // And with no offload at all: unchanged.
    let segs = check_segments(&want, &VnetHdr::NONE);
    assert_eq!(segs, vec![want]);
}

#[test]
fn classify_refuses_headers_that_do_not_describe_the_packet() {
    let mut pkt = build(&gso_spec(false, 6, 3000));
    let h = make_partial(&mut pkt);
    let p = parse(&pkt, Link::Ip).unwrap();
    assert_eq!(classify(&p, &h), Ok(L4Csum::Partial));
    assert_eq!(classify(&p, &VnetHdr::NONE), Ok(L4Csum::Full));
    let gso = VnetHdr {
        gso: GsoType::TcpV4,
        gso_size: 1448,
        ..h
    };
    assert_eq!(classify(&p, &gso), Ok(L4Csum::Partial));
    for bad in [
        VnetHdr {
            gso: GsoType::TcpV6,
            ..gso
        },
        VnetHdr {
            gso: GsoType::UdpL4,
            ..gso
        },
        VnetHdr { gso_size: 0, ..gso },
        VnetHdr {
            needs_csum: false,
            ..gso
        },
        VnetHdr {
            csum_start: 10,
            ..gso
        },
        VnetHdr {
            csum_start: 60_000,
            ..h
        },
    ] {
        assert!(
            matches!(classify(&p, &bad), Err(PacketError::BadOffload(_))),
            "{bad:?}"
        );
    }
    // A partial checksum at an odd place on an ordinary packet: completed, not refused.
    let odd = VnetHdr {
        csum_start: 20,
        csum_offset: 2,
        ..h
    };
    assert_eq!(classify(&p, &odd), Ok(L4Csum::Elsewhere));
    assert!(Segmenter::new(&pkt, &p, &odd).is_ok());
}

#[test]
fn a_too_small_output_buffer_consumes_nothing() {
    let mut pkt = build(&gso_spec(true, 17, 3000));
    let mut h = make_partial(&mut pkt);
    h.gso = GsoType::UdpL4;
    h.gso_size = 1200;
    let p = parse(&pkt, Link::Ip).unwrap();
    let mut seg = Segmenter::new(&pkt, &p, &h).unwrap();
    let mut small = [0u8; 100];
    assert!(matches!(
        seg.next_into(&pkt, &mut small),
        Err(PacketError::NoRoom { .. })
    ));
    assert_eq!(seg.remaining(), 3);
    let mut big = vec![0u8; 2000];
    assert!(seg.next_into(&pkt, &mut big).unwrap().is_some());
    assert_eq!(seg.remaining(), 2);
}

fn addr(v6: bool, b: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 7, u16::from(b)))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 9, 8, b))
    }
}

proptest! {
    /// A NAT rewrite of a partial checksum, completed by the device afterwards, gives the same
    /// bytes as the ordinary rewrite of the packet with its full checksum.
    #[test]
    fn partial_rewrite_then_completion_equals_full_rewrite(
        spec in any::<bool>().prop_flat_map(arb_plain),
        udp in any::<bool>(),
        (a, b, sp, dp) in any::<(u8, u8, u16, u16)>(),
        which in 0u8..3,
    ) {
        let mut spec = spec;
        spec.proto = if udp { 17 } else { 6 };
        spec.frag = crate::parse::Fragment::None;
        let full = build(&spec);
        let p = parse(&full, Link::Ip).unwrap();
        let src = (which != 1).then(|| SocketAddr::new(addr(spec.v6, a), sp));
        let dst = (which != 0).then(|| SocketAddr::new(addr(spec.v6, b), dp));
        let mut want = full.clone();
        rewrite(&mut want, &p, src, dst).unwrap();
        let mut got = full.clone();
        let h = make_partial(&mut got);
        prop_assert_eq!(classify(&p, &h), Ok(L4Csum::Partial));
        rewrite_partial(&mut got, &p, src, dst).unwrap();
        complete_csum(&mut got, &h, p.end, udp).unwrap();
        // A full recompute of both is the arbiter: they must agree byte for byte.
        let mut want_full = want.clone();
        recompute(&mut want_full, &p).unwrap();
        prop_assert_eq!(&want, &want_full);
        prop_assert_eq!(got, want);
    }

    /// Segmenting any TCP or UDP super-packet at any segment size gives valid packets whose
    /// payloads concatenate to the original.
    #[test]
    fn segmentation_preserves_payload_and_checksums(
        v6 in any::<bool>(),
        udp in any::<bool>(),
        len in 0usize..6000,
        mss in 1u16..2000,
    ) {
        let mut pkt = build(&gso_spec(v6, if udp { 17 } else { 6 }, len));
        let mut h = make_partial(&mut pkt);
        h.gso = match (udp, v6) {
            (true, _) => GsoType::UdpL4,
            (false, false) => GsoType::TcpV4,
            (false, true) => GsoType::TcpV6,
        };
        h.gso_size = mss;
        let segs = check_segments(&pkt, &h);
        prop_assert_eq!(segs.len(), len.div_ceil(usize::from(mss)).max(1));
    }

    /// Arbitrary header bytes never panic the decoder, the classifier or the segmenter.
    #[test]
    fn arbitrary_headers_never_panic(hdr in any::<[u8; 10]>(), len in 0usize..3000) {
        let pkt = build(&gso_spec(false, 6, len));
        let p = parse(&pkt, Link::Ip).unwrap();
        if let Ok(h) = VnetHdr::decode(&hdr) {
            let _ = classify(&p, &h);
            let _ = segments(&p, &h);
            let _ = largest_segment(&p, &h);
            if let Ok(mut s) = Segmenter::new(&pkt, &p, &h) {
                let mut out = vec![0u8; 4000];
                let mut n = 0;
                while let Ok(Some(_)) = s.next_into(&pkt, &mut out) {
                    n += 1;
                    prop_assert!(n <= 3001);
                }
            }
            let mut c = pkt.clone();
            let _ = complete_csum(&mut c, &h, p.end, false);
        }
    }
}

/// A TCP super-packet (payload `len`) with a timestamps option and `sack` SACK blocks.
fn spliceable(v6: bool, len: usize, sack: &[(u32, u32)], ts: (u32, u32)) -> Vec<u8> {
    let mut s = gso_spec(v6, 6, len);
    s.tcp_opts = 3 + 1 + 2 * sack.len();
    let mut pkt = build(&s);
    let p = parse(&pkt, Link::Ip).unwrap();
    let mut o = p.l4 + 20;
    let mut opt = vec![1u8, 1, 8, 10];
    opt.extend_from_slice(&ts.0.to_be_bytes());
    opt.extend_from_slice(&ts.1.to_be_bytes());
    opt.extend_from_slice(&[1, 1, 5, (2 + 8 * sack.len()) as u8]);
    for (l, r) in sack {
        opt.extend_from_slice(&l.to_be_bytes());
        opt.extend_from_slice(&r.to_be_bytes());
    }
    for b in opt {
        pkt[o] = b;
        o += 1;
    }
    recompute(&mut pkt, &p).unwrap();
    pkt
}

proptest! {
    /// A spliced segment's translation (NAT, sequence / acknowledgement / SACK shift, window
    /// rescale and timestamp shift) done on a partial checksum and completed by the device
    /// equals the same translation with full-checksum updates; and a translated super-packet
    /// cuts into valid segments that all carry the translated numbers.
    #[test]
    fn partial_splice_translation_equals_full_and_survives_segmentation(
        v6 in any::<bool>(),
        len in 1usize..5000,
        mss in 200u16..1500,
        sack in proptest::collection::vec(any::<(u32, u32)>(), 0..4),
        ts in any::<(u32, u32)>(),
        shift in any::<(u32, u32)>(),
        opt in any::<(u32, u32)>(),
        rescale in proptest::option::of((0u8..15, 0u8..15)),
        (a, b, sp, dp) in any::<(u8, u8, u16, u16)>(),
    ) {
        use crate::splice::{translate, translate_partial, SeqShift};
        use crate::tcpseg::{rewrite_options, rewrite_options_partial, OptionShift};
        let full = spliceable(v6, len, &sack, ts);
        let p = parse(&full, Link::Ip).unwrap();
        let src = Some(SocketAddr::new(addr(v6, a), sp));
        let dst = Some(SocketAddr::new(addr(v6, b), dp));
        let sh = SeqShift::new(shift.0, shift.1);
        let os = OptionShift { tsval: opt.0, tsecr: opt.1, rescale };
        let mut want = full.clone();
        rewrite(&mut want, &p, src, dst).unwrap();
        translate(&mut want, &p, sh).unwrap();
        rewrite_options(&mut want, &p, os).unwrap();
        let mut got = full.clone();
        let mut h = make_partial(&mut got);
        rewrite_partial(&mut got, &p, src, dst).unwrap();
        translate_partial(&mut got, &p, sh).unwrap();
        rewrite_options_partial(&mut got, &p, os).unwrap();
        let partial = got.clone();
        complete_csum(&mut got, &h, p.end, false).unwrap();
        prop_assert_eq!(&got, &want);
        // As a super-packet: every segment valid, numbers translated in each.
        h.gso = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
        h.gso_size = mss;
        let segs = check_segments(&partial, &h);
        let rd = |s: &[u8], o: usize| u32::from_be_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
        let seq0 = rd(&want, p.l4 + 4);
        for (i, s) in segs.iter().enumerate() {
            let q = parse(s, Link::Ip).unwrap();
            prop_assert_eq!(q.key.src_port(), sp);
            prop_assert_eq!(q.key.dst_port(), dp);
            prop_assert_eq!(rd(s, q.l4 + 4), seq0.wrapping_add((i * usize::from(mss)) as u32));
            // Acknowledgement, window and every option byte as in the translated header (PSH
            // and FIN stay on the last segment only).
            prop_assert_eq!(&s[q.l4 + 8..q.l4 + 13], &want[p.l4 + 8..p.l4 + 13]);
            prop_assert_eq!(s[q.l4 + 13] | 0x09, want[p.l4 + 13] | 0x09);
            prop_assert_eq!(&s[q.l4 + 14..q.l4 + 16], &want[p.l4 + 14..p.l4 + 16]);
            prop_assert_eq!(&s[q.l4 + 20..q.payload], &want[p.l4 + 20..p.payload]);
        }
    }
}
