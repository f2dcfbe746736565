//! The active/backup pair: heartbeat, election, floating addresses and connection sync, on one
//! thread of `tun-balancer` (the "HA thread").
//!
//! # What the thread does
//! - **Heartbeat and election** (lb-health): every `advert_interval` the node sends an
//!   authenticated status (role, priority) to its peers; statuses of a peer that claims to be
//!   master are the VRRP adverts of [`Election`]. A backup that hears no advert for three
//!   intervals plus its skew (or whose φ accrual detector suspects the master, with
//!   `detector = "phi"`) takes over.
//! - **Takeover** installs nothing (the synced flows are already in the table: *install before
//!   you announce*), adds every floating address (rtnetlink), announces each (gratuitous ARP,
//!   unsolicited neighbour advertisement) at once and again after 0.1, 0.5, 1 and 2 s, and again
//!   whenever a lower-priority master is heard. A node that becomes backup removes them.
//! - **Sync** (lb-conntrack's wire format, lb-dataplane's sync log): every [`TICK`] the master
//!   drains the data path's log of changed flows and templates (one record per key, its latest
//!   state), packs them into MTU-sized authenticated datagrams and sends them; a rolling pass
//!   resends flows that saw traffic every `refresh_s`. A backup installs what it receives with
//!   the remaining timeouts. A gap in the sequence numbers, or a first message from a new
//!   epoch, makes the backup ask for a bulk dump, which the master sends in chunks, followed by
//!   an end marker. Until a node's bulk sync has completed it does not preempt (*fail back only
//!   when synced*).
//! - **Failure of the master itself**: a data path that stops running for `watchdog_ms`
//!   (lb-health's [`Watchdog`] over the data-path threads' kicks) makes the master send a
//!   priority-0 advert and step down to `fault` until it runs again; a process that was frozen
//!   (SIGSTOP, a VM pause) longer than the master-down interval steps down as soon as it runs
//!   again, before it sends anything, so the node that took over in the meantime keeps the
//!   addresses (no second flap).
//! - **Split brain healing**: a master that hears from a peer it had declared dead asks it for a
//!   bulk dump and merges the flows it does not have (flows opened on either side while the link
//!   was cut survive the healing); the election then leaves one master.
//!
//! The data path never waits for any of this: it appends keys to a preallocated log under the
//! lock it already holds; the HA thread does every system call.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Instant as StdInstant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use lb_conntrack::sync::{
    MessageKind, SyncError, SyncReceiver, SyncRecord, SyncSender, TemplateRecord, FLAG_BULK,
    FLAG_BULK_END,
};
use lb_core::{Duration, Instant};
use lb_dataplane::{Dataplane, SyncCursor};
use lb_health::heartbeat::{Destination, Handled};
use lb_health::{
    DetectorConfig, Election, ElectionAction, ElectionConfig, HealthError, HeartbeatNode,
    MembershipEvent, NodeConfig, NodeId, PhiConfig, Role, Watchdog, WatchdogEvent,
};

use crate::announce::Announcer;
use crate::config::{FloatingAddr, HaConfig, HaMode};
use crate::netlink;

/// How often the HA thread drains the sync log and sends: a flow is on the wire to the backup
/// at most this long after the data path created it.
pub const TICK: Duration = Duration::from_millis(2);

/// Changes turned into records per tick at most (the rest wait for the next tick).
const DRAIN_MAX: usize = 16_384;

/// Entries exported per tick by a bulk dump or a refresh pass.
const EXPORT_CHUNK: usize = 512;

/// The HA socket's receive buffer: a bulk dump arrives faster than a busy backup may read it
/// (the kernel's default, ~208 KiB, overflowed in the sync-cost measurement).
const RCVBUF: usize = 4 << 20;

/// Capacity of the data path's sync log: room for about 16 ms of new flows at 1 M/s.
pub const SYNC_LOG: usize = 1 << 16;

/// When a takeover's announcements are repeated, after the first.
const REANNOUNCE: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];

/// Roles as stored in [`HaShared::role`].
pub mod role {
    /// Starting.
    pub const INIT: u8 = 0;
    /// Backup: the addresses are the peer's.
    pub const BACKUP: u8 = 1;
    /// Master: holds the floating addresses and forwards.
    pub const MASTER: u8 = 2;
    /// Stepped down because its own data path stalled.
    pub const FAULT: u8 = 3;
    /// Active-active: serving (forwarding, announcing, holding its addresses).
    pub const ACTIVE: u8 = 4;
    /// Active-active: withdrawn, forwarding what still comes until it exits (SIGTERM).
    pub const DRAINING: u8 = 5;

    /// The name shown in the statistics.
    pub fn name(r: u8) -> &'static str {
        match r {
            BACKUP => "backup",
            MASTER => "master",
            FAULT => "fault",
            ACTIVE => "active",
            DRAINING => "draining",
            _ => "init",
        }
    }
}

