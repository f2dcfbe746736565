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
//! mtu = 1500                 # optional: path MTU to the backends (tunnel mode: "too big" above)
//! mac = "02:00:5e:10:00:01"  # optional: source MAC of mode "dr" frames
//! hash_key = "..."           # optional: secret passphrase (16+ characters) keying the flow
//!                            # hashes; give every balancer of a cluster the same one so they
//!                            # agree on backends (default: a random key per process)
//!
//! [[service]]
//! vip = "203.0.113.10:80"
//! proto = "tcp"              # tcp | udp
//! mode = "nat"               # nat | dnat | tunnel | dr ("dr" cannot share a device with others)
//! scheduler = "maglev"       # maglev ring rendezvous jump modulo, or a policy: rr wrr swrr
//!                            # random sh dh lc wlc sed nq lblc lblcr fo ovf p2c peak-ewma least-request
//! affinity = "none"          # none | source | sip-call-id (udp) | per-packet (udp: no affinity at all)
//! persistence_timeout_s = 0  # > 0: a client's new flows follow its previous backend
//! tunnel = "ipip"            # mode "tunnel": ipip (IPIP / IP6IP6) | gue
//! gue_port = 6080            # with tunnel = "gue"
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
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use lb_core::{Duration, HashKey, Weight};

use lb_dataplane::{
    parse_mac, Affinity, BackendSpec, DataplaneSpec, Mode, Proto, SchedulerKind, ServiceSpec,
    TunnelKind,
};

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

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// TUN/TAP device name.
    pub device: String,
    /// Statistics listener.
    pub stats: Option<SocketAddr>,
    /// Number of TUN queues, one data-path thread each.
    pub queues: usize,
    /// The data path: services and backends.
    pub dataplane: DataplaneSpec,
    /// Health checks, one per service, in the order of `dataplane.services`.
    pub health: Vec<HealthSpec>,
    /// The flow-hash key from `balancer.hash_key` (`None`: draw a random one at start).
    pub hash_key: Option<HashKey>,
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
        Validator { text, file }.config(raw)
    }
}

// ---- raw serde form -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    balancer: RawBalancer,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
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
    mtu: Option<Spanned<u64>>,
    mac: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
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
    health: Option<RawHealth>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
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
    path: Option<String>,
    send: Option<String>,
    expect: Option<String>,
    expect_status: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    addr: Spanned<String>,
    weight: Option<Spanned<u64>>,
    mac: Option<Spanned<String>>,
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

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let b = raw.balancer;
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
            Some(c) => self.int(c, "balancer.conntrack_capacity", 16, 1 << 28)? as usize,
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
        Ok(Config {
            device,
            stats,
            queues,
            dataplane: spec,
            health,
            hash_key,
        })
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
        let mode: Mode = self.parse(&r.mode, &f("mode"))?;
        let mut svc = ServiceSpec::new(vip, proto, mode);
        if let Some(sch) = &r.scheduler {
            svc.scheduler = sch
                .get_ref()
                .parse::<SchedulerKind>()
                .map_err(|e| self.err(sch.span(), f("scheduler"), e.to_string()))?;
        }
        if let Some(a) = &r.affinity {
            svc.affinity = self.parse(a, &f("affinity"))?;
            if svc.affinity == Affinity::SipCallId && proto != Proto::Udp {
                return Err(self.err(a.span(), f("affinity"), "sip-call-id needs proto = \"udp\""));
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
            svc.backends.push(BackendSpec {
                addr,
                weight: Weight::new(weight),
                mac,
                upper_conns: None,
                lower_conns: None,
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
            out.path = p.clone();
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
        Ok(out)
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
