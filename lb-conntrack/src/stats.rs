//! Counters and session statistics.
//!
//! [`Counters`] count every outcome of the table's operations, including each eviction and
//! refusal reason. [`SessionStats`] keep log2 histograms of session duration and of packets per
//! session, overall and per backend, recorded when an entry leaves the table (the figures an
//! operator sizes timeouts with and spots unfairly long sessions by).

use lb_core::BackendId;

/// Why an entry was evicted to make room for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EvictReason {
    /// The oldest half-open entry (TCP without a completed handshake, unconfirmed UDP).
    HalfOpen,
    /// The least recently used entry, when no half-open entry was left.
    Lru,
    /// The oldest half-open entry holding a port of the new flow's backend's SNAT pool, when
    /// that pool was empty ([`ConnTable::insert_snat`](crate::ConnTable::insert_snat)): SNAT
    /// port pressure is shed like table pressure.
    SnatPressure,
}

/// Why an insertion was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The table is full and no entry may be evicted (only established entries are left and
    /// [`Config::evict_established`](crate::Config::evict_established) is off).
    TableFull,
    /// The IPv6 address store is full and no IPv6 entry could be evicted.
    Ipv6Full,
    /// The NAT reply tuple is already in use by another entry.
    NatConflict,
    /// A NAT reply tuple was given but the table was built without NAT support.
    NatDisabled,
    /// The backend's SNAT port pool is exhausted (or the backend has no pool).
    PortsExhausted,
    /// The backend's address family differs from the SNAT addresses', or a reply tuple's
    /// family or protocol differs from its flow's.
    FamilyMismatch,
    /// The backend id is above what a slot stores (65 535).
    BackendId,
}

/// Counters of the table's operations. All wrap on overflow (they are `u64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Lookups that found an entry past its timeout (removed on the spot).
    pub expired_on_lookup: u64,
    /// Reply-tuple lookups that found a live entry.
    pub reply_hits: u64,
    /// Reply-tuple lookups that found nothing.
    pub reply_misses: u64,
    /// Entries inserted.
    pub inserts: u64,
    /// Insertions of a key already present (the existing entry was kept).
    pub exists: u64,
    /// Entries removed by [`ConnTable::expire`](crate::ConnTable::expire),
    /// [`ConnTable::sweep`](crate::ConnTable::sweep) or to make room because they had timed
    /// out.
    pub expired: u64,
    /// Of `expired`, those the sweep removed: flows their class list kept behind younger
    /// entries past their deadline (seen again, then idle), which would otherwise have left
    /// late.
    pub swept: u64,
    /// Entries evicted because they were half-open.
    pub evicted_half_open: u64,
    /// Entries evicted as least recently used.
    pub evicted_lru: u64,
    /// Half-open entries evicted to free a port of their backend's empty SNAT pool for a new
    /// flow ([`EvictReason::SnatPressure`]).
    pub evicted_snat_pressure: u64,
    /// Insertions refused: table full.
    pub refused_full: u64,
    /// Insertions refused: IPv6 store full.
    pub refused_ipv6: u64,
    /// Insertions refused: NAT tuple conflict or NAT disabled.
    pub refused_nat: u64,
    /// Insertions refused: SNAT ports exhausted or family mismatch.
    pub refused_ports: u64,
    /// Insertions refused: backend id above 65 535.
    pub refused_backend: u64,
    /// Flows whose counters outgrew a slot's and moved to the elephant store.
    pub elephants: u64,
    /// Packets counted in saturated counters: the flow outgrew its slot's counters while the
    /// elephant store was full (its packet and byte counts stop growing).
    pub counts_saturated: u64,
    /// Entries removed explicitly.
    pub removed: u64,
    /// TIME_WAIT / CLOSE entries reused by a new SYN.
    pub reused: u64,
    /// Removal records dropped because the removal ring was full (a per-packet path removed
    /// a flow while [`ConnTable::poll_removal`](crate::ConnTable::poll_removal) was behind):
    /// drain after every burst, and size [`Config::removal_queue`](crate::Config::removal_queue)
    /// for a few bursts. Stays 0 when recording is off.
    pub removals_lost: u64,
    /// Full-NAT entries installed by state sync whose SNAT (address, port) is one of the
    /// table's pool but could not be reserved in it (already in use, or the backend has no
    /// pool). The entry is installed; its pair is not protected from local allocation and is
    /// not returned to the pool when it leaves.
    pub sync_nat_conflicts: u64,
}

