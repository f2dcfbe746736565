//! The compact per-connection record and its public views.
//!
//! A [`Slot`] is 40 bytes and holds everything a connection needs: an IPv4 key packed in 13
//! bytes, the state class, flags, the backend, the two links of its class list, the last-seen
//! and creation times in 32-bit milliseconds, and its packet and byte counters packed in one
//! 64-bit word (a flow that outgrows them moves its counters to a small side table of exact
//! 64-bit pairs, see [`Counts`]). With the index's share (5.33 bytes) that makes 45.3 bytes per
//! IPv4 flow. An IPv6 key does not fit: its two addresses (32 bytes) live in a side store of
//! [`Config::ipv6_capacity`](crate::Config::ipv6_capacity) pairs and the slot keeps their
//! index. The NAT reply tuple lives in a parallel array when [`Config::nat`](crate::Config::nat)
//! is on: a table pays only for what it uses.
//!
//! The price of 40 bytes: list links are 24-bit (a table holds at most
//! [`MAX_CAPACITY`](crate::MAX_CAPACITY) entries) and backend ids are 16-bit (an insert with a
//! larger id is refused).

use lb_core::{BackendId, FlowKey, Instant};

use crate::tcp_state::{Direction, TcpFlags};
use crate::timeout::FlowState;
use crate::MAX_BACKEND_ID;

/// "No slot": the end of a list.
pub(crate) const NIL: u32 = u32::MAX;

/// A 24-bit list link's "no slot".
const NIL24: u64 = (1 << 24) - 1;

/// Slot flag: the slot holds a live entry.
pub(crate) const F_LIVE: u8 = 1;
/// Slot flag: the key is IPv6 (`a` indexes the IPv6 address store).
pub(crate) const F_V6: u8 = 2;
/// Slot flag: the balancer sees both directions (NAT given or a reply seen).
pub(crate) const F_BIDIR: u8 = 4;
/// Slot flag: a reply tuple is stored and indexed.
pub(crate) const F_NAT: u8 = 8;
/// Slot flag: the reply tuple's SNAT port came from the table's pool (released on removal).
pub(crate) const F_POOL: u8 = 16;
/// Slot flag: a persistence template is attached (its prefix length is in `persist`).
pub(crate) const F_PERSIST: u8 = 32;
/// Slot flag: the entry holds a pool port (`F_POOL`), is half-open, and is linked in its
/// backend pool's half-open list (`evict::PoolList`), the victims of SNAT port pressure.
pub(crate) const F_POOL_HALF: u8 = 64;
/// Slot flag: seen again since it was queued at its class list's tail, and left where it
/// was (lazy re-queueing: a hit does not unlink the entry, which would touch its neighbours'
/// lines). Its place is older than its last-seen time; `expire` moves it to the tail if it
/// reaches the head.
pub(crate) const F_SEEN: u8 = 128;

/// One entry of the slab. 40 bytes, 8-byte aligned.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct Slot {
    /// IPv4 source address, or the index of the IPv6 address pair.
    pub(crate) a: u32,
    /// IPv4 destination address (0 for IPv6).
    pub(crate) b: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    /// Flow class (see `timeout::FlowState::class`).
    pub(crate) class: u8,
    pub(crate) flags: u8,
    /// Prefix length of the attached persistence template.
    pub(crate) persist: u8,
    /// Previous (bits 0..24) and next (24..48) slot of the class list, backend (48..64).
    pub(crate) links: u64,
    /// Last-seen time, milliseconds modulo 2^32.
    pub(crate) last: u32,
    /// Creation time, milliseconds modulo 2^32.
    pub(crate) created: u32,
    /// Packet and byte counters.
    pub(crate) counts: Counts,
}

impl Slot {
    #[inline(always)]
    fn link(&self, shift: u32) -> u32 {
        let v = (self.links >> shift) & NIL24;
        if v == NIL24 {
            NIL
        } else {
            v as u32
        }
    }

    #[inline(always)]
    fn set_link(&mut self, shift: u32, i: u32) {
        let v = if i == NIL {
            NIL24
        } else {
            u64::from(i) & NIL24
        };
        self.links = (self.links & !(NIL24 << shift)) | (v << shift);
    }

    /// The previous slot of the class list (or the free list), [`NIL`] at the head.
    #[inline(always)]
    pub(crate) fn prev(&self) -> u32 {
        self.link(0)
    }

    /// The next slot of the class list (or the free list), [`NIL`] at the tail.
    #[inline(always)]
    pub(crate) fn next(&self) -> u32 {
        self.link(24)
    }

    #[inline(always)]
    pub(crate) fn set_prev(&mut self, i: u32) {
        self.set_link(0, i);
    }

