//! End to end, scheduling policies fed by live traffic (mode `nat`, IPv4): connection counts
//! from the balancer's TCP state, latency it measures, admission thresholds, passive outlier
//! ejection and the `/explain` endpoint, each proven on real connections between namespaces.
//!
//! Backends are `tests/policies/backend.py` (threaded; `GET /id` answers the backend's name,
//! optionally late; `GET /hold` names it and keeps the connection open; mode `reset` resets every
//! connection). Clients run in this process: threads that entered the client namespace
//! ([`common::in_ns`]), so a closed-loop load is not limited by a client program.
//!
//! The tests take turns (one lock): the latency comparison must not share the CPU with another
//! test's traffic. `LB_POLICY_SECS` sets the load time per policy of `heterogeneous_backends`
//! (default 8 s); its table is printed with `--nocapture`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{connect_from, connect_in, enter_ns, in_ns, need_root, need_tool, python, Lab, Topo};

const VIP4: &str = "203.0.113.10";
const ROUTES: [&str; 2] = ["203.0.113.10/32 dev lb0", "203.0.113.100/32 dev lb0"];
/// Health checks: `GET /id` every 200 ms, up after 2 successes, down after 2 failures.
const HTTP_HEALTH: &str =
    "kind = \"http\"\npath = \"/id\"\ninterval_ms = 200\nrise = 2\nfall = 2\n";
/// The short FIN / CLOSE timeouts of the tests that wait for closed connections to expire.
const SHORT_TIMEOUTS: &str =
    "[balancer.timeouts]\ntcp_fin = 5\ntcp_close = 2\ntcp_established = 900\n";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn vip() -> SocketAddr {
    format!("{VIP4}:80").parse().unwrap()
}

fn backend_script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/policies/backend.py")
}

/// The backend address of `name` (`b1` → `198.51.100.11:8080`).
fn addr_of(name: &str) -> String {
    let i: u32 = name.trim_start_matches('b').parse().expect("backend name");
    format!("198.51.100.{}:8080", 10 + i)
}

/// What goes into a test's configuration besides the IPv4 TCP service `VIP4:80` → `:8080`.
#[derive(Default)]
struct Opts<'a> {
    /// Tables after `[balancer]` (e.g. [`SHORT_TIMEOUTS`]).
    balancer: &'a str,
    /// Extra keys of the `[[service]]`.
    service: &'a str,
    /// The `[service.health]` body (default [`HTTP_HEALTH`]).
    health: Option<&'a str>,
    /// Extra tables of the service (e.g. `[service.outlier]`).
    tables: &'a str,
    /// Extra keys of backend i (0-based), when given.
    backend: &'a [&'a str],
}

fn config(scheduler: &str, n: usize, o: &Opts<'_>) -> String {
    let mut c = format!(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\"]\n\
         conntrack_capacity = 262144\nstats = \"127.0.0.1:9100\"\n\
         hash_key = \"e2e cluster secret 0123456789\"\n{}\n\
         [[service]]\nvip = \"{VIP4}:80\"\nproto = \"tcp\"\nmode = \"nat\"\nscheduler = \"{scheduler}\"\n{}\
         [service.health]\n{}{}",
        o.balancer,
        o.service,
        o.health.unwrap_or(HTTP_HEALTH),
        o.tables,
    );
    for i in 1..=n {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:8080\"\nweight = 1\n{}",
            10 + i,
            o.backend.get(i - 1).copied().unwrap_or("")
        ));
    }
    c
}

/// Starts `backend.py` in `b`'s namespace as process `name` on `port`.
fn backend(lab: &mut Lab, b: &common::BackendNs, name: &str, port: u16, extra: &[&str]) {
    let port_s = port.to_string();
    let mut argv = vec![python(), backend_script(), &port_s, &b.name];
    argv.extend_from_slice(extra);
    lab.spawn(&b.ns, name, &argv);
    lab.wait_listen(&b.ns, "tcp", port);
}

/// A topology of `n` backends, each running `backend.py` on 8080 as `srv-bN`.
fn topo(lab: &mut Lab, n: usize) -> Topo {
    let t = lab.topology(n);
    for b in t.backends.clone() {
        backend(lab, &b, &format!("srv-{}", b.name), 8080, &[]);
    }
    t
}

fn start(lab: &mut Lab, t: &Topo, cfg: &str) {
    lab.start_balancer(t, "lb0", cfg, &ROUTES);
    wait_stats(lab, t);
}

/// Waits (≤ 10 s) until the balancer's stats endpoint answers: it starts serving a moment
/// after the device comes up.
fn wait_stats(lab: &Lab, t: &Topo) {
    let up = lab.wait_for(Duration::from_secs(10), || lab.try_balancer_get(t, "/"));
    assert!(up.is_some(), "stats never served: {}", lab.log("balancer"));
}

