use super::*;
use crate::hash::testutil::{backend, backends, hashes, KEY};
use proptest::prelude::*;

fn cfg(m: u64) -> MaglevConfig {
    MaglevConfig::new(KEY).with_size(MaglevSize::new(m).unwrap())
}

#[test]
fn sizes() {
    assert!(is_prime(65_537) && is_prime(655_373) && is_prime(3) && is_prime(2));
    assert!(!is_prime(1) && !is_prime(0) && !is_prime(65_535) && !is_prime(9));
    assert_eq!(
        MaglevSize::new(10),
        Err(SchedError::TableSizeNotPrime { size: 10 })
    );
    assert!(matches!(
        MaglevSize::new(2),
        Err(SchedError::TableSizeOutOfRange { .. })
    ));
    assert!(matches!(
        MaglevSize::new(u64::MAX),
        Err(SchedError::TableSizeOutOfRange { .. })
    ));
    assert_eq!(MaglevSize::new(655_373).unwrap(), MaglevSize::LARGE);
    assert_eq!(MaglevSize::at_least(0).unwrap().get(), 3);
    assert_eq!(MaglevSize::at_least(65_536).unwrap(), MaglevSize::DEFAULT);
    assert!(MaglevSize::at_least(u64::from(MaglevSize::MAX)).is_err());
    assert_eq!(MaglevSize::try_from(13).unwrap().get(), 13);
}

#[test]
fn bad_input_is_a_typed_error() {
    assert_eq!(
        Maglev::new(&[], MaglevConfig::new(KEY)).unwrap_err(),
        SchedError::NoBackends
    );
    let zero = [backend(1, 0), backend(2, 0)];
    assert_eq!(
        Maglev::new(&zero, MaglevConfig::new(KEY)).unwrap_err(),
        SchedError::NoBackends
    );
    let dup = [backend(1, 1), backend(2, 1), backend(1, 3)];
    assert_eq!(
        Maglev::new(&dup, MaglevConfig::new(KEY)).unwrap_err(),
        SchedError::DuplicateBackend { id: BackendId(1) }
    );
    assert_eq!(
        Maglev::new(&backends(20), cfg(13)).unwrap_err(),
        SchedError::TableTooSmall {
            size: 13,
            backends: 20
        }
    );
    // Huge weights: summed in u64, no overflow.
    let huge = [
        backend(1, u32::MAX),
        backend(2, u32::MAX - 1),
        backend(3, 1),
    ];
    let t = Maglev::new(&huge, cfg(1009)).unwrap();
    assert_eq!(t.slots().len(), 1009);
}

#[test]
fn rebuild_error_leaves_table_unchanged() {
    let mut t = Maglev::new(&backends(10), cfg(1009)).unwrap();
    let before = t.slots().to_vec();
    assert!(t.rebuild(&[]).is_err());
    assert!(t.rebuild(&backends(2000)).is_err());
    assert_eq!(t.slots(), &before[..]);
    assert_eq!(t.len(), 10);
}

#[test]
fn every_slot_is_an_eligible_backend() {
    let mut bs = backends(50);
    bs[3].weight = lb_core::Weight::ZERO;
    let t = Maglev::new(&bs, cfg(5003)).unwrap();
    assert_eq!(t.len(), 49);
    assert!(t.backends().iter().all(|b| b.id != bs[3].id));
    assert!(t.slots().iter().all(|&s| usize::from(s) < 49));
    assert!(t.slot_counts().iter().all(|&c| c > 0));
}

#[test]
fn rebuild_reuses_buffers_and_equals_fresh_build() {
    let mut t = Maglev::new(&backends(100), MaglevConfig::new(KEY)).unwrap();
    let ptr = t.slots().as_ptr();
    t.rebuild(&backends(60)).unwrap();
    assert_eq!(t.slots().as_ptr(), ptr, "table buffer reused");
    let fresh = Maglev::new(&backends(60), MaglevConfig::new(KEY)).unwrap();
    assert_eq!(t.slots(), fresh.slots());
    assert_eq!(t.backends(), fresh.backends());
}

