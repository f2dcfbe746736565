//! lb-sched consistent hashing (issue 3): lookups and builds of Maglev, ring, rendezvous, jump
//! and modulo, side by side with crates.io `maglev`, `pingora-ketama`, `jumphash` and
//! `anchorhash` on the same IPv4 flows and the same N.
//!
//! Also prints the heap peak of a Maglev build (ours and `maglev`'s), measured with a counting
//! global allocator that is a plain pass-through (one relaxed load) unless a measurement is on.

use std::alloc::{GlobalAlloc, Layout};
use std::hash::BuildHasherDefault;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use criterion::{BatchSize, Criterion, Throughput};
use lb_benches::ipv4_flows;
use lb_core::{Backend, BackendId, FastHash, FlowHasher, FlowKey, HashKey, SipHash13};
use lb_examples::sys::HugePageAlloc;
use lb_sched::hash::{
    ConsistentHash, Jump, Maglev, MaglevConfig, Modulo, Rendezvous, Ring, RingConfig,
};

/// The bench binary's allocator: counts live heap bytes and their peak while `TRACK` is set,
/// and otherwise is `tun-balancer`'s, [`HugePageAlloc`] (large tables on transparent huge
/// pages; the peers get the same memory).
struct Counting;

const INNER: HugePageAlloc = HugePageAlloc;

static TRACK: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
// SAFETY: forwards every call to `HugePageAlloc` unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { INNER.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { INNER.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if TRACK.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { INNER.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap peak (bytes above the level at the start) while running `f`.
fn heap_peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    TRACK.store(true, Ordering::Relaxed);
    let t = f();
    TRACK.store(false, Ordering::Relaxed);
    (t, PEAK.load(Ordering::Relaxed))
}

fn backends(n: u32) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let addr = std::net::SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80));
            Backend::new(BackendId(i), addr)
        })
        .collect()
}

/// The 13-byte packed IPv4 5-tuple (src, dst, sport, dport, proto): what the peers hash.
fn packed(k: &FlowKey) -> [u8; 13] {
    let e = k.encode();
    let mut p = [0u8; 13];
    p[..4].copy_from_slice(&e[6..10]);
    p[4..8].copy_from_slice(&e[22..26]);
    p[8..12].copy_from_slice(&e[2..6]);
    p[12] = e[1];
    p
}

type SipBuild = BuildHasherDefault<siphasher::sip::SipHasher13>;

