//! The plans the worker keeps for its own queries, asked again and again:
//! the catalog questions of every join, the settings of every check as a
//! subscriber. Planned afresh each time, they were most of a join's cost
//! (`make bench-scale`, "joins": 61% of the worker's samples in the
//! planner, 227 joins a second). Kept by query text and argument types,
//! at most `MAX_PLANS` (then the one used longest ago is let go);
//! PostgreSQL's plan cache replans a kept plan itself when a catalog it
//! reads, the role or the search_path it depends on changes.
//!
//! Row checks have their own, smaller store (`check`), kept per role and
//! query so that one table's subscribers share one generic plan
//! (`docs/security.md`, "Kept checks"; `access::share` decides when they
//! may).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;

use super::catalog::SpiResult;

/// Distinct catalog queries kept at once (the worker's own are a dozen).
const MAX_PLANS: usize = 64;
/// Row checks kept at once: a generic plan of the seed app's `messages`
/// check holds 32 kB (`pg_backend_memory_contexts` after one run), so
/// about 2 MB at most.
const MAX_CHECK_PLANS: usize = 64;

/// Plans by key, at most `max` (then the one used longest ago is let go).
struct Kept<K> {
    plans: HashMap<K, Entry>,
    max: usize,
    /// Uses so far, to tell which plan was used longest ago.
    uses: u64,
}

struct Entry {
    plan: Rc<OwnedPreparedStatement>,
    used: u64,
}

impl<K: Hash + Eq> Kept<K> {
    fn new(max: usize) -> Kept<K> {
        Kept {
            plans: HashMap::new(),
            max,
            uses: 0,
        }
    }

    fn get(&mut self, key: &K) -> Option<Rc<OwnedPreparedStatement>> {
        self.uses += 1;
        let entry = self.plans.get_mut(key)?;
        entry.used = self.uses;
        Some(entry.plan.clone())
    }

    fn insert(&mut self, key: K, plan: Rc<OwnedPreparedStatement>) {
        if self.plans.len() >= self.max {
            let oldest = self.plans.values().map(|e| e.used).min();
            self.plans.retain(|_, e| Some(e.used) != oldest);
        }
        self.plans.insert(key, Entry { plan, used: self.uses });
    }
}

type Key = (String, Vec<u32>);
/// (role, query): a check's one argument is always its rows, as text.
type CheckKey = (u32, String);

thread_local! {
    static PLANS: RefCell<Kept<Key>> = RefCell::new(Kept::new(MAX_PLANS));
    static CHECKS: RefCell<Kept<CheckKey>> = RefCell::new(Kept::new(MAX_CHECK_PLANS));
}

/// Runs the SELECT `query` with `args` through `client`, on its kept plan
/// (prepared on first use).
pub fn select<'conn>(
    client: &SpiClient<'conn>,
    query: &str,
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    let key: Key = (query.to_owned(), args.iter().map(|a| u32::from(a.oid())).collect());
    let (plan, _) = kept(&PLANS, key, client, query, args)?;
    client.select(&*plan, limit, args)
}

/// Runs the row check `query` over `rows` (its `$1`, text) through
/// `client`, on the plan kept for `role` (a plan made counts in
/// `rls_checks_planned`).
pub fn select_check<'conn>(
    client: &SpiClient<'conn>,
    role: u32,
    query: &str,
    rows: &str,
) -> SpiResult<SpiTupleTable<'conn>> {
    let args: [DatumWithOid<'_>; 1] = [rows.into()];
    let (plan, made) = kept(&CHECKS, (role, query.to_owned()), client, query, &args)?;
    if made {
        bgworker::shared::stats::Counters::incr(&crate::shmem::counters().rls_checks_planned);
    }
    client.select(&*plan, None, &args)
}

/// Lets every kept check plan go.
pub fn forget_checks() {
    CHECKS.with(|checks| checks.borrow_mut().plans.clear());
}

/// The plan kept in `store` under `key`, prepared for `args`' types on
/// first use, and whether it was prepared now. (An `Rc`, not a borrow of
/// the map: code the query runs may come back here.)
fn kept<K: Hash + Eq>(
    store: &'static std::thread::LocalKey<RefCell<Kept<K>>>,
    key: K,
    client: &SpiClient<'_>,
    query: &str,
    args: &[DatumWithOid<'_>],
) -> SpiResult<(Rc<OwnedPreparedStatement>, bool)> {
    if let Some(plan) = store.with(|kept| kept.borrow_mut().get(&key)) {
        return Ok((plan, false));
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let plan = Rc::new(client.prepare(query, &types)?.keep());
    store.with(|kept| kept.borrow_mut().insert(key, plan.clone()));
    Ok((plan, true))
}
