//! State sync between the balancers of a pair: what changed on the data path, as records for
//! the backup, and the installation of the records a peer sent.
//!
//! The data path does the least it can per packet: it appends the *key* of what changed to a
//! preallocated ring ([`DataplaneOptions::sync_log`](crate::DataplaneOptions::sync_log)), with
//! no allocation, lock or system call:
//! - a flow entered a flow table (a new flow, a SIP (client, backend) NAT entry);
//! - a flow's state changed (its timeout may have changed with it);
//! - a flow left a table, for any reason but a sync delete (the removal stream);
//! - a persistence template or SIP Call-ID binding was written.
//!
//! Spliced TCP connections have their own log and records (`splice_sync.rs`:
//! [`Dataplane::splice_sync_drain`], [`Dataplane::splice_sync_export`]); [`Dataplane::apply_sync`]
//! installs both.
//!
//! The embedder's sync thread calls [`Dataplane::sync_drain`] every few milliseconds: each key
//! is looked up once, *then*, so several changes of one flow between two drains become one
//! record with the flow's latest state and remaining timeout. A flow's NAT tuple travels with
//! it, so the backup reserves the same SNAT address and port ([`lb_conntrack::SnatPool::reserve`])
//! and, after a takeover, forwards it exactly as the old master did.
//!
//! Entries whose timeout is refreshed by traffic (every packet of an established flow) are
//! resent by a rolling scan, [`Dataplane::sync_export`] with a `since` instant: a flow that saw
//! a packet since the previous pass is sent again with its new deadline, an idle one is not (the
//! backup's copy already expires when the master's does). Without `since` the same call is the
//! bulk dump for a backup that joins.
//!
//! [`Dataplane::apply_sync`] installs a peer's records with their remaining timeouts and keeps
//! the live connection counts in step (an installed established flow counts as an active
//! connection of its backend, like one the data path opened). With `merge`, used by a node that
//! is master itself (a split brain healing), only absent entries are installed: the merging
//! node's own flows are never overwritten or deleted.

use std::collections::HashSet;

use lb_conntrack::sync::{
    apply_record, apply_template, Applied, RecordOp, SyncMessage, SyncRecord, TemplateRecord,
};
use lb_conntrack::{ConnTable, RemovalReason, TemplateKey};
use lb_core::{FlowKey, Instant};

use crate::Dataplane;

/// One change logged by the data path for the sync sender (what [`Dataplane::sync_drain`]
/// deduplicates by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SyncChange {
    /// A flow was created or changed state: send its current entry.
    Flow(FlowKey),
    /// A flow left its table: send a delete (unless it is back by the time of the drain).
    Gone(FlowKey),
    /// A template was written: send its current value.
    Template(TemplateKey),
}

/// Where a rolling export stands: which table, and the cursor within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncCursor {
    /// 0: IPv4 flows, 1: IPv6 flows, 2: IPv4 templates, 3: IPv6 templates.
    part: u8,
    at: u32,
}

impl SyncCursor {
    /// The start of a pass.
    pub const START: SyncCursor = SyncCursor { part: 0, at: 0 };
}

/// What [`Dataplane::apply_sync`] did, summed over a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncApplied {
    /// Flows installed.
    pub installed: u64,
    /// Flows refreshed (state and deadline).
    pub updated: u64,
    /// Flows deleted.
    pub deleted: u64,
    /// Templates and SIP bindings installed or refreshed.
    pub templates: u64,
    /// Records the tables refused (full, SNAT pair conflict, unknown backend).
    pub refused: u64,
    /// Records left alone (merge mode: the entry exists; a delete of an absent entry).
    pub ignored: u64,
    /// Spliced connections installed, refreshed or deleted.
    pub splices: u64,
}

impl SyncApplied {
    fn add(&mut self, a: Applied, template: bool) {
        match a {
            Applied::Installed | Applied::Updated { .. } | Applied::Refreshed if template => {
                self.templates += 1
            }
            Applied::Deleted if template => self.templates += 1,
            Applied::Installed => self.installed += 1,
            Applied::Updated { .. } => self.updated += 1,
            Applied::Deleted => self.deleted += 1,
            Applied::Refused => self.refused += 1,
            _ => self.ignored += 1,
        }
    }
}

