//! What a service is: the typed, validated description the data path is built from.
//!
//! Strings are parsed here (`FromStr`) so that the config loader and tests share one vocabulary;
//! the data path itself only sees the enums.

use core::fmt;
use core::ops::RangeInclusive;
use core::str::FromStr;
use std::net::{IpAddr, SocketAddr};

use lb_conntrack::Timeouts;
use lb_core::{Duration, MacAddr, Weight};
use lb_health::OutlierConfig;
use lb_sched::hash::HashAlgorithm;
use lb_sched::policy::PolicyKind;

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// How packets reach the chosen backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Full NAT (double rewrite): destination to the backend, source to a balancer address and port.
    Nat,
    /// Destination NAT only (single rewrite): backends route replies back through the balancer.
    Dnat,
    /// IP-in-IP (or GUE) encapsulation to the backend, which answers the client directly.
    Tunnel,
    /// Direct routing: only the destination MAC changes; backends hold the VIP.
    Dr,
}

/// How new flows of a client stick to a backend beyond the flow itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Affinity {
    /// Only the flow's own conntrack entry.
    None,
    /// All flows of a client address go to one backend (hash of the source address).
    Source,
    /// UDP SIP: the hash of the Call-ID header picks the backend.
    SipCallId,
    /// UDP (modes `nat`, `dnat`): no affinity at all, every datagram is scheduled on its own
    /// (a per-packet policy: the baseline that shows why layer-5 affinity matters).
    PerPacket,
    /// TCP with a splice ([`ServiceSpec::splice`]): the hash of the first request's `Host`
    /// header picks the backend (within the group its host/path rule names).
    HttpHost,
}

/// A content rule of a spliced service: requests whose host and path match go to a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceRule {
    /// Exact host (compared case-insensitively, port stripped); `None`: any host.
    pub host: Option<String>,
    /// Path prefix (`/` matches every path).
    pub path_prefix: String,
    /// The backends of the group (addresses as in [`ServiceSpec::backends`]).
    pub backends: Vec<SocketAddr>,
}

/// Layer-5 switching of a TCP service by delayed binding and TCP splicing (module `splice`
/// of this crate): the balancer answers the SYN with a SYN cookie, reads the first request
/// head, picks the backend from it, connects to it with the client's sequence space and then
/// only translates sequence numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct SpliceSpec {
    /// Host / path rules, first match wins; a request no rule matches goes to any backend
    /// of the service (the default group).
    pub rules: Vec<SpliceRule>,
    /// The most bytes of a first request head held (larger: the connection is reset and
    /// counted). At most [`MAX_SPLICE_HEAD`].
    pub head_max: usize,
    /// How long a client may take to send the head after its handshake.
    pub head_timeout: Duration,
    /// How long a backend may leave the balancer's SYN (and the held head) unanswered
    /// before the next backend is tried.
    pub connect_timeout: Duration,
    /// Idle timeout of a spliced connection.
    pub idle_timeout: Duration,
    /// MSS the balancer offers clients in its SYN-ACK.
    pub mss: u16,
}

/// The largest [`SpliceSpec::head_max`]: the held head is sent to the backend in one segment.
pub const MAX_SPLICE_HEAD: usize = 1400;

impl Default for SpliceSpec {
    /// No rules; 1400-byte heads within 5 s; 1 s to connect; 300 s idle; MSS 1400.
    fn default() -> Self {
        SpliceSpec {
            rules: Vec::new(),
            head_max: MAX_SPLICE_HEAD,
            head_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
            mss: 1400,
        }
    }
}

/// Encapsulation used by [`Mode::Tunnel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelKind {
    /// IPIP (IPv4 in IPv4, protocol 4) or IP6IP6 (protocol 41).
    Ipip,
    /// Generic UDP Encapsulation (variant 1: the inner IP packet directly after UDP).
    Gue {
        /// UDP destination port of the encapsulation.
        port: u16,
    },
}

