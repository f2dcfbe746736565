//! Persistence templates: client affinity (IPVS `-p`) and layer-5 affinity keys.
//!
//! A template binds either *(client address masked to a prefix, service)* or *(service,
//! affinity key)*, e.g. a keyed hash of a SIP Call-ID, to a backend, with its own idle
//! timeout. While connections that were placed through a client template are alive, the
//! template is pinned (its reference count is above zero) and does not expire; when the last one
//! goes, its timeout starts again (IPVS' behaviour).
//!
//! Templates live in a fixed-capacity slab indexed by a `hashbrown::HashTable` under the keyed
//! flow hash. Two LRU lists give bounded expiry and eviction (a segmented LRU): *new* templates,
//! used once so far, and *established* ones, used again (looked up, pinned by a connection, or
//! synced as established). A SIP call becomes established with its second message, a client
//! template with its first connection. When the table is full a new template takes, in order, the
//! slot of an expired established template, of an expired new one, or of the oldest live new one
//! (counted as [`PersistCounters::shed`]); when every template is live and established the new one
//! is refused ([`PersistInsert::Full`], counted as [`PersistCounters::refused`]). So a spray of
//! made-up keys (random SIP Call-IDs, each seen once) only ever displaces other keys seen once:
//! it can never evict a call with traffic inside its timeout, and it is the spray that is shed.
//! Because timeouts may differ per template, expiry stops at the first live head of each list: a
//! template with a shorter timeout behind a longer one waits there (lookups always check the
//! deadline, so an expired template is never returned). [`PersistTable::sweep`] bounds that wait:
//! it reads the slots in address order, a slice per call, and removes what has timed out, so that
//! a full table does not shed a live template, or refuse a new one, while timed-out ones it cannot
//! see from the heads hold their places.
//!
//! State sync exports templates ([`PersistTable::export_chunk`], [`PersistTable::get`]) and
//! installs them on the backup with their remaining time and their idle timeout (see
//! [`crate::sync::apply_template`]): the remaining time runs out first, and every later use
//! restarts the full idle timeout, as on the active. A template pinned by flows on the active is
//! pinned on the backup by the synced flows that carry their persistence prefix; one such flow
//! that arrives before its template installs a placeholder bound to its own backend, with no
//! idle time (it goes with its last flow unless the template itself arrives meanwhile).

use std::net::IpAddr;

use hashbrown::HashTable;
use lb_core::{
    BackendId, Duration, FlowHasher, FlowKey, HashKey, Instant, IpProto, KeyedHash, SipHash13,
};

use crate::entry::NIL;
use crate::ConntrackError;

/// A virtual service: address, port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Service {
    /// Virtual IP address.
    pub vip: IpAddr,
    /// Port (0 for a port-less "firewall mark" style service).
    pub port: u16,
    /// Protocol.
    pub proto: IpProto,
}

impl Service {
    /// The service a flow is addressed to (its destination).
    #[inline]
    pub fn of_flow(key: &FlowKey) -> Service {
        Service {
            vip: key.dst(),
            port: key.dst_port(),
            proto: key.proto(),
        }
    }
}

/// What a template is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplateKey {
    /// Client affinity: the client address masked to `prefix` bits, and the service.
    Client {
        /// The masked client address (use [`TemplateKey::client`] to build it).
        client: IpAddr,
        /// Prefix length (clamped to 32 for IPv4, 128 for IPv6).
        prefix: u8,
        /// The service.
        service: Service,
    },
    /// An arbitrary affinity key (e.g. a keyed hash of a SIP Call-ID) within a service.
    Affinity {
        /// The service.
        service: Service,
        /// The affinity key.
        key: u64,
    },
}

/// `addr` with all but its first `prefix` bits cleared.
pub fn mask_addr(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let p = u32::from(prefix.min(32));
            let m = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let p = u32::from(prefix.min(128));
            let m = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl TemplateKey {
    /// A client-affinity key: `client` masked to `prefix` bits (e.g. 24 for IPVS' default
    /// persistence netmask 255.255.255.0, or 32 for one address).
    pub fn client(client: IpAddr, prefix: u8, service: Service) -> Self {
        let max = if client.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.min(max);
        TemplateKey::Client {
            client: mask_addr(client, prefix),
            prefix,
            service,
        }
    }

    /// An affinity-key template key.
    pub fn affinity(service: Service, key: u64) -> Self {
        TemplateKey::Affinity { service, key }
    }

    /// A fixed-length encoding for hashing.
    fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        let (tag, service) = match self {
            TemplateKey::Client {
                client,
                prefix,
                service,
            } => {
                b[1] = *prefix;
                write_addr(&mut b[4..20], *client);
                (1, service)
            }
            TemplateKey::Affinity { service, key } => {
                b[4..12].copy_from_slice(&key.to_le_bytes());
                (2, service)
            }
        };
        b[0] = tag;
        b[2] = service.proto.number();
        b[20..22].copy_from_slice(&service.port.to_be_bytes());
        write_addr(&mut b[22..38], service.vip);
        b[38] = if service.vip.is_ipv4() { 4 } else { 6 };
        b
    }
}

fn write_addr(out: &mut [u8], a: IpAddr) {
    match a {
        IpAddr::V4(a) => out.iter_mut().zip(a.octets()).for_each(|(o, x)| *o = x),
        IpAddr::V6(a) => out.iter_mut().zip(a.octets()).for_each(|(o, x)| *o = x),
    }
}