impl Dataplane {
    /// Logs a change for the sync sender; a full log drops the change and counts it
    /// ([`Stats::sync_lost`](crate::Stats::sync_lost)): the embedder then sends a bulk dump.
    #[inline]
    pub(crate) fn sync_log(&mut self, c: SyncChange) {
        if self.sync_cap == 0 {
            return;
        }
        if self.sync.len() >= self.sync_cap {
            self.stats.sync_lost += 1;
        } else {
            self.sync.push_back(c);
        }
    }

    /// Changes waiting for [`Dataplane::sync_drain`].
    pub fn sync_pending(&self) -> usize {
        self.sync.len()
    }

    /// Turns up to `max` logged changes into records for the backup, appended to `records` and
    /// `templates`, each key looked up once at `now` (`seen` is scratch space, cleared here).
    /// Returns the number of changes consumed. Control path: call it from the sync thread.
    pub fn sync_drain(
        &mut self,
        now: Instant,
        max: usize,
        seen: &mut HashSet<SyncChange>,
        records: &mut Vec<SyncRecord>,
        templates: &mut Vec<TemplateRecord>,
    ) -> usize {
        seen.clear();
        let (r0, t0) = (records.len(), templates.len());
        let n = self.sync_drain_inner(now, max, seen, records, templates);
        self.tag_records(&mut records[r0..], &mut templates[t0..]);
        n
    }

    fn sync_drain_inner(
        &mut self,
        now: Instant,
        max: usize,
        seen: &mut HashSet<SyncChange>,
        records: &mut Vec<SyncRecord>,
        templates: &mut Vec<TemplateRecord>,
    ) -> usize {
        let mut n = 0;
        while n < max {
            let Some(c) = self.sync.pop_front() else {
                break;
            };
            n += 1;
            // A flow gone and back (a SYN reusing a finished entry) is one record: its
            // current state, which replaces the backup's copy.
            let c = match c {
                SyncChange::Gone(k) if self.ct(&k).get(&k, now).is_some() => SyncChange::Flow(k),
                c => c,
            };
            if !seen.insert(c) {
                continue;
            }
            match c {
                SyncChange::Flow(k) => {
                    if let Some(e) = self.ct(&k).get(&k, now) {
                        records.push(SyncRecord::from_info(RecordOp::Update, &e, now));
                    }
                }
                SyncChange::Gone(k) => records.push(delete_record(k)),
                SyncChange::Template(tk) => {
                    let ct = self.ct_for_template(&tk);
                    match ct.persist().get(&tk, now) {
                        Some(info) => templates.push(TemplateRecord::from_info(false, &info, now)),
                        None => {
                            templates.push(TemplateRecord {
                                delete: true,
                                key: tk,
                                backend: lb_core::BackendId(0),
                                backend_tag: None,
                                remaining_ms: 0,
                                timeout_ms: 0,
                                established: false,
                            });
                        }
                    }
                }
            }
        }
        n
    }

    /// Exports entries from `cursor` on, at most about `max` per call, appending records to
    /// `records` and `templates`; returns where to continue (`None`: the pass is complete).
    /// With `since`, only flows that saw a packet at or after it and have seen more than one
    /// (a refresh pass: their deadlines moved since the record their creation logged);
    /// without, every flow and template (a bulk dump).
    pub fn sync_export(
        &self,
        cursor: SyncCursor,
        max: usize,
        since: Option<Instant>,
        now: Instant,
        records: &mut Vec<SyncRecord>,
        templates: &mut Vec<TemplateRecord>,
    ) -> Option<SyncCursor> {
        let (r0, t0) = (records.len(), templates.len());
        let next = self.sync_export_inner(cursor, max, since, now, records, templates);
        self.tag_records(&mut records[r0..], &mut templates[t0..]);
        next
    }

