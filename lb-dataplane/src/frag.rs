//! IP fragments (IPv4 and IPv6): forwarded, not reassembled.
//!
//! A first fragment carries the transport header (ports; for SIP the start of the message,
//! where the Call-ID header is), so it is classified, tracked, placed and rewritten like a
//! whole datagram. Its checksum covers the whole datagram, and NAT changes only addresses and
//! ports, so the RFC 1624 incremental update lb-packet applies to the first fragment's
//! transport checksum stays exact without seeing the other fragments. Non-first fragments
//! carry no ports: they are tied to their first fragment by the datagram's identity (RFC 791
//! §3.2: source, destination, protocol, identification; RFC 8200 §4.5 for IPv6) in a
//! [`FragTable`], and get the same treatment: the same new addresses (modes `nat`, `dnat` and
//! the replies: only the IP header and, for IPv4, its checksum change), the same backend and
//! entropy (`tunnel`) or the same MAC addresses (`dr`). Both directions work alike: a reply
//! datagram's first fragment finds its flow by the reverse index, its later fragments follow.
//!
//! Why not reassemble (what IPVS gets from the kernel's defrag): reassembly holds whole
//! datagrams (up to 64 KiB each) in the data path, copies every byte, and must emit a datagram
//! larger than the MTU that someone re-fragments on the way out. Mapping holds 112 bytes per
//! datagram in flight, copies nothing, and forwards every fragment as it comes. What it gives
//! up: a non-first fragment that arrives before its first fragment has nothing to follow and
//! is dropped ([`DropReason::Fragment`](crate::DropReason::Fragment)); the sender's transport
//! retransmits the datagram (IP stacks send fragments in order, and a single path rarely
//! reorders them). For SIP with `affinity = "sip-call-id"` the Call-ID is read from the first
//! fragment: SIP puts every header before the body, and the first fragment holds the first
//! 1472 bytes of the message at an MTU of 1500, where the Call-ID header of any ordinary
//! request sits. A message whose Call-ID is further in is placed by its 5-tuple and counted
//! ([`BackendStats::sip_call_id_misses`](crate::BackendStats::sip_call_id_misses)), as any
//! datagram without a Call-ID.
//!
//! Bounds: [`DataplaneSpec::frag_capacity`](crate::DataplaneSpec::frag_capacity) datagrams in
//! flight (8-way set-associative over a keyed hash: a full set evicts its entry closest to
//! expiry, [`Stats::frag_evicted`](crate::Stats::frag_evicted)); each entry lives
//! [`DataplaneSpec::frag_timeout`](crate::DataplaneSpec::frag_timeout) after its first
//! fragment, or until every byte of its datagram has gone through
//! ([`Stats::frag_completed`](crate::Stats::frag_completed)). Expiry is lazy (a lookup or an
//! insert that meets an old entry frees it): no housekeeping call, bounded work per packet.
//!
//! ICMP: "fragmentation needed" is unchanged. IPv4 fragments never carry DF, so in mode
//! `tunnel` they are encapsulated with DF clear whatever their size; an IPv6 first fragment
//! that no longer fits once encapsulated is answered with "packet too big", and the rest of
//! its datagram is then dropped (nothing to follow), the sender re-sending smaller. ICMP
//! errors quoting a first fragment carry its ports and follow the flow; errors quoting a
//! non-first fragment (no ports) find no flow and are dropped.

use std::net::{IpAddr, SocketAddr};

use lb_core::{BackendId, Duration, FlowHasher, Instant};
use lb_packet::offload::{L4Csum, VnetHdr};
use lb_packet::{dr, fragment_info, nat, Family, Fragment, FragmentInfo, Parsed};

use crate::{encapsulate, tcp_flags, Ctx, Dataplane, DropReason, Link, Mode, Verdict};

/// Default [`DataplaneSpec::frag_capacity`](crate::DataplaneSpec::frag_capacity): datagrams
/// whose fragments are in flight at once.
pub const FRAG_CAPACITY: usize = 4096;