/// Waits (≤ `secs`) until every listed backend's `healthy` is as given.
fn wait_health(lab: &Lab, t: &Topo, want: &[(&str, bool)], secs: u64) {
    let ok = lab.wait_for(Duration::from_secs(secs), || {
        let s = lab.try_balancer_get(t, "/")?;
        let backends = s["backends"].as_array()?;
        want.iter()
            .all(|(name, h)| {
                backends
                    .iter()
                    .any(|b| b["addr"] == addr_of(name) && b["healthy"] == *h)
            })
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "backends never reached health {want:?}: {}\n{}",
        lab.balancer_stats(t)["backends"],
        lab.log("balancer")
    );
}

/// A field of every backend of the stats, by backend name (`b1`..), as u64 (missing: panics
/// with the stats, so a balancer without the field fails loudly).
fn per_backend_u64(lab: &Lab, t: &Topo, field: &str) -> HashMap<String, u64> {
    let s = lab.balancer_stats(t);
    let mut m = HashMap::new();
    for b in &t.backends {
        let e = s["backends"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["addr"] == addr_of(&b.name)))
            .unwrap_or_else(|| panic!("no backend {} in {s}", b.name));
        let v = e[field]
            .as_u64()
            .unwrap_or_else(|| panic!("backends[].{field} missing or not a u64: {e}"));
        m.insert(b.name.clone(), v);
    }
    m
}

fn sum(m: &HashMap<String, u64>) -> u64 {
    m.values().sum()
}

/// Reads an HTTP/1.0 answer's body up to its first newline (the backend's name); with `to_end`,
/// reads to the end of the stream first.
fn read_name(s: &mut TcpStream, to_end: bool) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if !to_end {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                if buf[p + 4..].contains(&b'\n') {
                    break;
                }
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let p = find(&buf, b"\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no HTTP answer: {:?}", String::from_utf8_lossy(&buf)),
        )
    })?;
    let body = String::from_utf8_lossy(&buf[p + 4..]);
    Ok(body.lines().next().unwrap_or("").trim().to_owned())
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One `GET /id` on a new connection (call it on a thread inside the client namespace);
/// returns the backend's name.
fn get_id(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    get_id_port(addr, None, timeout).map(|(n, _)| n)
}

/// [`get_id`] from source `src` when given (else a port the kernel picks); also returns the
/// connection's source port.
fn get_id_port(
    addr: SocketAddr,
    src: Option<SocketAddrV4>,
    timeout: Duration,
) -> std::io::Result<(String, u16)> {
    let mut s = match (src, addr) {
        (Some(src), SocketAddr::V4(dst)) => connect_from(src, dst, timeout)?,
        _ => TcpStream::connect_timeout(&addr, timeout)?,
    };
    let port = s.local_addr()?.port();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /id HTTP/1.0\r\n\r\n")?;
    Ok((read_name(&mut s, true)?, port))
}

/// `count` sequential `GET /id` requests from the client namespace, each on a new connection:
/// the backends' names, or the error of each failed request.
fn get_ids(t: &Topo, count: usize) -> Vec<Result<String, String>> {
    let path = format!("/run/netns/{}", t.client);
    std::thread::spawn(move || {
        enter_ns(&path);
        (0..count)
            .map(|_| get_id(vip(), Duration::from_secs(2)).map_err(|e| e.to_string()))
            .collect()
    })
    .join()
    .unwrap()
}

/// A long-lived connection through the VIP (`GET /hold`): the stream and the backend's name.
fn hold(t: &Topo, timeout: Duration) -> std::io::Result<(TcpStream, String)> {
    let mut s = connect_in(&t.client, vip(), timeout)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET /hold HTTP/1.0\r\n\r\n")?;
    let name = read_name(&mut s, false)?;
    Ok((s, name))
}

/// `n` long-lived connections, opened one after the other (each answered before the next, so
/// that the balancer has counted it).
fn hold_many(lab: &Lab, t: &Topo, n: usize) -> Vec<(TcpStream, String)> {
    (0..n)
        .map(|i| {
            hold(t, Duration::from_secs(2)).unwrap_or_else(|e| {
                panic!(
                    "long-lived connection {i} failed: {e}\n{}",
                    lab.log("balancer")
                )
            })
        })
        .collect()
}

/// Sleeps until `due` (at once if it has passed).
fn sleep_until(due: Instant) {
    if let Some(d) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn tally(names: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n).or_insert(0) += 1;
    }
    m
}

// ---- 1. heterogeneous backends --------------------------------------------------------------

/// Result of one closed-loop load run.
struct LoadRun {
    per_backend: HashMap<String, u64>,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u64>,
    elapsed: Duration,
    /// Distinct source ports used.
    ports: std::collections::HashSet<u16>,
}

/// Source ports of each load client: client `i` uses `PORT_BASE + i * PORTS_PER_CLIENT` and up,
/// in turn, so no source port (hence no balancer flow in TIME_WAIT) is used twice in a run.
const PORT_BASE: u16 = 1024;
const PORTS_PER_CLIENT: u16 = 2000;

