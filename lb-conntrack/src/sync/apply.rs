//! Installing received records into the backup's table.

use lb_core::{Instant, KeyedHash};

use super::wire::{MessageKind, RecordOp, SyncMessage};
use crate::removal::RemovalReason;
use crate::table::{ConnTable, NewFlow};

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyReport {
    /// New entries installed.
    pub installed: usize,
    /// Existing entries refreshed.
    pub updated: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Records the table refused (full of entries it may not evict, NAT conflict, …).
    pub refused: usize,
}

/// Applies an accepted message to `table`: New/Update records install or refresh the entry so
/// that it times out after the record's remaining time from `now`; Delete records remove it
/// (recorded as a [`RemovalReason::SyncDelete`] removal).
/// Messages other than records are ignored.
///
/// An installed entry is placed at the head or tail of its state's expiry list, whichever is
/// nearer to its deadline, so an entry installed with a deadline between two existing ones may
/// be reclaimed by `expire` late (never early: lookups check the exact deadline).
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
        match rec.op {
            RecordOp::Delete => {
                if table.remove_for(&rec.key, now, RemovalReason::SyncDelete) {
                    r.deleted += 1;
                }
            }
            RecordOp::New | RecordOp::Update => {
                let flow = NewFlow {
                    nat: rec.nat,
                    ..NewFlow::new(rec.key, rec.backend)
                };
                let out = table.sync_upsert(flow, rec.state, rec.remaining_ms, now);
                match out {
                    crate::Insert::Exists => r.updated += 1,
                    o if o.is_inserted() => r.installed += 1,
                    _ => r.refused += 1,
                }
            }
        }
    }
    r
}
