//! lb-dataplane (issue 8): the whole per-packet path — parse → conntrack → (on a miss)
//! schedule + SNAT allocation + insert → NAT rewrite — in memory, at 1 M tracked flows.
//!
//! Workload: mode `nat`, 3 backends (maglev), 16 SNAT addresses, a flow table of 2^20 entries
//! holding 1 M established flows (each warmed up with a full SYN / SYN-ACK / ACK handshake).
//! Each iteration processes one TCP packet: 90 % are an ACK of a random one of the established
//! flows (conntrack hit), 10 % a SYN from a source never seen (miss → maglev → SNAT port →
//! insert; once the table is full, each evicts the oldest half-open entry, i.e. an earlier
//! benchmark SYN, never an established flow). The summary line printed after the run gives the
//! counts, so a mix that went wrong (e.g. `no_flow` drops) shows. The 54-byte packet is written
//! into the buffer each iteration and a few bytes of it patched, which the figures include.
//! `process_batch32` runs the same mixes 32 packets per `Dataplane::process_batch` call (as
//! tun-balancer does; throughput per packet), plus all hits on 16 Ki hot flows (the work per
//! packet with the flow table's lines in cache), and the 90 % mix with a clock that moves.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{Criterion, Throughput};
use lb_core::{HashKey, Instant};
use lb_dataplane::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, DropReason, Mode, Proto, ServiceSpec,
    Verdict, HEADROOM,
};

const FLOWS: u32 = 1_000_000;

/// An IPv4/TCP packet 20 + 20 bytes + 14 bytes of payload, with ports and flags to be patched.
fn template() -> [u8; 54] {
    let mut p = [0u8; 54];
    p[..20].copy_from_slice(&[
        0x45, 0, 0, 54, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 0, 203, 0, 113, 10,
    ]);
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[32] = 0x50;
    p[34..36].copy_from_slice(&[0xff, 0xff]);
    p
}

/// Writes flow `i`'s source (198.18.0.0/15 + port) and the flags into the packet.
#[inline(always)]
/// Fills `bufs` with ACKs of flows drawn at random (xorshift state `x`) from the first `flows`.
fn ack_burst(bufs: &mut [Vec<u8>], tpl: &[u8], x: &mut u64, flows: u64) {
    for buf in bufs.iter_mut() {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        buf[HEADROOM..HEADROOM + tpl.len()].copy_from_slice(tpl);
        patch(&mut buf[HEADROOM..], ((*x >> 16) % flows) as u32, 0x10);
    }
}

fn patch(p: &mut [u8], i: u32, flags: u8) {
    let host = i / 60_000;
    let port = 1024 + (i % 60_000) as u16;
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + host);
    p[12..16].copy_from_slice(&src.octets());
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[33] = flags;
}

/// The backend's answer to a rewritten IPv4/TCP packet `out`: both ends swapped, TCP flags
/// `flags`. (The parser does not verify transport checksums, so it is left stale.)
fn backend_answer(out: &[u8], flags: u8) -> Vec<u8> {
    let mut reply = out.to_vec();
    let (src, dst) = (
        [reply[12], reply[13], reply[14], reply[15]],
        [reply[16], reply[17], reply[18], reply[19]],
    );
    reply[12..16].copy_from_slice(&dst);
    reply[16..20].copy_from_slice(&src);
    reply.swap(20, 22);
    reply.swap(21, 23);
    reply[33] = flags;
    reply
}

/// Flow `i`'s complete handshake through `dp` in mode `nat` (its SYN, the backend's SYN-ACK to
/// the SNAT address, its ACK), in `buf` from template `tpl`: the flow is then established,
/// which eviction spares.
fn handshake(dp: &mut Dataplane, buf: &mut [u8], tpl: &[u8], i: u32, now: Instant) {
    for flags in [0x02, 0x10] {
        buf[HEADROOM..HEADROOM + tpl.len()].copy_from_slice(tpl);
        patch(&mut buf[HEADROOM..], i, flags);
        let v = dp.process(buf, HEADROOM, tpl.len(), now);
        let Verdict::Forward { start, len } = v else {
            panic!("warm-up flow {i}: {v:?}");
        };
        if flags == 0x02 {
            // The backend's answer to the SYN.
            let reply = backend_answer(&buf[start..start + len], 0x12);
            buf[HEADROOM..HEADROOM + len].copy_from_slice(&reply);
            let v = dp.process(buf, HEADROOM, len, now);
            assert!(
                matches!(v, Verdict::Forward { .. }),
                "warm-up reply {i}: {v:?}"
            );
        }
    }
}

