//! Issue 17's measurements: `tun-balancer`s in `[ha] mode = "active-active"` behind a BIRD
//! router's ECMP route (the `ha_lab::ecmp` lab, built once with 4 balancers). A measurement, not
//! a test of behaviour: ignored by default; run with
//! `cargo test --release -p lb-examples --test ecmp_perf -- --ignored --nocapture`
//! (the results and what they mean: `benches/results/ecmp.md`).
//!
//! Every run starts a fresh set of balancers (empty tables) on the one lab and stops them after,
//! so the router's BGP sessions stay up between runs and each balancer's BIRD announces the VIP
//! only while its balancer says so (`bgp_socket`, the static route anchored on `lb0`). Between
//! runs each node's `back0` gets back its own address alone and every neighbour table is flushed.
//! Repetitions: `LB_ECMP_PERF_REPS` (default 3); medians are over them. `LB_ECMP_PERF_PARTS`
//! (default `throughput,sync,takeover`) picks the parts.
//!
//! # 1. Aggregate throughput with N = 1, 2, 3 balancers
//! Modes (`LB_ECMP_PERF_MODES`, default `kernel,tunnel,nat`): `tunnel` (GUE to an `lb-decap` agent
//! on each backend, which answers the client straight through the router), `nat` (each node SNATs
//! from its own address; replies come back through it), and `kernel`, the same-run peer: no
//! tun-balancer, each balancer namespace's kernel routes the VIP to the backends
//! ([`EcmpLab::forward_kernel`]), announced by hand (a veth `lb0` anchors the static route).
//! The load: `LB_ECMP_PERF_CONNS` (default 24) TCP connections from the client to VIP:5001, each
//! a thread of this test in the client namespace writing 128 KiB buffers as fast as it can;
//! the router's ECMP spreads them (by each socket's flow hash) over the N balancers. Each backend
//! runs a sink (threads of this test in its namespace, `read` into 256 KiB). The window starts
//! 1.5 s after every connection is up and lasts `LB_ECMP_PERF_SECS` (default 6 s).
//!
//! With N = 1 the node's `[ha]` names node 2 as its peer all the same (`[ha]` wants one), which
//! runs nothing: the node serves alone.
//!
//! Measured over the window: the bytes the sinks read (goodput, in Gbit/s); each balancer's
//! share (an nftables `netdev` ingress counter on its `front0`: bytes of TCP to VIP:5001, and the
//! SYNs it saw, i.e. its connections); the CPU (user + system, `/proc/PID/stat`) of each
//! tun-balancer process and of its `datapath-*` threads, of the `lb-decap` agents together and of
//! this test process (the load generator and the sinks), of kernel threads (ksoftirqd, kworkers),
//! of the lab's other processes and of every other process on the machine (a census of `/proc`:
//! the machine may be shared), as % of one core; the machine's CPU (`/proc/stat`: busy and
//! softirq, as % of one core, 200 % = both cores); packets the kernel could not queue to a
//! balancer's TUN device (`lb0` `tx_dropped`).
//!
//! # 2. Sync traffic per balancer as N grows (N = 2, 3, 4; mode `nat`)
//! A sender in the client namespace (a raw IPv4 socket, as in `ha_perf.rs`) sends one 50-byte UDP
//! datagram per new flow to VIP:7001 at `LB_ECMP_PERF_FLOW_RATE` (default 2 000) flows/s for
//! `LB_ECMP_PERF_SYNC_SECS` (default 8 s); flow `i` comes from 192.0.2.100 + i / 60 000, port
//! 1024 + i % 60 000, so no 5-tuple repeats and the router spreads the flows by their 5-tuple
//! (these packets carry no socket hash). The backends count and drop them (nftables), so each flow
//! is one packet, one new conntrack entry on the balancer that got it, and one record for its
//! peers. Each node's `ha.sync` counters (stats JSON) are read before the load, at its end and
//! 6 s later (past the next refresh pass, `refresh_s` = 5 by default: a pass resends the flows
//! that saw a packet since the previous one; these flows see one packet, so what a pass adds after
//! the load shows in the difference between the two readings). Also read: sequence gaps,
//! resync requests, bulk dumps sent, records dropped on a busy data path, and the UDP datagrams
//! each namespace's kernel dropped for a full socket buffer. Since each peer has its own sync
//! stream, the counters count every datagram to every peer; an nftables `output` counter in each
//! balancer namespace checks them against what leaves for the peers: sync datagrams (UDP to port
//! 7400 whose payload starts with `LC`) and heartbeats (`LH`), IP bytes. (The first version of
//! this measurement ran when one encoded datagram went to every peer and counted once, and told
//! streamed from unicast datagrams by comparing the two; `benches/results/ecmp.md` keeps those
//! figures.) Own flows per node: an ingress counter of UDP
//! to VIP:7001 on its `front0`.
//!
//! # 3. Takeover of a dead balancer's flows (N = 3, mode `nat`)
//! `LB_ECMP_PERF_PROBE_FLOWS` (default 24) UDP flows from the client to the echo service VIP:7000
//! (`server.py` on the backends), each sending a numbered datagram every 5 ms; a thread per flow
//! timestamps the echoes. An nftables set on each balancer's `front0` ingress records the source
//! ports it sees, so the flows of node 2 (the one that dies) are known just before it does. Three
//! ways to die, each `LB_ECMP_PERF_REPS` times:
//! - `kill -9` of node 2's tun-balancer: its TUN device goes, so its BIRD withdraws the VIP;
//! - `kill -9` of node 2's BIRD, then of its tun-balancer: the router's BGP session is closed by
//!   the kernel of node 2 (a FIN), not by BFD;
//! - the whole node cut off (its switch ports down, then both processes killed): nothing tells the
//!   router but BFD (100 ms × 3), nothing tells the peers but the missing heartbeats.
//!
//! Measured: the time from the kill to the router's route without node 2
//! ([`EcmpLab::wait_next_hops`], polling `ip route`), to node 1 holding node 2's back address
//! (polling `ip addr`; from then on the backends' replies to node 2's SNAT address reach node 1, which
//! has the flows from sync), and the echoes at the client, from 1 s before the kill to 3 s after
//! it: for each of node 2's flows the longest gap between two echoes and the time from the kill
//! to the echo that ended that gap; for the other flows the longest gap (their jitter, and any
//! move the router's new hash-threshold split causes).
#![allow(missing_docs)]

mod common;
mod ha_lab;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{enter_ns, in_ns, need_root, need_tool, run_timeout};
use ha_lab::ecmp::{
    back_addr, balancer_role, front_addr, snat_addr, Anchor, EcmpLab, EcmpOpts, VIP_PROTOCOL,
};
use ha_lab::rawload::{raw_socket, FlowLoad, Sent};
use ha_lab::{AUTH_KEY, HA_PORT, UDP_PORT, VIP4};

/// Balancers in the lab (part 2 goes up to 4).
const NODES: u8 = 4;
/// The upload service's port (VIP and backends).
const TCP_PORT: u16 = 5001;
/// The sync load's UDP port (VIP and backends; the backends drop it).
const FLOW_PORT: u16 = 7001;
/// Conntrack capacity of every balancer.
const CAPACITY: u32 = 262_144;
/// The stats port of every balancer (in its namespace).
const STATS: &str = "127.0.0.1:9100";
/// The payload of every sync-load datagram (even length: no checksum padding).
const PAYLOAD: &[u8] = b"lb ecmp perf: new flow";
/// The interval of the takeover probes.
const PROBE_PERIOD: Duration = Duration::from_millis(5);

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

// ---- the balancers -------------------------------------------------------------------------

