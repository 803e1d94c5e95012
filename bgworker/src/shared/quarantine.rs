//! Tables whose checks ended the worker. Code run as a subscriber (a
//! policy, a domain CHECK, a cast) that will not stop is ended with the
//! worker (`pg_realtime.check_timeout`, then a FATAL), and code can end the
//! session itself (PostgreSQL 17's `transaction_timeout`). The postmaster
//! starts a new worker; without this it would run the same code again on
//! the next commit, and end again. So the worker notes, in shared memory,
//! which table it is checking; a new worker that finds a note left by its
//! predecessor refuses that table's checks for a while (its subscribers are
//! told), and says so in the log.
//!
//! Shared memory outlives the worker but not a restart of the cluster.
//! Only atomics: no lock, nothing that a process dying mid-write breaks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// How many tables may be refused at once (then the oldest goes).
pub const SLOTS: usize = 16;

/// What a check is about when it is not one table's: a private channel's
/// probes of `realtime.messages`. (OID 1 is no table's: user tables start
/// at 16384, the catalogs' above 1000.)
pub const PRIVATE_PROBES: u32 = 1;

/// In shared memory: the table being checked now (0: none), and the
/// tables refused, each with until when (seconds since the epoch).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Quarantine {
    checking: AtomicU32,
    slots: [AtomicU64; SLOTS],
}

fn pack(relid: u32, until: u32) -> u64 {
    (u64::from(relid) << 32) | u64::from(until)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

impl Quarantine {
    /// The worker starts checking `relid` (nonzero) as a subscriber.
    pub fn begin(&self, relid: u32) {
        self.checking.store(relid, Ordering::Release);
    }

    /// The check is over, however it ended.
    pub fn end(&self) {
        self.checking.store(0, Ordering::Release);
    }

    /// At a worker's start: if the last one ended during a check, refuses
    /// that table's checks until `now + for_secs` and returns it.
    pub fn on_start(&self, now: u32, for_secs: u32) -> Option<u32> {
        let relid = self.checking.swap(0, Ordering::AcqRel);
        if relid == 0 {
            return None;
        }
        self.refuse(relid, now, for_secs);
        Some(relid)
    }

    /// Refuses `relid`'s checks until `now + for_secs` (a check of it ran
    /// past its deadline), or longer if they already are.
    pub fn refuse(&self, relid: u32, now: u32, for_secs: u32) {
        if relid == 0 {
            return;
        }
        let until = now
            .saturating_add(for_secs)
            .max(self.refused_until(relid, now).unwrap_or(0));
        // the table's own slot, else a free or expired one, else the one
        // that ends soonest
        let slot = self
            .slots
            .iter()
            .min_by_key(|s| {
                let (r, u) = unpack(s.load(Ordering::Acquire));
                if r == relid {
                    0
                } else if u <= now {
                    1
                } else {
                    2 + u64::from(u)
                }
            })
            .expect("SLOTS > 0");
        slot.store(pack(relid, until), Ordering::Release);
    }

    /// Until when (seconds since the epoch) `relid`'s checks are refused,
    /// if they are at `now`.
    pub fn refused_until(&self, relid: u32, now: u32) -> Option<u32> {
        self.slots.iter().find_map(|s| {
            let (r, until) = unpack(s.load(Ordering::Acquire));
            (r == relid && relid != 0 && until > now).then_some(until)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_the_worker_did_not_survive_is_refused_for_a_while() {
        let q = Quarantine::default();
        // checks that ended leave nothing
        q.begin(42);
        q.end();
        assert_eq!(q.on_start(1_000, 600), None);
        // a worker that ended during one
        q.begin(42);
        assert_eq!(q.on_start(1_000, 600), Some(42));
        assert_eq!(q.refused_until(42, 1_000), Some(1_600));
        assert_eq!(q.refused_until(42, 1_599), Some(1_600));
        assert_eq!(q.refused_until(42, 1_600), None);
        assert_eq!(q.refused_until(7, 1_000), None);
        // the note is taken once
        assert_eq!(q.on_start(1_001, 600), None);
        // the same table again: its own slot, extended
        q.begin(42);
        assert_eq!(q.on_start(1_100, 600), Some(42));
        assert_eq!(q.refused_until(42, 1_650), Some(1_700));
        assert_eq!(
            q.slots
                .iter()
                .filter(|s| unpack(s.load(Ordering::Relaxed)).0 == 42)
                .count(),
            1
        );
    }

    #[test]
    fn a_refusal_is_never_shortened() {
        let q = Quarantine::default();
        q.refuse(5, 1_000, 600);
        q.refuse(5, 1_010, 60);
        assert_eq!(q.refused_until(5, 1_100), Some(1_600));
        q.refuse(0, 1_000, 600);
        assert_eq!(q.refused_until(0, 1_000), None);
    }

    #[test]
    fn past_the_slots_the_one_ending_soonest_goes() {
        let q = Quarantine::default();
        for relid in 1..=SLOTS as u32 {
            q.begin(relid);
            q.on_start(1_000 + relid, 600);
        }
        q.begin(99);
        q.on_start(2_000, 600);
        assert_eq!(q.refused_until(99, 2_000), Some(2_600));
        // (all expired by then: the first went)
        assert_eq!(q.refused_until(1, 1_500), None);
        assert_eq!(q.refused_until(2, 1_500), Some(1_602));
    }
}