#[derive(Debug, Clone, Copy)]
struct Template {
    key: TemplateKey,
    backend: BackendId,
    /// Last use, milliseconds.
    last: u64,
    /// Time to live after `last`, unless pinned.
    timeout_ms: u64,
    /// The idle timeout: `timeout_ms` after each use (it differs only for a synced template
    /// not used since it was installed with its remaining time).
    idle_ms: u64,
    refs: u32,
    prev: u32,
    next: u32,
    /// Used more than once: in the established list (else the new list).
    established: bool,
    /// The index points at this slot (else it is free and keeps its last template).
    held: bool,
}

/// The new list (templates used once) and the established list.
const NEW: usize = 0;
const ESTABLISHED: usize = 1;

/// What a persistence table did when it was full, since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PersistCounters {
    /// Live templates used only once (e.g. a SIP Call-ID seen in one message) evicted to make
    /// room for a new one: under a spray of made-up keys, the spray.
    pub shed: u64,
    /// New templates refused because every template was live and established (or pinned).
    pub refused: u64,
    /// Templates that became established (used a second time).
    pub established: u64,
    /// Timed-out templates removed by [`PersistTable::sweep`]: ones the lists' heads, live
    /// with a longer timeout, kept from [`PersistTable::expire`].
    pub swept: u64,
}

/// Heap bytes per template of capacity: the slot and about its share of the index.
pub(crate) const TEMPLATE_BYTES: usize = core::mem::size_of::<Template>() + 8;

/// A snapshot of one template, for inspection, export and sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateInfo {
    /// Its key.
    pub key: TemplateKey,
    /// The backend it names.
    pub backend: BackendId,
    /// When it times out if it is not used again. For a template pinned by flows, which does
    /// not time out while they live: `now` plus its idle timeout, the earliest it can.
    pub deadline: Instant,
    /// Its idle timeout: how long it lives after each use (or after its last flow leaves).
    pub timeout: Duration,
    /// Used more than once (see the module docs): eviction spares it.
    pub established: bool,
}

/// What [`PersistTable::install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Installed {
    /// A new template (possibly after evicting the least recently used unpinned one).
    New,
    /// A live template was refreshed (backend and times replaced, pins kept).
    Updated,
    /// Merging: a live template exists and was left alone.
    Kept,
    /// Full of pinned templates.
    Full,
}

/// Outcome of [`PersistTable::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistInsert {
    /// A new template.
    New,
    /// The template existed; its backend and timeout were replaced.
    Updated,
    /// A new template, after evicting an expired template or the oldest live one used only
    /// once (module docs).
    Evicted(TemplateKey),
    /// Full of live established (or pinned) templates: refused.
    Full,
}

/// A fixed-capacity table of persistence templates.
///
/// ```
/// use lb_conntrack::{PersistTable, Service, TemplateKey};
/// use lb_core::{BackendId, Duration, HashKey, Instant, IpProto};
/// let mut p = PersistTable::new(1024, HashKey::from_bytes([3; 16])).unwrap();
/// let svc = Service { vip: "203.0.113.10".parse().unwrap(), port: 443, proto: IpProto::Tcp };
/// let k = TemplateKey::client("192.0.2.77".parse().unwrap(), 24, svc);
/// p.insert(k, BackendId(2), Duration::from_secs(300), Instant::from_secs(1));
/// // Another client of the same /24 is sent to the same backend.
/// let k2 = TemplateKey::client("192.0.2.200".parse().unwrap(), 24, svc);
/// assert_eq!(p.lookup(&k2, Instant::from_secs(2)), Some(BackendId(2)));
/// assert_eq!(p.lookup(&k2, Instant::from_secs(400)), None); // timed out
/// ```
#[derive(Debug, Clone)]
pub struct PersistTable<H: KeyedHash = SipHash13> {
    hasher: FlowHasher<H>,
    index: HashTable<u32>,
    slots: Vec<Template>,
    free: Vec<u32>,
    /// (head, tail) of the new and the established lists, oldest at the head.
    lists: [(u32, u32); 2],
    capacity: usize,
    counters: PersistCounters,
    /// The slot [`PersistTable::sweep`] looks at next.
    sweep_cursor: u32,
}

fn ms(t: Instant) -> u64 {
    t.as_millis()
}

impl PersistTable<SipHash13> {
    /// A table of at most `capacity` templates, hashed with SipHash-1-3 under `key`.
    ///
    /// # Errors
    /// [`ConntrackError::InvalidCapacity`] if `capacity` is 0 or above 2^31.
    pub fn new(capacity: usize, key: HashKey) -> Result<Self, ConntrackError> {
        Self::with_hasher(capacity, key)
    }
}

impl<H: KeyedHash> PersistTable<H> {
    /// As [`PersistTable::new`] with hash function `H`.
    ///
    /// # Errors
    /// [`ConntrackError::InvalidCapacity`] if `capacity` is 0 or above 2^31.
    pub fn with_hasher(capacity: usize, key: HashKey) -> Result<Self, ConntrackError> {
        if capacity == 0 || capacity > 1 << 31 {
            return Err(ConntrackError::InvalidCapacity { capacity });
        }
        Ok(PersistTable {
            hasher: FlowHasher::with_key(key),
            index: HashTable::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            lists: [(NIL, NIL); 2],
            capacity,
            counters: PersistCounters::default(),
            sweep_cursor: 0,
        })
    }

    /// Number of templates held (including expired ones not yet reclaimed).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// What the table did when full (module docs).
    pub fn counters(&self) -> PersistCounters {
        self.counters
    }

    /// Number of established templates (used more than once), live or not yet reclaimed.
    pub fn established_len(&self) -> usize {
        let mut n = 0;
        let mut i = self.lists[ESTABLISHED].0;
        while let Some(t) = self.slots.get(i as usize) {
            n += 1;
            i = t.next;
        }
        n
    }

    #[inline]
    fn hash(&self, k: &TemplateKey) -> u64 {
        self.hasher.hash_bytes(&k.encode())
    }

