//! [`AnyHash`]: every scheme behind one enum, for a balancer that picks the scheme from its
//! configuration without `dyn` on the packet path.

use core::fmt;

use lb_core::{Backend, BackendId, HashKey};

use super::{
    ConsistentHash, Jump, Maglev, MaglevConfig, Modulo, Rehash, Rendezvous, RendezvousPreference,
    Ring, RingConfig, RingPreference,
};
use crate::SchedError;

/// The consistent-hashing schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HashAlgorithm {
    /// [`Maglev`].
    Maglev,
    /// [`Ring`].
    Ring,
    /// [`Rendezvous`].
    Rendezvous,
    /// [`Jump`].
    Jump,
    /// [`Modulo`].
    Modulo,
}

impl HashAlgorithm {
    /// Every scheme, best first.
    pub const ALL: [HashAlgorithm; 5] = [
        HashAlgorithm::Maglev,
        HashAlgorithm::Ring,
        HashAlgorithm::Rendezvous,
        HashAlgorithm::Jump,
        HashAlgorithm::Modulo,
    ];

    /// A short lowercase name (`"maglev"`, `"ring"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Maglev => "maglev",
            HashAlgorithm::Ring => "ring",
            HashAlgorithm::Rendezvous => "rendezvous",
            HashAlgorithm::Jump => "jump",
            HashAlgorithm::Modulo => "modulo",
        }
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Any consistent-hashing scheme, dispatched by `match`.
///
/// ```
/// use lb_core::{Backend, BackendId, HashKey};
/// use lb_sched::hash::{AnyHash, ConsistentHash, HashAlgorithm};
/// let backends: Vec<Backend> = (0..3)
///     .map(|i| Backend::new(BackendId(i), "10.0.0.1:80".parse().unwrap()))
///     .collect();
/// let key = HashKey::from_passphrase("cluster secret 77aa0b1c");
/// for algo in HashAlgorithm::ALL {
///     let table = AnyHash::build(algo, &backends, key)?;
///     assert_eq!(table.algorithm(), algo);
///     assert!(table.lookup(99).is_some());
/// }
/// # Ok::<(), lb_sched::SchedError>(())
/// ```
#[derive(Debug, Clone)]
pub enum AnyHash {
    /// Maglev.
    Maglev(Maglev),
    /// Ring hash.
    Ring(Ring),
    /// Rendezvous hash.
    Rendezvous(Rendezvous),
    /// Jump hash.
    Jump(Jump),
    /// Modulo.
    Modulo(Modulo),
}

impl AnyHash {
    /// Builds `algo` over `backends` with its default configuration (Maglev: M = 65537; ring:
    /// 160 points per weight unit), keyed by a sub-key of `key` derived from the scheme's name.
    ///
    /// # Errors
    /// The scheme's construction errors.
    pub fn build(
        algo: HashAlgorithm,
        backends: &[Backend],
        key: HashKey,
    ) -> Result<Self, SchedError> {
        let k = key.derive(algo.name());
        Ok(match algo {
            HashAlgorithm::Maglev => AnyHash::Maglev(Maglev::new(backends, MaglevConfig::new(k))?),
            HashAlgorithm::Ring => AnyHash::Ring(Ring::new(backends, RingConfig::new(k))?),
            HashAlgorithm::Rendezvous => AnyHash::Rendezvous(Rendezvous::new(backends, k)?),
            HashAlgorithm::Jump => AnyHash::Jump(Jump::new(backends)?),
            HashAlgorithm::Modulo => AnyHash::Modulo(Modulo::new(backends)?),
        })
    }

    /// Which scheme this is.
    pub fn algorithm(&self) -> HashAlgorithm {
        match self {
            AnyHash::Maglev(_) => HashAlgorithm::Maglev,
            AnyHash::Ring(_) => HashAlgorithm::Ring,
            AnyHash::Rendezvous(_) => HashAlgorithm::Rendezvous,
            AnyHash::Jump(_) => HashAlgorithm::Jump,
            AnyHash::Modulo(_) => HashAlgorithm::Modulo,
        }
    }
}

macro_rules! from_scheme {
    ($($t:ident),*) => {$(
        impl From<$t> for AnyHash {
            fn from(t: $t) -> Self {
                AnyHash::$t(t)
            }
        }
    )*};
}
from_scheme!(Maglev, Ring, Rendezvous, Jump, Modulo);

macro_rules! dispatch {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyHash::Maglev($t) => $e,
            AnyHash::Ring($t) => $e,
            AnyHash::Rendezvous($t) => $e,
            AnyHash::Jump($t) => $e,
            AnyHash::Modulo($t) => $e,
        }
    };
}

