//! # lb-dataplane
//!
//! The per-packet composition of the lb crates, with no I/O: parse (lb-packet) → conntrack
//! (lb-conntrack) → persistence / layer-5 affinity → scheduler (lb-sched) → rewrite (lb-packet),
//! and the reply path (un-NAT by the reverse index). An embedding proxy uses it as it is: it
//! hands in packets, buffers and the time, and gets back verdicts and counters. No clock, no
//! socket, no thread, no rendering: `tun-balancer` (in `lb-examples`) is one such embedding.
//!
//! # Drive loop
//! ```text
//! control path:  ControlPlane::new(spec, key) → build() → Arc<Tables>
//!                on reload: apply(new spec); on a health transition: set_healthy(id, up);
//!                then build() and hand the new Arc<Tables> to every data path (set_tables).
//!                now and then (and before a reload): cp.release(&dp.release_retired()),
//!                and if it freed any id, build() and set_tables again (ids are recycled).
//! data path:     let v = dp.process(&mut buf, HEADROOM, len, now);
//!                (or dp.process_batch(&mut bufs, HEADROOM, &lens, now, &mut verdicts))
//!                Forward { start, len } → write buf[start..start + len] back to the device
//!                Reply { start, len }   → write buf[start..start + len] (an ICMP error)
//!                Drop(reason)           → nothing (counted in stats)
//!                every millisecond or so: dp.housekeeping(now)
//! ```
//! `process` never panics on packet bytes, never allocates, takes no lock and dispatches without
//! `dyn`. Established flows keep their backend across table swaps: they are found in the flow
//! table before the scheduler is asked.
//!
//! Several threads sharing one data path behind a lock (one per device queue) do part of the
//! work on their own: a [`Classifier`] per thread parses, classifies and hashes a burst before
//! the lock ([`Dataplane::process_batch_classified`]), and with its fast path
//! ([`Classifier::enable_fast_path`], [`Classifier::forward_cached`]) forwards the packets of
//! established NAT / DNAT flows by the plans the data path made for them, without the lock at
//! all, handing their counts back at the next locked call; verdicts and bytes are the locked
//! path's (module `fast`).
//!
//! Active-active behind ECMP (several balancers share a VIP; the router may move a flow from
//! one to another in mid-flow, DESIGN §8 "scale events without drops"): balancers built from
//! the same spec and [`HashKey`] build the same tables, so under a consistent-hash scheduler
//! they place every new flow alike. A packet that cannot start a flow (a TCP segment without
//! SYN, an ICMP error) of a flow this data path does not track is placed in modes `tunnel` and
//! `dr` by the service's consistent hash, exactly as every peer places it whatever the
//! scheduler, and the flow is tracked from then on (Katran's behaviour; [`MidFlow`] turns it
//! off); in modes `nat` and `dnat` it is dropped ([`DropReason::MidFlowUnknown`]), as only sync
//! carries the flow's SNAT tuple. [`Explanation::mid_flow`] says where such a packet would go,
//! [`Stats::mid_flow_placed`] counts them.
//!
//! State flows back out as data: every flow that leaves the flow table (expiry, eviction,
//! close, removal) updates the live load of its backend (IPVS active / inactive connection
//! counts, kept apart from membership so that they survive every table swap), the session
//! statistics and, if asked for, a removal log ([`Dataplane::poll_removal`]).
//! [`Dataplane::explain`] says why a flow goes where it goes.
//!
//! State sync for an active/backup pair (module `sync`): with
//! [`DataplaneOptions::sync_log`] the data path logs the key of every flow it creates, changes
//! or removes and of every template it writes, into a preallocated ring (no allocation or
//! system call per flow); [`Dataplane::sync_drain`] turns the log into lb-conntrack sync
//! records (one per key, its latest state), [`Dataplane::sync_export`] walks the tables for
//! refresh passes and bulk dumps, and [`Dataplane::apply_sync`] installs a peer's records on
//! the backup with their SNAT reservations and live connection counts.
//!
//! ```
//! use lb_dataplane::{
//!     ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Decision, Mode, Proto,
//!     ServiceSpec, Verdict, HEADROOM,
//! };
//! use lb_core::{FlowKey, HashKey, Instant, IpProto};
//!
//! // One service, full NAT, one backend.
//! let spec = DataplaneSpec {
//!     snat_addrs: vec!["203.0.113.100".parse().unwrap()],
//!     services: vec![ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat)
//!         .with_backend("198.51.100.11:8080".parse().unwrap(), 1)],
//!     ..DataplaneSpec::default()
//! };
//! let key = HashKey::from_passphrase("example cluster secret");
//! let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
//! let mut dp = Dataplane::new(&spec, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap();
//!
//! // A client's SYN, 192.0.2.2:40000 → VIP 203.0.113.10:80 (IPv4 + TCP, 40 bytes), placed
//! // after HEADROOM bytes of room for encapsulation.
//! let syn: [u8; 40] = [
//!     0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 2, 203, 0, 113, 10, // IPv4
//!     0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0, // TCP SYN
//! ];
//! let mut buf = [0u8; 2048];
//! buf[HEADROOM..HEADROOM + syn.len()].copy_from_slice(&syn);
//! let now = Instant::from_secs(1);
//! // Before: the scheduler would pick the only backend.
//! let flow = FlowKey::new("192.0.2.2".parse().unwrap(), 40000,
//!     "203.0.113.10".parse().unwrap(), 80, IpProto::Tcp).unwrap();
//! assert!(matches!(dp.explain(&flow, now).decision, Decision::Scheduler(_)));
//! let Verdict::Forward { start, len } = dp.process(&mut buf, HEADROOM, syn.len(), now) else {
//!     panic!("a SYN to the VIP is forwarded");
//! };
//! // Rewritten in place: from the SNAT address to the backend (checksums adjusted).
//! let out = &buf[start..start + len];
//! assert_eq!(&out[12..20], &[203, 0, 113, 100, 198, 51, 100, 11]);
//! assert_eq!(&out[22..24], &8080u16.to_be_bytes());
//! // The flow is tracked, and its backend holds one (not yet established) connection.
//! assert!(matches!(dp.explain(&flow, now).decision, Decision::Flow(_)));
//! let id = dp.explain(&flow, now).decision.backend().unwrap();
//! assert_eq!(dp.backend_load(id, now).unwrap().inactive_conns, 1);
//! // Bytes that are not IP are dropped and counted, never a panic.
//! assert!(matches!(dp.process(&mut [0u8; 2048], HEADROOM, 20, now), Verdict::Drop(_)));
//! assert_eq!(dp.stats().dropped(), 1);
//! ```

mod classify;
mod explain;
mod fast;
mod frag;
mod icmp_limit;
mod load;
mod sip;
mod spec;
mod splice;
mod stats;
mod sync;
mod tables;
#[cfg(test)]
mod tests;
mod timing;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use lb_conntrack::{
    Config as CtConfig, ConnTable, FlowState, Insert, NewFlow, Packet, Prefetched, Refusal,
    Removal, Service, SessionStats, SnatPool, TcpFlags, TemplateKey,
};
use lb_core::{BackendId, Duration, FlowHasher, FlowKey, HashKey, Instant, IpProto};
use lb_health::Observation;
use lb_packet::icmp::{self, IcmpError};
use lb_packet::offload::{self, L4Csum, VnetHdr};
use lb_packet::tunnel::{self, Encap, TunnelParams};
use lb_packet::{dr, nat, parse, Family, Fragment, Link, PacketBuf, PacketError, Parsed};
use lb_sched::hash::{AnyHash, ConsistentHash};
use lb_sched::policy::{Pick, Request};
use rand::rngs::SmallRng;
use rand::SeedableRng;

pub use explain::{BackendView, Decision, Explanation, FlowView, ServiceView};
pub use frag::{FRAG_CAPACITY, FRAG_TIMEOUT, MAX_FRAG_CAPACITY};
pub use icmp_limit::{
    unicast_destination, unicast_source, IcmpLimit, IcmpLimits, TokenBucket, ICMP_BURST,
    ICMP_PEER_BURST, ICMP_PEER_RATE, ICMP_PEER_SLOTS, ICMP_RATE, MAX_ICMP_RATE,
};
pub use load::{BackendLoad, Ewma, LoadEvent, Observed};

pub use classify::Classifier;
pub use fast::{FAST_PATH_ROOM, FAST_PATH_TTL};
pub use sip::SIP_CALL_TIMEOUT;
pub use spec::{
    parse_mac, Affinity, BackendSpec, DataplaneSpec, MidFlow, Mode, Netmask, OutlierSpec, Proto,
    SchedulerKind, ServiceSpec, SpliceRule, SpliceSpec, TunnelKind, UnknownName, UnknownScheduler,
    MAX_SPLICE_HEAD,
};
pub use splice::{SpliceReloadError, SpliceStats, OUR_WSCALE};
pub use stats::{BackendStats, DropReason, Stats, TableStats, SESSION_STATS_BACKENDS};
pub use sync::{SyncApplied, SyncChange, SyncCursor};
pub use tables::{BackendInfo, BuildError, ControlPlane, Reload, ServiceTable, Tables};
pub use validate::SpecError;

use classify::{OwnRing, PreRing, OWN_RING};
use fast::Action;
use load::Live;
use tables::Scheduler;
use timing::{Sample, Timing};

/// How many packets ahead [`Dataplane::process_batch`] fetches flow-table slots (index lines:
/// twice as far). At ~100 ns of work per packet, 4 packets cover a ~200 ns memory latency.
pub const PIPELINE: usize = 4;

