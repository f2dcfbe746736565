//! The crate's one error type.

use lb_core::BackendId;

/// Everything that can go wrong in lb-health: invalid configuration, unknown or duplicate
/// identifiers, and heartbeat messages that fail to decode or authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HealthError {
    /// A configuration value is out of range; `field` names it.
    #[error("invalid configuration: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The backend is already registered.
    #[error("backend {0} is already registered")]
    DuplicateBackend(BackendId),
    /// The backend is not registered.
    #[error("backend {0} is not registered")]
    UnknownBackend(BackendId),
    /// A heartbeat message is shorter than its header or body requires.
    #[error("truncated heartbeat message: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A heartbeat message is longer than its type allows.
    #[error("oversized heartbeat message: expected {expected} bytes, have {have}")]
    Oversized {
        /// Bytes expected.
        expected: usize,
        /// Bytes present.
        have: usize,
    },
    /// The magic number does not identify an lb heartbeat.
    #[error("bad heartbeat magic")]
    BadMagic,
    /// The protocol version is not supported.
    #[error("unsupported heartbeat version {0}")]
    BadVersion(u8),
    /// The message type is unknown.
    #[error("unknown heartbeat message type {0}")]
    UnknownType(u8),
    /// A field holds a value outside its domain (for example an unknown role).
    #[error("invalid heartbeat field {0}")]
    BadField(&'static str),
    /// The message authentication code does not verify: forged or corrupted.
    #[error("heartbeat authentication failed")]
    BadMac,
    /// The message was already seen, is too old for the replay window, or comes from an older
    /// generation of its sender.
    #[error("replayed or stale heartbeat from node {node}")]
    Replay {
        /// The claimed sender.
        node: u32,
    },
    /// The message claims to come from this node itself.
    #[error("heartbeat claims to come from this node")]
    FromSelf,
}
