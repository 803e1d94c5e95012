//! Which capture triggers should fire.
//!
//! A capture trigger that returns at once still costs every write
//! Postgres's AFTER-trigger machinery: queueing the event, fetching the row
//! again, calling the function (about 4% of a one-row INSERT, measured with
//! `bench/instructions.sh`). So the worker disables the trigger of a table
//! nobody has subscribed to for `pg_realtime.capture_idle_timeout`, and
//! enables it again before it answers a join that needs it. This module
//! decides; the worker's main thread runs the DDL, which waits for no one:
//! it takes the table's lock only when no transaction holds a conflicting
//! one, so a table switched on has no writer left that wrote without the
//! trigger.

use super::registry::Target;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A captured table (a partitioned one stands for its whole tree), as the
/// catalog has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub relid: u32,
    pub namespace: u32,
    /// Its qualified name, for messages.
    pub name: String,
    /// Every capture trigger of the tree fires.
    pub all_on: bool,
    /// Some capture trigger of the tree fires.
    pub any_on: bool,
}

/// What to switch now, as indexes into the captured tables given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub enable: Vec<usize>,
    pub disable: Vec<usize>,
}

/// How long each unwanted table has had its trigger on.
#[derive(Debug, Default)]
pub struct Switches {
    idle_since: HashMap<u32, Instant>,
}

impl Switches {
    /// Tables someone subscribes to (`wanted`) get their triggers on; the
    /// others go off once unwanted for `idle_timeout` (never with None).
    /// A table seen for the first time counts as unwanted from `now`: after
    /// a worker restart, every trigger gets the full timeout.
    pub fn plan(
        &mut self,
        now: Instant,
        captured: &[Captured],
        idle_timeout: Option<Duration>,
        wanted: impl Fn(&Captured) -> bool,
    ) -> Plan {
        let mut plan = Plan::default();
        for (i, table) in captured.iter().enumerate() {
            if wanted(table) {
                self.idle_since.remove(&table.relid);
                if !table.all_on {
                    plan.enable.push(i);
                }
            } else if table.any_on {
                let since = *self.idle_since.entry(table.relid).or_insert(now);
                if idle_timeout.is_some_and(|t| now.duration_since(since) >= t) {
                    plan.disable.push(i);
                }
            } else {
                self.idle_since.remove(&table.relid);
            }
        }
        // Tables no longer captured are forgotten.
        self.idle_since
            .retain(|relid, _| captured.iter().any(|t| t.relid == *relid));
        plan
    }

    /// When the next table left on without subscribers is due to go off.
    pub fn next_due(&self, idle_timeout: Duration) -> Option<Instant> {
        self.idle_since.values().min().map(|since| *since + idle_timeout)
    }
}

/// The wanted triggers not on yet after a pass of switching: a join that
/// needs none of them is answered, the others wait for the next pass.
#[derive(Debug, Default)]
pub struct Busy {
    /// Those tables.
    pub tables: Vec<BusyTable>,
    /// Every captured table's relid (a partitioned one for its tree).
    pub captured: Vec<u32>,
    /// The captured tables could not be listed (why): any may be off.
    pub unknown: Option<String>,
}

/// A captured table whose wanted trigger is not on.
#[derive(Debug, Clone, PartialEq)]
pub struct BusyTable {
    pub relid: u32,
    pub namespace: u32,
    /// Why, for the joins that give up waiting.
    pub reason: String,
}

impl Busy {
    pub fn is_empty(&self) -> bool {
        self.unknown.is_none() && self.tables.is_empty()
    }

    /// Whether a binding on `target` waits for a trigger not on yet
    /// (`schema_oid` resolves a schema's name). A table that is not one
    /// of the captured ones (a partition) waits whenever any does.
    pub fn holds_up(&self, target: &Target, schema_oid: impl Fn(&str) -> Option<u32>) -> bool {
        self.unknown.is_some()
            || self
                .tables
                .iter()
                .any(|t| Self::blocks(t, target, &schema_oid, &self.captured))
    }

    /// Why a binding on `target` waits: the reasons of the busy tables it
    /// needs (none: it does not wait).
    pub fn reasons_for(&self, target: &Target, schema_oid: impl Fn(&str) -> Option<u32>) -> Vec<&str> {
        if let Some(why) = &self.unknown {
            return vec![why.as_str()];
        }
        self.tables
            .iter()
            .filter(|t| Self::blocks(t, target, &schema_oid, &self.captured))
            .map(|t| t.reason.as_str())
            .collect()
    }

