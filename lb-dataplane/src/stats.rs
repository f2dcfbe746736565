//! Counters of the data path: per backend, and drops by reason. Plain integers, bumped per packet
//! without allocation (the per-backend vector grows only when new tables are installed).

use lb_conntrack::SessionHistograms;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum DropReason {
    /// Not an IP packet (e.g. ARP on a TAP device).
    NotIp,
    /// Failed validation (truncated, bad lengths, bad header fields).
    Malformed,
    /// An IP fragment that could not be forwarded: a non-first fragment (no ports) whose
    /// first fragment was not seen (it came later, was lost or dropped), or whose datagram's
    /// entry expired or was evicted ([`Stats::frag_evicted`]); or any fragment when
    /// [`DataplaneSpec::frag_capacity`](crate::DataplaneSpec::frag_capacity) is 0.
    Fragment,
    /// Addressed to no service and not a reply of a tracked flow.
    NoService,
    /// An ICMP error about a flow the table does not know, in a mode that does not place such
    /// packets (`nat`, `dnat`, or [`MidFlow::Drop`](crate::MidFlow::Drop)).
    NoFlow,
    /// The service has no healthy backend with weight > 0.
    NoBackend,
    /// Every eligible backend is above its admission threshold.
    Overloaded,
    /// The flow table refused the new flow (full of established flows, or IPv6 space exhausted).
    TableFull,
    /// No SNAT port left for the backend.
    PortsExhausted,
    /// The TTL would expire in the tunnel.
    TtlExpired,
    /// The rewrite failed (e.g. no SNAT address of the packet's family; no room for headers;
    /// mode `dr` on a device that delivers IP packets, not Ethernet frames).
    RewriteFailed,
    /// A TCP segment that cannot start a flow (no SYN, or SYN with ACK) of a flow the table
    /// does not know, in a mode that does not place such packets: `nat` and `dnat` (the flow's
    /// SNAT tuple or route lives on the balancer that saw its SYN, and only sync carries it),
    /// or [`MidFlow::Drop`](crate::MidFlow::Drop). Behind ECMP: a flow moved here from a peer.
    MidFlowUnknown,
    /// A packet that called for an ICMP error (tunnel mode: too big for the path MTU) whose
    /// error was not sent because a rate limit's bucket was empty
    /// ([`DataplaneSpec::icmp`](crate::DataplaneSpec::icmp)).
    IcmpRateLimited,
    /// A packet that called for an ICMP error from a source that is not one host
    /// (unspecified, loopback, multicast, broadcast, class E) or to a multicast or broadcast
    /// destination: no error is sent (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)).
    IcmpNotUnicast,
    /// A virtio-net offload header (TUN/TAP with offloads on) that does not describe its
    /// packet: a GSO type of another protocol or family, a zero segment size, a checksum
    /// start outside the packet ([`lb_packet::offload::classify`]).
    BadOffload,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 15;
    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::NotIp,
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::NoService,
        DropReason::NoFlow,
        DropReason::NoBackend,
        DropReason::Overloaded,
        DropReason::TableFull,
        DropReason::PortsExhausted,
        DropReason::TtlExpired,
        DropReason::RewriteFailed,
        DropReason::MidFlowUnknown,
        DropReason::IcmpRateLimited,
        DropReason::IcmpNotUnicast,
        DropReason::BadOffload,
    ];

    /// A snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NotIp => "not_ip",
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::NoService => "no_service",
            DropReason::NoFlow => "no_flow",
            DropReason::NoBackend => "no_backend",
            DropReason::Overloaded => "overloaded",
            DropReason::TableFull => "table_full",
            DropReason::PortsExhausted => "ports_exhausted",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::MidFlowUnknown => "mid_flow_unknown",
            DropReason::IcmpRateLimited => "icmp_rate_limited",
            DropReason::IcmpNotUnicast => "icmp_not_unicast",
            DropReason::BadOffload => "bad_offload",
        }
    }
}

/// Counters of one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Flows opened to it: new flows scheduled to it, and (modes `tunnel`, `dr`) flows of a
    /// peer placed on it mid-flow by the consistent hash ([`Stats::mid_flow_placed`]).
    pub flows: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it (IP packets, before encapsulation).
    pub bytes: u64,
    /// Reply packets from it (NAT modes).
    pub reply_packets: u64,
    /// Reply bytes from it.
    pub reply_bytes: u64,
    /// Of `packets` and `reply_packets`: packets a queue thread forwarded by its fast path's
    /// plan, without the data path's lock ([`Stats::fast_path`]), as segments.
    pub fast_packets: u64,
    /// SIP calls pinned to it (`affinity = "sip-call-id"`: a new Call-ID persistence entry).
    pub sip_calls: u64,
    /// SIP messages forwarded to it by the per-message (Call-ID) path.
    pub sip_messages: u64,
    /// Datagrams of a `sip-call-id` service without a Call-ID, sent to it by the scheduler.
    pub sip_call_id_misses: u64,
}

