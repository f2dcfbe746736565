//! Helpers shared by the hashing tests.

use lb_core::{Backend, BackendId, HashKey, Weight};
use rand::{Rng, SeedableRng};

pub(crate) const KEY: HashKey = HashKey::from_bytes(*b"lb-sched-test-k!");

/// A backend with id `id` and weight `w`.
pub(crate) fn backend(id: u32, w: u32) -> Backend {
    let addr = std::net::SocketAddr::from(([10, 0, (id >> 8) as u8, id as u8], 80));
    Backend::new(BackendId(id), addr).with_weight(Weight::new(w))
}

/// `n` backends of weight 1 with ids `1..=n` (times 7, to keep ids sparse).
pub(crate) fn backends(n: u32) -> Vec<Backend> {
    (1..=n).map(|i| backend(i * 7, 1)).collect()
}

/// `n` uniformly random flow hashes.
pub(crate) fn hashes(n: usize, seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}
