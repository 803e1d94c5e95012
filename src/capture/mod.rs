//! Capture: the row trigger on published tables, the per-transaction buffer
//! and the transaction callbacks that publish it.
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

pub(crate) mod encode;

// The publication sync (triggers on exactly the published tables), its event
// triggers and the `realtime.captured_tables` view.
extension_sql_file!(
    "../../sql/capture.sql",
    name = "capture_sql",
    requires = [capture_changes, captures_changed],
    finalize
);

use bgworker::shared::interest::Wanted;
use bgworker::shared::keys::json_key;
use bgworker::shared::keys::Kind;
use bgworker::shared::prefilter::key_hash;
use bgworker::shared::stats::Counters;
use bgworker::shared::wire::{self, ChangeKind, Header};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Microseconds between the Unix epoch and Postgres's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A relation's description (encoded as records carry it, once) and row
/// encoder, cached per backend.
#[derive(Clone)]
struct Described {
    relation: Rc<[u8]>,
    encoders: Rc<Vec<encode::ColumnEncoder>>,
    order: Order,
    /// The column a key filter slot names, as last read.
    probe: Rc<Cell<Option<Probe>>>,
}

/// Which of a relation's columns a key filter slot filters on
/// (`bgworker::shared::prefilter`), as read from the slot at `generation`.
#[derive(Clone, Copy)]
struct Probe {
    slot: usize,
    generation: u64,
    /// The encoder that writes the column (None: the relation has no
    /// column of that name, so its rows all go on).
    encoder: Option<usize>,
    kind: Kind,
}

/// Rows of one relation a transaction dropped because no subscriber's
/// equality filter wanted their keys: if a subscriber for one of those
/// keys has joined by commit time, it is told to refetch (see `on_xact`).
struct KeySkips {
    relid: u32,
    namespace: u32,
    slot: usize,
    generation: u64,
    /// The slot's version before the first of these rows was judged
    /// (`u64::MAX`, which no version reaches, once the filter moved).
    version: u64,
    /// How many of the transaction's `skipped_keys` are this relation's
    /// (at most `MAX_KEY_SKIPS`; past that, `saturated`: only whether the
    /// slot changed is known), and the last one.
    keys: usize,
    last: Option<Option<u64>>,
    saturated: bool,
}

/// Distinct keys remembered per relation and transaction (bounded memory
/// for a huge transaction; past it, any change to the table's filter
/// before commit counts as a possible miss).
const MAX_KEY_SKIPS: usize = 1024;

/// How the encoders' columns map onto the reported relation's, for the
/// value offsets each row carries (`wire::put_offsets`).
#[derive(Clone)]
enum Order {
    /// The same columns in the same order.
    Same,
    /// A partition whose columns are in another order than its root's: for
    /// each of the root's columns, the encoder that writes it.
    Permuted(Rc<[usize]>),
    /// Some reported column has no encoder: rows carry no offsets.
    Unknown,
}

impl Order {
    fn of(relation: &bgworker::shared::wire::Relation, encoders: &[encode::ColumnEncoder]) -> Order {
        let positions: Option<Vec<usize>> = relation
            .columns
            .iter()
            .map(|c| encoders.iter().position(|e| e.name == c.name))
            .collect();
        match positions {
            Some(p) if p.len() == encoders.len() && p.iter().enumerate().all(|(i, j)| i == *j) => Order::Same,
            Some(p) => Order::Permuted(p.into()),
            None => Order::Unknown,
        }
    }
}

