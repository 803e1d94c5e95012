//! Everything SQL can call, in schema `realtime`.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

mod broadcast;

/// Whether pg_realtime was loaded through `shared_preload_libraries`, so
/// that its worker and shared memory exist.
#[pg_extern]
fn preloaded() -> bool {
    crate::preloaded()
}

/// The WebSocket server's counters (connections, channels, malformed and
/// oversized frames, ...), as `(name, value)` rows.
#[pg_extern]
fn stats() -> TableIterator<'static, (name!(name, String), name!(value, i64))> {
    if !crate::preloaded() {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_realtime is not running",
            "realtime.stats",
        )
        .set_hint("Add pg_realtime to shared_preload_libraries and restart PostgreSQL.")
        .report(PgLogLevel::ERROR);
    }
    let rows = crate::shmem::counters()
        .snapshot()
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value as i64))
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

// realtime.messages and realtime.topic(), for private channels.
extension_sql_file!("../../sql/messages.sql", name = "messages_sql");

// The install script warns when the extension cannot run as installed.
extension_sql!(
    r#"
DO $$
BEGIN
  IF NOT realtime.preloaded() THEN
    RAISE WARNING 'pg_realtime is installed but realtime is not running: the library is not in shared_preload_libraries'
      USING HINT = 'Add pg_realtime to shared_preload_libraries in postgresql.conf (or ALTER SYSTEM SET shared_preload_libraries = ''pg_realtime'') and restart PostgreSQL.';
  ELSIF current_database() <> current_setting('pg_realtime.database') THEN
    RAISE WARNING 'pg_realtime serves database "%", not this one ("%")', current_setting('pg_realtime.database'), current_database()
      USING HINT = 'Set pg_realtime.database in postgresql.conf and restart PostgreSQL to serve this database.';
  END IF;
END
$$;
"#,
    name = "warn_if_not_running",
    requires = [preloaded],
);
