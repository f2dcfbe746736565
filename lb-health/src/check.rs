//! Active health checking of backends (HAProxy / keepalived semantics).
//!
//! A [`HealthChecker`] schedules probes for any number of backends and turns their outcomes into
//! up/down [`Transition`]s. It does no I/O: [`HealthChecker::poll`] says *which* backend to probe
//! and how ([`Probe`]); the caller performs the TCP connect / HTTP GET / UDP exchange / SIP OPTIONS
//! and reports the outcome with [`HealthChecker::on_result`].
//!
//! # Semantics
//! - Each backend has at most one probe in flight. The next probe is scheduled `interval` after
//!   the previous one completed (or timed out), plus a uniform random jitter in `[0, jitter]`.
//! - While a backend's state is changing (`Unknown`, `Rising`, `Falling`) the `fast_interval` is
//!   used instead, so a flapping or freshly added backend is decided quickly.
//! - A serving backend (`Up` / `Falling`) goes `Down` after `fall` *consecutive* failures; a
//!   non-serving one (`Down` / `Rising` / `Unknown`) goes `Up` after `rise` consecutive successes.
//!   `Unknown` (never decided) also goes `Down` after `fall` consecutive failures.
//! - A probe whose result has not arrived by its deadline (`timeout` after it was issued) counts as
//!   [`ProbeOutcome::Timeout`]; a result that arrives later carries a stale token and is ignored.
//! - A backend coming back `Up` from `Down` gets a slow-start window (`slow_start`), reported in the
//!   transition and through [`HealthChecker::slow_start_weight`].
//!
//! # Scheduling cost
//! Backends live in a slab; deadlines in a binary heap of 16-byte entries with lazy deletion (each
//! slot carries an epoch; heap entries with an old epoch are skipped). A probe's token names its
//! slot, so `on_result` finds the backend without a map lookup. `poll` and `on_result` cost
//! O(log N) (one heap pop or push); `add` and `remove` O(log N) (plus the id index, a `BTreeMap`).
//! The heap is compacted when stale entries outnumber live ones.
//!
//! # Drive loop
//! ```text
//! loop {
//!     while let Some(action) = checker.poll(now, &mut rng) {
//!         match action {
//!             Action::Probe(p) => start the probe I/O (remember p.backend, p.token),
//!             Action::Transition(t) => update the pool (t.to is Up or Down),
//!         }
//!     }
//!     on each completed probe: if let Some(t) = checker.on_result(b, token, outcome, now) { … }
//!     sleep until checker.next_deadline() or until a probe completes
//! }
//! ```

use core::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use lb_core::{BackendId, Duration, Instant, Weight};
use rand::Rng;

use crate::HealthError;

/// What to probe a backend with. The probe I/O itself is the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeKind {
    /// A TCP connect; success when the handshake completes.
    Tcp,
    /// An HTTP `GET path`; success when the response status equals `expect_status`.
    Http {
        /// Request path, e.g. `/healthz`.
        path: String,
        /// The expected response status, e.g. 200.
        expect_status: u16,
    },
    /// A UDP request; success when a response arrives (and, if `expect` is set, starts with it).
    Udp {
        /// The datagram to send.
        payload: Vec<u8>,
        /// A prefix the response must start with, if any.
        expect: Option<Vec<u8>>,
    },
    /// A SIP `OPTIONS` request; success on any final response (2xx–6xx except 408/503 by convention,
    /// left to the caller).
    SipOptions,
}

/// Per-backend check configuration. Validated by [`CheckConfig::validate`] (called by
/// [`HealthChecker::add`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    /// How to probe.
    pub kind: ProbeKind,
    /// Time between probes of a stable backend. Must be non-zero.
    pub interval: Duration,
    /// Time after which an unanswered probe counts as a timeout. Must be non-zero.
    pub timeout: Duration,
    /// Consecutive successes that bring a non-serving backend up. At least 1.
    pub rise: u32,
    /// Consecutive failures that bring a serving backend down. At least 1.
    pub fall: u32,
    /// Time between probes while the state is changing (`Unknown`, `Rising`, `Falling`). Non-zero.
    pub fast_interval: Duration,
    /// Maximum random delay added to each interval, to spread probes; also spreads the first
    /// probe after [`HealthChecker::add`] deterministically over `[0, jitter]` by backend id.
    pub jitter: Duration,
    /// Slow-start window after a backend comes back up from `Down` (zero: none).
    pub slow_start: Duration,
}

