//! Acting as a subscriber, with no more rights than it has
//! (`docs/security.md`).
//!
//! - **Which role.** A token's `role` claim is honoured as PostgREST
//!   honours it: only if `pg_realtime.authenticator` may become that role,
//!   never the authenticator itself, never a superuser.
//! - **How.** Every cast, probe and policy check for a subscriber runs in a
//!   subtransaction that is always rolled back, with the current user
//!   switched to the subscriber's role in PostgreSQL's restricted security
//!   context (`SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION`,
//!   as VACUUM and REFRESH MATERIALIZED VIEW run a table owner's code): code
//!   written by a table's owner or a policy cannot `SET ROLE`, `SET SESSION
//!   AUTHORIZATION` or create temporary objects, and nothing it writes or
//!   sets outlives the check.

use super::catalog::{self, CatalogError, CatalogResult, SpiResult};
use super::deadline::Deadline;
use super::plans;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::panic::UnwindSafe;

/// A role a token may act as, resolved against the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActingRole(pub pg_sys::Oid);

pub use bgworker::server::errors::RoleRefusal;

/// Whether `pg_realtime.authenticator` may act as `role`. Runs inside a
/// transaction.
pub fn resolve(role: &str) -> SpiResult<Result<ActingRole, RoleRefusal>> {
    let authenticator = crate::gucs::authenticator();
    // PostgreSQL 16 split membership into INHERIT and SET options: what
    // matters is whether the authenticator may SET ROLE to it.
    #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
    const MAY_BECOME: &str = "SET";
    #[cfg(not(any(feature = "pg16", feature = "pg17", feature = "pg18")))]
    const MAY_BECOME: &str = "MEMBER";
    let query = format!(
        "SELECT a.oid, r.oid, r.rolsuper, \
                CASE WHEN a.oid IS NOT NULL AND r.oid IS NOT NULL \
                     THEN pg_catalog.pg_has_role(a.oid, r.oid, '{MAY_BECOME}') END, \
                a.rolsuper \
         FROM (VALUES (1)) AS one \
         LEFT JOIN pg_catalog.pg_roles a ON a.rolname = $2 \
         LEFT JOIN pg_catalog.pg_roles r ON r.rolname = $1"
    );
    let (auth, target, superuser, granted, authenticator_superuser) = Spi::connect(|client| {
        let row = plans::select(client, &query, Some(1), &[role.into(), authenticator.as_str().into()])?.first();
        SpiResult::Ok((
            row.get::<pg_sys::Oid>(1)?,
            row.get::<pg_sys::Oid>(2)?,
            row.get::<bool>(3)?,
            row.get::<bool>(4)?,
            row.get::<bool>(5)?,
        ))
    })?;
    Ok(match (auth, target) {
        (None, _) => Err(RoleRefusal::NoAuthenticator(authenticator)),
        (Some(_), _) if authenticator_superuser == Some(true) => {
            Err(RoleRefusal::SuperuserAuthenticator(authenticator))
        }
        (_, None) => Err(RoleRefusal::Unknown(role.to_owned())),
        (Some(a), Some(r)) if a == r => Err(RoleRefusal::Authenticator(role.to_owned())),
        (_, Some(_)) if superuser == Some(true) => Err(RoleRefusal::Superuser(role.to_owned())),
        (_, Some(r)) if granted == Some(true) => Ok(ActingRole(r)),
        _ => Err(RoleRefusal::NotGranted {
            role: role.to_owned(),
            authenticator,
        }),
    })
}

/// The search_path the database gives a session (read when the worker
/// connects, before it empties its own), for the subscriber's code.
static SUBSCRIBER_SEARCH_PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Remembers the session's search_path for subscribers' code; call once,
/// at start, before the worker sets its own.
pub fn remember_search_path(search_path: String) {
    let _ = SUBSCRIBER_SEARCH_PATH.set(format!("pg_catalog, {search_path}"));
}

