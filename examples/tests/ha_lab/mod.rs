//! The high-availability lab: an active/backup pair of balancers between a client and three
//! backends, on bridges that survive whatever happens to a balancer, built on [`Lab`] (so every
//! namespace and process goes away on every path, a failed assertion included).
//!
//! # Topology ([`HaLab::new`])
//! ```text
//!                         sw ns: bridges brf (front) and brb (back)
//!  client ns                 |                                  |               backend ns b1..b3
//!  c0 192.0.2.2/24 ------- brf ---- front0  l1 ns  back0 ---- brb ------- e0 198.51.100.1N/24
//!     2001:db8:c::2/64       |      .11, c::11      .2, b::2     |           2001:db8:b::1N/64
//!  default via 192.0.2.10    +----- front0  l2 ns  back0 -------+           default via 198.51.100.1
//!           2001:db8:c::10          .12, c::12      .3, b::3                     2001:db8:b::1
//!  floating (the master only): 192.0.2.10/24 + 2001:db8:c::10/64 on front0,
//!                              198.51.100.1/24 + 2001:db8:b::1/64 on back0
//!  VIP 203.0.113.10 / 2001:db8:10::10 (TCP 80, UDP 7000); SNAT 203.0.113.100 / 2001:db8:100::100
//! ```
//! Commands (`$SW`, `$C`, `$Ln`, `$Bn` are namespace names; each namespace gets `lo` up and no
//! IPv6 duplicate address detection):
//! ```text
//! ip -n $SW link add brf type bridge; ip -n $SW link add brb type bridge   # both up
//! ip -n $SW link add pc type veth peer name c0 netns $C;      ip -n $SW link set pc master brf
//! ip -n $SW link add pl1f type veth peer name front0 netns $L1; ip -n $SW link set pl1f master brf
//! ip -n $SW link add pl1b type veth peer name back0 netns $L1;  ip -n $SW link set pl1b master brb
//! (the same for l2 with pl2f / pl2b; for bN: ip -n $SW link add pbN type veth peer name e0 netns $Bn,
//!  master brb); fixed MACs: c0 02:00:00:00:c0:02, front0 02:00:00:00:f0:0n, back0
//!  02:00:00:00:b0:0n, e0 02:00:00:00:00:1N
//! ip -n $C addr add 192.0.2.2/24 dev c0; ip -n $C addr add 2001:db8:c::2/64 dev c0 nodad
//! ip -n $C route add default via 192.0.2.10; ip -n $C -6 route add default via 2001:db8:c::10
//! ip -n $L1 addr add 192.0.2.11/24 dev front0; ... 2001:db8:c::11/64; 198.51.100.2/24 dev back0;
//!     2001:db8:b::2/64 (l2: .12, c::12, .3, b::3)
//! ip netns exec $Ln sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
//!     net.ipv4.conf.{all,default,front0,back0}.rp_filter=0
//! ip -n $Bn addr add 198.51.100.1N/24 dev e0; ... 2001:db8:b::1N/64
//! ip -n $Bn route add default via 198.51.100.1; ip -n $Bn -6 route add default via 2001:db8:b::1
//! ```
//! Nothing holds a floating address until a balancer program (tun-balancer's `[ha]`, or
//! keepalived in the baseline) adds it.
//!
//! The workload (`workload.py` in the client, `server.py` on each backend) is driven by
//! [`Workload`]; the tun-balancer pair by [`pair_config`] and [`HaLab::start_balancer`]; the
//! keepalived + nftables (+ conntrackd) baseline by the [`baseline`] module.
#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod baseline;
pub mod ecmp;
pub mod pair;
pub mod rawload;
pub mod workload;

pub use pair::{ha_section, pair_config, PairOpts};
pub use workload::{Workload, WorkloadOpts, WorkloadReport};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::common::{python, tshark_read, BackendNs, Lab};