/// How the balancer namespaces forward the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fwd {
    /// The kernel's multipath route (no balancer program).
    Kernel,
    /// tun-balancer, mode `tunnel` (GUE).
    Tunnel,
    /// tun-balancer, mode `nat`.
    Nat,
}

impl Fwd {
    fn parse(s: &str) -> Option<Fwd> {
        match s {
            "kernel" => Some(Fwd::Kernel),
            "tunnel" => Some(Fwd::Tunnel),
            "nat" => Some(Fwd::Nat),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fwd::Kernel => "kernel forwarding (no tun-balancer)",
            Fwd::Tunnel => "tun-balancer tunnel (GUE)",
            Fwd::Nat => "tun-balancer nat",
        }
    }
}

/// Node `n`'s configuration in a group of nodes `1..=group`: TCP VIP:5001 (the upload), UDP
/// VIP:7000 (the echo probes, UDP health checks) and UDP VIP:7001 (the sync load), maglev, the
/// fleet's hash key; active-active with every other node of the group as a peer, the node's
/// BIRD driven over its control socket, and in mode `nat` one floating back address per node.
fn config(lab: &EcmpLab, mode: Fwd, n: u8, group: u8) -> String {
    let m = if mode == Fwd::Tunnel { "tunnel" } else { "nat" };
    let mut c = format!(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"{}\"]\nconntrack_capacity = {CAPACITY}\n\
         stats = \"{STATS}\"\nhash_key = \"e2e ecmp fleet secret 0123456789\"\n",
        snat_addr(n)
    );
    if mode == Fwd::Tunnel {
        c.push_str("mtu = 1500\n");
    }
    for (proto, port, health) in [
        ("tcp", TCP_PORT, "kind = \"none\"\n".to_owned()),
        (
            "udp",
            UDP_PORT,
            format!(
                "kind = \"udp\"\nsend = \"ping\"\nexpect = \"b\"\nport = {UDP_PORT}\n\
                 interval_ms = 200\nrise = 1\nfall = 2\n"
            ),
        ),
        ("udp", FLOW_PORT, "kind = \"none\"\n".to_owned()),
    ] {
        c.push_str(&format!(
            "\n[[service]]\nvip = \"{VIP4}:{port}\"\nproto = \"{proto}\"\nmode = \"{m}\"\n\
             scheduler = \"maglev\"\n"
        ));
        if mode == Fwd::Tunnel {
            c.push_str("tunnel = \"gue\"\ngue_port = 6080\n");
        }
        c.push_str(&format!("[service.health]\n{health}"));
        let bport = if mode == Fwd::Tunnel { 0 } else { port };
        for b in &lab.backends {
            c.push_str(&format!(
                "[[service.backend]]\naddr = \"{}:{bport}\"\nweight = 1\n",
                b.v4
            ));
        }
    }
    // A group of one names node 2 as its peer all the same (`[ha]` wants one), which runs
    // nothing: the node serves alone once it has heard no peer for the master-down interval.
    let peers: Vec<String> = (1..=group.max(2))
        .filter(|&k| k != n)
        .map(|k| format!("\"{}:{HA_PORT}\"", front_addr(k)))
        .collect();
    c.push_str(&format!(
        "\n[ha]\nmode = \"active-active\"\nnode_id = {n}\nbind = \"{}:{HA_PORT}\"\npeers = [{}]\n\
         auth_key = \"{AUTH_KEY}\"\nadvert_interval_ms = 100\nbgp_socket = \"{}\"\n",
        front_addr(n),
        peers.join(", "),
        lab.bird_socket(&balancer_role(n)).display()
    ));
    if mode == Fwd::Nat {
        for k in 1..=group {
            c.push_str(&format!(
                "[[ha.address]]\ndev = \"back0\"\naddr = \"{}/24\"\nnode = {k}\n",
                back_addr(k)
            ));
        }
    }
    c
}

fn balancer_name(n: u8) -> String {
    format!("balancer-{}", balancer_role(n))
}

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

/// Node `n`'s statistics, or `None` while it does not answer.
fn stats(lab: &EcmpLab, n: u8) -> Option<Value> {
    in_ns(lab.ns(&balancer_role(n)), get_stats)
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64().unwrap_or(0)
}

/// Starts nodes `1..=group` in `mode` and waits until the router's route has them all, each
/// node says `active` and (tun-balancer) sees the echo service's backends healthy.
fn start_group(lab: &mut EcmpLab, mode: Fwd, group: u8) {
    for n in 1..=group {
        let role = balancer_role(n);
        if mode == Fwd::Kernel {
            lab.sh(&role, "ip link add lb0 type veth peer name lb0p && ip link set lb0p up && ip link set lb0 up");
            lab.forward_kernel(n);
            lab.announce(n);
            continue;
        }
        let c = config(lab, mode, n, group);
        lab.start_balancer(n, &c);
        // Every node routes every node's SNAT address to its device: it answers a dead peer's
        // flows once it holds that peer's back address.
        for k in 1..=group {
            lab.sh(
                &role,
                &format!("ip route replace {}/32 dev lb0", snat_addr(k)),
            );
        }
    }
    let all: BTreeSet<u8> = (1..=group).collect();
    assert!(
        lab.wait_next_hops(&all, Instant::now(), Duration::from_secs(20))
            .is_some(),
        "{mode:?} x{group}: the router's next hops are {:?}\n{}",
        lab.next_hops(),
        lab.bird_report()
    );
    if mode == Fwd::Kernel {
        return;
    }
    for n in 1..=group {
        let ok = lab.lab.wait_for(Duration::from_secs(15), || {
            let s = stats(lab, n)?;
            let healthy = s["backends"]
                .as_array()?
                .iter()
                .filter(|b| {
                    b["addr"]
                        .as_str()
                        .is_some_and(|a| a.ends_with(&format!(":{UDP_PORT}")) || a.ends_with(":0"))
                        && b["healthy"] == true
                })
                .count();
            (s["ha"]["role"] == "active" && healthy >= 3).then_some(())
        });
        assert!(
            ok.is_some(),
            "node {n} not active with healthy backends: {:?}\n{}",
            stats(lab, n),
            lab.log(&balancer_name(n))
        );
    }
}

/// Stops whatever runs on the balancers (SIGTERM: an active-active node withdraws first) and
/// puts every node back as the lab built it: its own back address alone, the VIP's `static`
/// protocol disabled, its BIRD running, no neighbour entry anywhere, every BGP session up.
fn stop_group(lab: &mut EcmpLab) {
    for n in 1..=NODES {
        let name = balancer_name(n);
        if lab.alive(&name) {
            lab.stop(&name, Duration::from_secs(3));
        }
    }
    for n in 1..=NODES {
        let role = balancer_role(n);
        let _ = lab.try_sh(
            &role,
            &format!("ip link del lb0 2>/dev/null; ip route del {VIP4}/32 2>/dev/null; true"),
        );
        let gone = lab.lab.wait_for(Duration::from_secs(10), || {
            lab.try_sh(&role, "ip link show lb0").is_err().then_some(())
        });
        assert!(gone.is_some(), "lb0 of {role} outlived its balancer");
        if !lab.alive(&EcmpLab::bird_name(&role)) {
            lab.start_bird(n);
        }
        let _ = lab.bird(&role).and_then(|mut b| b.disable(VIP_PROTOCOL));
        lab.sh(
            &role,
            &format!(
                "ip addr flush dev back0 && ip addr add {}/24 dev back0 && ip neigh flush all",
                back_addr(n)
            ),
        );
    }
    for role in ["router", "client", "b1", "b2", "b3"] {
        let _ = lab.try_sh(role, "ip neigh flush all; ip route flush cache");
    }
    let all: BTreeSet<u8> = (1..=NODES).collect();
    assert!(
        lab.wait_established(&all, Duration::from_secs(20)),
        "BGP sessions down after a run:\n{}",
        lab.bird_report()
    );
    assert!(
        lab.wait_next_hops(&BTreeSet::new(), Instant::now(), Duration::from_secs(10))
            .is_some(),
        "the router still routes the VIP: {:?}",
        lab.next_hops()
    );
}

