//! NAT rewrites in place: destination NAT (`dnat` mode), source NAT, and both at once (`nat` mode,
//! double rewrite), for IPv4 and IPv6, TCP / UDP / SCTP / ICMP echo, and ICMP errors (whose
//! quoted packet is rewritten too). Checksums are updated incrementally (RFC 1624).
//!
//! Every rewrite has its reverse: the same call with the packet's original endpoints. For a reply
//! in full-NAT mode, `rewrite(reply, Some(vip), Some(client))`; in DNAT mode,
//! `set_src(reply, vip)`.
//!
//! Ports: TCP, UDP and SCTP ports are rewritten; for ICMP echo the identifier plays the port
//! (the source port of a request, the destination port of a reply), as in Linux conntrack.
//! Packets without ports (non-first fragments, other protocols) have only their addresses
//! rewritten and the ports given are ignored. An SCTP first fragment cannot have its CRC32c
//! fixed (it covers the whole datagram): its ports are rewritten, the CRC is left stale.

use std::net::{IpAddr, SocketAddr};

use lb_core::IpProto;

use crate::checksum::{self, apply_at, field2, get16, Delta};
use crate::error::{Layer, PacketError};
use crate::parse::{is_echo, Embedded, Family, Fragment, Parsed};

/// The octets of `a` if it is IPv4.
#[inline(always)]
fn v4(a: IpAddr) -> Result<[u8; 4], PacketError> {
    match a {
        IpAddr::V4(a) => Ok(a.octets()),
        IpAddr::V6(_) => Err(PacketError::FamilyMismatch),
    }
}

/// The octets of `a` if it is IPv6.
#[inline(always)]
fn v6(a: IpAddr) -> Result<[u8; 16], PacketError> {
    match a {
        IpAddr::V6(a) => Ok(a.octets()),
        IpAddr::V4(_) => Err(PacketError::FamilyMismatch),
    }
}

#[inline(always)]
fn oob(need: usize, have: usize) -> PacketError {
    PacketError::Truncated {
        layer: Layer::Buffer,
        need,
        have,
    }
}

/// Writes `new` at `off`, adding the change to every delta in `ds` (fixed size: compiles to a
/// few loads and compares, no `memcmp` call).
#[inline(always)]
fn put_arr<const N: usize>(
    buf: &mut [u8],
    off: usize,
    new: [u8; N],
    ds: &mut [&mut Delta],
) -> Result<(), PacketError> {
    let have = buf.len();
    let end = off.saturating_add(N);
    let dst: &mut [u8; N] = field(buf, off).ok_or(oob(end, have))?;
    if *dst != new {
        for d in ds.iter_mut() {
            d.add_arr(dst, &new);
        }
        *dst = new;
    }
    Ok(())
}

/// The `N` bytes at `off`, if in bounds.
#[inline(always)]
fn field<const N: usize>(buf: &mut [u8], off: usize) -> Option<&mut [u8; N]> {
    buf.get_mut(off..)?.first_chunk_mut()
}

/// Writes `new` into `f`, adding the change to `d`.
#[inline(always)]
fn swap<const N: usize>(f: &mut [u8; N], new: [u8; N], d: &mut Delta) {
    if *f != new {
        d.add_arr(f, &new);
        *f = new;
    }
}

#[inline(always)]
fn put_port(
    buf: &mut [u8],
    off: usize,
    new: u16,
    ds: &mut [&mut Delta],
) -> Result<(), PacketError> {
    put_arr(buf, off, new.to_be_bytes(), ds)
}

/// The `N` bytes at `off`, if in bounds.
#[inline(always)]
fn get_arr<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Offsets of the source / destination address inside an IP header of `family`.
#[inline(always)]
fn addr_offsets(family: Family) -> (usize, usize) {
    match family {
        Family::V4 => (12, 16),
        Family::V6 => (8, 24),
    }
}

/// Rewrites the destination address and port (DNAT; see the module docs for ports).
///
/// # Errors
/// [`PacketError::FamilyMismatch`] if `dst` is not of the packet's family;
/// [`PacketError::Truncated`] if `p` does not describe `buf`.
#[inline]
pub fn set_dst(buf: &mut [u8], p: &Parsed, dst: SocketAddr) -> Result<(), PacketError> {
    rewrite(buf, p, None, Some(dst))
}

/// Rewrites the source address and port (SNAT, or the reverse of DNAT on a reply).
///
/// # Errors
/// As [`set_dst`].
#[inline]
pub fn set_src(buf: &mut [u8], p: &Parsed, src: SocketAddr) -> Result<(), PacketError> {
    rewrite(buf, p, Some(src), None)
}

