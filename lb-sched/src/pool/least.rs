//! An optional O(log N)-update, O(1)-query index of the least-cost available backend, for LC,
//! WLC and SED at large N (a tournament tree: each internal node holds the better of its two
//! children; ties go to the left, i.e. the lower position, exactly as the linear scans break
//! them).

use super::Hot;

/// The cost a pool can index (see [`PoolConfig::least_index`](super::PoolConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeastKey {
    /// IPVS LC: `active * 256 + inactive`.
    Conns,
    /// IPVS WLC: `(active * 256 + inactive) / weight`.
    WeightedConns,
    /// IPVS SED: `(active + 1) / weight`.
    ExpectedDelay,
}

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(super) struct LeastTree {
    key: LeastKey,
    size: usize,
    nodes: Vec<u32>,
}

impl LeastTree {
    pub(super) fn new(key: LeastKey) -> Self {
        LeastTree {
            key,
            size: 1,
            nodes: vec![NONE; 2],
        }
    }

    pub(super) fn key(&self) -> LeastKey {
        self.key
    }

    /// (numerator, denominator) of the cost; `None` if not a candidate.
    #[inline(always)]
    fn cost(&self, h: &Hot) -> Option<(u64, u64)> {
        if !h.available() || h.weight == 0 {
            return None;
        }
        Some(match self.key {
            LeastKey::Conns => (h.overhead(), 1),
            LeastKey::WeightedConns => (h.overhead(), u64::from(h.weight)),
            LeastKey::ExpectedDelay => (u64::from(h.active) + 1, u64::from(h.weight)),
        })
    }

    #[inline(always)]
    fn better(&self, hot: &[Hot], a: u32, b: u32) -> u32 {
        let ca = hot.get(a as usize).and_then(|h| self.cost(h));
        let cb = hot.get(b as usize).and_then(|h| self.cost(h));
        match (ca, cb) {
            (None, _) => b,
            (Some(_), None) => a,
            (Some((na, da)), Some((nb, db))) => {
                // b strictly cheaper than a: nb / db < na / da
                if u128::from(nb) * u128::from(da) < u128::from(na) * u128::from(db) {
                    b
                } else {
                    a
                }
            }
        }
    }

    pub(super) fn rebuild(&mut self, hot: &[Hot]) {
        self.size = hot.len().next_power_of_two().max(1);
        self.nodes.clear();
        self.nodes.resize(2 * self.size, NONE);
        for i in 0..hot.len() {
            if let Some(n) = self.nodes.get_mut(self.size + i) {
                *n = u32::try_from(i).unwrap_or(NONE);
            }
        }
        for n in (1..self.size).rev() {
            let (l, r) = (self.node(2 * n), self.node(2 * n + 1));
            let v = self.better(hot, l, r);
            if let Some(x) = self.nodes.get_mut(n) {
                *x = v;
            }
        }
    }

    #[inline(always)]
    fn node(&self, n: usize) -> u32 {
        self.nodes.get(n).copied().unwrap_or(NONE)
    }

    /// Re-evaluates the path from leaf `i` to the root after its [`Hot`] changed.
    #[inline]
    pub(super) fn update(&mut self, hot: &[Hot], i: usize) {
        let mut n = (self.size + i) / 2;
        while n >= 1 {
            let (l, r) = (self.node(2 * n), self.node(2 * n + 1));
            let v = self.better(hot, l, r);
            match self.nodes.get_mut(n) {
                Some(x) => *x = v,
                None => return,
            }
            n /= 2;
        }
    }

    /// The least-cost candidate, if any.
    #[inline]
    pub(super) fn root(&self, hot: &[Hot]) -> Option<usize> {
        let r = self.node(1);
        hot.get(r as usize)
            .and_then(|h| self.cost(h))
            .map(|_| r as usize)
    }
}