/// What a balancer does with a packet that cannot start a flow (a TCP segment without SYN or
/// with SYN and ACK, an ICMP error) of a flow its tables do not track. Behind ECMP this is a
/// flow the router moved here from a peer (a balancer joined, left or flapped), or one whose
/// entry expired or was evicted here.
///
/// Only modes `tunnel` and `dr` can place such a packet: they need no per-flow state to
/// forward it (Katran's behaviour). In modes `nat` and `dnat` the backend knows the connection
/// by the SNAT address and port (`nat`) or the route back (`dnat`) of the balancer that saw its
/// first packet, which only state sync carries: there such packets are always dropped
/// ([`crate::DropReason::MidFlowUnknown`] for TCP segments, [`crate::DropReason::NoFlow`] for
/// ICMP errors), whatever this says.
///
/// A UDP datagram can always start a flow: an untracked one goes to the scheduler, in every
/// mode (a balancer cannot tell a flow's first datagram from a later one). Behind ECMP, UDP
/// services therefore keep their flows on a moved route only with a consistent-hash
/// scheduler, or by sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MidFlow {
    /// Place it by the service's consistent hash of the flow (of the client address with
    /// `affinity = "source"`), exactly as every peer sharing the hash key and the backends'
    /// health places it, and track it from then on (an ICMP error is forwarded, not tracked).
    /// The hash is the scheduler's own table for a consistent-hash scheduler, so the packet
    /// reaches the backend the peer's scheduler chose; for a policy (rr, wlc, p2c, …, which
    /// pick differently on every balancer) it is a Maglev table over the same weighted
    /// backends, built with the tables: the peers then agree with each other, but with the
    /// policy's first choice only by chance (one flow in N), so such flows survive a move
    /// only by sync. Backends that are down, retired or drained (weight 0) are skipped along
    /// the flow's preference list; live load (admission thresholds, outlier ejection), which
    /// differs from balancer to balancer, is not consulted. A client-persistence template,
    /// when the service uses persistence and one exists here (synced or local), comes first.
    #[default]
    Hash,
    /// Drop it and count it ([`crate::DropReason::MidFlowUnknown`]; an ICMP error:
    /// [`crate::DropReason::NoFlow`]): only a balancer that saw the flow start, or received
    /// it by sync, forwards it (IPVS's behaviour).
    Drop,
}

impl MidFlow {
    /// Whether a service in `mode` places such packets (rather than drop them): with
    /// [`MidFlow::Hash`] in modes `tunnel` and `dr`.
    #[inline]
    pub const fn places(self, mode: Mode) -> bool {
        matches!(self, MidFlow::Hash) && matches!(mode, Mode::Tunnel | Mode::Dr)
    }
}

/// How a service chooses the backend of a new flow: a consistent hash or a policy, named as
/// lb-sched names them ([`HashAlgorithm::name`], [`PolicyKind::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// A consistent hash of the flow (or of the affinity key): stateless, the same on every
    /// balancer that shares the hash key.
    Hash(HashAlgorithm),
    /// A policy over the backends' live load.
    Policy(PolicyKind),
}

impl SchedulerKind {
    /// Every scheduler: the consistent hashes first, then the policies.
    pub fn all() -> impl Iterator<Item = SchedulerKind> {
        HashAlgorithm::ALL
            .into_iter()
            .map(SchedulerKind::Hash)
            .chain(PolicyKind::ALL.into_iter().map(SchedulerKind::Policy))
    }

    /// Its name (`maglev`, `rr`, `peak-ewma`, …).
    pub const fn name(self) -> &'static str {
        match self {
            SchedulerKind::Hash(h) => h.name(),
            SchedulerKind::Policy(p) => p.name(),
        }
    }

    /// Every name, space-separated (for error messages and docs).
    pub fn names() -> String {
        SchedulerKind::all()
            .map(SchedulerKind::name)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for SchedulerKind {
    fn default() -> Self {
        SchedulerKind::Hash(HashAlgorithm::Maglev)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scheduler name that lb-sched does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scheduler `{got}`, expected one of: {}",
    SchedulerKind::names()
)]
pub struct UnknownScheduler {
    /// The rejected name.
    pub got: String,
}

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;
    fn from_str(s: &str) -> Result<Self, UnknownScheduler> {
        SchedulerKind::all()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownScheduler { got: s.to_owned() })
    }
}