#[test]
fn equal_weights_balance_within_one_slot() {
    // With equal weights every backend claims one slot per round: counts differ by at most 1,
    // far inside the paper's 1 % at M >= 100 N.
    for n in [1u32, 7, 100, 655] {
        let t = Maglev::new(&backends(n), MaglevConfig::new(KEY)).unwrap();
        let c = t.slot_counts();
        let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
        assert!(max - min <= 1, "n={n}: {min}..{max}");
    }
}

#[test]
fn removal_disruption_is_small() {
    // Removing one of N backends: slots that change owner (other than the removed backend's).
    // Measured (see lb-sim): at M = 65537 the fraction moved is 1.02/N at N = 10, 1.6/N at
    // N = 100, 5.3/N at N = 500: Maglev's cascade grows as M/N shrinks.
    for (n, bound) in [(10u32, 2.0), (100, 2.0), (500, 6.0)] {
        let all = backends(n);
        let t = Maglev::new(&all, MaglevConfig::new(KEY)).unwrap();
        for victim in [0usize, (n / 2) as usize] {
            let mut less = all.clone();
            less.remove(victim);
            let t2 = Maglev::new(&less, MaglevConfig::new(KEY)).unwrap();
            let moved = t
                .slots()
                .iter()
                .zip(t2.slots())
                .filter(|(&a, &b)| t.ids[usize::from(a)] != t2.ids[usize::from(b)])
                .count();
            let frac = moved as f64 / f64::from(t.size().get());
            assert!(frac <= bound / f64::from(n), "n={n}: moved {frac}");
            assert!(frac >= 1.0 / f64::from(n) * 0.9, "n={n}: moved {frac}");
        }
    }
}

#[test]
fn drain_through_health_moves_only_the_drained_flows() {
    let t = Maglev::new(&backends(30), MaglevConfig::new(KEY)).unwrap();
    let down = t.backends()[4].id;
    let mut moved = 0;
    for h in hashes(20_000, 1) {
        let before = t.lookup(h).unwrap();
        let after = t.lookup_eligible(h, |id| id != down).unwrap();
        assert_ne!(after, down);
        if before != down {
            assert_eq!(before, after);
        } else {
            moved += 1;
        }
    }
    assert!(moved > 0);
    // Everything down: None, in bounded time.
    assert_eq!(t.lookup_eligible(12345, |_| false), None);
}

#[test]
fn preferred_are_distinct_and_start_with_the_owner() {
    let t = Maglev::new(&backends(5), cfg(1009)).unwrap();
    for h in hashes(500, 2) {
        let mut out = [BackendId(0); 8];
        let n = t.preferred(h, &mut out);
        assert_eq!(n, 5);
        assert_eq!(out[0], t.lookup(h).unwrap());
        let mut v = out[..n].to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 5);
    }
    let mut none: [BackendId; 0] = [];
    assert_eq!(t.preferred(1, &mut none), 0);
}

#[test]
fn heap_is_small() {
    let t = Maglev::new(&backends(1000), MaglevConfig::new(KEY)).unwrap();
    // 128 KiB of slots plus ~100 bytes per backend.
    assert!(t.heap_bytes() < 300 * 1024, "{}", t.heap_bytes());
}

#[test]
fn skewed_weights_build_fast_and_identically() {
    // One heavy backend among many light ones: the heap schedule gives the round-robin table.
    let mut bs = backends(300);
    bs[7].weight = lb_core::Weight::new(1_000_000);
    bs[100].weight = lb_core::Weight::new(3);
    let mut a = Maglev::new(&bs, cfg(5003)).unwrap();
    let heap = a.slots().to_vec();
    a.populate_with(false);
    assert_eq!(a.slots(), &heap[..]);
    a.populate_with(true);
    assert_eq!(a.slots(), &heap[..]);
    // Heavy backend owns ~all slots; a u32::MAX weight next to weight 1 builds quickly too.
    let c = a.slot_counts();
    assert!(c[7] > 4_900, "{}", c[7]);
    let huge = [backend(1, u32::MAX), backend(2, 1), backend(3, 1)];
    let t = Maglev::new(&huge, MaglevConfig::new(KEY)).unwrap();
    assert_eq!(t.slot_counts()[0], 65_537);
}