/// `clients` (≤ 32) threads in namespace `ns`, each doing `GET /id` on a new connection from
/// `src_ip` to `addr` in a loop for `dur` (closed loop: the next request once the previous answer
/// is complete).
fn closed_loop(
    ns: &str,
    src_ip: Ipv4Addr,
    addr: SocketAddr,
    clients: usize,
    dur: Duration,
) -> LoadRun {
    assert!(clients * PORTS_PER_CLIENT as usize + PORT_BASE as usize <= 65536);
    let path = format!("/run/netns/{ns}");
    let t0 = Instant::now();
    let end = t0 + dur;
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let path = path.clone();
            let first = PORT_BASE + i as u16 * PORTS_PER_CLIENT;
            std::thread::spawn(move || {
                enter_ns(&path);
                let mut k = 0u16;
                let mut names: HashMap<String, u64> = HashMap::new();
                let mut lat = Vec::with_capacity(4096);
                let mut ports = Vec::with_capacity(4096);
                let (mut errors, mut first_error) = (0u64, None);
                while Instant::now() < end {
                    let s = Instant::now();
                    let src = SocketAddrV4::new(src_ip, first + k);
                    k = (k + 1) % PORTS_PER_CLIENT;
                    match get_id_port(addr, Some(src), Duration::from_secs(2)) {
                        Ok((name, port)) => {
                            lat.push(s.elapsed().as_micros() as u64);
                            ports.push(port);
                            *names.entry(name).or_insert(0) += 1;
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e.to_string());
                        }
                    }
                }
                (names, lat, errors, first_error, ports)
            })
        })
        .collect();
    let mut run = LoadRun {
        per_backend: HashMap::new(),
        errors: 0,
        first_error: None,
        latencies_us: Vec::new(),
        elapsed: Duration::ZERO,
        ports: std::collections::HashSet::new(),
    };
    for h in handles {
        let (names, lat, errors, first_error, ports) = h.join().expect("load client");
        run.ports.extend(ports);
        for (k, v) in names {
            *run.per_backend.entry(k).or_insert(0) += v;
        }
        run.latencies_us.extend(lat);
        run.errors += errors;
        if run.first_error.is_none() {
            run.first_error = first_error;
        }
    }
    run.elapsed = t0.elapsed();
    run.latencies_us.sort_unstable();
    run
}

fn quantile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

fn mean_ms(us: &[u64]) -> f64 {
    us.iter().sum::<u64>() as f64 / us.len().max(1) as f64 / 1000.0
}

/// One row of the table.
struct Row {
    policy: &'static str,
    requests: u64,
    rate: f64,
    slow_share: f64,
    mean: f64,
    p90: f64,
    p99: f64,
    errors: u64,
    /// Flows the balancer created (the scheduler's decisions).
    flows: u64,
}