    /// Names each record's backend by its tag ([`BackendInfo::tag`](crate::BackendInfo::tag)):
    /// a peer whose ids differ (they are recycled when backends leave) finds its own from it.
    fn tag_records(&self, records: &mut [SyncRecord], templates: &mut [TemplateRecord]) {
        for r in records.iter_mut().filter(|r| r.op != RecordOp::Delete) {
            r.backend_tag = self.tables.backend(r.backend).map(crate::BackendInfo::tag);
        }
        for t in templates.iter_mut().filter(|t| !t.delete) {
            t.backend_tag = self.tables.backend(t.backend).map(crate::BackendInfo::tag);
        }
    }

    fn sync_export_inner(
        &self,
        cursor: SyncCursor,
        max: usize,
        since: Option<Instant>,
        now: Instant,
        records: &mut Vec<SyncRecord>,
        templates: &mut Vec<TemplateRecord>,
    ) -> Option<SyncCursor> {
        let mut cur = cursor;
        let mut budget = max.max(1);
        let mut infos = Vec::new();
        let mut tinfos = Vec::new();
        while budget > 0 {
            let next = match cur.part {
                0 | 1 => {
                    let ct = if cur.part == 0 { &self.ct4 } else { &self.ct6 };
                    infos.clear();
                    let next = ct.export_chunk(cur.at, budget, now, &mut infos);
                    budget = budget.saturating_sub(infos.len().max(1));
                    // A refresh resends what moved its deadline since `since`: a flow that saw
                    // a packet since then, unless its one packet made it (then the record
                    // logged at its creation already carries that deadline).
                    records.extend(
                        infos
                            .iter()
                            .filter(|e| since.is_none_or(|s| e.last_seen >= s && e.packets > 1))
                            .map(|e| SyncRecord::from_info(RecordOp::Update, e, now)),
                    );
                    next
                }
                2 | 3 => {
                    let ct = if cur.part == 2 { &self.ct4 } else { &self.ct6 };
                    tinfos.clear();
                    let next = ct.persist().export_chunk(cur.at, budget, now, &mut tinfos);
                    budget = budget.saturating_sub(tinfos.len().max(1));
                    templates.extend(
                        tinfos
                            .iter()
                            .map(|t| TemplateRecord::from_info(false, t, now)),
                    );
                    next
                }
                _ => return None,
            };
            cur = match next {
                Some(at) => SyncCursor { part: cur.part, at },
                None if cur.part >= 3 => return None,
                None => SyncCursor {
                    part: cur.part + 1,
                    at: 0,
                },
            };
        }
        Some(cur)
    }

    /// Installs a peer's records at `now` (see the crate documentation); with `merge`,
    /// only entries absent here. Keeps connection counts and statistics in step; records
    /// nothing for the sync sender (a backup does not echo what it is sent).
    pub fn apply_sync(&mut self, msg: &SyncMessage, now: Instant, merge: bool) -> SyncApplied {
        // What a peer's records install or replace may differ from a cached plan.
        self.invalidate_plans();
        let mut out = SyncApplied::default();
        for rec in &msg.records {
            // A tagged record names its backend by service and address: this node's id for
            // it may differ from the sender's (ids are recycled), or the backend be unknown.
            let rec = &match rec.op {
                RecordOp::Delete => *rec,
                _ => match self.local_backend(rec.backend, rec.backend_tag, &mut out) {
                    Some(backend) => SyncRecord { backend, ..*rec },
                    None => continue,
                },
            };
            // A flow for a backend this node does not know cannot be forwarded: refuse it
            // rather than install an entry that would blackhole the flow after a takeover.
            // An untagged record names the backend by the sender's id: a NAT reply tuple comes
            // from the backend, and must come from the one the id names here.
            // Nor for a retired backend already released here: its id may soon name another.
            let mut before = None;
            if rec.op != RecordOp::Delete {
                let known = match self.tables.backend(rec.backend) {
                    None => false,
                    Some(_) if self.is_released(rec.backend) => false,
                    Some(b) => rec.nat.is_none_or(|r| {
                        r.src() == b.addr.ip()
                            && (b.addr.port() == 0 || r.src_port() == b.addr.port())
                    }),
                };
                if !known {
                    out.refused += 1;
                    self.stats.sync_refused += 1;
                    continue;
                }
                // An update may move a live entry to another backend: its count moves too.
                before = self.ct(&rec.key).get(&rec.key, now).map(|e| e.backend);
            }
            let ct = if rec.key.is_ipv4() {
                &mut self.ct4
            } else {
                &mut self.ct6
            };
            let a = apply_record(ct, rec, now, merge);
            match a {
                Applied::Installed => {
                    self.live.opened(rec.backend, rec.state);
                    if let Some(s) = self.stats.backends.get_mut(rec.backend.get() as usize) {
                        s.flows += 1;
                    }
                }
                Applied::Updated { was } => match before {
                    Some(old) if old != rec.backend => {
                        self.live.closed(old, was);
                        self.live.opened(rec.backend, rec.state);
                    }
                    _ => self.live.moved(rec.backend, Some(was), rec.state),
                },
                _ => {}
            }
            out.add(a, false);
            // Deletes leave through the removal stream (live counts, session statistics).
            self.drain_removals();
        }
        for t in &msg.templates {
            let t = &if t.delete {
                *t
            } else {
                match self.local_backend(t.backend, t.backend_tag, &mut out) {
                    Some(backend) => TemplateRecord { backend, ..*t },
                    None => continue,
                }
            };
            // A template naming a backend unknown here, or released, would send clients to
            // whatever backend the id names next.
            if !t.delete
                && (self.tables.backend(t.backend).is_none() || self.is_released(t.backend))
            {
                out.refused += 1;
                self.stats.sync_refused += 1;
                continue;
            }
            let ct = self.ct_for_template_mut(&t.key);
            out.add(apply_template(ct, t, now, merge), true);
        }
        for x in &msg.splices {
            self.apply_splice(x, now, merge, &mut out);
        }
        out
    }