/// One packet being processed: where it sits in its buffer, what parsing found, what the
/// burst pre-pass computed, and the time. Passed by reference down the per-packet path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'p> {
    /// Offset of the packet in the buffer.
    pub(crate) start: usize,
    /// End of the packet in the buffer.
    pub(crate) end: usize,
    /// Its parse.
    pub(crate) p: &'p Parsed,
    /// TCP flags (none for other protocols, fragments and ICMP errors).
    pub(crate) flags: TcpFlags,
    /// IP bytes on the wire, for the counters (all segments' for a GSO super-packet).
    pub(crate) bytes: u32,
    /// Wire segments it stands for (1 but for a GSO super-packet).
    pub(crate) segs: u32,
    /// How its L4 checksum stands (partial with offloads on).
    pub(crate) csum: L4Csum,
    /// Its flow-table hash and candidate slot, when a burst computed them.
    pub(crate) hash: Option<Prefetched>,
    /// The time.
    pub(crate) now: Instant,
}

/// A packet parsed and classified ahead of processing, in a burst.
#[derive(Debug, Clone, Copy)]
struct Pre {
    p: Parsed,
    /// The service it is addressed to (`None`: a reply or ICMP error of a NAT flow).
    si: Option<usize>,
    /// Its key's hash in its family's flow table, and (after the burst's prefetch) the
    /// candidate slot its index line pointed at.
    hash: Prefetched,
}

/// Headroom to leave in front of each packet: enough for any encapsulation (IPv6 + UDP + GUE).
pub const HEADROOM: usize = 64;

/// Slots of each flow table [`Dataplane::housekeeping`] sweeps per call (see
/// [`lb_conntrack::ConnTable::sweep`]): at one call per 10 ms (tun-balancer), a table of 1 Mi
/// flows is looked through every 10 s, a few microseconds of each call.
pub const SWEEP_SLOTS: usize = 1024;

/// SNAT source ports handed out per backend and SNAT address.
pub const SNAT_PORTS: core::ops::RangeInclusive<u16> = 1024..=65535;

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Send `buf[start..start + len]` (the rewritten packet) back out.
    Forward {
        /// Offset of the packet in the buffer (smaller than the input's after encapsulation).
        start: usize,
        /// Its length.
        len: usize,
    },
    /// Send `buf[start..start + len]`: an ICMP error for the packet's sender (which replaced it).
    Reply {
        /// Offset of the reply in the buffer.
        start: usize,
        /// Its length.
        len: usize,
    },
    /// Drop the packet.
    Drop(DropReason),
    /// A GSO super-packet this mode cannot forward as one (tunnel: the virtio-net header cannot
    /// describe an encapsulated super-packet; SIP: each datagram is placed by its own Call-ID;
    /// a TCP splice before the connection is spliced: it reads the handshake and the request
    /// head segment by segment).
    /// Cut it with [`lb_packet::offload::Segmenter`] and process each segment as an ordinary
    /// packet. Nothing was changed, and nothing counted but [`Stats::gso_cut`].
    Segment,
    /// Nothing to send: the data path absorbed the packet (a TCP splice holding a client's
    /// request head, or a segment it answers later).
    Held,
}

/// How a data path is set up, beside the configuration.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    /// What the device delivers: IP packets (TUN) or Ethernet frames (TAP).
    pub link: Link,
    /// Keys the flow hashes (the same key on every balancer of a cluster keeps their choices
    /// identical).
    pub key: HashKey,
    /// Seeds the randomised schedulers and the SNAT pools' starting port (give each process
    /// a fresh random seed).
    pub seed: u64,
    /// SNAT source ports this data path hands out; several data paths sharing SNAT addresses
    /// must use disjoint ranges.
    pub snat_ports: core::ops::RangeInclusive<u16>,
    /// Removals kept for [`Dataplane::poll_removal`] (0: none kept; a state-sync sender wants
    /// a few bursts' worth and reads them after every burst).
    pub removal_log: usize,
    /// Changes kept for the state-sync sender ([`Dataplane::sync_drain`]); 0: none (a balancer
    /// without a peer). A sender draining every few milliseconds wants room for a few
    /// milliseconds of new flows at the highest rate expected, e.g. 65 536.
    pub sync_log: usize,
    /// Milliseconds to add to [`Instant`]s where a clock leaves the process: the TCP
    /// timestamps of a splice's backend connections count from it. Give the wall clock at
    /// `Instant::ZERO` in ms since the Unix epoch, so that they keep growing across a restart
    /// and agree (to the clocks' skew) across a cluster: a backend holding one of the SNAT
    /// 4-tuples in TIME_WAIT takes a new SYN on it only with a newer timestamp. 0 by default.
    pub clock_base_ms: u64,
    /// New flows each flow table must be able to take before one evicts a flow past its
    /// handshake (free places plus half-open entries, [`lb_conntrack::ConnTable::spare`]) for
    /// a fast path to forward a burst's packets by their plans wherever they stand in it, not
    /// only before its first packet that needs the lock ([`FAST_PATH_ROOM`] by default;
    /// module notes of `fast.rs`, "Order"). Keep it above what the bursts of every queue
    /// thread can insert between two of its locks.
    pub fast_path_room: usize,
}

impl DataplaneOptions {
    /// IP packets, all SNAT ports ([`SNAT_PORTS`]), seed 1.
    pub fn new(key: HashKey) -> Self {
        DataplaneOptions {
            link: Link::Ip,
            key,
            seed: 1,
            snat_ports: SNAT_PORTS,
            removal_log: 0,
            sync_log: 0,
            clock_base_ms: 0,
            fast_path_room: FAST_PATH_ROOM,
        }
    }

    /// The same options for Ethernet frames (TAP).
    #[must_use]
    pub fn ethernet(mut self) -> Self {
        self.link = Link::Ethernet;
        self
    }
}

/// What can go wrong setting up a data path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataplaneError {
    /// The flow table rejected its configuration.
    #[error("conntrack: {0}")]
    Conntrack(#[from] lb_conntrack::ConntrackError),
    /// The spec is out of range ([`DataplaneSpec::validate`]).
    #[error("{0}")]
    Spec(#[from] SpecError),
}

/// One data path: its own flow tables and scheduler state, over shared immutable [`Tables`].
#[derive(Debug)]
pub struct Dataplane {
    link: Link,
    tables: Arc<Tables>,
    /// Live load by service (pools, policies, outlier detectors): survives table swaps.
    live: Live,
    /// Handshakes and first responses being timed.
    timing: Timing,
    /// Finished flows: duration and packet histograms, overall and per backend.
    sessions: SessionStats,
    /// Removals kept for the embedder ([`Dataplane::poll_removal`]), at most
    /// `removal_log_cap`.
    removal_log: std::collections::VecDeque<Removal>,
    removal_log_cap: usize,
    /// Changes for the sync sender ([`DataplaneOptions::sync_log`]), at most `sync_cap`.
    sync: std::collections::VecDeque<sync::SyncChange>,
    sync_cap: usize,
    /// IPv4 flows and IPv6 flows: one SNAT pool per table, as lb-conntrack's pools are of one
    /// address family.
    ct4: ConnTable,
    ct6: ConnTable,
    flows: FlowHasher,
    rng: SmallRng,
    stats: Stats,
    /// Generated ICMP errors: their scratch space and rate limits (module `icmp_limit`).
    icmp: icmp_limit::IcmpOut,
    /// Datagrams whose first fragment went through (module `frag`).
    frag: frag::FragTable,
    /// By backend id: retired, and reported free by [`Dataplane::release_retired`] (its state
    /// is gone; sync may not install anything for it) until tables without it arrive.
    released: Vec<bool>,
    /// Layer-5 splicing (module `splice`).
    splice: splice::Splicer,
    /// The `splice_capacity` the splice slots were built for (a reload may not change it).
    splice_capacity: usize,
    /// The fingerprint of the flow tables' hash keys (`classify::owner_of`): a
    /// [`Classifier`]'s hashes are used only if its fingerprint is this one.
    owner: u64,
    /// The generation and the per-flow epochs of the classifiers' cached plans (module
    /// `fast`): one moves whenever a plan could have become wrong. Shared with the
    /// classifiers, which read them without the lock.
    gen: Arc<fast::Epochs>,
    /// Both tables' departures read as removal records, or taken as seen when the
    /// generation moved for departures without one.
    departed_seen: u64,
    /// A fast path was given a plan: departures and state changes move their flow's epoch.
    plans_made: bool,
    /// [`DataplaneOptions::fast_path_room`].
    fast_room: usize,
    /// A fast path is being filled: `forward` / `reply` leave the plan of a plain hit here.
    want_plan: bool,
    plan: Option<fast::Plan>,
}

#[inline]
fn tcp_flags(pkt: &[u8], p: &Parsed) -> TcpFlags {
    // A first fragment holds the whole TCP header (RFC 1858): its flags count.
    if p.proto == IpProto::Tcp && p.fragment != Fragment::NonFirst && p.icmp.is_none() {
        TcpFlags(pkt.get(p.l4 + 13).copied().unwrap_or(0))
    } else {
        TcpFlags::NONE
    }
}

/// Whether a packet may start a flow: a TCP SYN without ACK, a UDP datagram; never an ICMP
/// error. Any other packet of a flow the table does not know is a mid-flow packet
/// ([`Dataplane::mid_flow`]).
#[inline]
fn starts_flow(p: &Parsed, flags: TcpFlags) -> bool {
    p.icmp.is_none()
        && (p.proto != IpProto::Tcp
            || (flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK)))
}

