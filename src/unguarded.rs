//! Postgres functions called on every captured row or commit that never
//! raise an ERROR, declared here so they are called directly. pgrx guards
//! each call of its own bindings (a `sigsetjmp` to turn an ERROR into a
//! Rust panic, and a thread check), which costs more than these functions
//! do; without an ERROR there is nothing to guard against. Their
//! signatures are the same in PostgreSQL 14 to 18.

use pgrx::pg_sys;

unsafe extern "C" {
    fn heap_deform_tuple(
        tuple: pg_sys::HeapTuple,
        desc: pg_sys::TupleDesc,
        values: *mut pg_sys::Datum,
        isnull: *mut bool,
    );
    fn GetCurrentSubTransactionId() -> pg_sys::SubTransactionId;
    fn GetTopTransactionIdIfAny() -> pg_sys::TransactionId;
    fn GetCurrentTransactionStopTimestamp() -> pg_sys::TimestampTz;
    fn SetLatch(latch: *mut pg_sys::Latch);
}

/// `heap_deform_tuple`: reads the tuple's attributes; no allocation, no
/// catalog access, no ERROR.
///
/// # Safety
/// `tuple` is a valid heap tuple of `desc`; `values` and `isnull` have
/// room for `desc.natts` entries. Main thread of a backend.
pub unsafe fn deform_tuple(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    values: &mut [pg_sys::Datum],
    isnull: &mut [bool],
) {
    // SAFETY: per the contract.
    unsafe { heap_deform_tuple(tuple, desc, values.as_mut_ptr(), isnull.as_mut_ptr()) }
}

/// `GetCurrentSubTransactionId`: a read of the transaction state.
pub fn current_subtransaction() -> pg_sys::SubTransactionId {
    // SAFETY: reads backend-local state; callable in any transaction state.
    unsafe { GetCurrentSubTransactionId() }
}

/// `GetTopTransactionIdIfAny`: a read of the transaction state.
pub fn top_transaction_id() -> pg_sys::TransactionId {
    // SAFETY: as above.
    unsafe { GetTopTransactionIdIfAny() }
}

/// `GetCurrentTransactionStopTimestamp`: the commit time (read, or taken
/// from the clock once).
pub fn transaction_stop_timestamp() -> pg_sys::TimestampTz {
    // SAFETY: as above.
    unsafe { GetCurrentTransactionStopTimestamp() }
}

/// `SetLatch`: atomics, and at most a signal to the latch's owner.
///
/// # Safety
/// `latch` points at a shared latch (in a PGPROC).
pub unsafe fn set_latch(latch: *mut pg_sys::Latch) {
    // SAFETY: per the contract.
    unsafe { SetLatch(latch) }
}
