//! Consistent hashing with bounded loads (Mirrokni, Thorup & Zadimoghaddam, SODA 2018).

use crate::SchedError;

/// The load factor `c > 1` of consistent hashing with bounded loads: no backend takes a new flow
/// while its load is at or above `c` times its weighted share of the average.
///
/// `c = 1.25` (the paper's and HAProxy's usual choice) keeps every backend within 25 % of the
/// mean while moving few flows away from their consistent-hash owner.
///
/// ```
/// use lb_sched::hash::LoadBound;
/// assert!(LoadBound::new(1.25).is_ok());
/// assert!(LoadBound::new(1.0).is_err());
/// assert!(LoadBound::new(f64::NAN).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadBound(f64);

impl LoadBound {
    /// A bound of `c`, which must be finite and greater than 1.
    ///
    /// # Errors
    /// [`SchedError::InvalidLoadFactor`] otherwise.
    pub fn new(c: f64) -> Result<Self, SchedError> {
        if c.is_finite() && c > 1.0 {
            Ok(LoadBound(c))
        } else {
            Err(SchedError::InvalidLoadFactor)
        }
    }

    /// The factor `c`.
    #[inline]
    pub fn factor(self) -> f64 {
        self.0
    }

    /// The capacity of a backend of weight `w`, given the current total load and the sum of the
    /// weights: `⌈c · (total + 1) · w / Σw⌉` (the `+ 1` counts the flow being placed).
    #[inline]
    pub fn capacity(self, total: u64, weight: u32, weight_sum: u64) -> f64 {
        (self.capacity_fn(total, weight_sum))(weight)
    }

    #[inline]
    pub(crate) fn capacity_fn(self, total: u64, weight_sum: u64) -> impl Fn(u32) -> f64 {
        let scale = if weight_sum == 0 {
            0.0
        } else {
            self.0 * (total as f64 + 1.0) / weight_sum as f64
        };
        move |w| (scale * f64::from(w)).ceil()
    }
}

/// Live per-backend loads (e.g. open connections) and their running total, indexed like
/// [`ConsistentHash::backends`](super::ConsistentHash::backends): the input of
/// [`ConsistentHash::lookup_bounded`](super::ConsistentHash::lookup_bounded), kept up to date by
/// the caller in O(1) per event.
///
/// ```
/// use lb_sched::hash::BackendLoads;
/// let mut loads = BackendLoads::new(3);
/// loads.add(1);
/// loads.add(1);
/// loads.remove(1);
/// assert_eq!((loads.get(1), loads.total()), (1, 1));
/// loads.add(7); // out of range: ignored
/// assert_eq!(loads.total(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendLoads {
    per_backend: Vec<u64>,
    total: u64,
}

impl BackendLoads {
    /// Zero load on each of `n` backends.
    pub fn new(n: usize) -> Self {
        BackendLoads {
            per_backend: vec![0; n],
            total: 0,
        }
    }

    /// Loads from a slice (for example a snapshot of counters).
    pub fn from_slice(loads: &[u64]) -> Self {
        BackendLoads {
            per_backend: loads.to_vec(),
            total: loads.iter().fold(0u64, |a, &l| a.saturating_add(l)),
        }
    }

    /// Resets to zero load on `n` backends (after a table rebuild), reusing the buffer.
    pub fn reset(&mut self, n: usize) {
        self.per_backend.clear();
        self.per_backend.resize(n, 0);
        self.total = 0;
    }

    /// One more unit of load on backend `i` (ignored if out of range).
    #[inline]
    pub fn add(&mut self, i: usize) {
        if let Some(l) = self.per_backend.get_mut(i) {
            *l = l.saturating_add(1);
            self.total = self.total.saturating_add(1);
        }
    }

    /// One unit less on backend `i` (ignored if out of range or already zero).
    #[inline]
    pub fn remove(&mut self, i: usize) {
        if let Some(l) = self.per_backend.get_mut(i) {
            if *l > 0 {
                *l -= 1;
                self.total = self.total.saturating_sub(1);
            }
        }
    }

    /// The load of backend `i` (0 if out of range).
    #[inline]
    pub fn get(&self, i: usize) -> u64 {
        self.per_backend.get(i).copied().unwrap_or(0)
    }

    /// The sum of the loads.
    #[inline]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The loads, by backend index.
    #[inline]
    pub fn as_slice(&self) -> &[u64] {
        &self.per_backend
    }
}

impl Default for LoadBound {
    /// `c = 1.25`.
    fn default() -> Self {
        LoadBound(1.25)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_matches_formula() {
        let b = LoadBound::new(1.5).unwrap();
        // 10 backends of weight 1, 99 flows placed: ceil(1.5 * 100 / 10) = 15.
        assert_eq!(b.capacity(99, 1, 10), 15.0);
        // Weight 3 of a sum of 12: ceil(1.5 * 100 * 3 / 12) = 38.
        assert_eq!(b.capacity(99, 3, 12), 38.0);
        assert_eq!(LoadBound::default().factor(), 1.25);
        assert_eq!(LoadBound::new(0.5), Err(SchedError::InvalidLoadFactor));
        assert_eq!(
            LoadBound::new(f64::INFINITY),
            Err(SchedError::InvalidLoadFactor)
        );
    }

    #[test]
    fn loads_track_their_total() {
        let mut l = BackendLoads::from_slice(&[3, 0, 5]);
        assert_eq!(l.total(), 8);
        l.remove(1);
        l.remove(9);
        assert_eq!(l.total(), 8);
        l.remove(0);
        l.add(2);
        assert_eq!((l.as_slice(), l.total()), (&[2, 0, 6][..], 8));
        l.reset(2);
        assert_eq!((l.as_slice(), l.total()), (&[0, 0][..], 0));
    }
}
