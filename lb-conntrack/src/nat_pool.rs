//! Per-backend SNAT port pools for full NAT.
//!
//! In full NAT the balancer rewrites a flow's source to one of its own addresses and a port, so
//! that the backend answers the balancer. The reply tuple *(backend addr:port → SNAT addr:port,
//! protocol)* must be unique; since it contains the backend, each backend has its own pool of
//! *(SNAT address, port)* pairs and the same pair serves many backends at once. Backends are
//! registered by id, and one server behind several services has an id per service: registered
//! with its address ([`SnatPool::add_backend_at`]), the ids of one address share one pool, since
//! their flows' reply tuples would otherwise collide.
//!
//! A pool is a FIFO ring of free pairs (4 bytes each) plus a bitmap of pairs in use (which makes
//! double releases harmless). Allocation and release are O(1) and do not allocate.
//!
//! Under SNAT port pressure (a SYN flood from spoofed sources takes one pair per SYN and holds
//! it for the half-open timeout) the table reclaims instead of refusing: each backend pool
//! heads a list of the half-open entries holding its pairs, oldest first, and
//! [`ConnTable::insert_snat`](crate::ConnTable::insert_snat) evicts the head when the pool is
//! empty ([`crate::EvictReason::SnatPressure`]). The list is threaded through the table's slots;
//! the pool keeps only its two ends (8 bytes per backend).
//!
//! A backup that installs synced full-NAT entries marks their pairs in use with
//! [`SnatPool::reserve`], so that after a takeover `allocate` never hands out a pair a synced
//! connection holds. A reserved pair stays where it is in the ring (finding it there would be a
//! search): a second bitmap marks it *stale*, `allocate` discards stale ring entries it meets,
//! and releasing a pair whose stale copy is still queued just clears both bits (the queued copy
//! serves again). Reserving and releasing are O(1); allocation stays O(1) amortised (each
//! reservation adds at most one stale entry to skip).
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

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use lb_core::BackendId;

use crate::evict::PoolList;
use crate::ConntrackError;

#[derive(Debug, Clone)]
struct BackendPool {
    /// The address its backends share ([`SnatPool::add_backend_at`]); `None`: one backend's own.
    key: Option<SocketAddr>,
    /// Backend ids registered on it.
    users: u32,
    /// Ring of free pairs: `len` of them from `head`, `stale` of which are reserved (in use)
    /// and skipped by `allocate`. Every pair not in use is in the ring, once.
    ring: Vec<u32>,
    head: u32,
    len: u32,
    /// Pairs in use (allocated or reserved).
    used: Vec<u64>,
    /// Pairs reserved while still queued in the ring (a subset of `used`).
    stale: Vec<u64>,
    /// Number of bits set in `stale`.
    stale_len: u32,
    /// The half-open entries holding pairs of this pool, oldest first (links in the table).
    half: PoolList,
}

/// Word index and bit of `pair` in a bitmap.
#[inline]
fn bit(pair: u32) -> (usize, u64) {
    ((pair / 64) as usize, 1u64 << (pair % 64))
}

impl BackendPool {
    #[inline]
    fn is_used(&self, pair: u32) -> bool {
        let (w, b) = bit(pair);
        self.used.get(w).is_some_and(|x| x & b != 0)
    }
}

