//! The tun-balancer pair: its configuration ([`pair_config`]), starting and stopping each
//! node's balancer in a mode, and the `ha` object of its statistics (roles, takeover times).

use std::time::Duration;

use serde::Deserialize;

use super::{
    front_addr, node_role, peer_of, HaLab, AUTH_KEY, FLOATING, HASH_KEY, HA_PORT, SNAT4, SNAT6,
    UDP_PORT, VIP4, VIP6,
};
use crate::common::balancer_bin;

/// The `ha` object of a tun-balancer's statistics.
#[derive(Debug, Clone, Deserialize)]
pub struct HaStatus {
    /// `master`, `backup` or `fault`.
    pub role: String,
    /// This node's id.
    #[serde(default)]
    pub node_id: u64,
    /// This node's priority.
    #[serde(default)]
    pub priority: u64,
    /// Milliseconds since the peer's last advert (absent when never seen).
    #[serde(default)]
    pub peer_seen_ms_ago: Option<u64>,
    /// Whether this node's bulk sync completed (or it has been master since).
    #[serde(default)]
    pub synced: bool,
    /// Conntrack sync counters, as the program reports them.
    #[serde(default)]
    pub sync: serde_json::Value,
    /// When this node last became master.
    #[serde(default)]
    pub takeover_unix_ms: Option<u64>,
    /// When this node, as master, first forwarded a packet.
    #[serde(default)]
    pub first_forward_unix_ms: Option<u64>,
}

impl HaLab {
    /// Gets the backends ready for `mode`: nothing for `nat`; the VIPs on `lo` and an `lb-decap`
    /// agent (GUE, UDP 6080) for `tunnel`; for `dr` the VIPs on `lo`, no ARP for them, and each
    /// node's `back0` turned into a bridge (the veth renamed `bk0` becomes its port) that the
    /// balancer's TAP device joins once it exists.
    pub fn prepare_mode(&mut self, mode: &str) {
        if mode == "nat" || mode == "splice" {
            return;
        }
        for b in self.backends.clone() {
            self.lab.vip_on_backend(&b, &[VIP4, VIP6]);
            if mode == "tunnel" {
                self.lab.decap_agent(&b);
            } else {
                self.lab.sh(
                    &b.ns,
                    "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
                );
            }
        }
        if mode == "dr" {
            for n in 1..=2u8 {
                let role = node_role(n);
                self.sh(
                    role,
                    &format!(
                        "set -e; ip link set back0 down; ip link set back0 name bk0; \
                         ip addr flush dev bk0; \
                         ip link add back0 address 02:00:00:00:b0:0{n} type bridge; \
                         ip link set bk0 master back0; ip link set bk0 up; ip link set back0 up; \
                         ip addr add 198.51.100.{}/24 dev back0; \
                         ip addr add 2001:db8:b::{}/64 dev back0 nodad; \
                         sysctl -qw net.ipv4.conf.back0.rp_filter=0",
                        1 + n,
                        1 + n
                    ),
                );
            }
        }
    }

