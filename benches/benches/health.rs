//! lb-health (issue 7): handling one heartbeat, one health-check result, failure-detector updates,
//! and probe scheduling at 100 / 10 000 / 100 000 backends (O(log N)) against a linear scan of the
//! same deadlines (the O(N) baseline). The MAC floor is plain `siphasher` SipHash-2-4-128 over the
//! same 28 signed bytes.

use std::hash::Hasher;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use lb_core::{BackendId, Duration, HashKey, Instant};
use lb_health::detector::{
    DetectorConfig, FailureDetector, PhiAccrual, PhiConfig, TimeoutDetector,
};
use lb_health::{
    Action, CheckConfig, Election, ElectionConfig, HealthChecker, HeartbeatNode, Message,
    NodeConfig, NodeId, Observation, OutlierConfig, OutlierDetector, ProbeOutcome, Role,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use siphasher::sip128::{Hasher128, SipHasher24};

fn node(id: u32) -> HeartbeatNode {
    let cfg = NodeConfig {
        id: NodeId(id),
        generation: 1,
        interval: Duration::from_millis(100),
        detector: DetectorConfig::Phi(PhiConfig::default()),
    };
    HeartbeatNode::new(
        cfg,
        HashKey::from_bytes(*b"bench-hb-key-001"),
        Instant::ZERO,
    )
    .expect("valid config")
}

fn heartbeat(c: &mut Criterion) {
    let key = HashKey::from_bytes(*b"bench-hb-key-001");
    let mut g = c.benchmark_group("health/heartbeat");
    g.throughput(Throughput::Elements(1));

    // One status received: decode + MAC check + replay window + detector + view update.
    let mut sender = node(1);
    sender.set_status(Role::Master, 150, 10);
    let mut receiver = node(2);
    let mut now = Instant::ZERO;
    g.bench_function("handle_status", |b| {
        b.iter_batched(
            || {
                now += Duration::from_millis(100);
                let t = sender.poll_transmit(now).expect("due");
                (t, now)
            },
            |(t, now)| receiver.handle(black_box(t.bytes()), now),
            BatchSize::SmallInput,
        )
    });

    let msg = Message::Status(lb_health::heartbeat::Status {
        node: NodeId(1),
        generation: 1,
        seq: 42,
        role: Role::Master,
        priority: 150,
        load: 10,
    });
    let enc = msg.encode(&key);
    g.bench_function("encode_status", |b| b.iter(|| black_box(&msg).encode(&key)));
    g.bench_function("decode_status", |b| {
        b.iter(|| Message::decode(black_box(enc.as_bytes()), &key))
    });
    // The floor: the MAC alone, with the siphasher crate directly.
    let signed = &enc.as_bytes()[..28];
    let kb = key.to_bytes();
    g.bench_function("peer_siphasher24_128_mac_only", |b| {
        b.iter(|| {
            let mut h = SipHasher24::new_with_key(&kb);
            h.write(black_box(signed));
            h.finish128()
        })
    });
    g.finish();
}

fn check(c: &mut Criterion) {
    let mut g = c.benchmark_group("health/check");
    g.throughput(Throughput::Elements(1));
    let cfg = CheckConfig {
        jitter: Duration::from_millis(500),
        ..CheckConfig::default()
    };
    for n in [100u32, 10_000, 100_000] {
        let mut hc = HealthChecker::new();
        for i in 0..n {
            hc.add(BackendId(i), cfg.clone(), Instant::ZERO)
                .expect("valid");
        }
        let mut rng = SmallRng::seed_from_u64(1);
        // One probe cycle: next_deadline + poll (heap pop + push) + on_result (push): an upper
        // bound on handling one health result.
        g.bench_function(format!("probe_cycle/{n}"), |b| {
            b.iter(|| {
                let now = hc.next_deadline().unwrap_or(Instant::ZERO);
                if let Some(Action::Probe(p)) = hc.poll(now, &mut rng) {
                    black_box(hc.on_result(p.backend, p.token, ProbeOutcome::Success, now));
                }
            })
        });
        // The O(N) baseline: finding the earliest of the same number of deadlines by a scan.
        let deadlines: Vec<u64> = (0..u64::from(n))
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20)
            .collect();
        g.bench_function(format!("baseline_linear_scan_min/{n}"), |b| {
            b.iter(|| black_box(&deadlines).iter().copied().min())
        });
    }

    g.finish();
}

fn detectors(c: &mut Criterion) {
    let mut g = c.benchmark_group("health/detector");
    g.throughput(Throughput::Elements(1));
    let mut phi = PhiAccrual::new(PhiConfig::default(), Instant::ZERO).expect("valid");
    let mut now = Instant::ZERO;
    g.bench_function("phi_heartbeat", |b| {
        b.iter(|| {
            now += Duration::from_millis(100);
            phi.heartbeat(black_box(now));
        })
    });
    g.bench_function("phi_is_available", |b| {
        b.iter(|| phi.is_available(black_box(now + Duration::from_millis(250))))
    });
    g.bench_function("phi_suspect_at", |b| {
        b.iter(|| black_box(&phi).suspect_at())
    });
    let mut to = TimeoutDetector::new(Duration::from_millis(350), Instant::ZERO).expect("valid");
    g.bench_function("timeout_heartbeat_and_check", |b| {
        b.iter(|| {
            now += Duration::from_millis(100);
            to.heartbeat(black_box(now));
            to.is_available(now)
        })
    });
    g.finish();
}

fn election_outlier(c: &mut Criterion) {
    let mut g = c.benchmark_group("health/misc");
    g.throughput(Throughput::Elements(1));
    let mut e = Election::new(
        ElectionConfig {
            id: NodeId(1),
            ..ElectionConfig::default()
        },
        Instant::ZERO,
    )
    .expect("valid");
    let mut now = Instant::ZERO;
    g.bench_function("election_handle_advert", |b| {
        b.iter(|| {
            now += Duration::from_millis(1);
            e.handle_advert(NodeId(2), black_box(150), now);
            e.poll(now)
        })
    });
    let mut od = OutlierDetector::new(OutlierConfig {
        max_ejection_percent: 0, // measure the accounting, not the ejections
        ..OutlierConfig::default()
    })
    .expect("valid");
    for i in 0..1_000 {
        od.add(BackendId(i), Instant::ZERO);
    }
    let mut i = 0u32;
    g.bench_function("outlier_record/1000", |b| {
        b.iter(|| {
            i = (i + 7) % 1_000;
            now += Duration::from_micros(10);
            let obs = if i % 3 == 0 {
                Observation::Reset
            } else {
                Observation::Success
            };
            od.record(BackendId(black_box(i)), obs, now)
        })
    });
    g.finish();
}

pub fn register(c: &mut Criterion) {
    heartbeat(c);
    check(c);
    detectors(c);
    election_outlier(c);
}
