//! The ECMP lab: N balancers (3 by default) share one VIP behind a router's equal-cost
//! multipath route, each announcing it over eBGP from its own BIRD, the router (BIRD too)
//! installing one next hop per announcing balancer and dropping a dead one's within BFD's
//! detection time. Built on [`Lab`], so every namespace and process goes away on every path.
//!
//! # Topology ([`EcmpLab::new`])
//! ```text
//!  client ns               router ns                   sw ns: bridges brf (front), brb (back)
//!  c0 192.0.2.2/24 ---- rc 192.0.2.1/24
//!  default via .1          rf 198.18.0.1/24 ---- brf ---- front0 lN ns  back0 ---- brb ---- e0 bI ns
//!                                                          198.18.0.1N   198.51.100.(1+N)   198.51.100.1I/24
//!                          rb 198.51.100.1/24 ----------------------------------- brb       VIP on lo
//!                          BIRD: AS 65000, one eBGP            BIRD: AS 65001, static     default via
//!                          session + BFD per balancer;         `vip` exported to the      198.51.100.1
//!                          kernel protocol, merge paths on     router (+ BFD)             (the router)
//!  VIP 203.0.113.10 (TCP 80); balancer N's own SNAT address 203.0.113.(100+N), routed by every
//!  backend via 198.51.100.(1+N)
//! ```
//! Commands (`$SW`, `$R`, `$C`, `$Ln`, `$Bi` are namespace names; each has `lo` up):
//! ```text
//! ip -n $SW link add brf type bridge; ip -n $SW link add brb type bridge      # both up
//! ip -n $R link add rc type veth peer name c0 netns $C
//! ip -n $SW link add prf type veth peer name rf netns $R; ip -n $SW link set prf master brf
//! ip -n $SW link add prb type veth peer name rb netns $R; ip -n $SW link set prb master brb
//! ip -n $SW link add plNf type veth peer name front0 netns $Ln  (master brf), plNb / back0 (brb)
//! ip -n $SW link add pbI type veth peer name e0 netns $Bi        (master brb)
//! ip -n $C addr add 192.0.2.2/24 dev c0; ip -n $C route add default via 192.0.2.1
//! ip netns exec $C sysctl -w net.core.txrehash=0
//! ip -n $R addr add 192.0.2.1/24 dev rc; ... 198.18.0.1/24 dev rf; 198.51.100.1/24 dev rb
//! ip netns exec $R sysctl -w net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
//!     net.ipv4.conf.{all,default}.rp_filter=0
//! ip -n $Ln addr add 198.18.0.1N/24 dev front0; ip -n $Ln addr add 198.51.100.(1+N)/24 dev back0
//! ip -n $Ln route add default via 198.18.0.1
//! ip netns exec $Ln sysctl -w (the same as the router)
//! ip -n $Bi addr add 198.51.100.1I/24 dev e0; ip -n $Bi addr add 203.0.113.10/32 dev lo
//! ip -n $Bi route add default via 198.51.100.1
//! ip -n $Bi route add 203.0.113.(100+N)/32 via 198.51.100.(1+N)       # for every balancer N
//! ip netns exec $Bi sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
//!     net.ipv4.conf.{all,default}.rp_filter=0
//! ```
//! Backends answer for the VIP themselves (it is on their `lo`) and reply to clients straight
//! through the router, so a balancer may forward the VIP however it likes:
//! - [`EcmpLab::forward_kernel`]: the balancer's kernel routes the VIP to the backends
//!   (`ip route add 203.0.113.10/32 nexthop via 198.51.100.11 nexthop via ...12 ...13`), no
//!   balancer program at all — what the tests use until tun-balancer has an active-active mode;
//! - [`EcmpLab::start_balancer`]: `tun-balancer` with a configuration string, the VIP and the
//!   node's SNAT address routed to its `lb0` ([`balancer_config`] is a mode `nat` one).
//!
//! # What picks a flow's balancer
//! With `fib_multipath_hash_policy = 1` the router hashes a forwarded packet's 5-tuple —
//! unless the packet already carries an L4 flow hash, which `fib_multipath_hash` then uses
//! as is (`skb->l4_hash`). Packets of the client's TCP sockets carry the socket's random
//! `sk_txhash`, and veth and bridges keep it across namespaces, so in this lab a connection's
//! balancer is picked by that per-socket hash (and the balancers' own multipath routes pick
//! the backend with the same hash: under [`EcmpLab::forward_kernel`], balancer N sends its
//! connections to backend N). Packets without a hash (a raw socket's, e.g. hping3's) go where
//! [`EcmpLab::route_choices`] (`ip route get ... sport ... dport ...`) says; the tests check
//! both. A Linux router whose NIC supplies a receive hash likewise uses that, also per flow.
//! The client has
//! `net.core.txrehash = 0`: otherwise a retransmission timeout re-rolls the socket's hash and
//! moves the connection to another balancer mid-stream, which no remote client could cause.
//!
//! Each balancer's BIRD ([`EcmpLab::start_bird`], configuration [`balancer_bird_config`],
//! control socket `bird-lN.ctl` in the lab directory) announces the VIP from its `static`
//! protocol [`VIP_PROTOCOL`]; until tun-balancer drives it, the tests switch it with
//! [`EcmpLab::announce`] / [`EcmpLab::withdraw`] ([`lb_examples::bgp::Bird`]). The router's
//! view is [`EcmpLab::next_hops`]: the balancers its kernel route for the VIP points at.
//!
//! BGP timers are shortened for the lab (connect delay 1 s, error wait 1–4 s); the hold time
//! and BFD come from [`EcmpOpts`].

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_examples::bgp::Bird;
use serde::Deserialize;

