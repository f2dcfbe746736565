//! Locality-based least connections, IPVS semantics (`ip_vs_lblc.c`, `ip_vs_lblcr.c`), for
//! caches: the same destination (e.g. the origin a proxy cache fetches from) keeps going to the
//! same server so its cache stays hot, unless that server is overloaded.
//!
//! - [`Lblc`]: a destination → server map. A destination whose server is available and not
//!   overloaded keeps it; otherwise WLC picks a new server and the map is updated. IPVS's
//!   overload test (`is_overloaded`): the server has more active connections than its weight
//!   *and* some server is below half its weight (`activeconns * 2 < weight`). Entries unused for
//!   [`LblcConfig::expiry`] (IPVS `lblc_expiration`, 24 h) are forgotten.
//! - [`Lblcr`]: a destination → *set* of servers. The least loaded (WLC) member serves; when it
//!   is overloaded (as above) WLC picks a server from the whole pool and adds it to the set. A set
//!   not modified for [`LblcrConfig::set_expiry`] (IPVS `lblcr_expiration`) loses its most loaded
//!   member, so replication shrinks back when demand falls.
//!
//! Bounded memory and no allocation per pick: the map is a direct-mapped table of `2^bits` slots
//! indexed by the caller's keyed destination hash; a colliding destination replaces the slot's
//! entry (which then behaves like an expired one). Sets hold at most [`LBLCR_MAX_SET`] servers;
//! adding to a full set replaces its most loaded member.

use lb_core::{BackendId, Duration, Instant};

use super::lc::Wlc;
use super::{ratio_less, Pick};
use crate::pool::Pool;
use crate::SchedError;

/// Largest server set an LBLCR entry holds.
pub const LBLCR_MAX_SET: usize = 8;

/// LBLC configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LblcConfig {
    /// log2 of the number of table slots (1..=20).
    pub table_bits: u8,
    /// How long an unused entry is remembered.
    pub expiry: Duration,
}

