//! Unit tests of the pool, and helpers shared by the policy tests.

use super::*;
use crate::policy::slow_start::SlowStart;

pub(crate) fn backend(id: u32, w: u32) -> Backend {
    Backend::new(
        BackendId(id),
        std::net::SocketAddr::from(([10, 0, 0, (id % 250) as u8], 80)),
    )
    .with_weight(Weight::new(w))
}

pub(crate) fn pool(weights: &[u32]) -> Pool {
    Pool::with_backends(
        PoolConfig::default(),
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(i as u32, w)),
        Instant::ZERO,
    )
    .unwrap()
}

#[test]
fn eligibility_states() {
    let mut p = pool(&[1, 0, 1, 1]);
    assert!(p.is_available(0));
    assert!(!p.is_available(1)); // weight 0
    p.set_admin(BackendId(2), AdminState::Down).unwrap();
    p.set_healthy(BackendId(3), false, Instant::ZERO).unwrap();
    assert!(!p.is_available(2) && !p.is_available(3));
    assert!(!p.is_available(99));
    assert_eq!(p.no_pick(), Pick::Overloaded); // 0 is eligible
    p.set_admin(BackendId(0), AdminState::Draining).unwrap();
    assert_eq!(p.no_pick(), Pick::Unavailable);
    assert_eq!(
        p.insert(backend(0, 1), Instant::ZERO),
        Err(SchedError::DuplicateBackend { id: BackendId(0) })
    );
    assert_eq!(
        p.conn_opened(BackendId(42)),
        Err(SchedError::UnknownBackend(BackendId(42)))
    );
}

#[test]
fn conn_threshold_hysteresis() {
    let mut p = pool(&[1]);
    let id = BackendId(0);
    p.set_thresholds(
        id,
        Thresholds {
            upper_conns: 4,
            ..Thresholds::NONE
        },
    )
    .unwrap();
    for _ in 0..3 {
        p.conn_opened(id).unwrap();
    }
    assert!(p.is_available(0));
    p.conn_opened(id).unwrap();
    assert!(!p.is_available(0));
    assert_eq!(p.no_pick(), Pick::Overloaded);
    p.conn_closed(id, ConnPhase::Active).unwrap(); // 3: 3*4 < 12? no
    assert!(!p.is_available(0));
    p.conn_closed(id, ConnPhase::Active).unwrap(); // 2: 8 < 12
    assert!(p.is_available(0));
    // Counters never go below zero.
    for _ in 0..5 {
        p.conn_closed(id, ConnPhase::Inactive).unwrap();
    }
    assert_eq!(p.inactive_conns(0), 0);
}

#[test]
fn load_threshold() {
    let mut p = pool(&[1]);
    let id = BackendId(0);
    p.set_thresholds(
        id,
        Thresholds {
            max_utilisation: Some(0.9),
            ..Thresholds::NONE
        },
    )
    .unwrap();
    p.report_load(id, Load::new(0.95, 0.1)).unwrap();
    assert!(!p.is_available(0) && p.get(id).unwrap().is_overloaded());
    p.report_load(id, Load::new(0.5, 0.1)).unwrap();
    assert!(p.is_available(0));
}

#[test]
fn panic_mode_spreads_over_unhealthy() {
    let cfg = PoolConfig {
        panic_threshold_percent: 50,
        ..PoolConfig::default()
    };
    let mut p = Pool::with_backends(cfg, (0..4).map(|i| backend(i, 1)), Instant::ZERO).unwrap();
    p.set_healthy(BackendId(0), false, Instant::ZERO).unwrap();
    assert!(!p.in_panic() && !p.is_available(0));
    p.set_healthy(BackendId(1), false, Instant::ZERO).unwrap();
    assert!(!p.in_panic()); // 2 of 4 healthy = 50 %, not below
    p.set_healthy(BackendId(2), false, Instant::ZERO).unwrap();
    assert!(p.in_panic());
    assert!((0..4).all(|i| p.is_available(i)));
    p.set_admin(BackendId(0), AdminState::Down).unwrap();
    assert!(!p.is_available(0)); // admin down stays out even in panic
}

#[test]
fn peak_ewma_takes_peaks_and_decays() {
    let mut p = pool(&[1]);
    let id = BackendId(0);
    let t = Instant::from_secs(1);
    p.observe_latency(id, Duration::from_millis(5), t).unwrap();
    p.observe_latency(id, Duration::from_millis(50), t).unwrap();
    assert_eq!(p.get(id).unwrap().peak_ewma(t), Duration::from_millis(50));
    // A low sample right away barely moves it; later it decays towards zero.
    p.observe_latency(id, Duration::from_millis(1), t).unwrap();
    assert_eq!(p.get(id).unwrap().peak_ewma(t), Duration::from_millis(50));
    let later = p.get(id).unwrap().peak_ewma(t + Duration::from_secs(10));
    assert!(later < Duration::from_millis(20) && later > Duration::from_millis(15));
    let e = p.get(id).unwrap().ewma();
    assert!(e > Duration::from_millis(5) && e < Duration::from_millis(50));
}

#[test]
fn slow_start_ramps_new_backend() {
    let cfg = PoolConfig {
        slow_start: Some(SlowStart {
            window: Duration::from_secs(10),
            min_percent: 10,
        }),
        ..PoolConfig::default()
    };
    let mut p = Pool::with_backends(cfg, [backend(0, 2)], Instant::ZERO).unwrap();
    assert_eq!(p.effective_weight(0, Instant::ZERO), 2 * WEIGHT_SCALE / 10);
    assert_eq!(
        p.effective_weight(0, Instant::from_secs(11)),
        2 * WEIGHT_SCALE
    );
    p.set_healthy(BackendId(0), false, Instant::from_secs(20))
        .unwrap();
    p.set_healthy(BackendId(0), true, Instant::from_secs(30))
        .unwrap();
    assert_eq!(
        p.effective_weight(0, Instant::from_secs(35)),
        2 * WEIGHT_SCALE / 2
    );
}

#[test]
fn config_is_validated() {
    for bad in [
        PoolConfig {
            ewma_alpha: 0.0,
            ..PoolConfig::default()
        },
        PoolConfig {
            ewma_alpha: f64::NAN,
            ..PoolConfig::default()
        },
        PoolConfig {
            peak_ewma_decay: Duration::ZERO,
            ..PoolConfig::default()
        },
        PoolConfig {
            panic_threshold_percent: 101,
            ..PoolConfig::default()
        },
    ] {
        assert!(Pool::new(bad).is_err());
    }
}
