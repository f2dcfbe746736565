//! A pool of backends with live state, read by the policies.
//!
//! The pool holds, per backend: its [`Backend`] (id, address, configured weight), an
//! [`AdminState`] (active / draining / down), health, IPVS-style active and inactive connection
//! counts, in-flight requests, an EWMA and a peak-EWMA of observed response times, the last
//! reported [`Load`], and admission [`Thresholds`].
//!
//! # Drive order
//! - Control path (health checker, configuration): [`Pool::insert`], [`Pool::remove`],
//!   [`Pool::set_weight`], [`Pool::set_admin`], [`Pool::set_healthy`], [`Pool::set_thresholds`].
//!   Insertions, removals and weight changes bump [`Pool::generation`]; policies that cache
//!   per-backend state (smooth WRR, SH/DH tables) rebuild it when it changes.
//! - Data path: a policy picks a backend; the caller then reports what happens to it with
//!   [`Pool::conn_opened`] / [`Pool::conn_inactive`] / [`Pool::conn_closed`] (layer 4) or
//!   [`Pool::request_started`] / [`Pool::request_finished`] (layer 5), plus
//!   [`Pool::observe_latency`] and [`Pool::report_load`] whenever it learns them.
//!
//! Backends are kept sorted by id, so the same set of backends gives the same positions (and the
//! same picks) whatever order they were added in. Positions (`usize` indices, `0..len()`) are
//! what the policies iterate over; they change only when a backend is inserted or removed.
//!
//! # Eligibility
//! A backend is *usable* when it is [`AdminState::Active`] with weight > 0; *eligible* when also
//! healthy (or the pool is in panic, see [`PoolConfig::panic_threshold_percent`]); *available*
//! when also not overloaded (see [`crate::policy::admission`]). Policies pick only available
//! backends; a down, draining or weight-0 backend is never picked for a new flow.

use lb_core::{Backend, BackendId, Duration, Instant, Weight};

use crate::policy::admission::{Load, Thresholds};
use crate::policy::slow_start::{SlowStart, WEIGHT_SCALE};
use crate::policy::Pick;
use crate::SchedError;

mod least;
mod view;
pub use least::LeastKey;
pub use view::BackendRef;

/// Administrative state of a backend, set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdminState {
    /// Takes new flows.
    #[default]
    Active,
    /// Keeps its existing flows but takes no new ones (graceful removal).
    Draining,
    /// Out of service.
    Down,
}

/// How far a closed connection had got, for the IPVS active / inactive counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnPhase {
    /// Counted as active (TCP established).
    Active,
    /// Counted as inactive (handshake, closing, UDP).
    Inactive,
}

/// Pool configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// Health of a newly inserted backend.
    pub initially_healthy: bool,
    /// Slow-start ramp for added and newly healthy backends; `None` disables it.
    pub slow_start: Option<SlowStart>,
    /// Panic threshold in percent (Envoy `healthy_panic_threshold`): when fewer than this share of
    /// the usable backends are healthy, health is ignored. 0 disables panic mode. At most 100.
    pub panic_threshold_percent: u8,
    /// Smoothing factor of the plain response-time EWMA: `ewma += alpha * (sample - ewma)`.
    /// In (0, 1].
    pub ewma_alpha: f64,
    /// Decay time constant of the peak-EWMA (Finagle `decayTime`, default 10 s). Non-zero.
    pub peak_ewma_decay: Duration,
    /// Response time assumed for a backend before its first observation.
    pub default_rtt: Duration,
    /// Maintain an index of the least-cost available backend for this key, so that LC, WLC or
    /// SED pick in O(1) instead of scanning (each connection update then costs O(log N)).
    /// Ignored while slow start is configured (effective weights change with time).
    pub least_index: Option<LeastKey>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            initially_healthy: true,
            slow_start: None,
            panic_threshold_percent: 0,
            ewma_alpha: 0.125,
            peak_ewma_decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(10),
            least_index: None,
        }
    }
}