/// What the current transaction captured so far. Kept from transaction to
/// transaction (cleared, not freed), so a commit allocates nothing.
#[derive(Default)]
struct TxnBuffer {
    /// The relations the changes refer to (by position): encoded
    /// descriptions, shared with the description cache.
    relations: Vec<Rc<[u8]>>,
    /// The changes, in statement order, encoded as the record carries them
    /// (`wire::begin_change`, `wire::put_row`), back to back.
    rows: Vec<u8>,
    /// Where each change starts in `rows`, and the subtransaction that
    /// made it.
    marks: Vec<(usize, pg_sys::SubTransactionId)>,
    /// More than fits in the ring: the changes were dropped, only the
    /// relations are kept, to tell their subscribers.
    overflowed: bool,
    /// Every relation written, also after an overflow (few per
    /// transaction: a vector beats a set).
    touched: Vec<u32>,
    /// Relations whose rows were skipped because nobody listened then. If
    /// someone listens by commit time, they subscribed while this
    /// transaction ran and may expect its rows: they are told to refetch.
    skipped: Vec<(u32, u32)>,
    /// Rows dropped by key filters, per relation, and their keys' hashes
    /// by relation (None: no key, as for NULL).
    key_skips: Vec<KeySkips>,
    skipped_keys: Vec<(u32, Option<u64>)>,
    /// Rows dropped by key filters, for `rows_filtered_out`.
    filtered_out: u64,
    /// Rows encoded, added to the shared counter once per transaction
    /// rather than per row (it is a cache line every backend writes).
    encoded: u64,
    /// Where the committed transaction's record is put together before it
    /// is copied into the ring.
    record: Vec<u8>,
    /// Where each value of the row being written starts (scratch).
    at: Vec<u32>,
    /// The row being written, deformed (scratch).
    deformed: encode::Deformed,
    /// The value a key filter looks at, as JSON (scratch).
    probe: Vec<u8>,
    /// This transaction's place in the commit fence, from PRE_COMMIT until
    /// it has published (or aborted). Not touched by `clear`.
    fence_ticket: Option<bgworker::shared::fence::Ticket>,
}

impl TxnBuffer {
    fn is_empty(&self) -> bool {
        self.marks.is_empty() && !self.overflowed
    }

    /// Forgets the transaction, keeping the allocations (up to a limit: a
    /// huge transaction does not pin its memory for the backend's life).
    fn clear(&mut self) {
        const KEEP_BYTES: usize = 64 * 1024;
        self.relations.clear();
        self.rows.clear();
        self.marks.clear();
        if self.rows.capacity() > KEEP_BYTES {
            self.rows = Vec::new();
            self.marks = Vec::new();
        }
        if self.record.capacity() > KEEP_BYTES {
            self.record = Vec::new();
        }
        self.overflowed = false;
        self.touched.clear();
        self.skipped.clear();
        self.key_skips.clear();
        self.skipped_keys.clear();
        if self.skipped_keys.capacity() > KEEP_BYTES / 16 {
            self.skipped_keys = Vec::new();
        }
        self.filtered_out = 0;
        self.encoded = 0;
    }
}

/// Hashes an OID for the per-backend caches with one multiplication: the
/// default SipHash costs more than the rest of a look-up, and OIDs are not
/// chosen by an adversary.
#[derive(Default)]
struct OidHasher(u64);

impl std::hash::Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OidMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<OidHasher>>;

/// Whether this process has registered its transaction callbacks (a
/// process-wide fact: a plain static, not a thread-local, whose look-up in
/// a loaded library is a call).
static CALLBACKS: AtomicBool = AtomicBool::new(false);

// A backend is single-threaded: this is per-backend state, and each
// trigger call or transaction event looks up `TXN` once (a thread-local of
// a loaded library costs a call to `__tls_get_addr` per look-up).
thread_local! {
    static TXN: RefCell<TxnBuffer> = RefCell::new(TxnBuffer::default());
    /// Relation descriptions, kept across transactions until the relcache
    /// says the relation changed.
    static DESCRIBED: RefCell<OidMap<Described>> = RefCell::new(OidMap::default());
    /// A partition's root partitioned table and the root's schema, by
    /// partition OID, until the relcache says the partition changed
    /// (ATTACH and DETACH PARTITION do).
    static ROOTS: RefCell<OidMap<(pg_sys::Oid, pg_sys::Oid)>> = RefCell::new(OidMap::default());
}

