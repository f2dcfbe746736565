#![no_main]
//! Builds Maglev tables (and every other consistent hash) from arbitrary backend lists and table
//! sizes: construction never panics, errors are typed, and whatever builds answers only eligible
//! backends, through every lookup entry point, before and after a rebuild.
//!
//! Input: byte 0 selects how the size is read; bytes 1..5 the size; byte 5 the ring's points per
//! weight; then 4 bytes per backend: id (u16, small so that duplicates happen), weight (u16).

use lb_core::{Backend, BackendId, HashKey, Weight};
use lb_sched::hash::{
    AnyHash, BackendLoads, ConsistentHash, HashAlgorithm, LoadBound, Maglev, MaglevConfig,
    MaglevSize, Ring, RingConfig,
};
use lb_sched::SchedError;
use libfuzzer_sys::fuzz_target;

fn check<T: ConsistentHash>(t: &T, backends: &[Backend], data: &[u8]) {
    let eligible = |id: BackendId| backends.iter().any(|b| b.id == id && !b.weight.is_zero());
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &b in data.iter().take(16) {
        h = h.rotate_left(7) ^ u64::from(b).wrapping_mul(0xff51_afd7_ed55_8ccd);
        let id = t.lookup(h).expect("a built table always answers");
        assert!(eligible(id));
        let down = u32::from(b);
        match t.lookup_eligible(h, |id| id.0 % 7 != down % 7) {
            Some(id) => assert!(eligible(id) && id.0 % 7 != down % 7),
            None => assert!(t.backends().iter().all(|x| x.id.0 % 7 == down % 7)),
        }
        let mut out = [BackendId(0); 5];
        let n = t.preferred(h, &mut out);
        assert_eq!(n, t.len().min(5));
        assert!(out[..n].iter().all(|&id| eligible(id)));
        let loads: Vec<u64> = data.iter().map(|&x| u64::from(x)).collect();
        let loads = BackendLoads::from_slice(&loads);
        let i = t
            .lookup_bounded(h, &loads, LoadBound::default())
            .expect("bounded lookups answer");
        assert!(i < t.len());
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let raw = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
    let size = if data[0] & 1 == 0 {
        MaglevSize::at_least(u64::from(raw & 0xffff))
    } else {
        MaglevSize::new(u64::from(raw & 0x3_ffff))
    };
    let size = match size {
        Ok(s) => s,
        Err(SchedError::TableSizeNotPrime { .. } | SchedError::TableSizeOutOfRange { .. }) => {
            return
        }
        Err(e) => panic!("unexpected {e:?}"),
    };
    let backends: Vec<Backend> = data[6..]
        .chunks_exact(4)
        .map(|c| {
            let id = u32::from(u16::from_le_bytes([c[0], c[1]]));
            let w = u32::from(u16::from_le_bytes([c[2], c[3]]));
            Backend::new(BackendId(id), "192.0.2.1:80".parse().expect("literal"))
                .with_weight(Weight::new(w))
        })
        .collect();
    let key = HashKey::from_bytes(*b"fuzz-maglev-key!");
    let cfg = MaglevConfig::new(key).with_size(size);
    match Maglev::new(&backends, cfg) {
        Ok(mut t) => {
            assert_eq!(t.slots().len() as u32, size.get());
            assert!(t.slots().iter().all(|&s| usize::from(s) < t.len()));
            check(&t, &backends, data);
            // Rebuild with half the list: same as a fresh build, or a typed error.
            let half = &backends[..backends.len() / 2];
            match (t.rebuild(half), Maglev::new(half, cfg)) {
                (Ok(()), Ok(fresh)) => {
                    assert_eq!(t.slots(), fresh.slots());
                    check(&t, half, data);
                }
                (Err(a), Err(b)) => assert_eq!(a, b),
                (a, b) => panic!("rebuild {a:?} vs new {:?}", b.map(|_| ())),
            }
        }
        Err(
            SchedError::NoBackends
            | SchedError::DuplicateBackend { .. }
            | SchedError::TableTooSmall { .. }
            | SchedError::TooManyBackends { .. },
        ) => {}
        Err(e) => panic!("unexpected {e:?}"),
    }
    let ring_cfg = RingConfig {
        key,
        points_per_weight: u32::from(data[5] % 8),
        max_points: 1 << 16,
    };
    if let Ok(r) = Ring::new(&backends, ring_cfg) {
        check(&r, &backends, data);
    }
    if backends.len() <= 64 {
        for algo in [
            HashAlgorithm::Rendezvous,
            HashAlgorithm::Jump,
            HashAlgorithm::Modulo,
        ] {
            if let Ok(t) = AnyHash::build(algo, &backends, key) {
                check(&t, &backends, data);
            }
        }
    }
});
