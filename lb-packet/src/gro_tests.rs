use super::*;
use crate::checksum::recompute;
use crate::offload::{complete_csum, Segmenter};
use crate::parse::{parse, Link};
use crate::testutil::{build, Spec};
use proptest::prelude::*;

/// Where packets start in their buffers (as after a balancer's headroom).
const AT: usize = 16;
/// Buffer size: room for a 64 KiB super-packet after `AT`.
const ROOM: usize = AT + 65_600;

/// A UDP datagram of flow `flow` (0, 1: IPv4; 2, 3: IPv6) with valid checksums.
fn dgram(flow: u8, payload: &[u8], id: u16, df: bool, ttl: u8) -> Vec<u8> {
    let mut s = Spec::simple(flow >= 2, 17);
    s.sp = 40_000 + u16::from(flow);
    s.dp = 5300;
    s.payload = payload.to_vec();
    s.df = df;
    s.ttl = ttl;
    let mut pkt = build(&s);
    if flow < 2 {
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        let p = parse(&pkt, Link::Ip).unwrap();
        recompute(&mut pkt, &p).unwrap();
    }
    pkt
}

/// A TCP segment (not UDP: the coalescer leaves it alone).
fn tcp(payload: &[u8]) -> Vec<u8> {
    let mut s = Spec::simple(false, 6);
    s.payload = payload.to_vec();
    build(&s)
}

/// The checksum left to the device, as a sender with checksum offload hands it over.
fn partial(pkt: &mut [u8]) -> VnetHdr {
    let p = parse(pkt, Link::Ip).unwrap();
    let ps = crate::checksum::pseudo_sum(pkt, &p, 17, p.end - p.l4);
    put16(pkt, p.l4 + 6, fold(ps));
    VnetHdr {
        needs_csum: true,
        csum_start: p.l4 as u16,
        csum_offset: 6,
        ..VnetHdr::NONE
    }
}

/// A batch of packets with their headers, each in its own buffer at `AT`.
fn batch(pkts: &[(Vec<u8>, VnetHdr)]) -> (Vec<Vec<u8>>, Vec<Option<Outgoing>>) {
    let mut bufs = Vec::new();
    let mut out = Vec::new();
    for (p, h) in pkts {
        let mut b = vec![0u8; ROOM];
        b[AT..AT + p.len()].copy_from_slice(p);
        bufs.push(b);
        out.push(Some(Outgoing {
            start: AT,
            len: p.len(),
            hdr: *h,
        }));
    }
    (bufs, out)
}

/// What the wire carries for one written packet: the kernel's segmentation of it (checksums
/// completed), as the offload module's `Segmenter` does it.
fn wire(pkt: &[u8], h: &VnetHdr) -> Vec<Vec<u8>> {
    wire_on(pkt, h, Link::Ip)
}

/// [`wire`] for a packet or frame of `link`; frames come back as their IP packets, after a
/// check that every segment carries the frame's Ethernet header.
fn wire_on(pkt: &[u8], h: &VnetHdr, link: Link) -> Vec<Vec<u8>> {
    let p = parse(pkt, link).unwrap();
    let mut seg = Segmenter::new(pkt, &p, h).unwrap();
    let mut buf = vec![0u8; 70_000];
    let mut v = Vec::new();
    while let Some(n) = seg.next_into(pkt, &mut buf).unwrap() {
        assert_eq!(buf[..p.l3], pkt[..p.l3], "a segment's link header");
        v.push(buf[p.l3..n].to_vec());
    }
    v
}

/// Everything written, in order, as wire packets.
fn written(bufs: &[Vec<u8>], out: &[Option<Outgoing>]) -> Vec<Vec<u8>> {
    written_on(bufs, out, Link::Ip)
}

/// [`written`] for packets or frames of `link`.
fn written_on(bufs: &[Vec<u8>], out: &[Option<Outgoing>], link: Link) -> Vec<Vec<u8>> {
    out.iter()
        .enumerate()
        .filter_map(|(i, o)| o.map(|o| (i, o)))
        .flat_map(|(i, o)| wire_on(&bufs[i][o.start..o.start + o.len], &o.hdr, link))
        .collect()
}

