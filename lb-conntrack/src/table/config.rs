//! Table configuration and insertion inputs and outcomes.

use lb_core::{BackendId, FlowKey};

use crate::entry::Packet;
use crate::stats::{EvictReason, Refusal};
use crate::tcp_state::Direction;
use crate::timeout::{FlowState, Timeouts};
use crate::ConntrackError;

/// The largest capacity accepted (2^24 − 1 = 16 777 215 entries: slots link to each other with
/// 24-bit indices to fit in 40 bytes; shard a [`crate::ShardedConnTable`] for more).
pub const MAX_CAPACITY: usize = (1 << 24) - 1;

/// The largest backend id a table stores (65 535: slots keep 16-bit backend ids to fit in 40
/// bytes). An insert with a larger id is refused ([`crate::Refusal::BackendId`]).
pub const MAX_BACKEND_ID: u32 = u16::MAX as u32;

/// How far eviction walks down a list looking for an IPv6 victim.
pub(super) const V6_VICTIM_WALK: usize = 16;

/// Table configuration, validated by [`crate::ConnTable::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Maximum number of entries (fixed, preallocated).
    pub capacity: usize,
    /// Maximum number of IPv6 entries (≤ `capacity`). An IPv6 key does not fit the 40-byte slot:
    /// its address pair (32 bytes) and a free-list index (4 bytes) are preallocated for each of
    /// these, so an IPv6 flow costs 36 bytes more than an IPv4 one, and each configured IPv6
    /// place costs 36 bytes whether used or not.
    pub ipv6_capacity: usize,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Keep NAT reply tuples and their reverse index (full NAT). Costs
    /// a 16-byte reply tuple and a reply index share (5.33 B) per entry of capacity.
    pub nat: bool,
    /// Record session statistics (duration, packets) when entries leave. Per-flow counters
    /// (created time, packets, bytes) are kept either way: they live in the slot.
    pub flow_stats: bool,
    /// Size of the elephant store: how many flows at once may keep exact counters beyond a
    /// slot's (2^26 − 1 packets, 2^37 − 1 bytes); 20 bytes each. Past that, counters saturate
    /// (see [`crate::Counters::counts_saturated`]).
    pub elephants: usize,
    /// When full and no half-open entry is left, evict the least recently used entry even if
    /// established (`true`, default), or refuse the new one (`false`).
    pub evict_established: bool,
    /// Capacity of the persistence-template table.
    pub persist_capacity: usize,
    /// Keep per-backend session histograms for backend ids below this bound (at most
    /// [`MAX_BACKEND_ID`] + 1: no id lies beyond; preallocated, about 1 KiB each).
    pub stats_backends: usize,
    /// Capacity of the removal ring: how many [`crate::Removal`] records may wait for
    /// [`crate::ConnTable::poll_removal`] (`size_of::<Removal>()` bytes each, preallocated).
    /// 0 turns recording off (and costs nothing). [`crate::ConnTable::expire`] never overflows
    /// it; the per-packet paths drop (and count, [`crate::Counters::removals_lost`]) records
    /// that find it full, so size it for a few bursts and drain after each.
    pub removal_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            capacity: 65_536,
            ipv6_capacity: 16_384,
            timeouts: Timeouts::default(),
            nat: false,
            flow_stats: true,
            elephants: 1_024,
            evict_established: true,
            persist_capacity: 4_096,
            stats_backends: 256,
            removal_queue: 4_096,
        }
    }
}

