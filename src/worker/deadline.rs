//! How long code run as a subscriber may take (`pg_realtime.check_timeout`,
//! see `acting::as_identity`). PostgreSQL's statement timeout is never
//! armed for SPI in a background worker, so it is armed by hand: when it
//! fires, the next CHECK_FOR_INTERRUPTS raises "canceling statement due to
//! statement timeout" inside the check's subtransaction.
//!
//! A cancel can be caught (a PL/pgSQL `EXCEPTION WHEN query_canceled`
//! block that goes on sleeping), so a second timer stands behind it: past
//! twice the timeout and two seconds more, the worker is told to die
//! (`ProcDiePending`, a FATAL no code can catch). The postmaster starts it
//! again and clients reconnect: bounded, where a caught cancel was not.

use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicI32, Ordering};

// utils/timeout.h, not in pgrx's bindings; these signatures, and the places
// of LOCK_TIMEOUT and STATEMENT_TIMEOUT in `TimeoutId`, are the same in
// PostgreSQL 14 to 18. USER_TIMEOUT, the first a module may register,
// moves as PostgreSQL adds its own.
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn disable_timeout(id: c_int, keep_indicator: bool);
    fn get_timeout_indicator(id: c_int, reset: bool) -> bool;
    fn RegisterTimeout(id: c_int, handler: Option<unsafe extern "C" fn()>) -> c_int;
}
const LOCK_TIMEOUT: c_int = 2;
const STATEMENT_TIMEOUT: c_int = 3;
#[cfg(feature = "pg14")]
const USER_TIMEOUT: c_int = 10;
#[cfg(any(feature = "pg15", feature = "pg16"))]
const USER_TIMEOUT: c_int = 12;
#[cfg(any(feature = "pg17", feature = "pg18"))]
const USER_TIMEOUT: c_int = 13;
#[cfg(not(any(
    feature = "pg14",
    feature = "pg15",
    feature = "pg16",
    feature = "pg17",
    feature = "pg18"
)))]
const USER_TIMEOUT: c_int = 12;

/// The timer that ends the worker, once registered.
static DIE_TIMEOUT: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// Whether a deadline is armed (a check inside a check arms none).
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

/// Registers the worker's own timer; once, at start, on the main thread.
pub fn register() {
    // SAFETY: main thread, after InitPostgres set the timeout module up.
    let id = unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| RegisterTimeout(USER_TIMEOUT, Some(die))) };
    DIE_TIMEOUT.store(id, Ordering::Relaxed);
}

/// Runs in the SIGALRM handler: only what a signal handler may do.
unsafe extern "C" fn die() {
    // SAFETY: the flags are sig_atomic_t, written by PostgreSQL's own
    // handlers too; SetLatch is safe in a signal handler.
    unsafe {
        pg_sys::ProcDiePending = 1;
        pg_sys::InterruptPending = 1;
        crate::unguarded::set_latch(pg_sys::MyLatch);
    }
}

/// A check's deadline, armed until dropped.
pub struct Deadline {
    armed: bool,
}

impl Deadline {
    /// Arms the cancel at `ms` and, behind it, the end of the worker.
    /// Nothing with `ms` of 0, or inside another armed deadline.
    pub fn arm(ms: i32) -> Deadline {
        if ms <= 0 || ARMED.get() {
            return Deadline { armed: false };
        }
        let die_after = ms.saturating_mul(2).saturating_add(2000);
        let die_timeout = DIE_TIMEOUT.load(Ordering::Relaxed);
        // SAFETY: main thread; both timeouts are registered (the statement
        // timeout by InitPostgres).
        unsafe {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
                enable_timeout_after(STATEMENT_TIMEOUT, ms);
                if die_timeout >= 0 {
                    enable_timeout_after(die_timeout, die_after);
                }
            })
        };
        ARMED.set(true);
        Deadline { armed: true }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        ARMED.set(false);
        let die_timeout = DIE_TIMEOUT.load(Ordering::Relaxed);
        // SAFETY: main thread; these do not raise an ERROR. If the cancel
        // fired just as the check ended, its SIGINT has been handled by
        // now (the handler runs within the timer's): the cancel it left
        // pending is for the check that is over and must not hit the next
        // statement; the same for a lock timeout's indicator.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            if die_timeout >= 0 {
                disable_timeout(die_timeout, false);
            }
            get_timeout_indicator(LOCK_TIMEOUT, true);
            pg_sys::QueryCancelPending = 0;
        }
    }
}