/// Puts each packet in an Ethernet frame (destination MAC `dst`), moving a partial checksum's
/// start by the header.
fn framed(pkts: &[(Vec<u8>, VnetHdr)], dst: u8) -> Vec<(Vec<u8>, VnetHdr)> {
    pkts.iter()
        .map(|(p, h)| {
            let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0x5e, 0x10, 0, 1];
            f.extend_from_slice(if p[0] >> 4 == 6 {
                &[0x86, 0xdd]
            } else {
                &[0x08, 0x00]
            });
            f.extend_from_slice(p);
            let mut h = *h;
            if h.needs_csum {
                h.csum_start += 14;
            }
            (f, h)
        })
        .collect()
}

/// A wire packet with what may change zeroed: the IPv4 identification of a DF datagram (and so
/// the header checksum).
fn normal(mut p: Vec<u8>) -> Vec<u8> {
    if p[0] >> 4 == 4 && p[6] & 0x40 != 0 {
        p[4..6].fill(0);
        p[10..12].fill(0);
    }
    p
}

/// The flow of a wire packet: (IP version, source port) for UDP, `None` otherwise.
fn flow_of(p: &[u8]) -> Option<(u8, u16)> {
    let q = parse(p, Link::Ip).ok()?;
    (q.key.proto() == lb_core::IpProto::Udp).then(|| (p[0] >> 4, q.key.src_port()))
}

#[test]
fn a_run_of_one_flow_becomes_one_super_packet_that_cuts_back_into_it() {
    for flow in [0u8, 2] {
        let mut pkts = Vec::new();
        for i in 0..10u16 {
            let mut p = dgram(flow, &[i as u8; 64], 100 + i, true, 64);
            let h = partial(&mut p);
            pkts.push((p, h));
        }
        let want: Vec<Vec<u8>> = pkts.iter().flat_map(|(p, h)| wire(p, h)).collect();
        let (mut bufs, mut out) = batch(&pkts);
        let c = coalesce_udp(&mut bufs, &mut out, Link::Ip);
        assert_eq!(
            c,
            Coalesced {
                super_packets: 1,
                datagrams: 10
            }
        );
        assert_eq!(out.iter().flatten().count(), 1);
        let o = out[0].unwrap();
        let l4 = if flow < 2 { 20 } else { 40 };
        assert_eq!(o.len, l4 + 8 + 640);
        assert_eq!(o.hdr.gso, GsoType::UdpL4);
        assert_eq!(o.hdr.gso_size, 64);
        assert_eq!(usize::from(o.hdr.csum_start), l4);
        assert_eq!(o.hdr.hdr_len as usize, l4 + 8);
        // The super-packet parses, and the kernel's cut gives the datagrams back.
        let sp = &bufs[0][AT..AT + o.len];
        assert!(parse(sp, Link::Ip).is_ok());
        assert_eq!(written(&bufs, &out), want, "flow {flow}");
    }
}

#[test]
fn a_shorter_datagram_ends_a_group_and_a_longer_one_starts_the_next() {
    let sizes = [100usize, 100, 60, 100, 100, 200, 200];
    let pkts: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (
                dgram(0, &vec![i as u8; n], i as u16, true, 64),
                VnetHdr::NONE,
            )
        })
        .collect();
    let want: Vec<Vec<u8>> = pkts.iter().map(|(p, _)| normal(p.clone())).collect();
    let (mut bufs, mut out) = batch(&pkts);
    let c = coalesce_udp(&mut bufs, &mut out, Link::Ip);
    // [100 100 60] [100 100] [200 200]
    assert_eq!(c.super_packets, 3);
    assert_eq!(c.datagrams, 7);
    let got: Vec<_> = written(&bufs, &out).into_iter().map(normal).collect();
    assert_eq!(got, want);
}

