//! The `tun-balancer` process: TUN/TAP queues, data-path threads, health checks, signals, stats.
//!
//! Threads:
//! - one data-path thread per device queue (`balancer.queues`, multi-queue TUN when > 1). They
//!   share one [`Dataplane`] (one flow table, so both directions of every flow meet whatever queue
//!   the kernel puts them on) behind a mutex taken once per *batch* of up to 32 packets: each
//!   thread reads a batch with no lock held, processes it under the lock, and writes it back with
//!   no lock held. The system calls, which are most of a packet's cost through TUN (see
//!   `benches/results/balancer.md`), run in parallel; only the rewriting is serialised
//!   (with `balancer.io = "tun-rs"`, one thread on a device the `tun-rs` crate reads and
//!   writes, kept for comparison: `tunrs.rs`);
//! - the main thread: health checks ([`lb_health::HealthChecker`] driving [`ProbeRunner`]),
//!   SIGHUP reloads (a signal thread wakes it), SIGTERM / SIGINT shutdown, releasing the ids of
//!   removed backends whose last flow ended (every 100 ms and before each reload, so that ids
//!   are recycled), and building new [`lb_dataplane::Tables`] off the data path, installed
//!   between two batches;
//! - the statistics server, when configured: it reads the counters under the same lock, on demand.
//!
//! No unwinding: the binaries are built with `panic = "abort"` and install [`abort_on_panic`], so
//! a panic anywhere (a data-path thread holding the lock included) ends the process with SIGABRT
//! and its device disappears; an HA peer or the router takes over. The lock is a `parking_lot`
//! mutex, which has no poisoning to skip, and every batch's verdicts are computed afresh, so no
//! thread ever writes a packet under another batch's verdict.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use lb_core::{BackendId, HashKey, Instant};
use lb_health::{Action, HealthChecker};
use parking_lot::Mutex;
use rand::SeedableRng;

use crate::config::{Config, HaMode, HealthSpec, Io};
use crate::ha::{self, HaShared};
use crate::probe::ProbeRunner;
use crate::render::{
    error_json, explain_json, explain_query, to_json, to_prometheus, BackendLabel,
};
use crate::stats_server::{Format, Render, StatsServer};
use crate::sys::{set_link_up, DeviceKind, TunQueue};
use lb_dataplane::{
    ControlPlane, Dataplane, DataplaneOptions, DataplaneSpec, Reload, Stats, TableStats, Verdict,
    HEADROOM,
};
use lb_packet::gro::{coalesce_udp, Coalesced, Outgoing};
use lb_packet::offload::{Segmenter, VnetHdr, VNET_HDR_LEN};
use lb_packet::Link;

#[path = "tunrs.rs"]
mod tunrs;

/// State shared between the control thread, the data-path threads and the stats server.
struct Shared {
    stop: AtomicBool,
    epoch: StdInstant,
    dp: Mutex<Dataplane>,
    labels: Mutex<Vec<BackendLabel>>,
    tx_errors: AtomicU64,
    /// UDP super-packets written by coalescing, and the datagrams merged into them.
    udp_coalesced: AtomicU64,
    udp_coalesced_datagrams: AtomicU64,
    /// The data-path threads' use of the shared table's lock, summed over threads.
    lock: LockTotals,
    /// Reloads applied, and rejected (the running configuration kept).
    reloads: AtomicU64,
    reloads_rejected: AtomicU64,
    /// The pair's state (roles, data-path kicks); `has_ha`: an `[ha]` section is configured.
    ha: HaShared,
    has_ha: bool,
    /// [`RunOptions::test_panic_after`], and the packets processed so far when it is set.
    test_panic_after: Option<u64>,
    test_processed: AtomicU64,
}

/// How the data-path threads use the lock around the shared [`Dataplane`], summed over threads:
/// times it was taken, nanoseconds spent waiting for it and holding it (wall time, measured
/// with the monotonic clock around each batch). Their ratio to the threads' CPU time is the
/// serial share that bounds how far more queues can scale (`scripts/compare.sh` reports it).
#[derive(Default)]
struct LockTotals {
    taken: AtomicU64,
    wait_ns: AtomicU64,
    held_ns: AtomicU64,
}

/// One data-path thread's lock times since its last flush into [`LockTotals`] (flushed at each
/// housekeeping round, every 10 ms, so that the threads do not share a counter line per batch).
#[derive(Default)]
struct LockClock {
    taken: u64,
    wait_ns: u64,
    held_ns: u64,
}

impl LockClock {
    /// Adds one use of the lock: asked for at `asked`, got at `got`, released at `released`.
    fn add(&mut self, asked: StdInstant, got: StdInstant, released: StdInstant) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.taken += 1;
        self.wait_ns = self.wait_ns.saturating_add(ns(got.duration_since(asked)));
        self.held_ns = self
            .held_ns
            .saturating_add(ns(released.duration_since(got)));
    }

    /// Moves the counts into the shared totals.
    fn flush(&mut self, to: &LockTotals) {
        if self.taken > 0 {
            to.taken.fetch_add(self.taken, Ordering::Relaxed);
            to.wait_ns.fetch_add(self.wait_ns, Ordering::Relaxed);
            to.held_ns.fetch_add(self.held_ns, Ordering::Relaxed);
            *self = LockClock::default();
        }
    }
}

impl Shared {
    /// Counts what a coalescing pass merged.
    fn coalesced(&self, c: Coalesced) {
        if c.super_packets > 0 {
            self.udp_coalesced
                .fetch_add(u64::from(c.super_packets), Ordering::Relaxed);
            self.udp_coalesced_datagrams
                .fetch_add(u64::from(c.datagrams), Ordering::Relaxed);
        }
    }

