//! # lb-health
//!
//! Health checks, failure detectors (fixed timeout, phi accrual), a heartbeat protocol and an
//! active/backup election, as no-I/O state machines driven by explicit time. Not built yet.
#![forbid(unsafe_code)]
