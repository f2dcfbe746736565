//! Scheduling tables: built by the control path from a [`DataplaneSpec`] and the backends' health,
//! then handed to the data path whole (an `Arc` swap). Nothing here runs per packet.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use lb_core::{Backend, BackendId, Duration, HashKey, IpProto, MacAddr, Weight};
use lb_sched::hash::{AnyHash, HashAlgorithm, Maglev, MaglevConfig, MaglevSize};

use crate::spec::{
    Affinity, DataplaneSpec, MidFlow, Mode, Netmask, OutlierSpec, Proto, SchedulerKind,
    ServiceSpec, TunnelKind,
};

/// What went wrong building tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The scheduler (or the Maglev table that places a policy service's mid-flow packets)
    /// rejected the backend set.
    #[error("service {vip}: {reason}")]
    Scheduler {
        /// The service.
        vip: SocketAddr,
        /// lb-sched's error, as text.
        reason: String,
    },
    /// More backends than the flow table's ids: configured backends and retired ones still
    /// referred to (by a flow, or not yet released by [`ControlPlane::release`]) hold
    /// ids, at most `lb_conntrack::MAX_BACKEND_ID + 1` together.
    #[error("too many backends")]
    TooManyBackends,
}

/// Everything the data path needs to know about one backend, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendInfo {
    /// Its id (stable across reloads for the same service and address).
    pub id: BackendId,
    /// Where packets go: address and port (the VIP's port when configured as 0).
    pub addr: SocketAddr,
    /// MAC address (mode `dr`).
    pub mac: Option<MacAddr>,
    /// The service's VIP and port.
    pub vip: SocketAddr,
    /// The service's protocol.
    pub proto: Proto,
    /// The service's mode.
    pub mode: Mode,
    /// The service's encapsulation (mode `tunnel`).
    pub tunnel: TunnelKind,
    /// Configured weight.
    pub weight: Weight,
    /// In the current configuration. A removed backend stays known so that its established flows
    /// keep flowing until they end, but receives no new flow; once nothing refers to it any
    /// more its id is released and may name another backend ([`ControlPlane::release`]).
    pub live: bool,
    /// Health as last reported (true until a check says otherwise).
    pub healthy: bool,
    /// Admission: at this many connections it takes no new flow (0: no limit).
    pub upper_conns: u32,
    /// Admission: eligible again below this many (0: 3/4 of `upper_conns`).
    pub lower_conns: u32,
}

impl BackendInfo {
    /// Its service's protocol as an IP protocol number.
    #[inline]
    pub fn ip_proto(&self) -> IpProto {
        match self.proto {
            Proto::Tcp => IpProto::Tcp,
            Proto::Udp => IpProto::Udp,
        }
    }

    /// Whether the backend may receive new flows.
    #[inline]
    pub fn eligible(&self) -> bool {
        self.live && self.healthy && !self.weight.is_zero()
    }

    /// A name for the backend that does not depend on ids: a hash of its service (VIP, port,
    /// protocol) and its address. State sync names backends by it, so two balancers
    /// whose ids differ (ids are recycled as backends come and go, at times that depend on
    /// when flows end) still agree on which backend a flow or a template is bound to.
    pub fn tag(&self) -> u32 {
        let mut b = [0u8; 40];
        let put = |out: &mut [u8], a: SocketAddr| {
            let ip = match a.ip() {
                IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                IpAddr::V6(v) => v.octets(),
            };
            out[..16].copy_from_slice(&ip);
            out[16..18].copy_from_slice(&a.port().to_be_bytes());
        };
        put(&mut b[..18], self.vip);
        put(&mut b[18..36], self.addr);
        b[36] = self.ip_proto().number();
        let h = lb_core::FlowHasher::<lb_core::SipHash13>::with_key(TAG_KEY).hash_bytes(&b);
        (h >> 32) as u32 ^ h as u32
    }

    /// Whether the backend keeps what it already serves: the later messages of a SIP call
    /// pinned to it. A backend drained to weight 0 or removed from the configuration does (as
    /// its flows do); one that fails its health check does not.
    #[inline]
    pub fn keeps_sessions(&self) -> bool {
        self.healthy
    }
}

/// How a service chooses a backend for a new flow.
#[derive(Debug, Clone)]
pub(crate) enum Scheduler {
    /// No backend with weight > 0.
    Empty,
    /// A consistent hash over the weighted backends. The data path skips, along the flow's
    /// preference list, whatever its live load says is unavailable (down, ejected,
    /// overloaded), so only those backends' own flows move.
    Hash { table: Arc<AnyHash> },
    /// A policy: its state (cursors, tables) and the pool it reads live in the data path and
    /// survive table swaps.
    Policy,
}

