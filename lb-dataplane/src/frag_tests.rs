//! Fragments through the data path: each fragment's output, put back together, equals the
//! output for the unfragmented datagram (a reference data path built alike), in every order
//! in which the first fragment comes first; counters add up; memory stays bounded.

use std::net::{IpAddr, SocketAddr};

use lb_core::{Duration, HashKey, Instant};
use lb_packet::checksum::recompute;
use lb_packet::{fragment_info, parse, Fragment, Link};
use proptest::prelude::*;

use super::*;
use crate::{
    Affinity, ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec,
    Verdict, HEADROOM,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A whole UDP datagram (IPv4 without DF, identification `id`; or IPv6) with valid checksums.
fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8], id: u16) -> Vec<u8> {
    let ulen = 8 + payload.len();
    let mut v = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut v = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
            v[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
            v[4..6].copy_from_slice(&id.to_be_bytes());
            v.extend_from_slice(&s.octets());
            v.extend_from_slice(&d.octets());
            v
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut v = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
            v[4..6].copy_from_slice(&(ulen as u16).to_be_bytes());
            v.extend_from_slice(&s.octets());
            v.extend_from_slice(&d.octets());
            v
        }
        _ => panic!("mixed families"),
    };
    v.extend_from_slice(&src.port().to_be_bytes());
    v.extend_from_slice(&dst.port().to_be_bytes());
    v.extend_from_slice(&(ulen as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    let p = parse(&v, Link::Ip).unwrap();
    recompute(&mut v, &p).unwrap();
    v
}

/// Cuts a whole datagram (no IPv4 options, no IPv6 extension headers) into fragments of at
/// most `mtu` bytes, as the sender's IP layer does; IPv6 fragments get identification `id`.
fn fragment(pkt: &[u8], mtu: usize, id: u32) -> Vec<Vec<u8>> {
    let v6 = pkt[0] >> 4 == 6;
    let hl = if v6 { 40 } else { 20 };
    let chunk = (mtu - hl - if v6 { 8 } else { 0 }) / 8 * 8;
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
        let p = parse(&f, Link::Ip).unwrap();
        recompute(&mut f, &p).unwrap();
        out.push(f);
        off = end;
    }
    out
}