/// Counters of the HA thread, shown in the statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaCounters {
    /// Records (flows and templates) streamed, each counted once however many peers get it.
    pub sent: u64,
    /// Sync datagrams sent, over all peers (a datagram to each of N peers counts N).
    pub datagrams_sent: u64,
    /// Sync bytes sent (UDP payload), over all peers.
    pub bytes_sent: u64,
    /// Records received in accepted messages.
    pub received: u64,
    /// Records installed or refreshed.
    pub installed: u64,
    /// Records the tables refused.
    pub refused: u64,
    /// Gaps in the peer's sequence numbers.
    pub gaps: u64,
    /// Bulk dumps asked for.
    pub resyncs: u64,
    /// Bulk dumps sent to a peer.
    pub bulk_sent: u64,
    /// Bulk dumps received completely.
    pub bulk_received: u64,
    /// Changes the data path's sync log could not hold.
    pub lost: u64,
    /// Changes waiting in the data path's log when the last drain began.
    pub lag_records: u64,
    /// The most ever seen waiting.
    pub lag_records_max: u64,
    /// Heartbeats and sync messages with a wrong MAC.
    pub auth_failures: u64,
    /// Replayed, reordered or stale messages.
    pub replays: u64,
    /// Sync messages refused as a first contact without our challenge (captured before this
    /// node started, or a peer that restarted and has not heard our request yet).
    pub unfresh: u64,
    /// Malformed datagrams.
    pub malformed: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Role changes.
    pub transitions: u64,
    /// Send errors.
    pub send_errors: u64,
    /// Records dropped because the data path held its lock when they arrived (repaired by a
    /// bulk sync).
    pub busy: u64,
}

/// What the statistics show about the pair.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HaStatus {
    /// This node.
    pub node_id: u8,
    /// The priority it announces.
    pub priority: u8,
    /// Milliseconds since the peer was last heard (`None`: never).
    pub peer_seen_ms_ago: Option<u64>,
    /// Whether the bulk sync completed (or this node has been master since).
    pub synced: bool,
    /// Counters.
    pub counters: HaCounters,
    /// Unix time (ms) of the last takeover by this node.
    pub takeover_unix_ms: Option<u64>,
    /// Why the role last changed.
    pub last_reason: String,
    /// `active-backup` or `active-active`.
    pub mode: &'static str,
    /// The floating addresses this node holds now.
    pub held: Vec<String>,
    /// Whether the BGP speaker announces the VIPs for this node (`None`: no BGP configured).
    pub announced: Option<bool>,
}

/// State shared by the HA thread, the data-path threads and the statistics server.
#[derive(Debug)]
pub struct HaShared {
    role: AtomicU8,
    /// Per data-path thread: monotonic milliseconds of its last loop.
    kicks: Vec<AtomicU64>,
    first_forward_armed: AtomicBool,
    first_forward_unix_ms: AtomicU64,
    status: Mutex<HaStatus>,
    /// SIGTERM in active-active mode: withdraw, keep forwarding until told to stop.
    draining: AtomicBool,
}

impl HaShared {
    /// Shared state for `queues` data-path threads.
    pub fn new(queues: usize) -> HaShared {
        HaShared {
            role: AtomicU8::new(role::INIT),
            kicks: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            first_forward_armed: AtomicBool::new(false),
            first_forward_unix_ms: AtomicU64::new(0),
            status: Mutex::new(HaStatus::default()),
            draining: AtomicBool::new(false),
        }
    }

    /// Starts a graceful exit (active-active): the node withdraws its announcement and stops
    /// serving new work, and keeps forwarding until the runtime stops it.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The current role ([`role`]).
    pub fn role(&self) -> u8 {
        self.role.load(Ordering::Relaxed)
    }

    /// Data-path thread `queue` ran at `ms` (monotonic milliseconds).
    #[inline]
    pub fn kick(&self, queue: usize, ms: u64) {
        if let Some(k) = self.kicks.get(queue) {
            k.store(ms, Ordering::Relaxed);
        }
    }

    /// A data-path thread forwarded a packet: the first one after a takeover is timed.
    #[inline]
    pub fn forwarded(&self) {
        if self.first_forward_armed.load(Ordering::Relaxed)
            && self.first_forward_armed.swap(false, Ordering::AcqRel)
        {
            self.first_forward_unix_ms
                .store(unix_ms(), Ordering::Relaxed);
        }
    }