/// Stops the balancers even when a run panics (the lab then removes everything else).
struct GroupGuard<'a>(&'a mut EcmpLab);

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in 1..=NODES {
                let _ = self.0.kill9(&balancer_name(n));
            }
        } else {
            stop_group(self.0);
        }
    }
}

// ---- nftables counters in the balancer namespaces ------------------------------------------

/// (Re)creates node `n`'s counters: on `front0` ingress, TCP SYNs and bytes to VIP:5001, UDP
/// to VIP:7001, and the set of source ports of UDP to VIP:7000; on output, sync datagrams and
/// heartbeats to the peers.
fn reset_counters(lab: &EcmpLab, n: u8) {
    let role = balancer_role(n);
    let _ = lab.try_sh(
        &role,
        "nft delete table netdev perfin 2>/dev/null; nft delete table ip perfout 2>/dev/null; true",
    );
    let rules = format!(
        "table netdev perfin {{\n\
         \x20set seen {{ type inet_service; flags dynamic; size 65535; }}\n\
         \x20chain in {{\n\
         \x20 type filter hook ingress device \"front0\" priority 0; policy accept;\n\
         \x20 ip daddr {VIP4} tcp dport {TCP_PORT} tcp flags & (syn | ack) == syn counter comment \"syn\"\n\
         \x20 ip daddr {VIP4} tcp dport {TCP_PORT} counter comment \"tcp\"\n\
         \x20 ip daddr {VIP4} udp dport {FLOW_PORT} counter comment \"flows\"\n\
         \x20 ip daddr {VIP4} udp dport {UDP_PORT} add @seen {{ udp sport }}\n\
         \x20}}\n}}\n\
         table ip perfout {{\n\
         \x20chain out {{\n\
         \x20 type filter hook output priority 0; policy accept;\n\
         \x20 udp dport {HA_PORT} @th,64,16 0x4c43 counter comment \"sync\"\n\
         \x20 udp dport {HA_PORT} @th,64,16 0x4c48 counter comment \"hb\"\n\
         \x20}}\n}}\n"
    );
    let path = lab.lab.write(&format!("perf-{role}.nft"), &rules);
    lab.sh(&role, &format!("nft -f {}", path.display()));
}

/// Node `n`'s counters: comment → (packets, bytes).
fn counters(lab: &EcmpLab, n: u8) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    for table in ["netdev perfin", "ip perfout"] {
        let Ok(text) = lab.try_sh(&balancer_role(n), &format!("nft -j list table {table}")) else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        for item in v["nftables"].as_array().cloned().unwrap_or_default() {
            let rule = &item["rule"];
            let Some(comment) = rule["comment"].as_str() else {
                continue;
            };
            for e in rule["expr"].as_array().cloned().unwrap_or_default() {
                if let Some(c) = e.get("counter") {
                    out.insert(
                        comment.to_owned(),
                        (num(c, &["packets"]), num(c, &["bytes"])),
                    );
                }
            }
        }
    }
    out
}

fn counter(c: &HashMap<String, (u64, u64)>, name: &str) -> (u64, u64) {
    c.get(name).copied().unwrap_or((0, 0))
}

/// The source ports node `n`'s `front0` has seen to the echo service (its set).
fn seen_ports(lab: &EcmpLab, n: u8) -> BTreeSet<u16> {
    let text = lab
        .try_sh(&balancer_role(n), "nft -j list set netdev perfin seen")
        .unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let mut out = BTreeSet::new();
    for item in v["nftables"].as_array().cloned().unwrap_or_default() {
        for e in item["set"]["elem"].as_array().cloned().unwrap_or_default() {
            let p = e
                .as_u64()
                .or_else(|| e["elem"]["val"].as_u64())
                .and_then(|p| u16::try_from(p).ok());
            out.extend(p);
        }
    }
    out
}

fn tun_dropped(lab: &EcmpLab, n: u8) -> u64 {
    lab.try_sh(
        &balancer_role(n),
        "cat /sys/class/net/lb0/statistics/tx_dropped 2>/dev/null || echo 0",
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

// ---- CPU ------------------------------------------------------------------------------------

fn clk_tck() -> f64 {
    run_timeout(Duration::from_secs(5), "getconf", &["CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime (clock ticks) from a `/proc/.../stat` line.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces) start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0)
}

/// The ticks of a process's threads whose name starts with `prefix`.
fn thread_ticks(pid: u32, prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim().starts_with(prefix))
        })
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| stat_ticks(&s))
        })
        .sum()
}

/// The pids of the processes named `comm` in namespace `ns`.
fn pids_in(ns: &str, comm: &str) -> Vec<u32> {
    run_timeout(Duration::from_secs(5), "ip", &["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// The machine's CPU (`/proc/stat` first line): (busy, softirq, total) in ticks.
fn machine_ticks() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, f.get(6).copied().unwrap_or(0), total)
}

/// Who a process's CPU is charged to in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    /// Kernel threads (ksoftirqd, kworkers: much of the lab's softirq work runs there).
    Kernel,
    /// Processes in the lab's namespaces.
    Lab,
    /// Everything else: whatever else runs on the machine.
    Other,
}

/// Every process's ticks and class (this test process left out: it is counted on its own).
fn census(lab_netns: &BTreeSet<u64>) -> HashMap<u32, (Who, u64)> {
    use std::os::unix::fs::MetadataExt;
    let me = std::process::id();
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(ticks) = stat_ticks(&stat) else {
            continue;
        };
        // After the command name: state, ppid, ...
        let ppid: u32 = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let who = if pid == 2 || ppid == 2 {
            Who::Kernel
        } else if std::fs::metadata(e.path().join("ns/net"))
            .is_ok_and(|m| lab_netns.contains(&m.ino()))
        {
            Who::Lab
        } else {
            Who::Other
        };
        out.insert(pid, (who, ticks));
    }
    out
}

/// The network namespace inodes of the lab.
fn lab_netns(lab: &EcmpLab) -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut roles: Vec<String> = ["sw", "router", "client", "b1", "b2", "b3"]
        .iter()
        .map(|r| (*r).to_owned())
        .collect();
    roles.extend((1..=NODES).map(balancer_role));
    roles
        .iter()
        .filter_map(|r| std::fs::metadata(format!("/run/netns/{}", lab.ns(r))).ok())
        .map(|m| m.ino())
        .collect()
}

/// Ticks per class between two censuses (a process that exited in between is missed; one that
/// started is counted whole).
fn census_delta(a: &HashMap<u32, (Who, u64)>, b: &HashMap<u32, (Who, u64)>) -> HashMap<Who, u64> {
    let mut out = HashMap::new();
    for (pid, (who, t1)) in b {
        let t0 = a.get(pid).map_or(0, |x| x.1);
        *out.entry(*who).or_default() += t1.saturating_sub(t0);
    }
    out
}

/// A snapshot of every CPU counter a throughput run reads.
#[derive(Debug, Clone, Default)]
struct CpuSnap {
    /// Per node: (tun-balancer ticks, its data-path threads' ticks).
    balancers: Vec<(u64, u64)>,
    decap: u64,
    this: u64,
    machine: (u64, u64, u64),
    census: HashMap<u32, (Who, u64)>,
}

