//! Shared memory: the server's counters, readable from every session.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use realtime::stats::Counters;

/// The worker's counters. Only atomics, so network threads may update them
/// without calling Postgres, and sessions may read them without a lock.
#[derive(Default)]
#[repr(transparent)]
pub struct SharedCounters(pub Counters);

// SAFETY: `Counters` is `repr(C)` and made only of atomics: it holds no
// pointers and is valid to share between processes as raw memory.
unsafe impl PGRXSharedMemory for SharedCounters {}

// SAFETY: the name is unique to this extension.
static COUNTERS: PgAtomic<SharedCounters> = unsafe { PgAtomic::new(c"pg_realtime counters") };

/// Requests the shared memory; called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(COUNTERS);
}

/// The counters, once shared memory exists (any process forked after
/// postmaster start-up). The reference is `'static` because shared memory
/// lives as long as the process.
pub fn counters() -> &'static Counters {
    &COUNTERS.get().0
}
