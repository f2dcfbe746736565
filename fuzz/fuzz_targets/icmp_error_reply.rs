#![no_main]
//! `lb_packet::icmp::error_reply` on an arbitrary offending packet, source address, error kind and
//! output size: never panics, writes within `out`, and never answers its own reply (RFC 1122
//! §3.2.2, RFC 4443 §2.4 (e): no ICMP error about an ICMP error).

use std::net::IpAddr;

use lb_packet::icmp::{error_reply, IcmpError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, orig) = data.split_at(3);
    let from = if head[0] & 1 == 0 {
        IpAddr::from([192, 0, 2, head[1]])
    } else {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(head[1])])
    };
    let kind = match head[0] >> 1 & 3 {
        0 => IcmpError::TimeExceeded,
        1 => IcmpError::PortUnreachable,
        _ => IcmpError::TooBig {
            mtu: u16::from(head[1]) << 8 | u16::from(head[2]),
        },
    };
    let mut out = vec![0u8; usize::from(head[2]) * 8];
    if let Ok(n) = error_reply(orig, from, kind, &mut out) {
        assert!(n <= out.len());
        let reply = out[..n].to_vec();
        let mut again = vec![0u8; 2048];
        assert!(
            error_reply(&reply, from, kind, &mut again).is_err(),
            "an ICMP error about an ICMP error"
        );
    }
});
