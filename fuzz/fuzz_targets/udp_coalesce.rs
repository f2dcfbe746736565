#![no_main]
//! `lb_packet::gro::coalesce_udp` on a batch of arbitrary packets: never panics, writes fewer
//! packets only by what it merged, and every super-packet it makes is one the offload module
//! (which cuts as the kernel does) accepts, cutting into 2 to 64 datagrams: as many as went
//! into it.
//!
//! Input: a sequence of `[flags, len_hi, len_lo, bytes...]` records (at most 32); the batch is of
//! Ethernet frames (a TAP device's) when the first byte's top bit is set. Flag bit 0:
//! the checksum is left to the device (`NEEDS_CSUM` at the UDP checksum of an option-less IPv4
//! or plain IPv6 packet); bit 1: `DATA_VALID`; bit 2: the IPv4 header checksum is fixed up
//! first (so that the fuzzer reaches merges); bit 3: the packet repeats the previous one's
//! first 44 bytes (the same flow and header).

use lb_packet::gro::{coalesce_udp, Outgoing, MAX_SEGMENTS};
use lb_packet::offload::{classify, segments, VnetHdr};
use lb_packet::{checksum, parse, Link};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut out: Vec<Option<Outgoing>> = Vec::new();
    let (link, l2) = if data.first().is_some_and(|b| b & 0x80 != 0) {
        (Link::Ethernet, 14)
    } else {
        (Link::Ip, 0)
    };
    let mut rest = data;
    while rest.len() >= 3 && bufs.len() < 32 {
        let (flags, len) = (rest[0], usize::from(u16::from_be_bytes([rest[1], rest[2]])));
        let take = len.min(rest.len() - 3).min(2048);
        let mut pkt = rest[3..3 + take].to_vec();
        rest = &rest[3 + take..];
        if flags & 8 != 0 {
            if let Some(prev) = bufs.last() {
                let o = out.last().copied().flatten().map_or(0, |o| o.start);
                let n = (l2 + 44).min(pkt.len()).min(prev.len().saturating_sub(o));
                pkt[..n].copy_from_slice(&prev[o..o + n]);
            }
        }
        if flags & 4 != 0 && pkt.len() >= l2 + 20 && pkt[l2] == 0x45 {
            let ip = &mut pkt[l2..];
            ip[10..12].fill(0);
            if let Some(c) = checksum::ipv4_header(&ip[..20]) {
                ip[10..12].copy_from_slice(&c.to_be_bytes());
            }
        }
        let l4: u16 = if pkt.get(l2).is_some_and(|b| b >> 4 == 6) {
            40 + l2 as u16
        } else {
            20 + l2 as u16
        };
        let hdr = VnetHdr {
            needs_csum: flags & 1 != 0,
            data_valid: flags & 2 != 0,
            csum_start: if flags & 1 != 0 { l4 } else { 0 },
            csum_offset: if flags & 1 != 0 { 6 } else { 0 },
            ..VnetHdr::NONE
        };
        // A buffer with some room after the packet (how much varies with the packet).
        let start = 8;
        let mut buf = vec![0u8; start + pkt.len() + (flags as usize >> 4) * 64];
        buf[start..start + pkt.len()].copy_from_slice(&pkt);
        bufs.push(buf);
        out.push(Some(Outgoing {
            start,
            len: pkt.len(),
            hdr,
        }));
    }
    let before = out.len();
    let c = coalesce_udp(&mut bufs, &mut out, link);
    let after = out.iter().flatten().count();
    assert!(c.datagrams >= 2 * c.super_packets);
    assert_eq!(after + (c.datagrams - c.super_packets) as usize, before);
    let mut made = 0u32;
    for (b, o) in bufs.iter().zip(&out) {
        let Some(o) = o else { continue };
        assert!(o.start + o.len <= b.len());
        if !o.hdr.is_gso() {
            continue;
        }
        let pkt = &b[o.start..o.start + o.len];
        let p = parse(pkt, link).expect("a super-packet parses");
        classify(&p, &o.hdr).expect("a super-packet's header describes it");
        let n = segments(&p, &o.hdr);
        assert!((2..=u32::from(MAX_SEGMENTS)).contains(&n));
        made += n;
    }
    assert_eq!(made, c.datagrams);
});