    #[inline(always)]
    pub(crate) fn set_next(&mut self, i: u32) {
        self.set_link(24, i);
    }

    /// The backend id.
    #[inline(always)]
    pub(crate) fn backend(&self) -> u32 {
        (self.links >> 48) as u32
    }

    /// Sets the backend id (the caller checked it is at most [`MAX_BACKEND_ID`]).
    #[inline(always)]
    pub(crate) fn set_backend(&mut self, b: u32) {
        self.links = (self.links & ((1 << 48) - 1)) | (u64::from(b.min(MAX_BACKEND_ID)) << 48);
    }

    /// A free slot whose free-list successor is `next`.
    pub(crate) fn free(next: u32) -> Slot {
        let mut s = Slot::default();
        s.set_prev(NIL);
        s.set_next(next);
        s
    }
}

/// A flow's packet and byte counters in one word.
///
/// Small (the common case): packets in bits 0..26 (up to 2^26 − 1, 67 M packets) and bytes in
/// bits 26..63 (up to 2^37 − 1, 128 GiB). When a packet would overflow either, the flow becomes
/// an elephant: bit 63 is set and bits 0..32 index a pair of exact `u64` counters in the
/// table's elephant store. If that store is full the small counters saturate instead (and the
/// table counts it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts(pub(crate) u64);

const PACKET_BITS: u32 = 26;
const PACKET_MAX: u64 = (1 << PACKET_BITS) - 1;
const BYTE_MAX: u64 = (1 << 37) - 1;
const ELEPHANT: u64 = 1 << 63;

impl Counts {
    /// Zero packets, zero bytes.
    pub(crate) const ZERO: Counts = Counts(0);

    /// Small counters (saturated at their maxima).
    #[inline]
    pub(crate) fn small(packets: u64, bytes: u64) -> Counts {
        Counts(packets.min(PACKET_MAX) | (bytes.min(BYTE_MAX) << PACKET_BITS))
    }

    /// Counters kept in elephant-store entry `e`.
    #[inline]
    pub(crate) fn elephant(e: u32) -> Counts {
        Counts(ELEPHANT | u64::from(e))
    }

    /// The elephant-store entry, if the counters live there.
    #[inline(always)]
    pub(crate) fn elephant_index(self) -> Option<u32> {
        (self.0 & ELEPHANT != 0).then_some(self.0 as u32)
    }

    /// (packets, bytes) of small counters (meaningless for an elephant).
    #[inline(always)]
    pub(crate) fn small_values(self) -> (u64, u64) {
        (self.0 & PACKET_MAX, (self.0 >> PACKET_BITS) & BYTE_MAX)
    }

    /// Small counters plus `packets` packets of `bytes` in all, or `None` if that overflows
    /// them (or they are an elephant's).
    ///
    /// One add: with room in the packet field nothing carries out of it, and the byte field
    /// (37 bits below bit 63) overflows into the elephant bit, so "neither word has bit 63 set"
    /// is the whole byte check.
    #[inline(always)]
    pub(crate) fn bumped(self, bytes: u32, packets: u64) -> Option<Counts> {
        let room = packets <= PACKET_MAX - (self.0 & PACKET_MAX);
        let n = self
            .0
            .wrapping_add(packets.wrapping_add(u64::from(bytes) << PACKET_BITS));
        (room && (self.0 | n) & ELEPHANT == 0).then_some(Counts(n))
    }
}

/// An IPv4 NAT reply tuple (backend → SNAT address), kept beside the slab when `nat` is on:
/// 12 bytes padded to 16, so that an element never straddles two cache lines. The protocol is
/// the flow's. IPv6 reply tuples live in [`Nat6`]s indexed like the IPv6 address store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub(crate) struct Nat4 {
    pub(crate) backend: u32,
    pub(crate) snat: u32,
    pub(crate) backend_port: u16,
    pub(crate) snat_port: u16,
}

/// An IPv6 NAT reply tuple: backend address, SNAT address, backend port, SNAT port.
pub(crate) type Nat6 = [u8; 36];

/// A flow key in the form the slab stores, for comparison without rebuilding keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    V4 {
        a: u32,
        b: u32,
        sport: u16,
        dport: u16,
        proto: u8,
    },
    V6 {
        addrs: [u8; 32],
        sport: u16,
        dport: u16,
        proto: u8,
    },
}

