//! Coalescing on the way out: runs of one flow's UDP datagrams in a batch become one UDP GSO
//! super-packet (`VIRTIO_NET_HDR_GSO_UDP_L4`), which a TUN device with the USO offloads takes in
//! one write and the kernel routes, filters and forwards once, cutting it back into the same
//! datagrams (the same payloads, sizes and order) where it must: at a receiving socket or a
//! device that cannot take it whole.
//!
//! This is the write side of what a NIC's GRO does on receive, done in user space as
//! wireguard-go does for its TUN device. A balancer that reads many small datagrams per batch
//! (a QUIC or media stream, a sender using `sendmmsg`) otherwise pays the kernel's per-packet
//! cost of a TUN write (an skb, a route lookup, the netfilter hooks, the forwarding path) for
//! each of them.
//!
//! What is merged, and why nothing else:
//! - plain IPv4 (no options, not a fragment) and IPv6 (UDP right after the fixed header)
//!   datagrams with no GSO of their own, each an IP packet (TUN) or in an untagged Ethernet
//!   frame (TAP; a group's frames also share their Ethernet header);
//! - of one flow and one IP header: the same addresses, ports, TOS / traffic class and flow
//!   label, TTL / hop limit and IPv4 flags, so every datagram the kernel cuts back out has the
//!   header it had. IPv4 identifications: the kernel numbers the cut datagrams up from the
//!   first's, so datagrams without DF (the only ones whose identification means something)
//!   merge only when theirs already count up one by one; with DF set (Linux's default for UDP)
//!   the identification is not used (RFC 6864) and may change;
//! - with a checksum that holds: a datagram whose checksum the sender left to the device
//!   (`NEEDS_CSUM`) or the kernel verified (`DATA_VALID`) is taken as it is; any other is
//!   verified first, because the super-packet's checksums are computed afresh and would
//!   otherwise turn a corrupted datagram into a valid one; an IPv4 header checksum is always
//!   verified, for the same reason;
//! - every datagram of a group carries the first's payload size, except the last, which may be
//!   shorter (the UDP GSO rule); at most [`MAX_SEGMENTS`] datagrams and 64 KiB per group.
//!
//! Order: a flow's datagrams leave in the order they came (a group is written at the place of
//! its first datagram, and a flow's next group starts only after its last one closed); only
//! datagrams of different flows change places. A UDP packet that cannot merge closes every
//! open group before it, so it is not overtaken by datagrams of its own flow that came after it.

use crate::checksum::{self, fold, ipv4_header, pseudo_v4, pseudo_v6, sum};
use crate::offload::{GsoType, VnetHdr};
use crate::parse::Link;

/// The most datagrams in one super-packet (the kernel's `UDP_MAX_SEGMENTS` was 64 before Linux
/// 6.6 raised it to 128).
pub const MAX_SEGMENTS: u16 = 64;

/// Groups open at a time: a datagram of a further flow closes the oldest. A batch of 32
/// packets has pairs of one flow only when it holds 16 flows or fewer.
const OPEN: usize = 16;

/// IP protocol number of UDP.
const UDP: u8 = 17;

/// One packet of a batch on its way out: its place in its buffer and its virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    /// Offset of the IP header in the buffer.
    pub start: usize,
    /// Length of the IP packet.
    pub len: usize,
    /// The header to write before it.
    pub hdr: VnetHdr,
}

/// What one [`coalesce_udp`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coalesced {
    /// Super-packets made (each from two datagrams or more).
    pub super_packets: u32,
    /// Datagrams that went into them (so `datagrams - super_packets` writes fewer).
    pub datagrams: u32,
}

/// A datagram that may merge.
#[derive(Debug, Clone, Copy)]
struct Dgram {
    /// Link header length (0 on a TUN device, 14 for an Ethernet frame).
    l2: usize,
    v6: bool,
    /// Transport header offset = IP header length.
    l4: usize,
    /// UDP payload bytes.
    payload: usize,
    /// IPv4 identification and DF.
    id: u16,
    df: bool,
}

/// What a packet is to the coalescer.
enum Kind {
    /// Not UDP: leaves as it is, and does not affect the groups.
    Other,
    /// UDP (or possibly UDP) that cannot merge: closes the open groups.
    Barrier,
    /// A datagram that may merge.
    Merge(Dgram),
}

