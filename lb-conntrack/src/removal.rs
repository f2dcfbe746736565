//! Removals as data: every flow that leaves the table, with why and its counters.
//!
//! Each time a live flow leaves a [`ConnTable`](crate::ConnTable) (expiry, a close, an
//! eviction, an explicit or sync removal, or a finished TCP entry restarted by a new SYN) the
//! table records one [`Removal`] in a ring preallocated at construction
//! ([`Config::removal_queue`](crate::Config::removal_queue) records). The caller drains it with
//! [`ConnTable::poll_removal`](crate::ConnTable::poll_removal): this one stream feeds live
//! load (connection counts per backend), session statistics and sync deletes.
//!
//! Nothing accepted is lost by [`ConnTable::expire`](crate::ConnTable::expire), which caps its
//! work at the ring's free space. The per-packet paths remove a bounded number of flows per
//! call (a lookup at most one, an insertion at most four, a burst at most one per key); if the
//! ring is full then, the record is dropped and counted in
//! [`Counters::removals_lost`](crate::Counters::removals_lost). Drain after every burst and size
//! the ring for a few bursts.

use std::collections::VecDeque;

use lb_core::{BackendId, FlowKey, Instant};

use crate::stats::EvictReason;
use crate::tcp_state::TcpState;
use crate::timeout::FlowState;

/// A flow that left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removal {
    /// The flow key (original direction).
    pub key: FlowKey,
    /// The backend the flow was bound to.
    pub backend: BackendId,
    /// Why it left.
    pub reason: RemovalReason,
    /// The state it was in when it left.
    pub state: FlowState,
    /// Its NAT reply tuple (backend → SNAT address), if it had one.
    pub nat: Option<FlowKey>,
    /// When the session began (millisecond precision; for an entry installed by sync, its
    /// installation).
    pub opened: Instant,
    /// Its last packet (millisecond precision).
    pub last_seen: Instant,
    /// Packets seen in the session (both directions).
    pub packets: u64,
    /// Bytes seen in the session (both directions).
    pub bytes: u64,
}

impl Removal {
    /// Whether the flow counted as an active connection when it left
    /// ([`FlowState::is_active`]): what a caller counting active connections per backend
    /// decrements.
    #[inline]
    pub const fn was_active(&self) -> bool {
        self.state.is_active()
    }
}

/// Why a flow left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalReason {
    /// Idle for longer than its state's timeout: reclaimed by
    /// [`ConnTable::expire`](crate::ConnTable::expire), or met timed out by a lookup or an
    /// insertion.
    Expired,
    /// A TCP connection that ended: timed out in TIME_WAIT or CLOSE, or its TIME_WAIT / CLOSE
    /// entry restarted in place by a new SYN (the old session ends; the entry lives on with
    /// the new one, see [`Hit::was`](crate::Hit::was)).
    Closed,
    /// Evicted to make room for a new flow because it was half-open
    /// ([`EvictReason::HalfOpen`]).
    EvictedHalfOpen,
    /// Evicted to make room for a new flow as the least recently used
    /// ([`EvictReason::Lru`]).
    EvictedLru,
    /// Evicted, half-open, to free its SNAT port for a new flow to the same backend whose
    /// pool was empty ([`EvictReason::SnatPressure`]).
    EvictedSnatPressure,
    /// Removed by [`ConnTable::remove`](crate::ConnTable::remove) or
    /// [`EntryRef::remove`](crate::EntryRef::remove).
    Removed,
    /// Removed because a sync peer deleted it ([`crate::sync::apply`]).
    SyncDelete,
}

impl RemovalReason {
    /// The reason for a flow in `state` that timed out: [`RemovalReason::Closed`] for TCP
    /// TIME_WAIT and CLOSE, else [`RemovalReason::Expired`].
    #[inline]
    pub const fn timed_out(state: FlowState) -> RemovalReason {
        match state {
            FlowState::Tcp(TcpState::TimeWait | TcpState::Close) => RemovalReason::Closed,
            _ => RemovalReason::Expired,
        }
    }
}

