//! Generated ICMP errors through the data path: tunnel mode's "too big" answers are limited
//! per source and globally, and never go to a source that is not one host.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use lb_core::{HashKey, Instant};
use lb_packet::checksum::recompute;
use lb_packet::{parse, Link};
use proptest::prelude::*;

use super::*;
use crate::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, DropReason, Mode, Proto, ServiceSpec,
    Verdict, HEADROOM,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A UDP datagram with `n` payload bytes (IPv4 with DF set), valid checksums.
fn udp(src: SocketAddr, dst: SocketAddr, n: usize) -> Vec<u8> {
    let ulen = 8 + n;
    let mut v = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut v = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
            v[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
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
    v.resize(v.len() + n, 0xab);
    let p = parse(&v, Link::Ip).unwrap();
    recompute(&mut v, &p).unwrap();
    v
}

const VIP: &str = "203.0.113.10:53";
const VIP6: &str = "[2001:db8:10::10]:53";

/// Two UDP tunnel services (IPv4 and IPv6) with path MTU 1400.
fn tunnel_spec(icmp: IcmpLimits) -> DataplaneSpec {
    let s4 =
        ServiceSpec::new(sa(VIP), Proto::Udp, Mode::Tunnel).with_backend(sa("198.51.100.11:0"), 1);
    let s6 = ServiceSpec::new(sa(VIP6), Proto::Udp, Mode::Tunnel)
        .with_backend(sa("[2001:db8:b::11]:0"), 1);
    DataplaneSpec {
        snat_addrs: vec![
            "203.0.113.100".parse().unwrap(),
            "2001:db8:100::100".parse().unwrap(),
        ],
        conntrack_capacity: 4096,
        mtu: 1400,
        icmp,
        services: vec![s4, s6],
        ..DataplaneSpec::default()
    }
}

fn dataplane(spec: &DataplaneSpec) -> Dataplane {
    let key = HashKey::from_bytes([5; 16]);
    let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
    Dataplane::new(spec, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap()
}

fn run(dp: &mut Dataplane, pkt: &[u8], now: Instant) -> Verdict {
    let mut buf = vec![0u8; HEADROOM + pkt.len()];
    buf[HEADROOM..].copy_from_slice(pkt);
    dp.process(&mut buf, HEADROOM, pkt.len(), now)
}

fn limits(rate: u32, burst: u32, peer_rate: u32, peer_burst: u32) -> IcmpLimits {
    IcmpLimits {
        global: IcmpLimit { rate, burst },
        peer: IcmpLimit {
            rate: peer_rate,
            burst: peer_burst,
        },
    }
}

#[test]
fn too_big_errors_are_limited_per_source_then_globally() {
    let mut dp = dataplane(&tunnel_spec(limits(1000, 50, 100, 20)));
    let t = Instant::from_secs(3);
    let big = udp(sa("192.0.2.2:4000"), sa(VIP), 1500);
    let small = udp(sa("192.0.2.2:4000"), sa(VIP), 100);
    assert!(matches!(run(&mut dp, &small, t), Verdict::Forward { .. }));
    let replies = (0..200)
        .filter(|_| matches!(run(&mut dp, &big, t), Verdict::Reply { .. }))
        .count();
    assert_eq!(replies, 20, "the per-source burst");
    let s = dp.stats();
    assert_eq!(s.icmp_generated, 20);
    assert_eq!(s.drops_for(DropReason::IcmpRateLimited), 180);
    // 100/s per source: 10 more after 100 ms.
    let t2 = Instant::from_millis(3_100);
    let more = (0..50)
        .filter(|_| matches!(run(&mut dp, &big, t2), Verdict::Reply { .. }))
        .count();
    assert_eq!(more, 10);
    // Other sources share the global bucket: 50 in a burst, of which 30 are spent (20 + 10,
    // less the 100 ms refill of 100 tokens, capped at 50): at most 50 more at t2.
    let others = (0..100u32)
        .filter(|i| {
            let src = SocketAddr::new(
                IpAddr::from([10, 1, (i / 200) as u8, (i % 200) as u8 + 1]),
                5000,
            );
            matches!(
                run(&mut dp, &udp(src, sa(VIP), 1500), t2),
                Verdict::Reply { .. }
            )
        })
        .count();
    assert!((40..=50).contains(&others), "{others}");
    // Well-formed replies all along: an IPv4 "fragmentation needed" to the client.
    let mut buf = vec![0u8; HEADROOM + big.len()];
    buf[HEADROOM..].copy_from_slice(&big);
    let v = dp.process(&mut buf, HEADROOM, big.len(), Instant::from_secs(10));
    let Verdict::Reply { start, len } = v else {
        panic!("{v:?}")
    };
    let q = parse(&buf[start..start + len], Link::Ip).unwrap();
    assert_eq!(q.key.dst(), "192.0.2.2".parse::<IpAddr>().unwrap());
    assert_eq!(&buf[start + 20..start + 22], &[3, 4]);
}

#[test]
fn sources_that_are_not_one_host_get_no_error() {
    let mut dp = dataplane(&tunnel_spec(IcmpLimits::default()));
    let t = Instant::from_secs(1);
    let bad4 = [
        "224.0.0.5:4000",
        "0.0.0.0:68",
        "127.0.0.1:4000",
        "255.255.255.255:4000",
    ];
    let bad6 = ["[ff02::1]:4000", "[::]:4000", "[::1]:4000"];
    for s in bad4 {
        let v = run(&mut dp, &udp(sa(s), sa(VIP), 1500), t);
        assert_eq!(v, Verdict::Drop(DropReason::IcmpNotUnicast), "{s}");
    }
    for s in bad6 {
        let v = run(&mut dp, &udp(sa(s), sa(VIP6), 1500), t);
        assert_eq!(v, Verdict::Drop(DropReason::IcmpNotUnicast), "{s}");
    }
    let st = dp.stats();
    assert_eq!(st.drops_for(DropReason::IcmpNotUnicast), 7);
    assert_eq!(st.icmp_generated, 0);
    assert_eq!(
        st.drops_for(DropReason::IcmpRateLimited),
        0,
        "no token spent"
    );
    // A unicast client still gets its "packet too big".
    let v = run(&mut dp, &udp(sa("[2001:db8:c::2]:4000"), sa(VIP6), 1500), t);
    assert!(matches!(v, Verdict::Reply { .. }), "{v:?}");
}

proptest! {
    /// Over any schedule of oversized packets from a few sources, the data path answers at
    /// most `burst + rate × elapsed` of them in all and `peer_burst + peer_rate × elapsed` per
    /// source; every other one is counted as rate-limited.
    #[test]
    fn never_more_replies_than_burst_plus_rate_times_elapsed(
        rate in 1u32..3000,
        burst in 1u32..64,
        peer_div in 1u32..5,
        steps in proptest::collection::vec((0u64..5_000_000, 0u8..6, any::<bool>()), 1..400),
    ) {
        let l = limits(rate, burst, rate / peer_div, burst / peer_div);
        let mut dp = dataplane(&tunnel_spec(l));
        let t0 = Instant::from_secs(2);
        let mut now = t0;
        let mut per: HashMap<u8, u64> = HashMap::new();
        let mut total = 0u64;
        for (dt, who, v6) in steps {
            now = Instant::from_nanos(now.as_nanos() + dt);
            let pkt = if v6 {
                udp(SocketAddr::new(IpAddr::from([0x2001, 0xdb8, 0xc, 0, 0, 0, 0, u16::from(who) + 1]), 4000), sa(VIP6), 1500)
            } else {
                udp(SocketAddr::new(IpAddr::from([192, 0, 2, who + 1]), 4000), sa(VIP), 1500)
            };
            if let Verdict::Reply { .. } = run(&mut dp, &pkt, now) {
                total += 1;
                *per.entry(who + if v6 { 100 } else { 0 }).or_default() += 1;
            }
            let el = u128::from(now.as_nanos() - t0.as_nanos());
            let bound = |l: IcmpLimit| u64::from(l.burst) + (u128::from(l.rate) * el / 1_000_000_000) as u64;
            prop_assert!(total <= bound(l.global), "{} > {}", total, bound(l.global));
            for (w, n) in &per {
                prop_assert!(*n <= bound(l.peer), "source {}: {} > {}", w, n, bound(l.peer));
            }
        }
        let s = dp.stats();
        prop_assert_eq!(s.icmp_generated, total);
        prop_assert_eq!(s.rx_packets, s.forwarded + s.dropped() + s.icmp_generated);
        prop_assert_eq!(s.icmp_generated + s.drops_for(DropReason::IcmpRateLimited), s.rx_packets);
    }
}