fn shuffled(mut v: Vec<Backend>, seed: u64) -> Vec<Backend> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    v.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn order_independent_and_key_dependent(n in 1u32..60, seed in any::<u64>(), k in any::<[u8; 16]>()) {
        let bs: Vec<Backend> = (0..n).map(|i| backend(i * 3 + 1, 1 + i % 4)).collect();
        let a = Maglev::new(&bs, cfg(4099)).unwrap();
        let b = Maglev::new(&shuffled(bs.clone(), seed), cfg(4099)).unwrap();
        prop_assert_eq!(a.slots(), b.slots());
        prop_assert_eq!(a.backends(), b.backends());
        if n >= 2 {
            let other = MaglevConfig::new(HashKey::from_bytes(k)).with_size(MaglevSize::new(4099).unwrap());
            let c = Maglev::new(&bs, other).unwrap();
            prop_assert_ne!(a.slots(), c.slots());
        }
    }

    #[test]
    fn answers_are_eligible(
        ws in proptest::collection::vec(0u32..5, 1..40),
        hs in proptest::collection::vec(any::<u64>(), 1..64),
        down in any::<u64>(),
    ) {
        let bs: Vec<Backend> = ws.iter().enumerate().map(|(i, &w)| backend(i as u32 * 5, w)).collect();
        let t = match Maglev::new(&bs, cfg(1009)) {
            Ok(t) => t,
            Err(e) => {
                prop_assert!(ws.iter().all(|&w| w == 0));
                prop_assert_eq!(e, SchedError::NoBackends);
                return Ok(());
            }
        };
        let is_up = |id: BackendId| (down >> (id.0 % 64)) & 1 == 0;
        for h in hs {
            let id = t.lookup(h).unwrap();
            let b = bs.iter().find(|b| b.id == id).unwrap();
            prop_assert!(b.weight.get() > 0);
            match t.lookup_eligible(h, is_up) {
                Some(id) => {
                    prop_assert!(is_up(id));
                    prop_assert!(bs.iter().any(|b| b.id == id && b.weight.get() > 0));
                }
                None => prop_assert!(t.backends().iter().all(|b| !is_up(b.id))),
            }
        }
    }

    #[test]
    fn weighted_shares_follow_weights(ws in proptest::collection::vec(1u32..10, 2..20)) {
        let bs: Vec<Backend> = ws.iter().enumerate().map(|(i, &w)| backend(i as u32, w)).collect();
        let mut t = Maglev::new(&bs, MaglevConfig::new(KEY)).unwrap();
        // Both schedules give the same table.
        let slots = t.slots().to_vec();
        t.populate_with(true);
        prop_assert_eq!(t.slots(), &slots[..]);
        t.populate_with(false);
        prop_assert_eq!(t.slots(), &slots[..]);
        let total: u32 = ws.iter().sum();
        let m = f64::from(t.size().get());
        for (i, c) in t.slot_counts().into_iter().enumerate() {
            let want = m * f64::from(ws[i]) / f64::from(total);
            // Within 1 % of the expected share (+1 slot of rounding).
            prop_assert!((c as f64 - want).abs() <= want * 0.01 + 1.0, "{} vs {}", c, want);
        }
    }

    #[test]
    fn removal_moves_at_most_two_over_n(n in 2u32..=100, victim in any::<prop::sample::Index>()) {
        // The default M = 65537, i.e. M >= 655 N. (At M = 100 N the cascade reaches ~2.5/N.)
        let bs = backends(n);
        let m = MaglevSize::DEFAULT;
        let c = MaglevConfig::new(KEY).with_size(m);
        let t = Maglev::new(&bs, c).unwrap();
        let mut less = bs.clone();
        less.remove(victim.index(bs.len()));
        let t2 = Maglev::new(&less, c).unwrap();
        let moved = t.slots().iter().zip(t2.slots())
            .filter(|(&a, &b)| t.ids[usize::from(a)] != t2.ids[usize::from(b)]).count();
        prop_assert!(moved as f64 / f64::from(m.get()) <= 2.0 / f64::from(n));
    }
}