use super::{server_script, VIP4};
use crate::common::{balancer_bin, python, run_timeout, BackendNs, Lab};

/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// The balancers' AS (one AS for the fleet).
pub const BALANCER_AS: u32 = 65001;
/// The router's address on the front segment (the balancers' BGP neighbour).
pub const ROUTER_FRONT: &str = "198.18.0.1";
/// The name of the `static` protocol that announces the VIP in each balancer's BIRD.
pub const VIP_PROTOCOL: &str = "vip";
/// The name of each balancer's BGP protocol (its session to the router).
pub const UPLINK_PROTOCOL: &str = "up0";
/// The VIP's TCP port.
pub const VIP_PORT: u16 = 80;
/// The backends' HTTP port for mode `nat` (80, the VIP's port, is served too).
pub const NAT_PORT: u16 = 8080;

/// BFD timers of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bfd {
    /// Desired minimum transmit and required minimum receive interval.
    pub interval_ms: u32,
    /// Detection multiplier: the session goes down after this many intervals without a packet.
    pub multiplier: u32,
}

/// What a balancer's `static` protocol routes the VIP to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchor {
    /// `route VIP/32 blackhole`: announced whenever the protocol is enabled.
    Blackhole,
    /// `route VIP/32 via "DEV"`: announced only while the device exists (tun-balancer's TUN
    /// device disappears with its process).
    Device(String),
}

/// How the lab is built.
#[derive(Debug, Clone)]
pub struct EcmpOpts {
    /// Balancers (1..=8).
    pub balancers: u8,
    /// BFD on the BGP sessions (`None`: no BFD at all).
    pub bfd: Option<Bfd>,
    /// Balancers whose session runs without BFD even when `bfd` is set (the hold timer alone
    /// notices their death), for a same-run comparison.
    pub without_bfd: Vec<u8>,
    /// BGP hold time in seconds (3 at least, or 0; keepalives every third of it).
    pub hold_time_s: u32,
    /// What the VIP's static route points at.
    pub anchor: Anchor,
    /// Whether each balancer's `vip` protocol starts `disabled` (announces nothing until
    /// enabled over the control socket).
    pub start_disabled: bool,
}

impl Default for EcmpOpts {
    fn default() -> EcmpOpts {
        EcmpOpts {
            balancers: 3,
            bfd: Some(Bfd {
                interval_ms: 100,
                multiplier: 3,
            }),
            without_bfd: Vec::new(),
            hold_time_s: 3,
            anchor: Anchor::Blackhole,
            start_disabled: false,
        }
    }
}

/// The role name of balancer `n` (1 → `l1`).
pub fn balancer_role(n: u8) -> String {
    format!("l{n}")
}

/// Balancer `n`'s front address (its BGP source and the router's next hop): `198.18.0.1N`.
pub fn front_addr(n: u8) -> String {
    format!("198.18.0.{}", 10 + u32::from(n))
}

/// Balancer `n`'s back address: `198.51.100.(1+N)`.
pub fn back_addr(n: u8) -> String {
    format!("198.51.100.{}", 1 + u32::from(n))
}

/// Balancer `n`'s own SNAT address (mode `nat`): `203.0.113.(100+N)`.
pub fn snat_addr(n: u8) -> String {
    format!("203.0.113.{}", 100 + u32::from(n))
}