    fn render(&self, f: Format) -> String {
        let t_now = now(self.epoch);
        if let Format::Explain(q) = &f {
            return match explain_query(q) {
                Ok(key) => {
                    let dp = self.dp.lock();
                    let e = dp.explain(&key, t_now);
                    explain_json(&e, &dp.tables().backends)
                }
                Err(e) => error_json(&e),
            };
        }
        let mut labels = self.labels.lock().clone();
        let (s, t, splice): (Stats, TableStats, _) = {
            let dp = self.dp.lock();
            for l in &mut labels {
                l.load = dp.backend_load(BackendId(l.id), t_now);
            }
            (dp.stats().clone(), dp.table_stats(), dp.splice_stats())
        };
        let (reloads, rejected) = (
            self.reloads.load(Ordering::Relaxed),
            self.reloads_rejected.load(Ordering::Relaxed),
        );
        let (coalesced, coalesced_datagrams) = (
            self.udp_coalesced.load(Ordering::Relaxed),
            self.udp_coalesced_datagrams.load(Ordering::Relaxed),
        );
        let (lock_taken, lock_wait_ns, lock_held_ns) = (
            self.lock.taken.load(Ordering::Relaxed),
            self.lock.wait_ns.load(Ordering::Relaxed),
            self.lock.held_ns.load(Ordering::Relaxed),
        );
        match f {
            Format::Explain(_) => String::new(),
            Format::Json => {
                let j = to_json(&s, &t, &labels);
                match serde_json::from_str::<serde_json::Value>(&j) {
                    Ok(mut v) => {
                        v["reloads"] =
                            serde_json::json!({ "applied": reloads, "rejected": rejected });
                        for (k, x) in splice.pairs() {
                            v["splice"][k] = x.into();
                        }
                        v["offload"]["udp_coalesced"] = coalesced.into();
                        v["offload"]["udp_coalesced_datagrams"] = coalesced_datagrams.into();
                        v["datapath"] = serde_json::json!({
                            "lock_taken": lock_taken,
                            "lock_wait_ns": lock_wait_ns,
                            "lock_held_ns": lock_held_ns,
                        });
                        if self.has_ha {
                            v["ha"] = self.ha.json();
                        }
                        v.to_string()
                    }
                    Err(_) => j,
                }
            }
            Format::Prometheus => {
                let mut o = to_prometheus(&s, &t, &labels);
                if self.has_ha {
                    o.push_str(&self.ha.prometheus());
                }
                o.push_str(&format!(
                    "# HELP lb_reloads_total Configuration reloads applied.\n# TYPE lb_reloads_total counter\nlb_reloads_total {reloads}\n\
                     # HELP lb_reloads_rejected_total Configuration reloads rejected (the running one kept).\n# TYPE lb_reloads_rejected_total counter\nlb_reloads_rejected_total {rejected}\n"
                ));
                o.push_str(&format!(
                    "# HELP lb_tx_errors_total Writes to the device that failed.\n# TYPE lb_tx_errors_total counter\nlb_tx_errors_total {}\n",
                    self.tx_errors.load(Ordering::Relaxed)
                ));
                o.push_str(&format!(
                    "# HELP lb_udp_coalesced_total UDP GSO super-packets written by coalescing a batch's datagrams.\n# TYPE lb_udp_coalesced_total counter\nlb_udp_coalesced_total {coalesced}\n\
                     # HELP lb_udp_coalesced_datagrams_total Datagrams merged into those super-packets.\n# TYPE lb_udp_coalesced_datagrams_total counter\nlb_udp_coalesced_datagrams_total {coalesced_datagrams}\n"
                ));
                let secs = |ns: u64| ns as f64 / 1e9;
                o.push_str(&format!(
                    "# HELP lb_datapath_lock_taken_total Times the data-path threads took the shared table's lock.\n# TYPE lb_datapath_lock_taken_total counter\nlb_datapath_lock_taken_total {lock_taken}\n\
                     # HELP lb_datapath_lock_wait_seconds_total Time the data-path threads waited for that lock.\n# TYPE lb_datapath_lock_wait_seconds_total counter\nlb_datapath_lock_wait_seconds_total {}\n\
                     # HELP lb_datapath_lock_held_seconds_total Time the data-path threads held that lock.\n# TYPE lb_datapath_lock_held_seconds_total counter\nlb_datapath_lock_held_seconds_total {}\n",
                    secs(lock_wait_ns),
                    secs(lock_held_ns)
                ));
                // The splice path's counters (the same names as in the JSON's "splice").
                for (k, x) in splice.pairs() {
                    let (name, kind) = if k == "active" {
                        ("lb_splice_active".to_owned(), "gauge")
                    } else {
                        (format!("lb_splice_{k}_total"), "counter")
                    };
                    o.push_str(&format!(
                        "# HELP {name} Splice: {k}.\n# TYPE {name} {kind}\n{name} {x}\n"
                    ));
                }
                o
            }
        }
    }
}

fn labels(cp: &ControlPlane) -> Vec<BackendLabel> {
    cp.backends()
        .map(|b| BackendLabel {
            id: b.id.get(),
            addr: b.addr.to_string(),
            service: format!("{} {}", b.proto, b.vip),
            live: b.live,
            healthy: b.healthy,
            load: None,
        })
        .collect()
}

/// `N` bytes from the operating system's random number generator (`getrandom(2)` on Linux).
///
/// # Errors
/// The generator cannot be read: a start-up error, never a silent all-zero key.
fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    random_bytes_from(getrandom::fill)
}

/// `N` bytes from `fill`; its failure is an error naming the generator.
fn random_bytes_from<const N: usize, E: std::fmt::Display>(
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    fill(&mut b).map_err(|e| format!("cannot read the OS random number generator: {e}"))?;
    Ok(b)
}

/// Options of a run that are not in the configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Test hook, for the end-to-end test of "a panic ends the process": once this many packets
    /// have been processed, the data-path thread that processes the next batch panics while it
    /// holds the data path's lock, after rewriting the batch and before writing any of it. The
    /// `tun-balancer` binary sets it from `LB_TEST_PANIC_AFTER` in debug builds only.
    pub test_panic_after: Option<u64>,
}

/// Makes every panic end the process (SIGABRT) after the usual message, whatever the build's
/// panic strategy: Cargo builds the binaries that integration tests run with unwinding, and an
/// unwinding data-path thread would leave the others running on a half-updated data path.
/// Call it first thing in `main`.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

/// Monotonic time since process start, as the libraries want it.
fn now(epoch: StdInstant) -> Instant {
    at(epoch, StdInstant::now())
}

/// `t` as the libraries' time since process start.
fn at(epoch: StdInstant, t: StdInstant) -> Instant {
    Instant::from_nanos(u64::try_from(t.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX))
}