/// SNAT port pools, one per registered backend (or per backend address, for backends registered
/// with one), over the same addresses and port range.
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
    /// Registered backend ids, sorted, with the index of their pool in `pools`.
    ids: Vec<(BackendId, u32)>,
    /// The pools; `None` where one was dropped (the place is reused).
    pools: Vec<Option<BackendPool>>,
    /// Places of dropped pools in `pools`, to reuse.
    free: Vec<u32>,
    /// The pools of backend addresses ([`SnatPool::add_backend_at`]), by address.
    by_addr: BTreeMap<SocketAddr, u32>,
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
            ids: Vec::new(),
            pools: Vec::new(),
            free: Vec::new(),
            by_addr: BTreeMap::new(),
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
        self.ids.binary_search_by_key(&id, |&(b, _)| b)
    }

    /// `id`'s pool.
    #[inline]
    fn pool(&self, id: BackendId) -> Option<&BackendPool> {
        let at = self.pos(id).ok()?;
        let &(_, p) = self.ids.get(at)?;
        self.pools.get(p as usize)?.as_ref()
    }

    /// `id`'s pool, to change.
    #[inline]
    fn pool_mut(&mut self, id: BackendId) -> Option<&mut BackendPool> {
        let at = self.pos(id).ok()?;
        let &(_, p) = self.ids.get(at)?;
        self.pools.get_mut(p as usize)?.as_mut()
    }

    /// Registers a backend with a pool of its own, allocating it (4 bytes + 2 bits per pair).
    /// Does nothing if it is already registered. This allocates: call it from the control path.
    pub fn add_backend(&mut self, id: BackendId) {
        self.add(id, None);
    }

    /// Registers a backend at `addr`: every backend id registered at the same address (the
    /// same server behind several services) draws from one pool, so that no two of their flows
    /// get the same reply tuple. The first one allocates the pool (4 bytes + 2 bits per pair).
    /// Does nothing if `id` is already registered. This allocates: call it from the control
    /// path.
    pub fn add_backend_at(&mut self, id: BackendId, addr: SocketAddr) {
        self.add(id, Some(addr));
    }

    fn add(&mut self, id: BackendId, key: Option<SocketAddr>) {
        let Err(at) = self.pos(id) else {
            return;
        };
        let shared = key.and_then(|k| self.by_addr.get(&k)).map(|&p| p as usize);
        let p = match shared {
            Some(p) => p,
            None => {
                let n = self.pairs();
                let start = self.start;
                let ring: Vec<u32> = (0..n).map(|i| (start + i) % n).collect();
                let used = vec![0u64; (n as usize).div_ceil(64)];
                let stale = used.clone();
                let pool = BackendPool {
                    key,
                    users: 0,
                    ring,
                    head: 0,
                    len: n,
                    used,
                    stale,
                    stale_len: 0,
                    half: PoolList::EMPTY,
                };
                let p = match self.free.pop() {
                    Some(free) => {
                        if let Some(slot) = self.pools.get_mut(free as usize) {
                            *slot = Some(pool);
                        }
                        free as usize
                    }
                    None => {
                        self.pools.push(Some(pool));
                        self.pools.len() - 1
                    }
                };
                if let Some(k) = key {
                    self.by_addr.insert(k, p as u32);
                }
                p
            }
        };
        if let Some(pool) = self.pools.get_mut(p).and_then(Option::as_mut) {
            pool.users += 1;
        }
        self.ids.insert(at, (id, p as u32));
    }

    /// Forgets a backend; its pool goes with the last backend registered on it.
    pub fn remove_backend(&mut self, id: BackendId) {
        if let Ok(at) = self.pos(id) {
            let (_, p) = self.ids.remove(at);
            if let Some(slot) = self.pools.get_mut(p as usize) {
                if let Some(pool) = slot.as_mut() {
                    pool.users = pool.users.saturating_sub(1);
                    if pool.users == 0 {
                        if let Some(k) = pool.key {
                            self.by_addr.remove(&k);
                        }
                        *slot = None;
                        self.free.push(p);
                    }
                }
            }
        }
    }

    /// Takes a free (address, port) for `backend`; `None` if exhausted or unregistered.
    /// O(1) amortised: ring entries of pairs reserved since they were queued are discarded on
    /// the way.
    #[inline]
    pub fn allocate(&mut self, backend: BackendId) -> Option<(IpAddr, u16)> {
        let ports = self.ports;
        let first = self.first_port;
        let bp = self.pool_mut(backend)?;
        let n = (bp.ring.len() as u32).max(1);
        let pair = loop {
            if bp.len == 0 {
                return None;
            }
            let pair = *bp.ring.get(bp.head as usize)?;
            bp.head = (bp.head + 1) % n;
            bp.len -= 1;
            let (w, b) = bit(pair);
            let used = bp.used.get_mut(w)?;
            if *used & b == 0 {
                *used |= b;
                break pair;
            }
            // Reserved while queued: the reservation keeps it; drop the queued copy.
            if let Some(s) = bp.stale.get_mut(w) {
                *s &= !b;
            }
            bp.stale_len = bp.stale_len.saturating_sub(1);
        };
        let addr = *self.addrs.get((pair / ports) as usize)?;
        let port = first.wrapping_add((pair % ports) as u16);
        Some((addr, port))
    }

    /// The pair number of (address, port), if it is one of the pools'.
    #[inline]
    fn pair_of(&self, addr: IpAddr, port: u16) -> Option<u32> {
        let ai = self.addrs.iter().position(|&a| a == addr)?;
        let off = u32::from(port.wrapping_sub(self.first_port));
        (off < self.ports).then_some(ai as u32 * self.ports + off)
    }

    /// Whether (address, port) is one of the pools' pairs (whatever the backend).
    #[inline]
    pub(crate) fn contains(&self, addr: IpAddr, port: u16) -> bool {
        self.pair_of(addr, port).is_some()
    }

    /// Marks (address, port) of `backend`'s pool in use without allocating it, e.g. for a
    /// full-NAT entry installed by state sync: [`SnatPool::allocate`] never hands it out until
    /// it is [`released`](SnatPool::release). Returns `false` (and does nothing) if the pair is
    /// not one of the pool's, the backend is not registered, or the pair is already in use.
    /// O(1): the pair's queued ring entry is left in place and skipped later.
    #[inline]
    pub fn reserve(&mut self, backend: BackendId, addr: IpAddr, port: u16) -> bool {
        let Some(pair) = self.pair_of(addr, port) else {
            return false;
        };
        let Some(bp) = self.pool_mut(backend) else {
            return false;
        };
        let (w, b) = bit(pair);
        let (Some(used), Some(stale)) = (bp.used.get_mut(w), bp.stale.get_mut(w)) else {
            return false;
        };
        if *used & b != 0 {
            return false;
        }
        // Not in use, so queued in the ring: mark that copy stale.
        *used |= b;
        *stale |= b;
        bp.stale_len += 1;
        true
    }

    /// Returns (address, port) to `backend`'s pool. Returns `false` (and does nothing) if the
    /// pair is not one of the pool's or is not in use.
    #[inline]
    pub fn release(&mut self, backend: BackendId, addr: IpAddr, port: u16) -> bool {
        let Some(pair) = self.pair_of(addr, port) else {
            return false;
        };
        let Some(bp) = self.pool_mut(backend) else {
            return false;
        };
        if !bp.is_used(pair) {
            return false;
        }
        let (w, b) = bit(pair);
        if let Some(u) = bp.used.get_mut(w) {
            *u &= !b;
        }
        if let Some(s) = bp.stale.get_mut(w).filter(|s| **s & b != 0) {
            // Reserved while queued: its ring entry is still there and serves again.
            *s &= !b;
            bp.stale_len = bp.stale_len.saturating_sub(1);
            return true;
        }
        let n = bp.ring.len() as u32;
        let tail = (bp.head + bp.len) % n.max(1);
        if let Some(slot) = bp.ring.get_mut(tail as usize) {
            *slot = pair;
            bp.len += 1;
        }
        true
    }

    /// `backend`'s list of half-open entries holding its pairs (`None` if unregistered).
    #[inline]
    pub(crate) fn half_list(&mut self, backend: BackendId) -> Option<&mut PoolList> {
        self.pool_mut(backend).map(|b| &mut b.half)
    }

    /// The slot of the oldest half-open entry holding a pair of `backend`'s pool.
    #[inline]
    pub(crate) fn oldest_half_open(&self, backend: BackendId) -> Option<u32> {
        let h = self.pool(backend)?.half.head;
        (h != crate::entry::NIL).then_some(h)
    }

    /// Free pairs left for `backend` (0 if unregistered).
    pub fn available(&self, backend: BackendId) -> usize {
        self.pool(backend)
            .map_or(0, |b| b.len.saturating_sub(b.stale_len) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn backends_at_one_address_share_a_pool() {
        let addrs = vec!["198.51.100.1".parse().unwrap()];
        let mut pool = SnatPool::new(addrs, 40000..=40003).unwrap();
        let server: SocketAddr = "192.0.2.10:80".parse().unwrap();
        pool.add_backend_at(BackendId(1), server);
        pool.add_backend_at(BackendId(2), server);
        pool.add_backend_at(BackendId(3), "192.0.2.10:81".parse().unwrap());
        pool.add_backend(BackendId(4));
        // Ids 1 and 2 (one server behind two services) draw from one pool: four pairs between
        // them, never the same one twice.
        let mut got = HashSet::new();
        for i in 0..4 {
            let id = BackendId(1 + i % 2);
            assert!(
                got.insert(pool.allocate(id).unwrap()),
                "pair handed out twice"
            );
        }
        assert_eq!(pool.allocate(BackendId(1)), None);
        assert_eq!(pool.allocate(BackendId(2)), None);
        assert_eq!(pool.available(BackendId(1)), 0);
        // Another port, or a backend registered without an address: pools of their own.
        assert_eq!(pool.available(BackendId(3)), 4);
        assert_eq!(pool.available(BackendId(4)), 4);
        // A pair goes back to the shared pool whichever id releases it.
        let a = *got.iter().next().unwrap();
        assert!(pool.release(BackendId(2), a.0, a.1));
        assert_eq!(pool.available(BackendId(1)), 1);
        // The pool outlives one of its ids, and goes with the last; the place is reused.
        pool.remove_backend(BackendId(1));
        assert_eq!(pool.allocate(BackendId(1)), None);
        assert_eq!(pool.allocate(BackendId(2)), Some(a));
        pool.remove_backend(BackendId(2));
        assert_eq!(pool.available(BackendId(2)), 0);
        pool.add_backend_at(BackendId(5), server);
        assert_eq!(
            pool.available(BackendId(5)),
            4,
            "a fresh pool for the address"
        );
        assert_eq!(pool.pools.len(), 3, "the freed place was reused");
    }

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

    #[test]
    fn a_reserved_pair_is_not_allocated_until_released() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b = BackendId(1);
        let mut p = SnatPool::new(vec![a], 100..=107).unwrap();
        p.add_backend(b);
        assert!(p.reserve(b, a, 103));
        assert!(!p.reserve(b, a, 103), "already in use");
        assert!(!p.reserve(b, a, 99), "not the pool's");
        assert!(!p.reserve(b, "10.0.0.9".parse().unwrap(), 103));
        assert!(!p.reserve(BackendId(2), a, 103), "unregistered backend");
        assert_eq!(p.available(b), 7);
        // A full cycle: every other pair, then exhaustion.
        let got: Vec<u16> = std::iter::from_fn(|| p.allocate(b)).map(|x| x.1).collect();
        assert_eq!(got, [100, 101, 102, 104, 105, 106, 107]);
        assert_eq!(p.available(b), 0);
        // Released, it comes back.
        assert!(p.release(b, a, 103));
        assert_eq!(p.available(b), 1);
        assert_eq!(p.allocate(b), Some((a, 103)));
        assert!(!p.reserve(b, a, 103), "allocated");
        assert!(!p.reserve(b, a, 100), "allocated");
    }

    #[test]
    fn reserve_release_while_queued_keeps_one_ring_copy() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b = BackendId(1);
        let mut p = SnatPool::new(vec![a], 100..=103).unwrap();
        p.add_backend(b);
        // Reserved and released before the ring reaches it: its queued copy serves once.
        assert!(p.reserve(b, a, 101));
        assert_eq!(p.available(b), 3);
        assert!(p.release(b, a, 101));
        assert!(!p.release(b, a, 101), "double release");
        assert_eq!(p.available(b), 4);
        assert!(p.reserve(b, a, 101));
        assert!(p.release(b, a, 101));
        let got: Vec<u16> = std::iter::from_fn(|| p.allocate(b)).map(|x| x.1).collect();
        assert_eq!(got, [100, 101, 102, 103]);
        // Reserved again after the allocation that skipped nothing: released, it is queued.
        assert!(p.release(b, a, 102));
        assert!(p.reserve(b, a, 102));
        assert_eq!(p.available(b), 0);
        assert_eq!(p.allocate(b), None);
        assert!(p.release(b, a, 102));
        assert_eq!(p.allocate(b), Some((a, 102)));
    }

    proptest! {
        #[test]
        fn reserve_allocate_release_match_a_model(
            ops in proptest::collection::vec((0u8..5, 0u16..24, any::<bool>(), 0usize..3), 1..300),
            start in any::<u32>(),
        ) {
            // Two addresses × ports 5000..=5009 = 20 pairs; ports 5010.. are not the pool's.
            // Backends 0 and 1 are one server (two services in front of it): one pool between
            // them; backend 2 is another server.
            let addrs: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
            let mut p = SnatPool::new(addrs.clone(), 5000..=5009).unwrap().with_start(start);
            let servers: [SocketAddr; 2] =
                ["192.0.2.1:80".parse().unwrap(), "192.0.2.2:80".parse().unwrap()];
            let server_of = |who: usize| usize::from(who == 2);
            for who in 0..3 {
                p.add_backend_at(BackendId(who as u32), servers[server_of(who)]);
            }
            // Ids come and go (ops 3 and 4, as a reload removes and adds services): a server's
            // pool lives while one of its ids is registered, and one registered anew after its
            // server's last id left starts from a fresh pool (every pair free).
            let mut registered = [true; 3];
            let mut in_use: [HashSet<(IpAddr, u16)>; 2] = [HashSet::new(), HashSet::new()];
            for (op, port, second, who) in ops {
                let (id, server) = (BackendId(who as u32), server_of(who));
                let x = (addrs[usize::from(second)], 5000 + port);
                let valid = port < 10;
                if op >= 3 {
                    if op == 3 {
                        p.remove_backend(id);
                        registered[who] = false;
                        let alive = (0..3).any(|o| registered[o] && server_of(o) == server);
                        if !alive {
                            in_use[server].clear();
                        }
                    } else {
                        p.add_backend_at(id, servers[server]);
                        registered[who] = true;
                    }
                    continue;
                }
                let used = &mut in_use[server];
                if !registered[who] {
                    // Not registered: nothing to hand out, reserve or release.
                    prop_assert_eq!(p.allocate(id), None);
                    prop_assert!(!p.reserve(id, x.0, x.1));
                    prop_assert!(!p.release(id, x.0, x.1));
                    prop_assert_eq!(p.available(id), 0);
                    continue;
                }
                match op {
                    0 => match p.allocate(id) {
                        Some(y) => prop_assert!(used.insert(y), "{:?} handed out twice", y),
                        None => prop_assert_eq!(used.len(), 20),
                    },
                    1 => {
                        let ok = p.reserve(id, x.0, x.1);
                        prop_assert_eq!(ok, valid && !used.contains(&x));
                        if ok {
                            used.insert(x);
                        }
                    }
                    _ => {
                        let ok = p.release(id, x.0, x.1);
                        prop_assert_eq!(ok, used.remove(&x));
                    }
                }
                prop_assert_eq!(p.available(id) + used.len(), 20);
            }
            // Whatever is left free is handed out exactly once, to any registered id.
            for who in 0..3 {
                if !registered[who] {
                    continue;
                }
                let used = &mut in_use[server_of(who)];
                while let Some(y) = p.allocate(BackendId(who as u32)) {
                    prop_assert!(used.insert(y));
                }
                prop_assert_eq!(used.len(), 20);
            }
        }

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