/// The VIP (IPv4).
pub const VIP4: &str = "203.0.113.10";
/// The VIP (IPv6).
pub const VIP6: &str = "2001:db8:10::10";
/// The SNAT address of mode `nat` (IPv4).
pub const SNAT4: &str = "203.0.113.100";
/// The SNAT address of mode `nat` (IPv6).
pub const SNAT6: &str = "2001:db8:100::100";
/// The floating addresses, `(device, address/prefix)`, in the order of the `[ha]` section.
pub const FLOATING: [(&str, &str); 4] = [
    ("front0", "192.0.2.10/24"),
    ("front0", "2001:db8:c::10/64"),
    ("back0", "198.51.100.1/24"),
    ("back0", "2001:db8:b::1/64"),
];
/// The heartbeat port of the tun-balancer pair.
pub const HA_PORT: u16 = 7400;
/// The backends' HTTP ports: 8080 for mode `nat`, 80 (the VIP's port) for `tunnel` and `dr`.
pub const HTTP_PORTS: [u16; 2] = [8080, 80];
/// The backends' UDP echo port (also the VIP's UDP port).
pub const UDP_PORT: u16 = 7000;
/// The shared flow-hash passphrase of the pair.
pub const HASH_KEY: &str = "e2e ha pair secret 0123456789";
/// The pair's authentication key.
pub const AUTH_KEY: &str = "at least sixteen characters";

/// Milliseconds since the Unix epoch (the clock the python programs and captures use).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The role name of balancer node `node` (1 → `l1`).
pub fn node_role(node: u8) -> &'static str {
    match node {
        1 => "l1",
        2 => "l2",
        _ => panic!("node {node}: the lab has nodes 1 and 2"),
    }
}

/// The other node of the pair.
pub fn peer_of(node: u8) -> u8 {
    3 - node
}

/// The front address of a node (`192.0.2.11` for node 1).
pub fn front_addr(node: u8) -> String {
    format!("192.0.2.{}", 10 + node)
}

/// A client neighbour entry (`ip -j neigh`).
#[derive(Debug, Clone, Deserialize)]
pub struct Neigh {
    /// The neighbour's address.
    pub dst: String,
    /// Its link-layer address, when resolved.
    #[serde(default)]
    pub lladdr: Option<String>,
    /// NUD states (`REACHABLE`, `STALE`, ...).
    #[serde(default)]
    pub state: Vec<String>,
}

/// A running packet capture ([`HaLab::start_capture`]).
#[derive(Debug, Clone)]
pub struct Capture {
    name: String,
    /// The pcapng file.
    pub file: PathBuf,
}

/// The pair topology and what runs in it; everything is removed when dropped.
pub struct HaLab {
    /// The underlying lab (namespaces, processes, the scratch directory).
    pub lab: Lab,
    roles: HashMap<String, String>,
    /// The backends (`b1..b3`).
    pub backends: Vec<BackendNs>,
    /// Logical process name → its incarnations' names in [`Lab`] (the last is the current one).
    procs: HashMap<String, Vec<String>>,
    cuts: Vec<String>,
}

impl HaLab {
    /// Builds the topology of the module docs for test `test` (a short tag).
    pub fn new(test: &str) -> HaLab {
        let mut lab = Lab::new(test);
        let mut roles = HashMap::new();
        for role in ["sw", "client", "l1", "l2", "b1", "b2", "b3"] {
            roles.insert(role.to_owned(), lab.ns(role));
        }
        let ns = |r: &str| roles[r].clone();
        let sw = ns("sw");
        for br in ["brf", "brb"] {
            lab.ip(&sw, &format!("link add {br} type bridge"));
            lab.ip(&sw, &format!("link set {br} up"));
        }
        let port = |lab: &Lab, p: &str, peer_ns: &str, peer_if: &str, br: &str, mac: &str| {
            lab.ip(
                &sw,
                &format!("link add {p} type veth peer name {peer_if} netns {peer_ns}"),
            );
            lab.ip(peer_ns, &format!("link set {peer_if} address {mac}"));
            lab.ip(&sw, &format!("link set {p} master {br}"));
            lab.ip(&sw, &format!("link set {p} up"));
            lab.ip(peer_ns, &format!("link set {peer_if} up"));
        };
        let c = ns("client");
        port(&lab, "pc", &c, "c0", "brf", "02:00:00:00:c0:02");
        lab.addr(&c, "c0", "192.0.2.2/24");
        lab.addr(&c, "c0", "2001:db8:c::2/64");
        lab.ip(&c, "route add default via 192.0.2.10");
        lab.ip(&c, "-6 route add default via 2001:db8:c::10");
        for n in 1..=2u8 {
            let l = ns(node_role(n));
            port(
                &lab,
                &format!("pl{n}f"),
                &l,
                "front0",
                "brf",
                &format!("02:00:00:00:f0:0{n}"),
            );
            port(
                &lab,
                &format!("pl{n}b"),
                &l,
                "back0",
                "brb",
                &format!("02:00:00:00:b0:0{n}"),
            );
            lab.addr(&l, "front0", &format!("192.0.2.{}/24", 10 + n));
            lab.addr(&l, "front0", &format!("2001:db8:c::{}/64", 10 + n));
            lab.addr(&l, "back0", &format!("198.51.100.{}/24", 1 + n));
            lab.addr(&l, "back0", &format!("2001:db8:b::{}/64", 1 + n));
            lab.sh(
                &l,
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
                 net.ipv4.conf.front0.rp_filter=0 net.ipv4.conf.back0.rp_filter=0",
            );
        }
        let mut backends = Vec::new();
        for i in 1..=3u8 {
            let name = format!("b{i}");
            let b = ns(&name);
            port(
                &lab,
                &format!("p{name}"),
                &b,
                "e0",
                "brb",
                &format!("02:00:00:00:00:1{i}"),
            );
            let v4 = format!("198.51.100.{}", 10 + i);
            let v6 = format!("2001:db8:b::{}", 10 + i);
            lab.addr(&b, "e0", &format!("{v4}/24"));
            lab.addr(&b, "e0", &format!("{v6}/64"));
            lab.ip(&b, "route add default via 198.51.100.1");
            lab.ip(&b, "-6 route add default via 2001:db8:b::1");
            backends.push(BackendNs {
                ns: b,
                name,
                v4: v4.parse().expect("v4"),
                v6: v6.parse().expect("v6"),
            });
        }
        HaLab {
            lab,
            roles,
            backends,
            procs: HashMap::new(),
            cuts: Vec::new(),
        }
    }

