//! Tunnel mode: IPIP (IPv4 in IPv4, RFC 2003), IP6IP6 and IPv4-in-IPv6 (RFC 2473), and GUE
//! (Generic UDP Encapsulation, draft-ietf-intarea-gue, variant 0) encapsulation into the headroom
//! of a [`PacketBuf`], and decapsulation for the backend side.
//!
//! As a router would: the inner TTL / hop limit is decremented when [`TunnelParams::decrement_ttl`]
//! is set (RFC 2003 §3.1: a packet whose TTL would reach zero is not encapsulated:
//! [`PacketError::TtlExpired`], answer with [`crate::icmp::error_reply`] and
//! [`crate::icmp::IcmpError::TimeExceeded`]). The outer IPv4 DF bit is copied from the inner
//! packet (set for IPv6 inner packets). When the encapsulated packet would exceed
//! [`TunnelParams::path_mtu`] and may not be fragmented (inner IPv4 with DF, or IPv6), nothing is
//! written and [`Encap::TooBig`] carries the MTU to report with [`crate::icmp::error_reply`]
//! (RFC 2003 §5.1, RFC 2473 §7.2). An inner IPv4 packet without DF is encapsulated anyway with
//! DF clear on the outer header, and the sender's IP stack fragments the outer packet.
//!
//! The DSCP/ECN byte is copied to the outer header (RFC 6040 normal mode). The outer IPv4
//! identification is copied from the inner IPv4 packet (0 when the outer has DF, RFC 6864).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_core::IpProto;

use crate::buf::PacketBuf;
use crate::checksum::{self, get16, put16, update16};
use crate::error::{Layer, PacketError};
use crate::parse::{parse, Family, Fragment, Link};

/// Length of an outer IPv4 header.
pub const IPV4_HEADER: usize = 20;
/// Length of an outer IPv6 header.
pub const IPV6_HEADER: usize = 40;
/// Length of the UDP + GUE variant-0 headers.
pub const GUE_OVERHEAD: usize = 8 + 4;
/// Headroom that suffices for every encapsulation of this module.
pub const MAX_OVERHEAD: usize = IPV6_HEADER + GUE_OVERHEAD;

/// Per-tunnel settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelParams {
    /// TTL / hop limit of the outer header.
    pub ttl: u8,
    /// Path MTU towards the backend: the largest outer packet allowed.
    pub path_mtu: u16,
    /// Decrement the inner TTL / hop limit as a router forwarding into the tunnel would.
    pub decrement_ttl: bool,
}

impl Default for TunnelParams {
    fn default() -> Self {
        TunnelParams {
            ttl: 64,
            path_mtu: 1500,
            decrement_ttl: true,
        }
    }
}

/// Outcome of an encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Encap {
    /// The packet was encapsulated; the buffer now starts with the outer header.
    Done,
    /// The packet would exceed the path MTU and may not be fragmented; nothing was written.
    /// Reply to the sender with "fragmentation needed" / "packet too big" carrying `mtu`, the
    /// largest inner packet that fits.
    TooBig {
        /// The MTU to report to the sender.
        mtu: u16,
    },
}

/// What a decapsulation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decap {
    /// Source address of the removed outer header (the balancer).
    pub outer_src: IpAddr,
    /// Destination address of the removed outer header (this host).
    pub outer_dst: IpAddr,
    /// Family of the inner packet.
    pub inner: Family,
}

#[derive(Clone, Copy)]
enum OuterAddrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr, u32),
}

/// Encapsulates the IPv4 packet in `pb` in an outer IPv4 header (IPIP, protocol 4).
///
/// # Errors
/// [`PacketError::BadVersion`] if the packet is not IPv4; [`PacketError::NoRoom`] without 20
/// bytes of headroom; [`PacketError::TtlExpired`]; [`PacketError::Truncated`] for a packet shorter
/// than its IP header.
#[inline]
pub fn encap_ipip<B: AsRef<[u8]> + AsMut<[u8]>>(
    pb: &mut PacketBuf<B>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    t: &TunnelParams,
) -> Result<Encap, PacketError> {
    encap(pb, OuterAddrs::V4(src, dst), None, Some(Family::V4), t)
}