#[inline]
fn endpoint(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

fn refusal(i: Insert) -> DropReason {
    match i {
        Insert::Refused(Refusal::PortsExhausted) => DropReason::PortsExhausted,
        Insert::Refused(Refusal::FamilyMismatch | Refusal::NatDisabled) => {
            DropReason::RewriteFailed
        }
        // Not reached: the tables give backends ids up to MAX_BACKEND_ID only.
        Insert::Refused(Refusal::BackendId) => DropReason::NoBackend,
        _ => DropReason::TableFull,
    }
}

impl DataplaneSpec {
    /// The configurations of the two flow tables a data path builds for this spec: IPv4, and
    /// IPv6 (a quarter of the capacity, at least 16). Shared with [`DataplaneSpec::validate`],
    /// which checks them without allocating.
    pub(crate) fn conntrack_configs(&self) -> (CtConfig, CtConfig) {
        let cap = self.conntrack_capacity.max(16);
        let cfg = CtConfig {
            capacity: cap,
            ipv6_capacity: 0,
            nat: true,
            // Session histograms are recorded by the data path, from the removal stream.
            flow_stats: false,
            stats_backends: SESSION_STATS_BACKENDS,
            timeouts: self.timeouts,
            persist_capacity: self.persist_capacity.max(1),
            ..CtConfig::default()
        };
        let cap6 = (cap / 4).max(16);
        let cfg6 = CtConfig {
            capacity: cap6,
            ipv6_capacity: cap6,
            ..cfg
        };
        (cfg, cfg6)
    }
}

impl Dataplane {
    /// A data path for `spec` (capacity, SNAT addresses) starting with `tables`.
    ///
    /// # Errors
    /// The flow table rejected the capacity, the SNAT addresses or the port range.
    pub fn new(
        spec: &DataplaneSpec,
        tables: Arc<Tables>,
        opts: DataplaneOptions,
    ) -> Result<Dataplane, DataplaneError> {
        spec.validate()?;
        let DataplaneOptions {
            link,
            key,
            seed,
            snat_ports,
            removal_log,
            sync_log,
            clock_base_ms,
            fast_path_room,
        } = opts;
        let (cfg, cfg6) = spec.conntrack_configs();
        // Spliced connections take the top of the SNAT port range (module `splice`).
        let (mut splice, snat_ports) = splice::Splicer::new(spec, key, snat_ports, clock_base_ms);
        splice.log_cap = sync_log;
        let mut ct4 = ConnTable::new(cfg, key.derive("conntrack4"))?;
        let mut ct6 = ConnTable::new(cfg6, key.derive("conntrack6"))?;
        let v4: Vec<IpAddr> = spec
            .snat_addrs
            .iter()
            .copied()
            .filter(IpAddr::is_ipv4)
            .collect();
        let v6: Vec<IpAddr> = spec
            .snat_addrs
            .iter()
            .copied()
            .filter(IpAddr::is_ipv6)
            .collect();
        // Where the SNAT pools start handing out ports: from the seed, so that a restarted
        // balancer (given a fresh seed) does not reuse the tuples its predecessor just closed,
        // which backends may still hold in TIME_WAIT (see `lb_conntrack::SnatPool`).
        let start = (seed ^ (seed >> 32)) as u32;
        if !v4.is_empty() {
            ct4.set_snat_pool(SnatPool::new(v4, snat_ports.clone())?.with_start(start));
        }
        if !v6.is_empty() {
            ct6.set_snat_pool(SnatPool::new(v6, snat_ports)?.with_start(start));
        }
        let owner = classify::owner_of(ct4.flow_hasher(), ct6.flow_hasher());
        let mut dp = Dataplane {
            owner,
            gen: Arc::new(fast::Epochs::new()),
            departed_seen: 0,
            plans_made: false,
            fast_room: fast_path_room,
            want_plan: false,
            plan: None,
            link,
            tables: tables.clone(),
            ct4,
            ct6,
            flows: FlowHasher::new(key.derive("flow")),
            rng: SmallRng::seed_from_u64(seed),
            stats: Stats::default(),
            icmp: icmp_limit::IcmpOut::new(tables.icmp, key.derive("icmp")),
            live: Live::default(),
            timing: Timing::new(key.derive("timing")),
            sessions: SessionStats::new(SESSION_STATS_BACKENDS),
            removal_log: std::collections::VecDeque::with_capacity(removal_log),
            removal_log_cap: removal_log,
            sync: std::collections::VecDeque::with_capacity(sync_log),
            sync_cap: sync_log,
            frag: frag::FragTable::new(
                spec.frag_capacity,
                spec.frag_timeout,
                FlowHasher::new(key.derive("frag")),
            ),
            released: Vec::new(),
            splice,
            splice_capacity: spec.splice_capacity,
        };
        dp.set_tables(tables, Instant::ZERO);
        Ok(dp)
    }

    /// Installs new tables (control path: allocates). Established flows keep their backends;
    /// live load (connection counts, latency estimates, policy cursors, outlier state) carries
    /// over to the new membership. `now` starts the slow-start ramp of a backend that joined or
    /// recovered.
    pub fn set_tables(&mut self, tables: Arc<Tables>, now: Instant) {
        self.live.reconcile(&tables, now);
        self.icmp.set_limits(tables.icmp);
        // A released id stays released while the tables still show it retired (the control
        // plane has not dropped it yet); a new backend under it, or none, starts afresh.
        self.released.resize(tables.backends.len(), false);
        for (r, b) in self.released.iter_mut().zip(tables.backends.iter()) {
            *r = *r && b.is_some_and(|b| !b.live);
        }
        let (mut in_use, mut retired) = (0u64, 0u64);
        for b in tables.backends.iter().flatten() {
            in_use += 1;
            if !b.live {
                retired += 1;
            }
            if self.released.get(b.id.get() as usize) == Some(&true) {
                continue;
            }
            if b.mode == Mode::Nat {
                let ct = if b.addr.is_ipv4() {
                    &mut self.ct4
                } else {
                    &mut self.ct6
                };
                if let Some(pool) = ct.snat_pool_mut() {
                    pool.add_backend_at(b.id, b.addr);
                }
            }
        }
        if self.stats.backends.len() < tables.backends.len() {
            self.stats
                .backends
                .resize(tables.backends.len(), BackendStats::default());
        }
        self.stats.backend_ids_in_use = in_use;
        self.stats.backend_ids_retired = retired;
        self.tables = tables;
        self.invalidate_plans();
    }

    /// Installs the spliced services of a reloaded configuration (control path: allocates):
    /// host/path rules, affinity and limits change for new connections, a new spliced VIP is
    /// served, a removed one takes no new connection while its spliced connections run on.
    /// Call it with the tables of the same configuration ([`Dataplane::set_tables`]), under
    /// the same lock.
    ///
    /// # Errors
    /// [`SpliceReloadError`] when the change needs a new data path: the first spliced service
    /// of a data path built without one, or another `splice_capacity`. Nothing changes then.
    pub fn set_splice(&mut self, spec: &DataplaneSpec) -> Result<(), SpliceReloadError> {
        self.invalidate_plans();
        self.splice.reconfigure(spec, self.splice_capacity)
    }

    /// Retired backends (removed from the configuration, `live == false` in the tables in
    /// force) that nothing here refers to any more: no flow of either table is bound to them
    /// (the removal stream's count, [`Dataplane::backend_flows`]). Their persistence templates
    /// and SIP Call-ID bindings are purged, their SNAT pools, statistics slots, live load,
    /// outlier and timing state dropped, and from now on sync installs nothing for them. Hand
    /// the ids to [`ControlPlane::release`], which frees them for reuse; an id reused later
    /// therefore never carries an old flow or template to its new backend.
    ///
    /// Control path (it allocates and, when it releases something, visits every template and
    /// the timing and fragment tables): call it now and then, e.g. every 100 ms, and before a
    /// reload. Returns nothing (no allocation) when there is nothing to release.
    pub fn release_retired(&mut self) -> Vec<BackendId> {
        let tables = self.tables.clone();
        let out: Vec<BackendId> = tables
            .backends
            .iter()
            .flatten()
            .filter(|b| !b.live && self.released.get(b.id.get() as usize) == Some(&false))
            .filter(|b| self.live.flows(b.id) == 0)
            .map(|b| b.id)
            .collect();
        if out.is_empty() {
            return out;
        }
        for &id in &out {
            if let Some(r) = self.released.get_mut(id.get() as usize) {
                *r = true;
            }
        }
        let released = &self.released;
        let gone = |b: BackendId| released.get(b.get() as usize) == Some(&true);
        self.timing.forget(gone);
        self.frag.forget(gone);
        for ct in [&mut self.ct4, &mut self.ct6] {
            ct.persist_mut().purge_backends(gone);
            if let Some(pool) = ct.snat_pool_mut() {
                for &id in &out {
                    pool.remove_backend(id);
                }
            }
        }
        for &id in &out {
            self.live.forget(id);
            self.sessions.reset_backend(id);
            if let Some(s) = self.stats.backends.get_mut(id.get() as usize) {
                *s = BackendStats::default();
            }
        }
        self.stats.backend_ids_released += out.len() as u64;
        self.invalidate_plans();
        out
    }

    /// Flows in the tables (both families) bound to backend `id`.
    pub fn backend_flows(&self, id: BackendId) -> u32 {
        self.live.flows(id)
    }

    /// The tables in force.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Flow-table figures (both families).
    pub fn table_stats(&self) -> TableStats {
        let (c4, c6) = (self.ct4.counters(), self.ct6.counters());
        let (p4, p6) = (self.ct4.persist().counters(), self.ct6.persist().counters());
        TableStats {
            entries: (self.ct4.len() + self.ct6.len()) as u64,
            capacity: (self.ct4.capacity() + self.ct6.capacity()) as u64,
            memory_bytes: (self.ct4.memory().total + self.ct6.memory().total) as u64,
            evicted_half_open: c4.evicted_half_open + c6.evicted_half_open,
            evicted_lru: c4.evicted_lru + c6.evicted_lru,
            evicted_snat_pressure: c4.evicted_snat_pressure + c6.evicted_snat_pressure,
            refused: c4.refused_full
                + c6.refused_full
                + c4.refused_ipv6
                + c6.refused_ipv6
                + c4.refused_nat
                + c6.refused_nat
                + c4.refused_ports
                + c6.refused_ports,
            swept: c4.swept + c6.swept,
            persist_entries: (self.ct4.persist().len() + self.ct6.persist().len()) as u64,
            persist_capacity: (self.ct4.persist().capacity() + self.ct6.persist().capacity())
                as u64,
            persist_established: (self.ct4.persist().established_len()
                + self.ct6.persist().established_len()) as u64,
            persist_shed: p4.shed + p6.shed,
            persist_refused: p4.refused + p6.refused,
            persist_swept: p4.swept + p6.swept,
            sessions: *self.sessions.overall(),
            backend_sessions: (0..SESSION_STATS_BACKENDS as u32)
                .map(|id| {
                    self.sessions
                        .backend(BackendId(id))
                        .copied()
                        .unwrap_or_default()
                })
                .collect(),
        }
    }

    /// The backend of a flow tracked at `now` (original direction), if any.
    pub fn flow_backend(&self, key: &FlowKey, now: Instant) -> Option<BackendId> {
        let ct = if key.is_ipv4() { &self.ct4 } else { &self.ct6 };
        ct.get(key, now).map(|e| e.backend)
    }

    /// Backend `id`'s live load at `now`: connection counts, admission, latency estimates,
    /// ejection (`None` for an id no service has).
    pub fn backend_load(&self, id: BackendId, now: Instant) -> Option<BackendLoad> {
        self.live.load(id, now)
    }

    /// The next ejection or return of a backend by passive outlier detection, for the
    /// embedder to log (the last 256 are kept).
    #[must_use]
    pub fn poll_event(&mut self) -> Option<LoadEvent> {
        self.live.events.pop_front()
    }

    /// Expires idle flows and persistence templates, at most `budget` of each per table;
    /// returns ejected backends whose time is up to rotation and counts SYNs left unanswered.
    /// Returns the number of flows removed. Each call also sweeps [`SWEEP_SLOTS`] slots of
    /// each flow table ([`lb_conntrack::ConnTable::sweep`]) and of each persistence table
    /// ([`lb_conntrack::PersistTable::sweep`]), so that every timed-out flow or template leaves
    /// within a period of capacity / `SWEEP_SLOTS` calls (with budget left by the lists'
    /// expiry).
    pub fn housekeeping(&mut self, now: Instant, budget: usize) -> usize {
        let mut n = 0;
        for ct in [&mut self.ct4, &mut self.ct6] {
            // At most what the removal queue can take now: nothing removed goes unreported.
            // (With a budget larger than the queue, the rest waits for the next call.)
            let expired = ct.expire(now, budget);
            // A slice of the table in slot order: a flow seen again and then idle may wait in
            // its class list well past its deadline; the sweep bounds that by its period.
            n += expired + ct.sweep(now, SWEEP_SLOTS, budget.saturating_sub(expired));
            // Templates likewise: expiry stops at a live head, and one with a shorter timeout
            // behind it waits for the sweep.
            let p = ct.persist_mut();
            let gone = p.expire(now, budget);
            p.sweep(now, SWEEP_SLOTS, budget.saturating_sub(gone));
        }
        self.drain_removals();
        self.live.poll_outliers(now);
        // Unanswered SYNs: a slice of the timing table per call, 64 slots at a time.
        let mut failed = [BackendId(0); 64];
        for _ in 0..8 {
            let mut k = 0;
            let live = &self.live;
            self.timing.expire(
                now,
                failed.len(),
                STALE_TIMING,
                |id| live.syn_timeout(id),
                |id| {
                    if let Some(f) = failed.get_mut(k) {
                        *f = id;
                        k += 1;
                    }
                },
            );
            for &id in failed.iter().take(k) {
                self.live.observe(id, Observation::Timeout, now);
            }
        }
        self.publish_gen();
        n
    }

    /// Hands every flow the tables removed since the last call to the live load.
    #[inline]
    fn drain_removals(&mut self) {
        if self.ct4.pending_removals() > 0 {
            while let Some(r) = self.ct4.poll_removal() {
                self.removed(&r);
            }
        }
        if self.ct6.pending_removals() > 0 {
            while let Some(r) = self.ct6.poll_removal() {
                self.removed(&r);
            }
        }
    }

    /// A tracked flow's state changed (`hit`): live load and sync learn it, and if it left a
    /// steady state, its cached plans are retired (`flow`: its client → service key;
    /// `flow_hash`: that key's table hash, if the caller has it).
    #[inline]
    fn flow_moved(&mut self, flow: FlowKey, flow_hash: Option<u64>, hit: &lb_conntrack::Hit) {
        if fast::steady(hit.was.unwrap_or(FlowState::Other)) && self.plans_made {
            let h = flow_hash.unwrap_or_else(|| self.table_hash(&flow));
            self.retire_flow(h);
        }
        self.live.moved(hit.backend, hit.was, hit.state);
        self.sync_log(sync::SyncChange::Flow(flow));
    }

    /// One flow left a table: the one stream that feeds live load, session statistics and
    /// the embedder's removal log (sync deletes).
    #[inline]
    fn removed(&mut self, r: &Removal) {
        self.departed(&r.key);
        self.live.removed(r);
        if sync::synced_removal(r.reason) {
            self.sync_log(sync::SyncChange::Gone(r.key));
        }
        let ms = u64::try_from((r.last_seen - r.opened).as_millis()).unwrap_or(u64::MAX);
        self.sessions.record(r.backend, ms, r.packets);
        if self.removal_log_cap > 0 {
            if self.removal_log.len() >= self.removal_log_cap {
                self.removal_log.pop_front();
                self.stats.removals_unread += 1;
            }
            self.removal_log.push_back(*r);
        }
    }

    /// The next flow that left the flow tables, oldest first, when the data path keeps a
    /// removal log ([`DataplaneOptions::removal_log`]): what a sync sender turns into deletes.
    /// A log the embedder does not read in time drops its oldest records
    /// ([`Stats::removals_unread`]).
    #[must_use]
    pub fn poll_removal(&mut self) -> Option<Removal> {
        self.removal_log.pop_front()
    }

    /// Processes the packet at `buf[start..start + len]` (with `start` bytes of headroom before
    /// it, at least [`HEADROOM`] for tunnel mode), rewriting it in place.
    #[inline]
    pub fn process(&mut self, buf: &mut [u8], start: usize, len: usize, now: Instant) -> Verdict {
        let mut none = VnetHdr::NONE;
        let v = self.process_pre(buf, start, len, now, None, &mut none);
        self.drain_removals();
        self.plan = None;
        self.publish_gen();
        v
    }

    /// Processes a burst: `bufs[i][start..start + lens[i]]` gives `out[i]` (cut to the shortest
    /// of the three slices). Same verdicts as [`Dataplane::process`] on each packet in turn,
    /// faster: software-pipelined, so that while packet `i` is looked up and rewritten, the
    /// flow-table slot of packet `i + D` is being fetched ([`ConnTable::candidate`]) and the
    /// index line of packet `i + 2D` is on its way ([`ConnTable::prefetch_bucket`]), with `D` =
    /// [`PIPELINE`] packets. The cache misses of the burst overlap with its work.
    pub fn process_batch<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        start: usize,
        lens: &[usize],
        now: Instant,
        out: &mut [Verdict],
    ) {
        self.batch(
            bufs,
            start,
            lens,
            None,
            now,
            out,
            &mut OwnRing([None; OWN_RING]),
            None,
        );
    }

    /// [`Dataplane::process_batch`] for a device with offloads on: `hdrs[i]` is the virtio-net
    /// header that came with packet `i` ([`lb_packet::offload`]), and on return the one to
    /// write with its verdict's bytes. GSO super-packets are rewritten whole in modes `nat`,
    /// `dnat` and `dr`, and by a TCP splice once spliced (partial checksums kept partial,
    /// segments counted as packets);
    /// [`Verdict::Segment`] asks the caller to cut the others. A header that does not describe
    /// its packet is [`DropReason::BadOffload`].
    pub fn process_batch_offload<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        start: usize,
        lens: &[usize],
        hdrs: &mut [VnetHdr],
        now: Instant,
        out: &mut [Verdict],
    ) {
        self.batch(
            bufs,
            start,
            lens,
            Some(hdrs),
            now,
            out,
            &mut OwnRing([None; OWN_RING]),
            None,
        );
    }

    /// The burst pipeline; `ring` holds the packets' classifications (filled here in stage 1,
    /// or already by a [`Classifier`]).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn batch<B: AsMut<[u8]>, R: PreRing>(
        &mut self,
        bufs: &mut [B],
        start: usize,
        lens: &[usize],
        mut hdrs: Option<&mut [VnetHdr]>,
        now: Instant,
        out: &mut [Verdict],
        ring: &mut R,
        mut fast: Option<&mut fast::FastCache>,
    ) {
        const D: usize = PIPELINE;
        let n = bufs.len().min(lens.len()).min(out.len());
        self.want_plan = fast.is_some();
        // Packets the fast path forwarded: nothing to do for them here.
        let skip = |f: &Option<&mut fast::FastCache>, j: usize| {
            f.as_deref().is_some_and(|f| f.done.get(j) == Some(&true))
        };
        for j in 0..n + 2 * D {
            // Stage 1: parse, classify, hash (unless done); fetch the index line.
            let done = j < n && lens.get(j).is_some_and(|&len| ring.classified(j, len));
            if let Some(slot) = ring.at(j).filter(|_| j < n && !skip(&fast, j)) {
                // Filled in place: a `Pre` returned by value was copied into the ring
                // (a `memcpy` of ~190 bytes per packet).
                if !done {
                    match (bufs.get_mut(j), lens.get(j)) {
                        (Some(b), Some(&len)) => self.pre_classify(b.as_mut(), start, len, slot),
                        _ => *slot = None,
                    }
                }
                if let Some(x) = slot.as_ref() {
                    let (ct, h) = (self.table_of(x), x.hash.hash());
                    if x.si.is_some() {
                        ct.prefetch_bucket(h);
                    } else {
                        ct.prefetch_reply_bucket(h);
                    }
                }
            }
            // Stage 2: read the index line, fetch the candidate slot.
            if let Some(c) = j.checked_sub(D).filter(|&c| c < n && !skip(&fast, c)) {
                if let Some(x) = ring.at(c).and_then(|x| x.as_mut()) {
                    let (ct, h) = (self.table_of(x), x.hash.hash());
                    x.hash = if x.si.is_some() {
                        ct.candidate(h)
                    } else {
                        ct.reply_candidate(h)
                    };
                }
            }
            // Stage 3: process.
            if let Some(c) = j.checked_sub(2 * D).filter(|&c| c < n && !skip(&fast, c)) {
                if let (Some(b), Some(&len), Some(o)) =
                    (bufs.get_mut(c), lens.get(c), out.get_mut(c))
                {
                    let mut none = VnetHdr::NONE;
                    let hdr = match hdrs.as_deref_mut().and_then(|h| h.get_mut(c)) {
                        Some(h) => h,
                        None => &mut none,
                    };
                    let pre = ring.at(c).and_then(|x| x.as_ref());
                    // A packet the fast pass found a plan for: by it, if nothing changed.
                    let planned = match (fast.as_deref(), pre) {
                        (Some(f), Some(x)) => f.candidate(c, x).and_then(|plan| {
                            self.fast_in_turn(plan, f.g0, x, b.as_mut(), start, len, hdr, now)
                        }),
                        _ => None,
                    };
                    *o = match (planned, fast.as_deref_mut()) {
                        (Some(v), f) => {
                            if let Some(f) = f {
                                f.hit();
                            }
                            v
                        }
                        (None, f) => {
                            // A plan for this packet's flow only if the plans are paying.
                            self.want_plan = f.is_some_and(|f| f.admit());
                            self.process_pre(b.as_mut(), start, len, now, pre, hdr)
                        }
                    };
                    // What left the table reaches the live load before the next packet is
                    // scheduled, as in `process` (found by the dataplane fuzz target: a burst
                    // saw stale connection counts after an eviction and chose differently).
                    self.drain_removals();
                    // (Without a fast path, once at the end: only a fast path's plans for
                    // this burst need the departures so far at each packet.)
                    if fast.is_some() {
                        self.publish_gen();
                    }
                    // (Checked first: `take` would copy the whole plan out every time.)
                    if self.plan.is_some() {
                        if let (Some(plan), Verdict::Forward { .. }, Some(f)) =
                            (self.plan.take(), *o, fast.as_deref_mut())
                        {
                            self.fast_fill(f, plan);
                        }
                    }
                }
            }
        }
        self.want_plan = false;
        self.publish_gen();
    }

    /// Parses a packet and finds the service it is addressed to (`None`: a reply or ICMP
    /// error of a NAT flow). The drop reason for what never reaches the flow table.
    #[inline]
    fn classify(&self, pkt: &[u8]) -> Result<(Parsed, Option<usize>), DropReason> {
        let p = match parse(pkt, self.link) {
            Ok(p) => p,
            Err(PacketError::UnsupportedEtherType(_)) => return Err(DropReason::NotIp),
            Err(_) => return Err(DropReason::Malformed),
        };
        let k = p.key;
        Ok((
            p,
            self.tables.service_index(k.dst(), k.dst_port(), k.proto()),
        ))
    }

    /// [`Dataplane::classify`] plus the flow-table hash, for a burst, into `out`; `None` for
    /// whatever `process` drops before the flow table (it classifies again and counts the
    /// reason).
    #[inline]
    fn pre_classify(&self, buf: &[u8], start: usize, len: usize, out: &mut Option<Pre>) {
        classify::pre_classify(
            self.link,
            &self.tables,
            [self.ct4.flow_hasher(), self.ct6.flow_hasher()],
            buf,
            start,
            len,
            out,
        );
    }

    /// `k`'s hash in its family's flow table.
    #[inline]
    fn table_hash(&self, k: &FlowKey) -> u64 {
        if k.is_ipv4() {
            self.ct4.flow_hash(k)
        } else {
            self.ct6.flow_hash(k)
        }
    }

    /// The flow table of a classified packet's family.
    #[inline(always)]
    fn table_of(&self, x: &Pre) -> &ConnTable {
        if x.p.key.is_ipv4() {
            &self.ct4
        } else {
            &self.ct6
        }
    }

    #[inline]
    fn process_pre(
        &mut self,
        buf: &mut [u8],
        start: usize,
        len: usize,
        now: Instant,
        pre: Option<&Pre>,
        hdr: &mut VnetHdr,
    ) -> Verdict {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len as u64;
        let v = match start.checked_add(len) {
            Some(end) if end <= buf.len() => self.process_inner(buf, start, end, now, pre, hdr),
            _ => Verdict::Drop(DropReason::Malformed),
        };
        match v {
            Verdict::Forward { .. } => self.stats.forwarded += 1,
            Verdict::Reply { .. } => {
                self.stats.icmp_generated += 1;
                *hdr = VnetHdr::NONE;
            }
            Verdict::Segment => {
                // Its segments come back as packets of their own.
                self.stats.rx_packets -= 1;
                self.stats.rx_bytes -= len as u64;
                self.stats.gso_cut += 1;
            }
            Verdict::Held => {}
            Verdict::Drop(r) => {
                if let Some(d) = self.stats.drops.get_mut(r as usize) {
                    *d += 1;
                }
            }
        }
        v
    }

    fn process_inner(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        now: Instant,
        pre: Option<&Pre>,
        hdr: &mut VnetHdr,
    ) -> Verdict {
        let Some(pkt) = buf.get(start..end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        // The packet parsed here when no burst pre-pass did (`pre` is borrowed, not copied:
        // a `Pre` is ~180 bytes).
        let parsed: Parsed;
        let (p, si, hash) = match pre {
            Some(x) => (&x.p, x.si, Some(x.hash)),
            None => match self.classify(pkt) {
                Ok((p, si)) => {
                    parsed = p;
                    (&parsed, si, None)
                }
                Err(r) => return Verdict::Drop(r),
            },
        };
        let flags = tcp_flags(pkt, p);
        let (csum, segs) = match self.offload(buf, start, end, p, hdr) {
            Ok(x) => x,
            Err(r) => return Verdict::Drop(r),
        };
        // Fragments (no burst pre-pass takes them): module `frag`.
        if p.fragment != Fragment::None {
            // (A fragment's partial checksum, if any, was completed above.)
            *hdr = VnetHdr::NONE;
            return self.fragment(buf, (start, end), p, si, now);
        }
        let ip = p.end - p.l3;
        let wire = ip + (segs as usize - 1) * (p.payload - p.l3);
        let cx = Ctx {
            start,
            end,
            p,
            flags,
            bytes: u32::try_from(wire).unwrap_or(u32::MAX),
            segs,
            csum,
            hash,
            now,
        };
        match si {
            Some(si) => self.forward(buf, &cx, si, hdr),
            None => match self.splice_backend(buf, &cx, hdr) {
                Some(v) => v,
                None => self.reply(buf, &cx),
            },
        }
    }

    /// Checks a packet's offload header: how its L4 checksum stands and how many wire
    /// segments it stands for. A partial checksum the rewrites cannot carry on is completed
    /// here (and the header cleared).
    #[inline(always)]
    fn offload(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        hdr: &mut VnetHdr,
    ) -> Result<(L4Csum, u32), DropReason> {
        if !hdr.needs_csum && !hdr.is_gso() {
            return Ok((L4Csum::Full, 1));
        }
        let c = offload::classify(p, hdr).map_err(|_| DropReason::BadOffload)?;
        let segs = offload::segments(p, hdr);
        if hdr.is_gso() {
            self.stats.gso_packets += 1;
            self.stats.gso_segments += u64::from(segs);
        }
        if c == L4Csum::Elsewhere {
            self.complete_csum(buf, start, end, p, hdr)?;
            return Ok((L4Csum::Full, 1));
        }
        Ok((c, segs))
    }

    /// Completes a packet's partial checksum in software and clears its offload header.
    #[cold]
    fn complete_csum(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        hdr: &mut VnetHdr,
    ) -> Result<(), DropReason> {
        let pkt = buf.get_mut(start..end).ok_or(DropReason::Malformed)?;
        let udp = p.proto == IpProto::Udp && usize::from(hdr.csum_start) == p.l4;
        offload::complete_csum(pkt, hdr, p.end, udp).map_err(|_| DropReason::BadOffload)?;
        *hdr = VnetHdr::NONE;
        self.stats.csum_completed += 1;
        Ok(())
    }

    /// Client → service.
    #[inline]
    fn forward(&mut self, buf: &mut [u8], cx: &Ctx<'_>, si: usize, hdr: &mut VnetHdr) -> Verdict {
        let mut cx = *cx;
        if cx.csum == L4Csum::Partial {
            // Tunnel mode (an encapsulated super-packet has no virtio-net description) and the
            // SIP path (each datagram placed by its own Call-ID) take plain packets only. (A
            // TCP splice takes partial checksums once spliced, and asks for plain packets
            // before: `splice_client`.)
            let plain = self
                .tables
                .services
                .get(si)
                .is_some_and(|s| s.mode == Mode::Tunnel || sip::per_message(s));
            if plain {
                if hdr.is_gso() {
                    return Verdict::Segment;
                }
                if let Err(r) = self.complete_csum(buf, cx.start, cx.end, cx.p, hdr) {
                    return Verdict::Drop(r);
                }
                cx.csum = L4Csum::Full;
            }
        }
        let cx = &cx;
        let Ctx {
            start,
            end,
            p,
            flags,
            bytes,
            segs,
            csum,
            hash,
            now,
        } = *cx;
        // UDP SIP with `affinity = "sip-call-id"`: placed per message by Call-ID (sip.rs).
        if let Some(v) = self.sip_forward(buf, cx, si) {
            return v;
        }
        if let Some(v) = self.splice_client(buf, cx, si, hdr) {
            return v;
        }
        let key = p.key;
        let first = Packet::original(flags, bytes).with_segments(segs);
        let ct = if key.is_ipv4() {
            &mut self.ct4
        } else {
            &mut self.ct6
        };
        let hash = hash.unwrap_or_else(|| Prefetched::of_hash(ct.flow_hash(&key)));
        let mut hit = ct.track_prefetched(hash, &key, first, now);
        if let Some(h) = hit.filter(|h| h.was.is_none()) {
            // A SYN reused a finished (TIME_WAIT / CLOSE) entry of the same 4-tuple: a new
            // connection, scheduled as one (IPVS `conn_reuse_mode`), not pinned to the old
            // connection's backend. The reused entry leaves; its removal closes it.
            self.live.moved(h.backend, None, h.state);
            ct.remove(&key, now);
            self.drain_removals();
            hit = None;
        }
        // A plain hit of a flow in a steady state: its plan may go to a fast path.
        let mut planned = None;
        let (id, nat_tuple) = match hit {
            Some(hit) => {
                if hit.changed {
                    self.flow_moved(key, Some(hash.hash()), &hit);
                }
                if key.proto() == IpProto::Tcp
                    && p.payload < p.end
                    && self.timing.request(&key, now)
                {
                    // Data from the client started the response clock of a timed flow: its
                    // replies with data take the lock from now on.
                    self.retire_flow(hash.hash());
                }
                if self.want_plan && fast::steady(hit.state) {
                    let slow_data = self.timing.phase(&key) == timing::Phase::Request;
                    planned = Some((fast::plan_deadline(self, &key, hit.state, now), slow_data));
                }
                (hit.backend, hit.nat)
            }
            None => {
                let placed = if starts_flow(p, flags) {
                    self.new_flow(buf, cx, si, first)
                } else {
                    self.mid_flow(cx, si, first)
                };
                match placed {
                    Ok(x) => x,
                    Err(r) => return Verdict::Drop(r),
                }
            }
        };
        let tables = &*self.tables;
        let Some(b) = tables.backend(id) else {
            return Verdict::Drop(DropReason::NoBackend);
        };
        if let Some(s) = self.stats.backends.get_mut(id.get() as usize) {
            s.packets += u64::from(segs);
            s.bytes += u64::from(bytes);
        }
        let Some(pkt) = buf.get_mut(start..end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let done = Verdict::Forward {
            start,
            len: end - start,
        };
        match b.mode {
            Mode::Nat => {
                let Some(r) = nat_tuple else {
                    return Verdict::Drop(DropReason::RewriteFailed);
                };
                let snat = Some(endpoint(r.dst(), r.dst_port()));
                match nat_rewrite(pkt, p, snat, Some(b.addr), csum) {
                    Ok(()) => {
                        if let Some(pl) = planned {
                            let other = nat_tuple.as_ref();
                            let a = Action::Nat(snat, Some(b.addr));
                            self.keep_plan(&key, hash.hash(), other, id, a, pl);
                        }
                        done
                    }
                    Err(_) => Verdict::Drop(DropReason::RewriteFailed),
                }
            }
            Mode::Dnat => match nat_rewrite(pkt, p, None, Some(b.addr), csum) {
                Ok(()) => {
                    if let Some(pl) = planned {
                        let other = nat_tuple.as_ref();
                        let a = Action::Nat(None, Some(b.addr));
                        self.keep_plan(&key, hash.hash(), other, id, a, pl);
                    }
                    done
                }
                Err(_) => Verdict::Drop(DropReason::RewriteFailed),
            },
            // Only a frame has a MAC address to rewrite: on a device that delivers IP
            // packets the "frame header" would be the IP header.
            Mode::Dr if self.link != Link::Ethernet => Verdict::Drop(DropReason::RewriteFailed),
            Mode::Dr => {
                let (dst, src) = (b.mac, tables.mac);
                match dst.map(|m| dr::set_macs(pkt, m, Some(src))) {
                    Some(Ok(_)) => {
                        if let (Some(pl), Some(dst)) = (planned, dst) {
                            let a = Action::Dr { dst, src };
                            self.keep_plan(&key, hash.hash(), None, id, a, pl);
                        }
                        done
                    }
                    _ => Verdict::Drop(DropReason::RewriteFailed),
                }
            }
            Mode::Tunnel => {
                // A new outer header: nothing of the old offload header applies.
                *hdr = VnetHdr::NONE;
                let h = self.flows.hash_flow(&key);
                let (v, to) = encapsulate(buf, cx, b, tables, h, &mut self.icmp);
                if let (Some(pl), Some(to)) = (planned, to) {
                    self.keep_plan(&key, hash.hash(), None, id, Action::Tunnel(to), pl);
                }
                v
            }
        }
    }

    /// A flow the table does not know, whose packet may start it ([`starts_flow`]):
    /// persistence, affinity, scheduler, insert. Returns the backend and the NAT reply tuple.
    fn new_flow(
        &mut self,
        buf: &[u8],
        cx: &Ctx<'_>,
        si: usize,
        first: Packet,
    ) -> Result<(BackendId, Option<FlowKey>), DropReason> {
        let Ctx {
            start, end, p, now, ..
        } = *cx;
        let key = p.key;
        let tables = &*self.tables;
        let svc = tables.services.get(si).ok_or(DropReason::NoService)?;
        // The caller checked `starts_flow`: a TCP packet here is a SYN.
        let syn = svc.proto == IpProto::Tcp;
        let ct = if key.is_ipv4() {
            &mut self.ct4
        } else {
            &mut self.ct6
        };
        let pkt = buf.get(start..end).unwrap_or(&[]);
        let src_hash = addr_hash(&self.flows, key.src());
        let h = match svc.affinity {
            Affinity::None | Affinity::PerPacket | Affinity::HttpHost => self.flows.hash_flow(&key),
            Affinity::Source => src_hash,
            Affinity::SipCallId => match lb_packet::sip::call_id(p.payload(pkt)) {
                Some(id) => self.flows.hash_bytes(id),
                None => self.flows.hash_flow(&key),
            },
        };
        let persist = persist_key(svc, &key);
        let remembered = remembered_backend(ct, tables, persist, now);
        let id = match remembered {
            Some(b) => b,
            None => self.choose(si, h, src_hash, &key, now)?,
        };
        let tables = &*self.tables;
        let svc = tables.services.get(si).ok_or(DropReason::NoService)?;
        let ct = if key.is_ipv4() {
            &mut self.ct4
        } else {
            &mut self.ct6
        };
        let b = tables.backend(id).ok_or(DropReason::NoBackend)?;
        let mut flow = NewFlow::new(key, id).with_first(first);
        if let Some((prefix, tk)) = persist {
            let _ = ct.persist_mut().insert(tk, id, svc.persistence, now);
            flow = flow.with_persist(prefix);
            if self.sync_cap > 0 {
                self.sync.push_back(sync::SyncChange::Template(tk));
                if self.sync.len() > self.sync_cap {
                    self.sync.pop_back();
                    self.stats.sync_lost += 1;
                }
            }
        }
        let state = flow.initial_state();
        let (inserted, nat_tuple) = match svc.mode {
            Mode::Nat => {
                let (ins, reply) = ct.insert_snat(flow, b.addr, now);
                if !ins.is_inserted() {
                    return Err(refusal(ins));
                }
                (true, reply)
            }
            Mode::Dnat => {
                let reply = FlowKey::new(
                    b.addr.ip(),
                    b.addr.port(),
                    key.src(),
                    key.src_port(),
                    key.proto(),
                )
                .map_err(|_| DropReason::RewriteFailed)?;
                let ins = ct.insert_with(flow.with_nat(reply), now);
                if !ins.is_inserted() {
                    return Err(refusal(ins));
                }
                (true, Some(reply))
            }
            // Stateless fallback: a refused insert still forwards (the consistent hash sends the
            // flow's next packets to the same backend while the backend set is unchanged).
            Mode::Tunnel | Mode::Dr => (ct.insert_with(flow, now).is_inserted(), None),
        };
        let timed = syn && matches!(svc.mode, Mode::Nat | Mode::Dnat);
        if inserted {
            self.flow_opened(id, state);
            self.sync_log(sync::SyncChange::Flow(key));
        }
        if timed {
            self.timing.syn(&key, id, now);
        }
        Ok((id, nat_tuple))
    }

    /// A packet that cannot start a flow ([`starts_flow`]: a TCP segment without SYN, an ICMP
    /// error) of a flow the table does not know. Behind ECMP, a flow a peer started (or whose
    /// entry expired here). Modes `tunnel` and `dr` with [`MidFlow::Hash`]: placed as every
    /// peer places it, by the client's persistence template if there is one, else by the
    /// service's consistent hash over the backends the tables say may take flows (never by a
    /// policy, never by live load, which differ between balancers); a TCP flow is tracked from
    /// then on, an ICMP error only forwarded. Otherwise dropped: in `nat` and `dnat` the flow's
    /// SNAT tuple or route belongs to the balancer that saw its SYN (only sync carries it), and
    /// letting such a packet open a flow would reach the backend from a fresh SNAT port (and
    /// let an ACK flood fill the table).
    fn mid_flow(
        &mut self,
        cx: &Ctx<'_>,
        si: usize,
        first: Packet,
    ) -> Result<(BackendId, Option<FlowKey>), DropReason> {
        let Ctx { p, now, .. } = *cx;
        let key = p.key;
        let icmp = p.icmp.is_some();
        let tables = &*self.tables;
        let svc = tables.services.get(si).ok_or(DropReason::NoService)?;
        if !svc.places_mid_flow() {
            return Err(if icmp {
                DropReason::NoFlow
            } else {
                DropReason::MidFlowUnknown
            });
        }
        let ct = if key.is_ipv4() {
            &mut self.ct4
        } else {
            &mut self.ct6
        };
        let persist = persist_key(svc, &key);
        let remembered = remembered_backend(ct, tables, persist, now);
        let id = match remembered {
            Some(b) => b,
            None => svc
                .fallback
                .as_deref()
                .and_then(|t| mid_flow_backend(t, tables, mid_flow_hash(&self.flows, svc, &key)))
                .ok_or(DropReason::NoBackend)?,
        };
        self.stats.mid_flow_placed += 1;
        if icmp {
            return Ok((id, None));
        }
        let mut flow = NewFlow::new(key, id).with_first(first);
        if let (Some((prefix, _)), Some(_)) = (persist, remembered) {
            flow = flow.with_persist(prefix);
        }
        let state = flow.initial_state();
        // As for a new flow in these modes, a refused insert still forwards: the next packet
        // is placed the same way.
        if ct.insert_with(flow, now).is_inserted() {
            self.flow_opened(id, state);
            self.sync_log(sync::SyncChange::Flow(key));
        }
        Ok((id, None))
    }

    /// Not addressed to a service: a reply of a NAT flow (backend → SNAT address in `nat` mode,
    /// backend → client in `dnat` mode), or an ICMP error travelling with one.
    fn reply(&mut self, buf: &mut [u8], cx: &Ctx<'_>) -> Verdict {
        let Ctx {
            start,
            end,
            p,
            flags,
            bytes,
            segs,
            csum,
            hash,
            now,
        } = *cx;
        let key = p.key;
        let ct = if key.is_ipv4() {
            &mut self.ct4
        } else {
            &mut self.ct6
        };
        let hash = hash.unwrap_or_else(|| Prefetched::of_hash(ct.flow_hash(&key)));
        let Some((orig, hit)) = ct.track_reply_prefetched(
            hash,
            &key,
            Packet::reply(flags, bytes).with_segments(segs),
            now,
        ) else {
            return Verdict::Drop(DropReason::NoService);
        };
        if hit.changed || hit.was.is_none() {
            self.flow_moved(orig, None, &hit);
        }
        // A plain reply of a flow in a steady state, on a data path that splices nothing
        // (a splice's replies come here only when they are not its own): its plan may go to
        // a fast path.
        self.observe_reply(
            buf.get(start..end).unwrap_or(&[]),
            p,
            flags,
            &orig,
            hit.backend,
            now,
        );
        // (After the reply's own effect on the flow's timing: a first response ends it.)
        let planned =
            (self.want_plan && !self.splice.is_active() && fast::steady(hit.state)).then(|| {
                (
                    fast::plan_deadline(self, &key, hit.state, now),
                    self.timing.phase(&orig) == timing::Phase::Response,
                )
            });
        let Some(b) = self.tables.backend(hit.backend) else {
            return Verdict::Drop(DropReason::NoBackend);
        };
        if let Some(s) = self.stats.backends.get_mut(hit.backend.get() as usize) {
            s.reply_packets += u64::from(segs);
            s.reply_bytes += u64::from(bytes);
        }
        let Some(pkt) = buf.get_mut(start..end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let mut vip = endpoint(orig.dst(), orig.dst_port());
        if orig.dst() == b.addr.ip() && b.vip.ip() != b.addr.ip() {
            // A `sip-call-id` flow, tracked as client → backend (sip.rs): the client sent to
            // the VIP.
            vip = endpoint(
                b.vip.ip(),
                if b.vip.port() == 0 {
                    orig.dst_port()
                } else {
                    b.vip.port()
                },
            );
        }
        let client = endpoint(orig.src(), orig.src_port());
        let (src, dst) = match b.mode {
            Mode::Nat => (Some(vip), Some(client)),
            Mode::Dnat => (Some(vip), None),
            Mode::Tunnel | Mode::Dr => return Verdict::Drop(DropReason::NoService),
        };
        match nat_rewrite(pkt, p, src, dst, csum) {
            Ok(()) => {
                if let Some(pl) = planned {
                    let a = Action::Nat(src, dst);
                    self.keep_plan(&key, hash.hash(), Some(&orig), hit.backend, a, pl);
                    if let Some(plan) = self.plan.as_mut() {
                        plan.forward = false;
                    }
                }
                Verdict::Forward {
                    start,
                    len: end - start,
                }
            }
            Err(_) => Verdict::Drop(DropReason::RewriteFailed),
        }
    }
}

/// A NAT rewrite of addresses and ports, for a full or a partial L4 checksum.
#[inline(always)]
fn nat_rewrite(
    pkt: &mut [u8],
    p: &Parsed,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    csum: L4Csum,
) -> Result<(), PacketError> {
    if csum == L4Csum::Partial {
        nat::rewrite_partial(pkt, p, src, dst)
    } else {
        nat::rewrite(pkt, p, src, dst)
    }
}

/// How long a flow may sit in the timing table (a request never answered, a connection idle
/// after its handshake) before its slot is freed.
const STALE_TIMING: Duration = Duration::from_secs(60);

impl Dataplane {
    /// The scheduler's choice for a new flow of service `si`: the one placement function of
    /// the flow path and the SIP path (see [`choose_in`]).
    #[inline]
    pub(crate) fn choose(
        &mut self,
        si: usize,
        flow_hash: u64,
        src_hash: u64,
        key: &FlowKey,
        now: Instant,
    ) -> Result<BackendId, DropReason> {
        let svc = self.tables.services.get(si).ok_or(DropReason::NoService)?;
        let want = Placing {
            flow_hash,
            src_hash,
            key,
            now,
        };
        choose_in(svc, si, &mut self.live, &mut self.rng, &self.flows, &want)
    }

    /// A new flow entered the table bound to `id`, in `state` after its first packet.
    #[inline]
    pub(crate) fn flow_opened(&mut self, id: BackendId, state: FlowState) {
        self.live.opened(id, state);
        if let Some(s) = self.stats.backends.get_mut(id.get() as usize) {
            s.flows += 1;
        }
    }

    /// What a reply says about its backend: a handshake or first response timed (a response
    /// is the outlier detector's success), a connection reset before it answered, an ICMP
    /// destination unreachable from it.
    #[inline]
    fn observe_reply(
        &mut self,
        pkt: &[u8],
        p: &Parsed,
        flags: TcpFlags,
        orig: &FlowKey,
        backend: BackendId,
        now: Instant,
    ) {
        if let Some(e) = &p.icmp {
            // Destination unreachable (ICMP 3 except "fragmentation needed", ICMPv6 1).
            let (t, code) = (pkt.get(p.l4).copied(), pkt.get(p.l4 + 1).copied());
            let unreachable = match p.family {
                Family::V4 => t == Some(3) && code != Some(4),
                Family::V6 => t == Some(1),
            };
            if unreachable && e.proto != IpProto::Icmp {
                self.live.observe(backend, Observation::ConnectFailed, now);
            }
            return;
        }
        if orig.proto() != IpProto::Tcp {
            return;
        }
        let syn = flags.contains(TcpFlags::SYN);
        let rst = flags.contains(TcpFlags::RST);
        let data = p.payload < p.end;
        if !(syn || rst || data) {
            return;
        }
        match self.timing.reply(orig, syn, rst, data, now) {
            Some(Sample::Handshake(b, d)) => self.live.handshake(b, d),
            Some(Sample::Response(b, d)) => self.live.response(b, d, now),
            Some(Sample::Reset(b)) => self.live.observe(b, Observation::Reset, now),
            None => {}
        }
    }
}

/// The scheduler's choice for a new flow of service `svc` (index `si`): a consistent hash of
/// `flow_hash` skipping the backends the live load says are unavailable (down, ejected,
/// overloaded: only their own flows move), or the service's policy over its live pool.
#[inline]
pub(crate) fn choose_in(
    svc: &ServiceTable,
    si: usize,
    live: &mut Live,
    rng: &mut SmallRng,
    flows: &FlowHasher,
    want: &Placing<'_>,
) -> Result<BackendId, DropReason> {
    let Placing {
        flow_hash,
        src_hash,
        key,
        now,
    } = *want;
    let live = live.services.get_mut(si).ok_or(DropReason::NoBackend)?;
    let pick = match &svc.sched {
        Scheduler::Empty => Pick::Unavailable,
        Scheduler::Hash { table, .. } => {
            let pool = &live.pool;
            let ok = |i: usize| {
                table
                    .backends()
                    .get(i)
                    .and_then(|b| pool.index_of(b.id))
                    .is_some_and(|j| pool.is_available(j))
            };
            match table
                .lookup_eligible_index(flow_hash, ok)
                .and_then(|i| table.backends().get(i))
            {
                Some(b) => Pick::Backend(b.id),
                None => pool.no_pick(),
            }
        }
        Scheduler::Policy => {
            let policy = live.policy.as_mut().ok_or(DropReason::NoBackend)?;
            let req = Request::at(now)
                .with_src_hash(src_hash)
                .with_dst_hash(addr_hash(flows, key.dst()));
            policy.pick(&live.pool, &req, rng)
        }
    };
    match pick {
        Pick::Backend(id) => Ok(id),
        Pick::Overloaded => Err(DropReason::Overloaded),
        _ => Err(DropReason::NoBackend),
    }
}

/// What a new flow is placed by: its hash (the flow's, or its affinity key's) for the
/// consistent hashes, its source-address hash, its key and the time for the policies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placing<'a> {
    pub(crate) flow_hash: u64,
    pub(crate) src_hash: u64,
    pub(crate) key: &'a FlowKey,
    pub(crate) now: Instant,
}

/// The keyed hash of one address (4 bytes for IPv4, 16 for IPv6): the source-hash and
/// destination-hash input of the schedulers.
#[inline]
fn addr_hash(h: &FlowHasher, a: IpAddr) -> u64 {
    match a {
        IpAddr::V4(a) => h.hash_bytes(&a.octets()),
        IpAddr::V6(a) => h.hash_bytes(&a.octets()),
    }
}

/// The eligible backend a client-persistence template names, if any (refreshing it).
#[inline]
fn remembered_backend(
    ct: &mut ConnTable,
    tables: &Tables,
    persist: Option<(u8, TemplateKey)>,
    now: Instant,
) -> Option<BackendId> {
    persist.and_then(|(_, tk)| {
        ct.persist_mut()
            .lookup(&tk, now)
            .filter(|b| tables.backend(*b).is_some_and(BackendInfo::eligible))
    })
}

/// The client-persistence template of flow `key` of service `svc`, with its prefix length,
/// if the service uses persistence.
#[inline]
fn persist_key(svc: &ServiceTable, key: &FlowKey) -> Option<(u8, TemplateKey)> {
    (!svc.persistence.is_zero()).then(|| {
        let prefix = if key.is_ipv4() {
            svc.persistence_netmask.v4.min(32)
        } else {
            svc.persistence_netmask.v6.min(128)
        };
        (
            prefix,
            TemplateKey::client(key.src(), prefix, Service::of_flow(key)),
        )
    })
}

/// What places a mid-flow packet of service `svc` on its consistent hash: the client
/// address's hash with `affinity = "source"`, else the flow's (a SYN carries no Call-ID, so
/// a TCP flow of a `sip-call-id` service was placed by its flow hash too).
#[inline]
pub(crate) fn mid_flow_hash(flows: &FlowHasher, svc: &ServiceTable, key: &FlowKey) -> u64 {
    match svc.affinity {
        Affinity::Source => addr_hash(flows, key.src()),
        _ => flows.hash_flow(key),
    }
}

/// The backend the consistent hash `table` gives a mid-flow packet of hash `h`: the first on
/// the flow's preference list that `tables` says may take flows (configured, healthy,
/// weight > 0). It depends on nothing but the tables, so every balancer built from the same
/// spec, key and health answers the same.
#[inline]
pub(crate) fn mid_flow_backend(table: &AnyHash, tables: &Tables, h: u64) -> Option<BackendId> {
    table.lookup_eligible(h, |id| {
        tables.backend(id).is_some_and(BackendInfo::eligible)
    })
}

/// Where and how tunnel mode encapsulates a flow's packets: what a fast-path plan keeps too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TunnelTo {
    kind: TunnelKind,
    /// The outer source (the balancer's address of the backend's family) and destination.
    src: IpAddr,
    dst: IpAddr,
    /// The path MTU towards the backends.
    mtu: u16,
    /// The flow's scheduling hash (the IPv6 flow label and the GUE source port come from it).
    flow_hash: u64,
}

