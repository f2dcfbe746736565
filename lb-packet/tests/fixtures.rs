//! Byte-for-byte checks of every rewrite against fixtures made by an independent implementation
//! (see `tests/data/README.md`).

use lb_core::MacAddr;
use lb_packet::icmp::{error_reply, IcmpError};
use lb_packet::splice::{translate, SeqShift};
use lb_packet::tunnel::{self, Encap, TunnelParams};
use lb_packet::{dr, nat, parse, Link, PacketBuf};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/",
            $name,
            ".bin"
        ))
    };
}

#[test]
fn full_nat_and_reverse() {
    let mut pkt = fixture!("fullnat_v4_tcp.in").to_vec();
    let p = parse(&pkt, Link::Ip).unwrap();
    nat::rewrite(
        &mut pkt,
        &p,
        Some("10.0.0.1:50000".parse().unwrap()),
        Some("10.0.0.7:8080".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(&pkt[..], fixture!("fullnat_v4_tcp.out"));
    let q = parse(&pkt, Link::Ip).unwrap();
    nat::rewrite(
        &mut pkt,
        &q,
        Some("192.0.2.1:40000".parse().unwrap()),
        Some("203.0.113.10:80".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(&pkt[..], fixture!("fullnat_v4_tcp.in"));
}

#[test]
fn dnat_and_reply() {
    let mut pkt = fixture!("dnat_v6_udp.in").to_vec();
    let p = parse(&pkt, Link::Ip).unwrap();
    nat::set_dst(&mut pkt, &p, "[2001:db8:1::7]:5353".parse().unwrap()).unwrap();
    assert_eq!(&pkt[..], fixture!("dnat_v6_udp.out"));
    let mut reply = fixture!("dnat_v6_udp.reply").to_vec();
    let r = parse(&reply, Link::Ip).unwrap();
    nat::set_src(&mut reply, &r, "[2001:db8::100]:53".parse().unwrap()).unwrap();
    assert_eq!(&reply[..], fixture!("dnat_v6_udp.reply_out"));
}

#[test]
fn icmp_error_reverse_nat() {
    let mut pkt = fixture!("icmp_unreach_v4.in").to_vec();
    let p = parse(&pkt, Link::Ip).unwrap();
    assert_eq!(p.key.to_string(), "udp 10.0.0.7:5353 -> 10.0.0.1:50000");
    nat::rewrite(
        &mut pkt,
        &p,
        Some("203.0.113.10:53".parse().unwrap()),
        Some("192.0.2.1:40000".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(&pkt[..], fixture!("icmp_unreach_v4.out"));
}

fn headroom(pkt: &[u8]) -> PacketBuf<Vec<u8>> {
    let mut v = vec![0u8; tunnel::MAX_OVERHEAD];
    v.extend_from_slice(pkt);
    PacketBuf::new(v, tunnel::MAX_OVERHEAD, pkt.len()).unwrap()
}

#[test]
fn ipip_encap_decap() {
    let mut pb = headroom(fixture!("ipip.in"));
    let r = tunnel::encap_ipip(
        &mut pb,
        [10, 0, 0, 1].into(),
        [10, 0, 0, 7].into(),
        &TunnelParams::default(),
    )
    .unwrap();
    assert_eq!(r, Encap::Done);
    assert_eq!(pb.data(), fixture!("ipip.out"));
    tunnel::decap(&mut pb, None).unwrap();
    assert_eq!(pb.data(), &fixture!("ipip.out")[20..]);
}

#[test]
fn gue_v6_encap_decap() {
    let mut pb = headroom(fixture!("gue_v6.in"));
    let r = tunnel::encap_gue(
        &mut pb,
        "2001:db8:ff::1".parse().unwrap(),
        "2001:db8:ff::7".parse().unwrap(),
        6080,
        50000,
        &TunnelParams::default(),
    )
    .unwrap();
    assert_eq!(r, Encap::Done);
    assert_eq!(pb.data(), fixture!("gue_v6.out"));
    let d = tunnel::decap(&mut pb, Some(6080)).unwrap();
    assert_eq!(d.outer_src.to_string(), "2001:db8:ff::1");
    assert_eq!(pb.data(), &fixture!("gue_v6.out")[52..]);
}

#[test]
fn direct_routing() {
    let mut f = fixture!("dr.in").to_vec();
    dr::set_macs(
        &mut f,
        MacAddr([2, 0, 0, 0, 0, 7]),
        Some(MacAddr([2, 0, 0, 0, 0, 1])),
    )
    .unwrap();
    assert_eq!(&f[..], fixture!("dr.out"));
}

#[test]
fn splice() {
    let mut pkt = fixture!("splice_v4.in").to_vec();
    let p = parse(&pkt, Link::Ip).unwrap();
    translate(&mut pkt, &p, SeqShift::new(0x1000_0000, 0x2000_0000)).unwrap();
    assert_eq!(&pkt[..], fixture!("splice_v4.out"));
}

#[test]
fn frag_needed_reply() {
    let mut out = [0u8; 1500];
    let n = error_reply(
        fixture!("frag_needed.in"),
        "10.0.0.254".parse().unwrap(),
        IcmpError::TooBig { mtu: 1480 },
        &mut out,
    )
    .unwrap();
    assert_eq!(&out[..n], fixture!("frag_needed.out"));
    // And the tunnel's MTU check asks for exactly that MTU.
    let mut pb = headroom(fixture!("frag_needed.in"));
    let r = tunnel::encap_ipip(
        &mut pb,
        [10, 0, 0, 1].into(),
        [10, 0, 0, 7].into(),
        &TunnelParams::default(),
    )
    .unwrap();
    assert_eq!(r, Encap::TooBig { mtu: 1480 });
}