/// What a fast-path bench bursts with: 32 buffers of 54-byte packets, their verdicts, the
/// flow-picking xorshift state, and two classifiers of `dp`, one without plans (`cl`, for
/// `locked`) and one with 1 024 (`fcl`, for `fast`).
struct Bursts {
    bufs: Vec<Vec<u8>>,
    lens: [usize; 32],
    verdicts: [Verdict; 32],
    x: u64,
    cl: lb_dataplane::Classifier,
    fcl: lb_dataplane::Classifier,
}

impl Bursts {
    fn new(dp: &Dataplane) -> Bursts {
        let mut fcl = dp.classifier(32);
        fcl.enable_fast_path(1024);
        Bursts {
            bufs: (0..32).map(|_| vec![0u8; HEADROOM + 2048]).collect(),
            lens: [54; 32],
            verdicts: [Verdict::Drop(DropReason::Malformed); 32],
            x: 0x9e37_79b9_7f4a_7c15,
            cl: dp.classifier(32),
            fcl,
        }
    }
}

/// The data path of `spec`, with the benches' hash key.
fn dataplane(spec: &DataplaneSpec) -> Dataplane {
    let key = HashKey::from_bytes([42; 16]);
    let mut cp = ControlPlane::new(spec.clone(), key).expect("control plane");
    Dataplane::new(
        spec,
        cp.build().expect("tables"),
        DataplaneOptions::new(key),
    )
    .expect("dataplane")
}

/// One burst as a queue thread forwards it: classified, forwarded by `c`'s plans where it can
/// be, the rest (and, every 1 024th burst, the hand-back of the plans' counts, as tun-balancer's
/// housekeeping does every 10 ms) through the data path. Returns the time it took.
fn fast_burst(
    dp: &mut Dataplane,
    c: &mut lb_dataplane::Classifier,
    bufs: &mut [Vec<u8>],
    lens: &[usize],
    now: Instant,
    verdicts: &mut [Verdict],
    burst: u32,
) -> std::time::Duration {
    let t0 = std::time::Instant::now();
    c.classify(bufs, HEADROOM, lens);
    let left = c.forward_cached(bufs, lens, None, now, verdicts);
    if left > 0 || burst % 1024 == 0 {
        dp.process_batch_classified(c, bufs, lens, None, now, verdicts);
    }
    let spent = t0.elapsed();
    black_box(&verdicts);
    spent
}