/// The database's search_path with pg_catalog first, whatever that path
/// says: policies are spliced in as `pg_get_expr` prints them, with
/// catalog functions unqualified, and an object of the same name in a
/// schema the subscriber may create in must not stand in for one.
fn subscriber_search_path() -> &'static str {
    SUBSCRIBER_SEARCH_PATH
        .get()
        .map_or("pg_catalog, \"$user\", public", String::as_str)
}

/// Who a check runs as.
pub struct Identity<'a> {
    pub role: ActingRole,
    /// The role's name, for `request.jwt.claim.role`.
    pub role_name: &'a str,
    /// The token's claims as JSON (`request.jwt.claims`).
    pub claims: &'a str,
    pub sub: Option<&'a str>,
    /// For private channels: the topic `realtime.topic()` returns.
    pub topic: Option<&'a str>,
    /// The table whose code the check runs (its policies, a column's type),
    /// `quarantine::PRIVATE_PROBES` for `realtime.messages`' policies, 0
    /// when the caller notes each table itself (`checking`).
    pub subject: u32,
}

/// Seconds a table whose check ended the worker is refused.
const QUARANTINE_SECS: u32 = 600;
/// Seconds a table whose check ran past `pg_realtime.check_timeout` is
/// refused (its code is not run again and again, a second each time).
const SLOW_SECS: u32 = 60;

fn now_secs() -> u32 {
    u32::try_from(bgworker::server::jwt::now()).unwrap_or(u32::MAX)
}

/// Why checks of `subject` are refused now, if they are: one of them ended
/// the previous worker (`bgworker::shared::quarantine`).
pub fn refused(subject: u32) -> Option<String> {
    let until = crate::shmem::quarantine().refused_until(subject, now_secs())?;
    let left = until.saturating_sub(now_secs());
    Some(format!(
        "a check of this table as a subscriber ended the realtime worker (a policy, domain or cast that would not \
         stop); its checks are refused for {left} s more"
    ))
}

/// Notes, in shared memory, that code of `subject` runs as a subscriber,
/// until dropped: if the worker does not survive it, its successor
/// refuses that table's checks for a while.
pub struct Checking(bool);

pub fn checking(subject: u32) -> Checking {
    if subject == 0 {
        return Checking(false);
    }
    crate::shmem::quarantine().begin(subject);
    Checking(true)
}

impl Drop for Checking {
    fn drop(&mut self) {
        // (a worker told to die keeps the note for its successor: the
        // FATAL comes at the next interrupt check, after this)
        // SAFETY: a plain read of a flag the signal handler sets.
        let dying = unsafe { pg_sys::ProcDiePending } != 0;
        if self.0 && !dying {
            crate::shmem::quarantine().end();
        }
    }
}

/// Times a check of `subject`: one that ran past `timeout_ms` (its cancel
/// caught, or just slow) has that table's checks refused for a minute.
pub struct Timed {
    subject: u32,
    timeout_ms: i32,
    started: std::time::Instant,
}

impl Timed {
    pub fn start(subject: u32, timeout_ms: i32) -> Timed {
        Timed {
            subject,
            timeout_ms,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        let limit = std::time::Duration::from_millis(self.timeout_ms.max(0) as u64);
        if self.timeout_ms > 0 && self.started.elapsed() >= limit {
            crate::shmem::quarantine().refuse(self.subject, now_secs(), SLOW_SECS);
        }
    }
}

/// At the worker's start: if its predecessor ended during a check, that
/// table's checks are refused for a while, and the log says so. Runs in a
/// transaction (the table's name is looked up).
pub fn quarantine_on_start() {
    let Some(relid) = crate::shmem::quarantine().on_start(now_secs(), QUARANTINE_SECS) else {
        return;
    };
    let name = if relid == bgworker::shared::quarantine::PRIVATE_PROBES {
        "realtime.messages".to_owned()
    } else {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.format('%s', $1::pg_catalog.regclass)",
            &[pg_sys::Oid::from(relid).into()],
        )
        .ok()
        .flatten()
        .unwrap_or_else(|| relid.to_string())
    };
    pgrx::warning!(
        "pg_realtime: the previous worker ended while running code of {name} as a subscriber (a policy, domain \
         CHECK or cast that did not stop within pg_realtime.check_timeout, or that ended the session); checks of it \
         are refused for {QUARANTINE_SECS} s, and its subscribers are told"
    );
}

