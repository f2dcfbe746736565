//! [`BackendRef`]: a read-only view of one backend in a [`Pool`].

use lb_core::{Backend, BackendId, Duration, Instant};

use super::{AdminState, Pool, F_CONN_OVER, F_HEALTHY, F_LOAD_OVER};
use crate::policy::admission::{Load, Thresholds};

/// A read-only view of one backend in a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct BackendRef<'a> {
    pub(super) pool: &'a Pool,
    pub(super) idx: usize,
}

impl BackendRef<'_> {
    /// Position in the pool.
    pub fn index(&self) -> usize {
        self.idx
    }
    /// The backend's id.
    pub fn id(&self) -> BackendId {
        self.backend().id
    }
    /// The backend (address, configured weight, MAC).
    pub fn backend(&self) -> &Backend {
        &self.pool.cold[self.idx].backend
    }
    /// Administrative state.
    pub fn admin(&self) -> AdminState {
        self.pool.cold[self.idx].admin
    }
    /// Last health verdict.
    pub fn is_healthy(&self) -> bool {
        self.pool.hot[self.idx].flags & F_HEALTHY != 0
    }
    /// Whether the backend is above a connection or utilisation threshold.
    pub fn is_overloaded(&self) -> bool {
        self.pool.hot[self.idx].flags & (F_CONN_OVER | F_LOAD_OVER) != 0
    }
    /// Whether it may take a new flow (see [`Pool::is_available`]).
    pub fn is_available(&self) -> bool {
        self.pool.is_available(self.idx)
    }
    /// Active connections.
    pub fn active_conns(&self) -> u32 {
        self.pool.active_conns(self.idx)
    }
    /// Inactive connections.
    pub fn inactive_conns(&self) -> u32 {
        self.pool.inactive_conns(self.idx)
    }
    /// In-flight requests.
    pub fn in_flight(&self) -> u32 {
        self.pool.in_flight(self.idx)
    }
    /// Plain EWMA of observed response times (the default RTT before any sample).
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.pool.cold[self.idx].ewma_ns as u64)
    }
    /// Peak-EWMA response time decayed to `now`.
    pub fn peak_ewma(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.pool.peak_ewma_ns(self.idx, now) as u64)
    }
    /// Last reported load.
    pub fn load(&self) -> Load {
        self.pool.cold[self.idx].load
    }
    /// Admission thresholds.
    pub fn thresholds(&self) -> Thresholds {
        self.pool.cold[self.idx].thresholds
    }
    /// Effective weight at `now` (see [`Pool::effective_weight`]).
    pub fn effective_weight(&self, now: Instant) -> u64 {
        self.pool.effective_weight(self.idx, now)
    }
}