#[test]
fn heterogeneous_backends() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    const SLOW: &str = "b3";
    const CLIENTS: usize = 32;
    let secs: u64 = std::env::var("LB_POLICY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut lab = Lab::new("hetero");
    let t = lab.topology(3);
    for b in t.backends.clone() {
        let extra: &[&str] = if b.name == SLOW {
            &["--delay-ms", "100"]
        } else {
            &[]
        };
        backend(&mut lab, &b, &format!("srv-{}", b.name), 8080, extra);
    }
    let mut rows = Vec::new();
    for (k, policy) in ["rr", "wlc", "sed", "peak-ewma", "p2c", "least-request"]
        .into_iter()
        .enumerate()
    {
        // A fresh balancer per policy: no flow, count or latency estimate carries over. Each
        // gets its own SNAT address: the backends (which close first) hold every tuple in
        // TIME_WAIT for a minute, and a SYN that lands on one is answered with an ACK, not a
        // SYN-ACK (a one-second stall for the client). One address gives a backend 64 512
        // ports, about 1 000 new connections per second sustained; the fast backends take
        // 1 500 a second here, for 8 s. (A balancer in production needs SNAT addresses for
        // its connection rate per backend in the same way; see `snat_addrs`.)
        let snat = format!("203.0.113.{}", 100 + k);
        let cfg = config(policy, 3, &Opts::default()).replace(
            "snat_addrs = [\"203.0.113.100\"]",
            &format!("snat_addrs = [\"{snat}\"]"),
        );
        let route = format!("{snat}/32 dev lb0");
        lab.start_balancer(&t, "lb0", &cfg, &["203.0.113.10/32 dev lb0", &route]);
        wait_stats(&lab, &t);
        wait_health(&lab, &t, &[("b1", true), ("b2", true), ("b3", true)], 10);
        let run = closed_loop(
            &t.client,
            Ipv4Addr::new(192, 0, 2, 2),
            vip(),
            CLIENTS,
            Duration::from_secs(secs),
        );
        let total: u64 = run.per_backend.values().sum();
        let flows = sum(&per_backend_u64(&lab, &t, "flows"));
        let slow = run.per_backend.get(SLOW).copied().unwrap_or(0);
        let row = Row {
            policy,
            requests: total,
            rate: total as f64 / run.elapsed.as_secs_f64(),
            slow_share: 100.0 * slow as f64 / total.max(1) as f64,
            mean: mean_ms(&run.latencies_us),
            p90: quantile_ms(&run.latencies_us, 0.9),
            p99: quantile_ms(&run.latencies_us, 0.99),
            errors: run.errors,
            flows,
        };
        let s = lab.balancer_stats(&t);
        let per: Vec<String> = s["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| {
                format!(
                    "{} flows={} handshake_ms={} response_ms={}",
                    b["addr"], b["flows"], b["handshake_ms"], b["response_ms"]
                )
            })
            .collect();
        println!(
            "{policy}: {} requests ({:.0}/s) from {} source ports, {flows} new flows, per backend {:?}, \
             {} errors (first: {:?}), p50 {:.2} ms; balancer drops {}, conntrack {}; {}",
            total,
            row.rate,
            run.ports.len(),
            run.per_backend,
            run.errors,
            run.first_error,
            quantile_ms(&run.latencies_us, 0.5),
            s["drops"],
            s["conntrack"],
            per.join("; ")
        );
        rows.push(row);
        lab.stop_balancer(&t, "lb0");
    }
    println!(
        "\n{CLIENTS} closed-loop clients, {secs} s per policy, one new TCP connection per request, \
         {SLOW} answers 100 ms late:\n"
    );
    println!(
        "| policy | requests | req/s | slow backend share | mean (ms) | p90 (ms) | p99 (ms) | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.1} % | {:.2} | {:.2} | {:.2} | {} |",
            r.policy, r.requests, r.rate, r.slow_share, r.mean, r.p90, r.p99, r.errors
        );
    }
    println!();
    let get = |p: &str| rows.iter().find(|r| r.policy == p).unwrap();
    let rr = get("rr");
    let mut bad = Vec::new();
    for r in &rows {
        if r.requests < 200 || r.errors * 100 > r.requests {
            bad.push(format!(
                "{}: {} requests, {} errors",
                r.policy, r.requests, r.errors
            ));
        }
        // Requests that reused a flow (source port reuse) were not scheduled.
        if r.flows * 100 < r.requests * 97 {
            bad.push(format!(
                "{}: only {} of {} requests were new flows",
                r.policy, r.flows, r.requests
            ));
        }
    }
    if (rr.slow_share - 100.0 / 3.0).abs() > 8.0 {
        bad.push(format!(
            "rr gave the slow backend {:.1} %, not 33 % ± 8",
            rr.slow_share
        ));
    }
    for p in ["peak-ewma", "least-request", "sed"] {
        let r = get(p);
        if r.slow_share >= 20.0 {
            bad.push(format!(
                "{p} gave the slow backend {:.1} % (want < 20 %)",
                r.slow_share
            ));
        }
        // Closed loop: the mean is the clients over the throughput (Little's law). The slow
        // backend's 100 ms dominates rr's mean (a third of its requests wait that long), so the
        // comparison measures the policy, not this 2-core machine: with 20 ms the balancer, the
        // clients and the backends saturated both cores, the fast backends' queues grew with
        // their share, and a 5 % margin flaked (least-request 1.08x rr in one CI run). A policy
        // under 20 % on the slow backend must save at least a fifth of rr's mean.
        // The tails are printed, not compared: every policy that sends more than 1 % of its
        // requests to the slow backend has a p99 of 100 ms or more.
        if r.mean > rr.mean * 0.8 {
            bad.push(format!(
                "{p}: mean {:.2} ms, not at least 20 % below rr's {:.2} ms",
                r.mean, rr.mean
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

// ---- 2. connections drain -------------------------------------------------------------------

#[test]
fn connections_drain() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("drain");
    let t = topo(&mut lab, 3);
    let o = Opts {
        balancer: SHORT_TIMEOUTS,
        ..Opts::default()
    };
    start(&mut lab, &t, &config("wlc", 3, &o));
    wait_health(&lab, &t, &[("b1", true), ("b2", true), ("b3", true)], 10);
    let conns = hold_many(&lab, &t, 30);
    let want = tally(conns.iter().map(|(_, n)| n.clone()));
    println!("30 long-lived connections: {want:?}");
    // Every one is ESTABLISHED in the balancer, counted on the backend that answered it.
    let counted = lab.wait_for(Duration::from_secs(3), || {
        let a = per_backend_u64(&lab, &t, "active_conns");
        (sum(&a) == 30).then_some(a)
    });
    let active = per_backend_u64(&lab, &t, "active_conns");
    assert!(
        counted.is_some(),
        "active_conns {active:?}, want a sum of 30: {}",
        lab.balancer_stats(&t)["backends"]
    );
    for (name, n) in &want {
        assert_eq!(
            active.get(name).copied(),
            Some(*n as u64),
            "{name}: active_conns {active:?} vs connections {want:?}"
        );
    }
    let inactive = per_backend_u64(&lab, &t, "inactive_conns");
    assert_eq!(sum(&inactive), 0, "inactive_conns {inactive:?}");
    // Close them all (FIN from the client, the server answers with its own FIN).
    let closed = Instant::now();
    drop(conns);
    // No longer ESTABLISHED at once; the other states expire within tcp_fin (5) + tcp_close (2)
    // seconds (plus the table's sweep).
    let no_active = lab.wait_for(Duration::from_secs(3), || {
        (sum(&per_backend_u64(&lab, &t, "active_conns")) == 0).then(|| closed.elapsed())
    });
    assert!(
        no_active.is_some(),
        "active_conns after closing: {:?}",
        per_backend_u64(&lab, &t, "active_conns")
    );
    let drained = lab.wait_for(Duration::from_secs(5 + 2 + 5), || {
        let a = per_backend_u64(&lab, &t, "active_conns");
        let i = per_backend_u64(&lab, &t, "inactive_conns");
        (sum(&a) == 0 && sum(&i) == 0).then(|| closed.elapsed())
    });
    println!(
        "after closing: active 0 after {no_active:?}, inactive 0 after {drained:?}; stats: {}",
        lab.balancer_stats(&t)["backends"]
    );
    assert!(
        drained.is_some(),
        "counts did not drain within tcp_fin + tcp_close + 5 s: active {:?}, inactive {:?}",
        per_backend_u64(&lab, &t, "active_conns"),
        per_backend_u64(&lab, &t, "inactive_conns")
    );
}

/// An idle connection leaves the connection counts by its deadline, not up to a timeout later:
/// the flow table's sweep (`Dataplane::housekeeping`) finds a flow that its class list keeps
/// behind a younger one. Established flows time out after 6 s here. `a` is opened at 0 s and
/// stays idle: once its last ACKs are in, it heads the list, unseen, until its deadline (6 s),
/// and `expire` moves nothing behind it. `x` and `b` are opened at 0.5 s; `b` is seen again at
/// 1 s (due at 7 s), `x` at 5 s (due at 11 s). At 6 s the balancer removes `a` and moves the
/// seen `x`, then `b`, to the tail: `b` now waits behind `x`, and without the sweep would stay
/// counted until `x` leaves at 11 s. At 9 s only `x` may be counted, and the sweep says it
/// removed one flow.
#[test]
fn an_idle_connection_leaves_the_counts_by_its_deadline() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("idle");
    let t = topo(&mut lab, 2);
    let o = Opts {
        balancer: "[balancer.timeouts]\ntcp_established = 6\n",
        ..Opts::default()
    };
    // A table of 16 Ki slots: swept whole every 16 housekeeping calls (160 ms).
    let cfg =
        config("wlc", 2, &o).replace("conntrack_capacity = 262144", "conntrack_capacity = 16384");
    start(&mut lab, &t, &cfg);
    wait_health(&lab, &t, &[("b1", true), ("b2", true)], 10);
    let open = |what: &str| {
        hold(&t, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connection {what}: {e}\n{}", lab.log("balancer")))
            .0
    };
    let t0 = Instant::now();
    let at = |secs: f64| sleep_until(t0 + Duration::from_secs_f64(secs));
    let _a = open("a");
    at(0.5);
    let mut x = open("x");
    let mut b = open("b");
    assert_eq!(sum(&per_backend_u64(&lab, &t, "active_conns")), 3);
    at(1.0);
    b.write_all(b"b").expect("b seen again");
    at(5.0);
    x.write_all(b"x").expect("x seen again");
    at(9.0);
    let a = per_backend_u64(&lab, &t, "active_conns");
    println!(
        "at {:?}: active_conns {a:?} (a and b idle past their deadlines, x not)",
        t0.elapsed()
    );
    let s = lab.balancer_stats(&t);
    assert_eq!(
        sum(&a),
        1,
        "at 9 s only x may be counted: {}",
        s["backends"]
    );
    assert_eq!(
        s["conntrack"]["swept"].as_u64(),
        Some(1),
        "b removed by the sweep: {}",
        s["conntrack"]
    );
}

/// A persistence template leaves by its deadline too: the persistence table's expiry stops at
/// a live list head, and its sweep (`PersistTable::sweep`, from `Dataplane::housekeeping`)
/// finds a timed-out template queued behind one with a longer timeout. Two services on the same
/// backends: `:80` keeps a client's template 60 s, `:81` 2 s. One short connection to `:80` at
/// 0 s, one to `:81` at 1 s; closed flows leave 1 s after their last packet, and each template's
/// timeout starts when its flow leaves, so `:80`'s heads the list (due at ~61 s) and `:81`'s
/// waits behind it (due at ~4 s). At 7 s only `:80`'s may be held, and the sweep says it
/// removed one.
#[test]
fn a_short_lived_template_leaves_by_its_deadline_behind_a_longer_one() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("psweep");
    let t = topo(&mut lab, 2);
    let o = Opts {
        balancer: "[balancer.timeouts]\ntcp_fin = 1\ntcp_close = 1\n",
        service: "persistence_timeout_s = 60\n",
        ..Opts::default()
    };
    let mut cfg = config("wlc", 2, &o);
    cfg.push_str(&format!(
        "[[service]]\nvip = \"{VIP4}:81\"\nproto = \"tcp\"\nmode = \"nat\"\nscheduler = \"wlc\"\n\
         persistence_timeout_s = 2\n[service.health]\n{HTTP_HEALTH}\
         [[service.backend]]\naddr = \"198.51.100.11:8080\"\n\
         [[service.backend]]\naddr = \"198.51.100.12:8080\"\n"
    ));
    start(&mut lab, &t, &cfg);
    wait_health(&lab, &t, &[("b1", true), ("b2", true)], 10);
    let t0 = Instant::now();
    let at = |secs: f64| sleep_until(t0 + Duration::from_secs_f64(secs));
    let get = |port: u16| {
        let addr: SocketAddr = format!("{VIP4}:{port}").parse().unwrap();
        in_ns(&t.client, move || get_id(addr, Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("GET via :{port}: {e}\n{}", lab.log("balancer")))
    };
    get(80);
    at(1.0);
    get(81);
    let s = lab.balancer_stats(&t);
    assert_eq!(
        s["persist"]["entries"].as_u64(),
        Some(2),
        "{}",
        s["persist"]
    );
    at(7.0);
    let s = lab.balancer_stats(&t);
    println!("at {:?}: {}", t0.elapsed(), s["persist"]);
    assert_eq!(
        s["persist"]["entries"].as_u64(),
        Some(1),
        "at 7 s only :80's template may be held: {}",
        s["persist"]
    );
    assert_eq!(
        s["persist"]["swept"].as_u64(),
        Some(1),
        ":81's template removed by the sweep: {}",
        s["persist"]
    );
}

// ---- 3. counts survive table swaps ----------------------------------------------------------

#[test]
fn counts_survive_swaps() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("swaps");
    let t = topo(&mut lab, 3);
    // Health checks on a separate port (8081), served by a second process per backend: stopping
    // it flaps the backend's health without touching its connections on 8080.
    let health =
        "kind = \"http\"\npath = \"/id\"\nport = 8081\ninterval_ms = 200\nrise = 2\nfall = 2\n";
    let b: Vec<_> = t.backends.clone();
    backend(&mut lab, &b[0], "hc-b1", 8081, &[]);
    let o = Opts {
        health: Some(health),
        ..Opts::default()
    };
    start(&mut lab, &t, &config("wlc", 3, &o));
    // Only b1 is up: the 20 long-lived connections all land there.
    wait_health(&lab, &t, &[("b1", true), ("b2", false), ("b3", false)], 10);
    let conns = hold_many(&lab, &t, 20);
    let names = tally(conns.iter().map(|(_, n)| n.clone()));
    assert_eq!(names.get("b1"), Some(&20), "{names:?}");
    let check = |lab: &Lab, when: &str| {
        let a = per_backend_u64(lab, &t, "active_conns");
        println!("{when}: active_conns {a:?}");
        assert_eq!(a.get("b1"), Some(&20), "{when}: active_conns {a:?}");
        assert_eq!(sum(&a), 20, "{when}: active_conns {a:?}");
    };
    check(&lab, "only b1 up");
    // b2 and b3 come up (new tables), then b3 goes down and up again (two more).
    backend(&mut lab, &b[1], "hc-b2", 8081, &[]);
    backend(&mut lab, &b[2], "hc-b3", 8081, &[]);
    wait_health(&lab, &t, &[("b1", true), ("b2", true), ("b3", true)], 10);
    check(&lab, "b2, b3 up");
    lab.kill("hc-b3");
    wait_health(&lab, &t, &[("b3", false)], 10);
    check(&lab, "b3 down");
    backend(&mut lab, &b[2], "hc-b3", 8081, &[]);
    wait_health(&lab, &t, &[("b3", true)], 10);
    check(&lab, "b3 up again");
    // wlc: the 20 connections weigh on b1, new ones go to b2 and b3.
    let got = get_ids(&t, 10);
    println!("10 new connections: {got:?}");
    let ok: Vec<String> = got
        .iter()
        .map(|r| r.clone().unwrap_or_else(|e| panic!("request failed: {e}")))
        .collect();
    assert!(
        !ok.iter().any(|n| n == "b1"),
        "wlc sent new flows to the loaded b1: {ok:?}"
    );
    check(&lab, "after 10 short connections");
    // The long-lived connections still work.
    for (s, _) in conns.iter().take(3) {
        let mut s = s;
        s.write_all(b"x").expect("long-lived connection broken");
    }
}

// ---- 4. admission thresholds ----------------------------------------------------------------

#[test]
fn admission() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("admit");
    let t = topo(&mut lab, 2);
    // Service-wide thresholds, and the same ones on b1 explicitly (both keys parse and apply).
    let o = Opts {
        balancer: SHORT_TIMEOUTS,
        service: "upper_conns = 5\nlower_conns = 3\n",
        backend: &["upper_conns = 5\nlower_conns = 3\n"],
        ..Opts::default()
    };
    start(&mut lab, &t, &config("wlc", 2, &o));
    wait_health(&lab, &t, &[("b1", true), ("b2", true)], 10);
    let mut conns = hold_many(&lab, &t, 10);
    let names = tally(conns.iter().map(|(_, n)| n.clone()));
    println!("10 connections: {names:?}");
    assert_eq!(names.get("b1"), Some(&5), "{names:?}");
    assert_eq!(names.get("b2"), Some(&5), "{names:?}");
    let s = lab.balancer_stats(&t);
    for b in ["b1", "b2"] {
        assert_eq!(
            lab.backend_stats(&t, &addr_of(b))["overloaded"],
            true,
            "{b} at its upper threshold is not overloaded: {}",
            s["backends"]
        );
    }
    // The 11th SYN is dropped: no backend may take it.
    let before = s["drops"]["overloaded"].as_u64().expect("drops.overloaded");
    let t0 = Instant::now();
    let r = hold(&t, Duration::from_secs(2));
    let drops = lab.balancer_stats(&t)["drops"]["overloaded"]
        .as_u64()
        .unwrap();
    println!(
        "11th connection: {:?} after {:?}; drops.overloaded {before} -> {drops}",
        r.as_ref().map(|(_, n)| n),
        t0.elapsed()
    );
    assert!(
        r.is_err(),
        "the 11th connection was accepted by {:?}",
        r.map(|x| x.1)
    );
    assert!(drops > before, "drops.overloaded did not move: {drops}");
    // Close 3 of b1's and 2 of b2's: b1 falls to 2 (< lower 3, takes flows again), b2 to 3
    // (not below lower: stays overloaded, the hysteresis).
    let mut close = HashMap::from([("b1", 3), ("b2", 2)]);
    conns.retain(|(_, n)| match close.get_mut(n.as_str()) {
        Some(k) if *k > 0 => {
            *k -= 1;
            false
        }
        _ => true,
    });
    let closed = Instant::now();
    let drained = lab.wait_for(Duration::from_secs(5 + 2 + 5), || {
        let a = per_backend_u64(&lab, &t, "active_conns");
        let i = per_backend_u64(&lab, &t, "inactive_conns");
        (a.get("b1") == Some(&2) && a.get("b2") == Some(&3) && sum(&i) == 0)
            .then(|| closed.elapsed())
    });
    let s = lab.balancer_stats(&t);
    println!(
        "after closing 5: drained after {drained:?}: {}",
        s["backends"]
    );
    assert!(drained.is_some(), "counts did not drain: {}", s["backends"]);
    assert_eq!(lab.backend_stats(&t, &addr_of("b1"))["overloaded"], false);
    assert_eq!(lab.backend_stats(&t, &addr_of("b2"))["overloaded"], true);
    // New connections are accepted again: 3 (b1 back to its upper threshold), all on b1.
    let more = hold_many(&lab, &t, 3);
    let names = tally(more.iter().map(|(_, n)| n.clone()));
    println!("3 new connections: {names:?}");
    assert_eq!(names.get("b1"), Some(&3), "{names:?}");
    // Then b1 is full again and b2 still above its lower threshold: refused.
    let r = hold(&t, Duration::from_secs(2));
    assert!(
        r.is_err(),
        "accepted by {:?} past both thresholds",
        r.map(|x| x.1)
    );
}

// ---- 5. passive outlier ejection ------------------------------------------------------------

/// How the bad backend fails: `--mode reset` accepts and resets every connection (SO_LINGER 0:
/// a RST after the handshake, before any data). A detector that counts only a RST to the SYN (no
/// listener) or an unanswered SYN would need b3's server not started at all instead.
const BAD_ARGS: &[&str] = &["--mode", "reset"];

#[test]
fn outlier_ejection() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("outlier");
    let t = lab.topology(3);
    let bs = t.backends.clone();
    backend(&mut lab, &bs[0], "srv-b1", 8080, &[]);
    backend(&mut lab, &bs[1], "srv-b2", 8080, &[]);
    backend(&mut lab, &bs[2], "srv-b3", 8080, BAD_ARGS);
    // No active checks: only the data path's observations can take b3 out.
    let o = Opts {
        health: Some("kind = \"none\"\n"),
        tables:
            "[service.outlier]\nconsecutive_failures = 3\nejection_s = 3\nmax_ejection_s = 30\n\
                 max_ejection_percent = 50\nsyn_timeout_ms = 1000\n",
        ..Opts::default()
    };
    start(&mut lab, &t, &config("rr", 3, &o));
    let b3 = addr_of("b3");
    // rr: every third new flow goes to b3 and fails until it is ejected.
    let mut sent = 0;
    let mut failures = 0;
    let ejected_at = loop {
        let st = lab.backend_stats(&t, &b3);
        if st["ejected"] == true {
            break Instant::now();
        }
        assert!(
            sent < 60,
            "b3 not ejected after {sent} requests ({failures} failed): {st}\n{}",
            lab.log("balancer")
        );
        failures += get_ids(&t, 3).iter().filter(|r| r.is_err()).count();
        sent += 3;
    };
    let st = lab.backend_stats(&t, &b3);
    println!("b3 ejected after {sent} requests, {failures} failed: {st}");
    assert!(failures >= 3, "{failures} failures");
    assert!(st["ejections"].as_u64().expect("ejections") >= 1, "{st}");
    // While ejected (3 s): 20 new flows, none to b3.
    let flows_before = st["flows"].as_u64().unwrap();
    let got = get_ids(&t, 20);
    let within = ejected_at.elapsed();
    let flows_after = lab.backend_stats(&t, &b3)["flows"].as_u64().unwrap();
    println!("20 flows while ejected ({within:?} after the ejection): {got:?}");
    assert!(
        within < Duration::from_secs(3),
        "too slow to test inside the ejection ({within:?})"
    );
    assert!(got.iter().all(|r| r.is_ok()), "{got:?}");
    assert_eq!(flows_after, flows_before, "b3 got flows while ejected");
    // After the ejection time it takes flows again (and fails, and is ejected again: fine).
    std::thread::sleep(
        Duration::from_secs(3).saturating_sub(ejected_at.elapsed()) + Duration::from_millis(500),
    );
    let back = lab.wait_for(Duration::from_secs(5), || {
        let _ = get_ids(&t, 3);
        (lab.backend_stats(&t, &b3)["flows"].as_u64().unwrap() > flows_after)
            .then(|| ejected_at.elapsed())
    });
    println!(
        "b3 took a flow again {back:?} after its ejection: {}",
        lab.backend_stats(&t, &b3)
    );
    assert!(
        back.is_some(),
        "b3 never came back: {}",
        lab.backend_stats(&t, &b3)
    );
}