impl Counters {
    /// Adds `other`'s counts to these (wrapping), e.g. to sum shards.
    pub fn merge(&mut self, other: &Counters) {
        // Destructured so that a new counter cannot be forgotten here.
        let Counters {
            hits,
            misses,
            expired_on_lookup,
            reply_hits,
            reply_misses,
            inserts,
            exists,
            expired,
            swept,
            evicted_half_open,
            evicted_lru,
            evicted_snat_pressure,
            refused_full,
            refused_ipv6,
            refused_nat,
            refused_ports,
            refused_backend,
            elephants,
            counts_saturated,
            removed,
            reused,
            removals_lost,
            sync_nat_conflicts,
        } = *other;
        let add = |a: &mut u64, b: u64| *a = a.wrapping_add(b);
        add(&mut self.hits, hits);
        add(&mut self.misses, misses);
        add(&mut self.expired_on_lookup, expired_on_lookup);
        add(&mut self.reply_hits, reply_hits);
        add(&mut self.reply_misses, reply_misses);
        add(&mut self.inserts, inserts);
        add(&mut self.exists, exists);
        add(&mut self.expired, expired);
        add(&mut self.swept, swept);
        add(&mut self.evicted_half_open, evicted_half_open);
        add(&mut self.evicted_lru, evicted_lru);
        add(&mut self.evicted_snat_pressure, evicted_snat_pressure);
        add(&mut self.refused_full, refused_full);
        add(&mut self.refused_ipv6, refused_ipv6);
        add(&mut self.refused_nat, refused_nat);
        add(&mut self.refused_ports, refused_ports);
        add(&mut self.refused_backend, refused_backend);
        add(&mut self.elephants, elephants);
        add(&mut self.counts_saturated, counts_saturated);
        add(&mut self.removed, removed);
        add(&mut self.reused, reused);
        add(&mut self.removals_lost, removals_lost);
        add(&mut self.sync_nat_conflicts, sync_nat_conflicts);
    }

    pub(crate) fn evicted(&mut self, r: EvictReason) {
        match r {
            EvictReason::HalfOpen => self.evicted_half_open += 1,
            EvictReason::Lru => self.evicted_lru += 1,
            EvictReason::SnatPressure => self.evicted_snat_pressure += 1,
        }
    }

    pub(crate) fn refused(&mut self, r: Refusal) {
        match r {
            Refusal::TableFull => self.refused_full += 1,
            Refusal::Ipv6Full => self.refused_ipv6 += 1,
            Refusal::NatConflict | Refusal::NatDisabled => self.refused_nat += 1,
            Refusal::PortsExhausted | Refusal::FamilyMismatch => self.refused_ports += 1,
            Refusal::BackendId => self.refused_backend += 1,
        }
    }
}

/// Number of buckets of a [`Histogram`].
pub const HISTOGRAM_BUCKETS: usize = 33;

/// A log2 histogram of `u64` samples: bucket 0 holds 0, bucket `i ≥ 1` holds `[2^(i-1), 2^i)`,
/// the last bucket everything from 2^31 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    buckets: [u64; HISTOGRAM_BUCKETS],
    count: u64,
    sum: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; HISTOGRAM_BUCKETS],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

impl Histogram {
    /// The bucket a value falls in.
    #[inline]
    pub const fn bucket_of(v: u64) -> usize {
        let b = (64 - v.leading_zeros()) as usize;
        if b >= HISTOGRAM_BUCKETS {
            HISTOGRAM_BUCKETS - 1
        } else {
            b
        }
    }

    /// Records one sample.
    #[inline]
    pub fn record(&mut self, v: u64) {
        let b = Self::bucket_of(v);
        if let Some(slot) = self.buckets.get_mut(b) {
            *slot += 1;
        }
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.max = self.max.max(v);
    }

