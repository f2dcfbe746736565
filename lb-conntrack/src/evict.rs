//! Intrusive per-class lists: O(1) expiry and eviction without scans.
//!
//! Every live entry sits in the doubly linked list of its class (TCP state, UDP, …), linked
//! through the `prev`/`next` fields of its slot, queued at the tail when it enters the class.
//! A later packet does not move it (that would unlink it and touch both neighbours' cache
//! lines on every hit): it marks the slot seen (`F_SEEN`) and the table's `expire` moves a seen
//! entry to the tail when it reaches the head (lazy re-queueing, once per trip through the
//! list instead of once per hit). An entry never seen since it was queued has its place at its
//! last-seen time, and every entry behind it was queued, and last seen, later; since all
//! entries of a class share one timeout, such a head is the next entry to expire in its class
//! and its least recently used one: expiry looks at [`CLASSES`] heads (moving seen ones on),
//! eviction picks among them. The price: an entry seen again and then idle, moved to the tail
//! when it reached the head before its deadline, waits behind entries queued after its
//! last-seen time, so the lists alone may remove it up to the time between the two later
//! (less than one timeout); a lookup of it after its deadline finds it expired all the same,
//! and [`crate::ConnTable::sweep`], which reads the slots in address order a slice per call,
//! removes it within one period of the sweep (a table's capacity over the slots swept per
//! second) of its deadline.
//!
//! A second kind of list, [`PoolList`], serves SNAT port pressure: per backend pool, the
//! half-open entries that hold one of its ports, in the order they became half-open (for a new
//! flow: its creation). Its links live in a side array of the table (8 bytes per slot, only when
//! an SNAT pool is installed), so an entry can be in its class list and its pool list at once.
//! When a backend's pool is empty, the head of its list is the flow to reclaim: O(1), no scan.

use crate::entry::{Slot, NIL};
use crate::timeout::{FlowState, CLASSES};

/// Heads, tails and lengths of the class lists.
#[derive(Debug, Clone)]
pub(crate) struct Lists {
    pub(crate) head: [u32; CLASSES],
    pub(crate) tail: [u32; CLASSES],
    pub(crate) len: [u32; CLASSES],
}

impl Lists {
    pub(crate) fn new() -> Self {
        Lists {
            head: [NIL; CLASSES],
            tail: [NIL; CLASSES],
            len: [0; CLASSES],
        }
    }

    /// Appends slot `i` (not in any list) to the tail of list `c`.
    #[inline]
    pub(crate) fn push_back(&mut self, slots: &mut [Slot], c: u8, i: u32) {
        let c = usize::from(c) % CLASSES;
        let t = self.tail[c];
        if let Some(s) = slots.get_mut(i as usize) {
            s.set_prev(t);
            s.set_next(NIL);
        }
        match slots.get_mut(t as usize) {
            Some(ts) => ts.set_next(i),
            None => self.head[c] = i,
        }
        self.tail[c] = i;
        self.len[c] += 1;
    }

    /// Removes slot `i` from list `c`.
    #[inline]
    pub(crate) fn unlink(&mut self, slots: &mut [Slot], c: u8, i: u32) {
        let c = usize::from(c) % CLASSES;
        let (p, n) = match slots.get(i as usize) {
            Some(s) => (s.prev(), s.next()),
            None => return,
        };
        match slots.get_mut(p as usize) {
            Some(ps) => ps.set_next(n),
            None => self.head[c] = n,
        }
        match slots.get_mut(n as usize) {
            Some(ns) => ns.set_prev(p),
            None => self.tail[c] = p,
        }
        self.len[c] = self.len[c].saturating_sub(1);
    }

    /// Moves slot `i` from list `from` to the tail of list `to` (which may be the same list).
    #[inline]
    pub(crate) fn requeue(&mut self, slots: &mut [Slot], from: u8, to: u8, i: u32) {
        if from == to && self.tail[usize::from(to) % CLASSES] == i {
            return;
        }
        self.unlink(slots, from, i);
        self.push_back(slots, to, i);
    }
}

/// The half-open entries holding ports of one backend's SNAT pool, oldest first: a doubly
/// linked list threaded through the table's pool-link array (`[prev, next]` per slot).
///
/// Robust to a pool dropped and registered again while its entries live: such stale entries
/// stay linked only among themselves, and unlinking one touches this list's ends only if it is
/// one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolList {
    pub(crate) head: u32,
    pub(crate) tail: u32,
}

impl PoolList {
    pub(crate) const EMPTY: PoolList = PoolList {
        head: NIL,
        tail: NIL,
    };

