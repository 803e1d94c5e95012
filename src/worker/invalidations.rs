//! What the worker hears of catalog changes, through PostgreSQL's own
//! invalidation messages (`docs/security.md`, "Kept checks"): which tables
//! changed (ALTER TABLE, GRANT, a policy), so what a role may read of them
//! is read again before the next delivery rather than up to a second
//! later; and whether any function changed, for the sharing guard of
//! kept check plans (`access::share`).
//!
//! Messages are taken when a transaction starts (or a lock is taken):
//! [`catch_up`] starts one for that alone. A change always reaches the
//! worker before a row written after it: the writer's lock waits for the
//! change's commit, and the change sends its messages before releasing
//! its locks.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;

/// Tables remembered one by one; past this, every table counts as changed.
const MAX_CHANGED: usize = 1024;

/// Tables changed since [`take_changed`] last looked.
#[derive(Debug, Default)]
pub struct Changed {
    /// Every table (a cache reset, or too many to list).
    pub all: bool,
    pub relids: HashSet<u32>,
}

thread_local! {
    static CHANGED: RefCell<Changed> = RefCell::new(Changed::default());
    static FUNCTIONS: Cell<u64> = const { Cell::new(0) };
    /// A table heard while `CHANGED` was borrowed: count every table.
    static MISSED: Cell<bool> = const { Cell::new(false) };
}

/// Registers the callbacks; once, on the main thread, at the worker's start.
pub fn register() {
    // SAFETY: the main thread, once per process (PostgreSQL keeps a fixed
    // number of callback slots); the callbacks only note what they heard
    // and cannot raise an error.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relation), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::PROCOID as _,
            Some(on_function),
            pg_sys::Datum::from(0),
        );
    }
}

unsafe extern "C-unwind" fn on_relation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let relid = u32::from(relid);
    CHANGED.with(|changed| {
        let Ok(mut changed) = changed.try_borrow_mut() else {
            MISSED.with(|missed| missed.set(true));
            return;
        };
        if relid == 0 || changed.relids.len() >= MAX_CHANGED {
            changed.all = true;
            changed.relids.clear();
        } else if !changed.all {
            changed.relids.insert(relid);
        }
    });
}

unsafe extern "C-unwind" fn on_function(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    FUNCTIONS.with(|n| n.set(n.get().wrapping_add(1)));
}

/// Takes the messages waiting (in a transaction started for that).
pub fn catch_up() {
    BackgroundWorker::transaction(|| ());
}

/// The tables changed since the last call.
pub fn take_changed() -> Changed {
    let mut taken = CHANGED.with(|changed| std::mem::take(&mut *changed.borrow_mut()));
    taken.all |= MISSED.with(|missed| missed.replace(false));
    taken
}

/// A count of the function changes heard: it moves when any function is
/// created, altered or dropped (or the caches are reset).
pub fn function_changes() -> u64 {
    FUNCTIONS.with(Cell::get)
}
