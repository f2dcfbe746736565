//! Per-backend SNAT port pools for full NAT.
//!
//! In full NAT the balancer rewrites a flow's source to one of its own addresses and a port, so
//! that the backend answers the balancer. The reply tuple *(backend addr:port → SNAT addr:port,
//! protocol)* must be unique; since it contains the backend, each backend has its own pool of
//! *(SNAT address, port)* pairs and the same pair serves many backends at once.
//!
//! A pool is a FIFO ring of free pairs (4 bytes each) plus a bitmap of pairs in use (which makes
//! double releases harmless). Allocation and release are O(1) and do not allocate.
//!
//! FIFO, not a stack: a released pair goes to the back and is handed out again only after every
//! other free pair, so the same (SNAT address, port, backend) tuple comes back as late as
//! possible. The backend may still hold the previous connection on that tuple in TIME_WAIT (60 s on
//! Linux) and answer a new SYN on it with an ACK instead of a SYN-ACK, which costs the client a
//! 1-second retransmission. For the same reason a pool can start at an arbitrary pair
//! ([`SnatPool::with_start`]): a restarted balancer that starts where its predecessor did reuses
//! first exactly the tuples the predecessor closed last. (Seen in the tun-balancer performance
//! runs: a second balancer started seconds after a first, against a backend holding 8 000
//! TIME_WAIT sockets, had up to a fifth of its SYNs answered by no SYN-ACK. A random start
//! spreads the reuse but does not remove it, and those restarts were slow for other reasons too:
//! see benches/results/balancer.md.)

use std::net::IpAddr;
use std::ops::RangeInclusive;

use lb_core::BackendId;

use crate::ConntrackError;

#[derive(Debug, Clone)]
struct BackendPool {
    id: BackendId,
    /// Ring of free pairs: `len` of them from `head`.
    ring: Vec<u32>,
    head: u32,
    len: u32,
    used: Vec<u64>,
}

/// SNAT port pools, one per registered backend, over the same addresses and port range.
///
/// ```
/// use lb_conntrack::SnatPool;
/// use lb_core::BackendId;
/// let mut pool = SnatPool::new(vec!["198.51.100.1".parse().unwrap()], 40000..=40001).unwrap();
/// pool.add_backend(BackendId(1));
/// let a = pool.allocate(BackendId(1)).unwrap();
/// let b = pool.allocate(BackendId(1)).unwrap();
/// assert_ne!(a, b);
/// assert_eq!(pool.allocate(BackendId(1)), None); // two ports only
/// assert!(pool.release(BackendId(1), a.0, a.1));
/// assert_eq!(pool.allocate(BackendId(1)), Some(a));
/// ```
#[derive(Debug, Clone)]
pub struct SnatPool {
    addrs: Vec<IpAddr>,
    first_port: u16,
    ports: u32,
    start: u32,
    backends: Vec<BackendPool>,
}

impl SnatPool {
    /// Pools over `addrs` (at most 256, all of one family) × `ports`.
    ///
    /// # Errors
    /// [`ConntrackError::InvalidSnatPool`] if `addrs` is empty, longer than 256 or mixes
    /// families, or `ports` is empty.
    pub fn new(addrs: Vec<IpAddr>, ports: RangeInclusive<u16>) -> Result<Self, ConntrackError> {
        let fam_ok = addrs.windows(2).all(|w| w[0].is_ipv4() == w[1].is_ipv4());
        if addrs.is_empty() || addrs.len() > 256 || !fam_ok || ports.is_empty() {
            return Err(ConntrackError::InvalidSnatPool);
        }
        let n = u32::from(*ports.end()) - u32::from(*ports.start()) + 1;
        Ok(SnatPool {
            addrs,
            first_port: *ports.start(),
            ports: n,
            start: 0,
            backends: Vec::new(),
        })
    }

    /// Makes every pool registered from now on hand out pair number `start` (modulo the number
    /// of pairs; pairs are numbered address-major, port-minor) first and continue in order from
    /// there. Give a restarted balancer a random start (see the module docs).
    #[must_use]
    pub fn with_start(mut self, start: u32) -> Self {
        self.start = start % self.pairs().max(1);
        self
    }

    /// The SNAT addresses.
    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    fn pairs(&self) -> u32 {
        self.ports * self.addrs.len() as u32
    }

    fn pos(&self, id: BackendId) -> Result<usize, usize> {
        self.backends.binary_search_by_key(&id, |b| b.id)
    }

    /// Registers a backend, allocating its pool (4 bytes + 1 bit per pair). Does nothing if it
    /// is already registered. This allocates: call it from the control path.
    pub fn add_backend(&mut self, id: BackendId) {
        if let Err(at) = self.pos(id) {
            let n = self.pairs();
            let start = self.start;
            let ring: Vec<u32> = (0..n).map(|i| (start + i) % n).collect();
            let used = vec![0u64; (n as usize).div_ceil(64)];
            self.backends.insert(
                at,
                BackendPool {
                    id,
                    ring,
                    head: 0,
                    len: n,
                    used,
                },
            );
        }
    }

    /// Forgets a backend and its pool.
    pub fn remove_backend(&mut self, id: BackendId) {
        if let Ok(at) = self.pos(id) {
            self.backends.remove(at);
        }
    }

