//! The shared region holding the change ring, the interest table, the
//! commit fence and the key filters. Its size comes from
//! `pg_realtime.queue_size`, so it is requested by hand rather than as a
//! fixed-size pgrx struct.

use bgworker::shared::fence::{CommitFence, SLOT_WORDS};
use bgworker::shared::interest::{InterestHeader, InterestTable};
use bgworker::shared::prefilter::{self, KeyFilters};
use bgworker::shared::ring::{ChangeRing, RingHeader};
use pgrx::prelude::*;
use pgrx::PgSharedMemoryInitialization;
use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::sync::atomic::AtomicU64;

/// Interest slots: relations and schemas with subscribers, with room for
/// tombstones. Past that, every relation counts as interesting.
const INTEREST_SLOTS: usize = 16 * 1024;
/// Transactions that may be between their commit record and publishing at
/// once; more are counted and make the worker wait for all of them.
const FENCE_SLOTS: usize = 256;
/// Tables whose rows triggers filter by key (`bgworker::shared::prefilter`); past
/// that, the rows of further tables all go on to the worker.
const FILTER_SLOTS: usize = 64;

/// A type the region may hold at an offset: `repr(C)` (or transparent),
/// made of atomics (every process reads and writes it, without a lock)
/// and of padding that nothing reads or writes, with no pointer, aligned
/// to at most 8 bytes (`at` checks it), and valid when all zero (the
/// region starts zeroed).
///
/// # Safety
/// Implement it only for types that are all of that.
unsafe trait SharedZeroed {}

// SAFETY: each is `repr(C)` of atomics and never-touched padding words,
// and all zero is its initial state; their definitions in
// `bgworker::shared::ring` and `bgworker::shared::interest` say they must
// stay so.
unsafe impl SharedZeroed for RingHeader {}
// SAFETY: as above.
unsafe impl SharedZeroed for InterestHeader {}
// SAFETY: an atomic word.
unsafe impl SharedZeroed for AtomicU64 {}

/// `AddinShmemInitLock`, the lock extensions initialise their shared
/// memory under: the 21st of PostgreSQL's individual LWLocks
/// (`storage/lwlocknames.h`, the same in 14 to 18).
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

pub struct ChangesRegion {
    name: &'static CStr,
    base: UnsafeCell<*mut u8>,
    /// Where everything is, from `pg_realtime.queue_size` at start-up (it
    /// cannot change without a restart): the accessors, called on every
    /// captured row and commit, then read no setting (pgrx checks the
    /// calling thread on each read of one).
    layout: UnsafeCell<Layout>,
}

// SAFETY: `base` and `layout` are written once per process, in the shmem
// start-up hook, before any reader exists; afterwards only read.
unsafe impl Sync for ChangesRegion {}

const fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Rounds up to a cache line (Postgres starts each shared memory
/// allocation on one), for what several processes write.
const fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

#[derive(Clone, Copy)]
struct Layout {
    interest_header: usize,
    interest_slots: usize,
    fence_unslotted: usize,
    fence_slots: usize,
    filters: usize,
    ring_words: usize,
    ring_len: usize,
    total: usize,
}

/// The region's layout for a ring of `ring_bytes`.
const fn layout(ring_bytes: usize) -> Layout {
    let ring_len = ring_bytes / 8;
    let interest_header = align64(size_of::<RingHeader>());
    let interest_slots = interest_header + align8(size_of::<InterestHeader>());
    let fence_unslotted = interest_slots + INTEREST_SLOTS * 8;
    let fence_slots = align64(fence_unslotted + 8);
    let filters = align64(fence_slots + FENCE_SLOTS * SLOT_WORDS * 8);
    let ring_words = align64(filters + FILTER_SLOTS * prefilter::SLOT_WORDS * 8);
    Layout {
        interest_header,
        interest_slots,
        fence_unslotted,
        fence_slots,
        filters,
        ring_words,
        ring_len,
        total: ring_words + ring_len * 8,
    }
}

impl ChangesRegion {
    pub const fn new(name: &'static CStr) -> ChangesRegion {
        ChangesRegion {
            name,
            base: UnsafeCell::new(std::ptr::null_mut()),
            layout: UnsafeCell::new(layout(0)),
        }
    }

    fn layout(&self) -> Layout {
        // SAFETY: see the Sync impl.
        unsafe { *self.layout.get() }
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: see the Sync impl.
        let base = unsafe { *self.base.get() };
        assert!(
            !base.is_null(),
            "pg_realtime shared memory is not initialized (not preloaded?)"
        );
        base
    }

    /// `len` atomic words at byte `offset` of the region.
    fn words(&self, offset: usize, len: usize) -> &'static [AtomicU64] {
        // SAFETY: the region was sized by its layout, whose offsets and
        // lengths the callers pass, and zeroed, which is a valid state for
        // these all-atomic types; it lives as long as the process and is
        // 8-aligned (ShmemInitStruct MAXALIGNs; every offset is a multiple
        // of 8).
        unsafe { std::slice::from_raw_parts(self.base().add(offset) as *const AtomicU64, len) }
    }

    /// The `T` at byte `offset` of the region.
    fn at<T: SharedZeroed>(&self, offset: usize) -> &'static T {
        const { assert!(std::mem::align_of::<T>() <= 8, "the region's offsets are 8-aligned") };
        debug_assert_eq!(offset % std::mem::align_of::<T>(), 0);
        // SAFETY: as in `words` (alignment checked above); `T: SharedZeroed`
        // is laid out in C order, made of atomics and untouched padding,
        // and valid when zeroed.
        unsafe { &*(self.base().add(offset) as *const T) }
    }

    pub fn ring(&self) -> ChangeRing<'static> {
        let l = self.layout();
        ChangeRing::new(self.at::<RingHeader>(0), self.words(l.ring_words, l.ring_len))
    }

    pub fn interest(&self) -> InterestTable<'static> {
        let l = self.layout();
        InterestTable::new(
            self.at::<InterestHeader>(l.interest_header),
            self.words(l.interest_slots, INTEREST_SLOTS),
        )
    }

    pub fn key_filters(&self) -> KeyFilters<'static> {
        let l = self.layout();
        KeyFilters::new(self.words(l.filters, FILTER_SLOTS * prefilter::SLOT_WORDS))
    }

    pub fn fence(&self) -> CommitFence<'static> {
        let l = self.layout();
        CommitFence::new(
            self.words(l.fence_slots, FENCE_SLOTS * SLOT_WORDS),
            self.at::<AtomicU64>(l.fence_unslotted),
        )
    }
}

impl PgSharedMemoryInitialization for ChangesRegion {
    type Value = ();

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called from the shmem request hook (PG15+) or _PG_init
        // while preloading (PG13/14), as Postgres requires.
        unsafe { pg_sys::RequestAddinShmemSpace(layout(crate::gucs::queue_size_bytes()).total) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: ()) {
        let layout = layout(crate::gucs::queue_size_bytes());
        let size = layout.total;
        // SAFETY: the start-up hook runs in the postmaster (and, with
        // EXEC_BACKEND, each child) under AddinShmemInitLock; a new region is
        // zeroed, the initial state of every structure in it.
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let base = pg_sys::ShmemInitStruct(self.name.as_ptr(), size, &mut found).cast::<u8>();
            if !found {
                std::ptr::write_bytes(base, 0, size);
            }
            *self.layout.get() = layout;
            *self.base.get() = base;
            pg_sys::LWLockRelease(init_lock);
        }
    }
}