    fn blocks(table: &BusyTable, target: &Target, schema_oid: &impl Fn(&str) -> Option<u32>, captured: &[u32]) -> bool {
        match target {
            Target::Table(relid) => !captured.contains(relid) || table.relid == *relid,
            Target::Schema(name) => schema_oid(name).is_none_or(|oid| table.namespace == oid),
            Target::All => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(relid: u32, on: bool) -> Captured {
        Captured {
            relid,
            namespace: 2200,
            name: format!("public.t{relid}"),
            all_on: on,
            any_on: on,
        }
    }

    #[test]
    fn wanted_tables_are_switched_on_and_unwanted_ones_off_after_the_timeout() {
        let mut switches = Switches::default();
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(60));
        let captured = [table(1, true), table(2, false), table(3, true)];
        let wanted = |t: &Captured| t.relid == 2;
        assert_eq!(
            switches.plan(t0, &captured, timeout, wanted),
            Plan {
                enable: vec![1],
                disable: vec![]
            }
        );
        // 1 and 3 have been on and unwanted since t0.
        assert_eq!(
            switches.next_due(Duration::from_secs(60)),
            Some(t0 + Duration::from_secs(60))
        );
        let plan = switches.plan(t0 + Duration::from_secs(59), &captured, timeout, wanted);
        assert!(plan.disable.is_empty());
        let plan = switches.plan(t0 + Duration::from_secs(60), &captured, timeout, wanted);
        assert_eq!(plan.disable, vec![0, 2]);
    }

    #[test]
    fn a_subscriber_in_between_restarts_the_idle_time() {
        let mut switches = Switches::default();
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(60));
        let captured = [table(1, true)];
        switches.plan(t0, &captured, timeout, |_| false);
        switches.plan(t0 + Duration::from_secs(30), &captured, timeout, |_| true);
        let plan = switches.plan(t0 + Duration::from_secs(61), &captured, timeout, |_| false);
        assert!(plan.disable.is_empty(), "idle since 61 s, not since 0 s");
        let plan = switches.plan(t0 + Duration::from_secs(121), &captured, timeout, |_| false);
        assert_eq!(plan.disable, vec![0]);
    }

    #[test]
    fn no_timeout_never_switches_off() {
        let mut switches = Switches::default();
        let t0 = Instant::now();
        let captured = [table(1, true)];
        switches.plan(t0, &captured, None, |_| false);
        let plan = switches.plan(t0 + Duration::from_secs(86_400), &captured, None, |_| false);
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn a_partly_enabled_tree_is_completed_or_switched_off_whole() {
        let mut switches = Switches::default();
        let t0 = Instant::now();
        let partly = Captured {
            all_on: false,
            any_on: true,
            ..table(7, false)
        };
        let plan = switches.plan(t0, std::slice::from_ref(&partly), Some(Duration::ZERO), |_| true);
        assert_eq!(plan.enable, vec![0]);
        let plan = switches.plan(t0, std::slice::from_ref(&partly), Some(Duration::ZERO), |_| false);
        assert_eq!(plan.disable, vec![0]);
    }

    #[test]
    fn tables_no_longer_captured_are_forgotten() {
        let mut switches = Switches::default();
        let t0 = Instant::now();
        switches.plan(t0, &[table(1, true)], Some(Duration::from_secs(60)), |_| false);
        switches.plan(t0, &[], Some(Duration::from_secs(60)), |_| false);
        // captured again later: idle from then on, not from t0
        let plan = switches.plan(
            t0 + Duration::from_secs(100),
            &[table(1, true)],
            Some(Duration::from_secs(60)),
            |_| false,
        );
        assert!(plan.disable.is_empty());
    }

    #[test]
    fn only_joins_that_need_a_busy_trigger_wait() {
        let busy = Busy {
            tables: vec![
                BusyTable {
                    relid: 20,
                    namespace: 2200,
                    reason: "public.b (locked)".into(),
                },
                BusyTable {
                    relid: 40,
                    namespace: 3300,
                    reason: "other.d (locked)".into(),
                },
            ],
            captured: vec![10, 20, 30, 40],
            unknown: None,
        };
        let schema = |name: &str| match name {
            "public" => Some(2200),
            "other" => Some(3300),
            "third" => Some(4400),
            _ => None,
        };
        assert!(!busy.holds_up(&Target::Table(10), schema), "its own trigger is on");
        assert!(busy.holds_up(&Target::Table(20), schema));
        assert!(
            busy.holds_up(&Target::Table(99), schema),
            "not a captured root: it may be 20's partition"
        );
        assert!(busy.holds_up(&Target::Schema("public".into()), schema));
        assert!(!busy.holds_up(&Target::Schema("third".into()), schema));
        assert_eq!(busy.reasons_for(&Target::Table(20), schema), ["public.b (locked)"]);
        assert_eq!(
            busy.reasons_for(&Target::Schema("other".into()), schema),
            ["other.d (locked)"],
            "a join that gives up is told its own tables, not every busy one"
        );
        assert!(busy.reasons_for(&Target::Table(10), schema).is_empty());
        assert_eq!(busy.reasons_for(&Target::All, schema).len(), 2);
        assert!(busy.holds_up(&Target::Schema("unknown".into()), schema));
        assert!(busy.holds_up(&Target::All, schema));
        let none = Busy {
            captured: vec![10],
            ..Busy::default()
        };
        assert!(none.is_empty() && !none.holds_up(&Target::All, schema));
        let unlisted = Busy {
            unknown: Some("the captured tables (could not list them)".into()),
            ..Busy::default()
        };
        assert!(!unlisted.is_empty() && unlisted.holds_up(&Target::Table(10), schema));
        assert_eq!(unlisted.reasons_for(&Target::Table(10), schema).len(), 1);
    }
}
