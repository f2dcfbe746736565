//! Rendering of the data path's statistics for the stats endpoint: JSON and the Prometheus text
//! format. The counters themselves live in `lb_dataplane` (plain integers, no I/O).

use core::fmt::Write as _;

use std::net::SocketAddr;

use lb_conntrack::Histogram;
use lb_core::{BackendId, FlowKey, IpProto};
use lb_dataplane::{
    BackendInfo, BackendLoad, Decision, DropReason, Explanation, Stats, TableStats,
};

/// A backend's label for reports.
#[derive(Debug, Clone, PartialEq)]
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
    /// Its live load (connections, admission, latency, ejection), when known.
    pub load: Option<BackendLoad>,
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
                "fast_packets": b.fast_packets,
                "sip_calls": b.sip_calls, "sip_messages": b.sip_messages,
                "sip_call_id_misses": b.sip_call_id_misses,
                "active_conns": l.load.map_or(0, |x| x.active_conns),
                "inactive_conns": l.load.map_or(0, |x| x.inactive_conns),
                "overloaded": l.load.is_some_and(|x| x.overloaded),
                "ejected": l.load.is_some_and(|x| x.observed.ejected),
                "ejections": l.load.map_or(0, |x| x.observed.ejections),
                "failures": l.load.map_or(0, |x| x.observed.failures),
                "handshake_ms": l.load.and_then(|x| x.observed.handshake.millis()),
                "response_ms": l.load.and_then(|x| x.observed.response.millis()),
                "peak_ewma_ms": l.load.map(|x| x.peak_ewma_ms),
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
        "mid_flow_placed": s.mid_flow_placed,
        "sync_lost": s.sync_lost,
        "sync_refused": s.sync_refused,
        "offload": {
            "gso_packets": s.gso_packets, "gso_segments": s.gso_segments,
            "gso_cut": s.gso_cut, "csum_completed": s.csum_completed,
        },
        "fast_path": {
            "packets": s.fast_path, "by_plan_under_lock": s.fast_path_locked,
            "plans": s.fast_path_plans,
            "orphaned": s.fast_path_orphaned,
        },
        "fragments": {
            "first": s.frag_first, "forwarded": s.frag_forwarded,
            "completed": s.frag_completed, "expired": s.frag_expired,
            "evicted": s.frag_evicted, "unrecorded": s.frag_unrecorded,
        },
        "persist": {
            "entries": t.persist_entries, "capacity": t.persist_capacity,
            "established": t.persist_established, "shed": t.persist_shed,
            "refused": t.persist_refused, "swept": t.persist_swept,
        },
        // Ids are recycled: in use = configured + removed backends still holding flows.
        "backend_ids": {
            "in_use": s.backend_ids_in_use,
            "retired": s.backend_ids_retired,
            "released": s.backend_ids_released,
        },
        "drops": drops,
        "conntrack": {
            "entries": t.entries, "capacity": t.capacity, "memory_bytes": t.memory_bytes,
            "evicted_half_open": t.evicted_half_open, "evicted_lru": t.evicted_lru,
            "evicted_snat_pressure": t.evicted_snat_pressure,
            "refused": t.refused,
            "swept": t.swept,
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
    counter(
        "mid_flow_placed_total",
        "Packets of untracked flows placed by the consistent hash (tunnel / dr behind ECMP).",
        s.mid_flow_placed,
    );
    counter(
        "sync_lost_total",
        "Changes the sync log could not hold (the backup then gets a bulk dump).",
        s.sync_lost,
    );
    counter(
        "sync_refused_total",
        "Sync records refused: their backend id names another backend here.",
        s.sync_refused,
    );
    for (name, help, v) in [
        (
            "fast_path_packets_total",
            "Packets of established flows forwarded without the data path's lock.",
            s.fast_path,
        ),
        (
            "fast_path_locked_total",
            "Packets forwarded by a fast path's plan in their turn under the lock.",
            s.fast_path_locked,
        ),
        (
            "fast_path_plans_total",
            "Plans handed to the queue threads' fast paths.",
            s.fast_path_plans,
        ),
        (
            "fast_path_orphaned_total",
            "Fast-path packets whose flow had left the table when handed back.",
            s.fast_path_orphaned,
        ),
        (
            "gso_packets_total",
            "GSO super-packets received (offloads on).",
            s.gso_packets,
        ),
        (
            "gso_segments_total",
            "Wire segments those super-packets stand for.",
            s.gso_segments,
        ),
        (
            "gso_cut_total",
            "Super-packets cut in software (tunnel mode, SIP).",
            s.gso_cut,
        ),
        (
            "csum_completed_total",
            "Partial checksums completed in software.",
            s.csum_completed,
        ),
        (
            "fragments_first_total",
            "First fragments processed.",
            s.frag_first,
        ),
        (
            "fragments_forwarded_total",
            "Non-first fragments forwarded by their datagram's decision.",
            s.frag_forwarded,
        ),
        (
            "fragments_completed_total",
            "Fragmented datagrams whose every fragment went through.",
            s.frag_completed,
        ),
        (
            "fragments_expired_total",
            "Datagrams whose record expired before all their fragments came.",
            s.frag_expired,
        ),
        (
            "fragments_evicted_total",
            "Live datagram records evicted to make room.",
            s.frag_evicted,
        ),
        (
            "fragments_unrecorded_total",
            "First fragments forwarded whose datagram could not be recorded.",
            s.frag_unrecorded,
        ),
        (
            "persist_shed_total",
            "Live templates seen once (e.g. one-message Call-IDs) evicted for new ones.",
            t.persist_shed,
        ),
        (
            "persist_refused_total",
            "New templates refused: every template live and established.",
            t.persist_refused,
        ),
        (
            "persist_swept_total",
            "Timed-out templates removed by the sweep: held past their deadline behind a longer-lived one.",
            t.persist_swept,
        ),
    ] {
        counter(name, help, v);
    }
    counter(
        "backend_ids_released_total",
        "Ids of removed backends released after their last flow ended (free for reuse).",
        s.backend_ids_released,
    );
    for (name, help, v) in [
        (
            "backend_ids_in_use",
            "Backend ids in use: configured backends and removed ones still holding flows.",
            s.backend_ids_in_use,
        ),
        (
            "backend_ids_retired",
            "Removed backends whose flows continue (their ids not yet released).",
            s.backend_ids_retired,
        ),
    ] {
        let _ = writeln!(
            o,
            "# HELP lb_{name} {help}\n# TYPE lb_{name} gauge\nlb_{name} {v}"
        );
    }
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
    let _ = writeln!(o, "# HELP lb_conntrack_evicted_snat_pressure_total Half-open flows evicted to free an SNAT port of an empty pool.\n# TYPE lb_conntrack_evicted_snat_pressure_total counter");
    let _ = writeln!(
        o,
        "lb_conntrack_evicted_snat_pressure_total {}",
        t.evicted_snat_pressure
    );
    let _ = writeln!(o, "# HELP lb_conntrack_swept_total Timed-out flows the sweep removed (kept past their deadline behind younger flows in their list).\n# TYPE lb_conntrack_swept_total counter");
    let _ = writeln!(o, "lb_conntrack_swept_total {}", t.swept);
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
        (
            "backend_fast_packets_total",
            "Packets to or from a backend forwarded by a queue thread's plan, without the lock.",
            7,
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
                b.fast_packets,
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
    type Gauge = fn(&BackendLoad) -> Option<f64>;
    let gauges: [(&str, &str, Gauge); 7] = [
        (
            "backend_active_conns",
            "Active connections (TCP established; live UDP flows).",
            |l| Some(f64::from(l.active_conns)),
        ),
        (
            "backend_inactive_conns",
            "Inactive connections (TCP handshake and closing states).",
            |l| Some(f64::from(l.inactive_conns)),
        ),
        (
            "backend_overloaded",
            "Above its admission threshold (1).",
            |l| Some(f64::from(u8::from(l.overloaded))),
        ),
        (
            "backend_ejected",
            "Ejected by passive outlier detection (1).",
            |l| Some(f64::from(u8::from(l.observed.ejected))),
        ),
        ("backend_ejections_total", "Outlier ejections.", |l| {
            Some(l.observed.ejections as f64)
        }),
        (
            "backend_handshake_milliseconds",
            "EWMA of SYN to SYN-ACK as the balancer saw it.",
            |l| l.observed.handshake.millis(),
        ),
        (
            "backend_response_milliseconds",
            "EWMA of a connection's first request to its first response.",
            |l| l.observed.response.millis(),
        ),
    ];
    for (name, help, get) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(o, "# HELP lb_{name} {help}\n# TYPE lb_{name} {kind}");
        for l in labels {
            if let Some(v) = l.load.as_ref().and_then(get) {
                let _ = writeln!(
                    o,
                    "lb_{name}{{backend=\"{}\",service=\"{}\"}} {v}",
                    l.addr, l.service
                );
            }
        }
    }
    o
}