/// Encapsulates the IPv6 packet in `pb` in an outer IPv6 header (RFC 2473, next header 41) with
/// the given 20-bit flow label (use a flow hash, RFC 6438).
///
/// # Errors
/// As [`encap_ipip`], for IPv6 and 40 bytes of headroom.
#[inline]
pub fn encap_ip6ip6<B: AsRef<[u8]> + AsMut<[u8]>>(
    pb: &mut PacketBuf<B>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    flow_label: u32,
    t: &TunnelParams,
) -> Result<Encap, PacketError> {
    encap(
        pb,
        OuterAddrs::V6(src, dst, flow_label),
        None,
        Some(Family::V6),
        t,
    )
}

/// Encapsulates the IPv4 packet in `pb` in an outer IPv6 header (RFC 2473, next header 4).
///
/// # Errors
/// As [`encap_ip6ip6`], for an IPv4 inner packet.
#[inline]
pub fn encap_4in6<B: AsRef<[u8]> + AsMut<[u8]>>(
    pb: &mut PacketBuf<B>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    flow_label: u32,
    t: &TunnelParams,
) -> Result<Encap, PacketError> {
    encap(
        pb,
        OuterAddrs::V6(src, dst, flow_label),
        None,
        Some(Family::V4),
        t,
    )
}

/// Encapsulates the IP packet in `pb` (either family) in UDP + GUE variant 0 to `dst_port`
/// (the GUE port of the user's choice), with `src_port` as flow entropy so receivers' RSS
/// spreads flows (use [`entropy_port`]). Outer IPv4 carries UDP checksum 0 (RFC 768); outer IPv6
/// a computed checksum (never 0).
///
/// # Errors
/// [`PacketError::FamilyMismatch`] if `src` and `dst` differ in family; otherwise as
/// [`encap_ipip`] with 32 (IPv4) or 52 (IPv6) bytes of headroom.
#[inline]
pub fn encap_gue<B: AsRef<[u8]> + AsMut<[u8]>>(
    pb: &mut PacketBuf<B>,
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
    src_port: u16,
    t: &TunnelParams,
) -> Result<Encap, PacketError> {
    let outer = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => OuterAddrs::V4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => OuterAddrs::V6(s, d, u32::from(src_port)),
        _ => return Err(PacketError::FamilyMismatch),
    };
    encap(pb, outer, Some((src_port, dst_port)), None, t)
}

/// A UDP source port in the dynamic range 49152–65535 derived from a flow hash (RFC 7605 §5.1,
/// the GUE entropy recommendation).
#[inline]
pub fn entropy_port(flow_hash: u64) -> u16 {
    let h = (flow_hash ^ (flow_hash >> 32) ^ (flow_hash >> 16)) as u16;
    0xC000 | (h & 0x3FFF)
}