fn cpu_snap(bal: &[Option<u32>], decap: &[u32], netns: &BTreeSet<u64>) -> CpuSnap {
    CpuSnap {
        balancers: bal
            .iter()
            .map(|p| p.map_or((0, 0), |p| (proc_ticks(p), thread_ticks(p, "datapath"))))
            .collect(),
        decap: decap.iter().map(|&p| proc_ticks(p)).sum(),
        this: proc_ticks(std::process::id()),
        machine: machine_ticks(),
        census: census(netns),
    }
}

// ---- part 1: throughput ---------------------------------------------------------------------

/// The backends' sinks: a listener thread per backend on 0.0.0.0:5001 (the backend's own
/// address in mode `nat`, the VIP otherwise), a reader thread per connection.
struct Sinks {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    handles: Vec<JoinHandle<()>>,
}

impl Sinks {
    fn start(lab: &EcmpLab) -> Sinks {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for b in &lab.backends {
            let path = format!("/run/netns/{}", b.ns);
            let (stop, bytes) = (stop.clone(), bytes.clone());
            handles.push(std::thread::spawn(move || {
                enter_ns(&path);
                let l = TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("sink listener");
                l.set_nonblocking(true).expect("nonblocking");
                let mut readers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let (stop, bytes) = (stop.clone(), bytes.clone());
                            readers.push(std::thread::spawn(move || sink_read(s, &stop, &bytes)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                for r in readers {
                    let _ = r.join();
                }
            }));
        }
        Sinks {
            stop,
            bytes,
            handles,
        }
    }

    fn total(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn sink_read(mut s: TcpStream, stop: &AtomicBool, bytes: &AtomicU64) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

/// The upload: `conns` threads in the client namespace, each one connection to VIP:5001.
struct Upload {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<u64>>,
    connected: usize,
}

impl Upload {
    fn start(client_ns: &str, conns: usize) -> Upload {
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..conns {
            let path = format!("/run/netns/{client_ns}");
            let (stop, up, failed) = (stop.clone(), up.clone(), failed.clone());
            handles.push(std::thread::spawn(move || {
                enter_ns(&path);
                let vip: Ipv4Addr = VIP4.parse().expect("VIP4");
                let dst = SocketAddr::from((vip, TCP_PORT));
                let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(3)) else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return 0;
                };
                up.fetch_add(1, Ordering::Relaxed);
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let buf = vec![0u8; 128 * 1024];
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match s.write(&buf) {
                        Ok(n) => sent += n as u64,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(_) => break,
                    }
                }
                sent
            }));
        }
        let end = Instant::now() + Duration::from_secs(10);
        while up.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < conns
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let connected = up.load(Ordering::Relaxed);
        Upload {
            stop,
            handles,
            connected,
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Clone, Default)]
struct TputRun {
    mode: Option<Fwd>,
    n: u8,
    rep: usize,
    connected: usize,
    secs: f64,
    /// Bytes the sinks read in the window.
    goodput: u64,
    /// Per node: TCP bytes to VIP:5001 on its `front0`, SYNs (its connections), lb0 tx_dropped.
    node_bytes: Vec<u64>,
    node_conns: Vec<u64>,
    node_dropped: Vec<u64>,
    /// Per node: tun-balancer CPU and its data-path threads', % of one core.
    lb_cpu: Vec<f64>,
    lb_dp: Vec<f64>,
    decap_cpu: f64,
    this_cpu: f64,
    /// Kernel threads, the lab's other processes (BIRD, server.py), every other process on
    /// the machine, % of one core; the 1-minute load average before the window.
    kthreads_cpu: f64,
    lab_rest_cpu: f64,
    others_cpu: f64,
    loadavg: f64,
    /// Machine: busy and softirq, % of one core (200 = both cores).
    busy: f64,
    softirq: f64,
}

impl TputRun {
    fn gbps(&self) -> f64 {
        self.goodput as f64 * 8.0 / self.secs / 1e9
    }

    /// Each node's share of the bytes the balancers received, %.
    fn shares(&self) -> Vec<f64> {
        let total: u64 = self.node_bytes.iter().sum();
        self.node_bytes
            .iter()
            .map(|b| *b as f64 * 100.0 / total.max(1) as f64)
            .collect()
    }
}

/// The load of a throughput run.
#[derive(Debug, Clone, Copy)]
struct TputLoad {
    conns: usize,
    secs: f64,
    tck: f64,
}

fn throughput_run(
    lab: &mut EcmpLab,
    sinks: &Sinks,
    mode: Fwd,
    n: u8,
    rep: usize,
    load: TputLoad,
) -> TputRun {
    let TputLoad { conns, secs, tck } = load;
    for k in 1..=NODES {
        reset_counters(lab, k);
    }
    start_group(lab, mode, n);
    let lab = GroupGuard(lab);
    let bal: Vec<Option<u32>> = (1..=n)
        .map(|k| {
            if mode == Fwd::Kernel {
                None
            } else {
                pids_in(lab.0.ns(&balancer_role(k)), "tun-balancer")
                    .first()
                    .copied()
            }
        })
        .collect();
    let decap: Vec<u32> = if mode == Fwd::Tunnel {
        lab.0
            .backends
            .iter()
            .flat_map(|b| pids_in(&b.ns, "lb-decap"))
            .collect()
    } else {
        Vec::new()
    };
    let client = lab.0.ns("client").to_owned();
    let up = Upload::start(&client, conns);
    std::thread::sleep(Duration::from_millis(1500));
    let c0: Vec<_> = (1..=n).map(|k| counters(lab.0, k)).collect();
    let d0: Vec<u64> = (1..=n).map(|k| tun_dropped(lab.0, k)).collect();
    let g0 = sinks.total();
    let netns = lab_netns(lab.0);
    let load0 = loadavg();
    let s0 = cpu_snap(&bal, &decap, &netns);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let g1 = sinks.total();
    let s1 = cpu_snap(&bal, &decap, &netns);
    let wall = t0.elapsed().as_secs_f64();
    let c1: Vec<_> = (1..=n).map(|k| counters(lab.0, k)).collect();
    let d1: Vec<u64> = (1..=n).map(|k| tun_dropped(lab.0, k)).collect();
    let connected = up.connected;
    up.finish();
    let pct = |ticks: u64| ticks as f64 / tck / wall * 100.0;
    let classes = census_delta(&s0.census, &s1.census);
    let lb_ticks: u64 = s1
        .balancers
        .iter()
        .zip(&s0.balancers)
        .map(|(b, a)| b.0 - a.0)
        .sum();
    let k = usize::from(n);
    let run = TputRun {
        mode: Some(mode),
        n,
        rep,
        connected,
        secs: wall,
        goodput: g1 - g0,
        node_bytes: (0..k)
            .map(|i| counter(&c1[i], "tcp").1 - counter(&c0[i], "tcp").1)
            .collect(),
        node_conns: (0..k).map(|i| counter(&c1[i], "syn").0).collect(),
        node_dropped: (0..k).map(|i| d1[i] - d0[i]).collect(),
        lb_cpu: if mode == Fwd::Kernel {
            Vec::new()
        } else {
            (0..k)
                .map(|i| pct(s1.balancers[i].0 - s0.balancers[i].0))
                .collect()
        },
        lb_dp: if mode == Fwd::Kernel {
            Vec::new()
        } else {
            (0..k)
                .map(|i| pct(s1.balancers[i].1 - s0.balancers[i].1))
                .collect()
        },
        decap_cpu: pct(s1.decap - s0.decap),
        this_cpu: pct(s1.this - s0.this),
        kthreads_cpu: pct(classes.get(&Who::Kernel).copied().unwrap_or(0)),
        lab_rest_cpu: pct(classes
            .get(&Who::Lab)
            .copied()
            .unwrap_or(0)
            .saturating_sub(lb_ticks + (s1.decap - s0.decap))),
        others_cpu: pct(classes.get(&Who::Other).copied().unwrap_or(0)),
        loadavg: load0,
        busy: (s1.machine.0 - s0.machine.0) as f64 / (s1.machine.2 - s0.machine.2).max(1) as f64
            * 200.0,
        softirq: (s1.machine.1 - s0.machine.1) as f64 / (s1.machine.2 - s0.machine.2).max(1) as f64
            * 200.0,
    };
    drop(lab);
    run
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn fmt_list(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn print_tput(r: &TputRun) {
    println!(
        "rep {} {} x{}: {:.2} Gbit/s over {:.1} s ({} of the connections up); per node: bytes share {} %, \
         connections {:?}, lb0 tx_dropped {:?}; CPU % of a core: tun-balancer {} (data path {}), lb-decap {:.0}, \
         this test (load + sinks) {:.0}, kernel threads {:.0}, the lab's other processes {:.0}, other processes \
         {:.0}; machine busy {:.0} of 200 (softirq {:.0}); load average before {:.1}",
        r.rep,
        r.mode.map_or("?", Fwd::name),
        r.n,
        r.gbps(),
        r.secs,
        r.connected,
        fmt_list(&r.shares(), 0),
        r.node_conns,
        r.node_dropped,
        fmt_list(&r.lb_cpu, 0),
        fmt_list(&r.lb_dp, 0),
        r.decap_cpu,
        r.this_cpu,
        r.kthreads_cpu,
        r.lab_rest_cpu,
        r.others_cpu,
        r.busy,
        r.softirq,
        r.loadavg
    );
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

/// "median (min–max)" of `f` over `runs`.
fn spread<T>(runs: &[&T], f: impl Fn(&T) -> f64, digits: usize) -> String {
    let v: Vec<f64> = runs
        .iter()
        .map(|r| f(r))
        .filter(|x| x.is_finite())
        .collect();
    match v.len() {
        0 => "–".into(),
        1 => format!("{:.*}", digits, v[0]),
        _ => format!(
            "{:.*} ({:.*}–{:.*})",
            digits,
            median(&v),
            digits,
            min(&v),
            digits,
            max(&v)
        ),
    }
}

fn print_tput_table(runs: &[TputRun], modes: &[Fwd], ns: &[u8]) {
    let cell = |rs: &[&TputRun], f: &dyn Fn(&TputRun) -> f64| spread(rs, f, 0);
    println!("\nAggregate upload throughput, median (min–max) over repetitions:\n");
    println!(
        "| forwarding | N | Gbit/s | vs N = 1 (same repetition) | per-balancer share %: lowest – highest | \
         connections per balancer | lb0 tx_dropped per s (all nodes) |"
    );
    println!("|---|---:|---:|---:|---|---|---:|");
    let groups = |m: Fwd| {
        ns.iter()
            .map(move |&n| {
                let rs: Vec<&TputRun> = runs
                    .iter()
                    .filter(|r| r.mode == Some(m) && r.n == n)
                    .collect();
                (n, rs)
            })
            .filter(|(_, rs)| !rs.is_empty())
    };
    for &m in modes {
        let base: HashMap<usize, f64> = runs
            .iter()
            .filter(|r| r.mode == Some(m) && r.n == 1)
            .map(|r| (r.rep, r.gbps()))
            .collect();
        for (n, rs) in groups(m) {
            println!(
                "| {} | {n} | {} | {} | {} | {} | {} |",
                m.name(),
                spread(&rs, TputRun::gbps, 2),
                spread(
                    &rs,
                    |r| base.get(&r.rep).map_or(f64::NAN, |b| r.gbps() / b),
                    2
                ),
                if n == 1 {
                    "100".to_owned()
                } else {
                    format!(
                        "{} – {}",
                        cell(&rs, &|r| min(&r.shares())),
                        cell(&rs, &|r| max(&r.shares()))
                    )
                },
                rs.iter()
                    .map(|r| format!("{:?}", r.node_conns))
                    .collect::<Vec<_>>()
                    .join(" "),
                cell(&rs, &|r| r.node_dropped.iter().sum::<u64>() as f64 / r.secs),
            );
        }
    }
    println!(
        "\nWhere the CPU went over the window, % of one core (the machine has 200), median (min–max):\n"
    );
    println!(
        "| forwarding | N | machine busy | of which softirq | tun-balancers, all nodes | per node (its data-path \
         thread) | lb-decap agents | this test: load + sinks | kernel threads | the lab's other processes | \
         other processes on the machine | load average before |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for &m in modes {
        for (n, rs) in groups(m) {
            let tun = m != Fwd::Kernel;
            println!(
                "| {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m.name(),
                cell(&rs, &|r| r.busy),
                cell(&rs, &|r| r.softirq),
                if tun {
                    cell(&rs, &|r| r.lb_cpu.iter().sum())
                } else {
                    "–".into()
                },
                if tun {
                    format!(
                        "{} ({})",
                        cell(&rs, &|r| median(&r.lb_cpu)),
                        cell(&rs, &|r| median(&r.lb_dp))
                    )
                } else {
                    "–".into()
                },
                if m == Fwd::Tunnel {
                    cell(&rs, &|r| r.decap_cpu)
                } else {
                    "–".into()
                },
                cell(&rs, &|r| r.this_cpu),
                cell(&rs, &|r| r.kthreads_cpu),
                cell(&rs, &|r| r.lab_rest_cpu),
                cell(&rs, &|r| r.others_cpu),
                spread(&rs, |r| r.loadavg, 1),
            );
        }
    }
    println!(
        "\nPer node, each run (tun-balancer CPU % / data-path threads % / share of bytes %):\n"
    );
    for r in runs.iter().filter(|r| r.mode != Some(Fwd::Kernel)) {
        let rows: Vec<String> = (0..usize::from(r.n))
            .map(|i| {
                format!(
                    "l{} {:.0}/{:.0}/{:.0}",
                    i + 1,
                    r.lb_cpu.get(i).copied().unwrap_or(f64::NAN),
                    r.lb_dp.get(i).copied().unwrap_or(f64::NAN),
                    r.shares().get(i).copied().unwrap_or(f64::NAN)
                )
            })
            .collect();
        println!(
            "- rep {} {} x{}: {:.2} Gbit/s; {}",
            r.rep,
            r.mode.map_or("?", Fwd::name),
            r.n,
            r.gbps(),
            rows.join(", ")
        );
    }
}

// ---- part 2: sync traffic ------------------------------------------------------------------

/// The load: one-datagram UDP flows to VIP:FLOW_PORT from 192.0.2.100 on.
fn load() -> FlowLoad {
    FlowLoad {
        base: Ipv4Addr::new(192, 0, 2, 100),
        dst: VIP4.parse().expect("VIP4"),
        port: FLOW_PORT,
        payload: PAYLOAD,
    }
}

/// The backends count and drop the sync load (it is never answered).
fn drop_flows_on_backends(lab: &EcmpLab) {
    for b in ["b1", "b2", "b3"] {
        lab.sh(
            b,
            &format!(
                "nft add table ip perf && \
                 nft add chain ip perf in '{{ type filter hook input priority 0; policy accept; }}' && \
                 nft add rule ip perf in udp dport {FLOW_PORT} counter drop"
            ),
        );
    }
}

/// One node's readings in a sync run.
#[derive(Debug, Clone, Default)]
struct SyncNode {
    /// Flows that arrived on its `front0` (one packet each): its own flows.
    flows: u64,
    /// Its conntrack entries at the end of the load (its own flows and its peers').
    entries: u64,
    /// `ha.sync` deltas over the load (records also up to after the next refresh pass):
    /// records, datagrams and payload bytes sent (counted once per encoded datagram, whatever
    /// the number of peers it goes to), received, installed, sequence gaps seen, bulk dumps
    /// asked for and sent, records dropped on a busy data path, replays.
    records_load: u64,
    records: u64,
    datagrams: u64,
    bytes: u64,
    received: u64,
    installed: u64,
    gaps: u64,
    resyncs: u64,
    bulk_sent: u64,
    busy: u64,
    replays: u64,
    lost: u64,
    /// On the wire (nftables output), over the load: sync datagrams and their IP bytes.
    wire_packets: u64,
    wire_bytes: u64,
    /// Heartbeat IP bytes per second (load and settle time).
    hb_rate: f64,
    /// UDP datagrams its kernel dropped for a full socket buffer (RcvbufErrors), over the run.
    rcvbuf: u64,
}

impl SyncNode {
    /// The payload bytes of the streamed datagrams, when they can be told apart from the
    /// unicast ones: never since sync runs one stream per peer (the counters now count each
    /// datagram to each peer, as the wire does). Kept for the report's shape.
    fn streamed_payload(&self, _n: u8) -> Option<f64> {
        None
    }

    /// The IP bytes the node's sync put on the wire for its peers (every stream).
    fn streamed_wire(&self, _n: u8) -> f64 {
        self.wire_bytes as f64
    }
}

#[derive(Debug, Clone, Default)]
struct SyncRun {
    n: u8,
    rep: usize,
    sent: Sent,
    nodes: Vec<SyncNode>,
}

/// The `RcvbufErrors` of node `n`'s namespace (`/proc/net/snmp`, `Udp:` rows).
fn rcvbuf_errors(lab: &EcmpLab, n: u8) -> u64 {
    let out = lab
        .try_sh(&balancer_role(n), "cat /proc/net/snmp")
        .unwrap_or_default();
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (Some(head), Some(vals)) = (rows.first(), rows.get(1)) else {
        return 0;
    };
    head.iter()
        .position(|k| *k == "RcvbufErrors")
        .and_then(|i| vals.get(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What a sync run reads from every node at one instant: statistics, nftables counters,
/// receive-buffer drops.
type Reading = (Value, HashMap<String, (u64, u64)>, u64);

fn read_nodes(lab: &EcmpLab, n: u8) -> Vec<Reading> {
    (1..=n)
        .map(|k| {
            (
                stats(lab, k).unwrap_or(Value::Null),
                counters(lab, k),
                rcvbuf_errors(lab, k),
            )
        })
        .collect()
}

/// How long after the load the last reading is taken: past the next refresh pass.
const SETTLE: Duration = Duration::from_millis(6000);

fn sync_run(lab: &mut EcmpLab, n: u8, rep: usize, rate: f64, secs: f64) -> SyncRun {
    for k in 1..=NODES {
        reset_counters(lab, k);
    }
    start_group(lab, Fwd::Nat, n);
    let lab = GroupGuard(lab);
    let fd = raw_socket(lab.0.ns("client"));
    // Past the bulk syncs of the joins.
    std::thread::sleep(Duration::from_millis(500));
    let r0 = read_nodes(lab.0, n);
    let t0 = Instant::now();
    let sent = load().send(&fd, 0, rate, Duration::from_secs_f64(secs));
    // The last datagrams' records leave within an HA tick or two.
    std::thread::sleep(Duration::from_millis(300));
    let r1 = read_nodes(lab.0, n);
    std::thread::sleep(SETTLE);
    let r2 = read_nodes(lab.0, n);
    let all_secs = t0.elapsed().as_secs_f64();
    let d = |a: &Value, b: &Value, k: &str| {
        num(b, &["ha", "sync", k]).saturating_sub(num(a, &["ha", "sync", k]))
    };
    let nodes = (0..usize::from(n))
        .map(|i| {
            let ((s0, c0, u0), (s1, c1, _), (s2, c2, u2)) = (&r0[i], &r1[i], &r2[i]);
            let c = |c: &HashMap<String, (u64, u64)>, k: &str| counter(c, k);
            SyncNode {
                flows: c(c1, "flows").0 - c(c0, "flows").0,
                entries: num(s1, &["conntrack", "entries"]),
                records_load: d(s0, s1, "sent"),
                records: d(s0, s2, "sent"),
                datagrams: d(s0, s1, "datagrams_sent"),
                bytes: d(s0, s1, "bytes_sent"),
                received: d(s0, s1, "received"),
                installed: d(s0, s1, "installed"),
                gaps: d(s0, s1, "gaps"),
                resyncs: d(s0, s1, "resyncs"),
                bulk_sent: d(s0, s1, "bulk_sent"),
                busy: d(s0, s1, "busy"),
                replays: num(s1, &["ha", "drops", "replay"]) - num(s0, &["ha", "drops", "replay"]),
                lost: num(s2, &["ha", "sync", "lost"]),
                wire_packets: c(c1, "sync").0 - c(c0, "sync").0,
                wire_bytes: c(c1, "sync").1 - c(c0, "sync").1,
                hb_rate: (c(c2, "hb").1 - c(c0, "hb").1) as f64 / all_secs,
                rcvbuf: u2 - u0,
            }
        })
        .collect();
    drop(lab);
    SyncRun {
        n,
        rep,
        sent,
        nodes,
    }
}

fn per(x: u64, y: u64) -> f64 {
    x as f64 / y.max(1) as f64
}

fn print_sync(r: &SyncRun) {
    println!(
        "rep {} N={}: sent {} flows in {:.2} s ({} errors)",
        r.rep, r.n, r.sent.packets, r.sent.secs, r.sent.errors
    );
    for (i, x) in r.nodes.iter().enumerate() {
        println!(
            "    l{}: own flows {} (entries {}); records sent {} during the load, {} with the next refresh pass; \
             {} datagrams, {} payload bytes (counters); on the wire {} datagrams, {} IP bytes{}; \
             received {} installed {}; gaps {} resync requests {} bulk dumps sent {} busy {} replays {} \
             lost {} rcvbuf drops {}; heartbeats {:.0} IP bytes/s",
            i + 1,
            x.flows,
            x.entries,
            x.records_load,
            x.records,
            x.datagrams,
            x.bytes,
            x.wire_packets,
            x.wire_bytes,
            x.streamed_payload(r.n)
                .map_or(String::new(), |p| format!(" (streamed payload {p:.0} bytes)")),
            x.received,
            x.installed,
            x.gaps,
            x.resyncs,
            x.bulk_sent,
            x.busy,
            x.replays,
            x.lost,
            x.rcvbuf,
            x.hb_rate
        );
    }
}

/// The per-node average of `f` in a run.
fn node_avg(r: &SyncRun, f: impl Fn(&SyncNode, f64) -> f64) -> f64 {
    let v: Vec<f64> = r.nodes.iter().map(|x| f(x, r.sent.secs)).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn print_sync_table(runs: &[SyncRun], ns: &[u8]) {
    let groups = ns
        .iter()
        .map(|&n| (n, runs.iter().filter(|r| r.n == n).collect::<Vec<_>>()))
        .filter(|(_, rs)| !rs.is_empty())
        .collect::<Vec<_>>();
    println!(
        "\nWhat each balancer sends (averages over the N nodes, then median (min–max) over \
         repetitions), over the load; records also up to after the next refresh pass; wire = IP \
         bytes leaving the node for its peers; streamed = the part sent to every peer (derived for \
         N > 2, see the module docs):\n"
    );
    println!(
        "| N | own flows/s per node | records sent per own flow: load / +refresh | payload B per own \
         flow (counters) | wire IP B per own flow | wire kB/s per node | streamed wire IP B per own flow | \
         heartbeat IP B/s per node |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for (n, rs) in &groups {
        println!(
            "| {n} | {} | {} / {} | {} | {} | {} | {} | {} |",
            spread(rs, |r| node_avg(r, |x, s| x.flows as f64 / s), 0),
            spread(rs, |r| node_avg(r, |x, _| per(x.records_load, x.flows)), 2),
            spread(rs, |r| node_avg(r, |x, _| per(x.records, x.flows)), 2),
            spread(rs, |r| node_avg(r, |x, _| per(x.bytes, x.flows)), 1),
            spread(rs, |r| node_avg(r, |x, _| per(x.wire_bytes, x.flows)), 1),
            spread(rs, |r| node_avg(r, |x, s| x.wire_bytes as f64 / s / 1e3), 1),
            spread(
                rs,
                |r| node_avg(r, |x, _| x.streamed_wire(r.n) / x.flows.max(1) as f64),
                1
            ),
            spread(rs, |r| node_avg(r, |x, _| x.hb_rate), 0),
        );
    }
    println!("\nWhat each balancer receives, and why it sends more than its own flows (same averaging):\n");
    println!(
        "| N | sequence gaps seen per node | resync requests sent per node | bulk dumps sent per node | \
         records received/s per node | installed/s per node | received / the others' flows | lost, busy, \
         rcvbuf drops (all nodes, all runs) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---|");
    for (n, rs) in &groups {
        let sum = |f: &dyn Fn(&SyncNode) -> u64| -> u64 {
            rs.iter().flat_map(|r| r.nodes.iter()).map(f).sum()
        };
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {}, {}, {} |",
            spread(rs, |r| node_avg(r, |x, _| x.gaps as f64), 0),
            spread(rs, |r| node_avg(r, |x, _| x.resyncs as f64), 0),
            spread(rs, |r| node_avg(r, |x, _| x.bulk_sent as f64), 1),
            spread(rs, |r| node_avg(r, |x, s| x.received as f64 / s), 0),
            spread(rs, |r| node_avg(r, |x, s| x.installed as f64 / s), 0),
            spread(
                rs,
                |r| {
                    let total: u64 = r.nodes.iter().map(|x| x.flows).sum();
                    node_avg(r, |x, _| per(x.received, total - x.flows))
                },
                2
            ),
            sum(&|x| x.lost),
            sum(&|x| x.busy),
            sum(&|x| x.rcvbuf),
        );
    }
}

// ---- part 3: takeover -----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Balancer,
    BirdAndBalancer,
    Isolated,
}

impl Kill {
    const ALL: [Kill; 3] = [Kill::Balancer, Kill::BirdAndBalancer, Kill::Isolated];

    fn name(self) -> &'static str {
        match self {
            Kill::Balancer => "kill -9 tun-balancer",
            Kill::BirdAndBalancer => "kill -9 BIRD, then tun-balancer",
            Kill::Isolated => "node cut off (switch ports down), then both killed",
        }
    }
}

/// Echo probes: a socket per flow in the client namespace, a sender thread for all, a receiver
/// thread per flow timestamping the echoes.
struct Probes {
    stop: Arc<AtomicBool>,
    sports: Vec<u16>,
    sender: Option<JoinHandle<u64>>,
    receivers: Vec<JoinHandle<Vec<Instant>>>,
}

impl Probes {
    fn start(client_ns: &str, flows: usize) -> Probes {
        let vip: Ipv4Addr = VIP4.parse().expect("VIP4");
        let socks: Vec<UdpSocket> = in_ns(client_ns, move || {
            (0..flows)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").expect("probe socket");
                    s.connect(SocketAddrV4::new(vip, UDP_PORT))
                        .expect("probe connect");
                    s
                })
                .collect()
        });
        let sports = socks
            .iter()
            .map(|s| s.local_addr().map(|a| a.port()).unwrap_or(0))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        for s in &socks {
            let r = s.try_clone().expect("clone probe socket");
            let stop = stop.clone();
            receivers.push(std::thread::spawn(move || {
                let _ = r.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 256];
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if r.recv(&mut buf).is_ok() {
                        times.push(Instant::now());
                    }
                }
                times
            }));
        }
        let flag = stop.clone();
        let sender = std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let due = start + PROBE_PERIOD * seq as u32;
                let now = Instant::now();
                if now < due {
                    std::thread::sleep(due - now);
                }
                let msg = format!("probe {seq}");
                for s in &socks {
                    let _ = s.send(msg.as_bytes());
                }
                seq += 1;
            }
            seq
        });
        Probes {
            stop,
            sports,
            sender: Some(sender),
            receivers,
        }
    }

    /// Stops the probes; each flow's echo arrival times.
    fn finish(mut self) -> Vec<Vec<Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        self.receivers
            .drain(..)
            .map(|h| h.join().unwrap_or_default())
            .collect()
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        for h in self.receivers.drain(..) {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Clone)]
struct TakeRun {
    kill: Kill,
    rep: usize,
    flows: usize,
    /// Node 2's flows (by source port, from its ingress set).
    affected: usize,
    route_ms: Option<f64>,
    addr_ms: Option<f64>,
    /// Node 2's flows: the longest gap between echoes from 1 s before the kill on, and the
    /// time from the kill to the echo that ended it (`None`: the gap lasted to the end).
    gaps_affected: Vec<f64>,
    recovered: Vec<Option<f64>>,
    /// The other flows' longest gaps.
    gaps_others: Vec<f64>,
}