/// Runs the balancer until SIGTERM / SIGINT. Returns an error message for a fatal start-up error.
///
/// # Errors
/// The configuration is invalid, the device cannot be opened, or the stats port cannot be bound.
pub fn run(config_path: &Path, options: &RunOptions) -> Result<(), String> {
    let cfg = Config::load(config_path).map_err(|e| e.to_string())?;
    let key = match (cfg.hash_key, &cfg.ha) {
        (Some(k), _) => k,
        // The pair must agree on every hash (Maglev, SIP Call-IDs): key them by the secret.
        (None, Some(ha)) => ha.auth_key.derive("flow-hash"),
        (None, None) => {
            tracing::warn!(
                "no balancer.hash_key: flows are hashed under a random key, so other balancers \
                 (and this one after a restart) will place them differently"
            );
            HashKey::from_bytes(random_bytes()?)
        }
    };
    let mut cp = ControlPlane::new(cfg.dataplane.clone(), key).map_err(|e| e.to_string())?;
    let tables = cp.build().map_err(|e| e.to_string())?;
    let kind = if cfg.needs_tap() {
        DeviceKind::Tap
    } else {
        DeviceKind::Tun
    };
    // This crate's queues, or (`balancer.io = "tun-rs"`) one device opened by tun-rs.
    let (queues, tunrs_dev) =
        match cfg.io {
            Io::Direct => (
                TunQueue::open_queues(&cfg.device, kind, cfg.queues, cfg.offload)
                    .map_err(|e| format!("cannot open {kind:?} device {}: {e}", cfg.device))?,
                None,
            ),
            Io::TunRs => (
                Vec::new(),
                Some(tunrs::open(&cfg.device, cfg.offload).map_err(|e| {
                    format!("cannot open TUN device {} with tun-rs: {e}", cfg.device)
                })?),
            ),
        };
    let threads = queues.len() + usize::from(tunrs_dev.is_some());
    // UDP coalescing writes UDP GSO super-packets: a device whose kernel took the USO
    // offloads.
    let coalesce = cfg.udp_coalesce && queues.first().is_some_and(|q| q.vnet() && q.uso());
    set_link_up(&cfg.device).map_err(|e| format!("cannot set {} up: {e}", cfg.device))?;
    tracing::info!(
        device = %cfg.device, ?kind, queues = threads, io = ?cfg.io, services = cfg.dataplane.services.len(),
        offload = cfg.offload, uso = queues.first().is_some_and(TunQueue::uso), io_uring = cfg.io_uring,
        udp_coalesce = coalesce,
        "tun-balancer started"
    );
    let link = if kind == DeviceKind::Tap {
        Link::Ethernet
    } else {
        Link::Ip
    };
    // The data path's clock: `Instant::ZERO` is now. Its wall-clock reading starts the TCP
    // timestamps of spliced backend connections (`clock_base_ms`), so that they keep growing
    // across a restart of this balancer and across a takeover by its peer.
    let epoch = StdInstant::now();
    let clock_base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let opts = DataplaneOptions {
        link,
        key,
        // Fresh per process: the schedulers' randomness and where the SNAT pools start.
        seed: u64::from_le_bytes(random_bytes()?),
        snat_ports: cfg.dataplane.snat_ports.clone(),
        removal_log: 0,
        sync_log: if cfg.ha.is_some() { ha::SYNC_LOG } else { 0 },
        clock_base_ms,
        // Room for every queue thread's bursts several times over between two of its locks.
        fast_path_room: lb_dataplane::FAST_PATH_ROOM.max(4 * BATCH * threads),
    };
    let dp = Dataplane::new(&cfg.dataplane, tables, opts).map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        epoch,
        dp: Mutex::new(dp),
        labels: Mutex::new(labels(&cp)),
        tx_errors: AtomicU64::new(0),
        udp_coalesced: AtomicU64::new(0),
        udp_coalesced_datagrams: AtomicU64::new(0),
        lock: LockTotals::default(),
        reloads: AtomicU64::new(0),
        reloads_rejected: AtomicU64::new(0),
        ha: HaShared::new(threads),
        has_ha: cfg.ha.is_some(),
        test_panic_after: options.test_panic_after,
        test_processed: AtomicU64::new(0),
    });
    let stats_server = match cfg.stats {
        Some(addr) => {
            let sh = shared.clone();
            let render: Render = Arc::new(move |f| sh.render(f));
            let stop = Arc::new(AtomicBool::new(false));
            let s = StatsServer::start(addr, render, stop.clone())
                .map_err(|e| format!("cannot serve stats on {addr}: {e}"))?;
            tracing::info!(addr = %s.local_addr(), "serving stats (JSON on /, Prometheus on /metrics)");
            Some((s, stop))
        }
        None => None,
    };
    let mut workers = Vec::new();
    for (i, q) in queues.into_iter().enumerate() {
        let sh = shared.clone();
        let io_uring = cfg.io_uring;
        if io_uring {
            // Fail at start, not in the thread, if io_uring cannot be set up here.
            crate::uring::UringTx::new().map_err(|e| format!("io_uring: {e}"))?;
        }
        let opts = QueueOpts {
            io_uring,
            coalesce,
            fast_path: cfg.fast_path,
        };
        let h = std::thread::Builder::new()
            .name(format!("datapath-{i}"))
            .spawn(move || datapath(i, q, &sh, epoch, link, opts))
            .map_err(|e| e.to_string())?;
        workers.push(h);
    }
    if let Some(dev) = tunrs_dev {
        let sh = shared.clone();
        let mtu = usize::from(cfg.dataplane.mtu);
        let h = std::thread::Builder::new()
            .name("datapath-0".into())
            .spawn(move || tunrs::datapath(dev, &sh, epoch, mtu))
            .map_err(|e| e.to_string())?;
        workers.push(h);
    }
    let ha_thread = match cfg.ha.clone() {
        Some(hc) => {
            let sh = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("ha".into())
                    .spawn(move || {
                        if let Err(e) = ha::run(&hc, &sh.dp, &sh.ha, &sh.stop, epoch) {
                            tracing::error!("ha: {e}");
                            // A pair member that cannot take part must not run alone.
                            sh.stop.store(true, Ordering::Release);
                        }
                    })
                    .map_err(|e| e.to_string())?,
            )
        }
        None => None,
    };
    let result = control(config_path, cfg, &mut cp, &shared, epoch);
    shared.stop.store(true, Ordering::Release);
    if let Some(h) = ha_thread {
        let _ = h.join();
    }
    for w in workers {
        let _ = w.join();
    }
    let (s, t) = {
        let dp = shared.dp.lock();
        (dp.stats().clone(), dp.table_stats())
    };
    tracing::info!(
        rx = s.rx_packets,
        forwarded = s.forwarded,
        dropped = s.dropped(),
        flows = t.entries,
        "tun-balancer stopped"
    );
    if let Some((s, stop)) = stats_server {
        stop.store(true, Ordering::Release);
        s.join();
    }
    result
}

/// Packets read per batch (one lock of the shared data path per batch).
const BATCH: usize = 32;

/// Room for the largest packet or frame a TUN/TAP device hands out, GSO super-packets and a
/// TAP frame's Ethernet header included.
const MAX_PACKET: usize = 65_536 + 64;

/// How a data-path thread uses its queue (from `balancer.*`).
#[derive(Debug, Clone, Copy)]
struct QueueOpts {
    /// Write each batch with one io_uring submission.
    io_uring: bool,
    /// Merge each batch's runs of one flow's UDP datagrams.
    coalesce: bool,
    /// Plans of the fast path (0: none).
    fast_path: usize,
}

