//! The `tun-balancer` configuration file: TOML, validated into typed values.
//!
//! Every error names the file, the line and column, and the field, for example
//! `lb.toml:12:7: service[0].vip: invalid socket address syntax`.
//!
//! ```toml
//! [balancer]
//! device = "lb0"             # TUN (TAP when the services use mode "dr"), created if missing
//! snat_addrs = ["203.0.113.100", "2001:db8:100::100"]  # nat: SNAT sources; tunnel: outer sources
//! conntrack_capacity = 1000000
//! stats = "127.0.0.1:9100"   # optional: JSON on /, Prometheus text on /metrics
//! queues = 1                 # optional: TUN queues = data-path threads (multi-queue when > 1)
//! offload = true             # optional: virtio-net header with checksum and segmentation
//!                            # offloads (TSO, USO): 64 KiB super-packets in and out (default on)
//! io_uring = false           # optional: write each batch's packets with one io_uring submission
//!                            # instead of a writev each (default off; see README, Throughput)
//! io = "direct"              # optional: "tun-rs" reads and writes the TUN device through the
//!                            # tun-rs crate (it cuts super-packets on the way in and coalesces
//!                            # TCP/UDP on the way out); a measured alternative, TUN only, one
//!                            # queue, no io_uring (default "direct": this crate's own device code)
//! udp_coalesce = true        # optional: merge a batch's datagrams of one flow into one UDP GSO
//!                            # write (needs offload and the kernel's USO; default on)
//! fast_path = 1024           # optional: plans per queue thread for forwarding the packets of
//!                            # established flows (every mode) without the data path's lock
//!                            # (lb_dataplane::Classifier::forward_cached); 0 turns it off
//!                            # (default 1024, ~200 bytes each; at most 65536)
//! mtu = 1500                 # optional: path MTU to the backends (tunnel mode: "too big" above)
//! mac = "02:00:5e:10:00:01"  # optional: source MAC of mode "dr" frames
//! hash_key = "..."           # optional: secret passphrase (16+ characters) keying the flow
//!                            # hashes; give every balancer of a cluster the same one so they
//!                            # agree on backends (default: a random key per process)
//! snat_ports = "1024-65535"  # SNAT source ports per backend and SNAT address (lo-hi, lo >= 1)
//! persist_capacity = 65536   # persistence templates + SIP Call-ID bindings (the SIP call
//!                            # table), per address family, ~100 bytes each; a full table sheds
//!                            # entries seen once (a spray of made-up Call-IDs), never a live
//!                            # call with two or more messages
//! icmp_rate = 1000           # generated ICMP errors ("too big") per second per data path, and
//! icmp_burst = 50            # their burst (defaults: Linux's icmp_msgs_per_sec / _burst; 0 0: none)
//! icmp_peer_rate = 100       # the same per destination address (at most the global ones)
//! icmp_peer_burst = 20
//! frag_capacity = 4096       # IP datagrams whose fragments may be in flight at once (a later
//!                            # fragment follows its first's decision; 0: drop every fragment;
//!                            # at most 1048576, 112 bytes each)
//! frag_timeout_ms = 5000     # a datagram's later fragments are forwarded this long after its first
//! splice_capacity = 4096     # spliced connections per data path (mode "splice"): each takes
//!                            # up to 8 SNAT ports from the top of the data path's snat_ports
//!                            # (restart to change it). Given explicitly, the slots are set up
//!                            # even with no spliced service, so a reload can add the first one
//!                            # (else that needs a restart)
//! [balancer.timeouts]        # idle timeouts in seconds, per flow state (ipvsadm --set style);
//!                            # a key left out keeps lb-conntrack's default for its states
//! tcp_established = 900
//! tcp_syn = 60               # SYN_RECV and SYN_SENT (defaults: 60, 120)
//! tcp_fin = 120              # FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT (defaults: 120, 60, 30, 120)
//! tcp_close = 10
//! udp = 30                   # a UDP flow before its first reply
//! udp_stream = 300           # a UDP flow that has seen a reply
//!
//! [[service]]
//! vip = "203.0.113.10:80"
//! proto = "tcp"              # tcp | udp
//! mode = "nat"               # nat | dnat | tunnel | dr ("dr" cannot share a device with others)
//!                            # | splice (tcp: layer-5 delayed binding + TCP splicing, NAT
//!                            # addressing towards the backends; see [service.splice])
//! scheduler = "maglev"       # maglev ring rendezvous jump modulo, or a policy: rr wrr swrr
//!                            # random sh dh lc wlc sed nq lblc lblcr fo ovf p2c peak-ewma least-request
//! affinity = "none"          # none | source | sip-call-id (udp, or tcp with mode "splice")
//!                            # | per-packet (udp: no affinity at all)
//!                            # | http-host (mode "splice": by the first request's Host)
//! persistence_timeout_s = 0  # > 0: a client's new flows follow its previous backend
//! tunnel = "ipip"            # mode "tunnel": ipip (IPIP / IP6IP6) | gue
//! gue_port = 6080            # with tunnel = "gue"
//! persistence_netmask = 32   # IPv4 prefix grouping clients for persistence (0..=32)
//! persistence_netmask_v6 = 128  # (0..=128)
//! upper_conns = 0            # admission (IPVS -x): at this many conns a backend takes no new
//!                            # flow; 0 = none
//! lower_conns = 0            # (IPVS -y): eligible again below this; 0 = 3/4 of upper; must be
//!                            # < upper
//! slow_start_s = 0           # policies only: weight ramps up over this long after add / recovery
//! panic_threshold = 0        # percent (0..=100): below this share healthy, ignore health
//! mid_flow = "hash"          # tunnel / dr: a packet of a flow this balancer does not track
//!                            # (ECMP moved it here) goes by the consistent hash; "drop": dropped
//!                            # (nat / dnat always drop it: only sync knows its SNAT tuple)
//! maglev_size = 65537        # a prime in 3..=2^24, at least the backends (default: the smallest
//!                            # prime >= max(65537, 100 x backends)); scheduler maglev, or a
//!                            # policy whose mid-flow packets go by the hash (tunnel / dr)
//! [service.splice]           # mode "splice" only; every key optional
//! head_max = 1400            # bytes of the first request head held (<= 1400; larger: RST)
//! head_timeout_ms = 5000     # the head must complete this soon after the handshake
//! connect_timeout_ms = 1000  # a backend's SYN-ACK / ACK of the head; then the next backend
//! idle_timeout_s = 300       # a spliced connection's idle timeout
//! mss = 1400                 # MSS offered to clients in the SYN-cookie SYN-ACK
//! [[service.splice.rule]]    # first match wins; no match: any backend of the service
//! host = "api.example"       # optional: exact host (case-insensitive, port stripped)
//! path_prefix = "/"          # optional (default "/")
//! backends = ["10.0.0.1:80"] # addresses of [[service.backend]] entries
//! [service.outlier]          # passive ejection; the table's presence turns it on
//! consecutive_failures = 5   # 0 = off
//! failure_rate = 50          # percent 1..=100 failed in a window ejects; 0 = off
//! min_requests = 20          # observations a window needs before its rate is judged
//! window_s = 10
//! ejection_s = 30            # base ejection time (grows with repeated ejections)
//! max_ejection_s = 300       # >= ejection_s
//! max_ejection_percent = 10  # most of the service's backends ejected at once
//! syn_timeout_ms = 1000      # an unanswered SYN counts as a failure after this
//! [service.health]
//! kind = "tcp"               # tcp | http | udp | sip-options | none
//! interval_ms = 500
//! timeout_ms = 400           # default: 4/5 of the interval, at most 800
//! rise = 2
//! fall = 2
//! port = 8080                # optional: probe this port instead of the backend's
//! path = "/healthz"          # http
//! expect_status = 200        # http
//! send = "ping"              # udp payload
//! expect = "pong"            # udp: prefix the answer must start with
//! [[service.backend]]
//! addr = "198.51.100.11:80"  # modes tunnel / dr: port 0 or the VIP's port
//! weight = 1                 # 0 drains: no new flows, existing ones continue
//! mac = "02:00:00:00:00:11"  # mode "dr": the backend's MAC on the balancer's segment
//! upper_conns = 5            # optional: overrides the service's thresholds for this backend
//! lower_conns = 3
//!
//! [ha]                       # optional: one of an active/backup pair (see `crate::ha`)
//! mode = "active-backup"     # or "active-active": every node forwards (behind ECMP)
//! node_id = 1                # 1..=255, unique in the group
//! priority = 200             # active-backup: 1..=254; higher wins, on a tie the higher node_id
//! bind = "192.0.2.11:7400"   # UDP: heartbeats and sync arrive here
//! peers = ["192.0.2.12:7400"]
//! auth_key = "..."           # shared secret (16+ characters): authenticates heartbeat and
//!                            # sync, and keys the flow hashes when hash_key is not set
//! advert_interval_ms = 100   # 10..=10000
//! preempt = false            # true: a returning higher-priority node takes over again, once
//!                            # its bulk sync has completed
//! detector = "timeout"       # timeout (VRRP's 3 adverts + skew) | phi (φ accrual, as well)
//! watchdog_ms = 1000         # a master whose data path stalls this long yields (>= 300)
//! refresh_s = 5              # active flows are resent to the backup this often (1..=3600)
//! sync_mtu = 1472            # sync datagram size
//! bgp_socket = "/run/bird/bird.ctl"  # optional: BIRD's control socket; the protocol below is
//! bgp_protocol = "vip"       # enabled (VIP announced) while this node serves, disabled otherwise
//! drain_s = 0                # on SIGTERM: withdraw, forward until 2 s pass without a packet or
//!                            # drain_s have passed, then exit
//! [[ha.address]]             # floating addresses: held by the master only
//! dev = "front0"
//! addr = "192.0.2.10/24"
//! node = 1                   # active-active only: the owner (its SNAT next hop, say)
//! ```
//!
//! [`Config::parse`] refuses everything the balancer would refuse at start: it ends with
//! [`DataplaneSpec::validate`] (capacities, SNAT pools, Maglev sizes, ring weights, thresholds,
//! outlier settings), so a file that passes `tun-balancer --check` starts.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use lb_core::{Duration, HashKey, Weight};

use lb_conntrack::{FlowState, TcpState, MAX_CAPACITY};
use lb_dataplane::{
    parse_mac, Affinity, BackendSpec, DataplaneSpec, MidFlow, Mode, OutlierSpec, Proto,
    SchedulerKind, ServiceSpec, SpecError, SpliceRule, SpliceSpec, TunnelKind, MAX_FRAG_CAPACITY,
    MAX_SPLICE_HEAD,
};
use lb_dataplane::{IcmpLimit, MAX_ICMP_RATE};

/// A configuration error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File name as given (or `<config>`).
    pub file: String,
    /// 1-based line (0 when the error has no position, such as an unreadable file).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path of the field, e.g. `service[0].backend[2].addr` (may be empty).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Kind of active health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthKind {
    /// No checks: every backend is always up.
    None,
    /// TCP connect.
    Tcp,
    /// HTTP GET of `path`, 2xx or 3xx is up.
    Http,
    /// UDP: send `send`, any answer (or one containing `expect`) within the timeout is up.
    Udp,
    /// SIP OPTIONS over UDP: any `SIP/2.0` response is up.
    SipOptions,
}

impl HealthSpec {
    /// The lb-health check configuration, or `None` for kind `none`.
    pub fn check_config(&self) -> Option<lb_health::CheckConfig> {
        use lb_health::ProbeKind;
        let kind = match self.kind {
            HealthKind::None => return None,
            HealthKind::Tcp => ProbeKind::Tcp,
            HealthKind::Http => ProbeKind::Http {
                path: self.path.clone(),
                expect_status: self.expect_status,
            },
            HealthKind::Udp => ProbeKind::Udp {
                payload: self.send.clone().into_bytes(),
                expect: (!self.expect.is_empty()).then(|| self.expect.clone().into_bytes()),
            },
            HealthKind::SipOptions => ProbeKind::SipOptions,
        };
        Some(lb_health::CheckConfig {
            kind,
            interval: self.interval,
            timeout: self.timeout,
            rise: self.rise,
            fall: self.fall,
            // While a backend's state is changing, check twice as often.
            fast_interval: (self.interval / 2).max(Duration::from_millis(10)),
            jitter: self.interval / 10,
            slow_start: Duration::ZERO,
        })
    }
}

