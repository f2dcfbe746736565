//! TCP segments a splicing balancer reads and originates: the options of a SYN (MSS, window
//! scale, SACK permitted, timestamps), building a whole IPv4 / IPv6 + TCP segment with its
//! checksums, and the option rewrites a splice needs beside [`crate::splice::translate`]
//! (timestamps, window rescaling), with incremental checksums (RFC 1624).

use std::net::{IpAddr, SocketAddr};

use lb_core::IpProto;

use crate::checksum::{apply_at, finish, pseudo_v4, pseudo_v6, sum, Delta};
use crate::error::{Layer, PacketError};
use crate::parse::{Fragment, Parsed};

/// TCP flag bits (byte 13 of the header).
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// The options of a segment a splice cares about (RFC 9293 MSS, RFC 7323 window scale and
/// timestamps, RFC 2018 SACK permitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    /// Maximum segment size (SYN only).
    pub mss: Option<u16>,
    /// Window scale shift (SYN only), clamped to 14 (RFC 7323 §2.3).
    pub wscale: Option<u8>,
    /// SACK permitted (SYN only).
    pub sack_permitted: bool,
    /// Timestamps: (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
}

/// The fixed fields of a TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpHeader {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags byte ([`flags`]).
    pub flags: u8,
    /// Window field (unscaled).
    pub window: u16,
}

/// Reads the fixed header fields and the options of the TCP segment `p` describes.
///
/// # Errors
/// [`PacketError::NotApplicable`] unless `p` is a TCP segment with its header.
pub fn read(buf: &[u8], p: &Parsed) -> Result<(TcpHeader, TcpOptions), PacketError> {
    if p.proto != IpProto::Tcp || p.fragment == Fragment::NonFirst || p.icmp.is_some() {
        return Err(PacketError::NotApplicable("needs a TCP header"));
    }
    let l4 = p.l4;
    let h = buf
        .get(l4..l4 + 20)
        .filter(|_| p.payload >= l4 + 20 && p.payload <= buf.len())
        .ok_or(PacketError::Truncated {
            layer: Layer::Tcp,
            need: l4 + 20,
            have: buf.len(),
        })?;
    let rd = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let hdr = TcpHeader {
        seq: rd(4),
        ack: rd(8),
        flags: h[13],
        window: u16::from_be_bytes([h[14], h[15]]),
    };
    let mut o = TcpOptions::default();
    walk(buf, l4 + 20, p.payload, |kind, v, _| {
        match (kind, v.len()) {
            (2, 2) => o.mss = Some(u16::from_be_bytes([v[0], v[1]])),
            (3, 1) => o.wscale = Some(v[0].min(14)),
            (4, 0) => o.sack_permitted = true,
            (8, 8) => {
                o.timestamps = Some((
                    u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                    u32::from_be_bytes([v[4], v[5], v[6], v[7]]),
                ))
            }
            _ => {}
        }
    });
    Ok((hdr, o))
}

/// Walks the options in `buf[from..to]`, calling `f(kind, value, value_offset)`; stops at
/// end-of-list or a malformed option.
fn walk(buf: &[u8], from: usize, to: usize, mut f: impl FnMut(u8, &[u8], usize)) {
    let to = to.min(buf.len()).min(from + 40);
    let mut i = from;
    while i < to {
        let kind = buf.get(i).copied().unwrap_or(0);
        match kind {
            0 => break,
            1 => i += 1,
            _ => {
                let len = usize::from(buf.get(i + 1).copied().unwrap_or(0));
                if len < 2 || i + len > to {
                    break;
                }
                if let Some(v) = buf.get(i + 2..i + len) {
                    f(kind, v, i + 2);
                }
                i += len;
            }
        }
    }
}

/// Bytes [`build`] needs for a segment between `src` and `dst` with these options and `payload`
/// bytes of data.
pub fn segment_len(src: &SocketAddr, opts: &TcpOptions, payload: usize) -> usize {
    let ip = if src.is_ipv4() { 20 } else { 40 };
    ip + 20 + options_len(opts) + payload
}

fn options_len(o: &TcpOptions) -> usize {
    // MSS 4, SACK-permitted + wscale padded: 4 + 4 (NOP SACKOK? laid out below), TS 12.
    let mut n = 0;
    if o.mss.is_some() {
        n += 4;
    }
    if o.wscale.is_some() {
        n += 4; // NOP, WS(3)
    }
    if o.sack_permitted {
        n += 4; // NOP, NOP, SACKOK(2)
    }
    if o.timestamps.is_some() {
        n += 12; // NOP, NOP, TS(10)
    }
    n
}