    /// The backend a record names here: the one with its tag if it has one (a record names
    /// backends by tag because ids may differ between peers; `None`, counted as refused, when
    /// no single backend here has the tag), else the id as sent.
    pub(crate) fn local_backend(
        &mut self,
        id: lb_core::BackendId,
        tag: Option<u32>,
        out: &mut SyncApplied,
    ) -> Option<lb_core::BackendId> {
        let Some(tag) = tag else {
            return Some(id);
        };
        let got = self.tables.backend_by_tag(tag);
        if got.is_none() {
            out.refused += 1;
            self.stats.sync_refused += 1;
        }
        got
    }

    /// Whether `id` is a retired backend [`Dataplane::release_retired`] reported free.
    pub(crate) fn is_released(&self, id: lb_core::BackendId) -> bool {
        self.released.get(id.get() as usize) == Some(&true)
    }

    fn ct(&self, k: &FlowKey) -> &ConnTable {
        if k.is_ipv4() {
            &self.ct4
        } else {
            &self.ct6
        }
    }

    fn ct_for_template(&self, tk: &TemplateKey) -> &ConnTable {
        if template_v4(tk) {
            &self.ct4
        } else {
            &self.ct6
        }
    }

    fn ct_for_template_mut(&mut self, tk: &TemplateKey) -> &mut ConnTable {
        if template_v4(tk) {
            &mut self.ct4
        } else {
            &mut self.ct6
        }
    }
}

/// Whether a template lives in the IPv4 table (templates are kept by their service's family,
/// as the data path writes them).
fn template_v4(tk: &TemplateKey) -> bool {
    match tk {
        TemplateKey::Client { service, .. } | TemplateKey::Affinity { service, .. } => {
            service.vip.is_ipv4()
        }
    }
}

/// A delete record for `key` (the other fields are not read by the receiver).
fn delete_record(key: FlowKey) -> SyncRecord {
    SyncRecord {
        op: RecordOp::Delete,
        key,
        backend: lb_core::BackendId(0),
        backend_tag: None,
        state: lb_conntrack::FlowState::Other,
        remaining_ms: 0,
        nat: None,
        persist: None,
    }
}

/// Whether a removal is one the backup must hear about: every reason but a sync delete (the
/// record came from the peer).
#[inline]
pub(crate) fn synced_removal(reason: RemovalReason) -> bool {
    reason != RemovalReason::SyncDelete
}