/// Rewrites the source and / or destination endpoint in one pass, with one checksum update per
/// checksum field (full NAT).
///
/// For an ICMP error (`p.icmp` is `Some`), `src` and `dst` are the new endpoints of the flow the
/// error travels with (`p.key`): the outer destination address becomes `dst`'s address; the outer
/// source becomes `src`'s address only if it was the quoted packet's destination (the error came
/// from the peer itself; a router's address is kept); the quoted packet, which travels the other
/// way, gets source `dst` and destination `src`, and its IPv4 header checksum, its transport
/// checksum (when quoted) and the ICMP checksum are all fixed.
///
/// # Errors
/// [`PacketError::FamilyMismatch`] if an address is not of the packet's family (nothing is
/// written); [`PacketError::Truncated`] if `p` does not describe `buf`.
pub fn rewrite(
    buf: &mut [u8],
    p: &Parsed,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
) -> Result<(), PacketError> {
    rewrite_csum(buf, p, src, dst, false)
}

/// [`rewrite`] for a TCP or UDP packet whose L4 checksum is *partial*
/// ([`crate::offload::L4Csum::Partial`]: a GSO super-packet or a packet with `NEEDS_CSUM`):
/// the field holds the pseudo-header's sum, which gets the address changes (with the sign
/// that keeps it a sum, not a checksum); port changes are left to the device, which sums the
/// transport header with the payload. The IPv4 header checksum is updated as usual. Anything
/// else (ICMP, SCTP, fragments) is rewritten as by [`rewrite`].
///
/// # Errors
/// As [`rewrite`].
pub fn rewrite_partial(
    buf: &mut [u8],
    p: &Parsed,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
) -> Result<(), PacketError> {
    let partial = p.icmp.is_none()
        && p.fragment == Fragment::None
        && matches!(p.proto, IpProto::Tcp | IpProto::Udp);
    rewrite_csum(buf, p, src, dst, partial)
}

#[inline(always)]
fn rewrite_csum(
    buf: &mut [u8],
    p: &Parsed,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    partial: bool,
) -> Result<(), PacketError> {
    let sport = src.map(|a| a.port());
    let dport = dst.map(|a| a.port());
    p.check(buf.len())?;
    match p.family {
        Family::V4 => {
            let s = src.map(|a| v4(a.ip())).transpose()?;
            let d = dst.map(|a| v4(a.ip())).transpose()?;
            if rewrite_tcp_udp::<4, 20>(buf, p, (s, sport), (d, dport), partial).is_some() {
                return Ok(());
            }
            rewrite_n(buf, p, (s, sport), (d, dport), partial)
        }
        Family::V6 => {
            let s = src.map(|a| v6(a.ip())).transpose()?;
            let d = dst.map(|a| v6(a.ip())).transpose()?;
            if rewrite_tcp_udp::<16, 40>(buf, p, (s, sport), (d, dport), partial).is_some() {
                return Ok(());
            }
            rewrite_n(buf, p, (s, sport), (d, dport), partial)
        }
    }
}

/// The data path's case, [`rewrite_n`]'s result without its per-field bookkeeping: an
/// unfragmented TCP or UDP packet (not an ICMP error) whose fixed IP header (`H` bytes) ends
/// by the transport header and whose transport header holds its checksum. Every field is
/// found before any is written; `None` (nothing written) for any other packet, which
/// [`rewrite_n`] then takes. `nat_tests` checks the two agree byte for byte.
#[inline(always)]
fn rewrite_tcp_udp<const N: usize, const H: usize>(
    buf: &mut [u8],
    p: &Parsed,
    s: Side<N>,
    d: Side<N>,
    partial: bool,
) -> Option<()> {
    if p.icmp.is_some() || p.fragment != Fragment::None {
        return None;
    }
    let (head, l4) = buf.split_at_mut_checked(p.l4)?;
    let ip: &mut [u8; H] = head.get_mut(p.l3..)?.first_chunk_mut()?;
    // The transport header up to its checksum's end.
    match p.proto {
        IpProto::Tcp => {
            let th = l4.first_chunk_mut::<18>()?;
            let ad = addresses(ip, p.family, s.0, d.0);
            transport(th, 16, (s.1, d.1), ad, partial);
        }
        IpProto::Udp => {
            let th = l4.first_chunk_mut::<8>()?;
            let ad = addresses(ip, p.family, s.0, d.0);
            transport(th, 6, (s.1, d.1), ad, partial);
        }
        _ => return None,
    }
    Some(())
}

/// Writes the addresses into a fixed IP header (and, for IPv4, updates its checksum);
/// returns their change, for the pseudo-header.
#[inline(always)]
fn addresses<const N: usize, const H: usize>(
    ip: &mut [u8; H],
    family: Family,
    s: Option<[u8; N]>,
    d: Option<[u8; N]>,
) -> Delta {
    let (so, dof) = addr_offsets(family);
    let mut ad = Delta::default();
    if let (Some(a), Some(f)) = (s, field::<N>(ip, so)) {
        swap(f, a, &mut ad);
    }
    if let (Some(a), Some(f)) = (d, field::<N>(ip, dof)) {
        swap(f, a, &mut ad);
    }
    if family == Family::V4 {
        if let Some(f) = field2(ip, 10) {
            checksum::apply_to(f, ad, false);
        }
    }
    ad
}