/// The most datagrams a fragment table tracks (larger capacities are cut to this).
pub const MAX_FRAG_CAPACITY: usize = 1 << 20;

/// Default [`DataplaneSpec::frag_timeout`](crate::DataplaneSpec::frag_timeout). The fragments
/// of a datagram leave the sender back to back; Linux waits 30 s to reassemble
/// (`ipfrag_time`), but a long lifetime here only widens the window in which a reused IPv4
/// identification (16 bits per source and destination) would meet a stale entry.
pub const FRAG_TIMEOUT: Duration = Duration::from_secs(5);

/// Slots probed per datagram.
const WAYS: usize = 8;

/// A datagram's identity (RFC 791 §3.2, RFC 8200 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DatagramKey {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u32,
}

impl DatagramKey {
    /// The identity of the datagram `fi` belongs to.
    pub(crate) fn of(fi: &FragmentInfo) -> DatagramKey {
        DatagramKey {
            src: fi.src,
            dst: fi.dst,
            proto: fi.proto,
            id: fi.id,
        }
    }

    fn hash(&self, h: &FlowHasher) -> u64 {
        let mut b = [0u8; 37];
        let put = |b: &mut [u8], a: IpAddr| match a {
            IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => b[..16].copy_from_slice(&a.octets()),
        };
        put(&mut b[..16], self.src);
        put(&mut b[16..32], self.dst);
        b[32] = self.proto;
        b[33..37].copy_from_slice(&self.id.to_be_bytes());
        h.hash_bytes(&b)
    }
}

/// What the later fragments of a datagram get: what its first fragment got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FragAction {
    /// Modes `nat` and `dnat`, and replies: these source and destination addresses.
    Rewrite {
        /// New source address.
        src: IpAddr,
        /// New destination address.
        dst: IpAddr,
    },
    /// Mode `tunnel`: encapsulated to the backend, with the flow's hash as entropy.
    Tunnel {
        /// The first fragment's flow hash.
        hash: u64,
    },
    /// Mode `dr`: the backend's MAC address.
    Dr,
}

/// One datagram in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    key: DatagramKey,
    /// What to do with its later fragments.
    pub(crate) action: FragAction,
    /// Its backend (for the counters; required for `tunnel` and `dr`).
    pub(crate) backend: Option<BackendId>,
    /// A reply (backend → client) rather than a request.
    pub(crate) reply: bool,
    expires: Instant,
    /// Fragment bytes forwarded so far.
    seen: u32,
    /// The datagram's fragmentable length, once its last fragment was seen.
    total: Option<u32>,
}

impl Entry {
    fn complete(&self) -> bool {
        self.total.is_some_and(|t| self.seen >= t)
    }
}

/// What [`FragTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FragInsert {
    /// Into a free slot.
    New,
    /// Over an entry of the same datagram (its first fragment seen again).
    Replaced,
    /// Over an expired entry whose datagram never completed.
    Expired,
    /// Over a live entry: the set was full.
    Evicted,
}

/// What [`FragTable::lookup`] found for a non-first fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FragLookup {
    /// The datagram's entry; `done` when this fragment completed it (the entry is gone).
    Hit {
        /// The entry (as it was).
        entry: Entry,
        /// The datagram is complete.
        done: bool,
    },
    /// No entry: first fragment not seen (yet), evicted, or the datagram already complete.
    Miss,
    /// Its entry had expired (and is gone now).
    Expired,
}

/// The datagrams whose first fragment went through, by identity: fixed capacity, 8-way
/// set-associative over a keyed hash, no allocation after construction, lazy expiry.
#[derive(Debug)]
pub(crate) struct FragTable {
    slots: Box<[Option<Entry>]>,
    mask: usize,
    timeout: Duration,
    hasher: FlowHasher,
    len: usize,
}

