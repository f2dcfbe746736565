//! Scheduling policies over a live [`crate::pool`].
//!
//! Every policy picks among the pool's *available* backends (admin-active, weight > 0, healthy or
//! the pool in panic, under its admission thresholds) and answers a [`Pick`]: a backend, or
//! [`Pick::Overloaded`] when eligible backends exist but all are above their thresholds (refuse
//! the flow and count it), or [`Pick::Unavailable`] when there is none at all. No policy panics,
//! allocates or locks on its pick path (LBLC / LBLCR use a fixed-size table sized at
//! construction).
//!
//! | module | policies | source of the semantics |
//! |---|---|---|
//! | [`random`] | weighted random | HAProxy `random(1)`, RFC 5356 weighted random |
//! | [`rr`] | round robin | IPVS `ip_vs_rr.c` |
//! | [`wrr`] | smooth WRR, gcd-stepped WRR | nginx `ngx_http_upstream_round_robin.c`, IPVS `ip_vs_wrr.c` |
//! | [`sh`] | source hashing, destination hashing | IPVS `ip_vs_sh.c`, `ip_vs_dh.c` |
//! | [`lc`] | LC, WLC | IPVS `ip_vs_lc.c`, `ip_vs_wlc.c` |
//! | [`sed`] | SED, NQ | IPVS `ip_vs_sed.c`, `ip_vs_nq.c` |
//! | [`lblc`] | LBLC, LBLCR | IPVS `ip_vs_lblc.c`, `ip_vs_lblcr.c` |
//! | [`fo`] | weighted failover, weighted overflow | IPVS `ip_vs_fo.c`, `ip_vs_ovf.c` |
//! | [`p2c`] | weighted power of two choices | Mitzenmacher 2001; tower `p2c` |
//! | [`ewma`] | least expected response time (peak-EWMA) | Finagle `PeakEwma`, Linkerd |
//! | [`least_request`] | least outstanding requests with active-request bias | Envoy `LEAST_REQUEST` |
//! | [`admission`] | connection / utilisation thresholds | IPVS `-x`/`-y` |
//! | [`slow_start`] | slow start, panic threshold | Envoy, HAProxy |
//!
//! [`Policy`] is an enum over all of them, chosen by configuration and dispatched statically.
//!
//! # Choosing
//! From `lb-sim sched` (six FCFS servers at speeds 1×–4×, weights = speeds, Poisson arrivals):
//! - weight-blind policies (RR, and LC to a lesser degree) overload the slow servers: avoid them
//!   in heterogeneous pools;
//! - static weighted policies (WRR, smooth WRR, weighted random, SH) keep utilisation in
//!   proportion but not response time: their p99 grows several-fold from 50 % to 95 % load;
//! - dynamic policies (WLC, SED, NQ) give the lowest mean and p99 at every load, because they
//!   react to the queue each server actually has; P2C sits between, at O(1) cost and without
//!   needing a consistent global view;
//! - peak-EWMA matches WLC with light-tailed service times but is misled by heavy tails (one
//!   huge sample marks a fast server slow for the decay time);
//! - admission thresholds trade a small refusal rate for bounded queues near saturation.
//!
//! ```
//! use lb_core::{Backend, BackendId, Instant, Weight};
//! use lb_sched::policy::{Pick, Policy, Request, wrr::SmoothWrr};
//! use lb_sched::pool::{Pool, PoolConfig};
//! use rand::SeedableRng;
//!
//! let now = Instant::ZERO;
//! let backends = [(1, 5), (2, 1), (3, 1)].map(|(id, w)| {
//!     Backend::new(BackendId(id), ([10, 0, 0, id as u8], 80).into()).with_weight(Weight::new(w))
//! });
//! let pool = Pool::with_backends(PoolConfig::default(), backends, now).unwrap();
//! let mut policy = Policy::SmoothWrr(SmoothWrr::new());
//! let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
//! let picks: Vec<u32> = (0..7)
//!     .filter_map(|_| policy.pick(&pool, &Request::at(now), &mut rng).backend())
//!     .map(|id| id.get())
//!     .collect();
//! assert_eq!(picks, [1, 1, 2, 1, 3, 1, 1]); // nginx's smooth sequence for {5, 1, 1}
//! ```

use lb_core::{BackendId, Instant};

/// The RNG trait the randomised policies draw from, re-exported so that a caller can implement
/// or name it without depending on `rand` itself.
pub use rand::RngCore;

use crate::pool::Pool;