/// The balancer whose front address is `gateway`, if any.
pub fn node_of_gateway(gateway: &str) -> Option<u8> {
    let last: u8 = gateway.strip_prefix("198.18.0.")?.parse().ok()?;
    (11..=18).contains(&last).then(|| last - 10)
}

/// The router's BIRD configuration: one eBGP session per balancer (protocols `l1`..), BFD on
/// `rf` when any session uses it, and the kernel protocol installing BGP's routes with
/// `merge paths on` (equal BGP routes from several balancers become one multipath route).
pub fn router_bird_config(opts: &EcmpOpts) -> String {
    let mut c = format!(
        "router id {ROUTER_FRONT};\nlog stderr all;\n\
         protocol device {{ }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n"
    );
    if let Some(b) = opts.bfd {
        c.push_str(&bfd_protocol("rf", b));
    }
    c.push_str(&format!(
        "template bgp lb {{\n  local {ROUTER_FRONT} as {ROUTER_AS};\n{}  ipv4 {{ import all; export none; }};\n}}\n",
        bgp_timers(opts.hold_time_s)
    ));
    for n in 1..=opts.balancers {
        let bfd = if opts.bfd.is_some() && !opts.without_bfd.contains(&n) {
            "on"
        } else {
            "off"
        };
        c.push_str(&format!(
            "protocol bgp {} from lb {{ neighbor {} as {BALANCER_AS}; bfd {bfd}; }}\n",
            balancer_role(n),
            front_addr(n)
        ));
    }
    c
}

/// Balancer `n`'s BIRD configuration: the VIP in `static` protocol [`VIP_PROTOCOL`] (anchored
/// as `opts.anchor` says, `disabled` when `opts.start_disabled`), exported over the eBGP
/// session [`UPLINK_PROTOCOL`] to the router, with BFD unless `opts` says otherwise. No kernel
/// protocol: this BIRD changes nothing in its own namespace's routing table.
pub fn balancer_bird_config(opts: &EcmpOpts, n: u8) -> String {
    let route = match &opts.anchor {
        Anchor::Blackhole => format!("{VIP4}/32 blackhole"),
        Anchor::Device(dev) => format!("{VIP4}/32 via \"{dev}\""),
    };
    let disabled = if opts.start_disabled {
        "  disabled;\n"
    } else {
        ""
    };
    let bfd = opts.bfd.filter(|_| !opts.without_bfd.contains(&n));
    let mut c = format!(
        "router id {};\nlog stderr all;\nprotocol device {{ }}\n\
         protocol static {VIP_PROTOCOL} {{\n  ipv4;\n{disabled}  route {route};\n}}\n",
        front_addr(n)
    );
    if let Some(b) = bfd {
        c.push_str(&bfd_protocol("front0", b));
    }
    c.push_str(&format!(
        "protocol bgp {UPLINK_PROTOCOL} {{\n  local {} as {BALANCER_AS};\n  neighbor {ROUTER_FRONT} as {ROUTER_AS};\n\
         {}  ipv4 {{ import none; export where proto = \"{VIP_PROTOCOL}\"; }};\n  bfd {};\n}}\n",
        front_addr(n),
        bgp_timers(opts.hold_time_s),
        if bfd.is_some() { "on" } else { "off" }
    ));
    c
}

fn bfd_protocol(dev: &str, b: Bfd) -> String {
    format!(
        "protocol bfd {{\n  interface \"{dev}\" {{ min rx interval {i} ms; min tx interval {i} ms; multiplier {m}; }};\n}}\n",
        i = b.interval_ms,
        m = b.multiplier
    )
}

/// BGP timers: the hold time asked for; a first connection attempt 1 s after start and
/// retries every 2 s (defaults 5 and 120 s); 1 to 4 s before a session that failed (BFD down,
/// hold timer) restarts (defaults 60 to 300 s).
fn bgp_timers(hold_time_s: u32) -> String {
    format!(
        "  hold time {hold_time_s};\n  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 4;\n"
    )
}

/// A mode `nat` tun-balancer configuration for balancer `n`: TCP `VIP:80` → the backends'
/// port 8080 (maglev, HTTP checks), SNAT from the node's own [`snat_addr`] (replies must come
/// back to the balancer that has the flow), the fleet's shared hash key.
pub fn balancer_config(n: u8, backends: &[BackendNs]) -> String {
    let mut c = format!(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"{}\"]\nconntrack_capacity = 65536\n\
         stats = \"127.0.0.1:9100\"\nhash_key = \"e2e ecmp fleet secret 0123456789\"\n\n\
         [[service]]\nvip = \"{VIP4}:{VIP_PORT}\"\nproto = \"tcp\"\nmode = \"nat\"\nscheduler = \"maglev\"\n\
         [service.health]\nkind = \"http\"\npath = \"/id\"\ninterval_ms = 200\nrise = 1\nfall = 2\n",
        snat_addr(n)
    );
    for b in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"{}:{NAT_PORT}\"\nweight = 1\n",
            b.v4
        ));
    }
    c
}

