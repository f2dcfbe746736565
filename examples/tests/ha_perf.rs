//! Issue 16, what connection sync costs the active/backup pair of `tun-balancer` (mode `nat`, the
//! `ha_lab` pair topology), through the kernel. A measurement, not a test of behaviour: ignored
//! by default; run with
//! `cargo test --release -p lb-examples --test ha_perf -- --ignored --nocapture`
//! (the results and what they mean: `benches/results/ha.md`).
//!
//! # The load
//! A sender in the client namespace (a raw IPv4 socket, `IPPROTO_RAW`) sends one 48-byte UDP
//! datagram per new flow to VIP:7000, paced on a schedule (rate `LB_HA_PERF_RATE`, default
//! 10 000 flows/s, for `LB_HA_PERF_SECS`, default 10 s). Flow `i` comes from
//! 198.18.0.1 + i / 60 000 (RFC 2544's benchmark range), port 1024 + i % 60 000, so no 5-tuple
//! repeats (hping3 cannot do this: it holds about 5 000 packets/s with `-i u100` on this machine,
//! and its one source address has only 64 Ki ports). The backends do not answer the load: an
//! nftables rule in each backend counts and drops the datagrams from the SNAT address, while
//! `server.py` still answers the health checks. So each flow is exactly one packet, one new
//! conntrack entry and one change in the master's sync log.
//!
//! # The setups
//! Each on freshly started balancers (empty tables), all of them in every repetition
//! (`LB_HA_PERF_REPS`, default 3), in turn:
//! - (c) `single`: node 1 without `[ha]` (the floating addresses added by hand), the baseline;
//! - (a) `pair`: node 1 master, node 2 its synced backup (`refresh_s = 5`, the default);
//! - (a') `pair, refresh_s = 3600`: the same with the refresh passes out of the way, so that the
//!   wire carries the creation records alone;
//! - (b) `backup stopped`: node 2 synced, then stopped: the master still drains, encodes and
//!   sends its sync datagrams, which now go nowhere (to a port nothing listens on).
//!
//! # What is measured
//! - CPU (user + system, all threads, `/proc/PID/stat`) of each balancer over the sending window,
//!   as % of one core, per thread (`/proc/PID/task/*/stat`: `datapath-0`, `ha`, `stats`, the
//!   control thread; "other" is what exited threads, the health probes, used), and the ratio to
//!   (c) of the same repetition; the same over 3 s without load just before (the fixed cost);
//! - the system calls of the master's data-path and HA threads (`perf stat --per-thread` on the
//!   `raw_syscalls:sys_enter` and `syscalls:sys_enter_futex` tracepoints, when perf is there);
//! - the master's sync counters over the run (until a refresh pass after the load has resent
//!   what it resends): records, datagrams and bytes per new flow, records per datagram;
//! - the lag of the backup's table: both nodes' statistics sampled about every 100 ms (the stats
//!   server answers on its own 100 ms poll, so the two nodes are never read at the same instant:
//!   the master's entry count is interpolated at the instant of each backup sample), as entries
//!   and as the time the master had that many entries before the backup did; the master's
//!   `ha.sync.lag_records` gauge and `ha.sync.lost`; the backup's `received` and `installed`
//!   against the master's `sent`, its gaps and resync requests, and the UDP datagrams its kernel
//!   dropped for a full socket buffer (`RcvbufErrors` in its namespace);
//! - with `LB_HA_PERF_LADDER` (default `20000,...,150000`; empty: skip), the pair at
//!   higher rates (at most 120 000 flows per step, a fresh pair each), for the highest rate at
//!   which nothing is lost and the backup keeps up.
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{enter_ns, need_root, need_tool, run_timeout};
use ha_lab::rawload::{raw_socket, FlowLoad, Sent};
use ha_lab::{pair_config, HaLab, PairOpts, FLOATING, SNAT4, UDP_PORT, VIP4};

/// The payload of every load datagram (even length: no checksum padding).
const PAYLOAD: &[u8] = b"lb ha perf: new flow";

/// Conntrack capacity of the runs (the lab's 65 536 would fill at 10 k flows/s in 6.5 s; UDP
/// entries without a reply live 30 s).
const CAPACITY: u32 = 262_144;

/// Most flows in one ladder step: three backends × 64 512 SNAT ports, with room for maglev's
/// uneven split.
const LADDER_FLOWS: f64 = 120_000.0;

/// The stats port of both nodes (in their namespaces).
const STATS: &str = "127.0.0.1:9100";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Single,
    Pair,
    PairNoRefresh,
    BackupStopped,
}