    /// The bucket counts.
    pub fn buckets(&self) -> &[u64; HISTOGRAM_BUCKETS] {
        &self.buckets
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the samples (saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The largest value bucket `i` holds (`None` for the last bucket, which is unbounded, and
    /// past the end): 0 for bucket 0, `2^i − 1` for the others. What a Prometheus `le` label
    /// says.
    pub const fn upper_bound(i: usize) -> Option<u64> {
        if i + 1 >= HISTOGRAM_BUCKETS {
            None
        } else {
            Some((1u64 << i) - 1)
        }
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean of the samples (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// An upper bound of the `q`-quantile (`q` in 0..=1): the top of the bucket holding it.
    pub fn quantile_upper(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return if i == 0 {
                    0
                } else {
                    (1u64 << i).saturating_sub(1).min(self.max)
                };
            }
        }
        self.max
    }

    /// Adds another histogram's samples into this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }
}

/// Duration (milliseconds) and packet-count histograms of finished sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionHistograms {
    /// Session duration, first packet to last packet, in milliseconds.
    pub duration_ms: Histogram,
    /// Packets per session (both directions).
    pub packets: Histogram,
}

/// Session statistics, overall and for backends with ids below a configured bound.
#[derive(Debug, Clone)]
pub struct SessionStats {
    overall: SessionHistograms,
    per_backend: Vec<SessionHistograms>,
}

impl SessionStats {
    /// Statistics keeping per-backend histograms for backend ids `0..backends`.
    pub fn new(backends: usize) -> Self {
        SessionStats {
            overall: SessionHistograms::default(),
            per_backend: vec![SessionHistograms::default(); backends],
        }
    }

    /// Records a finished session.
    #[inline]
    pub fn record(&mut self, backend: BackendId, duration_ms: u64, packets: u64) {
        self.overall.duration_ms.record(duration_ms);
        self.overall.packets.record(packets);
        if let Some(b) = self.per_backend.get_mut(backend.get() as usize) {
            b.duration_ms.record(duration_ms);
            b.packets.record(packets);
        }
    }

    /// Histograms over all backends.
    pub fn overall(&self) -> &SessionHistograms {
        &self.overall
    }

    /// Clears one backend's histograms (the overall ones keep its sessions): for an id about
    /// to name another backend.
    pub fn reset_backend(&mut self, id: BackendId) {
        if let Some(b) = self.per_backend.get_mut(id.get() as usize) {
            *b = SessionHistograms::default();
        }
    }

    /// Histograms of one backend (`None` if its id is beyond the configured bound).
    pub fn backend(&self, id: BackendId) -> Option<&SessionHistograms> {
        self.per_backend.get(id.get() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_and_quantiles() {
        let mut h = Histogram::default();
        for v in [0u64, 1, 2, 3, 4, 1000] {
            h.record(v);
        }
        assert_eq!(h.count(), 6);
        assert_eq!(h.buckets()[0], 1);
        assert_eq!(h.buckets()[1], 1);
        assert_eq!(h.buckets()[2], 2);
        assert_eq!(h.buckets()[3], 1);
        assert_eq!(h.max(), 1000);
        assert_eq!(h.quantile_upper(1.0), 1000);
        assert_eq!(h.quantile_upper(0.5), 3);
        assert_eq!(Histogram::bucket_of(u64::MAX), HISTOGRAM_BUCKETS - 1);
        assert_eq!(h.sum(), 1010);
        assert_eq!(Histogram::upper_bound(0), Some(0));
        assert_eq!(Histogram::upper_bound(3), Some(7));
        assert_eq!(
            Histogram::upper_bound(HISTOGRAM_BUCKETS - 2),
            Some((1 << 31) - 1)
        );
        assert_eq!(Histogram::upper_bound(HISTOGRAM_BUCKETS - 1), None);
    }

    #[test]
    fn per_backend_bounded() {
        let mut s = SessionStats::new(2);
        s.record(BackendId(1), 10, 3);
        s.record(BackendId(7), 10, 3);
        assert_eq!(s.overall().packets.count(), 2);
        assert_eq!(s.backend(BackendId(1)).map(|b| b.packets.count()), Some(1));
        assert!(s.backend(BackendId(7)).is_none());
    }

    proptest! {
        #[test]
        fn every_sample_is_counted_in_its_bucket(v in proptest::collection::vec(any::<u64>(), 0..50)) {
            let mut h = Histogram::default();
            for &x in &v { h.record(x); }
            prop_assert_eq!(h.buckets().iter().sum::<u64>(), v.len() as u64);
            for &x in &v {
                let b = Histogram::bucket_of(x);
                prop_assert!(b == HISTOGRAM_BUCKETS - 1 || x < (1u64 << b));
                prop_assert!(b == 0 || x >= 1u64 << (b - 1));
                // The bucket's bound holds the sample, and the previous bucket's does not.
                prop_assert!(Histogram::upper_bound(b).is_none_or(|u| x <= u));
                prop_assert!(b == 0 || Histogram::upper_bound(b - 1).is_some_and(|u| x > u));
            }
            prop_assert_eq!(h.sum(), v.iter().fold(0u64, |a, &x| a.saturating_add(x)));
        }
    }
}
