#![no_main]
//! The splice's layer-5 readers on arbitrary bytes: l5head::parse_head never panics and
//! whatever it returns lies inside the input; tcpseg::read never panics on a parsed packet.

use lb_packet::l5head::{parse_head, Head};
use lb_packet::{parse, tcpseg, Link};
use libfuzzer_sys::fuzz_target;

fn inside(data: &[u8], v: &[u8]) -> bool {
    let (a, b) = (data.as_ptr() as usize, v.as_ptr() as usize);
    v.is_empty() || (b >= a && b + v.len() <= a + data.len())
}

fuzz_target!(|data: &[u8]| {
    match parse_head(data) {
        Head::Http { host, path } => {
            assert!(inside(data, host) && inside(data, path));
            assert!(!path.is_empty());
        }
        Head::Sip { call_id: Some(c) } => assert!(inside(data, c)),
        _ => {}
    }
    if let Ok(p) = parse(data, Link::Ip) {
        let _ = tcpseg::read(data, &p);
    }
});
