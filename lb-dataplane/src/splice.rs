//! Layer-5 switching of TCP by delayed binding and TCP splicing (services with
//! [`ServiceSpec::splice`](crate::ServiceSpec::splice), config `mode = "splice"`).
//!
//! ```text
//! client                  balancer                                backend
//!   SYN (c)   ─────────▶  cookie ISN lc, no state
//!             ◀─────────  SYN-ACK (lc, ack c+1)
//!   ACK       ─────────▶  cookie checked: slot allocated
//!   data…     ─────────▶  head buffered (ACKed while incomplete)
//!                         head complete: backend chosen
//!                         SYN (seq c, client's options) ──────▶
//!                                      ◀────────────────────── SYN-ACK (s, ack c+1)
//!                         ACK + held head (seq c+1)    ──────▶
//!   then every segment: addresses NATed, client→backend ack += s−lc (and SACK, TSecr;
//!   TSval moved onto the balancer's clock), backend→client seq += lc−s (and TSval into our
//!   clock, TSecr back to the client's, window rescaled to the client's scale).
//! ```
//!
//! - **No state before the ACK**: the SYN-ACK's ISN is a SYN cookie
//!   ([`lb_packet::syncookie`]); a SYN flood costs one hash and one reply per SYN.
//! - **The backend sees the client's sequence space**: the balancer's SYN to it carries the
//!   client's ISN, so client → backend sequence numbers are never rewritten; only
//!   acknowledgements (and SACK blocks, and TSecr) are.
//! - **Options** towards the backend are exactly the client's (MSS rounded down to the
//!   cookie's table, window scale, SACK permitted, timestamps), so the backend never uses one
//!   the client did not offer. The backend connection's TSvals run on the balancer's
//!   millisecond clock ([`crate::DataplaneOptions::clock_base_ms`] + now), not the client's
//!   (which starts at a random offset per connection): a backend accepts a SYN on a 4-tuple it
//!   holds in TIME_WAIT only with a newer TSval (PAWS). Towards the client the balancer offers its own MSS,
//!   window scale [`OUR_WSCALE`], SACK and timestamps, each only if the client offered it; the
//!   backend's window is rescaled from its scale to ours, its TSval moved into our clock.
//!   Window scale and SACK survive the cookie only with timestamps (as in Linux).
//! - **One slot per connection**, from a pool fixed at start
//!   ([`DataplaneSpec::splice_capacity`](crate::DataplaneSpec::splice_capacity)); a slot
//!   owns up to 8 SNAT ports (`port = base + round × capacity + slot`, the next round each
//!   time the slot is reused, free slots reused oldest first), so a backend's packet finds its
//!   slot by destination port without a lookup, and a 4-tuple a backend may still hold in
//!   TIME_WAIT does not come back soon. Held heads live in the slot's fixed buffer. A slot
//!   lingers 2 s after both FINs or an RST; when none is free a closing one is reclaimed
//!   (never a live one), and a bare SYN on a closing slot's 4-tuple opens a new connection.
//! - **Offloads**: GSO super-packets and partial checksums are translated whole once spliced
//!   (the checksum field left to the device); before that the splice answers
//!   [`Verdict::Segment`] and reads plain packets.
//! - **Sync**: spliced connections go to a backup as splice records (module `sync`,
//!   [`crate::Dataplane::splice_sync_drain`], [`crate::Dataplane::splice_sync_export`]); the
//!   backup puts each in the slot its SNAT port names and translates it after a takeover.
//! - **Reload**: [`crate::Dataplane::set_splice`] changes rules, affinity and limits for new
//!   connections; the pool itself is fixed at start.
//! - **Failures**: no complete head within the timeout: the slot is freed (counted); a head
//!   larger than the limit or not HTTP/1.x / SIP: RST to the client (counted); a backend's
//!   RST or silence to the SYN: the next eligible backend, then RST to the client; a backend
//!   removed or failed health while spliced: the client's next segment is answered with RST.
//! - **Keep-alive and pipelining**: only the first request head is read; later requests on
//!   the connection go to the bound backend. HTTP/2 multiplexes streams on one connection:
//!   placing streams would need a proxy that terminates HTTP/2 (frames, HPACK state, flow
//!   control), which a splice cannot be.
//!
//! Timers (head timeout, connect timeout, retransmission of the held head, idle) run in
//! [`Dataplane::splice_poll`](crate::Dataplane::splice_poll), which also returns the packets
//! they originate.

use std::net::{IpAddr, SocketAddr};

use lb_conntrack::FlowState;
use lb_core::{BackendId, Duration, FlowHasher, FlowKey, Instant, IpProto};
use lb_packet::l5head::{head_complete, parse_head, Head};
use lb_packet::offload::{L4Csum, VnetHdr};
use lb_packet::splice::{translate, translate_partial, SeqShift};
use lb_packet::syncookie::{CookieOpts, SynCookies, OPT_BITS};
use lb_packet::tcpseg::{self, flags, OptionShift, TcpHeader, TcpOptions};
use lb_packet::{nat, Link, Parsed};

use crate::load::Live;
use crate::spec::{Affinity, DataplaneSpec, SpliceSpec, MAX_SPLICE_HEAD};
use crate::{DropReason, Proto, Tables, Verdict};

/// The window scale the balancer offers clients that offer one.
pub const OUR_WSCALE: u8 = 7;
/// Window the balancer advertises to a client while it holds the head (unscaled bytes).
const HEAD_WINDOW: u16 = 64_240;
/// Backends tried for one connection.
const MAX_TRIES: usize = 4;
/// Retransmissions of the held head before the client is reset.
const MAX_RETRANS: u8 = 4;
/// How long a slot lingers after both FINs or an RST (the last ACKs still translate).
const LINGER: Duration = Duration::from_secs(2);

/// Counters of the splice path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// SYN-ACKs with a cookie sent (no state kept).
    pub cookies_sent: u64,
    /// ACKs whose cookie validated (a slot was taken).
    pub cookies_ok: u64,
    /// ACKs of unknown connections whose cookie did not validate (dropped).
    pub cookies_bad: u64,
    /// Valid cookies with no free slot and no closing one to take (dropped).
    pub table_full: u64,
    /// Closing slots (both FINs or an RST seen, lingering for the last ACKs) taken early for
    /// a new connection because no slot was free.
    pub reclaimed: u64,
    /// Connections whose head did not complete in time (dropped).
    pub head_timeouts: u64,
    /// Heads larger than the limit (RST).
    pub head_too_large: u64,
    /// Heads neither HTTP/1.x nor SIP (RST).
    pub head_invalid: u64,
    /// Backends that refused the balancer's SYN (RST).
    pub backend_refused: u64,
    /// Backends that left the SYN or the held head unanswered.
    pub backend_timeouts: u64,
    /// Connections reset towards the client (no backend left, backend gone, bad head).
    pub client_resets: u64,
    /// Connections spliced (backend answered the SYN).
    pub spliced: u64,
    /// Retransmissions of a held head.
    pub retransmits: u64,
    /// Segments translated client → backend.
    pub to_backend: u64,
    /// Segments translated backend → client.
    pub to_client: u64,
    /// SYNs on the 4-tuple of a closing connection (the client reused its port): the old
    /// slot was freed and the SYN answered as a new connection's.
    pub reopened: u64,
    /// GSO super-packets (either way) translated whole, their partial checksums left to the
    /// device: the splice's share of the TUN offloads.
    pub gso_translated: u64,
    /// Spliced connections installed or refreshed from a peer's sync records.
    pub synced_in: u64,
    /// Peer splice records refused (no such spliced service or backend here, a SNAT port
    /// outside this node's slots).
    pub sync_refused: u64,
    /// Changes not logged for the sync sender because its log was full (the embedder then
    /// sends a bulk dump).
    pub sync_lost: u64,
    /// Slots in use now.
    pub active: u64,
}

