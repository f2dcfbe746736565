//! lb-dataplane (issue 17): packets of flows the data path does not track, as a balancer behind
//! ECMP sees them when the router moves flows to it from a peer.
//!
//! Workload: one TCP service, 10 backends, a flow table of 2^16 entries, full after the first
//! iterations. Each iteration processes one 40-byte IPv4/TCP packet from a source never seen:
//! - `tunnel_syn/<sched>`: a SYN to a `tunnel` (IPIP) service: the scheduler places it, its
//!   half-open entry takes the place of another half-open one;
//! - `tunnel_ack/<sched>`: an ACK (a mid-flow packet) to the same service: since issue 17 the
//!   service's consistent hash places it (the scheduler's own table for `maglev`, the Maglev
//!   table built beside the policy for `wlc`; before: the scheduler), its established entry
//!   takes the place of the least recently used one;
//! - `nat_ack`: an ACK to a `nat` service: dropped (`mid_flow_unknown`; before: `no_flow`).
//!
//! `<sched>` is `maglev` or `wlc`. The summary lines printed after the run give each case's
//! verdict counts. Only APIs older than issue 17 are used, so that the same file measures the
//! previous commit.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{Criterion, Throughput};
use lb_core::{HashKey, Instant};
use lb_dataplane::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec, Verdict,
    HEADROOM,
};

/// An IPv4/TCP packet (20 + 20 bytes) to 203.0.113.10:80, source and flags patched per flow.
fn template() -> [u8; 40] {
    let mut p = [0u8; 40];
    p[..20].copy_from_slice(&[
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 0, 203, 0, 113, 10,
    ]);
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[32] = 0x50;
    p[34..36].copy_from_slice(&[0xff, 0xff]);
    p
}

/// Flow `i`'s source: 198.18.0.0/15 and a port.
#[inline(always)]
fn patch(p: &mut [u8], i: u32, flags: u8) {
    let host = i / 60_000;
    let port = 1024 + (i % 60_000) as u16;
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + host % (1 << 17));
    p[12..16].copy_from_slice(&src.octets());
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[33] = flags;
}

fn dataplane(mode: Mode, sched: &str) -> Dataplane {
    let port = if mode == Mode::Nat { 8080 } else { 0 };
    let mut svc = ServiceSpec::new("203.0.113.10:80".parse().expect("vip"), Proto::Tcp, mode)
        .with_scheduler(sched.parse().expect("scheduler"));
    for b in 11..21 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), port), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: vec![IpAddr::from([203, 0, 113, 100])],
        conntrack_capacity: 1 << 16,
        services: vec![svc],
        ..DataplaneSpec::default()
    };
    let key = HashKey::from_bytes([17; 16]);
    let mut cp = ControlPlane::new(spec.clone(), key).expect("control plane");
    Dataplane::new(
        &spec,
        cp.build().expect("tables"),
        DataplaneOptions::new(key),
    )
    .expect("dataplane")
}

pub fn register(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane_midflow");
    g.throughput(Throughput::Elements(1));
    let tpl = template();
    let now = Instant::from_secs(1);
    let mut summary = Vec::new();
    for (name, mode, sched, flags) in [
        ("tunnel_syn/maglev", Mode::Tunnel, "maglev", 0x02),
        ("tunnel_ack/maglev", Mode::Tunnel, "maglev", 0x10),
        ("tunnel_syn/wlc", Mode::Tunnel, "wlc", 0x02),
        ("tunnel_ack/wlc", Mode::Tunnel, "wlc", 0x10),
        ("nat_ack", Mode::Nat, "maglev", 0x10),
    ] {
        let mut dp = dataplane(mode, sched);
        let mut buf = vec![0u8; HEADROOM + 2048];
        let mut next = 0u32;
        g.bench_function(name, |b| {
            b.iter(|| {
                next = next.wrapping_add(1);
                buf[HEADROOM..HEADROOM + 40].copy_from_slice(&tpl);
                patch(&mut buf[HEADROOM..], next, flags);
                black_box(dp.process(&mut buf, HEADROOM, 40, now))
            })
        });
        let s = dp.stats();
        summary.push(format!(
            "{name}: {} packets, {} forwarded, drops {:?}, {} flows tracked",
            s.rx_packets,
            s.forwarded,
            s.drops,
            dp.table_stats().entries
        ));
        if s.rx_packets == 0 {
            // Filtered out: nothing ran, so there is no flow to check.
            continue;
        }
        let v = dp.process(&mut buf, HEADROOM, 40, now);
        assert!(
            matches!(v, Verdict::Forward { .. }) || mode == Mode::Nat,
            "{name}: {v:?}"
        );
    }
    g.finish();
    for line in summary {
        println!("dataplane_midflow bench: {line}");
    }
}
