#![no_main]
//! `lb_packet::offload` on an arbitrary virtio-net header and packet: decoding, classifying and
//! segmenting never panic; a segmenter ends (at most one segment per payload byte, plus one),
//! writes within its output, and every segment it makes parses as the same flow (unless the
//! header puts a partial checksum over the transport header's ports).

use lb_packet::offload::{
    classify, complete_csum, segments, L4Csum, Segmenter, VnetHdr, VNET_HDR_LEN,
};
use lb_packet::{parse, Link};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN + 1 {
        return;
    }
    let (head, rest) = data.split_at(VNET_HDR_LEN);
    let (link, pkt) = (
        if rest[0] & 1 == 0 {
            Link::Ip
        } else {
            Link::Ethernet
        },
        &rest[1..],
    );
    let Ok(h) = VnetHdr::decode(head) else {
        return;
    };
    let mut enc = [0u8; VNET_HDR_LEN];
    h.encode(&mut enc).expect("room");
    assert_eq!(VnetHdr::decode(&enc), Ok(h));
    let Ok(p) = parse(pkt, link) else {
        return;
    };
    // A partial checksum somewhere else is completed where the header says, which may be
    // the transport header's ports: only the others must keep the flow.
    let keeps_key = matches!(classify(&p, &h), Ok(L4Csum::Full | L4Csum::Partial));
    let n = segments(&p, &h);
    let mut copy = pkt.to_vec();
    let _ = complete_csum(&mut copy, &h, p.end, false);
    let Ok(mut seg) = Segmenter::new(pkt, &p, &h) else {
        return;
    };
    let mut out = vec![0u8; 2048];
    let mut made = 0u32;
    loop {
        match seg.next_into(pkt, &mut out) {
            Ok(Some(len)) => {
                assert!(len <= out.len());
                made += 1;
                assert!(made as usize <= pkt.len() + 1, "segmenter does not end");
                if let (true, Ok(q)) = (keeps_key, parse(&out[..len], link)) {
                    assert_eq!(q.key, p.key);
                }
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    if made > 0 && out.len() >= pkt.len() {
        assert!(made <= n.max(1));
    }
});