impl Probe {
    #[inline(always)]
    pub(crate) fn of(key: &FlowKey) -> Probe {
        let (sport, dport, proto) = (key.src_port(), key.dst_port(), key.proto_number());
        match key.v4_addr_bits() {
            Some((a, b)) => Probe::V4 {
                a,
                b,
                sport,
                dport,
                proto,
            },
            None => {
                let mut addrs = [0u8; 32];
                addrs[..16].copy_from_slice(key.src_octets());
                addrs[16..].copy_from_slice(key.dst_octets());
                Probe::V6 {
                    addrs,
                    sport,
                    dport,
                    proto,
                }
            }
        }
    }

    /// Whether slot `s` (with IPv6 store `v6`) holds this key.
    #[inline(always)]
    pub(crate) fn matches(&self, s: &Slot, v6store: &[[u8; 32]]) -> bool {
        match self {
            Probe::V4 {
                a,
                b,
                sport,
                dport,
                proto,
            } => {
                s.flags & F_V6 == 0
                    && s.a == *a
                    && s.b == *b
                    && s.sport == *sport
                    && s.dport == *dport
                    && s.proto == *proto
            }
            Probe::V6 {
                addrs,
                sport,
                dport,
                proto,
            } => {
                s.flags & F_V6 != 0
                    && s.sport == *sport
                    && s.dport == *dport
                    && s.proto == *proto
                    && v6store.get(s.a as usize) == Some(addrs)
            }
        }
    }
}

/// Rebuilds the key of slot `s`.
#[inline]
pub(crate) fn slot_key(s: &Slot, v6store: &[[u8; 32]]) -> FlowKey {
    if s.flags & F_V6 == 0 {
        FlowKey::v4_bits(s.a, s.sport, s.b, s.dport, s.proto)
    } else {
        let pair = v6store.get(s.a as usize).copied().unwrap_or([0; 32]);
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&pair[..16]);
        dst.copy_from_slice(&pair[16..]);
        FlowKey::v6_octets(src, s.sport, dst, s.dport, s.proto)
    }
}

/// One packet as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Which way it travels.
    pub dir: Direction,
    /// Its TCP flags (ignored for other protocols).
    pub tcp_flags: TcpFlags,
    /// Its length in bytes (IP total length, or whatever the caller counts; for a GSO
    /// super-packet, the bytes of all its wire segments).
    pub bytes: u32,
    /// The wire packets it stands for: 1, or a GSO super-packet's segment count (0 counts as 1).
    pub segments: u32,
}

impl Packet {
    /// A client-to-service packet.
    #[inline]
    pub const fn original(tcp_flags: TcpFlags, bytes: u32) -> Packet {
        Packet {
            dir: Direction::Original,
            tcp_flags,
            bytes,
            segments: 1,
        }
    }

    /// The same packet standing for `n` wire segments (a GSO super-packet).
    #[inline]
    pub const fn with_segments(mut self, n: u32) -> Packet {
        self.segments = n;
        self
    }

    /// The packets it counts for.
    #[inline(always)]
    pub(crate) const fn count(&self) -> u64 {
        if self.segments == 0 {
            1
        } else {
            self.segments as u64
        }
    }

    /// A backend-to-client packet.
    #[inline]
    pub const fn reply(tcp_flags: TcpFlags, bytes: u32) -> Packet {
        Packet {
            dir: Direction::Reply,
            tcp_flags,
            bytes,
            segments: 1,
        }
    }
}

/// A snapshot of one entry, for inspection, export and sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// The flow key (original direction).
    pub key: FlowKey,
    /// The backend the flow is bound to.
    pub backend: BackendId,
    /// The protocol state.
    pub state: FlowState,
    /// The NAT reply tuple (backend → SNAT address), if any.
    pub nat: Option<FlowKey>,
    /// The prefix length of the client-persistence template the flow pins, if any (see
    /// [`NewFlow::persist_prefix`](crate::NewFlow::persist_prefix)).
    pub persist: Option<u8>,
    /// Last packet seen (millisecond precision).
    pub last_seen: Instant,
    /// When the entry times out if no further packet comes.
    pub deadline: Instant,
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen.
    pub bytes: u64,
}

