//! Counters of the data path: per backend, and drops by reason. Plain integers, bumped per packet
//! without allocation (the per-backend vector grows only when new tables are installed).

use core::fmt::Write as _;

use lb_conntrack::{Histogram, SessionHistograms};

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Not an IP packet (e.g. ARP on a TAP device).
    NotIp,
    /// Failed validation (truncated, bad lengths, bad header fields).
    Malformed,
    /// An IP fragment: flows are tracked by ports, which fragments do not all carry, and the
    /// balancer does not reassemble.
    Fragment,
    /// Addressed to no service and not a reply of a tracked flow.
    NoService,
    /// A TCP segment other than a SYN, or an ICMP error, for a flow the table does not know.
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
    /// The rewrite failed (e.g. no SNAT address of the packet's family; no room for headers).
    RewriteFailed,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 11;
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
        }
    }
}

/// Counters of one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// New flows scheduled to it.
    pub flows: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it (IP packets, before encapsulation).
    pub bytes: u64,
    /// Reply packets from it (NAT modes).
    pub reply_packets: u64,
    /// Reply bytes from it.
    pub reply_bytes: u64,
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
    /// ICMP errors generated (fragmentation needed / packet too big / time exceeded).
    pub icmp_generated: u64,
    /// Drops by [`DropReason`] (index = `reason as usize`).
    pub drops: [u64; DropReason::COUNT],
    /// Datagrams of a `sip-call-id` service that are not SIP (no Call-ID and no SIP start
    /// line), or malformed; forwarded by the scheduler, never a crash.
    pub sip_not_sip: u64,
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
    /// New flows refused.
    pub refused: u64,
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
        self.icmp_generated += other.icmp_generated;
        self.sip_not_sip += other.sip_not_sip;
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
            a.sip_calls += b.sip_calls;
            a.sip_messages += b.sip_messages;
            a.sip_call_id_misses += b.sip_call_id_misses;
        }
    }
}

/// A backend's label for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendLabel {
    /// Its id.
    pub id: u32,
    /// `addr:port`.
    pub addr: String,
    /// The service's `vip:port`.
    pub service: String,
    /// Whether it is configured now.
    pub live: bool,
    /// Whether it is healthy.
    pub healthy: bool,
}

/// Renders the statistics as JSON.
pub fn to_json(s: &Stats, t: &TableStats, labels: &[BackendLabel]) -> String {
    let mut drops = serde_json::Map::new();
    for r in DropReason::ALL {
        drops.insert(r.name().into(), s.drops_for(r).into());
    }
    let backends: Vec<serde_json::Value> = labels
        .iter()
        .map(|l| {
            let b = s.backends.get(l.id as usize).copied().unwrap_or_default();
            serde_json::json!({
                "id": l.id, "addr": l.addr, "service": l.service, "live": l.live,
                "healthy": l.healthy, "flows": b.flows, "packets": b.packets, "bytes": b.bytes,
                "reply_packets": b.reply_packets, "reply_bytes": b.reply_bytes,
                "sip_calls": b.sip_calls, "sip_messages": b.sip_messages,
                "sip_call_id_misses": b.sip_call_id_misses,
                "sessions": t.backend_sessions.get(l.id as usize).map(|h| serde_json::json!({
                    "count": h.duration_ms.count(),
                    "duration_ms": summary(&h.duration_ms),
                    "packets": summary(&h.packets),
                })),
            })
        })
        .collect();
    serde_json::json!({
        "rx_packets": s.rx_packets,
        "rx_bytes": s.rx_bytes,
        "forwarded": s.forwarded,
        "icmp_generated": s.icmp_generated,
        "dropped": s.dropped(),
        "sip_not_sip": s.sip_not_sip,
        "drops": drops,
        "conntrack": {
            "entries": t.entries, "capacity": t.capacity, "memory_bytes": t.memory_bytes,
            "evicted_half_open": t.evicted_half_open, "evicted_lru": t.evicted_lru,
            "refused": t.refused,
            "sessions": {
                "count": t.sessions.duration_ms.count(),
                "duration_ms": summary(&t.sessions.duration_ms),
                "packets": summary(&t.sessions.packets),
            },
        },
        "backends": backends,
    })
    .to_string()
}

/// Mean, quantile upper bounds and maximum of a histogram, for JSON.
fn summary(h: &Histogram) -> serde_json::Value {
    serde_json::json!({
        "mean": h.mean(), "p50": h.quantile_upper(0.5), "p90": h.quantile_upper(0.9),
        "p99": h.quantile_upper(0.99), "max": h.max(),
    })
}