pub mod admission;
pub mod ewma;
pub mod fo;
pub mod lblc;
pub mod lc;
pub mod least_request;
pub mod p2c;
pub mod random;
pub mod rr;
pub mod sed;
pub mod sh;
pub mod slow_start;
pub mod wrr;

/// The outcome of a pick.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pick {
    /// Send the new flow to this backend.
    Backend(BackendId),
    /// Eligible backends exist but every one is above its admission threshold: refuse the flow
    /// (and count it) rather than overload a server.
    Overloaded,
    /// No eligible backend at all (none configured, all down, draining or weight 0).
    Unavailable,
}

impl Pick {
    /// The chosen backend, if any.
    #[inline]
    pub fn backend(self) -> Option<BackendId> {
        match self {
            Pick::Backend(id) => Some(id),
            _ => None,
        }
    }
}

/// What a policy may look at for one new flow: the time, and the hashes of its source and
/// destination (computed by the caller with a keyed [`lb_core::FlowHasher`]; only SH, DH, LBLC and
/// LBLCR read them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// Current time.
    pub now: Instant,
    /// Hash of the source (address, or address and port): SH's key.
    pub src_hash: u64,
    /// Hash of the destination address: DH's, LBLC's and LBLCR's key.
    pub dst_hash: u64,
}

impl Request {
    /// A request at `now` with zero hashes.
    #[inline]
    pub const fn at(now: Instant) -> Self {
        Request {
            now,
            src_hash: 0,
            dst_hash: 0,
        }
    }

    /// The same request with a source hash.
    #[inline]
    #[must_use]
    pub const fn with_src_hash(mut self, h: u64) -> Self {
        self.src_hash = h;
        self
    }

    /// The same request with a destination hash.
    #[inline]
    #[must_use]
    pub const fn with_dst_hash(mut self, h: u64) -> Self {
        self.dst_hash = h;
        self
    }
}

/// Every policy, chosen by configuration, dispatched without `dyn`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Policy {
    /// Weighted random.
    Random(random::WeightedRandom),
    /// Round robin (IPVS `rr`).
    RoundRobin(rr::RoundRobin),
    /// Smooth weighted round robin (nginx).
    SmoothWrr(wrr::SmoothWrr),
    /// Weighted round robin, gcd-stepped (IPVS `wrr`).
    IpvsWrr(wrr::IpvsWrr),
    /// Source hashing (IPVS `sh`), keyed by [`Request::src_hash`].
    SourceHash(sh::SourceHash),
    /// Destination hashing (IPVS `dh`), keyed by [`Request::dst_hash`].
    DestinationHash(sh::DestinationHash),
    /// Least connections (IPVS `lc`).
    LeastConn(lc::LeastConn),
    /// Weighted least connections (IPVS `wlc`).
    Wlc(lc::Wlc),
    /// Shortest expected delay (IPVS `sed`).
    Sed(sed::Sed),
    /// Never queue (IPVS `nq`).
    Nq(sed::Nq),
    /// Locality-based least connections (IPVS `lblc`), keyed by [`Request::dst_hash`].
    Lblc(lblc::Lblc),
    /// LBLC with replication (IPVS `lblcr`), keyed by [`Request::dst_hash`].
    Lblcr(lblc::Lblcr),
    /// Weighted failover (IPVS `fo`).
    Failover(fo::Failover),
    /// Weighted overflow (IPVS `ovf`).
    Overflow(fo::Overflow),
    /// Weighted power of two choices.
    P2c(p2c::P2c),
    /// Least expected response time from peak-EWMA.
    PeakEwma(ewma::PeakEwma),
    /// Least outstanding requests with active-request bias (Envoy).
    LeastRequest(least_request::LeastRequest),
}

/// The kind of a [`Policy`], without its state: what a configuration names.
///
/// ```
/// use lb_sched::policy::{Policy, PolicyKind};
/// let wlc = Policy::new(PolicyKind::Wlc);
/// assert_eq!(wlc.kind(), PolicyKind::Wlc);
/// assert_eq!(PolicyKind::ALL.iter().find(|k| k.name() == "wlc"), Some(&PolicyKind::Wlc));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PolicyKind {
    /// [`Policy::Random`].
    Random,
    /// [`Policy::RoundRobin`].
    RoundRobin,
    /// [`Policy::SmoothWrr`].
    SmoothWrr,
    /// [`Policy::IpvsWrr`].
    IpvsWrr,
    /// [`Policy::SourceHash`].
    SourceHash,
    /// [`Policy::DestinationHash`].
    DestinationHash,
    /// [`Policy::LeastConn`].
    LeastConn,
    /// [`Policy::Wlc`].
    Wlc,
    /// [`Policy::Sed`].
    Sed,
    /// [`Policy::Nq`].
    Nq,
    /// [`Policy::Lblc`].
    Lblc,
    /// [`Policy::Lblcr`].
    Lblcr,
    /// [`Policy::Failover`].
    Failover,
    /// [`Policy::Overflow`].
    Overflow,
    /// [`Policy::P2c`] (least connections of two weighted draws).
    P2c,
    /// [`Policy::PeakEwma`].
    PeakEwma,
    /// [`Policy::LeastRequest`].
    LeastRequest,
}