/// An open group: the first datagram (whose buffer collects the payloads) and what the next
/// one must match.
#[derive(Debug, Clone, Copy)]
struct Group {
    /// The flow: addresses and ports as in the packet (IPv4 in the first 12 bytes).
    tuple: [u8; 36],
    head: usize,
    d: Dgram,
    count: u16,
    /// Payload bytes so far.
    total: usize,
    /// IPv4 identification the next datagram must carry (without DF).
    next_id: u16,
}

/// A 16-bit field (0 past the end, which the callers' length checks rule out).
fn get16(b: &[u8], i: usize) -> u16 {
    checksum::get16(b, i).unwrap_or(0)
}

/// Writes a 16-bit field (nothing past the end, which the callers' length checks rule out).
fn put16(b: &mut [u8], i: usize, v: u16) {
    let _ = checksum::put16(b, i, v);
}

/// Classifies `frame` (`link`'s header, then an IP packet) with its header `h`.
fn inspect(frame: &[u8], link: Link, h: &VnetHdr) -> Kind {
    let l2 = match link {
        Link::Ip => 0,
        Link::Ethernet => {
            // Ethernet II with no VLAN tag; a tagged frame may still be UDP: a barrier.
            match frame.get(12..14) {
                Some([0x08, 0x00] | [0x86, 0xdd]) => 14,
                Some([0x81 | 0x88, _]) => return Kind::Barrier,
                _ => return Kind::Other,
            }
        }
    };
    let pkt = &frame[l2..];
    let Some(&first) = pkt.first() else {
        return Kind::Other;
    };
    let len = pkt.len();
    let (v6, l4) = match first >> 4 {
        4 => {
            if len < 20 || pkt[9] != UDP {
                return Kind::Other;
            }
            let plain = first == 0x45
                && len >= 28
                && usize::from(get16(pkt, 2)) == len
                && get16(pkt, 6) & 0x3FFF == 0
                && ipv4_header(&pkt[..20]) == Some(get16(pkt, 10));
            if !plain {
                return Kind::Barrier;
            }
            (false, 20)
        }
        6 => {
            if len < 40 {
                return Kind::Other;
            }
            match pkt[6] {
                UDP if len >= 48 && usize::from(get16(pkt, 4)) + 40 == len => {}
                // TCP, ICMPv6, no next header: not UDP.
                6 | 58 | 59 => return Kind::Other,
                // UDP behind extension headers, or a length that does not add up.
                _ => return Kind::Barrier,
            }
            (true, 40)
        }
        _ => return Kind::Other,
    };
    let payload = len - l4 - 8;
    let csum_ok = if h.is_gso() {
        false
    } else if h.needs_csum {
        usize::from(h.csum_start) == l2 + l4 && h.csum_offset == 6
    } else if h.data_valid {
        true
    } else {
        let field = get16(pkt, l4 + 6);
        if !v6 && field == 0 {
            // No checksum (IPv4): the super-packet's will cover data nothing vouched for, as
            // the kernel's own UDP GSO would.
            true
        } else {
            let ps = if v6 {
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s.copy_from_slice(&pkt[8..24]);
                d.copy_from_slice(&pkt[24..40]);
                pseudo_v6(s, d, UDP, (len - l4) as u32)
            } else {
                let mut s = [0u8; 4];
                let mut d = [0u8; 4];
                s.copy_from_slice(&pkt[12..16]);
                d.copy_from_slice(&pkt[16..20]);
                pseudo_v4(s, d, UDP, (len - l4) as u16)
            };
            fold(sum(&pkt[l4..], ps)) == 0xFFFF
        }
    };
    if !csum_ok || payload == 0 || usize::from(get16(pkt, l4 + 4)) != len - l4 {
        return Kind::Barrier;
    }
    Kind::Merge(Dgram {
        l2,
        v6,
        l4,
        payload,
        id: if v6 { 0 } else { get16(pkt, 4) },
        // IPv6 has no identification to keep: as if DF.
        df: v6 || pkt[6] & 0x40 != 0,
    })
}

/// The flow of a datagram: addresses and ports (for IPv4 in the first 12 bytes, the rest 0). A
/// flow has one open group at most, which keeps its datagrams in order.
fn tuple_of(pkt: &[u8], v6: bool) -> [u8; 36] {
    let mut t = [0u8; 36];
    if v6 {
        t.copy_from_slice(&pkt[8..44]);
    } else {
        t[..12].copy_from_slice(&pkt[12..24]);
    }
    t
}

