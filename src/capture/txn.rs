//! The transaction's buffer of captured changes and the transaction
//! callbacks that publish it into the change ring at commit, drop it on
//! abort (or a rolled-back savepoint's part of it) and refuse PREPARE.

use super::encode;
use super::skips::Skips;
use bgworker::shared::stats::Counters;
use bgworker::shared::wire::{self, ChangeKind, Header};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Microseconds between the Unix epoch and Postgres's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Bytes of each buffer kept from one transaction to the next: a huge
/// transaction does not pin its memory for the backend's life.
const KEEP_BYTES: usize = 64 * 1024;

/// What the current transaction captured and skipped so far. Kept from
/// transaction to transaction (cleared, not freed), so a commit allocates
/// nothing.
#[derive(Default)]
pub(super) struct TxnBuffer {
    pub(super) changes: Changes,
    pub(super) skips: Skips,
    pub(super) scratch: Scratch,
    /// This transaction's place in the commit fence, from PRE_COMMIT until
    /// it has published (or aborted). Not touched by `clear`.
    fence_ticket: Option<bgworker::shared::fence::Ticket>,
}

/// The captured changes, as the ring record will carry them.
#[derive(Default)]
pub(super) struct Changes {
    /// The relations the changes refer to (by position): encoded
    /// descriptions, shared with the description cache.
    relations: Vec<Rc<[u8]>>,
    /// The changes, in statement order, encoded as the record carries them
    /// (`wire::begin_change`, `wire::put_row`), back to back.
    pub(super) rows: Vec<u8>,
    /// Where each change starts in `rows`, and the subtransaction that
    /// made it.
    marks: Vec<(usize, pg_sys::SubTransactionId)>,
    /// More than fits in the ring: the changes were dropped, only the
    /// relations are kept, to tell their subscribers.
    pub(super) overflowed: bool,
    /// Every relation written, also after an overflow (few per
    /// transaction: a vector beats a set).
    touched: Vec<u32>,
    /// Rows encoded, added to the shared counter once per transaction
    /// rather than per row (it is a cache line every backend writes).
    encoded: u64,
    /// The topics broadcast to (`wire::topic_loss_id`), to be told if
    /// their broadcasts are lost; past `MAX_TOPICS`, `many_topics`.
    topics: Vec<u32>,
    many_topics: bool,
}

/// Topics one transaction's loss is told to by name; past it, everyone.
const MAX_TOPICS: usize = 64;

/// Buffers reused from row to row and commit to commit.
#[derive(Default)]
pub(super) struct Scratch {
    /// Where the committed transaction's record is put together before it
    /// is copied into the ring.
    record: Vec<u8>,
    /// Where each value of the row being written starts.
    pub(super) at: Vec<u32>,
    /// The row being written, deformed.
    pub(super) deformed: encode::Deformed,
    /// The value a key filter looks at, as JSON.
    pub(super) probe: Vec<u8>,
}

impl TxnBuffer {
    fn is_empty(&self) -> bool {
        self.changes.marks.is_empty() && !self.changes.overflowed
    }

    /// Forgets the transaction, keeping the allocations (up to a limit).
    fn clear(&mut self) {
        self.changes.clear();
        self.skips.clear(KEEP_BYTES);
        if self.scratch.record.capacity() > KEEP_BYTES {
            self.scratch.record = Vec::new();
        }
    }
}

impl Changes {
    /// Counts a row of `relid` (described by `relation`) as captured:
    /// encoded now, or lost to an overflow, whose record then still lists
    /// the relation, for its subscribers to be told.
    pub(super) fn count(&mut self, relid: u32, relation: &Rc<[u8]>) {
        self.encoded += 1;
        if !self.touched.contains(&relid) {
            self.touched.push(relid);
        }
        if self.overflowed {
            self.position(relation);
        }
    }

    /// Starts a change of `relation` (an encoded description) made in
    /// subtransaction `subxact`, returning where the relation sits in the
    /// record's list. The mark comes first: if encoding raises an ERROR that
    /// a savepoint catches, its rollback cuts the partial change off.
    pub(super) fn start(&mut self, relation: &Rc<[u8]>, subxact: pg_sys::SubTransactionId) -> u16 {
        let position = self.position(relation);
        self.marks.push((self.rows.len(), subxact));
        position
    }

    /// Where `relation` sits in the record's list of relations, added if
    /// it is not there yet.
    fn position(&mut self, relation: &Rc<[u8]>) -> u16 {
        match self.relations.iter().position(|r| Rc::ptr_eq(r, relation)) {
            Some(i) => i as u16,
            None => {
                self.relations.push(Rc::clone(relation));
                (self.relations.len() - 1) as u16
            }
        }
    }

