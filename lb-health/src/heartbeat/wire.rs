//! Heartbeat wire format: three authenticated message types, each at most [`MAX_MESSAGE_LEN`]
//! bytes (the issue's bound is 150).
//!
//! All integers are big-endian. Every message is
//!
//! ```text
//!  0      2    3    4         8                16
//!  +------+----+----+---------+----------------+---------------------+------------------+
//!  | "LH" | v1 |type| node id | generation     | body (type-specific) | MAC (16 bytes)   |
//!  +------+----+----+---------+----------------+---------------------+------------------+
//! ```
//!
//! | type | name | body | total |
//! |---|---|---|---|
//! | 1 | [`Status`] | seq u64, role u8, priority u8, load u16 | 44 |
//! | 2 | [`RetransmitRequest`] | target u32, target generation u64, from seq u64, count u16 | 54 |
//! | 3 | [`Leave`] | seq u64 | 40 |
//!
//! The MAC is SipHash-2-4 with 128-bit output, keyed with a cluster secret, over every byte before
//! it. SipHash is a pseudo-random function designed for exactly this (authenticating short
//! messages); a 128-bit tag makes forgery by guessing hopeless. A retransmission request carries no
//! sequence number of its own: it is never itself retransmitted or acknowledged, so requests cannot
//! cascade. Decoding checks length, magic, version and type, then the MAC (before interpreting any
//! field), then field domains; it never panics.

use lb_core::HashKey;

use crate::HealthError;

/// The largest encoded message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64;

const MAGIC: [u8; 2] = *b"LH";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 16;
const MAC_LEN: usize = lb_core::mac::TAG_LEN;

mod ty {
    pub(super) const STATUS: u8 = 1;
    pub(super) const RETRANSMIT: u8 = 2;
    pub(super) const LEAVE: u8 = 3;
}

const STATUS_LEN: usize = HEADER_LEN + 12 + MAC_LEN;
const RETRANSMIT_LEN: usize = HEADER_LEN + 22 + MAC_LEN;
const LEAVE_LEN: usize = HEADER_LEN + 8 + MAC_LEN;

/// Identifier of a balancer node in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u32);

impl core::fmt::Display for NodeId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "node{}", self.0)
    }
}

/// A node's role as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Starting up, not yet part of the election.
    #[default]
    Init,
    /// Backup: does not hold the virtual IP.
    Backup,
    /// Master: holds the virtual IP.
    Master,
}

impl Role {
    const fn to_u8(self) -> u8 {
        match self {
            Role::Init => 0,
            Role::Backup => 1,
            Role::Master => 2,
        }
    }

    const fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::Init),
            1 => Some(Role::Backup),
            2 => Some(Role::Master),
            _ => None,
        }
    }
}

/// A periodic status message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Sender.
    pub node: NodeId,
    /// Sender's generation; must increase each time the sender restarts.
    pub generation: u64,
    /// Sequence number within the generation, starting at 1.
    pub seq: u64,
    /// Sender's role.
    pub role: Role,
    /// Sender's election priority (0 = resigning, 255 = owner).
    pub priority: u8,
    /// Sender's load (application-defined, e.g. permille of capacity).
    pub load: u16,
}

/// A request to resend the requester's missing status messages of `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RetransmitRequest {
    /// Requester.
    pub node: NodeId,
    /// Requester's generation.
    pub generation: u64,
    /// The node whose messages are missing.
    pub target: NodeId,
    /// The generation they belong to.
    pub target_generation: u64,
    /// First missing sequence number.
    pub from_seq: u64,
    /// How many, starting at `from_seq`.
    pub count: u16,
}

/// A graceful departure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Leave {
    /// Sender.
    pub node: NodeId,
    /// Sender's generation.
    pub generation: u64,
    /// Sequence number (shares the status sequence space, for replay protection).
    pub seq: u64,
}

/// A heartbeat protocol message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    /// Periodic status.
    Status(Status),
    /// Gap-fill request.
    Retransmit(RetransmitRequest),
    /// Graceful departure.
    Leave(Leave),
}

impl Message {
    /// The sender.
    pub const fn node(&self) -> NodeId {
        match self {
            Message::Status(m) => m.node,
            Message::Retransmit(m) => m.node,
            Message::Leave(m) => m.node,
        }
    }

    /// The sender's generation.
    pub const fn generation(&self) -> u64 {
        match self {
            Message::Status(m) => m.generation,
            Message::Retransmit(m) => m.generation,
            Message::Leave(m) => m.generation,
        }
    }