/// A mode `tunnel` tun-balancer configuration for balancer `n`: TCP `VIP:80` in GUE (UDP 6080)
/// to the backends, which answer the client themselves through the router; `scheduler`, HTTP
/// checks on the backends' port 8080, the node's [`snat_addr`] as the tunnels' outer source, the
/// fleet's shared hash key. The backends need an `lb-decap` agent ([`EcmpLab::decap_agents`]).
pub fn tunnel_config(n: u8, backends: &[BackendNs], scheduler: &str) -> String {
    let mut c = format!(
        "[balancer]\ndevice = \"lb0\"\nsnat_addrs = [\"{}\"]\nmtu = 1500\nconntrack_capacity = 65536\n\
         stats = \"127.0.0.1:9100\"\nhash_key = \"e2e ecmp fleet secret 0123456789\"\n\n\
         [[service]]\nvip = \"{VIP4}:{VIP_PORT}\"\nproto = \"tcp\"\nmode = \"tunnel\"\n\
         tunnel = \"gue\"\ngue_port = 6080\nscheduler = \"{scheduler}\"\n\
         [service.health]\nkind = \"http\"\npath = \"/id\"\nport = {NAT_PORT}\ninterval_ms = 200\nrise = 1\nfall = 2\n",
        snat_addr(n)
    );
    for b in backends {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"{}:0\"\nweight = 1\n",
            b.v4
        ));
    }
    c
}

/// An `ip -j route` entry.
#[derive(Debug, Clone, Deserialize)]
struct RouteJson {
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    nexthops: Vec<NextHopJson>,
}

#[derive(Debug, Clone, Deserialize)]
struct NextHopJson {
    #[serde(default)]
    gateway: Option<String>,
}

/// The gateways of `ip -j route show` output (a single-path route's or a multipath route's).
pub fn gateways_of(json: &str) -> Vec<String> {
    let routes: Vec<RouteJson> = serde_json::from_str(json.trim()).unwrap_or_default();
    let mut out = Vec::new();
    for r in routes {
        out.extend(r.gateway);
        out.extend(r.nexthops.into_iter().filter_map(|h| h.gateway));
    }
    out
}

/// The ECMP topology and what runs in it; everything is removed when dropped.
pub struct EcmpLab {
    /// The underlying lab (namespaces, processes, the scratch directory).
    pub lab: Lab,
    /// How it was built.
    pub opts: EcmpOpts,
    roles: HashMap<String, String>,
    /// The backends (`b1..b3`).
    pub backends: Vec<BackendNs>,
    /// Logical process name → its incarnations' names in [`Lab`] (the last is the current one).
    procs: HashMap<String, Vec<String>>,
}

