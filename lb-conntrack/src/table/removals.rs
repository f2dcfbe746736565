//! Removal records: draining them, and the removal paths that say why a flow leaves.

use lb_core::{BackendId, FlowKey, Instant, KeyedHash};

use super::ConnTable;
use crate::entry::{slot_key, Probe, Slot};
use crate::removal::{Removal, RemovalReason};
use crate::timeout::FlowState;

impl<H: KeyedHash> ConnTable<H> {
    /// The oldest unread record of a flow that left the table (see [`Removal`]), or `None`
    /// when all have been read. Drain after every burst of packets and after each
    /// [`ConnTable::expire`]: records that find the ring full are lost
    /// ([`crate::Counters::removals_lost`]); `expire` never overflows it.
    #[must_use]
    #[inline]
    pub fn poll_removal(&mut self) -> Option<Removal> {
        self.removals.pop()
    }

    /// Every unread removal record, oldest first (the ring is empty afterwards, even if the
    /// iterator is dropped early).
    pub fn drain_removals(&mut self) -> impl Iterator<Item = Removal> + '_ {
        self.removals.drain()
    }

    /// How many removal records wait to be read.
    #[inline]
    pub fn pending_removals(&self) -> usize {
        self.removals.len()
    }

    /// Records that live slot `s` (with NAT tuple `nat`) leaves for `reason`; a no-op
    /// when recording is off.
    #[inline]
    pub(super) fn record_removal(&mut self, s: &Slot, nat: Option<FlowKey>, reason: RemovalReason) {
        if !self.removals.enabled() {
            return;
        }
        let (packets, bytes) = self.counts_of(s);
        let clock32 = self.clock as u32;
        let back = |t: u32| {
            Instant::from_millis(
                self.clock
                    .saturating_sub(u64::from(clock32.wrapping_sub(t))),
            )
        };
        let r = Removal {
            key: slot_key(s, &self.v6),
            backend: BackendId(s.backend()),
            reason,
            state: FlowState::from_class(s.class).unwrap_or(FlowState::Other),
            nat,
            opened: back(s.created),
            last_seen: back(s.last),
            packets,
            bytes,
        };
        if !self.removals.push(r) {
            self.counters.removals_lost += 1;
        }
    }

    /// [`ConnTable::remove`] for `reason`.
    pub(crate) fn remove_for(
        &mut self,
        key: &FlowKey,
        now: Instant,
        reason: RemovalReason,
    ) -> bool {
        self.advance(now);
        match self.find(self.hasher.hash_flow(key), &Probe::of(key)) {
            Some(i) => {
                self.counters.removed += 1;
                self.remove_slot(i, reason);
                true
            }
            None => false,
        }
    }

    /// Removes live slot `i`, which timed out ([`RemovalReason::timed_out`] of its state).
    pub(crate) fn remove_timed_out(&mut self, i: u32) {
        let class = self.slots.get(i as usize).map_or(0, |s| s.class);
        let state = FlowState::from_class(class).unwrap_or(FlowState::Other);
        self.remove_slot(i, RemovalReason::timed_out(state));
    }
}
