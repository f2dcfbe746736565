//! The sync wire format: encoding, authenticated decoding, replay protection.
//!
//! ```text
//! header (23 bytes)
//!   0  magic "LC"            2
//!   2  version (1)           1
//!   3  kind (1 records, 2 resync request)
//!   4  flags (bit 0: bulk dump)
//!   5  sender id             4   big-endian
//!   9  epoch                 4
//!  13  sequence number       8
//!  21  record count          2
//! records, each
//!   0  op (bits 0-1: 1 new, 2 update, 3 delete) | 0x20 reply tuple is IPv6 | 0x40 key is IPv6
//!      | 0x80 has reply tuple
//!   1  state class            1
//!   2  protocol               1
//!   3  source port, destination port            2 + 2
//!   7  source, destination address              4 + 4 (IPv4) or 16 + 16 (IPv6)
//!      backend id             4
//!      remaining timeout, ms  4
//!      [reply tuple: source port, destination port, source, destination address]
//! MAC (16 bytes): SipHash-2-4-128 under the sync key over everything before it
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};

use crate::entry::EntryInfo;
use crate::timeout::{FlowState, MAX_TIMEOUT};

/// The wire version this crate speaks.
pub const SYNC_VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 23;
/// MAC length in bytes.
pub const MAC_LEN: usize = lb_core::mac::TAG_LEN;
const MAGIC: [u8; 2] = *b"LC";
/// Smallest MTU accepted by [`SyncSender::new`]: room for one IPv6 record with a reply tuple.
const MIN_MTU: usize = HEADER_LEN + MAC_LEN + 83;
/// Peers a receiver tracks.
const MAX_PEERS: usize = 64;

/// Why a sync message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The message ended early.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Not a sync message.
    #[error("bad magic")]
    BadMagic,
    /// A version this crate does not speak.
    #[error("unsupported version {0}")]
    Version(u8),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Unknown record operation.
    #[error("unknown record op {0}")]
    Op(u8),
    /// Unknown state class.
    #[error("unknown state {0}")]
    State(u8),
    /// A remaining timeout above the maximum.
    #[error("remaining timeout {0} ms out of range")]
    Timeout(u32),
    /// Bytes left over after the declared records.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// The MAC did not verify: forged or corrupted.
    #[error("bad MAC")]
    BadMac,
    /// A sequence number already seen (or older) in the sender's current epoch.
    #[error("replayed or reordered message: sequence {seq}, last accepted {last}")]
    Replayed {
        /// The message's sequence number.
        seq: u64,
        /// The last accepted.
        last: u64,
    },
    /// A message from an older epoch of the sender (before a restart).
    #[error("message from old epoch {epoch}, current {current}")]
    StaleEpoch {
        /// The message's epoch.
        epoch: u32,
        /// The sender's current epoch.
        current: u32,
    },
    /// Too many distinct senders.
    #[error("too many peers")]
    TooManyPeers,
}

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Connection records.
    Records,
    /// "Send me everything": the sender has a gap or just started.
    ResyncRequest,
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOp {
    /// A new connection.
    New,
    /// A state change or refresh.
    Update,
    /// The connection is gone.
    Delete,
}

/// One connection as synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRecord {
    /// What to do.
    pub op: RecordOp,
    /// The flow.
    pub key: FlowKey,
    /// Its backend.
    pub backend: BackendId,
    /// Its state.
    pub state: FlowState,
    /// Milliseconds until it times out (at most [`MAX_TIMEOUT`]).
    pub remaining_ms: u32,
    /// The NAT reply tuple (its protocol is the flow's).
    pub nat: Option<FlowKey>,
}

