//! When subscribers of one role may share one kept plan of a table's row
//! check (`docs/security.md`, "Kept checks").
//!
//! A generic plan reads the claims again on every run: they reach the
//! check only through `current_setting`, which is STABLE, and a plan
//! folds only IMMUTABLE functions. A policy helper wrongly marked
//! IMMUTABLE would be folded with the first subscriber's claims and
//! answer for all the others, so plans are shared only while the database
//! has no function that could be one (`catalog::user_immutable_functions_exist`).
//! That is read again whenever a function, a role, a membership, the
//! database or a schema changes (`invalidations`), when every kept plan is also let go
//! (the policies of a table that a policy reads were chosen by
//! membership when the plan was made), and at least every `REREAD`; a
//! check run while one changed is not trusted and is run again.

use super::catalog;
use super::invalidations;
use super::plans;
use std::time::{Duration, Instant};

/// How long the answer is trusted when nothing changed (a function added
/// to or dropped from an extension changes no function, only `pg_depend`).
const REREAD: Duration = Duration::from_secs(1);

/// Whether plans may be shared, and as of when.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sharing {
    allowed: bool,
    /// `invalidations::catalog_changes` when it was read.
    catalog: u64,
    read_at: Option<Instant>,
}

impl Sharing {
    /// Whether checks may run on shared plans now, read again if the
    /// catalog changed or it is old. After a change, or on "no", every
    /// kept check plan is let go. In a transaction.
    pub fn allowed(&mut self) -> bool {
        let fresh = self.read_at.is_some_and(|at| at.elapsed() < REREAD);
        let changed = self.changed();
        if fresh && !changed {
            return self.allowed;
        }
        self.catalog = invalidations::catalog_changes();
        self.read_at = Some(Instant::now());
        let allowed = match catalog::user_immutable_functions_exist() {
            Ok(exists) => !exists,
            Err(e) => {
                pgrx::warning!("pg_realtime: row checks are planned one by one: {e}");
                false
            }
        };
        if changed || !allowed {
            plans::forget_checks();
        }
        self.allowed = allowed;
        allowed
    }

    /// Whether the catalog changed since it was read: a check run on a
    /// shared plan meanwhile may have been planned with it.
    pub fn changed(&self) -> bool {
        invalidations::catalog_changes() != self.catalog
    }
}
