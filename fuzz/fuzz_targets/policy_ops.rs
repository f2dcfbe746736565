#![no_main]
//! lb-sched policies on arbitrary sequences of pool updates and picks: never a panic, never a
//! pick of an unavailable (down, draining, weight-0, unhealthy outside panic, overloaded) backend,
//! and never "no backend" while one is available (OVF may answer Overloaded). The first byte
//! picks the pool options (panic threshold, slow start, least-cost index).

use lb_core::{Backend, BackendId, Duration, Instant, Weight};
use lb_sched::policy::admission::{Load, Thresholds};
use lb_sched::policy::slow_start::SlowStart;
use lb_sched::policy::{p2c, Pick, Policy, PolicyKind, Request, RngCore};
use lb_sched::pool::{AdminState, ConnPhase, LeastKey, Pool, PoolConfig};
use libfuzzer_sys::fuzz_target;

/// A tiny deterministic RNG (splitmix64) so the target needs no extra dependency.
struct Mix(u64);
impl RngCore for Mix {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for b in dst {
            *b = self.next_u64() as u8;
        }
    }
}

fn policies() -> Vec<Policy> {
    // Every kind with its defaults, P2C on in-flight requests rather than connections.
    PolicyKind::ALL
        .into_iter()
        .map(|k| match k {
            PolicyKind::P2c => Policy::P2c(p2c::P2c::new(p2c::P2cLoad::InFlight)),
            k => Policy::new(k),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg_byte, ops)) = data.split_first() else {
        return;
    };
    let cfg = PoolConfig {
        panic_threshold_percent: if cfg_byte & 1 != 0 { 50 } else { 0 },
        slow_start: (cfg_byte & 2 != 0).then(SlowStart::default),
        least_index: [
            None,
            Some(LeastKey::Conns),
            Some(LeastKey::WeightedConns),
            Some(LeastKey::ExpectedDelay),
        ][usize::from(cfg_byte >> 2 & 3)],
        ..PoolConfig::default()
    };
    let Ok(mut pool) = Pool::new(cfg) else { return };
    let mut all = policies();
    let mut rng = Mix(u64::from(cfg_byte));
    let mut now = Instant::from_secs(1);
    for op in ops.chunks_exact(3) {
        let (kind, id, arg) = (op[0] % 16, BackendId(u32::from(op[1] % 16)), op[2]);
        let _ = match kind {
            0 => pool.insert(
                Backend::new(id, ([10, 0, 0, op[1]], 80).into())
                    .with_weight(Weight::new(u32::from(arg % 8))),
                now,
            ),
            1 => {
                pool.remove(id);
                Ok(())
            }
            2 => pool.set_weight(id, Weight::new(u32::from(arg % 8))),
            3 => pool.set_admin(
                id,
                [AdminState::Active, AdminState::Draining, AdminState::Down][usize::from(arg % 3)],
            ),
            4 => pool.set_healthy(id, arg & 1 == 0, now),
            5 => pool.set_thresholds(
                id,
                Thresholds {
                    upper_conns: u32::from(arg % 8),
                    lower_conns: u32::from(arg / 64),
                    max_utilisation: (arg & 0x80 != 0).then_some(f32::from(arg & 0x7f) / 127.0),
                },
            ),
            6 => pool.conn_opened(id),
            7 => pool.conn_opened_inactive(id),
            8 => pool.conn_inactive(id),
            9 => pool.conn_closed(
                id,
                if arg & 1 == 0 {
                    ConnPhase::Active
                } else {
                    ConnPhase::Inactive
                },
            ),
            10 => pool.request_started(id),
            11 => pool.request_finished(id, Duration::from_millis(u64::from(arg) * 7), now),
            12 => pool.report_load(id, Load::new(f32::from(arg) / 200.0, 0.1)),
            13 => {
                now = now + Duration::from_millis(u64::from(arg) * 1000);
                Ok(())
            }
            _ => {
                let req = Request::at(now)
                    .with_src_hash(u64::from(arg).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .with_dst_hash(u64::from(arg % 4));
                let any_available = (0..pool.len()).any(|i| pool.is_available(i));
                for p in all.iter_mut() {
                    match p.pick(&pool, &req, &mut rng) {
                        Pick::Backend(b) => {
                            let r = pool.get(b).expect("picked an unknown backend");
                            assert!(r.is_available(), "{} picked unavailable {b}", p.name());
                            assert_eq!(r.admin(), AdminState::Active);
                            assert!(r.backend().weight.get() > 0);
                        }
                        Pick::Overloaded => {
                            assert!(!any_available || p.name() == "ovf", "{}", p.name())
                        }
                        Pick::Unavailable => assert!(!any_available, "{}", p.name()),
                        other => panic!("{}: unexpected outcome {other:?}", p.name()),
                    }
                }
                Ok(())
            }
        };
    }
});