impl SyncRecord {
    /// A record of a table entry as seen at `now`.
    pub fn from_info(op: RecordOp, e: &EntryInfo, now: Instant) -> Self {
        let rem = (e.deadline - now).as_millis().min(MAX_TIMEOUT.as_millis());
        SyncRecord {
            op,
            key: e.key,
            backend: e.backend,
            state: e.state,
            remaining_ms: u32::try_from(rem).unwrap_or(u32::MAX),
            nat: e.nat,
        }
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        let a = if self.key.is_ipv4() { 8 } else { 32 };
        let n = match self.nat {
            None => 0,
            Some(r) if r.is_ipv4() => 12,
            Some(_) => 36,
        };
        7 + a + 8 + n
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let mut op = match self.op {
            RecordOp::New => 1,
            RecordOp::Update => 2,
            RecordOp::Delete => 3,
        };
        if !self.key.is_ipv4() {
            op |= 0x40;
        }
        if let Some(r) = self.nat {
            op |= 0x80;
            if !r.is_ipv4() {
                op |= 0x20;
            }
        }
        out.push(op);
        out.push(self.state.class());
        out.push(self.key.proto().number());
        push_ports_addrs(out, &self.key);
        out.extend_from_slice(&self.backend.get().to_be_bytes());
        out.extend_from_slice(&self.remaining_ms.to_be_bytes());
        if let Some(r) = self.nat {
            push_ports_addrs(out, &r);
        }
    }
}

fn push_ports_addrs(out: &mut Vec<u8>, k: &FlowKey) {
    out.extend_from_slice(&k.src_port().to_be_bytes());
    out.extend_from_slice(&k.dst_port().to_be_bytes());
    for a in [k.src(), k.dst()] {
        match a {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }
}

/// The fixed header of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncHeader {
    /// Message kind.
    pub kind: MessageKind,
    /// Flags (bit 0: part of a bulk dump).
    pub flags: u8,
    /// The sender's id.
    pub sender: u32,
    /// The sender's epoch (changes when it restarts).
    pub epoch: u32,
    /// Sequence number within the epoch, from 1.
    pub seq: u64,
}

/// A decoded, authenticated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMessage {
    /// The header.
    pub header: SyncHeader,
    /// The records (empty for a resync request).
    pub records: Vec<SyncRecord>,
}

/// The tag of a message body: lb-core's keyed MAC, shared with the heartbeat.
fn mac(key: &HashKey, bytes: &[u8]) -> [u8; MAC_LEN] {
    lb_core::mac::tag(key, bytes)
}

/// Appends the MAC to a message body: what [`SyncSender`] does last. For tools, tests and
/// fuzzing, which need well-authenticated messages with arbitrary contents.
pub fn seal(body: &[u8], key: &HashKey) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + MAC_LEN);
    m.extend_from_slice(body);
    m.extend_from_slice(&mac(key, body));
    m
}

/// Builds messages: sequenced, authenticated, each at most `mtu` bytes.
#[derive(Debug, Clone)]
pub struct SyncSender {
    sender: u32,
    epoch: u32,
    seq: u64,
    key: HashKey,
    mtu: usize,
}

impl SyncSender {
    /// A sender with id `sender` in `epoch` (pick a new, larger epoch at every restart, e.g.
    /// a boot counter or the start time in seconds), MAC key `key` and datagram size `mtu`.
    ///
    /// # Errors
    /// [`crate::ConntrackError::InvalidCapacity`] if `mtu` cannot hold one record of any kind
    /// (122 bytes) or exceeds 65 507.
    pub fn new(
        sender: u32,
        epoch: u32,
        key: HashKey,
        mtu: usize,
    ) -> Result<Self, crate::ConntrackError> {
        if !(MIN_MTU..=65_507).contains(&mtu) {
            return Err(crate::ConntrackError::InvalidCapacity { capacity: mtu });
        }
        Ok(SyncSender {
            sender,
            epoch,
            seq: 0,
            key,
            mtu,
        })
    }