impl EcmpLab {
    /// Builds the topology of the module docs for test `test` (a short tag); starts nothing.
    pub fn new(test: &str, opts: EcmpOpts) -> EcmpLab {
        assert!(
            (1..=8).contains(&opts.balancers),
            "1 to 8 balancers, not {}",
            opts.balancers
        );
        let mut lab = Lab::new(test);
        let mut roles = HashMap::new();
        let mut names = vec!["sw".to_owned(), "router".to_owned(), "client".to_owned()];
        names.extend((1..=opts.balancers).map(balancer_role));
        names.extend((1..=3).map(|i| format!("b{i}")));
        for role in &names {
            roles.insert(role.clone(), lab.ns(role));
        }
        let ns = |r: &str| roles[r].clone();
        let (sw, r, c) = (ns("sw"), ns("router"), ns("client"));
        for br in ["brf", "brb"] {
            lab.ip(&sw, &format!("link add {br} type bridge"));
            lab.ip(&sw, &format!("link set {br} up"));
        }
        let port = |lab: &Lab, p: &str, peer_ns: &str, peer_if: &str, br: &str| {
            lab.ip(
                &sw,
                &format!("link add {p} type veth peer name {peer_if} netns {peer_ns}"),
            );
            lab.ip(&sw, &format!("link set {p} master {br}"));
            lab.ip(&sw, &format!("link set {p} up"));
            lab.ip(peer_ns, &format!("link set {peer_if} up"));
        };
        let forwarding = "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
                          net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0";
        // Client and router.
        lab.veth(&r, "rc", &c, "c0");
        lab.addr(&c, "c0", "192.0.2.2/24");
        lab.ip(&c, "route add default via 192.0.2.1");
        // A retransmission timeout must not move a connection to another balancer (see the
        // module docs: the router hashes the client socket's own flow hash).
        lab.sh(&c, "sysctl -qw net.core.txrehash=0");
        lab.addr(&r, "rc", "192.0.2.1/24");
        port(&lab, "prf", &r, "rf", "brf");
        port(&lab, "prb", &r, "rb", "brb");
        lab.addr(&r, "rf", &format!("{ROUTER_FRONT}/24"));
        lab.addr(&r, "rb", "198.51.100.1/24");
        lab.sh(&r, forwarding);
        // Balancers.
        for n in 1..=opts.balancers {
            let l = ns(&balancer_role(n));
            port(&lab, &format!("pl{n}f"), &l, "front0", "brf");
            port(&lab, &format!("pl{n}b"), &l, "back0", "brb");
            lab.addr(&l, "front0", &format!("{}/24", front_addr(n)));
            lab.addr(&l, "back0", &format!("{}/24", back_addr(n)));
            lab.ip(&l, &format!("route add default via {ROUTER_FRONT}"));
            lab.sh(&l, forwarding);
        }
        // Backends.
        let mut backends = Vec::new();
        for i in 1..=3u8 {
            let name = format!("b{i}");
            let b = ns(&name);
            port(&lab, &format!("p{name}"), &b, "e0", "brb");
            let v4 = format!("198.51.100.{}", 10 + i);
            lab.addr(&b, "e0", &format!("{v4}/24"));
            lab.addr(&b, "lo", &format!("{VIP4}/32"));
            lab.ip(&b, "route add default via 198.51.100.1");
            for n in 1..=opts.balancers {
                lab.ip(
                    &b,
                    &format!("route add {}/32 via {}", snat_addr(n), back_addr(n)),
                );
            }
            lab.sh(
                &b,
                "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
                 net.ipv4.conf.lo.rp_filter=0",
            );
            backends.push(BackendNs {
                ns: b,
                name,
                v4: v4.parse().expect("v4"),
                // The lab is IPv4 only; `BackendNs` wants an IPv6 address all the same.
                v6: format!("2001:db8:b::{}", 10 + i).parse().expect("v6"),
            });
        }
        EcmpLab {
            lab,
            opts,
            roles,
            backends,
            procs: HashMap::new(),
        }
    }

    /// The balancers' numbers, `1..=N`.
    pub fn nodes(&self) -> BTreeSet<u8> {
        (1..=self.opts.balancers).collect()
    }

    /// The namespace of `role` (`sw`, `router`, `client`, `l1`.., `b1`..`b3`).
    pub fn ns(&self, role: &str) -> &str {
        self.roles
            .get(role)
            .unwrap_or_else(|| panic!("no role {role} in the lab"))
    }

    /// Runs a shell script in `role`'s namespace (30 s timeout); panics on failure.
    pub fn sh(&self, role: &str, script: &str) -> String {
        self.lab.sh(self.ns(role), script)
    }

    /// Runs a shell script in `role`'s namespace (30 s timeout).
    pub fn try_sh(&self, role: &str, script: &str) -> Result<String, String> {
        self.lab.try_sh(self.ns(role), script)
    }

    // ---- processes (as in `HaLab`) -----------------------------------------------------------

