//! # lb-conntrack
//!
//! Bounded connection tracking with per-state timeouts, flood resistance, persistence (client
//! affinity), NAT mappings, session statistics and state sync to a backup balancer. Not built yet.
#![forbid(unsafe_code)]
