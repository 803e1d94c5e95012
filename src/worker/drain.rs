//! Taking committed transactions out of the change ring in commit order
//! (`docs/architecture.md`, "Life of a row"): only what committed below
//! every commit still in flight; the rest stays in the ring until the
//! stragglers have published, so a committer stuck between its commit
//! record and publishing (a synchronous standby that never answers) holds
//! back at most the ring's worth, after which commits overflow and their
//! subscribers are told.

use bgworker::shared::ring::Losses;
use bgworker::shared::wire::{self, RelationCache, Transaction};
use pgrx::pg_sys;

/// The most the worker keeps, from one drain to the next, of its record
/// buffer and of its batch vector (transactions).
const KEEP_SCRATCH_BYTES: usize = 1 << 20;
const KEEP_BATCH: usize = 16 * 1024;

#[derive(Default)]
pub struct Drain {
    /// Relation descriptions decoded before, reused while unchanged.
    relation_cache: RelationCache,
    /// Kept from drain to drain, so that a batch allocates no buffer the
    /// size of a record or of the batch: the record being decoded, and
    /// the transactions being delivered (up to `KEEP_SCRATCH_BYTES` and
    /// `KEEP_BATCH`: one huge transaction or burst does not pin its
    /// memory for the worker's life).
    scratch: Vec<u8>,
    batch: Vec<Transaction>,
}

impl Drain {
    /// Takes what the ring holds that is deliverable now; returns what the
    /// ring lost since the last call and those transactions, in commit-LSN
    /// order (hand the vector back with [`Drain::recycle`]).
    pub fn take(&mut self) -> (Losses, Vec<Transaction>) {
        // The WAL insert position, then the fence, then the ring. A
        // committer that registered after the position was read commits
        // beyond it; one registered before the fence is read bounds the
        // watermark, and if it leaves after that read, it has published
        // first, so its record is in the ring for the drain below.
        // SAFETY: reads the WAL insert position (under its spinlock).
        let position = unsafe { pg_sys::GetXLogInsertRecPtr() };
        let watermark = crate::shmem::fence().deliverable(position);
        let ring = crate::shmem::ring();
        let mut batch = std::mem::take(&mut self.batch);
        let cache = &mut self.relation_cache;
        let mut unreadable = false;
        // Below every commit still in flight: deliverable. The rest stays
        // in the ring: a transaction with a lower commit LSN may still be
        // about to publish (it wakes the worker when it leaves the fence).
        // (A record too short to say is taken, and found unreadable.)
        let deliverable = |head: &[u8]| wire::peek_commit_lsn(head).is_none_or(|lsn| lsn < watermark);
        ring.drain_where(&mut self.scratch, deliverable, |_, bytes| {
            match Transaction::decode_cached(bytes, cache) {
                Ok(t) => batch.push(t),
                Err(e) => {
                    // Whose changes it held is unknown: everyone is told.
                    pgrx::warning!("pg_realtime: dropped an unreadable change record: {e}");
                    unreadable = true;
                }
            }
        });
        if self.scratch.capacity() > KEEP_SCRATCH_BYTES {
            self.scratch = Vec::new();
        }
        let mut losses = ring.take_losses();
        losses.all |= unreadable;
        // The ring is in publishing order; deliveries go in commit order.
        batch.sort_by_key(|t| t.commit_lsn);
        (losses, batch)
    }

    /// Keeps a delivered batch's vector for the next one, unless it grew
    /// past `KEEP_BATCH`.
    pub fn recycle(&mut self, mut batch: Vec<Transaction>) {
        batch.clear();
        if batch.capacity() <= KEEP_BATCH {
            self.batch = batch;
        }
    }
}