impl FragTable {
    /// A table for `capacity` datagrams (rounded up to a power of two, at least [`WAYS`],
    /// at most [`MAX_FRAG_CAPACITY`]; 0: no table, every fragment is dropped).
    pub(crate) fn new(capacity: usize, timeout: Duration, hasher: FlowHasher) -> FragTable {
        let n = if capacity == 0 {
            0
        } else {
            capacity.clamp(WAYS, MAX_FRAG_CAPACITY).next_power_of_two()
        };
        FragTable {
            slots: vec![None; n].into_boxed_slice(),
            mask: n.saturating_sub(1),
            timeout,
            hasher,
            len: 0,
        }
    }

    /// Datagrams it can hold (0: fragments are dropped).
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Entries held (some may have expired, not yet freed).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of memory held (fixed at construction).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.len() * core::mem::size_of::<Option<Entry>>()
    }

    fn set(&self, key: &DatagramKey) -> impl Iterator<Item = usize> {
        let base = key.hash(&self.hasher) as usize;
        let mask = self.mask;
        (0..WAYS.min(self.slots.len())).map(move |i| (base.wrapping_add(i)) & mask)
    }

    /// Records the datagram of first fragment `first` with what its later fragments get.
    pub(crate) fn insert(
        &mut self,
        key: DatagramKey,
        action: FragAction,
        (backend, reply): (Option<BackendId>, bool),
        first: &FragmentInfo,
        now: Instant,
    ) -> Option<FragInsert> {
        if self.slots.is_empty() {
            return None;
        }
        let entry = Entry {
            key,
            action,
            backend,
            reply,
            expires: now.saturating_add(self.timeout),
            seen: first.len,
            total: None,
        };
        let mut free = None;
        let mut stale = None;
        let mut oldest: Option<(usize, Instant)> = None;
        for i in self.set(&key) {
            match self.slots.get(i).copied().flatten() {
                Some(e) if e.key == key => {
                    self.slots[i] = Some(entry);
                    return Some(FragInsert::Replaced);
                }
                Some(e) if e.expires <= now => {
                    stale = stale.or(Some(i));
                }
                Some(e) => {
                    if oldest.is_none_or(|(_, t)| e.expires < t) {
                        oldest = Some((i, e.expires));
                    }
                }
                None => free = free.or(Some(i)),
            }
        }
        let (i, outcome) = match (free, stale, oldest) {
            (Some(i), _, _) => {
                self.len += 1;
                (i, FragInsert::New)
            }
            (None, Some(i), _) => (i, FragInsert::Expired),
            (None, None, Some((i, _))) => (i, FragInsert::Evicted),
            (None, None, None) => return None,
        };
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(entry);
        }
        Some(outcome)
    }

    /// Frees the entries of datagrams sent to a backend for which `gone` is true (their ids
    /// are about to name other backends: their later fragments are dropped rather than sent
    /// there). Visits every slot: control path.
    pub(crate) fn forget(&mut self, gone: impl Fn(BackendId) -> bool) {
        for s in self.slots.iter_mut() {
            if s.is_some_and(|e| e.backend.is_some_and(&gone)) {
                *s = None;
                self.len = self.len.saturating_sub(1);
            }
        }
    }

    /// The entry of non-first fragment `fi`'s datagram, counting its bytes; frees the entry
    /// once the datagram is complete or expired.
    pub(crate) fn lookup(&mut self, fi: &FragmentInfo, now: Instant) -> FragLookup {
        let key = DatagramKey::of(fi);
        let Some(i) = self.set(&key).find(|&i| {
            self.slots
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|e| e.key == key)
        }) else {
            return FragLookup::Miss;
        };
        let Some(Some(e)) = self.slots.get_mut(i) else {
            return FragLookup::Miss;
        };
        if e.expires <= now {
            self.slots[i] = None;
            self.len -= 1;
            return FragLookup::Expired;
        }
        e.seen = e.seen.saturating_add(fi.len);
        if !fi.more {
            e.total = Some(fi.data_end());
        }
        let entry = *e;
        let done = entry.complete();
        if done {
            self.slots[i] = None;
            self.len -= 1;
        }
        FragLookup::Hit { entry, done }
    }
}