impl Setup {
    const ALL: [Setup; 4] = [
        Setup::Single,
        Setup::Pair,
        Setup::PairNoRefresh,
        Setup::BackupStopped,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::Single => "(c) single, no [ha]",
            Setup::Pair => "(a) pair, backup synced",
            Setup::PairNoRefresh => "(a') pair, refresh_s = 3600",
            Setup::BackupStopped => "(b) pair, backup stopped",
        }
    }

    fn ha(self) -> bool {
        self != Setup::Single
    }

    /// Whether the backup runs during the load.
    fn backup(self) -> bool {
        matches!(self, Setup::Pair | Setup::PairNoRefresh)
    }

    /// How long after the load the counters are read: past the next refresh pass (default
    /// `refresh_s = 5`), which resends the flows created since the previous pass began.
    fn settle(self) -> Duration {
        match self {
            Setup::Pair | Setup::BackupStopped => Duration::from_millis(6500),
            _ => Duration::from_millis(1500),
        }
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

// ---- configuration and setups ----------------------------------------------------------------

/// Node `node`'s configuration: the lab's `pair_config` (IPv4 services only, health checks every
/// 500 ms), a larger table, with or without `[ha]`, with `refresh_s` when given.
fn config(node: u8, ha: bool, refresh_s: Option<u64>) -> String {
    let opts = PairOpts {
        families: vec!["4"],
        health_interval_ms: 500,
        ..PairOpts::default()
    };
    let full = pair_config(node, "nat", &opts).replace(
        "conntrack_capacity = 65536",
        &format!("conntrack_capacity = {CAPACITY}"),
    );
    assert!(
        full.contains(&format!("conntrack_capacity = {CAPACITY}")),
        "pair_config changed: {full}"
    );
    let at = full.find("[ha]").expect("an [ha] section");
    if !ha {
        return full[..at].to_owned();
    }
    match refresh_s {
        Some(r) => full.replacen("[ha]\n", &format!("[ha]\nrefresh_s = {r}\n"), 1),
        None => full,
    }
}

/// Waits until node `node` sees the three UDP backends healthy.
fn wait_healthy(h: &HaLab, node: u8) {
    let ok = h.lab.wait_for(Duration::from_secs(15), || {
        let s = h.stats(node)?;
        let n = s["backends"]
            .as_array()?
            .iter()
            .filter(|b| {
                b["addr"]
                    .as_str()
                    .is_some_and(|a| a.ends_with(&format!(":{UDP_PORT}")))
                    && b["healthy"] == true
            })
            .count();
        (n == 3).then_some(())
    });
    assert!(
        ok.is_some(),
        "node {node}: UDP backends not healthy: {:?}",
        h.stats(node).map(|s| s["backends"].clone())
    );
}

fn wait_synced_backup(h: &HaLab, node: u8) -> bool {
    h.lab
        .wait_for(Duration::from_secs(15), || {
            let v = h.stats(node)?;
            (v["ha"]["role"] == "backup" && v["ha"]["synced"] == true).then_some(())
        })
        .is_some()
}

/// Starts `setup` on fresh balancers and resolves the client's neighbour entry for the gateway.
fn start_setup(h: &mut HaLab, setup: Setup) {
    if setup.ha() {
        let refresh = (setup == Setup::PairNoRefresh).then_some(3600);
        h.start_balancer(1, "nat", &config(1, true, refresh));
        assert!(
            h.wait_role(1, "master", Duration::from_secs(10)),
            "node 1 never became master: {}",
            h.log("balancer-l1")
        );
        h.start_balancer(2, "nat", &config(2, true, refresh));
        assert!(
            wait_synced_backup(h, 2),
            "node 2 not a synced backup: {:?}\n{}",
            h.ha(2),
            h.log("balancer-l2")
        );
        wait_healthy(h, 1);
        wait_healthy(h, 2);
        if setup == Setup::BackupStopped {
            h.stop_balancer(2);
            h.remove_floating(2);
        }
    } else {
        let l1 = h.node_ns(1).to_owned();
        for (dev, addr) in FLOATING {
            h.lab.addr(&l1, dev, addr);
        }
        h.start_balancer(1, "nat", &config(1, false, None));
        wait_healthy(h, 1);
    }
    // Resolves the client's neighbour entry for the gateway without touching the balancer's
    // table: a TCP connection to a closed port of the master's floating address (a reset).
    let _ = h.try_sh("client", "curl -s --max-time 2 http://192.0.2.10:1/");
}

/// Stops whatever balancer runs (the backup first, so that nothing takes over) and removes any
/// floating address left.
fn stop_setup(h: &mut HaLab) {
    for n in [2u8, 1] {
        if h.alive(&format!("balancer-l{n}")) {
            h.stop_balancer(n);
        }
        h.remove_floating(n);
    }
}

/// Stops the balancers even when a run panics (the lab then removes everything else).
struct SetupGuard<'a>(&'a mut HaLab);

impl Drop for SetupGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in [2u8, 1] {
                let _ = self.0.kill9(&format!("balancer-l{n}"));
            }
        } else {
            stop_setup(self.0);
        }
    }
}

// ---- the backends: count and drop the load -------------------------------------------------

fn drop_load_on_backends(h: &HaLab) {
    for b in ["b1", "b2", "b3"] {
        h.sh(
            b,
            &format!(
                "nft add table ip perf && \
                 nft add chain ip perf in '{{ type filter hook input priority 0; policy accept; }}' && \
                 nft add rule ip perf in ip saddr {SNAT4} udp dport {UDP_PORT} counter drop"
            ),
        );
    }
}

