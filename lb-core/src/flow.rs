//! Flow keys: the 5-tuple that names a connection, for IPv4 and IPv6.

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::CoreError;

/// An IP protocol number (the IPv4 `protocol` field or the IPv6 upper-layer `next header`).
///
/// The protocols the balancer treats specially have their own variants; every other number is
/// [`IpProto::Other`]. `IpProto::from(6) == IpProto::Tcp`, and conversions round-trip for all 256
/// values (`Other` never holds a number that has its own variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpProto {
    /// ICMP for IPv4 (1).
    Icmp,
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMPv6 (58).
    Icmpv6,
    /// SCTP (132).
    Sctp,
    /// Any other protocol number.
    Other(u8),
}

impl IpProto {
    /// The protocol number.
    #[inline]
    pub const fn number(self) -> u8 {
        match self {
            IpProto::Icmp => 1,
            IpProto::Tcp => 6,
            IpProto::Udp => 17,
            IpProto::Icmpv6 => 58,
            IpProto::Sctp => 132,
            IpProto::Other(n) => n,
        }
    }

    /// The protocol with number `n`.
    #[inline]
    pub const fn from_number(n: u8) -> Self {
        match n {
            1 => IpProto::Icmp,
            6 => IpProto::Tcp,
            17 => IpProto::Udp,
            58 => IpProto::Icmpv6,
            132 => IpProto::Sctp,
            n => IpProto::Other(n),
        }
    }

    /// Whether this protocol carries 16-bit source and destination ports (TCP, UDP, SCTP).
    #[inline]
    pub const fn has_ports(self) -> bool {
        matches!(self, IpProto::Tcp | IpProto::Udp | IpProto::Sctp)
    }
}

impl From<u8> for IpProto {
    #[inline]
    fn from(n: u8) -> Self {
        IpProto::from_number(n)
    }
}

impl From<IpProto> for u8 {
    #[inline]
    fn from(p: IpProto) -> u8 {
        p.number()
    }
}

impl fmt::Display for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpProto::Icmp => f.write_str("icmp"),
            IpProto::Tcp => f.write_str("tcp"),
            IpProto::Udp => f.write_str("udp"),
            IpProto::Icmpv6 => f.write_str("icmpv6"),
            IpProto::Sctp => f.write_str("sctp"),
            IpProto::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

/// The 5-tuple of a flow: source and destination address and port, and the IP protocol.
///
/// Both addresses are always of the same family (the constructors guarantee it). For protocols
/// without ports, and for non-first fragments, the ports are zero: such keys name a 3-tuple. For
/// ICMP echo, callers may put the echo identifier in both ports.
///
/// ```
/// use lb_core::{FlowKey, IpProto};
/// use std::net::Ipv4Addr;
/// let k = FlowKey::v4(Ipv4Addr::new(192, 0, 2, 1), 40000, Ipv4Addr::new(203, 0, 113, 10), 80, IpProto::Tcp);
/// assert_eq!(k.to_string(), "tcp 192.0.2.1:40000 -> 203.0.113.10:80");
/// assert_eq!(k.reversed().reversed(), k);
/// assert_eq!(k.canonical(), k.reversed().canonical());
/// assert_eq!(lb_core::FlowKey::decode(&k.encode()), Ok(k));
/// ```
///
/// Representation: both addresses as 16-byte arrays (an IPv4 address in the first 4 bytes, the
/// other 12 zero) and a family tag, so that comparing, hashing and packing a key is plain loads
/// and compares, with no `IpAddr` enum to match on. [`FlowKey::src`] and [`FlowKey::dst`] build
/// the `IpAddr` on demand. `Hash` feeds a hasher the same compact bytes the flow hash uses (13
/// for IPv4, 37 for IPv6); `Ord` orders as the 5-tuple of `IpAddr`s and [`IpProto`] would.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    /// The protocol number.
    proto: u8,
    /// 4 or 6 (an enum, whose unused values give `Option<FlowKey>` its niche).
    family: Family,
    /// Always zero: keeps the key 40 bytes, as the `IpAddr` form was, so that structures
    /// holding keys keep their size and the compiler its inline copies.
    pad: u16,
}

