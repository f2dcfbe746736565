use super::*;
use crate::testutil::{arb_spec, build, Spec};
use proptest::prelude::*;

#[test]
fn ipv4_tcp_basic() {
    let pkt = build(&Spec::simple(false, 6));
    let p = parse(&pkt, Link::Ip).unwrap();
    assert_eq!(p.key.to_string(), "tcp 192.0.2.1:40000 -> 203.0.113.10:80");
    assert_eq!((p.l3, p.l4, p.payload, p.end), (0, 20, 40, 45));
    assert_eq!(p.fragment, Fragment::None);
    assert_eq!(p.payload(&pkt), b"hello");
}

#[test]
fn ethernet_vlan() {
    let ip = build(&Spec::simple(true, 17));
    let mut f = vec![
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x81, 0x00, 0, 5, 0x86, 0xDD,
    ];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]); // link padding
    let p = parse(&f, Link::Ethernet).unwrap();
    assert_eq!(p.l3, 18);
    assert_eq!(p.end, 18 + ip.len());
    assert_eq!(p.key.dst_port(), 80);
    f[17] = 0x06; // ARP-ish
    f[16] = 0x08;
    assert_eq!(
        parse(&f, Link::Ethernet),
        Err(PacketError::UnsupportedEtherType(0x0806))
    );
}

#[test]
fn errors_name_the_problem() {
    let pkt = build(&Spec::simple(false, 6));
    assert!(matches!(
        parse(&pkt[..10], Link::Ip),
        Err(PacketError::Truncated {
            layer: Layer::Ipv4,
            need: 20,
            have: 10
        })
    ));
    let mut b = pkt.clone();
    b[0] = 0x44;
    assert_eq!(
        parse(&b, Link::Ip),
        Err(PacketError::BadIhl {
            layer: Layer::Ipv4,
            ihl: 4
        })
    );
    let mut b = pkt.clone();
    b[0] = 0x75;
    assert!(matches!(
        parse(&b, Link::Ip),
        Err(PacketError::BadVersion { version: 7, .. })
    ));
    let mut b = pkt.clone();
    b[3] = 200;
    assert!(matches!(
        parse(&b, Link::Ip),
        Err(PacketError::LengthMismatch {
            layer: Layer::Ipv4,
            claimed: 200,
            ..
        })
    ));
    let mut b = pkt.clone();
    b[32] = 0x40;
    assert!(matches!(
        parse(&b, Link::Ip),
        Err(PacketError::BadDataOffset { offset: 4, .. })
    ));
    let mut b = pkt.clone();
    b[32] = 0xF0;
    assert!(matches!(
        parse(&b, Link::Ip),
        Err(PacketError::BadDataOffset { offset: 15, .. })
    ));
    assert!(parse(&[], Link::Ip).is_err());
    assert!(parse(&[], Link::Ethernet).is_err());
}

#[test]
fn too_many_extension_headers() {
    let mut s = Spec::simple(true, 17);
    s.opts = MAX_EXT_HEADERS;
    assert!(parse(&build(&s), Link::Ip).is_ok());
    s.opts = MAX_EXT_HEADERS + 1;
    assert_eq!(
        parse(&build(&s), Link::Ip),
        Err(PacketError::TooManyExtensionHeaders {
            limit: MAX_EXT_HEADERS
        })
    );
}

#[test]
fn fragments() {
    for v6 in [false, true] {
        let mut s = Spec::simple(v6, 6);
        s.frag = Fragment::First;
        let p = parse(&build(&s), Link::Ip).unwrap();
        assert_eq!((p.fragment, p.key.src_port()), (Fragment::First, 40000));
        s.frag = Fragment::NonFirst;
        let p = parse(&build(&s), Link::Ip).unwrap();
        assert_eq!(
            (p.fragment, p.key.src_port(), p.key.dst_port()),
            (Fragment::NonFirst, 0, 0)
        );
        assert_eq!(p.key.proto(), IpProto::Tcp);
    }
}