    /// Takes a free (address, port) for `backend`; `None` if exhausted or unregistered.
    #[inline]
    pub fn allocate(&mut self, backend: BackendId) -> Option<(IpAddr, u16)> {
        let at = self.pos(backend).ok()?;
        let ports = self.ports;
        let first = self.first_port;
        let bp = self.backends.get_mut(at)?;
        if bp.len == 0 {
            return None;
        }
        let pair = *bp.ring.get(bp.head as usize)?;
        bp.head = (bp.head + 1) % (bp.ring.len() as u32).max(1);
        bp.len -= 1;
        if let Some(w) = bp.used.get_mut((pair / 64) as usize) {
            *w |= 1 << (pair % 64);
        }
        let addr = *self.addrs.get((pair / ports) as usize)?;
        let port = first.wrapping_add((pair % ports) as u16);
        Some((addr, port))
    }

    /// Returns (address, port) to `backend`'s pool. Returns `false` (and does nothing) if the
    /// pair is not one of the pool's or is not in use.
    #[inline]
    pub fn release(&mut self, backend: BackendId, addr: IpAddr, port: u16) -> bool {
        let Some(ai) = self.addrs.iter().position(|&a| a == addr) else {
            return false;
        };
        let off = u32::from(port.wrapping_sub(self.first_port));
        if off >= self.ports {
            return false;
        }
        let pair = ai as u32 * self.ports + off;
        let Ok(at) = self.pos(backend) else {
            return false;
        };
        let Some(bp) = self.backends.get_mut(at) else {
            return false;
        };
        let Some(w) = bp.used.get_mut((pair / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (pair % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        let n = bp.ring.len() as u32;
        let tail = (bp.head + bp.len) % n.max(1);
        if let Some(slot) = bp.ring.get_mut(tail as usize) {
            *slot = pair;
            bp.len += 1;
        }
        true
    }

    /// Free pairs left for `backend` (0 if unregistered).
    pub fn available(&self, backend: BackendId) -> usize {
        self.pos(backend)
            .ok()
            .and_then(|at| self.backends.get(at))
            .map_or(0, |b| b.len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn validation() {
        assert!(SnatPool::new(vec![], 1..=2).is_err());
        let mixed = vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        assert!(SnatPool::new(mixed, 1..=2).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 5..=4;
        assert!(SnatPool::new(vec!["10.0.0.1".parse().unwrap()], empty).is_err());
    }

    #[test]
    fn pools_are_per_backend_and_double_release_is_harmless() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut p = SnatPool::new(vec![a, "10.0.0.2".parse().unwrap()], 1000..=1001).unwrap();
        p.add_backend(BackendId(1));
        p.add_backend(BackendId(2));
        assert_eq!(p.available(BackendId(1)), 4);
        let x = p.allocate(BackendId(1)).unwrap();
        let y = p.allocate(BackendId(2)).unwrap();
        assert_eq!(x, y); // same pair, different backends: different reply tuples
        assert!(p.release(BackendId(1), x.0, x.1));
        assert!(!p.release(BackendId(1), x.0, x.1));
        assert!(!p.release(BackendId(1), a, 999));
        assert!(!p.release(BackendId(3), a, 1000));
        assert_eq!(p.available(BackendId(1)), 4);
        p.remove_backend(BackendId(1));
        assert_eq!(p.allocate(BackendId(1)), None);
    }

    #[test]
    fn released_pairs_come_back_last_and_start_is_honoured() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut p = SnatPool::new(vec![a], 100..=103).unwrap().with_start(6);
        p.add_backend(BackendId(1));
        // Start at pair 6 % 4 = 2, then in order, wrapping.
        let got: Vec<u16> = (0..4)
            .map(|_| p.allocate(BackendId(1)).unwrap().1)
            .collect();
        assert_eq!(got, [102, 103, 100, 101]);
        assert_eq!(p.allocate(BackendId(1)), None);
        // Released in the order 101, 103: handed out in that order.
        assert!(p.release(BackendId(1), a, 101));
        assert!(p.release(BackendId(1), a, 103));
        assert_eq!(p.allocate(BackendId(1)), Some((a, 101)));
        // A released pair waits behind every other free pair.
        let mut q = SnatPool::new(vec![a], 100..=109).unwrap();
        q.add_backend(BackendId(1));
        let x = q.allocate(BackendId(1)).unwrap();
        assert!(q.release(BackendId(1), x.0, x.1));
        let order: Vec<u16> = (0..10)
            .map(|_| q.allocate(BackendId(1)).unwrap().1)
            .collect();
        assert_eq!(order.last(), Some(&x.1));
        assert_eq!(order[..9], [101, 102, 103, 104, 105, 106, 107, 108, 109]);
    }

    proptest! {
        #[test]
        fn allocations_are_unique_until_released(ops in proptest::collection::vec(any::<bool>(), 1..200), start in any::<u32>()) {
            let mut p = SnatPool::new(vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()], 5000..=5009).unwrap().with_start(start);
            p.add_backend(BackendId(0));
            let mut held: Vec<(IpAddr, u16)> = Vec::new();
            for alloc in ops {
                if alloc {
                    match p.allocate(BackendId(0)) {
                        Some(x) => { prop_assert!(!held.contains(&x)); held.push(x); }
                        None => prop_assert_eq!(held.len(), 20),
                    }
                } else if let Some(x) = held.pop() {
                    prop_assert!(p.release(BackendId(0), x.0, x.1));
                }
                prop_assert_eq!(p.available(BackendId(0)) + held.len(), 20);
            }
            let set: HashSet<_> = held.iter().collect();
            prop_assert_eq!(set.len(), held.len());
        }
    }
}