impl PolicyKind {
    /// Every kind, in declaration order.
    pub const ALL: [PolicyKind; 17] = [
        PolicyKind::Random,
        PolicyKind::RoundRobin,
        PolicyKind::SmoothWrr,
        PolicyKind::IpvsWrr,
        PolicyKind::SourceHash,
        PolicyKind::DestinationHash,
        PolicyKind::LeastConn,
        PolicyKind::Wlc,
        PolicyKind::Sed,
        PolicyKind::Nq,
        PolicyKind::Lblc,
        PolicyKind::Lblcr,
        PolicyKind::Failover,
        PolicyKind::Overflow,
        PolicyKind::P2c,
        PolicyKind::PeakEwma,
        PolicyKind::LeastRequest,
    ];

    /// The conventional short name (IPVS's where IPVS has the policy): `rr`, `wlc`, `p2c`, ….
    pub const fn name(self) -> &'static str {
        match self {
            PolicyKind::Random => "random",
            PolicyKind::RoundRobin => "rr",
            PolicyKind::SmoothWrr => "swrr",
            PolicyKind::IpvsWrr => "wrr",
            PolicyKind::SourceHash => "sh",
            PolicyKind::DestinationHash => "dh",
            PolicyKind::LeastConn => "lc",
            PolicyKind::Wlc => "wlc",
            PolicyKind::Sed => "sed",
            PolicyKind::Nq => "nq",
            PolicyKind::Lblc => "lblc",
            PolicyKind::Lblcr => "lblcr",
            PolicyKind::Failover => "fo",
            PolicyKind::Overflow => "ovf",
            PolicyKind::P2c => "p2c",
            PolicyKind::PeakEwma => "peak-ewma",
            PolicyKind::LeastRequest => "least-request",
        }
    }
}

impl Policy {
    /// A policy of `kind` with its default parameters.
    pub fn new(kind: PolicyKind) -> Self {
        match kind {
            PolicyKind::Random => Policy::Random(random::WeightedRandom::new()),
            PolicyKind::RoundRobin => Policy::RoundRobin(rr::RoundRobin::new()),
            PolicyKind::SmoothWrr => Policy::SmoothWrr(wrr::SmoothWrr::new()),
            PolicyKind::IpvsWrr => Policy::IpvsWrr(wrr::IpvsWrr::new()),
            PolicyKind::SourceHash => Policy::SourceHash(sh::SourceHash::default()),
            PolicyKind::DestinationHash => Policy::DestinationHash(sh::DestinationHash::default()),
            PolicyKind::LeastConn => Policy::LeastConn(lc::LeastConn::new()),
            PolicyKind::Wlc => Policy::Wlc(lc::Wlc::new()),
            PolicyKind::Sed => Policy::Sed(sed::Sed::new()),
            PolicyKind::Nq => Policy::Nq(sed::Nq::new()),
            PolicyKind::Lblc => Policy::Lblc(lblc::Lblc::default()),
            PolicyKind::Lblcr => Policy::Lblcr(lblc::Lblcr::default()),
            PolicyKind::Failover => Policy::Failover(fo::Failover::new()),
            PolicyKind::Overflow => Policy::Overflow(fo::Overflow::new()),
            PolicyKind::P2c => Policy::P2c(p2c::P2c::new(p2c::P2cLoad::Connections)),
            PolicyKind::PeakEwma => Policy::PeakEwma(ewma::PeakEwma::new()),
            PolicyKind::LeastRequest => {
                Policy::LeastRequest(least_request::LeastRequest::default())
            }
        }
    }