/// Ports and checksum of a TCP (`csum_at` 16) or UDP (6) header, given the address delta.
#[inline(always)]
fn transport<const T: usize>(
    th: &mut [u8; T],
    csum_at: usize,
    (sport, dport): (Option<u16>, Option<u16>),
    ad: Delta,
    partial: bool,
) {
    let mut pd = Delta::default();
    if let (Some(v), Some(f)) = (sport, field::<2>(th, 0)) {
        swap(f, v.to_be_bytes(), &mut pd);
    }
    if let (Some(v), Some(f)) = (dport, field::<2>(th, 2)) {
        swap(f, v.to_be_bytes(), &mut pd);
    }
    let Some(c) = field2(th, csum_at) else {
        return;
    };
    if partial {
        checksum::apply_partial_to(c, ad);
    } else {
        pd.merge(ad);
        checksum::apply_to(c, pd, csum_at == 6);
    }
}

type Side<const N: usize> = (Option<[u8; N]>, Option<u16>);

#[inline(always)]
fn rewrite_n<const N: usize>(
    buf: &mut [u8],
    p: &Parsed,
    (s, sport): Side<N>,
    (d, dport): Side<N>,
    partial: bool,
) -> Result<(), PacketError> {
    if let Some(e) = p.icmp {
        return rewrite_icmp_error(buf, p, &e, (s, sport), (d, dport));
    }
    let (so, dof) = addr_offsets(p.family);
    let mut ad = Delta::default();
    if let Some(a) = s {
        put_arr(buf, p.l3 + so, a, &mut [&mut ad])?;
    }
    if let Some(a) = d {
        put_arr(buf, p.l3 + dof, a, &mut [&mut ad])?;
    }
    if p.family == Family::V4 {
        apply_at(buf, p.l3 + 10, ad, false);
    }
    if p.fragment == Fragment::NonFirst {
        return Ok(());
    }
    let mut pd = Delta::default();
    // The SCTP checksum of the packet as it came, when its ports change.
    let mut sctp_before = None;
    let l4 = p.l4;
    // ICMP of the other family's flavour is opaque to the parser: leave its bytes alone.
    let proto = match (p.proto, p.family) {
        (IpProto::Icmp, Family::V6) | (IpProto::Icmpv6, Family::V4) => {
            IpProto::Other(p.proto.number())
        }
        (proto, _) => proto,
    };
    match proto {
        IpProto::Tcp | IpProto::Udp | IpProto::Sctp => {
            // (A change 0xFFFF -> 0 adds nothing to a one's-complement delta, so SCTP's CRC
            // needs its own test.)
            let changed = (sport.is_some() && sport != get16(buf, l4))
                || (dport.is_some() && dport != get16(buf, l4 + 2));
            if proto == IpProto::Sctp && changed && p.fragment == Fragment::None {
                sctp_before = buf.get(l4..p.end).and_then(checksum::sctp);
            }
            if let Some(port) = sport {
                put_port(buf, l4, port, &mut [&mut pd])?;
            }
            if let Some(port) = dport {
                put_port(buf, l4 + 2, port, &mut [&mut pd])?;
            }
        }
        IpProto::Icmp | IpProto::Icmpv6 => {
            let v6 = proto == IpProto::Icmpv6;
            let ty = buf.get(l4).copied().unwrap_or(0);
            if is_echo(ty, v6) {
                let request = ty == 8 || ty == 128;
                let id = if request { sport } else { dport };
                if let Some(id) = id {
                    put_port(buf, l4 + 4, id, &mut [&mut pd])?;
                }
            }
        }
        IpProto::Other(_) => {}
    }
    match proto {
        IpProto::Tcp | IpProto::Udp if partial => {
            let off = if proto == IpProto::Tcp { 16 } else { 6 };
            checksum::apply_partial_at(buf, l4 + off, ad);
        }
        IpProto::Tcp => {
            pd.merge(ad);
            apply_at(buf, l4 + 16, pd, false);
        }
        IpProto::Udp => {
            pd.merge(ad);
            apply_at(buf, l4 + 6, pd, true);
        }
        IpProto::Icmp => {
            apply_at(buf, l4 + 2, pd, false);
            // The one message whose full checksum is 0xFFFF (negative zero) is an all-zero one
            // (echo reply, id 0, seq 0, no data): eqn. 3 yields +0 there, so write what a full
            // computation gives.
            if p.fragment == Fragment::None
                && get16(buf, l4 + 2) == Some(0)
                && buf
                    .get(l4..p.end)
                    .is_some_and(|m| m.iter().all(|&b| b == 0))
            {
                let _ = checksum::put16(buf, l4 + 2, 0xFFFF);
            }
        }
        IpProto::Icmpv6 => {
            pd.merge(ad);
            apply_at(buf, l4 + 2, pd, false);
        }
        IpProto::Sctp => {
            // CRC32c covers no pseudo-header and cannot be updated like a sum, so it is
            // computed before and after the ports change, and the field moves by their
            // difference (CRC is affine over GF(2): field ^ before ^ after). A correct
            // checksum becomes the new packet's; a wrong one stays exactly as wrong, not
            // laundered into a valid one (as a plain recompute would); a zero checksum of
            // a packet whose CRC is not zero stays zero (RFC 9653's zero checksum).
            if let (Some(before), Some(after)) =
                (sctp_before, buf.get(l4..p.end).and_then(checksum::sctp))
            {
                if let Some(f) = buf.get_mut(l4 + 8..l4 + 12) {
                    let field = u32::from_le_bytes([f[0], f[1], f[2], f[3]]);
                    if field != 0 || before == 0 {
                        f.copy_from_slice(&(field ^ before ^ after).to_le_bytes());
                    }
                }
            }
        }
        IpProto::Other(_) => {}
    }
    Ok(())
}