/// Health checking of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// Kind of check.
    pub kind: HealthKind,
    /// Time between two checks of one backend.
    pub interval: Duration,
    /// How long a check may take.
    pub timeout: Duration,
    /// Consecutive successes to mark a backend up.
    pub rise: u32,
    /// Consecutive failures to mark a backend down.
    pub fall: u32,
    /// Port to check (default: the backend's port, or the VIP's when that is 0).
    pub port: Option<u16>,
    /// HTTP path.
    pub path: String,
    /// UDP payload.
    pub send: String,
    /// Prefix the UDP answer must start with; empty: anything.
    pub expect: String,
    /// HTTP status that means up.
    pub expect_status: u16,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            kind: HealthKind::None,
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            port: None,
            path: "/".to_owned(),
            send: "ping\n".to_owned(),
            expect: String::new(),
            expect_status: 200,
        }
    }
}

/// Shortest `balancer.hash_key` accepted: the passphrase is the key's only entropy.
pub const MIN_PASSPHRASE: usize = 16;

/// Who reads and writes the TUN device (`balancer.io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Io {
    /// This crate's own device code (`examples/src/sys.rs`): super-packets kept whole.
    #[default]
    Direct,
    /// The `tun-rs` crate's `recv_multiple` / `send_multiple`: super-packets cut into
    /// segments on the way in and coalesced again on the way out (wireguard-go's design),
    /// kept to measure that design against [`Io::Direct`] in the same runs.
    TunRs,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// TUN/TAP device name.
    pub device: String,
    /// Statistics listener.
    pub stats: Option<SocketAddr>,
    /// Number of TUN queues, one data-path thread each.
    pub queues: usize,
    /// Open the device with the virtio-net header and checksum / segmentation offloads
    /// (`balancer.offload`, default on).
    pub offload: bool,
    /// Write each batch through io_uring (`balancer.io_uring`, default off).
    pub io_uring: bool,
    /// Who reads and writes the device (`balancer.io`, default [`Io::Direct`]).
    pub io: Io,
    /// Merge each batch's runs of one flow's UDP datagrams into UDP GSO super-packets
    /// (`balancer.udp_coalesce`, default on; it takes effect with `offload` on a TUN or TAP
    /// device whose kernel took the USO offloads).
    pub udp_coalesce: bool,
    /// Plans per queue thread of the lock-free fast path for established flows
    /// (`balancer.fast_path`, default 1024; 0: off).
    pub fast_path: usize,
    /// The data path: services and backends.
    pub dataplane: DataplaneSpec,
    /// Health checks, one per service, in the order of `dataplane.services`.
    pub health: Vec<HealthSpec>,
    /// The flow-hash key from `balancer.hash_key` (`None`: draw a random one at start).
    pub hash_key: Option<HashKey>,
    /// The `[ha]` section: this balancer is one of an active/backup pair.
    pub ha: Option<HaConfig>,
}

/// How the balancers of an `[ha]` group share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaMode {
    /// One master holds the floating addresses and forwards; the backup takes over.
    ActiveBackup,
    /// Every node forwards (behind ECMP); each streams its flows to every peer, holds its own
    /// floating addresses and takes over those of dead peers.
    ActiveActive,
}

/// A BGP speaker (BIRD) that announces the VIPs while this node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConfig {
    /// BIRD's control socket.
    pub socket: std::path::PathBuf,
    /// The BIRD protocol to enable (announce) and disable (withdraw).
    pub protocol: String,
}

/// The `[ha]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct HaConfig {
    /// Active/backup (the default) or active/active.
    pub mode: HaMode,
    /// BGP announcement of the VIPs, if any.
    pub bgp: Option<BgpConfig>,
    /// On SIGTERM, keep forwarding this long after withdrawing (active-active: the router
    /// moves new flows away first).
    pub drain: Duration,
    /// This node's id, 1..=255.
    pub node_id: u8,
    /// Election priority, 1..=254.
    pub priority: u8,
    /// Where heartbeats and sync messages arrive.
    pub bind: SocketAddr,
    /// The other balancers.
    pub peers: Vec<SocketAddr>,
    /// The cluster secret (heartbeat and sync MACs are keyed by keys derived from it).
    pub auth_key: HashKey,
    /// Time between adverts.
    pub advert_interval: Duration,
    /// Whether a higher-priority node takes over from a lower-priority master.
    pub preempt: bool,
    /// Whether the φ accrual detector also judges the master (besides the advert timer).
    pub phi: bool,
    /// A master whose data path has not run for this long yields.
    pub watchdog: Duration,
    /// How often flows that saw traffic are resent to the backup.
    pub refresh: Duration,
    /// Sync datagram size.
    pub sync_mtu: usize,
    /// Floating addresses, held by the master only.
    pub addresses: Vec<FloatingAddr>,
}

/// A floating address: `addr/prefix` on `dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatingAddr {
    /// Active-active: the node that owns it (held by that node while it serves, else by the
    /// lowest-numbered serving node). Active-backup: `None`, held by the master.
    pub node: Option<u8>,
    /// The interface.
    pub dev: String,
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

impl Config {
    /// Whether the device must be a TAP (some service uses mode `dr`).
    pub fn needs_tap(&self) -> bool {
        self.dataplane.services.iter().any(|s| s.mode == Mode::Dr)
    }

    /// Reads and validates a file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the line and field.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the line and field.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                field: field_at(text, e.span()),
                message: e.message().trim().to_owned(),
            }
        })?;
        Validator { text, file }.config(&raw)
    }
}