/// One data-path thread: read a batch, forward what the fast path can without the lock and
/// the rest under it, write it, until told to stop.
fn datapath(
    i: usize,
    mut q: TunQueue,
    sh: &Shared,
    epoch: StdInstant,
    link: Link,
    opts: QueueOpts,
) {
    let QueueOpts {
        io_uring,
        coalesce,
        fast_path,
    } = opts;
    // (Checked at start: it worked then.)
    let mut uring = io_uring
        .then(crate::uring::UringTx::new)
        .and_then(Result::ok);
    // Buffers for one batch, allocated once: headroom + the largest packet a device hands out.
    // With offloads on, each read puts the virtio-net header in the last bytes of the headroom,
    // right before the packet.
    let mut bufs: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| vec![0u8; HEADROOM + MAX_PACKET])
        .collect();
    let mut lens = [0usize; BATCH];
    let mut hdrs = [VnetHdr::NONE; BATCH];
    let mut verdicts = [Verdict::Drop(lb_dataplane::DropReason::NoService); BATCH];
    // What each packet of the batch writes (after UDP coalescing, if on).
    let mut outs: [Option<Outgoing>; BATCH] = [None; BATCH];
    // Super-packets the data path asks to cut (tunnel mode, SIP) are cut into these, once
    // allocated.
    let mut cut = Cutter {
        coalesce,
        fast_path,
        ..Cutter::default()
    };
    let vnet = q.vnet();
    let pre = if vnet { VNET_HDR_LEN } else { 0 };
    let mut last_housekeeping = StdInstant::now();
    let mut tx = Tx::default();
    // Packets the splice timers originate (`Dataplane::splice_poll`), one at a time.
    let mut emit = vec![0u8; 2048];
    let mut full = false;
    let mut lock = LockClock::default();
    // Parsing, finding the service and hashing happen on this thread before the lock
    // (`Classifier`): less serial time per packet when queues share the data path.
    let mut cl = sh.dp.lock().classifier(BATCH);
    // The packets of established flows that the data path forwarded before are forwarded
    // again from this thread's plans, without the lock (`Classifier::forward_cached`).
    if fast_path > 0 {
        cl.enable_fast_path(fast_path);
    }
    while !sh.stop.load(Ordering::Acquire) {
        sh.ha.kick(i, crate::ha::mono_ms(epoch));
        // After a full batch more is probably queued: read again without waiting in poll.
        if !full {
            if let Err(e) = q.wait_readable(100) {
                tracing::error!(queue = i, "poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        // Read what is queued (the fd is non-blocking), up to a batch.
        let mut n = 0;
        while n < BATCH {
            match q.recv(&mut bufs[n][HEADROOM - pre..]) {
                Ok(len) => {
                    (hdrs[n], lens[n]) = if vnet {
                        match VnetHdr::decode(&bufs[n][HEADROOM - pre..HEADROOM]) {
                            Ok(h) if len >= pre => (h, len - pre),
                            // A header this build cannot read: an empty packet, which the data
                            // path counts as malformed.
                            _ => (VnetHdr::NONE, 0),
                        }
                    } else {
                        (VnetHdr::NONE, len)
                    };
                    n += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(queue = i, "read failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
        full = n == BATCH;
        cl.classify(&bufs[..n], HEADROOM, &lens[..n]);
        let asked = StdInstant::now();
        let housekeeping = asked.duration_since(last_housekeeping) >= Duration::from_millis(10);
        if n == 0 && !housekeeping {
            continue;
        }
        // This batch's verdicts only: whatever happens below, no packet goes out under a verdict
        // left from an earlier batch.
        verdicts[..n].fill(Verdict::Drop(lb_dataplane::DropReason::NoService));
        // The fast path first; the lock only for what it left (and, every 10 ms, to hand back
        // what it forwarded and keep house).
        let left = if fast_path > 0 && n > 0 {
            let hdrs = if vnet { Some(&mut hdrs[..n]) } else { None };
            cl.forward_cached(
                &mut bufs[..n],
                &lens[..n],
                hdrs,
                at(epoch, asked),
                &mut verdicts[..n],
            )
        } else {
            n
        };
        if left > 0 || housekeeping {
            let asked = StdInstant::now();
            let mut dp = sh.dp.lock();
            let got = StdInstant::now();
            let t = at(epoch, got);
            if housekeeping {
                // What the fast path forwarded among cut segments reaches the counters too
                // (first: those segments came before this burst).
                cut.hand_back(&mut dp, t);
            }
            let hdrs = if vnet { Some(&mut hdrs[..n]) } else { None };
            dp.process_batch_classified(
                &mut cl,
                &mut bufs[..n],
                &lens[..n],
                hdrs,
                t,
                &mut verdicts[..n],
            );
            if let Some(limit) = sh.test_panic_after {
                let before = sh.test_processed.fetch_add(n as u64, Ordering::Relaxed);
                if before + n as u64 > limit {
                    panic!("LB_TEST_PANIC_AFTER={limit}: panicking in data-path thread {i} with the lock held");
                }
            }
            if housekeeping {
                dp.housekeeping(t, 1024);
                while let Some(len) = dp.splice_poll(&mut emit, t) {
                    tx.send(&mut q, vnet, &VnetHdr::NONE, &emit[..len], sh, i);
                }
                log_events(&mut dp, t);
            }
            drop(dp);
            let released = StdInstant::now();
            lock.add(asked, got, released);
            if housekeeping {
                last_housekeeping = released;
                lock.flush(&sh.lock);
            }
        }
        if sh.has_ha
            && verdicts[..n]
                .iter()
                .any(|v| matches!(v, Verdict::Forward { .. }))
        {
            sh.ha.forwarded();
        }
        for k in 0..n {
            outs[k] = match verdicts[k] {
                Verdict::Forward { start, len } | Verdict::Reply { start, len } => Some(Outgoing {
                    start,
                    len,
                    hdr: hdrs[k],
                }),
                _ => None,
            };
        }
        if coalesce {
            sh.coalesced(coalesce_runs(
                &mut bufs[..n],
                &mut outs[..n],
                &verdicts[..n],
                link,
            ));
        }
        // Through io_uring: each run of forwarded packets between two super-packets to cut in
        // one submission, in the batch's order (the cut segments go the same way, below).
        let mut run = 0;
        for k in 0..n {
            if let Some(u) = uring.as_mut() {
                if matches!(verdicts[k], Verdict::Segment) || k + 1 == n {
                    let end = if matches!(verdicts[k], Verdict::Segment) {
                        k
                    } else {
                        n
                    };
                    let out = to_write(&outs[run..end], &bufs[run..end]);
                    tx.submitted(u.write_all(q.raw_fd(), vnet, out), sh, i);
                    run = k + 1;
                }
            }
            match verdicts[k] {
                Verdict::Forward { .. } | Verdict::Reply { .. } => {
                    // Merged into an earlier packet's super-packet, or written through io_uring.
                    if let (Some(o), None) = (outs[k], uring.as_ref()) {
                        tx.send(
                            &mut q,
                            vnet,
                            &o.hdr,
                            &bufs[k][o.start..o.start + o.len],
                            sh,
                            i,
                        );
                    }
                }
                Verdict::Segment => {
                    let pkt = &bufs[k][HEADROOM..HEADROOM + lens[k]];
                    cut.run(
                        pkt,
                        &hdrs[k],
                        link,
                        &mut q,
                        &mut tx,
                        uring.as_mut(),
                        sh,
                        epoch,
                        i,
                        &mut lock,
                    );
                }
                Verdict::Drop(reason) => {
                    tracing::trace!(queue = i, reason = reason.name(), "drop");
                }
                _ => {}
            }
        }
    }
    if fast_path > 0 {
        // What the fast path forwarded since the last lock reaches the counters.
        cl.classify(&bufs[..0], HEADROOM, &[]);
        let t = at(epoch, StdInstant::now());
        let mut dp = sh.dp.lock();
        dp.process_batch_classified(&mut cl, &mut bufs[..0], &[], None, t, &mut []);
        cut.hand_back(&mut dp, t);
    }
    lock.flush(&sh.lock);
}

/// [`coalesce_udp`] on each run of the batch between two super-packets to cut
/// ([`Verdict::Segment`]), so that no datagram after a cut super-packet merges into a group
/// written before it (the cut segments are written at the super-packet's place in the batch).
fn coalesce_runs<B: AsRef<[u8]> + AsMut<[u8]>>(
    bufs: &mut [B],
    outs: &mut [Option<Outgoing>],
    verdicts: &[Verdict],
    link: Link,
) -> Coalesced {
    let n = bufs.len().min(outs.len()).min(verdicts.len());
    let mut total = Coalesced::default();
    let mut from = 0;
    for k in 0..=n {
        if k == n || matches!(verdicts[k], Verdict::Segment) {
            if k > from {
                let c = coalesce_udp(&mut bufs[from..k], &mut outs[from..k], link);
                total.super_packets += c.super_packets;
                total.datagrams += c.datagrams;
            }
            from = k + 1;
        }
    }
    total
}

/// The packets of a batch (or a burst of cut segments) to write, in order, each with its
/// virtio-net header: the io_uring submissions' input.
fn to_write<'a>(
    outs: &'a [Option<Outgoing>],
    bufs: &'a [Vec<u8>],
) -> impl Iterator<Item = (&'a VnetHdr, &'a [u8])> + 'a {
    outs.iter().zip(bufs).filter_map(|(o, b)| {
        let o = o.as_ref()?;
        Some((&o.hdr, b.get(o.start..o.start + o.len)?))
    })
}

/// Logs what the data path's outlier detection did since the last call.
fn log_events(dp: &mut Dataplane, t: Instant) {
    while let Some(e) = dp.poll_event() {
        match e {
            lb_dataplane::LoadEvent::Ejected {
                backend,
                until,
                count,
            } => tracing::warn!(
                backend = backend.get(),
                ejections = count,
                for_ms = (until - t).as_millis(),
                "outlier ejected: the data path saw it fail"
            ),
            lb_dataplane::LoadEvent::Returned { backend } => {
                tracing::info!(backend = backend.get(), "outlier back in rotation")
            }
            _ => {}
        }
    }
}

/// The write side of a data-path thread: counts and logs (sparsely) failed writes.
#[derive(Default)]
struct Tx {
    errors: u64,
}

impl Tx {
    /// Writes one packet, with its virtio-net header when the device has offloads on.
    fn send(
        &mut self,
        q: &mut TunQueue,
        vnet: bool,
        hdr: &VnetHdr,
        pkt: &[u8],
        sh: &Shared,
        i: usize,
    ) {
        let r = if vnet {
            let mut h = [0u8; VNET_HDR_LEN];
            let _ = hdr.encode(&mut h);
            q.send_vnet(&h, pkt)
        } else {
            q.send(pkt)
        };
        if let Err(e) = r {
            self.errors += 1;
            sh.tx_errors.fetch_add(1, Ordering::Relaxed);
            if self.errors.is_power_of_two() {
                tracing::warn!(queue = i, errors = self.errors, "write failed: {e}");
            }
        }
    }

    /// Counts what an io_uring submission reports.
    fn submitted(&mut self, r: std::io::Result<crate::uring::Written>, sh: &Shared, i: usize) {
        match r {
            Ok(w) if w.failed > 0 => self.failed(w.failed, w.last_error, sh, i),
            Ok(_) => {}
            Err(e) => self.failed(1, e.raw_os_error().unwrap_or(0), sh, i),
        }
    }

    /// `n` writes failed, the last with `errno` (an io_uring batch).
    fn failed(&mut self, n: u64, errno: i32, sh: &Shared, i: usize) {
        let before = self.errors;
        self.errors += n;
        sh.tx_errors.fetch_add(n, Ordering::Relaxed);
        if self.errors.next_power_of_two() != before.next_power_of_two() || before == 0 {
            let e = std::io::Error::from_raw_os_error(errno);
            tracing::warn!(queue = i, errors = self.errors, "write failed: {e}");
        }
    }
}

/// Cuts GSO super-packets the data path cannot forward whole ([`Verdict::Segment`]) into
/// plain packets, processes those in bursts and writes them. With `coalesce`, what the data
/// path made of them is coalesced again where it is UDP (a GUE tunnel's outer datagrams, a SIP
/// stream's datagrams): the kernel then cuts the outer UDP payloads, each the encapsulation of
/// one segment, as the user-space cut made them.
#[derive(Default)]
struct Cutter {
    /// Classifies the segments before the lock, as the data-path thread does its bursts.
    cl: Option<lb_dataplane::Classifier>,
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    verdicts: Vec<Verdict>,
    outs: Vec<Option<Outgoing>>,
    coalesce: bool,
    /// Plans of the segments' classifier (`balancer.fast_path`; 0: none): a cut segment of
    /// an established flow (tunnel mode's TCP with offloads) goes without the lock too.
    fast_path: usize,
}

impl Cutter {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        pkt: &[u8],
        hdr: &VnetHdr,
        link: Link,
        q: &mut TunQueue,
        tx: &mut Tx,
        mut uring: Option<&mut crate::uring::UringTx>,
        sh: &Shared,
        epoch: StdInstant,
        i: usize,
        lock: &mut LockClock,
    ) {
        if self.bufs.is_empty() {
            self.bufs = (0..BATCH)
                .map(|_| vec![0u8; HEADROOM + MAX_PACKET])
                .collect();
            self.lens = vec![0; BATCH];
            self.verdicts = vec![Verdict::Drop(lb_dataplane::DropReason::NoService); BATCH];
            self.outs = vec![None; BATCH];
        }
        let fast_path = self.fast_path;
        let cl = self.cl.get_or_insert_with(|| {
            let mut cl = sh.dp.lock().classifier(BATCH);
            if fast_path > 0 {
                cl.enable_fast_path(fast_path);
            }
            cl
        });
        let Ok(p) = lb_packet::parse(pkt, link) else {
            return;
        };
        let Ok(mut seg) = Segmenter::new(pkt, &p, hdr) else {
            return;
        };
        loop {
            let mut m = 0;
            while m < BATCH {
                match seg.next_into(pkt, &mut self.bufs[m][HEADROOM..]) {
                    Ok(Some(len)) => {
                        self.lens[m] = len;
                        m += 1;
                    }
                    _ => break,
                }
            }
            if m == 0 {
                return;
            }
            self.verdicts[..m].fill(Verdict::Drop(lb_dataplane::DropReason::NoService));
            cl.classify(&self.bufs[..m], HEADROOM, &self.lens[..m]);
            let asked = StdInstant::now();
            // The segments of established flows by this classifier's plans first (what they
            // did is handed back at the next lock: below, or the queue's housekeeping).
            let left = if self.fast_path > 0 {
                cl.forward_cached(
                    &mut self.bufs[..m],
                    &self.lens[..m],
                    None,
                    at(epoch, asked),
                    &mut self.verdicts[..m],
                )
            } else {
                m
            };
            if left > 0 {
                let got;
                {
                    let mut dp = sh.dp.lock();
                    got = StdInstant::now();
                    dp.process_batch_classified(
                        cl,
                        &mut self.bufs[..m],
                        &self.lens[..m],
                        None,
                        at(epoch, got),
                        &mut self.verdicts[..m],
                    );
                }
                // Counted with the thread's other holds (the cut segments are tunnel mode's
                // main path with offloads on).
                lock.add(asked, got, StdInstant::now());
            }
            for k in 0..m {
                self.outs[k] = match self.verdicts[k] {
                    Verdict::Forward { start, len } | Verdict::Reply { start, len } => {
                        Some(Outgoing {
                            start,
                            len,
                            hdr: VnetHdr::NONE,
                        })
                    }
                    _ => None,
                };
            }
            if self.coalesce {
                sh.coalesced(coalesce_udp(&mut self.bufs[..m], &mut self.outs[..m], link));
            }
            if let Some(u) = uring.as_deref_mut() {
                // The burst's segments in one submission (IPIP has no GSO: one write each
                // otherwise).
                let out = to_write(&self.outs[..m], &self.bufs[..m]);
                tx.submitted(u.write_all(q.raw_fd(), q.vnet(), out), sh, i);
                if m < BATCH {
                    return;
                }
                continue;
            }
            for k in 0..m {
                if let Some(o) = self.outs[k] {
                    tx.send(
                        q,
                        q.vnet(),
                        &o.hdr,
                        &self.bufs[k][o.start..o.start + o.len],
                        sh,
                        i,
                    );
                }
            }
            if m < BATCH {
                return;
            }
        }
    }
}

impl Cutter {
    /// Hands back what the segments' fast path forwarded since the segments last took the
    /// lock (`dp` held by the caller).
    fn hand_back(&mut self, dp: &mut lb_dataplane::Dataplane, now: Instant) {
        if let Some(cl) = self.cl.as_mut().filter(|c| c.has_fast_path()) {
            cl.classify(&self.bufs[..0], HEADROOM, &[]);
            dp.process_batch_classified(cl, &mut self.bufs[..0], &[], None, now, &mut []);
        }
    }
}

/// Where a health probe for a backend goes.
fn probe_target(b: &lb_dataplane::BackendInfo, h: &HealthSpec) -> std::net::SocketAddr {
    let mut a = b.addr;
    if let Some(p) = h.port {
        a.set_port(p);
    }
    a
}

/// The health checks of the configuration in force: backend → (probe target, check spec).
fn register_checks(
    cfg: &Config,
    cp: &ControlPlane,
    checker: &mut HealthChecker,
    targets: &mut HashMap<BackendId, (std::net::SocketAddr, HealthSpec)>,
    now: Instant,
) {
    let mut wanted = HashMap::new();
    for (svc, h) in cfg.dataplane.services.iter().zip(&cfg.health) {
        if h.check_config().is_none() {
            continue;
        }
        for b in &svc.backends {
            if let Some(info) = cp
                .backend_id(svc.vip, svc.proto, b.addr)
                .and_then(|id| cp.backend(id))
            {
                wanted.insert(info.id, (probe_target(info, h), h.clone()));
            }
        }
    }
    // Drop checks of removed backends and of changed checks; add the new ones.
    let old: Vec<BackendId> = targets.keys().copied().collect();
    for id in old {
        let keep = match (targets.get(&id), wanted.get(&id)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if !keep {
            checker.remove(id);
            targets.remove(&id);
        }
    }
    for (id, (addr, h)) in wanted {
        if targets.contains_key(&id) {
            continue;
        }
        if let Some(cc) = h.check_config() {
            match checker.add(id, cc, now) {
                Ok(()) => {
                    targets.insert(id, (addr, h));
                }
                Err(e) => tracing::warn!(backend = %addr, "cannot check: {e}"),
            }
        }
    }
}

/// The control loop on the main thread.
fn control(
    config_path: &Path,
    mut cfg: Config,
    cp: &mut ControlPlane,
    sh: &Shared,
    epoch: StdInstant,
) -> Result<(), String> {
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).map_err(|e| e.to_string())?;
    }
    let mut checker = HealthChecker::new();
    let mut targets = HashMap::new();
    let runner = ProbeRunner::new();
    // SIGHUP sets the flag and wakes the loop, which may be waiting for probe results.
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .map_err(|e| e.to_string())?;
    let sighup = signals.handle();
    let (waker, flag) = (runner.waker(), hup.clone());
    let sighup_thread = std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                flag.store(true, Ordering::Release);
                waker.wake();
            }
        })
        .map_err(|e| e.to_string())?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);
    // Set up with the data paths, from the configuration they started with.
    let slots = splice_slots(&cfg.dataplane);
    register_checks(&cfg, cp, &mut checker, &mut targets, now(epoch));
    let mut last_release = StdInstant::now();
    // A reloaded configuration's spliced services, waiting for its tables.
    let mut splice_spec: Option<lb_dataplane::DataplaneSpec> = None;
    while !term.load(Ordering::Acquire) {
        let mut dirty = false;
        let mut reloaded = None;
        let hup_now = hup.swap(false, Ordering::AcqRel);
        // Removed backends whose last flow ended: their ids (and SNAT pools, counters) are
        // freed for the next new backends; before a reload too, so that it can reuse them.
        if hup_now || last_release.elapsed() >= RELEASE_EVERY {
            last_release = StdInstant::now();
            let freed = sh.dp.lock().release_retired();
            if !freed.is_empty() {
                let n = cp.release(&freed);
                tracing::debug!(
                    released = n,
                    in_use = cp.ids_in_use(),
                    "backend ids released"
                );
                dirty |= n > 0;
            }
        }
        if hup_now {
            match reload(config_path, &cfg, slots, cp) {
                Ok((new, r)) => {
                    cfg = new;
                    // Installed with the tables it goes with, below.
                    splice_spec = Some(cfg.dataplane.clone());
                    register_checks(&cfg, cp, &mut checker, &mut targets, now(epoch));
                    dirty = true;
                    reloaded = Some(r);
                }
                Err(e) => {
                    sh.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("reload rejected, keeping the running configuration: {e}")
                }
            }
        }
        let t = now(epoch);
        while let Some(action) = checker.poll(t, &mut rng) {
            match action {
                Action::Probe(p) => {
                    if let Some((addr, h)) = targets.get(&p.backend) {
                        runner.start(p.backend, p.token, p.kind, *addr, h.timeout);
                    }
                }
                Action::Transition(tr) => {
                    dirty |= transition(cp, &targets, tr.backend, tr.to.is_serving())
                }
            }
        }
        // New tables to build (a reload, released ids): no waiting for probe results first.
        let wait = if dirty {
            Duration::ZERO
        } else {
            checker
                .next_deadline()
                .map_or(CONTROL_TICK, |d| d.saturating_duration_since(now(epoch)))
                .min(CONTROL_TICK)
        };
        if let Some(res) = runner.next(wait) {
            if let Some(tr) = checker.on_result(res.backend, res.token, res.outcome, now(epoch)) {
                dirty |= transition(cp, &targets, tr.backend, tr.to.is_serving());
            }
        }
        if dirty {
            match cp.build() {
                Ok(t) => {
                    *sh.labels.lock() = labels(cp);
                    let mut dp = sh.dp.lock();
                    if let Some(spec) = splice_spec.take() {
                        // (`reload` refused what set_splice would refuse.)
                        if let Err(e) = dp.set_splice(&spec) {
                            tracing::error!("splice services not reloaded: {e}");
                        }
                    }
                    dp.set_tables(t, now(epoch));
                }
                Err(e) => tracing::error!("cannot build tables: {e}"),
            }
        }
        if let Some(r) = reloaded {
            sh.reloads.fetch_add(1, Ordering::Relaxed);
            // Logged once the new tables are published.
            tracing::info!(
                added = r.added.len(),
                removed = r.removed.len(),
                backend_ids = cp.ids_in_use(),
                "configuration reloaded"
            );
        }
    }
    // Active-active with a drain time: withdraw first, keep forwarding the flows that still
    // come (the router moves new ones away; in `nat` the backends' replies still come to this
    // node's SNAT address), then stop once nothing was forwarded for `DRAIN_QUIET` or the drain
    // time has passed, whichever comes first.
    if let Some(h) = cfg.ha.as_ref().filter(|h| h.mode == HaMode::ActiveActive) {
        if !h.drain.is_zero() {
            tracing::info!(drain_s = h.drain.as_secs(), "draining before shutting down");
            sh.ha.drain();
            let why = drain(sh, h.drain);
            tracing::info!("drained: {why}");
        }
    }
    sighup.close();
    let _ = sighup_thread.join();
    tracing::info!("shutting down");
    Ok(())
}