/// The backend of a NAT-mode service at `addr` (the first fragment's new destination).
fn nat_backend(d: &Dataplane, si: usize, addr: IpAddr) -> Option<BackendId> {
    let vip = d.tables.services.get(si)?.vip;
    d.tables
        .backends
        .iter()
        .flatten()
        .find(|b| b.vip == vip && b.addr.ip() == addr)
        .map(|b| b.id)
}

/// The backend a reply comes from (`src`), for the counters.
fn reply_backend(d: &Dataplane, src: SocketAddr) -> Option<BackendId> {
    d.tables
        .backends
        .iter()
        .flatten()
        .find(|b| {
            matches!(b.mode, Mode::Nat | Mode::Dnat)
                && b.addr.ip() == src.ip()
                && (b.addr.port() == src.port() || b.addr.port() == 0)
        })
        .map(|b| b.id)
}

/// The source and destination addresses of the IP header at `l3`.
fn addrs(buf: &[u8], l3: usize, family: Family) -> Option<(IpAddr, IpAddr)> {
    match family {
        Family::V4 => {
            let s: [u8; 4] = buf.get(l3 + 12..l3 + 16)?.try_into().ok()?;
            let d: [u8; 4] = buf.get(l3 + 16..l3 + 20)?.try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        Family::V6 => {
            let s: [u8; 16] = buf.get(l3 + 8..l3 + 24)?.try_into().ok()?;
            let d: [u8; 16] = buf.get(l3 + 24..l3 + 40)?.try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
    }
}

impl Dataplane {
    /// A fragment (`p.fragment` is not [`Fragment::None`]) at `buf[start..end]`, addressed to
    /// service `si` (`None`: a reply, or a non-first fragment, which has no port to classify
    /// by).
    pub(crate) fn fragment(
        &mut self,
        buf: &mut [u8],
        (start, end): (usize, usize),
        p: &Parsed,
        si: Option<usize>,
        now: Instant,
    ) -> Verdict {
        if self.frag.capacity() == 0 {
            return Verdict::Drop(DropReason::Fragment);
        }
        let Some(pkt) = buf.get(start..end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let Ok(fi) = fragment_info(pkt, p) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let cx = Ctx {
            start,
            end,
            p,
            flags: tcp_flags(pkt, p),
            bytes: u32::try_from(p.end - p.l3).unwrap_or(u32::MAX),
            segs: 1,
            csum: L4Csum::Full,
            hash: None,
            now,
        };
        if p.fragment == Fragment::First {
            self.first_fragment(buf, &cx, si, &fi)
        } else {
            self.later_fragment(buf, &cx, &fi)
        }
    }

    /// A first fragment: the ordinary path, then its datagram is recorded for the rest.
    fn first_fragment(
        &mut self,
        buf: &mut [u8],
        cx: &Ctx<'_>,
        si: Option<usize>,
        fi: &FragmentInfo,
    ) -> Verdict {
        let Ctx { p, now, .. } = *cx;
        self.stats.frag_first += 1;
        let mut none = VnetHdr::NONE;
        let v = match si {
            Some(si) => self.forward(buf, cx, si, &mut none),
            None => self.reply(buf, cx),
        };
        let Verdict::Forward { start: out, .. } = v else {
            return v;
        };
        let mode = si
            .and_then(|si| self.tables.services.get(si))
            .map(|s| s.mode);
        let rewritten = || addrs(buf, out + p.l3, p.family);
        let (action, backend, reply) = match (mode, si) {
            (Some(Mode::Tunnel), _) => (
                FragAction::Tunnel {
                    hash: self.flows.hash_flow(&p.key),
                },
                self.flow_backend(&p.key, now),
                false,
            ),
            (Some(Mode::Dr), _) => (FragAction::Dr, self.flow_backend(&p.key, now), false),
            (Some(Mode::Nat | Mode::Dnat), Some(si)) => {
                let Some((src, dst)) = rewritten() else {
                    return v;
                };
                (
                    FragAction::Rewrite { src, dst },
                    nat_backend(self, si, dst),
                    false,
                )
            }
            _ => {
                let Some((src, dst)) = rewritten() else {
                    return v;
                };
                let from = SocketAddr::new(p.key.src(), p.key.src_port());
                (
                    FragAction::Rewrite { src, dst },
                    reply_backend(self, from),
                    true,
                )
            }
        };
        if matches!(action, FragAction::Tunnel { .. } | FragAction::Dr) && backend.is_none() {
            // A stateless placement the flow table refused to record: nothing to follow.
            self.stats.frag_unrecorded += 1;
            return v;
        }
        let ins = self
            .frag
            .insert(DatagramKey::of(fi), action, (backend, reply), fi, now);
        match ins {
            Some(FragInsert::Evicted) => self.stats.frag_evicted += 1,
            Some(FragInsert::Expired) => self.stats.frag_expired += 1,
            Some(_) => {}
            None => self.stats.frag_unrecorded += 1,
        }
        v
    }

    /// A non-first fragment: what its first fragment got, or dropped if it was not seen.
    fn later_fragment(&mut self, buf: &mut [u8], cx: &Ctx<'_>, fi: &FragmentInfo) -> Verdict {
        let Ctx {
            start,
            end,
            p,
            bytes,
            now,
            ..
        } = *cx;
        let (entry, done) = match self.frag.lookup(fi, now) {
            FragLookup::Hit { entry, done } => (entry, done),
            FragLookup::Expired => {
                self.stats.frag_expired += 1;
                return Verdict::Drop(DropReason::Fragment);
            }
            FragLookup::Miss => return Verdict::Drop(DropReason::Fragment),
        };
        if done {
            self.stats.frag_completed += 1;
        }
        let tables = &*self.tables;
        let b = entry.backend.and_then(|id| tables.backend(id));
        let Some(pkt) = buf.get_mut(start..end) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let done_v = Verdict::Forward {
            start,
            len: end - start,
        };
        let v = match (entry.action, b) {
            (FragAction::Rewrite { src, dst }, _) => {
                // Ports are ignored for a non-first fragment: only addresses change.
                let (s, d) = (SocketAddr::new(src, 0), SocketAddr::new(dst, 0));
                match nat::rewrite(pkt, p, Some(s), Some(d)) {
                    Ok(()) => done_v,
                    Err(_) => Verdict::Drop(DropReason::RewriteFailed),
                }
            }
            (FragAction::Tunnel { hash }, Some(b)) => {
                encapsulate(buf, cx, b, tables, hash, &mut self.icmp).0
            }
            (FragAction::Dr, Some(b)) if self.link == Link::Ethernet => {
                match b.mac.map(|m| dr::set_macs(pkt, m, Some(tables.mac))) {
                    Some(Ok(_)) => done_v,
                    _ => Verdict::Drop(DropReason::RewriteFailed),
                }
            }
            _ => Verdict::Drop(DropReason::NoBackend),
        };
        if let Verdict::Forward { .. } = v {
            self.stats.frag_forwarded += 1;
            if let Some(s) = entry
                .backend
                .and_then(|id| self.stats.backends.get_mut(id.get() as usize))
            {
                if entry.reply {
                    s.reply_packets += 1;
                    s.reply_bytes += u64::from(bytes);
                } else {
                    s.packets += 1;
                    s.bytes += u64::from(bytes);
                }
            }
        }
        v
    }

    /// Bytes held by the fragment table (fixed at construction).
    pub fn frag_memory_bytes(&self) -> usize {
        self.frag.memory_bytes()
    }
}

#[cfg(test)]
#[path = "frag_tests.rs"]
mod tests;
