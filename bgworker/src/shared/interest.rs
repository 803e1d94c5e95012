//! Which relations (or schemas) anyone subscribes to, in shared memory: the
//! realtime worker is the only writer, capture triggers read it without a
//! lock and return at once when nobody listens (`docs/architecture.md`, invariant 5).
//!
//! Open addressing over atomic words: a slot holds an OID, an "active"
//! bit and, for a table of whose rows only some keys are wanted, its key
//! filter's slot (`crate::shared::prefilter`), so one look-up tells a trigger
//! both. Slots are never emptied, only deactivated, so probe chains stay
//! intact for lock-free readers. If the table fills up, `all` is set and
//! every relation counts as interesting: safe, merely slower.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const ACTIVE: u64 = 1 << 32;
/// Bits 40..56: the relation's filter slot plus one (0: every row wanted).
const FILTER_SHIFT: u32 = 40;
const FILTER_MASK: u64 = 0xffff;

/// What a capture trigger is to do with a relation's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Nobody subscribes: skip them.
    Nothing,
    /// Encode every row.
    Every,
    /// Only rows whose filtered column has a key this filter slot wants.
    Keys(usize),
}

/// The shared part beside the slots.
///
/// It lives in shared memory, which the extension maps as this type
/// (`src/shmem/region.rs`, `SharedZeroed`): keep it `repr(C)`, made of
/// atomics and of padding nothing reads or writes, without pointers,
/// aligned to at most 8 bytes, and valid when all zero.
#[derive(Debug, Default)]
#[repr(C)]
pub struct InterestHeader {
    all: AtomicU32,
    /// Whether any OID set is a schema's (so readers must look up a
    /// relation's schema too).
    schemas: AtomicU32,
}

#[derive(Clone, Copy)]
pub struct InterestTable<'a> {
    header: &'a InterestHeader,
    slots: &'a [AtomicU64],
}