/// One service as the data path sees it.
#[derive(Debug, Clone)]
pub struct ServiceTable {
    /// VIP and port.
    pub vip: SocketAddr,
    /// Protocol as an IP protocol number.
    pub proto: IpProto,
    /// Mode.
    pub mode: Mode,
    /// Affinity.
    pub affinity: Affinity,
    /// Persistence timeout (zero: off).
    pub persistence: Duration,
    /// Which clients persistence groups together.
    pub persistence_netmask: Netmask,
    /// Encapsulation.
    pub tunnel: TunnelKind,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// Slow start of its backends (policies; zero: off).
    pub slow_start: Duration,
    /// Envoy's panic threshold in percent (0: off).
    pub panic_threshold_percent: u8,
    /// Passive outlier ejection.
    pub outlier: Option<OutlierSpec>,
    /// Packets that cannot start a flow, of flows not tracked here, as configured (what
    /// happens to them: [`ServiceTable::places_mid_flow`]).
    pub mid_flow: MidFlow,
    pub(crate) sched: Scheduler,
    /// The consistent hash that places packets that cannot start a flow, of untracked flows
    /// ([`ServiceTable::places_mid_flow`]): the scheduler's own table for a consistent-hash
    /// scheduler, a Maglev table over the same weighted backends for a policy. `None` when the
    /// service does not place them, or has no backend of weight > 0.
    pub(crate) fallback: Option<Arc<AnyHash>>,
}

impl ServiceTable {
    /// Whether packets that cannot start a flow (a TCP segment without SYN, an ICMP error) of
    /// flows not tracked here are placed by the service's consistent hash, as every peer
    /// places them (modes `tunnel` and `dr` with [`MidFlow::Hash`]); otherwise they are
    /// dropped.
    #[inline]
    pub fn places_mid_flow(&self) -> bool {
        self.mid_flow.places(self.mode)
    }
}

/// An immutable snapshot of all services and backends: what the data path runs on.
#[derive(Debug, Clone)]
pub struct Tables {
    /// Increases with every build.
    pub generation: u64,
    /// The services. (Read-only once built: [`Tables::service_index`] uses a map built with them.)
    pub services: Vec<ServiceTable>,
    /// Backends by id (index = `BackendId::get()`); `None` for ids never used.
    pub backends: Vec<Option<BackendInfo>>,
    /// SNAT (and tunnel source) addresses.
    pub snat_addrs: Vec<IpAddr>,
    /// Path MTU towards backends (tunnel mode).
    pub mtu: u16,
    /// Source MAC for mode `dr`.
    pub mac: MacAddr,
    /// Limits on the ICMP errors the data path generates.
    pub icmp: crate::IcmpLimits,
    /// Backends by [`BackendInfo::tag`]; `None` where two share a tag (records naming it are
    /// refused rather than guessed).
    pub tags: HashMap<u32, Option<BackendId>>,
    /// Services by (VIP address, port, protocol) when there are more than [`SCAN_SERVICES`]
    /// (built with the tables, which are immutable once built; the first service of a key
    /// wins, as in a scan).
    by_vip: VipMap,
}

/// Up to this many services, [`Tables::service_index`] scans them (a few compares per
/// service, cheaper than hashing); above, it looks the VIP up in a hash map, so that a packet's
/// cost does not grow with the configuration (every NAT reply, which matches no service, would
/// otherwise compare against all of them).
const SCAN_SERVICES: usize = 8;

/// A service lookup key: VIP address, port, protocol.
type VipKey = (IpAddr, u16, IpProto);

/// The VIP map: hashbrown with [`VipHasher`].
type VipMap = hashbrown::HashMap<VipKey, usize, core::hash::BuildHasherDefault<VipHasher>>;

/// A multiply-rotate hasher for the VIP map (the FxHash construction) with a final mix:
/// unkeyed, which is safe here because the map's keys come from the configuration, not from
/// packets. A packet only chooses which key to look up, and a lookup's probe length depends on
/// how the configured keys spread, which an attacker does not control.
///
/// The final mix matters: hashbrown picks a bucket from the hash's low bits, and the low bits
/// of a product depend only on the low bits of its factors, so without it keys that differ only
/// in high bits of the last words written (one VIP on ports 64, 128, 192, …: 1 024 services in
/// 32 buckets) pile up. `finish` folds the high half down and multiplies again (see the test
/// `vip_hashes_spread_over_the_buckets`).
#[derive(Debug, Default, Clone, Copy)]
struct VipHasher(u64);