    /// The encoded length of this message.
    pub const fn encoded_len(&self) -> usize {
        match self {
            Message::Status(_) => STATUS_LEN,
            Message::Retransmit(_) => RETRANSMIT_LEN,
            Message::Leave(_) => LEAVE_LEN,
        }
    }

    /// Encodes and authenticates the message with `key`. Never fails; does not allocate.
    pub fn encode(&self, key: &HashKey) -> Encoded {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let (t, len) = match self {
            Message::Status(_) => (ty::STATUS, STATUS_LEN),
            Message::Retransmit(_) => (ty::RETRANSMIT, RETRANSMIT_LEN),
            Message::Leave(_) => (ty::LEAVE, LEAVE_LEN),
        };
        buf[0..2].copy_from_slice(&MAGIC);
        buf[2] = VERSION;
        buf[3] = t;
        buf[4..8].copy_from_slice(&self.node().0.to_be_bytes());
        buf[8..16].copy_from_slice(&self.generation().to_be_bytes());
        match self {
            Message::Status(m) => {
                buf[16..24].copy_from_slice(&m.seq.to_be_bytes());
                buf[24] = m.role.to_u8();
                buf[25] = m.priority;
                buf[26..28].copy_from_slice(&m.load.to_be_bytes());
            }
            Message::Retransmit(m) => {
                buf[16..20].copy_from_slice(&m.target.0.to_be_bytes());
                buf[20..28].copy_from_slice(&m.target_generation.to_be_bytes());
                buf[28..36].copy_from_slice(&m.from_seq.to_be_bytes());
                buf[36..38].copy_from_slice(&m.count.to_be_bytes());
            }
            Message::Leave(m) => {
                buf[16..24].copy_from_slice(&m.seq.to_be_bytes());
            }
        }
        let body = len - MAC_LEN;
        let tag = mac(key, &buf[..body]);
        buf[body..len].copy_from_slice(&tag);
        Encoded {
            buf,
            len: len as u8,
        }
    }

    /// Decodes and authenticates `bytes` with `key`.
    ///
    /// # Errors
    /// [`HealthError::Truncated`], [`HealthError::Oversized`], [`HealthError::BadMagic`],
    /// [`HealthError::BadVersion`], [`HealthError::UnknownType`], [`HealthError::BadMac`] (forged
    /// or corrupted), [`HealthError::BadField`]. Replay is checked by the node, not here.
    pub fn decode(bytes: &[u8], key: &HashKey) -> Result<Message, HealthError> {
        let Some(header) = bytes.get(..4) else {
            return Err(HealthError::Truncated {
                need: HEADER_LEN,
                have: bytes.len(),
            });
        };
        if header[0..2] != MAGIC {
            return Err(HealthError::BadMagic);
        }
        if header[2] != VERSION {
            return Err(HealthError::BadVersion(header[2]));
        }
        let expected = match header[3] {
            ty::STATUS => STATUS_LEN,
            ty::RETRANSMIT => RETRANSMIT_LEN,
            ty::LEAVE => LEAVE_LEN,
            other => return Err(HealthError::UnknownType(other)),
        };
        if bytes.len() < expected {
            return Err(HealthError::Truncated {
                need: expected,
                have: bytes.len(),
            });
        }
        if bytes.len() > expected {
            return Err(HealthError::Oversized {
                expected,
                have: bytes.len(),
            });
        }
        let body = expected - MAC_LEN;
        let (signed, tag) = bytes.split_at(body);
        if !lb_core::mac::verify(key, signed, tag) {
            return Err(HealthError::BadMac);
        }
        let r = Reader(signed);
        let node = NodeId(r.u32(4));
        let generation = r.u64(8);
        Ok(match header[3] {
            ty::STATUS => Message::Status(Status {
                node,
                generation,
                seq: r.u64(16),
                role: Role::from_u8(r.u8(24)).ok_or(HealthError::BadField("role"))?,
                priority: r.u8(25),
                load: r.u16(26),
            }),
            ty::RETRANSMIT => Message::Retransmit(RetransmitRequest {
                node,
                generation,
                target: NodeId(r.u32(16)),
                target_generation: r.u64(20),
                from_seq: r.u64(28),
                count: r.u16(36),
            }),
            _ => Message::Leave(Leave {
                node,
                generation,
                seq: r.u64(16),
            }),
        })
    }
}

/// An encoded message: a fixed buffer and its length (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    buf: [u8; MAX_MESSAGE_LEN],
    len: u8,
}

impl Encoded {
    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or(&self.buf)
    }
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Big-endian reads at offsets already proven in range by the length check; out-of-range reads
/// (impossible after it) yield zero bytes rather than a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn arr<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(s) = self.0.get(at..at + N) {
            out.copy_from_slice(s);
        }
        out
    }
    fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.arr(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.arr(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.arr(at))
    }
}