/// The longest the control loop sleeps waiting for probe results (a SIGHUP wakes it at once).
const CONTROL_TICK: Duration = Duration::from_millis(100);

/// How often the control loop looks for removed backends whose ids can be released.
const RELEASE_EVERY: Duration = Duration::from_millis(100);

/// How long a draining node waits with nothing forwarded before it stops early.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

/// Waits while the data path still forwards, at most `limit`; why it stopped waiting.
fn drain(sh: &Shared, limit: Duration) -> &'static str {
    let forwarded = || sh.dp.lock().stats().forwarded;
    let start = StdInstant::now();
    let (mut last, mut moved) = (forwarded(), start);
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(200).min(limit.saturating_sub(start.elapsed())));
        let now = forwarded();
        if now != last {
            (last, moved) = (now, StdInstant::now());
        } else if moved.elapsed() >= DRAIN_QUIET {
            return "nothing forwarded for 2 s";
        }
    }
    "drain time passed"
}

fn transition(
    cp: &mut ControlPlane,
    targets: &HashMap<BackendId, (std::net::SocketAddr, HealthSpec)>,
    id: BackendId,
    up: bool,
) -> bool {
    let changed = cp.set_healthy(id, up);
    if changed {
        let addr = targets
            .get(&id)
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        if up {
            tracing::info!(backend = %addr, "backend up");
        } else {
            tracing::warn!(backend = %addr, "backend down");
        }
    }
    changed
}