impl SpliceStats {
    /// Every counter with its name (for the stats endpoint).
    pub fn pairs(&self) -> [(&'static str, u64); 21] {
        [
            ("cookies_sent", self.cookies_sent),
            ("cookies_ok", self.cookies_ok),
            ("cookies_bad", self.cookies_bad),
            ("table_full", self.table_full),
            ("reclaimed", self.reclaimed),
            ("head_timeouts", self.head_timeouts),
            ("head_too_large", self.head_too_large),
            ("head_invalid", self.head_invalid),
            ("backend_refused", self.backend_refused),
            ("backend_timeouts", self.backend_timeouts),
            ("client_resets", self.client_resets),
            ("spliced", self.spliced),
            ("retransmits", self.retransmits),
            ("to_backend", self.to_backend),
            ("to_client", self.to_client),
            ("reopened", self.reopened),
            ("gso_translated", self.gso_translated),
            ("synced_in", self.synced_in),
            ("sync_refused", self.sync_refused),
            ("sync_lost", self.sync_lost),
            ("active", self.active),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Free,
    /// Reading the head.
    Head,
    /// SYN sent to a backend.
    Connecting,
    /// Head sent, not yet acknowledged.
    Sent,
    /// Spliced.
    Spliced,
    /// Both FINs or an RST seen: lingering.
    Closing,
}

#[derive(Debug, Clone)]
struct Slot {
    state: State,
    key: FlowKey,
    hash: u64,
    client: SocketAddr,
    vip: SocketAddr,
    svc: u16,
    deadline: Instant,
    head: Box<[u8]>,
    head_len: u16,
    c_isn: u32,
    l_isn: u32,
    c_mss: u16,
    c_ws: Option<u8>,
    c_sack: bool,
    c_ts: bool,
    ts0: u32,
    c_tsval: u32,
    c_win: u16,
    place_hash: u64,
    group: Option<u16>,
    backend: Option<BackendId>,
    baddr: SocketAddr,
    snat: SocketAddr,
    tried: [Option<BackendId>; MAX_TRIES],
    tries: u8,
    s_isn: u32,
    b_ws: Option<u8>,
    b_ts0: u32,
    /// Added to the client's TSval towards the backend: the backend connection's timestamps
    /// run on the balancer's millisecond clock (see `connect`).
    ts_d: u32,
    retrans: u8,
    fin_c: bool,
    fin_s: bool,
    /// Times the slot was taken (picks its SNAT port).
    gen: u16,
    /// What the live load counts for this slot now (module `sync`'s `recount`).
    counted: Option<(BackendId, FlowState)>,
    /// When the connection took the slot, and when it last had a packet (session statistics).
    opened: Instant,
    seen: Instant,
    /// Wire segments of the connection the balancer handled, both ways.
    packets: u32,
    /// Installed from a peer's sync record (else spliced here).
    from_peer: bool,
}

fn unspec() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0)
}

impl Slot {
    fn new(head_max: usize) -> Slot {
        Slot {
            state: State::Free,
            key: FlowKey::v4(
                std::net::Ipv4Addr::UNSPECIFIED,
                0,
                std::net::Ipv4Addr::UNSPECIFIED,
                0,
                IpProto::Tcp,
            ),
            hash: 0,
            client: unspec(),
            vip: unspec(),
            svc: 0,
            deadline: Instant::ZERO,
            head: vec![0u8; head_max].into_boxed_slice(),
            head_len: 0,
            c_isn: 0,
            l_isn: 0,
            c_mss: 536,
            c_ws: None,
            c_sack: false,
            c_ts: false,
            ts0: 0,
            c_tsval: 0,
            c_win: 0,
            place_hash: 0,
            group: None,
            backend: None,
            baddr: unspec(),
            snat: unspec(),
            tried: [None; MAX_TRIES],
            tries: 0,
            s_isn: 0,
            b_ws: None,
            b_ts0: 0,
            ts_d: 0,
            retrans: 0,
            fin_c: false,
            fin_s: false,
            gen: 0,
            counted: None,
            opened: Instant::ZERO,
            seen: Instant::ZERO,
            packets: 0,
            from_peer: false,
        }
    }

    /// client → backend: acknowledgements from our ISN space to the backend's.
    fn to_backend(&self) -> SeqShift {
        SeqShift::new(0, self.s_isn.wrapping_sub(self.l_isn))
    }

    fn ts_to_backend(&self) -> OptionShift {
        OptionShift {
            tsval: self.ts_d,
            tsecr: self.b_ts0.wrapping_sub(self.ts0),
            rescale: None,
        }
    }

    fn ts_to_client(&self) -> OptionShift {
        OptionShift {
            tsval: self.ts0.wrapping_sub(self.b_ts0),
            tsecr: self.ts_d.wrapping_neg(),
            rescale: match (self.c_ws, self.b_ws) {
                (Some(_), Some(b)) => Some((b, OUR_WSCALE)),
                _ => None,
            },
        }
    }
}

/// What placing a connection reads: the tables (dereferenced to), and the live load
/// (availability: health, ejection, admission; effective weights: slow start).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    tables: &'a Tables,
    live: &'a Live,
}

impl std::ops::Deref for View<'_> {
    type Target = Tables;

    fn deref(&self) -> &Tables {
        self.tables
    }
}

/// A spliced service: its VIP, affinity and rules (rule backends kept as addresses, matched
/// against the tables' backends when a connection is placed).
#[derive(Debug, Clone)]
struct Svc {
    vip: SocketAddr,
    affinity: Affinity,
    spec: SpliceSpec,
    /// Lower-cased rule hosts.
    hosts: Vec<Option<Vec<u8>>>,
    /// Still configured: a service a reload removed keeps its entry (its slots refer to it by
    /// index) but takes no new connection.
    live: bool,
}

impl Svc {
    fn of(s: &crate::ServiceSpec) -> Option<Svc> {
        if s.proto != Proto::Tcp {
            return None;
        }
        let sp = s.splice.clone()?;
        Some(Svc {
            vip: s.vip,
            affinity: s.affinity,
            hosts: sp
                .rules
                .iter()
                .map(|r| r.host.as_ref().map(|h| h.to_ascii_lowercase().into_bytes()))
                .collect(),
            spec: sp,
            live: true,
        })
    }
}

