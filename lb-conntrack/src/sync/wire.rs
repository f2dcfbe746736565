//! The sync wire format: encoding, authenticated decoding, replay protection.
//!
//! ```text
//! header (31 bytes)
//!   0  magic "LC"            2
//!   2  version (4)           1
//!   3  kind (1 records, 2 resync request)
//!   4  flags (bit 0: bulk dump, bit 1: last message of a bulk dump)
//!   5  sender id             4   big-endian
//!   9  epoch                 4
//!  13  sequence number       8
//!  21  challenge             8   resync request: the requester's nonce; records: the nonce the
//!                                destination last sent this sender in a request (0: none)
//!  29  item count            2   connection, template and splice records
//! connection records, each
//!   0  op (bits 0-2: 1 new, 2 update, 3 delete) | 0x08 backend tag | 0x10 persistence prefix
//!      | 0x20 reply tuple is IPv6 | 0x40 key is IPv6 | 0x80 has reply tuple
//!   1  state class            1
//!   2  protocol               1
//!   3  source port, destination port            2 + 2
//!   7  source, destination address              4 + 4 (IPv4) or 16 + 16 (IPv6)
//!      backend id             4
//!      [backend tag           4]
//!      remaining timeout, ms  4
//!      [persistence prefix    1]
//!      [reply tuple: source port, destination port, source, destination address]
//! template records, each
//!   0  op (bits 0-2: 4 upsert, 5 delete) | 0x08 established (upserts only) | 0x10 backend
//!      tag | 0x20 client address is IPv6 | 0x40 service address is IPv6 | 0x80 client
//!      template (else an affinity-key template)
//!   1  protocol               1
//!   2  service port           2
//!   4  service address        4 or 16
//!      backend id             4
//!      [backend tag           4]
//!      remaining timeout, ms  4
//!      idle timeout, ms       4
//!      client template: prefix length 1, client address 4 or 16;
//!      affinity template: affinity key 8
//! splice records (spliced TCP connections), each
//!   0  op (bits 0-2: 6 upsert, 7 delete) | 0x10 backend tag | 0x20 SNAT address is IPv6
//!      | 0x40 key is IPv6 (a delete carries the key only)
//!   1  protocol (TCP)         1
//!   2  source port, destination port            2 + 2
//!   6  source, destination address              4 + 4 or 16 + 16
//!      backend id             4
//!      [backend tag           4]
//!      remaining timeout, ms  4
//!      SNAT port, address     2 + 4 or 16
//!      balancer's ISN, backend's ISN            4 + 4
//!      client's first TSval, backend's first TSval, TSval shift to the backend   4 + 4 + 4
//!      client's window scale, backend's window scale (0xff: none)                1 + 1
//!      flags (timestamps, SACK, client FIN, backend FIN, closing)               1
//! MAC (16 bytes): SipHash-2-4-128 under the sync key over everything before it
//! ```
//!
//! Connection records come first in a message, then template records, then splice records.
//! Reserved bits must be zero, and a template's client address must have no bit set beyond
//! its prefix.
//!
//! # Freshness after a restart
//!
//! Sequence numbers and epochs reject replays within what a receiver remembers; a receiver
//! that restarts remembers nothing, so the first message it accepts from a peer (or from a
//! peer's new epoch) must be shown to be new some other way, without trusting clocks. A
//! challenge does it: each [`SyncReceiver`] holds a random nonce (given by the caller), sends
//! it in its resync requests, and the peer's [`SyncSender`] for that stream echoes the last
//! nonce it received in every message ([`SyncSender::set_echo`]). A first contact is accepted
//! only when it echoes the receiver's current nonce; anything else is refused as
//! [`SyncError::Unfresh`], and the receiver answers with a resync request carrying its nonce,
//! after which the real sender's messages (a bulk dump first) are accepted. A message captured
//! before the restart echoes an older nonce (or none) and can never be a first contact again.
//!
//! Resync requests themselves are accepted at first contact without the echo (they carry the
//! requester's challenge, and the peer has no way to know ours yet) but do not open the
//! stream: they set no sequence state, so a replayed request cannot be used to make an old
//! records message look in-sequence. A replayed request can at most make the sender echo an
//! old nonce (its peer then refuses the stream and asks again) or send a bulk dump to the
//! peer the caller maps the sender id to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};

use crate::entry::EntryInfo;
use crate::timeout::{FlowState, MAX_TIMEOUT};

mod splice;
mod template;

pub use splice::{
    SpliceRecord, SPLICE_CLOSING, SPLICE_FIN_BACKEND, SPLICE_FIN_CLIENT, SPLICE_SACK, SPLICE_TS,
};
pub use template::TemplateRecord;

