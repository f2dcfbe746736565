//! Round robin (IPVS `ip_vs_rr.c`): each pick continues from the backend after the previous one
//! and takes the next available backend, ignoring weights (beyond weight 0 = unavailable).
//! O(1) when all are available, O(N) worst case.

use super::Pick;
use crate::pool::Pool;

/// Round-robin cursor.
#[derive(Debug, Clone, Default)]
pub struct RoundRobin {
    last: Option<usize>,
}

impl RoundRobin {
    /// A round robin starting at the first backend.
    pub const fn new() -> Self {
        RoundRobin { last: None }
    }

    /// Picks the next available backend after the previous pick.
    pub fn pick(&mut self, pool: &Pool) -> Pick {
        let n = pool.len();
        if n == 0 {
            return Pick::Unavailable;
        }
        let start = self.last.map_or(0, |l| (l + 1) % n);
        for k in 0..n {
            let i = (start + k) % n;
            if pool.is_available(i) {
                self.last = Some(i);
                return Pick::Backend(pool.id_at(i));
            }
        }
        pool.no_pick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;
    use lb_core::{BackendId, Instant};

    #[test]
    fn cycles_and_skips() {
        let mut p = pool(&[1, 1, 0, 1]);
        let mut rr = RoundRobin::new();
        let ids: Vec<u32> = (0..6)
            .map(|_| rr.pick(&p).backend().unwrap().get())
            .collect();
        assert_eq!(ids, [0, 1, 3, 0, 1, 3]);
        p.set_healthy(BackendId(1), false, Instant::ZERO).unwrap();
        let ids: Vec<u32> = (0..3)
            .map(|_| rr.pick(&p).backend().unwrap().get())
            .collect();
        assert_eq!(ids, [0, 3, 0]);
        assert!(p.remove(BackendId(0)).is_some());
        assert!(p.remove(BackendId(3)).is_some());
        // Only the unhealthy and the weight-0 backend remain.
        assert_eq!(rr.pick(&p), Pick::Unavailable);
    }
}
