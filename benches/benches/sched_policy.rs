//! lb-sched policies (issue 4): the cost of one pick for every policy at N = 10, 100, 1000
//! backends, with live connection counts, in-flight requests and latencies in the pool. Picks do
//! not update the pool (pure decision cost). A naive WLC (f64 division, iterator `min_by`) over a
//! plain `Vec` is the baseline: no crates.io peer ships IPVS-style policies as a library.

use criterion::{black_box, BenchmarkId, Criterion};
use lb_core::{Backend, BackendId, Duration, Instant, Weight};
use lb_sched::policy::{lc, Policy, PolicyKind, Request};
use lb_sched::pool::{ConnPhase, LeastKey, Pool, PoolConfig};
use rand::{Rng, SeedableRng};

fn make_pool(n: u32, seed: u64, least_index: Option<LeastKey>) -> Pool {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let now = Instant::from_secs(1);
    let cfg = PoolConfig {
        least_index,
        ..PoolConfig::default()
    };
    let mut pool = Pool::new(cfg).expect("valid config");
    for i in 0..n {
        let b = Backend::new(BackendId(i), ([10, 0, (i >> 8) as u8, i as u8], 80).into())
            .with_weight(Weight::new(rng.random_range(1..=10)));
        pool.insert(b, now).expect("unique ids");
    }
    for i in 0..n {
        let id = BackendId(i);
        for _ in 0..rng.random_range(0..40) {
            let _ = pool.conn_opened(id);
        }
        for _ in 0..rng.random_range(0..20) {
            let _ = pool.conn_opened_inactive(id);
        }
        for _ in 0..rng.random_range(0..8) {
            let _ = pool.request_started(id);
        }
        let ms = rng.random_range(1..50);
        let _ = pool.observe_latency(id, Duration::from_millis(ms), now);
    }
    pool
}

fn policies() -> Vec<Policy> {
    PolicyKind::ALL.into_iter().map(Policy::new).collect()
}

/// The baseline: WLC the obvious way, floating-point division over a `Vec`.
fn naive_wlc(b: &[(u32, u32, u32)]) -> Option<usize> {
    b.iter()
        .enumerate()
        .filter(|(_, &(_, _, w))| w > 0)
        .min_by(|(_, x), (_, y)| {
            let cx = (f64::from(x.0) * 256.0 + f64::from(x.1)) / f64::from(x.2);
            let cy = (f64::from(y.0) * 256.0 + f64::from(y.1)) / f64::from(y.2);
            cx.total_cmp(&cy)
        })
        .map(|(i, _)| i)
}

pub fn register(c: &mut Criterion) {
    let mut g = c.benchmark_group("sched_policy");
    g.warm_up_time(std::time::Duration::from_millis(300));
    g.measurement_time(std::time::Duration::from_millis(800));
    let now = Instant::from_secs(2);
    for n in [10u32, 100, 1000] {
        let pool = make_pool(n, 42, None);
        for mut policy in policies() {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
            let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
            g.bench_function(BenchmarkId::new(policy.name(), n), |b| {
                b.iter(|| {
                    h = h.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let req = Request::at(now).with_src_hash(h).with_dst_hash(h >> 54);
                    black_box(policy.pick(black_box(&pool), &req, &mut rng))
                })
            });
        }
        let plain: Vec<(u32, u32, u32)> = (0..pool.len())
            .map(|i| (pool.active_conns(i), pool.inactive_conns(i), pool.weight(i)))
            .collect();
        g.bench_function(BenchmarkId::new("naive-wlc-baseline", n), |b| {
            b.iter(|| black_box(naive_wlc(black_box(&plain))))
        });
        // WLC over a pool that maintains its least-cost index: O(1) pick, and the price paid on
        // each connection update (open + close of one connection, O(log N)).
        let mut indexed = make_pool(n, 42, Some(LeastKey::WeightedConns));
        g.bench_function(BenchmarkId::new("wlc-indexed", n), |b| {
            b.iter(|| black_box(lc::Wlc.pick(black_box(&indexed), now)))
        });
        let mut k = 0u32;
        g.bench_function(BenchmarkId::new("conn-open-close-indexed", n), |b| {
            b.iter(|| {
                k = (k + 1) % n;
                let id = BackendId(k);
                let _ = indexed.conn_opened(id);
                let _ = indexed.conn_closed(id, ConnPhase::Active);
            })
        });
        let mut unindexed = make_pool(n, 42, None);
        g.bench_function(BenchmarkId::new("conn-open-close", n), |b| {
            b.iter(|| {
                k = (k + 1) % n;
                let id = BackendId(k);
                let _ = unindexed.conn_opened(id);
                let _ = unindexed.conn_closed(id, ConnPhase::Active);
            })
        });
    }
    g.finish();
}