/// One backend of a service, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    /// Address, and port for the NAT modes (0: keep the VIP's port).
    pub addr: SocketAddr,
    /// Share of new flows; zero drains the backend.
    pub weight: Weight,
    /// MAC address on the balancer's segment (mode `dr`).
    pub mac: Option<MacAddr>,
    /// Upper connection threshold for this backend (overrides the service's
    /// [`ServiceSpec::upper_conns`]).
    pub upper_conns: Option<u32>,
    /// Lower connection threshold for this backend (overrides [`ServiceSpec::lower_conns`]).
    pub lower_conns: Option<u32>,
}

/// The prefixes that group clients for persistence (IPVS `-M`, `persistence_netmask`): a
/// client's new flows follow the backend of any earlier flow from the same prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Netmask {
    /// IPv4 prefix length (0..=32).
    pub v4: u8,
    /// IPv6 prefix length (0..=128).
    pub v6: u8,
}

impl Default for Netmask {
    /// One client per address: /32 and /128.
    fn default() -> Self {
        Netmask { v4: 32, v6: 128 }
    }
}

/// Passive outlier ejection of a service: what the data path observes (a backend's RST before
/// its first response, to the SYN or after accepting; a SYN it leaves unanswered for
/// `syn_timeout`; an ICMP unreachable from it) is fed to lb-health's
/// [`lb_health::OutlierDetector`] as failures; a first response is a success.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierSpec {
    /// The detector's settings (consecutive failures, failure rate, ejection times, cap).
    pub detector: OutlierConfig,
    /// How long a SYN may stay unanswered before it counts as a failure.
    pub syn_timeout: Duration,
}

impl Default for OutlierSpec {
    /// lb-health's defaults; a SYN unanswered for 1 s is a failure.
    fn default() -> Self {
        OutlierSpec {
            detector: OutlierConfig::default(),
            syn_timeout: Duration::from_secs(1),
        }
    }
}

/// One service: a VIP and port, its mode and scheduling, and its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Virtual address and port clients connect to.
    pub vip: SocketAddr,
    /// Transport protocol.
    pub proto: Proto,
    /// Forwarding mode.
    pub mode: Mode,
    /// How new flows choose a backend.
    pub scheduler: SchedulerKind,
    /// Client affinity.
    pub affinity: Affinity,
    /// Persistence: a client's new flows go to its previous backend for this long (zero: off).
    pub persistence_timeout: Duration,
    /// Which clients persistence groups together.
    pub persistence_netmask: Netmask,
    /// Encapsulation for [`Mode::Tunnel`].
    pub tunnel: TunnelKind,
    /// Admission control (IPVS `-x`): a backend with this many connections (active +
    /// inactive) takes no new flow until it falls below [`ServiceSpec::lower_conns`]; 0: no
    /// limit. Backends may override it.
    pub upper_conns: u32,
    /// Admission control (IPVS `-y`): where an overloaded backend becomes eligible again (0: 3/4
    /// of the upper threshold).
    pub lower_conns: u32,
    /// Slow start: a backend that is added or becomes healthy ramps its weight up over this
    /// long (policies only; zero: off).
    pub slow_start: Duration,
    /// Envoy's panic threshold, in percent: when fewer than this share of the backends are
    /// healthy, health is ignored and every backend takes flows (0: off).
    pub panic_threshold_percent: u8,
    /// Passive outlier ejection (`None`: off).
    pub outlier: Option<OutlierSpec>,
    /// Maglev table size (a prime); `None`: the smallest prime ≥ max(65537, 100 × backends),
    /// as the Maglev paper advises for a disruption close to the ideal. For scheduler `maglev`,
    /// and for a policy whose mid-flow packets a Maglev table places ([`MidFlow`]); refused
    /// with any other.
    pub maglev_size: Option<u64>,
    /// Packets that cannot start a flow, of flows not tracked here (modes `tunnel` and `dr`;
    /// `nat` and `dnat` always drop them): see [`MidFlow`].
    pub mid_flow: MidFlow,
    /// The backends.
    pub backends: Vec<BackendSpec>,
    /// Layer-5 splicing (config `mode = "splice"`, TCP, with [`Mode::Nat`] addressing towards
    /// the backends); `None`: layer 4.
    pub splice: Option<SpliceSpec>,
}

