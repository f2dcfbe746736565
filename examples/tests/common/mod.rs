//! Shared harness of the end-to-end tests: network namespaces, veth pairs, bridges, real servers
//! and clients, all removed by a `Drop` guard on every path (including a failed assertion).
//!
//! # Topology (what [`Lab::topology`] builds; the demo script can run the same commands)
//! ```text
//!  client ns (C)                 balancer ns (L)                          backend ns (B1..B3)
//!  c0 192.0.2.2/24   <-veth->  c1 192.0.2.1/24                       br0 port bN <-veth-> e0 198.51.100.1N/24
//!     2001:db8:c::2/64            2001:db8:c::1/64                                         2001:db8:b::1N/64
//!  default via 192.0.2.1       br0 198.51.100.1/24, 2001:db8:b::1/64                   default via 198.51.100.1
//!                              lb0 (TUN, made by tun-balancer): VIP and SNAT routes
//! ```
//! Commands, in order (`$C`, `$L`, `$Bn` are namespace names):
//! ```text
//! ip netns add $C; ip netns add $L; ip netns add $Bn          # each: ip -n NS link set lo up
//! ip -n $L link add c1 type veth peer name c0 netns $C
//! ip -n $L link add br0 type bridge; ip -n $L link set br0 up
//! ip -n $L link add bN type veth peer name e0 netns $Bn; ip -n $L link set bN master br0 up
//! ip -n $C addr add 192.0.2.2/24 dev c0; ip -n $C addr add 2001:db8:c::2/64 dev c0 nodad
//! ip -n $L addr add 192.0.2.1/24 dev c1;  ip -n $L addr add 2001:db8:c::1/64 dev c1 nodad
//! ip -n $L addr add 198.51.100.1/24 dev br0; ip -n $L addr add 2001:db8:b::1/64 dev br0 nodad
//! ip -n $Bn addr add 198.51.100.1N/24 dev e0; ip -n $Bn addr add 2001:db8:b::1N/64 dev e0 nodad
//! (all links up) ip -n $C route add default via 192.0.2.1; ip -n $C -6 route add default via 2001:db8:c::1
//! ip -n $Bn route add default via 198.51.100.1; ip -n $Bn -6 route add default via 2001:db8:b::1
//! ip netns exec $L sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
//!     net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
//! # once tun-balancer has created lb0 (mode nat):
//! ip -n $L route add 203.0.113.10/32 dev lb0; ip -n $L route add 203.0.113.100/32 dev lb0
//! ip -n $L -6 route add 2001:db8:10::10/128 dev lb0; ip -n $L -6 route add 2001:db8:100::100/128 dev lb0
//! ```
//! No nftables rule is loaded in the balancer's namespace, so kernel conntrack (and its fragment
//! reassembly) stays out of the way of the TUN device.
#![allow(dead_code, missing_docs, unreachable_pub)]

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Prefix of every namespace the tests create: `lbt-<pid>-<test>-<role>`.
pub const NS_PREFIX: &str = "lbt-";

/// Whether we are root; prints the skip line when not.
pub fn need_root() -> bool {
    let uid = Command::new("id").arg("-u").output().ok().and_then(|o| {
        String::from_utf8(o.stdout)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    });
    if uid == Some(0) {
        true
    } else {
        skipped("needs root");
        false
    }
}

/// Prints a skip line, and appends it to the file named by `LB_SKIP_LOG` when set: the test
/// harness captures a passing test's output, so `.ci/run` (root, where nothing may be skipped)
/// reads that file instead.
pub fn skipped(why: &str) {
    println!("skipped: {why}");
    if let Some(path) = std::env::var_os("LB_SKIP_LOG") {
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "skipped: {why} ({test})");
        }
    }
}

/// Whether a program is on the PATH; prints a skip line when not.
pub fn need_tool(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skipped(&format!("needs {tool}"));
    }
    ok
}