/// The preference list of an [`AnyHash`].
#[derive(Debug, Clone)]
pub enum AnyPreference<'a> {
    /// Of a Maglev table.
    Maglev(Rehash<'a, Maglev>),
    /// Of a ring.
    Ring(RingPreference<'a>),
    /// Of a rendezvous hash.
    Rendezvous(RendezvousPreference<'a>),
    /// Of a jump hash.
    Jump(Rehash<'a, Jump>),
    /// Of a modulo table.
    Modulo(Rehash<'a, Modulo>),
}

impl Iterator for AnyPreference<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        match self {
            AnyPreference::Maglev(p) => p.next(),
            AnyPreference::Ring(p) => p.next(),
            AnyPreference::Rendezvous(p) => p.next(),
            AnyPreference::Jump(p) => p.next(),
            AnyPreference::Modulo(p) => p.next(),
        }
    }
}

impl ConsistentHash for AnyHash {
    type Preference<'a> = AnyPreference<'a>;

    #[inline]
    fn backends(&self) -> &[Backend] {
        dispatch!(self, t => t.backends())
    }

    #[inline]
    fn lookup_index(&self, flow_hash: u64) -> Option<usize> {
        dispatch!(self, t => t.lookup_index(flow_hash))
    }

    #[inline]
    fn lookup(&self, flow_hash: u64) -> Option<BackendId> {
        dispatch!(self, t => t.lookup(flow_hash))
    }

    fn preference(&self, flow_hash: u64) -> AnyPreference<'_> {
        match self {
            AnyHash::Maglev(t) => AnyPreference::Maglev(t.preference(flow_hash)),
            AnyHash::Ring(t) => AnyPreference::Ring(t.preference(flow_hash)),
            AnyHash::Rendezvous(t) => AnyPreference::Rendezvous(t.preference(flow_hash)),
            AnyHash::Jump(t) => AnyPreference::Jump(t.preference(flow_hash)),
            AnyHash::Modulo(t) => AnyPreference::Modulo(t.preference(flow_hash)),
        }
    }

    fn heap_bytes(&self) -> usize {
        dispatch!(self, t => t.heap_bytes())
    }

    #[inline]
    fn total_weight(&self) -> u64 {
        dispatch!(self, t => t.total_weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::testutil::{backend, hashes, KEY};
    use crate::hash::{BackendLoads, LoadBound};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Every answer of every scheme, through every entry point, is an eligible backend.
        #[test]
        fn every_answer_is_eligible(
            ws in proptest::collection::vec(0u32..4, 1..24),
            hs in proptest::collection::vec(any::<u64>(), 16),
            down in any::<u32>(),
            loads in proptest::collection::vec(0u64..50, 0..24),
        ) {
            let bs: Vec<Backend> = ws.iter().enumerate().map(|(i, &w)| backend(i as u32 * 11, w)).collect();
            let live = |id: BackendId| bs.iter().any(|b| b.id == id && b.weight.get() > 0);
            let is_up = |id: BackendId| (down >> (id.0 % 32)) & 1 == 0;
            for algo in HashAlgorithm::ALL {
                let t = match AnyHash::build(algo, &bs, KEY) {
                    Ok(t) => t,
                    Err(e) => {
                        prop_assert_eq!(e, SchedError::NoBackends);
                        prop_assert!(ws.iter().all(|&w| w == 0));
                        continue;
                    }
                };
                for &h in &hs {
                    let id = t.lookup(h).unwrap();
                    prop_assert!(live(id));
                    prop_assert_eq!(t.lookup_backend(h).map(|b| b.id), Some(id));
                    prop_assert_eq!(t.preference(h).next(), t.lookup_index(h));
                    match t.lookup_eligible(h, is_up) {
                        Some(id) => prop_assert!(live(id) && is_up(id)),
                        None => prop_assert!(t.backends().iter().all(|b| !is_up(b.id))),
                    }
                    let mut out = [BackendId(u32::MAX); 4];
                    let n = t.preferred(h, &mut out);
                    prop_assert_eq!(n, t.len().min(4));
                    prop_assert!(out[..n].iter().all(|&id| live(id)));
                    let l = BackendLoads::from_slice(&loads);
                    let i = t.lookup_bounded(h, &l, LoadBound::default()).unwrap();
                    prop_assert!(i < t.len());
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every scheme answers the same for the same backends in any order.
        #[test]
        fn every_scheme_is_order_independent(
            ws in proptest::collection::vec(1u32..4, 1..24),
            seed in any::<u64>(),
            hs in proptest::collection::vec(any::<u64>(), 32),
        ) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let bs: Vec<Backend> = ws.iter().enumerate().map(|(i, &w)| backend(i as u32 * 3, w)).collect();
            let mut shuffled = bs.clone();
            shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            for algo in HashAlgorithm::ALL {
                let a = AnyHash::build(algo, &bs, KEY).unwrap();
                let b = AnyHash::build(algo, &shuffled, KEY).unwrap();
                prop_assert_eq!(a.backends(), b.backends());
                for &h in &hs {
                    prop_assert_eq!(a.lookup(h), b.lookup(h));
                    prop_assert!(a.preference(h).eq(b.preference(h)));
                }
            }
        }
    }

    #[test]
    fn bounded_loads_cap_every_backend() {
        // Place 20 000 flows one by one with c = 1.25: no backend exceeds ceil(1.25 * mean) + 1.
        let bs: Vec<Backend> = (0..16).map(|i| backend(i, 1)).collect();
        let bound = LoadBound::new(1.25).unwrap();
        for algo in [HashAlgorithm::Maglev, HashAlgorithm::Ring] {
            let t = AnyHash::build(algo, &bs, KEY).unwrap();
            let mut loads = BackendLoads::new(16);
            let mut kept = 0;
            let hs = hashes(20_000, 10);
            for &h in &hs {
                let i = t.lookup_bounded(h, &loads, bound).unwrap();
                if Some(i) == t.lookup_index(h) {
                    kept += 1;
                }
                loads.add(i);
            }
            let cap = (1.25f64 * 20_000.0 / 16.0).ceil() as u64;
            assert!(
                loads.as_slice().iter().all(|&l| l <= cap),
                "{algo}: {loads:?}"
            );
            // Most flows still go to their consistent-hash owner.
            assert!(kept > 15_000, "{algo}: kept {kept}");
        }
    }
}