    /// Starts `argv` in `role`'s namespace as process `name` (its own process group, output to
    /// `<name>.log`; a restart gets `<name>.2.log`, and [`EcmpLab::log`] shows them all).
    pub fn start(&mut self, role: &str, name: &str, argv: &[&str]) {
        let ns = self.ns(role).to_owned();
        if let Some(cur) = self.current(name).map(str::to_owned) {
            assert!(!self.lab.alive(&cur), "process {name} is already running");
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

    /// Whether process `name` is running.
    pub fn alive(&mut self, name: &str) -> bool {
        match self.current(name).map(str::to_owned) {
            Some(c) => self.lab.alive(&c),
            None => false,
        }
    }

    /// `kill -9` of process `name`'s group; returns the instant just before the signal.
    pub fn kill9(&mut self, name: &str) -> Instant {
        let t = Instant::now();
        if let Some(c) = self.current(name).map(str::to_owned) {
            self.lab.kill(&c);
        }
        t
    }

    /// SIGTERM to process `name`'s group, without waiting; the instant just before the signal.
    pub fn terminate(&mut self, name: &str) -> Instant {
        let t = Instant::now();
        if let Some(pid) = self.current(name).and_then(|c| self.lab.pid(c)) {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        t
    }

    /// SIGTERM to process `name`'s group, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, name: &str, grace: Duration) {
        let Some(c) = self.current(name).map(str::to_owned) else {
            return;
        };
        if let Some(pid) = self.lab.pid(&c) {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
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

    // ---- BIRD -------------------------------------------------------------------------------

    /// The process name of `role`'s BIRD (`bird-router`, `bird-l1`, ...).
    pub fn bird_name(role: &str) -> String {
        format!("bird-{role}")
    }

    /// The control socket of `role`'s BIRD, in the lab directory.
    pub fn bird_socket(&self, role: &str) -> PathBuf {
        self.lab.dir.join(format!("bird-{role}.ctl"))
    }

    /// Writes `config` and starts BIRD in `role`'s namespace (foreground, logging to its
    /// process log); waits until its control socket answers.
    pub fn start_bird_with(&mut self, role: &str, config: &str) {
        let name = Self::bird_name(role);
        let conf = self.lab.write(&format!("{name}.conf"), config);
        let sock = self.bird_socket(role);
        let _ = std::fs::remove_file(&sock);
        let (conf, sock_s) = (
            conf.to_string_lossy().into_owned(),
            sock.to_string_lossy().into_owned(),
        );
        self.start(role, &name, &["bird", "-f", "-c", &conf, "-s", &sock_s]);
        let ok = self
            .lab
            .wait_for(Duration::from_secs(10), || Bird::connect(&sock).ok());
        assert!(
            ok.is_some(),
            "{name} does not answer on {sock_s}: {}",
            self.log(&name)
        );
    }

    /// Starts the router's BIRD ([`router_bird_config`]).
    pub fn start_router_bird(&mut self) {
        let c = router_bird_config(&self.opts);
        self.start_bird_with("router", &c);
    }

    /// Starts balancer `n`'s BIRD ([`balancer_bird_config`]).
    pub fn start_bird(&mut self, n: u8) {
        let c = balancer_bird_config(&self.opts, n);
        self.start_bird_with(&balancer_role(n), &c);
    }

    /// Starts the router's BIRD and every balancer's.
    pub fn start_birds(&mut self) {
        self.start_router_bird();
        for n in 1..=self.opts.balancers {
            self.start_bird(n);
        }
    }

    /// A control connection to `role`'s BIRD.
    pub fn bird(&self, role: &str) -> std::io::Result<Bird> {
        Bird::connect(&self.bird_socket(role))
    }

    /// `kill -9` of balancer `n`'s BIRD; the instant just before the signal.
    pub fn kill_bird(&mut self, n: u8) -> Instant {
        self.kill9(&Self::bird_name(&balancer_role(n)))
    }

    /// Announces the VIP from balancer `n` (`enable vip` on its BIRD).
    pub fn announce(&self, n: u8) {
        let role = balancer_role(n);
        self.bird(&role)
            .and_then(|mut b| b.enable(VIP_PROTOCOL))
            .unwrap_or_else(|e| panic!("announce from {role}: {e}"));
    }

    /// Withdraws the VIP from balancer `n` (`disable vip` on its BIRD).
    pub fn withdraw(&self, n: u8) {
        let role = balancer_role(n);
        self.bird(&role)
            .and_then(|mut b| b.disable(VIP_PROTOCOL))
            .unwrap_or_else(|e| panic!("withdraw from {role}: {e}"));
    }

    /// The balancers whose BGP session the router sees established.
    pub fn established(&self) -> BTreeSet<u8> {
        let Ok(mut b) = self.bird("router") else {
            return BTreeSet::new();
        };
        self.nodes()
            .into_iter()
            .filter(|&n| b.protocol_up(&balancer_role(n)).unwrap_or(false))
            .collect()
    }

    /// Waits up to `timeout` until the router has established sessions with every balancer
    /// in `nodes`; whether it did.
    pub fn wait_established(&self, nodes: &BTreeSet<u8>, timeout: Duration) -> bool {
        self.lab
            .wait_for(timeout, || {
                self.established().is_superset(nodes).then_some(())
            })
            .is_some()
    }

    /// A summary of every BIRD's protocols and the router's route, for assertion messages.
    pub fn bird_report(&self) -> String {
        let mut out = String::new();
        let mut roles = vec!["router".to_owned()];
        roles.extend((1..=self.opts.balancers).map(balancer_role));
        for role in roles {
            let rows = self
                .bird(&role)
                .and_then(|mut b| b.command("show protocols"))
                .map(|r| {
                    lb_examples::bgp::parse_protocols(&r)
                        .iter()
                        .map(|p| format!("  {} {} {} {}\n", p.name, p.proto, p.state, p.since_info))
                        .collect::<String>()
                })
                .unwrap_or_else(|e| format!("  ({e})\n"));
            out.push_str(&format!("{role}:\n{rows}"));
        }
        out.push_str(&format!("router route: {:?}\n", self.route_gateways()));
        out
    }

    // ---- the router's view -------------------------------------------------------------------

    /// The gateways of the router's kernel route for the VIP.
    pub fn route_gateways(&self) -> Vec<String> {
        run_timeout(
            Duration::from_secs(5),
            "ip",
            &["-n", self.ns("router"), "-j", "route", "show", VIP4],
        )
        .map(|out| gateways_of(&out))
        .unwrap_or_default()
    }

    /// The balancers the router's route for the VIP points at.
    pub fn next_hops(&self) -> BTreeSet<u8> {
        self.route_gateways()
            .iter()
            .filter_map(|g| node_of_gateway(g))
            .collect()
    }

    /// Polls the router's route (as fast as `ip` runs) until its next hops are `want`, for at
    /// most `timeout` after `since`; the time from `since` to the first poll that saw them.
    pub fn wait_next_hops(
        &self,
        want: &BTreeSet<u8>,
        since: Instant,
        timeout: Duration,
    ) -> Option<Duration> {
        loop {
            if self.next_hops() == *want {
                return Some(since.elapsed());
            }
            if since.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The balancer the router's kernel picks for each TCP flow `192.0.2.2:sport` → VIP:80
    /// arriving on `rc` (`ip route get ... iif rc ipproto tcp sport S dport 80`, one `ip
    /// -batch` for all): the multipath hash of real forwarding, without sending anything.
    pub fn route_choices(&self, sports: &[u16]) -> Vec<Option<u8>> {
        let batch: String = sports
            .iter()
            .map(|s| {
                format!(
                    "route get {VIP4} from 192.0.2.2 iif rc ipproto tcp sport {s} dport {VIP_PORT}\n"
                )
            })
            .collect();
        let file = self.lab.write("route-get.batch", &batch);
        let f = file.to_string_lossy().into_owned();
        let out = run_timeout(
            Duration::from_secs(20),
            "ip",
            &["-n", self.ns("router"), "-batch", &f],
        )
        .unwrap_or_else(|e| panic!("ip route get batch: {e}"));
        let mut choices: Vec<Option<u8>> = out
            .lines()
            .filter(|l| l.starts_with(VIP4))
            .map(|l| {
                let mut words = l.split_whitespace();
                words
                    .by_ref()
                    .find(|w| *w == "via")
                    .and(words.next())
                    .and_then(node_of_gateway)
            })
            .collect();
        choices.resize(sports.len(), None);
        choices
    }

    /// Starts `ip -ts monitor route` in the router's namespace (process `route-monitor`): every
    /// change of its routing table, timestamped, in [`EcmpLab::route_events`].
    pub fn monitor_routes(&mut self) {
        self.start(
            "router",
            "route-monitor",
            &["ip", "-ts", "monitor", "route"],
        );
        // `ip monitor` prints nothing when it starts: give it time to subscribe.
        std::thread::sleep(Duration::from_millis(200));
    }

    /// The lines [`EcmpLab::monitor_routes`] logged about the VIP's route so far: each starts
    /// with a `[timestamp]`; a removal has `Deleted` after it (multipath routes print their
    /// `nexthop` lines separately, which are left out).
    pub fn route_events(&self) -> Vec<String> {
        self.log("route-monitor")
            .lines()
            .filter(|l| {
                l.contains(&format!("] {VIP4} ")) || l.contains(&format!("Deleted {VIP4} "))
            })
            .map(str::to_owned)
            .collect()
    }

    // ---- faults ------------------------------------------------------------------------------

    /// Takes balancer `n` off both bridges (its switch ports down): to the router it is gone,
    /// whatever still runs inside it; the router's own links stay up, so only BFD or the hold
    /// timer can tell. Returns the instant just before.
    pub fn isolate(&self, n: u8) -> Instant {
        let t = Instant::now();
        self.sh(
            "sw",
            &format!("ip link set pl{n}f down; ip link set pl{n}b down"),
        );
        t
    }

    /// Undoes [`EcmpLab::isolate`].
    pub fn reconnect(&self, n: u8) {
        self.sh(
            "sw",
            &format!("ip link set pl{n}f up; ip link set pl{n}b up"),
        );
    }

    // ---- forwarding --------------------------------------------------------------------------

    /// Makes balancer `n`'s kernel forward the VIP to the three backends (a multipath route,
    /// L4 hash): a stand-in balancer that needs no program.
    pub fn forward_kernel(&self, n: u8) {
        let hops: String = self
            .backends
            .iter()
            .map(|b| format!(" nexthop via {} dev back0", b.v4))
            .collect();
        self.sh(
            &balancer_role(n),
            &format!("ip route replace {VIP4}/32{hops}"),
        );
    }

    /// [`EcmpLab::forward_kernel`] on every balancer.
    pub fn forward_kernel_all(&self) {
        for n in 1..=self.opts.balancers {
            self.forward_kernel(n);
        }
    }

    /// Writes `config` and starts `tun-balancer` on balancer `n` as process `balancer-lN`;
    /// waits for `lb0`, then routes the VIP and the node's [`snat_addr`] to it (replacing a
    /// [`EcmpLab::forward_kernel`] route).
    pub fn start_balancer(&mut self, n: u8, config: &str) {
        let role = balancer_role(n);
        let path = self.lab.write(&format!("balancer-{role}.toml"), config);
        let path = path.to_string_lossy().into_owned();
        let name = format!("balancer-{role}");
        self.start(&role, &name, &[balancer_bin(), "--config", &path]);
        let up = self.lab.wait_for(Duration::from_secs(10), || {
            self.try_sh(&role, "ip link show lb0 | grep -q UP").ok()
        });
        assert!(
            up.is_some(),
            "{name} did not bring lb0 up: {}",
            self.log(&name)
        );
        self.sh(
            &role,
            &format!(
                "ip route replace {VIP4}/32 dev lb0 && ip route replace {}/32 dev lb0",
                snat_addr(n)
            ),
        );
    }

    /// Starts `server.py` on every backend (HTTP on 80 and [`NAT_PORT`]: `GET /id` answers the
    /// backend's name) as processes `srv-bN`, and waits until they listen.
    pub fn start_servers(&mut self) {
        for b in self.backends.clone() {
            let (p1, p2) = (VIP_PORT.to_string(), NAT_PORT.to_string());
            let argv = [
                python(),
                &server_script(),
                &b.name,
                "--http-port",
                &p1,
                "--http-port",
                &p2,
                "--udp-port",
                "7000",
            ];
            self.start(&b.name, &format!("srv-{}", b.name), &argv);
        }
        for b in &self.backends {
            self.lab.wait_listen(&b.ns, "tcp", VIP_PORT);
            self.lab.wait_listen(&b.ns, "tcp", NAT_PORT);
        }
    }

    /// Starts an `lb-decap` agent (GUE on UDP 6080) on every backend, for [`tunnel_config`].
    pub fn decap_agents(&mut self) {
        for b in self.backends.clone() {
            self.lab.decap_agent(&b);
        }
    }

    /// Counts, in every balancer, the TCP SYNs to the VIP that arrive on `front0` (an nftables
    /// `netdev` ingress counter: no conntrack, nothing changed on the path).
    pub fn count_syns(&self) {
        for n in 1..=self.opts.balancers {
            let rules = format!(
                "table netdev ecmp {{\n chain in {{\n  type filter hook ingress device \"front0\" priority 0; policy accept;\n  \
                 ip daddr {VIP4} tcp dport {VIP_PORT} tcp flags & (syn | ack) == syn counter\n }}\n}}\n"
            );
            let path = self.lab.write(&format!("count-l{n}.nft"), &rules);
            self.sh(&balancer_role(n), &format!("nft -f {}", path.display()));
        }
    }

    /// The SYN counter of every balancer (see [`EcmpLab::count_syns`]), by node.
    pub fn syns(&self) -> HashMap<u8, u64> {
        (1..=self.opts.balancers)
            .map(|n| {
                let out = self
                    .try_sh(&balancer_role(n), "nft list chain netdev ecmp in")
                    .unwrap_or_default();
                let packets = out
                    .split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (n, packets)
            })
            .collect()
    }

    /// Fetches `http://VIP/id` `count` times from the client (one connection each); the
    /// answering backends' names, or curl's error.
    pub fn fetch(&self, count: usize) -> Result<Vec<String>, String> {
        self.lab.curl_many(
            self.ns("client"),
            &format!("http://{VIP4}:{VIP_PORT}/id"),
            count,
        )
    }
}

/// Milliseconds with one decimal, for reports.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
