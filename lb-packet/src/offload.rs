//! Offloads of a virtual NIC: the virtio-net header that a TUN/TAP device opened with
//! `IFF_VNET_HDR` puts before every packet (and expects before every packet written to it).
//!
//! With offloads on (`TUNSETOFFLOAD`), the kernel hands over
//! - **GSO super-packets**: one IP header, one TCP (or UDP) header and up to 64 KiB of payload
//!   that stands for many wire segments of `gso_size` payload bytes each; it segments what is
//!   written back the same way (or hands it on unsegmented to a device that can);
//! - **partial checksums** (`NEEDS_CSUM`): the L4 checksum field holds only the
//!   pseudo-header's sum (not complemented); whoever finally transmits sums the bytes from
//!   `csum_start` to the end into the field at `csum_start + csum_offset`.
//!
//! A balancer that only rewrites headers can work on the super-packet as it is: addresses and
//! ports change once for all its segments. Two rules keep the checksums right:
//! - a *partial* checksum covers the pseudo-header only, so an address change is added to the
//!   field with the opposite sign of RFC 1624's update and a port change not at all (the
//!   ports are summed later with the rest of the header): [`crate::nat::rewrite_partial`];
//! - whatever cannot carry an offload on (an encapsulation the virtio header cannot describe, a
//!   message whose payload must be read per datagram) is cut into plain packets with full
//!   checksums by a [`Segmenter`], as the kernel's software GSO would.
//!
//! The header is little-endian (virtio 1.0; TUN uses the host's order unless told otherwise,
//! and every Linux target this crate builds for that has TUN offloads is little-endian, or
//! sets `TUNSETVNETLE`).

use lb_core::IpProto;

use crate::checksum::{self, fold, get16, put16, sum};
use crate::error::{Layer, PacketError};
use crate::parse::{Family, Fragment, Parsed};

/// Bytes of the virtio-net header as TUN uses it by default (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_ECN`, or'ed into the GSO type.
const GSO_ECN: u8 = 0x80;

/// The kind of segmentation a super-packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GsoType {
    /// An ordinary packet.
    #[default]
    None,
    /// IPv4 TCP (`VIRTIO_NET_HDR_GSO_TCPV4`).
    TcpV4,
    /// IPv6 TCP (`VIRTIO_NET_HDR_GSO_TCPV6`).
    TcpV6,
    /// UDP segmentation of either family (`VIRTIO_NET_HDR_GSO_UDP_L4`): datagrams of
    /// `gso_size` payload bytes, each with its own UDP header.
    UdpL4,
}

impl GsoType {
    const fn code(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
        }
    }
}