impl core::hash::Hasher for VipHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let x = (self.0 ^ (self.0 >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// The VIP map of `services` (empty when they are few enough to scan).
fn vip_map(services: &[ServiceTable]) -> VipMap {
    let mut m = VipMap::default();
    if services.len() > SCAN_SERVICES {
        m.reserve(services.len());
        for (i, s) in services.iter().enumerate() {
            m.entry((s.vip.ip(), s.vip.port(), s.proto)).or_insert(i);
        }
    }
    m
}

/// The fixed key of [`BackendInfo::tag`] (a name, not a secret: peers must agree on it).
const TAG_KEY: HashKey = HashKey::from_bytes(*b"lb-backend-tag-1");

impl Tables {
    /// The backend whose [`BackendInfo::tag`] is `tag`, if exactly one has it.
    #[inline]
    pub fn backend_by_tag(&self, tag: u32) -> Option<BackendId> {
        self.tags.get(&tag).copied().flatten()
    }

    /// The backend with id `id`.
    #[inline]
    pub fn backend(&self, id: BackendId) -> Option<&BackendInfo> {
        self.backends
            .get(id.get() as usize)
            .and_then(Option::as_ref)
    }

    /// The service listening on `addr:port` for `proto`.
    #[inline(always)]
    pub fn service_index(&self, addr: IpAddr, port: u16, proto: IpProto) -> Option<usize> {
        if self.services.len() > SCAN_SERVICES {
            return self.service_in_map(addr, port, proto);
        }
        self.services
            .iter()
            .position(|s| s.proto == proto && s.vip.port() == port && s.vip.ip() == addr)
    }

    /// [`Tables::service_index`] of a large configuration. Out of line: inlined, the map's
    /// probe made every packet's classification slower, small configurations' too.
    #[inline(never)]
    fn service_in_map(&self, addr: IpAddr, port: u16, proto: IpProto) -> Option<usize> {
        self.by_vip.get(&(addr, port, proto)).copied()
    }

    /// The first SNAT address of `addr`'s family.
    #[inline]
    pub fn snat_for(&self, addr: IpAddr) -> Option<IpAddr> {
        self.snat_addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == addr.is_ipv4())
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reload {
    /// Backends new in this configuration.
    pub added: Vec<BackendId>,
    /// Backends no longer configured (their flows continue, they get no new ones).
    pub removed: Vec<BackendId>,
}

type ServiceKey = (SocketAddr, Proto);

/// A consistent-hash table and what it was built from (scheme, Maglev size, weighted set).
type BuiltHash = (HashAlgorithm, Option<u64>, Vec<Backend>, Arc<AnyHash>);

/// The control path: keeps backend ids stable across reloads, tracks health, and builds
/// [`Tables`] off the data path.
///
/// Backend ids are recycled. A removed backend is *retired*: it keeps its id (and gets it back
/// if it returns to its service at the same address) while its flows continue. Once the data
/// path reports that nothing refers to it any more ([`Dataplane::release_retired`]: no flow,
/// templates purged), [`ControlPlane::release`] frees the id, and a later reload gives it,
/// lowest free id first, to the next new backend. So ids in use stay bounded by the backends
/// configured plus the retired ones still holding flows, however many reloads come.
///
/// [`Dataplane::release_retired`]: crate::Dataplane::release_retired
#[derive(Debug)]
pub struct ControlPlane {
    key: HashKey,
    spec: DataplaneSpec,
    ids: HashMap<(ServiceKey, SocketAddr), BackendId>,
    infos: Vec<Option<BackendInfo>>,
    /// Released ids below `infos.len()`, for reuse lowest first.
    free: BTreeSet<u32>,
    /// Ids released so far.
    recycled: u64,
    /// Consistent-hash tables by service (a hash scheduler's, or the Maglev table placing a
    /// policy service's mid-flow packets), reused while the weighted backend set is unchanged
    /// (a health change only flips bits in `up`).
    hashes: HashMap<ServiceKey, BuiltHash>,
    generation: u64,
}

/// Builds a consistent hash; Maglev at `size`, or by default at the smallest prime ≥
/// max(65537, 100 × backends) (the Maglev paper: M ≫ N keeps the disruption of a removal near
/// the ideal 1/N).
fn build_hash(
    algo: HashAlgorithm,
    size: Option<u64>,
    set: &[Backend],
    key: HashKey,
) -> Result<AnyHash, lb_sched::SchedError> {
    if algo != HashAlgorithm::Maglev {
        return AnyHash::build(algo, set, key);
    }
    let size = match size {
        Some(m) => MaglevSize::new(m)?,
        None => MaglevSize::at_least((100 * set.len() as u64).max(65_537))?,
    };
    let cfg = MaglevConfig::new(key.derive(algo.name())).with_size(size);
    Ok(AnyHash::Maglev(Maglev::new(set, cfg)?))
}

fn effective_addr(s: &ServiceSpec, addr: SocketAddr) -> SocketAddr {
    if addr.port() == 0 {
        SocketAddr::new(addr.ip(), s.vip.port())
    } else {
        addr
    }
}

impl ControlPlane {
    /// A control plane for `spec`; `key` keys the consistent hashes (derive it from a cluster
    /// secret so that several balancers build the same tables).
    ///
    /// # Errors
    /// As [`ControlPlane::apply`].
    pub fn new(spec: DataplaneSpec, key: HashKey) -> Result<ControlPlane, BuildError> {
        let mut cp = ControlPlane {
            key,
            spec: DataplaneSpec::default(),
            ids: HashMap::new(),
            infos: Vec::new(),
            free: BTreeSet::new(),
            recycled: 0,
            hashes: HashMap::new(),
            generation: 0,
        };
        cp.apply(spec)?;
        Ok(cp)
    }

    /// The configuration in force.
    pub fn spec(&self) -> &DataplaneSpec {
        &self.spec
    }

    /// Replaces the configuration. Backends keep their ids (same service, same address) and their
    /// health; removed ones are retired; new ones take the lowest released id, else the next.
    /// On error nothing changes.
    ///
    /// # Errors
    /// A backend set the scheduler rejects, or more backends than ids
    /// ([`BuildError::TooManyBackends`]: configured plus retired-but-referenced).
    pub fn apply(&mut self, spec: DataplaneSpec) -> Result<Reload, BuildError> {
        // Assign ids on a copy so that a failed build leaves everything as it was.
        let mut ids = self.ids.clone();
        let mut infos = self.infos.clone();
        let mut free = self.free.clone();
        let mut live = vec![false; infos.len()];
        let mut reload = Reload::default();
        for s in &spec.services {
            for b in &s.backends {
                let k = ((s.vip, s.proto), b.addr);
                let id = match ids.get(&k) {
                    Some(&id) => id,
                    None => {
                        let id = match free.pop_first() {
                            Some(n) => BackendId(n),
                            None => {
                                // Ids are what the flow table stores: at most `MAX_BACKEND_ID`.
                                let n = u32::try_from(infos.len())
                                    .ok()
                                    .filter(|&n| n <= lb_conntrack::MAX_BACKEND_ID)
                                    .ok_or(BuildError::TooManyBackends)?;
                                infos.push(None);
                                live.push(false);
                                BackendId(n)
                            }
                        };
                        ids.insert(k, id);
                        reload.added.push(id);
                        id
                    }
                };
                let i = id.get() as usize;
                let healthy = infos[i].is_none_or(|x| x.healthy);
                infos[i] = Some(BackendInfo {
                    id,
                    addr: effective_addr(s, b.addr),
                    mac: b.mac,
                    vip: s.vip,
                    proto: s.proto,
                    mode: s.mode,
                    tunnel: s.tunnel,
                    weight: b.weight,
                    live: true,
                    healthy,
                    upper_conns: b.upper_conns.unwrap_or(s.upper_conns),
                    lower_conns: b.lower_conns.unwrap_or(s.lower_conns),
                });
                live[i] = true;
            }
        }
        for (i, info) in infos.iter_mut().enumerate() {
            if let Some(x) = info {
                if x.live && !live[i] {
                    x.live = false;
                    reload.removed.push(x.id);
                }
            }
        }
        let old = (
            core::mem::replace(&mut self.ids, ids),
            core::mem::replace(&mut self.infos, infos),
            core::mem::replace(&mut self.spec, spec),
            core::mem::replace(&mut self.free, free),
        );
        if let Err(e) = self.build() {
            self.ids = old.0;
            self.infos = old.1;
            self.spec = old.2;
            self.free = old.3;
            return Err(e);
        }
        Ok(reload)
    }

    /// Frees the ids of retired backends that nothing refers to any more, as the data path
    /// reported them ([`Dataplane::release_retired`](crate::Dataplane::release_retired); with
    /// several data paths, only ids *every one* of them reported). A backend configured again
    /// in the meantime keeps its id; unknown ids are ignored. Returns the number freed: then
    /// build and install new tables, which no longer hold them. A later reload gives a freed
    /// id to a new backend.
    pub fn release(&mut self, ids: &[BackendId]) -> usize {
        let mut n = 0;
        for id in ids {
            let i = id.get() as usize;
            if let Some(slot @ Some(_)) = self.infos.get_mut(i) {
                if slot.is_some_and(|b| !b.live) {
                    *slot = None;
                    self.free.insert(id.get());
                    n += 1;
                }
            }
        }
        if n == 0 {
            return 0;
        }
        let infos = &self.infos;
        self.ids
            .retain(|_, id| infos.get(id.get() as usize).is_some_and(Option::is_some));
        // Free ids at the end shrink the tables instead.
        while self.infos.last().is_some_and(Option::is_none) {
            self.infos.pop();
            let top = self.infos.len() as u32;
            self.free.remove(&top);
        }
        self.recycled += n as u64;
        n
    }

    /// Backend ids in use: configured backends and retired ones not yet released.
    pub fn ids_in_use(&self) -> usize {
        self.infos.iter().flatten().count()
    }

    /// Ids released so far ([`ControlPlane::release`]), each free for a new backend.
    pub fn ids_recycled(&self) -> u64 {
        self.recycled
    }

    /// Records a backend's health. Returns whether it changed (then build new tables).
    pub fn set_healthy(&mut self, id: BackendId, healthy: bool) -> bool {
        match self.infos.get_mut(id.get() as usize) {
            Some(Some(x)) if x.healthy != healthy => {
                x.healthy = healthy;
                true
            }
            _ => false,
        }
    }

    /// A backend by id.
    pub fn backend(&self, id: BackendId) -> Option<&BackendInfo> {
        self.infos.get(id.get() as usize).and_then(Option::as_ref)
    }

    /// Every backend configured or retired and not yet released (retired ones have
    /// `live == false`).
    pub fn backends(&self) -> impl Iterator<Item = &BackendInfo> + '_ {
        self.infos.iter().filter_map(Option::as_ref)
    }

    /// The id of the backend at `addr` in the service `vip`/`proto`.
    pub fn backend_id(&self, vip: SocketAddr, proto: Proto, addr: SocketAddr) -> Option<BackendId> {
        self.ids.get(&((vip, proto), addr)).copied()
    }

    /// Builds new tables from the configuration and health in force.
    ///
    /// # Errors
    /// The scheduler (or a policy service's mid-flow Maglev table) rejected a backend set.
    pub fn build(&mut self) -> Result<Arc<Tables>, BuildError> {
        let mut services = Vec::with_capacity(self.spec.services.len());
        let mut hashes = HashMap::new();
        for s in &self.spec.services {
            let sk = (s.vip, s.proto);
            let members: Vec<&BackendInfo> = s
                .backends
                .iter()
                .filter_map(|b| self.ids.get(&(sk, b.addr)))
                .filter_map(|id| self.backend(*id))
                .collect();
            // The weighted set a consistent hash is built over: weight > 0, sorted by id.
            let mut set: Vec<Backend> = members
                .iter()
                .filter(|b| !b.weight.is_zero())
                .map(|b| Backend::new(b.id, b.addr).with_weight(b.weight))
                .collect();
            set.sort_by_key(|b| b.id);
            // The scheduler's table, or (a policy placing mid-flow packets) the fallback's: a
            // Maglev table of `maglev_size`, the one scheduler `maglev` would build.
            let hashed = match s.scheduler {
                SchedulerKind::Hash(algo) => Some((algo, s.maglev_size)),
                SchedulerKind::Policy(_) if s.mid_flow.places(s.mode) => {
                    Some((HashAlgorithm::Maglev, s.maglev_size))
                }
                SchedulerKind::Policy(_) => None,
            };
            let table = match hashed {
                Some((algo, size)) if !set.is_empty() => {
                    let table = match self.hashes.get(&sk) {
                        Some((a, sz, prev, t)) if *a == algo && *sz == size && *prev == set => {
                            t.clone()
                        }
                        _ => Arc::new(build_hash(algo, size, &set, self.key).map_err(|e| {
                            BuildError::Scheduler {
                                vip: s.vip,
                                reason: e.to_string(),
                            }
                        })?),
                    };
                    hashes.insert(sk, (algo, size, set, table.clone()));
                    Some(table)
                }
                _ => None,
            };
            let sched = match (s.scheduler, &table) {
                (SchedulerKind::Hash(_), Some(table)) => Scheduler::Hash {
                    table: table.clone(),
                },
                (SchedulerKind::Hash(_), None) => Scheduler::Empty,
                (SchedulerKind::Policy(_), _) => Scheduler::Policy,
            };
            let fallback = table.filter(|_| s.mid_flow.places(s.mode));
            services.push(ServiceTable {
                vip: s.vip,
                proto: match s.proto {
                    Proto::Tcp => IpProto::Tcp,
                    Proto::Udp => IpProto::Udp,
                },
                mode: s.mode,
                affinity: s.affinity,
                persistence: s.persistence_timeout,
                persistence_netmask: s.persistence_netmask,
                tunnel: s.tunnel,
                scheduler: s.scheduler,
                slow_start: s.slow_start,
                panic_threshold_percent: s.panic_threshold_percent,
                outlier: s.outlier,
                mid_flow: s.mid_flow,
                sched,
                fallback,
            });
        }
        self.hashes = hashes;
        self.generation += 1;
        let mut tags: HashMap<u32, Option<BackendId>> = HashMap::new();
        for b in self.infos.iter().flatten() {
            tags.entry(b.tag())
                .and_modify(|x| *x = None)
                .or_insert(Some(b.id));
        }
        Ok(Arc::new(Tables {
            tags,
            by_vip: vip_map(&services),
            generation: self.generation,
            services,
            backends: self.infos.clone(),
            snat_addrs: self.spec.snat_addrs.clone(),
            mtu: self.spec.mtu,
            mac: self.spec.mac,
            icmp: self.spec.icmp,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::hash::{BuildHasher, BuildHasherDefault};

    /// 1 024 configured keys of regular shapes land in about as many distinct buckets (of
    /// 1 024, taken from the low bits as hashbrown does) as random hashes would: 1 024 × (1 −
    /// 1/e) ≈ 647, give or take 10. Without the final mix, one VIP on ports that are multiples
    /// of 64 used 32 buckets.
    #[test]
    fn vip_hashes_spread_over_the_buckets() {
        let v4 = |x: u32| IpAddr::from(std::net::Ipv4Addr::from(x));
        let v6 = |x: u128| IpAddr::from(std::net::Ipv6Addr::from(x));
        let base6 = 0x2001_0db8_u128 << 96;
        let shapes: [(&str, &dyn Fn(u32) -> VipKey); 9] = [
            ("consecutive IPv4", &|i| {
                (v4(0x0a01_0000 + i), 80, IpProto::Tcp)
            }),
            ("IPv4, one per /24", &|i| {
                (v4(0x0a00_0001 + (i << 8)), 80, IpProto::Tcp)
            }),
            ("IPv4, one per /16", &|i| {
                (v4(0x0a00_0001_u32.wrapping_add(i << 16)), 80, IpProto::Tcp)
            }),
            ("IPv4, one per /10", &|i| {
                (v4(0x0100_0001_u32.wrapping_add(i << 22)), 80, IpProto::Udp)
            }),
            ("one VIP, consecutive ports", &|i| {
                (v4(0x0a00_0001), 1000 + i as u16, IpProto::Tcp)
            }),
            ("one VIP, ports step 64", &|i| {
                (v4(0x0a00_0001), (i as u16) << 6, IpProto::Udp)
            }),
            ("consecutive IPv6", &|i| {
                (v6(base6 + u128::from(i)), 80, IpProto::Tcp)
            }),
            ("IPv6, one per /64", &|i| {
                (v6(base6 + 1 + (u128::from(i) << 64)), 80, IpProto::Tcp)
            }),
            ("IPv6, one per /48", &|i| {
                (v6(base6 + 1 + (u128::from(i) << 80)), 443, IpProto::Tcp)
            }),
        ];
        let build = BuildHasherDefault::<VipHasher>::default();
        for (name, key) in shapes {
            let buckets: BTreeSet<u64> = (0..1024).map(|i| build.hash_one(key(i)) & 1023).collect();
            assert!(
                buckets.len() >= 600,
                "{name}: {} buckets of 1 024",
                buckets.len()
            );
        }
    }

    proptest::proptest! {
        /// With few services or many, the lookup finds what a scan finds: every configured
        /// (VIP, port, protocol) its own service, and nothing else anything.
        #[test]
        fn service_lookup_equals_a_scan(picks in proptest::collection::vec(0usize..36, 0..36)) {
            let addrs = [
                "203.0.113.10", "203.0.113.11", "203.0.113.12", "203.0.113.13",
                "2001:db8::10", "2001:db8::11",
            ]
            .map(|a| a.parse::<IpAddr>().unwrap());
            let key = |i: usize| (addrs[i % 6], [53u16, 80, 443][i / 6 % 3], i / 18);
            let mut seen = BTreeSet::new();
            let mut spec = DataplaneSpec {
                snat_addrs: vec![
                    "203.0.113.100".parse().unwrap(),
                    "2001:db8::100".parse().unwrap(),
                ],
                ..DataplaneSpec::default()
            };
            for i in picks.into_iter().filter(|&i| seen.insert(i)) {
                let (a, port, p) = key(i);
                let proto = if p == 0 { Proto::Tcp } else { Proto::Udp };
                let backend = if a.is_ipv4() { "198.51.100.11:80" } else { "[2001:db8:1::11]:80" };
                spec.services.push(
                    ServiceSpec::new(SocketAddr::new(a, port), proto, Mode::Nat)
                        .with_backend(backend.parse().unwrap(), 1),
                );
            }
            let mut cp = ControlPlane::new(spec, HashKey::from_bytes([5; 16])).unwrap();
            let t = cp.build().unwrap();
            for i in 0..36 {
                let (a, port, p) = key(i);
                let proto = if p == 0 { IpProto::Tcp } else { IpProto::Udp };
                let scan = t
                    .services
                    .iter()
                    .position(|s| s.proto == proto && s.vip.port() == port && s.vip.ip() == a);
                proptest::prop_assert_eq!(t.service_index(a, port, proto), scan);
            }
            // An address no service has.
            proptest::prop_assert_eq!(
                t.service_index("192.0.2.1".parse().unwrap(), 80, IpProto::Tcp),
                None
            );
        }
    }

    fn spec(backends: &[&str]) -> DataplaneSpec {
        let mut s = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
        for b in backends {
            s = s.with_backend(b.parse().unwrap(), 1);
        }
        DataplaneSpec {
            snat_addrs: vec!["203.0.113.100".parse().unwrap()],
            services: vec![s],
            ..DataplaneSpec::default()
        }
    }

    #[test]
    fn ids_are_stable_across_reloads_and_removed_backends_retire() {
        let key = HashKey::from_bytes([3; 16]);
        let mut cp =
            ControlPlane::new(spec(&["198.51.100.11:80", "198.51.100.12:80"]), key).unwrap();
        let vip: SocketAddr = "203.0.113.10:80".parse().unwrap();
        let b2 = cp
            .backend_id(vip, Proto::Tcp, "198.51.100.12:80".parse().unwrap())
            .unwrap();
        let r = cp
            .apply(spec(&["198.51.100.12:80", "198.51.100.13:80"]))
            .unwrap();
        assert_eq!(r.added, vec![BackendId(2)]);
        assert_eq!(r.removed, vec![BackendId(0)]);
        assert_eq!(
            cp.backend_id(vip, Proto::Tcp, "198.51.100.12:80".parse().unwrap()),
            Some(b2)
        );
        let t = cp.build().unwrap();
        assert!(!t.backend(BackendId(0)).unwrap().live);
        assert!(t.backend(BackendId(2)).unwrap().eligible());
    }

    #[test]
    fn health_change_reuses_the_hash_table() {
        let mut cp = ControlPlane::new(
            spec(&["198.51.100.11:80", "198.51.100.12:80"]),
            HashKey::from_bytes([3; 16]),
        )
        .unwrap();
        let t1 = cp.build().unwrap();
        assert!(cp.set_healthy(BackendId(1), false));
        assert!(!cp.set_healthy(BackendId(1), false));
        let t2 = cp.build().unwrap();
        match (&t1.services[0].sched, &t2.services[0].sched) {
            (Scheduler::Hash { table: a }, Scheduler::Hash { table: b }) => {
                assert!(Arc::ptr_eq(a, b));
                assert!(t1.backend(BackendId(1)).unwrap().healthy);
                assert!(!t2.backend(BackendId(1)).unwrap().healthy);
            }
            _ => panic!("expected hash schedulers"),
        }
        assert!(t2.generation > t1.generation);
    }

    #[test]
    fn bad_scheduler_leaves_config_unchanged() {
        let mut cp =
            ControlPlane::new(spec(&["198.51.100.11:80"]), HashKey::from_bytes([3; 16])).unwrap();
        let mut bad = spec(&["198.51.100.11:80", "198.51.100.12:80"]);
        bad.services[0].scheduler = SchedulerKind::Hash(HashAlgorithm::Maglev);
        bad.services[0].maglev_size = Some(65_536); // not a prime
        assert!(cp.apply(bad).is_err());
        assert_eq!(cp.backends().count(), 1);
        for kind in SchedulerKind::all() {
            let mut s = spec(&["198.51.100.11:80", "198.51.100.12:80"]);
            s.services[0].scheduler = kind;
            cp.apply(s).unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
    }

    /// A tunnel or dr service places mid-flow packets by a consistent hash built with the
    /// tables: a hash scheduler's own table, or for a policy the Maglev table scheduler
    /// `maglev` would build over the same weighted set (reused while that set is unchanged);
    /// none in nat / dnat or with `mid_flow = drop`.
    #[test]
    fn mid_flow_tables_are_built_beside_the_scheduler() {
        use lb_sched::hash::ConsistentHash;
        let key = HashKey::from_bytes([3; 16]);
        let build = |mode: Mode, sched: &str, mid: MidFlow| {
            let mut s = spec(&["198.51.100.11:80", "198.51.100.12:80", "198.51.100.13:80"]);
            s.services[0].mode = mode;
            s.services[0].scheduler = sched.parse().unwrap();
            s.services[0].mid_flow = mid;
            s.services[0].backends[2].weight = Weight::new(3);
            let mut cp = ControlPlane::new(s, key).unwrap();
            let t = cp.build().unwrap();
            (cp, t)
        };
        let (_, maglev) = build(Mode::Tunnel, "maglev", MidFlow::Hash);
        let (mut cp, wlc) = build(Mode::Tunnel, "wlc", MidFlow::Hash);
        let (m, w) = (&maglev.services[0], &wlc.services[0]);
        assert!(m.places_mid_flow() && w.places_mid_flow());
        match (&m.sched, m.fallback.as_deref(), w.fallback.as_deref()) {
            (Scheduler::Hash { table }, Some(fm), Some(fw)) => {
                assert!(core::ptr::eq(&**table, fm), "a hash scheduler's own table");
                for h in (0..20_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                    assert_eq!(fm.lookup(h), fw.lookup(h));
                }
            }
            other => panic!("{other:?}"),
        }
        // A health change reuses it.
        assert!(cp.set_healthy(BackendId(0), false));
        let again = cp.build().unwrap();
        assert!(Arc::ptr_eq(
            wlc.services[0].fallback.as_ref().unwrap(),
            again.services[0].fallback.as_ref().unwrap()
        ));
        for (mode, mid) in [
            (Mode::Nat, MidFlow::Hash),
            (Mode::Dnat, MidFlow::Hash),
            (Mode::Dr, MidFlow::Drop),
        ] {
            for sched in ["maglev", "rr"] {
                let (_, t) = build(mode, sched, mid);
                assert!(t.services[0].fallback.is_none(), "{mode} {sched} {mid}");
                assert!(!t.services[0].places_mid_flow());
            }
        }
        let (_, dr) = build(Mode::Dr, "p2c", MidFlow::Hash);
        assert!(dr.services[0].fallback.is_some());
        // `maglev_size` sizes a policy's table as it does scheduler maglev's.
        let mut s = spec(&["198.51.100.11:80", "198.51.100.12:80"]);
        s.services[0].mode = Mode::Tunnel;
        s.services[0].scheduler = "wlc".parse().unwrap();
        s.services[0].maglev_size = Some(251);
        let t = ControlPlane::new(s, key).unwrap().build().unwrap();
        match t.services[0].fallback.as_deref() {
            Some(AnyHash::Maglev(m)) => assert_eq!(m.size().get(), 251),
            other => panic!("{other:?}"),
        }
    }

    /// The id space bounds the backends configured plus the retired ones not yet released,
    /// not every backend ever seen.
    #[test]
    fn too_many_backends_counts_only_ids_in_use() {
        let n = lb_conntrack::MAX_BACKEND_ID + 1;
        let spec = |ids: core::ops::Range<u32>| {
            let mut s = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
            s.scheduler = "rr".parse().unwrap();
            for i in ids {
                s = s.with_backend(
                    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80)),
                    1,
                );
            }
            DataplaneSpec {
                services: vec![s],
                ..DataplaneSpec::default()
            }
        };
        let mut cp = ControlPlane::new(spec(0..n), HashKey::from_bytes([3; 16])).unwrap();
        assert_eq!(cp.ids_in_use(), n as usize);
        assert_eq!(cp.apply(spec(0..n + 1)), Err(BuildError::TooManyBackends));
        // Backend 0 leaves, but holds its id until released.
        let r = cp.apply(spec(1..n)).unwrap();
        assert_eq!(r.removed, vec![BackendId(0)]);
        assert_eq!(cp.apply(spec(1..n + 1)), Err(BuildError::TooManyBackends));
        // A live backend is never released; the retired one is.
        assert_eq!(cp.release(&[BackendId(1), BackendId(0)]), 1);
        assert_eq!(cp.ids_recycled(), 1);
        let r = cp.apply(spec(1..n + 1)).unwrap();
        assert_eq!(r.added, vec![BackendId(0)]);
        let vip = "203.0.113.10:80".parse().unwrap();
        let newest = SocketAddr::from(([10, 1, 0, 0], 80));
        assert_eq!(cp.backend_id(vip, Proto::Tcp, newest), Some(BackendId(0)));
        assert_eq!(cp.ids_in_use(), n as usize);
    }

    #[test]
    fn maglev_size_grows_with_the_backends() {
        let size_for = |n: u32, set: Option<u64>| {
            let mut s = ServiceSpec::new("203.0.113.10:80".parse().unwrap(), Proto::Tcp, Mode::Nat);
            for i in 0..n {
                s = s.with_backend(SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)), 1);
            }
            s.maglev_size = set;
            let spec = DataplaneSpec {
                services: vec![s],
                ..DataplaneSpec::default()
            };
            let mut cp = ControlPlane::new(spec, HashKey::from_bytes([3; 16])).unwrap();
            let t = cp.build().unwrap();
            match &t.services[0].sched {
                Scheduler::Hash { table } => match &**table {
                    AnyHash::Maglev(m) => m.size().get(),
                    _ => panic!("not maglev"),
                },
                _ => panic!("not a hash"),
            }
        };
        assert_eq!(size_for(3, None), 65_537);
        assert_eq!(size_for(1000, None), 100_003); // the smallest prime >= 100 x 1000
        assert_eq!(size_for(3, Some(251)), 251);
    }
}
