//! End to end, issue 18 item 5: backend ids are recycled. `tun-balancer` in mode `nat` goes
//! through 10 000 reloads (the configuration file rewritten, then SIGHUP), each with 2 fixed real
//! backends and 1–3 backends drawn from 65 024 addresses, under a steady HTTP request loop:
//! no reload is rejected, no request fails, the ids in use stay bounded (removed backends are
//! released once their last flow ends), a long-lived flow of a removed backend keeps reaching
//! it, and the balancer's resident memory barely moves.
//!
//! The drawn addresses are all real: the third backend's namespace answers for the whole of
//! `10.99.0.0/16` (an "AnyIP" local route; its HTTP server listens on every address) and the
//! balancer's namespace routes that prefix to it.
//!
//! Run: `cargo test -p lb-examples --test reload_churn -- --nocapture` (root).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{enter_ns, need_root, need_tool, Lab};
use lb_examples::stats_server::fetch;

const VIP4: &str = "203.0.113.10";
const RELOADS: usize = 10_000;

/// Reloads to run: [`RELOADS`], or `LB_CHURN_RELOADS` (for quicker local runs).
fn reload_count() -> usize {
    std::env::var("LB_CHURN_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RELOADS)
}
/// Reloads before the first RSS reading (allocator arenas and tables at their working size).
const WARMUP: usize = 1_000;
/// Pause between two reloads, so that each backend set sees some of the traffic.
const PAUSE: Duration = Duration::from_millis(2);
/// The bound on the balancer's RSS growth over the 10 000 reloads. Without recycling every
/// drawn backend (~20 000 of them) would keep a SNAT pool of ~40 KiB (10 000 ports) and its
/// other state: several hundred MiB.
const RSS_GROWTH_MAX_KIB: u64 = 8 * 1024;
/// The bound on backend ids in use at any sample: fixed + drawn + removed backends still holding
/// flows (TCP flows leave 2 s after they close, with the timeouts below).
const IDS_IN_USE_MAX: u64 = 1_000;

/// The configuration: one TCP service, round robin (no hash table to rebuild per reload),
/// short closing timeouts so that removed backends' finished flows leave within seconds.
fn config(backends: &[SocketAddr]) -> String {
    let mut c = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\n\
         hash_key = \"e2e cluster secret 0123456789\"\nsnat_ports = \"20000-29999\"\n\
         [balancer.timeouts]\ntcp_fin = 2\ntcp_close = 2\n\n",
    );
    c.push_str(&format!(
        "[[service]]\nvip = \"{VIP4}:80\"\nproto = \"tcp\"\nmode = \"nat\"\nscheduler = \"rr\"\n"
    ));
    for b in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"{b}\"\nweight = 1\n"
        ));
    }
    c
}

/// A small deterministic generator (xorshift64*): the same draws every run.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An address of the pool `10.99.0.0/16` (host part 1–254 in each byte).
    fn pooled(&mut self) -> SocketAddr {
        let r = self.next();
        let (a, b) = ((r >> 8) as u8 % 254 + 1, (r >> 24) as u8 % 254 + 1);
        SocketAddr::from((Ipv4Addr::new(10, 99, a, b), 8080))
    }
}

