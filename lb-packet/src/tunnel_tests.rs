use super::*;
use crate::testutil::{arb_plain, build, Spec};
use proptest::prelude::*;

fn no_ttl() -> TunnelParams {
    TunnelParams {
        ttl: 17,
        path_mtu: 9000,
        decrement_ttl: false,
    }
}

fn in_buf(pkt: &[u8]) -> PacketBuf<Vec<u8>> {
    let mut v = vec![0u8; MAX_OVERHEAD + pkt.len()];
    v[MAX_OVERHEAD..].copy_from_slice(pkt);
    PacketBuf::new(v, MAX_OVERHEAD, pkt.len()).unwrap()
}

/// The outer packet parses, has valid checksums, and carries the inner packet unchanged.
fn check_outer(pb: &PacketBuf<Vec<u8>>, inner: &[u8]) -> Result<(), TestCaseError> {
    let p = parse(pb.data(), Link::Ip).unwrap();
    prop_assert_eq!(p.end, pb.len());
    let mut again = pb.data().to_vec();
    checksum::recompute(&mut again, &p).unwrap();
    if p.proto == IpProto::Udp && p.family == Family::V4 {
        // RFC 768 zero checksum on the IPv4 outer header.
        prop_assert_eq!(get16(pb.data(), p.l4 + 6), Some(0));
        again[p.l4 + 6] = 0;
        again[p.l4 + 7] = 0;
    }
    prop_assert_eq!(again.as_slice(), pb.data());
    prop_assert!(pb.data().ends_with(inner));
    Ok(())
}

#[test]
fn ipip_known_header() {
    let inner = build(&Spec::simple(false, 6));
    let mut pb = in_buf(&inner);
    let r = encap_ipip(
        &mut pb,
        [10, 0, 0, 1].into(),
        [10, 0, 0, 7].into(),
        &TunnelParams::default(),
    )
    .unwrap();
    assert_eq!(r, Encap::Done);
    let d = pb.data();
    assert_eq!(
        &d[..12],
        &[
            0x45,
            0,
            0,
            (20 + inner.len()) as u8,
            0,
            0,
            0x40,
            0,
            64,
            4,
            d[10],
            d[11]
        ]
    );
    // Inner TTL decremented with a valid checksum.
    assert_eq!(d[20 + 8], 63);
    assert_eq!(
        checksum::ipv4_header(&d[20..40]),
        Some(u16::from_be_bytes([d[30], d[31]]))
    );
    let dec = decap(&mut pb, None).unwrap();
    assert_eq!(dec.outer_src, IpAddr::from([10, 0, 0, 1]));
    assert_eq!(dec.inner, Family::V4);
    assert_eq!(pb.len(), inner.len());
}

#[test]
fn ttl_expired_and_too_big() {
    let mut s = Spec::simple(false, 17);
    s.ttl = 1;
    let mut pb = in_buf(&build(&s));
    assert_eq!(
        encap_ipip(
            &mut pb,
            [1, 1, 1, 1].into(),
            [2, 2, 2, 2].into(),
            &TunnelParams::default()
        ),
        Err(PacketError::TtlExpired)
    );
    s.ttl = 64;
    s.payload = vec![0; 1480 - 28 + 1];
    let pkt = build(&s);
    let mut pb = in_buf(&pkt);
    let r = encap_ipip(
        &mut pb,
        [1, 1, 1, 1].into(),
        [2, 2, 2, 2].into(),
        &TunnelParams::default(),
    );
    assert_eq!(r, Ok(Encap::TooBig { mtu: 1480 }));
    assert_eq!(pb.data(), &pkt[..], "nothing written");
    // Without DF the packet is encapsulated; the outer header leaves DF clear.
    s.df = false;
    let mut pb = in_buf(&build(&s));
    let r = encap_ipip(
        &mut pb,
        [1, 1, 1, 1].into(),
        [2, 2, 2, 2].into(),
        &TunnelParams::default(),
    );
    assert_eq!(r, Ok(Encap::Done));
    assert_eq!(pb.data()[6] & 0x40, 0);
    // IPv6 GUE: overhead 52.
    let mut s6 = Spec::simple(true, 6);
    s6.payload = vec![0; 1500 - 60];
    let mut pb = in_buf(&build(&s6));
    let r = encap_gue(
        &mut pb,
        "2001:db8::1".parse().unwrap(),
        "2001:db8::7".parse().unwrap(),
        6080,
        50000,
        &TunnelParams::default(),
    );
    assert_eq!(r, Ok(Encap::TooBig { mtu: 1448 }));
}

