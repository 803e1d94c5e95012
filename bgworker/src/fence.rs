//! The commit fence: which committing transactions have not published yet.
//!
//! A transaction publishes in its commit callback, after its commit record
//! and after it has left the proc array. In that gap a later transaction can
//! see its rows as committed, commit, and publish first. To deliver in commit
//! order anyway, a transaction with captured changes registers here before
//! its commit record is written (with the WAL insert position then, a lower
//! bound of its commit LSN) and leaves after publishing. The worker delivers
//! only transactions whose commit LSN is below every registered bound, and
//! holds the rest until the stragglers have published.

use std::sync::atomic::{AtomicU64, Ordering};

/// Registration slots beside a counter of registrations that found no slot.
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
    pub fn new(slots: &'a [AtomicU64], unslotted: &'a AtomicU64) -> CommitFence<'a> {
        CommitFence { slots, unslotted }
    }

    /// Registers a transaction about to commit; `lower_bound` is a WAL
    /// position its commit record will come after (never 0).
    pub fn enter(&self, lower_bound: u64, hint: usize) -> Ticket {
        let bound = lower_bound.max(1);
        for k in 0..self.slots.len() {
            let i = (hint + k) % self.slots.len();
            if self.slots[i]
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
            Ticket::Slot(i) => self.slots[i].store(0, Ordering::Release),
            Ticket::Unslotted => {
                self.unslotted.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Commit LSNs below this may be delivered: the smallest registered bound
    /// (`u64::MAX` when nobody is committing, 0 while an unslotted
    /// registration is pending).
    pub fn watermark(&self) -> u64 {
        if self.unslotted.load(Ordering::Acquire) > 0 {
            return 0;
        }
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Acquire))
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
        let slots: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
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
}