// ---- 6. explain -----------------------------------------------------------------------------

#[test]
fn explain() {
    if !need_root() || !need_tool("curl") {
        return;
    }
    let _g = serial();
    let mut lab = Lab::new("explain");
    let t = topo(&mut lab, 3);
    start(&mut lab, &t, &config("wlc", 3, &Opts::default()));
    wait_health(&lab, &t, &[("b1", true), ("b2", true), ("b3", true)], 10);
    let q = |src: &str| format!("/explain?proto=tcp&src={src}&dst={VIP4}:80");
    // Established flows: /explain names the backend each connection reached.
    let conns = hold_many(&lab, &t, 4);
    for (s, name) in &conns {
        let src = s.local_addr().unwrap().to_string();
        let e = lab.balancer_get(&t, &q(&src));
        println!("{src} (on {name}): {e}");
        assert_eq!(e["service"]["scheduler"], "wlc", "{e}");
        assert_eq!(e["service"]["mode"], "nat", "{e}");
        assert_eq!(e["flow"]["backend"], addr_of(name), "{e}");
        assert_eq!(e["flow"]["state"], "established", "{e}");
        assert_eq!(e["decision"]["by"], "flow", "{e}");
        assert_eq!(e["decision"]["backend"], addr_of(name), "{e}");
        assert_eq!(e["backends"].as_array().map(Vec::len), Some(3), "{e}");
    }
    // New flows: the decision /explain predicts is where the next SYN from that port goes. Each
    // request changes the counts (wlc), so every prediction is for a different state.
    let mut seen = Vec::new();
    for i in 0..6u16 {
        let port = 41000 + i;
        let src = format!("192.0.2.2:{port}");
        let e = lab.balancer_get(&t, &q(&src));
        let again = lab.balancer_get(&t, &q(&src));
        assert_eq!(e["decision"], again["decision"], "explain changed state");
        assert!(e["flow"].is_null(), "{e}");
        assert_eq!(e["decision"]["by"], "scheduler", "{e}");
        let predicted = e["decision"]["backend"].as_str().unwrap_or("").to_owned();
        let got = lab
            .try_sh_timeout(
                &t.client,
                &format!("curl -sS --max-time 3 --local-port {port} http://{VIP4}/id"),
                Duration::from_secs(6),
            )
            .unwrap_or_else(|err| panic!("curl from port {port}: {err}"));
        let got = got.trim().to_owned();
        println!("port {port}: predicted {predicted}, reached {got}");
        assert_eq!(predicted, addr_of(&got), "{e}");
        seen.push(got);
    }
    println!("new flows reached {:?}", tally(seen));
    // Unknown service: null service, decision by none.
    let e = lab.balancer_get(
        &t,
        "/explain?proto=tcp&src=192.0.2.2:41100&dst=203.0.113.99:80",
    );
    assert!(e["service"].is_null(), "{e}");
    assert_eq!(e["decision"]["by"], "none", "{e}");
    drop(conns);
}
