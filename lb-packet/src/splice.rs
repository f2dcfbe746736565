//! TCP splicing: after the balancer has terminated a client's TCP connection (to read layer-5
//! content) and opened its own to the chosen server, it joins the two by translating sequence
//! and acknowledgement numbers, so packets flow through without a proxy copy.
//!
//! A [`SeqShift`] is what to add (mod 2³²) to the sequence number and to the acknowledgement
//! number (and SACK blocks, RFC 2018, which live in the acknowledgement space) of packets of one
//! direction. With `c` the client's ISN, `lc` the balancer's ISN towards the client, `ls` its ISN
//! towards the server and `s` the server's ISN:
//!
//! - client → server: `SeqShift::new(ls - c, s - lc)`;
//! - server → client: [`SeqShift::opposite`] of that.
//!
//! The TCP checksum is updated incrementally (RFC 1624).

use lb_core::IpProto;

use crate::checksum::{apply_at, Delta};
use crate::error::{Layer, PacketError};
use crate::parse::{Fragment, Parsed};

/// Offsets to add to sequence and acknowledgement numbers of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqShift {
    /// Added to the sequence number.
    pub seq: u32,
    /// Added to the acknowledgement number and to SACK block edges.
    pub ack: u32,
}

impl SeqShift {
    /// A shift.
    #[inline]
    pub const fn new(seq: u32, ack: u32) -> Self {
        SeqShift { seq, ack }
    }

    /// The shift for the other direction of the same splice: its sequence numbers live in this
    /// direction's acknowledgement space and vice versa.
    #[inline]
    pub const fn opposite(self) -> Self {
        SeqShift {
            seq: self.ack.wrapping_neg(),
            ack: self.seq.wrapping_neg(),
        }
    }

    /// The shift that undoes this one on the same packet.
    #[inline]
    pub const fn inverse(self) -> Self {
        SeqShift {
            seq: self.seq.wrapping_neg(),
            ack: self.ack.wrapping_neg(),
        }
    }
}

/// The most TCP option bytes walked (the maximum a header can hold).
const MAX_OPTION_BYTES: usize = 40;

/// Translates the sequence number, the acknowledgement number (when the ACK flag is set) and
/// every SACK block of the TCP segment `p` describes, fixing the TCP checksum.
///
/// Malformed options stop the option walk (the rest is left alone), as a TCP receiver would
/// ignore them.
///
/// # Errors
/// [`PacketError::NotApplicable`] unless `p` is TCP with its header present (not a non-first
/// fragment); [`PacketError::Truncated`] if `p` does not describe `buf`.
pub fn translate(buf: &mut [u8], p: &Parsed, shift: SeqShift) -> Result<(), PacketError> {
    translate_csum(buf, p, shift, true)
}

/// [`translate`] for a segment whose TCP checksum is *partial*
/// ([`crate::offload::L4Csum::Partial`]: a GSO super-packet, or a packet with `NEEDS_CSUM`):
/// the checksum field holds the pseudo-header's sum and the device sums the TCP header with
/// the payload, so the translated numbers need no checksum change and the field is left alone.
/// A super-packet's segments inherit the translated sequence number (each offset by its
/// position), acknowledgement and SACK blocks, so one translation serves them all.
///
/// # Errors
/// As [`translate`].
pub fn translate_partial(buf: &mut [u8], p: &Parsed, shift: SeqShift) -> Result<(), PacketError> {
    translate_csum(buf, p, shift, false)
}

#[inline(always)]
fn translate_csum(
    buf: &mut [u8],
    p: &Parsed,
    shift: SeqShift,
    fix: bool,
) -> Result<(), PacketError> {
    if p.proto != IpProto::Tcp || p.fragment == Fragment::NonFirst || p.icmp.is_some() {
        return Err(PacketError::NotApplicable(
            "TCP splicing needs a TCP header",
        ));
    }
    p.check(buf.len())?;
    let l4 = p.l4;
    if p.payload < l4 + 20 {
        return Err(PacketError::Truncated {
            layer: Layer::Tcp,
            need: p.payload,
            have: buf.len(),
        });
    }
    let mut d = Delta::default();
    add32(buf, l4 + 4, shift.seq, &mut d);
    let ack_flag = buf.get(l4 + 13).is_some_and(|f| f & 0x10 != 0);
    if ack_flag {
        add32(buf, l4 + 8, shift.ack, &mut d);
    }
    // Option walk (RFC 9293 §3.1), bounded by the header length.
    let end = p.payload.min(l4 + 20 + MAX_OPTION_BYTES);
    let mut o = l4 + 20;
    while o < end {
        let kind = buf.get(o).copied().unwrap_or(0);
        match kind {
            0 => break,
            1 => o += 1,
            _ => {
                let len = usize::from(buf.get(o + 1).copied().unwrap_or(0));
                if len < 2 || o + len > end {
                    break;
                }
                // SACK (kind 5): 2 + 8n bytes of left / right edges.
                if kind == 5 && (len - 2) % 8 == 0 {
                    let mut e = o + 2;
                    while e + 4 <= o + len {
                        add32(buf, e, shift.ack, &mut d);
                        e += 4;
                    }
                }
                o += len;
            }
        }
    }
    if fix {
        apply_at(buf, l4 + 16, d, false);
    }
    Ok(())
}

