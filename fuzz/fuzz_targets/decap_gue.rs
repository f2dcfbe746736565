#![no_main]
//! `lb-decap`'s receive path without the sockets (`lb_examples::decap`): the outer source of an
//! IPIP packet, the allow-list check, the GUE inner offset, then lb-packet's parse of the inner
//! packet (what `lb-decap` does before writing it to its TUN device) and of the IPIP packet's
//! decapsulation. Never panics; an inner packet is always inside the datagram.

use std::net::IpAddr;

use lb_examples::decap::{gue_inner, ipv4_source, AllowList};
use lb_packet::{parse, tunnel, Link, PacketBuf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // An allow list from a prefix written in the input (first line), the rest is the packet.
    let (list, packet) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) if sel & 1 == 1 => (&rest[..i], &rest[i + 1..]),
        _ => (&b"203.0.113.0/24"[..], rest),
    };
    let nets = std::str::from_utf8(list)
        .ok()
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter_map(|p| AllowList::parse_prefix(p).ok())
        .collect();
    let allow = AllowList::new(nets);
    // GUE: the payload of a UDP datagram from an IPv4 or IPv6 sender.
    let from = if sel & 2 == 0 {
        IpAddr::from([203, 0, 113, sel])
    } else {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(sel)])
    };
    if allow.allows(from) {
        if let Some(off) = gue_inner(packet) {
            if let Some(inner) = packet.get(off..) {
                assert!(off <= packet.len());
                let _ = parse(inner, Link::Ip);
            }
        }
    }
    // IPIP: the whole packet from an IPv4 raw socket.
    if let Some(src) = ipv4_source(packet) {
        assert!(src.is_ipv4());
        if allow.allows(src) {
            let mut buf = packet.to_vec();
            let n = buf.len();
            if let Ok(mut pb) = PacketBuf::new(&mut buf[..], 0, n) {
                if tunnel::decap(&mut pb, None).is_ok() {
                    let _ = parse(pb.data(), Link::Ip);
                }
            }
        }
    }
});
