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

use super::catalog::{self, SpiResult};
use pgrx::prelude::*;
use std::panic::UnwindSafe;

/// A role a token may act as, resolved against the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActingRole(pub pg_sys::Oid);

/// Why a token's role claim is not honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleRefusal {
    #[error("Unauthorized: role \"{0}\" of the token does not exist")]
    Unknown(String),
    #[error(
        "Unauthorized: role \"{role}\" of the token may not be used: the role pg_realtime.authenticator names \
         (\"{authenticator}\") may not become it (GRANT \"{role}\" TO \"{authenticator}\")"
    )]
    NotGranted { role: String, authenticator: String },
    #[error("Unauthorized: role \"{0}\" of the token may not be used: it is the authenticator role itself")]
    Authenticator(String),
    #[error("Unauthorized: role \"{0}\" of the token may not be used: it is a superuser")]
    Superuser(String),
    #[error(
        "Realtime is misconfigured: the role pg_realtime.authenticator names (\"{0}\") is a superuser, so it may \
         become any role; use a role that is not (CREATE ROLE authenticator NOINHERIT LOGIN)"
    )]
    SuperuserAuthenticator(String),
    #[error(
        "Realtime is not configured: the role pg_realtime.authenticator names (\"{0}\") does not exist. \
         Create it and grant it the API roles: CREATE ROLE \"{0}\" NOINHERIT LOGIN; \
         GRANT anon, authenticated, service_role TO \"{0}\";"
    )]
    NoAuthenticator(String),
}

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
        let row = client
            .select(&query, Some(1), &[role.into(), authenticator.as_str().into()])?
            .first();
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
}

/// Runs `f` as `identity`: the claims set as PostgREST sets them, the
/// current user switched to its role in the restricted security context,
/// all in a subtransaction that is rolled back however `f` ends. A
/// PostgreSQL error in `f` (a policy that raises, a value that does not
/// cast, an attempt to change role) comes back as its message.
///
/// It may take `pg_realtime.check_timeout` at most (a lock it waits for
/// too: `lock_timeout`), then it is cancelled like a statement that timed
/// out: code of a table's owner cannot hold the worker's main thread.
pub fn as_identity<T>(identity: &Identity<'_>, f: impl FnOnce() -> SpiResult<T> + UnwindSafe) -> Result<T, String> {
    let role = identity.role;
    let timeout_ms = crate::gucs::check_timeout_ms();
    let lock_timeout = format!("{timeout_ms}ms");
    let settings = [
        ("request.jwt.claims", identity.claims),
        ("request.jwt.claim.sub", identity.sub.unwrap_or("")),
        ("request.jwt.claim.role", identity.role_name),
        ("realtime.topic", identity.topic.unwrap_or("")),
        ("lock_timeout", lock_timeout.as_str()),
    ]
    .map(|(name, value)| (name, value.to_owned()));
    let answer = catalog::rolled_back(move || {
        set_local(&settings)?;
        let _deadline = Deadline::arm(timeout_ms);
        let _restricted = Restricted::enter(role);
        f()
    })
    .and_then(|answer| answer.map_err(|e| e.to_string()));
    // Code that waited on this process's latch (pg_sleep, a lock wait)
    // reset it, and with it any wake-up meant for the main loop (a commit
    // that came meanwhile): set it again, so the loop looks once more.
    // SAFETY: the main thread setting its own latch.
    unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
    answer
}

// utils/timeout.h, not in pgrx's bindings; these signatures and
// STATEMENT_TIMEOUT's place in `TimeoutId` (the fourth) are the same in
// PostgreSQL 14 to 18.
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;

/// PostgreSQL's statement timeout, armed by hand: it is only armed for
/// statements from a client, never for SPI in a background worker. When
/// it fires, the next CHECK_FOR_INTERRUPTS raises "canceling statement due
/// to statement timeout" inside the subtransaction, which rolls it back.
struct Deadline(bool);

impl Deadline {
    fn arm(ms: i32) -> Deadline {
        if ms <= 0 {
            return Deadline(false);
        }
        // SAFETY: main thread; the STATEMENT_TIMEOUT handler was registered
        // by InitPostgres, as for every backend.
        unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| enable_timeout_after(STATEMENT_TIMEOUT, ms)) };
        Deadline(true)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        // SAFETY: main thread. disable_timeout does not raise an ERROR. If
        // the timer fired just as the check ended, its SIGINT has been
        // handled by now (the handler runs within the timer's): the cancel
        // it left pending is for the check that is over, and must not hit
        // the next statement.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            pg_sys::QueryCancelPending = 0;
        }
    }
}

/// Sets each setting for the rest of the (sub)transaction.
fn set_local(settings: &[(&str, String)]) -> SpiResult<()> {
    Spi::connect(|client| {
        for (name, value) in settings {
            client.select(
                "SELECT pg_catalog.set_config($1, $2, true)",
                None,
                &[(*name).into(), value.as_str().into()],
            )?;
        }
        Ok(())
    })
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