/// Writes an IP + TCP segment from `src` to `dst` into the front of `out` (no IP options, TTL
/// 64, DF set for IPv4), with both checksums computed in full, and returns its length.
///
/// # Errors
/// [`PacketError::NotApplicable`] if the families differ; [`PacketError::Truncated`] if `out`
/// is too small.
pub fn build(
    out: &mut [u8],
    src: SocketAddr,
    dst: SocketAddr,
    h: &TcpHeader,
    opts: &TcpOptions,
    payload: &[u8],
) -> Result<usize, PacketError> {
    let olen = options_len(opts);
    let tcp_len = 20 + olen + payload.len();
    let total = segment_len(&src, opts, payload.len());
    if out.len() < total {
        return Err(PacketError::Truncated {
            layer: Layer::Tcp,
            need: total,
            have: out.len(),
        });
    }
    let (l4, pseudo) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let tl = u16::try_from(total).map_err(|_| PacketError::NotApplicable("too long"))?;
            let ip = &mut out[..20];
            ip.copy_from_slice(&[0; 20]);
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&tl.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = finish(sum(ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            (20, pseudo_v4(s.octets(), d.octets(), 6, tcp_len as u16))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let pl = u16::try_from(tcp_len).map_err(|_| PacketError::NotApplicable("too long"))?;
            let ip = &mut out[..40];
            ip.copy_from_slice(&[0; 40]);
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&pl.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            (40, pseudo_v6(s.octets(), d.octets(), 6, tcp_len as u32))
        }
        _ => return Err(PacketError::NotApplicable("address families differ")),
    };
    let t = &mut out[l4..l4 + tcp_len];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&h.seq.to_be_bytes());
    t[8..12].copy_from_slice(&h.ack.to_be_bytes());
    t[12] = (((20 + olen) / 4) as u8) << 4;
    t[13] = h.flags;
    t[14..16].copy_from_slice(&h.window.to_be_bytes());
    t[16..20].copy_from_slice(&[0; 4]);
    let mut i = 20;
    if let Some(m) = opts.mss {
        t[i..i + 4].copy_from_slice(&[2, 4, (m >> 8) as u8, m as u8]);
        i += 4;
    }
    if let Some(w) = opts.wscale {
        t[i..i + 4].copy_from_slice(&[1, 3, 3, w.min(14)]);
        i += 4;
    }
    if opts.sack_permitted {
        t[i..i + 4].copy_from_slice(&[1, 1, 4, 2]);
        i += 4;
    }
    if let Some((v, e)) = opts.timestamps {
        t[i..i + 4].copy_from_slice(&[1, 1, 8, 10]);
        t[i + 4..i + 8].copy_from_slice(&v.to_be_bytes());
        t[i + 8..i + 12].copy_from_slice(&e.to_be_bytes());
        i += 12;
    }
    t[i..].copy_from_slice(payload);
    let c = finish(sum(t, pseudo));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    Ok(total)
}

/// What [`rewrite_options`] changes on one segment of a spliced direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionShift {
    /// Added (mod 2³²) to TSval.
    pub tsval: u32,
    /// Added (mod 2³²) to TSecr.
    pub tsecr: u32,
    /// Window rescaling: the window field is multiplied by `2^from` and divided by `2^to`
    /// (clamped to 65 535); `None` leaves it alone.
    pub rescale: Option<(u8, u8)>,
}

/// Applies `s` to the timestamps option and the window field of the TCP segment `p`
/// describes, fixing the TCP checksum incrementally. A segment without timestamps keeps its
/// options; a SYN's window is never scaled (RFC 7323 §2.2), so it is left alone.
///
/// # Errors
/// As [`read`].
pub fn rewrite_options(buf: &mut [u8], p: &Parsed, s: OptionShift) -> Result<(), PacketError> {
    rewrite_options_csum(buf, p, s, true)
}

/// [`rewrite_options`] for a segment whose TCP checksum is *partial* (the field holds the
/// pseudo-header's sum, the device sums the header): the field is left alone. The window and
/// timestamps rewritten in a GSO super-packet's header carry over to every segment.
///
/// # Errors
/// As [`read`].
pub fn rewrite_options_partial(
    buf: &mut [u8],
    p: &Parsed,
    s: OptionShift,
) -> Result<(), PacketError> {
    rewrite_options_csum(buf, p, s, false)
}

