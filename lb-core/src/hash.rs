//! Keyed flow hashing.
//!
//! Every table the balancer keeps (Maglev slots, conntrack buckets, persistence templates) is
//! indexed by a hash of attacker-chosen bytes: a client picks its own source address and port. An
//! unkeyed hash lets an attacker aim many flows at one backend or one bucket. [`FlowHasher`] is
//! keyed with a 128-bit secret ([`HashKey`]) and, by default, uses SipHash-1-3, a PRF designed for
//! exactly this. Given the same key, every balancer of a cluster computes the same hashes, so they
//! agree on which backend owns a flow (Maglev's property).
//!
//! The hash function is a type parameter ([`KeyedHash`]): [`FastHash`], a keyed multiply-mix in
//! the style of wyhash/foldhash, is several times faster but offers no flood resistance against an
//! attacker who can observe its outputs; use it only where that is acceptable.

use core::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher24};

use crate::flow::Packed;
use crate::FlowKey;

/// A 128-bit secret key for [`FlowHasher`].
///
/// All balancers of a cluster must use the same key to agree on flow placement. Obtain it from
/// random bytes ([`HashKey::from_bytes`], [`HashKey::from_rng`]) or from a shared passphrase
/// ([`HashKey::from_passphrase`]). `Debug` does not print the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey([u8; 16]);

/// The fixed, public key under which [`HashKey::from_passphrase`] and [`HashKey::derive`] hash.
const KDF_KEY: [u8; 16] = *b"lb-core/kdf/v1\0\0";

impl HashKey {
    /// A key from 16 secret bytes.
    #[inline]
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        HashKey(bytes)
    }

    /// The key's bytes.
    #[inline]
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// A fresh random key from a caller-supplied RNG.
    #[cfg(feature = "rand")]
    pub fn from_rng<R: rand::RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        HashKey(b)
    }

    /// Derives a key from a passphrase shared by every balancer of a cluster.
    ///
    /// The derivation is `SipHash-2-4-128(k, "passphrase:" ‖ passphrase)` with the public key
    /// `k = "lb-core/kdf/v1\0\0"` (16 ASCII bytes), the 128-bit output taken in little-endian
    /// order: any implementation can reproduce it. It is not a password-stretching function: the
    /// passphrase must itself be a high-entropy secret (for example 20+ random characters), as the
    /// key of a keepalived or VRRP deployment would be.
    ///
    /// ```
    /// use lb_core::HashKey;
    /// let a = HashKey::from_passphrase("correct horse battery staple 42");
    /// assert_eq!(a, HashKey::from_passphrase("correct horse battery staple 42"));
    /// assert_ne!(a, HashKey::from_passphrase("correct horse battery staple 43"));
    /// ```
    pub fn from_passphrase(passphrase: &str) -> Self {
        Self::kdf(b"passphrase:", passphrase.as_bytes())
    }

    /// Derives an independent sub-key for one purpose (`"maglev"`, `"conntrack"`, `"sync-mac"` …)
    /// so that one cluster secret can key every table without reusing a key across uses.
    /// Computed as `SipHash-2-4-128(k, "derive:" ‖ self ‖ label)` with the same public `k` as
    /// [`HashKey::from_passphrase`].
    pub fn derive(&self, label: &str) -> Self {
        let mut h = SipHasher24::new_with_key(&KDF_KEY);
        h.write(b"derive:");
        h.write(&self.0);
        h.write(label.as_bytes());
        HashKey(h.finish128().as_u128().to_le_bytes())
    }

    fn kdf(domain: &[u8], input: &[u8]) -> Self {
        let mut h = SipHasher24::new_with_key(&KDF_KEY);
        h.write(domain);
        h.write(input);
        HashKey(h.finish128().as_u128().to_le_bytes())
    }

    /// The key as two little-endian `u64` halves.
    #[inline]
    pub fn halves(&self) -> (u64, u64) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&self.0[..8]);
        b.copy_from_slice(&self.0[8..]);
        (u64::from_le_bytes(a), u64::from_le_bytes(b))
    }
}