fn encap<B: AsRef<[u8]> + AsMut<[u8]>>(
    pb: &mut PacketBuf<B>,
    outer: OuterAddrs,
    udp: Option<(u16, u16)>,
    want: Option<Family>,
    t: &TunnelParams,
) -> Result<Encap, PacketError> {
    let len = pb.len();
    let inner = pb.data();
    let v = inner.first().map_or(0, |b| b >> 4);
    let (family, df, tos, ident) = match v {
        4 => {
            if len < 20 {
                return Err(PacketError::Truncated {
                    layer: Layer::Ipv4,
                    need: 20,
                    have: len,
                });
            }
            let frag = get16(inner, 6).unwrap_or(0);
            let df = frag & 0x4000 != 0;
            let id = if df { 0 } else { get16(inner, 4).unwrap_or(0) };
            (Family::V4, df, inner.get(1).copied().unwrap_or(0), id)
        }
        6 => {
            if len < 40 {
                return Err(PacketError::Truncated {
                    layer: Layer::Ipv6,
                    need: 40,
                    have: len,
                });
            }
            let tc = (get16(inner, 0).unwrap_or(0) >> 4) as u8;
            (Family::V6, true, tc, 0)
        }
        v => {
            return Err(PacketError::BadVersion {
                layer: if want == Some(Family::V6) {
                    Layer::Ipv6
                } else {
                    Layer::Ipv4
                },
                version: v,
            })
        }
    };
    if let Some(w) = want {
        if w != family {
            return Err(PacketError::BadVersion {
                layer: if w == Family::V4 {
                    Layer::Ipv4
                } else {
                    Layer::Ipv6
                },
                version: v,
            });
        }
    }
    let ip_len = match outer {
        OuterAddrs::V4(..) => IPV4_HEADER,
        OuterAddrs::V6(..) => IPV6_HEADER,
    };
    let overhead = ip_len + if udp.is_some() { GUE_OVERHEAD } else { 0 };
    let total = len + overhead;
    if total > usize::from(t.path_mtu) && df {
        let mtu = usize::from(t.path_mtu).saturating_sub(overhead) as u16;
        return Ok(Encap::TooBig { mtu });
    }
    let max = match outer {
        OuterAddrs::V4(..) => 0xFFFF,
        OuterAddrs::V6(..) => 0xFFFF + IPV6_HEADER,
    };
    if total > max {
        return Err(PacketError::NoRoom {
            need: total,
            have: max,
        });
    }
    if overhead > pb.headroom() {
        return Err(PacketError::NoRoom {
            need: overhead,
            have: pb.headroom(),
        });
    }
    if t.decrement_ttl {
        decrement_ttl(pb.data_mut(), family)?;
    }
    let proto = match family {
        Family::V4 => 4u8,
        Family::V6 => 41,
    };
    let hdr = pb.prepend(overhead)?;
    let (ip, rest) = hdr.split_at_mut(ip_len);
    let l4_proto = if udp.is_some() { 17 } else { proto };
    match outer {
        OuterAddrs::V4(s, d) => {
            ip[0] = 0x45;
            ip[1] = tos;
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&ident.to_be_bytes());
            ip[6..8].copy_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
            ip[8] = t.ttl;
            ip[9] = l4_proto;
            ip[10..12].fill(0);
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum::checksum(ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        OuterAddrs::V6(s, d, label) => {
            let w = (6u32 << 28) | (u32::from(tos) << 20) | (label & 0xF_FFFF);
            ip[0..4].copy_from_slice(&w.to_be_bytes());
            ip[4..6].copy_from_slice(&((total - IPV6_HEADER) as u16).to_be_bytes());
            ip[6] = l4_proto;
            ip[7] = t.ttl;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
        }
    }
    if let Some((sp, dp)) = udp {
        let ulen = (total - ip_len) as u16;
        rest[0..2].copy_from_slice(&sp.to_be_bytes());
        rest[2..4].copy_from_slice(&dp.to_be_bytes());
        rest[4..6].copy_from_slice(&ulen.to_be_bytes());
        rest[6..8].fill(0);
        // GUE variant 0: ver 0, C 0, Hlen 0; Proto/ctype = inner protocol; flags 0.
        rest[8..12].copy_from_slice(&[0, proto, 0, 0]);
        if let OuterAddrs::V6(s, d, _) = outer {
            let data = pb.data_mut();
            let ps = checksum::pseudo_v6(s.octets(), d.octets(), 17, u32::from(ulen));
            let mut c = checksum::finish(checksum::sum(data.get(IPV6_HEADER..).unwrap_or(&[]), ps));
            if c == 0 {
                c = 0xFFFF;
            }
            let _ = put16(data, IPV6_HEADER + 6, c);
        }
    }
    Ok(Encap::Done)
}

/// Decrements the TTL (IPv4, with RFC 1624 checksum update) or hop limit (IPv6) of the packet at
/// the start of `ip`, as a forwarding router does.
///
/// # Errors
/// [`PacketError::TtlExpired`] if it is 0 or 1 (nothing is written); [`PacketError::Truncated`].
pub fn decrement_ttl(ip: &mut [u8], family: Family) -> Result<(), PacketError> {
    let (off, need, layer) = match family {
        Family::V4 => (8, 20, Layer::Ipv4),
        Family::V6 => (7, 40, Layer::Ipv6),
    };
    if ip.len() < need {
        return Err(PacketError::Truncated {
            layer,
            need,
            have: ip.len(),
        });
    }
    let ttl = ip.get(off).copied().unwrap_or(0);
    if ttl <= 1 {
        return Err(PacketError::TtlExpired);
    }
    if family == Family::V4 {
        let old = get16(ip, 8).unwrap_or(0);
        let new = old - 0x0100;
        let hc = get16(ip, 10).unwrap_or(0);
        let _ = put16(ip, 8, new);
        let _ = put16(ip, 10, update16(hc, old, new));
    } else if let Some(b) = ip.get_mut(7) {
        *b = ttl - 1;
    }
    Ok(())
}

/// Removes an IPIP / IP6IP6 / 4in6 / 6in4 or (when `gue_port` is given and matches the UDP
/// destination port) GUE outer header, leaving the inner packet in `pb`. GUE variant 0 (with
/// optional extension words, data messages only) and variant 1 (direct IP) are accepted. The
/// inner packet is truncated to the outer packet's length (link padding dropped); its TTL is
/// left as it is (RFC 2003 §3.1).
///
/// # Errors
/// Parse errors of the outer packet; [`PacketError::NotApplicable`] for a packet that is not a
/// tunnel packet (or is a fragment, or a GUE control message); [`PacketError::BadVersion`] if the
/// inner packet's version disagrees with the outer protocol.
pub fn decap<B: AsRef<[u8]> + AsMut<[u8]>>(
    pb: &mut PacketBuf<B>,
    gue_port: Option<u16>,
) -> Result<Decap, PacketError> {
    let data = pb.data();
    let p = parse(data, Link::Ip)?;
    if p.fragment != Fragment::None {
        return Err(PacketError::NotApplicable("fragmented tunnel packet"));
    }
    let (inner_off, proto) = match p.proto {
        IpProto::Other(4) => (p.l4, 4),
        IpProto::Other(41) => (p.l4, 41),
        IpProto::Udp if gue_port.is_some() && Some(p.key.dst_port()) == gue_port => {
            let g = p.payload;
            let b0 = data.get(g).copied().ok_or(PacketError::Truncated {
                layer: Layer::Gue,
                need: 1,
                have: 0,
            })?;
            match b0 >> 6 {
                0 => {
                    if b0 & 0x20 != 0 {
                        return Err(PacketError::NotApplicable("GUE control message"));
                    }
                    let hlen = 4 + usize::from(b0 & 0x1F) * 4;
                    if g + hlen > p.end {
                        return Err(PacketError::Truncated {
                            layer: Layer::Gue,
                            need: hlen,
                            have: p.end - g,
                        });
                    }
                    (g + hlen, data.get(g + 1).copied().unwrap_or(0))
                }
                1 => {
                    let v = data.get(g).map_or(0, |b| b >> 4);
                    (g, if v == 6 { 41 } else { 4 })
                }
                _ => return Err(PacketError::NotApplicable("unknown GUE variant")),
            }
        }
        _ => return Err(PacketError::NotApplicable("not a tunnel packet")),
    };
    let want = if proto == 4 {
        4
    } else if proto == 41 {
        6
    } else {
        0
    };
    let v = data.get(inner_off).map_or(0, |b| b >> 4);
    if v != want {
        return Err(PacketError::BadVersion {
            layer: Layer::InnerIp,
            version: v,
        });
    }
    let d = Decap {
        outer_src: p.key.src(),
        outer_dst: p.key.dst(),
        inner: if want == 4 { Family::V4 } else { Family::V6 },
    };
    let end = p.end;
    pb.truncate(end);
    pb.advance(inner_off)?;
    Ok(d)
}

#[cfg(test)]
#[path = "tunnel_tests.rs"]
mod tests;
