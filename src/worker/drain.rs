//! Taking committed transactions out of the change ring in commit order
//! (`docs/architecture.md`, "Life of a row"): only what committed below
//! every commit still in flight, the rest held until the stragglers have
//! published.

use bgworker::shared::ring::Losses;
use bgworker::shared::wire::{RelationCache, Transaction};
use pgrx::pg_sys;

/// The most the worker keeps, from one drain to the next, of its record
/// buffer and of its batch vector (transactions).
const KEEP_SCRATCH_BYTES: usize = 1 << 20;
const KEEP_BATCH: usize = 16 * 1024;

#[derive(Default)]
pub struct Drain {
    /// Transactions drained but not yet deliverable: a transaction with a
    /// lower commit LSN may still be about to publish.
    held: Vec<Transaction>,
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
    /// Takes everything the ring holds; returns what the ring lost since
    /// the last call and the transactions deliverable now, in commit-LSN
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
        let (held, cache) = (&mut self.held, &mut self.relation_cache);
        ring.drain(&mut self.scratch, |_, bytes| {
            match Transaction::decode_cached(bytes, cache) {
                Ok(t) => held.push(t),
                Err(e) => pgrx::warning!("pg_realtime: dropped an unreadable change record: {e}"),
            }
        });
        if self.scratch.capacity() > KEEP_SCRATCH_BYTES {
            self.scratch = Vec::new();
        }
        let losses = ring.take_losses();
        let mut batch = std::mem::take(&mut self.batch);
        // Deliver in commit-LSN order what is below every commit still in
        // flight; hold the rest until the stragglers have published (they
        // wake the worker when they leave the fence).
        self.held.sort_by_key(|t| t.commit_lsn);
        let ready = self.held.partition_point(|t| t.commit_lsn < watermark);
        batch.extend(self.held.drain(..ready));
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
