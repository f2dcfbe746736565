#![no_main]
//! Tunnel encapsulation + decapsulation of arbitrary packets: never panics; whatever is
//! encapsulated decapsulates to the same bytes. Also decap on arbitrary bytes.
//!
//! Input: [kind][packet ...].

use lb_packet::tunnel::{self, Encap, TunnelParams};
use lb_packet::PacketBuf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, pkt)) = data.split_first() else {
        return;
    };
    let mut storage = vec![0u8; tunnel::MAX_OVERHEAD + pkt.len()];
    storage[tunnel::MAX_OVERHEAD..].copy_from_slice(pkt);
    let Ok(mut pb) = PacketBuf::new(&mut storage[..], tunnel::MAX_OVERHEAD, pkt.len()) else {
        return;
    };
    let t = TunnelParams {
        ttl: 9,
        path_mtu: 1500,
        decrement_ttl: kind & 0x80 != 0,
    };
    let (a4, b4) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
    let (a6, b6) = (
        "2001:db8::a".parse().unwrap(),
        "2001:db8::b".parse().unwrap(),
    );
    let r = match kind & 7 {
        0 => tunnel::encap_ipip(&mut pb, a4, b4, &t),
        1 => tunnel::encap_ip6ip6(&mut pb, a6, b6, 7, &t),
        2 => tunnel::encap_4in6(&mut pb, a6, b6, 7, &t),
        3 => tunnel::encap_gue(&mut pb, a4.into(), b4.into(), 6080, 50000, &t),
        4 => tunnel::encap_gue(&mut pb, a6.into(), b6.into(), 6080, 50000, &t),
        _ => {
            let _ = tunnel::decap(&mut pb, Some(6080));
            return;
        }
    };
    if r == Ok(Encap::Done) {
        let before_ttl = pb.len();
        tunnel::decap(&mut pb, Some(6080)).expect("our own encapsulation decapsulates");
        assert!(pb.len() <= before_ttl);
        if !t.decrement_ttl {
            // The inner packet's bytes up to its own length are unchanged.
            assert!(pkt.starts_with(pb.data()));
        }
    } else {
        assert_eq!(pb.data(), pkt, "nothing written when not encapsulated");
    }
});