    /// The last sequence number used.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn start(&mut self, kind: MessageKind, flags: u8) -> Vec<u8> {
        self.seq += 1;
        let mut m = Vec::with_capacity(self.mtu);
        m.extend_from_slice(&MAGIC);
        m.push(SYNC_VERSION);
        m.push(match kind {
            MessageKind::Records => 1,
            MessageKind::ResyncRequest => 2,
        });
        m.push(flags);
        m.extend_from_slice(&self.sender.to_be_bytes());
        m.extend_from_slice(&self.epoch.to_be_bytes());
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m
    }

    fn finish(&self, mut m: Vec<u8>, count: u16) -> Vec<u8> {
        if let Some(c) = m.get_mut(21..23) {
            c.copy_from_slice(&count.to_be_bytes());
        }
        let t = mac(&self.key, &m);
        m.extend_from_slice(&t);
        m
    }

    /// Encodes `records` into as many messages as needed, appended to `out`.
    pub fn encode(&mut self, records: &[SyncRecord], out: &mut Vec<Vec<u8>>) {
        self.encode_flags(records, 0, out);
    }

    /// As [`SyncSender::encode`], marking the messages as part of a bulk dump.
    pub fn encode_bulk(&mut self, records: &[SyncRecord], out: &mut Vec<Vec<u8>>) {
        self.encode_flags(records, 1, out);
    }

    fn encode_flags(&mut self, records: &[SyncRecord], flags: u8, out: &mut Vec<Vec<u8>>) {
        let mut cur: Option<(Vec<u8>, u16)> = None;
        for r in records {
            let need = r.encoded_len();
            if let Some((m, n)) = cur.take() {
                if m.len() + need + MAC_LEN > self.mtu || n == u16::MAX {
                    out.push(self.finish(m, n));
                } else {
                    cur = Some((m, n));
                }
            }
            let (m, n) = cur.get_or_insert_with(|| (self.start(MessageKind::Records, flags), 0));
            r.encode(m);
            *n += 1;
        }
        if let Some((m, n)) = cur {
            out.push(self.finish(m, n));
        }
    }

    /// A resync request: asks the peer for a bulk dump.
    pub fn resync_request(&mut self) -> Vec<u8> {
        let m = self.start(MessageKind::ResyncRequest, 0);
        self.finish(m, 0)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SyncError> {
        let end = self.at.checked_add(n).ok_or(SyncError::Truncated {
            need: usize::MAX,
            have: self.b.len(),
        })?;
        let s = self.b.get(self.at..end).ok_or(SyncError::Truncated {
            need: end,
            have: self.b.len(),
        })?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, SyncError> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], SyncError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, SyncError> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, SyncError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, SyncError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    fn key(&mut self, v6: bool, proto: IpProto) -> Result<FlowKey, SyncError> {
        let sp = self.u16()?;
        let dp = self.u16()?;
        Ok(if v6 {
            let s = Ipv6Addr::from(self.arr::<16>()?);
            let d = Ipv6Addr::from(self.arr::<16>()?);
            FlowKey::v6(s, sp, d, dp, proto)
        } else {
            let s = Ipv4Addr::from(self.arr::<4>()?);
            let d = Ipv4Addr::from(self.arr::<4>()?);
            FlowKey::v4(s, sp, d, dp, proto)
        })
    }
}