/// The balancer's statistics, fetched from inside its namespace (the calling thread is there).
fn stats() -> serde_json::Value {
    let addr: SocketAddr = "127.0.0.1:9100".parse().unwrap();
    let body = fetch(addr, "/").unwrap_or_else(|e| panic!("stats: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("stats JSON {body:?}: {e}"))
}

/// Reloads the balancer counts: (applied, rejected).
fn reloads(s: &serde_json::Value) -> (u64, u64) {
    (
        s["reloads"]["applied"].as_u64().unwrap(),
        s["reloads"]["rejected"].as_u64().unwrap(),
    )
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Follows the balancer's log: reloads applied ("configuration reloaded", with the ids in use
/// then) and rejected. Reads only what was appended since the last call.
struct LogWatch {
    file: std::fs::File,
    partial: String,
    applied: u64,
    rejected: u64,
    /// `backend_ids` of the last reload applied.
    ids: u64,
}

impl LogWatch {
    fn new(path: &std::path::Path) -> LogWatch {
        LogWatch {
            file: std::fs::File::open(path).expect("balancer log"),
            partial: String::new(),
            applied: 0,
            rejected: 0,
            ids: 0,
        }
    }

    fn poll(&mut self) {
        let mut more = Vec::new();
        self.file.read_to_end(&mut more).expect("read log");
        self.partial.push_str(&String::from_utf8_lossy(&more));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = strip_ansi(&line);
            if line.contains("configuration reloaded") {
                self.applied += 1;
                self.ids = line
                    .split_once("backend_ids=")
                    .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
                    .expect("backend_ids in the reload line");
            } else if line.contains("reload rejected") {
                self.rejected += 1;
            }
        }
    }
}

/// `s` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// Rewrites the configuration, sends SIGHUP, and waits (following the log) until the balancer
/// has acted on one more reload, applied or rejected.
#[allow(unsafe_code)]
fn reload(path: &std::path::Path, pid: u32, backends: &[SocketAddr], log: &mut LogWatch) {
    let seen = log.applied + log.rejected;
    std::fs::write(path, config(backends)).expect("write config");
    // SAFETY: kill(2) on the balancer's pid, which this test started and still holds.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_micros(500));
        log.poll();
        if log.applied + log.rejected > seen {
            return;
        }
        assert!(Instant::now() < end, "reload not acted on within 10 s");
    }
}

/// The entry of `backends[]` with address `addr`, if listed.
fn listed(s: &serde_json::Value, addr: SocketAddr) -> Option<serde_json::Value> {
    s["backends"]
        .as_array()?
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .cloned()
}

/// One HTTP request to the VIP from the client namespace (the calling thread is there): the
/// name of the backend that answered.
fn get_id() -> Result<String, String> {
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut c =
        TcpStream::connect_timeout(&vip, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    c.write_all(b"GET /id HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    c.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no body")?;
    if !head.starts_with("HTTP/1.0 200") {
        return Err(format!("status: {head}"));
    }
    Ok(body.trim().to_owned())
}

/// What the reload loop measured.
struct Churn {
    /// Balancer RSS (KiB) after the warm-up reloads and after the last.
    rss_before: u64,
    rss_after: u64,
    /// The most backend ids in use at any reload.
    max_in_use: u64,
    /// Reloads done when X was last seen retired and held by the long-lived flow.
    x_retired_seen: usize,
    /// X was released after its flow ended.
    x_gone: bool,
    /// Distinct pooled backends configured.
    drawn: usize,
    /// Time of the measured reloads (after the warm-up).
    elapsed: Duration,
    /// SIGHUP to "configuration reloaded": minimum, median, 90th and 99th percentiles.
    quantiles: [Duration; 4],
    /// Reloads applied and rejected, as logged.
    applied: u64,
    rejected: u64,
    /// The statistics at the end.
    last: serde_json::Value,
}

#[test]
fn ten_thousand_reloads_recycle_backend_ids() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let started = Instant::now();
    let n = reload_count();
    let mut lab = Lab::new("churn");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        lab.http_server(&b, 8080);
    }
    // The third backend answers for all of 10.99.0.0/16; the balancer routes it there.
    let b3 = &t.backends[2];
    lab.ip(&b3.ns, "route add local 10.99.0.0/16 dev lo");
    lab.ip(
        &t.balancer,
        &format!("route add 10.99.0.0/16 via {}", b3.v4),
    );
    let fixed: Vec<SocketAddr> = t.backends[..2]
        .iter()
        .map(|b| SocketAddr::new(b.v4, 8080))
        .collect();

    // Phase 1: only X, a pooled address, so that the long-lived flow lands on it.
    let x: SocketAddr = "10.99.255.1:8080".parse().unwrap();
    lab.start_balancer(
        &t,
        "lb0",
        &config(&[x]),
        &[&format!("{VIP4}/32 dev lb0"), "203.0.113.100/32 dev lb0"],
    );
    let pid = lab.pid("balancer").expect("pid");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "tun-balancer"
    );
    let client = format!("/run/netns/{}", t.client);
    let balancer = format!("/run/netns/{}", t.balancer);
    // The stats server is up once it answers.
    let up = lab.wait_for(Duration::from_secs(10), || {
        lab.try_balancer_get(&t, "/").map(|_| ())
    });
    assert!(up.is_some(), "{}", lab.log("balancer"));
    // The long-lived flow: an HTTP request whose headers trickle in, one every 3 s, until told
    // to finish; every header line crosses the balancer to X, and the answer names b3.
    let long_stop = Arc::new(AtomicBool::new(false));
    let long = {
        let (stop, path) = (long_stop.clone(), client.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || -> Result<(String, u32), String> {
            enter_ns(&path);
            let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
            let mut c = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            c.write_all(b"GET /id HTTP/1.0\r\n")
                .map_err(|e| e.to_string())?;
            let _ = tx.send(());
            let mut lines = 0;
            // Python's server takes at most 100 header lines: one every 3 s lasts 285 s.
            while !stop.load(Ordering::Acquire) && lines < 95 {
                std::thread::sleep(Duration::from_secs(3));
                c.write_all(format!("X-Pad-{lines}: {}\r\n", "y".repeat(32)).as_bytes())
                    .map_err(|e| format!("header {lines}: {e}"))?;
                lines += 1;
            }
            c.write_all(b"\r\n").map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            c.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok((out, lines))
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("long-lived flow connected");
        h
    };

    // The request loop: sequential GETs with a short pause, every answer checked.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients = {
        let (stop, ok, errors, path) = (stop.clone(), ok.clone(), errors.clone(), client.clone());
        std::thread::spawn(move || {
            enter_ns(&path);
            while !stop.load(Ordering::Acquire) {
                match get_id() {
                    Ok(id) if ["b1", "b2", "b3"].contains(&id.as_str()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(id) => errors.lock().unwrap().push(format!("answer {id:?}")),
                    Err(e) => errors.lock().unwrap().push(e),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // The reload loop, from a thread inside the balancer's namespace (statistics on its
    // loopback).
    let cfg_path = lab.dir.join("balancer.toml");
    let log_path = lab.dir.join("balancer.log");
    let long_stop2 = long_stop.clone();
    let churn = std::thread::spawn(move || {
        enter_ns(&balancer);
        let mut draw = Draw(0x05ee_d1d5);
        let x_id = listed(&stats(), x).expect("X listed")["id"]
            .as_u64()
            .unwrap();
        let (mut rss_before, mut max_in_use, mut x_retired_seen) = (0, 0, 0);
        let mut drawn = std::collections::HashSet::new();
        let loop_start = Instant::now();
        let mut warm_at = loop_start;
        let mut log = LogWatch::new(&log_path);
        let mut took = Vec::with_capacity(n);
        log.poll();
        for i in 0..WARMUP + n {
            if i == WARMUP {
                rss_before = rss_kib(pid);
                warm_at = Instant::now();
            }
            let mut set = fixed.clone();
            for _ in 0..1 + draw.next() % 3 {
                let a = draw.pooled();
                if !set.contains(&a) && a != x {
                    set.push(a);
                    drawn.insert(a);
                }
            }
            std::thread::sleep(PAUSE);
            let t0 = Instant::now();
            reload(&cfg_path, pid, &set, &mut log);
            if i >= WARMUP {
                took.push(t0.elapsed());
            }
            max_in_use = max_in_use.max(log.ids);
            // While the long-lived flow lasts, X stays listed, retired, under its own id
            // (looked at every 50 reloads: the statistics are slower than a reload).
            if !long_stop2.load(Ordering::Acquire) && i % 50 == 0 {
                let s = stats();
                let xb = listed(&s, x).expect("X released while its flow lives");
                assert_eq!(xb["id"].as_u64(), Some(x_id));
                assert_eq!(xb["live"], false);
                assert_eq!(s["backend_ids"]["in_use"].as_u64(), Some(log.ids));
                x_retired_seen = i + 1;
            }
            if i == WARMUP + n / 2 {
                long_stop2.store(true, Ordering::Release);
            }
        }
        let elapsed = warm_at.elapsed();
        took.sort();
        let q = |f: f64| {
            took.get((f * took.len() as f64) as usize)
                .copied()
                .unwrap_or_default()
        };
        let quantiles = [q(0.0), q(0.5), q(0.9), q(0.99)];
        // X's flow ended (2 s in TIME_WAIT / CLOSE here): its id is released within seconds.
        let end = Instant::now() + Duration::from_secs(15);
        let x_gone = loop {
            if listed(&stats(), x).is_none() {
                break true;
            }
            if Instant::now() > end {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Churn {
            rss_before,
            rss_after: rss_kib(pid),
            max_in_use,
            x_retired_seen,
            x_gone,
            drawn: drawn.len(),
            elapsed,
            quantiles,
            applied: log.applied,
            rejected: log.rejected,
            last: stats(),
        }
    });
    let churned = churn.join();
    stop.store(true, Ordering::Release);
    long_stop.store(true, Ordering::Release);
    let _ = clients.join();
    let long = long.join().expect("long-lived flow thread");
    let Churn {
        rss_before,
        rss_after,
        max_in_use,
        x_retired_seen,
        x_gone,
        drawn,
        elapsed,
        quantiles,
        applied,
        rejected,
        last,
    } = churned.unwrap_or_else(|_| panic!("reload loop failed; log:\n{}", tail(&lab)));
    let log = lab.log("balancer");
    // The log and the statistics agree.
    assert_eq!(reloads(&last), (applied, rejected));
    let ids = &last["backend_ids"];
    println!(
        "{n} reloads in {:.1} s ({:.1} ms each; {WARMUP} before them); {applied} applied, \
         {rejected} rejected",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e3 / n as f64,
    );
    println!(
        "SIGHUP to applied: min {:.1} ms, median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        quantiles[0].as_secs_f64() * 1e3,
        quantiles[1].as_secs_f64() * 1e3,
        quantiles[2].as_secs_f64() * 1e3,
        quantiles[3].as_secs_f64() * 1e3
    );
    println!(
        "backend ids: {drawn} drawn backends, at most {max_in_use} ids in use, now {} in use \
         ({} retired), {} released",
        ids["in_use"], ids["retired"], ids["released"]
    );
    println!(
        "RSS before {rss_before} KiB, after {rss_after} KiB: {:+} KiB",
        rss_after as i64 - rss_before as i64
    );
    let errors = errors.lock().unwrap().clone();
    println!(
        "requests: {} answered, {} failed; long-lived flow: {x_retired_seen} reloads while \
         X was retired",
        ok.load(Ordering::Relaxed),
        errors.len()
    );
    assert_eq!(rejected, 0, "{}", tail(&lab));
    assert!(!log.contains("reload rejected"));
    assert_eq!(applied, (WARMUP + n) as u64);
    assert!(
        errors.is_empty(),
        "client errors: {:?}",
        &errors[..errors.len().min(10)]
    );
    assert!(ok.load(Ordering::Relaxed) >= 1_000, "too little traffic");
    let (answer, lines) = long.unwrap_or_else(|e| panic!("long-lived flow: {e}"));
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.trim_end().ends_with("b3"),
        "{answer:?}"
    );
    assert!(
        lines >= 1 && x_retired_seen >= n / 2,
        "{lines} {x_retired_seen}"
    );
    assert!(x_gone, "X still listed after its flow ended");
    assert!(max_in_use <= IDS_IN_USE_MAX, "{max_in_use} ids in use");
    assert!(
        ids["released"].as_u64().unwrap() + max_in_use >= drawn as u64,
        "every drawn backend is released or in use"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_GROWTH_MAX_KIB,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}

/// The last lines of the balancer's log.
fn tail(lab: &Lab) -> String {
    let log = lab.log("balancer");
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
