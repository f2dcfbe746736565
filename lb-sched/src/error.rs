//! The error type of lb-sched.

/// What went wrong while building a scheduler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchedError {
    /// No backend was given, or none is eligible.
    #[error("no eligible backend")]
    NoBackends,
    // -- consistent hashing (lb-sched part 1) --

    // -- policies, pool and site selection (lb-sched part 2) --
}