    /// The oldest kick of the data-path threads.
    fn oldest_kick(&self) -> u64 {
        self.kicks
            .iter()
            .map(|k| k.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// The `ha` object of the JSON statistics.
    pub fn json(&self) -> serde_json::Value {
        let s = self.status.lock().clone();
        let c = &s.counters;
        let ff = self.first_forward_unix_ms.load(Ordering::Relaxed);
        serde_json::json!({
            "role": role::name(self.role()),
            "node_id": s.node_id,
            "priority": s.priority,
            "peer_seen_ms_ago": s.peer_seen_ms_ago,
            "synced": s.synced,
            "takeover_unix_ms": s.takeover_unix_ms,
            "first_forward_unix_ms": (ff > 0).then_some(ff),
            "transitions": c.transitions,
            "last_reason": s.last_reason,
            "mode": s.mode,
            "held": s.held,
            "announced": s.announced,
            "heartbeats": c.heartbeats,
            "drops": {
                "auth": c.auth_failures, "replay": c.replays, "malformed": c.malformed,
                "sync_unfresh": c.unfresh,
                "send_errors": c.send_errors,
            },
            "sync": {
                "sent": c.sent, "datagrams_sent": c.datagrams_sent, "bytes_sent": c.bytes_sent,
                "received": c.received, "installed": c.installed, "refused": c.refused,
                "gaps": c.gaps, "resyncs": c.resyncs, "bulk_sent": c.bulk_sent,
                "bulk_received": c.bulk_received, "lost": c.lost, "lag_records": c.lag_records,
                "lag_records_max": c.lag_records_max,
                "busy": c.busy,
            },
        })
    }

    /// The same as Prometheus text.
    pub fn prometheus(&self) -> String {
        let s = self.status.lock().clone();
        let c = &s.counters;
        let mut o = String::new();
        let r = self.role();
        o.push_str(
            "# HELP lb_ha_role The node's role (1 for the current one).\n# TYPE lb_ha_role gauge\n",
        );
        for x in [
            role::INIT,
            role::BACKUP,
            role::MASTER,
            role::FAULT,
            role::ACTIVE,
            role::DRAINING,
        ] {
            o.push_str(&format!(
                "lb_ha_role{{role=\"{}\"}} {}\n",
                role::name(x),
                u8::from(x == r)
            ));
        }
        o.push_str(&format!(
            "# HELP lb_ha_priority Election priority.\n# TYPE lb_ha_priority gauge\nlb_ha_priority {}\n",
            s.priority
        ));
        if let Some(ms) = s.peer_seen_ms_ago {
            o.push_str(&format!(
                "# HELP lb_ha_peer_seen_ms_ago Since the peer was last heard.\n# TYPE lb_ha_peer_seen_ms_ago gauge\nlb_ha_peer_seen_ms_ago {ms}\n"
            ));
        }
        for (name, help, v) in [
            ("sync_sent", "Sync records sent.", c.sent),
            ("sync_received", "Sync records received.", c.received),
            (
                "sync_installed",
                "Sync records installed or refreshed.",
                c.installed,
            ),
            (
                "sync_refused",
                "Sync records the tables refused.",
                c.refused,
            ),
            ("sync_gaps", "Gaps in the peer's sync sequence.", c.gaps),
            ("sync_resyncs", "Bulk syncs asked for.", c.resyncs),
            ("sync_lost", "Changes the sync log could not hold.", c.lost),
            (
                "auth_failures",
                "Messages with a wrong MAC.",
                c.auth_failures,
            ),
            ("replays", "Replayed or stale messages.", c.replays),
            (
                "sync_unfresh",
                "Sync first contacts without our challenge (refused).",
                c.unfresh,
            ),
            ("malformed", "Malformed messages.", c.malformed),
            ("transitions", "Role changes.", c.transitions),
        ] {
            o.push_str(&format!(
                "# HELP lb_ha_{name}_total {help}\n# TYPE lb_ha_{name}_total counter\nlb_ha_{name}_total {v}\n"
            ));
        }
        o.push_str(&format!(
            "# HELP lb_ha_sync_lag_records Changes waiting to be sent.\n# TYPE lb_ha_sync_lag_records gauge\nlb_ha_sync_lag_records {}\n",
            c.lag_records
        ));
        o
    }
}

/// Wall-clock milliseconds since the Unix epoch (for the takeover-gap measurement only).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The HA thread's state.
struct Ha<'a> {
    cfg: &'a HaConfig,
    dp: &'a Mutex<Dataplane>,
    sh: &'a HaShared,
    epoch: StdInstant,
    sock: UdpSocket,
    hb: HeartbeatNode,
    el: Election,
    /// One sync stream per configured peer (`cfg.peers` order): each peer sees its own
    /// sequence numbers, so a bulk dump or a resync request sent to one peer is no gap for the
    /// others.
    tx: Vec<SyncSender>,
    rx: SyncReceiver,
    watchdog: Watchdog,
    announcer: Announcer,
    /// Where each peer's messages come from.
    peer_addr: HashMap<NodeId, SocketAddr>,
    /// Peers declared dead (a later message from one is a healing).
    dead: HashSet<NodeId>,
    last_heard: Option<Instant>,
    role: u8,
    synced: bool,
    /// The bulk dump in progress to each peer (`cfg.peers` order): where it goes on.
    dumps: Vec<Option<SyncCursor>>,
    refresh: Option<(SyncCursor, Instant)>,
    next_refresh: Instant,
    last_pass: Instant,
    last_resync_request: HashMap<SocketAddr, Instant>,
    reannounce: VecDeque<Instant>,
    last_loop: Instant,
    lost_seen: u64,
    counters: HaCounters,
    takeover_unix_ms: Option<u64>,
    reason: String,
    /// Why the election's next `Release` happens, when this node resigns by itself.
    release_reason: Option<String>,
    /// Active-active: the floating addresses held now (indices into `cfg.addresses`).
    held: Vec<bool>,
    /// Active-active: peers whose bulk dump this node received since it (re)started.
    bulk_from: HashSet<SocketAddr>,
    /// Active-active: when the node started waiting for its peers' dumps.
    joined_at: Instant,
    /// The BGP speaker's control connection, and whether it announces.
    bird: Option<crate::bgp::Bird>,
    announced: Option<bool>,
    last_bgp_attempt: Option<Instant>,
    seen: HashSet<lb_dataplane::SyncChange>,
    records: Vec<SyncRecord>,
    templates: Vec<TemplateRecord>,
    out: Vec<Vec<u8>>,
}

/// Monotonic milliseconds since `epoch` (the data-path threads' kicks).
pub fn mono_ms(epoch: StdInstant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn now(epoch: StdInstant) -> Instant {
    Instant::from_nanos(u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// Runs the HA thread until `stop`; on the way out a master hands over (a priority-0 advert)
/// and every floating address is removed.
///
/// # Errors
/// The socket cannot be bound, or the lb-health state machines reject the configuration.
pub fn run(
    cfg: &HaConfig,
    dp: &Mutex<Dataplane>,
    sh: &HaShared,
    stop: &AtomicBool,
    epoch: StdInstant,
) -> Result<(), String> {
    let mut ha = Ha::new(cfg, dp, sh, epoch)?;
    while !stop.load(Ordering::Acquire) {
        ha.step();
    }
    ha.shutdown();
    Ok(())
}

impl<'a> Ha<'a> {
    fn new(
        cfg: &'a HaConfig,
        dp: &'a Mutex<Dataplane>,
        sh: &'a HaShared,
        epoch: StdInstant,
    ) -> Result<Ha<'a>, String> {
        let sock = UdpSocket::bind(cfg.bind)
            .map_err(|e| format!("ha.bind {}: cannot bind: {e}", cfg.bind))?;
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        if let Err(e) = crate::sys::set_buffer(&sock, crate::sys::SocketBuffer::Receive, RCVBUF) {
            tracing::warn!("ha: cannot enlarge the receive buffer: {e}");
        }
        let t = now(epoch);
        // A new generation (heartbeat) and epoch (sync) at every start: tenths of a second
        // since 2026, so a restart within the same second is still newer.
        let gen = unix_ms().saturating_sub(1_767_225_600_000) / 100;
        let interval = cfg.advert_interval;
        let el_cfg = ElectionConfig {
            id: NodeId(u32::from(cfg.node_id)),
            priority: cfg.priority,
            // Until this node's bulk sync completed.
            preempt: false,
            advert_interval: interval,
        };
        let el = Election::new(el_cfg, t).map_err(|e| format!("ha: {e}"))?;
        let detector = if cfg.phi {
            DetectorConfig::Phi(PhiConfig {
                first_heartbeat_estimate: interval,
                min_std_dev: interval / 2,
                ..PhiConfig::default()
            })
        } else {
            // Three silent intervals make the master dead; the election then waits its skew
            // time (a priority-0 advert): VRRP's master-down interval, counted from the last
            // heartbeat.
            DetectorConfig::Timeout(interval * 3)
        };
        let node = NodeConfig {
            id: NodeId(u32::from(cfg.node_id)),
            generation: gen,
            interval,
            detector,
        };
        let mut hb = HeartbeatNode::new(node, cfg.auth_key.derive("heartbeat-mac"), t)
            .map_err(|e| format!("ha: {e}"))?;
        hb.set_status(Role::Backup, cfg.priority, 0);
        let tx = cfg
            .peers
            .iter()
            .map(|_| {
                SyncSender::new(
                    u32::from(cfg.node_id),
                    u32::try_from(gen).unwrap_or(u32::MAX),
                    cfg.auth_key.derive("sync-mac"),
                    cfg.sync_mtu,
                )
                .map_err(|e| format!("ha.sync_mtu: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The challenge a peer's stream must echo before this node accepts it: new at every
        // start, so nothing captured before it can be replayed at it.
        let nonce = getrandom::u64().map_err(|e| format!("ha: the OS RNG: {e}"))?;
        let rx = SyncReceiver::new(cfg.auth_key.derive("sync-mac"), nonce);
        let watchdog = Watchdog::new(cfg.watchdog, t).map_err(|e| format!("ha: {e}"))?;
        let mut ha = Ha {
            cfg,
            dp,
            sh,
            epoch,
            sock,
            hb,
            el,
            tx,
            rx,
            watchdog,
            announcer: Announcer::new(),
            peer_addr: HashMap::new(),
            dead: HashSet::new(),
            last_heard: None,
            role: role::BACKUP,
            synced: false,
            dumps: vec![None; cfg.peers.len()],
            refresh: None,
            next_refresh: t + cfg.refresh,
            last_pass: t,
            last_resync_request: HashMap::new(),
            reannounce: VecDeque::new(),
            last_loop: t,
            lost_seen: 0,
            counters: HaCounters::default(),
            takeover_unix_ms: None,
            reason: "started".into(),
            release_reason: None,
            held: vec![false; cfg.addresses.len()],
            bulk_from: HashSet::new(),
            joined_at: t,
            bird: None,
            announced: None,
            last_bgp_attempt: None,
            seen: HashSet::new(),
            records: Vec::new(),
            templates: Vec::new(),
            out: Vec::new(),
        };
        // A crashed predecessor may have left the floating addresses behind: a node starts
        // as backup, without them.
        for a in &cfg.addresses {
            match netlink::del_addr(&a.dev, a.addr, a.prefix) {
                Ok(true) => {
                    tracing::warn!(dev = %a.dev, addr = %a.addr, "removed a floating address left from before")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(dev = %a.dev, addr = %a.addr, "cannot remove floating address: {e}")
                }
            }
        }
        if cfg.mode == HaMode::ActiveActive {
            ha.hb.set_status(Role::Backup, cfg.priority, 0);
            ha.set_role(
                role::BACKUP,
                "started: joining (bulk sync from the peers first)",
            );
        } else {
            ha.set_role(role::BACKUP, "started");
        }
        tracing::info!(
            node = cfg.node_id,
            priority = cfg.priority,
            bind = %cfg.bind,
            "ha: started as backup (takes over after {} ms without a master)",
            ha.el.master_down_interval().as_millis()
        );
        Ok(ha)
    }

    fn now(&self) -> Instant {
        now(self.epoch)
    }

    /// One turn: wait for datagrams (at most a tick), then run every state machine.
    fn step(&mut self) {
        self.wait(TICK);
        let t = self.now();
        // Frozen (SIGSTOP, a paused VM, starved of CPU) for longer than a backup waits before
        // taking over: the peer may hold the addresses now. Step down before saying anything.
        let frozen = t - self.last_loop;
        let limit = self
            .el
            .master_down_interval()
            .max(Duration::from_millis(300));
        if frozen > limit && self.aa() {
            // Peers took this node's addresses while it was frozen: join again.
            self.aa_rejoin(t, frozen);
        } else if frozen > limit {
            if self.role == role::MASTER {
                self.step_down(
                    t,
                    &format!(
                        "this process did not run for {} ms (stopped or starved): stepping down",
                        frozen.as_millis()
                    ),
                );
            }
            // The peer's messages of that time are lost: resync before preempting again.
            if self.role != role::MASTER {
                self.synced = false;
                self.el.set_preempt(false);
            }
        }
        self.receive(t);
        self.membership(t);
        if self.aa() {
            self.aa_watchdog(t);
            self.aa_roles(t);
            self.aa_addresses(t);
            self.aa_bgp(t);
        } else {
            self.data_path_watchdog(t);
            self.run_election_actions(t);
        }
        self.heartbeats(t);
        self.announce_due(t);
        self.sync_out(t);
        self.publish(t);
        self.last_loop = self.now();
    }

    /// Waits until the socket is readable or `max` passed.
    #[allow(unsafe_code)]
    fn wait(&self, max: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(max.as_millis().max(1)).unwrap_or(1);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut pfd, 1, ms);
        }
    }

    fn send(&mut self, bytes: &[u8], to: SocketAddr) {
        if self.sock.send_to(bytes, to).is_err() {
            self.counters.send_errors += 1;
        }
    }

    /// The index (`cfg.peers` order) of the configured peer whose messages come from `a`: the
    /// one at `a`, else the one at `a`'s address (a peer bound to a wildcard address sends
    /// from an address of its own choosing, and maybe another port), else the only one.
    fn peer_index(&self, a: SocketAddr) -> Option<usize> {
        let peers = &self.cfg.peers;
        peers
            .iter()
            .position(|p| *p == a)
            .or_else(|| peers.iter().position(|p| p.ip() == a.ip()))
            .or_else(|| (peers.len() == 1).then_some(0))
    }

    fn send_all(&mut self, bytes: &[u8]) {
        for i in 0..self.cfg.peers.len() {
            if let Some(p) = self.cfg.peers.get(i).copied() {
                self.send(bytes, p);
            }
        }
    }

    fn receive(&mut self, t: Instant) {
        let mut buf = [0u8; 65_536];
        for _ in 0..4096 {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(_) => break,
            };
            let Some(bytes) = buf.get(..n) else { break };
            match bytes.get(..2) {
                Some(b"LH") => self.on_heartbeat(bytes, from, t),
                Some(b"LC") => {
                    let bytes = bytes.to_vec();
                    self.on_sync(&bytes, from, t);
                }
                _ => self.counters.malformed += 1,
            }
        }
    }

    fn on_heartbeat(&mut self, bytes: &[u8], from: SocketAddr, t: Instant) {
        match self.hb.handle(bytes, t) {
            Ok(Handled::Status(node)) => {
                self.counters.heartbeats += 1;
                self.peer_addr.insert(node, from);
                self.last_heard = Some(t);
                let Some(p) = self.hb.peer(node) else { return };
                if self.aa() {
                    if !self.bulk_from.contains(&from) {
                        self.request_resync(from, t);
                    }
                    return;
                }
                if p.role == Role::Master {
                    if self.role == role::MASTER
                        && (p.priority, node.0) < (self.el.priority(), u32::from(self.cfg.node_id))
                        && p.priority > 0
                    {
                        // Another master that will yield to us: neighbours may still point
                        // at it (a split brain healing): announce again.
                        self.schedule_announcements(t);
                    }
                    self.el.handle_advert(node, p.priority, t);
                    if !self.synced && self.role != role::MASTER {
                        self.request_resync(from, t);
                    }
                }
            }
            Ok(Handled::GapFilled(node) | Handled::Retransmit(node) | Handled::Leave(node)) => {
                self.peer_addr.insert(node, from);
            }
            Err(HealthError::BadMac) => self.counters.auth_failures += 1,
            Err(HealthError::Replay { .. }) => self.counters.replays += 1,
            Err(HealthError::FromSelf) => {}
            Err(_) => self.counters.malformed += 1,
        }
    }

    fn on_sync(&mut self, bytes: &[u8], from: SocketAddr, t: Instant) {
        // Our own messages coming back (a reflection, a replay): never a peer's. Checked on
        // the header's sender id before the receiver records a new peer for it.
        if bytes.get(5..9) == Some(&u32::from(self.cfg.node_id).to_be_bytes()[..]) {
            return;
        }
        let r = match self.rx.receive(bytes) {
            Ok(r) => r,
            Err(SyncError::BadMac) => {
                self.counters.auth_failures += 1;
                return;
            }
            Err(SyncError::Replayed { .. } | SyncError::StaleEpoch { .. }) => {
                self.counters.replays += 1;
                return;
            }
            Err(SyncError::Unfresh { sender, .. }) => {
                // Captured before we started, or the peer does not have our challenge yet:
                // ask (at most once a second), with the challenge, for a dump it will echo it
                // in. Only a peer heard at that address counts: a replay of some other node's
                // old datagram must not mark this node unsynced.
                self.counters.unfresh += 1;
                let peer = self.peer_addr.get(&NodeId(sender)) == Some(&from);
                if peer && (self.role != role::MASTER || self.aa()) {
                    if !self.aa() {
                        self.synced = false;
                    }
                    self.bulk_from.remove(&from);
                    self.request_resync(from, t);
                }
                return;
            }
            Err(_) => {
                self.counters.malformed += 1;
                return;
            }
        };
        let h = r.message.header;
        if h.kind == MessageKind::ResyncRequest {
            // A dump goes on the asking peer's own stream; one from an address that is not a
            // configured peer (authenticated, so a misconfigured peer) gets nothing.
            match self.peer_index(from) {
                Some(i) => {
                    tracing::info!(peer = %from, "ha: peer asked for a bulk sync");
                    // Its stream echoes the request's challenge from now on.
                    if let Some(tx) = self.tx.get_mut(i) {
                        tx.set_echo(h.challenge);
                    }
                    if let Some(d) = self.dumps.get_mut(i) {
                        *d = Some(SyncCursor::START);
                    }
                }
                None => {
                    tracing::warn!(peer = %from, "ha: bulk sync asked from an unknown address");
                    self.counters.malformed += 1;
                }
            }
            return;
        }
        if let Some(g) = r.gap {
            self.counters.gaps += 1;
            tracing::debug!(peer = %from, missing = g, "ha: sync gap");
        }
        let n =
            (r.message.records.len() + r.message.templates.len() + r.message.splices.len()) as u64;
        self.counters.received += n;
        if n > 0 {
            // Active-active: the last writer wins (a flow's owner is the node its packets reach).
            let merge = self.role == role::MASTER && !self.aa();
            match self.lock_dp(Duration::from_millis(20)) {
                Some(mut dp) => {
                    let a = dp.apply_sync(&r.message, t, merge);
                    self.counters.installed +=
                        a.installed + a.updated + a.templates + a.deleted + a.splices;
                    self.counters.refused += a.refused;
                }
                // The data path held the lock for 20 ms (stuck): these records are lost here;
                // a bulk sync repairs it.
                None => {
                    self.counters.busy += n;
                    if self.role != role::MASTER || self.aa() {
                        self.synced = false;
                        self.request_resync(from, t);
                    }
                }
            }
        }
        if r.needs_resync() && (self.role != role::MASTER || self.aa()) {
            if !self.aa() {
                self.synced = false;
            }
            self.bulk_from.remove(&from);
            self.request_resync(from, t);
        }
        if h.flags & FLAG_BULK_END != 0 && self.aa() {
            if self.bulk_from.insert(from) {
                self.counters.bulk_received += 1;
                tracing::info!(peer = %from, "ha: bulk sync from a peer complete");
            }
        } else if h.flags & FLAG_BULK_END != 0 && !self.synced {
            self.synced = true;
            self.counters.bulk_received += 1;
            self.el.set_preempt(self.cfg.preempt);
            tracing::info!(peer = %from, "ha: bulk sync complete");
        }
    }

    /// The data path's lock, waiting at most `max` for it (a data path that holds it longer
    /// is stuck: the HA thread must go on with heartbeats and the watchdog).
    fn lock_dp(&self, max: Duration) -> Option<parking_lot::MutexGuard<'a, Dataplane>> {
        self.dp.try_lock_for(max)
    }

    /// Asks `to` for a bulk dump, at most once a second.
    fn request_resync(&mut self, to: SocketAddr, t: Instant) {
        if self
            .last_resync_request
            .get(&to)
            .is_some_and(|l| t - *l < Duration::from_secs(1))
        {
            return;
        }
        let Some(i) = self.peer_index(to) else {
            return;
        };
        self.last_resync_request.insert(to, t);
        self.counters.resyncs += 1;
        if let Some(tx) = self.tx.get_mut(i) {
            let m = tx.resync_request(self.rx.nonce());
            self.send(&m, to);
        }
    }

    fn membership(&mut self, t: Instant) {
        while let Some(e) = self.hb.poll_event(t) {
            match e {
                MembershipEvent::Dead { node } => {
                    self.dead.insert(node);
                    tracing::warn!(peer = node.0, "ha: peer silent (failure detector)");
                    if !self.aa() && self.el.master() == Some(node) && self.role != role::MASTER {
                        // As VRRP's priority-0 advert: take over after the skew time only.
                        self.el.handle_advert(node, 0, t);
                    }
                }
                MembershipEvent::Left { node } => {
                    tracing::info!(peer = node.0, "ha: peer left");
                }
                MembershipEvent::Joined { node, .. } | MembershipEvent::Restarted { node, .. } => {
                    let healed = self.dead.remove(&node);
                    tracing::info!(peer = node.0, healed, "ha: peer heard");
                    if self.aa() {
                        if let Some(a) = self.peer_addr.get(&node).copied() {
                            self.bulk_from.remove(&a);
                        }
                    } else if healed && self.role == role::MASTER {
                        // Flows the peer opened while we could not hear it: merge them.
                        if let Some(a) = self.peer_addr.get(&node).copied() {
                            self.last_resync_request.remove(&a);
                            self.request_resync(a, t);
                        }
                    }
                }
            }
        }
    }

    fn data_path_watchdog(&mut self, t: Instant) {
        let kick = self.sh.oldest_kick();
        self.watchdog.kick(Instant::from_millis(kick).min(t));
        match self.watchdog.poll(t) {
            Some(WatchdogEvent::Expired { .. }) if self.role == role::MASTER => {
                // A priority-0 advert (the backup takes over after its skew time), the
                // addresses removed, and no election until the data path runs again.
                self.release_reason = Some("the data path stalled (watchdog)".into());
                self.el.shutdown();
                self.run_election_actions(t);
                if self.role == role::MASTER {
                    self.become_backup("the data path stalled (watchdog)");
                }
                self.hb.set_status(Role::Init, self.el.priority(), 0);
                self.set_role(role::FAULT, "the data path stalled (watchdog)");
            }
            Some(WatchdogEvent::Recovered) if self.role == role::FAULT => {
                self.el.restart(t);
                self.hb.set_status(Role::Backup, self.el.priority(), 0);
                self.set_role(role::BACKUP, "the data path runs again");
            }
            _ => {}
        }
    }

    /// Steps down at once: a priority-0 advert, then backup, back in the election.
    fn step_down(&mut self, t: Instant, why: &str) {
        self.release_reason = Some(why.to_owned());
        self.el.shutdown();
        self.run_election_actions(t);
        if self.role == role::MASTER {
            self.become_backup(why);
        }
        self.el.restart(t);
    }

    fn run_election_actions(&mut self, t: Instant) {
        while let Some(a) = self.el.poll(t) {
            match a {
                ElectionAction::SendAdvert { priority } => {
                    self.hb.set_status(Role::Master, priority, 0);
                    self.hb.send_now(t);
                    // Sent now, with this priority (a priority-0 advert must leave before the
                    // status changes again).
                    self.heartbeats(t);
                    if priority == 0 {
                        // Resigned: later statuses say backup.
                        self.hb.set_status(Role::Backup, self.el.priority(), 0);
                    }
                }
                ElectionAction::TakeOver => {
                    let why = self.takeover_reason(t);
                    self.become_master(t, &why);
                }
                ElectionAction::Release => {
                    let why = self
                        .release_reason
                        .take()
                        .unwrap_or_else(|| "a higher-priority master was heard".into());
                    if self.role == role::MASTER {
                        self.become_backup(&why);
                    }
                }
            }
        }
    }

    fn takeover_reason(&self, t: Instant) -> String {
        match self.last_heard {
            None => "no master heard since start".into(),
            Some(h) if self.el.master().is_some_and(|m| self.dead.contains(&m)) => {
                format!("master silent for {} ms", (t - h).as_millis())
            }
            Some(_) if self.cfg.preempt => "preempting a lower-priority master".into(),
            Some(h) => format!("no advert for {} ms", (t - h).as_millis()),
        }
    }

    fn become_master(&mut self, t: Instant, why: &str) {
        // Install before announcing: every synced flow is already in the table.
        self.synced = true;
        self.hb.set_status(Role::Master, self.el.priority(), 0);
        self.sh.first_forward_armed.store(true, Ordering::Release);
        self.takeover_unix_ms = Some(unix_ms());
        for a in self.cfg.addresses.clone() {
            if let Err(e) = netlink::add_addr(&a.dev, a.addr, a.prefix) {
                tracing::error!(dev = %a.dev, addr = %a.addr, "ha: cannot add floating address: {e}");
            }
        }
        self.announce_all();
        self.reannounce = REANNOUNCE.iter().map(|d| t + *d).collect();
        self.set_role(role::MASTER, why);
        // Anything logged while backup belongs to no one; the peer needs our flows from now.
        self.refresh = None;
        self.next_refresh = t + self.cfg.refresh;
        self.last_pass = t;
    }

    fn become_backup(&mut self, why: &str) {
        self.hb.set_status(Role::Backup, self.el.priority(), 0);
        self.sh.first_forward_armed.store(false, Ordering::Release);
        self.reannounce.clear();
        for a in &self.cfg.addresses {
            if let Err(e) = netlink::del_addr(&a.dev, a.addr, a.prefix) {
                tracing::error!(dev = %a.dev, addr = %a.addr, "ha: cannot remove floating address: {e}");
            }
        }
        self.set_role(role::BACKUP, why);
    }

    fn set_role(&mut self, r: u8, why: &str) {
        if self.role != r || self.counters.transitions == 0 {
            if self.role != r {
                self.counters.transitions += 1;
                tracing::warn!(
                    from = role::name(self.role),
                    to = role::name(r),
                    reason = why,
                    "ha: role change"
                );
            }
            self.reason = why.to_owned();
        }
        self.role = r;
        self.sh.role.store(r, Ordering::Release);
    }

    fn schedule_announcements(&mut self, t: Instant) {
        if self.reannounce.is_empty() {
            self.announce_all();
            self.reannounce = REANNOUNCE.iter().map(|d| t + *d).collect();
        }
    }

    fn announce_all(&mut self) {
        for FloatingAddr { dev, addr, .. } in &self.cfg.addresses {
            if let Err(e) = self.announcer.announce(dev, *addr) {
                tracing::warn!(dev = %dev, addr = %addr, "ha: announcement failed: {e}");
            }
        }
    }

    fn announce_due(&mut self, t: Instant) {
        if self.aa() {
            self.aa_announce_due(t);
            return;
        }
        if self.role != role::MASTER {
            self.reannounce.clear();
            return;
        }
        let mut due = false;
        while self.reannounce.front().is_some_and(|d| *d <= t) {
            self.reannounce.pop_front();
            due = true;
        }
        if due {
            self.announce_all();
        }
    }

    fn heartbeats(&mut self, t: Instant) {
        while let Some(tx) = self.hb.poll_transmit(t) {
            let bytes = tx.bytes().to_vec();
            match tx.to {
                Destination::Node(n) => match self.peer_addr.get(&n).copied() {
                    Some(a) => self.send(&bytes, a),
                    None => self.send_all(&bytes),
                },
                _ => self.send_all(&bytes),
            }
        }
    }

    /// Drains the data path's sync log; as master sends it, plus any bulk dump or refresh
    /// pass in progress.
    fn sync_out(&mut self, t: Instant) {
        self.records.clear();
        self.templates.clear();
        let mut refresh_records = Vec::new();
        let mut refresh_templates = Vec::new();
        // Spliced connections: what changed, and the refresh pass's (sent when it starts).
        let mut splices = Vec::new();
        // Each peer's dump chunk of this tick: (peer, records, templates, splices, whether
        // it ended); a dump's spliced connections go with its first chunk.
        let mut dump_chunks = Vec::new();
        // Who streams its flows: the master of a pair; every node of an active-active group
        // but a faulty one.
        let master = self.role == role::MASTER || (self.aa() && self.role != role::FAULT);
        if master && self.refresh.is_none() && t >= self.next_refresh {
            // Flows that saw a packet since the last pass started have new deadlines.
            self.refresh = Some((SyncCursor::START, self.last_pass));
            self.last_pass = t;
            self.next_refresh = t + self.cfg.refresh;
        }
        let lost;
        {
            // Never wait for the data path: a data-path thread stuck while holding the lock
            // must not stop the heartbeats or the watchdog that will make this node resign.
            let Some(mut dp) = self.lock_dp(Duration::from_millis(2)) else {
                return;
            };
            // What waited for this tick: the lag of the backup behind the data path, in changes.
            self.counters.lag_records = dp.sync_pending() as u64;
            self.counters.lag_records_max =
                self.counters.lag_records_max.max(self.counters.lag_records);
            dp.sync_drain(
                t,
                DRAIN_MAX,
                &mut self.seen,
                &mut self.records,
                &mut self.templates,
            );
            dp.splice_sync_drain(t, &mut splices);
            lost = dp.stats().sync_lost + dp.splice_stats().sync_lost;
            if master {
                if let Some((c, since)) = self.refresh {
                    if c == SyncCursor::START {
                        dp.splice_sync_export(Some(since), t, &mut splices);
                    }
                    let next = dp.sync_export(
                        c,
                        EXPORT_CHUNK,
                        Some(since),
                        t,
                        &mut refresh_records,
                        &mut refresh_templates,
                    );
                    self.refresh = next.map(|n| (n, since));
                }
            }
            for (i, d) in self.dumps.iter_mut().enumerate() {
                let Some(cursor) = *d else { continue };
                let (mut records, mut templates, mut spl) = (Vec::new(), Vec::new(), Vec::new());
                if cursor == SyncCursor::START {
                    dp.splice_sync_export(None, t, &mut spl);
                }
                *d = dp.sync_export(cursor, EXPORT_CHUNK, None, t, &mut records, &mut templates);
                dump_chunks.push((i, records, templates, spl, d.is_none()));
            }
        }
        if lost > self.lost_seen {
            self.counters.lost += lost - self.lost_seen;
            self.lost_seen = lost;
            if master {
                // The peers missed changes: send them everything.
                for d in self.dumps.iter_mut().filter(|d| d.is_none()) {
                    *d = Some(SyncCursor::START);
                }
            }
        }
        if !master {
            // A backup's own changes (flows it forwarded during a split, or none) are not
            // streamed; a master that heals asks for them with a bulk request.
            self.records.clear();
            self.templates.clear();
            splices.clear();
        }
        let records = std::mem::take(&mut self.records);
        let templates = std::mem::take(&mut self.templates);
        self.counters.sent += (records.len()
            + templates.len()
            + refresh_records.len()
            + refresh_templates.len()
            + splices.len()) as u64;
        // The same records to every peer, each on its own stream (sequence and MAC per peer).
        for i in 0..self.cfg.peers.len() {
            let Some(tx) = self.tx.get_mut(i) else {
                continue;
            };
            self.out.clear();
            tx.encode_items(&records, &templates, 0, &mut self.out);
            tx.encode_items(&refresh_records, &refresh_templates, 0, &mut self.out);
            tx.encode_splices(&splices, 0, &mut self.out);
            self.send_out(i);
        }
        self.records = records;
        self.templates = templates;
        // Each dump goes to the peer that asked (or, after a loss, to each peer) on its stream.
        for (i, records, templates, spl, ended) in dump_chunks {
            let Some(tx) = self.tx.get_mut(i) else {
                continue;
            };
            self.out.clear();
            tx.encode_items(&records, &templates, FLAG_BULK, &mut self.out);
            tx.encode_splices(&spl, FLAG_BULK, &mut self.out);
            if ended {
                self.out.push(tx.bulk_end());
                self.counters.bulk_sent += 1;
                tracing::info!(peer = ?self.cfg.peers.get(i), "ha: bulk sync sent");
            }
            self.counters.sent += (records.len() + templates.len() + spl.len()) as u64;
            self.send_out(i);
        }
    }

    /// Sends the encoded messages in `self.out` to peer `i`, counted as sync traffic.
    fn send_out(&mut self, i: usize) {
        let Some(to) = self.cfg.peers.get(i).copied() else {
            return;
        };
        let out = std::mem::take(&mut self.out);
        for m in &out {
            self.counters.datagrams_sent += 1;
            self.counters.bytes_sent += m.len() as u64;
            self.send(m, to);
        }
        self.out = out;
    }

    fn publish(&mut self, t: Instant) {
        {
            let mut s = self.sh.status.lock();
            s.node_id = self.cfg.node_id;
            s.priority = self.el.priority();
            s.peer_seen_ms_ago = self
                .last_heard
                .map(|h| u64::try_from((t - h).as_millis()).unwrap_or(u64::MAX));
            s.synced = self.synced;
            s.counters = self.counters.clone();
            s.takeover_unix_ms = self.takeover_unix_ms;
            s.last_reason.clone_from(&self.reason);
            s.mode = if self.aa() {
                "active-active"
            } else {
                "active-backup"
            };
            s.held = self
                .cfg
                .addresses
                .iter()
                .zip(&self.held)
                .filter(|(_, h)| **h)
                .map(|(a, _)| format!("{}/{}", a.addr, a.prefix))
                .collect();
            s.announced = self.announced;
        }
    }

    /// A graceful exit: a master hands over at once (priority 0), every node says goodbye
    /// and removes the floating addresses.
    fn shutdown(&mut self) {
        let t = self.now();
        if self.aa() {
            self.aa_withdraw("shutting down");
        }
        self.el.shutdown();
        self.run_election_actions(t);
        if self.role == role::MASTER {
            self.become_backup("shutting down");
        }
        let leave = self.hb.leave();
        let bytes = leave.bytes().to_vec();
        self.send_all(&bytes);
        for a in &self.cfg.addresses {
            let _ = netlink::del_addr(&a.dev, a.addr, a.prefix);
        }
    }
}

#[path = "ha_active.rs"]
mod active;
