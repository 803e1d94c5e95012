//! The capture trigger: judges each row (nobody listening, dropped by a
//! key filter, or captured) and encodes captured rows into the
//! transaction's buffer. See docs/architecture.md, "Life of a row".

use super::described::{self, Described, Order, Probe};
use super::encode;
use super::txn::{self, TxnBuffer, TXN};
use bgworker::shared::interest::Wanted;
use bgworker::shared::keys::json_key;
use bgworker::shared::prefilter::key_hash;
use bgworker::shared::wire::{self, ChangeKind};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// The capture trigger, attached to every published table by
/// `realtime.sync_captured_tables()`.
#[pg_trigger]
fn capture_changes<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    // Anything else has no row (a statement trigger's tuple is NULL) or
    // its own meaning for the return value: refused whoever attached it.
    let kind = after_row_change(trigger);
    if !crate::preloaded() {
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let rel = data.tg_relation;
    // SAFETY: tg_relation is the open relation the trigger fired on.
    let (relid, namespace) = unsafe { described::reported_as(rel) };
    let wanted = crate::shmem::interest().wanted(relid.to_u32(), namespace.to_u32());
    if wanted == Wanted::Nothing {
        txn::note_skipped(relid.to_u32(), namespace.to_u32());
        return Ok(None);
    }
    txn::ensure_callbacks();
    // SAFETY: as above; `relid` is what reported_as returned.
    let described = unsafe { described::described(rel, relid) };
    let probe = match wanted {
        Wanted::Keys(slot) => described::probe_column(&described, slot, relid.to_u32()),
        _ => None,
    };
    let fired = Fired {
        kind,
        relid: relid.to_u32(),
        namespace: namespace.to_u32(),
        trigtuple: data.tg_trigtuple,
        newtuple: data.tg_newtuple,
        // SAFETY: tg_relation is open; its descriptor matches the tuples.
        desc: unsafe { (*rel).rd_att },
    };
    // SAFETY: the tuples belong to this trigger call and match `desc`,
    // the descriptor the encoders were made for.
    TXN.with(|t| unsafe { buffer(&mut t.borrow_mut(), &described, probe, &fired) });
    Ok(None)
}

