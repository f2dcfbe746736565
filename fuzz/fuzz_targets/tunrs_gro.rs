#![no_main]
//! `tun-rs`'s coalescing (`GROTable::apply_gro`, what `send_multiple` runs before it writes a
//! batch) on a batch of arbitrary packets: never panics. `lb-decap` writes the inner packets it
//! decapsulates through it, and those are the clients' packets: hostile bytes reach this code
//! from the network. (The balancer's own coalescing, `lb_packet::gro`, has `udp_coalesce`.)
//!
//! Input: the first byte's bit 0 allows UDP coalescing (`can_udp_gro`); then a sequence of
//! `[flags, len_hi, len_lo, bytes...]` records (at most 64 packets). Flag bit 0: the packet
//! continues the previous one (its first 40 bytes copied from it, the IPv4 total length set to
//! this packet's length, the TCP sequence number advanced by the previous payload, the IPv4 id
//! by one), so that the fuzzer reaches merges; bit 1: the IPv4 header checksum is fixed up.

use libfuzzer_sys::fuzz_target;
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

/// Room for what `apply_gro` appends to a packet it coalesces others into (as `lb-decap`).
const ROOM: usize = VIRTIO_NET_HDR_LEN + 65_536;

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    while rest.len() >= 3 && bufs.len() < 64 {
        let (flags, len) = (rest[0], usize::from(u16::from_be_bytes([rest[1], rest[2]])));
        let take = len.min(rest.len() - 3).min(4096);
        let mut pkt = rest[3..3 + take].to_vec();
        rest = &rest[3 + take..];
        if flags & 1 != 0 {
            if let Some(prev) = bufs.last() {
                continue_from(&mut pkt, &prev[VIRTIO_NET_HDR_LEN..]);
            }
        }
        if flags & 2 != 0 && pkt.len() >= 20 && pkt[0] == 0x45 {
            pkt[10..12].fill(0);
            let c = ipv4_checksum(&pkt[..20]);
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let mut b = Vec::with_capacity(ROOM);
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(&pkt);
        bufs.push(b);
    }
    // An empty packet is not a packet `lb-decap` writes (`apply_gro` refuses the offset).
    if bufs.is_empty() || bufs.iter().any(|b| b.len() <= VIRTIO_NET_HDR_LEN) {
        return;
    }
    let mut gro = GROTable::new();
    let _ = gro.apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, first & 1 != 0);
    // A second batch through the same table (state kept between calls is reset, as in
    // `send_multiple`).
    let _ = gro.apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, first & 1 == 0);
});

/// Makes `pkt` the next segment after `prev` (an IPv4 TCP packet without options, else only the
/// header bytes are copied).
fn continue_from(pkt: &mut Vec<u8>, prev: &[u8]) {
    let n = 40.min(prev.len());
    if pkt.len() < n {
        pkt.resize(n, 0);
    }
    pkt[..n].copy_from_slice(&prev[..n]);
    if n < 40 || prev[0] != 0x45 || prev[9] != 6 {
        return;
    }
    let total = u16::try_from(pkt.len()).unwrap_or(u16::MAX);
    pkt[2..4].copy_from_slice(&total.to_be_bytes());
    let id = u16::from_be_bytes([prev[4], prev[5]]).wrapping_add(1);
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    let prev_payload = prev.len().saturating_sub(40) as u32;
    let seq =
        u32::from_be_bytes([prev[24], prev[25], prev[26], prev[27]]).wrapping_add(prev_payload);
    pkt[24..28].copy_from_slice(&seq.to_be_bytes());
}

/// The IPv4 header checksum of `h` (its checksum field zero).
fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