/// Why a reloaded configuration's splice services cannot be installed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpliceReloadError {
    /// The data path was built without a spliced service, so it holds no slots and no SNAT
    /// ports for them.
    #[error("the first spliced service needs a restart (no splice slots were set up)")]
    NoSlots,
    /// `splice_capacity` changed (the slot pool and its SNAT ports are fixed).
    #[error("balancer.splice_capacity needs a restart")]
    Capacity,
}

/// The splice path's state: fixed pools, built once.
#[derive(Debug)]
pub(crate) struct Splicer {
    svcs: Vec<Svc>,
    slots: Vec<Slot>,
    /// Free slots, oldest first (FIFO: a port is reused as late as possible).
    free: std::collections::VecDeque<u32>,
    ports_per_slot: usize,
    /// Open addressing: slot index + 1 by client key hash (0: empty).
    index: Vec<u32>,
    cookies: SynCookies,
    hasher: FlowHasher,
    port_base: u16,
    cursor: usize,
    /// Where the search for a closing slot to reclaim goes on.
    reclaim_cursor: usize,
    /// [`crate::DataplaneOptions::clock_base_ms`].
    clock_base_ms: u64,
    /// Keys of spliced connections that changed, for the sync sender (module `sync`), at
    /// most `log_cap` (0: no sync).
    log: std::collections::VecDeque<FlowKey>,
    pub(crate) log_cap: usize,
    /// Changes of what the live load counts (backend, before, after), for the data path to
    /// apply after each call ([`crate::Dataplane::splice_counts`]).
    pub(crate) counts: Vec<(BackendId, Option<FlowState>, Option<FlowState>)>,
    /// Connections that ended after reaching a backend: (backend, duration in ms, packets),
    /// for the session statistics (applied with `counts`).
    pub(crate) ended: Vec<(BackendId, u64, u64)>,
    pub(crate) stats: SpliceStats,
}

/// Slots looked at for a closing one to reclaim when none is free (a bound on the work a
/// full table costs per new connection).
const RECLAIM_SCAN: usize = 64;

/// Whether sequence number `a` is at or after `b` (RFC 1982 arithmetic).
#[inline]
/// The per-segment rewrite of a spliced direction: addresses and ports, sequence and
/// acknowledgement numbers with SACK blocks, timestamps and window. With `partial` the TCP
/// checksum is a partial one (the pseudo-header's sum): only the address change touches it.
fn rewrite_spliced(
    pkt: &mut [u8],
    p: &Parsed,
    (src, dst): (SocketAddr, SocketAddr),
    sh: SeqShift,
    ts: OptionShift,
    partial: bool,
) -> bool {
    if partial {
        nat::rewrite_partial(pkt, p, Some(src), Some(dst)).is_ok()
            && translate_partial(pkt, p, sh).is_ok()
            && tcpseg::rewrite_options_partial(pkt, p, ts).is_ok()
    } else {
        nat::rewrite(pkt, p, Some(src), Some(dst)).is_ok()
            && translate(pkt, p, sh).is_ok()
            && tcpseg::rewrite_options(pkt, p, ts).is_ok()
    }
}

fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

