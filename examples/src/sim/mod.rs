//! Simulators behind the `lb-sim` binary: consistent hashing ([`hashing`]) and scheduling
//! policies under queueing load ([`sched`]). Deterministic for a given seed.

pub mod hashing;
pub mod sched;

use std::path::PathBuf;

/// Options shared by the simulators.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Seed for every random choice.
    pub seed: u64,
    /// Number of flows (hashing) or requests (scheduling) to simulate.
    pub flows: usize,
    /// Directory the plots are written to.
    pub out_dir: PathBuf,
    /// Smaller, faster run (used by tests).
    pub quick: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 1,
            flows: 1_000_000,
            out_dir: PathBuf::from("target/lb-sim"),
            quick: false,
        }
    }
}