// Not in pgrx's bindings (catalog/partition.h); this signature is the one of
// PostgreSQL 14 and later. Called through `parent_of` only.
unsafe extern "C-unwind" {
    fn get_partition_parent(relid: pg_sys::Oid, even_if_detached: bool) -> pg_sys::Oid;
}

/// The parent of a partition.
///
/// # Safety
/// Main thread of a backend; `relid` is an attached partition.
unsafe fn parent_of(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: per the contract; the guard turns an ERROR raised inside into
    // a Rust panic, as for pgrx's own bindings.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| get_partition_parent(relid, false)) }
}

/// The relation a row of `rel` is reported as, and its schema: `rel`
/// itself, or for a partition the root of its partition tree (what
/// `publish_via_partition_root` publishes), so that subscribers name the
/// partitioned table and see every partition's rows under its name.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn reported_as(rel: pg_sys::Relation) -> (pg_sys::Oid, pg_sys::Oid) {
    // SAFETY: per the contract.
    let (relid, form) = unsafe { ((*rel).rd_id, &*(*rel).rd_rel) };
    if !form.relispartition {
        return (relid, form.relnamespace);
    }
    if let Some(root) = ROOTS.with(|roots| roots.borrow().get(&relid.to_u32()).copied()) {
        return root;
    }
    // SAFETY: catalog look-ups by OID; each relation walked up from is a
    // partition, so it has a parent (attached: we hold a lock on it).
    let root = unsafe {
        let mut root = parent_of(relid);
        while pg_sys::get_rel_relispartition(root) {
            root = parent_of(root);
        }
        (root, pg_sys::get_rel_namespace(root))
    };
    ROOTS.with(|roots| roots.borrow_mut().insert(relid.to_u32(), root));
    root
}

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

/// Whether anyone subscribes to the relation (or its schema), as the
/// capture trigger sees it; for diagnostics and tests.
#[pg_extern(stable, parallel_safe)]
fn interested(relid: pg_sys::Oid) -> bool {
    crate::preloaded() && relation_has_interest(relid)
}

/// Notes that this transaction wrote rows of `relid` while nobody listened:
/// if someone listens by commit time, they subscribed while it ran and may
/// expect its rows, so they are told to refetch (see `on_xact`).
fn note_skipped(relid: u32, namespace: u32) {
    ensure_callbacks();
    TXN.with(|t| {
        let mut t = t.borrow_mut();
        if !t.skipped.iter().any(|(r, _)| *r == relid) {
            t.skipped.push((relid, namespace));
        }
    });
}

fn relation_has_interest(relid: pg_sys::Oid) -> bool {
    let interest = crate::shmem::interest();
    if interest.any(&[relid.to_u32()]) {
        return true;
    }
    // SAFETY: a syscache look-up by OID; InvalidOid if the relation is gone.
    interest.has_schemas() && interest.any(&[unsafe { pg_sys::get_rel_namespace(relid) }.to_u32()])
}