    /// Writes `config` and starts `tun-balancer` on `node` as process `balancer-lN`; waits for
    /// `lb0`, then routes the VIPs (and for `nat` the SNAT addresses) to it, or for `dr` bridges
    /// it into `back0` behind a static neighbour the VIP routes point at.
    pub fn start_balancer(&mut self, node: u8, mode: &str, config: &str) {
        let role = node_role(node);
        let path = self.lab.write(&format!("balancer-{role}.toml"), config);
        let path = path.to_string_lossy().into_owned();
        let name = format!("balancer-{role}");
        self.start(role, &name, &[balancer_bin(), "--config", &path]);
        let up = self.lab.wait_for(Duration::from_secs(10), || {
            self.try_sh(role, "ip link show lb0 | grep -q UP").ok()
        });
        assert!(
            up.is_some(),
            "{name} did not bring lb0 up: {}",
            self.log(&name)
        );
        let routes: Vec<String> = match mode {
            "dr" => {
                let mac = dr_mac(node);
                self.sh(
                    role,
                    &format!(
                        "set -e; ip link set lb0 master back0; \
                         bridge fdb add {mac} dev lb0 master static; \
                         ip neigh add 198.51.100.254 lladdr {mac} dev back0 nud permanent; \
                         ip -6 neigh add 2001:db8:b::254 lladdr {mac} dev back0 nud permanent"
                    ),
                );
                vec![
                    format!("{VIP4}/32 via 198.51.100.254 dev back0"),
                    format!("{VIP6}/128 via 2001:db8:b::254 dev back0"),
                ]
            }
            "tunnel" => vec![format!("{VIP4}/32 dev lb0"), format!("{VIP6}/128 dev lb0")],
            _ => vec![
                format!("{VIP4}/32 dev lb0"),
                format!("{SNAT4}/32 dev lb0"),
                format!("{VIP6}/128 dev lb0"),
                format!("{SNAT6}/128 dev lb0"),
            ],
        };
        for r in routes {
            let fam = if r.contains(':') { "-6 " } else { "" };
            self.sh(role, &format!("ip {fam}route add {r}"));
        }
    }

    /// Stops node `node`'s balancer (SIGTERM, then SIGKILL after 5 s) and waits until `lb0` is
    /// gone.
    pub fn stop_balancer(&mut self, node: u8) {
        let role = node_role(node);
        self.stop(&format!("balancer-{role}"), Duration::from_secs(5));
        self.wait_lb0_gone(node);
    }

    /// `kill -9` of node `node`'s balancer; the instant (Unix ms). Waits until `lb0` is gone.
    pub fn kill_balancer(&mut self, node: u8) -> u64 {
        let t = self.kill9(&format!("balancer-{}", node_role(node)));
        self.wait_lb0_gone(node);
        t
    }

    fn wait_lb0_gone(&self, node: u8) {
        let role = node_role(node);
        let gone = self.lab.wait_for(Duration::from_secs(10), || {
            self.try_sh(role, "ip link show lb0").is_err().then_some(())
        });
        assert!(gone.is_some(), "lb0 of {role} outlived its balancer");
    }

    /// Node `node`'s balancer statistics, or `None` while it does not answer.
    pub fn stats(&self, node: u8) -> Option<serde_json::Value> {
        let out = self
            .try_sh(
                node_role(node),
                "curl -sS --max-time 2 http://127.0.0.1:9100/",
            )
            .ok()?;
        serde_json::from_str(&out).ok()
    }

    /// The `ha` object of node `node`'s statistics.
    pub fn ha(&self, node: u8) -> Option<HaStatus> {
        let s = self.stats(node)?;
        serde_json::from_value(s.get("ha")?.clone()).ok()
    }

    /// Each node's HA role as its statistics say (`None`: not answering).
    pub fn roles(&self) -> [Option<String>; 2] {
        [self.ha(1).map(|h| h.role), self.ha(2).map(|h| h.role)]
    }

    /// The nodes whose statistics say `master`.
    pub fn masters(&self) -> Vec<u8> {
        let r = self.roles();
        [1u8, 2]
            .into_iter()
            .filter(|&n| r[usize::from(n - 1)].as_deref() == Some("master"))
            .collect()
    }

    /// The role name (`l1`, `l2`) of the one node that says `master`; `None` when no node or
    /// both do.
    pub fn master(&self) -> Option<&str> {
        match self.masters()[..] {
            [n] => Some(node_role(n)),
            _ => None,
        }
    }

    /// The role name of the one node that says `backup`.
    pub fn backup(&self) -> Option<&str> {
        let r = self.roles();
        let b: Vec<u8> = [1u8, 2]
            .into_iter()
            .filter(|&n| r[usize::from(n - 1)].as_deref() == Some("backup"))
            .collect();
        match b[..] {
            [n] => Some(node_role(n)),
            _ => None,
        }
    }

