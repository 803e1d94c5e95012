//! Every `pg_realtime.*` setting. The names are a public contract: they are
//! documented in the README with their defaults and when they take effect.
//! The limits on what clients may ask are in `limits`.

mod limits;

pub use limits::{check_timeout_ms, max_payload_bytes};

use bgworker::server::jwt::Verifier;
use bgworker::server::Settings;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

pub static PORT: GucSetting<i32> = GucSetting::<i32>::new(4000);
pub static LISTEN_ADDRESSES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"localhost"));
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static JWT_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static JWKS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static JWT_AUDIENCE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PUBLICATION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"supabase_realtime"));
pub static MAX_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static MAX_CHANNELS_PER_CONNECTION: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static QUEUE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
pub static MAX_RECORD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static CAPTURE_IDLE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static RESTART_NOTICE_WINDOW_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Internal: on while `realtime.sync_captured_tables()` runs (see
/// `sql/capture.sql`). Superuser-only, so no role can make the sync skip.
pub static SYNCING: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static AUTHENTICATOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"authenticator"));

/// Registers the settings. Postmaster-context settings may only be created
/// while preloading (Postgres refuses them later), and mean nothing without
/// the worker anyway.
pub fn define(preloading: bool) {
    if preloading {
        define_postmaster();
    }
    define_tokens();
    define_serving();
    limits::define();
}

/// The settings fixed at server start: where the server listens, the ring's
/// size and the database served.
fn define_postmaster() {
    GucRegistry::define_int_guc(
        c"pg_realtime.port",
        c"TCP port the realtime WebSocket server listens on.",
        c"",
        &PORT,
        1,
        65535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_realtime.listen_addresses",
        c"Addresses the realtime WebSocket server listens on.",
        c"Same syntax as listen_addresses: a comma-separated list of host names or IP addresses, '*' for all, empty for none.",
        &LISTEN_ADDRESSES,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.queue_size",
        c"Shared memory for committed changes on their way to subscribers.",
        c"A commit never waits for it: when it is full, the changes are dropped and their subscribers told to refetch.",
        &QUEUE_SIZE_KB,
        64,
        4 * 1024 * 1024,
        GucContext::Postmaster,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_string_guc(
        c"pg_realtime.database",
        c"The database whose changes the realtime worker serves.",
        c"",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// How client tokens are verified and which roles they may act as.
fn define_tokens() {
    GucRegistry::define_string_guc(
        c"pg_realtime.jwt_secret",
        c"Secret that HS256/HS384/HS512 client tokens are signed with.",
        c"Never logged by pg_realtime; readable by superusers only.",
        &JWT_SECRET,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_realtime.jwks",
        c"JSON Web Key Set for RS*, PS*, ES* and EdDSA client tokens (found by kid).",
        c"A JSON document {\"keys\": [...]}, or a single JWK. Readable by superusers only.",
        &JWKS,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_realtime.jwt_audience",
        c"When set, a client token's aud claim must be (or contain) this.",
        c"",
        &JWT_AUDIENCE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_realtime.authenticator",
        c"Role whose memberships decide which roles a token may act as.",
        c"As with PostgREST: a token's role claim is honoured only if this role may SET ROLE to it (PostgreSQL 16 and later; a member of it before), and never for this role itself or a superuser.",
        &AUTHENTICATOR,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// What is captured and how much the server takes on: reloadable.
fn define_serving() {
    GucRegistry::define_bool_guc(
        c"pg_realtime.syncing",
        c"Internal: set while realtime.sync_captured_tables() runs.",
        c"Its own ALTER TABLE statements fire the event trigger that runs it; this tells that trigger to skip them.",
        &SYNCING,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_string_guc(
        c"pg_realtime.publication",
        c"Publication whose tables are captured for postgres_changes.",
        c"",
        &PUBLICATION,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.max_connections",
        c"WebSocket connections the realtime server accepts at once.",
        c"Further upgrades are refused with HTTP 429.",
        &MAX_CONNECTIONS,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.max_record_bytes",
        c"Largest postgres_changes record sent whole.",
        c"Larger records are sent with only their small fields and errors: [\"Error 413: Payload Too Large\"].",
        &MAX_RECORD_BYTES,
        1024,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.capture_idle_timeout",
        c"How long a captured table nobody subscribes to keeps its capture trigger on.",
        c"Then the realtime worker switches the trigger off, so writes to the table cost nothing, and on again before it answers a join that needs it. 0 keeps triggers on.",
        &CAPTURE_IDLE_TIMEOUT_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.restart_notice_window",
        c"For how long after the realtime worker starts a postgres_changes join is told to refetch.",
        c"Changes committed while the worker was down were not delivered, and a client cannot resume: joins in this window get a system message, after SUBSCRIBED, naming the start time. 0 sends none.",
        &RESTART_NOTICE_WINDOW_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.max_channels_per_connection",
        c"Channels one WebSocket connection may join.",
        c"",
        &MAX_CHANNELS_PER_CONNECTION,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting.get().map(|s| s.to_string_lossy().into_owned())
}

pub fn port() -> u16 {
    PORT.get() as u16
}

pub fn listen_addresses() -> String {
    text(&LISTEN_ADDRESSES).unwrap_or_default()
}

/// `pg_realtime.queue_size` in bytes.
pub fn queue_size_bytes() -> usize {
    QUEUE_SIZE_KB.get() as usize * 1024
}

pub fn max_record_bytes() -> usize {
    MAX_RECORD_BYTES.get() as usize
}

/// `pg_realtime.capture_idle_timeout`; None: triggers stay on.
pub fn capture_idle_timeout() -> Option<std::time::Duration> {
    let seconds = CAPTURE_IDLE_TIMEOUT_S.get();
    (seconds > 0).then(|| std::time::Duration::from_secs(seconds as u64))
}

pub fn publication() -> String {
    text(&PUBLICATION).unwrap_or_else(|| "supabase_realtime".into())
}

/// `pg_realtime.authenticator`.
pub fn authenticator() -> String {
    text(&AUTHENTICATOR).unwrap_or_else(|| "authenticator".into())
}

pub fn database() -> String {
    text(&DATABASE).unwrap_or_else(|| "postgres".into())
}

/// The server settings as configured now. A JWKS that does not parse is
/// reported and left out (tokens that need it are refused); the HMAC secret
/// still applies.
pub fn server_settings() -> (Settings, Option<String>) {
    let secret = text(&JWT_SECRET);
    let jwks = text(&JWKS);
    let (verifier, problem) = match Verifier::new(secret.as_deref(), jwks.as_deref()) {
        Ok(v) => (v, None),
        Err(e) => (
            Verifier::new(secret.as_deref(), None).unwrap_or_default(),
            Some(e.to_string()),
        ),
    };
    let verifier = verifier.with_audience(text(&JWT_AUDIENCE).as_deref());
    let settings = Settings {
        verifier,
        max_connections: MAX_CONNECTIONS.get() as usize,
        max_channels_per_connection: MAX_CHANNELS_PER_CONNECTION.get() as usize,
        limits: limits::limits(),
        restart_notice_window: std::time::Duration::from_secs(RESTART_NOTICE_WINDOW_S.get().max(0) as u64),
    };
    (settings, problem)
}