impl Default for CheckConfig {
    /// TCP connect every 2 s, 1 s timeout, rise 2, fall 3, fast interval 500 ms, jitter 200 ms,
    /// no slow start (HAProxy's defaults, plus jitter).
    fn default() -> Self {
        CheckConfig {
            kind: ProbeKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            fast_interval: Duration::from_millis(500),
            jitter: Duration::from_millis(200),
            slow_start: Duration::ZERO,
        }
    }
}

impl CheckConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), HealthError> {
        let bad = |field, reason| Err(HealthError::InvalidConfig { field, reason });
        if self.interval.is_zero() {
            return bad("interval", "must be non-zero");
        }
        if self.fast_interval.is_zero() {
            return bad("fast_interval", "must be non-zero");
        }
        if self.timeout.is_zero() {
            return bad("timeout", "must be non-zero");
        }
        if self.rise == 0 {
            return bad("rise", "must be at least 1");
        }
        if self.fall == 0 {
            return bad("fall", "must be at least 1");
        }
        if let ProbeKind::Http { expect_status, .. } = self.kind {
            if !(100..=599).contains(&expect_status) {
                return bad("expect_status", "must be an HTTP status (100..=599)");
            }
        }
        Ok(())
    }
}

/// A backend's health as the checker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Added, not decided yet (not serving).
    Unknown,
    /// Serving, last probe succeeded.
    Up,
    /// Serving, but the last probes failed (fewer than `fall` in a row).
    Falling,
    /// Not serving, last probe failed.
    Down,
    /// Not serving, but the last probes succeeded (fewer than `rise` in a row).
    Rising,
}

impl Health {
    /// Whether traffic should be sent to the backend (`Up` or `Falling`).
    #[inline]
    pub const fn is_serving(self) -> bool {
        matches!(self, Health::Up | Health::Falling)
    }
}

/// Why a probe failed (informational; every failure counts the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// Connection refused (TCP RST, ICMP port unreachable).
    Refused,
    /// Connection reset during the exchange.
    Reset,
    /// Host or network unreachable.
    Unreachable,
    /// Unexpected response (wrong HTTP status, bad UDP/SIP reply); carries the status if any.
    BadResponse(u16),
    /// Any other error.
    Other,
}

/// The outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeOutcome {
    /// The backend answered as expected.
    Success,
    /// The probe failed.
    Failure(FailureReason),
    /// No answer within the timeout (the caller may report this itself, or let
    /// [`HealthChecker::poll`] time the probe out).
    Timeout,
}

/// A probe the caller must perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The backend to probe.
    pub backend: BackendId,
    /// What to send.
    pub kind: ProbeKind,
    /// Identifies this probe; pass it back to [`HealthChecker::on_result`].
    pub token: u64,
    /// When the probe times out (the caller may abandon its I/O then).
    pub deadline: Instant,
}

/// A change of a backend between serving and not serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transition {
    /// The backend.
    pub backend: BackendId,
    /// The state before (any [`Health`]).
    pub from: Health,
    /// The new state: [`Health::Up`] or [`Health::Down`].
    pub to: Health,
    /// Until when the backend should receive a reduced share of new flows (ramping up), if it came
    /// back from `Down` and the config has a slow start.
    pub slow_start_until: Option<Instant>,
}

/// What [`HealthChecker::poll`] asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start this probe.
    Probe(Probe),
    /// A probe timed out and changed the backend's state.
    Transition(Transition),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to issue the next probe at the heap deadline.
    Idle,
    /// A probe with this token is in flight until the heap deadline.
    InFlight(u64),
}

#[derive(Debug, Clone)]
struct Entry {
    backend: BackendId,
    cfg: CheckConfig,
    health: Health,
    /// Consecutive successes (when not serving) or failures (when serving / unknown).
    streak: u32,
    phase: Phase,
    /// The deadline of the currently valid heap entry.
    due: Instant,
    up_since: Instant,
    slow_start_until: Option<Instant>,
    /// Jitter for the interval after the in-flight probe.
    jitter: Duration,
}