impl PoolConfig {
    fn validate(&self) -> Result<(), SchedError> {
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return Err(SchedError::InvalidPolicyConfig(
                "ewma_alpha must be in (0, 1]",
            ));
        }
        if self.peak_ewma_decay.is_zero() {
            return Err(SchedError::InvalidPolicyConfig(
                "peak_ewma_decay must be non-zero",
            ));
        }
        if self.panic_threshold_percent > 100 {
            return Err(SchedError::InvalidPolicyConfig(
                "panic_threshold_percent must be at most 100",
            ));
        }
        Ok(())
    }
}

const F_USABLE: u8 = 1; // admin active, weight > 0
const F_HEALTHY: u8 = 2;
const F_CONN_OVER: u8 = 4; // IPVS overload flag (connection thresholds, with hysteresis)
const F_LOAD_OVER: u8 = 8; // reported utilisation above threshold
const F_SLOW: u8 = 16; // in (or was in) a slow-start ramp
const F_ELIGIBLE: u8 = 32; // usable and (healthy or panic)
const F_AVAILABLE: u8 = 64; // eligible and not overloaded

/// The per-packet part of a backend's state, kept in a dense array for fast scans.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hot {
    pub(crate) active: u32,
    pub(crate) inactive: u32,
    pub(crate) in_flight: u32,
    pub(crate) weight: u32,
    flags: u8,
}

impl Hot {
    /// See [`Pool::is_available`].
    #[inline(always)]
    pub(crate) fn available(&self) -> bool {
        self.flags & F_AVAILABLE != 0
    }

    /// IPVS connection overhead, `active * 256 + inactive`.
    #[inline(always)]
    pub(crate) fn overhead(&self) -> u64 {
        (u64::from(self.active) << 8) + u64::from(self.inactive)
    }

    /// The effective weight when not in slow start; `None` if slow start may apply.
    #[inline(always)]
    pub(crate) fn steady_weight(&self) -> Option<u64> {
        (self.flags & F_SLOW == 0).then_some(u64::from(self.weight) * WEIGHT_SCALE)
    }
}

/// The rest of a backend's state.
#[derive(Debug, Clone, Copy)]
struct Cold {
    backend: Backend,
    admin: AdminState,
    thresholds: Thresholds,
    load: Load,
    ewma_ns: f64,
    peak_ns: f64,
    peak_stamp: Instant,
    observed: bool,
    slow_since: Instant,
}

/// A pool of backends with live state. See the [module documentation](self).
///
/// ```
/// use lb_core::{Backend, BackendId, Instant, Weight};
/// use lb_sched::pool::{AdminState, Pool};
/// let now = Instant::ZERO;
/// let mut pool = Pool::default();
/// pool.insert(Backend::new(BackendId(2), "10.0.0.2:80".parse().unwrap()), now).unwrap();
/// pool.insert(Backend::new(BackendId(1), "10.0.0.1:80".parse().unwrap()), now).unwrap();
/// pool.conn_opened(BackendId(1)).unwrap();
/// assert_eq!(pool.get(BackendId(1)).unwrap().active_conns(), 1);
/// pool.set_admin(BackendId(2), AdminState::Draining).unwrap();
/// assert!(!pool.get(BackendId(2)).unwrap().is_available());
/// assert_eq!(pool.index_of(BackendId(1)), Some(0)); // sorted by id
/// ```
#[derive(Debug, Clone, Default)]
pub struct Pool {
    cfg: PoolConfig,
    hot: Vec<Hot>,
    cold: Vec<Cold>,
    generation: u64,
    panic: bool,
    least: Option<least::LeastTree>,
}