pub fn register(c: &mut Criterion) {
    let key = HashKey::from_bytes(*b"bench-key-000001");
    let flows = ipv4_flows(4096, 3);
    let bytes: Vec<[u8; 13]> = flows.iter().map(packed).collect();
    let sip: FlowHasher<SipHash13> = FlowHasher::new(key);
    let fast = FlowHasher::<FastHash>::with_key(key);
    let mcfg = MaglevConfig::new(key.derive("maglev"));

    // Heap peak of a build at M = 65537.
    for n in [100u32, 1000] {
        let bs = backends(n);
        let (_t, ours) = heap_peak(|| Maglev::new(&bs, mcfg));
        let (_p, peer) = heap_peak(|| {
            maglev::Maglev::with_capacity_and_hasher(0..n, 65_537, SipBuild::default())
        });
        eprintln!(
            "sched_hash heap peak of a build, M = 65537, N = {n}: lb-sched {ours} B, maglev 0.2 {peer} B ({:.0}x)",
            peer as f64 / ours.max(1) as f64
        );
    }

    let mut g = c.benchmark_group("sched_hash/lookup");
    g.throughput(Throughput::Elements(1));
    for n in [100u32, 1000] {
        let bs = backends(n);
        let ours = Maglev::new(&bs, mcfg).expect("maglev");
        let mut i = 0usize;
        g.bench_function(format!("maglev_siphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                ours.lookup(sip.hash_flow(black_box(&flows[i])))
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("maglev_fasthash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                ours.lookup(fast.hash_flow(black_box(&flows[i])))
            })
        });
        // The same lookups on pre-packed 13-byte keys (what the peers hash below): isolates the
        // table from FlowKey packing.
        let mut i = 0usize;
        g.bench_function(format!("maglev_fasthash_packed/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                ours.lookup(fast.hash_bytes(black_box(&bytes[i])))
            })
        });
        let peer_sip = maglev::Maglev::with_capacity_and_hasher(0..n, 65_537, SipBuild::default());
        let mut i = 0usize;
        g.bench_function(format!("peer_maglev_siphash/n{n}"), |b| {
            use maglev::ConsistentHasher;
            b.iter(|| {
                i = (i + 1) & 4095;
                peer_sip.get(black_box(&bytes[i])).copied()
            })
        });
        let peer_fast = maglev::Maglev::with_capacity_and_hasher(
            0..n,
            65_537,
            foldhash::fast::FixedState::with_seed(7),
        );
        let mut i = 0usize;
        g.bench_function(format!("peer_maglev_foldhash/n{n}"), |b| {
            use maglev::ConsistentHasher;
            b.iter(|| {
                i = (i + 1) & 4095;
                peer_fast.get(black_box(&bytes[i])).copied()
            })
        });
        // Peers as a user holding a FlowKey would call them (derived Hash on the key).
        let mut i = 0usize;
        g.bench_function(format!("peer_maglev_siphash_flowkey/n{n}"), |b| {
            use maglev::ConsistentHasher;
            b.iter(|| {
                i = (i + 1) & 4095;
                peer_sip.get(black_box(&flows[i])).copied()
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("peer_maglev_foldhash_flowkey/n{n}"), |b| {
            use maglev::ConsistentHasher;
            b.iter(|| {
                i = (i + 1) & 4095;
                peer_fast.get(black_box(&flows[i])).copied()
            })
        });
        // Draining: the owner of every flow is down 1 time in n; walk past it.
        let down = BackendId(n / 2);
        let mut i = 0usize;
        g.bench_function(format!("maglev_eligible_siphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                ours.lookup_eligible(sip.hash_flow(black_box(&flows[i])), |id| id != down)
            })
        });

        let ring = Ring::new(&bs, RingConfig::new(key.derive("ring"))).expect("ring");
        let mut i = 0usize;
        g.bench_function(format!("ring_siphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                ring.lookup(sip.hash_flow(black_box(&flows[i])))
            })
        });
        let buckets: Vec<pingora_ketama::Bucket> = bs
            .iter()
            .map(|b| pingora_ketama::Bucket::new(b.addr, 1))
            .collect();
        let ketama = pingora_ketama::Continuum::new(&buckets);
        let mut i = 0usize;
        g.bench_function(format!("peer_pingora_ketama/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                ketama.node_idx(black_box(&bytes[i]))
            })
        });

        let jump = Jump::new(&bs).expect("jump");
        let mut i = 0usize;
        g.bench_function(format!("jump_siphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                jump.lookup(sip.hash_flow(black_box(&flows[i])))
            })
        });
        let peer_jump = jumphash::JumpHasher::new_with_keys(1, 2);
        let mut i = 0usize;
        g.bench_function(format!("peer_jumphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                peer_jump.slot(black_box(&bytes[i]), n)
            })
        });
        let anchor = anchorhash::Builder::with_hasher(SipBuild::default())
            .with_resources(0..n)
            .build::<[u8; 13]>(u16::try_from(n).unwrap_or(u16::MAX));
        let mut i = 0usize;
        g.bench_function(format!("peer_anchorhash_siphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                anchor.get_resource(black_box(bytes[i])).copied()
            })
        });

        let modulo = Modulo::new(&bs).expect("modulo");
        let mut i = 0usize;
        g.bench_function(format!("modulo_siphash/n{n}"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                modulo.lookup(sip.hash_flow(black_box(&flows[i])))
            })
        });
    }
    // The flow hash alone, to attribute the lookup times above.
    let mut i = 0usize;
    g.bench_function("hash_only_siphash", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            sip.hash_flow(black_box(&flows[i]))
        })
    });
    let mut i = 0usize;
    g.bench_function("hash_only_fasthash", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            fast.hash_flow(black_box(&flows[i]))
        })
    });
    let hrw = Rendezvous::new(&backends(100), key).expect("rendezvous");
    let mut i = 0usize;
    g.bench_function("rendezvous_siphash/n100", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            hrw.lookup(sip.hash_flow(black_box(&flows[i])))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("sched_hash/build");
    g.sample_size(10);
    for n in [100u32, 1000] {
        let bs = backends(n);
        let mut table = Maglev::new(&bs, mcfg).expect("maglev");
        g.bench_function(format!("maglev_rebuild/n{n}"), |b| {
            b.iter(|| table.rebuild(black_box(&bs)))
        });
        g.bench_function(format!("maglev_new/n{n}"), |b| {
            b.iter(|| Maglev::new(black_box(&bs), mcfg))
        });
        g.bench_function(format!("peer_maglev/n{n}"), |b| {
            b.iter_batched(
                || (),
                |()| maglev::Maglev::with_capacity_and_hasher(0..n, 65_537, SipBuild::default()),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("ring/n{n}"), |b| {
            b.iter(|| Ring::new(black_box(&bs), RingConfig::new(key)))
        });
        let buckets: Vec<pingora_ketama::Bucket> = bs
            .iter()
            .map(|b| pingora_ketama::Bucket::new(b.addr, 1))
            .collect();
        g.bench_function(format!("peer_pingora_ketama/n{n}"), |b| {
            b.iter(|| pingora_ketama::Continuum::new(black_box(&buckets)))
        });
    }
    g.finish();
}