/// Whether frame `b` may follow frame `a` in a super-packet: the same link header and the rest
/// of the IP header the same (but for lengths, identification and checksum), so the datagram
/// the kernel cuts out is `b` again.
fn same_header(a: &[u8], b: &[u8], l2: usize, v6: bool) -> bool {
    let (Some(la), Some(lb)) = (a.get(..l2), b.get(..l2)) else {
        return false;
    };
    let (a, b) = (&a[l2..], &b[l2..]);
    la == lb
        && if v6 {
            a[..4] == b[..4] && a[7] == b[7]
        } else {
            a[1] == b[1] && a[6] == b[6] && a[8] == b[8]
        }
}

/// Coalesces the UDP datagrams among `out` (packets in `bufs`, `out[i]` in `bufs[i]`; `None`:
/// nothing to write) into UDP GSO super-packets, in place: a group's first datagram becomes
/// the super-packet (its buffer takes the others' payloads after its own, its headers and
/// `hdr` describe the whole), the others become `None`. Packets start with `link`'s header: an
/// IP packet from a TUN device, an Ethernet frame from a TAP device (frames of one group also
/// share their Ethernet header; VLAN-tagged frames are not merged). A group grows only while
/// its first buffer has room.
///
/// Write the result in order: each flow's datagrams keep theirs.
pub fn coalesce_udp<B: AsRef<[u8]> + AsMut<[u8]>>(
    bufs: &mut [B],
    out: &mut [Option<Outgoing>],
    link: Link,
) -> Coalesced {
    let mut open: [Option<Group>; OPEN] = [None; OPEN];
    // Each open group's flow fingerprint (0: no group), scanned before any tuple is compared.
    let mut fps = [0u64; OPEN];
    let mut done = Coalesced::default();
    let n = out.len().min(bufs.len());
    for k in 0..n {
        let Some(o) = out[k] else {
            continue;
        };
        let Some(frame) = bufs[k].as_ref().get(o.start..o.start.saturating_add(o.len)) else {
            continue;
        };
        let d = match inspect(frame, link, &o.hdr) {
            Kind::Other => continue,
            Kind::Barrier => {
                for (g, fp) in open.iter_mut().zip(&mut fps) {
                    close(bufs, out, g, &mut done);
                    *fp = 0;
                }
                continue;
            }
            Kind::Merge(d) => d,
        };
        let tuple = tuple_of(&frame[d.l2..], d.v6);
        let fp = fingerprint(&tuple, d.v6);
        let found = (0..OPEN).find(|&i| {
            fps[i] == fp
                && open[i]
                    .as_ref()
                    .is_some_and(|g| g.d.v6 == d.v6 && g.tuple == tuple)
        });
        if let Some(i) = found {
            if append(bufs, out, &mut open[i], k, d) {
                if open[i].as_ref().is_some_and(|g| d.payload < g.d.payload) {
                    // A shorter datagram ends a group.
                    close(bufs, out, &mut open[i], &mut done);
                    fps[i] = 0;
                }
                continue;
            }
            close(bufs, out, &mut open[i], &mut done);
            open[i] = Some(Group::new(k, d, tuple));
            continue;
        }
        let slot = match fps.iter().position(|&f| f == 0) {
            Some(i) => i,
            None => {
                // Close the oldest group.
                let i = (0..OPEN)
                    .min_by_key(|&i| open[i].as_ref().map_or(0, |g| g.head))
                    .unwrap_or(0);
                close(bufs, out, &mut open[i], &mut done);
                i
            }
        };
        open[slot] = Some(Group::new(k, d, tuple));
        fps[slot] = fp;
    }
    for g in &mut open {
        close(bufs, out, g, &mut done);
    }
    done
}

/// A flow's fingerprint for the group scan: never 0 (a free slot).
fn fingerprint(t: &[u8; 36], v6: bool) -> u64 {
    let w = |i: usize| {
        u64::from_le_bytes([
            t[i],
            t[i + 1],
            t[i + 2],
            t[i + 3],
            t[i + 4],
            t[i + 5],
            t[i + 6],
            t[i + 7],
        ])
    };
    let mut h = w(0) ^ w(4).rotate_left(29);
    if v6 {
        h ^= w(12).rotate_left(13) ^ w(20).rotate_left(41) ^ w(28).rotate_left(7);
    }
    h | 1
}

