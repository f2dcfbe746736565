use super::*;
use crate::checksum::recompute;
use crate::parse::{parse, Link};
use crate::testutil::{arb_spec, build, Spec};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Incremental checksums equal a full recompute (for packets whose checksums can be fully
/// recomputed).
fn assert_checksums_full(pkt: &[u8]) -> Result<(), TestCaseError> {
    let p = parse(pkt, Link::Ip).unwrap();
    let mut full = pkt.to_vec();
    recompute(&mut full, &p).unwrap();
    prop_assert_eq!(full.as_slice(), pkt);
    Ok(())
}

#[test]
fn dnat_v4_tcp_known_bytes() {
    let mut pkt = build(&Spec::simple(false, 6));
    let p = parse(&pkt, Link::Ip).unwrap();
    set_dst(&mut pkt, &p, "10.1.2.3:8080".parse().unwrap()).unwrap();
    assert_eq!(&pkt[16..20], &[10, 1, 2, 3]);
    assert_eq!(&pkt[22..24], &8080u16.to_be_bytes());
    assert_checksums_full(&pkt).unwrap();
}

#[test]
fn udp_v4_zero_checksum_stays_zero() {
    let mut pkt = build(&Spec::simple(false, 17));
    pkt[26] = 0;
    pkt[27] = 0;
    let p = parse(&pkt, Link::Ip).unwrap();
    set_src(&mut pkt, &p, "10.9.9.9:1".parse().unwrap()).unwrap();
    assert_eq!(&pkt[26..28], &[0, 0]);
}

#[test]
fn family_mismatch_writes_nothing() {
    let mut pkt = build(&Spec::simple(false, 6));
    let orig = pkt.clone();
    let p = parse(&pkt, Link::Ip).unwrap();
    let r = rewrite(
        &mut pkt,
        &p,
        Some("10.0.0.1:1".parse().unwrap()),
        Some(sa(Ipv6Addr::LOCALHOST.into(), 1)),
    );
    assert_eq!(r, Err(PacketError::FamilyMismatch));
    assert_eq!(pkt, orig);
    // A Parsed from a longer buffer: error, no panic.
    assert!(set_dst(&mut pkt[..30], &p, "1.2.3.4:5".parse().unwrap()).is_err());
}

#[test]
fn icmp_error_embedded_rewrite() {
    // Backend 10.0.0.7 answers the balancer's forwarded UDP packet with port unreachable.
    let mut inner = Spec::simple(false, 17);
    inner.src[..4].copy_from_slice(&[10, 0, 0, 1]); // balancer SNAT address
    inner.sp = 50000;
    inner.dst[..4].copy_from_slice(&[10, 0, 0, 7]);
    inner.dp = 5353;
    let mut s = Spec::simple(false, 1);
    s.src = inner.dst;
    s.dst = inner.src;
    s.inner = Some((Box::new(inner), 36));
    let mut pkt = build(&s);
    let p = parse(&pkt, Link::Ip).unwrap();
    assert_eq!(p.key.to_string(), "udp 10.0.0.7:5353 -> 10.0.0.1:50000");
    // Reverse full NAT: as seen by the client, from the VIP.
    let vip = sa(Ipv4Addr::new(203, 0, 113, 10).into(), 53);
    let client = sa(Ipv4Addr::new(192, 0, 2, 1).into(), 40000);
    rewrite(&mut pkt, &p, Some(vip), Some(client)).unwrap();
    let q = parse(&pkt, Link::Ip).unwrap();
    assert_eq!(q.key.to_string(), "udp 203.0.113.10:53 -> 192.0.2.1:40000");
    assert_eq!(
        q.key.reversed().to_string(),
        "udp 192.0.2.1:40000 -> 203.0.113.10:53"
    );
    // Outer source was the backend itself: it becomes the VIP.
    assert_eq!(&pkt[12..16], &[203, 0, 113, 10]);
    assert_checksums_full(&pkt).unwrap();
    // The quoted UDP checksum (complete in this quote) is valid too.
    let mut quoted = pkt[28..].to_vec();
    let e = parse(&quoted, Link::Ip).unwrap();
    let before = quoted.clone();
    recompute(&mut quoted, &e).unwrap();
    assert_eq!(quoted, before);
}

fn endpoints(v6: bool) -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    (
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<[u8; 16]>(),
        any::<u16>(),
    )
        .prop_map(move |(a, ap, b, bp)| {
            let f = |x: [u8; 16], p| {
                if v6 {
                    sa(Ipv6Addr::from(x).into(), p)
                } else {
                    sa(Ipv4Addr::new(x[0], x[1], x[2], x[3]).into(), p)
                }
            };
            (f(a, ap), f(b, bp))
        })
}