// ---- raw serde form -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    balancer: Spanned<RawBalancer>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    ha: Option<Spanned<RawHa>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHa {
    mode: Option<Spanned<String>>,
    node_id: Spanned<u64>,
    priority: Option<Spanned<u64>>,
    bind: Spanned<String>,
    peers: Vec<Spanned<String>>,
    auth_key: Spanned<String>,
    advert_interval_ms: Option<Spanned<u64>>,
    preempt: Option<bool>,
    detector: Option<Spanned<String>>,
    watchdog_ms: Option<Spanned<u64>>,
    refresh_s: Option<Spanned<u64>>,
    sync_mtu: Option<Spanned<u64>>,
    bgp_socket: Option<Spanned<String>>,
    bgp_protocol: Option<Spanned<String>>,
    drain_s: Option<Spanned<u64>>,
    #[serde(default)]
    address: Vec<Spanned<RawFloating>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFloating {
    dev: Spanned<String>,
    addr: Spanned<String>,
    node: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    device: Spanned<String>,
    #[serde(default)]
    snat_addrs: Vec<Spanned<String>>,
    conntrack_capacity: Option<Spanned<u64>>,
    stats: Option<Spanned<String>>,
    queues: Option<Spanned<u64>>,
    offload: Option<Spanned<bool>>,
    io_uring: Option<Spanned<bool>>,
    io: Option<Spanned<String>>,
    udp_coalesce: Option<Spanned<bool>>,
    fast_path: Option<Spanned<u64>>,
    mtu: Option<Spanned<u64>>,
    mac: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    snat_ports: Option<Spanned<String>>,
    persist_capacity: Option<Spanned<u64>>,
    icmp_rate: Option<Spanned<u64>>,
    icmp_burst: Option<Spanned<u64>>,
    icmp_peer_rate: Option<Spanned<u64>>,
    icmp_peer_burst: Option<Spanned<u64>>,
    splice_capacity: Option<Spanned<u64>>,
    frag_capacity: Option<Spanned<u64>>,
    frag_timeout_ms: Option<Spanned<u64>>,
    timeouts: Option<Spanned<RawTimeouts>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tcp_established: Option<Spanned<u64>>,
    tcp_syn: Option<Spanned<u64>>,
    tcp_fin: Option<Spanned<u64>>,
    tcp_close: Option<Spanned<u64>>,
    udp: Option<Spanned<u64>>,
    udp_stream: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    vip: Spanned<String>,
    proto: Spanned<String>,
    mode: Spanned<String>,
    scheduler: Option<Spanned<String>>,
    affinity: Option<Spanned<String>>,
    persistence_timeout_s: Option<Spanned<u64>>,
    tunnel: Option<Spanned<String>>,
    gue_port: Option<Spanned<u64>>,
    persistence_netmask: Option<Spanned<u64>>,
    persistence_netmask_v6: Option<Spanned<u64>>,
    upper_conns: Option<Spanned<u64>>,
    lower_conns: Option<Spanned<u64>>,
    slow_start_s: Option<Spanned<u64>>,
    panic_threshold: Option<Spanned<u64>>,
    maglev_size: Option<Spanned<u64>>,
    mid_flow: Option<Spanned<String>>,
    outlier: Option<Spanned<RawOutlier>>,
    splice: Option<Spanned<RawSplice>>,
    health: Option<RawHealth>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplice {
    head_max: Option<Spanned<u64>>,
    head_timeout_ms: Option<Spanned<u64>>,
    connect_timeout_ms: Option<Spanned<u64>>,
    idle_timeout_s: Option<Spanned<u64>>,
    mss: Option<Spanned<u64>>,
    #[serde(default)]
    rule: Vec<Spanned<RawSpliceRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpliceRule {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    backends: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Spanned<String>,
    interval_ms: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    rise: Option<Spanned<u64>>,
    fall: Option<Spanned<u64>>,
    port: Option<Spanned<u64>>,
    path: Option<Spanned<String>>,
    send: Option<String>,
    expect: Option<String>,
    expect_status: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<Spanned<u64>>,
    failure_rate: Option<Spanned<u64>>,
    min_requests: Option<Spanned<u64>>,
    window_s: Option<Spanned<u64>>,
    ejection_s: Option<Spanned<u64>>,
    max_ejection_s: Option<Spanned<u64>>,
    max_ejection_percent: Option<Spanned<u64>>,
    syn_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    addr: Spanned<String>,
    weight: Option<Spanned<u64>>,
    mac: Option<Spanned<String>>,
    upper_conns: Option<Spanned<u64>>,
    lower_conns: Option<Spanned<u64>>,
}

// ---- validation -----------------------------------------------------------------------------

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn err(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.into(),
            message: msg.into(),
        }
    }

    fn parse<T: core::str::FromStr>(
        &self,
        v: &Spanned<String>,
        field: &str,
    ) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        v.get_ref()
            .parse::<T>()
            .map_err(|e| self.err(v.span(), field, format!("`{}`: {e}", v.get_ref())))
    }

    fn int(&self, v: &Spanned<u64>, field: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let x = *v.get_ref();
        if x < min || x > max {
            return Err(self.err(
                v.span(),
                field,
                format!("{x} is out of range {min}..={max}"),
            ));
        }
        Ok(x)
    }

    /// An optional integer in `min..=max`, or `default`.
    fn opt_int(
        &self,
        v: &Option<Spanned<u64>>,
        field: &str,
        (min, max): (u64, u64),
        default: u64,
    ) -> Result<u64, ConfigError> {
        match v {
            Some(x) => self.int(x, field, min, max),
            None => Ok(default),
        }
    }

    fn config(&self, raw: &RawConfig) -> Result<Config, ConfigError> {
        let b = raw.balancer.get_ref();
        let device = b.device.get_ref().clone();
        if device.is_empty() || device.len() > 15 || device.contains(['/', ' ', '\0']) {
            return Err(self.err(
                b.device.span(),
                "balancer.device",
                "an interface name of 1 to 15 characters without '/' or spaces",
            ));
        }
        let mut snat_addrs = Vec::new();
        for (i, a) in b.snat_addrs.iter().enumerate() {
            snat_addrs.push(self.parse::<IpAddr>(a, &format!("balancer.snat_addrs[{i}]"))?);
        }
        let conntrack_capacity = match &b.conntrack_capacity {
            Some(c) => {
                self.int(c, "balancer.conntrack_capacity", 16, MAX_CAPACITY as u64)? as usize
            }
            None => 1 << 20,
        };
        let stats = match &b.stats {
            Some(s) => Some(self.parse::<SocketAddr>(s, "balancer.stats")?),
            None => None,
        };
        let queues = match &b.queues {
            Some(q) => self.int(q, "balancer.queues", 1, 64)? as usize,
            None => 1,
        };
        let offload = b.offload.as_ref().is_none_or(|o| *o.get_ref());
        let io_uring = b.io_uring.as_ref().is_some_and(|o| *o.get_ref());
        let io = match &b.io {
            None => Io::Direct,
            Some(v) => match v.get_ref().as_str() {
                "direct" => Io::Direct,
                "tun-rs" if io_uring => {
                    return Err(self.err(
                        v.span(),
                        "balancer.io",
                        "\"tun-rs\" does its own writes: not with io_uring",
                    ))
                }
                "tun-rs" if queues != 1 => {
                    return Err(self.err(
                        v.span(),
                        "balancer.io",
                        "\"tun-rs\" runs one queue (queues = 1)",
                    ))
                }
                "tun-rs" => Io::TunRs,
                other => {
                    return Err(self.err(
                        v.span(),
                        "balancer.io",
                        format!("\"direct\" or \"tun-rs\", not {other:?}"),
                    ))
                }
            },
        };
        let udp_coalesce = b.udp_coalesce.as_ref().is_none_or(|o| *o.get_ref());
        let fast_path = match &b.fast_path {
            Some(n) => self.int(n, "balancer.fast_path", 0, 65_536)? as usize,
            None => 1024,
        };
        let mtu = match &b.mtu {
            Some(m) => self.int(m, "balancer.mtu", 1280, 9000)? as u16,
            None => 1500,
        };
        let hash_key = match &b.hash_key {
            Some(k) if k.get_ref().chars().count() < MIN_PASSPHRASE => {
                return Err(self.err(
                    k.span(),
                    "balancer.hash_key",
                    format!(
                        "a secret of at least {MIN_PASSPHRASE} characters (it keys the flow \
                         hashes that every balancer of a cluster must share)"
                    ),
                ))
            }
            Some(k) => Some(HashKey::from_passphrase(k.get_ref())),
            None => None,
        };
        let mut spec = DataplaneSpec {
            snat_addrs,
            conntrack_capacity,
            mtu,
            ..DataplaneSpec::default()
        };
        if let Some(m) = &b.mac {
            spec.mac = parse_mac(m.get_ref()).map_err(|e| self.err(m.span(), "balancer.mac", e))?;
        }
        if let Some(p) = &b.snat_ports {
            spec.snat_ports = self.port_range(p, "balancer.snat_ports")?;
        }
        spec.persist_capacity = self.opt_int(
            &b.persist_capacity,
            "balancer.persist_capacity",
            (1, MAX_CAPACITY as u64),
            spec.persist_capacity as u64,
        )? as usize;
        spec.splice_reserve = b.splice_capacity.is_some();
        spec.splice_capacity = self.opt_int(
            &b.splice_capacity,
            "balancer.splice_capacity",
            (1, 32_768),
            spec.splice_capacity as u64,
        )? as usize;
        spec.frag_capacity = self.opt_int(
            &b.frag_capacity,
            "balancer.frag_capacity",
            (0, MAX_FRAG_CAPACITY as u64),
            spec.frag_capacity as u64,
        )? as usize;
        spec.frag_timeout = Duration::from_millis(self.opt_int(
            &b.frag_timeout_ms,
            "balancer.frag_timeout_ms",
            (1, 600_000),
            u64::try_from(spec.frag_timeout.as_millis()).unwrap_or(600_000),
        )?);
        let icmp = [
            (&b.icmp_rate, "balancer.icmp_rate", spec.icmp.global.rate),
            (&b.icmp_burst, "balancer.icmp_burst", spec.icmp.global.burst),
            (
                &b.icmp_peer_rate,
                "balancer.icmp_peer_rate",
                spec.icmp.peer.rate,
            ),
            (
                &b.icmp_peer_burst,
                "balancer.icmp_peer_burst",
                spec.icmp.peer.burst,
            ),
        ]
        .map(|(v, field, d)| {
            self.opt_int(v, field, (0, u64::from(MAX_ICMP_RATE)), d.into())
                .map(|x| x as u32)
        });
        let [rate, burst, peer_rate, peer_burst] = icmp;
        spec.icmp.global = IcmpLimit {
            rate: rate?,
            burst: burst?,
        };
        spec.icmp.peer = IcmpLimit {
            rate: peer_rate?,
            burst: peer_burst?,
        };
        if let Some(t) = &b.timeouts {
            self.timeouts(t.get_ref(), &mut spec.timeouts)?;
        }
        if raw.service.is_empty() {
            return Err(self.err(0..0, "service", "no [[service]] defined"));
        }
        let mut health = Vec::new();
        let mut seen = HashSet::new();
        for (i, s) in raw.service.iter().enumerate() {
            let (svc, h) = self.service(i, s, &spec)?;
            if !seen.insert((svc.vip, svc.proto)) {
                return Err(self.err(
                    s.get_ref().vip.span(),
                    format!("service[{i}].vip"),
                    format!("{} {} is defined twice", svc.proto, svc.vip),
                ));
            }
            if let Some(first) = spec.services.first() {
                if (first.mode == Mode::Dr) != (svc.mode == Mode::Dr) {
                    return Err(self.err(
                        s.get_ref().mode.span(),
                        format!("service[{i}].mode"),
                        "mode \"dr\" needs a TAP device and cannot share it with the other modes",
                    ));
                }
            }
            spec.services.push(svc);
            health.push(h);
        }
        spec.validate()
            .map_err(|e| self.spec_error(&e, raw, &spec))?;
        let ha = match &raw.ha {
            Some(h) => Some(self.ha(h.get_ref())?),
            None => None,
        };
        if let (Io::TunRs, Some(v)) = (io, &b.io) {
            if spec.services.iter().any(|s| s.mode == Mode::Dr) {
                return Err(self.err(
                    v.span(),
                    "balancer.io",
                    "\"tun-rs\" opens a TUN device: not with mode \"dr\" (TAP)",
                ));
            }
        }
        Ok(Config {
            device,
            stats,
            queues,
            offload,
            io_uring,
            io,
            udp_coalesce,
            fast_path,
            dataplane: spec,
            health,
            hash_key,
            ha,
        })
    }

    fn ha(&self, h: &RawHa) -> Result<HaConfig, ConfigError> {
        let node_id = self.int(&h.node_id, "ha.node_id", 1, 255)? as u8;
        let mode = match &h.mode {
            None => HaMode::ActiveBackup,
            Some(m) => match m.get_ref().as_str() {
                "active-backup" => HaMode::ActiveBackup,
                "active-active" => HaMode::ActiveActive,
                other => {
                    return Err(self.err(
                        m.span(),
                        "ha.mode",
                        format!("`{other}`: one of active-backup, active-active"),
                    ))
                }
            },
        };
        let priority = match (&h.priority, mode) {
            (Some(p), _) => self.int(p, "ha.priority", 1, 254)? as u8,
            (None, HaMode::ActiveActive) => 100,
            (None, HaMode::ActiveBackup) => {
                return Err(self.err(
                    h.node_id.span(),
                    "ha.priority",
                    "an active-backup pair needs a priority (1..=254) for its election",
                ))
            }
        };
        let bind = self.parse::<SocketAddr>(&h.bind, "ha.bind")?;
        let mut peers = Vec::new();
        for (i, p) in h.peers.iter().enumerate() {
            let a = self.parse::<SocketAddr>(p, &format!("ha.peers[{i}]"))?;
            if a == bind {
                return Err(self.err(p.span(), format!("ha.peers[{i}]"), "is ha.bind itself"));
            }
            peers.push(a);
        }
        if peers.is_empty() {
            return Err(self.err(
                h.bind.span(),
                "ha.peers",
                "at least one peer (the other balancer of the pair)",
            ));
        }
        let key = h.auth_key.get_ref();
        if key.chars().count() < MIN_PASSPHRASE {
            return Err(self.err(
                h.auth_key.span(),
                "ha.auth_key",
                format!("a secret of at least {MIN_PASSPHRASE} characters"),
            ));
        }
        let advert = self.opt_int(
            &h.advert_interval_ms,
            "ha.advert_interval_ms",
            (10, 10_000),
            1000,
        )?;
        let phi = match &h.detector {
            None => false,
            Some(d) => match d.get_ref().as_str() {
                "timeout" => false,
                "phi" => true,
                other => {
                    return Err(self.err(
                        d.span(),
                        "ha.detector",
                        format!("`{other}`: one of timeout, phi"),
                    ))
                }
            },
        };
        let watchdog = self.opt_int(&h.watchdog_ms, "ha.watchdog_ms", (300, 600_000), 1000)?;
        let refresh = self.opt_int(&h.refresh_s, "ha.refresh_s", (1, 3600), 5)?;
        let sync_mtu = self.opt_int(&h.sync_mtu, "ha.sync_mtu", (576, 65_507), 1472)? as usize;
        let mut addresses = Vec::new();
        for (i, a) in h.address.iter().enumerate() {
            let a = a.get_ref();
            let field = format!("ha.address[{i}].addr");
            let dev = a.dev.get_ref().clone();
            if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ', '\0']) {
                return Err(self.err(
                    a.dev.span(),
                    format!("ha.address[{i}].dev"),
                    "an interface name of 1 to 15 characters without '/' or spaces",
                ));
            }
            let text = a.addr.get_ref();
            let (ip, prefix) = text.split_once('/').ok_or_else(|| {
                self.err(
                    a.addr.span(),
                    &field,
                    format!("`{text}`: want ADDRESS/PREFIX"),
                )
            })?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|e| self.err(a.addr.span(), &field, format!("`{text}`: {e}")))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| {
                    self.err(a.addr.span(), &field, format!("`{text}`: prefix 0..={max}"))
                })?;
            let node = match &a.node {
                Some(n) => Some(self.int(n, &format!("ha.address[{i}].node"), 1, 255)? as u8),
                None if mode == HaMode::ActiveActive => {
                    return Err(self.err(
                        a.addr.span(),
                        format!("ha.address[{i}].node"),
                        "active-active: every floating address belongs to a node (held by it, \
                         or by the lowest-numbered serving peer while it is down)",
                    ))
                }
                None => None,
            };
            addresses.push(FloatingAddr {
                node,
                dev,
                addr: ip,
                prefix,
            });
        }
        let bgp = match (&h.bgp_socket, &h.bgp_protocol) {
            (Some(sock), proto) => Some(BgpConfig {
                socket: sock.get_ref().into(),
                protocol: proto
                    .as_ref()
                    .map_or_else(|| "vip".to_owned(), |p| p.get_ref().clone()),
            }),
            (None, Some(p)) => {
                return Err(self.err(p.span(), "ha.bgp_protocol", "needs ha.bgp_socket"))
            }
            (None, None) => None,
        };
        let drain = self.opt_int(&h.drain_s, "ha.drain_s", (0, 3600), 0)?;
        Ok(HaConfig {
            mode,
            bgp,
            drain: Duration::from_secs(drain),
            node_id,
            priority,
            bind,
            peers,
            auth_key: HashKey::from_passphrase(key),
            advert_interval: Duration::from_millis(advert),
            preempt: h.preempt.unwrap_or(false),
            phi,
            watchdog: Duration::from_millis(watchdog),
            refresh: Duration::from_secs(refresh),
            sync_mtu,
            addresses,
        })
    }

    /// `[service.splice]`: limits and rules (rule backends checked against the service's
    /// backends by `DataplaneSpec::validate`'s caller below).
    fn splice(&self, i: usize, r: &RawSplice, sp: &mut SpliceSpec) -> Result<(), ConfigError> {
        let f = |name: &str| format!("service[{i}].splice.{name}");
        sp.head_max = self.opt_int(
            &r.head_max,
            &f("head_max"),
            (64, MAX_SPLICE_HEAD as u64),
            sp.head_max as u64,
        )? as usize;
        let ms = |d: Duration| d.as_millis() as u64;
        sp.head_timeout = Duration::from_millis(self.opt_int(
            &r.head_timeout_ms,
            &f("head_timeout_ms"),
            (1, 600_000),
            ms(sp.head_timeout),
        )?);
        sp.connect_timeout = Duration::from_millis(self.opt_int(
            &r.connect_timeout_ms,
            &f("connect_timeout_ms"),
            (1, 60_000),
            ms(sp.connect_timeout),
        )?);
        sp.idle_timeout = Duration::from_secs(self.opt_int(
            &r.idle_timeout_s,
            &f("idle_timeout_s"),
            (1, 86_400),
            sp.idle_timeout.as_secs(),
        )?);
        sp.mss = self.opt_int(&r.mss, &f("mss"), (536, 9000), sp.mss.into())? as u16;
        for (j, rule) in r.rule.iter().enumerate() {
            let rr = rule.get_ref();
            let fr = |name: &str| format!("service[{i}].splice.rule[{j}].{name}");
            let mut backends = Vec::new();
            for b in &rr.backends {
                backends.push(self.parse::<SocketAddr>(b, &fr("backends"))?);
            }
            if backends.is_empty() {
                return Err(self.err(rule.span(), fr("backends"), "a rule needs backends"));
            }
            let path_prefix = rr
                .path_prefix
                .as_ref()
                .map_or_else(|| "/".to_owned(), |p| p.get_ref().clone());
            sp.rules.push(SpliceRule {
                host: rr.host.as_ref().map(|h| h.get_ref().clone()),
                path_prefix,
                backends,
            });
        }
        Ok(())
    }

    fn service(
        &self,
        i: usize,
        s: &Spanned<RawService>,
        spec: &DataplaneSpec,
    ) -> Result<(ServiceSpec, HealthSpec), ConfigError> {
        let r = s.get_ref();
        let f = |name: &str| format!("service[{i}].{name}");
        let vip: SocketAddr = self.parse(&r.vip, &f("vip"))?;
        let proto: Proto = self.parse(&r.proto, &f("proto"))?;
        let splice = r.mode.get_ref() == "splice";
        let mode: Mode = if splice {
            if proto != Proto::Tcp {
                return Err(self.err(r.mode.span(), f("mode"), "splice needs proto = \"tcp\""));
            }
            Mode::Nat
        } else {
            self.parse(&r.mode, &f("mode"))?
        };
        let mut svc = ServiceSpec::new(vip, proto, mode);
        if splice {
            svc.splice = Some(SpliceSpec::default());
        } else if let Some(sp) = &r.splice {
            return Err(self.err(sp.span(), f("splice"), "only with mode = \"splice\""));
        }
        if let Some(sch) = &r.scheduler {
            svc.scheduler = sch
                .get_ref()
                .parse::<SchedulerKind>()
                .map_err(|e| self.err(sch.span(), f("scheduler"), e.to_string()))?;
        }
        if let Some(a) = &r.affinity {
            svc.affinity = self.parse(a, &f("affinity"))?;
            if svc.affinity == Affinity::SipCallId && proto != Proto::Udp && !splice {
                return Err(self.err(
                    a.span(),
                    f("affinity"),
                    "sip-call-id needs proto = \"udp\" or mode = \"splice\"",
                ));
            }
            if svc.affinity == Affinity::HttpHost && !splice {
                return Err(self.err(a.span(), f("affinity"), "http-host needs mode = \"splice\""));
            }
            if svc.affinity == Affinity::PerPacket && proto != Proto::Udp {
                return Err(self.err(a.span(), f("affinity"), "per-packet needs proto = \"udp\""));
            }
        }
        if let Some(p) = &r.persistence_timeout_s {
            svc.persistence_timeout =
                Duration::from_secs(self.int(p, &f("persistence_timeout_s"), 0, 86_400 * 7)?);
        }
        if let Some(t) = &r.tunnel {
            svc.tunnel = match t.get_ref().as_str() {
                "ipip" => TunnelKind::Ipip,
                "gue" => TunnelKind::Gue { port: 6080 },
                other => {
                    return Err(self.err(
                        t.span(),
                        f("tunnel"),
                        format!("unknown tunnel `{other}`, expected one of: ipip gue"),
                    ))
                }
            };
        }
        if let Some(p) = &r.gue_port {
            let port = self.int(p, &f("gue_port"), 1, 65535)? as u16;
            match &mut svc.tunnel {
                TunnelKind::Gue { port: q } => *q = port,
                TunnelKind::Ipip => {
                    return Err(self.err(p.span(), f("gue_port"), "only with tunnel = \"gue\""))
                }
            }
        }
        let n = &mut svc.persistence_netmask;
        n.v4 = self.opt_int(
            &r.persistence_netmask,
            &f("persistence_netmask"),
            (0, 32),
            n.v4.into(),
        )? as u8;
        n.v6 = self.opt_int(
            &r.persistence_netmask_v6,
            &f("persistence_netmask_v6"),
            (0, 128),
            n.v6.into(),
        )? as u8;
        let conns = (0, u64::from(u32::MAX));
        svc.upper_conns = self.opt_int(
            &r.upper_conns,
            &f("upper_conns"),
            conns,
            svc.upper_conns.into(),
        )? as u32;
        svc.lower_conns = self.opt_int(
            &r.lower_conns,
            &f("lower_conns"),
            conns,
            svc.lower_conns.into(),
        )? as u32;
        if let Some(v) = &r.slow_start_s {
            svc.slow_start = Duration::from_secs(self.int(v, &f("slow_start_s"), 0, 86_400)?);
        }
        svc.panic_threshold_percent = self.opt_int(
            &r.panic_threshold,
            &f("panic_threshold"),
            (0, 100),
            svc.panic_threshold_percent.into(),
        )? as u8;
        // Primality, the range and the scheduler are `DataplaneSpec::validate`'s.
        svc.maglev_size = r.maglev_size.as_ref().map(|m| *m.get_ref());
        if let Some(m) = &r.mid_flow {
            svc.mid_flow = self.parse::<MidFlow>(m, &f("mid_flow"))?;
        }
        if let Some(o) = &r.outlier {
            svc.outlier = Some(self.outlier(i, o.get_ref())?);
        }
        if matches!(mode, Mode::Nat | Mode::Tunnel)
            && !spec.snat_addrs.iter().any(|a| a.is_ipv4() == vip.is_ipv4())
        {
            return Err(self.err(
                r.mode.span(),
                f("mode"),
                format!(
                    "mode \"{mode}\" needs an IPv{} address in balancer.snat_addrs \
                     (the SNAT source, or the tunnel's outer source)",
                    if vip.is_ipv4() { 4 } else { 6 }
                ),
            ));
        }
        if r.backend.is_empty() {
            return Err(self.err(s.span(), f("backend"), "no [[service.backend]] defined"));
        }
        if let (Some(sp), Some(raw)) = (svc.splice.as_mut(), &r.splice) {
            self.splice(i, raw.get_ref(), sp)?;
        }
        let mut addrs = HashSet::new();
        for (j, b) in r.backend.iter().enumerate() {
            let rb = b.get_ref();
            let fb = |name: &str| format!("service[{i}].backend[{j}].{name}");
            let addr: SocketAddr = self.parse(&rb.addr, &fb("addr"))?;
            if addr.is_ipv4() != vip.is_ipv4() {
                return Err(self.err(
                    rb.addr.span(),
                    fb("addr"),
                    "backend and VIP must be of the same address family",
                ));
            }
            if !addrs.insert(addr) {
                return Err(self.err(
                    rb.addr.span(),
                    fb("addr"),
                    format!("{addr} is listed twice"),
                ));
            }
            if matches!(mode, Mode::Tunnel | Mode::Dr)
                && addr.port() != 0
                && addr.port() != vip.port()
            {
                return Err(self.err(
                    rb.addr.span(),
                    fb("addr"),
                    format!(
                        "mode \"{mode}\" cannot change the port: use port 0 or {}",
                        vip.port()
                    ),
                ));
            }
            let weight = match &rb.weight {
                Some(w) => self.int(w, &fb("weight"), 0, 1_000_000)? as u32,
                None => 1,
            };
            let mac = match &rb.mac {
                Some(m) => {
                    Some(parse_mac(m.get_ref()).map_err(|e| self.err(m.span(), fb("mac"), e))?)
                }
                None => None,
            };
            if mode == Mode::Dr && mac.is_none() {
                return Err(self.err(
                    b.span(),
                    fb("mac"),
                    "mode \"dr\" needs the backend's MAC address",
                ));
            }
            let conns = |v: &Option<Spanned<u64>>, name: &str| match v {
                Some(x) => self
                    .int(x, &fb(name), 0, u64::from(u32::MAX))
                    .map(|c| Some(c as u32)),
                None => Ok(None),
            };
            svc.backends.push(BackendSpec {
                addr,
                weight: Weight::new(weight),
                mac,
                upper_conns: conns(&rb.upper_conns, "upper_conns")?,
                lower_conns: conns(&rb.lower_conns, "lower_conns")?,
            });
        }
        let health = match &r.health {
            None => HealthSpec::default(),
            Some(h) => self.health(i, h)?,
        };
        Ok((svc, health))
    }

    fn health(&self, i: usize, h: &RawHealth) -> Result<HealthSpec, ConfigError> {
        let f = |name: &str| format!("service[{i}].health.{name}");
        let kind = match h.kind.get_ref().as_str() {
            "none" => HealthKind::None,
            "tcp" => HealthKind::Tcp,
            "http" => HealthKind::Http,
            "udp" => HealthKind::Udp,
            "sip-options" => HealthKind::SipOptions,
            other => {
                return Err(self.err(
                    h.kind.span(),
                    f("kind"),
                    format!("unknown health check `{other}`, expected one of: tcp http udp sip-options none"),
                ))
            }
        };
        let mut out = HealthSpec {
            kind,
            ..HealthSpec::default()
        };
        if let Some(v) = &h.interval_ms {
            out.interval = Duration::from_millis(self.int(v, &f("interval_ms"), 10, 3_600_000)?);
        }
        out.timeout = match &h.timeout_ms {
            Some(v) => Duration::from_millis(self.int(v, &f("timeout_ms"), 1, 60_000)?),
            None => out.interval.min(Duration::from_millis(1000)) * 4 / 5,
        };
        if let Some(v) = &h.rise {
            out.rise = self.int(v, &f("rise"), 1, 100)? as u32;
        }
        if let Some(v) = &h.fall {
            out.fall = self.int(v, &f("fall"), 1, 100)? as u32;
        }
        if let Some(v) = &h.port {
            out.port = Some(self.int(v, &f("port"), 1, 65535)? as u16);
        }
        if let Some(p) = &h.path {
            // It goes into the request line verbatim: a CR or LF would end the line and let the
            // file inject headers or a second request, a space would split the line.
            let bad = p
                .get_ref()
                .chars()
                .find(|c| c.is_control() || c.is_whitespace());
            if !p.get_ref().starts_with('/') || bad.is_some() {
                let why = match bad {
                    Some(c) => format!("contains {c:?}"),
                    None => "does not start with `/`".to_owned(),
                };
                return Err(self.err(
                    p.span(),
                    f("path"),
                    format!(
                        "{:?} {why}: an HTTP path starts with `/` and has no spaces or control \
                         characters (percent-encode them)",
                        p.get_ref()
                    ),
                ));
            }
            out.path = p.get_ref().clone();
        }
        if let Some(p) = &h.send {
            out.send = p.clone();
        }
        if let Some(p) = &h.expect {
            out.expect = p.clone();
        }
        if let Some(v) = &h.expect_status {
            out.expect_status = self.int(v, &f("expect_status"), 100, 599)? as u16;
        }
        // What the health checker would refuse (it would leave the backends unchecked).
        if let Some(Err(e)) = out.check_config().map(|c| c.validate()) {
            return Err(self.err(h.kind.span(), f("kind"), e.to_string()));
        }
        Ok(out)
    }
}

