//! SYN cookies: the balancer's initial sequence number towards a client encodes what it must
//! remember of the SYN, so that it keeps no state until the client's ACK proves the address.
//!
//! Layout of the 32-bit ISN: `t[5] | mss[3] | mac[24]`.
//! - `t`: the time slice ([`SLICE_SECS`] seconds) modulo 32; a cookie validates in its own
//!   slice and the next one (64 to 128 s);
//! - `mss`: an index into [`MSS_TABLE`] (the largest entry not above the client's MSS);
//! - `mac`: 24 bits of keyed SipHash-1-3 over the 4-tuple, the client's ISN, the full slice
//!   number, the MSS index and the option bits.
//!
//! Window scale and SACK permitted do not fit in 32 bits beside a MAC strong enough: like
//! Linux, they ride in the low [`OPT_BITS`] bits of the balancer's timestamp (the client
//! echoes it in TSecr). They are covered by the MAC, so a client cannot forge them. A client
//! that sends no timestamps gets neither window scaling nor SACK (the SYN-ACK does not offer
//! them).

use lb_core::{FlowHasher, FlowKey, Instant};

/// Length of a time slice.
pub const SLICE_SECS: u64 = 64;

/// The MSS values a cookie can carry (index 0..8), ascending.
pub const MSS_TABLE: [u16; 8] = [536, 1200, 1220, 1300, 1380, 1400, 1440, 1460];

/// Bits of the balancer's TSval that carry the client's options.
pub const OPT_BITS: u32 = 5;

/// "No window scaling" in the 4-bit wscale field.
const NO_WSCALE: u8 = 0xf;

/// The client options a cookie remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CookieOpts {
    /// The client's window scale (`None`: not offered, or the client sends no timestamps).
    pub wscale: Option<u8>,
    /// SACK permitted (only with timestamps).
    pub sack: bool,
}

impl CookieOpts {
    /// The [`OPT_BITS`] bits for the timestamp: `sack[1] | wscale[4]` (`0xf`: no scaling).
    pub fn bits(self) -> u32 {
        let w = self.wscale.map_or(NO_WSCALE, |w| w.min(14));
        (u32::from(self.sack) << 4) | u32::from(w)
    }

    /// The options from [`CookieOpts::bits`] (the low bits of an echoed TSecr).
    pub fn from_bits(b: u32) -> CookieOpts {
        let w = (b & 0xf) as u8;
        CookieOpts {
            wscale: (w != NO_WSCALE).then_some(w.min(14)),
            sack: b & 0x10 != 0,
        }
    }
}

/// What a valid cookie gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieSyn {
    /// The client's ISN.
    pub client_isn: u32,
    /// The client's MSS, rounded down to [`MSS_TABLE`].
    pub mss: u16,
    /// The client's options ([`CookieOpts::default`] without timestamps).
    pub opts: CookieOpts,
}

/// Makes and checks cookies with a keyed hash (the same key on every balancer of a cluster
/// lets any of them accept the ACK).
#[derive(Debug, Clone)]
pub struct SynCookies {
    mac: FlowHasher,
}

fn slice(now: Instant) -> u64 {
    now.as_millis() / 1000 / SLICE_SECS
}

impl SynCookies {
    /// Cookies keyed by `mac` (derive a key of its own: `key.derive("syncookie")`).
    pub fn new(mac: FlowHasher) -> Self {
        SynCookies { mac }
    }

    fn mac(&self, key: &FlowKey, client_isn: u32, t: u64, mss_idx: u8, bits: u32) -> u32 {
        let mut b = [0u8; 16 + 16 + 2 + 2 + 4 + 8 + 1 + 4];
        let src = match key.src() {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(a) => a.octets(),
        };
        let dst = match key.dst() {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(a) => a.octets(),
        };
        b[..16].copy_from_slice(&src);
        b[16..32].copy_from_slice(&dst);
        b[32..34].copy_from_slice(&key.src_port().to_be_bytes());
        b[34..36].copy_from_slice(&key.dst_port().to_be_bytes());
        b[36..40].copy_from_slice(&client_isn.to_be_bytes());
        b[40..48].copy_from_slice(&t.to_be_bytes());
        b[48] = mss_idx;
        b[49..53].copy_from_slice(&bits.to_be_bytes());
        (self.mac.hash_bytes(&b) & 0x00ff_ffff) as u32
    }

    /// The ISN for a SYN of flow `key` (client → VIP) with sequence number `client_isn` and
    /// MSS option `mss` (536 when absent), and options `opts` (pass the default when the
    /// client sent no timestamps: they have nowhere to ride).
    pub fn make(
        &self,
        key: &FlowKey,
        client_isn: u32,
        mss: Option<u16>,
        opts: CookieOpts,
        now: Instant,
    ) -> u32 {
        let m = mss.unwrap_or(536);
        let idx = MSS_TABLE.iter().rposition(|&v| v <= m).unwrap_or(0) as u8;
        let t = slice(now);
        ((t as u32 & 0x1f) << 27)
            | (u32::from(idx) << 24)
            | self.mac(key, client_isn, t, idx, opts.bits())
    }

