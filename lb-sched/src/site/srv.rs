//! DNS SRV target selection (RFC 2782).
//!
//! RFC 2782, "Usage rules": *"A client MUST attempt to contact the target host with the
//! lowest-numbered priority it can reach; target hosts with the same priority SHOULD be tried in
//! an order defined by the weight field."* The weight order: *"arrange all SRV RRs (that have not
//! been ordered yet) in any order, except that all those with weight 0 are placed at the
//! beginning of the list. Compute the sum of the weights of those RRs, and with each RR associate
//! the running sum in the selected order. Then choose a uniform random number between 0 and the
//! sum computed (inclusive), and select the RR whose running sum value is the first in the
//! selected order which is greater than or equal to the random number selected."* The selected
//! record is removed and the process repeats until every record of the priority is ordered.
//!
//! [`order`] produces that full try-order; [`select`] returns its first reachable element in one
//! pass (the same distribution, restricted to the records the caller can reach).

use rand::RngCore;

use crate::policy::uniform_inclusive;

/// One SRV resource record (the parts selection uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SrvRecord<T> {
    /// Lower is preferred.
    pub priority: u16,
    /// Relative share within a priority; 0 = only when no other is available (or by chance 0).
    pub weight: u16,
    /// The target (host, site, backend id).
    pub target: T,
}

/// The RFC 2782 weighted draw over `cands` (indices into `records`, zero weights first):
/// the position in `cands` of the chosen record.
fn draw<T, R: RngCore + ?Sized>(records: &[SrvRecord<T>], cands: &[usize], rng: &mut R) -> usize {
    let sum: u64 = cands
        .iter()
        .filter_map(|&i| records.get(i))
        .map(|r| u64::from(r.weight))
        .sum();
    let r = uniform_inclusive(rng, sum);
    let mut running = 0u64;
    for (k, &i) in cands.iter().enumerate() {
        running += records.get(i).map_or(0, |r| u64::from(r.weight));
        if running >= r {
            return k;
        }
    }
    cands.len().saturating_sub(1)
}

/// The full RFC 2782 try-order of `records`: indices, by ascending priority, each priority
/// ordered by repeated weighted draws. Written into `out` (cleared first), so the caller can
/// reuse its buffer.
///
/// ```
/// use lb_sched::site::srv::{order, SrvRecord};
/// use rand::SeedableRng;
/// let recs = [
///     SrvRecord { priority: 20, weight: 0, target: "backup" },
///     SrvRecord { priority: 10, weight: 60, target: "a" },
///     SrvRecord { priority: 10, weight: 40, target: "b" },
/// ];
/// let mut out = Vec::new();
/// order(&recs, &mut rand::rngs::SmallRng::seed_from_u64(1), &mut out);
/// assert_eq!(out.len(), 3);
/// assert_eq!(recs[out[2]].target, "backup"); // priority 20 after every priority-10 record
/// ```
pub fn order<T, R: RngCore + ?Sized>(records: &[SrvRecord<T>], rng: &mut R, out: &mut Vec<usize>) {
    out.clear();
    let mut idx: Vec<usize> = (0..records.len()).collect();
    // Priority ascending; zero weights first within a priority (stable otherwise).
    idx.sort_by_key(|&i| records.get(i).map(|r| (r.priority, r.weight != 0)));
    let mut start = 0;
    while start < idx.len() {
        let prio = records.get(idx[start]).map(|r| r.priority);
        let end = idx[start..]
            .iter()
            .position(|&i| records.get(i).map(|r| r.priority) != prio)
            .map_or(idx.len(), |p| start + p);
        let mut group: Vec<usize> = idx[start..end].to_vec();
        while !group.is_empty() {
            let k = draw(records, &group, rng);
            out.push(group.remove(k));
        }
        start = end;
    }
}

/// The first target of an RFC 2782 order among the records the caller can reach: the lowest
/// priority that has a reachable record, and within it one RFC weighted draw over the reachable
/// records. `None` if nothing is reachable.
pub fn select<T, R: RngCore + ?Sized>(
    records: &[SrvRecord<T>],
    reachable: impl Fn(usize) -> bool,
    rng: &mut R,
) -> Option<usize> {
    let prio = (0..records.len())
        .filter(|&i| reachable(i))
        .filter_map(|i| records.get(i).map(|r| r.priority))
        .min()?;
    // Zero-weight records first, then the others, each in record order.
    let in_group = |i: &usize| reachable(*i) && records.get(*i).is_some_and(|r| r.priority == prio);
    let zero = (0..records.len()).filter(|i| in_group(i) && records[*i].weight == 0);
    let rest = (0..records.len()).filter(|i| in_group(i) && records[*i].weight != 0);
    let sum: u64 = rest.clone().map(|i| u64::from(records[i].weight)).sum();
    let r = uniform_inclusive(rng, sum);
    let mut running = 0u64;
    let mut last = None;
    for i in zero.chain(rest) {
        running += u64::from(records[i].weight);
        last = Some(i);
        if running >= r {
            return Some(i);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn rec(priority: u16, weight: u16, target: u32) -> SrvRecord<u32> {
        SrvRecord {
            priority,
            weight,
            target,
        }
    }

    #[test]
    fn weights_within_lowest_priority() {
        let recs = [rec(1, 30, 0), rec(1, 10, 1), rec(0, 0, 2), rec(5, 100, 3)];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
        // Priority 0 has only a weight-0 record: it is always chosen while reachable.
        assert_eq!(select(&recs, |_| true, &mut rng), Some(2));
        let mut n = [0u32; 4];
        for _ in 0..20_000 {
            n[select(&recs, |i| i != 2, &mut rng).unwrap()] += 1;
        }
        assert_eq!(n[3], 0);
        let share = f64::from(n[0]) / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "{share}");
        assert_eq!(select(&recs, |i| i == 3, &mut rng), Some(3));
        assert_eq!(select(&recs, |_| false, &mut rng), None);
        assert_eq!(select::<u32, _>(&[], |_| true, &mut rng), None);
    }

    #[test]
    fn zero_weight_rarely_first_among_weighted() {
        let recs = [rec(0, 0, 0), rec(0, 99, 1)];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let zero_first = (0..10_000)
            .filter(|_| select(&recs, |_| true, &mut rng) == Some(0))
            .count();
        // Chosen only when the draw is exactly 0: probability 1/100.
        assert!((50..200).contains(&zero_first), "{zero_first}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The order is a permutation sorted by priority.
        #[test]
        fn order_is_a_priority_sorted_permutation(
            recs in prop::collection::vec((0u16..4, 0u16..50), 0..20), seed in any::<u64>()
        ) {
            let recs: Vec<SrvRecord<usize>> = recs.iter().enumerate()
                .map(|(i, &(p, w))| SrvRecord { priority: p, weight: w, target: i }).collect();
            let mut out = Vec::new();
            order(&recs, &mut rand::rngs::SmallRng::seed_from_u64(seed), &mut out);
            let mut sorted = out.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..recs.len()).collect::<Vec<_>>());
            prop_assert!(out.windows(2).all(|w| recs[w[0]].priority <= recs[w[1]].priority));
        }
    }
}