impl Validator<'_> {
    /// `lo-hi`, both in 1..=65535, `lo <= hi`.
    fn port_range(
        &self,
        v: &Spanned<String>,
        field: &str,
    ) -> Result<core::ops::RangeInclusive<u16>, ConfigError> {
        let bad = || {
            self.err(
                v.span(),
                field,
                format!(
                    "`{}`: a port range `lo-hi` with 1 <= lo <= hi <= 65535",
                    v.get_ref()
                ),
            )
        };
        let (lo, hi) = v.get_ref().split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        Ok(lo..=hi)
    }

    /// `[balancer.timeouts]`: each key sets the idle timeout of its flow states.
    fn timeouts(
        &self,
        t: &RawTimeouts,
        out: &mut lb_conntrack::Timeouts,
    ) -> Result<(), ConfigError> {
        let max = lb_conntrack::MAX_TIMEOUT.as_secs();
        let secs = |v: &Option<Spanned<u64>>, key: &str| -> Result<Option<Duration>, ConfigError> {
            match v {
                Some(x) => Ok(Some(Duration::from_secs(self.int(
                    x,
                    &format!("balancer.timeouts.{key}"),
                    1,
                    max,
                )?))),
                None => Ok(None),
            }
        };
        if let Some(d) = secs(&t.tcp_established, "tcp_established")? {
            out.tcp_established = d;
        }
        if let Some(d) = secs(&t.tcp_syn, "tcp_syn")? {
            out.tcp_syn_sent = d;
            out.tcp_syn_recv = d;
        }
        if let Some(d) = secs(&t.tcp_fin, "tcp_fin")? {
            out.tcp_fin_wait = d;
            out.tcp_close_wait = d;
            out.tcp_last_ack = d;
            out.tcp_time_wait = d;
        }
        if let Some(d) = secs(&t.tcp_close, "tcp_close")? {
            out.tcp_close = d;
        }
        if let Some(d) = secs(&t.udp, "udp")? {
            out.udp_unconfirmed = d;
        }
        if let Some(d) = secs(&t.udp_stream, "udp_stream")? {
            out.udp = d;
        }
        Ok(())
    }

    /// `[service.outlier]`: lb-health's defaults for the keys left out.
    fn outlier(&self, i: usize, o: &RawOutlier) -> Result<OutlierSpec, ConfigError> {
        let f = |name: &str| format!("service[{i}].outlier.{name}");
        let mut out = OutlierSpec::default();
        let d = &mut out.detector;
        let count = (0, 1_000_000);
        d.consecutive_failures = self.opt_int(
            &o.consecutive_failures,
            &f("consecutive_failures"),
            count,
            d.consecutive_failures.into(),
        )? as u32;
        if let Some(v) = &o.failure_rate {
            let pct = self.int(v, &f("failure_rate"), 0, 100)?;
            d.failure_rate = (pct > 0).then(|| pct as f64 / 100.0);
        }
        d.min_requests = self.opt_int(
            &o.min_requests,
            &f("min_requests"),
            count,
            d.min_requests.into(),
        )? as u32;
        let secs = |v: &Option<Spanned<u64>>, name: &str, default: Duration| match v {
            Some(x) => Ok(Duration::from_secs(self.int(x, &f(name), 1, 7 * 86_400)?)),
            None => Ok(default),
        };
        d.window = secs(&o.window_s, "window_s", d.window)?;
        d.base_ejection = secs(&o.ejection_s, "ejection_s", d.base_ejection)?;
        d.max_ejection = secs(&o.max_ejection_s, "max_ejection_s", d.max_ejection)?;
        d.max_ejection_percent = self.opt_int(
            &o.max_ejection_percent,
            &f("max_ejection_percent"),
            (0, 100),
            d.max_ejection_percent.into(),
        )? as u8;
        if let Some(v) = &o.syn_timeout_ms {
            out.syn_timeout =
                Duration::from_millis(self.int(v, &f("syn_timeout_ms"), 1, 60_000)?);
        }
        Ok(out)
    }

    /// Locates a [`SpecError`]: the key's span when the file has it, else its section's.
    fn spec_error(&self, e: &SpecError, raw: &RawConfig, spec: &DataplaneSpec) -> ConfigError {
        let bal = &raw.balancer;
        let b = bal.get_ref();
        // (span, field) of an optional key, falling back to its section.
        let key = |v: Option<Range<usize>>, field: String, section: Range<usize>| {
            (v.unwrap_or(section), field)
        };
        let span = |v: &Option<Spanned<u64>>| v.as_ref().map(Spanned::span);
        let svc = |i: usize| raw.service.get(i);
        let svc_key = |i: usize, name: &str, v: fn(&RawService) -> &Option<Spanned<u64>>| {
            let field = format!("service[{i}].{name}");
            match svc(i) {
                Some(s) => key(span(v(s.get_ref())), field, s.span()),
                None => (0..0, field),
            }
        };
        let backend = |i: usize, j: usize| svc(i).and_then(|s| s.get_ref().backend.get(j));
        let (range, field, message) = match e {
            SpecError::ConntrackCapacity { .. } => {
                let (r, f) = key(
                    b.conntrack_capacity.as_ref().map(Spanned::span),
                    "balancer.conntrack_capacity".into(),
                    bal.span(),
                );
                (r, f, e.to_string())
            }
            SpecError::PersistCapacity { .. } => {
                let (r, f) = key(
                    span(&b.persist_capacity),
                    "balancer.persist_capacity".into(),
                    bal.span(),
                );
                (r, f, e.to_string())
            }
            SpecError::IcmpLimit { field, .. } => {
                let v = match *field {
                    "rate" => &b.icmp_rate,
                    "burst" => &b.icmp_burst,
                    "peer_rate" => &b.icmp_peer_rate,
                    _ => &b.icmp_peer_burst,
                };
                let (r, f) = key(span(v), format!("balancer.icmp_{field}"), bal.span());
                (r, f, e.to_string())
            }
            SpecError::Timeout { state } => {
                let name = timeout_key(*state);
                let t = b.timeouts.as_ref();
                let v = t.and_then(|t| {
                    let t = t.get_ref();
                    match name {
                        "tcp_established" => span(&t.tcp_established),
                        "tcp_syn" => span(&t.tcp_syn),
                        "tcp_fin" => span(&t.tcp_fin),
                        "tcp_close" => span(&t.tcp_close),
                        "udp" => span(&t.udp),
                        "udp_stream" => span(&t.udp_stream),
                        _ => None,
                    }
                });
                let section = t.map_or(bal.span(), Spanned::span);
                (
                    v.unwrap_or(section),
                    format!("balancer.timeouts.{name}"),
                    format!("the idle timeout of {state:?} must be 1 s..=24 days"),
                )
            }
            SpecError::SnatAddrs { ipv6, max, .. } => {
                // The first address past the limit of its family.
                let at = spec
                    .snat_addrs
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.is_ipv6() == *ipv6)
                    .nth(*max)
                    .map_or(0, |(k, _)| k);
                let r = b.snat_addrs.get(at).map_or(bal.span(), Spanned::span);
                (
                    r,
                    format!("balancer.snat_addrs[{at}]"),
                    format!(
                        "more than {max} IPv{} addresses (a SNAT pool's limit)",
                        if *ipv6 { 6 } else { 4 }
                    ),
                )
            }
            SpecError::SnatPorts { .. } => {
                let r = b.snat_ports.as_ref().map_or(bal.span(), Spanned::span);
                (r, "balancer.snat_ports".into(), e.to_string())
            }
            SpecError::TooManyBackends { .. } => {
                let r = raw.service.last().map_or(0..0, Spanned::span);
                (r, "service".into(), e.to_string())
            }
            SpecError::DuplicateService {
                service,
                first,
                vip,
            } => {
                let r = svc(*service).map_or(0..0, |s| s.get_ref().vip.span());
                (
                    r,
                    format!("service[{service}].vip"),
                    format!("{vip} is defined twice (also service[{first}])"),
                )
            }
            SpecError::DuplicateBackend {
                service,
                backend: j,
                addr,
            } => {
                let r = backend(*service, *j).map_or(0..0, |b| b.get_ref().addr.span());
                (
                    r,
                    format!("service[{service}].backend[{j}].addr"),
                    format!("{addr} is listed twice"),
                )
            }
            SpecError::MaglevSize { service, reason } => {
                let (r, f) = svc_key(*service, "maglev_size", |s| &s.maglev_size);
                (r, f, reason.to_string())
            }
            SpecError::MaglevSizeWithoutMaglev { service, scheduler } => {
                let (r, f) = svc_key(*service, "maglev_size", |s| &s.maglev_size);
                (
                    r,
                    f,
                    format!("only with scheduler = \"maglev\", not \"{scheduler}\""),
                )
            }
            SpecError::Weights {
                service,
                backend: j,
                reason,
            } => {
                let field = format!("service[{service}].backend[{j}].weight");
                let r = match backend(*service, *j) {
                    Some(b) => span(&b.get_ref().weight).unwrap_or(b.span()),
                    None => svc(*service).map_or(0..0, Spanned::span),
                };
                (
                    r,
                    field,
                    format!("{reason} (scheduler {})", spec.services[*service].scheduler),
                )
            }
            SpecError::Netmask { service, ipv6, .. } => {
                let (r, f) = if *ipv6 {
                    svc_key(*service, "persistence_netmask_v6", |s| {
                        &s.persistence_netmask_v6
                    })
                } else {
                    svc_key(*service, "persistence_netmask", |s| &s.persistence_netmask)
                };
                (r, f, e.to_string())
            }
            SpecError::PanicThreshold { service, .. } => {
                let (r, f) = svc_key(*service, "panic_threshold", |s| &s.panic_threshold);
                (r, f, e.to_string())
            }
            SpecError::SlowStartNeedsPolicy { service, scheduler } => {
                let (r, f) = svc_key(*service, "slow_start_s", |s| &s.slow_start_s);
                (
                    r,
                    f,
                    format!("slow start ramps policies only, not the consistent hash {scheduler}"),
                )
            }
            SpecError::ConnThresholds {
                service,
                backend: None,
                upper,
                lower,
            } => {
                let (r, f) = svc_key(*service, "lower_conns", |s| &s.lower_conns);
                (r, f, format!("{lower} must be below upper_conns {upper}"))
            }
            SpecError::ConnThresholds {
                service,
                backend: Some(j),
                upper,
                lower,
            } => {
                let base = format!("service[{service}].backend[{j}]");
                let (r, f) = match backend(*service, *j) {
                    Some(b) => match (&b.get_ref().lower_conns, &b.get_ref().upper_conns) {
                        (Some(l), _) => (l.span(), format!("{base}.lower_conns")),
                        (None, Some(u)) => (u.span(), format!("{base}.upper_conns")),
                        (None, None) => (b.span(), base),
                    },
                    None => (0..0, base),
                };
                (
                    r,
                    f,
                    format!(
                        "lower_conns {lower} must be below upper_conns {upper} (a backend \
                         inherits the one it does not set from its service)"
                    ),
                )
            }
            SpecError::Outlier {
                service,
                field,
                reason,
            } => {
                let o = svc(*service).and_then(|s| s.get_ref().outlier.as_ref());
                let (name, v) = match *field {
                    "window" => ("window_s", o.and_then(|o| span(&o.get_ref().window_s))),
                    "base_ejection" => {
                        ("ejection_s", o.and_then(|o| span(&o.get_ref().ejection_s)))
                    }
                    "max_ejection" => (
                        "max_ejection_s",
                        o.and_then(|o| span(&o.get_ref().max_ejection_s)),
                    ),
                    "max_ejection_percent" => (
                        "max_ejection_percent",
                        o.and_then(|o| span(&o.get_ref().max_ejection_percent)),
                    ),
                    "failure_rate" => (
                        "failure_rate",
                        o.and_then(|o| span(&o.get_ref().failure_rate)),
                    ),
                    "syn_timeout" => (
                        "syn_timeout_ms",
                        o.and_then(|o| span(&o.get_ref().syn_timeout_ms)),
                    ),
                    other => (other, None),
                };
                let section = o
                    .map(Spanned::span)
                    .or_else(|| svc(*service).map(Spanned::span))
                    .unwrap_or(0..0);
                (
                    v.unwrap_or(section),
                    format!("service[{service}].outlier.{name}"),
                    format!("{reason} ({field})"),
                )
            }
            other => {
                let r = match other.service().and_then(svc) {
                    Some(s) => s.span(),
                    None => bal.span(),
                };
                let f = other
                    .service()
                    .map_or_else(|| "balancer".to_owned(), |i| format!("service[{i}]"));
                (r, f, other.to_string())
            }
        };
        self.err(range, field, message)
    }
}