    /// The namespace of `role` (`sw`, `client`, `l1`, `l2`, `b1`..`b3`).
    pub fn ns(&self, role: &str) -> &str {
        self.roles
            .get(role)
            .unwrap_or_else(|| panic!("no role {role} in the lab"))
    }

    /// The namespace of balancer node 1 or 2.
    pub fn node_ns(&self, node: u8) -> &str {
        self.ns(node_role(node))
    }

    /// Runs a shell script in `role`'s namespace (30 s timeout); panics on failure.
    pub fn sh(&self, role: &str, script: &str) -> String {
        self.lab.sh(self.ns(role), script)
    }

    /// Runs a shell script in `role`'s namespace (30 s timeout).
    pub fn try_sh(&self, role: &str, script: &str) -> Result<String, String> {
        self.lab.try_sh(self.ns(role), script)
    }

    // ---- processes ---------------------------------------------------------------------------

    /// Starts `argv` in `role`'s namespace as process `name` (its own process group, output to
    /// `<name>.log` in the lab directory; a restart after a stop or kill gets a new log,
    /// `<name>.2.log`, and [`HaLab::log`] shows them all).
    pub fn start(&mut self, role: &str, name: &str, argv: &[&str]) {
        let ns = self.ns(role).to_owned();
        if let Some(cur) = self.current(name).map(str::to_owned) {
            assert!(!self.lab.alive(&cur), "process {name} is already running");
            // Exited by itself: reap it before the next incarnation.
            self.lab.kill(&cur);
        }
        let list = self.procs.entry(name.to_owned()).or_default();
        let incarnation = if list.is_empty() {
            name.to_owned()
        } else {
            format!("{name}.{}", list.len() + 1)
        };
        list.push(incarnation.clone());
        self.lab.spawn(&ns, &incarnation, argv);
    }

    fn current(&self, name: &str) -> Option<&str> {
        self.procs
            .get(name)
            .and_then(|l| l.last())
            .map(String::as_str)
    }

