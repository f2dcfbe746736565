//! # lb-sched
//!
//! Choosing a backend: Maglev and other consistent hashes that survive node failure with minimal
//! disruption, and scheduling policies (round robin, least connections, P2C, response-time
//! prediction, admission control, DNS SRV and pool selection). Not built yet.
#![forbid(unsafe_code)]
