//! Site selection: choosing among sites or servers from the outside, as a client or a resolver
//! does, rather than per flow on a balancer.
//!
//! - [`srv`]: DNS SRV target selection (RFC 2782): lowest priority first, then weighted random
//!   within the priority, with the RFC's running-sum algorithm.
//! - [`rserpool`]: Reliable Server Pooling pool-element selection policies (RFC 5356): round
//!   robin, weighted round robin, random, weighted random, least used, least used with
//!   degradation, priority least used, randomized least used.
//!
//! Both take the caller's RNG and an availability predicate (the health verdicts the caller
//! holds), do no I/O and never panic.

pub mod rserpool;
pub mod srv;
