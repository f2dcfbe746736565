//! Errors shared by the lb crates.

/// What went wrong while building or decoding a core value.
///
/// Each mechanism crate has its own error enum; this one holds only what lb-core itself can fail at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A flow key was given a source and a destination of different address families.
    #[error("flow key mixes address families (source {src}, destination {dst})")]
    FamilyMismatch {
        /// Family of the source address (4 or 6).
        src: u8,
        /// Family of the destination address (4 or 6).
        dst: u8,
    },
    /// An encoded value had the wrong length.
    #[error("encoded {what} needs {need} bytes, got {have}")]
    Length {
        /// What was being decoded.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes supplied.
        have: usize,
    },
    /// The family byte of an encoded flow key was neither 4 nor 6.
    #[error("unknown address family tag {0}")]
    UnknownFamily(u8),
    /// An encoded IPv4 flow key had non-zero bytes in the unused part of an address field.
    ///
    /// Rejected so that every key has exactly one encoding.
    #[error("encoded IPv4 flow key has non-zero padding")]
    NonZeroPadding,
}
