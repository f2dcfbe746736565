//! State sync (issue 16): what syncing costs the master, against the same data path without it.
//!
//! - `sync/new_flow_*`: 32-packet batches of SYNs from new sources (a miss → maglev → SNAT port
//!   → insert per packet), with no sync log and with one (each new flow appends its key). The
//!   ratio is what the data-path thread pays for sync; the table is cleared between batches so
//!   every packet is a new flow.
//! - `sync/drain_encode`: the HA thread's side per flow: `sync_drain` (one lookup per logged key,
//!   one record) and `SyncSender::encode_items` into MTU-sized authenticated datagrams.
//! - `sync/apply`: the backup's side per flow: `SyncReceiver::receive` (MAC, replay check,
//!   decode) and `Dataplane::apply_sync` (install with a reserved SNAT pair).
//!
//! The summary line gives the wire cost: bytes per new flow and records per datagram.

use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{BatchSize, Criterion, Throughput};
use lb_conntrack::sync::{SyncReceiver, SyncSender};
use lb_core::{HashKey, Instant};
use lb_dataplane::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Mode, Proto, ServiceSpec, SyncChange,
    Verdict, HEADROOM,
};

const BATCH: usize = 32;
/// Flows per measured round of the drain / apply benches.
const ROUND: usize = 4096;

fn spec() -> DataplaneSpec {
    let mut svc = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
    for b in 11..14 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), 8080), 1);
    }
    DataplaneSpec {
        snat_addrs: (1..=16)
            .map(|i| IpAddr::from([203, 0, 113, 100 + i]))
            .collect(),
        conntrack_capacity: 1 << 16,
        services: vec![svc],
        ..DataplaneSpec::default()
    }
}

fn dataplane(sync_log: usize) -> Dataplane {
    let key = HashKey::from_bytes([5; 16]);
    let spec = spec();
    let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
    let mut opts = DataplaneOptions::new(key);
    opts.sync_log = sync_log;
    Dataplane::new(&spec, cp.build().unwrap(), opts).unwrap()
}

/// A SYN from flow `i`'s source to the VIP.
fn syn(i: u32) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[..20].copy_from_slice(&[
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 0, 203, 0, 113, 10,
    ]);
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i / 60_000);
    p[12..16].copy_from_slice(&src.octets());
    p[20..22].copy_from_slice(&(1024 + (i % 60_000) as u16).to_be_bytes());
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[32] = 0x50;
    p[33] = 0x02;
    p[34..36].copy_from_slice(&[0xff, 0xff]);
    p
}

/// Runs `n` new flows (from `first`) through `dp` in batches.
fn feed(dp: &mut Dataplane, first: u32, n: usize, now: Instant) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; HEADROOM + 64]).collect();
    let mut lens = [0usize; BATCH];
    let mut v = [Verdict::Drop(lb_dataplane::DropReason::NoService); BATCH];
    let mut i = first;
    for _ in 0..n.div_ceil(BATCH) {
        for k in 0..BATCH {
            let p = syn(i);
            bufs[k][HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
            lens[k] = p.len();
            i += 1;
        }
        dp.process_batch(&mut bufs, HEADROOM, &lens, now, &mut v);
    }
}

pub fn register(c: &mut Criterion) {
    let mut g = c.benchmark_group("sync");
    g.throughput(Throughput::Elements(BATCH as u64));
    let now = Instant::from_secs(1);
    for (name, log) in [
        ("new_flow_batch32_no_sync", 0),
        ("new_flow_batch32_sync_log", 1 << 16),
    ] {
        g.bench_function(name, |b| {
            let mut dp = dataplane(log);
            let mut i = 0u32;
            let mut seen: HashSet<SyncChange> = HashSet::new();
            let (mut r, mut t) = (Vec::new(), Vec::new());
            let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; HEADROOM + 64]).collect();
            let lens = [40usize; BATCH];
            let mut v = [Verdict::Drop(lb_dataplane::DropReason::NoService); BATCH];
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    // Outside the timing: a fresh table now and then (every SYN is new), and
                    // the log drained as the HA thread would.
                    if i >= 40_000 {
                        dp = dataplane(log);
                        i = 0;
                    }
                    if dp.sync_pending() > 30_000 {
                        dp.sync_drain(now, usize::MAX, &mut seen, &mut r, &mut t);
                        r.clear();
                    }
                    for buf in bufs.iter_mut() {
                        let p = syn(i);
                        buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
                        i += 1;
                    }
                    let t0 = std::time::Instant::now();
                    dp.process_batch(&mut bufs, HEADROOM, &lens, now, &mut v);
                    total += t0.elapsed();
                    black_box(&v);
                }
                total
            });
        });
    }

    // The HA thread's side.
    g.throughput(Throughput::Elements(ROUND as u64));
    let mac = HashKey::from_bytes([3; 16]);
    let mut wire = (0usize, 0usize, 0usize);
    g.bench_function("drain_encode", |b| {
        let mut seen: HashSet<SyncChange> = HashSet::new();
        let (mut r, mut t, mut out) = (Vec::new(), Vec::new(), Vec::new());
        let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
        tx.set_echo(1);
        b.iter_batched_ref(
            || {
                let mut dp = dataplane(1 << 16);
                feed(&mut dp, 0, ROUND, now);
                dp
            },
            |dp| {
                r.clear();
                t.clear();
                out.clear();
                dp.sync_drain(now, usize::MAX, &mut seen, &mut r, &mut t);
                tx.encode_items(&r, &t, 0, &mut out);
                wire = (r.len(), out.len(), out.iter().map(Vec::len).sum());
                black_box(&out);
            },
            BatchSize::LargeInput,
        );
    });

    // The backup's side.
    g.bench_function("apply", |b| {
        let mut master = dataplane(1 << 16);
        feed(&mut master, 0, ROUND, now);
        let mut seen: HashSet<SyncChange> = HashSet::new();
        let (mut r, mut t, mut out) = (Vec::new(), Vec::new(), Vec::new());
        master.sync_drain(now, usize::MAX, &mut seen, &mut r, &mut t);
        let mut tx = SyncSender::new(1, 1, mac, 1472).unwrap();
        tx.set_echo(1);
        tx.encode_items(&r, &t, 0, &mut out);
        b.iter_batched_ref(
            || (dataplane(0), SyncReceiver::new(mac, 1)),
            |(backup, rx)| {
                for m in &out {
                    if let Ok(got) = rx.receive(m) {
                        black_box(backup.apply_sync(&got.message, now, false));
                    }
                }
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
    let (records, datagrams, bytes) = wire;
    if records > 0 {
        println!(
            "sync wire: {records} new flows -> {datagrams} datagrams, {bytes} bytes: {:.1} bytes per flow, {:.1} records per datagram (UDP payload; +28 bytes IP/UDP per datagram)",
            bytes as f64 / records as f64,
            records as f64 / datagrams.max(1) as f64
        );
    }
}