/// The capture trigger, attached to every published table by
/// `realtime.sync_captured_tables()`.
#[pg_trigger]
fn capture_changes<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    // Anything else has no row (a statement trigger's tuple is NULL) or
    // its own meaning for the return value: refused whoever attached it.
    refuse_unless_after_row(trigger);
    if !crate::preloaded() {
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let rel = data.tg_relation;
    // SAFETY: tg_relation is the open relation the trigger fired on.
    let (relid, namespace) = unsafe { reported_as(rel) };
    // SAFETY: as above.
    let own_relid = unsafe { (*rel).rd_id };
    let wanted = crate::shmem::interest().wanted(relid.to_u32(), namespace.to_u32());
    if wanted == Wanted::Nothing {
        note_skipped(relid.to_u32(), namespace.to_u32());
        return Ok(None);
    }
    let event = trigger.event();
    let kind = if event.fired_by_insert() {
        ChangeKind::Insert
    } else if event.fired_by_update() {
        ChangeKind::Update
    } else if event.fired_by_delete() {
        ChangeKind::Delete
    } else {
        return Ok(None);
    };
    ensure_callbacks();
    // Cached by the relation that fired (its encoders read its tuples);
    // described as the relation it is reported as.
    let cached = DESCRIBED.with(|cache| cache.borrow().get(&own_relid.to_u32()).cloned());
    let described = cached.unwrap_or_else(|| {
        // Catalog look-ups may process invalidations (and so run
        // on_relcache): no borrow of the cache is held here.
        // SAFETY: `rel` is open for the duration of the trigger call; a
        // partition's root is opened (without a lock of its own: the
        // partition's lock keeps it from being dropped) just to describe it.
        let described = unsafe {
            let relation = if relid == own_relid {
                encode::describe(rel)
            } else {
                let root = pg_sys::RelationIdGetRelation(relid);
                let relation = encode::describe(root);
                pg_sys::RelationClose(root);
                relation
            };
            let encoders = encode::encoders((*rel).rd_att);
            Described {
                relation: Rc::from(relation.encode()),
                order: Order::of(&relation, &encoders),
                encoders: Rc::new(encoders),
                probe: Rc::new(Cell::new(None)),
            }
        };
        DESCRIBED.with(|cache| cache.borrow_mut().insert(own_relid.to_u32(), described.clone()));
        described
    });
    let probe = match wanted {
        Wanted::Keys(slot) => probe_column(&described, slot, relid.to_u32()),
        _ => None,
    };
    let subxact = crate::unguarded::current_subtransaction();
    let limit = crate::shmem::ring().max_payload();
    // SAFETY: tg_relation is open; its descriptor matches the tuples.
    let desc = unsafe { (*rel).rd_att };
    // The row filters look at: the new one, the old one for DELETE (the
    // first one encoded either way).
    let probed = match kind {
        ChangeKind::Insert | ChangeKind::Delete => data.tg_trigtuple,
        ChangeKind::Update => data.tg_newtuple,
    };
    TXN.with(|txn| {
        let mut txn = txn.borrow_mut();
        let txn = &mut *txn;
        let deformed_first = match probe {
            Some((probe, encoder)) => {
                // SAFETY: the tuple belongs to this trigger call and matches
                // the descriptor the encoders were made for.
                unsafe { encode::deform(&mut txn.deformed, probed, desc) };
                if !keeps(txn, probe, encoder, &described, relid.to_u32(), namespace.to_u32()) {
                    return;
                }
                true
            }
            None => false,
        };
        txn.encoded += 1;
        if !txn.touched.contains(&relid.to_u32()) {
            txn.touched.push(relid.to_u32());
        }
        if txn.overflowed {
            return;
        }
        let relation = match txn.relations.iter().position(|r| Rc::ptr_eq(r, &described.relation)) {
            Some(i) => i as u16,
            None => {
                txn.relations.push(Rc::clone(&described.relation));
                (txn.relations.len() - 1) as u16
            }
        };
        // The mark first: if encoding raises an ERROR that a savepoint
        // catches, its rollback cuts the partial change off from here.
        txn.marks.push((txn.rows.len(), subxact));
        let (rows, at, deformed) = (&mut txn.rows, &mut txn.at, &mut txn.deformed);
        wire::begin_change(rows, relation, kind);
        // SAFETY: the tuples belong to this trigger call and match the
        // relation's descriptor, which the encoders were made for.
        unsafe {
            let mut row = |rows: &mut Vec<u8>, tuple| {
                wire::put_row(rows, |out| {
                    if deformed_first && tuple == probed {
                        encode::deformed_json(out, at, deformed, &described.encoders)
                    } else {
                        encode::row_json(out, at, deformed, tuple, desc, &described.encoders)
                    }
                });
                match &described.order {
                    Order::Same => wire::put_offsets(rows, at.iter().copied()),
                    Order::Permuted(p) => wire::put_offsets(rows, p.iter().map(|j| at[*j])),
                    Order::Unknown => wire::put_offsets(rows, std::iter::empty()),
                }
            };
            match kind {
                ChangeKind::Insert => {
                    row(rows, data.tg_trigtuple);
                    wire::put_no_row(rows);
                }
                ChangeKind::Update => {
                    row(rows, data.tg_newtuple);
                    row(rows, data.tg_trigtuple);
                }
                ChangeKind::Delete => {
                    wire::put_no_row(rows);
                    row(rows, data.tg_trigtuple);
                }
            }
        }
        if rows.len() > limit {
            // Larger than the ring could ever hold: stop buffering (no
            // unbounded backend memory) and report the loss at commit.
            txn.overflowed = true;
            txn.rows = Vec::new();
            txn.marks = Vec::new();
        }
    });
    Ok(None)
}

