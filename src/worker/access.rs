//! What each subscriber may see of a delivered row: its role's column
//! privileges, read from the catalog and cached for `ACCESS_TTL`, and the
//! row-level security check of each row, run as the subscriber (`acting`).

use super::acting::{self, ActingRole};
use super::catalog;
use pgrx::bgworkers::BackgroundWorker;
use realtime::changes::event::Visible;
use realtime::changes::rls;
use realtime::changes::wire::Relation;
use realtime::stats::Counters;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long privileges and policies read from the catalog are trusted
/// before they are read again, so a REVOKE or a new policy takes effect
/// within this time.
const ACCESS_TTL: Duration = Duration::from_secs(1);

/// Who a row-level security check runs as: role, claims, and the table.
pub type CheckKey = (Arc<str>, Arc<str>, u32);

/// What a role may read of a table, as last read from the catalog.
pub struct Grants {
    /// The role as resolved when this was read (the token's role claim,
    /// still one `pg_realtime.authenticator` may become).
    role: ActingRole,
    /// Each column and whether the role may SELECT it.
    columns: Vec<(String, bool)>,
    /// With row-level security applying to the role: the check query.
    check: Option<String>,
}

impl Grants {
    /// The columns of `relation` the role may see (None: none). A column
    /// the grants do not know (added since they were read) is not shown.
    pub fn visible(&self, relation: &Relation) -> Option<Visible> {
        let known = |name: &str| self.columns.iter().any(|(n, ok)| *ok && n == name);
        if relation.columns.iter().all(|c| known(&c.name)) {
            return Some(Visible::All);
        }
        if !self.columns.iter().any(|(_, ok)| *ok) {
            return None;
        }
        Some(Visible::Only(
            relation
                .columns
                .iter()
                .map(|c| self.columns.iter().any(|(name, ok)| *ok && *name == c.name))
                .collect(),
        ))
    }

    /// Whether each row needs a row-level security check.
    pub fn checks_rows(&self) -> bool {
        self.check.is_some()
    }
}

/// The rows of one identity and table to check, and its `sub` claim.
pub struct CheckGroup {
    pub sub: Option<String>,
    pub rows: BTreeSet<usize>,
}

/// What a role may read of a table (None: nothing), and when that was read.
struct ReadAt {
    grants: Option<Arc<Grants>>,
    at: Instant,
}

/// (role, relid) -> what the role may read of the table.
#[derive(Default)]
pub struct AccessCache {
    entries: HashMap<(Arc<str>, u32), ReadAt>,
}

impl AccessCache {
    /// What the role may read of the table, if known (None: nothing, or
    /// not read yet).
    pub fn get(&self, role: &Arc<str>, relid: u32) -> Option<&Grants> {
        self.entries.get(&(role.clone(), relid))?.grants.as_deref()
    }

    /// Whether the pair must be read (again) before it is used.
    pub fn is_stale(&self, role: &Arc<str>, relid: u32) -> bool {
        self.entries
            .get(&(role.clone(), relid))
            .is_none_or(|read| read.at.elapsed() >= ACCESS_TTL)
    }

    /// Reads privileges and policies for each (role, table) pair;
    /// `names` gives each table's schema and name. Returns the pairs that
    /// could not be read (not cached: they are tried again next time).
    pub fn read(
        &mut self,
        pairs: Vec<(Arc<str>, u32)>,
        names: &HashMap<u32, (String, String)>,
    ) -> HashSet<(Arc<str>, u32)> {
        let answers = BackgroundWorker::transaction(|| {
            if let Err(e) = catalog::clear_search_path() {
                pgrx::warning!("pg_realtime: could not prepare the privilege checks: {e}");
                return pairs.into_iter().map(|pair| (pair, None)).collect::<Vec<_>>();
            }
            pairs
                .into_iter()
                .map(|(role, relid)| {
                    // (an ERROR, say a role dropped meanwhile, is caught)
                    let read = catalog::catching(|| read_grants(&role, relid, names.get(&relid)))
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let grants = match read {
                        Ok(grants) => Some(grants.map(Arc::new)),
                        Err(e) => {
                            pgrx::warning!(
                                "pg_realtime: could not read what role \"{}\" may see: {}",
                                realtime::log::escape(&role),
                                realtime::log::escape(&e)
                            );
                            None
                        }
                    };
                    ((role, relid), grants)
                })
                .collect::<Vec<_>>()
        });
        let now = Instant::now();
        let mut failed = HashSet::new();
        for (key, grants) in answers {
            match grants {
                Some(grants) => {
                    self.entries.insert(key, ReadAt { grants, at: now });
                }
                None => {
                    self.entries.remove(&key);
                    failed.insert(key);
                }
            }
        }
        failed
    }

