use super::*;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::SeedableRng;

fn cfg(rise: u32, fall: u32) -> CheckConfig {
    CheckConfig {
        rise,
        fall,
        jitter: Duration::ZERO,
        interval: Duration::from_secs(2),
        fast_interval: Duration::from_millis(500),
        timeout: Duration::from_secs(1),
        ..CheckConfig::default()
    }
}

fn rng() -> SmallRng {
    SmallRng::seed_from_u64(7)
}

/// Issues the next probe for the only backend and answers it; returns the transition if any and
/// the time of the answer.
fn step(hc: &mut HealthChecker, r: &mut SmallRng, outcome: ProbeOutcome) -> Option<Transition> {
    let t = hc.next_deadline().expect("scheduled");
    let Some(Action::Probe(p)) = hc.poll(t, r) else {
        panic!("expected a probe at {t}");
    };
    let done = t + Duration::from_millis(10);
    hc.on_result(p.backend, p.token, outcome, done)
}

#[test]
fn rejects_bad_config() {
    let mut hc = HealthChecker::new();
    let mut c = cfg(0, 1);
    assert!(matches!(
        hc.add(BackendId(1), c.clone(), Instant::ZERO),
        Err(HealthError::InvalidConfig { field: "rise", .. })
    ));
    c.rise = 1;
    c.interval = Duration::ZERO;
    assert!(hc.add(BackendId(1), c, Instant::ZERO).is_err());
    let c = CheckConfig {
        kind: ProbeKind::Http {
            path: "/".into(),
            expect_status: 42,
        },
        ..cfg(1, 1)
    };
    assert!(hc.add(BackendId(1), c, Instant::ZERO).is_err());
    hc.add(BackendId(1), cfg(1, 1), Instant::ZERO).unwrap();
    assert_eq!(
        hc.add(BackendId(1), cfg(1, 1), Instant::ZERO),
        Err(HealthError::DuplicateBackend(BackendId(1)))
    );
}

#[test]
fn rise_and_fall_consecutive() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let b = BackendId(3);
    hc.add(b, cfg(2, 3), Instant::ZERO).unwrap();
    assert_eq!(hc.state(b), Some(Health::Unknown));
    assert_eq!(step(&mut hc, &mut r, ProbeOutcome::Success), None);
    let t = step(&mut hc, &mut r, ProbeOutcome::Success).unwrap();
    assert_eq!(
        (t.from, t.to, t.slow_start_until),
        (Health::Unknown, Health::Up, None)
    );
    // Two failures: falling, still serving; a success resets.
    let fail = ProbeOutcome::Failure(FailureReason::Refused);
    assert_eq!(step(&mut hc, &mut r, fail), None);
    assert_eq!(step(&mut hc, &mut r, fail), None);
    assert_eq!(hc.state(b), Some(Health::Falling));
    assert!(hc.is_serving(b));
    assert_eq!(step(&mut hc, &mut r, ProbeOutcome::Success), None);
    assert_eq!(hc.state(b), Some(Health::Up));
    assert_eq!(step(&mut hc, &mut r, fail), None);
    assert_eq!(step(&mut hc, &mut r, fail), None);
    let t = step(&mut hc, &mut r, ProbeOutcome::Timeout).unwrap();
    assert_eq!((t.from, t.to), (Health::Falling, Health::Down));
    assert!(!hc.is_serving(b));
    assert_eq!(step(&mut hc, &mut r, ProbeOutcome::Success), None);
    assert_eq!(hc.state(b), Some(Health::Rising));
    assert_eq!(step(&mut hc, &mut r, fail), None);
    assert_eq!(hc.state(b), Some(Health::Down));
}

#[test]
fn intervals_fast_while_changing() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let b = BackendId(1);
    hc.add(b, cfg(2, 2), Instant::ZERO).unwrap();
    assert_eq!(hc.next_deadline(), Some(Instant::ZERO));
    let _ = step(&mut hc, &mut r, ProbeOutcome::Success); // answered at 10 ms, Unknown
    assert_eq!(hc.next_deadline(), Some(Instant::from_millis(510)));
    let _ = step(&mut hc, &mut r, ProbeOutcome::Success); // at 520 ms, Up
    assert_eq!(hc.next_deadline(), Some(Instant::from_millis(2520)));
}

#[test]
fn poll_times_out_probes_and_ignores_late_results() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let b = BackendId(9);
    hc.add(b, cfg(1, 1), Instant::ZERO).unwrap();
    let Some(Action::Probe(p)) = hc.poll(Instant::ZERO, &mut r) else {
        panic!()
    };
    assert_eq!(p.deadline, Instant::from_secs(1));
    assert_eq!(hc.poll(Instant::from_millis(999), &mut r), None);
    assert_eq!(hc.next_deadline(), Some(Instant::from_secs(1)));
    let Some(Action::Transition(t)) = hc.poll(Instant::from_secs(1), &mut r) else {
        panic!()
    };
    assert_eq!((t.from, t.to), (Health::Unknown, Health::Down));
    // The late success carries a stale token.
    assert_eq!(
        hc.on_result(b, p.token, ProbeOutcome::Success, Instant::from_secs(2)),
        None
    );
    assert_eq!(hc.state(b), Some(Health::Down));
    // A result for a probe never issued is ignored too.
    assert_eq!(
        hc.on_result(b, 12345, ProbeOutcome::Success, Instant::from_secs(2)),
        None
    );
}