/// A key's address family, by its IP version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Family {
    V4 = 4,
    V6 = 6,
}

/// Length of [`FlowKey::encode`]'s output, the same for both families.
pub const FLOW_KEY_ENCODED_LEN: usize = 38;

/// An IPv4 address in a 16-byte field: its 4 bytes first, then zeros.
#[inline(always)]
const fn v4_field(a: Ipv4Addr) -> [u8; 16] {
    let o = a.octets();
    [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The first 4 bytes of a field, as a big-endian address value.
#[inline(always)]
const fn v4_bits(f: &[u8; 16]) -> u32 {
    u32::from_be_bytes([f[0], f[1], f[2], f[3]])
}

impl FlowKey {
    /// Length of the fixed-size encoding (see [`FlowKey::encode`]).
    pub const ENCODED_LEN: usize = FLOW_KEY_ENCODED_LEN;

    /// An IPv4 flow key.
    #[inline]
    pub const fn v4(
        src: Ipv4Addr,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
        proto: IpProto,
    ) -> Self {
        FlowKey {
            src: v4_field(src),
            dst: v4_field(dst),
            src_port,
            dst_port,
            proto: proto.number(),
            family: Family::V4,
            pad: 0,
        }
    }

    /// An IPv6 flow key.
    #[inline]
    pub const fn v6(
        src: Ipv6Addr,
        src_port: u16,
        dst: Ipv6Addr,
        dst_port: u16,
        proto: IpProto,
    ) -> Self {
        FlowKey {
            src: src.octets(),
            dst: dst.octets(),
            src_port,
            dst_port,
            proto: proto.number(),
            family: Family::V6,
            pad: 0,
        }
    }

    /// An IPv4 flow key from address values (`u32::from(Ipv4Addr)`) and a protocol number:
    /// the cheapest constructor, for parsers and tables that hold these forms.
    #[inline]
    pub const fn v4_bits(src: u32, src_port: u16, dst: u32, dst_port: u16, proto: u8) -> Self {
        let (s, d) = (src.to_be_bytes(), dst.to_be_bytes());
        FlowKey {
            src: [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port,
            dst_port,
            proto,
            family: Family::V4,
            pad: 0,
        }
    }

    /// An IPv6 flow key from address octets and a protocol number.
    #[inline]
    pub const fn v6_octets(
        src: [u8; 16],
        src_port: u16,
        dst: [u8; 16],
        dst_port: u16,
        proto: u8,
    ) -> Self {
        FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            proto,
            family: Family::V6,
            pad: 0,
        }
    }

    /// A flow key from addresses of either family.
    ///
    /// # Errors
    /// [`CoreError::FamilyMismatch`] if `src` and `dst` are of different families.
    pub fn new(
        src: IpAddr,
        src_port: u16,
        dst: IpAddr,
        dst_port: u16,
        proto: IpProto,
    ) -> Result<Self, CoreError> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Ok(Self::v4(s, src_port, d, dst_port, proto)),
            (IpAddr::V6(s), IpAddr::V6(d)) => Ok(Self::v6(s, src_port, d, dst_port, proto)),
            (s, d) => Err(CoreError::FamilyMismatch {
                src: family(s),
                dst: family(d),
            }),
        }
    }

    #[inline(always)]
    const fn addr(&self, f: &[u8; 16]) -> IpAddr {
        if matches!(self.family, Family::V4) {
            IpAddr::V4(Ipv4Addr::new(f[0], f[1], f[2], f[3]))
        } else {
            IpAddr::V6(Ipv6Addr::new(
                u16::from_be_bytes([f[0], f[1]]),
                u16::from_be_bytes([f[2], f[3]]),
                u16::from_be_bytes([f[4], f[5]]),
                u16::from_be_bytes([f[6], f[7]]),
                u16::from_be_bytes([f[8], f[9]]),
                u16::from_be_bytes([f[10], f[11]]),
                u16::from_be_bytes([f[12], f[13]]),
                u16::from_be_bytes([f[14], f[15]]),
            ))
        }
    }

    /// Source address.
    #[inline]
    pub const fn src(&self) -> IpAddr {
        self.addr(&self.src)
    }
    /// Destination address.
    #[inline]
    pub const fn dst(&self) -> IpAddr {
        self.addr(&self.dst)
    }
    /// The source address field: 16 octets for IPv6; for IPv4 the 4 octets then 12 zeros.
    #[inline]
    pub const fn src_octets(&self) -> &[u8; 16] {
        &self.src
    }
    /// The destination address field (as [`FlowKey::src_octets`]).
    #[inline]
    pub const fn dst_octets(&self) -> &[u8; 16] {
        &self.dst
    }
    /// For an IPv4 key, the source and destination address values (`u32::from(Ipv4Addr)`).
    #[inline]
    pub const fn v4_addr_bits(&self) -> Option<(u32, u32)> {
        if matches!(self.family, Family::V4) {
            Some((v4_bits(&self.src), v4_bits(&self.dst)))
        } else {
            None
        }
    }
    /// Source port (0 when the protocol has none or the packet is a non-first fragment).
    #[inline]
    pub const fn src_port(&self) -> u16 {
        self.src_port
    }
    /// Destination port (0 when the protocol has none or the packet is a non-first fragment).
    #[inline]
    pub const fn dst_port(&self) -> u16 {
        self.dst_port
    }
    /// IP protocol.
    #[inline]
    pub const fn proto(&self) -> IpProto {
        IpProto::from_number(self.proto)
    }
    /// The IP protocol number.
    #[inline]
    pub const fn proto_number(&self) -> u8 {
        self.proto
    }
    /// Whether both addresses are IPv4.
    #[inline]
    pub const fn is_ipv4(&self) -> bool {
        matches!(self.family, Family::V4)
    }

    /// The same key with ports set to zero: the 3-tuple used for non-first fragments.
    #[inline]
    pub const fn without_ports(&self) -> Self {
        FlowKey {
            src_port: 0,
            dst_port: 0,
            ..*self
        }
    }

    /// The same key with the destination replaced (for example by a NAT rewrite).
    ///
    /// # Errors
    /// [`CoreError::FamilyMismatch`] if `dst` is not of this key's family.
    pub fn with_dst(&self, dst: IpAddr, dst_port: u16) -> Result<Self, CoreError> {
        Self::new(self.src(), self.src_port, dst, dst_port, self.proto())
    }

    /// The same key with the source replaced (for example by a source NAT).
    ///
    /// # Errors
    /// [`CoreError::FamilyMismatch`] if `src` is not of this key's family.
    pub fn with_src(&self, src: IpAddr, src_port: u16) -> Result<Self, CoreError> {
        Self::new(src, src_port, self.dst(), self.dst_port, self.proto())
    }

    /// The key of the opposite direction: source and destination swapped.
    #[inline]
    pub const fn reversed(&self) -> Self {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            family: self.family,
            pad: 0,
        }
    }

    /// A direction-independent form: the one of `self` and `self.reversed()` whose
    /// `(src, src_port)` endpoint is the smaller. `k.canonical() == k.reversed().canonical()`.
    #[inline]
    pub fn canonical(&self) -> Self {
        if self.is_canonical() {
            *self
        } else {
            self.reversed()
        }
    }

    /// Whether `self` is already in canonical form (see [`FlowKey::canonical`]).
    #[inline]
    pub fn is_canonical(&self) -> bool {
        // Both addresses are of one family, whose order is their octets' (IPv4 padding is zero).
        (self.src, self.src_port) <= (self.dst, self.dst_port)
    }

    /// The fixed-size encoding: 38 bytes for both families.
    ///
    /// Layout: `[family (4 or 6), protocol, src port (BE), dst port (BE), src address (16),
    /// dst address (16)]`. An IPv4 address occupies the first 4 bytes of its 16-byte field and the
    /// other 12 are zero. Every key has exactly one encoding and [`FlowKey::decode`] accepts exactly
    /// the encodings of keys.
    pub fn encode(&self) -> [u8; FLOW_KEY_ENCODED_LEN] {
        let mut out = [0u8; FLOW_KEY_ENCODED_LEN];
        out[0] = self.family as u8;
        out[1] = self.proto;
        out[2..4].copy_from_slice(&self.src_port.to_be_bytes());
        out[4..6].copy_from_slice(&self.dst_port.to_be_bytes());
        out[6..22].copy_from_slice(&self.src);
        out[22..38].copy_from_slice(&self.dst);
        out
    }

    /// Decodes the output of [`FlowKey::encode`].
    ///
    /// # Errors
    /// [`CoreError::Length`] unless `bytes` is exactly 38 bytes long, [`CoreError::UnknownFamily`]
    /// for a family tag other than 4 or 6, [`CoreError::NonZeroPadding`] for an IPv4 key whose
    /// address fields have non-zero bytes after the address.
    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        let b: &[u8; FLOW_KEY_ENCODED_LEN] = bytes.try_into().map_err(|_| CoreError::Length {
            what: "flow key",
            need: FLOW_KEY_ENCODED_LEN,
            have: bytes.len(),
        })?;
        let src_port = u16::from_be_bytes([b[2], b[3]]);
        let dst_port = u16::from_be_bytes([b[4], b[5]]);
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&b[6..22]);
        dst.copy_from_slice(&b[22..38]);
        match b[0] {
            4 if src[4..].iter().chain(&dst[4..]).any(|&x| x != 0) => {
                Err(CoreError::NonZeroPadding)
            }
            f @ (4 | 6) => Ok(FlowKey {
                src,
                dst,
                src_port,
                dst_port,
                proto: b[1],
                family: if f == 4 { Family::V4 } else { Family::V6 },
                pad: 0,
            }),
            t => Err(CoreError::UnknownFamily(t)),
        }
    }

    /// The packed hashing form: 13 bytes for IPv4 (`src, dst, src port, dst port, protocol`), 37
    /// for IPv6. The two families never produce the same bytes because their lengths differ. With
    /// `canonical`, the endpoints are ordered as in [`FlowKey::canonical`] (computed on the packed
    /// integers, cheaper than building the canonical key).
    #[inline(always)]
    pub(crate) fn packed(&self, canonical: bool) -> Packed {
        if matches!(self.family, Family::V4) {
            let (mut a, mut ap, mut b, mut bp) = (
                v4_bits(&self.src),
                self.src_port,
                v4_bits(&self.dst),
                self.dst_port,
            );
            if canonical && (a, ap) > (b, bp) {
                core::mem::swap(&mut a, &mut b);
                core::mem::swap(&mut ap, &mut bp);
            }
            // The 13 bytes `src ‖ dst ‖ src port ‖ dst port ‖ proto` (network order) as two
            // little-endian words, computed arithmetically: building a byte array and reading it
            // back as words stalls store-to-load forwarding on the hot path.
            let w0 = u64::from(a.swap_bytes()) | (u64::from(b.swap_bytes()) << 32);
            let w1 = u64::from(ap.swap_bytes())
                | (u64::from(bp.swap_bytes()) << 16)
                | (u64::from(self.proto) << 32);
            Packed::V4 { w0, w1 }
        } else {
            let (mut a, mut ap, mut b, mut bp) =
                (&self.src, self.src_port, &self.dst, self.dst_port);
            if canonical && (a, ap) > (b, bp) {
                core::mem::swap(&mut a, &mut b);
                core::mem::swap(&mut ap, &mut bp);
            }
            let mut buf = [0u8; 37];
            buf[0..16].copy_from_slice(a);
            buf[16..32].copy_from_slice(b);
            buf[32..34].copy_from_slice(&ap.to_be_bytes());
            buf[34..36].copy_from_slice(&bp.to_be_bytes());
            buf[36] = self.proto;
            Packed::V6(buf)
        }
    }
}

