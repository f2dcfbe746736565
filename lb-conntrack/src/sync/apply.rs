//! Installing received records into the backup's table.

use lb_core::{Duration, Instant, KeyedHash};

use super::wire::{MessageKind, RecordOp, SyncMessage, SyncRecord, TemplateRecord};
use crate::persist::Installed;
use crate::removal::RemovalReason;
use crate::table::{ConnTable, NewFlow, Upserted};
use crate::timeout::FlowState;

/// What applying one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// A new entry or template was installed. Installing may have evicted another entry or
    /// removed a timed-out one: their [`crate::Removal`]s are queued as usual.
    Installed,
    /// An existing live entry was updated to the record's backend, state and deadline.
    Updated {
        /// Its state before (the record's state is the new one).
        was: FlowState,
    },
    /// An existing live template was refreshed (backend and timeouts replaced; templates have
    /// no state).
    Refreshed,
    /// The entry or template was removed (an entry's removal is queued as a
    /// [`RemovalReason::SyncDelete`] [`crate::Removal`]). A template still pinned by flows
    /// stays until the last of them leaves, and then goes at once.
    Deleted,
    /// The table refused the record (full of entries it may not evict, NAT conflict, backend
    /// id out of range, template table full of pinned templates, …).
    Refused,
    /// Nothing to do: a delete of an absent entry or template, or in merge mode a record for
    /// one that exists, or any delete.
    Ignored,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyReport {
    /// New entries installed.
    pub installed: usize,
    /// Existing entries refreshed.
    pub updated: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Records of either kind the table refused (full of entries it may not evict, NAT
    /// conflict, …).
    pub refused: usize,
    /// Template records that installed, refreshed or deleted a template.
    pub templates: usize,
}

/// Applies one connection record to `table` at `now`.
///
/// Normal (backup) mode, `merge = false`: New/Update records install or refresh the entry so
/// that it times out after the record's remaining time from `now`; Delete records remove it.
///
/// Merge mode, `merge = true`, for a node that is master itself while it hears another master
/// (a split brain healing): only entries that are absent are installed; an existing entry is
/// never overwritten or deleted (→ [`Applied::Ignored`]).
///
/// An installed entry is placed at the head or tail of its state's expiry list, whichever is
/// nearer to its deadline, so an entry installed with a deadline between two existing ones may
/// be reclaimed by `expire` late (never early: lookups check the exact deadline). A full-NAT
/// entry reserves its SNAT pair in the table's pool (see [`crate::SnatPool::reserve`] and
/// [`crate::Counters::sync_nat_conflicts`]); an entry with a persistence prefix pins its client
/// template.
pub fn apply_record<H: KeyedHash>(
    table: &mut ConnTable<H>,
    rec: &SyncRecord,
    now: Instant,
    merge: bool,
) -> Applied {
    match rec.op {
        RecordOp::Delete if merge => Applied::Ignored,
        RecordOp::Delete => {
            if table.remove_for(&rec.key, now, RemovalReason::SyncDelete) {
                Applied::Deleted
            } else {
                Applied::Ignored
            }
        }
        RecordOp::New | RecordOp::Update => {
            let flow = NewFlow {
                nat: rec.nat,
                persist_prefix: rec.persist,
                ..NewFlow::new(rec.key, rec.backend)
            };
            match table.sync_upsert(flow, rec.state, rec.remaining_ms, now, merge) {
                Upserted::Installed(_) => Applied::Installed,
                Upserted::Updated(was) => Applied::Updated { was },
                Upserted::Kept => Applied::Ignored,
                Upserted::Refused(_) => Applied::Refused,
            }
        }
    }
}

/// Applies one template record to `table`'s persistence templates at `now`, with
/// [`apply_record`]'s `merge` semantics.
///
/// An upsert installs or refreshes the template so that it times out `remaining_ms` after
/// `now` and `timeout_ms` after each later use; a refreshed template keeps the flows that pin
/// it. A delete removes it, or if flows still pin it, makes it go when the last one leaves.
pub fn apply_template<H: KeyedHash>(
    table: &mut ConnTable<H>,
    rec: &TemplateRecord,
    now: Instant,
    merge: bool,
) -> Applied {
    let persist = table.persist_mut();
    if rec.delete {
        return if !merge && persist.sync_remove(&rec.key, now) {
            Applied::Deleted
        } else {
            Applied::Ignored
        };
    }
    let remaining = Duration::from_millis(u64::from(rec.remaining_ms));
    let idle = Duration::from_millis(u64::from(rec.timeout_ms));
    match persist.install(
        rec.key,
        rec.backend,
        remaining,
        idle,
        now,
        merge,
        rec.established,
    ) {
        Installed::New => Applied::Installed,
        Installed::Updated => Applied::Refreshed,
        Installed::Kept => Applied::Ignored,
        Installed::Full => Applied::Refused,
    }
}

/// Applies an accepted message to `table` in normal (backup) mode: its connection records with
/// [`apply_record`], then its template records with [`apply_template`]. Messages other than
/// records are ignored.
pub fn apply<H: KeyedHash>(
    table: &mut ConnTable<H>,
    msg: &SyncMessage,
    now: Instant,
) -> ApplyReport {
    let mut r = ApplyReport::default();
    if msg.header.kind != MessageKind::Records {
        return r;
    }
    for rec in &msg.records {
        match apply_record(table, rec, now, false) {
            Applied::Installed => r.installed += 1,
            Applied::Updated { .. } => r.updated += 1,
            Applied::Deleted => r.deleted += 1,
            Applied::Refused => r.refused += 1,
            Applied::Refreshed | Applied::Ignored => {}
        }
    }
    for rec in &msg.templates {
        match apply_template(table, rec, now, false) {
            Applied::Installed | Applied::Refreshed | Applied::Deleted => r.templates += 1,
            Applied::Refused => r.refused += 1,
            Applied::Updated { .. } | Applied::Ignored => {}
        }
    }
    r
}

#[cfg(test)]
mod tests;