/// Load datagrams that reached the backends so far.
fn backend_packets(h: &HaLab) -> u64 {
    ["b1", "b2", "b3"]
        .iter()
        .map(|b| {
            let out = h.try_sh(b, "nft list chain ip perf in").unwrap_or_default();
            out.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Packets the kernel could not queue to node `node`'s TUN device.
fn lb0_tx_dropped(h: &HaLab, node: u8) -> u64 {
    h.try_sh(
        &format!("l{node}"),
        "cat /sys/class/net/lb0/statistics/tx_dropped",
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// The UDP receive errors of node `node`'s namespace (`/proc/net/snmp`: InErrors,
/// RcvbufErrors): datagrams the kernel dropped because a socket's buffer was full.
fn udp_errors(h: &HaLab, node: u8) -> (u64, u64) {
    let out = h
        .try_sh(&format!("l{node}"), "cat /proc/net/snmp")
        .unwrap_or_default();
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let get = |name: &str| -> u64 {
        let (Some(head), Some(vals)) = (rows.first(), rows.get(1)) else {
            return 0;
        };
        head.iter()
            .position(|k| *k == name)
            .and_then(|i| vals.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("InErrors"), get("RcvbufErrors"))
}

// ---- the sender -----------------------------------------------------------------------------

/// The load: one-datagram UDP flows to VIP:UDP_PORT from 198.18.0.1 on.
fn load() -> FlowLoad {
    FlowLoad {
        base: Ipv4Addr::new(198, 18, 0, 1),
        dst: VIP4.parse().expect("VIP4"),
        port: UDP_PORT,
        payload: PAYLOAD,
    }
}

// ---- statistics sampling ----------------------------------------------------------------------

/// The statistics JSON of the balancer listening on [`STATS`] in the caller's namespace.
fn get_stats() -> Option<Value> {
    let addr: SocketAddr = STATS.parse().expect("stats address");
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    serde_json::from_str(s.split_once("\r\n\r\n")?.1).ok()
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since the run's origin when the answer arrived (the stats server renders right
    /// before it answers).
    at: f64,
    entries: u64,
    lag_records: u64,
    lost: u64,
}

/// A thread in a node's namespace that reads its statistics back to back (the stats server's
/// own 100 ms poll paces it) until stopped; stopped and joined when dropped.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn start(ns: &str, origin: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/run/netns/{ns}");
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            enter_ns(&path);
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(v) = get_stats() {
                    out.push(Sample {
                        at: origin.elapsed().as_secs_f64(),
                        entries: v["conntrack"]["entries"].as_u64().unwrap_or(0),
                        lag_records: v["ha"]["sync"]["lag_records"].as_u64().unwrap_or(0),
                        lost: v["ha"]["sync"]["lost"].as_u64().unwrap_or(0),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The master's entry count at `t`, interpolated between its samples.
fn entries_at(m: &[Sample], t: f64) -> Option<f64> {
    let w = m.windows(2).find(|w| w[0].at <= t && t <= w[1].at)?;
    let (a, b) = (w[0], w[1]);
    let f = if b.at > a.at {
        (t - a.at) / (b.at - a.at)
    } else {
        0.0
    };
    Some(a.entries as f64 + f * (b.entries as f64 - a.entries as f64))
}

/// When the master's entry count reached `n`, interpolated between its samples.
fn time_of(m: &[Sample], n: f64) -> Option<f64> {
    let w = m
        .windows(2)
        .find(|w| (w[0].entries as f64) <= n && n <= w[1].entries as f64)?;
    let (a, b) = (w[0], w[1]);
    let span = b.entries as f64 - a.entries as f64;
    let f = if span > 0.0 {
        (n - a.entries as f64) / span
    } else {
        0.0
    };
    Some(a.at + f * (b.at - a.at))
}

// ---- CPU --------------------------------------------------------------------------------------

fn clk_tck() -> f64 {
    run_timeout(Duration::from_secs(5), "getconf", &["CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime (clock ticks) from a `/proc/.../stat` line.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces) start at field 3 (state); utime
    // and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A process's CPU ticks, in total and per live thread (tid → (name, ticks)).
#[derive(Debug, Clone, Default)]
struct Cpu {
    total: u64,
    threads: HashMap<u32, (String, u64)>,
}

fn cpu(pid: u32) -> Cpu {
    let total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0);
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let name = std::fs::read_to_string(e.path().join("comm"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            if let Some(t) = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| stat_ticks(&s))
            {
                threads.insert(tid, (name, t));
            }
        }
    }
    Cpu { total, threads }
}

/// CPU used between two readings, as % of one core over `secs`: the total and per thread name
/// (the control thread is `main`; "other" is threads that came or went, the health probes).
fn cpu_use(a: &Cpu, b: &Cpu, secs: f64, tck: f64) -> (f64, Vec<(String, f64)>) {
    let pct = |ticks: u64| ticks as f64 / tck / secs * 100.0;
    let total = pct(b.total.saturating_sub(a.total));
    let mut by_name: HashMap<String, f64> = HashMap::new();
    let mut known = 0.0;
    for (tid, (name, t1)) in &b.threads {
        if let Some((_, t0)) = a.threads.get(tid) {
            let name = if name == "tun-balancer" {
                "main".to_owned()
            } else {
                name.clone()
            };
            let p = pct(t1.saturating_sub(*t0));
            known += p;
            *by_name.entry(name).or_default() += p;
        }
    }
    by_name.insert("other".into(), (total - known).max(0.0));
    let mut v: Vec<(String, f64)> = by_name.into_iter().collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1));
    (total, v)
}

// ---- system calls (perf) ----------------------------------------------------------------------

/// `perf stat` counting the system calls of some threads for `secs` seconds, in the background.
struct Syscalls {
    handle: Option<JoinHandle<String>>,
    names: HashMap<u32, String>,
    secs: f64,
}

impl Syscalls {
    /// Counts `threads` (tid → name) of a process, when perf is installed.
    fn start(threads: HashMap<u32, String>, secs: f64) -> Syscalls {
        let have = run_timeout(Duration::from_secs(5), "sh", &["-c", "command -v perf"]).is_ok();
        if !have || threads.is_empty() {
            return Syscalls {
                handle: None,
                names: threads,
                secs,
            };
        }
        let tids = threads
            .keys()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let dur = format!("{secs:.1}");
        let handle = std::thread::spawn(move || {
            let out = std::process::Command::new("timeout")
                .args([
                    "-k",
                    "2",
                    "30",
                    "perf",
                    "stat",
                    "-x",
                    ",",
                    "--per-thread",
                    "-e",
                    "raw_syscalls:sys_enter,syscalls:sys_enter_futex",
                    "-t",
                    &tids,
                    "--",
                    "sleep",
                    &dur,
                ])
                .stdin(std::process::Stdio::null())
                .output();
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default()
        });
        Syscalls {
            handle: Some(handle),
            names: threads,
            secs,
        }
    }

    /// Per thread name: (system calls per second, futex calls per second).
    fn finish(mut self) -> HashMap<String, (f64, f64)> {
        let out = self
            .handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let mut r: HashMap<String, (f64, f64)> = HashMap::new();
        for line in out.lines() {
            // comm-tid,count,unit,event,...
            let f: Vec<&str> = line.split(',').collect();
            let (Some(who), Some(count), Some(event)) = (f.first(), f.get(1), f.get(3)) else {
                continue;
            };
            let Some(tid) = who
                .rsplit_once('-')
                .and_then(|(_, t)| t.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(name) = self.names.get(&tid) else {
                continue;
            };
            let n = count.parse::<f64>().unwrap_or(0.0) / self.secs;
            let e = r.entry(name.clone()).or_default();
            if event.starts_with("raw_syscalls") {
                e.0 += n;
            } else {
                e.1 += n;
            }
        }
        r
    }
}

impl Drop for Syscalls {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---- one run ----------------------------------------------------------------------------------

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64().unwrap_or(0)
}

/// Flows the balancer created for the UDP service (the backends' `flows` counters).
fn udp_flows(v: &Value) -> u64 {
    v["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .filter(|b| {
                    b["addr"]
                        .as_str()
                        .is_some_and(|a| a.ends_with(&format!(":{UDP_PORT}")))
                })
                .map(|b| b["flows"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::min)
}

#[derive(Debug, Clone, Default)]
struct Run {
    setup: Option<Setup>,
    rep: usize,
    target: f64,
    sent: Sent,
    /// Flows the master created (UDP backends' `flows`).
    flows: u64,
    /// Load datagrams that reached the backends.
    delivered: u64,
    lb0_dropped: u64,
    master_cpu: f64,
    master_threads: Vec<(String, f64)>,
    backup_cpu: Option<f64>,
    backup_threads: Vec<(String, f64)>,
    /// Sync counters of the master (deltas over the run and the settle time).
    records: u64,
    datagrams: u64,
    bytes: u64,
    /// Records sent during the sending window alone.
    records_in_load: u64,
    datagrams_in_load: u64,
    backup_received: u64,
    backup_installed: u64,
    backup_refused: u64,
    lost: u64,
    lag_records_max: u64,
    /// Backup lag samples during the load (entries, ms).
    lag_entries: Vec<f64>,
    lag_ms: Vec<f64>,
    final_entries: (u64, Option<u64>),
    syscalls: HashMap<String, (f64, f64)>,
    /// Resynchronisation: the backup's gaps, bulk requests and completed bulk syncs, the
    /// master's bulk dumps sent and send errors (deltas over the run).
    gaps: u64,
    resyncs: u64,
    bulk_received: u64,
    bulk_sent: u64,
    send_errors: u64,
    /// UDP datagrams the backup's kernel dropped for a full socket buffer (its namespace).
    backup_rcvbuf_errors: u64,
    /// CPU (% of one core) of the master and the backup over 3 s without load, before it.
    idle_master: (f64, Vec<(String, f64)>),
    idle_backup: Option<(f64, Vec<(String, f64)>)>,
}

impl Run {
    fn name(&self) -> &'static str {
        self.setup.map_or("?", Setup::name)
    }
}

/// Starts `setup`, runs the load at `rate` for `secs`, reads everything, stops the balancers.
fn run_once(h: &mut HaLab, setup: Setup, rep: usize, rate: f64, secs: f64, tck: f64) -> Run {
    start_setup(h, setup);
    let h = SetupGuard(h);
    let master_pid = h.0.pid("balancer-l1").expect("node 1 runs");
    let backup_pid = if setup.backup() {
        Some(h.0.pid("balancer-l2").expect("node 2 runs"))
    } else {
        None
    };
    let comm = std::fs::read_to_string(format!("/proc/{master_pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "tun-balancer",
        "pid {master_pid} is not the balancer"
    );
    let client = h.0.ns("client").to_owned();
    let fd = raw_socket(&client);
    let delivered0 = backend_packets(h.0);
    let dropped0 = lb0_tx_dropped(h.0, 1);
    let m0 = h.0.stats(1).expect("node 1 stats");
    let b0 = if setup.backup() { h.0.stats(2) } else { None };
    let udp0 = udp_errors(h.0, 2);

    let origin = Instant::now();
    let mut samplers = vec![Sampler::start(h.0.node_ns(1), origin)];
    if setup.backup() {
        samplers.push(Sampler::start(h.0.node_ns(2), origin));
    }
    std::thread::sleep(Duration::from_millis(300));

    // The fixed cost: both nodes without load (the HA thread's ticks, heartbeats, probes).
    let (i0, bi0) = (cpu(master_pid), backup_pid.map(cpu));
    let idle_from = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (i1, bi1) = (cpu(master_pid), backup_pid.map(cpu));
    let idle_secs = idle_from.elapsed().as_secs_f64();
    let idle_master = cpu_use(&i0, &i1, idle_secs, tck);
    let idle_backup = match (&bi0, &bi1) {
        (Some(a), Some(b)) => Some(cpu_use(a, b, idle_secs, tck)),
        _ => None,
    };

    let c0 = cpu(master_pid);
    let watched: HashMap<u32, String> = c0
        .threads
        .iter()
        .filter(|(_, (n, _))| n == "datapath-0" || n == "ha")
        .map(|(t, (n, _))| (*t, n.clone()))
        .collect();
    let bc0 = backup_pid.map(cpu);
    let load_start = origin.elapsed().as_secs_f64();
    let dur = Duration::from_secs_f64(secs);
    let sender = std::thread::spawn(move || load().send(&fd, 0, rate, dur));
    // The system calls of the master's data-path and HA threads over most of the window.
    let syscalls = Syscalls::start(watched, (secs - 2.0).max(1.0));
    let sent = sender.join().expect("sender thread");
    let c1 = cpu(master_pid);
    let bc1 = backup_pid.map(cpu);
    let load_end = origin.elapsed().as_secs_f64();
    let wall = load_end - load_start;
    let m_end = h.0.stats(1).expect("node 1 stats");
    let syscalls = syscalls.finish();
    std::thread::sleep(setup.settle());
    let mut samples: Vec<Vec<Sample>> = samplers.into_iter().map(Sampler::finish).collect();
    let m1 = h.0.stats(1).expect("node 1 stats");
    let b1 = if setup.backup() { h.0.stats(2) } else { None };

    let (master_cpu, master_threads) = cpu_use(&c0, &c1, wall, tck);
    let (backup_cpu, backup_threads) = match (&bc0, &bc1) {
        (Some(a), Some(b)) => {
            let (t, v) = cpu_use(a, b, wall, tck);
            (Some(t), v)
        }
        _ => (None, Vec::new()),
    };
    let d = |a: &Value, b: &Value, k: &str| num(b, &["ha", "sync", k]) - num(a, &["ha", "sync", k]);
    let mut run = Run {
        setup: Some(setup),
        rep,
        target: rate,
        sent,
        flows: udp_flows(&m1) - udp_flows(&m0),
        delivered: backend_packets(h.0) - delivered0,
        lb0_dropped: lb0_tx_dropped(h.0, 1) - dropped0,
        master_cpu,
        master_threads,
        backup_cpu,
        backup_threads,
        records: d(&m0, &m1, "sent"),
        datagrams: d(&m0, &m1, "datagrams_sent"),
        bytes: d(&m0, &m1, "bytes_sent"),
        records_in_load: d(&m0, &m_end, "sent"),
        datagrams_in_load: d(&m0, &m_end, "datagrams_sent"),
        lost: num(&m1, &["ha", "sync", "lost"]),
        final_entries: (
            num(&m1, &["conntrack", "entries"]),
            b1.as_ref().map(|b| num(b, &["conntrack", "entries"])),
        ),
        syscalls,
        bulk_sent: d(&m0, &m1, "bulk_sent"),
        send_errors: num(&m1, &["ha", "drops", "send_errors"])
            - num(&m0, &["ha", "drops", "send_errors"]),
        idle_master,
        idle_backup,
        ..Run::default()
    };
    if let (Some(b0), Some(b1)) = (&b0, &b1) {
        run.backup_received = d(b0, b1, "received");
        run.backup_installed = d(b0, b1, "installed");
        run.backup_refused = d(b0, b1, "refused");
        run.gaps = d(b0, b1, "gaps");
        run.resyncs = d(b0, b1, "resyncs");
        run.bulk_received = d(b0, b1, "bulk_received");
        run.backup_rcvbuf_errors = udp_errors(h.0, 2).1 - udp0.1;
    }
    let master = samples.remove(0);
    run.lag_records_max = master
        .iter()
        .filter(|s| s.at >= load_start && s.at <= load_end)
        .map(|s| s.lag_records)
        .max()
        .unwrap_or(0);
    run.lost = run
        .lost
        .max(master.iter().map(|s| s.lost).max().unwrap_or(0));
    if let Some(backup) = samples.first() {
        for b in backup
            .iter()
            .filter(|s| s.at >= load_start + 0.5 && s.at <= load_end)
        {
            if let Some(m) = entries_at(&master, b.at) {
                run.lag_entries.push(m - b.entries as f64);
            }
            if let Some(t) = time_of(&master, b.entries as f64) {
                run.lag_ms.push((b.at - t) * 1e3);
            }
        }
    }
    drop(h);
    run
}

// ---- reporting ------------------------------------------------------------------------------

fn per_flow(x: u64, flows: u64) -> f64 {
    x as f64 / flows.max(1) as f64
}

fn print_run(r: &Run) {
    let threads = |v: &[(String, f64)]| {
        v.iter()
            .filter(|(_, p)| *p >= 0.05)
            .map(|(n, p)| format!("{n} {p:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "rep {} {}: sent {} flows in {:.2} s = {:.0}/s (target {:.0}, {} send errors, at most {:.1} ms behind); \
         master created {} flows, {} reached the backends, lb0 tx_dropped {}",
        r.rep,
        r.name(),
        r.sent.packets,
        r.sent.secs,
        r.sent.rate(),
        r.target,
        r.sent.errors,
        r.sent.max_behind_ms,
        r.flows,
        r.delivered,
        r.lb0_dropped
    );
    println!(
        "    master CPU {:.1} % of a core ({}); backup {}",
        r.master_cpu,
        threads(&r.master_threads),
        r.backup_cpu.map_or("-".to_owned(), |c| format!(
            "{c:.1} % ({})",
            threads(&r.backup_threads)
        ))
    );
    println!(
        "    idle before the load: master {:.1} % ({}); backup {}",
        r.idle_master.0,
        threads(&r.idle_master.1),
        r.idle_backup
            .as_ref()
            .map_or("-".to_owned(), |(c, v)| format!(
                "{c:.1} % ({})",
                threads(v)
            ))
    );
    if r.setup.is_some_and(Setup::ha) {
        println!(
            "    sync: {} records ({} during the load), {} datagrams, {} bytes: {:.2} records and {:.1} bytes per flow, \
             {:.1} records per datagram, {:.0} datagrams/s during the load; lost {}, lag_records max {}",
            r.records,
            r.records_in_load,
            r.datagrams,
            r.bytes,
            per_flow(r.records, r.flows),
            per_flow(r.bytes, r.flows),
            per_flow(r.records, r.datagrams),
            r.datagrams_in_load as f64 / r.sent.secs.max(1e-9),
            r.lost,
            r.lag_records_max
        );
    }
    if r.setup.is_some_and(Setup::ha) {
        println!(
            "    resync: backup gaps {} resyncs {} bulk syncs received {}, master bulk dumps sent {} send errors {}; \
             UDP receive-buffer drops in the backup's namespace {}",
            r.gaps, r.resyncs, r.bulk_received, r.bulk_sent, r.send_errors, r.backup_rcvbuf_errors
        );
    }
    if r.backup_cpu.is_some() {
        println!(
            "    backup: received {} installed {} refused {} (master sent {}); entries master {} backup {:?}; \
             lag over {} samples: median {:.0} max {:.0} entries, median {:.1} max {:.1} ms",
            r.backup_received,
            r.backup_installed,
            r.backup_refused,
            r.records,
            r.final_entries.0,
            r.final_entries.1,
            r.lag_entries.len(),
            median(&r.lag_entries),
            max(&r.lag_entries),
            median(&r.lag_ms),
            max(&r.lag_ms)
        );
    }
    if !r.syscalls.is_empty() {
        let rate = r.sent.rate().max(1.0);
        let mut v: Vec<_> = r.syscalls.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        println!(
            "    master system calls: {}",
            v.iter()
                .map(|(n, (s, f))| format!(
                    "{n} {s:.0}/s ({:.2} per flow), futex {f:.0}/s",
                    s / rate
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

/// "median (min–max)" of `f` over `runs`.
fn spread(runs: &[&Run], f: impl Fn(&Run) -> f64, digits: usize) -> String {
    let v: Vec<f64> = runs
        .iter()
        .map(|r| f(r))
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return "–".into();
    }
    if v.len() == 1 {
        return format!("{:.*}", digits, v[0]);
    }
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits,
        median(&v),
        digits,
        min(&v),
        digits,
        max(&v)
    )
}

fn thread_pct(v: &[(String, f64)], name: &str) -> f64 {
    v.iter().find(|(n, _)| n == name).map_or(0.0, |(_, p)| *p)
}

fn print_tables(runs: &[Run]) {
    let by = |s: Setup| {
        runs.iter()
            .filter(|r| r.setup == Some(s))
            .collect::<Vec<_>>()
    };
    let base: HashMap<usize, f64> = by(Setup::Single)
        .iter()
        .map(|r| (r.rep, r.master_cpu))
        .collect();
    let base_dp: HashMap<usize, f64> = by(Setup::Single)
        .iter()
        .map(|r| (r.rep, thread_pct(&r.master_threads, "datapath-0")))
        .collect();
    println!("\nCPU, % of one core over the sending window, median (min–max) of {} repetitions; ratios to (c) within each repetition:\n", base.len());
    println!("| setup | flows/s sent | master CPU % | ratio to (c) | master datapath-0 % | master ha % | master stats+main+other % | backup CPU % | backup ha % | master CPU µs per flow | idle: master % / master ha % / backup % |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in Setup::ALL {
        let rs = by(s);
        if rs.is_empty() {
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
            s.name(),
            spread(&rs, |r| r.sent.rate(), 0),
            spread(&rs, |r| r.master_cpu, 1),
            spread(
                &rs,
                |r| base.get(&r.rep).map_or(f64::NAN, |b| r.master_cpu / b),
                2
            ),
            spread(&rs, |r| thread_pct(&r.master_threads, "datapath-0"), 1),
            spread(&rs, |r| thread_pct(&r.master_threads, "ha"), 1),
            spread(
                &rs,
                |r| r.master_cpu
                    - thread_pct(&r.master_threads, "datapath-0")
                    - thread_pct(&r.master_threads, "ha"),
                1
            ),
            spread(&rs, |r| r.backup_cpu.unwrap_or(f64::NAN), 1),
            spread(
                &rs,
                |r| if r.backup_cpu.is_some() {
                    thread_pct(&r.backup_threads, "ha")
                } else {
                    f64::NAN
                },
                1
            ),
            spread(
                &rs,
                |r| r.master_cpu / 100.0 * r.sent.secs / r.flows.max(1) as f64 * 1e6,
                2
            ),
            spread(&rs, |r| r.idle_master.0, 1),
            spread(&rs, |r| thread_pct(&r.idle_master.1, "ha"), 1),
            spread(&rs, |r| r.idle_backup.as_ref().map_or(f64::NAN, |b| b.0), 1),
        );
    }
    println!(
        "\ndatapath-0 CPU ratio to (c) within each repetition: {}",
        {
            Setup::ALL
                .iter()
                .filter(|s| **s != Setup::Single)
                .map(|s| {
                    format!(
                        "{} {}",
                        s.name(),
                        spread(
                            &by(*s),
                            |r| base_dp
                                .get(&r.rep)
                                .map_or(f64::NAN, |b| thread_pct(&r.master_threads, "datapath-0")
                                    / b),
                            2
                        )
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
    );
    println!("\nSync on the wire (master counters, from before the load to after the next refresh pass; UDP payload, +28 bytes IP/UDP per datagram):\n");
    println!("| setup | records per flow | bytes per flow | records per datagram | datagrams/s during load | lost | lag_records max | backup gaps / resyncs / rcvbuf drops, per run |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for s in Setup::ALL.into_iter().filter(|s| s.ha()) {
        let rs = by(s);
        if rs.is_empty() {
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name(),
            spread(&rs, |r| per_flow(r.records, r.flows), 2),
            spread(&rs, |r| per_flow(r.bytes, r.flows), 1),
            spread(&rs, |r| per_flow(r.records, r.datagrams), 1),
            spread(&rs, |r| r.datagrams_in_load as f64 / r.sent.secs, 0),
            spread(&rs, |r| r.lost as f64, 0),
            spread(&rs, |r| r.lag_records_max as f64, 0),
            rs.iter()
                .map(|r| format!("{}/{}/{}", r.gaps, r.resyncs, r.backup_rcvbuf_errors))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    println!("\nThe backup's table during the load (master's entries interpolated at each backup sample):\n");
    println!("| setup | samples | lag median entries | lag max entries | lag median ms | lag max ms | backup received / master sent | backup installed / master sent | final entries master = backup |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in Setup::ALL.into_iter().filter(|s| s.backup()) {
        let rs = by(s);
        if rs.is_empty() {
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name(),
            spread(&rs, |r| r.lag_entries.len() as f64, 0),
            spread(&rs, |r| median(&r.lag_entries), 0),
            spread(&rs, |r| max(&r.lag_entries), 0),
            spread(&rs, |r| median(&r.lag_ms), 1),
            spread(&rs, |r| max(&r.lag_ms), 1),
            spread(&rs, |r| per_flow(r.backup_received, r.records), 4),
            spread(&rs, |r| per_flow(r.backup_installed, r.records), 4),
            rs.iter()
                .map(|r| (Some(r.final_entries.0) == r.final_entries.1).to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let sys: Vec<&Run> = runs.iter().filter(|r| !r.syscalls.is_empty()).collect();
    if !sys.is_empty() {
        println!("\nSystem calls of the master's threads (perf stat, raw_syscalls:sys_enter), per new flow:\n");
        println!("| setup | datapath-0 syscalls per flow | datapath-0 futex/s | ha syscalls/s | ha futex/s |");
        println!("|---|---:|---:|---:|---:|");
        for s in Setup::ALL {
            let rs: Vec<&Run> = sys.iter().copied().filter(|r| r.setup == Some(s)).collect();
            if rs.is_empty() {
                continue;
            }
            let g = |r: &Run, n: &str| r.syscalls.get(n).copied().unwrap_or((f64::NAN, f64::NAN));
            println!(
                "| {} | {} | {} | {} | {} |",
                s.name(),
                spread(&rs, |r| g(r, "datapath-0").0 / r.sent.rate(), 2),
                spread(&rs, |r| g(r, "datapath-0").1, 0),
                spread(&rs, |r| g(r, "ha").0, 0),
                spread(&rs, |r| g(r, "ha").1, 0),
            );
        }
    }
}

fn print_ladder(runs: &[Run]) {
    if runs.is_empty() {
        return;
    }
    println!("\nThe pair at higher rates (a fresh pair per step):\n");
    println!("| target flows/s | sent flows/s | flows created / sent | lb0 tx_dropped | master CPU % | master datapath-0 % | master ha % | backup CPU % | lost | lag_records max | gaps / resyncs | lag median / max ms | final entries master = backup |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {:.0} | {:.0} | {:.4} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} / {} | {:.1} / {:.1} | {} |",
            r.target,
            r.sent.rate(),
            per_flow(r.flows, r.sent.packets),
            r.lb0_dropped,
            r.master_cpu,
            thread_pct(&r.master_threads, "datapath-0"),
            thread_pct(&r.master_threads, "ha"),
            r.backup_cpu.unwrap_or(f64::NAN),
            r.lost,
            r.lag_records_max,
            r.gaps,
            r.resyncs,
            median(&r.lag_ms),
            max(&r.lag_ms),
            Some(r.final_entries.0) == r.final_entries.1
        );
    }
}

#[test]
#[ignore = "measurement; run explicitly (see the module docs)"]
fn sync_cost_at_10k_new_flows_per_second() {
    if !need_root() || !need_tool("curl") || !need_tool("nft") {
        return;
    }
    let rate = env_f64("LB_HA_PERF_RATE", 10_000.0);
    let secs = env_f64("LB_HA_PERF_SECS", 10.0);
    let reps = env_f64("LB_HA_PERF_REPS", 3.0) as usize;
    let ladder: Vec<f64> = std::env::var("LB_HA_PERF_LADDER")
        .unwrap_or_else(|_| "20000,40000,60000,80000,100000,120000,150000".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    assert!(
        rate * secs <= f64::from(CAPACITY) * 0.8,
        "the table holds {CAPACITY}"
    );
    let tck = clk_tck();
    let mut h = HaLab::new("haperf");
    h.start_servers();
    drop_load_on_backends(&h);
    let mut runs = Vec::new();
    for rep in 1..=reps {
        for s in Setup::ALL {
            let r = run_once(&mut h, s, rep, rate, secs, tck);
            print_run(&r);
            runs.push(r);
        }
    }
    print_tables(&runs);
    let mut steps = Vec::new();
    for &target in &ladder {
        let secs = (LADDER_FLOWS / target).min(5.0);
        let r = run_once(&mut h, Setup::Pair, 0, target, secs, tck);
        print_run(&r);
        let stop = r.lost > 0 || r.sent.rate() < 0.85 * target;
        steps.push(r);
        if stop {
            break;
        }
    }
    print_ladder(&steps);
    // What the issue requires at 10 k new flows/s, checked once everything is printed.
    for r in &runs {
        assert_eq!(r.lost, 0, "rep {} {}: sync changes lost", r.rep, r.name());
        if r.setup.is_some_and(Setup::backup) {
            assert_eq!(
                Some(r.final_entries.0),
                r.final_entries.1,
                "rep {} {}: the backup's table differs from the master's",
                r.rep,
                r.name()
            );
        }
    }
}