/// The wire version this crate speaks (2: template records, persistence prefixes, bulk end;
/// 3: the challenge field, freshness after a restart; 4: splice records).
pub const SYNC_VERSION: u8 = 4;
/// Header flag: the message is part of a bulk dump (an answer to a resync request).
pub const FLAG_BULK: u8 = 1;
/// Header flag: the last message of a bulk dump (sent with [`FLAG_BULK`], by
/// [`SyncSender::bulk_end`]).
pub const FLAG_BULK_END: u8 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 31;
/// MAC length in bytes.
pub const MAC_LEN: usize = lb_core::mac::TAG_LEN;
const MAGIC: [u8; 2] = *b"LC";
/// The longest record: a splice record with an IPv6 key, a backend tag and an IPv6 SNAT
/// address (a connection record is at most 88 bytes).
const MAX_RECORD_LEN: usize = 91;
/// The shortest item (the delete of an IPv4 splice record).
const MIN_ITEM_LEN: usize = 14;
/// Smallest MTU accepted by [`SyncSender::new`]: room for one record of any kind.
pub const MIN_MTU: usize = HEADER_LEN + MAC_LEN + MAX_RECORD_LEN;
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
    /// A remaining or idle timeout above the maximum.
    #[error("timeout {0} ms out of range")]
    Timeout(u32),
    /// A persistence prefix longer than its address, or a template's client address with bits
    /// set beyond its prefix.
    #[error("bad persistence prefix {0}")]
    Prefix(u8),
    /// A splice record with a field out of range (its protocol is not TCP, a window scale
    /// above 14, unknown flags): the offending byte.
    #[error("bad splice record field {0}")]
    Splice(u8),
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
    /// A first contact (a sender not known, or a new epoch of it) that does not echo this
    /// receiver's current challenge: possibly a message captured before this receiver
    /// restarted. Answer with a resync request carrying [`SyncReceiver::nonce`].
    #[error("first contact from sender {sender} epoch {epoch} without our challenge")]
    Unfresh {
        /// The message's sender id.
        sender: u32,
        /// Its epoch.
        epoch: u32,
    },
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
    /// The sender's name for that backend independent of ids (lb-dataplane: a hash of the
    /// service and the backend's address), so that a receiver whose ids differ (they are
    /// recycled) can find its own; `None`: the receiver takes `backend` as it is.
    pub backend_tag: Option<u32>,
    /// Its state.
    pub state: FlowState,
    /// Milliseconds until it times out (at most [`MAX_TIMEOUT`]).
    pub remaining_ms: u32,
    /// The NAT reply tuple (its protocol is the flow's).
    pub nat: Option<FlowKey>,
    /// The prefix length of the client-persistence template the flow pins (at most 32 for
    /// IPv4, 128 for IPv6), if any: the backup pins the template too.
    pub persist: Option<u8>,
}