/// The `[balancer.timeouts]` key that sets the timeout of `state`.
fn timeout_key(state: FlowState) -> &'static str {
    match state {
        FlowState::Tcp(TcpState::Established) => "tcp_established",
        FlowState::Tcp(TcpState::SynSent | TcpState::SynRecv) => "tcp_syn",
        FlowState::Tcp(
            TcpState::FinWait | TcpState::CloseWait | TcpState::LastAck | TcpState::TimeWait,
        ) => "tcp_fin",
        FlowState::Tcp(TcpState::Close) => "tcp_close",
        FlowState::UdpUnconfirmed => "udp",
        FlowState::Udp => "udp_stream",
        // Not configurable: lb-conntrack's defaults.
        _ => "",
    }
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key on the line of `span` (`key = value`), for toml's own errors.
fn field_at(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let start = text
        .get(..span.start.min(text.len()))
        .map_or(0, |b| b.rfind('\n').map_or(0, |p| p + 1));
    let line = text.get(start..).unwrap_or("").lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) if !k.trim_start().starts_with('[') => k.trim().to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[balancer]
device = "lb0"
snat_addrs = ["203.0.113.100", "2001:db8:100::100"]
conntrack_capacity = 1000
stats = "127.0.0.1:9100"

[[service]]
vip = "203.0.113.10:80"
proto = "tcp"
mode = "nat"
scheduler = "maglev"
affinity = "none"
persistence_timeout_s = 0
[service.health]
kind = "http"
interval_ms = 500
rise = 2
fall = 3
path = "/id"
[[service.backend]]
addr = "198.51.100.11:80"
weight = 1
[[service.backend]]
addr = "198.51.100.12:80"
weight = 2