#[inline]
fn mix(h: u64, tag: u32) -> u64 {
    let mut z = h ^ u64::from(tag).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A weighted rendezvous score: `w / -ln(u)` with `u` in (0, 1) from the top 53 bits of `h`.
#[inline]
fn rendezvous(h: u64, w: u64) -> f64 {
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    w as f64 / -u.ln()
}

/// Our timestamp clock: milliseconds, with the cookie's option bits in the low bits.
#[inline]
fn our_ts(now: Instant, opts: CookieOpts) -> u32 {
    ((now.as_millis() as u32) & !((1 << OPT_BITS) - 1)) | opts.bits()
}

impl Splicer {
    /// The splice state for `spec`'s spliced services, and the SNAT ports it takes: the
    /// top `splice_capacity` ports of `ports` (none when no service splices). Returns the
    /// ports left to the flow table's SNAT pools.
    pub(crate) fn new(
        spec: &DataplaneSpec,
        key: lb_core::HashKey,
        ports: core::ops::RangeInclusive<u16>,
        clock_base_ms: u64,
    ) -> (Splicer, core::ops::RangeInclusive<u16>) {
        let svcs: Vec<Svc> = spec.services.iter().filter_map(Svc::of).collect();
        let (lo, hi) = (*ports.start(), *ports.end());
        let span = usize::from(hi.saturating_sub(lo));
        let cap = if svcs.is_empty() && !spec.splice_reserve {
            0
        } else {
            spec.splice_capacity.min(span / 2).min(u16::MAX as usize)
        };
        // Room for the largest head any service may hold, so that a reload can raise a
        // service's `head_max` (MAX_SPLICE_HEAD bytes per slot: 5.6 MiB for 4 096 slots).
        let head_max = if cap == 0 { 0 } else { MAX_SPLICE_HEAD };
        // Each slot owns `ports_per_slot` ports and moves to the next one each time it is
        // reused, so that a 4-tuple comes back only after many connections (a backend that
        // closed first holds the last one in TIME_WAIT and may answer a new SYN on it with an
        // ACK instead of a SYN-ACK).
        let ports_per_slot = (span / 2).checked_div(cap).unwrap_or(1).clamp(1, 8);
        let port_base = hi
            .saturating_sub((cap * ports_per_slot) as u16)
            .saturating_add(1);
        let rest = if cap == 0 {
            lo..=hi
        } else {
            lo..=port_base.saturating_sub(1)
        };
        let isz = (cap * 2).max(2).next_power_of_two();
        (
            Splicer {
                svcs,
                slots: (0..cap).map(|_| Slot::new(head_max)).collect(),
                free: (0..cap as u32).collect(),
                ports_per_slot,
                index: vec![0; isz],
                cookies: SynCookies::new(FlowHasher::new(key.derive("splice-cookie"))),
                hasher: FlowHasher::new(key.derive("splice")),
                port_base,
                cursor: 0,
                reclaim_cursor: 0,
                clock_base_ms,
                log: std::collections::VecDeque::new(),
                log_cap: 0,
                counts: Vec::with_capacity(16),
                ended: Vec::with_capacity(16),
                stats: SpliceStats::default(),
            },
            rest,
        )
    }

    /// Whether any service splices (or did: its connections may still run).
    #[inline(always)]
    pub(crate) fn is_active(&self) -> bool {
        !self.svcs.is_empty() && !self.slots.is_empty()
    }

    /// Installs a reloaded configuration's spliced services: rules, affinity and limits of a
    /// service that stays (by VIP) change for new connections, a new one is added, a removed
    /// one takes no new connection while its spliced ones run on under the old settings.
    pub(crate) fn reconfigure(
        &mut self,
        spec: &DataplaneSpec,
        capacity: usize,
    ) -> Result<(), SpliceReloadError> {
        let new: Vec<Svc> = spec.services.iter().filter_map(Svc::of).collect();
        if new.is_empty() && self.slots.is_empty() {
            return Ok(());
        }
        if self.slots.is_empty() {
            return Err(SpliceReloadError::NoSlots);
        }
        if spec.splice_capacity != capacity {
            return Err(SpliceReloadError::Capacity);
        }
        for s in &mut self.svcs {
            s.live = false;
        }
        for n in new {
            match self.svcs.iter_mut().find(|s| s.vip == n.vip) {
                Some(s) => *s = n,
                None => self.svcs.push(n),
            }
        }
        Ok(())
    }

    // ---- index ----

    fn find(&self, key: &FlowKey, h: u64) -> Option<usize> {
        let mask = self.index.len() - 1;
        let mut i = (h as usize) & mask;
        loop {
            let v = *self.index.get(i)?;
            if v == 0 {
                return None;
            }
            let s = (v - 1) as usize;
            if self
                .slots
                .get(s)
                .is_some_and(|x| x.hash == h && x.key == *key)
            {
                return Some(s);
            }
            i = (i + 1) & mask;
        }
    }

    fn index_insert(&mut self, h: u64, slot: usize) {
        let mask = self.index.len() - 1;
        let mut i = (h as usize) & mask;
        while self.index[i] != 0 {
            i = (i + 1) & mask;
        }
        self.index[i] = slot as u32 + 1;
    }

    fn index_remove(&mut self, slot: usize) {
        let mask = self.index.len() - 1;
        let h = self.slots[slot].hash;
        let mut i = (h as usize) & mask;
        loop {
            match self.index[i] {
                0 => return,
                v if (v - 1) as usize == slot => break,
                _ => i = (i + 1) & mask,
            }
        }
        // Backward-shift deletion (linear probing).
        let mut j = i;
        loop {
            self.index[i] = 0;
            loop {
                j = (j + 1) & mask;
                let v = self.index[j];
                if v == 0 {
                    return;
                }
                let home = (self.slots[(v - 1) as usize].hash as usize) & mask;
                // Move v into the hole unless its home lies cyclically in (i, j].
                let keep = if i <= j {
                    i < home && home <= j
                } else {
                    i < home || home <= j
                };
                if !keep {
                    self.index[i] = v;
                    i = j;
                    break;
                }
            }
        }
    }

    /// No slot is free: frees a closing one (its connection is over both ways; it lingers
    /// only for the last ACKs) for a new connection, if one is among the next
    /// [`RECLAIM_SCAN`] slots. Without this, slots lingering [`LINGER`] after each close cap
    /// the connection rate at capacity / `LINGER`.
    fn reclaim(&mut self) -> Option<u32> {
        let n = self.slots.len();
        for _ in 0..RECLAIM_SCAN.min(n) {
            let s = self.reclaim_cursor;
            self.reclaim_cursor = (s + 1) % n;
            if self.slots[s].state == State::Closing {
                self.release(s);
                self.stats.reclaimed += 1;
                // (`release` queued it last; it is taken now.)
                return self.free.pop_back();
            }
        }
        None
    }

    fn release(&mut self, s: usize) {
        if self.slots[s].state == State::Free {
            return;
        }
        if matches!(
            self.slots[s].state,
            State::Sent | State::Spliced | State::Closing
        ) {
            self.log(s);
        }
        self.index_remove(s);
        let x = &self.slots[s];
        if let Some((b, _)) = x.counted {
            let ms = u64::try_from(x.seen.saturating_duration_since(x.opened).as_millis())
                .unwrap_or(u64::MAX);
            self.ended.push((b, ms, u64::from(x.packets)));
        }
        self.slots[s].state = State::Free;
        self.recount(s);
        self.free.push_back(s as u32);
        self.stats.active = self.stats.active.saturating_sub(1);
    }

    // ---- packet building ----

    /// RST to the client of slot `s`, written at `out`; the slot is freed.
    fn rst_client(&mut self, s: usize, out: &mut [u8], seq_next: u32) -> Option<usize> {
        let x = &self.slots[s];
        let h = TcpHeader {
            seq: seq_next,
            ack: 0,
            flags: flags::RST,
            window: 0,
        };
        let n = tcpseg::build(out, x.vip, x.client, &h, &TcpOptions::default(), &[]).ok();
        self.stats.client_resets += 1;
        self.release(s);
        n
    }

    /// The balancer's SYN to the slot's current backend.
    fn syn_to_backend(&self, s: usize, out: &mut [u8]) -> Option<usize> {
        let x = &self.slots[s];
        let h = TcpHeader {
            seq: x.c_isn,
            ack: 0,
            flags: flags::SYN,
            window: x.c_win,
        };
        let o = TcpOptions {
            mss: Some(x.c_mss),
            wscale: x.c_ws,
            sack_permitted: x.c_sack,
            timestamps: x.c_ts.then_some((x.c_tsval.wrapping_add(x.ts_d), 0)),
        };
        tcpseg::build(out, x.snat, x.baddr, &h, &o, &[]).ok()
    }

    /// ACK + held head to the backend.
    fn head_to_backend(&self, s: usize, out: &mut [u8]) -> Option<usize> {
        let x = &self.slots[s];
        let h = TcpHeader {
            seq: x.c_isn.wrapping_add(1),
            ack: x.s_isn.wrapping_add(1),
            flags: flags::ACK | flags::PSH,
            window: x.c_win,
        };
        let o = TcpOptions {
            timestamps: (x.c_ts && x.b_ts0 != 0)
                .then_some((x.c_tsval.wrapping_add(x.ts_d), x.b_ts0)),
            ..TcpOptions::default()
        };
        let data = x.head.get(..usize::from(x.head_len)).unwrap_or(&[]);
        tcpseg::build(out, x.snat, x.baddr, &h, &o, data).ok()
    }

    /// Picks the next backend of slot `s` (skipping the ones tried): the highest
    /// rendezvous score of the placement hash among the eligible backends of the slot's rule
    /// group, or of the whole service when the group has none.
    fn choose(&mut self, s: usize, tables: View<'_>, now: Instant) -> Option<BackendId> {
        let x = &self.slots[s];
        let svc = self.svcs.get(usize::from(x.svc))?;
        let group = x
            .group
            .and_then(|g| svc.spec.rules.get(usize::from(g)))
            .map(|r| &r.backends[..]);
        // Weighted rendezvous: each backend's score is its effective weight (slow start
        // included) over -ln(u), u uniform in (0, 1) from the key and the backend's tag; the
        // highest wins. A key's share of backends follows the weights, and removing a backend
        // moves only the keys it held. Backends the live load says cannot take a connection
        // now (ejected, above their admission threshold) are left out.
        let pick = |in_group: Option<&[SocketAddr]>| {
            tables
                .backends
                .iter()
                .flatten()
                .filter(|b| b.vip == svc.vip && b.proto == Proto::Tcp && b.eligible())
                .filter(|b| !x.tried.contains(&Some(b.id)))
                .filter(|b| in_group.is_none_or(|g| g.contains(&b.addr)))
                .filter_map(|b| {
                    let (avail, w) = match tables.live.load(b.id, now) {
                        Some(l) => (l.available, l.effective_weight),
                        None => (true, u64::from(b.weight.get())),
                    };
                    avail.then(|| (rendezvous(mix(x.place_hash, b.tag()), w), b.id, b.addr))
                })
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, id, addr)| (id, addr))
        };
        let (id, addr) = pick(group).or_else(|| group.and_then(|_| pick(None)))?;
        let baddr = if addr.port() == 0 {
            SocketAddr::new(addr.ip(), svc.vip.port())
        } else {
            addr
        };
        let snat_ip = tables.snat_for(baddr.ip())?;
        let n = self.slots.len();
        let x = &mut self.slots[s];
        if x.tries == 0 {
            x.gen = x.gen.wrapping_add(1);
        }
        let round = usize::from(x.gen) % self.ports_per_slot;
        let port = self.port_base.wrapping_add((round * n + s) as u16);
        let x = &mut self.slots[s];
        if let Some(t) = x.tried.get_mut(usize::from(x.tries)) {
            *t = Some(id);
        }
        x.tries += 1;
        x.backend = Some(id);
        x.baddr = baddr;
        x.snat = SocketAddr::new(snat_ip, port);
        Some(id)
    }

    /// The head is complete: rule and placement hash from its content.
    fn place(&mut self, s: usize) -> Result<(), ()> {
        let x = &self.slots[s];
        let svc = self.svcs.get(usize::from(x.svc)).ok_or(())?;
        let data = x.head.get(..usize::from(x.head_len)).unwrap_or(&[]);
        let (group, key_hash) = match parse_head(data) {
            Head::Http { host, path } => {
                let g = svc.spec.rules.iter().zip(&svc.hosts).position(|(r, h)| {
                    h.as_ref().is_none_or(|h| h.eq_ignore_ascii_case(host))
                        && path.starts_with(r.path_prefix.as_bytes())
                });
                let mut lower = [0u8; 256];
                let n = host.len().min(lower.len());
                for (o, i) in lower.iter_mut().zip(host) {
                    *o = i.to_ascii_lowercase();
                }
                let hh = self.hasher.hash_bytes(lower.get(..n).unwrap_or(&[]));
                (g, (svc.affinity == Affinity::HttpHost).then_some(hh))
            }
            Head::Sip { call_id } => (
                None,
                call_id
                    .filter(|_| svc.affinity == Affinity::SipCallId)
                    .map(|c| self.hasher.hash_bytes(c)),
            ),
            Head::Incomplete | Head::Invalid => return Err(()),
        };
        let src_hash = match x.key.src() {
            IpAddr::V4(a) => self.hasher.hash_bytes(&a.octets()),
            IpAddr::V6(a) => self.hasher.hash_bytes(&a.octets()),
        };
        let h = match (svc.affinity, key_hash) {
            (_, Some(k)) => k,
            (Affinity::Source, None) => src_hash,
            _ => x.hash,
        };
        let x = &mut self.slots[s];
        x.group = group.map(|g| g as u16);
        x.place_hash = h;
        Ok(())
    }

    // ---- client side ----

    /// A packet to a VIP (service `svc_vip`). `None`: not a spliced service.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn client_segment(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        svc_vip: SocketAddr,
        tables: View<'_>,
        now: Instant,
        csum: L4Csum,
        segs: u32,
    ) -> Option<Verdict> {
        // A service a reload stopped splicing (not `live`) still carries its spliced
        // connections; anything else to it is the tables' business.
        let si = self.svcs.iter().position(|s| s.vip == svc_vip)?;
        let live = self.svcs[si].live;
        if p.proto != IpProto::Tcp || p.link != Link::Ip {
            return live.then_some(Verdict::Drop(DropReason::RewriteFailed));
        }
        let pkt = buf.get_mut(start..end)?;
        let Ok((h, o)) = tcpseg::read(pkt, p) else {
            return Some(Verdict::Drop(DropReason::Malformed));
        };
        let key = p.key;
        let hash = self.hasher.hash_flow(&key);
        let client = SocketAddr::new(key.src(), key.src_port());
        let partial = csum == L4Csum::Partial;
        let mut found = self.find(&key, hash);
        if let Some(s) = found.filter(|&s| self.slots[s].state == State::Closing) {
            if h.flags & (flags::SYN | flags::ACK | flags::RST) == flags::SYN {
                // The client reused the port of a connection that is closing here: a new
                // connection (as IPVS's `conn_reuse_mode`, and the NAT path, treat it). The
                // old slot goes; translated as the old one's, the SYN would reach the
                // backend's TIME_WAIT and the client would wait a retransmission out.
                self.release(s);
                self.stats.reopened += 1;
                found = None;
            }
        }
        let Some(s) = found else {
            if !live {
                return None;
            }
            if partial {
                return Some(Verdict::Segment);
            }
            return Some(self.stateless(buf, start, end, p, si, hash, h, o, tables, now));
        };
        // A partial checksum (a GSO super-packet, or `NEEDS_CSUM`) is translated as it is
        // once the connection is spliced; everything else the splice reads or answers (the
        // handshake, the head) it takes as plain packets: `Segment` asks for them.
        if partial
            && !(matches!(
                self.slots[s].state,
                State::Sent | State::Spliced | State::Closing
            ) && self.backend_alive(s, tables))
        {
            return Some(Verdict::Segment);
        }
        let x = &mut self.slots[s];
        x.packets = x.packets.saturating_add(segs);
        x.seen = now;
        let payload = p.payload(pkt).len();
        if h.flags & flags::RST != 0 {
            // A client RST: forwarded when spliced, and the slot closes.
            let st = self.slots[s].state;
            let v = if matches!(st, State::Sent | State::Spliced | State::Closing) {
                self.translate_to_backend(buf, start, end, p, s, tables, partial)
            } else {
                Verdict::Held
            };
            self.close(s, now);
            return Some(v);
        }
        match self.slots[s].state {
            State::Head => Some(self.head_data(buf, start, end, p, s, h, o, tables, now)),
            State::Connecting => Some(Verdict::Held),
            State::Sent | State::Spliced | State::Closing => {
                let x = &mut self.slots[s];
                let was = (x.fin_c, x.state);
                if h.flags & flags::FIN != 0 {
                    x.fin_c = true;
                }
                if x.state != State::Closing {
                    x.deadline = now + self.svcs[usize::from(x.svc)].spec.idle_timeout;
                }
                if x.fin_c && x.fin_s && x.state == State::Spliced {
                    x.state = State::Closing;
                    x.deadline = now + LINGER;
                }
                if was != (x.fin_c, x.state) {
                    self.recount(s);
                    self.log(s);
                }
                let _ = (payload, client);
                Some(self.translate_to_backend(buf, start, end, p, s, tables, partial))
            }
            State::Free => Some(Verdict::Drop(DropReason::NoFlow)),
        }
    }

    /// No slot: a SYN gets a cookie, an ACK may redeem one.
    #[allow(clippy::too_many_arguments)]
    fn stateless(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        si: usize,
        hash: u64,
        h: TcpHeader,
        o: TcpOptions,
        tables: View<'_>,
        now: Instant,
    ) -> Verdict {
        let key = p.key;
        let client = SocketAddr::new(key.src(), key.src_port());
        let vip = SocketAddr::new(key.dst(), key.dst_port());
        let syn = h.flags & (flags::SYN | flags::ACK | flags::RST) == flags::SYN;
        if syn {
            let copts = match o.timestamps {
                Some(_) => CookieOpts {
                    wscale: o.wscale,
                    sack: o.sack_permitted,
                },
                None => CookieOpts::default(),
            };
            let isn = self.cookies.make(&key, h.seq, o.mss, copts, now);
            let mss = self.svcs[si].spec.mss;
            let reply = TcpHeader {
                seq: isn,
                ack: h.seq.wrapping_add(1),
                flags: flags::SYN | flags::ACK,
                window: HEAD_WINDOW,
            };
            let ts = o.timestamps.map(|(v, _)| (our_ts(now, copts), v));
            let ro = TcpOptions {
                mss: Some(mss),
                wscale: copts.wscale.map(|_| OUR_WSCALE),
                sack_permitted: copts.sack,
                timestamps: ts,
            };
            let Some(out) = buf.get_mut(start..) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            return match tcpseg::build(out, vip, client, &reply, &ro, &[]) {
                Ok(n) => {
                    self.stats.cookies_sent += 1;
                    Verdict::Forward { start, len: n }
                }
                Err(_) => Verdict::Drop(DropReason::RewriteFailed),
            };
        }
        if h.flags & (flags::SYN | flags::RST) != 0 || h.flags & flags::ACK == 0 {
            return Verdict::Drop(DropReason::MidFlowUnknown);
        }
        let Some(ck) = self
            .cookies
            .check(&key, h.seq, h.ack, o.timestamps.map(|t| t.1), now)
        else {
            self.stats.cookies_bad += 1;
            return Verdict::Drop(DropReason::MidFlowUnknown);
        };
        let Some(s) = self.free.pop_front().or_else(|| self.reclaim()) else {
            self.stats.table_full += 1;
            return Verdict::Drop(DropReason::TableFull);
        };
        let s = s as usize;
        self.stats.cookies_ok += 1;
        self.stats.active += 1;
        let spec = &self.svcs[si].spec;
        let x = &mut self.slots[s];
        x.state = State::Head;
        x.key = key;
        x.hash = hash;
        x.client = client;
        x.vip = vip;
        x.svc = si as u16;
        x.deadline = now + spec.head_timeout;
        // The SYN (answered statelessly) and this ACK.
        (x.opened, x.seen, x.packets) = (now, now, 2);
        x.from_peer = false;
        x.head_len = 0;
        x.c_isn = ck.client_isn;
        x.l_isn = h.ack.wrapping_sub(1);
        x.c_mss = ck.mss;
        x.c_ws = ck.opts.wscale;
        x.c_sack = ck.opts.sack;
        x.c_ts = o.timestamps.is_some();
        x.ts0 = o.timestamps.map_or(0, |t| t.1);
        x.c_tsval = o.timestamps.map_or(0, |t| t.0);
        x.c_win = h.window;
        x.group = None;
        x.backend = None;
        x.tried = [None; MAX_TRIES];
        x.tries = 0;
        x.s_isn = 0;
        x.b_ws = None;
        x.b_ts0 = 0;
        x.retrans = 0;
        x.fin_c = false;
        x.fin_s = false;
        self.index_insert(hash, s);
        if p.payload < p.end {
            // Data on the cookie's ACK: the head's first bytes.
            return self.head_data(buf, start, end, p, s, h, o, tables, now);
        }
        Verdict::Held
    }

    /// A segment while the head is being read.
    #[allow(clippy::too_many_arguments)]
    fn head_data(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        s: usize,
        h: TcpHeader,
        o: TcpOptions,
        tables: View<'_>,
        now: Instant,
    ) -> Verdict {
        let pkt = buf.get(start..end).unwrap_or(&[]);
        let data = p.payload(pkt);
        let head_max = self.svcs[usize::from(self.slots[s].svc)]
            .spec
            .head_max
            .min(self.slots[s].head.len());
        // The head's length before this segment: no blank line up to there.
        let searched = usize::from(self.slots[s].head_len);
        {
            let x = &mut self.slots[s];
            if let Some((v, _)) = o.timestamps {
                x.c_tsval = v;
            }
            x.c_win = h.window;
            let expect = x.c_isn.wrapping_add(1).wrapping_add(u32::from(x.head_len));
            // Whether this segment's data (and so its FIN) was taken whole.
            let mut whole = true;
            if !data.is_empty() && h.seq == expect {
                let at = usize::from(x.head_len);
                // Take what fits. A request body sent in the head's segment (a POST) may
                // overflow: the rest is not acknowledged, so the client sends it again, and
                // it reaches the backend once the connection is spliced.
                let take = data.len().min(head_max.saturating_sub(at));
                if take == 0 {
                    self.stats.head_too_large += 1;
                    let seq = x.l_isn.wrapping_add(1);
                    return self.rst_in_place(buf, start, s, seq);
                }
                whole = take == data.len();
                if let Some(d) = x.head.get_mut(at..at + take) {
                    d.copy_from_slice(&data[..take]);
                }
                x.head_len += take as u16;
            } else if data.is_empty() && h.flags & flags::FIN == 0 {
                return Verdict::Held;
            }
            if h.flags & flags::FIN != 0 && whole {
                // A client that closes before its head is complete: reset.
                let seq = x.l_isn.wrapping_add(1);
                self.stats.head_invalid += 1;
                return self.rst_in_place(buf, start, s, seq);
            }
        }
        let x = &self.slots[s];
        let held = x.head.get(..usize::from(x.head_len)).unwrap_or(&[]);
        if !head_complete(held, searched) {
            if usize::from(x.head_len) >= head_max {
                self.stats.head_too_large += 1;
                let seq = x.l_isn.wrapping_add(1);
                return self.rst_in_place(buf, start, s, seq);
            }
            // ACK what we hold so the client keeps sending.
            return self.ack_client(buf, start, s);
        }
        if self.place(s).is_err() {
            self.stats.head_invalid += 1;
            let seq = self.slots[s].l_isn.wrapping_add(1);
            return self.rst_in_place(buf, start, s, seq);
        }
        self.connect_in_place(buf, start, s, tables, now)
    }

    fn ack_client(&mut self, buf: &mut [u8], start: usize, s: usize) -> Verdict {
        let x = &self.slots[s];
        let h = TcpHeader {
            seq: x.l_isn.wrapping_add(1),
            ack: x.c_isn.wrapping_add(1).wrapping_add(u32::from(x.head_len)),
            flags: flags::ACK,
            window: HEAD_WINDOW >> x.c_ws.map_or(0, |_| OUR_WSCALE),
        };
        let o = TcpOptions {
            timestamps: x.c_ts.then_some((x.ts0, x.c_tsval)),
            ..TcpOptions::default()
        };
        match buf
            .get_mut(start..)
            .and_then(|out| tcpseg::build(out, x.vip, x.client, &h, &o, &[]).ok())
        {
            Some(n) => Verdict::Forward { start, len: n },
            None => Verdict::Drop(DropReason::RewriteFailed),
        }
    }

    fn rst_in_place(&mut self, buf: &mut [u8], start: usize, s: usize, seq: u32) -> Verdict {
        match buf
            .get_mut(start..)
            .and_then(|out| self.rst_client(s, out, seq))
        {
            Some(n) => Verdict::Forward { start, len: n },
            None => Verdict::Drop(DropReason::RewriteFailed),
        }
    }

    /// Chooses the next backend and writes the SYN to it at `buf[start..]`; RST to the
    /// client when none is left.
    fn connect_in_place(
        &mut self,
        buf: &mut [u8],
        start: usize,
        s: usize,
        tables: View<'_>,
        now: Instant,
    ) -> Verdict {
        let Some(out) = buf.get_mut(start..) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        match self.connect(s, out, tables, now) {
            Some(n) => Verdict::Forward { start, len: n },
            None => Verdict::Drop(DropReason::NoBackend),
        }
    }

    /// Next backend's SYN, or RST to the client; the packet written to `out`.
    fn connect(
        &mut self,
        s: usize,
        out: &mut [u8],
        tables: View<'_>,
        now: Instant,
    ) -> Option<usize> {
        if usize::from(self.slots[s].tries) < MAX_TRIES && self.choose(s, tables, now).is_some() {
            let timeout = self.svcs[usize::from(self.slots[s].svc)]
                .spec
                .connect_timeout;
            let x = &mut self.slots[s];
            x.state = State::Connecting;
            x.deadline = now + timeout;
            self.recount(s);
            // The backend connection's TSvals run on the balancer's millisecond clock, not
            // the client's: its SNAT 4-tuple was used before, and the backend may still hold
            // it in TIME_WAIT, where it accepts a new SYN only with a newer TSval (PAWS, RFC
            // 7323 §5; Linux `tcp_timewait_state_process`). Clients' clocks start at random
            // offsets per connection, so half their SYNs would get a bare ACK instead.
            // (The clock counts from `clock_base_ms`, the wall clock at start, so that it also
            // grows across a restart and agrees across a cluster.)
            let clock = self.clock_base_ms.wrapping_add(now.as_millis()) as u32;
            let x = &mut self.slots[s];
            x.ts_d = clock.wrapping_sub(x.c_tsval);
            return self.syn_to_backend(s, out);
        }
        let seq = self.slots[s].l_isn.wrapping_add(1);
        self.rst_client(s, out, seq)
    }

    /// Whether slot `s`'s backend is still configured, at the same address, and healthy.
    fn backend_alive(&self, s: usize, tables: View<'_>) -> bool {
        let x = &self.slots[s];
        x.backend
            .and_then(|b| tables.backend(b))
            .is_some_and(|b| b.healthy && b.addr.ip() == x.baddr.ip())
    }

    #[allow(clippy::too_many_arguments)]
    fn translate_to_backend(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        s: usize,
        tables: View<'_>,
        partial: bool,
    ) -> Verdict {
        if !self.backend_alive(s, tables) {
            // The backend was removed or failed: the client learns now.
            let seq = self.slots[s].l_isn.wrapping_add(1);
            return self.rst_in_place(buf, start, s, seq);
        }
        let x = &self.slots[s];
        let (sh, ts, snat, baddr) = (x.to_backend(), x.ts_to_backend(), x.snat, x.baddr);
        let Some(pkt) = buf.get_mut(start..end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if !rewrite_spliced(pkt, p, (snat, baddr), sh, ts, partial) {
            return Verdict::Drop(DropReason::RewriteFailed);
        }
        self.stats.to_backend += 1;
        Verdict::Forward {
            start,
            len: end - start,
        }
    }

    fn close(&mut self, s: usize, now: Instant) {
        let x = &mut self.slots[s];
        if matches!(x.state, State::Head | State::Connecting) {
            self.release(s);
        } else {
            x.state = State::Closing;
            x.deadline = now + LINGER;
            self.recount(s);
            self.log(s);
        }
    }

    // ---- backend side ----

    /// A packet to no service: a backend's, if it is addressed to a splice slot's port.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backend_segment(
        &mut self,
        buf: &mut [u8],
        start: usize,
        end: usize,
        p: &Parsed,
        tables: View<'_>,
        now: Instant,
        csum: L4Csum,
        segs: u32,
    ) -> Option<Verdict> {
        if p.proto != IpProto::Tcp || p.icmp.is_some() {
            return None;
        }
        let key = p.key;
        let s = usize::from(key.dst_port().checked_sub(self.port_base)?) % self.slots.len().max(1);
        let x = self.slots.get(s)?;
        if x.state == State::Free
            || x.baddr != SocketAddr::new(key.src(), key.src_port())
            || x.snat != SocketAddr::new(key.dst(), key.dst_port())
        {
            return None;
        }
        let pkt = buf.get_mut(start..end)?;
        let Ok((h, o)) = tcpseg::read(pkt, p) else {
            return Some(Verdict::Drop(DropReason::Malformed));
        };
        let state = x.state;
        let partial = csum == L4Csum::Partial;
        // As on the client side: partial checksums only through the translation.
        if partial
            && (h.flags & flags::SYN != 0
                || !matches!(state, State::Sent | State::Spliced | State::Closing))
        {
            return Some(Verdict::Segment);
        }
        let x = &mut self.slots[s];
        x.packets = x.packets.saturating_add(segs);
        x.seen = now;
        match state {
            State::Connecting => {
                if h.flags & flags::RST != 0 {
                    self.stats.backend_refused += 1;
                    return Some(self.connect_in_place(buf, start, s, tables, now));
                }
                let synack = flags::SYN | flags::ACK;
                if h.flags & (synack | flags::RST) != synack || h.ack != x.c_isn.wrapping_add(1) {
                    return Some(Verdict::Held);
                }
                let timeout = self.svcs[usize::from(x.svc)].spec.connect_timeout;
                let x = &mut self.slots[s];
                x.s_isn = h.seq;
                x.b_ws = o.wscale;
                x.b_ts0 = o.timestamps.map_or(0, |t| t.0);
                x.state = State::Sent;
                x.deadline = now + timeout;
                x.retrans = 0;
                self.stats.spliced += 1;
                self.recount(s);
                let out = buf.get_mut(start..)?;
                Some(match self.head_to_backend(s, out) {
                    Some(n) => Verdict::Forward { start, len: n },
                    None => Verdict::Drop(DropReason::RewriteFailed),
                })
            }
            State::Sent | State::Spliced | State::Closing => {
                let (sp, ts) = (x.to_backend().opposite(), x.ts_to_client());
                let (vip, client) = (x.vip, x.client);
                if h.flags & flags::SYN != 0 {
                    // A retransmitted SYN-ACK (our head's ACK was lost): resend the head.
                    let out = buf.get_mut(start..)?;
                    return Some(match self.head_to_backend(s, out) {
                        Some(n) => Verdict::Forward { start, len: n },
                        None => Verdict::Held,
                    });
                }
                let done = x.c_isn.wrapping_add(1).wrapping_add(u32::from(x.head_len));
                let idle = self.svcs[usize::from(x.svc)].spec.idle_timeout;
                let x = &mut self.slots[s];
                let was = (x.fin_s, x.state);
                if x.state == State::Sent && h.flags & flags::ACK != 0 && seq_ge(h.ack, done) {
                    x.state = State::Spliced;
                    x.deadline = now + idle;
                }
                if x.state == State::Spliced {
                    x.deadline = now + idle;
                }
                if h.flags & flags::FIN != 0 {
                    x.fin_s = true;
                }
                if (h.flags & flags::RST != 0 || (x.fin_c && x.fin_s)) && x.state != State::Closing
                {
                    x.state = State::Closing;
                    x.deadline = now + LINGER;
                }
                if was != (x.fin_s, x.state) {
                    // Spliced (the backup can take it from here), half or fully closed.
                    self.recount(s);
                    self.log(s);
                }
                let pkt = buf.get_mut(start..end)?;
                if !rewrite_spliced(pkt, p, (vip, client), sp, ts, partial) {
                    return Some(Verdict::Drop(DropReason::RewriteFailed));
                }
                self.stats.to_client += 1;
                Some(Verdict::Forward {
                    start,
                    len: end - start,
                })
            }
            State::Head | State::Free => Some(Verdict::Drop(DropReason::NoFlow)),
        }
    }

    // ---- timers ----

    /// Runs the timers of up to `budget` slots; the first packet one of them originates is
    /// written to `out` (its length returned). Call until `None`.
    pub(crate) fn poll(
        &mut self,
        out: &mut [u8],
        tables: View<'_>,
        now: Instant,
        budget: usize,
    ) -> Option<usize> {
        let n = self.slots.len();
        for _ in 0..budget.min(n) {
            let s = self.cursor;
            self.cursor = (self.cursor + 1) % n.max(1);
            let x = &self.slots[s];
            if x.state == State::Free || now < x.deadline {
                continue;
            }
            match x.state {
                State::Head => {
                    self.stats.head_timeouts += 1;
                    self.release(s);
                }
                State::Connecting => {
                    self.stats.backend_timeouts += 1;
                    if let Some(len) = self.connect(s, out, tables, now) {
                        return Some(len);
                    }
                }
                State::Sent => {
                    if x.retrans >= MAX_RETRANS {
                        self.stats.backend_timeouts += 1;
                        let seq = x.l_isn.wrapping_add(1);
                        if let Some(len) = self.rst_client(s, out, seq) {
                            return Some(len);
                        }
                        continue;
                    }
                    let timeout = self.svcs[usize::from(x.svc)].spec.connect_timeout;
                    let x = &mut self.slots[s];
                    x.retrans += 1;
                    x.deadline = now + timeout;
                    self.stats.retransmits += 1;
                    if let Some(len) = self.head_to_backend(s, out) {
                        return Some(len);
                    }
                }
                State::Spliced | State::Closing => self.release(s),
                State::Free => {}
            }
        }
        None
    }
}