#[test]
fn remove_and_readd_drops_in_flight_result() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let b = BackendId(2);
    hc.add(b, cfg(1, 1), Instant::ZERO).unwrap();
    let Some(Action::Probe(p)) = hc.poll(Instant::ZERO, &mut r) else {
        panic!()
    };
    assert!(hc.remove(b));
    assert!(!hc.remove(b));
    assert_eq!(
        hc.on_result(b, p.token, ProbeOutcome::Success, Instant::ZERO),
        None
    );
    hc.add(b, cfg(1, 1), Instant::ZERO).unwrap();
    assert_eq!(
        hc.on_result(b, p.token, ProbeOutcome::Success, Instant::ZERO),
        None
    );
    let Some(Action::Probe(p2)) = hc.poll(Instant::ZERO, &mut r) else {
        panic!()
    };
    assert_ne!(p2.token, p.token);
    // The stale heap entry of the removed incarnation never produces a second probe.
    assert_eq!(hc.poll(Instant::from_millis(900), &mut r), None);
}

#[test]
fn slow_start_ramps_after_recovery() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let b = BackendId(4);
    let c = CheckConfig {
        slow_start: Duration::from_secs(10),
        ..cfg(1, 1)
    };
    hc.add(b, c, Instant::ZERO).unwrap();
    let t = step(&mut hc, &mut r, ProbeOutcome::Success).unwrap();
    assert_eq!(t.slow_start_until, None); // initial up: no slow start
    let _ = step(&mut hc, &mut r, ProbeOutcome::Failure(FailureReason::Reset)).unwrap();
    let now = hc.next_deadline().unwrap();
    let Some(Action::Probe(p)) = hc.poll(now, &mut r) else {
        panic!()
    };
    let t = hc
        .on_result(b, p.token, ProbeOutcome::Success, now)
        .unwrap();
    assert_eq!(t.slow_start_until, Some(now + Duration::from_secs(10)));
    let w = Weight::new(100);
    assert_eq!(hc.slow_start_weight(b, w, now), Weight::new(10));
    assert_eq!(
        hc.slow_start_weight(b, w, now + Duration::from_secs(5)),
        Weight::new(55)
    );
    assert_eq!(hc.slow_start_weight(b, w, now + Duration::from_secs(10)), w);
    assert_eq!(hc.slow_start_weight(BackendId(77), w, now), Weight::ZERO);
}

#[test]
fn ten_thousand_backends_probe_in_deadline_order() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let c = CheckConfig {
        jitter: Duration::from_secs(2),
        ..cfg(1, 1)
    };
    for i in 0..10_000 {
        hc.add(BackendId(i), c.clone(), Instant::ZERO).unwrap();
    }
    // The first probes are spread over the jitter window.
    let mut now = Instant::ZERO;
    let mut seen = 0u32;
    let mut last = Instant::ZERO;
    while now <= Instant::from_secs(2) {
        while let Some(a) = hc.poll(now, &mut r) {
            if let Action::Probe(p) = a {
                assert!(p.deadline >= last);
                last = p.deadline;
                seen += 1;
                let _ = hc.on_result(p.backend, p.token, ProbeOutcome::Success, now);
            }
        }
        now += Duration::from_millis(100);
    }
    assert_eq!(seen, 10_000);
    assert!(hc.iter().all(|(_, h)| h == Health::Up));
    // Lazy deletion never lets the heap grow unbounded.
    assert!(hc.heap.len() <= 2 * hc.len() + 64);
}