pub fn register(c: &mut Criterion) {
    let mut svc = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
    for b in 11..14 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), 8080), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: (1..=16)
            .map(|i| IpAddr::from([203, 0, 113, 100 + i]))
            .collect(),
        conntrack_capacity: 1 << 20,
        services: vec![svc],
        ..DataplaneSpec::default()
    };
    let mut dp = dataplane(&spec);
    let mut buf = vec![0u8; HEADROOM + 2048];
    // The measured loops copy this unpatched template into the buffer, then patch the buffer
    // (patching a template and copying it would read back bytes just written by narrow stores,
    // a store-forwarding stall no packet read from a device has).
    let tpl = template();
    let now = Instant::from_secs(1);
    // Warm-up: 1 M complete handshakes (SYN, the backend's SYN-ACK to the SNAT address, ACK),
    // so the table holds 1 M established flows, which eviction spares.
    for i in 0..FLOWS {
        handshake(&mut dp, &mut buf, &tpl, i, now);
    }
    assert_eq!(dp.stats().dropped(), 0, "warm-up");
    let mut g = c.benchmark_group("dataplane");
    g.throughput(Throughput::Elements(1));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_new = FLOWS;
    g.bench_function("process/nat_1M_flows_90pct_hits", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[HEADROOM..HEADROOM + 54].copy_from_slice(&tpl);
            if x % 10 == 0 {
                // A new flow: a SYN from a source never seen.
                next_new += 1;
                patch(&mut buf[HEADROOM..], next_new, 0x02);
            } else {
                // One of the 1 M established flows.
                patch(
                    &mut buf[HEADROOM..],
                    ((x >> 16) % u64::from(FLOWS)) as u32,
                    0x10,
                );
            }
            black_box(dp.process(&mut buf, HEADROOM, 54, now))
        })
    });
    g.bench_function("process/nat_1M_flows_all_hits", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[HEADROOM..HEADROOM + 54].copy_from_slice(&tpl);
            patch(
                &mut buf[HEADROOM..],
                ((x >> 16) % u64::from(FLOWS)) as u32,
                0x10,
            );
            black_box(dp.process(&mut buf, HEADROOM, 54, now))
        })
    });
    // The same two mixes through `process_batch`, 32 packets per call (tun-balancer's batch).
    const BATCH: usize = 32;
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; HEADROOM + 2048]).collect();
    let lens = [54usize; BATCH];
    let mut verdicts = [Verdict::Drop(DropReason::Malformed); BATCH];
    // The third case hits only 16 Ki of the flows, whose lines stay in cache: the work per
    // packet without the memory system's share. The fourth is the 90 % mix with the clock
    // moving 1 ms per 1 024 packets (about 1 Mpps), as in a running balancer: nearly every hit
    // finds its flow last seen in an earlier millisecond (with the clock fixed, as in the
    // others, no hit after the first ever does).
    let mut t = now;
    let mut calls = 0u32;
    for (name, new_every, hot, moving) in [
        ("process_batch32/nat_1M_flows_90pct_hits", 10, FLOWS, false),
        ("process_batch32/nat_1M_flows_all_hits", 0, FLOWS, false),
        (
            "process_batch32/nat_16k_hot_flows_all_hits",
            0,
            1 << 14,
            false,
        ),
        (
            "process_batch32/nat_1M_flows_90pct_hits_moving_clock",
            10,
            FLOWS,
            true,
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for buf in bufs.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buf[HEADROOM..HEADROOM + 54].copy_from_slice(&tpl);
                    let b = &mut buf[HEADROOM..];
                    if new_every != 0 && x % new_every == 0 {
                        next_new += 1;
                        patch(b, next_new, 0x02);
                    } else {
                        patch(b, ((x >> 16) % u64::from(hot)) as u32, 0x10);
                    }
                }
                if moving {
                    calls += 1;
                    if calls % 32 == 0 {
                        t += lb_core::Duration::from_millis(1);
                    }
                }
                dp.process_batch(&mut bufs, HEADROOM, &lens, t, &mut verdicts);
                black_box(&verdicts);
            })
        });
    }
    // What a queue thread holds the data path's lock for, per burst of 32 hot-flow hits: the
    // whole `process_batch`, against `process_batch_classified` after a `Classifier` parsed,
    // classified and hashed the burst on the thread's own time (not timed here, as it is not
    // under the lock). Both timed the same way, around the one call.
    let mut cl = dp.classifier(BATCH);
    for classified in [false, true] {
        let name = if classified { "classified" } else { "whole" };
        g.bench_function(
            format!("locked_part32/nat_16k_hot_flows_all_hits/{name}"),
            |b| {
                b.iter_custom(|iters| {
                    let mut held = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        ack_burst(&mut bufs, &tpl, &mut x, 1 << 14);
                        if classified {
                            cl.classify(&bufs, HEADROOM, &lens);
                        }
                        let t0 = std::time::Instant::now();
                        if classified {
                            dp.process_batch_classified(
                                &mut cl,
                                &mut bufs,
                                &lens,
                                None,
                                t,
                                &mut verdicts,
                            );
                        } else {
                            dp.process_batch(&mut bufs, HEADROOM, &lens, t, &mut verdicts);
                        }
                        held += t0.elapsed();
                        black_box(&verdicts);
                    }
                    held
                })
            },
        );
    }
    // The fast path (`Classifier::forward_cached`): bursts of 32 established-flow packets of
    // 256 hot flows (elephants: their plans fit the thread's 1 024), classified, then either
    // forwarded by the plans without the data path (`fast`: nothing here is serial) or
    // processed under it (`locked`, `process_batch_classified`: all of it serial). Both timed
    // around classify + forward (a queue thread's CPU per burst); the fast one hands its
    // counts back every 1 024 bursts, under the data path, as tun-balancer does every 10 ms
    // (that call is timed too).
    let mut fcl = dp.classifier(BATCH);
    fcl.enable_fast_path(1024);
    for fast in [false, true] {
        let name = if fast { "fast" } else { "locked" };
        let mut bursts = 0u32;
        g.bench_function(format!("fast_path32/nat_256_hot_flows/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..iters {
                    ack_burst(&mut bufs, &tpl, &mut x, 256);
                    // (`locked` with the classifier without a fast path: no plans made.)
                    let c = if fast { &mut fcl } else { &mut cl };
                    bursts += 1;
                    spent += fast_burst(&mut dp, c, &mut bufs, &lens, t, &mut verdicts, bursts);
                }
                spent
            })
        });
    }
    // The same with connections closing beside the hot flows: each burst ends (or, in the
    // `first` shape, starts) with the backend's RST of the churn connection the previous burst
    // opened (closing it) and the client's SYN reopening it on the same ports (the finished
    // entry leaves the table and a new connection starts): one flow leaves per burst, as
    // beside short connections. What is measured is how many of the hot flows' packets still
    // go without the lock (printed) and the time per burst, which always takes the lock for
    // its two churn packets.
    const CHURN: u32 = u32::MAX - 1;
    let mut rst: Option<Vec<u8>> = None;
    // And the first shape over 32 Ki of the 1 M flows, with 64 Ki plans: the flows' table
    // lines are no longer in cache, so what the lock does per burst (the churn pair and the
    // hand-back of the plans' counts, one flow-table update per flow) waits for memory.
    let mut fcl_big = dp.classifier(BATCH);
    fcl_big.enable_fast_path(1 << 16);
    // (`32k_flows_1024_plans`: the same with tun-balancer's 1 024 plans, which cannot hold
    // those flows: what plans cost when they do not pay.)
    for (flows, hot, big, shape, first, fast) in [
        (
            "256_hot_flows",
            256,
            false,
            "1_close_per_burst",
            false,
            false,
        ),
        (
            "256_hot_flows",
            256,
            false,
            "1_close_per_burst",
            false,
            true,
        ),
        (
            "256_hot_flows",
            256,
            false,
            "1_close_first_per_burst",
            true,
            false,
        ),
        (
            "256_hot_flows",
            256,
            false,
            "1_close_first_per_burst",
            true,
            true,
        ),
        (
            "32k_flows",
            1 << 15,
            true,
            "1_close_per_burst",
            false,
            false,
        ),
        ("32k_flows", 1 << 15, true, "1_close_per_burst", false, true),
        (
            "32k_flows_1024_plans",
            1 << 15,
            false,
            "1_close_per_burst",
            false,
            true,
        ),
    ] {
        let name = if fast { "fast" } else { "locked" };
        // The churn packets' places: the burst's end, or its start (every hot packet then
        // comes after a packet that needs the lock).
        let (at_rst, at_syn) = if first {
            (0, 1)
        } else {
            (BATCH - 2, BATCH - 1)
        };
        let (fp0, rx0, pl0) = (
            dp.stats().fast_path,
            dp.stats().rx_packets,
            dp.stats().fast_path_plans,
        );
        let ended0 = dp.table_stats().sessions.packets.count();
        // The part a queue thread would spend holding the data path's lock.
        let (mut held, mut bursts) = (std::time::Duration::ZERO, 0u32);
        g.bench_function(format!("fast_path32/nat_{flows}_{shape}/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..iters {
                    ack_burst(&mut bufs, &tpl, &mut x, hot);
                    if let Some(r) = &rst {
                        bufs[at_rst][HEADROOM..HEADROOM + r.len()].copy_from_slice(r);
                    }
                    patch(&mut bufs[at_syn][HEADROOM..], CHURN, 0x02);
                    let c = match (fast, big) {
                        (false, _) => &mut cl,
                        (true, false) => &mut fcl,
                        (true, true) => &mut fcl_big,
                    };
                    bursts += 1;
                    let t0 = std::time::Instant::now();
                    c.classify(&bufs, HEADROOM, &lens);
                    c.forward_cached(&mut bufs, &lens, None, t, &mut verdicts);
                    let t1 = std::time::Instant::now();
                    dp.process_batch_classified(c, &mut bufs, &lens, None, t, &mut verdicts);
                    let t2 = std::time::Instant::now();
                    spent += t2 - t0;
                    held += t2 - t1;
                    if let Verdict::Forward { start, len } = verdicts[at_syn] {
                        rst = Some(backend_answer(&bufs[at_syn][start..start + len], 0x04));
                    }
                    black_box(&verdicts);
                }
                spent
            })
        });
        let s = dp.stats();
        println!(
            "dataplane bench: {flows}, {shape}, {name}: {} of {} packets without the lock, {} plans made, {} sessions ended, {:.2} us per burst under the data path",
            s.fast_path - fp0,
            s.rx_packets - rx0,
            s.fast_path_plans - pl0,
            dp.table_stats().sessions.packets.count() - ended0,
            held.as_secs_f64() * 1e6 / f64::from(bursts.max(1)),
        );
    }
    g.finish();
    let s = dp.stats();
    println!(
        "dataplane bench: fast path {} packets ({} by plans under the data path, {} plans)",
        s.fast_path, s.fast_path_locked, s.fast_path_plans
    );
    let t = dp.table_stats();
    println!(
        "dataplane bench: {} packets, {} forwarded, drops {:?}, table {} / {} entries, {} MiB",
        s.rx_packets,
        s.forwarded,
        s.drops,
        t.entries,
        t.capacity,
        t.memory_bytes >> 20
    );
}

