//! Intrusive per-class lists: O(1) expiry and eviction without scans.
//!
//! Every live entry sits in the doubly linked list of its class (TCP state, UDP, …), linked
//! through the `prev`/`next` fields of its slot. An entry moves to the tail of its list whenever
//! its last-seen time changes, so each list is ordered by last-seen time, and since all entries
//! of a class share one timeout, by deadline too. The head of each list is therefore both the
//! next entry to expire in its class and that class's least recently used entry:
//! expiry looks at [`CLASSES`] heads, eviction picks among them.

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
}
