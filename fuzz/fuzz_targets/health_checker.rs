#![no_main]
//! lb-health's `HealthChecker` driven by arbitrary adds, removals, reconfigurations (valid or
//! not), time steps, and probe results (for probes it asked for, or with made-up tokens, late or
//! twice): never panics; after `poll` returns `None` the next deadline is in the future; every
//! transition changes the state to what `state` then reports; the backend count follows the
//! adds and removals that succeeded.

use std::collections::BTreeSet;

use lb_core::{BackendId, Duration, Instant};
use lb_health::{Action, CheckConfig, FailureReason, HealthChecker, ProbeOutcome};
use lb_sched::policy::RngCore;
use libfuzzer_sys::fuzz_target;

/// A tiny deterministic RNG (splitmix64), as in policy_ops.
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

/// A configuration from four bytes; zero fields (invalid) included on purpose.
fn config(op: &[u8]) -> CheckConfig {
    let ms = |b: u8| Duration::from_millis(u64::from(b) * 10);
    CheckConfig {
        interval: ms(op[1]),
        timeout: ms(op[2] / 2),
        rise: u32::from(op[3] % 4),
        fall: u32::from(op[3] / 4 % 4),
        fast_interval: ms(op[2]),
        jitter: ms(op[1] / 4),
        slow_start: ms(op[3]),
        ..CheckConfig::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut hc = HealthChecker::new();
    let mut rng = Mix(7);
    let mut now = Instant::ZERO;
    let mut present = BTreeSet::new();
    let mut probes: Vec<(BackendId, u64)> = Vec::new();
    for op in data.chunks_exact(4) {
        let backend = BackendId(u32::from(op[1] % 8));
        match op[0] % 6 {
            0 => {
                if hc.add(backend, config(op), now).is_ok() {
                    assert!(present.insert(backend), "a duplicate add succeeded");
                }
            }
            1 => assert_eq!(hc.remove(backend), present.remove(&backend)),
            2 => {
                let ok = hc.reconfigure(backend, config(op)).is_ok();
                assert!(!ok || present.contains(&backend));
            }
            3 => {
                now += Duration::from_millis(u64::from(u16::from_be_bytes([op[2], op[3]])));
                let mut n = 0;
                while let Some(a) = hc.poll(now, &mut rng) {
                    n += 1;
                    assert!(n < 100_000, "poll never returns None");
                    match a {
                        Action::Probe(p) => {
                            assert!(present.contains(&p.backend));
                            assert!(p.deadline >= now);
                            probes.push((p.backend, p.token));
                        }
                        Action::Transition(t) => {
                            assert_ne!(t.from, t.to);
                            assert_eq!(hc.state(t.backend), Some(t.to));
                        }
                    }
                }
                assert!(hc.next_deadline().is_none_or(|d| d > now));
            }
            4 | 5 => {
                let (b, token) = if op[0] % 6 == 4 && !probes.is_empty() {
                    probes[usize::from(op[1]) % probes.len()]
                } else {
                    (
                        backend,
                        u64::from_be_bytes([0, 0, 0, op[1], 0, 0, 0, op[2]]),
                    )
                };
                let outcome = match op[3] % 4 {
                    0 | 1 => ProbeOutcome::Success,
                    2 => ProbeOutcome::Timeout,
                    _ => ProbeOutcome::Failure(FailureReason::Refused),
                };
                now += Duration::from_millis(u64::from(op[3]));
                if let Some(t) = hc.on_result(b, token, outcome, now) {
                    assert_ne!(t.from, t.to);
                    assert_eq!(hc.state(t.backend), Some(t.to));
                }
            }
            _ => unreachable!(),
        }
        assert_eq!(hc.len(), present.len());
        for (b, h) in hc.iter() {
            assert!(present.contains(&b));
            assert_eq!(hc.is_serving(b), h.is_serving());
        }
    }
});