#[inline(always)]
fn add32(buf: &mut [u8], off: usize, add: u32, d: &mut Delta) {
    if let Some(f) = buf.get_mut(off..off + 4) {
        let old = [f[0], f[1], f[2], f[3]];
        let new = u32::from_be_bytes(old).wrapping_add(add).to_be_bytes();
        d.add_bytes(&old, &new);
        f.copy_from_slice(&new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::recompute;
    use crate::parse::{parse, Link};
    use crate::testutil::{build, Spec};
    use proptest::prelude::*;

    /// A TCP segment with SACK-permitted padding replaced by a SACK option of `blocks` blocks.
    fn with_sack(v6: bool, blocks: &[(u32, u32)]) -> Vec<u8> {
        let mut s = Spec::simple(v6, 6);
        s.tcp_opts = 1 + 2 * blocks.len();
        let mut pkt = build(&s);
        let p = parse(&pkt, Link::Ip).unwrap();
        let o = p.l4 + 20;
        pkt[o] = 1;
        pkt[o + 1] = 1;
        pkt[o + 2] = 5;
        pkt[o + 3] = (2 + 8 * blocks.len()) as u8;
        for (i, (l, r)) in blocks.iter().enumerate() {
            pkt[o + 4 + 8 * i..o + 8 + 8 * i].copy_from_slice(&l.to_be_bytes());
            pkt[o + 8 + 8 * i..o + 12 + 8 * i].copy_from_slice(&r.to_be_bytes());
        }
        recompute(&mut pkt, &p).unwrap();
        pkt
    }

    #[test]
    fn shifts_seq_ack_and_sack() {
        let mut pkt = with_sack(false, &[(1000, 2000), (u32::MAX - 5, 10)]);
        let p = parse(&pkt, Link::Ip).unwrap();
        translate(&mut pkt, &p, SeqShift::new(100, 10)).unwrap();
        let l4 = p.l4;
        let rd = |o: usize| u32::from_be_bytes([pkt[o], pkt[o + 1], pkt[o + 2], pkt[o + 3]]);
        assert_eq!(rd(l4 + 4), 0x1234_5678 + 100);
        assert_eq!(rd(l4 + 8), 0x9abc_def0 + 10);
        assert_eq!((rd(l4 + 24), rd(l4 + 28)), (1010, 2010));
        assert_eq!((rd(l4 + 32), rd(l4 + 36)), (4, 20));
        let mut full = pkt.clone();
        recompute(&mut full, &p).unwrap();
        assert_eq!(full, pkt);
    }

    #[test]
    fn opposite_undoes_across_directions() {
        let (c, lc, ls, s) = (1000u32, 5000u32, 9000u32, 70000u32);
        let fwd = SeqShift::new(ls.wrapping_sub(c), s.wrapping_sub(lc));
        let back = fwd.opposite();
        // A client byte numbered c + 5 becomes ls + 5 towards the server; the server's ack of it
        // comes back as c + 5.
        assert_eq!((c + 5).wrapping_add(fwd.seq), ls + 5);
        assert_eq!((ls + 5).wrapping_add(back.ack), c + 5);
        assert_eq!((s + 3).wrapping_add(back.seq), lc + 3);
    }

    #[test]
    fn not_tcp() {
        let mut pkt = build(&Spec::simple(false, 17));
        let p = parse(&pkt, Link::Ip).unwrap();
        assert!(matches!(
            translate(&mut pkt, &p, SeqShift::default()),
            Err(PacketError::NotApplicable(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn translate_inverse_identity_and_checksum(v6: bool, blocks in proptest::collection::vec(any::<(u32, u32)>(), 0..4), seq: u32, ack: u32) {
            let orig = with_sack(v6, &blocks);
            let mut pkt = orig.clone();
            let p = parse(&pkt, Link::Ip).unwrap();
            let sh = SeqShift::new(seq, ack);
            translate(&mut pkt, &p, sh).unwrap();
            let mut full = pkt.clone();
            recompute(&mut full, &p).unwrap();
            prop_assert_eq!(&full, &pkt);
            translate(&mut pkt, &p, sh.inverse()).unwrap();
            prop_assert_eq!(pkt, orig);
        }
    }
}