impl core::hash::Hash for FlowKey {
    /// Feeds the packed form (13 bytes for IPv4 as two words, 37 for IPv6): what
    /// [`crate::FlowHasher`] hashes, and as few bytes as name the key.
    #[inline]
    fn hash<S: core::hash::Hasher>(&self, state: &mut S) {
        match self.packed(false) {
            Packed::V4 { w0, w1 } => {
                state.write_u64(w0);
                state.write_u64(w1);
            }
            Packed::V6(b) => state.write(&b),
        }
    }
}

impl Ord for FlowKey {
    /// As the tuple `(src, dst, src port, dst port, protocol)` of `IpAddr`s and [`IpProto`]
    /// orders: IPv4 keys first, addresses by octets, protocols in [`IpProto`]'s variant order.
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        (
            self.family,
            self.src,
            self.dst,
            self.src_port,
            self.dst_port,
        )
            .cmp(&(
                other.family,
                other.src,
                other.dst,
                other.src_port,
                other.dst_port,
            ))
            .then_with(|| self.proto().cmp(&other.proto()))
    }
}

impl PartialOrd for FlowKey {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowKey")
            .field("src", &self.src())
            .field("dst", &self.dst())
            .field("src_port", &self.src_port)
            .field("dst_port", &self.dst_port)
            .field("proto", &self.proto())
            .finish()
    }
}