/// Runs `f` as `identity`: the claims set as PostgREST sets them, the
/// current user switched to its role in the restricted security context,
/// all in a subtransaction that is rolled back however `f` ends. A
/// PostgreSQL error in `f` (a policy that raises, a value that does not
/// cast, an attempt to change role) comes back as [`CatalogError::Raised`].
///
/// It may take `pg_realtime.check_timeout` at most (a lock it waits for
/// too: `lock_timeout`), then it is cancelled like a statement that timed
/// out: code of a table's owner cannot hold the worker's main thread.
pub fn as_identity<T>(identity: &Identity<'_>, f: impl FnOnce() -> SpiResult<T> + UnwindSafe) -> CatalogResult<T> {
    if let Some(why) = refused(identity.subject) {
        return Err(CatalogError::Refused(why));
    }
    let _noted = checking(identity.subject);
    let role = identity.role;
    let timeout_ms = crate::gucs::check_timeout_ms();
    let _timed = Timed::start(identity.subject, timeout_ms);
    let lock_timeout = format!("{timeout_ms}ms");
    // (the subscriber's code sees the database's search_path, as it would
    // in a query through PostgREST; the worker's own is empty)
    let settings = [
        ("request.jwt.claims", identity.claims),
        ("request.jwt.claim.sub", identity.sub.unwrap_or("")),
        ("request.jwt.claim.role", identity.role_name),
        ("realtime.topic", identity.topic.unwrap_or("")),
        ("lock_timeout", lock_timeout.as_str()),
        ("search_path", subscriber_search_path()),
        // (a check kept for a role's subscribers runs on one generic
        // plan, not re-planned with each one's claims: `share`)
        ("plan_cache_mode", "force_generic_plan"),
    ]
    .map(|(name, value)| (name, value.to_owned()));
    let answer = catalog::rolled_back(move || {
        set_local(&settings)?;
        let _deadline = Deadline::arm(timeout_ms);
        let _restricted = Restricted::enter(role);
        f()
    })
    .and_then(|answer| Ok(answer?));
    // Code that waited on this process's latch (pg_sleep, a lock wait)
    // reset it, and with it any wake-up meant for the main loop (a commit
    // that came meanwhile): set it again, so the loop looks once more.
    // SAFETY: the main thread setting its own latch.
    unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
    answer
}

/// Sets each setting for the rest of the (sub)transaction, in one query
/// (one execution per check, not one per setting).
fn set_local(settings: &[(&str, String)]) -> SpiResult<()> {
    let calls: Vec<String> = (0..settings.len())
        .map(|i| format!("pg_catalog.set_config(${}, ${}, true)", 2 * i + 1, 2 * i + 2))
        .collect();
    let query = format!("SELECT {}", calls.join(", "));
    let args: Vec<DatumWithOid<'_>> = settings
        .iter()
        .flat_map(|(name, value)| [(*name).into(), value.as_str().into()])
        .collect();
    Spi::connect(|client| plans::select(client, &query, None, &args).map(drop))
}

/// The current user switched to a role in the restricted security
/// context, until dropped (also when a PostgreSQL error unwinds through
/// it; the subtransaction's rollback restores the same state again).
struct Restricted {
    saved_user: pg_sys::Oid,
    saved_context: i32,
}

impl Restricted {
    fn enter(role: ActingRole) -> Restricted {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        // SAFETY: the worker's main thread inside a transaction; these only
        // read and write the backend's current user id and security flags.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            let restricted = (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32;
            pg_sys::SetUserIdAndSecContext(role.0, saved_context | restricted);
        }
        Restricted {
            saved_user,
            saved_context,
        }
    }
}

impl Drop for Restricted {
    fn drop(&mut self) {
        // SAFETY: as in `enter`: puts back what it saved, on the same thread.
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}
