//! The one criterion harness of the lb crates: a module per crate registers its groups.
//! Run with `cargo bench -p lb-benches` (all) or `cargo bench -p lb-benches -- <group filter>`.
#![allow(missing_docs, unreachable_pub)]

use criterion::{criterion_group, criterion_main, Criterion};

mod conntrack;
mod core_hash;
mod dataplane;
mod health;
mod midflow;
mod packet;
mod sched_hash;
mod sched_policy;
mod sync;

fn all(c: &mut Criterion) {
    core_hash::register(c);
    sched_hash::register(c);
    sched_policy::register(c);
    packet::register(c);
    conntrack::register(c);
    health::register(c);
    dataplane::register(c);
    dataplane::register_many_vips(c);
    dataplane::register_tunnel_fast_path(c);
    dataplane::register_flood_fast_path(c);
    midflow::register(c);
    sync::register(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = all
}
criterion_main!(benches);