#[test]
fn what_must_not_merge_does_not() {
    let base = |i: u16| dgram(0, &[7; 64], i, true, 64);
    // A bad UDP checksum (complete, not vouched for): never merged, and nothing of its flow
    // after it overtakes it.
    let mut bad = base(1);
    bad[27] ^= 0x55;
    // A fragment, IPv4 options, another TTL, a datagram without DF whose identification does
    // not count up.
    let mut s = Spec::simple(false, 17);
    s.sp = 40_000;
    s.dp = 5300;
    s.payload = vec![7; 64];
    s.frag = crate::parse::Fragment::First;
    let frag = build(&s);
    s.frag = crate::parse::Fragment::None;
    s.opts = 1;
    let opts = build(&s);
    let ttl = dgram(0, &[7; 64], 3, true, 9);
    let nodf_a = dgram(1, &[1; 64], 500, false, 64);
    let nodf_b = dgram(1, &[1; 64], 700, false, 64);
    let mut bad_ip = base(4);
    bad_ip[10] ^= 1;
    for (name, second) in [
        ("bad udp checksum", bad),
        ("fragment", frag),
        ("options", opts),
        ("ttl", ttl),
        ("bad ip checksum", bad_ip),
    ] {
        let pkts = vec![
            (base(0), VnetHdr::NONE),
            (second.clone(), VnetHdr::NONE),
            (base(2), VnetHdr::NONE),
        ];
        let (mut bufs, mut out) = batch(&pkts);
        let c = coalesce_udp(&mut bufs, &mut out, Link::Ip);
        assert_eq!(c, Coalesced::default(), "{name}");
        assert_eq!(out.iter().flatten().count(), 3, "{name}");
        assert_eq!(&bufs[1][AT..AT + second.len()], &second[..], "{name}");
    }
    let (mut bufs, mut out) = batch(&[(nodf_a, VnetHdr::NONE), (nodf_b, VnetHdr::NONE)]);
    assert_eq!(
        coalesce_udp(&mut bufs, &mut out, Link::Ip),
        Coalesced::default()
    );
    // Without DF and counting up: merged, and the kernel's numbering gives the same bytes.
    let pkts: Vec<_> = (0..4)
        .map(|i| {
            (
                dgram(1, &[i as u8; 64], 0xFFFEu16.wrapping_add(i), false, 64),
                VnetHdr::NONE,
            )
        })
        .collect();
    let want: Vec<_> = pkts.iter().map(|(p, _)| p.clone()).collect();
    let (mut bufs, mut out) = batch(&pkts);
    assert_eq!(coalesce_udp(&mut bufs, &mut out, Link::Ip).datagrams, 4);
    assert_eq!(written(&bufs, &out), want);
}

#[test]
fn an_unchecked_ipv4_datagram_merges_and_comes_out_with_a_checksum() {
    let pkts: Vec<_> = (0..3)
        .map(|i| {
            let mut p = dgram(0, &[i as u8; 64], i, true, 64);
            p[26..28].fill(0); // no checksum
            (p, VnetHdr::NONE)
        })
        .collect();
    let (mut bufs, mut out) = batch(&pkts);
    assert_eq!(coalesce_udp(&mut bufs, &mut out, Link::Ip).datagrams, 3);
    for (i, w) in written(&bufs, &out).into_iter().enumerate() {
        let mut full = w.clone();
        let q = parse(&full, Link::Ip).unwrap();
        recompute(&mut full, &q).unwrap();
        assert_eq!(full, w, "datagram {i}: its checksum is valid");
        assert_ne!(&w[26..28], &[0, 0]);
        assert_eq!(&w[28..], &[i as u8; 64]);
    }
}

#[test]
fn groups_stop_at_their_limits() {
    // 64 datagrams at most.
    let pkts: Vec<_> = (0..130u16)
        .map(|i| (dgram(2, &[i as u8; 8], 0, true, 64), VnetHdr::NONE))
        .collect();
    let (mut bufs, mut out) = batch(&pkts);
    let c = coalesce_udp(&mut bufs, &mut out, Link::Ip);
    assert_eq!(c.super_packets, 3);
    assert_eq!(out.iter().flatten().count(), 3);
    assert_eq!(written(&bufs, &out).len(), 130);
    // 64 KiB at most.
    let pkts: Vec<_> = (0..50u16)
        .map(|i| (dgram(0, &vec![i as u8; 1400], i, true, 64), VnetHdr::NONE))
        .collect();
    let (mut bufs, mut out) = batch(&pkts);
    coalesce_udp(&mut bufs, &mut out, Link::Ip);
    for o in out.iter().flatten() {
        assert!(o.len <= 65_535);
    }
    assert_eq!(out.iter().flatten().count(), 2);
    assert_eq!(written(&bufs, &out).len(), 50);
    // A first buffer without room keeps its group to what fits.
    let pkts: Vec<_> = (0..4u16)
        .map(|i| (dgram(0, &[i as u8; 64], i, true, 64), VnetHdr::NONE))
        .collect();
    let (mut bufs, mut out) = batch(&pkts);
    bufs[0].truncate(AT + 92 + 64);
    let c = coalesce_udp(&mut bufs, &mut out, Link::Ip);
    // The first and one more fit; the third starts the next group.
    assert_eq!(c.super_packets, 2);
    assert_eq!(out[0].map(|o| o.len), Some(92 + 64));
    assert_eq!(written(&bufs, &out).len(), 4);
}