/// The fast path in mode `tunnel` (IPIP): bursts of 32 established-flow packets of 256 hot
/// flows, classified, then encapsulated by the plans without the data path (`fast`) or under
/// it (`locked`, `process_batch_classified`), as `fast_path32/nat_256_hot_flows` does for
/// NAT. Timed around classify + forward; the fast one hands its counts back every 1 024
/// bursts.
pub fn register_tunnel_fast_path(c: &mut Criterion) {
    const BATCH: usize = 32;
    const HOT: u32 = 256;
    let mut svc = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Tunnel);
    for b in 11..14 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), 0), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: vec![IpAddr::from([203, 0, 113, 100])],
        conntrack_capacity: 1 << 16,
        services: vec![svc],
        ..DataplaneSpec::default()
    };
    let mut dp = dataplane(&spec);
    let tpl = template();
    let now = Instant::from_secs(1);
    let mut buf = vec![0u8; HEADROOM + 2048];
    // The hot flows' handshakes as the balancer sees them in this mode: the client's SYN,
    // then its ACK (the backends answer the clients directly).
    for i in 0..HOT {
        for flags in [0x02, 0x10] {
            buf[HEADROOM..HEADROOM + 54].copy_from_slice(&tpl);
            patch(&mut buf[HEADROOM..], i, flags);
            let v = dp.process(&mut buf, HEADROOM, 54, now);
            assert!(matches!(v, Verdict::Forward { .. }), "warm-up {i}: {v:?}");
        }
    }
    let mut g = c.benchmark_group("dataplane");
    g.throughput(Throughput::Elements(BATCH as u64));
    let Bursts {
        mut bufs,
        lens,
        mut verdicts,
        mut x,
        mut cl,
        mut fcl,
    } = Bursts::new(&dp);
    for fast in [false, true] {
        let name = if fast { "fast" } else { "locked" };
        let fp0 = dp.stats().fast_path;
        let rx0 = dp.stats().rx_packets;
        let mut bursts = 0u32;
        g.bench_function(format!("fast_path32/tunnel_256_hot_flows/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..iters {
                    ack_burst(&mut bufs, &tpl, &mut x, u64::from(HOT));
                    let c = if fast { &mut fcl } else { &mut cl };
                    bursts += 1;
                    spent += fast_burst(&mut dp, c, &mut bufs, &lens, now, &mut verdicts, bursts);
                }
                spent
            })
        });
        if fast {
            // What the last bursts forwarded reaches the counters.
            let no: [Vec<u8>; 0] = [];
            fcl.classify(&no, HEADROOM, &[]);
            dp.process_batch_classified(
                &mut fcl,
                &mut [] as &mut [Vec<u8>],
                &[],
                None,
                now,
                &mut [],
            );
        }
        let s = dp.stats();
        println!(
            "dataplane bench: tunnel_256_hot_flows, {name}: {} of {} packets without the lock, {} forwarded, drops {:?}",
            s.fast_path - fp0,
            s.rx_packets - rx0,
            s.forwarded,
            s.drops,
        );
    }
    g.finish();
}