impl Pool {
    /// An empty pool with a validated configuration.
    ///
    /// # Errors
    /// [`SchedError::InvalidPolicyConfig`] if the configuration is out of range.
    pub fn new(cfg: PoolConfig) -> Result<Self, SchedError> {
        cfg.validate()?;
        let least = match (cfg.least_index, cfg.slow_start) {
            (Some(k), None) => Some(least::LeastTree::new(k)),
            _ => None,
        };
        Ok(Pool {
            cfg,
            least,
            ..Pool::default()
        })
    }

    /// A pool of `backends`, all active and healthy (per the configuration) from `now`.
    ///
    /// # Errors
    /// As [`Pool::new`] and [`Pool::insert`].
    pub fn with_backends(
        cfg: PoolConfig,
        backends: impl IntoIterator<Item = Backend>,
        now: Instant,
    ) -> Result<Self, SchedError> {
        let mut p = Pool::new(cfg)?;
        for b in backends {
            p.insert(b, now)?;
        }
        Ok(p)
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Changes the slow-start ramp and the panic threshold, keeping every backend and its live
    /// state (connection counts, latency estimates). Backends already ramping keep their start
    /// time; the other fields of `cfg` are ignored (they shape state that already exists).
    ///
    /// # Errors
    /// [`SchedError::InvalidPolicyConfig`] if the configuration is out of range; nothing changes.
    pub fn reconfigure(&mut self, cfg: PoolConfig) -> Result<(), SchedError> {
        cfg.validate()?;
        self.cfg.slow_start = cfg.slow_start;
        self.cfg.panic_threshold_percent = cfg.panic_threshold_percent;
        if self.cfg.slow_start.is_some() {
            // The least-cost index assumes steady weights.
            self.least = None;
        }
        self.refresh_all();
        Ok(())
    }

    // ---------------------------------------------------------------- control path

    /// Adds a backend (active; healthy per [`PoolConfig::initially_healthy`]; slow start begins
    /// at `now` if configured).
    ///
    /// # Errors
    /// [`SchedError::DuplicateBackend`] if the id is already in the pool.
    pub fn insert(&mut self, backend: Backend, now: Instant) -> Result<(), SchedError> {
        let pos = match self.search(backend.id) {
            Ok(_) => return Err(SchedError::DuplicateBackend { id: backend.id }),
            Err(pos) => pos,
        };
        let mut flags = 0;
        if self.cfg.initially_healthy {
            flags |= F_HEALTHY;
        }
        if self.cfg.slow_start.is_some() {
            flags |= F_SLOW;
        }
        self.hot.insert(
            pos,
            Hot {
                weight: backend.weight.get(),
                flags,
                ..Hot::default()
            },
        );
        self.cold.insert(
            pos,
            Cold {
                backend,
                admin: AdminState::Active,
                thresholds: Thresholds::NONE,
                load: Load::default(),
                ewma_ns: duration_ns(self.cfg.default_rtt),
                peak_ns: duration_ns(self.cfg.default_rtt),
                peak_stamp: now,
                observed: false,
                slow_since: now,
            },
        );
        self.generation = self.generation.wrapping_add(1);
        self.refresh_all();
        Ok(())
    }

    /// Removes a backend, returning it, or `None` if it was not in the pool.
    pub fn remove(&mut self, id: BackendId) -> Option<Backend> {
        let i = self.search(id).ok()?;
        self.hot.remove(i);
        let c = self.cold.remove(i);
        self.generation = self.generation.wrapping_add(1);
        self.refresh_all();
        Some(c.backend)
    }

    /// Changes a backend's weight (0 drains it: no new flows).
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    pub fn set_weight(&mut self, id: BackendId, weight: Weight) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.cold[i].backend.weight = weight;
        self.hot[i].weight = weight.get();
        self.generation = self.generation.wrapping_add(1);
        self.refresh_all();
        Ok(())
    }

