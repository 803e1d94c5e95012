// `#[pg_test]`s: SQL-level behaviour in a cluster with the extension
// preloaded (see `pg_test::postgresql_conf_options`).



#[pg_test]
fn schema_exists() {
    let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_namespace WHERE nspname = 'realtime'");
    assert_eq!(n, Ok(Some(1)));
}

#[pg_test]
fn extension_lives_in_schema_realtime() {
    let schema = Spi::get_one::<String>(
        "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_realtime'",
    );
    assert_eq!(schema, Ok(Some("realtime".to_string())));
}

#[pg_test]
fn settings_and_defaults() {
    let setting = |name: &str| Spi::get_one::<String>(&format!("SELECT current_setting('{name}')")).unwrap().unwrap();
    // set by the test cluster's configuration
    assert_eq!(setting("pg_realtime.port"), "54399");
    assert_eq!(setting("pg_realtime.listen_addresses"), "127.0.0.1");
    // defaults
    assert_eq!(setting("pg_realtime.database"), "postgres");
    assert_eq!(setting("pg_realtime.publication"), "supabase_realtime");
    assert_eq!(setting("pg_realtime.max_connections"), "1000");
    assert_eq!(setting("pg_realtime.max_channels_per_connection"), "100");
    assert_eq!(setting("pg_realtime.jwt_secret"), "");
    assert_eq!(setting("pg_realtime.jwks"), "");
    assert_eq!(setting("pg_realtime.queue_size"), "16MB");
    assert_eq!(setting("pg_realtime.max_record_bytes"), "1MB");
}

#[pg_test]
fn settings_contexts() {
    let context = |name: &str| {
        Spi::get_one::<String>(&format!("SELECT context FROM pg_settings WHERE name = '{name}'")).unwrap().unwrap()
    };
    for name in ["pg_realtime.port", "pg_realtime.listen_addresses", "pg_realtime.database", "pg_realtime.queue_size"] {
        assert_eq!(context(name), "postmaster", "{name}");
    }
    for name in [
        "pg_realtime.jwt_secret",
        "pg_realtime.jwks",
        "pg_realtime.publication",
        "pg_realtime.max_connections",
        "pg_realtime.max_channels_per_connection",
        "pg_realtime.max_record_bytes",
    ] {
        assert_eq!(context(name), "sighup", "{name}");
    }
}

#[pg_test]
fn secrets_are_hidden_from_ordinary_roles() {
    Spi::run("CREATE ROLE realtime_test_reader LOGIN").unwrap();
    Spi::run("SET ROLE realtime_test_reader").unwrap();
    let visible = |names: &str| {
        Spi::get_one::<i64>(&format!("SELECT count(*) FROM pg_settings WHERE name IN ({names})")).unwrap().unwrap()
    };
    let secrets = visible("'pg_realtime.jwt_secret', 'pg_realtime.jwks'");
    let others = visible("'pg_realtime.port', 'pg_realtime.max_connections'");
    Spi::run("RESET ROLE").unwrap();
    assert_eq!(secrets, 0, "a non-superuser can see the JWT settings");
    assert_eq!(others, 2);
}

#[pg_test]
fn worker_registered_and_running() {
    assert_eq!(Spi::get_one::<bool>("SELECT realtime.preloaded()"), Ok(Some(true)));
    // The worker starts with the cluster; give it the time it needs to appear.
    let found = (0..100).any(|_| {
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_realtime'")
            .unwrap()
            .unwrap_or(0);
        if n == 0 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        n == 1
    });
    assert!(found, "no pg_realtime worker in pg_stat_activity");
}

#[pg_test]
fn stats_lists_the_counters() {
    let names = Spi::get_one::<Vec<String>>("SELECT array_agg(name ORDER BY name) FROM realtime.stats()")
        .unwrap()
        .unwrap();
    for expected in ["connections_open", "channels_joined", "malformed_frames", "oversized_frames", "network_panics"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[pg_test]
fn capture_objects_exist() {
    for object in [
        "SELECT 'realtime.capture_changes()'::regprocedure::text",
        "SELECT 'realtime.sync_captured_tables()'::regprocedure::text",
        "SELECT 'realtime.captured_tables'::regclass::text",
    ] {
        assert!(Spi::get_one::<String>(object).unwrap().is_some(), "{object}");
    }
    let triggers = Spi::get_one::<i64>("SELECT count(*) FROM pg_event_trigger WHERE evtname = 'pg_realtime_sync'");
    assert_eq!(triggers, Ok(Some(1)));
}

#[pg_test]
fn nobody_listens_to_a_fresh_table() {
    Spi::run("CREATE TABLE fresh (id int PRIMARY KEY)").unwrap();
    let interested = Spi::get_one::<bool>("SELECT realtime.interested('fresh'::regclass)");
    assert_eq!(interested, Ok(Some(false)));
}

/// The capture encoder writes dates and timestamps by hand for the years 1
/// to 9999: byte for byte what Postgres's own JSON encoding writes, over
/// edge values and a spread of pseudo-random ones (and Postgres's own
/// output beyond those years).
#[pg_test]
fn hand_written_dates_and_timestamps_match_postgres() {
    use crate::capture::encode::push_date_time;
    use std::ffi::CStr;
    let postgres = |typid: pg_sys::Oid, datum: pg_sys::Datum| -> Vec<u8> {
        let utc: std::ffi::c_int = 0;
        let tz = if typid == pg_sys::TIMESTAMPTZOID { &utc as *const _ } else { std::ptr::null() };
        // SAFETY: a valid value of the type; the text is palloc'd.
        let text = unsafe { CStr::from_ptr(pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), datum, typid, tz)) };
        let mut out = Vec::new();
        bgworker::shared::json::escape_into(&mut out, text.to_bytes());
        out
    };
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |low: i64, high: i64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        low + (seed % (high - low) as u64) as i64
    };
    const DAY: i64 = 86_400_000_000;
    let mut days: Vec<i64> = vec![0, -1, 1, 59, 60, -730_119, -730_120, 2_921_939, 2_921_940];
    days.extend([i64::from(i32::MIN), i64::from(i32::MAX)]); // -infinity, infinity
    days.extend((0..2000).map(|_| next(-731_000, 2_923_000)));
    let mut stamps: Vec<i64> = vec![0, 1, -1, 999_999, 1_000_000, DAY - 1, -DAY, 9194 * DAY + 36_672_345_000];
    stamps.extend([-730_119 * DAY, -730_119 * DAY - 1, 2_921_940 * DAY - 1, 2_921_940 * DAY, i64::MIN, i64::MAX]);
    stamps.extend((0..4000).map(|_| next(-731_000 * DAY, 2_923_000 * DAY)));
    stamps.extend((0..2000).map(|_| next(-1000 * DAY, 1000 * DAY) / 1000 * 1000)); // whole milliseconds
    let mut checked = 0;
    for (typid, values) in [
        (pg_sys::DATEOID, &days),
        (pg_sys::TIMESTAMPOID, &stamps),
        (pg_sys::TIMESTAMPTZOID, &stamps),
    ] {
        for &v in values {
            let datum = if typid == pg_sys::DATEOID {
                pg_sys::Datum::from(v as i32)
            } else {
                pg_sys::Datum::from(v)
            };
            let mut ours = Vec::new();
            // SAFETY: a value of the type.
            unsafe { push_date_time(&mut ours, typid, datum) };
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&postgres(typid, datum)),
                "type {typid:?}, value {v}"
            );
            checked += 1;
        }
    }
    assert!(checked > 14_000);
}
