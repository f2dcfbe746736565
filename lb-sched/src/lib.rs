//! # lb-sched
//!
//! Choosing a backend: Maglev and other consistent hashes that survive node failure with minimal
//! disruption ([`hash`]), and scheduling policies: static, dynamic, predictive and admission
//! control ([`policy`], over the live [`pool`]), plus site selection ([`site`]).
#![forbid(unsafe_code)]

pub mod error;
pub mod hash;
pub mod policy;
pub mod pool;
pub mod site;

pub use error::SchedError;