/// Many services: the same full-NAT hits (16 Ki established flows, lines in cache, batches of
/// 32) with 1 and with 1 024 VIPs configured, flows spread over all of them, in both directions
/// (client → VIP, and the backends' answers to the SNAT addresses). What finding a packet's
/// service costs as the configuration grows. A third configuration has 1 024 services on one
/// VIP, on ports 1, 65, 129, … (a shape whose keys differ only in high bits of the port: it
/// put them in 32 buckets of the VIP map until its hash got a final mix).
pub fn register_many_vips(c: &mut Criterion) {
    const HOT: u32 = 1 << 14;
    const BATCH: usize = 32;
    let mut g = c.benchmark_group("dataplane/vips");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, n, by_port) in [
        ("1_vips", 1u32, false),
        ("1024_vips", 1024, false),
        ("1024_ports", 1024, true),
    ] {
        // Service i: (VIP, port) = (vip(i), 80), or (vip(0), port(i)) for the ports shape.
        let vip = |i: u32| {
            let i = if by_port { 0 } else { i };
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i)
        };
        let port = |i: u32| if by_port { ((i as u16) << 6) | 1 } else { 80 };
        let services = (0..n)
            .map(|i| {
                let mut s = ServiceSpec::new(
                    SocketAddr::new(vip(i).into(), port(i)),
                    Proto::Tcp,
                    Mode::Nat,
                );
                for b in 11..14 {
                    s = s.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), 8080), 1);
                }
                s
            })
            .collect();
        let spec = DataplaneSpec {
            snat_addrs: (1..=16)
                .map(|i| IpAddr::from([203, 0, 113, 100 + i]))
                .collect(),
            conntrack_capacity: 1 << 16,
            services,
            ..DataplaneSpec::default()
        };
        let mut dp = dataplane(&spec);
        let now = Instant::from_secs(1);
        // Flow i: client i (as in `patch`) to VIP i mod n. Warm-up: SYN, the backend's SYN-ACK,
        // ACK; each flow's client packet and backend packet (an ACK each) kept for the loops.
        let mut buf = vec![0u8; HEADROOM + 2048];
        let mut client = Vec::with_capacity(HOT as usize);
        let mut backend = Vec::with_capacity(HOT as usize);
        for i in 0..HOT {
            let mut p = template();
            p[16..20].copy_from_slice(&vip(i % n).octets());
            p[22..24].copy_from_slice(&port(i % n).to_be_bytes());
            patch(&mut p, i, 0x02);
            buf[HEADROOM..HEADROOM + 54].copy_from_slice(&p);
            let v = dp.process(&mut buf, HEADROOM, 54, now);
            let Verdict::Forward { start, len } = v else {
                panic!("vips warm-up SYN {i}: {v:?}");
            };
            let mut reply = backend_answer(&buf[start..start + len], 0x12);
            buf[HEADROOM..HEADROOM + len].copy_from_slice(&reply);
            let v = dp.process(&mut buf, HEADROOM, len, now);
            assert!(
                matches!(v, Verdict::Forward { .. }),
                "vips warm-up reply {i}: {v:?}"
            );
            patch(&mut p, i, 0x10);
            buf[HEADROOM..HEADROOM + 54].copy_from_slice(&p);
            let v = dp.process(&mut buf, HEADROOM, 54, now);
            assert!(
                matches!(v, Verdict::Forward { .. }),
                "vips warm-up ACK {i}: {v:?}"
            );
            reply[33] = 0x10;
            client.push(p);
            backend.push(reply);
        }
        assert_eq!(dp.stats().dropped(), 0, "vips warm-up");
        let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; HEADROOM + 2048]).collect();
        let mut lens = [54usize; BATCH];
        let mut verdicts = [Verdict::Drop(DropReason::Malformed); BATCH];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for (dir, from_backend) in [("client_acks", false), ("backend_acks", true)] {
            g.bench_function(format!("{name}/{dir}_16k_flows"), |b| {
                b.iter(|| {
                    for (buf, len) in bufs.iter_mut().zip(lens.iter_mut()) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = ((x >> 16) % u64::from(HOT)) as usize;
                        let p: &[u8] = if from_backend {
                            &backend[i]
                        } else {
                            &client[i]
                        };
                        buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
                        *len = p.len();
                    }
                    dp.process_batch(&mut bufs, HEADROOM, &lens, now, &mut verdicts);
                    black_box(&verdicts);
                })
            });
        }
        let s = dp.stats();
        println!(
            "dataplane vips bench, {name}: {} packets, {} forwarded, drops {:?}",
            s.rx_packets, s.forwarded, s.drops
        );
    }
    g.finish();
}