    /// The kind of this policy.
    pub fn kind(&self) -> PolicyKind {
        match self {
            Policy::Random(_) => PolicyKind::Random,
            Policy::RoundRobin(_) => PolicyKind::RoundRobin,
            Policy::SmoothWrr(_) => PolicyKind::SmoothWrr,
            Policy::IpvsWrr(_) => PolicyKind::IpvsWrr,
            Policy::SourceHash(_) => PolicyKind::SourceHash,
            Policy::DestinationHash(_) => PolicyKind::DestinationHash,
            Policy::LeastConn(_) => PolicyKind::LeastConn,
            Policy::Wlc(_) => PolicyKind::Wlc,
            Policy::Sed(_) => PolicyKind::Sed,
            Policy::Nq(_) => PolicyKind::Nq,
            Policy::Lblc(_) => PolicyKind::Lblc,
            Policy::Lblcr(_) => PolicyKind::Lblcr,
            Policy::Failover(_) => PolicyKind::Failover,
            Policy::Overflow(_) => PolicyKind::Overflow,
            Policy::P2c(_) => PolicyKind::P2c,
            Policy::PeakEwma(_) => PolicyKind::PeakEwma,
            Policy::LeastRequest(_) => PolicyKind::LeastRequest,
        }
    }

    /// Picks a backend for a new flow. Randomised policies draw from `rng`.
    #[inline]
    pub fn pick<R: RngCore + ?Sized>(&mut self, pool: &Pool, req: &Request, rng: &mut R) -> Pick {
        match self {
            Policy::Random(p) => p.pick(pool, req.now, rng),
            Policy::RoundRobin(p) => p.pick(pool),
            Policy::SmoothWrr(p) => p.pick(pool, req.now),
            Policy::IpvsWrr(p) => p.pick(pool),
            Policy::SourceHash(p) => p.pick(pool, req.src_hash),
            Policy::DestinationHash(p) => p.pick(pool, req.dst_hash),
            Policy::LeastConn(p) => p.pick(pool),
            Policy::Wlc(p) => p.pick(pool, req.now),
            Policy::Sed(p) => p.pick(pool, req.now),
            Policy::Nq(p) => p.pick(pool, req.now),
            Policy::Lblc(p) => p.pick(pool, req.dst_hash, req.now),
            Policy::Lblcr(p) => p.pick(pool, req.dst_hash, req.now),
            Policy::Failover(p) => p.pick(pool),
            Policy::Overflow(p) => p.pick(pool),
            Policy::P2c(p) => p.pick(pool, req.now, rng),
            Policy::PeakEwma(p) => p.pick(pool, req.now),
            Policy::LeastRequest(p) => p.pick(pool, req.now, rng),
        }
    }

    /// A short name, as IPVS and the other peers spell it (`"rr"`, `"wlc"`, `"p2c"`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Random(_) => "random",
            Policy::RoundRobin(_) => "rr",
            Policy::SmoothWrr(_) => "swrr",
            Policy::IpvsWrr(_) => "wrr",
            Policy::SourceHash(_) => "sh",
            Policy::DestinationHash(_) => "dh",
            Policy::LeastConn(_) => "lc",
            Policy::Wlc(_) => "wlc",
            Policy::Sed(_) => "sed",
            Policy::Nq(_) => "nq",
            Policy::Lblc(_) => "lblc",
            Policy::Lblcr(_) => "lblcr",
            Policy::Failover(_) => "fo",
            Policy::Overflow(_) => "ovf",
            Policy::P2c(_) => "p2c",
            Policy::PeakEwma(_) => "peak-ewma",
            Policy::LeastRequest(_) => "least-request",
        }
    }
}

/// A uniform index in `0..n` from one 64-bit draw (Lemire's multiply-shift; bias below 2^-32 for
/// any realistic `n`). `n` must be non-zero; returns 0 for `n == 0`.
#[inline]
pub(crate) fn uniform<R: RngCore + ?Sized>(rng: &mut R, n: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}

/// A uniform value in `0..=n`.
#[inline]
pub(crate) fn uniform_inclusive<R: RngCore + ?Sized>(rng: &mut R, n: u64) -> u64 {
    match n.checked_add(1) {
        Some(m) => uniform(rng, m),
        None => rng.next_u64(),
    }
}

/// Whether `a_cost / a_weight < b_cost / b_weight`, by cross-multiplication (no division), as
/// IPVS compares overheads. A zero weight counts as infinitely costly.
#[inline]
pub(crate) fn ratio_less(a_cost: u64, a_weight: u64, b_cost: u64, b_weight: u64) -> bool {
    u128::from(a_cost) * u128::from(b_weight) < u128::from(b_cost) * u128::from(a_weight)
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