fn spec_and_endpoints() -> impl Strategy<Value = (Spec, (SocketAddr, SocketAddr), u8)> {
    arb_spec().prop_flat_map(|s| {
        let v6 = s.v6;
        (Just(s), endpoints(v6), 0u8..3)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// rewrite then reverse = original bytes; every checksum after the rewrite equals a full
    /// recompute; the new key is what was asked for.
    #[test]
    fn rewrite_reverse_identity((s, (ns, nd), which) in spec_and_endpoints()) {
        let orig = build(&s);
        let mut pkt = orig.clone();
        let p = parse(&pkt, Link::Ip).unwrap();
        let (src, dst) = match which {
            0 => (Some(ns), None),
            1 => (None, Some(nd)),
            _ => (Some(ns), Some(nd)),
        };
        rewrite(&mut pkt, &p, src, dst).unwrap();
        let q = parse(&pkt, Link::Ip).unwrap();
        if let Some(d) = dst {
            prop_assert_eq!(q.key.dst(), d.ip());
        }
        if p.icmp.is_none() {
            if let Some(s2) = src {
                prop_assert_eq!(q.key.src(), s2.ip());
            }
            if p.proto.has_ports() && p.fragment != Fragment::NonFirst {
                prop_assert_eq!(q.key.src_port(), src.map_or(p.key.src_port(), |a| a.port()));
                prop_assert_eq!(q.key.dst_port(), dst.map_or(p.key.dst_port(), |a| a.port()));
            }
        } else {
            prop_assert!(q.icmp.is_some());
            // The quoted packet's key is the reverse of the error's.
            prop_assert_eq!(q.key.dst(), dst.map_or(p.key.dst(), |a| a.ip()));
            prop_assert_eq!(q.key.src(), src.map_or(p.key.src(), |a| a.ip()));
        }
        if p.fragment == Fragment::None {
            assert_checksums_full(&pkt)?;
        } else if !p.family.eq(&Family::V6) {
            // Only the IPv4 header checksum can be checked on a fragment.
            prop_assert_eq!(checksum::ipv4_header(&pkt[..q.l4]), Some(u16::from_be_bytes([pkt[10], pkt[11]])));
        }
        let back_src = src.map(|_| sa(p.key.src(), p.key.src_port()));
        let back_dst = dst.map(|_| sa(p.key.dst(), p.key.dst_port()));
        rewrite(&mut pkt, &q, back_src, back_dst).unwrap();
        prop_assert_eq!(pkt, orig);
    }
}

/// pnet's full TCP / UDP checksum of the packet `p` describes (0 written as 0xFFFF for UDP).
fn pnet_l4_checksum(pkt: &[u8], p: &crate::Parsed) -> Option<u16> {
    use pnet_packet::{tcp, udp};
    let seg = &pkt[p.l4..p.end];
    let (s, d) = (p.key.src(), p.key.dst());
    Some(match (p.proto, s, d) {
        (IpProto::Tcp, IpAddr::V4(s), IpAddr::V4(d)) => {
            tcp::ipv4_checksum(&tcp::TcpPacket::new(seg)?, &s, &d)
        }
        (IpProto::Tcp, IpAddr::V6(s), IpAddr::V6(d)) => {
            tcp::ipv6_checksum(&tcp::TcpPacket::new(seg)?, &s, &d)
        }
        (IpProto::Udp, IpAddr::V4(s), IpAddr::V4(d)) => {
            match udp::ipv4_checksum(&udp::UdpPacket::new(seg)?, &s, &d) {
                0 => 0xFFFF,
                c => c,
            }
        }
        (IpProto::Udp, IpAddr::V6(s), IpAddr::V6(d)) => {
            match udp::ipv6_checksum(&udp::UdpPacket::new(seg)?, &s, &d) {
                0 => 0xFFFF,
                c => c,
            }
        }
        _ => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After a full-NAT rewrite, the incrementally updated TCP / UDP checksum (and the IPv4
    /// header checksum) equal pnet's full computation.
    #[test]
    fn incremental_agrees_with_pnet((s, (ns, nd), _w) in spec_and_endpoints()) {
        let mut pkt = build(&s);
        let p = parse(&pkt, Link::Ip).unwrap();
        if p.fragment != Fragment::None || p.icmp.is_some() {
            return Ok(());
        }
        rewrite(&mut pkt, &p, Some(ns), Some(nd)).unwrap();
        let q = parse(&pkt, Link::Ip).unwrap();
        if let Some(want) = pnet_l4_checksum(&pkt, &q) {
            let off = if q.proto == IpProto::Tcp { 16 } else { 6 };
            prop_assert_eq!(get16(&pkt, q.l4 + off), Some(want));
        }
        if q.family == Family::V4 {
            let ip = pnet_packet::ipv4::Ipv4Packet::new(&pkt).unwrap();
            prop_assert_eq!(pnet_packet::ipv4::checksum(&ip), u16::from_be_bytes([pkt[10], pkt[11]]));
        }
    }
}

#[test]
fn all_zero_echo_reply_keeps_full_checksum() {
    // Echo reply, id 0, seq 0, no data: its full checksum is 0xFFFF.
    let mut s = Spec::simple(false, 1);
    s.echo_reply = true;
    s.sp = 0;
    s.payload.clear();
    let mut pkt = build(&s);
    pkt[26] = 0;
    pkt[27] = 0; // seq 0
    let p = parse(&pkt, Link::Ip).unwrap();
    recompute(&mut pkt, &p).unwrap();
    assert_eq!(&pkt[22..24], &[0xFF, 0xFF]);
    let orig = pkt.clone();
    let d: SocketAddr = "10.0.0.9:77".parse().unwrap();
    rewrite(&mut pkt, &p, None, Some(d)).unwrap();
    assert_checksums_full(&pkt).unwrap();
    let q = parse(&pkt, Link::Ip).unwrap();
    rewrite(&mut pkt, &q, None, Some(sa(p.key.dst(), 0))).unwrap();
    assert_eq!(pkt, orig);
}

#[test]
fn foreign_icmp_flavour_is_opaque() {
    // ICMPv6 inside IPv4 (and ICMPv4 inside IPv6) is an opaque protocol: only addresses change.
    for (v6, proto) in [(false, 58u8), (true, 1u8)] {
        let mut s = Spec::simple(v6, 47);
        s.payload = vec![0xAB; 12];
        let mut pkt = build(&s);
        let l3len = if v6 { 40 } else { 20 };
        if v6 {
            pkt[6] = proto;
        } else {
            pkt[9] = proto;
        }
        let p = parse(&pkt, Link::Ip).unwrap();
        recompute(&mut pkt, &p).unwrap();
        let d = if v6 { "[2001:db8::9]:1" } else { "10.0.0.9:1" };
        rewrite(&mut pkt, &p, None, Some(d.parse().unwrap())).unwrap();
        assert_eq!(&pkt[l3len..], &[0xAB; 12]);
    }
}

#[test]
fn sctp_port_ffff_to_zero_recomputes_crc() {
    let mut s = Spec::simple(false, 132);
    s.sp = 0xFFFF;
    let mut pkt = build(&s);
    let p = parse(&pkt, Link::Ip).unwrap();
    set_src(&mut pkt, &p, "192.0.2.1:0".parse().unwrap()).unwrap();
    assert_checksums_full(&pkt).unwrap();
}

/// The SCTP checksum field of a built packet (little-endian) and the packet's actual CRC32c.
fn sctp_field_and_crc(pkt: &[u8]) -> (u32, u32) {
    let p = parse(pkt, Link::Ip).unwrap();
    let f = &pkt[p.l4 + 8..p.l4 + 12];
    (
        u32::from_le_bytes([f[0], f[1], f[2], f[3]]),
        checksum::sctp(&pkt[p.l4..p.end]).unwrap(),
    )
}

proptest! {
    /// A port rewrite moves an SCTP packet's checksum with its content: a correct one stays
    /// correct, a wrong one stays wrong by exactly the same error (a corrupted packet is not
    /// given a valid checksum), and a zero checksum stays zero (RFC 9653) unless it was the
    /// packet's true CRC.
    #[test]
    fn sctp_rewrite_keeps_the_checksum_error(
        v6 in any::<bool>(),
        (sp, dp, nsp, ndp) in (any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>()),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        error in prop_oneof![Just(0u32), any::<u32>()],
        zero in any::<bool>(),
    ) {
        let mut s = Spec::simple(v6, 132);
        (s.sp, s.dp, s.payload) = (sp, dp, payload);
        let mut pkt = build(&s);
        let p = parse(&pkt, Link::Ip).unwrap();
        recompute(&mut pkt, &p).unwrap();
        let (good, _) = sctp_field_and_crc(&pkt);
        let field = if zero { 0 } else { good ^ error };
        pkt[p.l4 + 8..p.l4 + 12].copy_from_slice(&field.to_le_bytes());
        let (src, dst) = if v6 {
            ("[2001:db8::7]:0", "[2001:db8::9]:0")
        } else {
            ("198.51.100.7:0", "10.0.0.9:0")
        };
        let mut src: SocketAddr = src.parse().unwrap();
        let mut dst: SocketAddr = dst.parse().unwrap();
        src.set_port(nsp);
        dst.set_port(ndp);
        rewrite(&mut pkt, &p, Some(src), Some(dst)).unwrap();
        let (after, crc) = sctp_field_and_crc(&pkt);
        if zero && good != 0 {
            prop_assert_eq!(after, 0);
        } else {
            prop_assert_eq!(after ^ crc, field ^ good, "the error moved");
        }
    }
}

/// A rewritten copy of a packet and what the rewrite returned.
type Outcome = (Vec<u8>, Result<(), PacketError>);

/// `rewrite_csum` (fast path first) against `rewrite_n` (the general path alone).
fn both_paths(
    pkt: &[u8],
    p: &Parsed,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    partial: bool,
) -> (Outcome, Outcome) {
    let mut fast = pkt.to_vec();
    let rf = rewrite_csum(&mut fast, p, src, dst, partial);
    let mut general = pkt.to_vec();
    let sport = src.map(|a| a.port());
    let dport = dst.map(|a| a.port());
    let rg = p.check(general.len()).and_then(|()| match p.family {
        Family::V4 => {
            let s = src.map(|a| v4(a.ip())).transpose()?;
            let d = dst.map(|a| v4(a.ip())).transpose()?;
            rewrite_n(&mut general, p, (s, sport), (d, dport), partial)
        }
        Family::V6 => {
            let s = src.map(|a| v6(a.ip())).transpose()?;
            let d = dst.map(|a| v6(a.ip())).transpose()?;
            rewrite_n(&mut general, p, (s, sport), (d, dport), partial)
        }
    });
    ((fast, rf), (general, rg))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// The TCP / UDP fast path writes what the general path writes, byte for byte, and returns
    /// what it returns: for every packet shape, full and partial checksums, a checksum field
    /// forced to 0 / 0xFFFF (UDP's "none", negative zero), endpoints equal to the packet's own
    /// (nothing changes), offsets of a `Parsed` moved about, and buffers cut short.
    #[test]
    fn fast_path_equals_general_path(
        (s, (ns, nd), which) in spec_and_endpoints(),
        partial in any::<bool>(),
        csum in prop_oneof![Just(None), Just(Some(0u16)), Just(Some(0xFFFF)), any::<u16>().prop_map(Some)],
        same in any::<bool>(),
        shift in prop_oneof![Just((0usize, 0usize, 0usize)), (0usize..24, 0usize..24, 0usize..80)],
    ) {
        let mut pkt = build(&s);
        let mut p = parse(&pkt, Link::Ip).unwrap();
        if let Some(c) = csum {
            let off = match p.proto {
                IpProto::Tcp => Some(16),
                IpProto::Udp => Some(6),
                _ => None,
            };
            if let Some(f) = off.and_then(|o| pkt.get_mut(p.l4 + o..p.l4 + o + 2)) {
                f.copy_from_slice(&c.to_be_bytes());
            }
        }
        let (mut src, mut dst) = match which {
            0 => (Some(ns), None),
            1 => (None, Some(nd)),
            _ => (Some(ns), Some(nd)),
        };
        if same {
            // The packet's own endpoints: a rewrite that changes nothing (or only one side).
            src = src.map(|_| sa(p.key.src(), p.key.src_port()));
            dst = dst.map(|a| if which == 2 { sa(p.key.dst(), p.key.dst_port()) } else { a });
        }
        // A `Parsed` whose public offsets were moved (the rewrites may not trust them), and a
        // buffer cut to `cut` bytes short of the packet.
        let (dl3, dl4, cut) = shift;
        p.l3 = p.l3.saturating_sub(dl3 % 3);
        p.l4 = p.l4.saturating_sub(dl4);
        let len = pkt.len().saturating_sub(cut);
        let ((fast, rf), (general, rg)) = both_paths(&pkt[..len], &p, src, dst, partial);
        prop_assert_eq!(rf, rg);
        prop_assert_eq!(fast, general);
    }
}