/// The longest gap between consecutive times at or after `from` (counting from `from`, and to
/// `end` after the last one): its length and the time that ended it (`None`: it lasts to `end`).
fn longest_gap(times: &[Instant], from: Instant, end: Instant) -> (Duration, Option<Instant>) {
    let mut last = from;
    let mut gap = (Duration::ZERO, None);
    for &t in times.iter().filter(|t| **t >= from) {
        if t - last > gap.0 {
            gap = (t - last, Some(t));
        }
        last = t;
    }
    if end.saturating_duration_since(last) > gap.0 {
        gap = (end - last, None);
    }
    gap
}

fn takeover_run(lab: &mut EcmpLab, kill: Kill, rep: usize, flows: usize) -> TakeRun {
    for k in 1..=NODES {
        reset_counters(lab, k);
    }
    start_group(lab, Fwd::Nat, 3);
    let lab = GroupGuard(lab);
    let client = lab.0.ns("client").to_owned();
    let probes = Probes::start(&client, flows);
    std::thread::sleep(Duration::from_secs(2));
    let seen = seen_ports(lab.0, 2);
    let l1 = lab.0.ns("l1").to_owned();
    let addr2 = format!(" {}/", back_addr(2));
    let t0 = match kill {
        Kill::Balancer => lab.0.kill9(&balancer_name(2)),
        Kill::BirdAndBalancer => {
            let t = lab.0.kill_bird(2);
            let _ = lab.0.kill9(&balancer_name(2));
            t
        }
        Kill::Isolated => {
            let t = lab.0.isolate(2);
            let _ = lab.0.kill9(&balancer_name(2));
            let _ = lab.0.kill_bird(2);
            t
        }
    };
    // Node 1 taking node 2's back address, watched beside the router's route.
    let watcher = std::thread::spawn(move || {
        while t0.elapsed() < Duration::from_secs(5) {
            let out = run_timeout(
                Duration::from_secs(2),
                "ip",
                &["-n", &l1, "-o", "-4", "addr", "show", "dev", "back0"],
            )
            .unwrap_or_default();
            if out.contains(&addr2) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    });
    let rest: BTreeSet<u8> = [1, 3].into_iter().collect();
    let route = lab.0.wait_next_hops(&rest, t0, Duration::from_secs(5));
    let addr = watcher.join().ok().flatten();
    let until = t0 + Duration::from_secs(3);
    if let Some(d) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let end = Instant::now();
    let sports = probes.sports.clone();
    let times = probes.finish();
    if kill == Kill::Isolated {
        lab.0.reconnect(2);
    }
    let from = t0 - Duration::from_secs(1);
    let mut run = TakeRun {
        kill,
        rep,
        flows,
        affected: 0,
        route_ms: route.map(|d| d.as_secs_f64() * 1e3),
        addr_ms: addr.map(|d| d.as_secs_f64() * 1e3),
        gaps_affected: Vec::new(),
        recovered: Vec::new(),
        gaps_others: Vec::new(),
    };
    for (sport, ts) in sports.iter().zip(&times) {
        let (gap, ended) = longest_gap(ts, from, end);
        let gap = gap.as_secs_f64() * 1e3;
        if seen.contains(sport) {
            run.affected += 1;
            run.gaps_affected.push(gap);
            run.recovered
                .push(ended.map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3));
        } else {
            run.gaps_others.push(gap);
        }
    }
    drop(lab);
    run
}