/// The tag of a message body: lb-core's keyed MAC, shared with state sync.
fn mac(key: &HashKey, data: &[u8]) -> [u8; MAC_LEN] {
    lb_core::mac::tag(key, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> HashKey {
        HashKey::from_bytes(*b"0123456789abcdef")
    }

    fn status() -> Message {
        Message::Status(Status {
            node: NodeId(7),
            generation: 3,
            seq: 42,
            role: Role::Master,
            priority: 200,
            load: 512,
        })
    }

    #[test]
    fn layout_is_stable() {
        let e = status().encode(&key());
        let b = e.as_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[..16], b"LH\x01\x01\0\0\0\x07\0\0\0\0\0\0\0\x03");
        assert_eq!(&b[16..28], b"\0\0\0\0\0\0\0\x2a\x02\xc8\x02\x00");
        assert!(b.len() <= 150);
    }

    #[test]
    fn rejects_tampering_and_wrong_key() {
        let e = status().encode(&key());
        let good = e.as_bytes();
        assert_eq!(Message::decode(good, &key()), Ok(status()));
        let other = HashKey::from_bytes([9; 16]);
        assert_eq!(Message::decode(good, &other), Err(HealthError::BadMac));
        for i in 4..good.len() {
            let mut b = good.to_vec();
            b[i] ^= 0x01;
            assert_eq!(
                Message::decode(&b, &key()),
                Err(HealthError::BadMac),
                "byte {i}"
            );
        }
        let mut b = good.to_vec();
        b[0] = b'X';
        assert_eq!(Message::decode(&b, &key()), Err(HealthError::BadMagic));
        b[0] = b'L';
        b[2] = 2;
        assert_eq!(Message::decode(&b, &key()), Err(HealthError::BadVersion(2)));
        b[2] = 1;
        b[3] = 9;
        assert_eq!(
            Message::decode(&b, &key()),
            Err(HealthError::UnknownType(9))
        );
        assert_eq!(
            Message::decode(&good[..43], &key()),
            Err(HealthError::Truncated { need: 44, have: 43 })
        );
        assert!(matches!(
            Message::decode(&good[..2], &key()),
            Err(HealthError::Truncated { .. })
        ));
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(
            Message::decode(&long, &key()),
            Err(HealthError::Oversized {
                expected: 44,
                have: 45
            })
        );
    }

    #[test]
    fn bad_role_after_valid_mac() {
        let mut b = status().encode(&key()).as_bytes().to_vec();
        b[24] = 7;
        let t = mac(&key(), &b[..28]);
        b[28..].copy_from_slice(&t);
        assert_eq!(
            Message::decode(&b, &key()),
            Err(HealthError::BadField("role"))
        );
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let node = any::<u32>().prop_map(NodeId);
        let role = prop_oneof![Just(Role::Init), Just(Role::Backup), Just(Role::Master)];
        prop_oneof![
            (
                node.clone(),
                any::<u64>(),
                any::<u64>(),
                role,
                any::<u8>(),
                any::<u16>()
            )
                .prop_map(|(node, generation, seq, role, priority, load)| {
                    Message::Status(Status {
                        node,
                        generation,
                        seq,
                        role,
                        priority,
                        load,
                    })
                }),
            (
                node.clone(),
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u16>()
            )
                .prop_map(
                    |(node, generation, t, target_generation, from_seq, count)| {
                        Message::Retransmit(RetransmitRequest {
                            node,
                            generation,
                            target: NodeId(t),
                            target_generation,
                            from_seq,
                            count,
                        })
                    }
                ),
            (node, any::<u64>(), any::<u64>()).prop_map(|(node, generation, seq)| Message::Leave(
                Leave {
                    node,
                    generation,
                    seq
                }
            )),
        ]
    }

    proptest! {
        /// decode ∘ encode = id, and every message fits the 150-byte bound.
        #[test]
        fn roundtrip(m in arb_message(), k in any::<[u8; 16]>()) {
            let key = HashKey::from_bytes(k);
            let e = m.encode(&key);
            prop_assert!(e.as_bytes().len() <= 150);
            prop_assert_eq!(e.as_bytes().len(), m.encoded_len());
            prop_assert_eq!(Message::decode(e.as_bytes(), &key), Ok(m));
        }

        /// Arbitrary bytes never panic and never authenticate under a key they were not made with.
        #[test]
        fn garbage_is_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            prop_assert!(Message::decode(&bytes, &key()).is_err());
        }
    }
}