[[service]]
vip = "[2001:db8:10::10]:53"
proto = "udp"
mode = "dnat"
[[service.backend]]
addr = "[2001:db8:51::11]:53"
"#;

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.device, "lb0");
        assert_eq!(c.stats, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.dataplane.conntrack_capacity, 1000);
        assert_eq!(c.dataplane.services.len(), 2);
        let s = &c.dataplane.services[0];
        assert_eq!(s.mode, Mode::Nat);
        assert_eq!(s.backends[1].weight, Weight::new(2));
        assert_eq!(c.health[0].kind, HealthKind::Http);
        assert_eq!(c.health[0].fall, 3);
        assert_eq!(c.health[0].path, "/id");
        assert_eq!(c.health[1].kind, HealthKind::None);
        assert_eq!(c.dataplane.services[1].proto, Proto::Udp);
        assert!(!c.needs_tap());
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "t.toml").unwrap_err()
    }

    #[test]
    fn hash_key_is_a_shared_passphrase() {
        assert_eq!(Config::parse(GOOD, "t.toml").unwrap().hash_key, None);
        let with = |k: &str| GOOD.replace("stats = ", &format!("hash_key = \"{k}\"\nstats = "));
        let c = Config::parse(&with("sixteen chars ok"), "t.toml").unwrap();
        assert_eq!(
            c.hash_key,
            Some(HashKey::from_passphrase("sixteen chars ok"))
        );
        let e = err(&with("too short"));
        assert_eq!((e.field.as_str(), e.line), ("balancer.hash_key", 6), "{e}");
        assert!(e.message.contains("at least 16 characters"), "{e}");
    }

    #[test]
    fn bad_address_names_line_and_field() {
        let e = err(&GOOD.replace("198.51.100.12:80", "198.51.100.300:80"));
        assert_eq!(e.line, 25, "{e}");
        assert_eq!(e.field, "service[0].backend[1].addr");
        assert!(
            e.to_string()
                .starts_with("t.toml:25:8: service[0].backend[1].addr: `198.51.100.300:80`"),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_and_type_errors_name_the_line() {
        let e = err(&GOOD.replace("conntrack_capacity = 1000", "conntrack_capacity = \"many\""));
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(e.field, "conntrack_capacity", "{e}");
        let e = err(&GOOD.replace("rise = 2", "rise = = 2"));
        assert_eq!(e.line, 18, "{e}");
        let e = err(&GOOD.replace("weight = 2", "wieght = 2"));
        assert_eq!(e.line, 26, "{e}");
        assert!(e.message.contains("wieght"), "{e}");
    }

    #[test]
    fn semantic_errors() {
        let e = err(&GOOD.replace("mode = \"nat\"", "mode = \"ipvs\""));
        assert_eq!((e.line, e.field.as_str()), (11, "service[0].mode"), "{e}");
        let e = err(&GOOD.replace("scheduler = \"maglev\"", "scheduler = \"fastest\""));
        assert_eq!(e.line, 12, "{e}");
        assert!(e.message.contains("maglev"), "{e}");
        let e = err(&GOOD.replace("snat_addrs = [\"203.0.113.100\", ", "snat_addrs = ["));
        assert!(
            e.message.contains("IPv4 address in balancer.snat_addrs"),
            "{e}"
        );
        let e = err(&GOOD.replace("[2001:db8:51::11]:53", "198.51.100.11:53"));
        assert!(e.message.contains("same address family"), "{e}");
        let e = err(&GOOD.replace("198.51.100.12:80", "198.51.100.11:80"));
        assert!(e.message.contains("listed twice"), "{e}");
        let e = err(&GOOD.replace("weight = 2", "weight = -2"));
        assert_eq!(e.line, 26, "{e}");
        let e = err(&GOOD.replace("kind = \"http\"", "kind = \"icmp\""));
        assert_eq!(
            (e.line, e.field.as_str()),
            (16, "service[0].health.kind"),
            "{e}"
        );
        let e = err(&GOOD.replace("mode = \"dnat\"", "mode = \"dr\""));
        assert!(e.message.contains("MAC"), "{e}");
        let e = err("[balancer]\ndevice = \"lb0\"\n");
        assert!(e.message.contains("no [[service]]"), "{e}");
        let e = err("[balancer]\ndevice = \"a-very-long-device-name\"\n");
        assert_eq!(e.line, 2, "{e}");
    }

    /// `GOOD` with `lines` inserted after the first line that is exactly `after`.
    fn with(after: &str, lines: &str) -> String {
        let at = GOOD.find(&format!("\n{after}\n")).expect(after) + after.len() + 2;
        format!("{}{lines}\n{}", &GOOD[..at], &GOOD[at..])
    }

    /// The 1-based line of the first line of `text` that starts with `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines()
            .position(|l| l.starts_with(needle))
            .expect(needle)
            + 1
    }

    /// Asserts that `text` fails on the line starting with `needle`, naming `field`.
    #[track_caller]
    fn fails_at(text: &str, needle: &str, field: &str) -> ConfigError {
        let e = err(text);
        assert_eq!(
            (e.line, e.field.as_str()),
            (line_of(text, needle), field),
            "{e}"
        );
        assert!(e.to_string().starts_with("t.toml:"), "{e}");
        e
    }

    const SVC: &str = "persistence_timeout_s = 0";
    const HA: &str = "\n[ha]\nnode_id = 1\npriority = 200\nbind = \"192.0.2.11:7400\"\n\
        peers = [\"192.0.2.12:7400\"]\nauth_key = \"at least sixteen characters\"\n\
        advert_interval_ms = 100\npreempt = false\n[[ha.address]]\ndev = \"front0\"\n\
        addr = \"192.0.2.10/24\"\n[[ha.address]]\ndev = \"back0\"\n\
        addr = \"2001:db8:b::1/64\"\n";

    #[test]
    fn ha_section_parses() {
        assert_eq!(Config::parse(GOOD, "t.toml").unwrap().ha, None);
        let c = Config::parse(&format!("{GOOD}{HA}"), "t.toml").unwrap();
        let h = c.ha.unwrap();
        assert_eq!(
            (h.node_id, h.priority, h.preempt, h.phi),
            (1, 200, false, false)
        );
        assert_eq!(h.bind, "192.0.2.11:7400".parse().unwrap());
        assert_eq!(h.peers, vec!["192.0.2.12:7400".parse().unwrap()]);
        assert_eq!(h.advert_interval, Duration::from_millis(100));
        assert_eq!(
            h.auth_key,
            HashKey::from_passphrase("at least sixteen characters")
        );
        assert_eq!(h.addresses.len(), 2);
        assert_eq!(
            h.addresses[1],
            FloatingAddr {
                node: None,
                dev: "back0".into(),
                addr: "2001:db8:b::1".parse().unwrap(),
                prefix: 64
            }
        );
        assert_eq!(
            (h.watchdog, h.refresh, h.sync_mtu),
            (Duration::from_secs(1), Duration::from_secs(5), 1472)
        );
    }

    #[test]
    fn splice_keys() {
        let t = GOOD
            .replace("mode = \"nat\"", "mode = \"splice\"")
            .replace("affinity = \"none\"", "affinity = \"http-host\"")
            .replace(
                "[[service.backend]]\naddr = \"198.51.100.11:80\"",
                "[service.splice]\nhead_max = 800\nhead_timeout_ms = 2000\n\
                 [[service.splice.rule]]\nhost = \"api.example\"\npath_prefix = \"/v1/\"\n\
                 backends = [\"198.51.100.11:80\"]\n[[service.backend]]\naddr = \"198.51.100.11:80\"",
            );
        let c = Config::parse(&t, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let s = &c.dataplane.services[0];
        assert_eq!(s.mode, Mode::Nat);
        assert_eq!(s.affinity, Affinity::HttpHost);
        let sp = s.splice.as_ref().unwrap();
        assert_eq!(sp.head_max, 800);
        assert_eq!(sp.head_timeout, Duration::from_millis(2000));
        assert_eq!(sp.rules.len(), 1);
        assert_eq!(sp.rules[0].host.as_deref(), Some("api.example"));
        assert_eq!(sp.rules[0].path_prefix, "/v1/");
        assert!(c.dataplane.services[1].splice.is_none());
        // sip-call-id over TCP only with the splice; http-host only with the splice.
        let e = err(&GOOD.replace("affinity = \"none\"", "affinity = \"sip-call-id\""));
        assert!(e.to_string().contains("splice"), "{e}");
        let e = err(&GOOD.replace("affinity = \"none\"", "affinity = \"http-host\""));
        assert!(e.to_string().contains("splice"), "{e}");
        let sip = GOOD
            .replace("mode = \"nat\"", "mode = \"splice\"")
            .replace("affinity = \"none\"", "affinity = \"sip-call-id\"");
        assert!(Config::parse(&sip, "t.toml").is_ok());
        // Not for UDP; head_max bounded.
        let e = err(&GOOD.replace("mode = \"dnat\"", "mode = \"splice\""));
        assert!(e.to_string().contains("tcp"), "{e}");
        let e = err(&t.replace("head_max = 800", "head_max = 5000"));
        assert!(e.to_string().contains("head_max"), "{e}");
    }

    #[test]
    fn mid_flow_key() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.dataplane.services[0].mid_flow, MidFlow::Hash);
        let t = GOOD.replace(SVC, "persistence_timeout_s = 0\nmid_flow = \"drop\"");
        let c = Config::parse(&t, "t.toml").unwrap();
        assert_eq!(c.dataplane.services[0].mid_flow, MidFlow::Drop);
        let bad = GOOD.replace(SVC, "persistence_timeout_s = 0\nmid_flow = \"sometimes\"");
        fails_at(&bad, "mid_flow", "service[0].mid_flow");
    }

    #[test]
    fn active_active_section() {
        let aa = "\n[ha]\nmode = \"active-active\"\nnode_id = 2\nbind = \"192.0.2.72:7400\"\n\
            peers = [\"192.0.2.71:7400\", \"192.0.2.73:7400\"]\n\
            auth_key = \"at least sixteen characters\"\n";
        // The issue's exact shape: no priority, no addresses (tunnel and dr need none).
        let h = Config::parse(&format!("{GOOD}{aa}"), "t.toml")
            .unwrap()
            .ha
            .unwrap();
        assert_eq!(
            (h.mode, h.node_id, h.peers.len()),
            (HaMode::ActiveActive, 2, 2)
        );
        assert_eq!((h.bgp.clone(), h.drain), (None, Duration::ZERO));
        // nat: per-node addresses (the SNAT next hops), BGP through BIRD, a drain time.
        let more = format!(
            "{GOOD}{aa}bgp_socket = \"/run/bird.ctl\"\ndrain_s = 5\n[[ha.address]]\ndev = \"back0\"\n\
             addr = \"198.51.100.201/24\"\nnode = 1\n"
        );
        let h = Config::parse(&more, "t.toml").unwrap().ha.unwrap();
        assert_eq!(h.addresses[0].node, Some(1));
        assert_eq!(h.drain, Duration::from_secs(5));
        let bgp = h.bgp.unwrap();
        assert_eq!(
            (bgp.socket.to_str(), bgp.protocol.as_str()),
            (Some("/run/bird.ctl"), "vip")
        );
        // An active-active address without its node, an unknown mode, a pair without priority.
        fails_at(
            &more.replace("node = 1\n", ""),
            "addr = \"198.51.100.201/24\"",
            "ha.address[0].node",
        );
        fails_at(
            &more.replace("active-active", "active-passive"),
            "mode = \"active-passive\"",
            "ha.mode",
        );
        let pair = format!("{GOOD}{HA}").replace("priority = 200\n", "");
        fails_at(&pair, "node_id", "ha.priority");
    }

    #[test]
    fn ha_rules_name_line_and_field() {
        let t = |from: &str, to: &str| format!("{GOOD}{}", HA.replace(from, to));
        fails_at(
            &t("node_id = 1", "node_id = 0"),
            "node_id = 0",
            "ha.node_id",
        );
        fails_at(
            &t("priority = 200", "priority = 255"),
            "priority = 255",
            "ha.priority",
        );
        fails_at(
            &t("\"192.0.2.12:7400\"", "\"192.0.2.11:7400\""),
            "peers",
            "ha.peers[0]",
        );
        fails_at(&t("sixteen characters", "short"), "auth_key", "ha.auth_key");
        fails_at(
            &t("advert_interval_ms = 100", "advert_interval_ms = 1"),
            "advert_interval_ms",
            "ha.advert_interval_ms",
        );
        fails_at(
            &t("192.0.2.10/24", "192.0.2.10"),
            "addr = \"192.0.2.10\"",
            "ha.address[0].addr",
        );
        fails_at(
            &t("192.0.2.10/24", "192.0.2.10/33"),
            "addr = \"192.0.2.10/33",
            "ha.address[0].addr",
        );
        fails_at(
            &t("preempt = false", "preempt = false\ndetector = \"psychic\""),
            "detector",
            "ha.detector",
        );
        let e = err(&t("preempt = false", "preempt = false\nvrid = 3"));
        assert!(e.message.contains("vrid"), "{e}");
    }

    const BACKEND: &str = "addr = \"198.51.100.11:80\"";

    #[test]
    fn new_keys_parse_with_the_spec_defaults() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        let d = DataplaneSpec::default();
        assert_eq!(c.dataplane.snat_ports, d.snat_ports);
        assert_eq!(c.dataplane.persist_capacity, d.persist_capacity);
        assert_eq!(c.dataplane.timeouts, d.timeouts);
        let s = &c.dataplane.services[0];
        let n = ServiceSpec::new(s.vip, s.proto, s.mode);
        assert_eq!(s.persistence_netmask, n.persistence_netmask);
        assert_eq!((s.upper_conns, s.lower_conns), (0, 0));
        assert_eq!(s.slow_start, Duration::ZERO);
        assert_eq!(s.panic_threshold_percent, 0);
        assert_eq!((s.outlier, s.maglev_size), (None, None));
        assert_eq!(s.backends[0].upper_conns, None);

        let text = GOOD
            .replace(
                "stats = \"127.0.0.1:9100\"",
                "stats = \"127.0.0.1:9100\"\nsnat_ports = \"20000-29999\"\n\
                 persist_capacity = 100\n[balancer.timeouts]\ntcp_syn = 7\ntcp_fin = 8\n\
                 udp = 9\nudp_stream = 11\ntcp_established = 12\ntcp_close = 13",
            )
            .replace(
                SVC,
                "persistence_timeout_s = 60\npersistence_netmask = 24\n\
                 persistence_netmask_v6 = 64\nupper_conns = 100\nlower_conns = 50\n\
                 panic_threshold = 30\nmaglev_size = 251\n[service.outlier]\n\
                 failure_rate = 0\nmax_ejection_percent = 50\nsyn_timeout_ms = 300",
            )
            .replace(
                BACKEND,
                &format!("{BACKEND}\nupper_conns = 5\nlower_conns = 3"),
            );
        let c = Config::parse(&text, "t.toml").unwrap();
        let d = &c.dataplane;
        assert_eq!(d.snat_ports, 20000..=29999);
        assert_eq!(d.persist_capacity, 100);
        let t = d.timeouts;
        let s = Duration::from_secs;
        assert_eq!((t.tcp_syn_sent, t.tcp_syn_recv), (s(7), s(7)));
        assert_eq!(
            (
                t.tcp_fin_wait,
                t.tcp_close_wait,
                t.tcp_last_ack,
                t.tcp_time_wait
            ),
            (s(8), s(8), s(8), s(8))
        );
        assert_eq!((t.udp_unconfirmed, t.udp), (s(9), s(11)));
        assert_eq!((t.tcp_established, t.tcp_close), (s(12), s(13)));
        assert_eq!(t.icmp, lb_conntrack::Timeouts::default().icmp);
        let v = &d.services[0];
        assert_eq!(
            (v.persistence_netmask.v4, v.persistence_netmask.v6),
            (24, 64)
        );
        assert_eq!((v.upper_conns, v.lower_conns), (100, 50));
        assert_eq!(v.panic_threshold_percent, 30);
        assert_eq!(v.maglev_size, Some(251));
        let o = v.outlier.unwrap();
        assert_eq!(o.detector.failure_rate, None);
        assert_eq!(o.detector.max_ejection_percent, 50);
        assert_eq!(o.detector.consecutive_failures, 5);
        assert_eq!(o.syn_timeout, Duration::from_millis(300));
        assert_eq!(
            (v.backends[0].upper_conns, v.backends[0].lower_conns),
            (Some(5), Some(3))
        );
        assert_eq!(v.backends[1].upper_conns, None);
        // A policy takes slow start.
        let text = GOOD.replace(
            "scheduler = \"maglev\"",
            "scheduler = \"wlc\"\nslow_start_s = 30",
        );
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.dataplane.services[0].slow_start, Duration::from_secs(30));
    }

    #[test]
    fn the_fast_path_is_on_unless_turned_off() {
        assert_eq!(Config::parse(GOOD, "t.toml").unwrap().fast_path, 1024);
        let t = with("stats = \"127.0.0.1:9100\"", "fast_path = 0");
        assert_eq!(Config::parse(&t, "t.toml").unwrap().fast_path, 0);
        for bad in ["fast_path = 65537", "fast_path = -1", "fast_path = true"] {
            let t = with("stats = \"127.0.0.1:9100\"", bad);
            assert!(Config::parse(&t, "t.toml").is_err(), "{bad}");
        }
    }

    #[test]
    fn udp_coalescing_is_on_unless_turned_off() {
        assert!(Config::parse(GOOD, "t.toml").unwrap().udp_coalesce);
        let t = with("stats = \"127.0.0.1:9100\"", "udp_coalesce = false");
        assert!(!Config::parse(&t, "t.toml").unwrap().udp_coalesce);
        let t = with("stats = \"127.0.0.1:9100\"", "udp_coalesce = 1");
        assert!(Config::parse(&t, "t.toml").is_err());
    }

    #[test]
    fn io_is_direct_unless_tun_rs_is_asked_and_fits() {
        assert_eq!(Config::parse(GOOD, "t.toml").unwrap().io, Io::Direct);
        let t = with("stats = \"127.0.0.1:9100\"", "io = \"tun-rs\"");
        assert_eq!(Config::parse(&t, "t.toml").unwrap().io, Io::TunRs);
        let t = with("stats = \"127.0.0.1:9100\"", "io = \"direct\"");
        assert_eq!(Config::parse(&t, "t.toml").unwrap().io, Io::Direct);
        for (extra, want) in [
            ("io = \"tun\"", "not \"tun\""),
            ("io = \"tun-rs\"\nio_uring = true", "io_uring"),
            ("io = \"tun-rs\"\nqueues = 2", "one queue"),
        ] {
            let t = with("stats = \"127.0.0.1:9100\"", extra);
            let e = Config::parse(&t, "t.toml").unwrap_err().to_string();
            assert!(
                e.contains("balancer.io") && e.contains(want),
                "{extra}: {e}"
            );
        }
        let dr = "[balancer]\ndevice = \"lb0\"\nmac = \"02:00:5e:10:00:01\"\n\
                  [[service]]\nvip = \"203.0.113.10:80\"\nproto = \"tcp\"\nmode = \"dr\"\n\
                  [[service.backend]]\naddr = \"198.51.100.11:80\"\nmac = \"02:00:00:00:00:11\"\n";
        assert!(Config::parse(dr, "t.toml").is_ok());
        let t = dr.replace("mac = \"02:00:5e", "io = \"tun-rs\"\nmac = \"02:00:5e");
        let e = Config::parse(&t, "t.toml").unwrap_err().to_string();
        assert!(e.contains("balancer.io") && e.contains("TAP"), "{e}");
    }

    #[test]
    fn io_uring_is_off_unless_asked() {
        assert!(!Config::parse(GOOD, "t.toml").unwrap().io_uring);
        let t = with("stats = \"127.0.0.1:9100\"", "io_uring = true");
        assert!(Config::parse(&t, "t.toml").unwrap().io_uring);
    }

    #[test]
    fn an_explicit_splice_capacity_reserves_the_slots() {
        let d = Config::parse(GOOD, "t.toml").unwrap().dataplane;
        assert!(!d.splice_reserve);
        let t = with("stats = \"127.0.0.1:9100\"", "splice_capacity = 128");
        let d = Config::parse(&t, "t.toml").unwrap().dataplane;
        assert!(d.splice_reserve);
        assert_eq!(d.splice_capacity, 128);
    }

    #[test]
    fn fragment_table_keys_parse_and_are_checked() {
        let bal = "stats = \"127.0.0.1:9100\"";
        let d = Config::parse(GOOD, "t.toml").unwrap().dataplane;
        assert_eq!(d.frag_capacity, lb_dataplane::FRAG_CAPACITY);
        assert_eq!(d.frag_timeout, lb_dataplane::FRAG_TIMEOUT);
        let t = with(bal, "frag_capacity = 0\nfrag_timeout_ms = 1500");
        let c = Config::parse(&t, "t.toml").unwrap().dataplane;
        assert_eq!(c.frag_capacity, 0);
        assert_eq!(c.frag_timeout, Duration::from_millis(1500));
        let t = with(bal, "frag_capacity = 1048577");
        fails_at(&t, "frag_capacity", "balancer.frag_capacity");
        let t = with(bal, "frag_timeout_ms = 0");
        fails_at(&t, "frag_timeout_ms", "balancer.frag_timeout_ms");
    }

    #[test]
    fn icmp_limits_parse_and_are_checked() {
        let bal = "stats = \"127.0.0.1:9100\"";
        let d = Config::parse(GOOD, "t.toml").unwrap().dataplane.icmp;
        assert_eq!(d, lb_dataplane::IcmpLimits::default());
        let t = with(
            bal,
            "icmp_rate = 10\nicmp_burst = 5\nicmp_peer_rate = 2\nicmp_peer_burst = 1",
        );
        let c = Config::parse(&t, "t.toml").unwrap().dataplane.icmp;
        assert_eq!(c.global, IcmpLimit { rate: 10, burst: 5 });
        assert_eq!(c.peer, IcmpLimit { rate: 2, burst: 1 });
        let t = with(
            bal,
            "icmp_rate = 10\nicmp_burst = 5\nicmp_peer_rate = 20\nicmp_peer_burst = 1",
        );
        fails_at(&t, "icmp_peer_rate", "balancer.icmp_peer_rate");
        let t = with(bal, "icmp_burst = 10000001");
        fails_at(&t, "icmp_burst", "balancer.icmp_burst");
        let t = with(bal, "icmp_peer_burst = 51");
        fails_at(&t, "icmp_peer_burst", "balancer.icmp_peer_burst");
    }

    #[test]
    fn balancer_rules_name_line_and_field() {
        let bal = "stats = \"127.0.0.1:9100\"";
        for bad in ["\"0-100\"", "\"2000-1000\"", "\"1024\"", "\"1-65536\""] {
            let t = with(bal, &format!("snat_ports = {bad}"));
            fails_at(&t, "snat_ports", "balancer.snat_ports");
        }
        for bad in ["0", "16777216"] {
            let t = with(bal, &format!("persist_capacity = {bad}"));
            fails_at(&t, "persist_capacity", "balancer.persist_capacity");
        }
        // The flow table's limit (2^24 - 1), not more.
        let t = GOOD.replace("conntrack_capacity = 1000", "conntrack_capacity = 16777216");
        fails_at(&t, "conntrack_capacity", "balancer.conntrack_capacity");
        let t = GOOD.replace("conntrack_capacity = 1000", "conntrack_capacity = 16777215");
        assert!(Config::parse(&t, "t.toml").is_ok());
        for (k, v) in [("tcp_syn", "0"), ("udp", "2073601"), ("tcp_fin", "0")] {
            let t = with(bal, &format!("[balancer.timeouts]\n{k} = {v}"));
            fails_at(&t, k, &format!("balancer.timeouts.{k}"));
        }
        let t = with(bal, "[balancer.timeouts]\ntcp_syn_sent = 5");
        fails_at(&t, "tcp_syn_sent", "tcp_syn_sent");
        // More than 256 SNAT addresses of a family: the SNAT pool refuses them at start.
        let many: Vec<String> = (0..=256)
            .map(|n| format!("\"10.0.{}.{}\"", n / 256, n % 256))
            .collect();
        let t = GOOD.replace(
            "snat_addrs = [\"203.0.113.100\", ",
            &format!("snat_addrs = [{}, ", many.join(", ")),
        );
        let e = fails_at(&t, "snat_addrs", "balancer.snat_addrs[256]");
        assert!(e.message.contains("256"), "{e}");
    }

    #[test]
    fn health_path_is_one_clean_request_target() {
        for bad in [
            "/id\\r\\nX-Injected: 1",
            "/id\\n",
            "/a b",
            "/tab\\t",
            "/nul\\u0000",
            "/del\\u007f",
            "id",
            "",
        ] {
            let t = GOOD.replace("path = \"/id\"", &format!("path = \"{bad}\""));
            let e = fails_at(&t, "path = ", "service[0].health.path");
            assert!(e.message.contains("HTTP path"), "{bad:?}: {e}");
        }
        let t = GOOD.replace("path = \"/id\"", "path = \"/health?full=1&x=%0D\"");
        assert_eq!(
            Config::parse(&t, "t.toml").unwrap().health[0].path,
            "/health?full=1&x=%0D"
        );
    }

    #[test]
    fn service_rules_name_line_and_field() {
        for (k, v) in [
            ("persistence_netmask", "33"),
            ("persistence_netmask_v6", "129"),
            ("panic_threshold", "101"),
            ("slow_start_s", "86401"),
            ("upper_conns", "4294967296"),
        ] {
            let t = with(SVC, &format!("{k} = {v}"));
            fails_at(&t, k, &format!("service[0].{k}"));
        }
        // lower_conns must be below upper_conns.
        let t = with(SVC, "upper_conns = 10\nlower_conns = 10");
        fails_at(&t, "lower_conns", "service[0].lower_conns");
        let t = with(SVC, "upper_conns = 10\nlower_conns = 9");
        assert!(Config::parse(&t, "t.toml").is_ok());
        let t = with(BACKEND, "upper_conns = 4\nlower_conns = 4");
        fails_at(&t, "lower_conns", "service[0].backend[0].lower_conns");
        // A backend's upper under the service's lower, which it inherits.
        let t = with(SVC, "upper_conns = 10\nlower_conns = 8")
            .replace(BACKEND, &format!("{BACKEND}\nupper_conns = 5"));
        let e = fails_at(&t, "upper_conns = 5", "service[0].backend[0].upper_conns");
        assert!(e.message.contains("inherits"), "{e}");
        let t = with(BACKEND, "upper_conns = 1.5");
        assert_eq!(err(&t).line, line_of(&t, "upper_conns"));
        // Slow start ramps policies; maglev is a hash.
        let t = with(SVC, "slow_start_s = 10");
        let e = fails_at(&t, "slow_start_s", "service[0].slow_start_s");
        assert!(e.message.contains("policies"), "{e}");
        // maglev_size: a prime in range, at least the backends, and only with maglev.
        for bad in ["65536", "2", "16777259"] {
            let t = with(SVC, &format!("maglev_size = {bad}"));
            fails_at(&t, "maglev_size", "service[0].maglev_size");
        }
        let t = with(SVC, "maglev_size = 65537");
        assert!(Config::parse(&t, "t.toml").is_ok());
        let t = GOOD.replace(
            "scheduler = \"maglev\"",
            "scheduler = \"ring\"\nmaglev_size = 65537",
        );
        let e = fails_at(&t, "maglev_size", "service[0].maglev_size");
        assert!(e.message.contains("only with scheduler"), "{e}");
        let t = GOOD.replace(
            "scheduler = \"maglev\"",
            "scheduler = \"rr\"\nmaglev_size = 65537",
        );
        fails_at(&t, "maglev_size", "service[0].maglev_size");
        // A policy in tunnel mode places mid-flow packets by a Maglev table: its size may be set.
        let t = GOOD.replace(
            "mode = \"nat\"\nscheduler = \"maglev\"",
            "mode = \"tunnel\"\nscheduler = \"rr\"\nmaglev_size = 251",
        );
        assert!(t.contains("maglev_size = 251"));
        assert!(Config::parse(&t, "t.toml").is_ok());
        // A ring with weights 2 and 1000000 needs 160 x 500001 points: refused at start.
        let t = GOOD
            .replace("scheduler = \"maglev\"", "scheduler = \"ring\"")
            .replace("weight = 2", "weight = 1000000");
        let e = fails_at(&t, "weight = 1000000", "service[0].backend[1].weight");
        assert!(e.message.contains("points"), "{e}");
        let t = GOOD.replace("weight = 2", "weight = 1000000");
        assert!(
            Config::parse(&t, "t.toml").is_ok(),
            "maglev takes any weight"
        );
    }

    #[test]
    fn outlier_rules_name_line_and_field() {
        let o = |body: &str| with(SVC, &format!("[service.outlier]\n{body}"));
        for (k, v) in [
            ("failure_rate", "101"),
            ("window_s", "0"),
            ("ejection_s", "0"),
            ("max_ejection_percent", "101"),
            ("syn_timeout_ms", "0"),
            ("consecutive_failures", "1000001"),
        ] {
            let t = o(&format!("{k} = {v}"));
            fails_at(&t, k, &format!("service[0].outlier.{k}"));
        }
        // The detector's own rule: the longest ejection is at least the base one.
        let t = o("ejection_s = 60\nmax_ejection_s = 30");
        let e = fails_at(&t, "max_ejection_s", "service[0].outlier.max_ejection_s");
        assert!(e.message.contains("base_ejection"), "{e}");
        // An empty table turns it on with the defaults.
        let c = Config::parse(&o(""), "t.toml").unwrap();
        assert_eq!(
            c.dataplane.services[0].outlier,
            Some(OutlierSpec::default())
        );
        // Without the key, the table is named.
        let t = o("ejection_s = 600");
        let e = fails_at(&t, "[service.outlier]", "service[0].outlier.max_ejection_s");
        assert!(e.message.contains("at least"), "{e}");
    }

    /// What `tun-balancer` does at start with a parsed configuration.
    fn starts(c: &Config) -> Result<(), String> {
        let key = HashKey::from_passphrase("a test cluster secret");
        let mut cp =
            lb_dataplane::ControlPlane::new(c.dataplane.clone(), key).map_err(|e| e.to_string())?;
        let tables = cp.build().map_err(|e| e.to_string())?;
        let mut opts = lb_dataplane::DataplaneOptions::new(key);
        opts.snat_ports = c.dataplane.snat_ports.clone();
        lb_dataplane::Dataplane::new(&c.dataplane, tables, opts).map_err(|e| e.to_string())?;
        Ok(())
    }

    #[test]
    fn accepted_configs_start() {
        let mut texts = vec![GOOD.to_owned()];
        for name in SchedulerKind::names().split(' ') {
            let slow = if name
                .parse::<SchedulerKind>()
                .is_ok_and(|k| matches!(k, SchedulerKind::Policy(_)))
            {
                "\nslow_start_s = 5"
            } else {
                ""
            };
            let size = if name == "maglev" {
                "\nmaglev_size = 7"
            } else {
                ""
            };
            texts.push(
                GOOD.replace(
                    "scheduler = \"maglev\"",
                    &format!(
                        "scheduler = \"{name}\"{slow}{size}\nupper_conns = 9\n\
                         panic_threshold = 100\npersistence_netmask = 0\n\
                         persistence_netmask_v6 = 0"
                    ),
                )
                .replace(
                    "stats = \"127.0.0.1:9100\"",
                    "snat_ports = \"1-1\"\npersist_capacity = 1\n\
                     [balancer.timeouts]\ntcp_syn = 1\nudp = 2073600",
                )
                .replace(
                    SVC,
                    &format!("{SVC}\n[service.outlier]\nfailure_rate = 100"),
                )
                .replace(
                    BACKEND,
                    &format!("{BACKEND}\nupper_conns = 2\nlower_conns = 1"),
                ),
            );
        }
        // The largest accepted values of the capacities, scaled down to keep the test small
        // (the limits themselves are checked without building tables above).
        texts.push(
            GOOD.replace("conntrack_capacity = 1000", "conntrack_capacity = 16")
                .replace(
                    "stats = \"127.0.0.1:9100\"",
                    "snat_ports = \"65535-65535\"\npersist_capacity = 2",
                ),
        );
        for t in &texts {
            let c = Config::parse(t, "t.toml").unwrap_or_else(|e| panic!("{e}\n{t}"));
            starts(&c).unwrap_or_else(|e| panic!("{e}\n{t}"));
        }
        let nat = include_str!("../configs/nat.toml")
            .replace("conntrack_capacity = 1000000", "conntrack_capacity = 1000");
        starts(&Config::parse(&nat, "nat.toml").unwrap()).unwrap();
    }

    #[test]
    fn unreadable_file() {
        let e = Config::load(Path::new("/nonexistent/lb.toml")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/lb.toml: cannot read"),
            "{e}"
        );
    }
}