impl crate::Dataplane {
    /// The splice hook of [`crate::Dataplane::forward`]: `None` unless service `si` splices.
    #[inline]
    pub(crate) fn splice_client(
        &mut self,
        buf: &mut [u8],
        cx: &crate::Ctx<'_>,
        si: usize,
        hdr: &mut VnetHdr,
    ) -> Option<Verdict> {
        if !self.splice.is_active() {
            return None;
        }
        let vip = self.tables.services.get(si)?.vip;
        let (start, end, p, now, segs) = (cx.start, cx.end, cx.p, cx.now, cx.segs);
        let v = self.splice_run(buf, cx, hdr, |sp, buf, view, csum| {
            sp.client_segment(buf, start, end, p, vip, view, now, csum, segs)
        });
        self.splice_counts();
        v
    }

    /// The splice hook for packets to no service: `None` unless it is a backend's packet of
    /// a spliced connection.
    #[inline]
    pub(crate) fn splice_backend(
        &mut self,
        buf: &mut [u8],
        cx: &crate::Ctx<'_>,
        hdr: &mut VnetHdr,
    ) -> Option<Verdict> {
        if !self.splice.is_active() {
            return None;
        }
        let (start, end, p, now, segs) = (cx.start, cx.end, cx.p, cx.now, cx.segs);
        let v = self.splice_run(buf, cx, hdr, |sp, buf, view, csum| {
            sp.backend_segment(buf, start, end, p, view, now, csum, segs)
        });
        self.splice_counts();
        v
    }

