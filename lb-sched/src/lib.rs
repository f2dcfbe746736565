//! # lb-sched
//!
//! Choosing a backend: Maglev and other consistent hashes that survive node failure with minimal
//! disruption ([`hash`]), and scheduling policies: static, dynamic, predictive and admission
//! control ([`policy`], over the live [`pool`]), plus site selection ([`site`]).
//!
//! Like every lb crate it does no I/O: tables are built from a set of
//! [`Backend`](lb_core::Backend)s (off the data path, by the control plane, then swapped in
//! whole) and answer a keyed flow hash with a backend, without allocating or locking.
//!
//! ```
//! use lb_core::{Backend, BackendId, FlowHasher, FlowKey, HashKey, IpProto, Weight};
//! use lb_sched::hash::{ConsistentHash, Maglev, MaglevConfig, MaglevSize};
//!
//! // Every balancer of the cluster derives the same keys from one secret...
//! let secret = HashKey::from_passphrase("cluster secret 4d1f0c9a2e");
//! let flows = FlowHasher::new(secret.derive("flow"));
//! let cfg = MaglevConfig::new(secret.derive("maglev")).with_size(MaglevSize::DEFAULT);
//!
//! // ...and, given the same backends in any order, builds the same table.
//! let mut backends: Vec<Backend> = (1..=3)
//!     .map(|i| Backend::new(BackendId(i), format!("198.51.100.{i}:80").parse().unwrap()))
//!     .collect();
//! backends[2].weight = Weight::new(2); // twice the share of the others
//! let a = Maglev::new(&backends, cfg)?;
//! backends.reverse();
//! let b = Maglev::new(&backends, cfg)?;
//! assert_eq!(a.slots(), b.slots());
//!
//! // Per packet: hash the flow, look it up (O(1), no allocation).
//! let flow = FlowKey::v4([192, 0, 2, 1].into(), 40000, [203, 0, 113, 10].into(), 80, IpProto::Tcp);
//! let h = flows.hash_flow(&flow);
//! let owner = a.lookup(h).unwrap();
//!
//! // Health checks mark the owner down: only its flows move, along their preference lists.
//! let fallback = a.lookup_eligible(h, |id| id != owner).unwrap();
//! assert_ne!(fallback, owner);
//!
//! // Bad input is a typed error, never a panic.
//! assert!(Maglev::new(&[], cfg).is_err());
//! # Ok::<(), lb_sched::SchedError>(())
//! ```
#![forbid(unsafe_code)]

pub mod error;
pub mod hash;
pub mod policy;
pub mod pool;
pub mod site;

pub use error::SchedError;
pub use policy::{Pick, Policy, Request};
pub use pool::{AdminState, Pool, PoolConfig};