    /// Checks the ACK of flow `key` with sequence number `seq` and acknowledgement number
    /// `ack`; `tsecr` is its echoed timestamp, if it has one. `None` unless the cookie was
    /// made by this key for this flow and client ISN, in this slice or the previous one.
    pub fn check(
        &self,
        key: &FlowKey,
        seq: u32,
        ack: u32,
        tsecr: Option<u32>,
        now: Instant,
    ) -> Option<CookieSyn> {
        let cookie = ack.wrapping_sub(1);
        let client_isn = seq.wrapping_sub(1);
        let t5 = u64::from(cookie >> 27);
        let idx = ((cookie >> 24) & 7) as u8;
        let bits = tsecr.map_or(CookieOpts::default().bits(), |e| e & ((1 << OPT_BITS) - 1));
        let now_t = slice(now);
        for back in 0..2u64 {
            let Some(t) = now_t.checked_sub(back) else {
                break;
            };
            if t & 0x1f != t5 {
                continue;
            }
            if self.mac(key, client_isn, t, idx, bits) == cookie & 0x00ff_ffff {
                return Some(CookieSyn {
                    client_isn,
                    mss: MSS_TABLE[usize::from(idx)],
                    opts: CookieOpts::from_bits(bits),
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::{HashKey, IpProto};
    use proptest::prelude::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey::new(
            "10.0.0.1".parse().unwrap(),
            sport,
            "10.0.0.9".parse().unwrap(),
            80,
            IpProto::Tcp,
        )
        .unwrap()
    }

    fn cookies() -> SynCookies {
        SynCookies::new(FlowHasher::new(
            HashKey::from_passphrase("test").derive("syncookie"),
        ))
    }

    #[test]
    fn valid_in_its_window_only() {
        let c = cookies();
        let t0 = Instant::from_secs(1_000_000);
        let o = CookieOpts {
            wscale: Some(7),
            sack: true,
        };
        let isn = c.make(&key(5000), 41, Some(1460), o, t0);
        let ts = 0xabcd_0000 | o.bits();
        let ok = c
            .check(&key(5000), 42, isn.wrapping_add(1), Some(ts), t0)
            .unwrap();
        assert_eq!(
            ok,
            CookieSyn {
                client_isn: 41,
                mss: 1460,
                opts: o
            }
        );
        // Next slice: still valid; two slices later: not.
        let t1 = Instant::from_secs(1_000_000 + SLICE_SECS);
        assert!(c
            .check(&key(5000), 42, isn.wrapping_add(1), Some(ts), t1)
            .is_some());
        let t2 = Instant::from_secs(1_000_000 + 2 * SLICE_SECS + 63);
        assert!(c
            .check(&key(5000), 42, isn.wrapping_add(1), Some(ts), t2)
            .is_none());
        // Another flow, another ISN, forged options: not.
        assert!(c
            .check(&key(5001), 42, isn.wrapping_add(1), Some(ts), t0)
            .is_none());
        assert!(c
            .check(&key(5000), 43, isn.wrapping_add(1), Some(ts), t0)
            .is_none());
        assert!(c
            .check(&key(5000), 42, isn.wrapping_add(1), Some(ts ^ 1), t0)
            .is_none());
        // Another key: not.
        let other = SynCookies::new(FlowHasher::new(HashKey::from_passphrase("x")));
        assert!(other
            .check(&key(5000), 42, isn.wrapping_add(1), Some(ts), t0)
            .is_none());
    }

    #[test]
    fn mss_rounds_down_and_no_timestamps_means_no_options() {
        let c = cookies();
        let t0 = Instant::from_secs(77);
        let isn = c.make(&key(1), 0, Some(1450), CookieOpts::default(), t0);
        let ok = c.check(&key(1), 1, isn.wrapping_add(1), None, t0).unwrap();
        assert_eq!(ok.mss, 1440);
        assert_eq!(ok.opts, CookieOpts::default());
        let isn = c.make(&key(1), 0, None, CookieOpts::default(), t0);
        assert_eq!(
            c.check(&key(1), 1, isn.wrapping_add(1), None, t0)
                .unwrap()
                .mss,
            536
        );
        let isn = c.make(&key(1), 0, Some(100), CookieOpts::default(), t0);
        assert_eq!(
            c.check(&key(1), 1, isn.wrapping_add(1), None, t0)
                .unwrap()
                .mss,
            536
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A cookie validates for its own flow and ISN within two slices, and a random ACK
        /// number (a blind attacker's guess) almost never does.
        #[test]
        fn only_the_right_flow_and_window(sport: u16, isn: u32, mss: u16, secs in 0u64..1u64 << 40, later in 0u64..128, guess: u32, w in proptest::option::of(0u8..15), sack: bool) {
            let c = cookies();
            let o = CookieOpts { wscale: w, sack };
            let t0 = Instant::from_secs(secs);
            let ck = c.make(&key(sport), isn, Some(mss), o, t0);
            let ts = Some(o.bits());
            let t = Instant::from_secs(secs + later);
            let same_or_next = slice(t) - slice(t0) <= 1;
            let got = c.check(&key(sport), isn.wrapping_add(1), ck.wrapping_add(1), ts, t);
            prop_assert_eq!(got.is_some(), same_or_next);
            if let Some(g) = got {
                prop_assert_eq!(g.opts, o);
                prop_assert!(g.mss <= mss.max(536));
            }
            prop_assert!(c.check(&key(sport.wrapping_add(1)), isn.wrapping_add(1), ck.wrapping_add(1), ts, t0).is_none());
            if guess != ck {
                // 2^-24 per guess: a hit here would be a 1-in-16-million fluke per case.
                prop_assert!(c.check(&key(sport), isn.wrapping_add(1), guess.wrapping_add(1), ts, t0).is_none());
            }
        }
    }
}