/// Decodes and authenticates one message (no replay check: see [`SyncReceiver`]).
///
/// # Errors
/// Any [`SyncError`] but `Replayed`, `StaleEpoch` and `TooManyPeers`. The MAC is checked before
/// anything else is parsed, so an unauthenticated sender learns nothing about the parser.
pub fn decode(bytes: &[u8], key: &HashKey) -> Result<SyncMessage, SyncError> {
    let min = HEADER_LEN + MAC_LEN;
    if bytes.len() < min {
        return Err(SyncError::Truncated {
            need: min,
            have: bytes.len(),
        });
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    if !lb_core::mac::verify(key, body, tag) {
        return Err(SyncError::BadMac);
    }
    let mut r = Reader { b: body, at: 0 };
    if r.arr::<2>()? != MAGIC {
        return Err(SyncError::BadMagic);
    }
    let v = r.u8()?;
    if v != SYNC_VERSION {
        return Err(SyncError::Version(v));
    }
    let kind = match r.u8()? {
        1 => MessageKind::Records,
        2 => MessageKind::ResyncRequest,
        k => return Err(SyncError::Kind(k)),
    };
    let flags = r.u8()?;
    let sender = r.u32()?;
    let epoch = r.u32()?;
    let seq = r.u64()?;
    let count = r.u16()?;
    let header = SyncHeader {
        kind,
        flags,
        sender,
        epoch,
        seq,
    };
    // Every record is at least 23 bytes: bound the allocation by what the message can hold.
    let mut records = Vec::with_capacity(usize::from(count).min(body.len() / 23));
    for _ in 0..count {
        let opb = r.u8()?;
        let op = match opb & 0x03 {
            1 => RecordOp::New,
            2 => RecordOp::Update,
            3 => RecordOp::Delete,
            _ => return Err(SyncError::Op(opb)),
        };
        if opb & 0x1c != 0 {
            return Err(SyncError::Op(opb));
        }
        let class = r.u8()?;
        let state = FlowState::from_class(class).ok_or(SyncError::State(class))?;
        let proto = IpProto::from_number(r.u8()?);
        let key = r.key(opb & 0x40 != 0, proto)?;
        let backend = BackendId(r.u32()?);
        let remaining_ms = r.u32()?;
        if u128::from(remaining_ms) > MAX_TIMEOUT.as_millis() {
            return Err(SyncError::Timeout(remaining_ms));
        }
        let nat = if opb & 0x80 != 0 {
            Some(r.key(opb & 0x20 != 0, proto)?)
        } else if opb & 0x20 != 0 {
            return Err(SyncError::Op(opb));
        } else {
            None
        };
        records.push(SyncRecord {
            op,
            key,
            backend,
            state,
            remaining_ms,
            nat,
        });
    }
    if kind == MessageKind::ResyncRequest && count != 0 {
        return Err(SyncError::Kind(2));
    }
    let left = body.len() - r.at.min(body.len());
    if left != 0 {
        return Err(SyncError::Trailing(left));
    }
    Ok(SyncMessage { header, records })
}

/// An accepted message and what the receiver learnt from its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The message.
    pub message: SyncMessage,
    /// First message from this sender or from a new epoch of it: ask for a resync.
    pub first_contact: bool,
    /// Messages were lost between the last accepted and this one: ask for a resync.
    /// Holds the number of missing sequence numbers.
    pub gap: Option<u64>,
}

impl Received {
    /// Whether the receiver should send a resync request.
    pub fn needs_resync(&self) -> bool {
        self.first_contact || self.gap.is_some()
    }
}

/// Authenticates messages and rejects replays: per sender, only strictly increasing
/// (epoch, sequence) pairs are accepted, so a replayed or reordered message can never roll an
/// entry back to an older state.
#[derive(Debug, Clone)]
pub struct SyncReceiver {
    key: HashKey,
    peers: Vec<(u32, u32, u64)>,
}

impl SyncReceiver {
    /// A receiver verifying MACs under `key`.
    pub fn new(key: HashKey) -> Self {
        SyncReceiver {
            key,
            peers: Vec::new(),
        }
    }

    /// Decodes, authenticates and checks the freshness of a message.
    ///
    /// # Errors
    /// As [`decode`], plus [`SyncError::Replayed`], [`SyncError::StaleEpoch`] and
    /// [`SyncError::TooManyPeers`].
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Received, SyncError> {
        let message = decode(bytes, &self.key)?;
        let h = message.header;
        let (first_contact, gap) = match self.peers.iter_mut().find(|p| p.0 == h.sender) {
            None => {
                if self.peers.len() >= MAX_PEERS {
                    return Err(SyncError::TooManyPeers);
                }
                self.peers.push((h.sender, h.epoch, h.seq));
                (true, None)
            }
            Some(p) => {
                if h.epoch < p.1 {
                    return Err(SyncError::StaleEpoch {
                        epoch: h.epoch,
                        current: p.1,
                    });
                }
                if h.epoch > p.1 {
                    *p = (h.sender, h.epoch, h.seq);
                    (true, None)
                } else if h.seq <= p.2 {
                    return Err(SyncError::Replayed {
                        seq: h.seq,
                        last: p.2,
                    });
                } else {
                    let missing = h.seq - p.2 - 1;
                    p.2 = h.seq;
                    (false, (missing > 0).then_some(missing))
                }
            }
        };
        Ok(Received {
            message,
            first_contact,
            gap,
        })
    }
}

#[cfg(test)]
mod tests;
