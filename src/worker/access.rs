//! What each subscriber may see of a delivered row: its role's column
//! privileges, read from the catalog and cached until the table changes
//! (`invalidations`) or for `ACCESS_TTL` at most, and the row-level
//! security check of each row, run as the subscriber (`acting`), on a
//! plan its role's subscribers share when they may (`share`).

use super::acting::{self, ActingRole};
use super::catalog;
use super::invalidations;
use super::share::Sharing;
use bgworker::changes::deliver::{Access, CheckGroup, CheckKey, Grants, RoleTable};
use bgworker::changes::rls;
use bgworker::shared::stats::Counters;
use pgrx::bgworkers::BackgroundWorker;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long privileges and policies read from the catalog are trusted
/// before they are read again, at most. A change heard through
/// invalidation messages (a table, a role, a membership, a schema, the
/// database's owner) takes effect at once (`invalidations`); anything
/// else, within this time.
const ACCESS_TTL: Duration = Duration::from_secs(1);

/// What a role may read of a table, with the role as resolved when it
/// was read (the token's role claim, still one `pg_realtime.authenticator`
/// may become).
struct Readable {
    role: ActingRole,
    grants: Grants,
}

/// What a role may read of a table (None: nothing), and when that was read.
struct ReadAt {
    readable: Option<Arc<Readable>>,
    at: Instant,
}

/// (role, relid) -> what the role may read of the table.
#[derive(Default)]
pub struct AccessCache {
    entries: HashMap<(Arc<str>, u32), ReadAt>,
    sharing: Sharing,
}

impl AccessCache {
    fn readable(&self, role: &Arc<str>, relid: u32) -> Option<&Readable> {
        self.entries.get(&(role.clone(), relid))?.readable.as_deref()
    }
}

/// One row-level security check to run: as whom, which query, over which
/// rows (`members`, indices into the batch; `images`, their rows as one
/// array literal).
struct CheckJob {
    key: CheckKey,
    role: ActingRole,
    sub: Option<String>,
    query: String,
    members: Vec<usize>,
    images: String,
}

impl Access for AccessCache {
    /// Forgets what was read of the tables changed since (nothing read,
    /// nothing to forget: no transaction).
    fn catch_up(&mut self) {
        if !self.entries.is_empty() {
            invalidations::catch_up();
        }
        let changed = invalidations::take_changed();
        if changed.all {
            self.entries.clear();
        } else if !changed.relids.is_empty() {
            self.entries.retain(|(_, relid), _| !changed.relids.contains(relid));
        }
    }

    fn is_stale(&self, role: &Arc<str>, relid: u32) -> bool {
        self.entries
            .get(&(role.clone(), relid))
            .is_none_or(|read| read.at.elapsed() >= ACCESS_TTL)
    }

    /// Reads privileges and policies in one transaction; a pair that
    /// could not be read is not cached: it is tried again next time.
    fn read(&mut self, pairs: Vec<RoleTable>, names: &HashMap<u32, (String, String)>) -> HashSet<RoleTable> {
        let answers = BackgroundWorker::transaction(|| read_all(pairs, names));
        let now = Instant::now();
        let mut failed = HashSet::new();
        for (key, readable) in answers {
            match readable {
                Some(readable) => {
                    self.entries.insert(key, ReadAt { readable, at: now });
                }
                None => {
                    self.entries.remove(&key);
                    failed.insert(key);
                }
            }
        }
        failed
    }

    fn grants(&self, role: &Arc<str>, relid: u32) -> Option<&Grants> {
        self.readable(role, relid).map(|r| &r.grants)
    }

    /// Runs the checks, each as its subscriber. A check that fails (a
    /// policy raising an error, or taking longer than
    /// `pg_realtime.check_timeout`) shows nothing, as the SELECT would,
    /// and its subscribers are told.
    fn check_rows<'a>(
        &mut self,
        groups: HashMap<CheckKey, CheckGroup>,
        image: impl Fn(usize) -> &'a str,
    ) -> HashMap<CheckKey, Option<HashSet<usize>>> {
        // The queries and their rows first: the transaction below must not
        // borrow `self` (it holds no Postgres state, but the cache).
        let mut jobs = Vec::with_capacity(groups.len());
        for (key, group) in groups {
            let Some(readable) = self.readable(&key.role, key.relid) else {
                continue;
            };
            let Some(query) = readable.grants.check.clone() else {
                continue;
            };
            let members: Vec<usize> = group.rows.into_iter().collect();
            let images = rls::rows_array(members.iter().map(|&i| image(i)));
            jobs.push(CheckJob {
                key,
                role: readable.role,
                sub: group.sub,
                query,
                members,
                images,
            });
        }
        let sharing = self.sharing;
        let (seen, sharing) = BackgroundWorker::transaction(move || run_checks(jobs, sharing));
        self.sharing = sharing;
        seen
    }
}