    /// Appends slot `i` (in no pool list) at the tail.
    #[inline]
    pub(crate) fn push_back(&mut self, links: &mut [[u32; 2]], i: u32) {
        let t = self.tail;
        if let Some(l) = links.get_mut(i as usize) {
            *l = [t, NIL];
        }
        match links.get_mut(t as usize) {
            Some(tl) => tl[1] = i,
            None => self.head = i,
        }
        self.tail = i;
    }
}

/// Removes slot `i` from the pool list it is in: `list` (its backend's list, `None` if that
/// pool is gone). Only its neighbours' links change, and `list`'s ends if `i` is one.
#[inline]
pub(crate) fn pool_unlink(list: Option<&mut PoolList>, links: &mut [[u32; 2]], i: u32) {
    let Some([p, n]) = links.get(i as usize).copied() else {
        return;
    };
    let mut list = list;
    match links.get_mut(p as usize) {
        Some(pl) => pl[1] = n,
        None => {
            if let Some(l) = list.as_deref_mut().filter(|l| l.head == i) {
                l.head = n;
            }
        }
    }
    match links.get_mut(n as usize) {
        Some(nl) => nl[0] = p,
        None => {
            if let Some(l) = list.filter(|l| l.tail == i) {
                l.tail = p;
            }
        }
    }
    if let Some(l) = links.get_mut(i as usize) {
        *l = [NIL, NIL];
    }
}

/// Whether class `c` is half-open (shed first).
#[inline]
pub(crate) fn class_is_half_open(c: u8) -> bool {
    FlowState::from_class(c).is_some_and(FlowState::is_half_open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(l: &Lists, s: &[Slot], c: u8) -> Vec<u32> {
        let mut v = Vec::new();
        let mut i = l.head[c as usize];
        while i != NIL {
            v.push(i);
            i = s[i as usize].next();
        }
        v
    }

    #[test]
    fn push_unlink_requeue() {
        let mut s = vec![Slot::default(); 5];
        let mut l = Lists::new();
        for i in 0..5 {
            l.push_back(&mut s, 1, i);
        }
        assert_eq!(walk(&l, &s, 1), [0, 1, 2, 3, 4]);
        l.unlink(&mut s, 1, 2);
        l.unlink(&mut s, 1, 0);
        l.unlink(&mut s, 1, 4);
        assert_eq!(walk(&l, &s, 1), [1, 3]);
        assert_eq!(l.tail[1], 3);
        l.requeue(&mut s, 1, 1, 1);
        assert_eq!(walk(&l, &s, 1), [3, 1]);
        l.requeue(&mut s, 1, 2, 3);
        assert_eq!(walk(&l, &s, 1), [1]);
        assert_eq!(walk(&l, &s, 2), [3]);
        assert_eq!(l.len[1], 1);
        assert_eq!(l.len[2], 1);
    }

    fn walk_pool(l: &PoolList, links: &[[u32; 2]]) -> Vec<u32> {
        let mut v = Vec::new();
        let mut i = l.head;
        while i != NIL {
            v.push(i);
            i = links[i as usize][1];
        }
        v
    }

    #[test]
    fn pool_list_push_unlink_and_stale_entries() {
        let mut links = vec![[NIL, NIL]; 6];
        let mut l = PoolList::EMPTY;
        for i in 0..4 {
            l.push_back(&mut links, i);
        }
        assert_eq!(walk_pool(&l, &links), [0, 1, 2, 3]);
        pool_unlink(Some(&mut l), &mut links, 0);
        pool_unlink(Some(&mut l), &mut links, 3);
        pool_unlink(Some(&mut l), &mut links, 1);
        assert_eq!(walk_pool(&l, &links), [2]);
        assert_eq!((l.head, l.tail), (2, 2));
        // A list whose pool was dropped: 2 is stale. A new list gets 4 and 5; unlinking the
        // stale head leaves the new list alone.
        let mut fresh = PoolList::EMPTY;
        fresh.push_back(&mut links, 4);
        fresh.push_back(&mut links, 5);
        pool_unlink(Some(&mut fresh), &mut links, 2);
        assert_eq!(walk_pool(&fresh, &links), [4, 5]);
        pool_unlink(Some(&mut fresh), &mut links, 5);
        assert_eq!((fresh.head, fresh.tail), (4, 4));
        pool_unlink(Some(&mut fresh), &mut links, 4);
        assert_eq!(fresh, PoolList::EMPTY);
        assert_eq!(links[4], [NIL, NIL]);
    }
}
