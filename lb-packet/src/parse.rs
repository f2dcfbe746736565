//! Validation in place: offsets of every layer and the flow key, without allocating.
//!
//! After [`parse`] returns `Ok(p)`, every offset in `p` lies within the buffer and the headers
//! named there are complete, so the rewrites in this crate read and write them without further
//! length checks failing (they still use checked access: a `Parsed` from another buffer yields
//! errors, never panics).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_core::{FlowKey, IpProto};

use crate::error::{Layer, PacketError};

/// The most IPv6 extension headers the parser walks before giving up.
pub const MAX_EXT_HEADERS: usize = 8;

/// What the buffer starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// A raw IP packet (TUN device).
    Ip,
    /// An Ethernet II frame, optionally with up to two 802.1Q / 802.1ad tags (TAP device).
    Ethernet,
}

/// IP address family of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Fragmentation status of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment (offset 0, more fragments follow): it carries the transport header.
    First,
    /// A later fragment: no transport header, the key's ports are zero (hash the 3-tuple).
    NonFirst,
}

/// The packet quoted inside an ICMP / ICMPv6 error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Embedded {
    /// Family of the quoted packet (always that of the outer packet).
    pub family: Family,
    /// Offset of the quoted IP header.
    pub l3: usize,
    /// Offset of the quoted transport header.
    pub l4: usize,
    /// End of the quoted bytes (the quote is usually truncated: `end` ≤ its claimed length).
    pub end: usize,
    /// Transport protocol of the quoted packet.
    pub proto: IpProto,
    /// Fragment status of the quoted packet.
    pub fragment: Fragment,
    /// The quoted packet's own flow key, as written in it (ports zero if unavailable); always
    /// `parsed.key.reversed()`.
    pub key: FlowKey,
}

/// The result of [`parse`]: validated offsets and the flow key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Parsed {
    /// What the buffer started with.
    pub link: Link,
    /// Offset of the IP header (0 for [`Link::Ip`]).
    pub l3: usize,
    /// Offset of the transport header (after IPv4 options / IPv6 extension headers); for a
    /// non-first fragment, the start of the fragment data.
    pub l4: usize,
    /// Offset of the transport payload (`l4` when there is no transport header).
    pub payload: usize,
    /// End of the IP packet (from its length field); bytes after it are link padding.
    pub end: usize,
    /// Address family.
    pub family: Family,
    /// Transport protocol (the last next-header for IPv6).
    pub proto: IpProto,
    /// The flow key. For ICMP errors it is the quoted packet's key *reversed*: the key of the
    /// flow this error travels with. For ICMP echo both ports hold the identifier.
    pub key: FlowKey,
    /// Fragment status.
    pub fragment: Fragment,
    /// For ICMP / ICMPv6 error messages, the quoted packet.
    pub icmp: Option<Embedded>,
}

impl Parsed {
    /// The transport payload: `buf[payload..end]` (empty if `buf` is not the parsed buffer).
    #[inline]
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.payload..self.end).unwrap_or(&[])
    }

    /// Checks that the offsets are ordered and lie within a buffer of `len` bytes (they do for
    /// a `Parsed` from [`parse`] of that buffer; the fields are public, so rewrites check).
    #[inline(always)]
    pub(crate) fn check(&self, len: usize) -> Result<(), PacketError> {
        let ok = self.l3 <= self.l4
            && self.l4 <= self.payload
            && self.payload <= self.end
            && self.end <= len
            && self.icmp.is_none_or(|e| {
                self.l4 <= e.l3 && e.l3 <= e.l4 && e.l4 <= e.end && e.end <= self.end
            });
        if ok {
            Ok(())
        } else {
            Err(PacketError::Truncated {
                layer: Layer::Buffer,
                need: self.end,
                have: len,
            })
        }
    }

    /// Whether the packet is an ICMP / ICMPv6 error quoting another packet.
    #[inline]
    pub fn is_icmp_error(&self) -> bool {
        self.icmp.is_some()
    }
}

#[inline(always)]
fn trunc(layer: Layer, need: usize, have: usize) -> PacketError {
    PacketError::Truncated { layer, need, have }
}

/// Checks that `buf[start..start + n]` exists within `limit`; returns `start + n`.
#[inline(always)]
fn need(limit: usize, layer: Layer, start: usize, n: usize) -> Result<usize, PacketError> {
    let have = limit.saturating_sub(start);
    if have < n {
        Err(trunc(layer, n, have))
    } else {
        Ok(start + n)
    }
}