#[test]
fn wrong_family_and_no_headroom() {
    let inner = build(&Spec::simple(true, 6));
    let mut pb = in_buf(&inner);
    assert!(matches!(
        encap_ipip(&mut pb, [1, 1, 1, 1].into(), [2, 2, 2, 2].into(), &no_ttl()),
        Err(PacketError::BadVersion { .. })
    ));
    let mut pb = PacketBuf::new(inner.clone(), 0, inner.len()).unwrap();
    assert!(matches!(
        encap_ip6ip6(
            &mut pb,
            "::1".parse().unwrap(),
            "::2".parse().unwrap(),
            0,
            &no_ttl()
        ),
        Err(PacketError::NoRoom { need: 40, have: 0 })
    ));
    let mut pb = in_buf(&inner);
    assert!(matches!(
        decap(&mut pb, Some(6080)),
        Err(PacketError::NotApplicable(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Encapsulate then decapsulate = original, for every tunnel kind; the outer packet is valid.
    #[test]
    fn encap_decap_roundtrip(s in any::<bool>().prop_flat_map(arb_plain), kind in 0u8..4, sp: u16, label: u32) {
        let inner = build(&s);
        let mut pb = in_buf(&inner);
        let t = no_ttl();
        let (a4, b4): (Ipv4Addr, Ipv4Addr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let (a6, b6): (Ipv6Addr, Ipv6Addr) = ("2001:db8::a".parse().unwrap(), "2001:db8::b".parse().unwrap());
        let gue = Some(6080);
        let r = match (kind, s.v6) {
            (0, false) => encap_ipip(&mut pb, a4, b4, &t),
            (0, true) | (1, true) => encap_ip6ip6(&mut pb, a6, b6, label, &t),
            (1, false) => encap_4in6(&mut pb, a6, b6, label, &t),
            (2, _) => encap_gue(&mut pb, a4.into(), b4.into(), 6080, sp, &t),
            _ => encap_gue(&mut pb, a6.into(), b6.into(), 6080, sp, &t),
        };
        prop_assert_eq!(r, Ok(Encap::Done));
        check_outer(&pb, &inner)?;
        let d = decap(&mut pb, if kind >= 2 { gue } else { None }).unwrap();
        prop_assert_eq!(d.inner == Family::V6, s.v6);
        prop_assert_eq!(pb.data(), &inner[..]);
    }

    /// With TTL handling, the inner packet differs only by TTL - 1 and stays valid.
    #[test]
    fn ttl_decrement_keeps_checksums(s in any::<bool>().prop_flat_map(arb_plain)) {
        let inner = build(&s);
        let mut pb = in_buf(&inner);
        let t = TunnelParams { path_mtu: 9000, ..TunnelParams::default() };
        let r = encap_gue(&mut pb, [1, 2, 3, 4].into(), [5, 6, 7, 8].into(), 6080, entropy_port(42), &t);
        if s.ttl <= 1 {
            prop_assert_eq!(r, Err(PacketError::TtlExpired));
            return Ok(());
        }
        prop_assert_eq!(r, Ok(Encap::Done));
        decap(&mut pb, Some(6080)).unwrap();
        let ttl_off = if s.v6 { 7 } else { 8 };
        prop_assert_eq!(pb.data()[ttl_off], s.ttl - 1);
        let p = parse(pb.data(), Link::Ip).unwrap();
        let mut again = pb.data().to_vec();
        checksum::recompute(&mut again, &p).unwrap();
        if s.frag == Fragment::None {
            prop_assert_eq!(again.as_slice(), pb.data());
        }
    }
}

#[test]
fn entropy_port_range() {
    for h in [0u64, 1, u64::MAX, 0xdead_beef_cafe] {
        assert!(entropy_port(h) >= 49152);
    }
    assert_ne!(entropy_port(1), entropy_port(2));
}
