//! A subtransaction around a piece of work, as PL/pgSQL runs an exception
//! block: an ERROR raised inside is caught and leaves the surrounding
//! transaction usable; the work is kept or, for probes that write only to
//! ask, rolled back.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;

/// An ERROR caught in a subtransaction.
#[derive(Debug)]
pub struct Caught {
    pub message: String,
    /// It was a cancel (`statement_timeout`, `pg_cancel_backend`), which a
    /// backend must not swallow.
    pub cancelled: bool,
    /// It was `insufficient_privilege` (a permission or a row-level
    /// security policy said no).
    pub refused: bool,
}

/// Runs `f` in a subtransaction, kept (`keep`) or rolled back when it
/// succeeds; an ERROR in it is caught.
pub fn run<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe, keep: bool) -> Result<T, Caught> {
    // SAFETY: inside a transaction, on the backend's (or the worker's
    // main) thread; the memory context and resource owner are restored
    // whichever way the subtransaction ends, as PL/pgSQL does around an
    // exception block.
    let (context, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    // SAFETY: puts back the context and owner saved above, on this thread.
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    PgTryBuilder::new(move || {
        let value = f();
        // SAFETY: ends the subtransaction begun above.
        unsafe {
            if keep {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
        }
        restore();
        Ok(value)
    })
    .catch_others(move |error| {
        // SAFETY: rolls back the subtransaction begun above.
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        restore();
        let report = match &error {
            CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) => e,
            CaughtError::RustPanic { ereport, .. } => ereport,
        };
        Err(Caught {
            message: report.message().to_owned(),
            cancelled: report.sql_error_code() == PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
            refused: report.sql_error_code() == PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        })
    })
    .execute()
}