/// What a table hit hands the data path: everything needed to forward the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The flow's backend.
    pub backend: BackendId,
    /// The state after the packet.
    pub state: FlowState,
    /// The state before the packet; `None` when the packet started a new session in the
    /// existing entry (a SYN reusing a TIME_WAIT / CLOSE entry: the old session was recorded
    /// as a [`RemovalReason::Closed`](crate::RemovalReason::Closed) removal, so a caller
    /// counting connections decrements on that record and counts this one as new).
    pub was: Option<FlowState>,
    /// The NAT reply tuple, if any (its `src` is the backend, its `dst` the SNAT address).
    pub nat: Option<FlowKey>,
    /// Whether the packet changed the state (a reason to send a sync update).
    pub changed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::IpProto;

    #[test]
    fn slot_is_40_bytes() {
        assert_eq!(core::mem::size_of::<Slot>(), 40);
        assert_eq!(core::mem::size_of::<Nat4>(), 16);
    }

    #[test]
    fn links_and_backend_share_a_word() {
        let mut s = Slot::free(NIL);
        assert_eq!((s.prev(), s.next(), s.backend()), (NIL, NIL, 0));
        s.set_backend(MAX_BACKEND_ID);
        s.set_next(7);
        s.set_prev(0xFF_FFFE);
        assert_eq!(
            (s.prev(), s.next(), s.backend()),
            (0xFF_FFFE, 7, MAX_BACKEND_ID)
        );
        s.set_prev(NIL);
        s.set_backend(3);
        assert_eq!((s.prev(), s.next(), s.backend()), (NIL, 7, 3));
    }

    #[test]
    fn small_counts_bump_until_they_overflow() {
        let c = Counts::ZERO.bumped(1500, 1).and_then(|c| c.bumped(60, 1));
        assert_eq!(c.map(Counts::small_values), Some((2, 1560)));
        assert_eq!(
            Counts::ZERO.bumped(3000, 3).map(Counts::small_values),
            Some((3, 3000)),
            "a GSO super-packet counts its segments"
        );
        assert_eq!(Counts::small(PACKET_MAX - 2, 0).bumped(1, 3), None);
        assert_eq!(Counts::small(PACKET_MAX, 0).bumped(1, 1), None);
        assert_eq!(Counts::small(1, BYTE_MAX - 10).bumped(11, 1), None);
        assert_eq!(
            Counts::small(1, BYTE_MAX - 10)
                .bumped(10, 1)
                .map(Counts::small_values),
            Some((2, BYTE_MAX))
        );
        let e = Counts::elephant(9);
        assert_eq!(e.elephant_index(), Some(9));
        assert_eq!(e.bumped(1, 1), None);
        assert_eq!(
            Counts::small(u64::MAX, u64::MAX).small_values(),
            (PACKET_MAX, BYTE_MAX)
        );
    }

    proptest::proptest! {
        /// The one-add bump is the field arithmetic: both fields grow when both stay within
        /// their maxima, and nothing changes otherwise (elephants included).
        #[test]
        fn bump_is_the_field_arithmetic(
            p in proptest::prop_oneof![0..=PACKET_MAX, PACKET_MAX - 70_000..=PACKET_MAX],
            b in proptest::prop_oneof![0..=BYTE_MAX, BYTE_MAX - (1 << 33)..=BYTE_MAX],
            bytes in proptest::prelude::any::<u32>(),
            packets in proptest::prop_oneof![0..=70_000u64, 0..=u64::from(u32::MAX)],
            elephant in proptest::prelude::any::<bool>(),
        ) {
            let c = if elephant { Counts::elephant(p as u32) } else { Counts::small(p, b) };
            let want = (!elephant && p + packets <= PACKET_MAX && b + u64::from(bytes) <= BYTE_MAX)
                .then(|| Counts::small(p + packets, b + u64::from(bytes)));
            proptest::prop_assert_eq!(c.bumped(bytes, packets), want);
        }
    }

    #[test]
    fn probe_round_trip() {
        let k4 = FlowKey::v4(
            [1, 2, 3, 4].into(),
            5,
            [6, 7, 8, 9].into(),
            10,
            IpProto::Udp,
        );
        let p = Probe::of(&k4);
        let Probe::V4 {
            a,
            b,
            sport,
            dport,
            proto,
        } = p
        else {
            panic!("v4")
        };
        let s = Slot {
            a,
            b,
            sport,
            dport,
            proto,
            flags: F_LIVE,
            ..Slot::default()
        };
        assert!(p.matches(&s, &[]));
        assert_eq!(slot_key(&s, &[]), k4);
        let k6 = FlowKey::v6(
            "2001:db8::1".parse().unwrap(),
            5,
            "2001:db8::2".parse().unwrap(),
            6,
            IpProto::Tcp,
        );
        let p6 = Probe::of(&k6);
        let Probe::V6 {
            addrs,
            sport,
            dport,
            proto,
        } = p6
        else {
            panic!("v6")
        };
        let s6 = Slot {
            a: 0,
            sport,
            dport,
            proto,
            flags: F_LIVE | F_V6,
            ..Slot::default()
        };
        assert!(p6.matches(&s6, &[addrs]));
        assert!(!p.matches(&s6, &[addrs]));
        assert!(!p6.matches(&s, &[addrs]));
        assert_eq!(slot_key(&s6, &[addrs]), k6);
    }
}