fn print_take(r: &TakeRun) {
    let never = r.recovered.iter().filter(|x| x.is_none()).count();
    let rec: Vec<f64> = r.recovered.iter().flatten().copied().collect();
    println!(
        "rep {} {}: route without node 2 after {} ms, node 1 holds its address after {} ms; \
         node 2 had {} of {} flows: longest gap median {:.0} max {:.0} ms, echoes again after the kill \
         median {:.0} max {:.0} ms ({} never); other flows' longest gap median {:.0} max {:.0} ms",
        r.rep,
        r.kill.name(),
        r.route_ms.map_or("–".into(), |x| format!("{x:.0}")),
        r.addr_ms.map_or("–".into(), |x| format!("{x:.0}")),
        r.affected,
        r.flows,
        median(&r.gaps_affected),
        max(&r.gaps_affected),
        median(&rec),
        max(&rec),
        never,
        median(&r.gaps_others),
        max(&r.gaps_others)
    );
}

fn print_take_table(runs: &[TakeRun]) {
    println!("\nTakeover (N = 3, nat), median (min–max) over repetitions of each run's value:\n");
    println!(
        "| how node 2 dies | kill → router's route without it, ms | kill → node 1 holds its back address, ms | \
         node 2's flows | their longest echo gap: median / max in the run, ms | kill → their echoes again: max in the run, ms | \
         never answered again | other flows' longest gap, max in the run, ms |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|");
    for k in Kill::ALL {
        let rs: Vec<&TakeRun> = runs.iter().filter(|r| r.kill == k).collect();
        if rs.is_empty() {
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            k.name(),
            spread(&rs, |r| r.route_ms.unwrap_or(f64::NAN), 0),
            spread(&rs, |r| r.addr_ms.unwrap_or(f64::NAN), 0),
            spread(&rs, |r| r.affected as f64, 0),
            spread(&rs, |r| median(&r.gaps_affected), 0),
            spread(&rs, |r| max(&r.gaps_affected), 0),
            spread(
                &rs,
                |r| max(&r.recovered.iter().flatten().copied().collect::<Vec<_>>()),
                0
            ),
            rs.iter()
                .map(|r| r
                    .recovered
                    .iter()
                    .filter(|x| x.is_none())
                    .count()
                    .to_string())
                .collect::<Vec<_>>()
                .join(", "),
            spread(&rs, |r| max(&r.gaps_others), 0),
        );
    }
}