/// The splice slots a data path was built with: their capacity, or `None` when none were set
/// up (no spliced service and no `balancer.splice_capacity` in the configuration it started
/// with). They stay as they are for the process's life, whatever later reloads say.
fn splice_slots(start: &DataplaneSpec) -> Option<usize> {
    let splices = start.services.iter().any(|s| s.splice.is_some());
    (splices || start.splice_reserve).then_some(start.splice_capacity)
}

/// Whether a reloaded configuration `new` fits the splice slots set up at start (`slots`,
/// from [`splice_slots`]): checked before the control plane takes it, since
/// [`lb_dataplane::Dataplane::set_splice`] refuses the same cases later, under the data
/// path's lock. Judged against the start, not the configuration in force: a reload that
/// removed every spliced service leaves the slots in place for one that brings them back.
fn check_splice_reload(slots: Option<usize>, new: &DataplaneSpec) -> Result<(), String> {
    let splices = new.services.iter().any(|s| s.splice.is_some());
    match slots {
        None if splices => Err(
            "the first spliced service needs a restart, or balancer.splice_capacity set at \
             start (no splice slots were set up)"
                .into(),
        ),
        Some(capacity) if capacity != new.splice_capacity => {
            Err("balancer.splice_capacity needs a restart".into())
        }
        _ => Ok(()),
    }
}