#[inline(always)]
fn rewrite_options_csum(
    buf: &mut [u8],
    p: &Parsed,
    s: OptionShift,
    fix: bool,
) -> Result<(), PacketError> {
    let (h, _) = read(buf, p)?;
    let l4 = p.l4;
    let mut d = Delta::default();
    if let Some((from, to)) = s.rescale.filter(|&(f, t)| f != t) {
        if h.flags & flags::SYN == 0 {
            let wide = u64::from(h.window) << from.min(14);
            let w = (wide >> to.min(14)).min(65_535) as u16;
            let old = h.window.to_be_bytes();
            let new = w.to_be_bytes();
            d.add_bytes(&old, &new);
            if let Some(f) = buf.get_mut(l4 + 14..l4 + 16) {
                f.copy_from_slice(&new);
            }
        }
    }
    if s.tsval != 0 || s.tsecr != 0 {
        let mut at = None;
        walk(buf, l4 + 20, p.payload, |kind, v, off| {
            if kind == 8 && v.len() == 8 {
                at = Some(off);
            }
        });
        if let Some(off) = at {
            for (o, add) in [(off, s.tsval), (off + 4, s.tsecr)] {
                if let Some(f) = buf.get_mut(o..o + 4) {
                    let old = [f[0], f[1], f[2], f[3]];
                    let new = u32::from_be_bytes(old).wrapping_add(add).to_be_bytes();
                    d.add_bytes(&old, &new);
                    f.copy_from_slice(&new);
                }
            }
        }
    }
    if fix {
        apply_at(buf, l4 + 16, d, false);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::recompute;
    use crate::parse::{parse, Link};
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn full_opts() -> TcpOptions {
        TcpOptions {
            mss: Some(1460),
            wscale: Some(7),
            sack_permitted: true,
            timestamps: Some((111, 222)),
        }
    }

    #[test]
    fn build_then_read_round_trips_v4_and_v6() {
        for (s, d) in [
            (sa("10.0.0.1:1234"), sa("10.0.0.2:80")),
            (sa("[fd00::1]:1234"), sa("[fd00::2]:80")),
        ] {
            let mut out = [0u8; 200];
            let h = TcpHeader {
                seq: 7,
                ack: 9,
                flags: flags::SYN | flags::ACK,
                window: 1000,
            };
            let n = build(&mut out, s, d, &h, &full_opts(), b"hello").unwrap();
            assert_eq!(n, segment_len(&s, &full_opts(), 5));
            let pkt = &mut out[..n];
            let p = parse(pkt, Link::Ip).unwrap();
            assert_eq!(p.key.src(), s.ip());
            assert_eq!(p.key.dst_port(), 80);
            assert_eq!(p.payload(pkt), b"hello");
            assert_eq!(read(pkt, &p).unwrap(), (h, full_opts()));
            let mut full = pkt.to_vec();
            recompute(&mut full, &p).unwrap();
            assert_eq!(full, pkt, "checksums are right");
        }
    }

    #[test]
    fn too_small_and_mixed_families_are_errors() {
        let mut out = [0u8; 30];
        let h = TcpHeader::default();
        let o = TcpOptions::default();
        assert!(build(&mut out, sa("1.1.1.1:1"), sa("2.2.2.2:2"), &h, &o, b"").is_err());
        let mut out = [0u8; 100];
        assert!(build(&mut out, sa("1.1.1.1:1"), sa("[::1]:2"), &h, &o, b"").is_err());
    }

    #[test]
    fn window_rescales_and_clamps() {
        let mut out = [0u8; 100];
        let h = TcpHeader {
            flags: flags::ACK,
            window: 1000,
            ..TcpHeader::default()
        };
        let n = build(
            &mut out,
            sa("1.1.1.1:1"),
            sa("2.2.2.2:2"),
            &h,
            &full_opts(),
            b"",
        )
        .unwrap();
        let pkt = &mut out[..n];
        let p = parse(pkt, Link::Ip).unwrap();
        let sh = OptionShift {
            rescale: Some((9, 7)),
            ..OptionShift::default()
        };
        rewrite_options(pkt, &p, sh).unwrap();
        assert_eq!(read(pkt, &p).unwrap().0.window, 4000);
        let sh = OptionShift {
            rescale: Some((14, 0)),
            ..OptionShift::default()
        };
        rewrite_options(pkt, &p, sh).unwrap();
        assert_eq!(read(pkt, &p).unwrap().0.window, 65_535);
        let mut full = pkt.to_vec();
        recompute(&mut full, &p).unwrap();
        assert_eq!(full, pkt);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn timestamp_shift_checksum_and_inverse(v6: bool, tsv: u32, tse: u32, a: u32, b: u32, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (s, d) = if v6 {
                (sa("[fd00::1]:1"), sa("[fd00::2]:2"))
            } else {
                (sa("1.1.1.1:1"), sa("2.2.2.2:2"))
            };
            let o = TcpOptions { timestamps: Some((tsv, tse)), ..TcpOptions::default() };
            let h = TcpHeader { flags: flags::ACK, ..TcpHeader::default() };
            let mut out = [0u8; 200];
            let n = build(&mut out, s, d, &h, &o, &payload).unwrap();
            let orig = out[..n].to_vec();
            let pkt = &mut out[..n];
            let p = parse(pkt, Link::Ip).unwrap();
            rewrite_options(pkt, &p, OptionShift { tsval: a, tsecr: b, rescale: None }).unwrap();
            let (_, got) = read(pkt, &p).unwrap();
            prop_assert_eq!(got.timestamps, Some((tsv.wrapping_add(a), tse.wrapping_add(b))));
            let mut full = pkt.to_vec();
            recompute(&mut full, &p).unwrap();
            prop_assert_eq!(&full[..], &pkt[..]);
            rewrite_options(pkt, &p, OptionShift { tsval: a.wrapping_neg(), tsecr: b.wrapping_neg(), rescale: None }).unwrap();
            prop_assert_eq!(&pkt[..], &orig[..]);
        }

        #[test]
        fn read_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(p) = parse(&bytes, Link::Ip) {
                let _ = read(&bytes, &p);
            }
        }
    }
}
