//! The ICMP errors the data path generates (tunnel mode's "fragmentation needed" / "packet too
//! big"): only to unicast sources, and rate-limited.
//!
//! RFC 1122 §3.2.2: "An ICMP error message MUST NOT be sent as the result of receiving: […] a
//! datagram destined to an IP broadcast or IP multicast address, […] a datagram whose source
//! address does not define a single host -- e.g., a zero address, a loopback address, a
//! broadcast address, a multicast address, or a Class E address." RFC 4443 §2.4 (e) says the
//! same for IPv6 (unspecified or multicast source; multicast destination, except for "packet
//! too big", which path MTU discovery to multicast groups needs).
//!
//! RFC 4443 §2.4 (f): "an IPv6 node MUST limit the rate of ICMPv6 error messages it originates
//! […] A recommended method for implementing the rate-limiting function is a token bucket";
//! RFC 1812 §4.3.2.8 asks the same of IPv4 routers.
//!
//! Two token buckets must both hold a token for an error to go out:
//! - a **global** one ([`IcmpLimits::global`], default 1 000/s, burst 50: Linux's
//!   `icmp_msgs_per_sec` / `icmp_msgs_burst`), one for both families: it bounds what the
//!   balancer spends (CPU, the clients' link) on errors whatever their family, which is what a
//!   flood of oversized packets attacks;
//! - one **per destination** ([`IcmpLimits::peer`], default 100/s, burst 20) in a fixed table
//!   of [`ICMP_PEER_SLOTS`] buckets indexed by a keyed hash of the address (two addresses that
//!   share a slot share its bucket: stricter, never looser). It keeps one source (or one
//!   spoofed victim) from taking the whole global budget, so that the other clients' path MTU
//!   discovery still gets its errors. Linux keeps a per-peer bucket in its inet-peer cache (an
//!   allocation per new peer); the fixed table allocates once at construction and costs one
//!   hash per error.
//!
//! The buckets are per data path: a process with several data-path threads sends up to that
//! many times the limits.

use std::net::IpAddr;

use lb_core::{FlowHasher, HashKey, Instant};

/// Default global rate (errors per second), Linux's `net.ipv4.icmp_msgs_per_sec`.
pub const ICMP_RATE: u32 = 1000;
/// Default global burst, Linux's `net.ipv4.icmp_msgs_burst`.
pub const ICMP_BURST: u32 = 50;
/// Default rate per destination address (errors per second).
pub const ICMP_PEER_RATE: u32 = 100;
/// Default burst per destination address.
pub const ICMP_PEER_BURST: u32 = 20;
/// Largest accepted rate or burst.
pub const MAX_ICMP_RATE: u32 = 10_000_000;
/// Per-destination buckets per data path (16 bytes each).
pub const ICMP_PEER_SLOTS: usize = 1024;

const NANOS: u64 = 1_000_000_000;

/// One token bucket's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpLimit {
    /// Tokens added per second.
    pub rate: u32,
    /// Tokens the bucket holds at most (and starts with).
    pub burst: u32,
}

/// The limits on generated ICMP errors (module docs); both `0`/`0` turns errors off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpLimits {
    /// All errors of a data path.
    pub global: IcmpLimit,
    /// Errors to one destination address (a hashed slot).
    pub peer: IcmpLimit,
}

impl Default for IcmpLimits {
    fn default() -> Self {
        IcmpLimits {
            global: IcmpLimit {
                rate: ICMP_RATE,
                burst: ICMP_BURST,
            },
            peer: IcmpLimit {
                rate: ICMP_PEER_RATE,
                burst: ICMP_PEER_BURST,
            },
        }
    }
}