/// Loads a new configuration; the device, queues and statistics address cannot change, nor
/// the splice slots set up at start (`slots`, see [`check_splice_reload`]).
fn reload(
    path: &Path,
    old: &Config,
    slots: Option<usize>,
    cp: &mut ControlPlane,
) -> Result<(Config, Reload), String> {
    let new = Config::load(path).map_err(|e| e.to_string())?;
    if new.device != old.device
        || new.queues != old.queues
        || new.offload != old.offload
        || new.io_uring != old.io_uring
        || new.io != old.io
        || new.udp_coalesce != old.udp_coalesce
        || new.needs_tap() != old.needs_tap()
    {
        return Err(
            "balancer.device, balancer.queues, balancer.offload, balancer.io_uring, balancer.io, \
             balancer.udp_coalesce and the device kind need a restart"
                .into(),
        );
    }
    if new.dataplane.conntrack_capacity != old.dataplane.conntrack_capacity
        || new.dataplane.snat_addrs != old.dataplane.snat_addrs
        || new.hash_key != old.hash_key
    {
        return Err(
            "balancer.conntrack_capacity, balancer.snat_addrs and balancer.hash_key need a restart"
                .into(),
        );
    }
    check_splice_reload(slots, &new.dataplane)?;
    let r = cp.apply(new.dataplane.clone()).map_err(|e| e.to_string())?;
    for id in &r.removed {
        if let Some(b) = cp.backend(*id) {
            let mode = b.mode;
            tracing::info!(backend = %b.addr, %mode, "backend removed: its flows continue, it gets no new ones");
        }
    }
    Ok((new, r))
}