    /// Waits up to `timeout` for exactly one master; its node number.
    pub fn wait_master(&self, timeout: Duration) -> Option<u8> {
        self.lab.wait_for(timeout, || match self.masters()[..] {
            [n] => Some(n),
            _ => None,
        })
    }

    /// Waits up to `timeout` until node `node` reports `role` and `synced` (a backup whose bulk
    /// sync has completed).
    pub fn wait_synced(&self, node: u8, role: &str, timeout: Duration) -> bool {
        self.lab
            .wait_for(timeout, || {
                self.ha(node)
                    .filter(|h| h.role == role && h.synced)
                    .map(|_| ())
            })
            .is_some()
    }

    /// Waits up to `timeout` until node `node` reports `role`.
    pub fn wait_role(&self, node: u8, role: &str, timeout: Duration) -> bool {
        self.lab
            .wait_for(timeout, || {
                (self.ha(node).map(|h| h.role).as_deref() == Some(role)).then_some(())
            })
            .is_some()
    }
}

/// The source MAC of node `node`'s mode-`dr` frames.
pub fn dr_mac(node: u8) -> String {
    format!("02:00:5e:10:00:0{node}")
}

/// Options of [`pair_config`].
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// Address families of the services: `"4"`, `"6"`.
    pub families: Vec<&'static str>,
    /// Health-check interval.
    pub health_interval_ms: u64,
    /// `[ha] advert_interval_ms`.
    pub advert_interval_ms: u64,
    /// `[ha] preempt`.
    pub preempt: bool,
    /// The scheduler of every service (`maglev`: both nodes agree on a new flow's backend
    /// without any sync; `random` makes them disagree two times in three; `rr` starts at the
    /// first backend on every node, so flows that reach both in the same order agree).
    pub scheduler: &'static str,
    /// Adds a UDP SIP service (IPv4) on VIP:[`SIP_PORT`] → each backend's `:5060`
    /// (`affinity = "sip-call-id"`, SIP OPTIONS health check), in the pair's mode.
    pub sip: bool,
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts {
            families: vec!["4", "6"],
            health_interval_ms: 200,
            advert_interval_ms: 100,
            preempt: false,
            scheduler: "maglev",
            sip: false,
        }
    }
}

/// The `[ha]` section of node `node` (1: priority 200, binds 192.0.2.11:7400; 2: priority 100,
/// binds 192.0.2.12:7400; each the other's peer), holding the four [`FLOATING`] addresses.
pub fn ha_section(node: u8, opts: &PairOpts) -> String {
    let prio = if node == 1 { 200 } else { 100 };
    let mut s = format!(
        "[ha]\nnode_id = {node}\npriority = {prio}\nbind = \"{}:{HA_PORT}\"\npeers = [\"{}:{HA_PORT}\"]\n\
         auth_key = \"{AUTH_KEY}\"\nadvert_interval_ms = {}\npreempt = {}\n",
        front_addr(node),
        front_addr(peer_of(node)),
        opts.advert_interval_ms,
        opts.preempt
    );
    for (dev, addr) in FLOATING {
        s.push_str(&format!(
            "[[ha.address]]\ndev = \"{dev}\"\naddr = \"{addr}\"\n"
        ));
    }
    s
}

/// The SIP port: the VIP's and each backend's sipp UAS.
pub const SIP_PORT: u16 = 5060;