    /// The pid (= process group) of the current incarnation of `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.current(name).and_then(|c| self.lab.pid(c))
    }

    /// Whether process `name` is running.
    pub fn alive(&mut self, name: &str) -> bool {
        match self.current(name).map(str::to_owned) {
            Some(c) => self.lab.alive(&c),
            None => false,
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`, `TERM`) to the process group of `name`.
    pub fn signal(&self, name: &str, signal: &str) {
        if let Some(pid) = self.pid(name) {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Freezes process `name` (SIGSTOP to its group).
    pub fn pause(&self, name: &str) {
        self.signal(name, "STOP");
    }

    /// Thaws process `name` (SIGCONT to its group).
    pub fn resume(&self, name: &str) {
        self.signal(name, "CONT");
    }

    /// `kill -9` of process `name`'s group; returns the instant of the signal (Unix ms).
    pub fn kill9(&mut self, name: &str) -> u64 {
        let t = unix_ms();
        if let Some(c) = self.current(name).map(str::to_owned) {
            self.lab.kill(&c);
        }
        t
    }

    /// SIGTERM to process `name`'s group, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, name: &str, grace: Duration) {
        let Some(c) = self.current(name).map(str::to_owned) else {
            return;
        };
        self.signal(name, "TERM");
        let _ = self.lab.wait_exit(&c, grace);
        self.lab.kill(&c);
    }

    /// The logs of every incarnation of process `name`, oldest first.
    pub fn log(&self, name: &str) -> String {
        self.procs
            .get(name)
            .map(|l| {
                l.iter()
                    .map(|c| format!("--- {c}\n{}", self.lab.log(c)))
                    .collect::<Vec<_>>()
                    .join("")
            })
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for process `name` to exit; its exit code.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<i32> {
        let c = self.current(name)?.to_owned();
        self.lab.wait_exit(&c, timeout)
    }

    // ---- backends ----------------------------------------------------------------------------

    /// Starts `server.py` on every backend (HTTP on [`HTTP_PORTS`], UDP echo on [`UDP_PORT`]) as
    /// processes `srv-bN`, and waits until they listen.
    pub fn start_servers(&mut self) {
        for b in self.backends.clone() {
            let mut argv = vec![python().to_owned(), server_script(), b.name.clone()];
            for p in HTTP_PORTS {
                argv.extend(["--http-port".to_owned(), p.to_string()]);
            }
            argv.extend(["--udp-port".to_owned(), UDP_PORT.to_string()]);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            self.start(&b.name, &format!("srv-{}", b.name), &argv);
        }
        for b in &self.backends {
            for p in HTTP_PORTS {
                self.lab.wait_listen(&b.ns, "tcp", p);
            }
            self.lab.wait_listen(&b.ns, "udp", UDP_PORT);
        }
    }

    // ---- addresses, neighbours, faults --------------------------------------------------------

    /// The nodes (1, 2) whose namespace holds `addr` (no prefix, e.g. `192.0.2.10`) right now.
    pub fn holders(&self, addr: &str) -> Vec<u8> {
        [1u8, 2]
            .into_iter()
            .filter(|&n| {
                self.try_sh(node_role(n), "ip -o addr show")
                    .map(|out| out.contains(&format!(" {addr}/")))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits up to `timeout` until `node` holds `addr`; whether it did.
    pub fn wait_holds(&self, node: u8, addr: &str, timeout: Duration) -> bool {
        self.lab
            .wait_for(timeout, || self.holders(addr).contains(&node).then_some(()))
            .is_some()
    }

    /// Deletes whichever floating addresses `node` still holds (what a host restarting after a
    /// crash would find gone).
    pub fn remove_floating(&self, node: u8) {
        for (dev, a) in FLOATING {
            let _ = self.try_sh(node_role(node), &format!("ip addr del {a} dev {dev}"));
        }
    }

    /// The MAC address of `dev` in `role`'s namespace.
    pub fn mac(&self, role: &str, dev: &str) -> String {
        let out = self.sh(role, &format!("cat /sys/class/net/{dev}/address"));
        out.trim().to_owned()
    }

    /// The neighbour table of `dev` in `role`'s namespace.
    pub fn neigh(&self, role: &str, dev: &str) -> Vec<Neigh> {
        let out = self
            .try_sh(role, &format!("ip -j neigh show dev {dev}"))
            .unwrap_or_default();
        serde_json::from_str(out.trim()).unwrap_or_default()
    }

    /// The client's neighbour table on `c0`.
    pub fn client_neigh(&self) -> Vec<Neigh> {
        self.neigh("client", "c0")
    }

    /// The node whose `front0` or `back0` MAC the neighbour entry for `ip` on `dev` in `role`'s
    /// namespace holds, if any (e.g. `sees("b1", "e0", "198.51.100.1")`).
    pub fn sees(&self, role: &str, dev: &str, ip: &str) -> Option<u8> {
        let n = self.neigh(role, dev).into_iter().find(|n| n.dst == ip)?;
        let mac = n.lladdr?;
        [1u8, 2].into_iter().find(|&node| {
            ["front0", "back0"]
                .iter()
                .any(|d| self.mac(node_role(node), d) == mac)
        })
    }

    /// The node the client's neighbour entry for `ip` points at, if any.
    pub fn client_sees(&self, ip: &str) -> Option<u8> {
        self.sees("client", "c0", ip)
    }

    /// Drops frames matching the nftables expression `expr` between the balancers' front ports
    /// (both ways), in the switch, under the name `tag`; [`HaLab::heal`] removes it.
    pub fn cut(&mut self, tag: &str, expr: &str) {
        let table = format!("cut_{tag}");
        let rules = format!(
            "table bridge {table} {{\n chain cut {{\n  type filter hook forward priority 0; policy accept;\n  \
             iifname {{ \"pl1f\", \"pl2f\" }} oifname {{ \"pl1f\", \"pl2f\" }} {expr} counter drop\n }}\n}}\n"
        );
        let path = self.lab.write(&format!("{table}.nft"), &rules);
        self.sh("sw", &format!("nft -f {}", path.display()));
        self.cuts.push(table);
    }

    /// Removes the cut named `tag`.
    pub fn heal(&mut self, tag: &str) {
        let table = format!("cut_{tag}");
        let _ = self.try_sh("sw", &format!("nft delete table bridge {table}"));
        self.cuts.retain(|t| *t != table);
    }

    /// Takes node `node` off both bridges (its switch ports down): to everyone else the node is
    /// gone, data path included, whatever still runs inside it.
    pub fn isolate(&self, node: u8) {
        self.sh(
            "sw",
            &format!("ip link set pl{node}f down; ip link set pl{node}b down"),
        );
    }

    /// Undoes [`HaLab::isolate`].
    pub fn reconnect(&self, node: u8) {
        self.sh(
            "sw",
            &format!("ip link set pl{node}f up; ip link set pl{node}b up"),
        );
    }

    /// The tags of the cuts in place.
    pub fn active_cuts(&self) -> Vec<String> {
        self.cuts
            .iter()
            .map(|t| t.trim_start_matches("cut_").to_owned())
            .collect()
    }

    /// Cuts the pair's heartbeat: UDP port [`HA_PORT`] between l1 and l2, both ways.
    pub fn cut_heartbeat(&mut self) {
        self.cut("hb", &format!("udp dport {HA_PORT}"));
    }

    /// Heals [`HaLab::cut_heartbeat`].
    pub fn heal_heartbeat(&mut self) {
        self.heal("hb");
    }

    // ---- captures ----------------------------------------------------------------------------

    /// Starts `dumpcap` on `dev` in `role`'s namespace with capture filter `filter` (128-byte
    /// snapshots); waits until it captures.
    pub fn start_capture(&mut self, role: &str, dev: &str, filter: &str) -> Capture {
        let name = format!("cap-{role}-{dev}");
        let file = self.lab.dir.join(format!("{name}.pcapng"));
        let f = file.to_string_lossy().into_owned();
        self.start(
            role,
            &name,
            &[
                "dumpcap", "-n", "-i", dev, "-f", filter, "-s", "128", "-w", &f,
            ],
        );
        let cur = self.current(&name).expect("capture started").to_owned();
        let ok = self.lab.wait_for(Duration::from_secs(15), || {
            self.lab.log(&cur).contains("Capturing on").then_some(())
        });
        assert!(ok.is_some(), "dumpcap did not start: {}", self.log(&name));
        Capture { name, file }
    }

    /// Stops a capture (SIGINT, so that the file is complete).
    pub fn stop_capture(&mut self, cap: &Capture) {
        self.signal(&cap.name, "INT");
        let _ = self.wait_exit(&cap.name, Duration::from_secs(10));
        self.stop(&cap.name, Duration::from_secs(1));
    }
}

/// The Unix times (ms) of a capture's packets that match the display filter `filter` (empty:
/// all), in file order.
pub fn capture_times(file: &Path, filter: &str) -> Vec<u64> {
    if std::fs::metadata(file).map(|m| m.len()).unwrap_or(0) == 0 {
        return Vec::new();
    }
    let mut args = vec!["-T", "fields", "-e", "frame.time_epoch"];
    if !filter.is_empty() {
        args.extend(["-Y", filter]);
    }
    tshark_read(file, &args)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .collect()
}

/// The first packet of a capture matching `filter` at or after `unix_ms`.
pub fn first_packet_after(file: &Path, filter: &str, unix_ms: u64) -> Option<u64> {
    capture_times(file, filter)
        .into_iter()
        .find(|&t| t >= unix_ms)
}

/// The path of `server.py`.
pub fn server_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ha_lab/server.py").to_owned()
}

/// The path of `workload.py`.
pub fn workload_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ha_lab/workload.py").to_owned()
}
