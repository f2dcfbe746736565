//! lb-dataplane (issue 18, item 4): the cost of a fragmented datagram.
//!
//! Workload: one UDP service (`203.0.113.10:53`, 3 backends, maglev), one client flow already
//! tracked (the hit path, as for a DNS or SIP peer that keeps sending), a 4 000-byte datagram
//! (4 008 bytes of UDP, 4 028 of IP). Per iteration, one datagram goes through
//! `Dataplane::process`, its packets copied into the buffer first (in every case):
//! - `whole/<mode>`: unfragmented, one packet (what a jumbo-MTU path would carry);
//! - `three_whole/<mode>`: three unfragmented datagrams of the fragments' sizes (1 500, 1 500,
//!   1 068 bytes) on the same flow: three packets without any fragment work;
//! - `fragmented/<mode>`: the datagram cut at MTU 1500 into three fragments (a first
//!   fragment and two later ones, a fresh IP identification every iteration): the first goes
//!   the flow path and records the datagram in the fragment table, the others find it and get
//!   the same rewrite; the entry is freed by the last.
//!
//! `fragmented − three_whole` is what fragment handling costs per datagram. `<mode>` is `nat`
//! (full NAT: addresses, port, checksums) or `tunnel` (IPIP into the headroom).
//! `cargo bench -p lb-benches --bench frag`.
#![allow(missing_docs, unreachable_pub)]

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lb_core::{HashKey, Instant};
use lb_dataplane::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec, Verdict,
    HEADROOM,
};
use lb_packet::{checksum, parse, Link};

/// An IPv4/UDP datagram 192.0.2.2:5000 → 203.0.113.10:53 with `n` bytes of payload (no DF).
fn datagram(n: usize) -> Vec<u8> {
    let mut v = vec![
        0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 192, 0, 2, 2, 203, 0, 113, 10,
    ];
    v[2..4].copy_from_slice(&((28 + n) as u16).to_be_bytes());
    v.extend_from_slice(&5000u16.to_be_bytes());
    v.extend_from_slice(&53u16.to_be_bytes());
    v.extend_from_slice(&((8 + n) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend((0..n).map(|i| i as u8));
    let p = parse(&v, Link::Ip).expect("datagram");
    checksum::recompute(&mut v, &p).expect("checksums");
    v
}

/// `pkt` cut into IPv4 fragments of at most `mtu` bytes.
fn fragments(pkt: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let chunk = (mtu - 20) / 8 * 8;
    let data = &pkt[20..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        let mut f = pkt[..20].to_vec();
        let fo = (off / 8) as u16 | if end < data.len() { 0x2000 } else { 0 };
        f[6..8].copy_from_slice(&fo.to_be_bytes());
        f.extend_from_slice(&data[off..end]);
        let n = f.len() as u16;
        f[2..4].copy_from_slice(&n.to_be_bytes());
        out.push(f);
        off = end;
    }
    out
}

fn dataplane(mode: Mode) -> Dataplane {
    let port = if mode == Mode::Nat { 5353 } else { 0 };
    let mut svc = ServiceSpec::new("203.0.113.10:53".parse().expect("vip"), Proto::Udp, mode);
    for b in 11..14 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), port), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: vec![IpAddr::from([203, 0, 113, 100])],
        conntrack_capacity: 1 << 16,
        mtu: 9000,
        services: vec![svc],
        ..DataplaneSpec::default()
    };
    let key = HashKey::from_bytes([18; 16]);
    let mut cp = ControlPlane::new(spec.clone(), key).expect("control plane");
    Dataplane::new(
        &spec,
        cp.build().expect("tables"),
        DataplaneOptions::new(key),
    )
    .expect("dataplane")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane_frag");
    g.throughput(Throughput::Elements(1));
    let whole = datagram(4000);
    let frags = fragments(&whole, 1500);
    assert_eq!(frags.len(), 3);
    let sizes: Vec<usize> = frags.iter().map(Vec::len).collect();
    let three: Vec<Vec<u8>> = sizes.iter().map(|&n| datagram(n - 28)).collect();
    let now = Instant::from_secs(1);
    let mut summary = Vec::new();
    for (mname, mode) in [("nat", Mode::Nat), ("tunnel", Mode::Tunnel)] {
        for case in ["whole", "three_whole", "fragmented"] {
            let pkts: &[Vec<u8>] = match case {
                "whole" => std::slice::from_ref(&whole),
                "three_whole" => &three,
                _ => &frags,
            };
            let mut dp = dataplane(mode);
            let mut buf = vec![0u8; HEADROOM + 9000];
            // The flow is tracked before the clock starts.
            let n = three[0].len();
            buf[HEADROOM..HEADROOM + n].copy_from_slice(&three[0]);
            assert!(matches!(
                dp.process(&mut buf, HEADROOM, n, now),
                Verdict::Forward { .. }
            ));
            let mut id = 0u16;
            g.bench_function(format!("{case}/{mname}"), |b| {
                b.iter(|| {
                    id = id.wrapping_add(1);
                    let mut last = None;
                    for p in pkts {
                        let n = p.len();
                        buf[HEADROOM..HEADROOM + n].copy_from_slice(p);
                        buf[HEADROOM + 4..HEADROOM + 6].copy_from_slice(&id.to_be_bytes());
                        last = Some(dp.process(&mut buf, HEADROOM, n, now));
                    }
                    black_box(last)
                })
            });
            let s = dp.stats();
            summary.push(format!(
                "{case}/{mname}: {} packets, {} forwarded, {} dropped; fragments: {} first, \
                 {} later forwarded, {} datagrams completed, {} evicted",
                s.rx_packets,
                s.forwarded,
                s.dropped(),
                s.frag_first,
                s.frag_forwarded,
                s.frag_completed,
                s.frag_evicted
            ));
            assert_eq!(s.dropped(), 0, "{case}/{mname}");
        }
    }
    g.finish();
    for line in summary {
        println!("dataplane_frag bench: {line}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