/// The [`PairOpts::sip`] service: UDP VIP:5060, Call-ID affinity, checked with SIP OPTIONS
/// as the SIP tests check their UASes.
fn sip_service(mode: &str, opts: &PairOpts) -> String {
    let mut c = format!(
        "\n[[service]]\nvip = \"{VIP4}:{SIP_PORT}\"\nproto = \"udp\"\nmode = \"{mode}\"\n\
         scheduler = \"{}\"\naffinity = \"sip-call-id\"\n\
         [service.health]\nkind = \"sip-options\"\ninterval_ms = {}\ntimeout_ms = 150\n\
         rise = 2\nfall = 2\n",
        opts.scheduler, opts.health_interval_ms
    );
    for i in 1..=3 {
        c.push_str(&format!(
            "[[service.backend]]\naddr = \"198.51.100.{}:{SIP_PORT}\"\n",
            10 + i
        ));
    }
    c
}

/// The tun-balancer configuration of node `node` in `mode` (`nat`: SNAT [`SNAT4`] / [`SNAT6`],
/// backends `:8080`; `splice`: the same, with the TCP service spliced; `tunnel`: GUE to the VIP's port; `dr`: TAP `lb0` with [`dr_mac`]): TCP
/// VIP:80 and UDP VIP:7000 ([`PairOpts::scheduler`], HTTP and UDP health checks) per family,
/// the [`PairOpts::sip`] service if asked, device `lb0`, stats on 127.0.0.1:9100, the shared
/// [`HASH_KEY`], then [`ha_section`].
pub fn pair_config(node: u8, mode: &str, opts: &PairOpts) -> String {
    let mut c = String::from("[balancer]\ndevice = \"lb0\"\n");
    match mode {
        "nat" | "splice" => c.push_str(&format!("snat_addrs = [\"{SNAT4}\", \"{SNAT6}\"]\n")),
        "tunnel" => c.push_str(&format!(
            "snat_addrs = [\"{SNAT4}\", \"{SNAT6}\"]\nmtu = 1500\n"
        )),
        "dr" => c.push_str(&format!("mac = \"{}\"\n", dr_mac(node))),
        _ => panic!("mode {mode}: nat, splice, tunnel or dr"),
    }
    c.push_str(&format!(
        "conntrack_capacity = 65536\nstats = \"127.0.0.1:9100\"\nhash_key = \"{HASH_KEY}\"\n"
    ));
    for fam in &opts.families {
        let v4 = *fam == "4";
        let vip = if v4 {
            VIP4.to_owned()
        } else {
            format!("[{VIP6}]")
        };
        for (proto, port, bport) in [("tcp", 80, 8080), ("udp", UDP_PORT, UDP_PORT)] {
            let bport = if mode == "nat" || mode == "splice" {
                bport
            } else {
                0
            };
            // "splice": the TCP service is spliced, the UDP one NATed.
            let mode = match (mode, proto) {
                ("splice", "udp") => "nat",
                (m, _) => m,
            };
            c.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}:{port}\"\nproto = \"{proto}\"\nmode = \"{mode}\"\n\
                 scheduler = \"{}\"\n",
                opts.scheduler
            ));
            if mode == "tunnel" {
                c.push_str("tunnel = \"gue\"\ngue_port = 6080\n");
            }
            let check = if proto == "tcp" {
                "kind = \"http\"\npath = \"/id\"\nport = 8080\n".to_owned()
            } else {
                format!("kind = \"udp\"\nsend = \"ping\"\nexpect = \"b\"\nport = {UDP_PORT}\n")
            };
            c.push_str(&format!(
                "[service.health]\n{check}interval_ms = {}\nrise = 2\nfall = 2\n",
                opts.health_interval_ms
            ));
            for i in 1..=3 {
                let addr = if v4 {
                    format!("198.51.100.{}:{bport}", 10 + i)
                } else {
                    format!("[2001:db8:b::{}]:{bport}", 10 + i)
                };
                c.push_str(&format!("[[service.backend]]\naddr = \"{addr}\"\n"));
                if mode == "dr" {
                    c.push_str(&format!("mac = \"02:00:00:00:00:1{i}\"\n"));
                }
            }
        }
    }
    if opts.sip {
        c.push_str(&sip_service(mode, opts));
    }
    c.push('\n');
    c.push_str(&ha_section(node, opts));
    c
}
