//! The commit fence: which committing transactions have not published yet.
//!
//! A transaction publishes in its commit callback, after its commit record
//! and after it has left the proc array. In that gap a later transaction can
//! see its rows as committed, commit, and publish first. To deliver in commit
//! order anyway, a transaction with captured changes registers here before
//! its commit record is written (with a lower bound of its commit LSN: the
//! end of its last WAL record) and leaves after publishing. The worker reads
//! the WAL insert position, then the fence ([`CommitFence::deliverable`]),
//! then the ring, and delivers only what committed at or below that
//! position and below every registered bound: a transaction it saw
//! registered bounds the watermark; one that registered after the position
//! was read writes its commit record beyond it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Words per slot: one registration per 64-byte cache line, so that two
/// backends committing at once do not share one.
pub const SLOT_WORDS: usize = 8;

/// Registration slots (every [`SLOT_WORDS`]th word) beside a counter of
/// registrations that found no slot.
pub struct CommitFence<'a> {
    slots: &'a [AtomicU64],
    unslotted: &'a AtomicU64,
}

/// A registration, to hand back to [`CommitFence::leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    Slot(usize),
    /// No free slot: counted, and the worker holds everything until it leaves.
    Unslotted,
}

impl<'a> CommitFence<'a> {
    /// `slots` holds `slots.len() / SLOT_WORDS` registrations.
    pub fn new(slots: &'a [AtomicU64], unslotted: &'a AtomicU64) -> CommitFence<'a> {
        CommitFence { slots, unslotted }
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        &self.slots[i * SLOT_WORDS]
    }

    fn len(&self) -> usize {
        self.slots.len() / SLOT_WORDS
    }

    /// Registers a transaction about to commit; `lower_bound` is a WAL
    /// position its commit record will come after (never 0).
    pub fn enter(&self, lower_bound: u64, hint: usize) -> Ticket {
        let bound = lower_bound.max(1);
        for k in 0..self.len() {
            let i = (hint + k) % self.len();
            if self
                .slot(i)
                .compare_exchange(0, bound, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Ticket::Slot(i);
            }
        }
        self.unslotted.fetch_add(1, Ordering::AcqRel);
        Ticket::Unslotted
    }

    /// The transaction has published (or aborted).
    pub fn leave(&self, ticket: Ticket) {
        match ticket {
            Ticket::Slot(i) => self.slot(i).store(0, Ordering::Release),
            Ticket::Unslotted => {
                self.unslotted.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Commit LSNs (commit record ends) below this may be delivered, given
    /// `insert_position`, the WAL insert position read *before* this call:
    /// at most that position, and below every registered bound.
    pub fn deliverable(&self, insert_position: u64) -> u64 {
        self.watermark().min(insert_position.saturating_add(1))
    }

    /// The smallest registered bound
    /// (`u64::MAX` when nobody is committing, 0 while an unslotted
    /// registration is pending).
    pub fn watermark(&self) -> u64 {
        if self.unslotted.load(Ordering::Acquire) > 0 {
            return 0;
        }
        (0..self.len())
            .map(|i| self.slot(i).load(Ordering::Acquire))
            .filter(|b| *b != 0)
            .min()
            .unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_follows_registrations() {
        let slots: Vec<AtomicU64> = (0..2 * SLOT_WORDS).map(|_| AtomicU64::new(0)).collect();
        let unslotted = AtomicU64::new(0);
        let fence = CommitFence::new(&slots, &unslotted);
        assert_eq!(fence.watermark(), u64::MAX);
        let a = fence.enter(500, 7);
        let b = fence.enter(300, 7);
        assert_eq!(fence.watermark(), 300);
        let c = fence.enter(900, 0);
        assert_eq!(c, Ticket::Unslotted);
        assert_eq!(fence.watermark(), 0, "an unslotted committer holds everything");
        fence.leave(c);
        assert_eq!(fence.watermark(), 300);
        fence.leave(b);
        assert_eq!(fence.watermark(), 500);
        fence.leave(a);
        assert_eq!(fence.watermark(), u64::MAX);
        assert_eq!(fence.enter(0, 0), Ticket::Slot(0));
        assert_eq!(fence.watermark(), 1, "a bound is never 0");
    }

    #[test]
    fn deliverable_stops_at_the_insert_position_read_before() {
        let slots: Vec<AtomicU64> = (0..4 * SLOT_WORDS).map(|_| AtomicU64::new(0)).collect();
        let unslotted = AtomicU64::new(0);
        let fence = CommitFence::new(&slots, &unslotted);
        // Nobody committing: everything up to the position read, the last
        // commit record's end included (it may end exactly there).
        assert_eq!(fence.deliverable(1000), 1001);
        // A registration below the position holds everything from its bound.
        let t = fence.enter(800, 1);
        assert_eq!(fence.deliverable(1000), 800);
        fence.leave(t);
        // One above it (it registered after the position was read): the
        // position still limits what is delivered now.
        let t = fence.enter(1200, 1);
        assert_eq!(fence.deliverable(1000), 1001);
        fence.leave(t);
    }
}
