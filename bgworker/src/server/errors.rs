//! Why the main thread could not do what a connection asked: subscribe a
//! channel's `postgres_changes` bindings ([`SubscribeError`]) or check a
//! private channel ([`AuthorizeError`]). Each is what the client reads in
//! its `system` message or join reply, worded as Supabase Realtime words
//! it where it has such a message (`docs/protocol.md`).

use crate::changes::filter::FilterError;
use crate::server::join::PostgresChangesBinding;
use crate::server::jwt::AuthError;
use std::fmt;
use thiserror::Error;

/// What the client hears when the main thread cannot answer.
/// The restart notice (`Context::restart_notice`) for a server that
/// started at `started_us` (microseconds since the Unix epoch).
pub fn restarted(started_us: i64) -> String {
    format!(
        "The realtime server started at {}: changes committed while it was down may not have been delivered; \
         refetch to catch up",
        crate::changes::event::commit_timestamp(started_us)
    )
}

pub const NO_DATABASE: &str = "Realtime was unable to connect to the project database";

/// A binding's parameters as Supabase lists them in its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params(String);

impl Params {
    pub fn of(b: &PostgresChangesBinding) -> Params {
        Params(format!(
            "[event: {}, schema: {}, table: {}, filters: [{}], select: nil]",
            b.event,
            b.schema.as_deref().unwrap_or("nil"),
            b.table.as_deref().unwrap_or("nil"),
            b.filter.as_deref().unwrap_or("")
        ))
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a token's role claim is not honoured.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
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

/// What is wrong with one binding, after Supabase's "Exception:".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BindingProblem {
    #[error("filters need an explicit table")]
    FilterWithoutTable,
    #[error("relation \"{schema}.{table}\" does not exist")]
    NoSuchTable { schema: String, table: String },
    #[error("permission denied: role \"{role}\" cannot SELECT from \"{schema}.{table}\"")]
    CannotSelect {
        role: String,
        schema: String,
        table: String,
    },
    #[error("invalid column for filter {0}")]
    NoSuchColumn(String),
    #[error("permission denied: role \"{role}\" cannot SELECT column {column} of \"{table}\"")]
    CannotSelectColumn {
        role: String,
        column: String,
        table: String,
    },
    #[error("filter on {column} of type {typname}: only eq, neq and in are supported")]
    NotOrdered { column: String, typname: String },
    #[error("invalid value for filter {column}: {why}")]
    InvalidValue { column: String, why: String },
}

/// A join's bindings asking more of the main thread than one join may
/// (`pg_realtime.max_*`, README "Limits").
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OverLimit {
    #[error("{count} postgres_changes bindings in one join, more than pg_realtime.max_bindings_per_join ({max})")]
    Bindings { count: usize, max: usize },
    #[error("a filter of {bytes} bytes, more than pg_realtime.max_filter_bytes ({max})")]
    FilterBytes { bytes: usize, max: usize },
    #[error("a filter of {count} conditions, more than pg_realtime.max_filter_conditions ({max})")]
    FilterConditions { count: usize, max: usize },
    #[error("{count} filter conditions in one join, more than pg_realtime.max_conditions_per_join ({max})")]
    JoinConditions { count: usize, max: usize },
}

/// Why a channel's `postgres_changes` subscription is not in place.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubscribeError {
    #[error("No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {0}")]
    NoTarget(Params),
    #[error(
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given \
         connect parameters: {0}"
    )]
    NotPublished(Params),
    #[error(
        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect \
         parameters: {params}. Exception: {problem}"
    )]
    Invalid { params: Params, problem: BindingProblem },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Role(#[from] RoleRefusal),
    #[error("Unable to subscribe to changes with given parameters: {0}")]
    OverLimit(#[from] OverLimit),
    /// The catalog could not be read, or the casts as the subscriber failed
    /// as a whole (the reason, for the client).
    #[error("Realtime was unable to check the subscription: {0}")]
    Unchecked(String),
    /// An ERROR raised while checking (a column dropped meanwhile, say):
    /// its message as PostgreSQL wrote it.
    #[error("{0}")]
    Postgres(String),
    #[error(
        "Unable to subscribe to changes: capture could not be switched on within {secs} s for {busy}. Retry later."
    )]
    CaptureOff { secs: u64, busy: String },
    #[error("Timed out after {0}ms waiting for the postgres_changes subscription")]
    TimedOut(u128),
    #[error("postgres_changes is not available: the server runs without a database")]
    NoWorker,
    #[error("{}", NO_DATABASE)]
    NoDatabase,
}

/// Why a join is refused before anything is asked of the main thread:
/// the reply's `reason`.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum JoinRefusal {
    #[error("TopicNameRequired: You must provide a topic name")]
    TopicNameRequired,
    #[error("ChannelRateLimitReached: Too many channels")]
    TooManyChannels,
    #[error("ClientJoinRateLimitReached: Too many joins per second")]
    TooManyJoins,
    #[error("UnableToReplayMessages: Replay is not allowed for public channels")]
    ReplayOnPublic,
    /// The join's `access_token` was refused.
    #[error("{}", .0.join_reason())]
    Token(#[from] AuthError),
}

/// Why a private channel's permissions are not known.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Role(#[from] RoleRefusal),
    /// Its checks are refused for now (`shared::quarantine`): why.
    #[error("Realtime could not check this channel's permissions: {0}")]
    Refused(String),
    #[error("Query was cancelled, please try again")]
    TimedOut,
    #[error("{}", NO_DATABASE)]
    NoDatabase,
}

/// How a question to the main thread can fail on the way, whatever it
/// asked (`connection::asks`).
pub trait AskError: Send + 'static {
    /// No answer within `Options::ask_timeout`.
    fn timed_out(ms: u128) -> Self;
    /// The main thread is gone, or dropped the question.
    fn no_database() -> Self;
    /// The server runs without a worker (unit tests of the protocol).
    fn no_worker() -> Self;
}

impl AskError for SubscribeError {
    fn timed_out(ms: u128) -> Self {
        SubscribeError::TimedOut(ms)
    }
    fn no_database() -> Self {
        SubscribeError::NoDatabase
    }
    fn no_worker() -> Self {
        SubscribeError::NoWorker
    }
}

impl AskError for AuthorizeError {
    fn timed_out(_: u128) -> Self {
        AuthorizeError::TimedOut
    }
    fn no_database() -> Self {
        AuthorizeError::NoDatabase
    }
    fn no_worker() -> Self {
        AuthorizeError::NoDatabase
    }
}

#[cfg(test)]
mod tests;