/// Parses the query of `/explain`: `proto=tcp|udp&src=IP:PORT&dst=VIP:PORT`.
///
/// # Errors
/// A message naming the missing or malformed parameter.
pub fn explain_query(q: &str) -> Result<FlowKey, String> {
    let (mut proto, mut src, mut dst) = (None, None, None);
    for kv in q.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = v
            .replace("%5B", "[")
            .replace("%5D", "]")
            .replace("%3A", ":");
        match k {
            "proto" => {
                proto = Some(match v.as_str() {
                    "tcp" => IpProto::Tcp,
                    "udp" => IpProto::Udp,
                    _ => return Err(format!("proto `{v}`: expected tcp or udp")),
                })
            }
            "src" => {
                src = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("src `{v}`: {e}"))?,
                )
            }
            "dst" => {
                dst = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("dst `{v}`: {e}"))?,
                )
            }
            _ => {}
        }
    }
    let (Some(proto), Some(src), Some(dst)) = (proto, src, dst) else {
        return Err("expected proto=tcp|udp&src=IP:PORT&dst=VIP:PORT".into());
    };
    FlowKey::new(src.ip(), src.port(), dst.ip(), dst.port(), proto)
        .map_err(|e| format!("src and dst: {e}"))
}

/// A flow state's name as IPVS prints it, lowercase (`established`, `syn_recv`, `udp`, …).
fn state_name(s: lb_conntrack::FlowState) -> &'static str {
    use lb_conntrack::{FlowState as F, TcpState as T};
    match s {
        F::Tcp(T::None) => "none",
        F::Tcp(T::Established) => "established",
        F::Tcp(T::SynSent) => "syn_sent",
        F::Tcp(T::SynRecv) => "syn_recv",
        F::Tcp(T::FinWait) => "fin_wait",
        F::Tcp(T::TimeWait) => "time_wait",
        F::Tcp(T::Close) => "close",
        F::Tcp(T::CloseWait) => "close_wait",
        F::Tcp(T::LastAck) => "last_ack",
        F::UdpUnconfirmed => "udp_unconfirmed",
        F::Udp => "udp",
        F::Icmp => "icmp",
        _ => "other",
    }
}

