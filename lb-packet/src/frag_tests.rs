use proptest::prelude::*;

use super::*;
use crate::parse::{parse, Link};
use crate::testutil::{build, Spec};

/// Splits a whole IPv4 packet without options (or an IPv6 packet without extension headers)
/// into fragments of at most `mtu` bytes, as a sender's IP layer does (RFC 791 §3.2,
/// RFC 8200 §4.5). IPv4 header checksums are left as they were (the parser does not read them).
pub(crate) fn fragment(pkt: &[u8], mtu: usize, id: u32) -> Vec<Vec<u8>> {
    let v6 = pkt[0] >> 4 == 6;
    let hl = if v6 { 40 } else { 20 };
    let extra = if v6 { 8 } else { 0 };
    let chunk = (mtu - hl - extra) / 8 * 8;
    let data = &pkt[hl..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        let more = end < data.len();
        let mut f = pkt[..hl].to_vec();
        if v6 {
            let nh = f[6];
            f[6] = 44;
            f.extend_from_slice(&[nh, 0]);
            f.extend_from_slice(&(((off / 8) as u16) << 3 | u16::from(more)).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        } else {
            f[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            f[6..8].copy_from_slice(&fo.to_be_bytes());
        }
        f.extend_from_slice(&data[off..end]);
        let n = f.len();
        if v6 {
            f[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
        } else {
            f[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        }
        out.push(f);
        off = end;
    }
    out
}

#[test]
fn whole_datagrams_have_no_fragment_info() {
    for v6 in [false, true] {
        let pkt = build(&Spec::simple(v6, 17));
        let p = parse(&pkt, Link::Ip).unwrap();
        assert_eq!(
            fragment_info(&pkt, &p),
            Err(PacketError::NotApplicable("not a fragment"))
        );
    }
}

#[test]
fn fragments_of_one_datagram_share_an_identity_and_tile_it() {
    for v6 in [false, true] {
        let mut s = Spec::simple(v6, 17);
        s.payload = (0..3000u32).map(|i| i as u8).collect();
        let whole = build(&s);
        let hl = if v6 { 40 } else { 20 };
        let frags = fragment(&whole, 1500, 0xBEEF);
        assert_eq!(frags.len(), 3);
        let mut next = 0;
        for (i, f) in frags.iter().enumerate() {
            let p = parse(f, Link::Ip).unwrap();
            let fi = fragment_info(f, &p).unwrap();
            assert_eq!((fi.src, fi.dst), (p.key.src(), p.key.dst()));
            assert_eq!((fi.proto, fi.id), (17, 0xBEEF));
            assert_eq!(fi.offset, next, "fragment {i}");
            assert_eq!(fi.more, i + 1 < frags.len());
            assert_eq!(fi.data, hl + if v6 { 8 } else { 0 });
            assert_eq!(fi.len as usize, f.len() - fi.data);
            // The data is the original datagram's bytes at that offset.
            let o = fi.offset as usize;
            assert_eq!(&f[fi.data..], &whole[hl + o..hl + o + fi.len as usize]);
            next = fi.data_end();
        }
        assert_eq!(next as usize, whole.len() - hl);
    }
}

#[test]
fn ipv6_fragment_header_after_other_extension_headers() {
    let mut s = Spec::simple(true, 17);
    s.payload = vec![7; 40];
    s.frag = Fragment::NonFirst;
    s.opts = 2; // destination options before the Fragment header
    let pkt = build(&s);
    let p = parse(&pkt, Link::Ip).unwrap();
    let fi = fragment_info(&pkt, &p).unwrap();
    assert_eq!(fi.proto, 17);
    assert_eq!(fi.data, p.l4);
    assert!(fi.offset > 0);
}

#[test]
fn a_parsed_of_another_buffer_is_an_error() {
    let mut s = Spec::simple(false, 17);
    s.frag = Fragment::First;
    s.payload = vec![1; 100];
    let pkt = build(&s);
    let p = parse(&pkt, Link::Ip).unwrap();
    assert!(fragment_info(&pkt[..30], &p).is_err());
}

proptest! {
    /// Whatever the bytes, parse + fragment_info never panic, and the data lies in the packet.
    #[test]
    fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(p) = parse(&bytes, Link::Ip) {
            if let Ok(fi) = fragment_info(&bytes, &p) {
                prop_assert!(fi.data <= p.end && p.end <= bytes.len());
                prop_assert_eq!(fi.len as usize, p.end - fi.data);
            }
        }
    }

    /// Any IPv4 / IPv6 datagram cut at any MTU: the pieces tile it exactly.
    #[test]
    fn fragments_tile_the_datagram(
        v6 in any::<bool>(),
        len in 1usize..5000,
        mtu in 80usize..1600,
        id in any::<u32>(),
    ) {
        let mut s = Spec::simple(v6, 17);
        s.payload = vec![0x5A; len];
        let whole = build(&s);
        let hl = if v6 { 40 } else { 20 };
        let frags = fragment(&whole, mtu, id);
        let mut next = 0u32;
        for f in &frags {
            let p = parse(f, Link::Ip).unwrap();
            if frags.len() == 1 {
                prop_assert_eq!(p.fragment, Fragment::None);
                continue;
            }
            let fi = fragment_info(f, &p).unwrap();
            prop_assert_eq!(fi.offset, next);
            prop_assert_eq!(fi.id, if v6 { id } else { id & 0xFFFF });
            next = fi.data_end();
        }
        if frags.len() > 1 {
            prop_assert_eq!(next as usize, whole.len() - hl);
        }
    }
}