impl core::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// A keyed 64-bit hash function over byte strings: the type parameter of [`FlowHasher`].
///
/// Implementations must be deterministic for a given key (every balancer computes the same hash)
/// and must give different outputs for byte strings of different lengths with overwhelming
/// probability (the IPv4 and IPv6 packed keys differ only in length).
pub trait KeyedHash: Clone + Send + Sync + 'static {
    /// A hasher keyed with `key`.
    fn with_key(key: &HashKey) -> Self;
    /// The hash of `bytes`.
    fn hash_bytes(&self, bytes: &[u8]) -> u64;

    /// The hash of a packed 13-byte IPv4 flow key given as two little-endian words: `w0` holds
    /// bytes 0..8 and `w1` bytes 8..13 (its top three bytes zero). Must equal `hash_bytes` of
    /// those 13 bytes; implementations override it to skip the byte round trip.
    #[inline(always)]
    fn hash_13(&self, w0: u64, w1: u64) -> u64 {
        let mut b = [0u8; 13];
        b[..8].copy_from_slice(&w0.to_le_bytes());
        b[8..].copy_from_slice(&w1.to_le_bytes()[..5]);
        self.hash_bytes(&b)
    }
}

/// SipHash-1-3 keyed with a [`HashKey`]: the default, flood-resistant choice.
#[derive(Clone, Debug)]
pub struct SipHash13 {
    /// The initial state `v0..v3` for the key, computed once.
    v: [u64; 4],
}

impl KeyedHash for SipHash13 {
    #[inline]
    fn with_key(key: &HashKey) -> Self {
        let (k0, k1) = key.halves();
        SipHash13 {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
        }
    }

    /// SipHash-1-3 (Aumasson & Bernstein; one compression round, three finalization rounds),
    /// written over whole little-endian words so that, for the fixed-length flow keys, the
    /// compiler unrolls it completely. Output-identical to the `siphasher` crate's
    /// `SipHasher13::new_with_keys(k0, k1)` + `write` + `finish` (tested for every length 0..=256).
    #[inline(always)]
    fn hash_bytes(&self, bytes: &[u8]) -> u64 {
        let mut v = self.initial_state();
        let len = bytes.len();
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let m = u64::from_le_bytes(w);
            v[3] ^= m;
            sip_round(&mut v);
            v[0] ^= m;
        }
        // The last block: the 0..=7 remaining bytes, little-endian, with len mod 256 in the top byte.
        let rest = chunks.remainder();
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        sip_finish(v, u64::from_le_bytes(w) | ((len as u64) << 56))
    }

    #[inline(always)]
    fn hash_13(&self, w0: u64, w1: u64) -> u64 {
        let mut v = self.initial_state();
        v[3] ^= w0;
        sip_round(&mut v);
        v[0] ^= w0;
        sip_finish(v, w1 | (13u64 << 56))
    }
}

impl SipHash13 {
    /// The SipHash initial state for this key.
    #[inline(always)]
    fn initial_state(&self) -> [u64; 4] {
        self.v
    }
}