impl Group {
    fn new(head: usize, d: Dgram, tuple: [u8; 36]) -> Group {
        Group {
            tuple,
            head,
            d,
            count: 1,
            total: d.payload,
            next_id: d.id.wrapping_add(1),
        }
    }
}

/// Appends datagram `k` to the group, if it fits: no larger than the group's size, the
/// identification right (without DF), the counts and the room in the first buffer.
fn append<B: AsRef<[u8]> + AsMut<[u8]>>(
    bufs: &mut [B],
    out: &mut [Option<Outgoing>],
    group: &mut Option<Group>,
    k: usize,
    d: Dgram,
) -> bool {
    let Some(g) = group.as_mut() else {
        return false;
    };
    let (Some(head), Some(o)) = (out[g.head], out[k]) else {
        return false;
    };
    let limit = if g.d.v6 {
        usize::from(u16::MAX) - 8
    } else {
        usize::from(u16::MAX) - 28
    };
    let same = bufs[g.head]
        .as_ref()
        .get(head.start..head.start + head.len)
        .zip(bufs[k].as_ref().get(o.start..o.start + o.len))
        .is_some_and(|(a, b)| same_header(a, b, g.d.l2, g.d.v6));
    let fits = same
        && d.payload <= g.d.payload
        && g.count < MAX_SEGMENTS
        && g.total + d.payload <= limit
        && (g.d.df && d.df || !g.d.df && !d.df && d.id == g.next_id)
        && g.head < k
        && head.start + head.len + d.payload <= bufs[g.head].as_ref().len();
    if !fits {
        return false;
    }
    let (before, after) = bufs.split_at_mut(k);
    let src = &after[0].as_ref()[o.start + d.l2 + d.l4 + 8..o.start + o.len];
    let end = head.start + head.len;
    before[g.head].as_mut()[end..end + d.payload].copy_from_slice(src);
    if let Some(h) = out[g.head].as_mut() {
        h.len += d.payload;
    }
    out[k] = None;
    g.count += 1;
    g.total += d.payload;
    g.next_id = d.id.wrapping_add(1);
    true
}

/// Ends a group: with two datagrams or more, its first becomes the super-packet (lengths,
/// IPv4 header checksum, the UDP pseudo-header sum and the virtio-net header).
fn close<B: AsRef<[u8]> + AsMut<[u8]>>(
    bufs: &mut [B],
    out: &mut [Option<Outgoing>],
    group: &mut Option<Group>,
    done: &mut Coalesced,
) {
    let Some(g) = group.take() else {
        return;
    };
    if g.count < 2 {
        return;
    }
    let Some(o) = out[g.head].as_mut() else {
        return;
    };
    let (l2, l4) = (g.d.l2, g.d.l4);
    let udp_len = 8 + g.total;
    let pkt = &mut bufs[g.head].as_mut()[o.start + l2..o.start + o.len];
    let ps = if g.d.v6 {
        put16(pkt, 4, udp_len as u16);
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&pkt[8..24]);
        d.copy_from_slice(&pkt[24..40]);
        pseudo_v6(s, d, UDP, udp_len as u32)
    } else {
        put16(pkt, 2, (l4 + udp_len) as u16);
        put16(pkt, 10, 0);
        let c = ipv4_header(&pkt[..20]).unwrap_or(0);
        put16(pkt, 10, c);
        let mut s = [0u8; 4];
        let mut d = [0u8; 4];
        s.copy_from_slice(&pkt[12..16]);
        d.copy_from_slice(&pkt[16..20]);
        pseudo_v4(s, d, UDP, udp_len as u16)
    };
    put16(pkt, l4 + 4, udp_len as u16);
    put16(pkt, l4 + 6, fold(ps));
    o.hdr = VnetHdr {
        needs_csum: true,
        data_valid: false,
        gso: GsoType::UdpL4,
        ecn: false,
        hdr_len: (l2 + l4 + 8) as u16,
        gso_size: g.d.payload as u16,
        csum_start: (l2 + l4) as u16,
        csum_offset: 6,
    };
    done.super_packets += 1;
    done.datagrams += u32::from(g.count);
}

#[cfg(test)]
#[path = "gro_tests.rs"]
mod tests;