impl SyncRecord {
    /// A record of a table entry as seen at `now`.
    pub fn from_info(op: RecordOp, e: &EntryInfo, now: Instant) -> Self {
        let rem = (e.deadline - now).as_millis().min(MAX_TIMEOUT.as_millis());
        SyncRecord {
            op,
            key: e.key,
            backend: e.backend,
            backend_tag: None,
            state: e.state,
            remaining_ms: u32::try_from(rem).unwrap_or(u32::MAX),
            nat: e.nat,
            persist: e.persist.map(|p| p.min(max_prefix(&e.key.src()))),
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
        7 + a
            + 8
            + 4 * usize::from(self.backend_tag.is_some())
            + usize::from(self.persist.is_some())
            + n
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
        if self.persist.is_some() {
            op |= 0x10;
        }
        if self.backend_tag.is_some() {
            op |= 0x08;
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
        if let Some(t) = self.backend_tag {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out.extend_from_slice(&self.remaining_ms.to_be_bytes());
        if let Some(p) = self.persist {
            out.push(p);
        }
        if let Some(r) = self.nat {
            push_ports_addrs(out, &r);
        }
    }
}

/// The longest prefix of `a`'s family.
fn max_prefix(a: &IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn push_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn push_ports_addrs(out: &mut Vec<u8>, k: &FlowKey) {
    out.extend_from_slice(&k.src_port().to_be_bytes());
    out.extend_from_slice(&k.dst_port().to_be_bytes());
    push_addr(out, k.src());
    push_addr(out, k.dst());
}

/// The fixed header of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncHeader {
    /// Message kind.
    pub kind: MessageKind,
    /// Flags: [`FLAG_BULK`], [`FLAG_BULK_END`] (other bits are ignored).
    pub flags: u8,
    /// The sender's id.
    pub sender: u32,
    /// The sender's epoch (changes when it restarts).
    pub epoch: u32,
    /// Sequence number within the epoch, from 1.
    pub seq: u64,
    /// A resync request: the requester's challenge, to be echoed in every later message of the
    /// stream to it ([`SyncSender::set_echo`]); records: the echo (0: none).
    pub challenge: u64,
}

/// A decoded, authenticated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMessage {
    /// The header.
    pub header: SyncHeader,
    /// The connection records (empty for a resync request).
    pub records: Vec<SyncRecord>,
    /// The template records (empty for a resync request).
    pub templates: Vec<TemplateRecord>,
    /// The splice records (empty for a resync request).
    pub splices: Vec<SpliceRecord>,
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
    /// The destination's last challenge, echoed in every message.
    echo: u64,
}

impl SyncSender {
    /// A sender with id `sender` in `epoch` (pick a new, larger epoch at every restart, e.g.
    /// a boot counter or the start time in seconds), MAC key `key` and datagram size `mtu`.
    ///
    /// # Errors
    /// [`crate::ConntrackError::InvalidCapacity`] if `mtu` cannot hold one record of any kind
    /// (135 bytes) or exceeds 65 507.
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
            echo: 0,
        })
    }

    /// Echo `challenge` (the header field of the destination's last accepted resync request)
    /// in every message from now on: the destination accepts a first contact only with it.
    pub fn set_echo(&mut self, challenge: u64) {
        self.echo = challenge;
    }

    /// The challenge echoed (0: none yet).
    pub fn echo(&self) -> u64 {
        self.echo
    }

    /// The last sequence number used.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn start(&mut self, kind: MessageKind, flags: u8, challenge: u64) -> Vec<u8> {
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
        m.extend_from_slice(&challenge.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m
    }

    fn finish(&self, mut m: Vec<u8>, count: u16) -> Vec<u8> {
        if let Some(c) = m.get_mut(HEADER_LEN - 2..HEADER_LEN) {
            c.copy_from_slice(&count.to_be_bytes());
        }
        let t = mac(&self.key, &m);
        m.extend_from_slice(&t);
        m
    }

    /// Encodes `records` into as many messages as needed, appended to `out`.
    pub fn encode(&mut self, records: &[SyncRecord], out: &mut Vec<Vec<u8>>) {
        self.encode_items(records, &[], 0, out);
    }

    /// As [`SyncSender::encode`], marking the messages as part of a bulk dump
    /// ([`FLAG_BULK`]). After the last chunk, send [`SyncSender::bulk_end`].
    pub fn encode_bulk(&mut self, records: &[SyncRecord], out: &mut Vec<Vec<u8>>) {
        self.encode_items(records, &[], FLAG_BULK, out);
    }

    /// Encodes `records`, then `templates`, into as few messages as fit the MTU, each with
    /// header flags `flags` (e.g. [`FLAG_BULK`] for a bulk dump), appended to `out`. Nothing is
    /// appended when both are empty.
    pub fn encode_items(
        &mut self,
        records: &[SyncRecord],
        templates: &[TemplateRecord],
        flags: u8,
        out: &mut Vec<Vec<u8>>,
    ) {
        let items = records
            .iter()
            .map(Item::Record)
            .chain(templates.iter().map(Item::Template));
        self.encode_list(items, flags, out);
    }

    fn encode_list<'a>(
        &mut self,
        items: impl Iterator<Item = Item<'a>>,
        flags: u8,
        out: &mut Vec<Vec<u8>>,
    ) {
        let mut cur: Option<(Vec<u8>, u16)> = None;
        for item in items {
            let need = item.encoded_len();
            if let Some((m, n)) = cur.take() {
                if m.len() + need + MAC_LEN > self.mtu || n == u16::MAX {
                    out.push(self.finish(m, n));
                } else {
                    cur = Some((m, n));
                }
            }
            let echo = self.echo;
            let (m, n) =
                cur.get_or_insert_with(|| (self.start(MessageKind::Records, flags, echo), 0));
            item.encode(m);
            *n += 1;
        }
        if let Some((m, n)) = cur {
            out.push(self.finish(m, n));
        }
    }

    /// Encodes splice records into as few messages as fit the MTU, each with header flags
    /// `flags`, appended to `out` (nothing when `splices` is empty).
    pub fn encode_splices(&mut self, splices: &[SpliceRecord], flags: u8, out: &mut Vec<Vec<u8>>) {
        self.encode_list(splices.iter().map(Item::Splice), flags, out);
    }

    /// The end of a bulk dump: an empty records message flagged [`FLAG_BULK`] and
    /// [`FLAG_BULK_END`], sent after its last chunk, so the backup knows its resync completed.
    pub fn bulk_end(&mut self) -> Vec<u8> {
        let m = self.start(MessageKind::Records, FLAG_BULK | FLAG_BULK_END, self.echo);
        self.finish(m, 0)
    }

    /// A resync request: asks the peer for a bulk dump, and carries `challenge` (this node's
    /// [`SyncReceiver::nonce`]) for the peer to echo.
    pub fn resync_request(&mut self, challenge: u64) -> Vec<u8> {
        let m = self.start(MessageKind::ResyncRequest, 0, challenge);
        self.finish(m, 0)
    }
}

