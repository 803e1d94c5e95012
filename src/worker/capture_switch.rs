//! Switching capture triggers on and off (`bgworker::changes::switch`
//! decides which): on for every table a subscription or a waiting join
//! covers, off for tables unwanted for `pg_realtime.capture_idle_timeout`,
//! and when to look again.

use super::catalog;
use bgworker::changes::switch::{Busy, BusyTable, Switches};
use bgworker::shared::stats::Counters;
use pgrx::pg_sys;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// After the publication sync ran (it wakes the worker), when the
/// captured tables are read again: its transaction may not have committed
/// at the first look. (Nothing else is polled: subscribing, unsubscribing
/// and a table's idle time running out are acted on when they happen, and
/// a table whose trigger nobody switches off merely costs its writers.)
const LOOK_AGAIN: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)];
/// The least time between two settles, but for waiting joins.
const SETTLE_AGAIN: Duration = Duration::from_secs(1);
/// While a join waits for a table's lock, how often it is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(10);

pub struct CaptureSwitch {
    switches: Switches,
    /// When `switch_triggers` last ran.
    settled: Instant,
    /// A subscription ended (its tables' idle time starts), or the
    /// publication sync ran: settle now.
    unsettled: bool,
    /// The publication sync ran: settle again at these times
    /// (`LOOK_AGAIN`).
    look_again: Vec<Instant>,
    /// `capture_syncs` when last looked at.
    syncs_seen: u64,
    /// The last pass could not list the captured tables (warned once for
    /// a run of failures).
    listing_failed: bool,
}

impl Default for CaptureSwitch {
    fn default() -> Self {
        CaptureSwitch {
            switches: Switches::default(),
            settled: Instant::now(),
            unsettled: true,
            look_again: Vec::new(),
            syncs_seen: 0,
            listing_failed: false,
        }
    }
}

impl CaptureSwitch {
    /// A subscription ended: its tables' idle time starts now.
    pub fn unsettle(&mut self) {
        self.unsettled = true;
    }

    /// How long the main loop may sleep before the triggers are due to be
    /// looked at (None: until woken); `joins_waiting` when some join waits
    /// for them.
    pub fn due_in(&self, joins_waiting: bool) -> Option<Duration> {
        if joins_waiting {
            return Some(RETRY_EVERY.saturating_sub(self.settled.elapsed()));
        }
        let timeout = crate::gucs::capture_idle_timeout()?;
        if self.unsettled {
            return Some(Duration::ZERO);
        }
        let off = self.switches.next_due(timeout).map(|off| {
            // (a table a writer kept busy is tried again a second later)
            off.max(self.settled + SETTLE_AGAIN)
        });
        let due = self.look_again.iter().copied().chain(off).min()?;
        Some(due.saturating_duration_since(Instant::now()))
    }

    /// Notes a publication sync run since the last look (the counter
    /// moved): settle now and a few times again.
    pub fn note_syncs(&mut self) {
        let syncs = crate::shmem::counters().capture_syncs.load(Ordering::Relaxed);
        if syncs != self.syncs_seen {
            self.syncs_seen = syncs;
            self.unsettled = true;
            let now = Instant::now();
            self.look_again = LOOK_AGAIN.iter().map(|d| now + *d).collect();
        }
    }

    /// Switches the triggers in line with what is wanted (`wanted` says
    /// whether anyone listens to a relation or namespace); returns which
    /// wanted triggers are not on yet, and why (empty when all are).
    pub fn switch_triggers(&mut self, now: Instant, wanted: impl Fn(&[u32]) -> bool) -> Busy {
        self.settled = now;
        self.unsettled = false;
        self.look_again.retain(|again| *again > now);
        let mut busy = Busy::default();
        // SAFETY: reads shared state; on a standby no trigger fires at all.
        if unsafe { pg_sys::RecoveryInProgress() } {
            return busy;
        }
        let captured = match catalog::in_transaction(catalog::captured) {
            Ok(captured) => captured,
            Err(e) => {
                // (nothing switched this pass: the idle timers are kept,
                // and it is tried again in a second)
                if !std::mem::replace(&mut self.listing_failed, true) {
                    pgrx::warning!("pg_realtime: could not list the captured tables: {e}");
                }
                if !self.look_again.iter().any(|again| *again <= now + SETTLE_AGAIN) {
                    self.look_again.push(now + SETTLE_AGAIN);
                }
                busy.unknown = Some(format!("the captured tables (could not list them: {e})"));
                return busy;
            }
        };
        if std::mem::take(&mut self.listing_failed) {
            pgrx::log!("pg_realtime: the captured tables could be listed again");
        }
        busy.captured = captured.iter().map(|t| t.relid).collect();
        let plan = self
            .switches
            .plan(now, &captured, crate::gucs::capture_idle_timeout(), |t| {
                wanted(&[t.relid, t.namespace])
            });
        let counters = crate::shmem::counters();
        for i in plan.enable {
            let table = &captured[i];
            // Only ever NOWAIT: a lock request that queued would make
            // every later writer of the table queue behind it.
            match switch(table.relid, true, 0) {
                Ok(true) => Counters::incr(&counters.captures_enabled),
                Ok(false) => {
                    Counters::incr(&counters.capture_lock_retries);
                    busy.tables.push(BusyTable {
                        relid: table.relid,
                        namespace: table.namespace,
                        reason: format!("{} (a transaction that writes it holds a lock on it)", table.name),
                    });
                }
                Err(e) => {
                    pgrx::warning!("pg_realtime: could not switch on capture of {}: {e}", table.name);
                    busy.tables.push(BusyTable {
                        relid: table.relid,
                        namespace: table.namespace,
                        reason: format!("{} ({e})", table.name),
                    });
                }
            }
        }
        for i in plan.disable {
            let table = &captured[i];
            match switch(table.relid, false, 0) {
                Ok(true) => Counters::incr(&counters.captures_disabled),
                Ok(false) => {} // a writer is busy with it: next time
                Err(e) => pgrx::warning!("pg_realtime: could not switch off capture of {}: {e}", table.name),
            }
        }
        // The switches ran the publication sync (ALTER TABLE fires its
        // event trigger): that is no news to look again for. (A sync of
        // someone else's in the meantime is missed, which can only leave
        // a trigger on for longer.)
        self.syncs_seen = counters.capture_syncs.load(Ordering::Relaxed);
        busy
    }
}

/// Switches a table's capture triggers in a transaction of its own, so the
/// worker never holds one table's lock while waiting for another's.
fn switch(relid: u32, on: bool, wait_ms: i32) -> catalog::CatalogResult<bool> {
    catalog::in_transaction(|| catalog::switch_capture(relid, on, wait_ms))
}
