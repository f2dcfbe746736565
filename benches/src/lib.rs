//! # lb-benches
//!
//! Shared helpers for the criterion harness in `benches/lb.rs`: deterministic workloads so every
//! group measures the same keys.
#![forbid(unsafe_code)]

use lb_core::{FlowKey, IpProto};
use rand::{Rng, SeedableRng};

/// `n` random IPv4 TCP flow keys towards one VIP, from a fixed seed.
pub fn ipv4_flows(n: usize, seed: u64) -> Vec<FlowKey> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            FlowKey::v4(
                rng.random::<u32>().into(),
                rng.random(),
                [203, 0, 113, 10].into(),
                80,
                IpProto::Tcp,
            )
        })
        .collect()
}

/// `n` random IPv6 TCP flow keys towards one VIP, from a fixed seed.
pub fn ipv6_flows(n: usize, seed: u64) -> Vec<FlowKey> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            FlowKey::v6(
                rng.random::<u128>().into(),
                rng.random(),
                "2001:db8::10".parse().expect("literal"),
                443,
                IpProto::Tcp,
            )
        })
        .collect()
}
