//! Properties that hold for every policy: random sequences of pool updates and picks never
//! yield an ineligible backend, and never a no-pick while a backend is available.

use lb_core::{BackendId, Duration, Instant, Weight};
use proptest::prelude::*;
use rand::SeedableRng;

use super::admission::{Load, Thresholds};
use super::slow_start::SlowStart;
use super::*;
use crate::pool::tests::backend;
use crate::pool::{AdminState, ConnPhase, Pool, PoolConfig};

/// One instance of every policy (and P2C a second time, on peak-EWMA).
pub(crate) fn all_policies() -> Vec<Policy> {
    let mut v: Vec<Policy> = PolicyKind::ALL.into_iter().map(Policy::new).collect();
    v.push(Policy::P2c(p2c::P2c::new(p2c::P2cLoad::PeakEwma)));
    v
}

#[test]
fn kinds_round_trip_and_names_are_unique() {
    let mut names = std::collections::HashSet::new();
    for k in PolicyKind::ALL {
        assert_eq!(Policy::new(k).kind(), k);
        assert!(names.insert(k.name()), "duplicate name {}", k.name());
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u32, u32),
    Remove(u32),
    Weight(u32, u32),
    Admin(u32, u8),
    Health(u32, bool),
    Thresh(u32, u32, Option<f32>),
    Open(u32),
    OpenInactive(u32),
    Inactive(u32),
    Close(u32, bool),
    Request(u32),
    Finish(u32, u16),
    Load(u32, f32),
    Advance(u16),
    Pick(u64, u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let id = 0u32..10;
    prop_oneof![
        2 => (id.clone(), 0u32..6).prop_map(|(i, w)| Op::Insert(i, w)),
        1 => id.clone().prop_map(Op::Remove),
        1 => (id.clone(), 0u32..6).prop_map(|(i, w)| Op::Weight(i, w)),
        1 => (id.clone(), 0u8..3).prop_map(|(i, a)| Op::Admin(i, a)),
        1 => (id.clone(), any::<bool>()).prop_map(|(i, h)| Op::Health(i, h)),
        1 => (id.clone(), 0u32..5, prop::option::of(0.0f32..1.0))
            .prop_map(|(i, u, m)| Op::Thresh(i, u, m)),
        2 => id.clone().prop_map(Op::Open),
        1 => id.clone().prop_map(Op::OpenInactive),
        1 => id.clone().prop_map(Op::Inactive),
        2 => (id.clone(), any::<bool>()).prop_map(|(i, a)| Op::Close(i, a)),
        1 => id.clone().prop_map(Op::Request),
        1 => (id.clone(), any::<u16>()).prop_map(|(i, ms)| Op::Finish(i, ms)),
        1 => (id, 0.0f32..1.0).prop_map(|(i, l)| Op::Load(i, l)),
        1 => any::<u16>().prop_map(Op::Advance),
        6 => (any::<u64>(), 0u64..6).prop_map(|(s, d)| Op::Pick(s, d)),
    ]
}

/// Applies a control or data-path operation (errors for unknown ids are expected and ignored).
fn apply(p: &mut Pool, op: &Op, now: &mut Instant) {
    let t = *now;
    let _ = match *op {
        Op::Insert(i, w) => p.insert(backend(i, w), t),
        Op::Remove(i) => {
            p.remove(BackendId(i));
            Ok(())
        }
        Op::Weight(i, w) => p.set_weight(BackendId(i), Weight::new(w)),
        Op::Admin(i, a) => p.set_admin(
            BackendId(i),
            [AdminState::Active, AdminState::Draining, AdminState::Down][usize::from(a % 3)],
        ),
        Op::Health(i, h) => p.set_healthy(BackendId(i), h, t),
        Op::Thresh(i, u, m) => p.set_thresholds(
            BackendId(i),
            Thresholds {
                upper_conns: u,
                lower_conns: 0,
                max_utilisation: m,
            },
        ),
        Op::Open(i) => p.conn_opened(BackendId(i)),
        Op::OpenInactive(i) => p.conn_opened_inactive(BackendId(i)),
        Op::Inactive(i) => p.conn_inactive(BackendId(i)),
        Op::Close(i, a) => p.conn_closed(
            BackendId(i),
            if a {
                ConnPhase::Active
            } else {
                ConnPhase::Inactive
            },
        ),
        Op::Request(i) => p.request_started(BackendId(i)),
        Op::Finish(i, ms) => {
            p.request_finished(BackendId(i), Duration::from_millis(u64::from(ms)), t)
        }
        Op::Load(i, l) => p.report_load(BackendId(i), Load::new(l, 0.0)),
        Op::Advance(ms) => {
            *now = t + Duration::from_millis(u64::from(ms));
            Ok(())
        }
        Op::Pick(..) => Ok(()),
    };
}

/// Checks one pick against the pool's state.
fn check(p: &Pool, policy: &Policy, pick: Pick) -> Result<(), TestCaseError> {
    let any_available = (0..p.len()).any(|i| p.is_available(i));
    match pick {
        Pick::Backend(id) => {
            let b = p.get(id);
            prop_assert!(b.is_some(), "{}: picked unknown {}", policy.name(), id);
            let b = b.unwrap();
            prop_assert!(
                b.is_available(),
                "{}: picked unavailable {}",
                policy.name(),
                id
            );
            prop_assert_eq!(b.admin(), AdminState::Active);
            prop_assert!(b.backend().weight.get() > 0);
            prop_assert!(!b.is_overloaded());
            prop_assert!(b.is_healthy() || p.in_panic());
        }
        Pick::Overloaded => {
            // Only OVF declines while backends are available (all above their capacity).
            prop_assert!(
                !any_available || policy.name() == "ovf",
                "{}",
                policy.name()
            );
            prop_assert!((0..p.len()).any(|i| p.is_eligible(i)));
        }
        Pick::Unavailable => {
            prop_assert!(
                !any_available,
                "{}: Unavailable with backends available",
                policy.name()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// No policy ever picks an ineligible backend, whatever the sequence of updates.
    #[test]
    fn no_policy_picks_an_ineligible_backend(
        ops in prop::collection::vec(arb_op(), 1..80),
        panic in prop::bool::weighted(0.3),
        slow in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cfg = PoolConfig {
            panic_threshold_percent: if panic { 50 } else { 0 },
            slow_start: slow.then(SlowStart::default),
            ..PoolConfig::default()
        };
        let mut p = Pool::new(cfg).unwrap();
        let mut policies = all_policies();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut now = Instant::from_secs(1);
        for op in &ops {
            apply(&mut p, op, &mut now);
            if let Op::Pick(src, dst) = *op {
                let req = Request::at(now).with_src_hash(src).with_dst_hash(dst);
                for policy in policies.iter_mut() {
                    let pick = policy.pick(&p, &req, &mut rng);
                    check(&p, policy, pick)?;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Admission control: picking and opening connections until the policy answers, no backend
    /// ever exceeds its upper threshold, and the first refusal is `Overloaded`, not
    /// `Unavailable`.
    #[test]
    fn admission_never_exceeds_upper_threshold(
        uppers in prop::collection::vec(1u32..6, 1..6),
        which in 0usize..18,
        seed in any::<u64>(),
    ) {
        let mut p = Pool::new(PoolConfig::default()).unwrap();
        for (i, &u) in uppers.iter().enumerate() {
            let id = BackendId(i as u32);
            p.insert(backend(i as u32, 1 + i as u32 % 3), Instant::ZERO).unwrap();
            p.set_thresholds(id, Thresholds { upper_conns: u, ..Thresholds::NONE }).unwrap();
        }
        let mut policy = all_policies().swap_remove(which % all_policies().len());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let total: u32 = uppers.iter().sum();
        for k in 0..=total {
            let req = Request::at(Instant::ZERO).with_src_hash(u64::from(k) * 7919).with_dst_hash(u64::from(k));
            match policy.pick(&p, &req, &mut rng) {
                Pick::Backend(id) => {
                    p.conn_opened(id).unwrap();
                    let i = p.index_of(id).unwrap();
                    prop_assert!(p.active_conns(i) <= uppers[i], "{} over threshold", policy.name());
                }
                Pick::Overloaded => break,
                Pick::Unavailable => prop_assert!(false, "{}: Unavailable", policy.name()),
            }
        }
        // With every connection slot used, the answer is Overloaded.
        if (0..p.len()).all(|i| p.active_conns(i) >= uppers[i]) {
            prop_assert_eq!(policy.pick(&p, &Request::at(Instant::ZERO), &mut rng), Pick::Overloaded);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The pool's least-cost index answers exactly as the linear scans (same minimiser, same
    /// tie-break), through any sequence of updates.
    #[test]
    fn least_index_matches_scan(ops in prop::collection::vec(arb_op(), 1..120)) {
        use crate::pool::LeastKey;
        let plain_cfg = PoolConfig::default();
        let mut plain = Pool::new(plain_cfg).unwrap();
        let keys = [LeastKey::Conns, LeastKey::WeightedConns, LeastKey::ExpectedDelay];
        let mut indexed: Vec<Pool> = keys
            .iter()
            .map(|&k| Pool::new(PoolConfig { least_index: Some(k), ..plain_cfg }).unwrap())
            .collect();
        let mut now = Instant::from_secs(1);
        for op in &ops {
            let mut t = now;
            apply(&mut plain, op, &mut now);
            for p in indexed.iter_mut() {
                let mut t2 = t;
                apply(p, op, &mut t2);
            }
            t = now;
            prop_assert!(indexed[0].indexed_least(LeastKey::Conns).is_some());
            prop_assert_eq!(lc::LeastConn.pick(&indexed[0]), lc::LeastConn.pick(&plain));
            prop_assert_eq!(lc::Wlc.pick(&indexed[1], t), lc::Wlc.pick(&plain, t));
            prop_assert_eq!(sed::Sed.pick(&indexed[2], t), sed::Sed.pick(&plain, t));
        }
    }
}
