#![no_main]
//! lb_packet::parse on arbitrary bytes (as an IP packet and as an Ethernet frame): never panics,
//! and every offset it reports is ordered and inside the buffer.

use lb_packet::{parse, Link};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for link in [Link::Ip, Link::Ethernet] {
        if let Ok(p) = parse(data, link) {
            assert!(p.l3 <= p.l4 && p.l4 <= p.payload && p.payload <= p.end && p.end <= data.len());
            if let Some(e) = p.icmp {
                assert!(p.l4 < e.l3 && e.l3 <= e.l4 && e.l4 <= e.end && e.end <= p.end);
                assert_eq!(p.key, e.key.reversed());
            }
            let _ = p.payload(data);
        }
    }
});
