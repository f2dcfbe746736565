//! State sync: stream connection entries from the active balancer to its backup.
//!
//! IPVS' sync daemon, with what it lacks: every message carries a version, the sender's id, an
//! epoch (which changes when the sender restarts), a sequence number and a 128-bit keyed MAC
//! (SipHash-2-4-128 under a key derived for the purpose, e.g. `cluster.derive("sync-mac")`). The
//! receiver ([`SyncReceiver`]) rejects anything malformed, forged, replayed or from an older
//! epoch, and reports gaps, after which the backup asks for a full resync
//! ([`SyncSender::resync_request`]); the active answers with a bulk dump in bounded chunks
//! ([`ConnTable::export_chunk`](crate::ConnTable::export_chunk) → [`SyncSender::encode`]).
//! [`apply`] installs the records with their remaining timeouts.
//!
//! Messages are built to fit an MTU (default 1472 bytes: a 1500-byte Ethernet payload minus IP
//! and UDP headers): 23 header bytes, records of 23 (IPv4) to 47 bytes (IPv6), or 35 to 83 with
//! a NAT reply tuple, and a 16-byte MAC.
//!
//! ```
//! use lb_conntrack::sync::{apply, RecordOp, SyncReceiver, SyncRecord, SyncSender};
//! use lb_conntrack::{Config, ConnTable, NewFlow, Packet, TcpFlags};
//! use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};
//!
//! let mac_key = HashKey::from_passphrase("cluster secret 55c0ffee").derive("sync-mac");
//! let now = Instant::from_secs(10);
//! let mut active = ConnTable::new(Config::with_capacity(64), HashKey::from_bytes([1; 16])).unwrap();
//! let mut backup = ConnTable::new(Config::with_capacity(64), HashKey::from_bytes([2; 16])).unwrap();
//! let k = FlowKey::v4([192, 0, 2, 1].into(), 4000, [203, 0, 113, 1].into(), 80, IpProto::Tcp);
//! active.insert_with(NewFlow::new(k, BackendId(3)).with_first(Packet::original(TcpFlags::SYN, 60)), now);
//!
//! let mut tx = SyncSender::new(1, 1, mac_key, 1472).unwrap();
//! let rec = SyncRecord::from_info(RecordOp::New, &active.get(&k, now).unwrap(), now);
//! let mut msgs = Vec::new();
//! tx.encode(&[rec], &mut msgs);
//!
//! let mut rx = SyncReceiver::new(mac_key);
//! let got = rx.receive(&msgs[0]).unwrap();
//! let report = apply(&mut backup, &got.message, now);
//! assert_eq!(report.installed, 1);
//! assert_eq!(backup.get(&k, now).map(|e| e.backend), Some(BackendId(3)));
//! assert!(rx.receive(&msgs[0]).is_err()); // a replay is rejected
//! ```

mod apply;
mod wire;

pub use apply::{apply, ApplyReport};
pub use wire::{
    decode, seal, MessageKind, Received, RecordOp, SyncError, SyncHeader, SyncMessage,
    SyncReceiver, SyncRecord, SyncSender, HEADER_LEN, MAC_LEN, SYNC_VERSION,
};
