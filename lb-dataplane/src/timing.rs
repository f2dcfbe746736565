//! Latency from traffic. In modes `nat` and `dnat` the balancer sees both directions of a TCP
//! flow, so it can time each backend's handshake (the client's SYN → the backend's SYN-ACK) and
//! its first response (the client's first data segment → the backend's first data segment),
//! and notice a SYN answered by a RST or not answered at all.
//!
//! The flows being timed sit in a small direct-mapped table keyed by a cheap keyed hash of the
//! flow key (a collision overwrites: a lost sample, never a wrong one, since every entry holds
//! its full key). Nothing allocates after construction; each step costs one hash and one line.

use std::net::Ipv4Addr;

use lb_core::{BackendId, Duration, FastHash, FlowHasher, FlowKey, HashKey, Instant, IpProto};

/// Flows timed at once (a power of two).
pub(crate) const TIMED: usize = 4096;

/// Where a timed flow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Nothing timed in this slot.
    Empty,
    /// SYN sent to the backend at `since`.
    Syn,
    /// Handshake done; waiting for the client's first data segment.
    Request,
    /// The client's first data segment left at `since`; waiting for the backend's answer.
    Response,
}

#[derive(Debug, Clone, Copy)]
struct Timed {
    key: FlowKey,
    since: Instant,
    backend: BackendId,
    phase: Phase,
}

const EMPTY: Timed = Timed {
    key: FlowKey::v4(
        Ipv4Addr::UNSPECIFIED,
        0,
        Ipv4Addr::UNSPECIFIED,
        0,
        IpProto::Tcp,
    ),
    since: Instant::ZERO,
    backend: BackendId(0),
    phase: Phase::Empty,
};

/// What a reply told about a timed flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sample {
    /// The handshake took this long.
    Handshake(BackendId, Duration),
    /// The first response took this long.
    Response(BackendId, Duration),
    /// The backend reset the connection before its first response: a RST answering the SYN,
    /// or an accepted connection reset before it answered anything.
    Reset(BackendId),
}

/// One bit per slot.
type Bits = [u64; TIMED / 64];