/// A slab slot. The epoch survives removal, so heap entries and tokens of a previous occupant
/// never match a new one.
#[derive(Debug, Clone, Default)]
struct Slot {
    epoch: u32,
    entry: Option<Entry>,
}

/// A heap entry: (deadline, slot, epoch of the slot when scheduled); 16 bytes.
type Timer = Reverse<(Instant, u32, u32)>;

/// Schedules active probes for many backends and applies rise/fall thresholds.
///
/// See the [module documentation](self) for the semantics and the drive loop.
#[derive(Debug, Clone, Default)]
pub struct HealthChecker {
    /// Backend id → slot index.
    ids: BTreeMap<BackendId, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    heap: BinaryHeap<Timer>,
}

impl HealthChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `backend`; its first probe is due at `now` plus a deterministic spread in
    /// `[0, cfg.jitter]` derived from the id. The backend starts [`Health::Unknown`].
    pub fn add(
        &mut self,
        backend: BackendId,
        cfg: CheckConfig,
        now: Instant,
    ) -> Result<(), HealthError> {
        cfg.validate()?;
        if self.ids.contains_key(&backend) {
            return Err(HealthError::DuplicateBackend(backend));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s =
                    u32::try_from(self.slots.len()).map_err(|_| HealthError::InvalidConfig {
                        field: "backends",
                        reason: "more than 2^32 backends",
                    })?;
                self.slots.push(Slot::default());
                s
            }
        };
        let due = now + spread(backend, cfg.jitter);
        if let Some(sl) = self.slots.get_mut(slot as usize) {
            sl.entry = Some(Entry {
                backend,
                cfg,
                health: Health::Unknown,
                streak: 0,
                phase: Phase::Idle,
                due,
                up_since: now,
                slow_start_until: None,
                jitter: Duration::ZERO,
            });
        }
        self.ids.insert(backend, slot);
        self.schedule(slot, due);
        Ok(())
    }

    /// Unregisters `backend`; returns whether it was registered. Its in-flight probe's result will
    /// be ignored.
    pub fn remove(&mut self, backend: BackendId) -> bool {
        let Some(slot) = self.ids.remove(&backend) else {
            return false;
        };
        if let Some(sl) = self.slots.get_mut(slot as usize) {
            sl.entry = None;
            sl.epoch = sl.epoch.wrapping_add(1);
        }
        self.free.push(slot);
        self.maybe_compact();
        self.prune_top();
        true
    }

    fn entry(&self, backend: BackendId) -> Option<&Entry> {
        let slot = *self.ids.get(&backend)?;
        self.slots.get(slot as usize)?.entry.as_ref()
    }

    /// Replaces a backend's configuration, keeping its health state. The new intervals apply from
    /// the next scheduled probe.
    pub fn reconfigure(&mut self, backend: BackendId, cfg: CheckConfig) -> Result<(), HealthError> {
        cfg.validate()?;
        let e = self
            .ids
            .get(&backend)
            .and_then(|s| self.slots.get_mut(*s as usize))
            .and_then(|s| s.entry.as_mut())
            .ok_or(HealthError::UnknownBackend(backend))?;
        e.cfg = cfg;
        Ok(())
    }

    /// The backend's state, or `None` if it is not registered.
    pub fn state(&self, backend: BackendId) -> Option<Health> {
        self.entry(backend).map(|e| e.health)
    }

    /// Whether the backend is registered and serving (`Up` or `Falling`).
    pub fn is_serving(&self, backend: BackendId) -> bool {
        self.state(backend).is_some_and(Health::is_serving)
    }

    /// The number of registered backends.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no backend is registered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Iterates over `(backend, health)` in id order.
    pub fn iter(&self) -> impl Iterator<Item = (BackendId, Health)> + '_ {
        self.ids.iter().filter_map(|(b, s)| {
            let e = self.slots.get(*s as usize)?.entry.as_ref()?;
            Some((*b, e.health))
        })
    }

    /// The earliest instant at which [`poll`](Self::poll) has work (a probe to issue or one to time
    /// out), or `None` if no backend is registered.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// The next action due at `now`: a probe to start, or a transition caused by a probe that timed
    /// out. Call repeatedly until it returns `None`. Each call costs O(log N) amortised.
    #[must_use]
    pub fn poll<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Option<Action> {
        while let Some(&Reverse((due, slot, epoch))) = self.heap.peek() {
            if due > now {
                return None;
            }
            self.heap.pop();
            let Some(sl) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            if sl.epoch != epoch {
                continue; // rescheduled or removed
            }
            let Some(e) = sl.entry.as_mut() else {
                continue;
            };
            match e.phase {
                Phase::Idle => {
                    // The token names the slot and this scheduling of it: O(1) to check, and
                    // never equal to a token of an earlier probe or occupant of the slot.
                    let token = (u64::from(epoch.wrapping_add(1)) << 32) | u64::from(slot);
                    let deadline = now + e.cfg.timeout;
                    e.phase = Phase::InFlight(token);
                    // Drawn now so that `on_result` needs no RNG.
                    e.jitter = random_upto(rng, e.cfg.jitter);
                    let probe = Probe {
                        backend: e.backend,
                        kind: e.cfg.kind.clone(),
                        token,
                        deadline,
                    };
                    self.schedule(slot, deadline);
                    return Some(Action::Probe(probe));
                }
                Phase::InFlight(token) => {
                    let backend = e.backend;
                    if let Some(t) = self.complete(backend, token, ProbeOutcome::Timeout, now) {
                        return Some(Action::Transition(t));
                    }
                }
            }
        }
        None
    }

    /// Reports the outcome of the probe `token` of `backend`. Returns the transition it caused, if
    /// any. Results for unknown backends, stale tokens (the probe already timed out, or the backend
    /// was removed and re-added) or probes not in flight are ignored (`None`). O(log N), no map
    /// lookup: the token locates the backend.
    pub fn on_result(
        &mut self,
        backend: BackendId,
        token: u64,
        outcome: ProbeOutcome,
        now: Instant,
    ) -> Option<Transition> {
        self.complete(backend, token, outcome, now)
    }

    /// The weight to give `backend` at `now`, given its configured weight: ramps linearly from
    /// 1/10 (at least 1 if `weight` is non-zero) to `weight` over its slow-start window, `weight`
    /// outside it, and zero when the backend is not serving or not registered.
    pub fn slow_start_weight(&self, backend: BackendId, weight: Weight, now: Instant) -> Weight {
        let Some(e) = self.entry(backend) else {
            return Weight::ZERO;
        };
        if !e.health.is_serving() {
            return Weight::ZERO;
        }
        match e.slow_start_until {
            Some(until) if now < until && !weight.is_zero() => {
                let total = (until - e.up_since).as_nanos().max(1);
                let done = (now - e.up_since).as_nanos().min(total);
                let w = u128::from(weight.get());
                // 10 % at the start, 100 % at the end.
                let scaled = (w * 10 * total + w * 90 * done) / (100 * total);
                let scaled = u32::try_from(scaled).unwrap_or(u32::MAX);
                Weight::new(scaled.clamp(1, weight.get()))
            }
            _ => weight,
        }
    }

    fn schedule(&mut self, slot: u32, due: Instant) {
        if let Some(sl) = self.slots.get_mut(slot as usize) {
            if let Some(e) = sl.entry.as_mut() {
                sl.epoch = sl.epoch.wrapping_add(1);
                e.due = due;
                self.heap.push(Reverse((due, slot, sl.epoch)));
            }
        }
        self.maybe_compact();
        self.prune_top();
    }

    /// Pops stale entries off the top of the heap so that [`next_deadline`](Self::next_deadline)
    /// is exact.
    fn prune_top(&mut self) {
        while let Some(&Reverse((_, slot, epoch))) = self.heap.peek() {
            match self.slots.get(slot as usize) {
                Some(sl) if sl.epoch == epoch && sl.entry.is_some() => return,
                _ => {
                    self.heap.pop();
                }
            }
        }
    }

    /// Rebuilds the heap from the live entries when stale entries dominate (amortised O(1)).
    fn maybe_compact(&mut self) {
        if self.heap.len() > 2 * self.ids.len() + 64 {
            let live = self.slots.iter().enumerate().filter_map(|(i, sl)| {
                let e = sl.entry.as_ref()?;
                Some(Reverse((e.due, u32::try_from(i).ok()?, sl.epoch)))
            });
            self.heap = live.collect();
        }
    }

    fn complete(
        &mut self,
        backend: BackendId,
        token: u64,
        outcome: ProbeOutcome,
        now: Instant,
    ) -> Option<Transition> {
        let slot = token as u32; // low half: the slot
        let e = self.slots.get_mut(slot as usize)?.entry.as_mut()?;
        if e.backend != backend || e.phase != Phase::InFlight(token) {
            return None;
        }
        e.phase = Phase::Idle;
        let transition = apply(e, backend, outcome, now);
        let base = match e.health {
            Health::Up | Health::Down => e.cfg.interval,
            Health::Unknown | Health::Rising | Health::Falling => e.cfg.fast_interval,
        };
        let due = now + base + e.jitter;
        self.schedule(slot, due);
        transition
    }
}