/// A token bucket with explicit time: `credit` in billionths of a token, so that a refill
/// over `dt` nanoseconds adds exactly `dt × rate` and nothing is lost to rounding. Over any
/// interval `[t0, t1]` it allows at most `burst + rate × (t1 − t0)` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    credit: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(limit: IcmpLimit, now: Instant) -> Self {
        TokenBucket {
            credit: u64::from(limit.burst) * NANOS,
            last: now,
        }
    }

    /// Adds what accrued since the last call (time that goes backwards adds nothing).
    fn refill(&mut self, limit: IcmpLimit, now: Instant) {
        let dt = now.as_nanos().saturating_sub(self.last.as_nanos());
        let cap = u64::from(limit.burst) * NANOS;
        self.credit = self
            .credit
            .saturating_add(dt.saturating_mul(u64::from(limit.rate)))
            .min(cap);
        self.last = self.last.max(now);
    }

    /// Whether a token is there (after a refill).
    fn ready(&self) -> bool {
        self.credit >= NANOS
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&mut self, limit: IcmpLimit, now: Instant) -> bool {
        self.refill(limit, now);
        if self.ready() {
            self.credit -= NANOS;
            true
        } else {
            false
        }
    }

    /// Whole tokens held (as of the last call).
    pub fn tokens(&self) -> u64 {
        self.credit / NANOS
    }
}

/// Why no error goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The packet's source is not one host, or its destination was a group (RFC 1122 §3.2.2,
    /// RFC 4443 §2.4 (e)).
    NotUnicast,
    /// A bucket is empty.
    RateLimited,
}

/// The per-destination and global buckets, and the scratch space the errors are built in.
#[derive(Debug)]
pub(crate) struct IcmpOut {
    /// Where [`lb_packet::icmp::error_reply`] writes.
    pub(crate) scratch: Box<[u8]>,
    limits: IcmpLimits,
    global: TokenBucket,
    peers: Box<[TokenBucket]>,
    hasher: FlowHasher,
}

impl IcmpOut {
    /// Full buckets (the peer slots fill on first use), with `key` keying the slot hash.
    pub(crate) fn new(limits: IcmpLimits, key: HashKey) -> Self {
        IcmpOut {
            scratch: vec![0u8; lb_packet::icmp::ICMPV6_MAX].into_boxed_slice(),
            limits,
            global: TokenBucket::full(limits.global, Instant::ZERO),
            peers: vec![TokenBucket::full(limits.peer, Instant::ZERO); ICMP_PEER_SLOTS]
                .into_boxed_slice(),
            hasher: FlowHasher::new(key),
        }
    }

    /// New limits (a table swap): buckets keep their credit, cut to the new bursts.
    pub(crate) fn set_limits(&mut self, limits: IcmpLimits) {
        self.limits = limits;
        let cap = u64::from(limits.global.burst) * NANOS;
        self.global.credit = self.global.credit.min(cap);
        let cap = u64::from(limits.peer.burst) * NANOS;
        for b in self.peers.iter_mut() {
            b.credit = b.credit.min(cap);
        }
    }

    /// Whether an error about a packet from `src` to `dst` may go to `src` at `now`; returns
    /// the peer slot to [`IcmpOut::spend`] once the error is built (nothing is spent on a
    /// packet that gets no error after all).
    pub(crate) fn check(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        too_big: bool,
        now: Instant,
    ) -> Result<usize, Refused> {
        if !unicast_source(src) || !unicast_destination(dst, too_big) {
            return Err(Refused::NotUnicast);
        }
        let h = match src {
            IpAddr::V4(a) => self.hasher.hash_bytes(&a.octets()),
            IpAddr::V6(a) => self.hasher.hash_bytes(&a.octets()),
        };
        let slot = (h as usize) & (ICMP_PEER_SLOTS - 1);
        self.global.refill(self.limits.global, now);
        let peer_ready = match self.peers.get_mut(slot) {
            Some(b) => {
                b.refill(self.limits.peer, now);
                b.ready()
            }
            None => false,
        };
        if self.global.ready() && peer_ready {
            Ok(slot)
        } else {
            Err(Refused::RateLimited)
        }
    }