    fn find(&self, k: &TemplateKey) -> Option<u32> {
        let h = self.hash(k);
        let slots = &self.slots;
        self.index
            .find(h, |&i| slots.get(i as usize).is_some_and(|t| t.key == *k))
            .copied()
    }

    fn list_of(&self, i: u32) -> usize {
        self.slots
            .get(i as usize)
            .map_or(NEW, |t| usize::from(t.established))
    }

    fn unlink(&mut self, i: u32) {
        let l = self.list_of(i);
        let Some(t) = self.slots.get(i as usize) else {
            return;
        };
        let (p, n) = (t.prev, t.next);
        match self.slots.get_mut(p as usize) {
            Some(ps) => ps.next = n,
            None => self.lists[l].0 = n,
        }
        match self.slots.get_mut(n as usize) {
            Some(ns) => ns.prev = p,
            None => self.lists[l].1 = p,
        }
    }

    /// Appends `i` (not linked) to the tail of its list.
    fn push_back(&mut self, i: u32) {
        let l = self.list_of(i);
        let t = self.lists[l].1;
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.prev = t;
            s.next = NIL;
        }
        match self.slots.get_mut(t as usize) {
            Some(ts) => ts.next = i,
            None => self.lists[l].0 = i,
        }
        self.lists[l].1 = i;
    }

    /// Moves `i` to the tail of its list (the most recently used end).
    fn move_to_tail(&mut self, i: u32) {
        if self.lists[self.list_of(i)].1 != i {
            self.unlink(i);
            self.push_back(i);
        }
    }

    /// Moves template `i` to the established list (at its tail). Returns whether it was new.
    fn establish(&mut self, i: u32) -> bool {
        match self.slots.get(i as usize) {
            Some(t) if !t.established => {}
            _ => return false,
        }
        self.unlink(i);
        if let Some(t) = self.slots.get_mut(i as usize) {
            t.established = true;
        }
        self.push_back(i);
        self.counters.established += 1;
        true
    }

    /// A use of template `i`: its idle timeout starts again at `now`.
    fn touch(&mut self, i: u32, now: Instant) {
        if let Some(t) = self.slots.get_mut(i as usize) {
            t.last = t.last.max(ms(now));
            t.timeout_ms = t.idle_ms;
        }
        self.move_to_tail(i);
    }

    fn remove_slot(&mut self, i: u32) -> Option<TemplateKey> {
        let key = self.slots.get(i as usize).filter(|t| t.held)?.key;
        let h = self.hash(&key);
        if let Ok(e) = self.index.find_entry(h, |&x| x == i) {
            e.remove();
        }
        self.unlink(i);
        if let Some(t) = self.slots.get_mut(i as usize) {
            t.held = false;
        }
        self.free.push(i);
        Some(key)
    }

    fn expired(t: &Template, now: Instant) -> bool {
        t.refs == 0 && ms(now).saturating_sub(t.last) >= t.timeout_ms
    }

    /// The backend of the template `key`, refreshing its idle timer; a template used once
    /// before becomes established. An expired template is removed and `None` returned.
    pub fn lookup(&mut self, key: &TemplateKey, now: Instant) -> Option<BackendId> {
        self.lookup_use(key, now).map(|(b, _)| b)
    }

    /// As [`PersistTable::lookup`], also telling whether this use made the template
    /// established (its second use: worth telling a sync peer, see
    /// [`TemplateInfo::established`]).
    pub fn lookup_use(&mut self, key: &TemplateKey, now: Instant) -> Option<(BackendId, bool)> {
        let i = self.find(key)?;
        let t = *self.slots.get(i as usize)?;
        if Self::expired(&t, now) {
            self.remove_slot(i);
            return None;
        }
        self.touch(i, now);
        let promoted = self.establish(i);
        Some((t.backend, promoted))
    }

    /// The backend of `key` without refreshing (expired templates read as absent).
    pub fn peek(&self, key: &TemplateKey, now: Instant) -> Option<BackendId> {
        let t = self.slots.get(self.find(key)? as usize)?;
        (!Self::expired(t, now)).then_some(t.backend)
    }

    fn info(t: &Template, now: Instant) -> TemplateInfo {
        let deadline = if t.refs > 0 {
            ms(now).saturating_add(t.idle_ms)
        } else {
            t.last.saturating_add(t.timeout_ms)
        };
        TemplateInfo {
            key: t.key,
            backend: t.backend,
            deadline: Instant::from_millis(deadline),
            timeout: Duration::from_millis(t.idle_ms),
            established: t.established,
        }
    }

    /// A snapshot of template `key` if it is live at `now` (does not refresh it).
    pub fn get(&self, key: &TemplateKey, now: Instant) -> Option<TemplateInfo> {
        let t = self.slots.get(self.find(key)? as usize)?;
        (!Self::expired(t, now)).then(|| Self::info(t, now))
    }

    /// Snapshots up to `max` templates live at `now` from slot `cursor` on, appending them to
    /// `out`, and returns the cursor to continue from (`None` when done). Bounded work: at most
    /// `max` templates and `4 × max` slots are visited per call. Used for bulk sync, after
    /// [`ConnTable::export_chunk`](crate::ConnTable::export_chunk).
    pub fn export_chunk(
        &self,
        cursor: u32,
        max: usize,
        now: Instant,
        out: &mut Vec<TemplateInfo>,
    ) -> Option<u32> {
        let mut i = cursor as usize;
        let mut visited = 0;
        let mut taken = 0;
        while i < self.slots.len() && taken < max && visited < max.saturating_mul(4).max(1) {
            if let Some(t) = self
                .slots
                .get(i)
                .filter(|t| t.held && !Self::expired(t, now))
            {
                out.push(Self::info(t, now));
                taken += 1;
            }
            i += 1;
            visited += 1;
        }
        (i < self.slots.len()).then_some(i as u32)
    }

    /// Installs or refreshes a template received by state sync: bound to `backend`, timing
    /// out `remaining` after `now` and `idle` after each later use, established if the sender
    /// says so (never the reverse). A live template is refreshed (its pins kept), or with
    /// `merge` left alone; an expired one is replaced.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn install(
        &mut self,
        key: TemplateKey,
        backend: BackendId,
        remaining: Duration,
        idle: Duration,
        now: Instant,
        merge: bool,
        established: bool,
    ) -> Installed {
        let remaining_ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let mut existing = self.find(&key);
        if let Some(i) = existing {
            let live = self
                .slots
                .get(i as usize)
                .is_some_and(|t| !Self::expired(t, now));
            if !live {
                self.remove_slot(i);
                existing = None;
            } else if merge {
                return Installed::Kept;
            }
        }
        let (i, out) = match existing {
            Some(i) => (i, Installed::Updated),
            None => {
                if self.insert(key, backend, idle, now) == PersistInsert::Full {
                    return Installed::Full;
                }
                match self.find(&key) {
                    Some(i) => (i, Installed::New),
                    None => return Installed::Full,
                }
            }
        };
        if let Some(t) = self.slots.get_mut(i as usize) {
            t.backend = backend;
            t.last = ms(now);
            t.timeout_ms = remaining_ms;
            t.idle_ms = idle_ms;
        }
        self.move_to_tail(i);
        if established {
            self.establish(i);
        }
        out
    }

    /// Removes template `key` for state sync. A template still pinned by flows stays until the
    /// last one leaves, and then goes at once. Returns whether a live template was found.
    pub(crate) fn sync_remove(&mut self, key: &TemplateKey, now: Instant) -> bool {
        let Some(i) = self.find(key) else {
            return false;
        };
        let Some(t) = self.slots.get_mut(i as usize) else {
            return false;
        };
        if t.refs > 0 {
            t.idle_ms = 0;
            t.timeout_ms = 0;
            return true;
        }
        let live = !Self::expired(t, now);
        self.remove_slot(i);
        live
    }

    /// The slot a new template takes in a full table (module docs): an expired unpinned
    /// template from the head of the established list (at most 16 looked at, pinned ones
    /// skipped), else the head of the new list, expired or not (a live one is counted as shed).
    /// `None`: every template is live and established or pinned.
    fn victim(&self, now: Instant) -> Option<u32> {
        let mut i = self.lists[ESTABLISHED].0;
        let mut steps = 0;
        while let Some(t) = self.slots.get(i as usize) {
            if t.refs == 0 {
                if Self::expired(t, now) {
                    return Some(i);
                }
                break;
            }
            steps += 1;
            if steps == 16 {
                break;
            }
            i = t.next;
        }
        let mut i = self.lists[NEW].0;
        let mut steps = 0;
        while let Some(t) = self.slots.get(i as usize) {
            if t.refs == 0 {
                return Some(i);
            }
            steps += 1;
            if steps == 16 {
                break;
            }
            i = t.next;
        }
        None
    }

    /// Binds `key` to `backend` with idle timeout `timeout`. A new template is new (used once);
    /// binding a key that exists makes it established.
    pub fn insert(
        &mut self,
        key: TemplateKey,
        backend: BackendId,
        timeout: Duration,
        now: Instant,
    ) -> PersistInsert {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if let Some(i) = self.find(&key) {
            if let Some(t) = self.slots.get_mut(i as usize) {
                t.backend = backend;
                t.idle_ms = timeout_ms;
            }
            self.touch(i, now);
            self.establish(i);
            return PersistInsert::Updated;
        }
        let mut evicted = None;
        if self.index.len() >= self.capacity {
            let Some(i) = self.victim(now) else {
                self.counters.refused += 1;
                return PersistInsert::Full;
            };
            if self
                .slots
                .get(i as usize)
                .is_some_and(|t| !Self::expired(t, now))
            {
                self.counters.shed += 1;
            }
            evicted = self.remove_slot(i);
        }
        let t = Template {
            key,
            backend,
            last: ms(now),
            timeout_ms,
            idle_ms: timeout_ms,
            refs: 0,
            prev: NIL,
            next: NIL,
            established: false,
            held: true,
        };
        let i = match self.free.pop() {
            Some(i) => {
                if let Some(s) = self.slots.get_mut(i as usize) {
                    *s = t;
                }
                i
            }
            None => {
                self.slots.push(t);
                (self.slots.len() - 1) as u32
            }
        };
        let h = self.hash(&key);
        let (hasher, slots) = (&self.hasher, &self.slots);
        self.index.insert_unique(h, i, |&x| {
            slots
                .get(x as usize)
                .map_or(0, |t| hasher.hash_bytes(&t.key.encode()))
        });
        self.push_back(i);
        match evicted {
            Some(k) => PersistInsert::Evicted(k),
            None => PersistInsert::New,
        }
    }

    /// Pins template `key` for one more connection (which makes it established). Returns
    /// whether it exists.
    pub fn attach(&mut self, key: &TemplateKey) -> bool {
        let Some(i) = self.find(key) else {
            return false;
        };
        if let Some(t) = self.slots.get_mut(i as usize) {
            t.refs = t.refs.saturating_add(1);
        }
        self.establish(i);
        true
    }

    /// Unpins template `key` for one connection; when none is left its timeout starts at `now`.
    pub fn detach(&mut self, key: &TemplateKey, now: Instant) {
        if let Some(i) = self.find(key) {
            let last_ref = match self.slots.get_mut(i as usize) {
                Some(t) => {
                    t.refs = t.refs.saturating_sub(1);
                    t.refs == 0
                }
                None => false,
            };
            if last_ref {
                self.touch(i, now);
            }
        }
    }

    /// Number of connections pinning `key` (0 if absent).
    pub fn refs(&self, key: &TemplateKey) -> u32 {
        self.find(key)
            .and_then(|i| self.slots.get(i as usize))
            .map_or(0, |t| t.refs)
    }

    /// Removes every template (pinned or not, live or expired) bound to a backend for which
    /// `gone` returns true, and returns how many. For a backend whose id is about to be reused:
    /// none of its templates may send a client to the id's next backend. Control path: visits
    /// every slot once, no allocation.
    pub fn purge_backends(&mut self, mut gone: impl FnMut(BackendId) -> bool) -> usize {
        let mut removed = 0;
        for i in 0..self.slots.len() {
            let Some(t) = self.slots.get(i) else {
                break;
            };
            // A free slot keeps its last template: only slots the index points at are held.
            if t.held && gone(t.backend) {
                self.remove_slot(i as u32);
                removed += 1;
            }
        }
        removed
    }

    /// Removes templates that timed out, looking at no more than `budget` of them (from the
    /// heads of the new and the established lists). Returns the number removed.
    pub fn expire(&mut self, now: Instant, budget: usize) -> usize {
        let mut removed = 0;
        let mut left = budget;
        for l in [NEW, ESTABLISHED] {
            while left > 0 {
                left -= 1;
                let i = self.lists[l].0;
                let Some(t) = self.slots.get(i as usize).copied() else {
                    break;
                };
                if t.refs > 0 {
                    // Pinned: move it out of the way; it is refreshed when unpinned.
                    if self.lists[l].1 == i {
                        break;
                    }
                    self.unlink(i);
                    self.push_back(i);
                } else if Self::expired(&t, now) {
                    self.remove_slot(i);
                    removed += 1;
                } else {
                    break;
                }
            }
        }
        removed
    }

    /// Reads up to `slots` slots in address order from where the last call stopped
    /// (wrapping), and removes the templates among them that have timed out, at most `budget`
    /// (the call stops there, and the next one goes on from that slot). Returns the number
    /// removed (counted as [`PersistCounters::swept`]).
    ///
    /// [`PersistTable::expire`] stops at a live head, so a template with a shorter timeout
    /// queued behind one with a longer timeout (another service's, or a synced template's
    /// remaining time) outlives its deadline until the head goes: called with a slice per
    /// housekeeping round, the sweep removes it within capacity ÷ `slots` rounds instead.
    /// A pinned template is never due (it has no deadline while flows hold it).
    pub fn sweep(&mut self, now: Instant, slots: usize, budget: usize) -> usize {
        let cap = self.slots.len();
        if cap == 0 {
            return 0;
        }
        let mut i = self.sweep_cursor as usize % cap;
        let mut n = 0;
        for _ in 0..slots.min(cap) {
            if n >= budget {
                break;
            }
            let due = self
                .slots
                .get(i)
                .is_some_and(|t| t.held && Self::expired(t, now));
            if due {
                self.remove_slot(i as u32);
                self.counters.swept += 1;
                n += 1;
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
        self.sweep_cursor = i as u32;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn svc() -> Service {
        Service {
            vip: "203.0.113.10".parse().unwrap(),
            port: 80,
            proto: IpProto::Tcp,
        }
    }

    #[test]
    fn masking() {
        let a: IpAddr = "192.0.2.77".parse().unwrap();
        assert_eq!(mask_addr(a, 24), "192.0.2.0".parse::<IpAddr>().unwrap());
        assert_eq!(mask_addr(a, 0), "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(mask_addr(a, 99), a);
        let b: IpAddr = "2001:db8:1:2::9".parse().unwrap();
        assert_eq!(mask_addr(b, 48), "2001:db8:1::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn pinned_templates_do_not_expire() {
        let mut p = PersistTable::new(4, HashKey::from_bytes([1; 16])).unwrap();
        let k = TemplateKey::client("192.0.2.1".parse().unwrap(), 32, svc());
        assert_eq!(
            p.insert(k, BackendId(1), Duration::from_secs(10), Instant::ZERO),
            PersistInsert::New
        );
        assert!(p.attach(&k));
        assert_eq!(p.expire(Instant::from_secs(100), 10), 0);
        assert_eq!(p.peek(&k, Instant::from_secs(100)), Some(BackendId(1)));
        p.detach(&k, Instant::from_secs(100));
        assert_eq!(p.expire(Instant::from_secs(105), 10), 0);
        assert_eq!(p.expire(Instant::from_secs(110), 10), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn full_evicts_unpinned_lru_or_refuses() {
        let mut p = PersistTable::new(2, HashKey::from_bytes([1; 16])).unwrap();
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        let d = Duration::from_secs(60);
        p.insert(k(1), BackendId(1), d, Instant::ZERO);
        p.insert(k(2), BackendId(2), d, Instant::ZERO);
        assert_eq!(
            p.insert(k(3), BackendId(3), d, Instant::ZERO),
            PersistInsert::Evicted(k(1))
        );
        p.attach(&k(2));
        p.attach(&k(3));
        assert_eq!(
            p.insert(k(4), BackendId(4), d, Instant::ZERO),
            PersistInsert::Full
        );
        assert_eq!(
            p.insert(k(3), BackendId(9), d, Instant::ZERO),
            PersistInsert::Updated
        );
        assert_eq!(p.lookup(&k(3), Instant::ZERO), Some(BackendId(9)));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_spray_of_new_keys_never_evicts_established_ones() {
        let mut p = PersistTable::new(8, HashKey::from_bytes([1; 16])).unwrap();
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        let d = Duration::from_secs(300);
        let t0 = Instant::from_secs(1);
        // Four calls, each seen twice (INVITE, then ACK): established.
        for n in 0..4 {
            assert_eq!(
                p.insert(k(n), BackendId(n as u32), d, t0),
                PersistInsert::New
            );
            assert_eq!(p.lookup_use(&k(n), t0), Some((BackendId(n as u32), true)));
            assert_eq!(p.lookup_use(&k(n), t0), Some((BackendId(n as u32), false)));
        }
        // A spray of 1 000 made-up Call-IDs, each seen once, all live.
        for n in 1_000..2_000 {
            assert_ne!(p.insert(k(n), BackendId(9), d, t0), PersistInsert::Full);
        }
        for n in 0..4 {
            assert_eq!(p.peek(&k(n), t0), Some(BackendId(n as u32)), "call {n}");
        }
        let c = p.counters();
        assert_eq!((c.shed, c.refused, c.established), (1_000 - 4, 0, 4));
        assert_eq!((p.len(), p.established_len()), (8, 4));
        // Only the newest spray keys are left besides the calls.
        assert_eq!(p.peek(&k(1_999), t0), Some(BackendId(9)));
        assert_eq!(p.peek(&k(1_000), t0), None);
        // A table of live established templates refuses a new one, and counts it.
        for n in 1_996..2_000 {
            assert!(p.lookup(&k(n), t0).is_some());
        }
        assert_eq!(p.insert(k(5_000), BackendId(1), d, t0), PersistInsert::Full);
        assert_eq!(p.counters().refused, 1);
        // Once one of them times out, its slot is taken before any other.
        let (t1, late) = (Instant::from_secs(200), Instant::from_secs(400));
        for n in [0, 1, 2, 3, 1_996, 1_997, 1_998] {
            assert!(p.lookup(&k(n), t1).is_some());
        }
        assert_eq!(
            p.insert(k(6_000), BackendId(1), d, late),
            PersistInsert::Evicted(k(1_999))
        );
        assert_eq!(
            p.counters().shed,
            1_000 - 4,
            "an expired template is not shed"
        );
    }

    #[test]
    fn an_expired_established_template_goes_before_a_live_new_one() {
        let mut p = PersistTable::new(2, HashKey::from_bytes([1; 16])).unwrap();
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        p.insert(k(1), BackendId(1), Duration::from_secs(10), Instant::ZERO);
        p.lookup(&k(1), Instant::ZERO);
        p.insert(k(2), BackendId(2), Duration::from_secs(100), Instant::ZERO);
        assert_eq!(
            p.insert(
                k(3),
                BackendId(3),
                Duration::from_secs(100),
                Instant::from_secs(20)
            ),
            PersistInsert::Evicted(k(1))
        );
        assert_eq!(p.peek(&k(2), Instant::from_secs(20)), Some(BackendId(2)));
        assert_eq!(p.counters().shed, 0);
    }

    #[test]
    fn synced_established_flag_and_expiry_of_both_lists() {
        let mut p = PersistTable::new(4, HashKey::from_bytes([1; 16])).unwrap();
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        let (d, t0) = (Duration::from_secs(10), Instant::ZERO);
        p.install(k(1), BackendId(1), d, d, t0, false, true);
        p.install(k(2), BackendId(2), d, d, t0, false, false);
        assert!(p.get(&k(1), t0).unwrap().established);
        assert!(!p.get(&k(2), t0).unwrap().established);
        // A later record never makes an established template new again.
        p.install(k(1), BackendId(1), d, d, t0, false, false);
        assert!(p.get(&k(1), t0).unwrap().established);
        assert_eq!(p.expire(Instant::from_secs(9), 10), 0);
        assert_eq!(p.expire(Instant::from_secs(10), 10), 2);
        assert!(p.is_empty());
    }

    #[test]
    fn slot_size() {
        // What `ConnTable::memory` counts per template, with the index's share.
        assert_eq!(core::mem::size_of::<Template>(), 88);
    }

    #[test]
    fn get_and_export_chunk() {
        let mut p = PersistTable::new(64, HashKey::from_bytes([1; 16])).unwrap();
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        let t0 = Instant::from_secs(10);
        for n in 0..40 {
            p.insert(k(n), BackendId(n as u32), Duration::from_secs(n + 1), t0);
        }
        // Pin some, and let others time out.
        for n in 0..5 {
            assert!(p.attach(&k(n)));
        }
        let now = Instant::from_secs(20); // templates 5..=9 timed out (timeouts 6..=10 s)
        assert_eq!(p.get(&k(7), now), None);
        let pinned = p.get(&k(2), now).unwrap();
        assert_eq!(
            pinned.deadline,
            Instant::from_secs(23),
            "now + idle timeout"
        );
        let idle = p.get(&k(30), now).unwrap();
        assert_eq!(
            (idle.backend, idle.deadline, idle.timeout),
            (
                BackendId(30),
                Instant::from_secs(41),
                Duration::from_secs(31)
            )
        );
        assert_eq!(
            p.expire(now, 100),
            5,
            "pinned heads are moved out of the way"
        );
        p.detach(&k(0), now);
        let mut out = Vec::new();
        let mut cursor = Some(0);
        let mut calls = 0;
        while let Some(c) = cursor {
            let before = out.len();
            cursor = p.export_chunk(c, 4, now, &mut out);
            assert!(out.len() - before <= 4);
            calls += 1;
        }
        assert!(calls >= 40 / 16);
        let mut got: Vec<u64> = out
            .iter()
            .map(|i| match i.key {
                TemplateKey::Affinity { key, .. } => key,
                TemplateKey::Client { .. } => u64::MAX,
            })
            .collect();
        got.sort_unstable();
        let want: Vec<u64> = (0..5).chain(10..40).collect();
        assert_eq!(got, want);
        assert!(out.iter().all(|i| p.get(&i.key, now) == Some(*i)));
        // Removed templates' slots are skipped.
        assert_eq!(p.expire(Instant::from_secs(100), 100), 31);
        out.clear();
        assert_eq!(p.export_chunk(0, 100, now, &mut out), None);
        let keys: Vec<_> = out.iter().map(|i| i.key).collect();
        assert_eq!(keys, [k(1), k(2), k(3), k(4)]);
    }

    #[test]
    fn purge_backends_removes_only_their_templates_pinned_or_not() {
        let mut p = PersistTable::new(64, HashKey::from_bytes([7; 16])).unwrap();
        let now = Instant::from_secs(1);
        let d = Duration::from_secs(10);
        for k in 0..30u64 {
            p.insert(
                TemplateKey::affinity(svc(), k),
                BackendId((k % 3) as u32),
                d,
                now,
            );
        }
        // Pinned templates of backend 1 go too; a freed slot is not purged twice.
        assert!(p.attach(&TemplateKey::affinity(svc(), 1)));
        p.sync_remove(&TemplateKey::affinity(svc(), 4), now);
        let n = p.purge_backends(|b| b == BackendId(1));
        assert_eq!(n, 9);
        assert_eq!(p.len(), 20);
        for k in 0..30u64 {
            let got = p.peek(&TemplateKey::affinity(svc(), k), now);
            let want = (k % 3 != 1).then_some(BackendId((k % 3) as u32));
            assert_eq!(got, want, "template {k}");
        }
        // The table stays usable: freed slots are reused, the LRU list is intact.
        for k in 100..110u64 {
            p.insert(TemplateKey::affinity(svc(), k), BackendId(1), d, now);
        }
        assert_eq!(p.len(), 30);
        assert_eq!(p.expire(Instant::from_secs(20), 100), 30);
        assert!(p.is_empty());
    }

    /// The case a fresh-clone CI run found against the model of the proptest below: a use of
    /// an established template restarts its idle timer, so ten seconds after its promotion it
    /// is still live if it was used since, and an insert into a table full of such templates
    /// is refused rather than evicting one.
    #[test]
    fn a_used_established_template_stays_live_past_its_promotion_plus_timeout() {
        let mut p = PersistTable::new(6, HashKey::from_bytes([7; 16])).unwrap();
        let d = Duration::from_secs(10);
        let mut now = Instant::ZERO;
        let ops = [
            (0, 0),
            (24, 0),
            (17, 0),
            (24, 0),
            (36, 0),
            (7, 0),
            (7, 1),
            (17, 0),
            (36, 0),
            (24, 0),
            (2, 3),
            (26, 1),
            (2, 0),
            (26, 1),
            (0, 2),
        ];
        for (k, dt) in ops {
            now += Duration::from_secs(dt);
            let key = TemplateKey::affinity(svc(), k);
            if p.lookup_use(&key, now).is_none() {
                p.insert(key, BackendId(1), d, now);
            }
        }
        // Template 24: promoted at 0 s, used again at 1 s; six established templates.
        assert_eq!(p.established_len(), 6);
        let t10 = now + Duration::from_secs(2);
        assert_eq!(t10, Instant::from_secs(10));
        let r = p.insert(TemplateKey::affinity(svc(), 3), BackendId(1), d, t10);
        assert_eq!(r, PersistInsert::Full);
        assert!(p.peek(&TemplateKey::affinity(svc(), 24), t10).is_some());
        // At 11 s its timer has run out: room again.
        let t11 = t10 + Duration::from_secs(1);
        let r = p.insert(TemplateKey::affinity(svc(), 3), BackendId(1), d, t11);
        assert_ne!(r, PersistInsert::Full);
    }

    /// Expiry stops at a live head: timed-out templates behind it hold their places, and a
    /// full table refuses a new template (nothing new to shed, the head established and live)
    /// until the sweep removes them.
    #[test]
    fn timed_out_templates_behind_a_live_head_wait_for_the_sweep() {
        let mut p = PersistTable::new(4, HashKey::from_bytes([4; 16])).unwrap();
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        let t0 = Instant::ZERO;
        p.insert(k(1), BackendId(1), Duration::from_secs(100), t0);
        for n in 2..=4 {
            p.insert(k(n), BackendId(2), Duration::from_secs(10), t0);
        }
        for n in 1..=4 {
            assert!(p.lookup(&k(n), t0).is_some(), "template {n} established");
        }
        let t20 = Instant::from_secs(20);
        assert_eq!(p.expire(t20, 16), 0, "the head (100 s) is live");
        assert_eq!(p.len(), 4);
        assert_eq!(p.peek(&k(3), t20), None, "timed out, never returned");
        assert_eq!(
            p.insert(k(9), BackendId(3), Duration::from_secs(10), t20),
            PersistInsert::Full
        );
        assert_eq!(p.sweep(t20, 4, 16), 3);
        assert_eq!((p.len(), p.counters().swept), (1, 3));
        assert_eq!(p.peek(&k(1), t20), Some(BackendId(1)));
        assert_eq!(
            p.insert(k(9), BackendId(3), Duration::from_secs(10), t20),
            PersistInsert::New
        );
        // Freed slots keep their last template: the sweep does not take them for held ones.
        assert_eq!(p.sweep(Instant::from_secs(25), 4, 16), 0);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn the_sweep_spares_pinned_templates_and_resumes_where_it_stopped() {
        let mut p = PersistTable::new(8, HashKey::from_bytes([5; 16])).unwrap();
        assert_eq!(p.sweep(Instant::ZERO, 8, 8), 0, "an empty table");
        let k = |n: u64| TemplateKey::affinity(svc(), n);
        let d = Duration::from_secs(10);
        for n in 0..6 {
            p.insert(k(n), BackendId(1), d, Instant::ZERO);
        }
        assert!(p.attach(&k(2)));
        let late = Instant::from_secs(60);
        // Budget 0: nothing; budget 2: the first two due, and the next call goes on from there.
        assert_eq!(p.sweep(late, 6, 0), 0);
        assert_eq!(p.sweep(late, 6, 2), 2);
        assert_eq!((p.peek(&k(0), late), p.refs(&k(1))), (None, 0));
        assert_eq!(p.len(), 4);
        // Two slots from where it stopped (slot 2, pinned, and slot 3).
        assert_eq!(p.sweep(late, 2, 8), 1);
        assert_eq!(p.sweep(late, 6, 8), 2, "the rest, wrapping");
        assert_eq!(p.len(), 1, "only the pinned one");
        assert_eq!(p.refs(&k(2)), 1);
        p.detach(&k(2), late);
        assert_eq!(p.sweep(late + d, 6, 8), 1, "unpinned at 60 s, due at 70 s");
        assert!(p.is_empty());
        assert_eq!(p.counters().swept, 6);
    }

    proptest! {
        #[test]
        fn never_exceeds_capacity_and_lookups_match_model(
            ops in proptest::collection::vec((0u64..12, 0u32..4, 0u64..30), 1..150)
        ) {
            let cap = 5;
            let mut p = PersistTable::new(cap, HashKey::from_bytes([7; 16])).unwrap();
            let mut now = Instant::ZERO;
            let d = Duration::from_secs(10);
            for (k, b, dt) in ops {
                now += Duration::from_secs(dt);
                let key = TemplateKey::affinity(svc(), k);
                let before = p.peek(&key, now);
                match p.lookup(&key, now) {
                    Some(got) => prop_assert_eq!(Some(got), before),
                    None => {
                        prop_assert_eq!(before, None);
                        let r = p.insert(key, BackendId(b), d, now);
                        prop_assert!(r != PersistInsert::Full);
                        prop_assert_eq!(p.peek(&key, now), Some(BackendId(b)));
                    }
                }
                p.expire(now, 3);
                prop_assert!(p.len() <= cap);
            }
        }

        /// With timeouts that differ per template, uses, pins and time steps in any order, the
        /// sweep removes only timed-out templates, and a sweep of every slot leaves exactly the
        /// live ones (expiry alone may not).
        #[test]
        fn the_sweep_removes_exactly_the_timed_out(
            ops in proptest::collection::vec((0u8..5, 0u64..10, 0u64..20), 1..200)
        ) {
            let cap = 8;
            let mut p = PersistTable::new(cap, HashKey::from_bytes([9; 16])).unwrap();
            let mut now = Instant::ZERO;
            let key = |n: u64| TemplateKey::affinity(svc(), n);
            for (op, k, x) in ops {
                match op {
                    0 => {
                        let d = Duration::from_secs(1 + (k * 7 + x) % 30);
                        p.insert(key(k), BackendId(1), d, now);
                    }
                    1 => {
                        p.lookup(&key(k), now);
                    }
                    2 => {
                        if p.refs(&key(k)) > 0 {
                            p.detach(&key(k), now);
                        } else {
                            p.attach(&key(k));
                        }
                    }
                    3 => now += Duration::from_secs(x),
                    _ => {
                        let live: Vec<_> = (0..10).map(|n| p.peek(&key(n), now)).collect();
                        let before = p.len();
                        let n = p.sweep(now, usize::try_from(x).unwrap(), 4);
                        prop_assert!(n <= 4);
                        prop_assert_eq!(p.len(), before - n);
                        let after: Vec<_> = (0..10).map(|n| p.peek(&key(n), now)).collect();
                        prop_assert_eq!(live, after, "a live template was swept");
                    }
                }
                p.expire(now, 2);
                prop_assert!(p.len() <= cap);
            }
            p.sweep(now, cap, cap);
            let live = (0..10).filter(|&n| p.peek(&key(n), now).is_some()).count();
            prop_assert_eq!(p.len(), live);
        }

        /// Whatever the order of uses, inserts and time steps, a live established template is
        /// never evicted: it leaves only by timing out.
        #[test]
        fn live_established_templates_are_never_evicted(
            ops in proptest::collection::vec((0u64..40, 0u64..4), 1..300)
        ) {
            let cap = 6;
            let mut p = PersistTable::new(cap, HashKey::from_bytes([7; 16])).unwrap();
            let mut now = Instant::ZERO;
            let d = Duration::from_secs(10);
            let mut established: Vec<(u64, Instant)> = Vec::new();
            for (k, dt) in ops {
                now += Duration::from_secs(dt);
                let key = TemplateKey::affinity(svc(), k);
                match p.lookup_use(&key, now) {
                    Some(_) => {
                        // A hit is the template's second use at least (its insertion was the
                        // first): established now, and its idle timer restarts, whether this
                        // use promoted it or it was established already. (The model once
                        // restarted the timer only on promotion, and a fresh-clone CI run
                        // found a table right to refuse an insert the model expected.)
                        established.retain(|(x, _)| *x != k);
                        established.push((k, now));
                    }
                    None => {
                        established.retain(|(x, _)| *x != k);
                        let r = p.insert(key, BackendId(1), d, now);
                        let live = established.iter().filter(|(_, t)| now - *t < d).count();
                        prop_assert_eq!(r == PersistInsert::Full, live == cap);
                    }
                }
                for (x, t) in &established {
                    if now - *t < d {
                        let key = TemplateKey::affinity(svc(), *x);
                        prop_assert!(p.peek(&key, now).is_some(), "{} evicted", x);
                    }
                }
                prop_assert!(p.established_len() <= p.len());
            }
        }
    }
}