/// Raises an ERROR unless the trigger fired AFTER an INSERT, UPDATE or
/// DELETE, FOR EACH ROW: the only way `realtime.sync_captured_tables()`
/// attaches it.
fn refuse_unless_after_row(trigger: &PgTrigger<'_>) {
    let event = trigger.event();
    let row_change = event.fired_by_insert() || event.fired_by_update() || event.fired_by_delete();
    if matches!(trigger.level(), PgTriggerLevel::Row)
        && matches!(trigger.when(), Ok(PgTriggerWhen::After))
        && row_change
    {
        return;
    }
    let name = trigger.name().unwrap_or("?");
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        format!(
            "realtime.capture_changes() must be fired AFTER INSERT, UPDATE or DELETE FOR EACH ROW (trigger \"{name}\")"
        ),
        "capture_changes",
    )
    .set_hint("pg_realtime attaches it to published tables itself; drop this trigger.")
    .report(PgLogLevel::ERROR);
}

/// The column key filter `slot` filters rows of `relid` on, as one of the
/// relation's encoders, from the relation's cache unless the slot changed
/// since. None: every row goes on.
fn probe_column(described: &Described, slot: usize, relid: u32) -> Option<(Probe, usize)> {
    let filters = crate::shmem::key_filters();
    let cached = described
        .probe
        .get()
        .filter(|p| p.slot == slot && p.generation == filters.generation(slot));
    let probe = match cached {
        Some(p) => p,
        None => {
            let column = filters.column(slot, relid)?;
            let p = Probe {
                slot,
                generation: column.generation,
                encoder: described.encoders.iter().position(|e| e.name == column.name),
                kind: column.kind,
            };
            described.probe.set(Some(p));
            p
        }
    };
    Some((probe, probe.encoder?))
}

/// Whether the row deformed in `txn.deformed` may be wanted by a
/// subscriber, judged by the key of its value in the probed column. If
/// not, it is noted as skipped (for the check at commit) and counted.
fn keeps(txn: &mut TxnBuffer, probe: Probe, encoder: usize, described: &Described, relid: u32, namespace: u32) -> bool {
    let filters = crate::shmem::key_filters();
    let version = filters.version(probe.slot);
    txn.probe.clear();
    // SAFETY: `deformed` holds this trigger call's tuple of the
    // descriptor the encoders were made for.
    unsafe { encode::value_json(&mut txn.probe, &txn.deformed, &described.encoders[encoder]) };
    // (text in a database encoding other than UTF-8 may not be: sent on)
    let Ok(json) = std::str::from_utf8(&txn.probe) else {
        return true;
    };
    let hash = json_key(probe.kind, json).map(|key| key_hash(&key));
    if filters.wants(probe.slot, relid, probe.generation, hash) {
        return true;
    }
    txn.filtered_out += 1;
    let skips = match txn.key_skips.iter_mut().position(|s| s.relid == relid) {
        Some(i) => &mut txn.key_skips[i],
        None => {
            txn.key_skips.push(KeySkips {
                relid,
                namespace,
                slot: probe.slot,
                generation: probe.generation,
                version,
                keys: 0,
                last: None,
                saturated: false,
            });
            txn.key_skips.last_mut().unwrap()
        }
    };
    if skips.slot != probe.slot || skips.generation != probe.generation {
        // The table's filter moved to another column or slot during the
        // transaction: whether it now wants the rows dropped before is
        // not known, so they count as missed if anyone listens at commit.
        (skips.slot, skips.generation, skips.version) = (probe.slot, probe.generation, u64::MAX);
        skips.saturated = true;
    }
    if !skips.saturated && skips.last != Some(hash) {
        if skips.keys == MAX_KEY_SKIPS {
            skips.saturated = true;
        } else {
            skips.keys += 1;
            skips.last = Some(hash);
            txn.skipped_keys.push((relid, hash));
        }
    }
    false
}

