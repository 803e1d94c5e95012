//! What the worker hears of catalog changes, through PostgreSQL's own
//! invalidation messages (`docs/security.md`, "Kept checks"): which tables
//! changed (ALTER TABLE, GRANT, a policy), so what a role may read of them
//! is read again before the next delivery rather than up to a second
//! later; and whether a function, a role, a membership, the database
//! (its owner is a member of `pg_database_owner`) or a schema changed,
//! after which kept check plans are let go (`access::share`: a
//! membership decides which policies apply to a table a policy reads,
//! and the worker does not rely on the plan cache replanning for it),
//! and every table counts as changed for all but a function.
//!
//! Messages are taken when a transaction starts (or a lock is taken):
//! [`catch_up`] starts one for that alone. A change that locks the table
//! (ALTER TABLE, a policy) reaches the worker before a row written after
//! it: the writer's lock waits for the change's commit, and the change
//! sends its messages before releasing its locks. One that does not
//! (GRANT, REVOKE, a membership) sends them just after its commit is
//! visible: a row committed in between may be delivered as before.

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

impl Changed {
    /// Counts every table as changed (keeping the room made for them).
    fn mark_all(&mut self) {
        self.all = true;
        self.relids.clear();
    }
}

thread_local! {
    static CHANGED: RefCell<Changed> = RefCell::new(Changed::default());
    /// Functions, roles, memberships, databases and schemas changed (a
    /// count).
    static CATALOG: Cell<u64> = const { Cell::new(0) };
    /// A table heard while `CHANGED` was borrowed: count every table.
    static MISSED: Cell<bool> = const { Cell::new(false) };
}

/// Registers the callbacks; once, on the main thread, at the worker's start.
pub fn register() {
    // Room for every table remembered, so that a callback never allocates.
    CHANGED.with(|changed| changed.borrow_mut().relids.reserve(MAX_CHANGED));
    use pg_sys::SysCacheIdentifier::{AUTHMEMROLEMEM, AUTHOID, DATABASEOID, NAMESPACEOID, PROCOID};
    // SAFETY: the main thread, once per process (PostgreSQL keeps a fixed
    // number of callback slots); the callbacks only set flags and counts
    // in room already made, and cannot raise an error.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relation), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(PROCOID as _, Some(on_function), pg_sys::Datum::from(0));
        // (the database's owner is a member of pg_database_owner)
        for cache in [AUTHOID, AUTHMEMROLEMEM, DATABASEOID, NAMESPACEOID] {
            pg_sys::CacheRegisterSyscacheCallback(cache as _, Some(on_role_or_schema), pg_sys::Datum::from(0));
        }
    }
}

unsafe extern "C-unwind" fn on_relation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let relid = u32::from(relid);
    note_changed(|changed| {
        if relid == 0 || changed.relids.len() >= MAX_CHANGED {
            changed.mark_all();
        } else if !changed.all {
            changed.relids.insert(relid);
        }
    });
}

unsafe extern "C-unwind" fn on_function(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    count_catalog_change();
}

unsafe extern "C-unwind" fn on_role_or_schema(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    count_catalog_change();
    note_changed(Changed::mark_all);
}

fn count_catalog_change() {
    let _ = CATALOG.try_with(|n| n.set(n.get().wrapping_add(1)));
}

/// Applies `note` to the tables changed (every table, if they are in use).
fn note_changed(note: impl FnOnce(&mut Changed)) {
    let _ = CHANGED.try_with(|changed| match changed.try_borrow_mut() {
        Ok(mut changed) => note(&mut changed),
        Err(_) => {
            let _ = MISSED.try_with(|missed| missed.set(true));
        }
    });
}

/// Takes the messages waiting (in a transaction started for that).
pub fn catch_up() {
    BackgroundWorker::transaction(|| ());
}

/// The tables changed since the last call (keeping the room made for
/// them).
pub fn take_changed() -> Changed {
    let mut taken = CHANGED.with(|changed| {
        let mut changed = changed.borrow_mut();
        Changed {
            all: std::mem::take(&mut changed.all),
            relids: changed.relids.drain().collect(),
        }
    });
    taken.all |= MISSED.with(|missed| missed.replace(false));
    taken
}

/// A count of the catalog changes heard that let kept check plans go: it
/// moves when a function, a role, a membership, a database or a schema
/// is created, altered or dropped (or the caches are reset).
pub fn catalog_changes() -> u64 {
    CATALOG.with(Cell::get)
}