#[test]
fn super_packets_and_gso_input_are_left_alone() {
    let mut p = dgram(0, &[1; 400], 0, true, 64);
    let mut h = partial(&mut p);
    h.gso = GsoType::UdpL4;
    h.gso_size = 100;
    let pkts = vec![(p.clone(), h), (p, h)];
    let (mut bufs, mut out) = batch(&pkts);
    assert_eq!(
        coalesce_udp(&mut bufs, &mut out, Link::Ip),
        Coalesced::default()
    );
    // Garbage and empty buffers neither panic nor merge.
    let pkts = vec![
        (vec![], VnetHdr::NONE),
        (vec![0x45; 30], VnetHdr::NONE),
        (vec![0x60; 50], VnetHdr::NONE),
    ];
    let (mut bufs, mut out) = batch(&pkts);
    assert_eq!(
        coalesce_udp(&mut bufs, &mut out, Link::Ip),
        Coalesced::default()
    );
    // An outgoing entry outside its buffer is skipped.
    let (mut bufs, mut out) = batch(&[(tcp(b"x"), VnetHdr::NONE)]);
    out[0] = Some(Outgoing {
        start: ROOM - 1,
        len: 10,
        hdr: VnetHdr::NONE,
    });
    assert_eq!(
        coalesce_udp(&mut bufs, &mut out, Link::Ip),
        Coalesced::default()
    );
}

/// One packet of a generated batch.
#[derive(Debug, Clone)]
struct Item {
    /// 0..4: a UDP flow; 4: TCP; 5: a UDP datagram of flow 0 with a bad checksum.
    flow: u8,
    size: usize,
    partial: bool,
    df: bool,
    ttl: u8,
    /// Skip this many identifications first (without DF: breaks a run).
    id_skip: u16,
}

fn item() -> impl Strategy<Value = Item> {
    (
        prop_oneof![8 => 0u8..4, 1 => Just(4u8), 1 => Just(5u8)],
        prop_oneof![
            6 => Just(64usize),
            2 => Just(1400usize),
            2 => 1usize..200,
        ],
        any::<bool>(),
        prop_oneof![5 => Just(true), 1 => Just(false)],
        prop_oneof![8 => Just(64u8), 1 => Just(1u8)],
        prop_oneof![8 => Just(0u16), 1 => 1u16..3],
    )
        .prop_map(|(flow, size, partial, df, ttl, id_skip)| Item {
            flow,
            size,
            partial,
            df,
            ttl,
            id_skip,
        })
}

proptest! {
    /// Whatever the batch, what the kernel would put on the wire after coalescing is what it
    /// would have put there without: per flow the same datagrams in the same order (up to the
    /// identification of DF datagrams), every packet that is not UDP unchanged and in its
    /// order, no more writes than packets, and every super-packet within the kernel's limits.
    #[test]
    fn coalescing_changes_nothing_on_the_wire(
        items in proptest::collection::vec(item(), 0..80),
        ethernet in any::<bool>(),
    ) {
        let mut ids = [0u16; 4];
        let mut pkts = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let payload: Vec<u8> = (0..it.size).map(|j| (i * 31 + j) as u8).collect();
            let (mut p, f) = match it.flow {
                4 => (tcp(&payload), 4),
                5 => {
                    let mut p = dgram(0, &payload, 0, true, it.ttl);
                    let last = p.len() - 1;
                    p[last] ^= 0xA5;
                    (p, 0)
                }
                f => {
                    ids[f as usize] = ids[f as usize].wrapping_add(it.id_skip);
                    let id = ids[f as usize];
                    ids[f as usize] = id.wrapping_add(1);
                    (dgram(f, &payload, id, it.df, it.ttl), f)
                }
            };
            let h = if it.partial && f < 4 && it.flow != 5 { partial(&mut p) } else { VnetHdr::NONE };
            pkts.push((p, h));
        }
        let before: Vec<Vec<u8>> = pkts.iter().flat_map(|(p, h)| wire(p, h)).collect();
        let link = if ethernet { Link::Ethernet } else { Link::Ip };
        if ethernet {
            pkts = framed(&pkts, 0x11);
        }
        let (mut bufs, mut out) = batch(&pkts);
        let c = coalesce_udp(&mut bufs, &mut out, link);
        let writes = out.iter().flatten().count();
        prop_assert_eq!(writes + c.datagrams as usize - c.super_packets as usize, pkts.len());
        for o in out.iter().flatten() {
            let most = if ethernet { 65_535 + 14 } else { 65_535 };
            prop_assert!(o.len <= most);
            if o.hdr.is_gso() {
                let segs = (o.len - usize::from(o.hdr.hdr_len)).div_ceil(usize::from(o.hdr.gso_size));
                prop_assert!((2..=usize::from(MAX_SEGMENTS)).contains(&segs));
            }
        }
        let after = written_on(&bufs, &out, link);
        prop_assert_eq!(after.len(), before.len());
        let key = |p: &Vec<u8>| flow_of(p);
        for f in before.iter().map(key).chain([None]) {
            let a: Vec<_> = before.iter().filter(|p| key(p) == f).cloned().map(normal).collect();
            let b: Vec<_> = after.iter().filter(|p| key(p) == f).cloned().map(normal).collect();
            prop_assert_eq!(a, b, "flow {:?}", f);
        }
    }
}