#[test]
fn jitter_stays_in_bounds() {
    let mut hc = HealthChecker::new();
    let mut r = rng();
    let b = BackendId(5);
    let c = CheckConfig {
        jitter: Duration::from_millis(300),
        ..cfg(1, 1)
    };
    hc.add(b, c, Instant::ZERO).unwrap();
    let mut distinct = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let t = hc.next_deadline().unwrap();
        let Some(Action::Probe(p)) = hc.poll(t, &mut r) else {
            panic!()
        };
        let _ = hc.on_result(b, p.token, ProbeOutcome::Success, t);
        let gap = hc.next_deadline().unwrap() - t;
        assert!(
            gap >= Duration::from_secs(2) && gap <= Duration::from_millis(2300),
            "{gap:?}"
        );
        distinct.insert(gap);
    }
    assert!(distinct.len() > 10, "jitter is not random");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Rise/fall never flaps faster than the thresholds allow: every transition to Up follows at
    /// least `rise` consecutive successes, every transition to Down at least `fall` consecutive
    /// failures, and the serving state only changes through a transition.
    #[test]
    fn never_flaps_faster_than_thresholds(
        rise in 1u32..5,
        fall in 1u32..5,
        outcomes in proptest::collection::vec(0u8..3, 1..200),
    ) {
        let mut hc = HealthChecker::new();
        let mut r = rng();
        let b = BackendId(1);
        hc.add(b, cfg(rise, fall), Instant::ZERO).unwrap();
        let mut succ_run = 0u32;
        let mut fail_run = 0u32;
        let mut serving = false;
        for o in outcomes {
            let outcome = match o {
                0 => ProbeOutcome::Success,
                1 => ProbeOutcome::Failure(FailureReason::Other),
                _ => ProbeOutcome::Timeout,
            };
            if outcome == ProbeOutcome::Success { succ_run += 1; fail_run = 0; } else { fail_run += 1; succ_run = 0; }
            let t = step(&mut hc, &mut r, outcome);
            if let Some(t) = t {
                match t.to {
                    Health::Up => { prop_assert!(succ_run >= rise); prop_assert!(!serving); serving = true; }
                    Health::Down => { prop_assert!(fail_run >= fall); prop_assert!(serving || t.from == Health::Unknown); serving = false; }
                    other => prop_assert!(false, "transition to {other:?}"),
                }
            }
            prop_assert_eq!(hc.is_serving(b), serving);
            // Conversely, a full run always decides.
            if succ_run >= rise { prop_assert_eq!(hc.state(b), Some(Health::Up)); }
            if fail_run >= fall { prop_assert_eq!(hc.state(b), Some(Health::Down)); }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary add / remove / advance / poll / result sequences (random and replayed tokens,
    /// odd configs): never panics, transitions only to Up or Down and agree with `state`, no
    /// deadline is left in the past after a full poll, probes are only issued for registered
    /// backends, a result for a removed backend is ignored, and the heap stays bounded.
    #[test]
    fn random_operations_keep_invariants(
        ops in proptest::collection::vec((0u8..6, 0u32..16, any::<u8>(), any::<u8>()), 1..300),
    ) {
        let mut hc = HealthChecker::new();
        let mut r = rng();
        let mut now = Instant::ZERO;
        let mut issued: Vec<(BackendId, u64)> = Vec::new();
        for (op, id, x, y) in ops {
            let b = BackendId(id);
            match op {
                0 => {
                    let c = CheckConfig {
                        rise: u32::from(x % 4),
                        fall: u32::from(y % 4),
                        interval: Duration::from_millis(u64::from(x) * 10),
                        fast_interval: Duration::from_millis(u64::from(y) * 5),
                        timeout: Duration::from_millis(u64::from(x ^ y)),
                        jitter: Duration::from_millis(u64::from(y)),
                        ..CheckConfig::default()
                    };
                    let valid = c.validate().is_ok();
                    let fresh = hc.state(b).is_none();
                    prop_assert_eq!(hc.add(b, c, now).is_ok(), valid && fresh);
                }
                1 => {
                    let was = hc.state(b).is_some();
                    prop_assert_eq!(hc.remove(b), was);
                    for (ib, t) in issued.iter().filter(|(ib, _)| *ib == b) {
                        prop_assert_eq!(hc.on_result(*ib, *t, ProbeOutcome::Success, now), None);
                    }
                }
                2 => now += Duration::from_millis(u64::from(x) * 20),
                3 => {
                    while let Some(a) = hc.poll(now, &mut r) {
                        match a {
                            Action::Probe(p) => {
                                prop_assert!(hc.state(p.backend).is_some());
                                prop_assert!(p.deadline >= now);
                                issued.push((p.backend, p.token));
                            }
                            Action::Transition(t) => {
                                prop_assert!(matches!(t.to, Health::Up | Health::Down));
                                prop_assert_eq!(hc.state(t.backend), Some(t.to));
                            }
                        }
                    }
                    if let Some(d) = hc.next_deadline() {
                        prop_assert!(d > now);
                    }
                }
                _ => {
                    let (backend, token) = if issued.is_empty() || y & 1 == 1 {
                        (b, u64::from(x) | (u64::from(y) << 32))
                    } else {
                        issued[usize::from(x) % issued.len()]
                    };
                    let outcome = match y % 3 {
                        0 => ProbeOutcome::Success,
                        1 => ProbeOutcome::Failure(FailureReason::Refused),
                        _ => ProbeOutcome::Timeout,
                    };
                    if let Some(t) = hc.on_result(backend, token, outcome, now) {
                        prop_assert!(matches!(t.to, Health::Up | Health::Down));
                        prop_assert_eq!(hc.state(t.backend), Some(t.to));
                    }
                }
            }
            prop_assert!(hc.heap.len() <= 2 * hc.len() + 65);
            for (id, h) in hc.iter() {
                prop_assert_eq!(hc.is_serving(id), h.is_serving());
            }
        }
    }
}