#[inline(always)]
fn rd16(buf: &[u8], off: usize) -> u16 {
    match buf.get(off..off + 2) {
        Some(&[a, b]) => u16::from_be_bytes([a, b]),
        _ => 0,
    }
}

#[inline(always)]
fn rd8(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

#[inline(always)]
fn v4addr(buf: &[u8], off: usize) -> Ipv4Addr {
    match buf.get(off..off + 4) {
        Some(&[a, b, c, d]) => Ipv4Addr::new(a, b, c, d),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

#[inline(always)]
fn v6addr(buf: &[u8], off: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    if let Some(s) = buf.get(off..off + 16) {
        a.copy_from_slice(s);
    }
    Ipv6Addr::from(a)
}

/// The IP layer of a packet.
struct Ip {
    family: Family,
    l4: usize,
    end: usize,
    proto: u8,
    fragment: Fragment,
    src: IpAddr,
    dst: IpAddr,
}

/// Parses and validates `buf` as an IP packet or Ethernet frame.
///
/// Checks: Ethernet length and EtherType (IPv4 / IPv6, up to two VLAN tags); IPv4 version,
/// IHL ≥ 5, IHL·4 ≤ total length ≤ buffer; IPv6 version, payload length ≤ buffer, at most
/// [`MAX_EXT_HEADERS`] extension headers each within the packet; TCP data offset ≥ 5 and within
/// the packet; UDP length ≥ 8 and within the packet; complete SCTP / ICMP headers. Transport
/// headers are checked on whole datagrams and first fragments (which must hold the whole
/// transport header, RFC 1858); a non-first fragment yields ports 0. An ICMP / ICMPv6 error must
/// quote an IP header of the same family and at least the first 8 bytes of its transport header
/// (when that packet is not a non-first fragment).
///
/// # Errors
/// A [`PacketError`] naming the layer and what was wrong. Never panics, on any input.
// Inlined so that the caller's optimiser keeps `Parsed` in registers instead of copying it
// through memory (store-forwarding stalls cost more than the parse itself).
#[inline(always)]
pub fn parse(buf: &[u8], link: Link) -> Result<Parsed, PacketError> {
    let l3 = match link {
        Link::Ip => 0,
        Link::Ethernet => ethernet(buf)?,
    };
    let ip = ip_layer(buf, l3, false)?;
    let proto = IpProto::from_number(ip.proto);
    let mut sp = 0;
    let mut dp = 0;
    let mut payload = ip.l4;
    let mut icmp = None;
    let mut inner_key: Option<FlowKey> = None;
    if ip.fragment != Fragment::NonFirst {
        let l4 = ip.l4;
        let end = ip.end;
        match proto {
            IpProto::Tcp => {
                need(end, Layer::Tcp, l4, 20)?;
                let off = rd8(buf, l4 + 12) >> 4;
                if off < 5 || l4 + usize::from(off) * 4 > end {
                    return Err(PacketError::BadDataOffset {
                        layer: Layer::Tcp,
                        offset: off,
                    });
                }
                payload = l4 + usize::from(off) * 4;
            }
            IpProto::Udp => {
                need(end, Layer::Udp, l4, 8)?;
                let len = usize::from(rd16(buf, l4 + 4));
                if ip.fragment == Fragment::None && (len < 8 || l4 + len > end) {
                    return Err(PacketError::LengthMismatch {
                        layer: Layer::Udp,
                        claimed: len,
                        header: 8,
                        have: end - l4,
                    });
                }
                payload = l4 + 8;
            }
            IpProto::Sctp => {
                need(end, Layer::Sctp, l4, 12)?;
                payload = l4 + 12;
            }
            IpProto::Icmp | IpProto::Icmpv6 => {
                let v6 = proto == IpProto::Icmpv6;
                let layer = if v6 { Layer::Icmpv6 } else { Layer::Icmp };
                if (ip.family == Family::V6) != v6 {
                    // ICMPv4 over IPv6 or vice versa: treat as an opaque protocol.
                    payload = l4;
                } else {
                    need(end, layer, l4, 8)?;
                    payload = l4 + 8;
                    let ty = rd8(buf, l4);
                    if is_echo(ty, v6) {
                        sp = rd16(buf, l4 + 4);
                        dp = sp;
                    } else if is_error(ty, v6) {
                        let (e, k) = embedded(buf, l4 + 8, end, ip.family)?;
                        icmp = Some(e);
                        inner_key = Some(k);
                    }
                }
            }
            IpProto::Other(_) => {}
        }
        if proto.has_ports() {
            sp = rd16(buf, l4);
            dp = rd16(buf, l4 + 2);
        }
    }
    let key = match inner_key {
        Some(k) => k.reversed(),
        None => mk_key(ip.src, sp, ip.dst, dp, proto),
    };
    Ok(Parsed {
        link,
        l3,
        l4: ip.l4,
        payload,
        end: ip.end,
        family: ip.family,
        proto,
        key,
        fragment: ip.fragment,
        icmp,
    })
}

#[inline(always)]
fn mk_key(src: IpAddr, sp: u16, dst: IpAddr, dp: u16, proto: IpProto) -> FlowKey {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => FlowKey::v4(s, sp, d, dp, proto),
        (IpAddr::V6(s), IpAddr::V6(d)) => FlowKey::v6(s, sp, d, dp, proto),
        // ip_layer builds both addresses of one family.
        _ => FlowKey::v4(Ipv4Addr::UNSPECIFIED, sp, Ipv4Addr::UNSPECIFIED, dp, proto),
    }
}

/// ICMP echo request / reply types.
#[inline(always)]
pub(crate) fn is_echo(ty: u8, v6: bool) -> bool {
    if v6 {
        ty == 128 || ty == 129
    } else {
        ty == 8 || ty == 0
    }
}

/// ICMP error types that quote the offending packet: v4 destination unreachable (3), source
/// quench (4), redirect (5), time exceeded (11), parameter problem (12); v6 destination
/// unreachable (1), packet too big (2), time exceeded (3), parameter problem (4).
#[inline(always)]
pub(crate) fn is_error(ty: u8, v6: bool) -> bool {
    if v6 {
        (1..=4).contains(&ty)
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

/// Returns the offset of the IP header.
#[inline(always)]
fn ethernet(buf: &[u8]) -> Result<usize, PacketError> {
    let mut off = 12;
    need(buf.len(), Layer::Ethernet, 0, 14)?;
    let mut et = rd16(buf, off);
    let mut tags = 0;
    while (et == 0x8100 || et == 0x88a8) && tags < 2 {
        need(buf.len(), Layer::Ethernet, 0, off + 6)?;
        off += 4;
        et = rd16(buf, off);
        tags += 1;
    }
    match et {
        0x0800 | 0x86DD => Ok(off + 2),
        other => Err(PacketError::UnsupportedEtherType(other)),
    }
}

/// The IP layer at `l3`. For a quoted (`inner`) packet, the claimed length may exceed the bytes
/// present: `end` is clipped to the buffer.
#[inline(always)]
fn ip_layer(buf: &[u8], l3: usize, inner: bool) -> Result<Ip, PacketError> {
    let avail = buf.len();
    let first = buf.get(l3).copied().ok_or(trunc(
        if inner { Layer::InnerIp } else { Layer::Ipv4 },
        1,
        0,
    ))?;
    match first >> 4 {
        4 => ipv4(buf, l3, avail, inner),
        6 => ipv6(buf, l3, avail, inner),
        v => Err(PacketError::BadVersion {
            layer: if inner { Layer::InnerIp } else { Layer::Ipv4 },
            version: v,
        }),
    }
}

#[inline(always)]
fn ipv4(buf: &[u8], l3: usize, avail: usize, inner: bool) -> Result<Ip, PacketError> {
    let layer = if inner { Layer::InnerIp } else { Layer::Ipv4 };
    need(avail, layer, l3, 20)?;
    let ihl = rd8(buf, l3) & 0x0F;
    if ihl < 5 {
        return Err(PacketError::BadIhl { layer, ihl });
    }
    let hlen = usize::from(ihl) * 4;
    let total = usize::from(rd16(buf, l3 + 2));
    let have = avail - l3;
    if total < hlen || (!inner && total > have) {
        return Err(PacketError::LengthMismatch {
            layer,
            claimed: total,
            header: hlen,
            have,
        });
    }
    need(avail, layer, l3, hlen)?;
    let end = l3 + total.min(have);
    let frag = rd16(buf, l3 + 6);
    let offset = frag & 0x1FFF;
    let more = frag & 0x2000 != 0;
    let fragment = if offset != 0 {
        Fragment::NonFirst
    } else if more {
        Fragment::First
    } else {
        Fragment::None
    };
    Ok(Ip {
        family: Family::V4,
        l4: l3 + hlen,
        end,
        proto: rd8(buf, l3 + 9),
        fragment,
        src: IpAddr::V4(v4addr(buf, l3 + 12)),
        dst: IpAddr::V4(v4addr(buf, l3 + 16)),
    })
}

#[inline(always)]
fn ipv6(buf: &[u8], l3: usize, avail: usize, inner: bool) -> Result<Ip, PacketError> {
    let layer = if inner { Layer::InnerIp } else { Layer::Ipv6 };
    need(avail, layer, l3, 40)?;
    let plen = usize::from(rd16(buf, l3 + 4));
    let have = avail - l3;
    if !inner && 40 + plen > have {
        return Err(PacketError::LengthMismatch {
            layer,
            claimed: 40 + plen,
            header: 40,
            have,
        });
    }
    let end = l3 + (40 + plen).min(have);
    let mut nh = rd8(buf, l3 + 6);
    let mut off = l3 + 40;
    let mut fragment = Fragment::None;
    let elayer = if inner {
        Layer::InnerIp
    } else {
        Layer::Ipv6Ext
    };
    let mut n = 0;
    loop {
        let len = match nh {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6: (len + 1) * 8.
            0 | 43 | 60 | 135 | 139 | 140 => {
                need(end, elayer, off, 8)?;
                (usize::from(rd8(buf, off + 1)) + 1) * 8
            }
            // Authentication header (RFC 4302): (len + 2) * 4.
            51 => {
                need(end, elayer, off, 8)?;
                (usize::from(rd8(buf, off + 1)) + 2) * 4
            }
            // Fragment header (RFC 8200 §4.5).
            44 => {
                need(end, elayer, off, 8)?;
                let fo = rd16(buf, off + 2);
                fragment = if fo >> 3 != 0 {
                    Fragment::NonFirst
                } else if fo & 1 != 0 {
                    Fragment::First
                } else {
                    Fragment::None
                };
                8
            }
            _ => break,
        };
        if n == MAX_EXT_HEADERS {
            return Err(PacketError::TooManyExtensionHeaders {
                limit: MAX_EXT_HEADERS,
            });
        }
        n += 1;
        need(end, elayer, off, len)?;
        let next = rd8(buf, off);
        off += len;
        nh = next;
        if fragment == Fragment::NonFirst {
            break;
        }
    }
    Ok(Ip {
        family: Family::V6,
        l4: off,
        end,
        proto: nh,
        fragment,
        src: IpAddr::V6(v6addr(buf, l3 + 8)),
        dst: IpAddr::V6(v6addr(buf, l3 + 24)),
    })
}

/// The packet quoted in an ICMP error, starting at `l3` and ending at `end`.
#[cold]
#[inline(never)]
fn embedded(
    buf: &[u8],
    l3: usize,
    end: usize,
    family: Family,
) -> Result<(Embedded, FlowKey), PacketError> {
    let view = buf.get(..end).unwrap_or(buf);
    let ip = ip_layer(view, l3, true)?;
    if ip.family != family {
        return Err(PacketError::InnerFamilyMismatch);
    }
    let proto = IpProto::from_number(ip.proto);
    let (mut sp, mut dp) = (0, 0);
    if ip.fragment != Fragment::NonFirst {
        let v6 = family == Family::V6;
        let icmp = (proto == IpProto::Icmp && !v6) || (proto == IpProto::Icmpv6 && v6);
        if proto.has_ports() || icmp {
            // RFC 792 quotes at least 8 bytes of the original datagram's data.
            need(ip.end, Layer::InnerL4, ip.l4, 8)?;
        }
        if proto.has_ports() {
            sp = rd16(buf, ip.l4);
            dp = rd16(buf, ip.l4 + 2);
        } else if icmp && is_echo(rd8(buf, ip.l4), v6) {
            sp = rd16(buf, ip.l4 + 4);
            dp = sp;
        }
    }
    let key = mk_key(ip.src, sp, ip.dst, dp, proto);
    let e = Embedded {
        family,
        l3,
        l4: ip.l4,
        end: ip.end,
        proto,
        fragment: ip.fragment,
        key,
    };
    Ok((e, key))
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