impl ServiceSpec {
    /// A service with the defaults: maglev, no affinity, no persistence, IPIP, no backends.
    pub fn new(vip: SocketAddr, proto: Proto, mode: Mode) -> Self {
        ServiceSpec {
            vip,
            proto,
            mode,
            scheduler: SchedulerKind::default(),
            affinity: Affinity::None,
            persistence_timeout: Duration::ZERO,
            persistence_netmask: Netmask::default(),
            tunnel: TunnelKind::Ipip,
            upper_conns: 0,
            lower_conns: 0,
            slow_start: Duration::ZERO,
            panic_threshold_percent: 0,
            outlier: None,
            maglev_size: None,
            mid_flow: MidFlow::Hash,
            backends: Vec::new(),
            splice: None,
        }
    }

    /// The same service with a backend added.
    #[must_use]
    pub fn with_backend(mut self, addr: SocketAddr, weight: u32) -> Self {
        self.backends.push(BackendSpec {
            addr,
            weight: Weight::new(weight),
            mac: None,
            upper_conns: None,
            lower_conns: None,
        });
        self
    }

    /// The same service with another scheduler.
    #[must_use]
    pub fn with_scheduler(mut self, scheduler: SchedulerKind) -> Self {
        self.scheduler = scheduler;
        self
    }

    /// The same service with another treatment of packets that cannot start a flow.
    #[must_use]
    pub fn with_mid_flow(mut self, mid_flow: MidFlow) -> Self {
        self.mid_flow = mid_flow;
        self
    }
}

/// Settings of the whole data path.
#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneSpec {
    /// Source addresses for full NAT (mode `nat`), at least one per family used.
    pub snat_addrs: Vec<IpAddr>,
    /// Maximum number of tracked flows.
    pub conntrack_capacity: usize,
    /// MTU of the path to the backends: tunnel mode answers larger packets with ICMP
    /// "fragmentation needed" / "packet too big".
    pub mtu: u16,
    /// Source MAC of frames sent in mode `dr`.
    pub mac: MacAddr,
    /// Idle timeouts per flow state.
    pub timeouts: Timeouts,
    /// SNAT source ports handed out per backend and SNAT address (the data paths of one
    /// process split it, see [`crate::DataplaneOptions::snat_ports`]).
    pub snat_ports: RangeInclusive<u16>,
    /// Capacity of the persistence table (per address family): client templates and SIP
    /// Call-ID bindings. When it is full, templates used only once are shed first and live
    /// established ones are never evicted (see [`lb_conntrack::PersistTable`]).
    pub persist_capacity: usize,
    /// IP datagrams whose fragments may be in flight at once (both directions): a non-first
    /// fragment follows its first fragment's decision by the datagram's identity (module
    /// docs of `frag`). Rounded up to a power of two, at most
    /// [`MAX_FRAG_CAPACITY`](crate::MAX_FRAG_CAPACITY); 0 drops every fragment. 112 bytes
    /// each ([`Dataplane::frag_memory_bytes`](crate::Dataplane::frag_memory_bytes)).
    pub frag_capacity: usize,
    /// How long after its first fragment a datagram's later fragments are still forwarded.
    pub frag_timeout: Duration,
    /// Rate limits on the ICMP errors the data path generates (tunnel mode's "too big"): a
    /// global token bucket and one per destination address, per data path. Rates and bursts
    /// at most [`MAX_ICMP_RATE`](crate::MAX_ICMP_RATE), the peer's no larger than the global.
    pub icmp: crate::IcmpLimits,
    /// Spliced connections tracked at once (each owns up to 8 SNAT ports, taken from the
    /// top of the data path's SNAT port range, at most half of it, when a service splices).
    pub splice_capacity: usize,
    /// Set up the splice slots (and take their SNAT ports) even when no service splices, so
    /// that a reload may add the first spliced service ([`crate::Dataplane::set_splice`]);
    /// without it that needs a restart. (tun-balancer: set when the configuration gives
    /// `splice_capacity` explicitly.)
    pub splice_reserve: bool,
    /// The services.
    pub services: Vec<ServiceSpec>,
}