/// Whether a subscriber may have joined, since these rows were dropped,
/// that wants some of them (then it is told to refetch); `keys` are the
/// transaction's `skipped_keys`. Reads shared atomics only.
fn missed(skips: &KeySkips, keys: &[(u32, Option<u64>)]) -> bool {
    let filters = crate::shmem::key_filters();
    match crate::shmem::interest().wanted(skips.relid, skips.namespace) {
        Wanted::Nothing => false,
        Wanted::Every => true,
        Wanted::Keys(slot) if slot != skips.slot => true,
        // not rewritten since the first row was dropped: nobody new
        Wanted::Keys(slot) if filters.version(slot) == skips.version => false,
        Wanted::Keys(_) if skips.saturated => true,
        Wanted::Keys(slot) => keys
            .iter()
            .filter(|(relid, _)| *relid == skips.relid)
            .any(|(_, hash)| filters.wants(slot, skips.relid, skips.generation, *hash)),
    }
}

fn ensure_callbacks() {
    if CALLBACKS.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: registered once per backend, for its whole life; the
    // callbacks only touch this backend's buffer and shared atomics.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0usize));
    }
    CALLBACKS.store(true, Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // (Rows a key filter dropped count: had a subscriber for one of
        // their keys joined before COMMIT PREPARED, nothing would tell it.)
        XACT_EVENT_PRE_PREPARE if TXN.with(|t| !t.borrow().is_empty() || !t.borrow().key_skips.is_empty()) => {
            TXN.with(|t| finish(&mut t.borrow_mut()));
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "cannot PREPARE a transaction that changed tables captured by pg_realtime",
                "capture_changes",
            )
            .set_detail("Two-phase commit is not supported for realtime changes; they would be lost.")
            .set_hint("Commit the transaction normally, or remove the table from the realtime publication.")
            .report(PgLogLevel::ERROR);
        }
        XACT_EVENT_PRE_COMMIT => TXN.with(|t| {
            let mut txn = t.borrow_mut();
            if txn.is_empty() {
                return;
            }
            // Before the commit record, whose LSN will be above the end of
            // this transaction's last WAL record: a backend-local variable,
            // read without the WAL insertion lock the insert position needs.
            // (A captured change implies a WAL record; were it 0, the fence
            // would hold every later commit until this one leaves.)
            // SAFETY: plain reads of this backend's globals.
            let (bound, hint) = unsafe { (pg_sys::XactLastRecEnd, pg_sys::MyProcPid as usize) };
            txn.fence_ticket = Some(crate::shmem::fence().enter(bound, hint));
        }),
        XACT_EVENT_COMMIT => {
            TXN.with(|t| {
                let mut txn = t.borrow_mut();
                // Reading shared atomics only: nothing here can fail.
                let interest = crate::shmem::interest();
                let missed_table = |(r, nsp): &&(u32, u32)| interest.any(&[*r, *nsp]);
                let missed_keys = |s: &&KeySkips| missed(s, &txn.skipped_keys);
                if txn.skipped.iter().any(|s| missed_table(&s)) || txn.key_skips.iter().any(|s| missed_keys(&s)) {
                    let tables = txn.skipped.iter().filter(missed_table).map(|(r, _)| *r);
                    let keyed = txn.key_skips.iter().filter(missed_keys).map(|s| s.relid);
                    crate::shmem::ring().record_loss(tables.chain(keyed));
                    crate::shmem::wake_worker();
                }
                if !txn.is_empty() {
                    // Nothing may raise after the commit record: a panic here
                    // is caught and counted as a loss instead.
                    let published = std::panic::catch_unwind(AssertUnwindSafe(|| publish(&mut txn)));
                    if published.is_err() {
                        crate::shmem::ring().record_loss(txn.touched.iter().copied());
                        Counters::incr(&crate::shmem::counters().transactions_lost);
                    }
                }
                finish(&mut txn);
                leave_fence(&mut txn);
            });
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => TXN.with(|t| {
            let mut txn = t.borrow_mut();
            finish(&mut txn);
            leave_fence(&mut txn);
        }),
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // Subtransaction ids grow: ours and our children's are >= my_subid,
        // and no later sibling has started yet, so every change from the
        // first one tagged >= my_subid on is ours or our children's.
        TXN.with(|t| {
            let mut t = t.borrow_mut();
            if let Some(i) = t.marks.iter().position(|(_, subid)| *subid >= my_subid) {
                let start = t.marks[i].0;
                t.rows.truncate(start);
                t.marks.truncate(i);
            }
        });
    }
}