#[inline(always)]
fn bit(b: &Bits, i: usize) -> bool {
    b.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

#[inline(always)]
fn set(b: &mut Bits, i: usize, on: bool) {
    if let Some(w) = b.get_mut(i / 64) {
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// The flows being timed.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    hasher: FlowHasher<FastHash>,
    slots: Box<[Timed]>,
    /// Which slots time something, and which wait for a request: 1 KiB that stays in cache,
    /// so that the packets of the flows not being timed (nearly all) touch no slot.
    used: Box<Bits>,
    asking: Box<Bits>,
    /// Slots per phase (by `Phase as usize`): a packet that could only match a phase no
    /// slot is in costs not even the hash.
    phases: [u32; 4],
    /// Where the scan for unanswered SYNs resumes.
    cursor: usize,
}

impl Timing {
    pub(crate) fn new(key: HashKey) -> Self {
        Timing {
            hasher: FlowHasher::with_key(key),
            slots: vec![EMPTY; TIMED].into_boxed_slice(),
            used: Box::new([0; TIMED / 64]),
            asking: Box::new([0; TIMED / 64]),
            phases: [TIMED as u32, 0, 0, 0],
            cursor: 0,
        }
    }

    #[inline]
    fn index(&self, key: &FlowKey) -> usize {
        (self.hasher.hash_flow(key) as usize) & (TIMED - 1)
    }

    /// How many slots are in `phase`.
    #[inline(always)]
    fn count(&self, phase: Phase) -> u32 {
        self.phases.get(phase as usize).copied().unwrap_or(0)
    }

    /// Moves slot `i` to `next` (its key, time and backend as given, or emptied), keeping
    /// the bitmaps and the per-phase counts in step.
    #[inline]
    fn put(&mut self, i: usize, next: Timed) {
        let Some(t) = self.slots.get_mut(i) else {
            return;
        };
        if let Some(c) = self.phases.get_mut(t.phase as usize) {
            *c = c.saturating_sub(1);
        }
        if let Some(c) = self.phases.get_mut(next.phase as usize) {
            *c += 1;
        }
        *t = if next.phase == Phase::Empty {
            EMPTY
        } else {
            next
        };
        set(&mut self.used, i, next.phase != Phase::Empty);
        set(&mut self.asking, i, next.phase == Phase::Request);
    }

    /// Stops timing every flow of a backend for which `gone` is true (their ids are about to
    /// name other backends): 4096 slots visited, control path.
    pub(crate) fn forget(&mut self, gone: impl Fn(BackendId) -> bool) {
        for i in 0..self.slots.len() {
            if self
                .slots
                .get(i)
                .is_some_and(|t| t.phase != Phase::Empty && gone(t.backend))
            {
                self.put(i, EMPTY);
            }
        }
    }

    /// The phase flow `key` (original direction) is being timed in ([`Phase::Empty`]: not
    /// timed).
    #[inline]
    pub(crate) fn phase(&self, key: &FlowKey) -> Phase {
        if self.count(Phase::Empty) == TIMED as u32 {
            return Phase::Empty;
        }
        let i = self.index(key);
        match self.slots.get(i) {
            Some(t) if bit(&self.used, i) && t.key == *key => t.phase,
            _ => Phase::Empty,
        }
    }

    /// A SYN opened `key` towards `backend`.
    #[inline]
    pub(crate) fn syn(&mut self, key: &FlowKey, backend: BackendId, now: Instant) {
        let i = self.index(key);
        self.put(
            i,
            Timed {
                key: *key,
                since: now,
                backend,
                phase: Phase::Syn,
            },
        );
    }

    /// The client sent data on `key` (an established flow). Costs nothing while no timed
    /// flow waits for a request. Returns whether it started the flow's response clock.
    #[inline]
    pub(crate) fn request(&mut self, key: &FlowKey, now: Instant) -> bool {
        if self.count(Phase::Request) == 0 {
            return false;
        }
        let i = self.index(key);
        if !bit(&self.asking, i) {
            return false;
        }
        match self.slots.get(i) {
            Some(&t) if t.phase == Phase::Request && t.key == *key => {
                self.put(
                    i,
                    Timed {
                        phase: Phase::Response,
                        since: now,
                        ..t
                    },
                );
                true
            }
            _ => false,
        }
    }

    /// A reply of flow `key` (original direction) with `syn`/`rst` flags and `data` payload.
    /// Costs nothing for a data segment while no timed flow waits for a response.
    #[inline]
    pub(crate) fn reply(
        &mut self,
        key: &FlowKey,
        syn: bool,
        rst: bool,
        data: bool,
        now: Instant,
    ) -> Option<Sample> {
        if !(syn || rst) && (!data || self.count(Phase::Response) == 0) {
            return None;
        }
        let i = self.index(key);
        if !bit(&self.used, i) {
            return None;
        }
        let t = *self.slots.get(i)?;
        if t.phase == Phase::Empty || t.key != *key {
            return None;
        }
        let elapsed = now - t.since;
        let (sample, next) = match t.phase {
            Phase::Syn | Phase::Request | Phase::Response if rst => {
                (Some(Sample::Reset(t.backend)), Phase::Empty)
            }
            Phase::Syn if syn => (Some(Sample::Handshake(t.backend, elapsed)), Phase::Request),
            Phase::Response if data => (Some(Sample::Response(t.backend, elapsed)), Phase::Empty),
            _ => return None,
        };
        self.put(
            i,
            Timed {
                phase: next,
                since: now,
                ..t
            },
        );
        sample
    }

    /// Looks at up to `budget` slots for SYNs left unanswered longer than their backend's
    /// `timeout` (`None`: not watched); reports each once through `failed` and forgets it.
    /// Flows timed for longer than `stale` in any phase are forgotten too.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        budget: usize,
        stale: Duration,
        timeout: impl Fn(BackendId) -> Option<Duration>,
        mut failed: impl FnMut(BackendId),
    ) {
        for _ in 0..budget.min(TIMED) {
            self.cursor = (self.cursor + 1) & (TIMED - 1);
            let Some(&t) = self.slots.get(self.cursor) else {
                continue;
            };
            if t.phase == Phase::Empty {
                continue;
            }
            let age = now - t.since;
            if t.phase == Phase::Syn && timeout(t.backend).is_some_and(|d| age >= d) {
                failed(t.backend);
            } else if age < stale {
                continue;
            }
            self.put(self.cursor, EMPTY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey::v4(
            Ipv4Addr::new(192, 0, 2, 2),
            port,
            Ipv4Addr::new(203, 0, 113, 10),
            80,
            IpProto::Tcp,
        )
    }

    fn ms(m: u64) -> Instant {
        Instant::from_millis(m)
    }

    #[test]
    fn handshake_then_response() {
        let mut t = Timing::new(HashKey::from_bytes([1; 16]));
        let k = key(1000);
        t.syn(&k, BackendId(2), ms(0));
        assert_eq!(t.reply(&k, false, false, false, ms(1)), None); // a bare ACK
        assert_eq!(
            t.reply(&k, true, false, false, ms(3)),
            Some(Sample::Handshake(BackendId(2), Duration::from_millis(3)))
        );
        // Data from the backend before the client asked: not a response.
        assert_eq!(t.reply(&k, false, false, true, ms(4)), None);
        t.request(&k, ms(10));
        t.request(&k, ms(12)); // a second segment of the request: the clock started at 10
        assert_eq!(
            t.reply(&k, false, false, true, ms(35)),
            Some(Sample::Response(BackendId(2), Duration::from_millis(25)))
        );
        // Only the first response is timed.
        assert_eq!(t.reply(&k, false, false, true, ms(40)), None);
    }

    #[test]
    fn refused_and_unanswered_syns_are_failures() {
        let mut t = Timing::new(HashKey::from_bytes([1; 16]));
        let (a, b) = (key(1), key(2));
        t.syn(&a, BackendId(1), ms(0));
        t.syn(&b, BackendId(3), ms(0));
        assert_eq!(
            t.reply(&a, false, true, false, ms(1)),
            Some(Sample::Reset(BackendId(1)))
        );
        let mut failed = Vec::new();
        let watch = |id: BackendId| (id == BackendId(3)).then_some(Duration::from_millis(500));
        t.expire(ms(100), TIMED, Duration::from_secs(60), watch, |id| {
            failed.push(id)
        });
        assert!(failed.is_empty(), "not yet: {failed:?}");
        t.expire(ms(600), TIMED, Duration::from_secs(60), watch, |id| {
            failed.push(id)
        });
        assert_eq!(failed, vec![BackendId(3)]);
        // Reported once, then forgotten.
        t.expire(ms(700), TIMED, Duration::from_secs(60), watch, |id| {
            failed.push(id)
        });
        assert_eq!(failed.len(), 1);
    }

    #[test]
    fn another_flow_in_the_slot_is_not_mistaken() {
        let mut t = Timing::new(HashKey::from_bytes([1; 16]));
        let k = key(7);
        t.syn(&k, BackendId(1), ms(0));
        // A reply of a flow never timed finds either an empty slot or another key.
        for p in 100..200 {
            assert_eq!(t.reply(&key(p), true, false, false, ms(1)), None);
        }
    }

    proptest::proptest! {
        /// The bitmaps always say what the slots hold (a wrong bit would skip a timed flow or
        /// touch a slot for nothing).
        #[test]
        fn bitmaps_mirror_the_slots(ops in proptest::collection::vec((0u8..5, 0u16..64, 0u64..2_000), 1..300)) {
            let mut t = Timing::new(HashKey::from_bytes([2; 16]));
            let mut now = 0;
            for (op, port, dt) in ops {
                now += dt;
                let k = key(port);
                match op {
                    0 => t.syn(&k, BackendId(u32::from(port % 3)), ms(now)),
                    1 => {
                        t.request(&k, ms(now));
                    }
                    2 => { let _ = t.reply(&k, true, false, false, ms(now)); }
                    3 => { let _ = t.reply(&k, port % 2 == 0, port % 3 == 0, true, ms(now)); }
                    _ => t.expire(ms(now), 64, Duration::from_secs(1), |_| Some(Duration::from_millis(500)), |_| {}),
                }
                for (i, slot) in t.slots.iter().enumerate() {
                    proptest::prop_assert_eq!(bit(&t.used, i), slot.phase != Phase::Empty);
                    proptest::prop_assert_eq!(bit(&t.asking, i), slot.phase == Phase::Request);
                }
                for ph in [Phase::Empty, Phase::Syn, Phase::Request, Phase::Response] {
                    let n = t.slots.iter().filter(|x| x.phase == ph).count() as u32;
                    proptest::prop_assert_eq!(t.count(ph), n, "{:?}", ph);
                }
            }
        }
    }
}