impl TunnelTo {
    /// Tunnel mode's encapsulation of a flow of hash `flow_hash` to backend `b`, if the
    /// balancer has an address of the backend's family.
    fn of(b: &BackendInfo, tables: &Tables, flow_hash: u64) -> Option<TunnelTo> {
        Some(TunnelTo {
            kind: b.tunnel,
            src: tables.snat_for(b.addr.ip())?,
            dst: b.addr.ip(),
            mtu: tables.mtu,
            flow_hash,
        })
    }

    /// The bytes the encapsulation adds.
    #[inline]
    pub(crate) fn overhead(&self) -> usize {
        let ip = if self.src.is_ipv4() {
            tunnel::IPV4_HEADER
        } else {
            tunnel::IPV6_HEADER
        };
        ip + match self.kind {
            TunnelKind::Ipip => 0,
            TunnelKind::Gue { .. } => tunnel::GUE_OVERHEAD,
        }
    }

    /// Whether a packet of `len` IP bytes fits the path MTU once encapsulated (then it is
    /// never "too big").
    #[inline]
    pub(crate) fn fits(&self, len: usize) -> bool {
        len + self.overhead() <= usize::from(self.mtu)
    }

    /// Encapsulates the IP packet `buf[start..end]` (of `family`) in the headroom before it.
    #[inline]
    pub(crate) fn encap(
        &self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        family: Family,
    ) -> Result<(Encap, usize, usize), PacketError> {
        // The kernel already decremented the inner TTL when it routed the packet into the
        // device.
        let params = TunnelParams {
            ttl: 64,
            path_mtu: self.mtu,
            decrement_ttl: false,
        };
        let region = buf.get_mut(..end).ok_or(PacketError::Truncated {
            layer: lb_packet::Layer::Ipv4,
            need: end,
            have: 0,
        })?;
        let mut pb = PacketBuf::new(region, start, end - start)?;
        let label = (self.flow_hash as u32) & 0x000f_ffff;
        let r = match (self.kind, self.src, self.dst, family) {
            (TunnelKind::Ipip, IpAddr::V4(s), IpAddr::V4(d), Family::V4) => {
                tunnel::encap_ipip(&mut pb, s, d, &params)
            }
            (TunnelKind::Ipip, IpAddr::V6(s), IpAddr::V6(d), Family::V6) => {
                tunnel::encap_ip6ip6(&mut pb, s, d, label, &params)
            }
            (TunnelKind::Ipip, IpAddr::V6(s), IpAddr::V6(d), Family::V4) => {
                tunnel::encap_4in6(&mut pb, s, d, label, &params)
            }
            (TunnelKind::Gue { port }, s, d, _) => tunnel::encap_gue(
                &mut pb,
                s,
                d,
                port,
                tunnel::entropy_port(self.flow_hash),
                &params,
            ),
            _ => Err(PacketError::BadVersion {
                layer: lb_packet::Layer::Ipv4,
                version: 0,
            }),
        }?;
        Ok((r, pb.offset(), pb.len()))
    }
}

