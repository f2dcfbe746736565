//! Weighted failover and weighted overflow, IPVS semantics.
//!
//! - [`Failover`] (`ip_vs_fo.c`): always the available backend with the highest weight (the first
//!   of equals): a primary and ordered standbys expressed as weights.
//! - [`Overflow`] (`ip_vs_ovf.c`): the available backend with the highest weight whose active
//!   connections do not exceed its weight (`activeconns > weight` → skip): weights are
//!   connection capacities, and traffic overflows to the next server when one is full. When all
//!   are full the answer is [`Pick::Overloaded`].

use super::Pick;
use crate::pool::Pool;

/// IPVS `fo`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Failover;

impl Failover {
    /// A weighted-failover scheduler.
    pub const fn new() -> Self {
        Failover
    }

    /// Picks the available backend with the highest weight.
    pub fn pick(&self, pool: &Pool) -> Pick {
        let mut best: Option<(usize, u32)> = None;
        for i in 0..pool.len() {
            let w = pool.weight(i);
            if pool.is_available(i) && w > 0 && best.is_none_or(|(_, hw)| w > hw) {
                best = Some((i, w));
            }
        }
        pool.pick_at(best.map(|(i, _)| i))
    }
}

/// IPVS `ovf`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overflow;

impl Overflow {
    /// A weighted-overflow scheduler.
    pub const fn new() -> Self {
        Overflow
    }

    /// Picks the available backend with the highest weight among those with
    /// `activeconns <= weight`.
    pub fn pick(&self, pool: &Pool) -> Pick {
        let mut best: Option<(usize, u32)> = None;
        let mut any = false;
        for i in 0..pool.len() {
            let w = pool.weight(i);
            if !pool.is_available(i) || w == 0 {
                continue;
            }
            any = true;
            if pool.active_conns(i) > w {
                continue;
            }
            if best.is_none_or(|(_, hw)| w > hw) {
                best = Some((i, w));
            }
        }
        match best {
            Some((i, _)) => Pick::Backend(pool.id_at(i)),
            None if any => Pick::Overloaded,
            None => pool.no_pick(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use lb_core::{BackendId, Instant};

    #[test]
    fn failover_order() {
        let mut p = pool(&[2, 5, 5, 1]);
        assert_eq!(Failover.pick(&p), Pick::Backend(BackendId(1)));
        p.set_healthy(BackendId(1), false, Instant::ZERO).unwrap();
        assert_eq!(Failover.pick(&p), Pick::Backend(BackendId(2)));
    }

    #[test]
    fn overflow_fills_then_spills() {
        let mut p = pool(&[2, 3]);
        let mut seq = vec![];
        for _ in 0..7 {
            match Overflow.pick(&p) {
                Pick::Backend(id) => {
                    seq.push(id.get());
                    p.conn_opened(id).unwrap();
                }
                other => {
                    assert_eq!(other, Pick::Overloaded);
                    seq.push(99);
                }
            }
        }
        // Backend 1 (weight 3) takes up to 4 (active ≤ weight admits one past), then backend 0.
        assert_eq!(seq, [1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(Overflow.pick(&p), Pick::Overloaded);
    }
}