/// Counters of a data path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets given to `process`.
    pub rx_packets: u64,
    /// Bytes given to `process`.
    pub rx_bytes: u64,
    /// Packets forwarded (towards a backend, or a reply towards a client).
    pub forwarded: u64,
    /// Of the packets given, GSO super-packets (offloads on: one packet standing for several
    /// wire segments, [`lb_packet::offload`]).
    pub gso_packets: u64,
    /// The wire segments those super-packets stand for.
    pub gso_segments: u64,
    /// Super-packets handed back as [`Verdict::Segment`](crate::Verdict::Segment) to be cut in
    /// software (tunnel mode, SIP placement per datagram); their segments are counted as
    /// packets of their own when they come back.
    pub gso_cut: u64,
    /// Packets whose partial checksum was completed in software (an offload the rewrite
    /// cannot carry on: tunnel mode, SIP, a checksum at an unexpected place).
    pub csum_completed: u64,
    /// ICMP errors generated (fragmentation needed / packet too big / time exceeded).
    pub icmp_generated: u64,
    /// Drops by [`DropReason`] (index = `reason as usize`).
    pub drops: [u64; DropReason::COUNT],
    /// Datagrams of a `sip-call-id` service that are not SIP (no Call-ID and no SIP start
    /// line), or malformed; forwarded by the scheduler, never a crash.
    pub sip_not_sip: u64,
    /// Removals the embedder's removal log dropped unread (oldest first).
    pub removals_unread: u64,
    /// Changes the sync log dropped because it was full: the backup misses them until the
    /// next bulk dump (the embedder sends one when this moves).
    pub sync_lost: u64,
    /// Sync records (flows and templates) refused because their backend id is unknown here,
    /// names another backend than the peer's (the two balancers' configurations differ), or
    /// names a retired backend already released here.
    pub sync_refused: u64,
    /// Packets that cannot start a flow (a TCP segment without SYN, an ICMP error) of flows
    /// not tracked here, placed by their service's consistent hash
    /// ([`MidFlow::Hash`](crate::MidFlow::Hash), modes `tunnel` and `dr`): behind ECMP, flows
    /// moved here from a peer (or whose entry expired here). TCP flows are tracked from then on.
    pub mid_flow_placed: u64,
    /// First fragments processed (placed and rewritten like whole datagrams; when forwarded,
    /// their datagram is recorded for its later fragments).
    pub frag_first: u64,
    /// Non-first fragments forwarded after their first fragment's decision.
    pub frag_forwarded: u64,
    /// Datagrams whose every fragment went through (their entry freed at once).
    pub frag_completed: u64,
    /// Datagrams whose entry expired before all their fragments came.
    pub frag_expired: u64,
    /// Live datagram entries evicted to make room (the fragment table's set was full).
    pub frag_evicted: u64,
    /// First fragments forwarded whose datagram could not be recorded (tunnel / dr: the flow
    /// table refused the flow), so its later fragments are dropped.
    pub frag_unrecorded: u64,
    /// Backend ids in use in the tables in force: configured backends, and retired ones whose
    /// flows continue (or that [`ControlPlane::release`](crate::ControlPlane::release) has
    /// not dropped yet). Bounded however many reloads come, as ids are recycled.
    pub backend_ids_in_use: u64,
    /// Of those, retired backends (removed from the configuration; their flows continue).
    pub backend_ids_retired: u64,
    /// Retired backends released so far by
    /// [`Dataplane::release_retired`](crate::Dataplane::release_retired): their last flow
    /// ended, their state was dropped and their id freed for another backend.
    pub backend_ids_released: u64,
    /// Of the packets given, those forwarded by a classifier's fast path (counted here when
    /// their thread next held the data path: [`Classifier::forward_cached`](crate::Classifier::forward_cached)).
    pub fast_path: u64,
    /// Packets forwarded by a fast path's plan in their turn under the lock (a burst whose
    /// earlier packet needed it).
    pub fast_path_locked: u64,
    /// Plans handed to fast paths (each a packet of an established flow forwarded by the
    /// locked path and remembered; many per second means churn or many flows per thread).
    pub fast_path_plans: u64,
    /// Fast-path packets whose flow had left the table (or its entry had been replaced)
    /// when they were handed back: counted in the data path's counters, not in the flow's.
    pub fast_path_orphaned: u64,
    /// Per backend, by id.
    pub backends: Vec<BackendStats>,
}

