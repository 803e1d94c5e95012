//! Shared memory: the server's counters, the change ring, the interest
//! table and the worker's latch. Everything in it is atomics, so backends,
//! the worker's main thread and its network threads may all touch it
//! without calling Postgres.

mod region;

use bgworker::shared::interest::InterestTable;
use bgworker::shared::ring::ChangeRing;
use bgworker::shared::stats::Counters;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use region::ChangesRegion;

/// The worker's counters. Only atomics, so network threads may update them
/// without calling Postgres, and sessions may read them without a lock.
#[derive(Default)]
#[repr(transparent)]
pub struct SharedCounters(pub Counters);

// SAFETY: `Counters` is `repr(C)` and made only of atomics: it holds no
// pointers and is valid to share between processes as raw memory.
unsafe impl PGRXSharedMemory for SharedCounters {}

/// Where the worker's latch is, for committing backends to set.
#[derive(Default)]
pub struct WorkerLatch(AtomicUsize);

// SAFETY: an atomic word; the address it holds points into shared memory
// (a PGPROC), which is mapped at the same address in every process.
unsafe impl PGRXSharedMemory for WorkerLatch {}

/// Which table the worker is checking as a subscriber, and which it
/// refuses to (`bgworker::shared::quarantine`).
#[derive(Default)]
#[repr(transparent)]
pub struct SharedQuarantine(pub bgworker::shared::quarantine::Quarantine);

// SAFETY: `Quarantine` is `repr(C)` and made only of atomics.
unsafe impl PGRXSharedMemory for SharedQuarantine {}

// SAFETY: the name is unique to this extension.
static COUNTERS: PgAtomic<SharedCounters> = unsafe { PgAtomic::new(c"pg_realtime counters") };
// SAFETY: as above.
static LATCH: PgAtomic<WorkerLatch> = unsafe { PgAtomic::new(c"pg_realtime worker latch") };
// SAFETY: as above.
static QUARANTINE: PgAtomic<SharedQuarantine> = unsafe { PgAtomic::new(c"pg_realtime quarantine") };
static CHANGES: ChangesRegion = ChangesRegion::new(c"pg_realtime changes");

/// Requests the shared memory; called from `_PG_init` while preloading,
/// after the settings are defined (the ring's size is one).
pub fn init() {
    pg_shmem_init!(COUNTERS);
    pg_shmem_init!(LATCH);
    pg_shmem_init!(QUARANTINE);
    pg_shmem_init!(CHANGES = ());
}

/// The counters, once shared memory exists (any process forked after
/// postmaster start-up). The reference is `'static` because shared memory
/// lives as long as the process.
pub fn counters() -> &'static Counters {
    &COUNTERS.get().0
}

pub fn quarantine() -> &'static bgworker::shared::quarantine::Quarantine {
    &QUARANTINE.get().0
}

pub fn ring() -> ChangeRing<'static> {
    CHANGES.ring()
}

pub fn interest() -> InterestTable<'static> {
    CHANGES.interest()
}

pub fn key_filters() -> bgworker::shared::prefilter::KeyFilters<'static> {
    CHANGES.key_filters()
}

pub fn fence() -> bgworker::shared::fence::CommitFence<'static> {
    CHANGES.fence()
}

/// Publishes this process's latch as the worker's (worker start-up).
pub fn set_worker_latch() {
    // SAFETY: MyLatch points at this process's PGPROC latch, in shared memory.
    let latch = unsafe { pg_sys::MyLatch } as usize;
    LATCH.get().0.store(latch, Ordering::Release);
}

/// Wakes the worker, if it is running.
pub fn wake_worker() {
    let latch = LATCH.get().0.load(Ordering::Acquire) as *mut pg_sys::Latch;
    if !latch.is_null() {
        // SAFETY: the pointer is a PGPROC latch in shared memory, valid for
        // the life of the cluster; SetLatch on a latch whose owner has
        // exited is harmless.
        unsafe { crate::unguarded::set_latch(latch) };
    }
}
