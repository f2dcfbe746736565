//! Building ICMP / ICMPv6 error replies: "fragmentation needed" (RFC 792 / RFC 1191) and
//! "packet too big" (RFC 4443 §3.2) for the tunnel MTU check, "time exceeded" for an exhausted
//! TTL, "destination unreachable" (port) for a service with no backend.
//!
//! (Rewriting ICMP errors that pass through the balancer is part of [`crate::nat::rewrite`].)

use std::net::IpAddr;

use lb_core::IpProto;

use crate::checksum::{self, put16};
use crate::error::PacketError;
use crate::parse::{is_error, parse, Family, Fragment, Link};

/// RFC 1812 §4.3.2.3: an ICMPv4 error holds as much of the original datagram as fits in 576
/// bytes.
pub const ICMPV4_MAX: usize = 576;
/// RFC 4443 §2.4 (c): an ICMPv6 error must not exceed the minimum IPv6 MTU, 1280 bytes.
pub const ICMPV6_MAX: usize = 1280;

/// Which error to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IcmpError {
    /// IPv4 "destination unreachable / fragmentation needed and DF set" (type 3 code 4) with the
    /// next-hop MTU, or ICMPv6 "packet too big" (type 2) with the MTU.
    TooBig {
        /// The MTU to report.
        mtu: u16,
    },
    /// "Time exceeded in transit" (IPv4 type 11 code 0, ICMPv6 type 3 code 0).
    TimeExceeded,
    /// "Port unreachable" (IPv4 type 3 code 3, ICMPv6 type 1 code 4).
    PortUnreachable,
}