impl Default for DataplaneSpec {
    fn default() -> Self {
        DataplaneSpec {
            snat_addrs: Vec::new(),
            conntrack_capacity: 65_536,
            mtu: 1500,
            mac: MacAddr([0x02, 0x00, 0x5e, 0x10, 0x00, 0x01]),
            timeouts: Timeouts::default(),
            snat_ports: crate::SNAT_PORTS,
            persist_capacity: 65_536,
            frag_capacity: crate::FRAG_CAPACITY,
            frag_timeout: crate::FRAG_TIMEOUT,
            icmp: crate::IcmpLimits::default(),
            splice_capacity: 4096,
            splice_reserve: false,
            services: Vec::new(),
        }
    }
}

/// A name that is not one of an enum's accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{got}`, expected one of: {expected}")]
pub struct UnknownName {
    /// What was being parsed.
    pub what: &'static str,
    /// The rejected input.
    pub got: String,
    /// The accepted names, comma-separated.
    pub expected: &'static str,
}

macro_rules! named_enum {
    ($ty:ident, $what:literal, $( $name:literal => $variant:expr ),+ $(,)?) => {
        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $( $name => Ok($variant), )+
                    _ => Err(UnknownName {
                        what: $what,
                        got: s.to_owned(),
                        expected: concat!($( $name, " " ),+),
                    }),
                }
            }
        }
    };
}

named_enum!(Proto, "protocol", "tcp" => Proto::Tcp, "udp" => Proto::Udp);
named_enum!(Mode, "mode", "nat" => Mode::Nat, "dnat" => Mode::Dnat, "tunnel" => Mode::Tunnel, "dr" => Mode::Dr);
named_enum!(MidFlow, "mid-flow treatment", "hash" => MidFlow::Hash, "drop" => MidFlow::Drop);
named_enum!(Affinity, "affinity", "none" => Affinity::None, "source" => Affinity::Source,
    "sip-call-id" => Affinity::SipCallId, "per-packet" => Affinity::PerPacket,
    "http-host" => Affinity::HttpHost);

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl fmt::Display for MidFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MidFlow::Hash => "hash",
            MidFlow::Drop => "drop",
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nat => "nat",
            Mode::Dnat => "dnat",
            Mode::Tunnel => "tunnel",
            Mode::Dr => "dr",
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
///
/// # Errors
/// A message when the text is not six hexadecimal octets.
pub fn parse_mac(s: &str) -> Result<MacAddr, String> {
    let mut out = [0u8; 6];
    let mut n = 0;
    for part in s.split([':', '-']) {
        if n == 6 || part.len() != 2 {
            return Err(format!("`{s}` is not a MAC address (six hex octets)"));
        }
        out[n] = u8::from_str_radix(part, 16)
            .map_err(|_| format!("`{s}` is not a MAC address (six hex octets)"))?;
        n += 1;
    }
    if n != 6 {
        return Err(format!("`{s}` is not a MAC address (six hex octets)"));
    }
    Ok(MacAddr(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_display() {
        assert_eq!("nat".parse::<Mode>(), Ok(Mode::Nat));
        assert_eq!("dr".parse::<Mode>().map(|m| m.to_string()), Ok("dr".into()));
        let e = "ipvs".parse::<Mode>().unwrap_err();
        assert!(e.to_string().contains("nat dnat tunnel dr"), "{e}");
        assert_eq!("sip-call-id".parse::<Affinity>(), Ok(Affinity::SipCallId));
        assert!("TCP".parse::<Proto>().is_err());
        for m in [MidFlow::Hash, MidFlow::Drop] {
            assert_eq!(m.to_string().parse::<MidFlow>(), Ok(m));
        }
        assert!("ignore".parse::<MidFlow>().is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:5e:10:00:0a"),
            Ok(MacAddr([2, 0, 0x5e, 0x10, 0, 0x0a]))
        );
        assert!(parse_mac("02:00:5e:10:00").is_err());
        assert!(parse_mac("02:00:5e:10:00:0a:01").is_err());
        assert!(parse_mac("zz:00:5e:10:00:0a").is_err());
        assert!(parse_mac("").is_err());
    }
}