/// Ends the transaction's buffer: counts the rows it encoded and empties
/// it for the next transaction.
fn finish(txn: &mut TxnBuffer) {
    if txn.encoded > 0 {
        Counters::add(&crate::shmem::counters().rows_captured, txn.encoded);
    }
    if txn.filtered_out > 0 {
        Counters::add(&crate::shmem::counters().rows_filtered_out, txn.filtered_out);
    }
    txn.clear();
}

/// Leaves the commit fence if this transaction entered it, and wakes the
/// worker, which may have held later transactions back for this one.
fn leave_fence(txn: &mut TxnBuffer) {
    if let Some(ticket) = txn.fence_ticket.take() {
        crate::shmem::fence().leave(ticket);
        crate::shmem::wake_worker();
    }
}

/// A relation changed (or, with InvalidOid, any may have): forget what
/// this backend cached about it.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    DESCRIBED.with(|cache| forget(&mut cache.borrow_mut(), relid));
    ROOTS.with(|roots| forget(&mut roots.borrow_mut(), relid));
}

fn forget<V>(cache: &mut OidMap<V>, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid {
        cache.clear();
    } else {
        cache.remove(&relid.to_u32());
    }
}

/// Writes a committed transaction, not empty, into the ring (at
/// XACT_EVENT_COMMIT).
fn publish(txn: &mut TxnBuffer) {
    let xid = crate::unguarded::top_transaction_id();
    let stop = crate::unguarded::transaction_stop_timestamp();
    // SAFETY: a plain read of this backend's global, set by the commit.
    let lsn = unsafe { pg_sys::XactLastCommitEnd };
    let counters = crate::shmem::counters();
    let ring = crate::shmem::ring();
    if xid == pg_sys::TransactionId::INVALID {
        return;
    }
    let header = Header {
        xid: xid.into_inner(),
        commit_lsn: lsn,
        commit_time_us: stop + PG_EPOCH_OFFSET_US,
        overflowed: txn.overflowed,
    };
    wire::encode_record(&mut txn.record, &header, &txn.relations, txn.marks.len(), &txn.rows);
    match ring.publish(&txn.record) {
        Ok(_) if !txn.overflowed => Counters::incr(&counters.transactions_published),
        Ok(_) => Counters::incr(&counters.transactions_lost),
        Err(_) => {
            ring.record_loss(txn.touched.iter().copied());
            Counters::incr(&counters.transactions_lost);
        }
    }
}