fn rewrite_icmp_error<const N: usize>(
    buf: &mut [u8],
    p: &Parsed,
    e: &Embedded,
    (s, sport): Side<N>,
    (d, dport): Side<N>,
) -> Result<(), PacketError> {
    let (so, dof) = addr_offsets(p.family);
    // Outer header.
    let mut ad = Delta::default();
    if let Some(a) = s {
        let cur = get_arr::<N>(buf, p.l3 + so);
        let quoted_dst = get_arr::<N>(buf, e.l3 + dof);
        if cur.is_some() && cur == quoted_dst {
            put_arr(buf, p.l3 + so, a, &mut [&mut ad])?;
        }
    }
    if let Some(a) = d {
        put_arr(buf, p.l3 + dof, a, &mut [&mut ad])?;
    }
    if p.family == Family::V4 {
        apply_at(buf, p.l3 + 10, ad, false);
    }
    // Quoted packet: travels the other way.
    let mut od = Delta::default(); // changes inside the ICMP message
    let mut ihd = Delta::default(); // quoted addresses (IPv4 header + pseudo-header)
    let mut ipd = Delta::default(); // quoted ports / ids
    if let Some(a) = d {
        put_arr(buf, e.l3 + so, a, &mut [&mut od, &mut ihd])?;
    }
    if let Some(a) = s {
        put_arr(buf, e.l3 + dof, a, &mut [&mut od, &mut ihd])?;
    }
    if e.family == Family::V4 {
        let c = apply_at(buf, e.l3 + 10, ihd, false);
        od.merge(c);
    }
    if e.fragment != Fragment::NonFirst {
        let l4 = e.l4;
        let v6 = e.family == Family::V6;
        let fits = |off: usize| off + 2 <= e.end;
        match e.proto {
            IpProto::Tcp | IpProto::Udp | IpProto::Sctp => {
                if let Some(port) = dport {
                    put_port(buf, l4, port, &mut [&mut od, &mut ipd])?;
                }
                if let Some(port) = sport {
                    put_port(buf, l4 + 2, port, &mut [&mut od, &mut ipd])?;
                }
                ipd.merge(ihd);
                let c = match e.proto {
                    IpProto::Tcp if fits(l4 + 16) => apply_at(buf, l4 + 16, ipd, false),
                    IpProto::Udp => apply_at(buf, l4 + 6, ipd, true),
                    _ => Delta::default(),
                };
                od.merge(c);
            }
            IpProto::Icmp | IpProto::Icmpv6 if (e.proto == IpProto::Icmpv6) == v6 => {
                let ty = buf.get(l4).copied().unwrap_or(0);
                if is_echo(ty, v6) {
                    let request = ty == 8 || ty == 128;
                    let id = if request { dport } else { sport };
                    if let Some(id) = id {
                        put_port(buf, l4 + 4, id, &mut [&mut od, &mut ipd])?;
                    }
                    if v6 {
                        ipd.merge(ihd);
                    }
                    od.merge(apply_at(buf, l4 + 2, ipd, false));
                }
            }
            _ => {}
        }
    }
    // The ICMP checksum covers the whole message (and for ICMPv6 the outer pseudo-header).
    if p.family == Family::V6 {
        od.merge(ad);
    }
    if get16(buf, p.l4 + 2).is_none() {
        return Err(oob(p.l4 + 4, buf.len()));
    }
    apply_at(buf, p.l4 + 2, od, false);
    Ok(())
}

#[cfg(test)]
#[path = "nat_tests.rs"]
mod tests;