/// Applies one outcome to an entry's rise/fall state machine.
fn apply(
    e: &mut Entry,
    backend: BackendId,
    outcome: ProbeOutcome,
    now: Instant,
) -> Option<Transition> {
    let ok = matches!(outcome, ProbeOutcome::Success);
    let from = e.health;
    let (next, streak) = match (from, ok) {
        (Health::Up, true) | (Health::Falling, true) => (Health::Up, 0),
        (Health::Up, false) | (Health::Falling, false) => {
            let s = e.streak.saturating_add(1);
            if s >= e.cfg.fall {
                (Health::Down, 0)
            } else {
                (Health::Falling, s)
            }
        }
        (Health::Down, false) | (Health::Rising, false) => (Health::Down, 0),
        (Health::Down, true) | (Health::Rising, true) => {
            let s = e.streak.saturating_add(1);
            if s >= e.cfg.rise {
                (Health::Up, 0)
            } else {
                (Health::Rising, s)
            }
        }
        // Unknown counts successes towards `rise` and failures towards `fall`; a result of the
        // other kind restarts the count.
        (Health::Unknown, _) => {
            let (succ, fail) = unpack_unknown(e.streak);
            let (succ, fail) = if ok {
                (succ.saturating_add(1), 0)
            } else {
                (0, fail.saturating_add(1))
            };
            if succ >= e.cfg.rise {
                (Health::Up, 0)
            } else if fail >= e.cfg.fall {
                (Health::Down, 0)
            } else {
                (Health::Unknown, pack_unknown(succ, fail))
            }
        }
    };
    e.health = next;
    e.streak = streak;
    let decided = matches!(next, Health::Up | Health::Down);
    let was_serving = from.is_serving();
    let changed = decided && (from == Health::Unknown || was_serving != next.is_serving());
    if !changed {
        return None;
    }
    let mut slow_start_until = None;
    if next == Health::Up {
        e.up_since = now;
        e.slow_start_until = None;
        if from != Health::Unknown && !e.cfg.slow_start.is_zero() {
            let until = now + e.cfg.slow_start;
            e.slow_start_until = Some(until);
            slow_start_until = Some(until);
        }
    }
    Some(Transition {
        backend,
        from,
        to: next,
        slow_start_until,
    })
}

/// While `Unknown`, the streak packs the consecutive successes (high 16 bits) and consecutive
/// failures (low 16 bits), each saturating at `u16::MAX`; one of the two is always zero.
fn pack_unknown(succ: u32, fail: u32) -> u32 {
    (succ.min(0xFFFF) << 16) | fail.min(0xFFFF)
}

fn unpack_unknown(streak: u32) -> (u32, u32) {
    (streak >> 16, streak & 0xFFFF)
}

/// A deterministic spread of the first probe over `[0, window]`, from the backend id
/// (Fibonacci hashing), so that adding 10 000 backends at once does not probe them all at once.
fn spread(backend: BackendId, window: Duration) -> Duration {
    let w = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    if w == 0 {
        return Duration::ZERO;
    }
    let h = u64::from(backend.get()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let frac = u128::from(h >> 32); // in [0, 2^32)
    let off = (u128::from(w) * frac) >> 32;
    Duration::from_nanos(u64::try_from(off).unwrap_or(w))
}

/// A uniform random duration in `[0, max]`.
fn random_upto<R: Rng + ?Sized>(rng: &mut R, max: Duration) -> Duration {
    let m = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if m == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..=m))
}

#[cfg(test)]
mod tests;
