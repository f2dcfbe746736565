#![no_main]
//! Fragments through `Dataplane::process` (issue 18, lb-dataplane `frag.rs`): the fragments of
//! a few large UDP datagrams (and the backends' fragmented answers), sent in any order,
//! repeated, corrupted, with time moving on. Never panics; the counters add up after every
//! packet; the fragment table's memory never changes; every forwarded packet parses, and one
//! made from an intact fragment keeps a correct IPv4 header checksum. At the end, a clean
//! in-order run of a fresh datagram through the same data path still works: its fragments,
//! put back together, are the whole datagram's rewrite (a second data path built alike
//! processes the whole datagram).

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use lb_core::{Duration, HashKey, Instant};
use lb_dataplane::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec, Verdict,
    HEADROOM,
};
use lb_packet::checksum::recompute;
use lb_packet::{fragment_info, parse, Link};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Send fragment `i` (modulo their number) of datagram `d` (modulo 3).
    Send { d: u8, i: u8 },
    /// Flip a byte of fragment `i` of datagram `d` before sending it.
    Corrupt { d: u8, i: u8, at: u16, xor: u8 },
    /// Let time pass.
    Wait { ms: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    v6: bool,
    mode: u8,
    capacity: u8,
    lens: [u16; 3],
    mtu: u16,
    ops: Vec<Op>,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp(src: SocketAddr, dst: SocketAddr, n: usize, id: u16) -> Vec<u8> {
    let ulen = 8 + n;
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
        _ => unreachable!(),
    };
    v.extend_from_slice(&src.port().to_be_bytes());
    v.extend_from_slice(&dst.port().to_be_bytes());
    v.extend_from_slice(&(ulen as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend((0..n).map(|i| (i as u8) ^ (id as u8)));
    let p = parse(&v, Link::Ip).unwrap();
    recompute(&mut v, &p).unwrap();
    v
}

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

fn dataplane(mode: Mode, v6: bool, capacity: usize) -> Dataplane {
    let vip = if v6 {
        "[2001:db8:10::10]:53"
    } else {
        "203.0.113.10:53"
    };
    let mut svc = ServiceSpec::new(sa(vip), Proto::Udp, mode);
    for i in 11..14 {
        let b = if v6 {
            format!("[2001:db8:b::{i}]:5353")
        } else {
            format!("198.51.100.{i}:5353")
        };
        svc = svc.with_backend(sa(&b), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: vec![sa("203.0.113.100:0").ip(), sa("[2001:db8:100::100]:0").ip()],
        // Room for every flow 64 corrupted packets can open: the clean datagram at the end
        // always finds a place.
        conntrack_capacity: 1024,
        persist_capacity: 16,
        frag_capacity: capacity,
        frag_timeout: Duration::from_secs(2),
        snat_ports: 2000..=2100,
        services: vec![svc],
        ..DataplaneSpec::default()
    };
    let key = HashKey::from_bytes([9; 16]);
    let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
    Dataplane::new(&spec, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap()
}

/// Processes `pkt`; checks the counters add up; the output bytes when forwarded.
fn step(dp: &mut Dataplane, pkt: &[u8], now: Instant) -> (Verdict, Option<Vec<u8>>) {
    let mut buf = vec![0u8; HEADROOM + pkt.len() + 64];
    buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
    let v = dp.process(&mut buf, HEADROOM, pkt.len(), now);
    let s = dp.stats();
    assert_eq!(
        s.rx_packets,
        s.forwarded + s.icmp_generated + s.dropped(),
        "{s:?}"
    );
    match v {
        Verdict::Forward { start, len } => (v, Some(buf[start..start + len].to_vec())),
        _ => (v, None),
    }
}

fuzz_target!(|inp: Input| {
    let mode = match inp.mode % 3 {
        0 => Mode::Nat,
        1 => Mode::Dnat,
        _ => Mode::Tunnel,
    };
    let v6 = inp.v6;
    let mtu = 200 + usize::from(inp.mtu % 1301);
    let (client, vip) = if v6 {
        (sa("[2001:db8:c::2]:5000"), sa("[2001:db8:10::10]:53"))
    } else {
        (sa("192.0.2.2:5000"), sa("203.0.113.10:53"))
    };
    let mut dp = dataplane(mode, v6, usize::from(inp.capacity % 40));
    let mem = dp.frag_memory_bytes();
    let datagrams: Vec<Vec<Vec<u8>>> = inp
        .lens
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let whole = udp(client, vip, 1 + usize::from(n % 6000), k as u16 + 1);
            fragment(&whole, mtu, k as u32 + 1)
        })
        .collect();
    let mut now = Instant::from_secs(1);
    for op in inp.ops.iter().take(64) {
        let (d, i, corrupt) = match *op {
            Op::Send { d, i } => (d, i, None),
            Op::Corrupt { d, i, at, xor } => (d, i, Some((at, xor))),
            Op::Wait { ms } => {
                now = now + Duration::from_millis(u64::from(ms));
                continue;
            }
        };
        let frags = &datagrams[usize::from(d) % 3];
        let mut f = frags[usize::from(i) % frags.len()].clone();
        if let Some((at, xor)) = corrupt {
            let at = usize::from(at) % f.len();
            f[at] ^= xor;
        }
        let (_, o) = step(&mut dp, &f, now);
        if let Some(o) = o {
            let p = parse(&o, Link::Ip).expect("a forwarded packet parses");
            if corrupt.is_none() && mode != Mode::Tunnel {
                let mut c = o.clone();
                recompute(&mut c, &p).unwrap();
                assert_eq!(c, o, "checksums differ from a full recompute");
            }
        }
        assert_eq!(dp.frag_memory_bytes(), mem);
    }
    if mem == 0 {
        return; // fragments off: every one was dropped
    }
    // A clean datagram, in order, still goes through whole.
    now = now + Duration::from_secs(10);
    let whole = udp(client, vip, 3000, 4242);
    let frags = fragment(&whole, mtu, 4242);
    for (k, f) in frags.iter().enumerate() {
        let (v, o) = step(&mut dp, f, now);
        // Tunnel mode, IPv6: a first fragment too big once encapsulated (MTU 1500) is answered
        // "packet too big", and the rest of its datagram has nothing to follow.
        let too_big = mode == Mode::Tunnel
            && v6
            && match k {
                0 => matches!(v, Verdict::Reply { .. }),
                _ => v == Verdict::Drop(lb_dataplane::DropReason::Fragment),
            };
        assert!(o.is_some() || too_big, "fragment {k}: {v:?}");
    }
    if mode == Mode::Tunnel {
        return; // encapsulated: compared by the unit tests
    }
    // Differential: a fresh pair built alike, the whole datagram through one, its fragments
    // through the other; put back together they agree.
    let (mut a, mut b) = (dataplane(mode, v6, 16), dataplane(mode, v6, 16));
    let (_, want) = step(&mut a, &whole, now);
    let want = want.expect("whole datagram forwarded");
    let hl = if v6 { 40 } else { 20 };
    let mut data = Vec::new();
    let mut head = Vec::new();
    for f in &frags {
        let (_, o) = step(&mut b, f, now);
        let o = o.expect("fragment forwarded");
        let p = parse(&o, Link::Ip).unwrap();
        let fi = fragment_info(&o, &p).unwrap();
        let off = fi.offset as usize;
        let end = off + fi.len as usize;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[off..end].copy_from_slice(&o[fi.data..]);
        if off == 0 {
            head = o[..hl].to_vec();
        }
    }
    let addrs = if v6 { 8..40 } else { 12..20 };
    assert_eq!(&head[addrs.clone()], &want[addrs]);
    assert_eq!(&data[..], &want[hl..]);
});