/// Puts fragments (IP packets, any order) back together into the whole datagram.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut head = Vec::new();
    for f in frags {
        let p = parse(f, Link::Ip).unwrap();
        let fi = fragment_info(f, &p).unwrap();
        let o = fi.offset as usize;
        if data.len() < o + fi.len as usize {
            data.resize(o + fi.len as usize, 0);
        }
        data[o..o + fi.len as usize].copy_from_slice(&f[fi.data..]);
        if fi.offset == 0 {
            head = f[..if f[0] >> 4 == 6 { 40 } else { 20 }].to_vec();
            if f[0] >> 4 == 6 {
                head[6] = fi.proto;
            }
        }
    }
    let mut v = head;
    let n = v.len() + data.len();
    if v[0] >> 4 == 6 {
        v[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
    } else {
        v[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        v[6..8].copy_from_slice(&[0, 0]);
    }
    v.extend_from_slice(&data);
    let p = parse(&v, Link::Ip).unwrap();
    let mut c = v.clone();
    recompute(&mut c, &p).unwrap();
    if v[0] >> 4 == 4 {
        // The IPv4 header changed (length, flags): its checksum is the test's to fix; the
        // UDP checksum must already be right.
        v[10..12].copy_from_slice(&c[10..12]);
    }
    assert_eq!(
        c, v,
        "reassembled datagram: transport checksum differs from a recompute"
    );
    v
}

const VIP4: &str = "203.0.113.10:5060";
const VIP6: &str = "[2001:db8:10::10]:5060";

fn spec(mode: Mode, v6: bool, affinity: Affinity) -> DataplaneSpec {
    let mut svc = ServiceSpec::new(sa(if v6 { VIP6 } else { VIP4 }), Proto::Udp, mode);
    svc.affinity = affinity;
    for i in 11..14 {
        let b = if v6 {
            format!("[2001:db8:b::{i}]:5060")
        } else {
            format!("198.51.100.{i}:5060")
        };
        svc = svc.with_backend(sa(&b), 1);
    }
    DataplaneSpec {
        snat_addrs: vec![
            "203.0.113.100".parse().unwrap(),
            "2001:db8:100::100".parse().unwrap(),
        ],
        conntrack_capacity: 4096,
        services: vec![svc],
        ..DataplaneSpec::default()
    }
}

fn dataplane(spec: &DataplaneSpec) -> Dataplane {
    let key = HashKey::from_bytes([3; 16]);
    let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
    Dataplane::new(spec, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap()
}

/// Runs `pkt` through `dp`: the output bytes, or the verdict if not forwarded.
fn run(dp: &mut Dataplane, pkt: &[u8], now: Instant) -> Result<Vec<u8>, Verdict> {
    let mut buf = vec![0u8; HEADROOM + 9100];
    buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
    match dp.process(&mut buf, HEADROOM, pkt.len(), now) {
        Verdict::Forward { start, len } => Ok(buf[start..start + len].to_vec()),
        v => Err(v),
    }
}

fn client(v6: bool) -> SocketAddr {
    sa(if v6 {
        "[2001:db8:c::2]:5060"
    } else {
        "192.0.2.2:5060"
    })
}

fn vip(v6: bool) -> SocketAddr {
    sa(if v6 { VIP6 } else { VIP4 })
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

const T: Instant = Instant::from_secs(10);

#[test]
fn nat_and_dnat_fragments_both_ways_equal_the_whole_datagram() {
    for mode in [Mode::Nat, Mode::Dnat] {
        for v6 in [false, true] {
            let s = spec(mode, v6, Affinity::None);
            let (mut whole, mut split) = (dataplane(&s), dataplane(&s));
            let req = udp(client(v6), vip(v6), &payload(4000, 1), 0x4242);
            let want = run(&mut whole, &req, T).unwrap();
            let frags = fragment(&req, 1500, 7);
            assert_eq!(frags.len(), 3);
            let outs: Vec<_> = frags
                .iter()
                .map(|f| run(&mut split, f, T).unwrap())
                .collect();
            for o in &outs {
                assert!(o.len() <= 1500, "a fragment stays within the MTU");
            }
            assert_eq!(reassemble(&outs), want, "{mode:?} v6={v6}");
            // The backend's 4000-byte answer, fragmented, reaches the client whole.
            let p = parse(&want, Link::Ip).unwrap();
            let (b, to) = (
                SocketAddr::new(p.key.dst(), p.key.dst_port()),
                SocketAddr::new(p.key.src(), p.key.src_port()),
            );
            let rep = udp(b, to, &payload(4000, 2), 0x4343);
            let want_back = run(&mut whole, &rep, T).unwrap();
            let outs: Vec<_> = fragment(&rep, 1500, 8)
                .iter()
                .map(|f| run(&mut split, f, T).unwrap())
                .collect();
            let back = reassemble(&outs);
            assert_eq!(back, want_back);
            let q = parse(&back, Link::Ip).unwrap();
            assert_eq!(SocketAddr::new(q.key.dst(), q.key.dst_port()), client(v6));
            assert_eq!(SocketAddr::new(q.key.src(), q.key.src_port()), vip(v6));
            let st = split.stats();
            assert_eq!(
                (st.frag_first, st.frag_forwarded, st.frag_completed),
                (2, 4, 2)
            );
            assert_eq!(st.forwarded, 6);
            assert_eq!(st.dropped(), 0);
            // Per backend: the same packets as 6 packets through it and back.
            let b = st.backends.iter().map(|b| b.packets).sum::<u64>();
            let r = st.backends.iter().map(|b| b.reply_packets).sum::<u64>();
            assert_eq!((b, r), (3, 3));
            assert_eq!(split.frag.len(), 0, "completed datagrams leave the table");
        }
    }
}

#[test]
fn a_later_fragment_before_its_first_is_dropped_and_counted() {
    let s = spec(Mode::Nat, false, Affinity::None);
    let mut dp = dataplane(&s);
    let frags = fragment(
        &udp(client(false), vip(false), &payload(4000, 3), 1),
        1500,
        0,
    );
    assert_eq!(
        run(&mut dp, &frags[2], T),
        Err(Verdict::Drop(DropReason::Fragment))
    );
    assert!(run(&mut dp, &frags[0], T).is_ok());
    assert!(run(&mut dp, &frags[1], T).is_ok());
    let st = dp.stats();
    assert_eq!(st.rx_packets, st.forwarded + st.dropped());
    assert_eq!(st.drops_for(DropReason::Fragment), 1);
    // Never complete: the entry stays until it expires.
    assert_eq!(st.frag_completed, 0);
    assert_eq!(dp.frag.len(), 1);
}

#[test]
fn entries_expire() {
    let mut s = spec(Mode::Nat, false, Affinity::None);
    s.frag_timeout = Duration::from_secs(2);
    let mut dp = dataplane(&s);
    let frags = fragment(
        &udp(client(false), vip(false), &payload(3000, 3), 1),
        1500,
        0,
    );
    assert!(run(&mut dp, &frags[0], T).is_ok());
    assert!(run(&mut dp, &frags[1], T + Duration::from_secs(1)).is_ok());
    let late = T + Duration::from_secs(2);
    assert_eq!(
        run(&mut dp, &frags[2], late),
        Err(Verdict::Drop(DropReason::Fragment))
    );
    assert_eq!(dp.stats().frag_expired, 1);
    assert_eq!(dp.frag.len(), 0);
}

#[test]
fn zero_capacity_drops_every_fragment_as_before() {
    let mut s = spec(Mode::Nat, false, Affinity::None);
    s.frag_capacity = 0;
    let mut dp = dataplane(&s);
    for f in fragment(
        &udp(client(false), vip(false), &payload(3000, 3), 1),
        1500,
        0,
    ) {
        assert_eq!(
            run(&mut dp, &f, T),
            Err(Verdict::Drop(DropReason::Fragment))
        );
    }
    assert_eq!(dp.frag_memory_bytes(), 0);
}

#[test]
fn the_table_is_bounded_and_evicts_the_oldest() {
    let mut s = spec(Mode::Nat, false, Affinity::None);
    s.frag_capacity = 16;
    let mut dp = dataplane(&s);
    let mem = dp.frag_memory_bytes();
    assert!(mem <= 16 * 112, "{mem} bytes for 16 entries");
    for i in 0..2000u16 {
        let pkt = udp(client(false), vip(false), &payload(3000, 3), i);
        let frags = fragment(&pkt, 1500, 0);
        assert!(run(&mut dp, &frags[0], T + Duration::from_millis(u64::from(i))).is_ok());
        assert!(dp.frag.len() <= 16);
    }
    assert_eq!(dp.frag_memory_bytes(), mem);
    let st = dp.stats();
    assert_eq!(st.frag_first, 2000);
    assert!(st.frag_evicted >= 2000 - 16, "{}", st.frag_evicted);
}

#[test]
fn sip_invite_of_3000_bytes_follows_its_call_id() {
    for v6 in [false, true] {
        let s = spec(Mode::Nat, v6, Affinity::SipCallId);
        let (mut whole, mut split) = (dataplane(&s), dataplane(&s));
        for call in 0..20 {
            let mut m = format!(
                "INVITE sip:uas@x SIP/2.0\r\nVia: SIP/2.0/UDP c\r\nCall-ID: {call}-frag@c\r\n\
                 CSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: 2700\r\n\r\n"
            )
            .into_bytes();
            m.extend(std::iter::repeat_n(b'a', 2700));
            let pkt = udp(client(v6), vip(v6), &m, call);
            let want = run(&mut whole, &pkt, T).unwrap();
            let outs: Vec<_> = fragment(&pkt, 1500, u32::from(call))
                .iter()
                .map(|f| run(&mut split, f, T).unwrap())
                .collect();
            assert!(outs.len() >= 2);
            assert_eq!(reassemble(&outs), want);
            // The BYE, whole, goes where the fragmented INVITE went.
            let bye = format!("BYE sip:uas@x SIP/2.0\r\nCall-ID: {call}-frag@c\r\n\r\n");
            let got = run(&mut split, &udp(client(v6), vip(v6), bye.as_bytes(), 9), T).unwrap();
            let (p, q) = (
                parse(&got, Link::Ip).unwrap(),
                parse(&want, Link::Ip).unwrap(),
            );
            assert_eq!(p.key.dst(), q.key.dst());
        }
        let st = split.stats();
        assert_eq!(st.backends.iter().map(|b| b.sip_calls).sum::<u64>(), 20);
        assert_eq!(
            st.backends
                .iter()
                .map(|b| b.sip_call_id_misses)
                .sum::<u64>(),
            0
        );
        assert!(st.backends.iter().filter(|b| b.sip_calls > 0).count() > 1);
    }
}

#[test]
fn tunnel_fragments_follow_the_first_and_ipv4_is_never_too_big() {
    for v6 in [false, true] {
        let s = spec(Mode::Tunnel, v6, Affinity::None);
        let mut dp = dataplane(&s);
        let pkt = udp(client(v6), vip(v6), &payload(4000, 5), 77);
        let frags = fragment(&pkt, 1500, 77);
        let mut outer = None;
        for (i, f) in frags.iter().enumerate() {
            match run(&mut dp, f, T) {
                Ok(o) => {
                    assert!(
                        !v6,
                        "IPv6 fragments of 1500 bytes do not fit a tunnel at MTU 1500"
                    );
                    // IPIP: the inner fragment unchanged after the outer header.
                    assert_eq!(&o[20..], &f[..]);
                    assert_eq!(
                        o[6] & 0x40,
                        0,
                        "DF clear: the kernel fragments the outer packet"
                    );
                    let dst = o[16..20].to_vec();
                    assert_eq!(*outer.get_or_insert(dst.clone()), dst, "fragment {i}");
                }
                Err(Verdict::Reply { .. }) if v6 && i == 0 => {} // packet too big
                Err(Verdict::Drop(DropReason::Fragment)) if v6 && i > 0 => {}
                Err(v) => panic!("fragment {i} v6={v6}: {v:?}"),
            }
        }
        let st = dp.stats();
        if v6 {
            assert_eq!(
                (st.icmp_generated, st.drops_for(DropReason::Fragment)),
                (1, 2)
            );
        } else {
            assert_eq!(
                (st.forwarded, st.frag_forwarded, st.frag_completed),
                (3, 2, 1)
            );
        }
    }
}

#[test]
fn dr_fragments_get_the_first_fragments_macs() {
    let mut s = spec(Mode::Dr, false, Affinity::None);
    s.services[0]
        .backends
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| {
            b.mac = Some(lb_core::MacAddr([2, 0, 0, 0, 0, i as u8 + 1]));
        });
    let key = HashKey::from_bytes([3; 16]);
    let mut cp = ControlPlane::new(s.clone(), key).unwrap();
    let mut dp = Dataplane::new(
        &s,
        cp.build().unwrap(),
        DataplaneOptions::new(key).ethernet(),
    )
    .unwrap();
    let pkt = udp(client(false), vip(false), &payload(4000, 5), 78);
    let mut macs = None;
    for f in fragment(&pkt, 1500, 0) {
        let mut frame = vec![0xAA; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&f);
        let o = run(&mut dp, &frame, T).unwrap();
        assert_eq!(&o[14..], &f[..]);
        let m = o[..12].to_vec();
        assert_eq!(*macs.get_or_insert(m.clone()), m);
    }
    assert_eq!(dp.stats().frag_completed, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any order of the fragments: those before the first fragment are dropped, every other is
    /// forwarded; with the first fragment first, the outputs put together equal the output for
    /// the whole datagram. Counters add up.
    #[test]
    fn any_order_with_the_first_first_equals_the_whole(
        v6 in any::<bool>(),
        nat in any::<bool>(),
        len in 1500usize..9000,
        mtu in 576usize..1500,
        order in proptest::collection::vec(any::<u32>(), 20),
    ) {
        let mode = if nat { Mode::Nat } else { Mode::Dnat };
        let s = spec(mode, v6, Affinity::None);
        let (mut whole, mut split) = (dataplane(&s), dataplane(&s));
        let pkt = udp(client(v6), vip(v6), &payload(len, 9), 99);
        let want = run(&mut whole, &pkt, T).unwrap();
        let frags = fragment(&pkt, mtu, 5);
        let n = frags.len();
        // A permutation from the random words.
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by_key(|&i| order[i % order.len()].rotate_left(i as u32));
        let first_at = idx.iter().position(|&i| i == 0).unwrap();
        let mut outs = Vec::new();
        for (k, &i) in idx.iter().enumerate() {
            let r = run(&mut split, &frags[i], T);
            if k < first_at {
                prop_assert_eq!(r, Err(Verdict::Drop(DropReason::Fragment)));
            } else {
                outs.push(r.unwrap());
            }
        }
        if first_at == 0 {
            prop_assert_eq!(reassemble(&outs), want);
        }
        let st = split.stats();
        prop_assert_eq!(st.rx_packets, n as u64);
        prop_assert_eq!(st.forwarded + st.dropped(), n as u64);
        prop_assert_eq!(st.dropped(), first_at as u64);
        prop_assert_eq!(st.frag_first, 1);
        prop_assert_eq!(st.frag_forwarded, (n - 1 - first_at) as u64);
        prop_assert_eq!(st.frag_completed, u64::from(first_at == 0));
        prop_assert_eq!(split.frag.len(), usize::from(first_at != 0));
    }

    /// Arbitrary bytes that parse as fragments never panic the data path.
    #[test]
    fn junk_fragments_never_panic(
        v6 in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..200),
        fo in any::<u16>(),
    ) {
        let s = spec(Mode::Nat, v6, Affinity::None);
        let mut dp = dataplane(&s);
        let mut pkt = udp(client(v6), vip(v6), &body, 1);
        if v6 {
            let f = fragment(&udp(client(v6), vip(v6), &payload(3000, 1), 1), 1500, 3);
            pkt = f[usize::from(fo) % f.len()].clone();
            let at = 44.min(pkt.len() - 1);
            pkt[at] = (fo >> 8) as u8;
        } else {
            pkt[6..8].copy_from_slice(&fo.to_be_bytes());
        }
        let _ = run(&mut dp, &pkt, T);
        let st = dp.stats();
        prop_assert_eq!(st.rx_packets, st.forwarded + st.dropped() + st.icmp_generated);
    }
}

#[test]
fn fragment_status_of_the_builders() {
    let f = fragment(
        &udp(client(false), vip(false), &payload(3000, 1), 1),
        1500,
        0,
    );
    let kinds: Vec<_> = f
        .iter()
        .map(|x| parse(x, Link::Ip).unwrap().fragment)
        .collect();
    assert_eq!(
        kinds,
        [Fragment::First, Fragment::NonFirst, Fragment::NonFirst]
    );
}