/// The row change a trigger call reports.
struct Fired {
    kind: RowChange,
    /// The relation it is reported as, and its schema.
    relid: u32,
    namespace: u32,
    /// The row inserted or deleted, or the old row of an UPDATE.
    trigtuple: pg_sys::HeapTuple,
    /// The new row of an UPDATE.
    newtuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Fired {
    /// The row key filters look at: the new one, the old one for DELETE
    /// (the first one encoded either way).
    fn probed(&self) -> pg_sys::HeapTuple {
        match self.kind {
            RowChange::Insert | RowChange::Delete => self.trigtuple,
            RowChange::Update => self.newtuple,
        }
    }
}

/// What a row trigger call reports (a TRUNCATE has no row:
/// `super::truncate`).
#[derive(Clone, Copy)]
enum RowChange {
    Insert,
    Update,
    Delete,
}

impl RowChange {
    fn wire(self) -> ChangeKind {
        match self {
            RowChange::Insert => ChangeKind::Insert,
            RowChange::Update => ChangeKind::Update,
            RowChange::Delete => ChangeKind::Delete,
        }
    }
}

fn change_kind(trigger: &PgTrigger<'_>) -> Option<RowChange> {
    let event = trigger.event();
    if event.fired_by_insert() {
        Some(RowChange::Insert)
    } else if event.fired_by_update() {
        Some(RowChange::Update)
    } else if event.fired_by_delete() {
        Some(RowChange::Delete)
    } else {
        None
    }
}

/// The row change the trigger reports; an ERROR unless it fired AFTER an
/// INSERT, UPDATE or DELETE, FOR EACH ROW: the only way
/// `realtime.sync_captured_tables()` attaches it.
fn after_row_change(trigger: &PgTrigger<'_>) -> RowChange {
    let after_row =
        matches!(trigger.level(), PgTriggerLevel::Row) && matches!(trigger.when(), Ok(PgTriggerWhen::After));
    if let Some(kind) = change_kind(trigger).filter(|_| after_row) {
        return kind;
    }
    refuse(
        trigger,
        "realtime.capture_changes()",
        "AFTER INSERT, UPDATE or DELETE FOR EACH ROW",
    );
}

/// Raises the ERROR for a capture trigger attached some other way than
/// `realtime.sync_captured_tables()` does: `function` must be fired as
/// `expected`.
pub(super) fn refuse(trigger: &PgTrigger<'_>, function: &str, expected: &str) -> ! {
    let name = trigger.name().unwrap_or("?");
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        format!("{function} must be fired {expected} (trigger \"{name}\")"),
        "capture_changes",
    )
    .set_hint("pg_realtime attaches it to published tables itself; drop this trigger.")
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

/// Adds the change to the transaction's buffer, unless a key filter drops
/// it (`probe`: the filter's column, as one of the encoders).
///
/// # Safety
/// The change's tuples belong to this trigger call and match its
/// descriptor, which `described`'s encoders were made for.
unsafe fn buffer(txn: &mut TxnBuffer, described: &Described, probe: Option<(Probe, usize)>, fired: &Fired) {
    let deformed_first = match probe {
        Some((probe, encoder)) => {
            // SAFETY: per the contract.
            unsafe { encode::deform(&mut txn.scratch.deformed, fired.probed(), fired.desc) };
            if !keeps(txn, &probe, encoder, described, fired) {
                return;
            }
            true
        }
        None => false,
    };
    txn.changes.count(fired.relid, &described.relation);
    if txn.changes.overflowed {
        return;
    }
    let relation = txn
        .changes
        .start(&described.relation, crate::unguarded::current_subtransaction());
    // SAFETY: per the contract.
    unsafe { encode_change(txn, relation, described, fired, deformed_first) };
    if txn.changes.rows.len() > crate::shmem::ring().max_payload() {
        // Larger than the ring could ever hold: report the loss at commit.
        txn.changes.overflow();
    }
}

/// Encodes the change's rows after its mark (`wire::begin_change`): the
/// new row (or none), then the old one (or none). `deformed_first`: the
/// first row encoded is already deformed in the scratch buffer.
///
/// # Safety
/// As for `buffer`.
unsafe fn encode_change(
    txn: &mut TxnBuffer,
    relation: u16,
    described: &Described,
    fired: &Fired,
    deformed_first: bool,
) {
    let (rows, at, deformed) = (&mut txn.changes.rows, &mut txn.scratch.at, &mut txn.scratch.deformed);
    wire::begin_change(rows, relation, fired.kind.wire());
    let probed = fired.probed();
    let mut row = |rows: &mut Vec<u8>, tuple| {
        wire::put_row(rows, |out| {
            // SAFETY: per the contract.
            unsafe {
                if deformed_first && tuple == probed {
                    encode::deformed_json(out, at, deformed, &described.encoders)
                } else {
                    encode::row_json(out, at, deformed, tuple, fired.desc, &described.encoders)
                }
            }
        });
        match &described.order {
            Order::Same => wire::put_offsets(rows, at.iter().copied()),
            Order::Permuted(p) => wire::put_offsets(rows, p.iter().map(|j| at[*j])),
            Order::Unknown => wire::put_offsets(rows, std::iter::empty()),
        }
    };
    match fired.kind {
        RowChange::Insert => {
            row(rows, fired.trigtuple);
            wire::put_no_row(rows);
        }
        RowChange::Update => {
            row(rows, fired.newtuple);
            row(rows, fired.trigtuple);
        }
        RowChange::Delete => {
            wire::put_no_row(rows);
            row(rows, fired.trigtuple);
        }
    }
}

/// Whether the row deformed in the scratch buffer may be wanted by a
/// subscriber, judged by the key of its value in the probed column. If
/// not, it is noted as skipped (for the check at commit) and counted.
fn keeps(txn: &mut TxnBuffer, probe: &Probe, encoder: usize, described: &Described, fired: &Fired) -> bool {
    let filters = crate::shmem::key_filters();
    // Read before the row is judged: a subscriber that joins after this
    // changes it, and is looked for at commit (`Skips::announce_missed`).
    let version = filters.version(probe.slot);
    let scratch = &mut txn.scratch;
    scratch.probe.clear();
    // SAFETY: `deformed` holds this trigger call's tuple of the
    // descriptor the encoders were made for.
    unsafe { encode::value_json(&mut scratch.probe, &scratch.deformed, &described.encoders[encoder]) };
    // (text in a database encoding other than UTF-8 may not be: sent on)
    let Ok(json) = std::str::from_utf8(&scratch.probe) else {
        return true;
    };
    let hash = json_key(probe.kind, json).map(|key| key_hash(&key));
    if filters.wants(probe.slot, fired.relid, probe.generation, hash) {
        return true;
    }
    txn.skips.note_key(fired.relid, fired.namespace, probe, version, hash);
    false
}
