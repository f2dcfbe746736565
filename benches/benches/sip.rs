//! lb-dataplane (issue 18, item 6): the cost of a SIP message through the call table, and of a
//! spray of made-up Call-IDs against a full one.
//!
//! Workload: one UDP service `203.0.113.10:5060` in mode `nat`, 3 backends, maglev; one client
//! flow (an upstream proxy's address and port, 192.0.2.2:5060) already tracked; ~300-byte SIP
//! requests. Per iteration, one datagram goes through `Dataplane::process`:
//! - `plain_udp`: the same datagram to a service without affinity: the L4 flow-hit path, the
//!   peer the SIP path is measured against;
//! - `call_hit`: `affinity = "sip-call-id"`, the message of one of 4 000 live established calls
//!   (taken in turn): Call-ID scan, keyed hash, call-table lookup, then the NAT hit;
//! - `spray_full`: `affinity = "sip-call-id"`, a new made-up Call-ID every message against a
//!   full call table (4 096 per family: 2 000 established calls and 2 096 Call-IDs seen once):
//!   the new binding sheds the oldest one seen once (the path a spray takes).
//!
//! `cargo bench -p lb-benches --bench sip`; ratios to `plain_udp` in `benches/results/sip.md`.
#![allow(missing_docs, unreachable_pub)]

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lb_core::{HashKey, Instant};
use lb_dataplane::{
    Affinity, ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec,
    Verdict, HEADROOM,
};
use lb_packet::{checksum, parse, Link};

const CAPACITY: usize = 4096;

/// An IPv4/UDP datagram 192.0.2.2:5060 → 203.0.113.10:5060 carrying a SIP request of `call`.
fn message(call: &str) -> Vec<u8> {
    let sip = format!(
        "INFO sip:uas@203.0.113.10:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bK-1\r\n\
         From: <sip:uac@192.0.2.2>;tag=1\r\nTo: <sip:uas@203.0.113.10>;tag=2\r\n\
         Call-ID: {call}\r\nCSeq: 2 INFO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    let n = sip.len();
    let mut v = vec![
        0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 192, 0, 2, 2, 203, 0, 113, 10,
    ];
    v[2..4].copy_from_slice(&((28 + n) as u16).to_be_bytes());
    v.extend_from_slice(&5060u16.to_be_bytes());
    v.extend_from_slice(&5060u16.to_be_bytes());
    v.extend_from_slice(&((8 + n) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(sip.as_bytes());
    let p = parse(&v, Link::Ip).expect("datagram");
    checksum::recompute(&mut v, &p).expect("checksums");
    v
}

fn dataplane(affinity: Affinity) -> Dataplane {
    let mut svc = ServiceSpec::new(
        "203.0.113.10:5060".parse().expect("vip"),
        Proto::Udp,
        Mode::Nat,
    );
    svc.affinity = affinity;
    for b in 11..14 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), 5060), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: vec![IpAddr::from([203, 0, 113, 100])],
        conntrack_capacity: 1 << 16,
        persist_capacity: CAPACITY,
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

fn run(dp: &mut Dataplane, buf: &mut [u8], pkt: &[u8], now: Instant) -> Verdict {
    buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
    dp.process(buf, HEADROOM, pkt.len(), now)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane_sip");
    g.throughput(Throughput::Elements(1));
    let now = Instant::from_secs(1);
    let mut buf = vec![0u8; HEADROOM + 2048];
    let mut summary = Vec::new();

    let mut dp = dataplane(Affinity::None);
    let one = message("a84b4c76e66710@192.0.2.2");
    assert!(matches!(
        run(&mut dp, &mut buf, &one, now),
        Verdict::Forward { .. }
    ));
    g.bench_function("plain_udp", |b| {
        b.iter(|| black_box(run(&mut dp, &mut buf, &one, now)))
    });
    summary.push(format!("plain_udp: {} packets", dp.stats().rx_packets));

    // 4 000 calls, each seen twice (established) before the clock starts.
    let calls: Vec<Vec<u8>> = (0..4000)
        .map(|i| message(&format!("{i:08x}-call@192.0.2.2")))
        .collect();
    let mut dp = dataplane(Affinity::SipCallId);
    for _ in 0..2 {
        for m in &calls {
            assert!(matches!(
                run(&mut dp, &mut buf, m, now),
                Verdict::Forward { .. }
            ));
        }
    }
    let mut i = 0;
    g.bench_function("call_hit", |b| {
        b.iter(|| {
            i = (i + 1) % calls.len();
            black_box(run(&mut dp, &mut buf, &calls[i], now))
        })
    });
    let t = dp.table_stats();
    summary.push(format!(
        "call_hit: {} packets; {} established of {} held, {} shed",
        dp.stats().rx_packets,
        t.persist_established,
        t.persist_entries,
        t.persist_shed
    ));

    // A full table: 2 000 established calls, the rest Call-IDs seen once; then a spray.
    let mut dp = dataplane(Affinity::SipCallId);
    for _ in 0..2 {
        for m in &calls[..2000] {
            run(&mut dp, &mut buf, m, now);
        }
    }
    for m in &calls[2000..] {
        run(&mut dp, &mut buf, m, now);
    }
    let mut spray = message("00000000000000000000@spray");
    let at = spray
        .windows(6)
        .position(|w| w == b"@spray")
        .expect("call id")
        - 20;
    let mut n = 0u64;
    g.bench_function("spray_full", |b| {
        b.iter(|| {
            n += 1;
            // A new Call-ID (20 hex digits) every message; the UDP checksum is left stale:
            // the data path rewrites it incrementally and does not verify it.
            let hex = format!("{n:020x}");
            spray[at..at + 20].copy_from_slice(hex.as_bytes());
            black_box(run(&mut dp, &mut buf, &spray, now))
        })
    });
    let t = dp.table_stats();
    summary.push(format!(
        "spray_full: {} packets; {} established of {} held (capacity {}), {} shed, {} refused",
        dp.stats().rx_packets,
        t.persist_established,
        t.persist_entries,
        t.persist_capacity,
        t.persist_shed,
        t.persist_refused
    ));
    assert_eq!(t.persist_established, 2000);
    assert_eq!(dp.stats().dropped(), 0);
    g.finish();
    for line in summary {
        println!("dataplane_sip bench: {line}");
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