/// Compresses the last block `m` (which carries the length in its top byte), then the three
/// finalization rounds of SipHash-1-3.
#[inline(always)]
fn sip_finish(mut v: [u64; 4], m: u64) -> u64 {
    v[3] ^= m;
    sip_round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// A fast keyed multiply-mix hash (wyhash-style folded 64×64→128 multiplies).
///
/// Roughly 5× faster than SipHash-1-3 on a 13-byte IPv4 key and well distributed, but not a PRF:
/// an attacker who can observe outputs may find colliding inputs. Use it where flows are trusted
/// or tables are protected otherwise.
#[derive(Clone, Debug)]
pub struct FastHash {
    k0: u64,
    k1: u64,
}

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;

#[inline(always)]
fn folded_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline(always)]
fn read8(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn read4(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u64::from(u32::from_le_bytes(w))
}

impl KeyedHash for FastHash {
    #[inline]
    fn with_key(key: &HashKey) -> Self {
        let (k0, k1) = key.halves();
        FastHash { k0, k1 }
    }

    #[inline(always)]
    fn hash_bytes(&self, bytes: &[u8]) -> u64 {
        let len = bytes.len();
        let mut seed = self.k0 ^ P0;
        if len <= 16 {
            let (a, b) = if len >= 8 {
                (read8(bytes, 0), read8(bytes, len - 8))
            } else if len >= 4 {
                (read4(bytes, 0), read4(bytes, len - 4))
            } else if len > 0 {
                let x = (u64::from(bytes[0]) << 16)
                    | (u64::from(bytes[len / 2]) << 8)
                    | u64::from(bytes[len - 1]);
                (x, 0)
            } else {
                (0, 0)
            };
            // Short inputs (every IPv4 flow key): one folded multiply, the length mixed into
            // one operand because the two reads may overlap.
            return folded_mul(a ^ P1 ^ self.k1, b ^ seed ^ (len as u64).wrapping_mul(P2));
        }
        let mut i = 0;
        while i + 16 < len {
            seed = folded_mul(read8(bytes, i) ^ P1, read8(bytes, i + 8) ^ seed);
            i += 16;
        }
        let (a, b) = (read8(bytes, len - 16), read8(bytes, len - 8));
        let m = folded_mul(a ^ P1 ^ self.k1, b ^ seed);
        folded_mul(m ^ P2, (len as u64) ^ P1 ^ self.k1)
    }

    #[inline(always)]
    fn hash_13(&self, w0: u64, w1: u64) -> u64 {
        // As `hash_bytes` for 13 bytes: a = bytes 0..8, b = bytes 5..13.
        let b = (w0 >> 40) | (w1 << 24);
        folded_mul(w0 ^ P1 ^ self.k1, b ^ self.k0 ^ P0 ^ 13u64.wrapping_mul(P2))
    }
}

/// Hashes flows, 3-tuples and affinity keys with a keyed hash `H` (SipHash-1-3 by default).
///
/// ```
/// use lb_core::{FastHash, FlowHasher, FlowKey, HashKey, IpProto};
/// use std::net::Ipv4Addr;
///
/// let key = HashKey::from_passphrase("cluster secret: 9f1c3e7a55d0b2");
/// let hasher = FlowHasher::new(key); // SipHash-1-3
/// let flow = FlowKey::v4(Ipv4Addr::new(192, 0, 2, 7), 51000, Ipv4Addr::new(203, 0, 113, 10), 443, IpProto::Tcp);
///
/// // Every balancer with the same key agrees.
/// assert_eq!(hasher.hash_flow(&flow), FlowHasher::new(key).hash_flow(&flow));
/// // Both directions of a flow meet in the symmetric hash.
/// assert_eq!(hasher.hash_symmetric(&flow), hasher.hash_symmetric(&flow.reversed()));
/// // A faster, non-flood-resistant hash is a type parameter away.
/// let fast = FlowHasher::<FastHash>::with_key(key);
/// let _ = fast.hash_flow(&flow);
/// // Affinity keys are byte strings, e.g. a SIP Call-ID.
/// let _ = hasher.hash_bytes(b"a84b4c76e66710@pc33.example.com");
/// ```
#[derive(Clone, Debug)]
pub struct FlowHasher<H: KeyedHash = SipHash13> {
    h: H,
}

impl FlowHasher<SipHash13> {
    /// A SipHash-1-3 hasher keyed with `key` (the default). For another hash function use
    /// [`FlowHasher::with_key`], e.g. `FlowHasher::<FastHash>::with_key(key)`.
    #[inline]
    pub fn new(key: HashKey) -> Self {
        Self::with_key(key)
    }
}

impl<H: KeyedHash> FlowHasher<H> {
    /// A hasher using hash function `H`, keyed with `key`.
    #[inline]
    pub fn with_key(key: HashKey) -> Self {
        FlowHasher {
            h: H::with_key(&key),
        }
    }

    /// The hash of a flow's 5-tuple. Direction matters: see [`FlowHasher::hash_symmetric`].
    #[inline]
    pub fn hash_flow(&self, key: &FlowKey) -> u64 {
        self.hash_packed(key.packed(false))
    }

    #[inline(always)]
    fn hash_packed(&self, p: Packed) -> u64 {
        // One call per family so the byte length is a constant the hash can fold.
        match p {
            Packed::V4 { w0, w1 } => self.h.hash_13(w0, w1),
            Packed::V6(b) => self.h.hash_bytes(&b),
        }
    }

    /// The hash of a flow's 3-tuple (addresses and protocol, ports ignored): what non-first
    /// fragments, which carry no ports, can be placed by. Equal to `hash_flow` of the key with
    /// both ports zero.
    #[inline]
    pub fn hash_3tuple(&self, key: &FlowKey) -> u64 {
        self.hash_flow(&key.without_ports())
    }

    /// A direction-independent hash: `hash_symmetric(k) == hash_symmetric(k.reversed())`.
    #[inline]
    pub fn hash_symmetric(&self, key: &FlowKey) -> u64 {
        self.hash_packed(key.packed(true))
    }

    /// The hash of arbitrary bytes, such as a layer-5 affinity key (a SIP Call-ID).
    #[inline]
    pub fn hash_bytes(&self, bytes: &[u8]) -> u64 {
        self.h.hash_bytes(bytes)
    }

    /// The underlying keyed hash function.
    #[inline]
    pub fn hash_fn(&self) -> &H {
        &self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IpProto;
    use proptest::prelude::*;
    use siphasher::sip::SipHasher13;
    use std::collections::HashSet;

    const KEY: HashKey = HashKey::from_bytes(*b"0123456789abcdef");

    fn k4(s: [u8; 4], sp: u16, d: [u8; 4], dp: u16) -> FlowKey {
        FlowKey::v4(s.into(), sp, d.into(), dp, IpProto::Tcp)
    }

    #[test]
    fn siphash13_matches_reference_construction() {
        // The flow hash is SipHash-1-3 over the packed 13-byte key, keyed by the two halves.
        let k = k4([192, 0, 2, 1], 1234, [203, 0, 113, 10], 80);
        let mut r = SipHasher13::new_with_key(b"0123456789abcdef");
        r.write(&[192, 0, 2, 1, 203, 0, 113, 10, 0x04, 0xd2, 0, 80, 6]);
        assert_eq!(
            FlowHasher::<SipHash13>::with_key(KEY).hash_flow(&k),
            r.finish()
        );
    }

    #[test]
    fn siphash13_equals_siphasher_crate_for_every_length() {
        let h = SipHash13::with_key(&KEY);
        let buf: Vec<u8> = (0..=255u8)
            .map(|b| b.wrapping_mul(31).wrapping_add(7))
            .collect();
        for n in 0..=256 {
            let mut r = SipHasher13::new_with_key(b"0123456789abcdef");
            r.write(&buf[..n]);
            assert_eq!(h.hash_bytes(&buf[..n]), r.finish(), "length {n}");
        }
    }

    #[test]
    fn hash_13_equals_hash_bytes() {
        let bytes: [u8; 13] = [192, 0, 2, 1, 203, 0, 113, 10, 0x04, 0xd2, 0, 80, 6];
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[..8]);
        let w0 = u64::from_le_bytes(w);
        let mut w = [0u8; 8];
        w[..5].copy_from_slice(&bytes[8..]);
        let w1 = u64::from_le_bytes(w);
        let sip = SipHash13::with_key(&KEY);
        let fast = FastHash::with_key(&KEY);
        assert_eq!(sip.hash_13(w0, w1), sip.hash_bytes(&bytes));
        assert_eq!(fast.hash_13(w0, w1), fast.hash_bytes(&bytes));
        let k = k4([192, 0, 2, 1], 1234, [203, 0, 113, 10], 80);
        assert_eq!(
            FlowHasher::<FastHash>::with_key(KEY).hash_flow(&k),
            fast.hash_bytes(&bytes)
        );
    }

    #[test]
    fn key_changes_hash() {
        let k = k4([192, 0, 2, 1], 1234, [203, 0, 113, 10], 80);
        let other = HashKey::from_bytes(*b"0123456789abcdeF");
        assert_ne!(
            FlowHasher::<SipHash13>::with_key(KEY).hash_flow(&k),
            FlowHasher::<SipHash13>::with_key(other).hash_flow(&k)
        );
        assert_ne!(
            FlowHasher::<FastHash>::with_key(KEY).hash_flow(&k),
            FlowHasher::<FastHash>::with_key(other).hash_flow(&k)
        );
    }

    #[test]
    fn passphrase_and_derive() {
        let a = HashKey::from_passphrase("s3cret-cluster");
        assert_eq!(a, HashKey::from_passphrase("s3cret-cluster"));
        assert_ne!(a.derive("maglev"), a.derive("conntrack"));
        assert_ne!(a.derive("maglev"), a);
        assert_eq!(format!("{a:?}"), "HashKey(..)");
        let (lo, hi) =
            HashKey::from_bytes([1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]).halves();
        assert_eq!((lo, hi), (1, 2));
    }

    #[test]
    fn from_rng_uses_the_rng() {
        use rand::SeedableRng;
        let mut r1 = rand::rngs::StdRng::seed_from_u64(1);
        let mut r2 = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(HashKey::from_rng(&mut r1), HashKey::from_rng(&mut r2));
        assert_ne!(
            HashKey::from_rng(&mut r1),
            HashKey::from_rng(&mut r2.clone()).derive("x")
        );
    }

    /// Sequential flows (the easy case for an attacker) spread evenly over buckets, for both
    /// hash functions: a chi-square-like check with generous bounds.
    fn spread<H: KeyedHash>() {
        let h = FlowHasher::<H>::with_key(KEY);
        let buckets = 64usize;
        let n = 64_000u32;
        let mut counts = vec![0u32; buckets];
        for i in 0..n {
            let k = k4(
                [10, 0, (i >> 8) as u8, i as u8],
                40000,
                [203, 0, 113, 10],
                80,
            );
            counts[(h.hash_flow(&k) % buckets as u64) as usize] += 1;
        }
        let mean = f64::from(n) / buckets as f64;
        for c in counts {
            assert!(
                (f64::from(c) - mean).abs() < mean * 0.15,
                "bucket {c} vs mean {mean}"
            );
        }
    }

    #[test]
    fn sip_spreads() {
        spread::<SipHash13>();
    }

    #[test]
    fn fast_spreads() {
        spread::<FastHash>();
    }

    #[test]
    fn fast_hash_all_lengths_distinct() {
        // Prefixes of one buffer, lengths 0..=64, all hash differently (length is mixed in).
        let h = FastHash::with_key(&KEY);
        let buf: Vec<u8> = (0..64u8).collect();
        let set: HashSet<u64> = (0..=64).map(|n| h.hash_bytes(&buf[..n])).collect();
        assert_eq!(set.len(), 65);
        let zeros = [0u8; 64];
        let set: HashSet<u64> = (0..=64).map(|n| h.hash_bytes(&zeros[..n])).collect();
        assert_eq!(set.len(), 65);
    }

    proptest! {
        #[test]
        fn symmetric_hash_is_direction_independent(
            s in any::<[u8; 16]>(), d in any::<[u8; 16]>(), sp in any::<u16>(), dp in any::<u16>(), v4 in any::<bool>()
        ) {
            let k = if v4 {
                FlowKey::v4([s[0], s[1], s[2], s[3]].into(), sp, [d[0], d[1], d[2], d[3]].into(), dp, IpProto::Udp)
            } else {
                FlowKey::v6(s.into(), sp, d.into(), dp, IpProto::Udp)
            };
            let sip = FlowHasher::<SipHash13>::with_key(KEY);
            let fast = FlowHasher::<FastHash>::with_key(KEY);
            prop_assert_eq!(sip.hash_symmetric(&k), sip.hash_symmetric(&k.reversed()));
            prop_assert_eq!(fast.hash_symmetric(&k), fast.hash_symmetric(&k.reversed()));
            prop_assert_eq!(sip.hash_3tuple(&k), sip.hash_flow(&k.without_ports()));
            prop_assert_eq!(sip.hash_symmetric(&k), sip.hash_flow(&k.canonical()));
        }

        #[test]
        fn v4_word_path_equals_byte_path(s in any::<[u8; 4]>(), d in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>(), p in any::<u8>()) {
            let k = FlowKey::v4(s.into(), sp, d.into(), dp, p.into());
            let mut b = [0u8; 13];
            b[..4].copy_from_slice(&s);
            b[4..8].copy_from_slice(&d);
            b[8..10].copy_from_slice(&sp.to_be_bytes());
            b[10..12].copy_from_slice(&dp.to_be_bytes());
            b[12] = p;
            prop_assert_eq!(FlowHasher::<SipHash13>::with_key(KEY).hash_flow(&k), SipHash13::with_key(&KEY).hash_bytes(&b));
            prop_assert_eq!(FlowHasher::<FastHash>::with_key(KEY).hash_flow(&k), FastHash::with_key(&KEY).hash_bytes(&b));
        }

        #[test]
        fn hash_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = FastHash::with_key(&KEY).hash_bytes(&b);
            let _ = SipHash13::with_key(&KEY).hash_bytes(&b);
        }
    }
}