impl<'a> InterestTable<'a> {
    pub fn new(header: &'a InterestHeader, slots: &'a [AtomicU64]) -> InterestTable<'a> {
        assert!(!slots.is_empty());
        InterestTable { header, slots }
    }

    fn start(&self, oid: u32) -> usize {
        self.wrap(oid.wrapping_mul(0x9E37_79B1) as usize)
    }

    /// `i` modulo the slot count: a mask for the power-of-two sizes the
    /// extension uses (this runs for every captured row), else a division.
    fn wrap(&self, i: usize) -> usize {
        let len = self.slots.len();
        if len.is_power_of_two() {
            i & (len - 1)
        } else {
            i % len
        }
    }

    /// Whether any of `oids` (a relation's OID, its schema's OID) has a
    /// subscriber. Lock-free; called by capture triggers on every row.
    pub fn any(&self, oids: &[u32]) -> bool {
        if self.header.all.load(Ordering::Acquire) != 0 {
            return true;
        }
        oids.iter().any(|oid| self.is_active(*oid))
    }

    fn is_active(&self, oid: u32) -> bool {
        self.active_word(oid).is_some()
    }

    /// The slot word of `oid`, if it is active.
    fn active_word(&self, oid: u32) -> Option<u64> {
        let mut i = self.start(oid);
        for _ in 0..self.slots.len() {
            let slot = self.slots[i].load(Ordering::Acquire);
            if slot == 0 {
                return None;
            }
            if slot as u32 == oid {
                return (slot & ACTIVE != 0).then_some(slot);
            }
            i = self.wrap(i + 1);
        }
        None
    }

    /// What to do with rows of relation `relid` in schema `namespace`.
    /// Lock-free; called by capture triggers on every row.
    pub fn wanted(&self, relid: u32, namespace: u32) -> Wanted {
        if self.header.all.load(Ordering::Acquire) != 0 {
            return Wanted::Every;
        }
        let schema = || self.has_schemas() && self.is_active(namespace);
        match self.active_word(relid) {
            Some(word) => match (word >> FILTER_SHIFT) & FILTER_MASK {
                0 => Wanted::Every,
                _ if schema() => Wanted::Every,
                filter => Wanted::Keys(filter as usize - 1),
            },
            None if schema() => Wanted::Every,
            None => Wanted::Nothing,
        }
    }

    /// Whether any schema-level interest is set.
    pub fn has_schemas(&self) -> bool {
        self.header.schemas.load(Ordering::Acquire) != 0
    }

    /// Makes exactly `oids` (plus everything, with `all`) interesting;
    /// `schemas` says whether some of them are schemas, `filter` gives the
    /// key filter slot of those that have one (see [`Wanted::Keys`]).
    /// Writer only (the realtime worker).
    pub fn set_with_schemas(
        &self,
        oids: &HashSet<u32>,
        all: bool,
        schemas: bool,
        filter: impl Fn(u32) -> Option<usize>,
    ) {
        self.header.schemas.store(u32::from(schemas), Ordering::Release);
        self.set_filtered(oids, all, filter);
    }

    /// Makes exactly `oids` (plus everything, with `all`) interesting.
    /// Writer only (the realtime worker).
    pub fn set(&self, oids: &HashSet<u32>, all: bool) {
        self.set_filtered(oids, all, |_| None);
    }

    fn set_filtered(&self, oids: &HashSet<u32>, all: bool, filter: impl Fn(u32) -> Option<usize>) {
        // Deactivate first, so that the slots of OIDs no longer wanted can
        // take new ones; OIDs in both sets stay active throughout.
        for slot in self.slots {
            let value = slot.load(Ordering::Relaxed);
            if value & ACTIVE != 0 && !oids.contains(&(value as u32)) {
                slot.store(value & !ACTIVE, Ordering::Release);
            }
        }
        let mut overflow = false;
        for oid in oids.iter().filter(|o| **o != 0) {
            let filter = filter(*oid)
                .filter(|f| (*f as u64) < FILTER_MASK)
                .map_or(0, |f| f as u64 + 1);
            overflow |= !self.activate(*oid, filter);
        }
        self.header.all.store(u32::from(all || overflow), Ordering::Release);
    }

    /// Marks `oid` active: its own slot if it has one, else the first free
    /// slot of its probe chain (empty, or deactivated: a reader looking for
    /// the old OID there simply probes on). False if every slot is active.
    fn activate(&self, oid: u32, filter: u64) -> bool {
        let word = u64::from(oid) | ACTIVE | (filter << FILTER_SHIFT);
        let mut free = None;
        let mut i = self.start(oid);
        for _ in 0..self.slots.len() {
            let slot = self.slots[i].load(Ordering::Relaxed);
            if slot != 0 && slot as u32 == oid {
                self.slots[i].store(word, Ordering::Release);
                return true;
            }
            if slot & ACTIVE == 0 && free.is_none() {
                free = Some(i);
            }
            if slot == 0 {
                break;
            }
            i = self.wrap(i + 1);
        }
        match free {
            Some(i) => {
                self.slots[i].store(word, Ordering::Release);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> (InterestHeader, Vec<AtomicU64>) {
        (InterestHeader::default(), (0..n).map(|_| AtomicU64::new(0)).collect())
    }

    #[test]
    fn set_and_clear() {
        let (h, s) = table(8);
        let t = InterestTable::new(&h, &s);
        assert!(!t.any(&[42]));
        t.set(&HashSet::from([42, 7]), false);
        assert!(t.any(&[42]) && t.any(&[1, 7]) && !t.any(&[8]));
        t.set(&HashSet::from([7]), false);
        assert!(!t.any(&[42]) && t.any(&[7]));
        t.set(&HashSet::new(), false);
        assert!(!t.any(&[7, 42]));
        t.set(&HashSet::new(), true);
        assert!(t.any(&[12345]));
    }

    #[test]
    fn wanted_tells_the_filter_slot_unless_a_schema_or_everything_covers_the_table() {
        let (h, s) = table(16);
        let t = InterestTable::new(&h, &s);
        let filter = |oid: u32| (oid == 42).then_some(3);
        t.set_with_schemas(&HashSet::from([42, 7]), false, false, filter);
        assert_eq!(t.wanted(42, 2200), Wanted::Keys(3));
        assert_eq!(t.wanted(7, 2200), Wanted::Every);
        assert_eq!(t.wanted(8, 2200), Wanted::Nothing);
        // schema 2200 is subscribed to as a whole: every row of its tables
        t.set_with_schemas(&HashSet::from([42, 2200]), false, true, filter);
        assert_eq!(t.wanted(42, 2200), Wanted::Every);
        assert_eq!(t.wanted(8, 2200), Wanted::Every);
        assert_eq!(t.wanted(42, 11), Wanted::Keys(3));
        t.set_with_schemas(&HashSet::from([42]), true, false, filter);
        assert_eq!(t.wanted(42, 11), Wanted::Every);
        // the slot changes in place, and goes
        t.set_with_schemas(&HashSet::from([42]), false, false, |_| Some(0));
        assert_eq!(t.wanted(42, 11), Wanted::Keys(0));
        t.set(&HashSet::from([42]), false);
        assert_eq!(t.wanted(42, 11), Wanted::Every);
    }

    #[test]
    fn overflow_means_everything() {
        let (h, s) = table(4);
        let t = InterestTable::new(&h, &s);
        t.set(&(1..=5).collect(), false);
        assert!(t.any(&[999]));
        t.set(&HashSet::from([1]), false);
        assert!(t.any(&[1]) && !t.any(&[999]));
    }

    /// Slots of OIDs nobody listens to any more are reused: a long-running
    /// worker does not fill the table with the OIDs of every table ever
    /// subscribed to.
    #[test]
    fn deactivated_slots_are_reused() {
        let (h, s) = table(4);
        let t = InterestTable::new(&h, &s);
        for oid in 1..1000u32 {
            t.set(&HashSet::from([oid, oid + 5000]), false);
            assert!(t.any(&[oid]) && t.any(&[oid + 5000]), "{oid}");
            assert!(!t.any(&[999_999]), "table overflowed at {oid}");
        }
    }

    #[test]
    fn probing_survives_deactivation() {
        let (h, s) = table(16);
        let t = InterestTable::new(&h, &s);
        let oids: HashSet<u32> = (100..112).collect();
        t.set(&oids, false);
        t.set(&(106..112).collect(), false);
        for oid in 106..112 {
            assert!(t.any(&[oid]), "{oid}");
        }
        for oid in 100..106 {
            assert!(!t.any(&[oid]), "{oid}");
        }
    }
}