/// The flow table's figures, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Entries now.
    pub entries: u64,
    /// Capacity.
    pub capacity: u64,
    /// Bytes of memory held (fixed at construction).
    pub memory_bytes: u64,
    /// Half-open entries shed to make room.
    pub evicted_half_open: u64,
    /// Established entries evicted (least recently used) to make room.
    pub evicted_lru: u64,
    /// Half-open `nat` flows evicted to free an SNAT port of their backend's empty pool for a
    /// new flow (a spoofed SYN or SIP flood would otherwise keep every new client out).
    pub evicted_snat_pressure: u64,
    /// New flows refused.
    pub refused: u64,
    /// Timed-out flows removed by the sweep ([`lb_conntrack::ConnTable::sweep`]): seen
    /// again, then idle, and kept past their deadline behind younger flows in their class
    /// list, which alone would have removed them up to a timeout late.
    pub swept: u64,
    /// Persistence templates and SIP Call-ID bindings held now (both families).
    pub persist_entries: u64,
    /// Capacity of the persistence tables (both families).
    pub persist_capacity: u64,
    /// Of those held, the established ones (used more than once: spared by eviction).
    pub persist_established: u64,
    /// Live templates seen only once (e.g. a Call-ID of one message) evicted for a new one:
    /// under a spray of made-up Call-IDs, the spray being shed.
    pub persist_shed: u64,
    /// New templates refused because every template was live and established.
    pub persist_refused: u64,
    /// Timed-out templates removed by the sweep ([`lb_conntrack::PersistTable::sweep`]): held
    /// past their deadline behind a live template with a longer timeout.
    pub persist_swept: u64,
    /// Finished flows (both families): duration and packet-count histograms.
    pub sessions: SessionHistograms,
    /// The same per backend, by id (ids below [`SESSION_STATS_BACKENDS`]).
    pub backend_sessions: Vec<SessionHistograms>,
}

/// How many backend ids (from 0) get their own session histograms (about 600 bytes each, per
/// flow table).
pub const SESSION_STATS_BACKENDS: usize = 256;

impl Stats {
    /// Total drops.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Drops for one reason.
    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    /// Adds `other` into `self` (to sum the data-path threads).
    pub fn merge(&mut self, other: &Stats) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.forwarded += other.forwarded;
        self.gso_packets += other.gso_packets;
        self.gso_segments += other.gso_segments;
        self.gso_cut += other.gso_cut;
        self.csum_completed += other.csum_completed;
        self.fast_path += other.fast_path;
        self.fast_path_locked += other.fast_path_locked;
        self.fast_path_plans += other.fast_path_plans;
        self.fast_path_orphaned += other.fast_path_orphaned;
        self.icmp_generated += other.icmp_generated;
        self.sip_not_sip += other.sip_not_sip;
        self.removals_unread += other.removals_unread;
        self.sync_lost += other.sync_lost;
        self.sync_refused += other.sync_refused;
        self.mid_flow_placed += other.mid_flow_placed;
        self.frag_first += other.frag_first;
        self.frag_forwarded += other.frag_forwarded;
        self.frag_completed += other.frag_completed;
        self.frag_expired += other.frag_expired;
        self.frag_evicted += other.frag_evicted;
        self.frag_unrecorded += other.frag_unrecorded;
        // Gauges of the tables, which data paths share: not summed.
        self.backend_ids_in_use = self.backend_ids_in_use.max(other.backend_ids_in_use);
        self.backend_ids_retired = self.backend_ids_retired.max(other.backend_ids_retired);
        self.backend_ids_released += other.backend_ids_released;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
        if self.backends.len() < other.backends.len() {
            self.backends
                .resize(other.backends.len(), BackendStats::default());
        }
        for (a, b) in self.backends.iter_mut().zip(other.backends.iter()) {
            a.flows += b.flows;
            a.packets += b.packets;
            a.bytes += b.bytes;
            a.reply_packets += b.reply_packets;
            a.reply_bytes += b.reply_bytes;
            a.fast_packets += b.fast_packets;
            a.sip_calls += b.sip_calls;
            a.sip_messages += b.sip_messages;
            a.sip_call_id_misses += b.sip_call_id_misses;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(
                DropReason::ALL
                    .iter()
                    .filter(|x| x.name() == r.name())
                    .count(),
                1
            );
        }
    }

    #[test]
    fn merge_adds_every_counter() {
        let mut a = Stats::default();
        a.drops[DropReason::Fragment as usize] = 2;
        let mut b = Stats {
            rx_packets: 5,
            backends: vec![
                BackendStats::default(),
                BackendStats {
                    flows: 3,
                    ..Default::default()
                },
            ],
            ..Stats::default()
        };
        b.drops[DropReason::Fragment as usize] = 1;
        a.merge(&b);
        assert_eq!(a.drops_for(DropReason::Fragment), 3);
        assert_eq!(a.rx_packets, 5);
        assert_eq!(a.backends[1].flows, 3);
    }
}