    /// Adds a TRUNCATE of `relid` (described by `relation`), unless the
    /// change before it is the same TRUNCATE in the same subtransaction: a
    /// partitioned table and its partitions, each reported as the root
    /// (each with its own copy of the root's description), fire one after
    /// the other for one statement.
    pub(super) fn truncated(&mut self, relid: u32, relation: &Rc<[u8]>, subxact: pg_sys::SubTransactionId) {
        if !self.touched.contains(&relid) {
            self.touched.push(relid);
        }
        if self.overflowed {
            self.position(relation);
            return;
        }
        let repeated = self.marks.last().is_some_and(|(start, sub)| {
            *sub == subxact
                && wire::truncated_relation(&self.rows[*start..])
                    .is_some_and(|p| *self.relations[p as usize] == **relation)
        });
        if repeated {
            return;
        }
        let position = self.position(relation);
        self.marks.push((self.rows.len(), subxact));
        wire::begin_change(&mut self.rows, position, ChangeKind::Truncate);
        wire::put_no_row(&mut self.rows);
        wire::put_no_row(&mut self.rows);
    }

    /// Adds a broadcast sent from SQL in subtransaction `subxact`
    /// (`texts`: topic, event, id), unless the transaction overflowed.
    pub(super) fn broadcast(
        &mut self,
        private: bool,
        binary: bool,
        texts: [&str; 3],
        payload: &[u8],
        subxact: pg_sys::SubTransactionId,
    ) {
        let id = wire::topic_loss_id(texts[0], private);
        if !self.topics.contains(&id) {
            if self.topics.len() < MAX_TOPICS {
                self.topics.push(id);
            } else {
                self.many_topics = true;
            }
        }
        if self.overflowed {
            return;
        }
        self.marks.push((self.rows.len(), subxact));
        wire::put_broadcast(&mut self.rows, private, binary, texts, payload);
    }

    /// Notes in the ring that this transaction's changes and broadcasts
    /// were lost, for their subscribers to be told.
    fn record_loss(&self, ring: &bgworker::shared::ring::ChangeRing<'_>, relations: bool) {
        let relids = relations.then_some(&self.touched).into_iter().flatten();
        if self.many_topics {
            ring.record_loss_of_all();
        }
        ring.record_loss(relids.chain(&self.topics).copied());
    }

    /// Drops the changes (more than the ring could ever hold: no unbounded
    /// backend memory), keeping which relations were written, to report the
    /// loss at commit.
    pub(super) fn overflow(&mut self) {
        self.overflowed = true;
        self.rows = Vec::new();
        self.marks = Vec::new();
    }

    /// Drops the changes made in subtransaction `subid` or its children.
    /// Subtransaction ids grow: ours and our children's are >= `subid`,
    /// and no later sibling has started yet, so every change from the first
    /// one tagged >= `subid` on is ours or our children's.
    fn roll_back(&mut self, subid: pg_sys::SubTransactionId) {
        if let Some(i) = self.marks.iter().position(|(_, s)| *s >= subid) {
            self.rows.truncate(self.marks[i].0);
            self.marks.truncate(i);
        }
    }

    fn clear(&mut self) {
        self.relations.clear();
        self.rows.clear();
        self.marks.clear();
        if self.rows.capacity() > KEEP_BYTES {
            self.rows = Vec::new();
            self.marks = Vec::new();
        }
        self.overflowed = false;
        self.touched.clear();
        self.encoded = 0;
        self.topics.clear();
        self.many_topics = false;
    }
}

/// Whether this process has registered its transaction callbacks (a
/// process-wide fact: a plain static, not a thread-local, whose look-up in
/// a loaded library is a call).
static CALLBACKS: AtomicBool = AtomicBool::new(false);

// A backend is single-threaded: this is per-backend state, and each
// trigger call or transaction event looks up `TXN` once (a thread-local of
// a loaded library costs a call to `__tls_get_addr` per look-up).
thread_local! {
    pub(super) static TXN: RefCell<TxnBuffer> = RefCell::new(TxnBuffer::default());
}

/// Registers the transaction and relcache callbacks, once per backend.
pub(super) fn ensure_callbacks() {
    if CALLBACKS.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: registered once per backend, for its whole life; the
    // callbacks only touch this backend's buffer and caches and shared
    // atomics.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        pg_sys::CacheRegisterRelcacheCallback(Some(super::described::on_relcache), pg_sys::Datum::from(0usize));
    }
    CALLBACKS.store(true, Ordering::Relaxed);
}

