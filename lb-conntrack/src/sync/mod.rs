//! State sync: stream what a takeover needs from the active balancer to its backup.
//!
//! IPVS' sync daemon, with what it lacks: every message carries a version, the sender's id, an
//! epoch (which changes when the sender restarts), a sequence number and a 128-bit keyed MAC
//! (SipHash-2-4-128 under a key derived for the purpose, e.g. `cluster.derive("sync-mac")`). The
//! receiver ([`SyncReceiver`]) rejects anything malformed, forged, replayed or from an older
//! epoch, and reports gaps, after which the backup asks for a full resync
//! ([`SyncSender::resync_request`]); the active answers with a bulk dump in bounded chunks
//! ([`ConnTable::export_chunk`](crate::ConnTable::export_chunk), then
//! [`PersistTable::export_chunk`](crate::PersistTable::export_chunk), each chunk through
//! [`SyncSender::encode_items`] with [`FLAG_BULK`]) and ends it with [`SyncSender::bulk_end`]
//! (flags [`FLAG_BULK`] | [`FLAG_BULK_END`]), so the backup knows its copy is complete.
//! A receiver that restarted accepts a peer's stream only once it echoes the challenge the
//! receiver sent in its resync request ([`SyncReceiver::nonce`], [`SyncSender::set_echo`]), so
//! nothing captured before the restart can be replayed at it (module `wire`).
//!
//! What is synced:
//! - connections ([`SyncRecord`]): key, backend, state, remaining timeout, the full-NAT reply
//!   tuple (the backup reserves its SNAT pair in its own [`SnatPool`](crate::SnatPool), so that
//!   after a takeover no new flow is given it) and the persistence prefix of the client
//!   template the flow pins (the backup pins it too);
//! - persistence templates ([`TemplateRecord`]): client-affinity templates and affinity-key
//!   bindings such as SIP Call-IDs, with their backend, remaining time and idle timeout;
//! - spliced TCP connections ([`SpliceRecord`]): a connection the balancer bound late and
//!   splices (lb-dataplane's splice path), with its backend, SNAT address and port, and the
//!   sequence-number, timestamp and window-scale offsets of its translation
//!   ([`SyncSender::encode_splices`]); this crate only carries them, the splice path
//!   installs them.
//!
//! [`apply`] installs a message's records with their remaining timeouts (backup mode);
//! [`apply_record`] and [`apply_template`] apply one record each and say what changed
//! ([`Applied`]: e.g. an update's previous state, to keep live connection counts), and in
//! merge mode install only what is absent (a master hearing another master).
//!
//! Messages are built to fit an MTU (default 1472 bytes: a 1500-byte Ethernet payload minus IP
//! and UDP headers): 23 header bytes, connection records of 23 (IPv4) to 47 bytes (IPv6), plus
//! 1 with a persistence prefix and 12 or 36 with a NAT reply tuple (at most 84), template
//! records of 25 (IPv4 client) to 49 bytes (IPv6 client; affinity keys 28 or 40), and a 16-byte
//! MAC: 62 plain IPv4 connections per message. Wire version 2 (see `wire.rs` for the layout).
//!
//! ```
//! use lb_conntrack::sync::{
//!     apply, apply_record, Applied, RecordOp, SyncReceiver, SyncRecord, SyncSender,
//!     TemplateRecord, FLAG_BULK, FLAG_BULK_END,
//! };
//! use lb_conntrack::{
//!     Config, ConnTable, FlowState, NewFlow, Packet, Service, TcpFlags, TcpState, TemplateKey,
//! };
//! use lb_core::{BackendId, Duration, FlowKey, HashKey, Instant, IpProto};
//!
//! let mac_key = HashKey::from_passphrase("cluster secret 55c0ffee").derive("sync-mac");
//! let now = Instant::from_secs(10);
//! let mut active = ConnTable::new(Config::with_capacity(64), HashKey::from_bytes([1; 16])).unwrap();
//! let mut backup = ConnTable::new(Config::with_capacity(64), HashKey::from_bytes([2; 16])).unwrap();
//! let k = FlowKey::v4([192, 0, 2, 1].into(), 4000, [203, 0, 113, 1].into(), 80, IpProto::Tcp);
//! // A client template (persistence by /24) and a flow that pins it.
//! let tk = TemplateKey::client(k.src(), 24, Service::of_flow(&k));
//! active.persist_mut().insert(tk, BackendId(3), Duration::from_secs(300), now);
//! let first = Packet::original(TcpFlags::SYN, 60);
//! active.insert_with(NewFlow::new(k, BackendId(3)).with_first(first).with_persist(24), now);
//!
//! let mut tx = SyncSender::new(1, 1, mac_key, 1472).unwrap();
//! tx.set_echo(7); // the challenge of the backup's resync request
//! let rec = SyncRecord::from_info(RecordOp::New, &active.get(&k, now).unwrap(), now);
//! let tpl = TemplateRecord::from_info(false, &active.persist().get(&tk, now).unwrap(), now);
//! let mut msgs = Vec::new();
//! tx.encode_items(&[rec], &[tpl], FLAG_BULK, &mut msgs);
//! msgs.push(tx.bulk_end());
//!
//! let mut rx = SyncReceiver::new(mac_key, 7); // the backup's challenge (random in practice)
//! let got = rx.receive(&msgs[0]).unwrap();
//! let report = apply(&mut backup, &got.message, now);
//! assert_eq!((report.installed, report.templates), (1, 1));
//! assert_eq!(backup.get(&k, now).map(|e| e.backend), Some(BackendId(3)));
//! assert_eq!(backup.persist().refs(&tk), 1); // pinned by the synced flow, as on the active
//! assert!(rx.receive(&msgs[0]).is_err()); // a replay is rejected
//! let end = rx.receive(&msgs[1]).unwrap();
//! assert_eq!(end.message.header.flags, FLAG_BULK | FLAG_BULK_END);
//!
//! // One record at a time, with what it changed.
//! let fin = FlowState::Tcp(TcpState::FinWait);
//! let closing = SyncRecord { op: RecordOp::Update, state: fin, ..rec };
//! assert_eq!(apply_record(&mut backup, &closing, now, false), Applied::Updated { was: rec.state });
//! // Merge mode (a master healing a split brain) never overwrites what it has.
//! assert_eq!(apply_record(&mut backup, &rec, now, true), Applied::Ignored);
//! ```

mod apply;
mod wire;

pub use apply::{apply, apply_record, apply_template, Applied, ApplyReport};
pub use wire::{
    decode, seal, MessageKind, Received, RecordOp, SpliceRecord, SyncError, SyncHeader,
    SyncMessage, SyncReceiver, SyncRecord, SyncSender, TemplateRecord, FLAG_BULK, FLAG_BULK_END,
    HEADER_LEN, MAC_LEN, MIN_MTU, SPLICE_CLOSING, SPLICE_FIN_BACKEND, SPLICE_FIN_CLIENT,
    SPLICE_SACK, SPLICE_TS, SYNC_VERSION,
};
