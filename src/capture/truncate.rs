//! The TRUNCATE trigger: a truncated table's subscribers are told to
//! refetch, at commit and in commit order with the transaction's other
//! changes (`docs/protocol.md`, "System messages"). Statement-level, so it
//! costs nothing per row; attached to every captured table and to each
//! partition of one, so a partition truncated on its own is reported too.

use super::described;
use super::trigger::refuse;
use super::txn::{self, TXN};
use bgworker::shared::interest::Wanted;
use pgrx::prelude::*;

/// The TRUNCATE trigger, attached by `realtime.sync_captured_tables()`.
#[pg_trigger]
fn capture_truncate<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let after_truncate = matches!(trigger.level(), PgTriggerLevel::Statement)
        && matches!(trigger.when(), Ok(PgTriggerWhen::After))
        && trigger.event().fired_by_truncate();
    if !after_truncate {
        refuse(
            trigger,
            "realtime.capture_truncate()",
            "AFTER TRUNCATE FOR EACH STATEMENT",
        );
    }
    if !crate::preloaded() {
        return Ok(None);
    }
    let rel = trigger.trigger_data().tg_relation;
    // SAFETY: tg_relation is the open relation the trigger fired on.
    let (relid, namespace) = unsafe { described::reported_as(rel) };
    if crate::shmem::interest().wanted(relid.to_u32(), namespace.to_u32()) == Wanted::Nothing {
        txn::note_skipped(relid.to_u32(), namespace.to_u32());
        return Ok(None);
    }
    txn::ensure_callbacks();
    // SAFETY: as above; `relid` is what reported_as returned.
    let described = unsafe { described::described(rel, relid) };
    let subxact = crate::unguarded::current_subtransaction();
    TXN.with(|t| {
        t.borrow_mut()
            .changes
            .truncated(relid.to_u32(), &described.relation, subxact)
    });
    Ok(None)
}