/// Notes that this transaction wrote rows of `relid` while nobody listened
/// (see `Skips`).
pub(super) fn note_skipped(relid: u32, namespace: u32) {
    ensure_callbacks();
    TXN.with(|t| t.borrow_mut().skips.note_table(relid, namespace));
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE if TXN.with(|t| !t.borrow().is_empty() || !t.borrow().skips.is_empty()) => {
            // Refused in every session, a logical replication apply worker's
            // too: announcing the loss now would come before COMMIT PREPARED,
            // and a subscriber joining in between would never hear of it. A
            // clear error beats a silent gap (README, "Logical replication").
            TXN.with(|t| finish(&mut t.borrow_mut()));
            refuse_prepare();
        }
        XACT_EVENT_PRE_COMMIT => TXN.with(|t| enter_fence(&mut t.borrow_mut())),
        XACT_EVENT_COMMIT => TXN.with(|t| {
            let mut txn = t.borrow_mut();
            txn.skips.announce_missed();
            if !txn.is_empty() {
                // Nothing may raise after the commit record: a panic here
                // is caught and counted as a loss instead.
                let published = std::panic::catch_unwind(AssertUnwindSafe(|| publish(&mut txn)));
                if published.is_err() {
                    txn.changes.record_loss(&crate::shmem::ring(), true);
                    Counters::incr(&crate::shmem::counters().transactions_lost);
                }
            }
            finish(&mut txn);
            leave_fence(&mut txn);
        }),
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => TXN.with(|t| {
            let mut txn = t.borrow_mut();
            finish(&mut txn);
            leave_fence(&mut txn);
        }),
        _ => {}
    }
}

fn refuse_prepare() {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        "cannot PREPARE a transaction that changed tables captured by pg_realtime or sent a realtime broadcast",
        "capture_changes",
    )
    .set_detail("Two-phase commit is not supported for realtime changes and broadcasts; they would be lost.")
    .set_hint("Commit the transaction normally, or remove the table from the realtime publication.")
    .report(PgLogLevel::ERROR);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        TXN.with(|t| t.borrow_mut().changes.roll_back(my_subid));
    }
}

/// Enters the commit fence (at PRE_COMMIT) if the transaction captured
/// anything.
fn enter_fence(txn: &mut TxnBuffer) {
    if txn.is_empty() {
        return;
    }
    // Before the commit record, whose LSN will be above the end of this
    // transaction's last WAL record: a backend-local variable, read without
    // the WAL insertion lock the insert position needs. (A captured change
    // implies a WAL record. A transaction that only broadcast has written
    // none: the insert position bounds its commit record then; a bound of
    // 0 would hold every later commit until this one leaves.)
    // SAFETY: plain reads of this backend's globals.
    let (mut bound, hint) = unsafe { (pg_sys::XactLastRecEnd, pg_sys::MyProcPid as usize) };
    if bound == 0 {
        // SAFETY: reads the WAL insert position (under its spinlock).
        bound = unsafe { pg_sys::GetXLogInsertRecPtr() };
    }
    txn.fence_ticket = Some(crate::shmem::fence().enter(bound, hint));
}

/// Ends the transaction's buffer: counts the rows it encoded and empties
/// it for the next transaction.
fn finish(txn: &mut TxnBuffer) {
    if txn.changes.encoded > 0 {
        Counters::add(&crate::shmem::counters().rows_captured, txn.changes.encoded);
    }
    if txn.skips.filtered_out > 0 {
        Counters::add(&crate::shmem::counters().rows_filtered_out, txn.skips.filtered_out);
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
    let changes = &txn.changes;
    let header = Header {
        xid: xid.into_inner(),
        commit_lsn: lsn,
        commit_time_us: stop + PG_EPOCH_OFFSET_US,
        overflowed: changes.overflowed,
    };
    let record = &mut txn.scratch.record;
    wire::encode_record(record, &header, &changes.relations, changes.marks.len(), &changes.rows);
    match ring.publish(record) {
        Ok(_) if !changes.overflowed => Counters::incr(&counters.transactions_published),
        Ok(_) => {
            // (the record names the relations; the topics are noted here)
            changes.record_loss(&ring, false);
            Counters::incr(&counters.transactions_lost);
        }
        Err(_) => {
            changes.record_loss(&ring, true);
            Counters::incr(&counters.transactions_lost);
        }
    }
}
