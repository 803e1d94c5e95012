//! Capture: the row trigger on published tables, the per-transaction buffer
//! and the transaction callbacks that publish it (docs/architecture.md,
//! "Life of a row").
//!
//! - The trigger returns at once when nobody subscribes to the table (or its
//!   schema): one lock-free look-up in the interest table. After
//!   `pg_realtime.capture_idle_timeout` without subscribers the worker
//!   switches the trigger off altogether (`bgworker::changes::switch`).
//! - When every subscriber of the table filters with `eq` on one column,
//!   the worker keeps the wanted values' keys in a key filter
//!   (`bgworker::shared::prefilter`): the trigger writes just that column's value,
//!   and drops the row when no subscriber wants its key. Dropped keys are
//!   looked up again at commit: a subscriber that joined for one meanwhile
//!   is told to refetch, as for a table nobody listened to.
//! - Otherwise the row is encoded as JSON by the relation's cached encoder
//!   (no SQL, no SPI) straight into the transaction's buffer, in the ring
//!   record's format with where each value starts, marked with its
//!   subtransaction.
//! - At `XACT_EVENT_COMMIT` the transaction goes into the change ring as one
//!   record, carrying its commit LSN and time, and the worker's latch is set.
//!   Nothing there may fail: a full ring is a counted, reported loss.
//! - Aborts drop the buffer; a rolled-back savepoint drops its own changes;
//!   PREPARE TRANSACTION with captured changes is refused before it happens.

mod described;
pub(crate) mod encode;
pub(crate) mod send;
mod skips;
mod trigger;
mod truncate;
mod txn;

// The publication sync (triggers on exactly the published tables), its event
// triggers and the `realtime.captured_tables` view.
extension_sql_file!(
    "../../sql/capture.sql",
    name = "capture_sql",
    requires = [capture_changes, capture_truncate, captures_changed, syncing],
    finalize
);

use pgrx::prelude::*;

/// Tells the worker that the set of captured tables may have changed (the
/// publication sync ran), so it looks at their triggers again: it does not
/// poll the catalog.
#[pg_extern(volatile)]
fn captures_changed() {
    if crate::preloaded() {
        bgworker::shared::stats::Counters::incr(&crate::shmem::counters().capture_syncs);
        crate::shmem::wake_worker();
    }
}

/// Whether `realtime.sync_captured_tables()` is running in this
/// transaction (`pg_realtime.syncing`); for its event trigger, which
/// calling this loads the library for, so the setting is the real,
/// superuser-only one and never a placeholder some role set.
#[pg_extern(stable)]
fn syncing() -> bool {
    crate::gucs::SYNCING.get()
}

/// Whether anyone subscribes to the relation (or its schema), as the
/// capture trigger sees it; for diagnostics and tests.
#[pg_extern(stable, parallel_safe)]
fn interested(relid: pg_sys::Oid) -> bool {
    crate::preloaded() && relation_has_interest(relid)
}

fn relation_has_interest(relid: pg_sys::Oid) -> bool {
    let interest = crate::shmem::interest();
    if interest.any(&[relid.to_u32()]) {
        return true;
    }
    // SAFETY: a syscache look-up by OID; InvalidOid if the relation is gone.
    interest.has_schemas() && interest.any(&[unsafe { pg_sys::get_rel_namespace(relid) }.to_u32()])
}
