//! What lookups hand back: the outcome enum and a borrowed entry handle.

use lb_core::{BackendId, FlowKey, Instant, KeyedHash, SipHash13};

use super::ConnTable;
use crate::entry::{EntryInfo, Hit, Packet, Slot};
use crate::removal::RemovalReason;
use crate::timeout::FlowState;

/// Outcome of a lookup.
#[derive(Debug)]
#[non_exhaustive]
pub enum Lookup<'a, H: KeyedHash = SipHash13> {
    /// A live entry: read it, feed it the packet with [`EntryRef::update`].
    Hit(EntryRef<'a, H>),
    /// No entry.
    Miss,
    /// The entry had timed out; it was removed (and recorded, see
    /// [`ConnTable::poll_removal`]). Its backend is given as a hint.
    Expired {
        /// The backend the flow was bound to.
        backend: BackendId,
    },
}

/// A live entry borrowed from the table.
#[derive(Debug)]
pub struct EntryRef<'a, H: KeyedHash = SipHash13> {
    pub(super) table: &'a mut ConnTable<H>,
    pub(super) idx: u32,
}

impl<H: KeyedHash> EntryRef<'_, H> {
    fn slot(&self) -> Slot {
        self.table
            .slots
            .get(self.idx as usize)
            .copied()
            .unwrap_or_default()
    }

    /// The flow's backend.
    #[inline]
    pub fn backend(&self) -> BackendId {
        BackendId(self.slot().backend())
    }

    /// The protocol state.
    #[inline]
    pub fn state(&self) -> FlowState {
        FlowState::from_class(self.slot().class).unwrap_or(FlowState::Other)
    }

    /// The NAT reply tuple, if any.
    #[inline]
    pub fn nat(&self) -> Option<FlowKey> {
        self.table.nat_of(self.idx)
    }

    /// A full snapshot of the entry.
    pub fn info(&self) -> EntryInfo {
        self.table.info(self.idx)
    }

    /// Feeds a packet to the entry: state machine, counters, idle timer.
    #[inline]
    pub fn update(&mut self, pkt: Packet, now: Instant) -> Hit {
        let now32 = self.table.advance(now);
        self.table.apply_packet(self.idx, pkt, now32, false)
    }

    /// Removes the entry (recorded as a [`RemovalReason::Removed`] removal).
    pub fn remove(self) {
        self.table.counters.removed += 1;
        self.table.remove_slot(self.idx, RemovalReason::Removed);
    }
}

/// Heap memory of a table, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// The slab of 40-byte slots (key, state, backend, list links, times, counters).
    pub slots: usize,
    /// The hash index (64-byte buckets of 15 entries, 5.33 B per entry of capacity).
    pub index: usize,
    /// IPv6 address store and its free list.
    pub ipv6: usize,
    /// The elephant store: exact counters for flows that outgrow a slot's, and its free list.
    pub elephants: usize,
    /// NAT reply tuples and their index.
    pub nat: usize,
    /// The removal ring ([`crate::Config::removal_queue`] records of
    /// `size_of::<`[`crate::Removal`]`>()` bytes): a fixed overhead, not per flow.
    pub removals: usize,
    /// Everything, including persistence templates and session histograms.
    pub total: usize,
}