/// Command-line options of `tun-balancer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tun-balancer",
    about = "A layer-4 load balancer over a TUN/TAP device (lb crates)."
)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Only validate the configuration and exit (0 if valid).
    #[arg(long)]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_dataplane::{Mode, Proto, ServiceSpec};

    /// An IPv4 UDP datagram of one flow (ids counting up, checksums valid) at `START` in a
    /// 4 KiB buffer, with its place.
    fn datagram(id: u16, payload: usize) -> (Vec<u8>, Outgoing) {
        const START: usize = 64;
        let len = 28 + payload;
        let mut b = vec![0u8; 4096];
        let p = &mut b[START..START + len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[192, 0, 2, 1]);
        p[16..20].copy_from_slice(&[198, 51, 100, 11]);
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p[22..24].copy_from_slice(&53u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        p[28..].fill(0xab);
        let parsed = lb_packet::parse(p, Link::Ip).expect("parse");
        lb_packet::checksum::recompute(p, &parsed).expect("checksums");
        let o = Outgoing {
            start: START,
            len,
            hdr: VnetHdr::NONE,
        };
        (b, o)
    }

    /// A batch of one flow's datagrams at 0 and 2 merges into one super-packet, unless the
    /// packet between them is a super-packet to cut: then the datagram after it stays after
    /// its segments.
    #[test]
    fn no_datagram_merges_across_a_super_packet_to_cut() {
        for cut_between in [false, true] {
            let (b0, o0) = datagram(1, 100);
            let (b2, o2) = datagram(2, 100);
            let mut bufs = vec![b0, vec![0u8; 4096], b2];
            let mut outs = [Some(o0), None, Some(o2)];
            let fwd = Verdict::Forward {
                start: o0.start,
                len: o0.len,
            };
            let middle = if cut_between {
                Verdict::Segment
            } else {
                Verdict::Drop(lb_dataplane::DropReason::Malformed)
            };
            let c = coalesce_runs(&mut bufs, &mut outs, &[fwd, middle, fwd], Link::Ip);
            if cut_between {
                assert_eq!(c, Coalesced::default());
                assert!(outs[0].is_some() && outs[2].is_some(), "{outs:?}");
            } else {
                assert_eq!((c.super_packets, c.datagrams), (1, 2));
                assert!(outs[0].is_some() && outs[2].is_none(), "{outs:?}");
            }
        }
    }

    /// Slots set up at start stay valid through reloads that drop and bring back spliced
    /// services; none set up: the first spliced service is refused; another capacity too.
    #[test]
    fn splice_reloads_are_judged_against_the_slots_set_up_at_start() {
        let plain = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
        let mut spliced = plain.clone();
        spliced.splice = Some(lb_dataplane::SpliceSpec::default());
        let spec = |services: Vec<ServiceSpec>, reserve: bool| DataplaneSpec {
            services,
            splice_reserve: reserve,
            ..DataplaneSpec::default()
        };
        let with_splice = spec(vec![spliced.clone()], false);
        let without = spec(vec![plain.clone()], false);
        let slots = splice_slots(&with_splice);
        assert_eq!(slots, Some(DataplaneSpec::default().splice_capacity));
        // Started spliced, reloaded to plain NAT (the configuration in force has no splice),
        // then back: accepted, the slots are still there.
        assert_eq!(check_splice_reload(slots, &without), Ok(()));
        assert_eq!(check_splice_reload(slots, &with_splice), Ok(()));
        // The slots' size cannot change.
        let mut bigger = with_splice.clone();
        bigger.splice_capacity *= 2;
        let e = check_splice_reload(slots, &bigger).unwrap_err();
        assert!(e.contains("splice_capacity needs a restart"), "{e}");
        // Reserved at start with no spliced service: the first one comes by reload.
        let reserved = splice_slots(&spec(vec![plain.clone()], true));
        assert!(reserved.is_some());
        assert_eq!(check_splice_reload(reserved, &with_splice), Ok(()));
        // Nothing set up: refused.
        let none = splice_slots(&without);
        assert_eq!(none, None);
        let e = check_splice_reload(none, &with_splice).unwrap_err();
        assert!(e.contains("first spliced service needs a restart"), "{e}");
        assert_eq!(check_splice_reload(none, &without), Ok(()));
    }

    #[test]
    fn random_bytes_come_from_the_os_rng() {
        let a = random_bytes::<32>().unwrap();
        let b = random_bytes::<32>().unwrap();
        assert_ne!(a, [0; 32]);
        assert_ne!(a, b);
    }

    #[test]
    fn an_unreadable_rng_is_an_error_not_a_zero_key() {
        let r = random_bytes_from::<32, _>(|_| Err("ENOSYS"));
        assert_eq!(
            r,
            Err("cannot read the OS random number generator: ENOSYS".to_owned())
        );
    }
}
