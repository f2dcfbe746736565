//! # lb-core: the shared vocabulary of the lb crates
//!
//! `lb` is a family of small, no-I/O crates that supply the mechanisms of a highly available layer-4
//! load balancer. This crate holds what they all speak:
//!
//! - [`FlowKey`] and [`IpProto`]: the 5-tuple of a flow, IPv4 or IPv6, with a reversed and a
//!   canonical (direction-independent) form and a fixed-size 38-byte encoding.
//! - [`Backend`], [`BackendId`], [`Weight`], [`MacAddr`]: the servers a service spreads over.
//! - [`Instant`] and [`Duration`]: explicit time. No lb library reads a clock; callers pass `now`.
//! - [`FlowHasher`]: keyed flow hashing (SipHash-1-3 by default, [`FastHash`] as an option), with a
//!   [`HashKey`] that every balancer of a cluster can derive from a shared passphrase.
//! - [`CoreError`]: the few ways the above can fail.
//!
//! The mechanism crates (`lb-sched`, `lb-packet`, `lb-conntrack`, `lb-health`) depend on this crate
//! only, never on one another.
//!
//! ```
//! use lb_core::{Backend, BackendId, Duration, FlowHasher, FlowKey, HashKey, Instant, IpProto, Weight};
//! use std::net::Ipv4Addr;
//!
//! // A flow as the parser sees it.
//! let flow = FlowKey::v4(Ipv4Addr::new(192, 0, 2, 1), 40001, Ipv4Addr::new(203, 0, 113, 10), 80, IpProto::Tcp);
//!
//! // Three backends; pick one by a keyed hash (a real balancer uses lb-sched's Maglev here).
//! let backends: Vec<Backend> = (0..3)
//!     .map(|i| Backend::new(BackendId(i), format!("198.51.100.{}:80", 11 + i).parse().unwrap()))
//!     .collect();
//! let hasher = FlowHasher::new(HashKey::from_passphrase("cluster secret 7c1f2a9e"));
//! let chosen = &backends[(hasher.hash_flow(&flow) % backends.len() as u64) as usize];
//! assert!(chosen.weight >= Weight::ONE);
//!
//! // Time is a value the caller passes in.
//! let now = Instant::from_secs(10);
//! let deadline = now + Duration::from_secs(300);
//! assert!(deadline > now);
//! ```
#![forbid(unsafe_code)]

mod backend;
mod error;
mod flow;
mod hash;
pub mod mac;
mod time;

pub use backend::{Backend, BackendId, MacAddr, Weight};
pub use error::CoreError;
pub use flow::{FlowKey, IpProto, FLOW_KEY_ENCODED_LEN};
pub use hash::{FastHash, FlowHasher, HashKey, KeyedHash, SipHash13};
pub use time::{Duration, Instant};