    /// Sets a backend's administrative state.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    pub fn set_admin(&mut self, id: BackendId, admin: AdminState) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.cold[i].admin = admin;
        self.refresh_all();
        Ok(())
    }

    /// Records a health verdict. A down→up transition starts slow start at `now` (if configured).
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    pub fn set_healthy(
        &mut self,
        id: BackendId,
        healthy: bool,
        now: Instant,
    ) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        let was = self.hot[i].flags & F_HEALTHY != 0;
        if healthy && !was {
            self.hot[i].flags |= F_HEALTHY;
            if self.cfg.slow_start.is_some() {
                self.hot[i].flags |= F_SLOW;
                self.cold[i].slow_since = now;
            }
        } else if !healthy {
            self.hot[i].flags &= !F_HEALTHY;
        }
        if was != healthy {
            self.refresh_all();
        }
        Ok(())
    }

    /// Sets a backend's admission thresholds.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    pub fn set_thresholds(&mut self, id: BackendId, t: Thresholds) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.cold[i].thresholds = t;
        let total = self.total_conns(i);
        let h = &mut self.hot[i];
        if t.sets_overload(total) {
            h.flags |= F_CONN_OVER;
        } else if t.clears_overload(total) {
            h.flags &= !F_CONN_OVER;
        }
        self.apply_load_flag(i);
        Ok(())
    }

    // ---------------------------------------------------------------- data path

    /// A new connection was bound to the backend (counted active, as IPVS does for an
    /// established TCP connection). Sets the overload flag at the upper threshold.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn conn_opened(&mut self, id: BackendId) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.hot[i].active = self.hot[i].active.saturating_add(1);
        self.after_bind(i);
        self.touch(i);
        Ok(())
    }

    /// A connection was bound in a non-established state (TCP handshake, UDP): counted inactive.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn conn_opened_inactive(&mut self, id: BackendId) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.hot[i].inactive = self.hot[i].inactive.saturating_add(1);
        self.after_bind(i);
        self.touch(i);
        Ok(())
    }

    /// A connection moved from active to inactive (e.g. TCP FIN).
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn conn_inactive(&mut self, id: BackendId) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        let h = &mut self.hot[i];
        if h.active > 0 {
            h.active -= 1;
            h.inactive = h.inactive.saturating_add(1);
        }
        self.touch(i);
        Ok(())
    }

    /// A connection moved from inactive to active (e.g. TCP handshake completed).
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn conn_active(&mut self, id: BackendId) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        let h = &mut self.hot[i];
        if h.inactive > 0 {
            h.inactive -= 1;
            h.active = h.active.saturating_add(1);
        }
        self.touch(i);
        Ok(())
    }

    /// A connection ended; `phase` says which counter it was in. Counters saturate at zero.
    /// Clears the overload flag once below the lower threshold.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn conn_closed(&mut self, id: BackendId, phase: ConnPhase) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        let h = &mut self.hot[i];
        match phase {
            ConnPhase::Active => h.active = h.active.saturating_sub(1),
            ConnPhase::Inactive => h.inactive = h.inactive.saturating_sub(1),
        }
        if h.flags & F_CONN_OVER != 0 {
            let total = self.total_conns(i);
            if self.cold[i].thresholds.clears_overload(total) {
                self.hot[i].flags &= !F_CONN_OVER;
                self.refresh(i);
            }
        }
        self.touch(i);
        Ok(())
    }

    /// A request was sent to the backend (in-flight + 1).
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn request_started(&mut self, id: BackendId) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.hot[i].in_flight = self.hot[i].in_flight.saturating_add(1);
        Ok(())
    }

    /// A request ended without a latency sample (in-flight − 1; saturates at zero): abandoned,
    /// or a layer-4 caller's handshake that completed or failed.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn request_ended(&mut self, id: BackendId) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.hot[i].in_flight = self.hot[i].in_flight.saturating_sub(1);
        Ok(())
    }

    /// A request finished after `latency` (in-flight − 1, and the latency is observed).
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn request_finished(
        &mut self,
        id: BackendId,
        latency: Duration,
        now: Instant,
    ) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.hot[i].in_flight = self.hot[i].in_flight.saturating_sub(1);
        self.observe_at(i, latency, now);
        Ok(())
    }

    /// Records a response-time sample: updates the EWMA and the peak-EWMA.
    ///
    /// Peak-EWMA (Finagle `PeakEwma`, Linkerd): with `w = exp(-(now - last) / decay)`, a sample
    /// above the current estimate replaces it (the peak is taken at once); a sample below it is
    /// blended in as `cost * w + sample * (1 - w)`.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    #[inline]
    pub fn observe_latency(
        &mut self,
        id: BackendId,
        latency: Duration,
        now: Instant,
    ) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.observe_at(i, latency, now);
        Ok(())
    }

    /// Records a load report; re-evaluates the utilisation threshold.
    ///
    /// # Errors
    /// [`SchedError::UnknownBackend`].
    pub fn report_load(&mut self, id: BackendId, load: Load) -> Result<(), SchedError> {
        let i = self.idx(id)?;
        self.cold[i].load = Load::new(load.cpu, load.mem);
        self.apply_load_flag(i);
        Ok(())
    }

    // ---------------------------------------------------------------- reading

    /// Number of backends (in any state).
    #[inline]
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// Whether the pool has no backend.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// Bumped on every insertion, removal and weight change.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the pool is in panic mode (health ignored; see
    /// [`PoolConfig::panic_threshold_percent`]).
    #[inline]
    pub fn in_panic(&self) -> bool {
        self.panic
    }

    /// Position of a backend (pool order is by id).
    #[inline]
    pub fn index_of(&self, id: BackendId) -> Option<usize> {
        self.search(id).ok()
    }

    /// A view of one backend.
    pub fn get(&self, id: BackendId) -> Option<BackendRef<'_>> {
        self.index_of(id).map(|idx| BackendRef { pool: self, idx })
    }

    /// A view of the backend at position `i`.
    pub fn at(&self, i: usize) -> Option<BackendRef<'_>> {
        (i < self.len()).then_some(BackendRef { pool: self, idx: i })
    }

    /// All backends, in id order.
    pub fn iter(&self) -> impl Iterator<Item = BackendRef<'_>> + '_ {
        (0..self.len()).map(|idx| BackendRef { pool: self, idx })
    }

    /// Id of the backend at position `i` (`BackendId(0)` if out of range).
    #[inline]
    pub fn id_at(&self, i: usize) -> BackendId {
        self.cold.get(i).map_or(BackendId(0), |c| c.backend.id)
    }

    /// Whether the backend at `i` may take a new flow (usable, healthy or in panic, not
    /// overloaded). `false` if out of range.
    #[inline]
    pub fn is_available(&self, i: usize) -> bool {
        self.hot.get(i).is_some_and(|h| h.flags & F_AVAILABLE != 0)
    }

    /// Whether the backend at `i` is eligible: usable and healthy (or in panic), overloaded or
    /// not.
    #[inline]
    pub fn is_eligible(&self, i: usize) -> bool {
        self.hot.get(i).is_some_and(|h| h.flags & F_ELIGIBLE != 0)
    }

    /// Configured weight of the backend at `i` (0 if out of range).
    #[inline]
    pub fn weight(&self, i: usize) -> u32 {
        self.hot.get(i).map_or(0, |h| h.weight)
    }

    /// Effective weight at `now`, scaled by [`WEIGHT_SCALE`]: the configured weight times the
    /// slow-start ramp. 0 if out of range.
    #[inline]
    pub fn effective_weight(&self, i: usize, now: Instant) -> u64 {
        let Some(h) = self.hot.get(i) else { return 0 };
        if h.flags & F_SLOW != 0 {
            if let (Some(ss), Some(c)) = (self.cfg.slow_start, self.cold.get(i)) {
                return ss.effective_weight(h.weight, c.slow_since, now);
            }
        }
        u64::from(h.weight) * WEIGHT_SCALE
    }

    /// Active connections of the backend at `i`.
    #[inline]
    pub fn active_conns(&self, i: usize) -> u32 {
        self.hot.get(i).map_or(0, |h| h.active)
    }

    /// Inactive connections of the backend at `i`.
    #[inline]
    pub fn inactive_conns(&self, i: usize) -> u32 {
        self.hot.get(i).map_or(0, |h| h.inactive)
    }

    /// In-flight requests of the backend at `i`.
    #[inline]
    pub fn in_flight(&self, i: usize) -> u32 {
        self.hot.get(i).map_or(0, |h| h.in_flight)
    }

    /// Work outstanding at the backend at `i`: in-flight requests (reported by a layer-5
    /// caller, [`Pool::request_started`]) plus active connections (reported by a layer-4 caller,
    /// [`Pool::conn_opened`]). What least-request and peak-EWMA queue on: a balancer that sees
    /// connections, not requests, counts each active connection as one request in progress.
    #[inline]
    pub fn outstanding(&self, i: usize) -> u32 {
        self.hot
            .get(i)
            .map_or(0, |h| h.in_flight.saturating_add(h.active))
    }

    /// Admission thresholds of the backend at `i` ([`Thresholds::NONE`] if out of range).
    #[inline]
    pub fn thresholds(&self, i: usize) -> Thresholds {
        self.cold.get(i).map_or(Thresholds::NONE, |c| c.thresholds)
    }

    /// IPVS connection overhead of the backend at `i`: `activeconns * 256 + inactconns`
    /// (`ip_vs_dest_conn_overhead`).
    #[inline]
    pub fn conn_overhead(&self, i: usize) -> u64 {
        self.hot
            .get(i)
            .map_or(0, |h| (u64::from(h.active) << 8) + u64::from(h.inactive))
    }

    /// Peak-EWMA response-time estimate of the backend at `i` in nanoseconds, decayed to `now`
    /// (`cost * exp(-(now - last) / decay)`, Finagle's read).
    #[inline]
    pub fn peak_ewma_ns(&self, i: usize, now: Instant) -> f64 {
        let Some(c) = self.cold.get(i) else {
            return 0.0;
        };
        let td = (now - c.peak_stamp).as_nanos() as f64;
        c.peak_ns * (-td / duration_ns(self.cfg.peak_ewma_decay)).exp()
    }

    /// The answer when no backend could be picked: [`Pick::Overloaded`] if some eligible
    /// backend exists (all are above their thresholds), else [`Pick::Unavailable`]. O(N); only
    /// called on the failure path.
    pub fn no_pick(&self) -> Pick {
        if self.hot.iter().any(|h| h.flags & F_ELIGIBLE != 0) {
            Pick::Overloaded
        } else {
            Pick::Unavailable
        }
    }

    /// [`Pick::Backend`] for position `i`, or [`Pool::no_pick`] if `None`.
    #[inline]
    pub fn pick_at(&self, i: Option<usize>) -> Pick {
        match i {
            Some(i) if self.is_available(i) => Pick::Backend(self.id_at(i)),
            _ => self.no_pick(),
        }
    }

    // ---------------------------------------------------------------- internals

    /// The least-cost available position for `key` from the pool's index: `Some(answer)` if
    /// the pool maintains an index for that key ([`PoolConfig::least_index`]), `None` if the
    /// caller must scan.
    #[inline]
    pub fn indexed_least(&self, key: LeastKey) -> Option<Option<usize>> {
        match &self.least {
            Some(t) if t.key() == key => Some(t.root(&self.hot)),
            _ => None,
        }
    }

    /// The dense per-backend array the O(N) policies scan.
    #[inline]
    pub(crate) fn hot(&self) -> &[Hot] {
        &self.hot
    }

    /// Effective weight of position `i` whose [`Hot`] is `h` (fast path without slow start).
    #[inline(always)]
    pub(crate) fn weight_of(&self, i: usize, h: &Hot, now: Instant) -> u64 {
        match h.steady_weight() {
            Some(w) => w,
            None => self.effective_weight(i, now),
        }
    }

    #[inline]
    fn search(&self, id: BackendId) -> Result<usize, usize> {
        self.cold.binary_search_by_key(&id, |c| c.backend.id)
    }

    #[inline]
    fn idx(&self, id: BackendId) -> Result<usize, SchedError> {
        self.search(id).map_err(|_| SchedError::UnknownBackend(id))
    }

    #[inline]
    fn total_conns(&self, i: usize) -> u64 {
        self.hot
            .get(i)
            .map_or(0, |h| u64::from(h.active) + u64::from(h.inactive))
    }

    #[inline]
    fn after_bind(&mut self, i: usize) {
        let total = self.total_conns(i);
        if self.cold[i].thresholds.sets_overload(total) && self.hot[i].flags & F_CONN_OVER == 0 {
            self.hot[i].flags |= F_CONN_OVER;
            self.refresh(i);
        }
    }

    fn apply_load_flag(&mut self, i: usize) {
        let c = &self.cold[i];
        if c.thresholds.load_exceeds(c.load) {
            self.hot[i].flags |= F_LOAD_OVER;
        } else {
            self.hot[i].flags &= !F_LOAD_OVER;
        }
        self.refresh(i);
    }

    fn observe_at(&mut self, i: usize, latency: Duration, now: Instant) {
        let decay = duration_ns(self.cfg.peak_ewma_decay);
        let alpha = self.cfg.ewma_alpha;
        let c = &mut self.cold[i];
        let rtt = duration_ns(latency);
        if c.observed {
            c.ewma_ns += alpha * (rtt - c.ewma_ns);
        } else {
            c.ewma_ns = rtt;
        }
        let td = (now - c.peak_stamp).as_nanos() as f64;
        c.peak_stamp = c.peak_stamp.max(now);
        if !c.observed || rtt > c.peak_ns {
            c.peak_ns = rtt;
        } else {
            let w = (-td / decay).exp();
            c.peak_ns = c.peak_ns * w + rtt * (1.0 - w);
        }
        c.observed = true;
    }

    /// Recomputes the derived flags of one backend (panic state unchanged).
    #[inline]
    fn refresh(&mut self, i: usize) {
        let usable = self.cold[i].admin == AdminState::Active && self.hot[i].weight > 0;
        let h = &mut self.hot[i];
        let mut f = h.flags & !(F_USABLE | F_ELIGIBLE | F_AVAILABLE);
        if usable {
            f |= F_USABLE;
            if f & F_HEALTHY != 0 || self.panic {
                f |= F_ELIGIBLE;
                if f & (F_CONN_OVER | F_LOAD_OVER) == 0 {
                    f |= F_AVAILABLE;
                }
            }
        }
        h.flags = f;
        self.touch(i);
    }

    /// Recomputes panic mode and every backend's flags (control path, O(N)).
    fn refresh_all(&mut self) {
        let mut usable = 0u64;
        let mut healthy = 0u64;
        for (h, c) in self.hot.iter().zip(&self.cold) {
            if c.admin == AdminState::Active && h.weight > 0 {
                usable += 1;
                if h.flags & F_HEALTHY != 0 {
                    healthy += 1;
                }
            }
        }
        let t = u64::from(self.cfg.panic_threshold_percent);
        self.panic = t > 0 && usable > 0 && healthy * 100 < t * usable;
        let least = self.least.take();
        for i in 0..self.hot.len() {
            self.refresh(i);
        }
        self.least = least;
        if let Some(t) = self.least.as_mut() {
            t.rebuild(&self.hot);
        }
    }

    /// Updates the least-cost index after position `i` changed.
    #[inline]
    fn touch(&mut self, i: usize) {
        if let Some(t) = self.least.as_mut() {
            t.update(&self.hot, i);
        }
    }
}

fn duration_ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
pub(crate) mod tests;