#[test]
fn icmp_error_follows_its_flow() {
    for v6 in [false, true] {
        // The client's packet to the VIP was refused; the error goes back to the client.
        let inner = Spec::simple(v6, 17);
        let inner_key = parse(&build(&inner), Link::Ip).unwrap().key;
        let mut s = Spec::simple(v6, if v6 { 58 } else { 1 });
        s.src = inner.dst;
        s.dst = inner.src;
        s.inner = Some((Box::new(inner), 48 + 8));
        let pkt = build(&s);
        let p = parse(&pkt, Link::Ip).unwrap();
        assert_eq!(p.icmp.unwrap().l3, if v6 { 48 } else { 28 });
        assert_eq!(p.icmp.unwrap().key, inner_key);
        assert_eq!(p.key, inner_key.reversed());
        assert!(p.is_icmp_error());
    }
}

#[test]
fn icmp_echo_id_is_the_port() {
    let mut s = Spec::simple(false, 1);
    s.sp = 777;
    let p = parse(&build(&s), Link::Ip).unwrap();
    assert_eq!((p.key.src_port(), p.key.dst_port()), (777, 777));
}

/// Compares with etherparse; both must accept valid packets and agree.
fn agree_with_etherparse(pkt: &[u8], must_accept: bool) -> Result<(), TestCaseError> {
    let ours = parse(pkt, Link::Ip);
    let theirs = etherparse::SlicedPacket::from_ip(pkt);
    if must_accept {
        prop_assert!(ours.is_ok(), "{:?}", ours);
    }
    let (Ok(p), Ok(t)) = (ours, theirs) else {
        return Ok(());
    };
    let Some(net) = t.net else { return Ok(()) };
    let (src, dst, ipp): (IpAddr, IpAddr, _) = match &net {
        etherparse::NetSlice::Ipv4(v) => (
            v.header().source_addr().into(),
            v.header().destination_addr().into(),
            v.payload(),
        ),
        etherparse::NetSlice::Ipv6(v) => (
            v.header().source_addr().into(),
            v.header().destination_addr().into(),
            v.payload(),
        ),
    };
    if p.icmp.is_none() {
        prop_assert_eq!(p.key.src(), src);
        prop_assert_eq!(p.key.dst(), dst);
    }
    // etherparse stops at the fragment header for non-first fragments the same way.
    prop_assert_eq!(p.end - p.l4, ipp.payload.len());
    prop_assert_eq!(p.proto.number(), ipp.ip_number.0);
    prop_assert_eq!(p.fragment != Fragment::None, ipp.fragmented);
    match t.transport {
        Some(etherparse::TransportSlice::Tcp(tcp)) => {
            prop_assert_eq!(p.key.src_port(), tcp.source_port());
            prop_assert_eq!(p.key.dst_port(), tcp.destination_port());
            prop_assert_eq!(p.end - p.payload, tcp.payload().len());
        }
        Some(etherparse::TransportSlice::Udp(udp)) => {
            prop_assert_eq!(p.key.src_port(), udp.source_port());
            prop_assert_eq!(p.key.dst_port(), udp.destination_port());
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn differential_valid(s in arb_spec()) {
        let pkt = build(&s);
        agree_with_etherparse(&pkt, true)?;
        let p = parse(&pkt, Link::Ip).unwrap();
        prop_assert!(p.l3 <= p.l4 && p.l4 <= p.payload && p.payload <= p.end && p.end <= pkt.len());
        if s.frag != Fragment::NonFirst && matches!(s.proto, 6 | 17 | 132) && s.inner.is_none() {
            prop_assert_eq!((p.key.src_port(), p.key.dst_port()), (s.sp, s.dp));
        }
    }

    #[test]
    fn differential_mutated(s in arb_spec(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in any::<prop::sample::Index>()) {
        let mut pkt = build(&s);
        for (i, v) in flips {
            let i = i.index(pkt.len());
            pkt[i] = v;
        }
        let n = cut.index(pkt.len() + 1);
        if n > 0 { pkt.truncate(n.max(pkt.len() / 2)); }
        agree_with_etherparse(&pkt, false)?;
        if let Ok(p) = parse(&pkt, Link::Ip) {
            prop_assert!(p.l4 <= p.payload && p.payload <= p.end && p.end <= pkt.len());
        }
    }

    #[test]
    fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&b, Link::Ip);
        let _ = parse(&b, Link::Ethernet);
    }
}
