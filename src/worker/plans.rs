//! The plans the worker keeps for its own queries, asked again and again:
//! the catalog questions of every join, the settings of every check as a
//! subscriber. Planned afresh each time, they were most of a join's cost
//! (`make bench-scale`, "joins": 61% of the worker's samples in the
//! planner, 227 joins a second). Kept by query text and argument types,
//! at most `MAX_PLANS` (then all are let go and planned again);
//! PostgreSQL's plan cache replans a kept plan itself when a catalog it
//! reads, the role or the search_path it depends on changes. Only for
//! queries over the system catalogs: a row check or a cast, which run a
//! table owner's code and name their table only inside a cast, are
//! planned afresh (`catalog::visible_rows`).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::catalog::SpiResult;

/// Distinct queries kept at once (the worker's own are a dozen).
const MAX_PLANS: usize = 64;

type Key = (String, Vec<u32>);

thread_local! {
    static PLANS: RefCell<HashMap<Key, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Runs the SELECT `query` with `args` through `client`, on its kept plan
/// (prepared on first use).
pub fn select<'conn>(
    client: &SpiClient<'conn>,
    query: &str,
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    let plan = kept(client, query, args)?;
    client.select(&*plan, limit, args)
}

/// The kept plan of `query` for `args`' types. (An `Rc`, not a borrow of
/// the map: code the query runs may come back here.)
fn kept(client: &SpiClient<'_>, query: &str, args: &[DatumWithOid<'_>]) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let key: Key = (query.to_owned(), args.iter().map(|a| u32::from(a.oid())).collect());
    if let Some(plan) = PLANS.with(|plans| plans.borrow().get(&key).cloned()) {
        return Ok(plan);
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let plan = Rc::new(client.prepare(query, &types)?.keep());
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(key, plan.clone());
    });
    Ok(plan)
}