/// `{"error": message}`.
pub fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// Renders an explanation as JSON (backends named by address; `backends` is the tables'
/// by-id list). The answer of `GET /explain?proto=tcp|udp&src=IP:PORT&dst=VIP:PORT`:
///
/// ```text
/// {
///   "service":     {"vip", "proto", "mode", "scheduler"} | null (no service there),
///   "flow":        {"backend", "state" (IPVS names: established, syn_recv, time_wait, ...),
///                   "idle_ms", "idle_left_ms", "packets", "bytes"} | null (not tracked),
///   "persistence": "ADDR:PORT" | null (the backend a client template names),
///   "decision":    {"by": "flow" | "persistence" | "scheduler" | "per-message" | "none",
///                   "backend": "ADDR:PORT" | null, "reason": "..."},
///   "backends":    [{"id", "addr", "eligible" (may take a new flow now), "healthy", "weight",
///                    "overloaded", "ejected", "active_conns", "inactive_conns",
///                    "cost" (the scheduler's score per weight, lower wins; null when it does
///                    not rank by load), "response_ms", "handshake_ms", "peak_ewma_ms"}]
/// }
/// ```
/// A decision by the scheduler is what the next SYN of that flow gets if nothing else
/// changes the load first; nothing is changed by asking.
pub fn explain_json(e: &Explanation, backends: &[Option<BackendInfo>]) -> String {
    let addr = |id: BackendId| {
        backends
            .get(id.get() as usize)
            .and_then(|b| b.as_ref())
            .map(|b| b.addr.to_string())
    };
    let (by, backend, reason) = match e.decision {
        Decision::Flow(b) => (
            "flow",
            addr(b),
            "the flow is tracked: its packets keep their backend".to_owned(),
        ),
        Decision::Persistence(b) => (
            "persistence",
            addr(b),
            "a persistence template of the client names it".to_owned(),
        ),
        Decision::Scheduler(b) => (
            "scheduler",
            addr(b),
            "the scheduler would pick it for a new flow now".to_owned(),
        ),
        Decision::PerMessage => (
            "per-message",
            None,
            "placed per message by its SIP Call-ID".to_owned(),
        ),
        Decision::NoService => ("none", None, "no service listens there".to_owned()),
        Decision::Drop(r) => (
            "none",
            None,
            format!("a new flow would be dropped: {}", r.name()),
        ),
        _ => ("none", None, String::new()),
    };
    let cands: Vec<serde_json::Value> = e
        .backends
        .iter()
        .map(|b| {
            let l = &b.load;
            serde_json::json!({
                "id": b.info.id.get(), "addr": b.info.addr.to_string(),
                "eligible": l.available, "healthy": b.info.healthy, "weight": b.info.weight.get(),
                "overloaded": l.overloaded, "ejected": l.observed.ejected,
                "active_conns": l.active_conns, "inactive_conns": l.inactive_conns,
                "cost": b.cost, "response_ms": l.observed.response.millis(),
                "handshake_ms": l.observed.handshake.millis(), "peak_ewma_ms": l.peak_ewma_ms,
            })
        })
        .collect();
    serde_json::json!({
        "service": e.service.map(|s| serde_json::json!({
            "vip": s.vip.to_string(),
            "proto": if s.proto == IpProto::Tcp { "tcp" } else { "udp" },
            "mode": s.mode.to_string(), "scheduler": s.scheduler.name(),
        })),
        "flow": e.flow.map(|f| serde_json::json!({
            "backend": addr(f.backend), "state": state_name(f.state),
            "idle_ms": f.idle.as_millis(), "idle_left_ms": f.idle_left.as_millis(),
            "packets": f.packets, "bytes": f.bytes,
        })),
        "persistence": e.persistence.and_then(addr),
        "decision": { "by": by, "backend": backend, "reason": reason },
        "backends": cands,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_conntrack::SessionHistograms;
    use lb_dataplane::BackendStats;

    #[test]
    fn stats_render_as_json_and_prometheus() {
        let mut a = Stats {
            backends: vec![
                BackendStats::default(),
                BackendStats {
                    flows: 3,
                    ..Default::default()
                },
            ],
            backend_ids_in_use: 5,
            backend_ids_retired: 2,
            backend_ids_released: 7,
            ..Stats::default()
        };
        a.drops[DropReason::Fragment as usize] = 3;
        a.frag_forwarded = 7;
        a.drops[DropReason::IcmpRateLimited as usize] = 7;
        a.drops[DropReason::IcmpNotUnicast as usize] = 2;
        let labels = [BackendLabel {
            id: 1,
            addr: "198.51.100.11:80".into(),
            service: "203.0.113.10:80".into(),
            live: true,
            healthy: true,
            load: Some(BackendLoad {
                active_conns: 4,
                inactive_conns: 2,
                ..BackendLoad::default()
            }),
        }];
        let t = TableStats {
            persist_shed: 11,
            persist_established: 2,
            persist_swept: 6,
            ..TableStats::default()
        };
        let j: serde_json::Value = serde_json::from_str(&to_json(&a, &t, &labels)).unwrap();
        assert_eq!(j["drops"]["fragment"], 3);
        assert_eq!(j["fragments"]["forwarded"], 7);
        assert_eq!(j["persist"]["shed"], 11);
        assert_eq!(j["persist"]["established"], 2);
        assert_eq!(j["persist"]["swept"], 6);
        assert_eq!(j["drops"]["icmp_rate_limited"], 7);
        assert_eq!(j["drops"]["icmp_not_unicast"], 2);
        assert_eq!(j["backend_ids"]["in_use"], 5);
        assert_eq!(j["backend_ids"]["retired"], 2);
        assert_eq!(j["backend_ids"]["released"], 7);
        assert_eq!(j["backends"][0]["flows"], 3);
        assert_eq!(j["backends"][0]["active_conns"], 4);
        assert_eq!(j["backends"][0]["inactive_conns"], 2);
        assert!(j["backends"][0]["response_ms"].is_null());
        let p = to_prometheus(&a, &t, &labels);
        assert!(p.contains("\nlb_backend_ids_in_use 5\n"));
        assert!(p.contains("\nlb_backend_ids_retired 2\n"));
        assert!(p.contains("\nlb_backend_ids_released_total 7\n"));
        assert!(p.contains(
            "lb_backend_active_conns{backend=\"198.51.100.11:80\",service=\"203.0.113.10:80\"} 4"
        ));
        assert!(
            p.contains("lb_dropped_packets_total{reason=\"fragment\"} 3"),
            "{p}"
        );
        assert!(p.contains("lb_fragments_forwarded_total 7"), "{p}");
        assert!(p.contains("lb_persist_shed_total 11"), "{p}");
        assert!(p.contains("lb_persist_swept_total 6"), "{p}");
        assert!(p.contains("lb_dropped_packets_total{reason=\"icmp_rate_limited\"} 7"));
        assert!(p.contains("lb_dropped_packets_total{reason=\"icmp_not_unicast\"} 2"));
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
            load: None,
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

    #[test]
    fn explain_queries_parse_or_name_the_bad_parameter() {
        let k = explain_query("proto=tcp&src=192.0.2.2:4000&dst=203.0.113.10:80").unwrap();
        assert_eq!(
            (k.src_port(), k.dst_port(), k.proto()),
            (4000, 80, IpProto::Tcp)
        );
        let k6 = explain_query("proto=udp&src=%5B2001:db8::2%5D:53&dst=[2001:db8:10::10]:53");
        assert!(!k6.unwrap().is_ipv4());
        assert!(
            explain_query("proto=sctp&src=192.0.2.2:1&dst=203.0.113.10:80")
                .unwrap_err()
                .contains("proto")
        );
        assert!(explain_query("proto=tcp&src=nope&dst=203.0.113.10:80")
            .unwrap_err()
            .contains("src"));
        assert!(explain_query("proto=tcp&src=192.0.2.2:1&dst=[2001:db8::1]:80").is_err());
        assert!(explain_query("").is_err());
    }
}
