//! SNAT port pressure: per backend pool, the half-open entries holding its pairs, and the
//! reclaim of the oldest of them when the pool is empty (see `evict::PoolList`).
//!
//! An entry is in its backend pool's list exactly while it is live, holds a pair of the pool
//! (`F_POOL`) and is in a half-open class; `F_POOL_HALF` says it is linked. Every place that
//! changes one of the three calls [`ConnTable::pool_track`] (or unlinks first when the backend
//! changes), so the list never holds an established entry.

use lb_core::{BackendId, FlowKey, KeyedHash};

use super::ConnTable;
use crate::entry::{Slot, F_LIVE, F_POOL, F_POOL_HALF};
use crate::evict::{class_is_half_open, pool_unlink};
use crate::removal::RemovalReason;
use crate::stats::EvictReason;

impl<H: KeyedHash> ConnTable<H> {
    /// Links slot `i` into, or unlinks it from, its backend pool's half-open list, as its
    /// state and flags now say.
    #[inline]
    pub(crate) fn pool_track(&mut self, i: u32) {
        let Some(s) = self.slots.get(i as usize).copied() else {
            return;
        };
        let want = s.flags & (F_LIVE | F_POOL) == (F_LIVE | F_POOL) && class_is_half_open(s.class);
        let has = s.flags & F_POOL_HALF != 0;
        if want == has {
            return;
        }
        if has {
            self.pool_unlink(i, &s);
            return;
        }
        let backend = BackendId(s.backend());
        let Some(list) = self.snat.as_mut().and_then(|p| p.half_list(backend)) else {
            // No pool for the backend (unregistered): nothing to reclaim the pair from.
            return;
        };
        list.push_back(&mut self.pool_links, i);
        if let Some(m) = self.slots.get_mut(i as usize) {
            m.flags |= F_POOL_HALF;
        }
    }

    /// Unlinks slot `i` (`s`, linked, bound to the backend of the list it is in) from its pool
    /// list.
    #[inline]
    pub(crate) fn pool_unlink(&mut self, i: u32, s: &Slot) {
        let list = self
            .snat
            .as_mut()
            .and_then(|p| p.half_list(BackendId(s.backend())));
        pool_unlink(list, &mut self.pool_links, i);
        if let Some(m) = self.slots.get_mut(i as usize) {
            m.flags &= !F_POOL_HALF;
        }
    }

    /// Unlinks slot `i` from its pool list if it is in one (before its backend changes).
    pub(crate) fn pool_detach(&mut self, i: u32) {
        if let Some(s) = self.slots.get(i as usize).copied() {
            if s.flags & F_POOL_HALF != 0 {
                self.pool_unlink(i, &s);
            }
        }
    }

    /// Frees a pair of `backend`'s (empty) pool: removes the oldest half-open entry holding
    /// one, as timed out if it is, else as evicted for [`EvictReason::SnatPressure`]. Returns
    /// the evicted flow's key (`None`: nothing evicted, maybe a timed-out entry reclaimed).
    pub(crate) fn reclaim_snat(&mut self, backend: BackendId) -> Option<FlowKey> {
        let i = self.snat.as_ref()?.oldest_half_open(backend)?;
        let s = self.slots.get(i as usize).copied()?;
        let linked = F_LIVE | F_POOL | F_POOL_HALF;
        if s.flags & linked != linked
            || s.backend() != backend.get()
            || !class_is_half_open(s.class)
        {
            // Not reached: the list holds exactly such entries.
            return None;
        }
        if self.slot_expired(i) {
            self.counters.expired += 1;
            self.remove_timed_out(i);
            return None;
        }
        let victim = self.key_of(i);
        self.counters.evicted(EvictReason::SnatPressure);
        self.remove_slot(i, RemovalReason::EvictedSnatPressure);
        victim
    }
}