/// Appends `h` as a Prometheus histogram `lb_{name}`: cumulative `_bucket` series up to each
/// bucket's bound (the last is `+Inf`), `_sum` and `_count`.
fn prometheus_histogram(o: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(o, "# HELP lb_{name} {help}\n# TYPE lb_{name} histogram");
    let mut below = 0;
    for (i, n) in h.buckets().iter().enumerate() {
        below += n;
        match Histogram::upper_bound(i) {
            Some(le) => {
                let _ = writeln!(o, "lb_{name}_bucket{{le=\"{le}\"}} {below}");
            }
            None => {
                let _ = writeln!(o, "lb_{name}_bucket{{le=\"+Inf\"}} {below}");
            }
        }
    }
    let _ = writeln!(
        o,
        "lb_{name}_sum {}\nlb_{name}_count {}",
        h.sum(),
        h.count()
    );
}

/// Renders the statistics in the Prometheus text format.
pub fn to_prometheus(s: &Stats, t: &TableStats, labels: &[BackendLabel]) -> String {
    let mut o = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            o,
            "# HELP lb_{name} {help}\n# TYPE lb_{name} counter\nlb_{name} {v}"
        );
    };
    counter(
        "rx_packets_total",
        "Packets read from the device.",
        s.rx_packets,
    );
    counter("rx_bytes_total", "Bytes read from the device.", s.rx_bytes);
    counter(
        "forwarded_packets_total",
        "Packets written back after rewriting.",
        s.forwarded,
    );
    counter(
        "icmp_generated_total",
        "ICMP errors generated.",
        s.icmp_generated,
    );
    counter(
        "sip_not_sip_total",
        "Datagrams to a sip-call-id service that are not SIP.",
        s.sip_not_sip,
    );
    let _ = writeln!(
        o,
        "# HELP lb_dropped_packets_total Packets dropped, by reason."
    );
    let _ = writeln!(o, "# TYPE lb_dropped_packets_total counter");
    for r in DropReason::ALL {
        let _ = writeln!(
            o,
            "lb_dropped_packets_total{{reason=\"{}\"}} {}",
            r.name(),
            s.drops_for(r)
        );
    }
    let _ = writeln!(
        o,
        "# HELP lb_conntrack_entries Flows tracked.\n# TYPE lb_conntrack_entries gauge"
    );
    let _ = writeln!(o, "lb_conntrack_entries {}", t.entries);
    let _ = writeln!(
        o,
        "# HELP lb_conntrack_capacity Flow table capacity.\n# TYPE lb_conntrack_capacity gauge"
    );
    let _ = writeln!(o, "lb_conntrack_capacity {}", t.capacity);
    let _ = writeln!(o, "# HELP lb_conntrack_memory_bytes Flow table memory.\n# TYPE lb_conntrack_memory_bytes gauge");
    let _ = writeln!(o, "lb_conntrack_memory_bytes {}", t.memory_bytes);
    prometheus_histogram(
        &mut o,
        "session_duration_milliseconds",
        "Duration of finished flows, first packet to last.",
        &t.sessions.duration_ms,
    );
    prometheus_histogram(
        &mut o,
        "session_packets",
        "Packets of finished flows, both directions.",
        &t.sessions.packets,
    );
    for (name, help, pick) in [
        (
            "backend_flows_total",
            "New flows scheduled to a backend.",
            0,
        ),
        (
            "backend_packets_total",
            "Packets forwarded to a backend.",
            1,
        ),
        ("backend_bytes_total", "Bytes forwarded to a backend.", 2),
        (
            "backend_reply_packets_total",
            "Reply packets from a backend.",
            3,
        ),
        (
            "backend_sip_calls_total",
            "SIP calls pinned to a backend by Call-ID.",
            4,
        ),
        (
            "backend_sip_messages_total",
            "SIP messages forwarded to a backend by Call-ID.",
            5,
        ),
        (
            "backend_sip_call_id_misses_total",
            "SIP datagrams without a Call-ID sent to a backend.",
            6,
        ),
    ] {
        let _ = writeln!(o, "# HELP lb_{name} {help}\n# TYPE lb_{name} counter");
        for l in labels {
            let b = s.backends.get(l.id as usize).copied().unwrap_or_default();
            let v = [
                b.flows,
                b.packets,
                b.bytes,
                b.reply_packets,
                b.sip_calls,
                b.sip_messages,
                b.sip_call_id_misses,
            ][pick];
            let _ = writeln!(
                o,
                "lb_{name}{{backend=\"{}\",service=\"{}\"}} {v}",
                l.addr, l.service
            );
        }
    }
    // Per backend, only the count and total duration of finished flows (their ratio is the
    // mean): full histograms per backend would be 33 series each.
    for (name, help, pick) in [
        ("backend_sessions_total", "Finished flows of a backend.", 0),
        (
            "backend_session_duration_milliseconds_total",
            "Summed duration of a backend's finished flows.",
            1,
        ),
    ] {
        let _ = writeln!(o, "# HELP lb_{name} {help}\n# TYPE lb_{name} counter");
        for l in labels {
            let Some(h) = t.backend_sessions.get(l.id as usize) else {
                continue;
            };
            let v = [h.duration_ms.count(), h.duration_ms.sum()][pick];
            let _ = writeln!(
                o,
                "lb_{name}{{backend=\"{}\",service=\"{}\"}} {v}",
                l.addr, l.service
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP lb_backend_up Backend health (1 up).\n# TYPE lb_backend_up gauge"
    );
    for l in labels {
        let _ = writeln!(
            o,
            "lb_backend_up{{backend=\"{}\",service=\"{}\"}} {}",
            l.addr,
            l.service,
            u8::from(l.healthy && l.live)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn merge_and_render() {
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
        assert_eq!(a.backends[1].flows, 3);
        let labels = [BackendLabel {
            id: 1,
            addr: "198.51.100.11:80".into(),
            service: "203.0.113.10:80".into(),
            live: true,
            healthy: true,
        }];
        let t = TableStats::default();
        let j: serde_json::Value = serde_json::from_str(&to_json(&a, &t, &labels)).unwrap();
        assert_eq!(j["drops"]["fragment"], 3);
        assert_eq!(j["backends"][0]["flows"], 3);
        let p = to_prometheus(&a, &t, &labels);
        assert!(
            p.contains("lb_dropped_packets_total{reason=\"fragment\"} 3"),
            "{p}"
        );
        assert!(p.contains(
            "lb_backend_flows_total{backend=\"198.51.100.11:80\",service=\"203.0.113.10:80\"} 3"
        ));
    }

    #[test]
    fn session_histograms_render_cumulatively() {
        let mut t = TableStats::default();
        for (ms, pk) in [(0, 1), (5, 3), (5, 4), (3_000, 40)] {
            t.sessions.duration_ms.record(ms);
            t.sessions.packets.record(pk);
        }
        let p = to_prometheus(&Stats::default(), &t, &[]);
        let name = "lb_session_duration_milliseconds";
        assert!(p.contains(&format!("# TYPE {name} histogram")), "{p}");
        // 0 ms in le=0, the two 5 ms sessions from le=7 on, 3 s from le=4095 on.
        for (le, n) in [
            ("0", 1),
            ("3", 1),
            ("7", 3),
            ("2047", 3),
            ("4095", 4),
            ("+Inf", 4),
        ] {
            assert!(
                p.contains(&format!("{name}_bucket{{le=\"{le}\"}} {n}\n")),
                "{le}: {p}"
            );
        }
        assert!(
            p.contains(&format!("{name}_sum 3010\n{name}_count 4\n")),
            "{p}"
        );
        assert!(
            p.contains("lb_session_packets_bucket{le=\"63\"} 4\n"),
            "{p}"
        );
        // Buckets never decrease.
        let counts: Vec<u64> = p
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert_eq!(counts.len(), lb_conntrack::HISTOGRAM_BUCKETS);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
        let j: serde_json::Value =
            serde_json::from_str(&to_json(&Stats::default(), &t, &[])).unwrap();
        let sj = &j["conntrack"]["sessions"];
        assert_eq!(sj["count"], 4);
        assert_eq!(sj["duration_ms"]["max"], 3_000);
        assert_eq!(sj["packets"]["p50"], 3);
    }

    #[test]
    fn per_backend_sessions_render_as_count_and_sum() {
        let mut t = TableStats {
            backend_sessions: vec![SessionHistograms::default(); 2],
            ..TableStats::default()
        };
        for ms in [100, 300] {
            t.backend_sessions[1].duration_ms.record(ms);
            t.backend_sessions[1].packets.record(10);
        }
        let labels = [1, 7].map(|id| BackendLabel {
            id,
            addr: format!("198.51.100.{id}:80"),
            service: "203.0.113.10:80".into(),
            live: true,
            healthy: true,
        });
        let p = to_prometheus(&Stats::default(), &t, &labels);
        let l = "{backend=\"198.51.100.1:80\",service=\"203.0.113.10:80\"}";
        assert!(
            p.contains(&format!("lb_backend_sessions_total{l} 2\n")),
            "{p}"
        );
        assert!(
            p.contains(&format!(
                "lb_backend_session_duration_milliseconds_total{l} 400\n"
            )),
            "{p}"
        );
        // Backend 7 has no histograms (its id is past the table's): no series rather than zeros.
        assert!(
            !p.contains("lb_backend_sessions_total{backend=\"198.51.100.7:80\""),
            "{p}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&to_json(&Stats::default(), &t, &labels)).unwrap();
        assert_eq!(j["backends"][0]["sessions"]["count"], 2);
        assert_eq!(j["backends"][0]["sessions"]["duration_ms"]["max"], 300);
        assert!(j["backends"][1]["sessions"].is_null());
    }
}