/// One item of a records message.
#[derive(Clone, Copy)]
enum Item<'a> {
    Record(&'a SyncRecord),
    Template(&'a TemplateRecord),
    Splice(&'a SpliceRecord),
}

impl Item<'_> {
    fn encoded_len(&self) -> usize {
        match self {
            Item::Record(r) => r.encoded_len(),
            Item::Template(t) => t.encoded_len(),
            Item::Splice(x) => x.encoded_len(),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Item::Record(r) => r.encode(out),
            Item::Template(t) => t.encode(out),
            Item::Splice(x) => x.encode(out),
        }
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
    /// A 32-bit field present only when `present` (an op flag says so).
    fn opt_u32(&mut self, present: bool) -> Result<Option<u32>, SyncError> {
        if present {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }
    fn u64(&mut self) -> Result<u64, SyncError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    fn addr(&mut self, v6: bool) -> Result<IpAddr, SyncError> {
        Ok(if v6 {
            IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?))
        })
    }
    /// A timeout in milliseconds, at most [`MAX_TIMEOUT`].
    fn timeout(&mut self) -> Result<u32, SyncError> {
        let ms = self.u32()?;
        if u128::from(ms) > MAX_TIMEOUT.as_millis() {
            return Err(SyncError::Timeout(ms));
        }
        Ok(ms)
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
    let challenge = r.u64()?;
    let count = r.u16()?;
    let header = SyncHeader {
        kind,
        flags,
        sender,
        epoch,
        seq,
        challenge,
    };
    // Every item is at least MIN_ITEM_LEN bytes: bound the allocation by what the message can
    // hold.
    let cap = usize::from(count).min(body.len() / MIN_ITEM_LEN);
    let mut records = Vec::with_capacity(cap);
    let mut templates = Vec::new();
    let mut splices = Vec::new();
    for _ in 0..count {
        let opb = r.u8()?;
        match opb & 0x07 {
            // Connection records come first, then templates, then splices.
            1..=3 if templates.is_empty() && splices.is_empty() => {
                records.push(decode_record(&mut r, opb)?)
            }
            4 | 5 if splices.is_empty() => templates.push(template::decode(&mut r, opb)?),
            6 | 7 => splices.push(splice::decode(&mut r, opb)?),
            _ => return Err(SyncError::Op(opb)),
        }
    }
    if kind == MessageKind::ResyncRequest && count != 0 {
        return Err(SyncError::Kind(2));
    }
    let left = body.len() - r.at.min(body.len());
    if left != 0 {
        return Err(SyncError::Trailing(left));
    }
    Ok(SyncMessage {
        header,
        records,
        templates,
        splices,
    })
}

/// Decodes the rest of a connection record whose op byte is `opb`.
fn decode_record(r: &mut Reader<'_>, opb: u8) -> Result<SyncRecord, SyncError> {
    let op = match opb & 0x07 {
        1 => RecordOp::New,
        2 => RecordOp::Update,
        3 => RecordOp::Delete,
        _ => return Err(SyncError::Op(opb)),
    };
    // A v6 reply tuple needs a reply tuple.
    if opb & 0xa0 == 0x20 {
        return Err(SyncError::Op(opb));
    }
    let class = r.u8()?;
    let state = FlowState::from_class(class).ok_or(SyncError::State(class))?;
    let proto = IpProto::from_number(r.u8()?);
    let key = r.key(opb & 0x40 != 0, proto)?;
    let backend = BackendId(r.u32()?);
    let backend_tag = r.opt_u32(opb & 0x08 != 0)?;
    let remaining_ms = r.timeout()?;
    let persist = if opb & 0x10 != 0 {
        let p = r.u8()?;
        if p > max_prefix(&key.src()) {
            return Err(SyncError::Prefix(p));
        }
        Some(p)
    } else {
        None
    };
    let nat = if opb & 0x80 != 0 {
        Some(r.key(opb & 0x20 != 0, proto)?)
    } else {
        None
    };
    Ok(SyncRecord {
        op,
        key,
        backend,
        backend_tag,
        state,
        remaining_ms,
        nat,
        persist,
    })
}

/// An accepted message and what the receiver learnt from its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The message.
    pub message: SyncMessage,
    /// First message from this sender or from a new epoch of it (a records message that
    /// opened the stream, or a resync request while it is not open): ask for a resync.
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

/// What a receiver remembers of one sender.
#[derive(Debug, Clone, Copy)]
struct Peer {
    sender: u32,
    /// The newest epoch seen (a floor: older ones are stale).
    epoch: u32,
    /// The last sequence number accepted in it.
    last: u64,
    /// Whether a records message of `epoch` echoed our challenge (the stream is open); a
    /// resync request of a new epoch alone leaves it closed.
    open: bool,
}

/// Authenticates messages and rejects replays: per sender, only strictly increasing
/// (epoch, sequence) pairs are accepted, so a replayed or reordered message can never roll an
/// entry back to an older state; and a records message opens a sender's stream (the first
/// one, or the first of a new epoch) only when it echoes this receiver's challenge (module
/// docs: freshness after a restart).
#[derive(Debug, Clone)]
pub struct SyncReceiver {
    key: HashKey,
    nonce: u64,
    peers: Vec<Peer>,
}

impl SyncReceiver {
    /// A receiver verifying MACs under `key`, with challenge `nonce`: a fresh random value at
    /// every start (e.g. from the OS RNG), never reused across restarts. 0 (which means "no
    /// echo" on the wire) is taken as 1.
    pub fn new(key: HashKey, nonce: u64) -> Self {
        SyncReceiver {
            key,
            nonce: nonce.max(1),
            peers: Vec::new(),
        }
    }

    /// The challenge to send in resync requests ([`SyncSender::resync_request`]).
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Decodes, authenticates and checks the freshness of a message.
    ///
    /// A resync request is accepted (for its challenge) when it is newer than anything seen
    /// from its sender, without opening the stream; a records message that opens the stream
    /// (first contact, or a new epoch) must echo [`SyncReceiver::nonce`].
    ///
    /// # Errors
    /// As [`decode`], plus [`SyncError::Replayed`], [`SyncError::StaleEpoch`],
    /// [`SyncError::Unfresh`] and [`SyncError::TooManyPeers`].
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Received, SyncError> {
        let message = decode(bytes, &self.key)?;
        let h = message.header;
        let request = h.kind == MessageKind::ResyncRequest;
        let unfresh = SyncError::Unfresh {
            sender: h.sender,
            epoch: h.epoch,
        };
        let idx = match self.peers.iter().position(|p| p.sender == h.sender) {
            Some(i) => i,
            None if !request && h.challenge != self.nonce => return Err(unfresh),
            None if self.peers.len() >= MAX_PEERS => return Err(SyncError::TooManyPeers),
            None => {
                let p = Peer {
                    sender: h.sender,
                    epoch: h.epoch,
                    last: h.seq,
                    open: !request,
                };
                self.peers.push(p);
                return Ok(Received {
                    message,
                    first_contact: true,
                    gap: None,
                });
            }
        };
        let Some(p) = self.peers.get_mut(idx) else {
            return Err(SyncError::TooManyPeers);
        };
        if h.epoch < p.epoch {
            return Err(SyncError::StaleEpoch {
                epoch: h.epoch,
                current: p.epoch,
            });
        }
        let newer = h.epoch > p.epoch || h.seq > p.last;
        if !newer {
            return Err(SyncError::Replayed {
                seq: h.seq,
                last: p.last,
            });
        }
        let (first_contact, gap) = if request {
            // A new epoch's request closes the stream until a records message of that epoch
            // echoes our challenge.
            if h.epoch > p.epoch {
                p.open = false;
            }
            (!p.open, None)
        } else if h.epoch > p.epoch || !p.open {
            if h.challenge != self.nonce {
                return Err(unfresh);
            }
            p.open = true;
            (true, None)
        } else {
            let missing = h.seq - p.last - 1;
            (false, (missing > 0).then_some(missing))
        };
        p.epoch = h.epoch;
        p.last = h.seq;
        Ok(Received {
            message,
            first_contact,
            gap,
        })
    }
}

#[cfg(test)]
mod tests;
