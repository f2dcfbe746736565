//! # lb-examples
//!
//! The lb crates composed into programs. The per-packet composition itself (parse → track →
//! schedule → rewrite) is the no-I/O crate `lb_dataplane`; this package holds the binaries built
//! on it: `tun-balancer` (a balancer over
//! TUN/TAP), `lb-decap` (backend-side decapsulation), `lb-sim` (hashing and scheduling simulator).
//!
//! The I/O lives in [`config`] (the TOML file), [`sys`] (TUN/TAP devices and raw sockets),
//! [`netlink`] (interface addresses) and [`announce`] (gratuitous ARP, unsolicited neighbour
//! advertisements) — the modules with `unsafe`, each block with its SAFETY note — [`probe`]
//! (health-check probes), [`stats_server`] (statistics over TCP) and [`render`] (their JSON and
//! Prometheus text); [`runtime`] runs the `tun-balancer` process on them, [`ha`] its
//! active/backup pair.
//!
//! Binaries:
//! - `tun-balancer --config FILE [--check]`: see [`config`] for the file, [`runtime`] for the
//!   threads. SIGHUP reloads, SIGTERM / SIGINT stop, `RUST_LOG` sets the log level.
//! - `lb-decap --device NAME --allow PREFIX[,PREFIX...] [--gue-port PORT]`: tunnel-mode backends
//!   without kernel tunnels; its pure parts (the source filter, GUE offsets) are [`decap`].
//!
//! The end-to-end tests (`tests/`, root only) build client / balancer / backend namespaces and
//! document the exact `ip` commands in `tests/common/mod.rs`.
#![deny(unsafe_code)]

pub mod announce;
pub mod bgp;
pub mod config;
pub mod decap;
pub mod ha;
pub mod netlink;
pub mod probe;
pub mod render;
pub mod runtime;
pub mod sim;
pub mod stats_server;
pub mod sys;
pub mod uring;