    /// Takes the tokens [`IcmpOut::check`] found.
    pub(crate) fn spend(&mut self, slot: usize) {
        self.global.credit = self.global.credit.saturating_sub(NANOS);
        if let Some(b) = self.peers.get_mut(slot) {
            b.credit = b.credit.saturating_sub(NANOS);
        }
    }
}

/// Whether `a`, the source of a packet, names one host: not unspecified / "this network"
/// (0/8), loopback, multicast, broadcast or class E (240/4); for IPv6 not `::`, `::1` or
/// multicast.
pub fn unicast_source(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => {
            let o = v.octets()[0];
            !(o == 0 || v.is_loopback() || v.is_multicast() || o >= 240)
        }
        IpAddr::V6(v) => !(v.is_unspecified() || v.is_loopback() || v.is_multicast()),
    }
}

/// Whether `a`, the destination of a packet, allows an ICMP error about it: not multicast or
/// broadcast (IPv4: 224/4 and 240/4, which holds 255.255.255.255); an IPv6 multicast
/// destination allows "packet too big" (`too_big`; RFC 4443 §2.4 (e.2)).
pub fn unicast_destination(a: IpAddr, too_big: bool) -> bool {
    match a {
        IpAddr::V4(v) => v.octets()[0] < 224,
        IpAddr::V6(v) => too_big || !v.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim(rate: u32, burst: u32) -> IcmpLimit {
        IcmpLimit { rate, burst }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let l = lim(10, 3);
        let t0 = Instant::from_secs(5);
        let mut b = TokenBucket::full(l, t0);
        let taken = (0..10).filter(|_| b.take(l, t0)).count();
        assert_eq!(taken, 3, "the burst, then nothing at the same instant");
        // 10/s: one token per 100 ms; 99 ms is not enough.
        assert!(!b.take(l, Instant::from_millis(5_099)));
        assert!(b.take(l, Instant::from_millis(5_100)));
        assert!(!b.take(l, Instant::from_millis(5_100)));
        // 250 ms later: 2.5 tokens accrued, 2 usable, half a token kept.
        let t = Instant::from_millis(5_350);
        assert_eq!((0..5).filter(|_| b.take(l, t)).count(), 2);
        assert!(
            b.take(l, Instant::from_millis(5_400)),
            "the kept half + 50 ms"
        );
        // An hour idle refills to the burst, not beyond.
        b.take(l, Instant::from_secs(3_600));
        assert_eq!(b.tokens(), 2);
        // Time going backwards adds nothing and does not panic.
        let mut c = TokenBucket::full(l, Instant::from_secs(10));
        for _ in 0..3 {
            c.take(l, Instant::from_secs(10));
        }
        assert!(!c.take(l, Instant::from_secs(1)));
        assert!(!c.take(l, Instant::from_millis(10_050)));
    }

    #[test]
    fn zero_limits_send_nothing() {
        let l = lim(0, 0);
        let mut b = TokenBucket::full(l, Instant::ZERO);
        assert!(!b.take(l, Instant::from_secs(1_000)));
        let mut o = IcmpOut::new(
            IcmpLimits { global: l, peer: l },
            HashKey::from_bytes([1; 16]),
        );
        assert_eq!(
            o.check(ip("192.0.2.1"), ip("203.0.113.10"), true, Instant::ZERO),
            Err(Refused::RateLimited)
        );
    }

    #[test]
    fn non_unicast_sources_and_group_destinations_are_never_answered() {
        let mut o = IcmpOut::new(IcmpLimits::default(), HashKey::from_bytes([2; 16]));
        let vip = ip("203.0.113.10");
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert_eq!(
                o.check(ip(s), vip, true, Instant::ZERO),
                Err(Refused::NotUnicast),
                "{s}"
            );
        }
        for d in ["224.0.0.1", "255.255.255.255", "240.1.1.1"] {
            assert_eq!(
                o.check(ip("192.0.2.1"), ip(d), true, Instant::ZERO),
                Err(Refused::NotUnicast),
                "{d}"
            );
        }
        let vip6 = ip("2001:db8:10::10");
        for s in ["::", "::1", "ff02::1", "ff0e::1:2"] {
            assert_eq!(
                o.check(ip(s), vip6, true, Instant::ZERO),
                Err(Refused::NotUnicast),
                "{s}"
            );
        }
        let c6 = ip("2001:db8:c::2");
        assert_eq!(
            o.check(c6, ip("ff0e::1"), false, Instant::ZERO),
            Err(Refused::NotUnicast)
        );
        // RFC 4443 §2.4 (e.2): "packet too big" may answer a multicast destination.
        assert!(o.check(c6, ip("ff0e::1"), true, Instant::ZERO).is_ok());
        assert!(o.check(ip("192.0.2.1"), vip, true, Instant::ZERO).is_ok());
        assert!(o.check(ip("10.0.0.1"), vip, true, Instant::ZERO).is_ok());
    }

    #[test]
    fn one_source_cannot_take_the_global_budget() {
        let limits = IcmpLimits {
            global: lim(1000, 50),
            peer: lim(100, 10),
        };
        let mut o = IcmpOut::new(limits, HashKey::from_bytes([3; 16]));
        let vip = ip("203.0.113.10");
        let t = Instant::from_secs(1);
        let sent = |o: &mut IcmpOut, src: &str| match o.check(ip(src), vip, true, t) {
            Ok(slot) => {
                o.spend(slot);
                true
            }
            Err(_) => false,
        };
        let a = (0..100).filter(|_| sent(&mut o, "192.0.2.66")).count();
        assert_eq!(a, 10, "the peer burst");
        // Another client still gets its errors (unless its slot is the attacker's).
        let others = (1..=40)
            .filter(|i| sent(&mut o, &format!("198.51.100.{i}")))
            .count();
        assert!(others >= 38, "{others}");
        // The global burst caps the sum.
        let rest = (1..=200)
            .filter(|i| sent(&mut o, &format!("10.0.{}.{}", i / 250, i % 250)))
            .count();
        assert_eq!(a + others + rest, 50);
    }

    #[test]
    fn new_limits_cut_the_credit() {
        let mut o = IcmpOut::new(IcmpLimits::default(), HashKey::from_bytes([4; 16]));
        o.set_limits(IcmpLimits {
            global: lim(1, 2),
            peer: lim(1, 2),
        });
        let t = Instant::ZERO;
        let mut n = 0;
        for _ in 0..10 {
            if let Ok(slot) = o.check(ip("192.0.2.1"), ip("203.0.113.10"), false, t) {
                o.spend(slot);
                n += 1;
            }
        }
        assert_eq!(n, 2);
    }

    proptest! {
        /// Over any run of non-decreasing instants, a bucket allows at most
        /// `burst + rate × elapsed` tokens (and, with time enough, at least the burst).
        #[test]
        fn never_more_than_burst_plus_rate_times_elapsed(
            rate in 0u32..5_000,
            burst in 0u32..100,
            steps in proptest::collection::vec((0u64..20_000_000, 1usize..20), 1..200),
        ) {
            let l = lim(rate, burst);
            let t0 = Instant::from_secs(7);
            let mut b = TokenBucket::full(l, t0);
            let mut now = t0;
            let mut allowed: u64 = 0;
            for (dt, tries) in steps {
                now = Instant::from_nanos(now.as_nanos() + dt);
                for _ in 0..tries {
                    if b.take(l, now) {
                        allowed += 1;
                    }
                }
                let elapsed = now.as_nanos() - t0.as_nanos();
                let bound = u64::from(burst) + u64::from(rate) * elapsed / NANOS;
                prop_assert!(allowed <= bound, "{} > {}", allowed, bound);
            }
            prop_assert!(burst == 0 || allowed >= 1);
        }
    }
}

#[cfg(test)]
#[path = "icmp_limit_tests.rs"]
mod dp_tests;