/// The fast path under a SYN flood that fills the flow table (mode `nat`, 2^16 entries): 256
/// established hot flows, the rest of the table half-open entries of spoofed SYNs, and bursts
/// of 32 packets of which every fourth is a SYN from a source never seen (each evicts the
/// oldest half-open entry), the others ACKs of the hot flows. Classified, then forwarded by
/// the plans where they may be and the rest under the data path (`fast`), or all under it
/// (`locked`). What is measured is how many of the hot flows' packets go without the lock
/// (printed) and the time per burst, which always takes the lock for its eight SYNs. With the
/// free places alone as the margin, a full table sends every packet after a burst's first SYN
/// through the lock; counting the half-open entries a flood keeps replacing, they go by plan.
pub fn register_flood_fast_path(c: &mut Criterion) {
    const BATCH: usize = 32;
    const HOT: u32 = 256;
    const CAPACITY: u32 = 1 << 16;
    let mut svc = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
    for b in 11..14 {
        svc = svc.with_backend(SocketAddr::new(IpAddr::from([198, 51, 100, b]), 8080), 1);
    }
    let spec = DataplaneSpec {
        snat_addrs: (1..=4)
            .map(|i| IpAddr::from([203, 0, 113, 100 + i]))
            .collect(),
        conntrack_capacity: CAPACITY as usize,
        services: vec![svc],
        ..DataplaneSpec::default()
    };
    let mut dp = dataplane(&spec);
    let tpl = template();
    let now = Instant::from_secs(1);
    let mut buf = vec![0u8; HEADROOM + 2048];
    // The hot flows' handshakes (SYN, the backend's SYN-ACK, ACK), then the flood's first
    // SYNs, which fill the table.
    for i in 0..HOT {
        handshake(&mut dp, &mut buf, &tpl, i, now);
    }
    let mut spoofed = 1_000_000u32;
    for _ in HOT..CAPACITY {
        spoofed += 1;
        buf[HEADROOM..HEADROOM + 54].copy_from_slice(&tpl);
        patch(&mut buf[HEADROOM..], spoofed, 0x02);
        let v = dp.process(&mut buf, HEADROOM, 54, now);
        assert!(
            matches!(v, Verdict::Forward { .. }),
            "flood {spoofed}: {v:?}"
        );
    }
    assert_eq!(
        dp.table_stats().entries,
        CAPACITY as u64,
        "the table is full"
    );
    let mut g = c.benchmark_group("dataplane");
    g.throughput(Throughput::Elements(BATCH as u64));
    let Bursts {
        mut bufs,
        lens,
        mut verdicts,
        mut x,
        mut cl,
        mut fcl,
    } = Bursts::new(&dp);
    for fast in [false, true] {
        let name = if fast { "fast" } else { "locked" };
        let (fp0, rx0) = (dp.stats().fast_path, dp.stats().rx_packets);
        // The part a queue thread would spend holding the data path's lock.
        let (mut held, mut bursts) = (std::time::Duration::ZERO, 0u32);
        g.bench_function(
            format!("fast_path32/nat_256_hot_flows_syn_flood_full_table/{name}"),
            |b| {
                b.iter_custom(|iters| {
                    let mut spent = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        ack_burst(&mut bufs, &tpl, &mut x, u64::from(HOT));
                        for buf in bufs.iter_mut().skip(1).step_by(4) {
                            spoofed = spoofed.wrapping_add(1).max(1_000_000);
                            patch(&mut buf[HEADROOM..], spoofed, 0x02);
                        }
                        let c = if fast { &mut fcl } else { &mut cl };
                        bursts += 1;
                        let t0 = std::time::Instant::now();
                        c.classify(&bufs, HEADROOM, &lens);
                        c.forward_cached(&mut bufs, &lens, None, now, &mut verdicts);
                        let t1 = std::time::Instant::now();
                        dp.process_batch_classified(c, &mut bufs, &lens, None, now, &mut verdicts);
                        let t2 = std::time::Instant::now();
                        spent += t2 - t0;
                        held += t2 - t1;
                        black_box(&verdicts);
                    }
                    spent
                })
            },
        );
        let s = dp.stats();
        println!(
            "dataplane bench: syn_flood_full_table, {name}: {} of {} packets ({} hot) without the lock, {:.2} us per burst under the data path, drops {:?}, table {} entries",
            s.fast_path - fp0,
            s.rx_packets - rx0,
            (s.rx_packets - rx0) * 3 / 4,
            held.as_secs_f64() * 1e6 / f64::from(bursts.max(1)),
            s.drops,
            dp.table_stats().entries,
        );
    }
    g.finish();
}
