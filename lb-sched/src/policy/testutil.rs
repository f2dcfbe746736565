//! Test helpers shared by the policy tests: random pools and brute-force references.

use lb_core::{BackendId, Instant};
use proptest::prelude::*;

use super::admission::Thresholds;
use super::Pick;
use crate::pool::tests::backend;
use crate::pool::{AdminState, Pool, PoolConfig};

/// One backend's generated state.
#[derive(Debug, Clone)]
pub(crate) struct Gen {
    pub weight: u32,
    pub admin: u8,
    pub healthy: bool,
    pub active: u32,
    pub inactive: u32,
    pub upper: u32,
}

fn arb_gen() -> impl Strategy<Value = Gen> {
    (
        prop_oneof![Just(0u32), 1u32..5, 1u32..100],
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop::bool::weighted(0.85),
        0u32..6,
        0u32..6,
        prop_oneof![4 => Just(0u32), 1 => 1u32..8],
    )
        .prop_map(|(weight, admin, healthy, active, inactive, upper)| Gen {
            weight,
            admin,
            healthy,
            active,
            inactive,
            upper,
        })
}

/// Builds a pool from generated states (ids 0..n in order).
pub(crate) fn build(gens: &[Gen]) -> Pool {
    let mut p = Pool::new(PoolConfig::default()).unwrap();
    for (i, g) in gens.iter().enumerate() {
        let id = BackendId(i as u32);
        p.insert(backend(i as u32, g.weight), Instant::ZERO)
            .unwrap();
        p.set_admin(
            id,
            match g.admin {
                0 => AdminState::Active,
                1 => AdminState::Draining,
                _ => AdminState::Down,
            },
        )
        .unwrap();
        p.set_healthy(id, g.healthy, Instant::ZERO).unwrap();
        p.set_thresholds(
            id,
            Thresholds {
                upper_conns: g.upper,
                ..Thresholds::NONE
            },
        )
        .unwrap();
        for _ in 0..g.active {
            p.conn_opened(id).unwrap();
        }
        for _ in 0..g.inactive {
            p.conn_opened_inactive(id).unwrap();
        }
    }
    p
}

/// A random pool of 0..12 backends in mixed states.
pub(crate) fn arb_pool() -> impl Strategy<Value = Pool> {
    prop::collection::vec(arb_gen(), 0..12).prop_map(|g| build(&g))
}

/// Brute-force reference: the first available backend minimising `cost(i) = num / den`
/// (compared exactly as rationals; den 0 = never chosen), or the pool's no-pick answer.
pub(crate) fn cost_minimiser(p: &Pool, cost: impl Fn(usize) -> (u64, u64)) -> Pick {
    let cands: Vec<usize> = (0..p.len())
        .filter(|&i| p.is_available(i) && cost(i).1 > 0)
        .collect();
    let min = cands.iter().copied().find(|&i| {
        let (n, d) = cost(i);
        cands.iter().all(|&j| {
            let (m, e) = cost(j);
            u128::from(n) * u128::from(e) <= u128::from(m) * u128::from(d)
        })
    });
    match min {
        Some(i) => Pick::Backend(p.id_at(i)),
        None => p.no_pick(),
    }
}

/// Whether a pick is legal: a backend that is available in `p`, or the right no-pick answer.
pub(crate) fn legal(p: &Pool, pick: Pick) -> bool {
    match pick {
        Pick::Backend(id) => p.index_of(id).is_some_and(|i| p.is_available(i)),
        other => (0..p.len()).all(|i| !p.is_available(i)) && other == p.no_pick(),
    }
}