    /// Runs the row-level security checks, each as its subscriber; returns,
    /// per identity and table, the rows it may see, or None when its check
    /// failed (a policy raising an error, or taking longer than
    /// `pg_realtime.check_timeout`): it shows nothing, as the SELECT would,
    /// and its subscribers are told. `image` gives a row's image as of the
    /// commit.
    pub fn check_rows<'a>(
        &self,
        groups: HashMap<CheckKey, CheckGroup>,
        image: impl Fn(usize) -> &'a str,
    ) -> HashMap<CheckKey, Option<HashSet<usize>>> {
        // The queries and their rows first: the transaction below must not
        // borrow `self` (it holds no Postgres state, but the cache).
        let mut jobs = Vec::with_capacity(groups.len());
        for ((role, claims, relid), group) in groups {
            let Some(grants) = self.get(&role, relid) else { continue };
            let Some(query) = grants.check.clone() else { continue };
            let members: Vec<usize> = group.rows.into_iter().collect();
            let images = rls::rows_array(members.iter().map(|&i| image(i)));
            jobs.push(((role, claims, relid), grants.role, group.sub, members, query, images));
        }
        let counters = crate::shmem::counters();
        BackgroundWorker::transaction(move || {
            let mut out = HashMap::new();
            if let Err(e) = catalog::clear_search_path() {
                pgrx::warning!("pg_realtime: could not prepare the row-level security checks: {e}");
                // (every check failed: their subscribers are told)
                for (key, ..) in jobs {
                    out.insert(key, None);
                }
                return out;
            }
            for ((role, claims, relid), acting_role, sub, members, query, images) in jobs {
                // (a table refused for now: nothing run, nothing logged)
                if acting::refused(relid).is_some() {
                    out.insert((role, claims, relid), None);
                    continue;
                }
                let identity = acting::Identity {
                    role: acting_role,
                    role_name: &role,
                    claims: &claims,
                    sub: sub.as_deref(),
                    topic: None,
                    subject: relid,
                };
                let seen = acting::as_identity(&identity, || catalog::visible_rows(&query, &images));
                let seen: Option<HashSet<usize>> = match seen {
                    Ok(positions) => Some(
                        positions
                            .into_iter()
                            .filter_map(|p| members.get(usize::try_from(p).ok()?.checked_sub(1)?).copied())
                            .collect(),
                    ),
                    Err(e) => {
                        pgrx::warning!(
                            "pg_realtime: row-level security check failed for role \"{}\": {}",
                            realtime::log::escape(&role),
                            realtime::log::escape(&e)
                        );
                        None
                    }
                };
                Counters::incr(&counters.rls_checks);
                Counters::add(&counters.rls_rows_checked, members.len() as u64);
                out.insert((role, claims, relid), seen);
            }
            let _ = catalog::release_session_locks();
            out
        })
    }
}

/// What `role` may read of the table now: None if the role may no longer
/// be acted as, or the role or table is gone.
fn read_grants(role: &str, relid: u32, name: Option<&(String, String)>) -> catalog::SpiResult<Option<Grants>> {
    let Ok(acting) = acting::resolve(role)? else {
        return Ok(None);
    };
    let Some(access) = catalog::access(role, relid)? else {
        return Ok(None);
    };
    let check = access.policies.map(|policies| {
        let (schema, table) = name.cloned().unwrap_or_default();
        rls::check_query(&schema, &table, &rls::predicate(&policies))
    });
    Ok(Some(Grants {
        role: acting,
        columns: access.columns,
        check,
    }))
}