    /// Runs one side's splice step `f` on the packet as it came (`cx.csum`); when the splice
    /// asks for a plain packet ([`Verdict::Segment`]), a super-packet goes back to be cut and a
    /// lone partial checksum is completed, then `f` runs again on the full checksum.
    #[inline]
    fn splice_run(
        &mut self,
        buf: &mut [u8],
        cx: &crate::Ctx<'_>,
        hdr: &mut VnetHdr,
        f: impl Fn(&mut Splicer, &mut [u8], View<'_>, L4Csum) -> Option<Verdict>,
    ) -> Option<Verdict> {
        let view = View {
            tables: &self.tables,
            live: &self.live,
        };
        let v = f(&mut self.splice, buf, view, cx.csum)?;
        if v != Verdict::Segment {
            return Some(self.spliced(v, hdr));
        }
        if let Err(v) = self.splice_plain(buf, cx, hdr) {
            return Some(v);
        }
        let view = View {
            tables: &self.tables,
            live: &self.live,
        };
        f(&mut self.splice, buf, view, L4Csum::Full)
    }

    /// Counts a super-packet the splice translated whole.
    #[inline]
    fn spliced(&mut self, v: Verdict, hdr: &VnetHdr) -> Verdict {
        if hdr.is_gso() && matches!(v, Verdict::Forward { .. }) {
            self.splice.stats.gso_translated += 1;
        }
        v
    }

    /// The splice asked for a plain packet: a super-packet goes back to be cut
    /// (`Err(Segment)`), a lone partial checksum is completed here.
    #[cold]
    fn splice_plain(
        &mut self,
        buf: &mut [u8],
        cx: &crate::Ctx<'_>,
        hdr: &mut VnetHdr,
    ) -> Result<(), Verdict> {
        if hdr.is_gso() {
            return Err(Verdict::Segment);
        }
        if cx.csum != L4Csum::Partial {
            // (The splice never asks this of a plain packet.)
            return Err(Verdict::Drop(DropReason::RewriteFailed));
        }
        self.complete_csum(buf, cx.start, cx.end, cx.p, hdr)
            .map_err(Verdict::Drop)
    }

    /// Runs the splice timers (head and connect timeouts, retransmission of held heads, idle
    /// and closing slots) and writes the first packet they originate (a SYN to the next
    /// backend, a retransmitted head, an RST to a client) to `out`, returning its length.
    /// Call it with every housekeeping round until it returns `None`; write each packet out
    /// as a forwarded one.
    pub fn splice_poll(&mut self, out: &mut [u8], now: Instant) -> Option<usize> {
        if !self.splice.is_active() {
            return None;
        }
        let view = View {
            tables: &self.tables,
            live: &self.live,
        };
        let n = self.splice.poll(out, view, now, 4096);
        self.splice_counts();
        n
    }

    /// The splice path's counters.
    pub fn splice_stats(&self) -> SpliceStats {
        self.splice.stats
    }
}

#[path = "splice_sync.rs"]
mod sync;

#[cfg(test)]
#[path = "splice_tests.rs"]
mod tests;