#[test]
fn a_partial_checksum_elsewhere_is_a_barrier() {
    let mut p = dgram(0, &[1; 64], 0, true, 64);
    let mut h = partial(&mut p);
    h.csum_offset = 4;
    let pkts = vec![
        (dgram(0, &[1; 64], 0, true, 64), VnetHdr::NONE),
        (p, h),
        (dgram(0, &[1; 64], 2, true, 64), VnetHdr::NONE),
    ];
    let (mut bufs, mut out) = batch(&pkts);
    assert_eq!(
        coalesce_udp(&mut bufs, &mut out, Link::Ip),
        Coalesced::default()
    );
    // The helper that the partial-checksum tests share works as the device would.
    let mut q = dgram(0, &[3; 10], 0, true, 64);
    let want = q.clone();
    let h = partial(&mut q);
    let end = q.len();
    complete_csum(&mut q, &h, end, true).unwrap();
    assert_eq!(q, want);
}

#[test]
fn ethernet_frames_merge_when_their_link_headers_agree() {
    let run: Vec<_> = (0..6u16)
        .map(|i| {
            let mut p = dgram(2, &[i as u8; 64], 0, true, 64);
            let h = partial(&mut p);
            (p, h)
        })
        .collect();
    let want: Vec<Vec<u8>> = run.iter().flat_map(|(p, h)| wire(p, h)).collect();
    // One run, one link header: one super-frame, with the offsets moved by the header.
    let frames = framed(&run, 0x11);
    let (mut bufs, mut out) = batch(&frames);
    let c = coalesce_udp(&mut bufs, &mut out, Link::Ethernet);
    assert_eq!((c.super_packets, c.datagrams), (1, 6));
    let o = out[0].unwrap();
    assert_eq!((o.hdr.csum_start, o.hdr.hdr_len), (14 + 40, 14 + 48));
    assert_eq!(written_on(&bufs, &out, Link::Ethernet), want);
    // Another destination MAC halfway: two groups, in order.
    let mut frames = framed(&run[..3], 0x11);
    frames.extend(framed(&run[3..], 0x12));
    let (mut bufs, mut out) = batch(&frames);
    let c = coalesce_udp(&mut bufs, &mut out, Link::Ethernet);
    assert_eq!((c.super_packets, c.datagrams), (2, 6));
    // A VLAN-tagged frame is not merged and nothing overtakes it.
    let mut frames = framed(&run, 0x11);
    frames[2].0.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    let (mut bufs, mut out) = batch(&frames);
    let c = coalesce_udp(&mut bufs, &mut out, Link::Ethernet);
    assert_eq!((c.super_packets, c.datagrams), (2, 5));
    assert!(out[2].is_some() && out[1].is_none() && out[3].is_some());
    // The same frames read as IP packets are not IP: nothing merges.
    let frames = framed(&run, 0x11);
    let (mut bufs, mut out) = batch(&frames);
    assert_eq!(
        coalesce_udp(&mut bufs, &mut out, Link::Ip),
        Coalesced::default()
    );
}
