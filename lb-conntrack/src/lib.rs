//! # lb-conntrack: bounded, flood-resistant connection tracking
//!
//! Stateful switching remembers the decision taken for each flow so that every packet of a
//! connection reaches the same backend. This crate is the table that remembers, sized for the
//! data path of a layer-4 balancer:
//!
//! - [`ConnTable`]: a fixed-capacity table keyed by [`lb_core::FlowKey`] under a keyed hash,
//!   40 bytes per IPv4 entry (key, state, backend, expiry-list links, created and last-seen
//!   times, packet and byte counters) plus a 5.33-byte share of a cache-line hash index: 45.3
//!   B per flow (from [`ConnTable::memory`]), +36 B per IPv6 place ([`Config::ipv6_capacity`]),
//!   +21.3 B with full-NAT reply tuples ([`Config::nat`]), +8 B with an SNAT pool (its
//!   half-open lists). Linux nf_conntrack: 304 B, IPVS: 136 B. No allocation after
//!   construction.
//! - Per-protocol and per-TCP-state idle [`Timeouts`] with IPVS' defaults, a TCP state machine
//!   ([`TcpState`]) driven by the flags seen in each [`Direction`], and incremental expiry
//!   ([`ConnTable::expire`] with a budget, [`ConnTable::next_deadline`]; [`ConnTable::sweep`]
//!   bounds how late a flow seen again and then idle can leave).
//! - Flood resistance: a full table sheds half-open entries first, then the least recently used;
//!   an empty SNAT port pool sheds the oldest half-open entry holding one of its ports
//!   ([`EvictReason::SnatPressure`], O(1)); every eviction and refusal is counted
//!   ([`Counters`]).
//! - Removals as data: every flow that leaves the table (expiry, close, eviction, explicit or
//!   sync removal) is queued as a [`Removal`] (key, backend, [`RemovalReason`], last state,
//!   times, counters) in a preallocated ring ([`Config::removal_queue`], 120 B per record)
//!   that the caller drains with [`ConnTable::poll_removal`]: what live connection counts per
//!   backend ([`FlowState::is_active`], [`Hit::was`]) and session records are built from.
//! - Persistence templates ([`PersistTable`]): client affinity by masked address, or by an
//!   arbitrary affinity key such as a hashed SIP Call-ID.
//! - Full NAT: per-backend SNAT port pools ([`SnatPool`], one per backend address when several
//!   services share a server) and an O(1) reply-tuple index ([`ConnTable::track_reply`]).
//! - Session statistics ([`SessionStats`]): duration and packets-per-session histograms.
//! - [`ShardedConnTable`]: the same behind per-shard `parking_lot` mutexes for several threads.
//! - State sync ([`sync`]): authenticated, sequenced, MTU-sized messages to a backup, carrying
//!   connections (with their NAT tuples and persistence) and persistence templates.
//!
//! The crate does no I/O and reads no clock: every call that depends on time takes `now`.
//!
//! ## Drive loop
//! Per packet: [`ConnTable::track`] (lookup + state update); per burst of packets,
//! [`ConnTable::track_batch`], or [`ConnTable::prefetch`] the burst's hashes and then
//! [`ConnTable::track_hashed`] each (a lookup is two dependent cache misses; a burst overlaps
//! them). On `None`, choose a backend
//! (persistence template first, then the scheduler) and [`ConnTable::insert_with`] the flow with
//! its first packet ([`NewFlow::initial_state`] is the state it is then in). Every
//! millisecond or so: `expire(now, budget)`, and a `sweep` of a slice of the table. After
//! every burst and every `expire`: drain
//! [`ConnTable::poll_removal`] (`expire` stops when the removal ring is full; a per-packet path
//! that finds it full drops the record and counts it in [`Counters::removals_lost`]).
//!
//! ```
//! use lb_conntrack::{
//!     Config, ConnTable, FlowState, Insert, NewFlow, Packet, RemovalReason, TcpFlags, TcpState,
//! };
//! use lb_core::{BackendId, FlowKey, HashKey, Instant, IpProto};
//! use std::net::Ipv4Addr;
//!
//! let mut ct = ConnTable::new(Config::with_capacity(1024), HashKey::from_bytes([7; 16])).unwrap();
//! let flow = FlowKey::v4(Ipv4Addr::new(192, 0, 2, 1), 40000, Ipv4Addr::new(203, 0, 113, 10), 80, IpProto::Tcp);
//! let t0 = Instant::from_secs(1);
//!
//! // First packet: a miss; the scheduler picks backend 3.
//! assert!(ct.track(&flow, Packet::original(TcpFlags::SYN, 60), t0).is_none());
//! let first = Packet::original(TcpFlags::SYN, 60);
//! let new = NewFlow::new(flow, BackendId(3)).with_first(first);
//! assert_eq!(ct.insert_with(new, t0), Insert::New);
//! assert_eq!(new.initial_state(), FlowState::Tcp(TcpState::SynRecv)); // not active yet
//!
//! // Next packet: a hit, the handshake completes: the flow becomes active.
//! let hit = ct.track(&flow, Packet::original(TcpFlags::ACK, 52), t0).unwrap();
//! assert_eq!(hit.backend, BackendId(3));
//! assert_eq!(hit.was, Some(FlowState::Tcp(TcpState::SynRecv)));
//! assert_eq!(hit.state, FlowState::Tcp(TcpState::Established));
//! assert!(hit.state.is_active());
//!
//! // Idle for longer than the ESTABLISHED timeout (15 min): expired, and reported.
//! let later = Instant::from_secs(1 + 901);
//! assert_eq!(ct.next_deadline(), Some(Instant::from_secs(901)));
//! assert_eq!(ct.expire(later, 64), 1);
//! assert!(ct.is_empty());
//! let gone = ct.poll_removal().unwrap();
//! assert_eq!((gone.key, gone.backend, gone.reason), (flow, BackendId(3), RemovalReason::Expired));
//! assert_eq!((gone.packets, gone.bytes), (2, 112));
//! assert!(gone.was_active());
//! assert!(ct.poll_removal().is_none());
//! ```
#![forbid(unsafe_code)]