/// A decoded virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VnetHdr {
    /// `NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is partial.
    pub needs_csum: bool,
    /// `DATA_VALID`: the sender vouches for the checksums (receive side only).
    pub data_valid: bool,
    /// Segmentation asked for.
    pub gso: GsoType,
    /// `GSO_ECN`: the TCP stream uses ECN (CWR stays on the first segment only).
    pub ecn: bool,
    /// Length of the headers before the payload (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the partial checksum's range starts (from the start of the packet or frame).
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// An ordinary packet: no offload.
    pub const NONE: VnetHdr = VnetHdr {
        needs_csum: false,
        data_valid: false,
        gso: GsoType::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Decodes the first [`VNET_HDR_LEN`] bytes of `b`.
    ///
    /// # Errors
    /// [`PacketError::Truncated`] for fewer bytes; [`PacketError::BadOffload`] for a GSO type
    /// this crate does not know (UFO, the deprecated UDP fragmentation offload, included: a
    /// device this crate opens never enables it).
    pub fn decode(b: &[u8]) -> Result<VnetHdr, PacketError> {
        let h: &[u8; VNET_HDR_LEN] = b
            .get(..VNET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(PacketError::Truncated {
                layer: Layer::Buffer,
                need: VNET_HDR_LEN,
                have: b.len(),
            })?;
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let gso = match h[1] & !GSO_ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            _ => return Err(PacketError::BadOffload("unknown GSO type")),
        };
        Ok(VnetHdr {
            needs_csum: h[0] & F_NEEDS_CSUM != 0,
            data_valid: h[0] & F_DATA_VALID != 0,
            gso,
            ecn: h[1] & GSO_ECN != 0,
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Encodes into the first [`VNET_HDR_LEN`] bytes of `out`.
    ///
    /// # Errors
    /// [`PacketError::NoRoom`] when `out` is shorter.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), PacketError> {
        let have = out.len();
        let h = out.get_mut(..VNET_HDR_LEN).ok_or(PacketError::NoRoom {
            need: VNET_HDR_LEN,
            have,
        })?;
        h[0] =
            (u8::from(self.needs_csum) * F_NEEDS_CSUM) | (u8::from(self.data_valid) * F_DATA_VALID);
        h[1] = self.gso.code() | if self.ecn { GSO_ECN } else { 0 };
        h[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        Ok(())
    }

    /// A super-packet (more than one wire segment may come of it).
    #[inline]
    pub fn is_gso(&self) -> bool {
        self.gso != GsoType::None
    }

    /// The header for what a [`Segmenter`] produced, or for a packet whose checksums were
    /// completed: nothing left to do for the device.
    #[inline]
    pub fn done(&self) -> VnetHdr {
        VnetHdr::NONE
    }
}

/// What the offload header says about a parsed packet's L4 checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// Complete (RFC 1071): rewrite it with RFC 1624 updates.
    Full,
    /// Partial, at the TCP or UDP checksum field of the packet's own transport header: rewrite
    /// it with [`crate::nat::rewrite_partial`].
    Partial,
    /// Partial somewhere else (an encapsulated packet's, or with an offset this crate does not
    /// expect): complete it first with [`complete_csum`].
    Elsewhere,
}

/// Checks `h` against the packet `p` parsed from the same buffer, and says how its L4
/// checksum stands.
///
/// # Errors
/// [`PacketError::BadOffload`]: a GSO type for another protocol or family, a GSO packet that
/// is a fragment or has no payload, a zero segment size, a GSO packet without a partial
/// checksum, a checksum start or field outside the packet.
pub fn classify(p: &Parsed, h: &VnetHdr) -> Result<L4Csum, PacketError> {
    let bad = PacketError::BadOffload;
    if h.is_gso() {
        let ok = match h.gso {
            GsoType::TcpV4 => p.family == Family::V4 && p.proto == IpProto::Tcp,
            GsoType::TcpV6 => p.family == Family::V6 && p.proto == IpProto::Tcp,
            GsoType::UdpL4 => p.proto == IpProto::Udp,
            GsoType::None => true,
        };
        if !ok {
            return Err(bad("GSO type does not match the packet"));
        }
        if p.fragment != Fragment::None || p.icmp.is_some() {
            return Err(bad("GSO on a fragment or an ICMP error"));
        }
        if h.gso_size == 0 {
            return Err(bad("GSO segment size 0"));
        }
        if !h.needs_csum {
            return Err(bad("GSO without a partial checksum"));
        }
    }
    if !h.needs_csum {
        return Ok(L4Csum::Full);
    }
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    if field.saturating_add(2) > p.end || start >= p.end || start < p.l4 {
        return Err(bad("checksum start or field outside the transport part"));
    }
    let own = p.fragment == Fragment::None
        && p.icmp.is_none()
        && start == p.l4
        && match p.proto {
            IpProto::Tcp => h.csum_offset == 16,
            IpProto::Udp => h.csum_offset == 6,
            _ => false,
        };
    Ok(if own {
        L4Csum::Partial
    } else if h.is_gso() {
        return Err(bad("GSO with a checksum not at its transport header"));
    } else {
        L4Csum::Elsewhere
    })
}

/// Completes a partial checksum in software (what the device would do): sums
/// `pkt[csum_start..end]` and stores the complement at `csum_start + csum_offset`. `end` is
/// the end of the IP packet (link padding excluded). A UDP result of 0 is written as `0xFFFF`
/// when `udp` says the field is a UDP checksum.
///
/// # Errors
/// [`PacketError::BadOffload`] when the range or the field lies outside `pkt[..end]`.
pub fn complete_csum(
    pkt: &mut [u8],
    h: &VnetHdr,
    end: usize,
    udp: bool,
) -> Result<(), PacketError> {
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    let range = pkt
        .get(start..end)
        .ok_or(PacketError::BadOffload("checksum range outside the packet"))?;
    if field + 2 > end {
        return Err(PacketError::BadOffload("checksum field outside the packet"));
    }
    let mut c = !fold(sum(range, 0));
    if udp && c == 0 {
        c = 0xFFFF;
    }
    put16(pkt, field, c).ok_or(PacketError::BadOffload("checksum field outside the packet"))
}

/// The number of wire segments `p` stands for under `h` (1 for an ordinary packet).
#[inline]
pub fn segments(p: &Parsed, h: &VnetHdr) -> u32 {
    if !h.is_gso() || h.gso_size == 0 {
        return 1;
    }
    let payload = p.end.saturating_sub(p.payload);
    u32::try_from(payload.div_ceil(usize::from(h.gso_size)).max(1)).unwrap_or(u32::MAX)
}

/// The largest IP packet (headers and one segment's payload) among the segments of `p`: what
/// a path MTU applies to. For an ordinary packet its IP length.
#[inline]
pub fn largest_segment(p: &Parsed, h: &VnetHdr) -> usize {
    let ip = p.end - p.l3;
    if !h.is_gso() {
        return ip;
    }
    let headers = p.payload - p.l3;
    ip.min(headers + usize::from(h.gso_size))
}

/// Cuts a GSO super-packet into plain packets with complete checksums, one at a time into
/// caller buffers (no allocation), as the kernel's software segmentation would:
/// - TCP: each segment carries `gso_size` payload bytes (the last one the rest) with the
///   sequence number advanced, FIN and PSH on the last segment only, CWR on the first only;
///   IPv4 identifications count up from the super-packet's;
/// - UDP (`UDP_L4`): each datagram carries `gso_size` payload bytes with its own length.
///
/// An ordinary packet comes out once, its partial checksum (if any) completed.
#[derive(Debug, Clone)]
pub struct Segmenter {
    p: Parsed,
    h: VnetHdr,
    csum: L4Csum,
    mss: usize,
    /// Payload offset of the next segment.
    next: usize,
    index: u32,
}

impl Segmenter {
    /// Prepares to segment `pkt` (parsed as `p`) under `h`.
    ///
    /// # Errors
    /// As [`classify`]; [`PacketError::BadOffload`] for a partial checksum elsewhere on a
    /// packet that is not GSO and not TCP/UDP (nothing to segment, complete it instead).
    pub fn new(pkt: &[u8], p: &Parsed, h: &VnetHdr) -> Result<Segmenter, PacketError> {
        p.check(pkt.len())?;
        let csum = classify(p, h)?;
        let mss = if h.is_gso() {
            usize::from(h.gso_size)
        } else {
            usize::MAX
        };
        Ok(Segmenter {
            p: *p,
            h: *h,
            csum,
            mss,
            next: p.payload,
            index: 0,
        })
    }

    /// Segments still to come.
    pub fn remaining(&self) -> u32 {
        if self.next >= self.p.end {
            return u32::from(self.index == 0);
        }
        let left = self.p.end - self.next;
        u32::try_from(left.div_ceil(self.mss)).unwrap_or(u32::MAX)
    }

    /// Writes the next segment of `pkt` (the buffer given to [`Segmenter::new`]) into `out`;
    /// returns its length, or `None` when all were written.
    ///
    /// # Errors
    /// [`PacketError::NoRoom`] when `out` is too small for the segment (nothing is consumed:
    /// call again with a bigger buffer); [`PacketError::Truncated`] when `pkt` is not the
    /// buffer `p` was parsed from.
    pub fn next_into(&mut self, pkt: &[u8], out: &mut [u8]) -> Result<Option<usize>, PacketError> {
        let p = &self.p;
        p.check(pkt.len())?;
        // An ordinary packet, or an empty GSO one (no payload: one segment of headers).
        let first = self.index == 0;
        if self.next >= p.end && !first {
            return Ok(None);
        }
        let take = (p.end - self.next).min(self.mss);
        let last = self.next + take >= p.end;
        let hdrs = p.payload;
        let len = hdrs + take;
        if out.len() < len {
            return Err(PacketError::NoRoom {
                need: len,
                have: out.len(),
            });
        }
        out[..hdrs].copy_from_slice(&pkt[..hdrs]);
        out[hdrs..len].copy_from_slice(&pkt[self.next..self.next + take]);
        let seg = &mut out[..len];
        let offset = self.next - p.payload;
        let i = self.index;
        self.next += take;
        self.index += 1;
        if !self.h.is_gso() {
            match self.csum {
                L4Csum::Full => return Ok(Some(len)),
                L4Csum::Elsewhere => {
                    complete_csum(seg, &self.h, len, false)?;
                    return Ok(Some(len));
                }
                L4Csum::Partial => {}
            }
        }
        // IP lengths (and the IPv4 identification and header checksum).
        let l3 = p.l3;
        match p.family {
            Family::V4 => {
                let tot = u16::try_from(len - l3).map_err(|_| PacketError::NoRoom {
                    need: len - l3,
                    have: usize::from(u16::MAX),
                })?;
                let _ = put16(seg, l3 + 2, tot);
                if self.h.is_gso() {
                    let id = get16(seg, l3 + 4).unwrap_or(0);
                    let _ = put16(seg, l3 + 4, id.wrapping_add(i as u16));
                }
                let _ = put16(seg, l3 + 10, 0);
                if let Some(c) = seg.get(l3..p.l4).and_then(checksum::ipv4_header) {
                    let _ = put16(seg, l3 + 10, c);
                }
            }
            Family::V6 => {
                let pl = u16::try_from(len - l3 - 40).map_err(|_| PacketError::NoRoom {
                    need: len - l3 - 40,
                    have: usize::from(u16::MAX),
                })?;
                let _ = put16(seg, l3 + 4, pl);
            }
        }
        let l4 = p.l4;
        let l4len = len - l4;
        let (field, udp, proto) = match p.proto {
            IpProto::Tcp => {
                if self.h.is_gso() {
                    let seq =
                        u32::from_be_bytes([seg[l4 + 4], seg[l4 + 5], seg[l4 + 6], seg[l4 + 7]]);
                    let seq = seq.wrapping_add(offset as u32);
                    seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                    const FIN: u8 = 0x01;
                    const PSH: u8 = 0x08;
                    const CWR: u8 = 0x80;
                    if !last {
                        seg[l4 + 13] &= !(FIN | PSH);
                    }
                    if !first {
                        seg[l4 + 13] &= !CWR;
                    }
                }
                (l4 + 16, false, 6u8)
            }
            IpProto::Udp => {
                let ul = u16::try_from(l4len).unwrap_or(u16::MAX);
                let _ = put16(seg, l4 + 4, ul);
                (l4 + 6, true, 17u8)
            }
            // `classify` gives `Partial` and GSO for TCP and UDP only.
            _ => return Ok(Some(len)),
        };
        // Full checksum over the pseudo-header and the segment.
        let _ = put16(seg, field, 0);
        let ps = checksum::pseudo_sum(seg, p, proto, l4len);
        let mut c = !fold(sum(&seg[l4..len], ps));
        if udp && c == 0 {
            c = 0xFFFF;
        }
        let _ = put16(seg, field, c);
        Ok(Some(len))
    }
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