/// Writes into `out` the ICMP (for an IPv4 `orig`) or ICMPv6 error reply about the packet
/// `orig` (starting with its IP header), sent from `from` to `orig`'s source, quoting as much of
/// `orig` as the RFC limits allow. Returns the length written. The reply has TTL / hop limit 64
/// and valid checksums.
///
/// RFC 1122 §3.2.2 / RFC 4443 §2.4 (e): no error is sent about an ICMP error message or a
/// non-first fragment.
///
/// # Errors
/// Parse errors of `orig`; [`PacketError::FamilyMismatch`] if `from` is not of `orig`'s family;
/// [`PacketError::NotApplicable`] if `orig` is an ICMP error or a non-first fragment;
/// [`PacketError::NoRoom`] if `out` is smaller than the IP + ICMP headers plus the quote.
pub fn error_reply(
    orig: &[u8],
    from: IpAddr,
    kind: IcmpError,
    out: &mut [u8],
) -> Result<usize, PacketError> {
    let p = parse(orig, Link::Ip)?;
    if p.icmp.is_some() {
        return Err(PacketError::NotApplicable(
            "no ICMP error about an ICMP error",
        ));
    }
    if let IpProto::Icmp | IpProto::Icmpv6 = p.proto {
        let ty = orig.get(p.l4).copied().unwrap_or(0);
        if is_error(ty, p.proto == IpProto::Icmpv6) {
            return Err(PacketError::NotApplicable(
                "no ICMP error about an ICMP error",
            ));
        }
    }
    if p.fragment == Fragment::NonFirst {
        return Err(PacketError::NotApplicable(
            "no ICMP error about a non-first fragment",
        ));
    }
    let quote_src = orig.get(..p.end).unwrap_or(orig);
    match (p.family, from, p.key.src()) {
        (Family::V4, IpAddr::V4(f), IpAddr::V4(to)) => {
            let (ty, code, rest) = match kind {
                IcmpError::TooBig { mtu } => (3u8, 4u8, u32::from(mtu)),
                IcmpError::TimeExceeded => (11, 0, 0),
                IcmpError::PortUnreachable => (3, 3, 0),
            };
            let q = quote_src.len().min(ICMPV4_MAX - 28);
            let total = 28 + q;
            let have = out.len();
            let o = out
                .get_mut(..total)
                .ok_or(PacketError::NoRoom { need: total, have })?;
            o[..28].fill(0);
            o[0] = 0x45;
            o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            o[8] = 64;
            o[9] = 1;
            o[12..16].copy_from_slice(&f.octets());
            o[16..20].copy_from_slice(&to.octets());
            let c = checksum::checksum(&o[..20]);
            o[10..12].copy_from_slice(&c.to_be_bytes());
            o[20] = ty;
            o[21] = code;
            o[24..28].copy_from_slice(&rest.to_be_bytes());
            o[28..].copy_from_slice(quote_src.get(..q).unwrap_or(&[]));
            let c = checksum::checksum(&o[20..]);
            let _ = put16(o, 22, c);
            Ok(total)
        }
        (Family::V6, IpAddr::V6(f), IpAddr::V6(to)) => {
            let (ty, code, rest) = match kind {
                IcmpError::TooBig { mtu } => (2u8, 0u8, u32::from(mtu)),
                IcmpError::TimeExceeded => (3, 0, 0),
                IcmpError::PortUnreachable => (1, 4, 0),
            };
            let q = quote_src.len().min(ICMPV6_MAX - 48);
            let total = 48 + q;
            let have = out.len();
            let o = out
                .get_mut(..total)
                .ok_or(PacketError::NoRoom { need: total, have })?;
            o[..48].fill(0);
            o[0] = 0x60;
            o[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            o[6] = 58;
            o[7] = 64;
            o[8..24].copy_from_slice(&f.octets());
            o[24..40].copy_from_slice(&to.octets());
            o[40] = ty;
            o[41] = code;
            o[44..48].copy_from_slice(&rest.to_be_bytes());
            o[48..].copy_from_slice(quote_src.get(..q).unwrap_or(&[]));
            let ps = checksum::pseudo_v6(f.octets(), to.octets(), 58, (total - 40) as u32);
            let c = checksum::finish(checksum::sum(&o[40..], ps));
            let _ = put16(o, 42, c);
            Ok(total)
        }
        _ => Err(PacketError::FamilyMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{build, Spec};

    #[test]
    fn frag_needed_v4() {
        let mut s = Spec::simple(false, 6);
        s.payload = vec![7; 1000];
        let orig = build(&s);
        let mut out = [0u8; 600];
        let n = error_reply(
            &orig,
            "10.0.0.254".parse().unwrap(),
            IcmpError::TooBig { mtu: 1480 },
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 576);
        let p = parse(&out[..n], Link::Ip).unwrap();
        // The error follows the original flow, reversed.
        let k = parse(&orig, Link::Ip).unwrap().key;
        assert_eq!(p.key, k.reversed());
        assert_eq!(&out[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 1480);
        // Checksums are valid: a full recompute changes nothing.
        let mut again = out[..n].to_vec();
        checksum::recompute(&mut again, &p).unwrap();
        assert_eq!(&again[..], &out[..n]);
        // Agree with pnet's ICMP checksum.
        assert_eq!(
            pnet_packet::util::checksum(&out[20..n], 1),
            u16::from_be_bytes([out[22], out[23]])
        );
        // Not about an ICMP error.
        assert!(matches!(
            error_reply(
                &out[..n],
                "10.0.0.1".parse().unwrap(),
                IcmpError::TimeExceeded,
                &mut [0u8; 600]
            ),
            Err(PacketError::NotApplicable(_))
        ));
        assert!(matches!(
            error_reply(
                &orig,
                "::1".parse().unwrap(),
                IcmpError::TimeExceeded,
                &mut out
            ),
            Err(PacketError::FamilyMismatch)
        ));
        assert!(matches!(
            error_reply(
                &orig,
                "1.1.1.1".parse().unwrap(),
                IcmpError::TimeExceeded,
                &mut [0u8; 100]
            ),
            Err(PacketError::NoRoom { .. })
        ));
    }

    #[test]
    fn packet_too_big_v6() {
        let mut s = Spec::simple(true, 17);
        s.payload = vec![1; 1400];
        let orig = build(&s);
        let mut out = [0u8; 1500];
        let n = error_reply(
            &orig,
            "2001:db8::fe".parse().unwrap(),
            IcmpError::TooBig { mtu: 1400 },
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 1280);
        let p = parse(&out[..n], Link::Ip).unwrap();
        assert_eq!(p.key, parse(&orig, Link::Ip).unwrap().key.reversed());
        assert_eq!(
            u32::from_be_bytes([out[44], out[45], out[46], out[47]]),
            1400
        );
        let mut again = out[..n].to_vec();
        checksum::recompute(&mut again, &p).unwrap();
        assert_eq!(&again[..], &out[..n]);
        let e = etherparse::SlicedPacket::from_ip(&out[..n]).unwrap();
        match e.transport {
            Some(etherparse::TransportSlice::Icmpv6(i)) => {
                assert!(matches!(
                    i.icmp_type(),
                    etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 }
                ));
            }
            other => panic!("{other:?}"),
        }
    }
}