/// Runs `program args` with a timeout; returns stdout, or an error with stderr.
pub fn run_timeout(timeout: Duration, program: &str, args: &[&str]) -> Result<String, String> {
    let secs = format!("{}", timeout.as_secs().max(1));
    let out = Command::new("timeout")
        .args(["-k", "2", &secs, program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Deletes namespaces left by test processes that no longer exist (a test killed by a signal cannot
/// run its `Drop`).
fn reap_stale() {
    let Ok(list) = run_timeout(Duration::from_secs(5), "ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = kill_all_in_ns(name);
            let _ = run_timeout(Duration::from_secs(5), "ip", &["netns", "del", name]);
        }
    }
}

fn kill_all_in_ns(ns: &str) -> Result<String, String> {
    // `ip netns pids` lists every process whose network namespace is `ns`.
    let pids = run_timeout(Duration::from_secs(5), "ip", &["netns", "pids", ns])?;
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    Ok(pids)
}

/// A running process in a namespace (its own process group, killed as a group).
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// A set of namespaces and processes, removed when dropped.
pub struct Lab {
    /// `lbt-<pid>-<test>`.
    pub prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    /// A scratch directory (server roots, configs, logs), removed when dropped.
    pub dir: PathBuf,
}

impl Lab {
    /// A new, empty lab for test `test` (a short unique tag: letters, digits, dashes).
    pub fn new(test: &str) -> Lab {
        reap_stale();
        let prefix = format!("{NS_PREFIX}{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create lab directory");
        Lab {
            prefix,
            namespaces: Vec::new(),
            procs: Vec::new(),
            dir,
        }
    }

    /// Creates namespace `<prefix>-<role>` with `lo` up; returns its name.
    pub fn ns(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        run_timeout(Duration::from_secs(10), "ip", &["netns", "add", &name])
            .unwrap_or_else(|e| panic!("{e}"));
        self.namespaces.push(name.clone());
        self.ip(&name, "link set lo up");
        // Forwarding and rp_filter are per namespace; IPv6 DAD would delay addresses.
        self.sh(
            &name,
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        );
        name
    }

    /// `ip -n NS ARGS` (split on whitespace); panics on failure.
    pub fn ip(&self, ns: &str, args: &str) {
        let mut v = vec!["-n", ns];
        v.extend(args.split_whitespace());
        run_timeout(Duration::from_secs(10), "ip", &v).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs a shell script in a namespace with a timeout; `Err` carries stderr.
    pub fn try_sh_timeout(
        &self,
        ns: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        run_timeout(timeout, "ip", &["netns", "exec", ns, "sh", "-c", script])
    }

    /// Runs a shell script in a namespace (30 s timeout); `Err` carries stderr.
    pub fn try_sh(&self, ns: &str, script: &str) -> Result<String, String> {
        self.try_sh_timeout(ns, script, Duration::from_secs(30))
    }

    /// Runs a shell script in a namespace; panics on failure.
    pub fn sh(&self, ns: &str, script: &str) -> String {
        self.try_sh(ns, script).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A veth pair: `a_if` in `a_ns`, `b_if` in `b_ns`, both up.
    pub fn veth(&self, a_ns: &str, a_if: &str, b_ns: &str, b_if: &str) {
        self.ip(
            a_ns,
            &format!("link add {a_if} type veth peer name {b_if} netns {b_ns}"),
        );
        self.ip(a_ns, &format!("link set {a_if} up"));
        self.ip(b_ns, &format!("link set {b_if} up"));
    }

    /// Adds an address (IPv6 without duplicate address detection).
    pub fn addr(&self, ns: &str, dev: &str, cidr: &str) {
        let nodad = if cidr.contains(':') { " nodad" } else { "" };
        self.ip(ns, &format!("addr add {cidr} dev {dev}{nodad}"));
    }

    /// Starts `argv` in a namespace, in its own process group, output to a log file.
    pub fn spawn(&mut self, ns: &str, name: &str, argv: &[&str]) {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
    }

    /// The pid of a spawned process.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
    }

    /// Sends `signal` (e.g. "HUP") to a spawned process.
    pub fn signal(&self, name: &str, signal: &str) {
        if let Some(pid) = self.pid(name) {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// Whether a spawned process is still running.
    pub fn alive(&mut self, name: &str) -> bool {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for a spawned process to exit; its exit code.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
                if let Ok(Some(st)) = p.child.try_wait() {
                    return Some(st.code().unwrap_or(-1));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kills a spawned process group (SIGKILL) and reaps it.
    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|p| p.name == name) {
            let mut p = self.procs.remove(i);
            kill_proc(&mut p);
        }
    }

    /// The log of a spawned process so far.
    pub fn log(&self, name: &str) -> String {
        let path = self.dir.join(format!("{name}.log"));
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(&self, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until something listens on TCP `port` in `ns` (via `ss`).
    pub fn wait_listen(&self, ns: &str, proto: &str, port: u16) {
        let flag = if proto == "udp" { "-uln" } else { "-tln" };
        let ok = self.wait_for(Duration::from_secs(10), || {
            let out = self
                .try_sh(ns, &format!("ss -H {flag} 'sport = :{port}'"))
                .ok()?;
            (!out.trim().is_empty()).then_some(())
        });
        assert!(
            ok.is_some(),
            "nothing listens on {proto} port {port} in {ns}"
        );
    }

    /// Builds the standard topology (see the module docs) with `n` backends.
    pub fn topology(&mut self, n: usize) -> Topo {
        let c = self.ns("c");
        let l = self.ns("l");
        self.veth(&l, "c1", &c, "c0");
        self.addr(&c, "c0", "192.0.2.2/24");
        self.addr(&c, "c0", "2001:db8:c::2/64");
        self.addr(&l, "c1", "192.0.2.1/24");
        self.addr(&l, "c1", "2001:db8:c::1/64");
        self.ip(&c, "route add default via 192.0.2.1");
        self.ip(&c, "-6 route add default via 2001:db8:c::1");
        self.ip(&l, "link add br0 type bridge");
        self.ip(&l, "link set br0 up");
        self.addr(&l, "br0", "198.51.100.1/24");
        self.addr(&l, "br0", "2001:db8:b::1/64");
        self.sh(
            &l,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
             net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
        );
        let mut backends = Vec::new();
        for i in 1..=n {
            let b = self.ns(&format!("b{i}"));
            let port = format!("b{i}");
            self.veth(&l, &port, &b, "e0");
            self.ip(&l, &format!("link set {port} master br0"));
            let v4 = format!("198.51.100.{}", 10 + i);
            let v6 = format!("2001:db8:b::{}", 10 + i);
            self.addr(&b, "e0", &format!("{v4}/24"));
            self.addr(&b, "e0", &format!("{v6}/64"));
            self.ip(&b, "route add default via 198.51.100.1");
            self.ip(&b, "-6 route add default via 2001:db8:b::1");
            backends.push(BackendNs {
                ns: b,
                name: format!("b{i}"),
                v4: v4.parse().expect("v4"),
                v6: v6.parse().expect("v6"),
            });
        }
        Topo {
            client: c,
            balancer: l,
            backends,
        }
    }

    /// Starts `python3 -m http.server` in a backend namespace on `[::]:port` (dual stack), serving
    /// a directory whose file `id` holds the backend's name.
    pub fn http_server(&mut self, b: &BackendNs, port: u16) {
        let root = self.dir.join(format!("www-{}", b.name));
        std::fs::create_dir_all(&root).expect("www dir");
        std::fs::write(root.join("id"), format!("{}\n", b.name)).expect("id file");
        // A 4 MiB file for transfers that take a while.
        std::fs::write(root.join("big"), vec![b'x'; 4 << 20]).expect("big file");
        let root = root.to_string_lossy().into_owned();
        let port_s = port.to_string();
        let name = format!("http-{}", b.name);
        self.spawn(
            &b.ns,
            &name,
            &[
                python(),
                "-m",
                "http.server",
                &port_s,
                "--bind",
                "::",
                "--directory",
                &root,
            ],
        );
        self.wait_listen(&b.ns, "tcp", port);
    }

    /// Starts a socat UDP echo server in a namespace bound to `addr:port` (binding the exact
    /// address makes replies leave from it, which matters when it is a VIP).
    pub fn udp_echo(&mut self, ns: &str, name: &str, addr: IpAddr, port: u16) {
        let listen = match addr {
            IpAddr::V4(a) => format!("UDP4-RECVFROM:{port},bind={a},fork,reuseaddr"),
            IpAddr::V6(a) => format!("UDP6-RECVFROM:{port},bind=[{a}],fork,reuseaddr"),
        };
        self.spawn(ns, name, &["socat", "-T", "2", &listen, "EXEC:cat"]);
        self.wait_listen(ns, "udp", port);
    }

    /// Sends `msg` over UDP from `ns` to `addr:port` with socat and returns the answer.
    pub fn udp_ask(&self, ns: &str, addr: IpAddr, port: u16, msg: &str) -> Result<String, String> {
        let target = match addr {
            IpAddr::V4(a) => format!("UDP4:{a}:{port}"),
            IpAddr::V6(a) => format!("UDP6:[{a}]:{port}"),
        };
        self.try_sh_timeout(
            ns,
            &format!("printf '%s' '{msg}' | socat -T 2 - {target}"),
            Duration::from_secs(5),
        )
    }

    /// Fetches `url` `count` times from `ns` with one curl process (one new connection, hence one
    /// new source port, per request: the server speaks HTTP/1.0); returns the bodies' lines.
    pub fn curl_many(&self, ns: &str, url: &str, count: usize) -> Result<Vec<String>, String> {
        let urls = std::iter::repeat_n(url, count)
            .collect::<Vec<_>>()
            .join(" ");
        let out = self.try_sh_timeout(
            ns,
            &format!("curl -sS -g --max-time 5 --retry 0 -H 'Connection: close' {urls}"),
            Duration::from_secs(30 + count as u64 / 10),
        )?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// Counts lines per distinct value.
    pub fn tally(lines: &[String]) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for l in lines {
            *m.entry(l.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Writes a file in the lab directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, contents).expect("write lab file");
        p
    }
}

fn kill_proc(p: &mut Proc) {
    let pgid = p.child.id();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = p.child.kill();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if !matches!(p.child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            kill_proc(p);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = kill_all_in_ns(ns);
            let _ = run_timeout(Duration::from_secs(10), "ip", &["netns", "del", ns]);
        }
        if std::env::var_os("LB_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A backend namespace of the standard topology.
#[derive(Debug, Clone)]
pub struct BackendNs {
    pub ns: String,
    pub name: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

/// The namespaces of the standard topology.
#[derive(Debug, Clone)]
pub struct Topo {
    pub client: String,
    pub balancer: String,
    pub backends: Vec<BackendNs>,
}

/// The python interpreter to use for servers (the system one when present).
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The `tun-balancer` binary built for these tests.
pub fn balancer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tun-balancer")
}

impl Lab {
    /// Writes `config` and starts `tun-balancer` in the balancer namespace as process
    /// `balancer`; waits for its device (`dev`) and then adds `routes` (`ip route add` arguments,
    /// e.g. `"203.0.113.10/32 dev lb0"`).
    pub fn start_balancer(&mut self, t: &Topo, dev: &str, config: &str, routes: &[&str]) {
        let path = self.write("balancer.toml", config);
        let path = path.to_string_lossy().into_owned();
        self.spawn(
            &t.balancer,
            "balancer",
            &[balancer_bin(), "--config", &path],
        );
        let up = self.wait_for(Duration::from_secs(10), || {
            self.try_sh(&t.balancer, &format!("ip link show {dev} | grep -q UP"))
                .ok()
        });
        assert!(
            up.is_some(),
            "balancer did not bring {dev} up: {}",
            self.log("balancer")
        );
        for r in routes {
            let fam = if r.contains(':') { "-6 " } else { "" };
            self.ip(&t.balancer, &format!("{fam}route add {r}"));
        }
    }

    /// Writes a new `balancer.toml`, sends the balancer SIGHUP and waits (5 s) for its log to
    /// show `needle` ("configuration reloaded", "reload rejected", a refusal's message);
    /// panics with the log otherwise.
    pub fn reload_balancer(&self, config: &str, needle: &str) {
        self.write("balancer.toml", config);
        self.signal("balancer", "HUP");
        let seen = self.wait_for(Duration::from_secs(5), || {
            self.log("balancer").contains(needle).then_some(())
        });
        assert!(
            seen.is_some(),
            "no {needle:?} in the log: {}",
            self.log("balancer")
        );
    }

    /// The balancer's statistics (JSON served on 127.0.0.1:9100 inside its namespace).
    pub fn balancer_stats(&self, t: &Topo) -> serde_json::Value {
        let out = self
            .try_sh(&t.balancer, "curl -sS --max-time 3 http://127.0.0.1:9100/")
            .unwrap_or_else(|e| panic!("stats: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats JSON {out:?}: {e}"))
    }

    /// Flows per backend address from the statistics.
    pub fn flows_per_backend(&self, t: &Topo) -> HashMap<String, u64> {
        let s = self.balancer_stats(t);
        let mut m = HashMap::new();
        for b in s["backends"].as_array().cloned().unwrap_or_default() {
            let addr = b["addr"].as_str().unwrap_or("").to_owned();
            *m.entry(addr).or_insert(0) += b["flows"].as_u64().unwrap_or(0);
        }
        m
    }
}

/// Standard NAT-mode configuration: TCP `vip:80` → backends `:8080` and UDP `vip:53` →
/// backends `:7000` for each family in `families` ("4", "6"), maglev, HTTP and UDP health checks.
pub fn nat_config(mode: &str, families: &[&str], health_interval_ms: u64) -> String {
    let mut c = String::from(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"203.0.113.100\", \"2001:db8:100::100\"]\n\
         conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\n\
         hash_key = \"e2e cluster secret 0123456789\"\n",
    );
    for fam in families {
        let v4 = *fam == "4";
        let vip = if v4 {
            "203.0.113.10"
        } else {
            "[2001:db8:10::10]"
        };
        let b = |i: u32| {
            if v4 {
                format!("198.51.100.{}", 10 + i)
            } else {
                format!("[2001:db8:b::{}]", 10 + i)
            }
        };
        // HTTP checks of the python servers (GET /id), UDP checks of the socat echo servers.
        for (proto, port, bport, check) in [
            ("tcp", 80, 8080, "kind = \"http\"\npath = \"/id\"\n"),
            (
                "udp",
                53,
                7000,
                "kind = \"udp\"\nsend = \"ping\"\nexpect = \"ping\"\n",
            ),
        ] {
            c.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}:{port}\"\nproto = \"{proto}\"\nmode = \"{mode}\"\nscheduler = \"maglev\"\n\
                 [service.health]\n{check}interval_ms = {health_interval_ms}\nrise = 2\nfall = 2\n"
            ));
            for i in 1..=3 {
                c.push_str(&format!(
                    "[[service.backend]]\naddr = \"{}:{bport}\"\nweight = 1\n",
                    b(i)
                ));
            }
        }
    }
    c
}

/// The `lb-decap` binary built for these tests.
pub fn decap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb-decap")
}

/// The `--allow` list of [`Lab::decap_agent`]: where the tests' balancers take their tunnels'
/// outer source addresses (`balancer.snat_addrs`).
pub const DECAP_ALLOW: &str = "203.0.113.0/24,2001:db8:100::/64";

impl Lab {
    /// Mode `dr` on backend `i` (0-based): MAC `02:00:00:00:00:1<i+1>` on its `e0`, the VIPs on
    /// `lo` ([`Lab::vip_on_backend`]), and no ARP answers for them (the balancer owns them on the
    /// wire).
    pub fn dr_backend(&self, i: usize, b: &BackendNs, vips: &[&str]) {
        self.ip(
            &b.ns,
            &format!("link set e0 address 02:00:00:00:00:1{}", i + 1),
        );
        self.vip_on_backend(b, vips);
        self.sh(
            &b.ns,
            "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
        );
    }

    /// Makes a backend answer for the VIPs itself (tunnel and direct-routing modes): the VIPs on
    /// `lo`, reverse-path filtering off.
    pub fn vip_on_backend(&self, b: &BackendNs, vips: &[&str]) {
        self.sh(
            &b.ns,
            "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
             net.ipv4.conf.lo.rp_filter=0",
        );
        for v in vips {
            let cidr = if v.contains(':') {
                format!("{v}/128")
            } else {
                format!("{v}/32")
            };
            self.addr(&b.ns, "lo", &cidr);
        }
    }

    /// Starts `lb-decap` in a backend namespace on TUN device `dc0` (GUE on UDP 6080), taking
    /// tunnel packets from the balancers' outer sources only: the tests' `snat_addrs` are in
    /// 203.0.113.0/24 and 2001:db8:100::/64.
    pub fn decap_agent(&mut self, b: &BackendNs) {
        self.decap_agent_allowing(b, DECAP_ALLOW);
    }

    /// [`Lab::decap_agent`] with another `--allow` list.
    pub fn decap_agent_allowing(&mut self, b: &BackendNs, allow: &str) {
        let name = format!("decap-{}", b.name);
        self.spawn(
            &b.ns,
            &name,
            &[
                decap_bin(),
                "--device",
                "dc0",
                "--gue-port",
                "6080",
                "--allow",
                allow,
            ],
        );
        let up = self.wait_for(Duration::from_secs(10), || {
            self.try_sh(&b.ns, "ip link show dc0 | grep -q UP").ok()
        });
        assert!(up.is_some(), "lb-decap did not start: {}", self.log(&name));
        self.sh(&b.ns, "sysctl -qw net.ipv4.conf.dc0.rp_filter=0");
    }

    /// Mode `dr`: puts the balancer's TAP device `lb0` (MAC `mac`) on the backends' bridge and
    /// routes the test VIPs (203.0.113.10, 2001:db8:10::10) to it.
    pub fn attach_dr(&self, t: &Topo, mac: &str) {
        let l = &t.balancer;
        self.ip(l, "link set lb0 master br0");
        self.sh(l, &format!("bridge fdb add {mac} dev lb0 master static"));
        self.ip(
            l,
            &format!("neigh add 198.51.100.254 lladdr {mac} dev br0 nud permanent"),
        );
        self.ip(l, "route add 203.0.113.10/32 via 198.51.100.254 dev br0");
        self.ip(
            l,
            &format!("-6 neigh add 2001:db8:b::254 lladdr {mac} dev br0 nud permanent"),
        );
        self.ip(
            l,
            "-6 route add 2001:db8:10::10/128 via 2001:db8:b::254 dev br0",
        );
    }

    /// Whether the kernel can make a link of `kind` (e.g. "ipip", "ip6tnl"): tries one in `ns`.
    pub fn kernel_has_link(&self, ns: &str, kind: &str) -> bool {
        let ok = self
            .try_sh(ns, &format!("ip link add lbprobe0 type {kind} 2>/dev/null"))
            .is_ok();
        if ok {
            let _ = self.try_sh(ns, "ip link del lbprobe0");
        }
        ok
    }

    /// Makes the backend's own kernel decapsulate IPIP and IP6IP6 (where it has `ipip` and
    /// `ip6tnl`): the fallback devices `tunl0` / `ip6tnl0` accept tunnel packets from anyone.
    pub fn kernel_decap(&self, b: &BackendNs) {
        self.sh(
            &b.ns,
            "modprobe ipip 2>/dev/null; modprobe ip6_tunnel 2>/dev/null; \
             ip link set tunl0 up && ip link set ip6tnl0 up && \
             sysctl -qw net.ipv4.conf.tunl0.rp_filter=0",
        );
    }

    /// Starts a tshark capture in `ns` on `dev` with a capture filter; returns the file path.
    pub fn capture(&mut self, ns: &str, dev: &str, filter: &str) -> PathBuf {
        let file = self.dir.join(format!("{ns}-{dev}.pcapng"));
        let f = file.to_string_lossy().into_owned();
        let _ = std::fs::File::create(&file);
        self.spawn(
            ns,
            "tshark",
            &["tshark", "-n", "-i", dev, "-f", filter, "-w", &f],
        );
        let started = self.wait_for(Duration::from_secs(15), || {
            self.log("tshark").contains("Capturing on").then_some(())
        });
        assert!(
            started.is_some(),
            "tshark did not start: {}",
            self.log("tshark")
        );
        file
    }

    /// Stops the capture and returns `tshark -r` output with `args`.
    pub fn stop_capture(&mut self, file: &Path) {
        self.signal("tshark", "INT");
        let _ = self.wait_exit("tshark", Duration::from_secs(10));
        self.kill("tshark");
        assert!(file.exists());
    }
}

/// Reads a capture with tshark; returns stdout.
pub fn tshark_read(file: &Path, args: &[&str]) -> String {
    let f = file.to_string_lossy().into_owned();
    let mut v = vec!["-n", "-r", f.as_str()];
    v.extend_from_slice(args);
    run_timeout(Duration::from_secs(60), "tshark", &v).unwrap_or_else(|e| panic!("{e}"))
}

// ---- in-process clients inside a namespace, the balancer's explain endpoint -----------------

/// Runs `f` on a new thread that has entered network namespace `ns` (`setns` on
/// `/run/netns/NS`); returns its result. Sockets made there stay in `ns` for their whole life,
/// so the caller may keep and use them from any thread (long-lived connections, load clients).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_ns(&path);
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// Moves the calling thread into the network namespace at `path`; panics on failure.
#[allow(unsafe_code)]
pub fn enter_ns(path: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: `setns` only reads the descriptor, which `f` keeps open for the call; it changes the
    // network namespace of this thread alone (CLONE_NEWNET), which owns no sockets yet.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// A TCP connection made from namespace `ns` (connect timeout `timeout`).
pub fn connect_in(
    ns: &str,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    in_ns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, timeout)
    })
}

impl Lab {
    /// A flooder namespace on its own link to the balancer (192.0.3.2/24, the balancer
    /// 192.0.3.1): the balancer routes everything it does not know there (the answers to
    /// spoofed sources), where it dies. Returns the namespace.
    pub fn flooder(&mut self, t: &Topo) -> String {
        let f = self.ns("f");
        self.veth(&t.balancer, "f1", &f, "f0");
        self.addr(&f, "f0", "192.0.3.2/24");
        self.addr(&t.balancer, "f1", "192.0.3.1/24");
        self.ip(&f, "route add default via 192.0.3.1");
        self.ip(&t.balancer, "route add default via 192.0.3.2");
        f
    }

    /// Moves process `name` into the cgroup `group` (v1 `cpu` controller, made from the host
    /// side: inside `ip netns exec` /sys is the namespace's own) whose quota is `percent` % of
    /// one core; whether it could. A flooder on this 2-core VM otherwise offers more than the
    /// VM moves through TUN at all, which measures the VM, not the balancer. Remove the group
    /// with [`Lab::uncap_cpu`] once the process is gone.
    pub fn cap_cpu(&self, name: &str, group: &str, percent: u32) -> bool {
        let Some(pid) = self.pid(name) else {
            return false;
        };
        let dir = std::path::Path::new("/sys/fs/cgroup/cpu").join(group);
        let _ = std::fs::create_dir(&dir);
        // A short period keeps the flood smooth (a 100 ms one lets it burst at full speed).
        let period = 10_000u32;
        std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()).is_ok()
            && std::fs::write(
                dir.join("cpu.cfs_quota_us"),
                (period / 100 * percent).to_string(),
            )
            .is_ok()
            && std::fs::write(dir.join("cgroup.procs"), pid.to_string()).is_ok()
    }

    /// Removes the cgroup [`Lab::cap_cpu`] made (it goes only once empty).
    pub fn uncap_cpu(&self, group: &str) {
        let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup/cpu").join(group));
    }
}

impl Lab {
    /// Stops the balancer (SIGKILL) and waits until its device `dev` is gone, so that
    /// [`Lab::start_balancer`] can start a fresh one.
    pub fn stop_balancer(&mut self, t: &Topo, dev: &str) {
        self.kill("balancer");
        let gone = self.wait_for(Duration::from_secs(10), || {
            self.try_sh(&t.balancer, &format!("ip link show {dev}"))
                .is_err()
                .then_some(())
        });
        assert!(
            gone.is_some(),
            "{dev} still exists after the balancer exited"
        );
    }

    /// `GET path` on the balancer's stats port (e.g. `/explain?proto=tcp&src=..&dst=..`), as JSON.
    pub fn balancer_get(&self, t: &Topo, path: &str) -> serde_json::Value {
        let out = self
            .try_sh(
                &t.balancer,
                &format!("curl -sS -g --max-time 3 'http://127.0.0.1:9100{path}'"),
            )
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{path}: JSON {out:?}: {e}"))
    }

    /// `GET path` on the balancer's stats port as JSON; `None` while it does not answer (e.g. a
    /// balancer still starting).
    pub fn try_balancer_get(&self, t: &Topo, path: &str) -> Option<serde_json::Value> {
        let out = self
            .try_sh(
                &t.balancer,
                &format!("curl -sS -g --max-time 3 'http://127.0.0.1:9100{path}'"),
            )
            .ok()?;
        serde_json::from_str(&out).ok()
    }

    /// The `backends[]` element of the statistics whose `addr` is `addr` (e.g.
    /// `198.51.100.11:8080`); `Null` when absent.
    pub fn backend_stats(&self, t: &Topo, addr: &str) -> serde_json::Value {
        let s = self.balancer_stats(t);
        s["backends"]
            .as_array()
            .and_then(|v| v.iter().find(|b| b["addr"] == addr).cloned())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A TCP connection from the exact IPv4 source `src` (address and port; `SO_REUSEADDR`) to
/// `dst`, failing with `TimedOut` after `timeout`; call it on a thread inside the namespace.
/// Load clients pick their own source ports with it, so that no port is used twice in a run
/// (the kernel's choice cycles back to recently closed ports, whose flows the balancer still
/// holds in TIME_WAIT).
#[allow(unsafe_code)]
pub fn connect_from(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    fn sockaddr(a: std::net::SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain system calls on a descriptor this function creates; the `TcpStream` takes
    // sole ownership of it at once (closing it on every early return); the addresses passed are
    // live `sockaddr_in` values of the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let s = sockaddr(src);
        if libc::bind(fd, (&raw const s).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Linux bounds a blocking connect by SO_SNDTIMEO (EINPROGRESS when it expires).
        stream.set_write_timeout(Some(timeout))?;
        let d = sockaddr(dst);
        if libc::connect(fd, (&raw const d).cast(), len) != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EINPROGRESS) {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            } else {
                e
            });
        }
        stream.set_write_timeout(None)?;
        Ok(stream)
    }
}
