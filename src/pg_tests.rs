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