/// Tunnel mode: encapsulate in the headroom, or answer "too big" / drop. With the
/// encapsulation, for a fast path's plan.
fn encapsulate(
    buf: &mut [u8],
    cx: &Ctx<'_>,
    b: &BackendInfo,
    tables: &Tables,
    flow_hash: u64,
    out: &mut icmp_limit::IcmpOut,
) -> (Verdict, Option<TunnelTo>) {
    let Ctx { start, end, p, .. } = *cx;
    let Some(to) = TunnelTo::of(b, tables, flow_hash) else {
        return (Verdict::Drop(DropReason::RewriteFailed), None);
    };
    if start > end || end > buf.len() {
        return (Verdict::Drop(DropReason::Malformed), None);
    }
    match to.encap(buf, start, end, p.family) {
        Ok((Encap::Done, start, len)) => (Verdict::Forward { start, len }, Some(to)),
        Ok((Encap::TooBig { mtu }, ..)) => (
            icmp_reply(buf, cx, b.vip.ip(), IcmpError::TooBig { mtu }, out),
            None,
        ),
        Err(PacketError::TtlExpired) => (Verdict::Drop(DropReason::TtlExpired), None),
        Err(_) => (Verdict::Drop(DropReason::RewriteFailed), None),
    }
}

/// Builds an ICMP error about the packet `cx` describes, from `from`, and places it at the
/// start of `buf`: only to a unicast source about a packet to a unicast destination, and
/// only within the rate limits (module `icmp_limit`); otherwise the packet is dropped with
/// [`DropReason::IcmpNotUnicast`] or [`DropReason::IcmpRateLimited`].
fn icmp_reply(
    buf: &mut [u8],
    cx: &Ctx<'_>,
    from: IpAddr,
    kind: IcmpError,
    out: &mut icmp_limit::IcmpOut,
) -> Verdict {
    let Some(orig) = buf.get(cx.start..cx.end) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    // An ICMP error's key is its embedded packet's, reversed; `error_reply` refuses it anyway.
    let slot = if cx.p.icmp.is_none() {
        let too_big = matches!(kind, IcmpError::TooBig { .. });
        match out.check(cx.p.key.src(), cx.p.key.dst(), too_big, cx.now) {
            Ok(slot) => Some(slot),
            Err(icmp_limit::Refused::NotUnicast) => {
                return Verdict::Drop(DropReason::IcmpNotUnicast)
            }
            Err(icmp_limit::Refused::RateLimited) => {
                return Verdict::Drop(DropReason::IcmpRateLimited)
            }
        }
    } else {
        None
    };
    let Ok(n) = icmp::error_reply(orig, from, kind, &mut out.scratch) else {
        return Verdict::Drop(DropReason::RewriteFailed);
    };
    if let Some(slot) = slot {
        out.spend(slot);
    }
    match (buf.get_mut(..n), out.scratch.get(..n)) {
        (Some(dst), Some(src)) => {
            dst.copy_from_slice(src);
            Verdict::Reply { start: 0, len: n }
        }
        _ => Verdict::Drop(DropReason::RewriteFailed),
    }
}
