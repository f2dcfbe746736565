//! lb-core: FlowHasher on IPv4 and IPv6 keys, SipHash-1-3 and FastHash, against the plain
//! `siphasher` and `foldhash` crates on the same packed bytes.

use std::hash::{BuildHasher, Hasher};
use std::hint::black_box;

use criterion::{Criterion, Throughput};
use lb_benches::{ipv4_flows, ipv6_flows};
use lb_core::{FastHash, FlowHasher, HashKey, KeyedHash, SipHash13};

pub fn register(c: &mut Criterion) {
    let key = HashKey::from_bytes(*b"bench-key-000001");
    let v4 = ipv4_flows(1024, 1);
    let v6 = ipv6_flows(1024, 2);
    let sip: FlowHasher<SipHash13> = FlowHasher::new(key);
    let fast = FlowHasher::<FastHash>::with_key(key);

    let mut g = c.benchmark_group("core/flow_hash");
    g.throughput(Throughput::Elements(1));
    for (fam, keys) in [("ipv4", &v4), ("ipv6", &v6)] {
        let mut i = 0usize;
        g.bench_function(format!("siphash13/{fam}"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                sip.hash_flow(black_box(&keys[i]))
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("fasthash/{fam}"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                fast.hash_flow(black_box(&keys[i]))
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("symmetric_siphash13/{fam}"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                sip.hash_symmetric(black_box(&keys[i]))
            })
        });
    }
    // Peers on the same 13-byte packed IPv4 key: raw siphasher, and foldhash (seeded, unkeyed-grade).
    let packed: Vec<[u8; 13]> = v4
        .iter()
        .map(|k| {
            let e = k.encode();
            let mut p = [0u8; 13];
            p[..4].copy_from_slice(&e[6..10]);
            p[4..8].copy_from_slice(&e[22..26]);
            p[8..12].copy_from_slice(&e[2..6]);
            p[12] = e[1];
            p
        })
        .collect();
    let mut i = 0usize;
    g.bench_function("peer_siphasher13_raw/ipv4", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (k0, k1) = black_box((1u64, 2u64));
            let mut h = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
            h.write(black_box(&packed[i]));
            h.finish()
        })
    });
    let fast_fn = FastHash::with_key(&key);
    let mut i = 0usize;
    g.bench_function("fasthash_prepacked/ipv4", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            fast_fn.hash_bytes(black_box(&packed[i]))
        })
    });
    let sip_fn = SipHash13::with_key(&key);
    let mut i = 0usize;
    g.bench_function("siphash13_prepacked/ipv4", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            sip_fn.hash_bytes(black_box(&packed[i]))
        })
    });
    let fh = foldhash::fast::FixedState::with_seed(7);
    let mut i = 0usize;
    g.bench_function("peer_foldhash/ipv4", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            fh.hash_one(black_box(&packed[i]))
        })
    });
    g.finish();
}