impl Default for LblcConfig {
    /// 1024 slots, 24 h (IPVS default `lblc_expiration`).
    fn default() -> Self {
        LblcConfig {
            table_bits: 10,
            expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// LBLCR configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LblcrConfig {
    /// log2 of the number of table slots (1..=20).
    pub table_bits: u8,
    /// How long an unused entry is remembered.
    pub expiry: Duration,
    /// After how long without a change a set of two or more loses its most loaded member.
    pub set_expiry: Duration,
}

impl Default for LblcrConfig {
    /// 1024 slots, 24 h entry expiry and 24 h set expiry (IPVS `lblcr_expiration`).
    fn default() -> Self {
        LblcrConfig {
            table_bits: 10,
            expiry: Duration::from_secs(24 * 3600),
            set_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

fn check_bits(bits: u8) -> Result<usize, SchedError> {
    if (1..=20).contains(&bits) {
        Ok(1usize << bits)
    } else {
        Err(SchedError::InvalidPolicyConfig(
            "table_bits must be in 1..=20",
        ))
    }
}

/// IPVS `is_overloaded`: more active connections than weight, while some available server is
/// below half its weight.
fn lblc_overloaded(pool: &Pool, i: usize) -> bool {
    if u64::from(pool.active_conns(i)) <= u64::from(pool.weight(i)) {
        return false;
    }
    (0..pool.len()).any(|d| {
        pool.is_available(d) && u64::from(pool.active_conns(d)) * 2 < u64::from(pool.weight(d))
    })
}

#[derive(Debug, Clone, Copy)]
struct LblcEntry {
    key: u64,
    id: BackendId,
    last_used: Instant,
    valid: bool,
}

/// IPVS `lblc`.
#[derive(Debug, Clone)]
pub struct Lblc {
    cfg: LblcConfig,
    slots: Vec<LblcEntry>,
    mask: usize,
}

impl Lblc {
    /// An LBLC scheduler.
    ///
    /// # Errors
    /// [`SchedError::InvalidPolicyConfig`] if `table_bits` is out of range.
    pub fn new(cfg: LblcConfig) -> Result<Self, SchedError> {
        let size = check_bits(cfg.table_bits)?;
        Ok(Lblc {
            cfg,
            slots: vec![
                LblcEntry {
                    key: 0,
                    id: BackendId(0),
                    last_used: Instant::ZERO,
                    valid: false,
                };
                size
            ],
            mask: size - 1,
        })
    }

    /// Picks the server for destination hash `dst_hash` at `now`.
    pub fn pick(&mut self, pool: &Pool, dst_hash: u64, now: Instant) -> Pick {
        let slot = (dst_hash as usize) & self.mask;
        let expiry = self.cfg.expiry;
        if let Some(e) = self.slots.get_mut(slot) {
            if e.valid && e.key == dst_hash && now - e.last_used <= expiry {
                if let Some(i) = pool.index_of(e.id) {
                    if pool.is_available(i) && !lblc_overloaded(pool, i) {
                        e.last_used = now;
                        return Pick::Backend(e.id);
                    }
                }
            }
        }
        let pick = Wlc.pick(pool, now);
        if let (Pick::Backend(id), Some(e)) = (pick, self.slots.get_mut(slot)) {
            *e = LblcEntry {
                key: dst_hash,
                id,
                last_used: now,
                valid: true,
            };
        }
        pick
    }
}

impl Default for Lblc {
    fn default() -> Self {
        Lblc {
            cfg: LblcConfig::default(),
            slots: Vec::new(),
            mask: 0,
        }
        .resized()
    }
}

impl Lblc {
    fn resized(mut self) -> Self {
        let size = 1usize << self.cfg.table_bits.clamp(1, 20);
        self.slots = vec![
            LblcEntry {
                key: 0,
                id: BackendId(0),
                last_used: Instant::ZERO,
                valid: false,
            };
            size
        ];
        self.mask = size - 1;
        self
    }
}

#[derive(Debug, Clone, Copy)]
struct LblcrEntry {
    key: u64,
    set: [BackendId; LBLCR_MAX_SET],
    len: u8,
    last_used: Instant,
    last_mod: Instant,
    valid: bool,
}

const EMPTY_R: LblcrEntry = LblcrEntry {
    key: 0,
    set: [BackendId(0); LBLCR_MAX_SET],
    len: 0,
    last_used: Instant::ZERO,
    last_mod: Instant::ZERO,
    valid: false,
};

impl LblcrEntry {
    fn members(&self) -> &[BackendId] {
        self.set.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// `ip_vs_dest_set_min`: the available member with the least overhead / weight.
    fn least(&self, pool: &Pool, now: Instant) -> Option<usize> {
        let mut best: Option<(usize, u64, u64)> = None;
        for &id in self.members() {
            let Some(i) = pool.index_of(id) else { continue };
            let w = pool.effective_weight(i, now);
            if !pool.is_available(i) || w == 0 {
                continue;
            }
            let oh = pool.conn_overhead(i);
            if best.is_none_or(|(_, boh, bw)| ratio_less(oh, w, boh, bw)) {
                best = Some((i, oh, w));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// `ip_vs_dest_set_max`: the member position (in the set) with the most overhead / weight;
    /// members gone from the pool count as most loaded.
    fn most_loaded(&self, pool: &Pool, now: Instant) -> Option<usize> {
        let mut worst: Option<(usize, u64, u64)> = None;
        for (k, &id) in self.members().iter().enumerate() {
            let (oh, w) = match pool.index_of(id) {
                Some(i) => (pool.conn_overhead(i), pool.effective_weight(i, now)),
                None => return Some(k),
            };
            if w == 0 {
                return Some(k);
            }
            if worst.is_none_or(|(_, woh, ww)| ratio_less(woh, ww, oh, w)) {
                worst = Some((k, oh, w));
            }
        }
        worst.map(|(k, _, _)| k)
    }

    fn erase(&mut self, k: usize) {
        let len = usize::from(self.len);
        if k < len {
            self.set.copy_within(k + 1..len, k);
            self.len -= 1;
        }
    }

    fn insert(&mut self, id: BackendId, pool: &Pool, now: Instant) {
        if self.members().contains(&id) {
            return;
        }
        if usize::from(self.len) >= LBLCR_MAX_SET {
            if let Some(k) = self.most_loaded(pool, now) {
                self.erase(k);
            }
        }
        if let Some(s) = self.set.get_mut(usize::from(self.len)) {
            *s = id;
            self.len += 1;
        }
        self.last_mod = now;
    }
}

/// IPVS `lblcr`.
#[derive(Debug, Clone)]
pub struct Lblcr {
    cfg: LblcrConfig,
    slots: Vec<LblcrEntry>,
    mask: usize,
}

impl Lblcr {
    /// An LBLCR scheduler.
    ///
    /// # Errors
    /// [`SchedError::InvalidPolicyConfig`] if `table_bits` is out of range.
    pub fn new(cfg: LblcrConfig) -> Result<Self, SchedError> {
        let size = check_bits(cfg.table_bits)?;
        Ok(Lblcr {
            cfg,
            slots: vec![EMPTY_R; size],
            mask: size - 1,
        })
    }

    /// The server set currently remembered for `dst_hash` (empty if none).
    pub fn server_set(&self, dst_hash: u64) -> &[BackendId] {
        match self.slots.get((dst_hash as usize) & self.mask) {
            Some(e) if e.valid && e.key == dst_hash => e.members(),
            _ => &[],
        }
    }

    /// Picks the server for destination hash `dst_hash` at `now` (`ip_vs_lblcr_schedule`).
    pub fn pick(&mut self, pool: &Pool, dst_hash: u64, now: Instant) -> Pick {
        let slot = (dst_hash as usize) & self.mask;
        let cfg = self.cfg;
        let Some(e) = self.slots.get_mut(slot) else {
            return Wlc.pick(pool, now);
        };
        let hit = e.valid && e.key == dst_hash && now - e.last_used <= cfg.expiry;
        if hit {
            let least = e.least(pool, now);
            // Shrink a set that has not changed for a while.
            if e.len > 1 && now - e.last_mod > cfg.set_expiry {
                if let Some(k) = e.most_loaded(pool, now) {
                    e.erase(k);
                    e.last_mod = now;
                }
            }
            if let Some(i) = least {
                if !lblc_overloaded(pool, i) && e.members().contains(&pool.id_at(i)) {
                    e.last_used = now;
                    return Pick::Backend(pool.id_at(i));
                }
            }
        } else {
            *e = LblcrEntry {
                key: dst_hash,
                last_used: now,
                last_mod: now,
                valid: true,
                ..EMPTY_R
            };
        }
        let pick = Wlc.pick(pool, now);
        if let Pick::Backend(id) = pick {
            e.insert(id, pool, now);
            e.last_used = now;
        }
        pick
    }
}

impl Default for Lblcr {
    fn default() -> Self {
        let cfg = LblcrConfig::default();
        let size = 1usize << cfg.table_bits;
        Lblcr {
            cfg,
            slots: vec![EMPTY_R; size],
            mask: size - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::pool;

    #[test]
    fn lblc_sticks_until_overloaded() {
        let mut p = pool(&[2, 2]);
        let mut l = Lblc::new(LblcConfig::default()).unwrap();
        let t = Instant::from_secs(1);
        let first = l.pick(&p, 77, t).backend().unwrap();
        for _ in 0..2 {
            p.conn_opened(first).unwrap();
        }
        // 2 active ≤ weight 2: still sticky although WLC would now prefer the other.
        assert_eq!(l.pick(&p, 77, t), Pick::Backend(first));
        p.conn_opened(first).unwrap(); // 3 > 2, and the other is idle (< half) → move
        let second = l.pick(&p, 77, t).backend().unwrap();
        assert_ne!(second, first);
        assert_eq!(l.pick(&p, 77, t), Pick::Backend(second));
        // Expiry: an entry unused for longer than the expiry is forgotten (WLC decides again).
        let late = t + Duration::from_secs(24 * 3600 + 1);
        p.conn_opened(second).unwrap();
        p.conn_opened(second).unwrap();
        p.conn_opened(second).unwrap();
        p.conn_opened(second).unwrap();
        assert_eq!(l.pick(&p, 77, late), Pick::Backend(first));
    }

    #[test]
    fn lblcr_grows_and_shrinks() {
        let mut p = pool(&[1, 1, 1]);
        let cfg = LblcrConfig {
            set_expiry: Duration::from_secs(60),
            ..LblcrConfig::default()
        };
        let mut l = Lblcr::new(cfg).unwrap();
        let t = Instant::from_secs(1);
        let a = l.pick(&p, 5, t).backend().unwrap();
        assert_eq!(l.server_set(5), [a]);
        p.conn_opened(a).unwrap();
        p.conn_opened(a).unwrap(); // 2 > 1 and others idle → overloaded → set grows
        let b = l.pick(&p, 5, t).backend().unwrap();
        assert_ne!(a, b);
        assert_eq!(l.server_set(5).len(), 2);
        // Later, with the set unchanged for over a minute, the most loaded member (a) leaves.
        let later = t + Duration::from_secs(120);
        assert_eq!(l.pick(&p, 5, later), Pick::Backend(b));
        assert_eq!(l.server_set(5), [b]);
    }

    #[test]
    fn bad_config() {
        assert!(Lblc::new(LblcConfig {
            table_bits: 0,
            ..LblcConfig::default()
        })
        .is_err());
        assert!(Lblcr::new(LblcrConfig {
            table_bits: 21,
            ..LblcrConfig::default()
        })
        .is_err());
        let p = pool(&[]);
        assert_eq!(
            Lblc::default().pick(&p, 1, Instant::ZERO),
            Pick::Unavailable
        );
        assert_eq!(
            Lblcr::default().pick(&p, 1, Instant::ZERO),
            Pick::Unavailable
        );
    }
}
