//! Fragment identity: what ties the fragments of one IP datagram together.
//!
//! RFC 791 §3.2: "The identification field is used to distinguish the fragments of one datagram
//! from those of another. [...] the receiver [uses] the source, destination, protocol, and
//! identification fields to identify the datagram." RFC 8200 §4.5 (IPv6): "the Fragment header
//! [...] Identification [...] the original packet is identified by the source address,
//! destination address, and Fragment Identification".
//!
//! [`fragment_info`] reads these fields from a packet [`crate::parse`] found fragmented, plus
//! where its fragment data starts and where it sits in the original datagram, so that a caller
//! can tie a non-first fragment (no ports) to the decision made for its first fragment, and
//! tell when every byte of a datagram has gone through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::{Layer, PacketError};
use crate::parse::{Family, Fragment, Parsed, MAX_EXT_HEADERS};

/// A fragment's place in its datagram, and the datagram's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct FragmentInfo {
    /// Source address (the IP header's, not the flow key's: for an ICMP error they differ).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4: the protocol field; IPv6: the Fragment header's Next Header (the same in every
    /// fragment of a datagram, RFC 8200 §4.5).
    pub proto: u8,
    /// Identification: 16 bits for IPv4, 32 bits for IPv6.
    pub id: u32,
    /// Offset of this fragment's data in the original datagram's fragmentable part, in bytes.
    pub offset: u32,
    /// More fragments follow (the MF / M flag).
    pub more: bool,
    /// Offset in the buffer where this fragment's data starts (after the IPv4 header, or after
    /// the IPv6 Fragment header); the data runs to `parsed.end`.
    pub data: usize,
    /// Bytes of fragment data in this packet (`parsed.end - data`).
    pub len: u32,
}

impl FragmentInfo {
    /// The end of this fragment's data in the original datagram (`offset + len`).
    #[inline]
    pub fn data_end(&self) -> u32 {
        self.offset.saturating_add(self.len)
    }
}

#[inline(always)]
fn rd16(buf: &[u8], off: usize) -> Option<u16> {
    match buf.get(off..off.checked_add(2)?) {
        Some(&[a, b]) => Some(u16::from_be_bytes([a, b])),
        _ => None,
    }
}

fn trunc(layer: Layer, need: usize, have: usize) -> PacketError {
    PacketError::Truncated { layer, need, have }
}

/// The fragment identity and placement of `buf`, which `p` (from [`crate::parse`] of the same
/// buffer) says is a fragment.
///
/// # Errors
/// [`PacketError::NotApplicable`] for a whole datagram (`p.fragment == Fragment::None`);
/// [`PacketError::Truncated`] if `p` does not describe `buf`; for IPv6,
/// [`PacketError::TooManyExtensionHeaders`] or `Truncated` if the Fragment header is not
/// within [`MAX_EXT_HEADERS`] complete extension headers. Never panics.
pub fn fragment_info(buf: &[u8], p: &Parsed) -> Result<FragmentInfo, PacketError> {
    if p.fragment == Fragment::None {
        return Err(PacketError::NotApplicable("not a fragment"));
    }
    p.check(buf.len())?;
    let l3 = p.l3;
    match p.family {
        Family::V4 => {
            let h =
                buf.get(l3..l3 + 20)
                    .ok_or(trunc(Layer::Ipv4, 20, buf.len().saturating_sub(l3)))?;
            let ihl = usize::from(h[0] & 0x0F) * 4;
            let fo = u16::from_be_bytes([h[6], h[7]]);
            let data = l3 + ihl;
            if data > p.end {
                return Err(trunc(Layer::Ipv4, ihl, p.end - l3));
            }
            Ok(FragmentInfo {
                src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
                dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
                proto: h[9],
                id: u32::from(u16::from_be_bytes([h[4], h[5]])),
                // RFC 791: "The fragment offset is measured in units of 8 octets".
                offset: u32::from(fo & 0x1FFF) * 8,
                more: fo & 0x2000 != 0,
                data,
                len: (p.end - data) as u32,
            })
        }
        Family::V6 => {
            let h =
                buf.get(l3..l3 + 40)
                    .ok_or(trunc(Layer::Ipv6, 40, buf.len().saturating_sub(l3)))?;
            let mut a = [0u8; 16];
            a.copy_from_slice(&h[8..24]);
            let src = IpAddr::V6(Ipv6Addr::from(a));
            a.copy_from_slice(&h[24..40]);
            let dst = IpAddr::V6(Ipv6Addr::from(a));
            let mut nh = h[6];
            let mut off = l3 + 40;
            for _ in 0..MAX_EXT_HEADERS {
                let need = |n: usize| {
                    if off + n > p.end {
                        Err(trunc(Layer::Ipv6Ext, n, p.end.saturating_sub(off)))
                    } else {
                        Ok(())
                    }
                };
                need(8)?;
                let next = buf.get(off).copied().unwrap_or(0);
                let len = match nh {
                    44 => {
                        let fo = rd16(buf, off + 2).unwrap_or(0);
                        let id = buf
                            .get(off + 4..off + 8)
                            .and_then(|s| <[u8; 4]>::try_from(s).ok())
                            .map_or(0, u32::from_be_bytes);
                        return Ok(FragmentInfo {
                            src,
                            dst,
                            proto: next,
                            id,
                            offset: u32::from(fo >> 3) * 8,
                            more: fo & 1 != 0,
                            data: off + 8,
                            len: (p.end - (off + 8)) as u32,
                        });
                    }
                    0 | 43 | 60 | 135 | 139 | 140 => {
                        (usize::from(buf.get(off + 1).copied().unwrap_or(0)) + 1) * 8
                    }
                    51 => (usize::from(buf.get(off + 1).copied().unwrap_or(0)) + 2) * 4,
                    _ => return Err(PacketError::NotApplicable("no IPv6 fragment header")),
                };
                need(len)?;
                off += len;
                nh = next;
            }
            Err(PacketError::TooManyExtensionHeaders {
                limit: MAX_EXT_HEADERS,
            })
        }
    }
}

#[cfg(test)]
#[path = "frag_tests.rs"]
mod tests;