impl From<EvictReason> for RemovalReason {
    #[inline]
    fn from(r: EvictReason) -> RemovalReason {
        match r {
            EvictReason::HalfOpen => RemovalReason::EvictedHalfOpen,
            EvictReason::Lru => RemovalReason::EvictedLru,
            EvictReason::SnatPressure => RemovalReason::EvictedSnatPressure,
        }
    }
}

/// The bounded queue of removal records: allocated once, never grows.
#[derive(Debug, Clone)]
pub(crate) struct RemovalRing {
    buf: VecDeque<Removal>,
    cap: usize,
}

impl RemovalRing {
    /// A ring of `cap` records (0: recording off, nothing allocated).
    pub(crate) fn new(cap: usize) -> RemovalRing {
        RemovalRing {
            buf: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// Whether records are kept at all.
    #[inline(always)]
    pub(crate) fn enabled(&self) -> bool {
        self.cap != 0
    }

    /// How many more records fit (`usize::MAX` when recording is off: nothing to overflow).
    #[inline]
    pub(crate) fn room(&self) -> usize {
        if self.cap == 0 {
            usize::MAX
        } else {
            self.cap.saturating_sub(self.buf.len())
        }
    }

    /// Queues `r`; false (and nothing queued) if the ring is full. Never allocates: the deque
    /// was built with at least `cap` places.
    #[inline]
    pub(crate) fn push(&mut self, r: Removal) -> bool {
        if self.buf.len() >= self.cap {
            return false;
        }
        self.buf.push_back(r);
        true
    }

    #[inline]
    pub(crate) fn pop(&mut self) -> Option<Removal> {
        let r = self.buf.pop_front();
        if self.buf.is_empty() {
            // Start again at the front: a ring drained after every burst then reuses the same
            // few cache lines instead of walking its whole capacity.
            self.buf.clear();
        }
        r
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Removal> + '_ {
        self.buf.drain(..)
    }

    /// Heap bytes held.
    pub(crate) fn allocation_size(&self) -> usize {
        self.buf.capacity() * core::mem::size_of::<Removal>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::IpProto;

    fn r(i: u16) -> Removal {
        Removal {
            key: FlowKey::v4(
                [1, 1, 1, 1].into(),
                i,
                [2, 2, 2, 2].into(),
                80,
                IpProto::Tcp,
            ),
            backend: BackendId(1),
            reason: RemovalReason::Expired,
            state: FlowState::Udp,
            nat: None,
            opened: Instant::ZERO,
            last_seen: Instant::ZERO,
            packets: 0,
            bytes: 0,
        }
    }

    #[test]
    fn ring_is_bounded_fifo_and_never_grows() {
        let mut q = RemovalRing::new(3);
        let size = q.allocation_size();
        assert!(q.enabled());
        assert_eq!(q.room(), 3);
        assert!(q.push(r(1)) && q.push(r(2)) && q.push(r(3)));
        assert!(!q.push(r(4)));
        assert_eq!((q.len(), q.room()), (3, 0));
        assert_eq!(q.pop().map(|x| x.key.src_port()), Some(1));
        assert!(q.push(r(5)));
        let order: Vec<u16> = q.drain().map(|x| x.key.src_port()).collect();
        assert_eq!(order, [2, 3, 5]);
        assert_eq!(q.allocation_size(), size);
        let off = RemovalRing::new(0);
        assert!(!off.enabled());
        assert_eq!((off.room(), off.allocation_size()), (usize::MAX, 0));
    }

    #[test]
    fn reasons() {
        use crate::tcp_state::TcpState::*;
        assert_eq!(
            RemovalReason::timed_out(FlowState::Tcp(TimeWait)),
            RemovalReason::Closed
        );
        assert_eq!(
            RemovalReason::timed_out(FlowState::Tcp(Close)),
            RemovalReason::Closed
        );
        assert_eq!(
            RemovalReason::timed_out(FlowState::Tcp(FinWait)),
            RemovalReason::Expired
        );
        assert_eq!(
            RemovalReason::timed_out(FlowState::Udp),
            RemovalReason::Expired
        );
        assert_eq!(
            RemovalReason::from(EvictReason::Lru),
            RemovalReason::EvictedLru
        );
    }
}