// ---- the test -------------------------------------------------------------------------------

#[test]
#[ignore = "measurement; run explicitly (see the module docs)"]
fn ecmp_active_active_throughput_sync_takeover() {
    if !need_root() || !need_tool("bird") || !need_tool("curl") || !need_tool("nft") {
        return;
    }
    let reps = env_f64("LB_ECMP_PERF_REPS", 3.0) as usize;
    let parts = env_list("LB_ECMP_PERF_PARTS", "throughput,sync,takeover");
    let modes: Vec<Fwd> = env_list("LB_ECMP_PERF_MODES", "kernel,tunnel,nat")
        .iter()
        .filter_map(|m| Fwd::parse(m))
        .collect();
    let tput_ns: Vec<u8> = env_list("LB_ECMP_PERF_NODES", "1,2,3")
        .iter()
        .filter_map(|n| n.parse().ok())
        .filter(|n| (1..=3).contains(n))
        .collect();
    let sync_ns: Vec<u8> = env_list("LB_ECMP_PERF_SYNC_NODES", "2,3,4")
        .iter()
        .filter_map(|n| n.parse().ok())
        .filter(|n| (2..=NODES).contains(n))
        .collect();
    let conns = env_f64("LB_ECMP_PERF_CONNS", 24.0) as usize;
    let secs = env_f64("LB_ECMP_PERF_SECS", 6.0);
    let rate = env_f64("LB_ECMP_PERF_FLOW_RATE", 2000.0);
    let sync_secs = env_f64("LB_ECMP_PERF_SYNC_SECS", 8.0);
    let probe_flows = env_f64("LB_ECMP_PERF_PROBE_FLOWS", 24.0) as usize;
    let tck = clk_tck();
    let began = Instant::now();
    println!(
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let opts = EcmpOpts {
        balancers: NODES,
        anchor: Anchor::Device("lb0".into()),
        start_disabled: true,
        ..EcmpOpts::default()
    };
    let mut lab = EcmpLab::new("ecmpperf", opts);
    lab.start_servers();
    for b in lab.backends.clone() {
        lab.lab.decap_agent(&b);
    }
    drop_flows_on_backends(&lab);
    lab.start_birds();
    let all: BTreeSet<u8> = (1..=NODES).collect();
    assert!(
        lab.wait_established(&all, Duration::from_secs(20)),
        "BGP sessions:\n{}",
        lab.bird_report()
    );

    if parts.iter().any(|p| p == "throughput") {
        let sinks = Sinks::start(&lab);
        let mut runs = Vec::new();
        for rep in 1..=reps {
            for &m in &modes {
                for &n in &tput_ns {
                    let load = TputLoad { conns, secs, tck };
                    let r = throughput_run(&mut lab, &sinks, m, n, rep, load);
                    print_tput(&r);
                    runs.push(r);
                }
            }
        }
        drop(sinks);
        print_tput_table(&runs, &modes, &tput_ns);
        println!(
            "(throughput part done at {:.0} s)",
            began.elapsed().as_secs_f64()
        );
    }
    if parts.iter().any(|p| p == "sync") {
        let mut runs = Vec::new();
        for rep in 1..=reps {
            for &n in &sync_ns {
                let r = sync_run(&mut lab, n, rep, rate, sync_secs);
                print_sync(&r);
                runs.push(r);
            }
        }
        print_sync_table(&runs, &sync_ns);
        println!("(sync part done at {:.0} s)", began.elapsed().as_secs_f64());
    }
    if parts.iter().any(|p| p == "takeover") {
        let mut runs = Vec::new();
        for rep in 1..=reps {
            for k in Kill::ALL {
                let r = takeover_run(&mut lab, k, rep, probe_flows);
                print_take(&r);
                runs.push(r);
            }
        }
        print_take_table(&runs);
        println!(
            "(takeover part done at {:.0} s)",
            began.elapsed().as_secs_f64()
        );
    }
    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