/// Reads each pair's grants (None: could not be read).
fn read_all(
    pairs: Vec<RoleTable>,
    names: &HashMap<u32, (String, String)>,
) -> Vec<(RoleTable, Option<Option<Arc<Readable>>>)> {
    if let Err(e) = catalog::clear_search_path() {
        pgrx::warning!("pg_realtime: could not prepare the privilege checks: {e}");
        return pairs.into_iter().map(|pair| (pair, None)).collect();
    }
    pairs
        .into_iter()
        .map(|(role, relid)| {
            // (an ERROR, say a role dropped meanwhile, is caught)
            let read = catalog::catching(|| read_grants(&role, relid, names.get(&relid))).and_then(|r| Ok(r?));
            let readable = match read {
                Ok(readable) => Some(readable.map(Arc::new)),
                Err(e) => {
                    pgrx::warning!(
                        "pg_realtime: could not read what role \"{}\" may see: {}",
                        bgworker::server::log::escape(&role),
                        bgworker::server::log::escape(&e.to_string())
                    );
                    None
                }
            };
            ((role, relid), readable)
        })
        .collect()
}

/// Runs each check as its identity, in the current transaction.
fn run_checks(jobs: Vec<CheckJob>, mut sharing: Sharing) -> (HashMap<CheckKey, Option<HashSet<usize>>>, Sharing) {
    let mut out = HashMap::new();
    if let Err(e) = catalog::clear_search_path() {
        pgrx::warning!("pg_realtime: could not prepare the row-level security checks: {e}");
        // (every check failed: their subscribers are told)
        for job in jobs {
            out.insert(job.key, None);
        }
        return (out, sharing);
    }
    let counters = crate::shmem::counters();
    for job in jobs {
        // (a table refused for now: nothing run, nothing logged)
        if acting::refused(job.key.relid).is_some() {
            out.insert(job.key, None);
            continue;
        }
        let identity = acting::Identity {
            role: job.role,
            role_name: &job.key.role,
            claims: &job.key.claims,
            sub: job.sub.as_deref(),
            topic: None,
            subject: job.key.relid,
        };
        let seen = check(&identity, &job, &mut sharing);
        let seen: Option<HashSet<usize>> = match seen {
            Ok(positions) => Some(
                positions
                    .into_iter()
                    .filter_map(|p| job.members.get(usize::try_from(p).ok()?.checked_sub(1)?).copied())
                    .collect(),
            ),
            Err(e) => {
                pgrx::warning!(
                    "pg_realtime: row-level security check failed for role \"{}\": {}",
                    bgworker::server::log::escape(&job.key.role),
                    bgworker::server::log::escape(&e.to_string())
                );
                None
            }
        };
        Counters::incr(&counters.rls_checks);
        Counters::add(&counters.rls_rows_checked, job.members.len() as u64);
        out.insert(job.key, seen);
    }
    let _ = catalog::release_session_locks();
    (out, sharing)
}

/// Runs `job`'s check as `identity`: on its role's shared plan if
/// `sharing` allows, run again planned afresh if the catalog changed
/// meanwhile (it may have been planned with that function folded).
fn check(identity: &acting::Identity<'_>, job: &CheckJob, sharing: &mut Sharing) -> catalog::CatalogResult<Vec<i32>> {
    let planned = &crate::shmem::counters().rls_checks_planned;
    let kept_for = sharing.allowed().then_some(u32::from(job.role.0));
    let seen = acting::as_identity(identity, || catalog::visible_rows(&job.query, &job.images, kept_for));
    if kept_for.is_none() {
        Counters::incr(planned);
    }
    if kept_for.is_none() || !sharing.changed() {
        return seen;
    }
    sharing.allowed();
    Counters::incr(planned);
    acting::as_identity(identity, || catalog::visible_rows(&job.query, &job.images, None))
}

/// What `role` may read of the table now: None if the role may no longer
/// be acted as, or the role or table is gone.
fn read_grants(role: &str, relid: u32, name: Option<&(String, String)>) -> catalog::SpiResult<Option<Readable>> {
    let Ok(acting) = acting::resolve(role)? else {
        return Ok(None);
    };
    let Some(access) = catalog::access(role, relid)? else {
        return Ok(None);
    };
    let check = access.policies.map(|policies| {
        let (schema, table) = name.cloned().unwrap_or_default();
        rls::check_query(&schema, &table, relid, &rls::predicate(&policies))
    });
    Ok(Some(Readable {
        role: acting,
        grants: Grants {
            columns: access.columns,
            check,
        },
    }))
}