/// The packed hashing form of a flow key (see `FlowKey::packed`).
pub(crate) enum Packed {
    /// The 13 IPv4 bytes as little-endian words: bytes 0..8 and bytes 8..13.
    V4 {
        w0: u64,
        w1: u64,
    },
    V6([u8; 37]),
}

fn family(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, d, p) = (self.src(), self.dst(), self.proto());
        if self.is_ipv4() {
            write!(f, "{p} {s}:{} -> {d}:{}", self.src_port, self.dst_port)
        } else {
            write!(f, "{p} [{s}]:{} -> [{d}]:{}", self.src_port, self.dst_port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_key() -> impl Strategy<Value = FlowKey> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<u8>()
            )
                .prop_map(|(s, sp, d, dp, p)| FlowKey::v4(
                    s.into(),
                    sp,
                    d.into(),
                    dp,
                    p.into()
                )),
            (
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<u8>()
            )
                .prop_map(|(s, sp, d, dp, p)| FlowKey::v6(
                    s.into(),
                    sp,
                    d.into(),
                    dp,
                    p.into()
                )),
        ]
    }

    proptest! {
        #[test]
        fn reversed_twice_is_identity(k in any_key()) {
            prop_assert_eq!(k.reversed().reversed(), k);
        }

        #[test]
        fn canonical_is_direction_independent(k in any_key()) {
            prop_assert_eq!(k.canonical(), k.reversed().canonical());
            prop_assert!(k.canonical().is_canonical());
            prop_assert!(k.canonical() == k || k.canonical() == k.reversed());
        }

        #[test]
        fn encode_decode_roundtrip(k in any_key()) {
            prop_assert_eq!(FlowKey::decode(&k.encode()), Ok(k));
        }

        #[test]
        fn decode_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(k) = FlowKey::decode(&b) {
                // Anything accepted is the unique encoding of its key.
                prop_assert_eq!(&k.encode()[..], &b[..]);
            }
        }

        /// The representation without `IpAddr` keeps the order, equality and accessors of the
        /// tuple of `IpAddr`s it replaced, and hashes like its packed form.
        #[test]
        fn agrees_with_the_ipaddr_tuple(a in any_key(), b in any_key()) {
            let t = |k: &FlowKey| (k.src(), k.dst(), k.src_port(), k.dst_port(), k.proto());
            prop_assert_eq!(a.cmp(&b), t(&a).cmp(&t(&b)));
            prop_assert_eq!(a == b, t(&a) == t(&b));
            let back = FlowKey::new(a.src(), a.src_port(), a.dst(), a.dst_port(), a.proto());
            prop_assert_eq!(back, Ok(a));
            prop_assert_eq!(a.is_canonical(), (a.src(), a.src_port()) <= (a.dst(), a.dst_port()));
            match (a.src(), a.dst(), a.v4_addr_bits()) {
                (IpAddr::V4(s), IpAddr::V4(d), Some((sb, db))) => {
                    prop_assert_eq!((u32::from(s), u32::from(d)), (sb, db));
                    let k = FlowKey::v4_bits(sb, a.src_port(), db, a.dst_port(), a.proto_number());
                    prop_assert_eq!(k, a);
                }
                (IpAddr::V6(s), IpAddr::V6(d), None) => {
                    prop_assert_eq!((&s.octets(), &d.octets()), (a.src_octets(), a.dst_octets()));
                    let k = FlowKey::v6_octets(s.octets(), a.src_port(), d.octets(), a.dst_port(), a.proto_number());
                    prop_assert_eq!(k, a);
                }
                other => prop_assert!(false, "mixed families {:?}", other),
            }
            use std::hash::{BuildHasher, BuildHasherDefault};
            let bh = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
            let copy = FlowKey::decode(&a.encode()).unwrap_or(b);
            prop_assert_eq!(bh.hash_one(a), bh.hash_one(copy));
        }

        #[test]
        fn proto_number_roundtrip(n in any::<u8>()) {
            prop_assert_eq!(IpProto::from(n).number(), n);
        }
    }

    #[test]
    fn key_is_40_bytes() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<Option<FlowKey>>(), 40);
    }

    #[test]
    fn family_mismatch_is_an_error() {
        let e = FlowKey::new(
            Ipv4Addr::LOCALHOST.into(),
            1,
            Ipv6Addr::LOCALHOST.into(),
            2,
            IpProto::Udp,
        );
        assert_eq!(e, Err(CoreError::FamilyMismatch { src: 4, dst: 6 }));
    }

    #[test]
    fn decode_errors() {
        assert!(matches!(
            FlowKey::decode(&[4; 37]),
            Err(CoreError::Length {
                need: 38,
                have: 37,
                ..
            })
        ));
        let mut b =
            FlowKey::v4([1, 2, 3, 4].into(), 1, [5, 6, 7, 8].into(), 2, IpProto::Tcp).encode();
        b[0] = 5;
        assert_eq!(FlowKey::decode(&b), Err(CoreError::UnknownFamily(5)));
        b[0] = 4;
        b[37] = 1;
        assert_eq!(FlowKey::decode(&b), Err(CoreError::NonZeroPadding));
    }

    #[test]
    fn display_v6_and_other() {
        let k = FlowKey::v6(
            "2001:db8::1".parse().unwrap(),
            5060,
            "2001:db8::2".parse().unwrap(),
            5060,
            IpProto::Other(250),
        );
        assert_eq!(
            k.to_string(),
            "proto-250 [2001:db8::1]:5060 -> [2001:db8::2]:5060"
        );
        assert!(!k.is_ipv4());
        assert_eq!(k.without_ports().src_port(), 0);
        assert!(k.with_dst(Ipv4Addr::LOCALHOST.into(), 1).is_err());
    }

    #[test]
    fn packed_forms() {
        let k4 = FlowKey::v4([5, 6, 7, 8].into(), 1, [1, 2, 3, 4].into(), 2, IpProto::Tcp);
        let bytes = |p: Packed| match p {
            Packed::V4 { w0, w1 } => {
                let mut b = [0u8; 13];
                b[..8].copy_from_slice(&w0.to_le_bytes());
                b[8..].copy_from_slice(&w1.to_le_bytes()[..5]);
                assert_eq!(w1 >> 40, 0);
                Some(b)
            }
            Packed::V6(_) => None,
        };
        assert_eq!(
            bytes(k4.packed(false)),
            Some([5, 6, 7, 8, 1, 2, 3, 4, 0, 1, 0, 2, 6])
        );
        assert_eq!(
            bytes(k4.packed(true)),
            Some([1, 2, 3, 4, 5, 6, 7, 8, 0, 2, 0, 1, 6])
        );
        let k6 = FlowKey::v6(
            Ipv6Addr::LOCALHOST,
            1,
            Ipv6Addr::UNSPECIFIED,
            2,
            IpProto::Udp,
        );
        assert!(
            matches!(k6.packed(false), Packed::V6(b) if b[15] == 1 && b[31] == 0 && b[36] == 17)
        );
        assert!(matches!(k6.packed(true), Packed::V6(b) if b[15] == 0 && b[31] == 1 && b[33] == 2));
    }
}
