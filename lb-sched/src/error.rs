//! The error type of lb-sched.

/// What went wrong while building a scheduler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchedError {
    /// No backend was given, or none is eligible.
    #[error("no eligible backend")]
    NoBackends,
    // -- consistent hashing (lb-sched part 1) --
    /// Two backends share one id; ids must be unique within a table.
    #[error("duplicate backend id {id}")]
    DuplicateBackend {
        /// The repeated id.
        id: lb_core::BackendId,
    },
    /// More eligible backends than a table can index.
    #[error("{count} eligible backends, at most {max} supported")]
    TooManyBackends {
        /// Eligible backends given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A Maglev table size that is not a prime.
    #[error("Maglev table size {size} is not a prime")]
    TableSizeNotPrime {
        /// The size asked for.
        size: u64,
    },
    /// A Maglev table size outside the supported range.
    #[error("Maglev table size {size} is out of range {min}..={max}")]
    TableSizeOutOfRange {
        /// The size asked for.
        size: u64,
        /// The smallest supported size.
        min: u64,
        /// The largest supported size.
        max: u64,
    },
    /// A Maglev table with fewer slots than eligible backends.
    #[error("Maglev table of {size} slots is smaller than the {backends} eligible backends")]
    TableTooSmall {
        /// The table size.
        size: u64,
        /// Eligible backends.
        backends: usize,
    },
    /// A ring would need more points than its configured maximum (weights too large or too
    /// uneven for the chosen points per weight unit).
    #[error("hash ring would need {need} points, more than the maximum {max}")]
    TooManyPoints {
        /// Points the weights call for.
        need: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A bounded-load factor that is not a finite number greater than 1.
    #[error("load bound factor must be finite and > 1")]
    InvalidLoadFactor,

    // -- policies, pool and site selection (lb-sched part 2) --
    /// The backend id is not in the pool.
    #[error("unknown backend {0}")]
    UnknownBackend(lb_core::BackendId),
    /// A policy, pool or site-selection configuration value is out of range.
    #[error("invalid policy configuration: {0}")]
    InvalidPolicyConfig(&'static str),
}