impl Config {
    /// A default configuration with the given capacity (and a quarter of it for IPv6).
    pub fn with_capacity(capacity: usize) -> Self {
        Config {
            capacity,
            ipv6_capacity: capacity / 4,
            ..Config::default()
        }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`ConntrackError::InvalidCapacity`] for a zero or too large capacity (or an IPv6 /
    /// persistence capacity or removal ring size out of range), [`ConntrackError::InvalidTimeout`] for a bad timeout.
    pub fn validate(&self) -> Result<(), ConntrackError> {
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(ConntrackError::InvalidCapacity {
                capacity: self.capacity,
            });
        }
        if self.ipv6_capacity > self.capacity {
            return Err(ConntrackError::InvalidCapacity {
                capacity: self.ipv6_capacity,
            });
        }
        if self.elephants > MAX_CAPACITY {
            return Err(ConntrackError::InvalidCapacity {
                capacity: self.elephants,
            });
        }
        if self.persist_capacity == 0 || self.persist_capacity > MAX_CAPACITY {
            return Err(ConntrackError::InvalidCapacity {
                capacity: self.persist_capacity,
            });
        }
        if self.removal_queue > MAX_CAPACITY {
            return Err(ConntrackError::InvalidCapacity {
                capacity: self.removal_queue,
            });
        }
        if self.stats_backends > MAX_BACKEND_ID as usize + 1 {
            return Err(ConntrackError::InvalidCapacity {
                capacity: self.stats_backends,
            });
        }
        self.timeouts.validate()
    }
}

/// A new flow to insert (see [`crate::ConnTable::insert_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewFlow {
    /// The flow key, original direction.
    pub key: FlowKey,
    /// The backend chosen for it.
    pub backend: BackendId,
    /// The NAT reply tuple (backend addr:port → SNAT addr:port), indexed for reverse lookup.
    pub nat: Option<FlowKey>,
    /// Pin the client-persistence template `(src masked to this prefix, service)` while the
    /// flow lives (the template must exist in [`crate::ConnTable::persist_mut`]).
    pub persist_prefix: Option<u8>,
    /// The packet that created the flow, fed to the state machine.
    pub first: Option<Packet>,
}

impl NewFlow {
    /// A flow bound to `backend`, without NAT, persistence or first packet.
    pub const fn new(key: FlowKey, backend: BackendId) -> Self {
        NewFlow {
            key,
            backend,
            nat: None,
            persist_prefix: None,
            first: None,
        }
    }

    /// With a NAT reply tuple.
    #[must_use]
    pub const fn with_nat(mut self, reply: FlowKey) -> Self {
        self.nat = Some(reply);
        self
    }

    /// Pinning the client template of prefix length `prefix`.
    #[must_use]
    pub const fn with_persist(mut self, prefix: u8) -> Self {
        self.persist_prefix = Some(prefix);
        self
    }

    /// With the packet that created the flow.
    #[must_use]
    pub const fn with_first(mut self, pkt: Packet) -> Self {
        self.first = Some(pkt);
        self
    }

    /// The state the flow is in once inserted (by [`crate::ConnTable::insert_with`] or
    /// [`crate::ConnTable::insert_snat`], outcome [`Insert::is_inserted`]): its protocol's
    /// initial state after the first packet, if any. Lets a caller that counts connections
    /// by state ([`FlowState::is_active`]) account for a new flow without a second lookup.
    pub fn initial_state(&self) -> FlowState {
        let start = FlowState::initial(self.key.proto());
        let Some(pkt) = self.first else {
            return start;
        };
        let reply = pkt.dir == Direction::Reply;
        match start {
            // An entry with a NAT tuple sees both directions from the start.
            FlowState::Tcp(t) => {
                FlowState::Tcp(t.next(pkt.dir, pkt.tcp_flags, reply || self.nat.is_some()))
            }
            FlowState::UdpUnconfirmed if reply => FlowState::Udp,
            other => other,
        }
    }
}

/// Outcome of an insertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Insert {
    /// Inserted into free space (possibly after reclaiming an expired entry).
    New,
    /// Inserted after evicting `victim`.
    Evicted {
        /// The evicted flow.
        victim: FlowKey,
        /// Why it was chosen.
        reason: EvictReason,
    },
    /// A live entry with this key exists; it was left unchanged.
    Exists,
    /// Not inserted.
    Refused(Refusal),
}

impl Insert {
    /// Whether the flow is now in the table as a new entry.
    pub const fn is_inserted(&self) -> bool {
        matches!(self, Insert::New | Insert::Evicted { .. })
    }
}
