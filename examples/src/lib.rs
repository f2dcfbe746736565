//! # lb-examples
//!
//! The lb crates composed: the no-I/O `dataplane` module (parse → track → schedule → rewrite) that
//! an embedding proxy copies, and the binaries built on it: `tun-balancer` (a balancer over
//! TUN/TAP), `lb-decap` (backend-side decapsulation), `lb-sim` (hashing and scheduling simulator)
//! and the demo. Not built yet.
#![forbid(unsafe_code)]

pub mod sim;
