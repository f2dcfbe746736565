#![no_main]
//! NAT rewrite + reverse on arbitrary packets: never panics; after making the checksums valid
//! (full recompute), rewrite then reverse restores the original bytes, and the incremental
//! checksums after the rewrite equal a full recompute. Also TCP splice + inverse.
//!
//! Input: [mode][16-byte address A][16-byte address B][port A][port B][packet ...].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_core::IpProto;
use lb_packet::{checksum, nat, parse, splice, Family, Fragment, Link, Parsed};
use libfuzzer_sys::fuzz_target;

fn rd16(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

/// Whether a checksum the identity cannot hold for (RFC 1624: 0xFFFF is never a valid TCP / ICMP
/// checksum) is present where a full recompute could not fix it.
fn unfixable(buf: &[u8], p: &Parsed) -> bool {
    let neg = |proto: IpProto, l4: usize| match proto {
        IpProto::Tcp => rd16(buf, l4 + 16) == Some(0xFFFF),
        IpProto::Icmp | IpProto::Icmpv6 => rd16(buf, l4 + 2) == Some(0xFFFF),
        _ => false,
    };
    if p.fragment != Fragment::None && (neg(p.proto, p.l4) || p.icmp.is_some()) {
        return true;
    }
    if let Some(e) = p.icmp {
        // The quoted packet's transport checksum cannot be recomputed (truncated).
        if neg(e.proto, e.l4) {
            return true;
        }
        // Errors must go to the quoted packet's source (RFC 792 / 4443).
        if outer_addr(buf, p, false) != p.key.dst() {
            return true;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 37 {
        return;
    }
    let (hdr, pkt) = data.split_at(37);
    let mode = hdr[0];
    let link = if mode & 1 == 0 {
        Link::Ip
    } else {
        Link::Ethernet
    };
    let mut buf = pkt.to_vec();
    let Ok(p) = parse(&buf, link) else { return };
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    a.copy_from_slice(&hdr[1..17]);
    b.copy_from_slice(&hdr[17..33]);
    let (pa, pb) = (
        u16::from_be_bytes([hdr[33], hdr[34]]),
        u16::from_be_bytes([hdr[35], hdr[36]]),
    );
    let (ia, ib): (IpAddr, IpAddr) = match p.family {
        Family::V4 => (
            Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
            Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(),
        ),
        Family::V6 => (Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into()),
    };
    let (src, dst) = match (mode >> 1) % 3 {
        0 => (Some(SocketAddr::new(ia, pa)), None),
        1 => (None, Some(SocketAddr::new(ib, pb))),
        _ => (Some(SocketAddr::new(ia, pa)), Some(SocketAddr::new(ib, pb))),
    };
    // Make every computable checksum valid first.
    checksum::recompute(&mut buf, &p).expect("parsed buffer");
    let orig = buf.clone();
    // A router-sourced error whose new source equals the router's address cannot be told apart
    // from a peer-sourced one on the way back.
    let ambiguous = p.icmp.is_some_and(|_| {
        let r = outer_addr(&buf, &p, true);
        r != p.key.src() && src.is_some_and(|s| s.ip() == r)
    });
    let check = !unfixable(&buf, &p) && !ambiguous;
    nat::rewrite(&mut buf, &p, src, dst).expect("same family");
    let q = parse(&buf, link).expect("a rewritten packet still parses");
    if check && p.fragment == Fragment::None {
        let mut full = buf.clone();
        checksum::recompute(&mut full, &q).expect("parsed buffer");
        assert_eq!(full, buf, "incremental checksums equal a full recompute");
    }
    let back_src = src.map(|_| SocketAddr::new(p.key.src(), p.key.src_port()));
    let back_dst = dst.map(|_| SocketAddr::new(p.key.dst(), p.key.dst_port()));
    nat::rewrite(&mut buf, &q, back_src, back_dst).expect("same family");
    if check {
        assert_eq!(buf, orig, "rewrite then reverse is the identity");
    }
    // TCP splice and its inverse.
    if p.proto == IpProto::Tcp && p.fragment != Fragment::NonFirst && p.icmp.is_none() {
        let sh = splice::SeqShift::new(
            u32::from_be_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        );
        let before = buf.clone();
        splice::translate(&mut buf, &p, sh).expect("tcp");
        splice::translate(&mut buf, &p, sh.inverse()).expect("tcp");
        if check {
            assert_eq!(buf, before, "splice then inverse is the identity");
        }
    }
});

/// The outer source (`src`) or destination address as written in the packet.
fn outer_addr(buf: &[u8], p: &Parsed, src: bool) -> IpAddr {
    match p.family {
        Family::V4 => {
            let o = p.l3 + if src { 12 } else { 16 };
            let s = buf.get(o..o + 4).unwrap_or(&[0; 4]);
            Ipv4Addr::new(s[0], s[1], s[2], s[3]).into()
        }
        Family::V6 => {
            let o = p.l3 + if src { 8 } else { 24 };
            let mut a = [0u8; 16];
            a.copy_from_slice(buf.get(o..o + 16).unwrap_or(&[0; 16]));
            Ipv6Addr::from(a).into()
        }
    }
}