mod entry;
mod evict;
mod index;
#[cfg(any(test, feature = "model"))]
pub mod model;
mod nat_pool;
mod persist;
mod removal;
mod sharded;
mod stats;
pub mod sync;
mod table;
mod tcp_state;
mod timeout;

pub use entry::{EntryInfo, Hit, Packet};
pub use nat_pool::SnatPool;
pub use persist::{
    mask_addr, PersistCounters, PersistInsert, PersistTable, Service, TemplateInfo, TemplateKey,
};
pub use removal::{Removal, RemovalReason};
pub use sharded::ShardedConnTable;
pub use stats::{
    Counters, EvictReason, Histogram, Refusal, SessionHistograms, SessionStats, HISTOGRAM_BUCKETS,
};
pub use table::{
    Config, ConnTable, EntryRef, Insert, Lookup, MemoryUsage, NewFlow, Prefetched, MAX_BACKEND_ID,
    MAX_CAPACITY, PIPELINE, SETTLE_PER_EXPIRE, SETTLE_PER_INSERT,
};
pub use tcp_state::{Direction, TcpFlags, TcpState};
pub use timeout::{FlowState, Timeouts, MAX_TIMEOUT};

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConntrackError {
    /// A capacity was zero or too large.
    #[error("invalid capacity {capacity}")]
    InvalidCapacity {
        /// The rejected capacity.
        capacity: usize,
    },
    /// A timeout was zero or longer than [`MAX_TIMEOUT`].
    #[error("invalid timeout for state {state:?}")]
    InvalidTimeout {
        /// The state whose timeout is wrong.
        state: FlowState,
    },
    /// An SNAT pool had no address, too many, mixed families, or an empty port range.
    #[error("invalid SNAT pool (1..=256 addresses of one family and a non-empty port range)")]
    InvalidSnatPool,
    /// A sync message was rejected.
    #[error("sync message rejected: {0}")]
    Sync(#[from] sync::SyncError),
}
