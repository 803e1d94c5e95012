//! postgres_changes end to end: capture, transaction semantics, ordering,
//! overflow, filters, publication sync and refusals, on real clusters with
//! raw WebSocket clients (exact frames) — the seed-app suites with
//! supabase-js are in `seed_app.rs`.

use pg_realtime_e2e::client::{Client, Joined};
use pg_realtime_e2e::runner::{self, Test};
use pg_realtime_e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

struct Ctx {
    c: Cluster,
    rt: tokio::runtime::Runtime,
}

const SETUP: &str = r#"
CREATE EXTENSION pg_realtime;
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE outsider NOLOGIN;
CREATE ROLE admin_bypass NOLOGIN BYPASSRLS;
CREATE TABLE items (
  id bigserial PRIMARY KEY, n int, price numeric, name text, u uuid, flag bool, d date,
  ts timestamptz, doc jsonb, tags text[], blob bytea, note text);
CREATE TABLE quiet (id bigserial PRIMARY KEY, n int);
CREATE TABLE counter (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO counter VALUES (1, 0);
CREATE TABLE late_rows (id int PRIMARY KEY, v int NOT NULL);
CREATE TABLE secret_rows (id bigserial PRIMARY KEY, owner text, team text);
ALTER TABLE secret_rows ENABLE ROW LEVEL SECURITY;
ALTER TABLE secret_rows REPLICA IDENTITY FULL;
-- yours (the sub claim), or your team's (a custom claim), never 'hidden'
CREATE POLICY own ON secret_rows FOR SELECT USING (owner = current_setting('request.jwt.claim.sub', true));
CREATE POLICY team ON secret_rows FOR SELECT
  USING (team = current_setting('request.jwt.claims', true)::jsonb ->> 'team');
CREATE POLICY not_hidden ON secret_rows AS RESTRICTIVE FOR SELECT USING (owner <> 'hidden');
-- column privileges: no SELECT on `secret`; and a table whose key is hidden
CREATE TABLE partial (id bigserial PRIMARY KEY, shown text, secret text);
CREATE TABLE keyless_view (id bigserial PRIMARY KEY, shown text);
-- a policy that reads another table; owned by a role that is not superuser
CREATE ROLE post_owner NOLOGIN;
-- the roles tokens may act as (pg_realtime.authenticator)
CREATE ROLE authenticator NOINHERIT LOGIN;
GRANT authenticated, outsider, admin_bypass, post_owner TO authenticator;
CREATE TABLE teams (member text, team text);
CREATE TABLE team_posts (id bigserial PRIMARY KEY, team text, body text);
ALTER TABLE team_posts ENABLE ROW LEVEL SECURITY;
ALTER TABLE team_posts REPLICA IDENTITY FULL;
ALTER TABLE team_posts OWNER TO post_owner;
CREATE POLICY members ON team_posts FOR SELECT USING (EXISTS (
  SELECT 1 FROM teams WHERE teams.team = team_posts.team
  AND teams.member = current_setting('request.jwt.claim.sub', true)));
GRANT SELECT ON teams, team_posts TO authenticated;
CREATE TABLE unpublished (id bigserial PRIMARY KEY);
CREATE TABLE keyed (id int PRIMARY KEY, owner int, tag text);
CREATE TABLE keyed_late (id int PRIMARY KEY, owner int);
-- published, and nobody ever subscribes to it
CREATE TABLE unwatched (id int PRIMARY KEY);
GRANT SELECT ON items, quiet, counter, late_rows, secret_rows, unpublished, keyed, keyed_late TO authenticated, admin_bypass;
GRANT SELECT (id, shown) ON partial TO authenticated;
GRANT SELECT (shown) ON keyless_view TO authenticated;
CREATE PUBLICATION supabase_realtime FOR TABLE items, quiet, counter, late_rows, secret_rows, partial, keyless_view,
  team_posts, keyed, keyed_late, unwatched;
"#;

fn main() {
    let c = Cluster::start_with(ClusterConfig {
        // Triggers stay on here, whatever the suite's length: switching them
        // off has its own test and cluster.
        settings: vec![
            "max_prepared_transactions = 5".into(),
            "pg_realtime.capture_idle_timeout = 0".into(),
        ],
        ..ClusterConfig::default()
    });
    c.psql(SETUP);
    c.wait_for_websocket(Duration::from_secs(10));
    let rt = runtime();
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        no_encoding_work_without_subscribers,
        rows_no_filter_wants_are_dropped_by_the_trigger,
        insert_update_delete_with_typed_values,
        rollback_and_savepoint_rollback_are_never_delivered,
        prepare_transaction_with_captured_changes_fails,
        rows_applied_as_a_replica_are_captured,
        an_update_that_reveals_a_row_keeps_its_old_values_hidden,
        commit_order_across_concurrent_sessions,
        ten_thousand_row_transaction_complete_and_in_order,
        every_filter_operator_per_type,
        delete_is_filtered_on_the_old_row,
        event_kinds_and_schema_wildcards,
        bad_bindings_are_refused_and_the_socket_stays,
        row_level_security_decides_each_delivery,
        column_privileges_hide_columns,
        policies_reading_other_tables_see_them_at_check_time,
        a_table_reshaped_between_deliveries_is_checked_in_its_new_shape,
        bad_channel_tokens_get_nothing,
        expiry_closes_the_channel,
        partitioned_tables_are_reported_under_their_name,
        token_refresh_switches_the_identity,
        records_over_max_record_bytes_keep_small_fields,
        overflow_is_signalled,
        writes_before_a_join_that_commit_after_it_are_signalled,
        writes_for_a_key_before_its_join_that_commit_after_it_are_signalled,
        publication_sync_for_each_ddl_form,
        idle_tables_have_capture_switched_off_until_a_join,
        a_truncate_is_told_at_commit_in_commit_order,
        joins_after_a_worker_restart_are_told_to_refetch,
        a_stuck_committer_holds_back_only_a_ring_of_changes,
    ];
    runner::run(Ctx { c, rt }, tests);
}

fn user() -> String {
    token("authenticated", 3600)
}

async fn subscriber(ctx: &Ctx, topic: &str, bindings: Value) -> (Client, Joined) {
    subscriber_at(ctx.c.ws_port, topic, bindings).await
}

/// A new client on the cluster serving WebSockets at `ws_port`, joined to
/// `topic` with these bindings; asserts the join and the subscription.
async fn subscriber_at(ws_port: u16, topic: &str, bindings: Value) -> (Client, Joined) {
    let tok = user();
    let mut client = Client::connect(ws_port, &tok).await;
    let joined = client.join(topic, bindings, &tok).await;
    assert_eq!(joined.reply[4]["status"], "ok", "{}", joined.reply);
    let system = joined.system.clone().unwrap();
    assert_eq!(system[4]["status"], "ok", "subscription failed: {system}");
    (client, joined)
}

fn record(event: &Value) -> &Value {
    &event[4]["data"]["record"]
}

fn no_encoding_work_without_subscribers(ctx: &Ctx) {
    let before = ctx.c.stat("rows_captured");
    ctx.c
        .psql("INSERT INTO quiet (n) SELECT g FROM generate_series(1, 500) g");
    assert_eq!(
        ctx.c.stat("rows_captured"),
        before,
        "rows were encoded with nobody listening"
    );
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "quiet",
            json!([{"event": "*", "schema": "public", "table": "quiet"}]),
        )
        .await;
        ctx.c
            .psql("INSERT INTO quiet (n) SELECT g FROM generate_series(1, 20) g");
        assert_eq!(client.events(20).await.len(), 20);
    });
    assert_eq!(ctx.c.stat("rows_captured"), before + 20);
}

/// When every binding on a table has an equality filter on one column,
/// the capture trigger drops the rows whose value no binding wants (they
/// are counted, not encoded, never published); the rest arrive as ever,
/// UPDATEs judged on the new row and DELETEs on the old one.
fn rows_no_filter_wants_are_dropped_by_the_trigger(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let (mut ones, _) = subscriber(
            ctx,
            "ones",
            json!([{"event": "*", "schema": "public", "table": "keyed", "filter": "owner=eq.1"}]),
        )
        .await;
        let (mut twos, _) = subscriber(
            ctx,
            "twos",
            json!([{"event": "INSERT", "schema": "public", "table": "keyed", "filter": "owner=eq.2"}]),
        )
        .await;
        let (filtered, captured) = (ctx.c.stat("rows_filtered_out"), ctx.c.stat("rows_captured"));
        // owners 0..9, ten rows each; and one without an owner
        ctx.c.psql(
            "INSERT INTO keyed SELECT g, g % 10, 'x' FROM generate_series(1, 100) g; \
             INSERT INTO keyed VALUES (101, NULL, 'none')",
        );
        assert_eq!(
            ctx.c.stat("rows_filtered_out") - filtered,
            81,
            "owners 0 and 3..9, and NULL"
        );
        assert_eq!(ctx.c.stat("rows_captured") - captured, 20, "owners 1 and 2");
        // 3 moves to owner 1 (wanted), 1 moves away from it (not: filters
        // look at the new row); 11 (owner 1) and 12 (owner 2) are deleted
        ctx.c.psql(
            "UPDATE keyed SET owner = 1 WHERE id = 3; UPDATE keyed SET owner = 5 WHERE id = 1; \
             DELETE FROM keyed WHERE id IN (11, 12); INSERT INTO keyed VALUES (200, 1, 'last')",
        );
        assert_eq!(ctx.c.stat("rows_filtered_out") - filtered, 82);
        assert_eq!(
            ctx.c.stat("rows_captured") - captured,
            24,
            "+ update, 2 deletes, insert"
        );
        let got: Vec<(String, Value)> = ones
            .events(13)
            .await
            .iter()
            .map(|e| {
                let data = &e[4]["data"];
                let row = if data["type"] == "DELETE" {
                    &data["old_record"]
                } else {
                    &data["record"]
                };
                (data["type"].as_str().unwrap().to_string(), row["id"].clone())
            })
            .collect();
        let mut expected: Vec<(String, Value)> = (0..10).map(|k| ("INSERT".to_string(), json!(1 + 10 * k))).collect();
        expected.extend([
            ("UPDATE".to_string(), json!(3)),
            ("DELETE".to_string(), json!(11)),
            ("INSERT".to_string(), json!(200)),
        ]);
        // (in commit order, so an event for the update of 1 or the delete
        // of 12 would come before 200's)
        assert_eq!(got, expected);
        let ids: Vec<Value> = twos.events(10).await.iter().map(|e| record(e)["id"].clone()).collect();
        assert_eq!(ids, (0..10).map(|k| json!(2 + 10 * k)).collect::<Vec<_>>());
    });
}

fn insert_update_delete_with_typed_values(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let (mut client, joined) =
            subscriber(ctx, "items", json!([{"event": "*", "schema": "public", "table": "items"}])).await;
        // the reply echoes the entry with an id
        assert_eq!(joined.reply[4]["response"]["postgres_changes"][0]["table"], "items");
        ctx.c.psql(
            "SET TIME ZONE 'Europe/Paris'; INSERT INTO items (id, n, price, name, u, flag, d, ts, doc, tags, blob) VALUES \
             (1001, 42, 12.50, 'mug', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', true, '2025-03-04', '2025-03-04 11:11:12.345+01', \
              '{\"k\": [1, {\"x\": null}]}', '{a,\"b c\"}', '\\xdeadbeef')",
        );
        let insert = client.event().await;
        assert_eq!(insert[0], Value::Null);
        assert_eq!(insert[4]["ids"], json!([joined.ids[0]]));
        let data = &insert[4]["data"];
        assert_eq!(data["type"], "INSERT");
        assert_eq!((data["schema"].as_str(), data["table"].as_str()), (Some("public"), Some("items")));
        assert_eq!(data["errors"], Value::Null);
        assert!(data.get("old_record").is_none());
        let ts = data["commit_timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        let r = &data["record"];
        assert_eq!(r["id"], 1001);
        assert_eq!(r["n"], 42);
        // numbers go out as Postgres wrote them
        assert!(client.last_text.contains(r#""price":12.50"#), "{}", client.last_text);
        assert_eq!(r["name"], "mug");
        assert_eq!(r["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert_eq!(r["flag"], true);
        assert_eq!(r["d"], "2025-03-04");
        // the writer's TimeZone does not leak: UTC
        assert_eq!(r["ts"], "2025-03-04T10:11:12.345+00:00");
        assert_eq!(r["doc"], json!({"k": [1, {"x": null}]}));
        assert_eq!(r["tags"], json!(["a", "b c"]));
        assert_eq!(r["blob"], "deadbeef");
        assert_eq!(r["note"], Value::Null);
        let columns = data["columns"].as_array().unwrap();
        assert_eq!(columns[0], json!({"name": "id", "type": "int8"}));
        assert_eq!(columns[9], json!({"name": "tags", "type": "_text"}));

        // however long
        let long = "12345678901234567890.123456789012345678901";
        ctx.c.psql(&format!("UPDATE items SET price = {long} WHERE id = 1001"));
        client.event().await;
        assert!(client.last_text.contains(&format!(r#""price":{long}"#)), "{}", client.last_text);

        // UPDATE: record and the primary key as old_record
        ctx.c.psql("UPDATE items SET name = 'cup' WHERE id = 1001");
        let update = client.event().await;
        assert_eq!(update[4]["data"]["type"], "UPDATE");
        assert_eq!(record(&update)["name"], "cup");
        assert_eq!(update[4]["data"]["old_record"], json!({"id": 1001}));

        // a TOASTed value, unchanged by an UPDATE, is still in the record
        let long = "x".repeat(100_000);
        ctx.c.psql(&format!("UPDATE items SET note = '{long}' WHERE id = 1001"));
        assert_eq!(record(&client.event().await)["note"].as_str().unwrap().len(), 100_000);
        ctx.c.psql("UPDATE items SET n = 43 WHERE id = 1001");
        let r = client.event().await;
        assert_eq!(record(&r)["n"], 43);
        assert_eq!(record(&r)["note"].as_str().unwrap().len(), 100_000);

        // REPLICA IDENTITY FULL: the whole old row
        ctx.c.psql("ALTER TABLE items REPLICA IDENTITY FULL; UPDATE items SET n = 44 WHERE id = 1001; ALTER TABLE items REPLICA IDENTITY DEFAULT");
        let full = client.event().await;
        assert_eq!(full[4]["data"]["old_record"]["n"], 43);
        assert_eq!(full[4]["data"]["old_record"]["name"], "cup");

        ctx.c.psql("DELETE FROM items WHERE id = 1001");
        let delete = client.event().await;
        assert_eq!(delete[4]["data"]["type"], "DELETE");
        assert!(delete[4]["data"].get("record").is_none());
        assert_eq!(delete[4]["data"]["old_record"], json!({"id": 1001}));
    });
}

fn rollback_and_savepoint_rollback_are_never_delivered(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "tx",
            json!([{"event": "INSERT", "schema": "public", "table": "quiet"}]),
        )
        .await;
        ctx.c.psql("BEGIN; INSERT INTO quiet (n) VALUES (-1); ROLLBACK;");
        ctx.c.psql(
            "BEGIN; INSERT INTO quiet (n) VALUES (-2); SAVEPOINT a; INSERT INTO quiet (n) VALUES (-3); \
             SAVEPOINT b; INSERT INTO quiet (n) VALUES (-4); ROLLBACK TO a; INSERT INTO quiet (n) VALUES (-5); \
             SAVEPOINT c; INSERT INTO quiet (n) VALUES (-6); RELEASE c; INSERT INTO quiet (n) VALUES (-10); \
             SAVEPOINT d; INSERT INTO quiet (n) VALUES (-9); ROLLBACK TO d; COMMIT;",
        );
        // an error aborts the transaction and everything it captured
        let failed = ctx
            .c
            .psql_output("BEGIN; INSERT INTO quiet (n) VALUES (-7); SELECT 1/0; COMMIT;");
        assert!(!failed.status.success());
        ctx.c.psql("INSERT INTO quiet (n) VALUES (-8)");
        let got: Vec<Value> = client.events(5).await.iter().map(|e| record(e)["n"].clone()).collect();
        // -1 rolled back, -3/-4 and -9 in rolled-back savepoints (-9's after
        // a released one), -7 aborted
        assert_eq!(got, vec![json!(-2), json!(-5), json!(-6), json!(-10), json!(-8)]);
    });
}

fn prepare_transaction_with_captured_changes_fails(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "2pc",
            json!([{"event": "*", "schema": "public", "table": "quiet"}]),
        )
        .await;
        let out = ctx
            .c
            .psql_output("BEGIN; INSERT INTO quiet (n) VALUES (-100); PREPARE TRANSACTION 'rt';");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot PREPARE a transaction that changed tables captured by pg_realtime or sent"),
            "{stderr}"
        );
        assert_eq!(ctx.c.psql("SELECT count(*) FROM pg_prepared_xacts"), "0");
        assert_eq!(ctx.c.psql("SELECT count(*) FROM quiet WHERE n = -100"), "0");
        // the session and later transactions are unaffected
        ctx.c.psql("INSERT INTO quiet (n) VALUES (-101)");
        assert_eq!(record(&client.event().await)["n"], -101);
        // also when a key filter dropped the row: a subscriber for its key
        // joining before COMMIT PREPARED would never hear of it
        let (_keyed, _) = subscriber(
            ctx,
            "2pc-keyed",
            json!([{"event": "*", "schema": "public", "table": "keyed", "filter": "owner=eq.1"}]),
        )
        .await;
        let dropped = ctx.c.stat("rows_filtered_out");
        let out = ctx
            .c
            .psql_output("BEGIN; INSERT INTO keyed VALUES (-1, 99, 'x'); PREPARE TRANSACTION 'rt2';");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot PREPARE a transaction"), "{stderr}");
        assert_eq!(
            ctx.c.stat("rows_filtered_out"),
            dropped + 1,
            "the key filter dropped the row"
        );
        assert_eq!(ctx.c.psql("SELECT count(*) FROM pg_prepared_xacts"), "0");
        assert_eq!(ctx.c.psql("SELECT count(*) FROM keyed WHERE id = -1"), "0");
    });
    // and when nobody listened to the table: someone may join before
    // COMMIT PREPARED, and nothing would tell them
    assert_eq!(ctx.c.psql("SELECT realtime.interested('unwatched'::regclass)"), "f");
    let out = ctx
        .c
        .psql_output("BEGIN; INSERT INTO unwatched VALUES (1); PREPARE TRANSACTION 'rt3';");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot PREPARE a transaction"), "{stderr}");
    assert_eq!(ctx.c.psql("SELECT count(*) FROM pg_prepared_xacts"), "0");
    // tables nobody captures can still use two-phase commit
    ctx.c
        .psql("BEGIN; INSERT INTO unpublished DEFAULT VALUES; PREPARE TRANSACTION 'ok';");
    ctx.c.psql("COMMIT PREPARED 'ok'");
    // a replica session (a two_phase subscription's apply worker) too: a
    // loss announced at PREPARE would come before the commit
    let out = ctx.c.psql_output(
        "SET session_replication_role = replica;
         BEGIN; INSERT INTO quiet (n) VALUES (-102); PREPARE TRANSACTION 'replicated';",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot PREPARE a transaction"), "{stderr}");
    assert_eq!(ctx.c.psql("SELECT count(*) FROM pg_prepared_xacts"), "0");
}

/// The capture triggers fire ALWAYS: rows a logical replication apply
/// worker writes (session_replication_role = replica) reach subscribers,
/// so a pg_realtime on a subscriber database serves what its publisher
/// sends.
fn rows_applied_as_a_replica_are_captured(ctx: &Ctx) {
    assert_eq!(
        ctx.c.psql(
            "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'quiet'::regclass AND tgname = 'pg_realtime_capture'"
        ),
        "A"
    );
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "replica",
            json!([{"event": "INSERT", "schema": "public", "table": "quiet"}]),
        )
        .await;
        ctx.c
            .psql("SET session_replication_role = replica; INSERT INTO quiet (n) VALUES (-300)");
        assert_eq!(record(&client.event().await)["n"], -300);
    });
}

fn commit_order_across_concurrent_sessions(ctx: &Ctx) {
    const SESSIONS: usize = 4;
    const EACH: usize = 250;
    // The race this pins (a transaction seen committed by a later one before
    // it has published) is narrow: several rounds give it room to show.
    const ROUNDS: usize = 3;
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "order",
            json!([{"event": "UPDATE", "schema": "public", "table": "counter"}]),
        )
        .await;
        for _ in 0..ROUNDS {
            let start: i64 = ctx.c.psql("SELECT v FROM counter WHERE id = 1").parse().unwrap();
            // Sessions race to increment one row: the row lock serialises
            // them, so commit order is the order of the values.
            let script = "UPDATE counter SET v = v + 1 WHERE id = 1;\n".repeat(EACH);
            let writers: Vec<_> = (0..SESSIONS)
                .map(|_| {
                    let (dir, port, script) = (ctx.c.dir.clone(), ctx.c.port, script.clone());
                    std::thread::spawn(move || psql_script(&dir, port, &script))
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            let values: Vec<i64> = client
                .events(SESSIONS * EACH)
                .await
                .iter()
                .map(|e| record(e)["v"].as_i64().unwrap())
                .collect();
            let expected: Vec<i64> = (start + 1..=start + (SESSIONS * EACH) as i64).collect();
            assert_eq!(values, expected);
        }
    });
}

/// Runs a script through psql as the cluster owner.
fn psql_script(dir: &std::path::Path, port: u16, script: &str) {
    use std::io::Write;
    let psql = std::path::PathBuf::from(
        String::from_utf8(
            std::process::Command::new(pg_config())
                .arg("--bindir")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim(),
    )
    .join("psql");
    let mut cmd = if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(psql);
        c
    } else {
        std::process::Command::new(psql)
    };
    let mut child = cmd
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(dir)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

fn ten_thousand_row_transaction_complete_and_in_order(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "bulk",
            json!([{"event": "INSERT", "schema": "public", "table": "quiet"}]),
        )
        .await;
        ctx.c
            .psql("INSERT INTO quiet (n) SELECT g FROM generate_series(1, 10000) g ORDER BY g");
        let events = client.events(10_000).await;
        let ns: Vec<i64> = events.iter().map(|e| record(e)["n"].as_i64().unwrap()).collect();
        assert_eq!(ns, (1..=10_000).collect::<Vec<_>>());
        // one transaction: one commit timestamp
        let first = &events[0][4]["data"]["commit_timestamp"];
        assert!(events.iter().all(|e| &e[4]["data"]["commit_timestamp"] == first));
    });
}

fn every_filter_operator_per_type(ctx: &Ctx) {
    // Each channel has the filtered binding and an unfiltered one, so every
    // row reaches it and the ids show whether the filter matched.
    type Expect = fn(&Value) -> bool;
    let filters: Vec<(&str, Expect)> = vec![
        ("n=eq.5", |r| r["n"] == 5),
        ("n=neq.5", |r| !r["n"].is_null() && r["n"] != 5),
        ("n=lt.5", |r| r["n"].as_i64().is_some_and(|n| n < 5)),
        ("n=lte.5", |r| r["n"].as_i64().is_some_and(|n| n <= 5)),
        ("n=gt.5", |r| r["n"].as_i64().is_some_and(|n| n > 5)),
        ("n=gte.5", |r| r["n"].as_i64().is_some_and(|n| n >= 5)),
        ("n=in.(1,5,9)", |r| [1, 5, 9].iter().any(|v| r["n"] == *v)),
        ("n=not.eq.5", |r| !r["n"].is_null() && r["n"] != 5),
        ("n=not.in.(1,5)", |r| r["n"].as_i64().is_some_and(|n| n != 1 && n != 5)),
        ("price=gt.10.5", |r| r["price"].as_f64().is_some_and(|p| p > 10.5)),
        ("price=eq.10", |r| r["price"].as_f64() == Some(10.0)),
        ("name=eq.b", |r| r["name"] == "b"),
        ("name=lt.b", |r| r["name"].as_str().is_some_and(|s| s < "b")),
        ("name=in.(a,\"c,d\")", |r| r["name"] == "a" || r["name"] == "c,d"),
        ("u=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", |r| {
            r["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        }),
        ("flag=eq.true", |r| r["flag"] == true),
        ("flag=neq.true", |r| r["flag"] == false),
        ("d=lt.2025-06-01", |r| r["d"].as_str().is_some_and(|d| d < "2025-06-01")),
        ("d=gte.2025-06-01", |r| {
            r["d"].as_str().is_some_and(|d| d >= "2025-06-01")
        }),
        ("ts=gte.2025-01-01T12:00:00+02:00", |r| {
            r["ts"].as_str().is_some_and(|t| t >= "2025-01-01T10:00:00")
        }),
        ("ts=lt.2025-01-01 10:00:00+00", |r| {
            r["ts"].as_str().is_some_and(|t| t < "2025-01-01T10:00:00")
        }),
        ("n=gt.2,name=neq.b", |r| {
            r["n"].as_i64().is_some_and(|n| n > 2) && r["name"] != "b" && !r["name"].is_null()
        }),
    ];
    let rows = "(1, 1, 'a', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, '2025-01-01', '2025-01-01 09:59:59+00'),\
                (5, 10, 'b', '00000000-0000-0000-0000-000000000000', false, '2025-06-01', '2025-01-01 10:00:00+00'),\
                (9, 10.75, 'c,d', NULL, true, '2025-12-31', '2025-01-01 13:00:00+02'),\
                (7, 2, 'B', NULL, NULL, NULL, NULL),\
                (NULL, NULL, NULL, NULL, NULL, NULL, NULL)";
    ctx.rt.block_on(async {
        let tok = user();
        let mut client = Client::connect(ctx.c.ws_port, &tok).await;
        let mut channels = Vec::new();
        for (i, (filter, _)) in filters.iter().enumerate() {
            let joined = client
                .join(
                    &format!("f{i}"),
                    json!([
                        {"event": "INSERT", "schema": "public", "table": "items", "filter": filter},
                        {"event": "INSERT", "schema": "public", "table": "items"}
                    ]),
                    &tok,
                )
                .await;
            let system = joined.system.clone().unwrap();
            assert_eq!(system[4]["status"], "ok", "{filter}: {system}");
            channels.push((format!("realtime:f{i}"), joined.ids[0].clone()));
        }
        ctx.c.psql(&format!(
            "INSERT INTO items (n, price, name, u, flag, d, ts) VALUES {rows}"
        ));
        let events = client.events(filters.len() * 5).await;
        for (i, (filter, expected)) in filters.iter().enumerate() {
            let (topic, filtered_id) = &channels[i];
            let mine: Vec<&Value> = events.iter().filter(|e| &e[2] == topic).collect();
            assert_eq!(mine.len(), 5, "{filter}");
            for e in mine {
                let r = record(e);
                let matched = e[4]["ids"].as_array().unwrap().contains(filtered_id);
                assert_eq!(matched, expected(r), "filter {filter} on row {r}");
            }
        }
    });
}

fn delete_is_filtered_on_the_old_row(ctx: &Ctx) {
    ctx.rt.block_on(async {
        ctx.c
            .psql("INSERT INTO items (id, name) VALUES (2001, 'keep'), (2002, 'drop'), (2003, 'drop')");
        let (mut client, _) = subscriber(
            ctx,
            "del",
            json!([{"event": "DELETE", "schema": "public", "table": "items", "filter": "name=eq.drop"}]),
        )
        .await;
        ctx.c
            .psql("DELETE FROM items WHERE id IN (2001, 2002); DELETE FROM items WHERE id = 2003");
        let got: Vec<Value> = client
            .events(2)
            .await
            .iter()
            .map(|e| e[4]["data"]["old_record"].clone())
            .collect();
        // filtered on a non-key column of the old row; old_record is the key
        assert_eq!(got, vec![json!({"id": 2002}), json!({"id": 2003})]);
    });
}

fn event_kinds_and_schema_wildcards(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let (mut client, joined) = subscriber(
            ctx,
            "kinds",
            json!([
                {"event": "UPDATE", "schema": "public", "table": "quiet"},
                {"event": "DELETE", "schema": "public"},
                {"event": "INSERT", "schema": "*"}
            ]),
        )
        .await;
        let (update_id, delete_id, insert_id) = (&joined.ids[0], &joined.ids[1], &joined.ids[2]);
        ctx.c.psql("INSERT INTO quiet (id, n) VALUES (900001, 1); UPDATE quiet SET n = 2 WHERE id = 900001; DELETE FROM quiet WHERE id = 900001;");
        let events = client.events(3).await;
        assert_eq!(events[0][4]["ids"], json!([insert_id]));
        assert_eq!(events[1][4]["ids"], json!([update_id]));
        assert_eq!(events[2][4]["ids"], json!([delete_id]));
        // one frame per change and channel, listing every matching id
        let (mut both, j2) = subscriber(
            ctx,
            "both",
            json!([{"event": "*", "schema": "public", "table": "quiet"}, {"event": "INSERT", "schema": "public"}]),
        )
        .await;
        ctx.c.psql("INSERT INTO quiet (n) VALUES (3)");
        let e = both.event().await;
        let mut ids = e[4]["ids"].as_array().unwrap().clone();
        ids.sort_by_key(|v| v.as_u64());
        let mut expected = j2.ids.clone();
        expected.sort_by_key(|v| v.as_u64());
        assert_eq!(ids, expected);
    });
}

fn bad_bindings_are_refused_and_the_socket_stays(ctx: &Ctx) {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"event": "*", "schema": "public", "table": "nope"}),
            "relation \"public.nope\" does not exist",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "unpublished"}),
            "Please check Realtime is enabled",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "items", "filter": "nope=eq.1"}),
            "invalid column for filter nope",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "items", "filter": "n=foo.1"}),
            "Error parsing `filter` params",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "items", "filter": "n=eq.abc"}),
            "invalid value for filter n",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "items", "filter": "n=in.1,2"}),
            "must be wrapped by parentheses",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "items", "filter": "n=eq.1,,n=eq.2"}),
            "empty segments",
        ),
        (
            json!({"event": "*", "schema": "public", "table": "items", "filter": "doc=gt.1"}),
            "only eq, neq and in",
        ),
        (json!({"event": "*"}), "No subscription params provided"),
    ];
    ctx.rt.block_on(async {
        let tok = user();
        let mut client = Client::connect(ctx.c.ws_port, &tok).await;
        let good = client
            .join(
                "good",
                json!([{"event": "INSERT", "schema": "public", "table": "quiet"}]),
                &tok,
            )
            .await;
        assert_eq!(good.system.unwrap()[4]["status"], "ok");
        let many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        let too_many =
            json!({"event": "*", "schema": "public", "table": "items", "filter": format!("n=in.({})", many.join(","))});
        for (i, (binding, expected)) in cases.iter().chain([(too_many, "too many values")].iter()).enumerate() {
            let joined = client.join(&format!("bad{i}"), json!([binding]), &tok).await;
            let system = joined.system.unwrap();
            assert_eq!(system[3], "system");
            assert_eq!(system[4]["extension"], "postgres_changes");
            assert_eq!(system[4]["status"], "error", "{binding}");
            let message = system[4]["message"].as_str().unwrap();
            assert!(message.contains(expected), "{binding}: {message}");
        }
        // the socket and its good channel still work
        client.heartbeat().await;
        ctx.c.psql("INSERT INTO quiet (n) VALUES (77)");
        assert_eq!(record(&client.event().await)["n"], 77);
    });
}

/// A user of the `secret_rows` policies: `sub`, and optionally a team claim.
fn member(sub: &str, team: Option<&str>) -> String {
    let mut claims = json!({"role": "authenticated", "sub": sub, "exp": now() + 3600});
    if let Some(team) = team {
        claims["team"] = json!(team);
    }
    token_with(SECRET, claims)
}

/// "<type> <owner>" of each event, until (and without) the first row of
/// team "fence".
async fn owners_until_fence(client: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e = client.event().await;
        let data = &e[4]["data"];
        let row = if data["type"] == "DELETE" {
            &data["old_record"]
        } else {
            &data["record"]
        };
        if row["team"] == "fence" {
            return out;
        }
        out.push(format!(
            "{} {}",
            data["type"].as_str().unwrap(),
            row["owner"].as_str().unwrap_or("?")
        ));
    }
}

/// With REPLICA IDENTITY FULL, an UPDATE's old row is checked against the
/// subscriber's policies like the new one: a row that becomes visible
/// shows only its primary key in `old_record`.
fn an_update_that_reveals_a_row_keeps_its_old_values_hidden(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let alice = member("alice", Some("red"));
        let mut client = Client::connect(ctx.c.ws_port, &alice).await;
        let binding = json!([{"event": "*", "schema": "public", "table": "secret_rows"}]);
        let j = client.join("reveal", binding, &alice).await;
        assert_eq!(j.system.unwrap()[4]["status"], "ok");
        // (two calls: psql before 15 prints only a -c string's last result)
        let id = ctx
            .c
            .psql("INSERT INTO secret_rows (owner, team) VALUES ('dave', 'blue') RETURNING id");
        let id: i64 = id.trim().parse().unwrap();
        ctx.c
            .psql(&format!("UPDATE secret_rows SET team = 'red' WHERE id = {id}"));
        // the INSERT was not hers to see: the UPDATE comes first
        let e = client.event().await;
        let data = &e[4]["data"];
        assert_eq!(data["type"], "UPDATE", "{e}");
        assert_eq!(data["record"]["team"], "red");
        assert_eq!(data["old_record"], json!({ "id": id }), "{e}");
        // a row she saw before and after keeps its whole old image
        ctx.c
            .psql(&format!("UPDATE secret_rows SET owner = 'erin' WHERE id = {id}"));
        let e = client.event().await;
        assert_eq!(e[4]["data"]["old_record"]["owner"], "dave", "{e}");
        assert_eq!(e[4]["data"]["old_record"]["team"], "red", "{e}");
    });
}

fn row_level_security_decides_each_delivery(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let alice = member("alice", Some("red"));
        let bob = member("bob", None);
        let admin = token("admin_bypass", 3600);
        let binding = json!([{"event": "*", "schema": "public", "table": "secret_rows"}]);
        let mut clients = Vec::new();
        for (name, tok) in [("alice", &alice), ("bob", &bob), ("admin", &admin), ("alice-again", &alice)] {
            let mut client = Client::connect(ctx.c.ws_port, tok).await;
            let j = client.join(name, binding.clone(), tok).await;
            assert_eq!(j.system.unwrap()[4]["status"], "ok", "{name}");
            clients.push(client);
        }
        let checks = ctx.c.stat("rls_checks");
        ctx.c.psql(
            "INSERT INTO secret_rows (owner, team) VALUES ('alice', 'blue'), ('carol', 'red'), ('bob', NULL), ('hidden', 'red');
             UPDATE secret_rows SET team = 'red' WHERE owner = 'bob';
             DELETE FROM secret_rows WHERE owner = 'carol';
             DELETE FROM secret_rows WHERE owner = 'bob';
             INSERT INTO secret_rows (owner, team) VALUES ('alice', 'fence'), ('bob', 'fence');",
        );
        // alice: her own row, her team's rows, never the restricted one;
        // the DELETEs are judged on the deleted rows
        assert_eq!(
            owners_until_fence(&mut clients[0]).await,
            ["INSERT alice", "INSERT carol", "UPDATE bob", "DELETE carol", "DELETE bob"]
        );
        // bob: his own row only (he has no team claim)
        assert_eq!(
            owners_until_fence(&mut clients[1]).await,
            ["INSERT bob", "UPDATE bob", "DELETE bob"]
        );
        // BYPASSRLS: everything, 'hidden' included
        assert_eq!(
            owners_until_fence(&mut clients[2]).await,
            [
                "INSERT alice",
                "INSERT carol",
                "INSERT bob",
                "INSERT hidden",
                "UPDATE bob",
                "DELETE carol",
                "DELETE bob"
            ]
        );
        // the admin's second fence row
        assert_eq!(record(&clients[2].event().await)["owner"], "bob");
        // one transaction, so one batch: one check query per identity (alice
        // on two connections shares hers; the admin needs none), whatever
        // the number of rows and channels
        assert_eq!(ctx.c.stat("rls_checks") - checks, 2);
        assert_eq!(
            owners_until_fence(&mut clients[3]).await,
            ["INSERT alice", "INSERT carol", "UPDATE bob", "DELETE carol", "DELETE bob"]
        );

        // a role without SELECT: refused
        let outsider = token("outsider", 3600);
        let j = clients[0]
            .join("nosel", json!([{"event": "*", "schema": "public", "table": "items"}]), &outsider)
            .await;
        assert!(j.system.unwrap()[4]["message"].as_str().unwrap().contains("cannot SELECT"));

        // REVOKE stops deliveries (privileges are re-read within a second)
        let mut client = clients.swap_remove(2);
        ctx.c.psql("REVOKE SELECT ON secret_rows FROM admin_bypass");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            ctx.c.psql("INSERT INTO secret_rows (owner) VALUES ('after revoke')");
            match client.recv_within(Duration::from_millis(1500)).await {
                None => break,
                Some(f) => assert!(std::time::Instant::now() < deadline, "still delivering after REVOKE: {f}"),
            }
        }
        ctx.c.psql("GRANT SELECT ON secret_rows TO admin_bypass");
    });
}

/// The documented limit of judging row images: a policy's subquery reads
/// other tables as they are when the worker checks, just after the commit.
/// And the table's owner bypasses its policies, as in Postgres.
fn policies_reading_other_tables_see_them_at_check_time(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let alice = member("alice", None);
        let owner = token("post_owner", 3600);
        let binding = json!([{"event": "*", "schema": "public", "table": "team_posts"}]);
        let mut a = Client::connect(ctx.c.ws_port, &alice).await;
        assert_eq!(
            a.join("posts", binding.clone(), &alice).await.system.unwrap()[4]["status"],
            "ok"
        );
        let mut o = Client::connect(ctx.c.ws_port, &owner).await;
        assert_eq!(
            o.join("posts", binding, &owner).await.system.unwrap()[4]["status"],
            "ok"
        );
        ctx.c.psql("INSERT INTO teams VALUES ('alice', 'red')");
        ctx.c
            .psql("INSERT INTO team_posts (team, body) VALUES ('red', 'p1'), ('blue', 'not yours')");
        // the post and alice's membership go in one transaction: when the
        // DELETE is checked, the membership is gone, so alice misses it
        ctx.c
            .psql("DELETE FROM team_posts WHERE body = 'p1'; DELETE FROM teams WHERE member = 'alice'");
        // joining a team and posting to it in one transaction: visible
        ctx.c.psql(
            "INSERT INTO teams VALUES ('alice', 'blue'); INSERT INTO team_posts (team, body) VALUES ('blue', 'p2')",
        );
        let mut seen = Vec::new();
        for _ in 0..2 {
            let e = a.event().await;
            seen.push(format!(
                "{} {}",
                e[4]["data"]["type"].as_str().unwrap(),
                record(&e)["body"].as_str().unwrap()
            ));
        }
        assert_eq!(seen, ["INSERT p1", "INSERT p2"]);
        // the owner (no FORCE ROW LEVEL SECURITY) sees every row and event
        let bodies: Vec<String> = o
            .events(4)
            .await
            .iter()
            .map(|e| {
                let d = &e[4]["data"];
                let row = if d["type"] == "DELETE" {
                    &d["old_record"]
                } else {
                    &d["record"]
                };
                format!("{} {}", d["type"].as_str().unwrap(), row["body"].as_str().unwrap())
            })
            .collect();
        assert_eq!(bodies, ["INSERT p1", "INSERT not yours", "DELETE p1", "INSERT p2"]);
    });
}

fn column_privileges_hide_columns(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let tok = user();
        let mut client = Client::connect(ctx.c.ws_port, &tok).await;
        // a filter on a column the role may not read would reveal it
        let j = client
            .join(
                "peek",
                json!([{"event": "*", "schema": "public", "table": "partial", "filter": "secret=eq.x"}]),
                &tok,
            )
            .await;
        let message = j.system.unwrap()[4]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("cannot SELECT column secret"), "{message}");
        let j = client
            .join(
                "partial",
                json!([
                    {"event": "*", "schema": "public", "table": "partial"},
                    {"event": "*", "schema": "public", "table": "keyless_view"}
                ]),
                &tok,
            )
            .await;
        assert_eq!(j.system.unwrap()[4]["status"], "ok");
        ctx.c
            .psql("INSERT INTO partial (shown, secret) VALUES ('hello', 'psst')");
        let data = client.event().await[4]["data"].clone();
        assert_eq!(data["record"], json!({"id": 1, "shown": "hello"}), "{data}");
        let columns: Vec<&str> = data["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["id", "shown"]);
        assert!(!data.to_string().contains("psst"));
        // the key itself is hidden: the Unauthorized form, no values
        ctx.c
            .psql("INSERT INTO keyless_view (shown) VALUES ('visible but unkeyed')");
        let data = client.event().await[4]["data"].clone();
        assert_eq!(data["errors"], json!(["Error 401: Unauthorized"]), "{data}");
        assert!(data.get("record").is_none(), "{data}");
        assert!(!data.to_string().contains("unkeyed"));
    });
}

fn bad_channel_tokens_get_nothing(ctx: &Ctx) {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"role": "admin_bypass", "exp": now() + 600}))
    );
    let cases = [
        (
            token_with(
                "not-the-secret-not-the-secret-not-the-secret",
                json!({"role": "admin_bypass", "exp": now() + 600}),
            ),
            "signature",
        ),
        (unsigned, "JWT"),
        (token("admin_bypass", -60), "Token has expired"),
        (
            token_with(SECRET, json!({"exp": now() + 600})),
            "Fields `role` and `exp` are required",
        ),
        (
            token_with(SECRET, json!({"role": "admin_bypass"})),
            "Fields `role` and `exp` are required",
        ),
        (token("no_such_role", 600), "no_such_role"),
    ];
    ctx.rt.block_on(async {
        let tok = user();
        let mut client = Client::connect(ctx.c.ws_port, &tok).await;
        for (i, (bad, expected)) in cases.iter().enumerate() {
            let topic = format!("bad{i}");
            let j = client
                .join(
                    &topic,
                    json!([{"event": "*", "schema": "public", "table": "secret_rows"}]),
                    bad,
                )
                .await;
            let said = match j.system {
                Some(system) if j.reply[4]["status"] == "ok" => {
                    assert_eq!(system[4]["status"], "error", "{system}");
                    system[4]["message"].to_string()
                }
                _ => j.reply[4]["response"].to_string(),
            };
            assert!(said.contains(expected), "case {i}: {said}");
        }
        // none of them receives a row: the next frame is the heartbeat reply
        ctx.c
            .psql("INSERT INTO secret_rows (owner, team) VALUES ('anyone', 'red')");
        client.send(json!([null, "hb", "phoenix", "heartbeat", {}])).await;
        let next = client.recv().await;
        assert_eq!(next[2], "phoenix", "unexpected frame: {next}");
    });
}

fn expiry_closes_the_channel(ctx: &Ctx) {
    ctx.rt.block_on(async {
        // alice, with a token that expires in two seconds
        let short = token_with(
            SECRET,
            json!({"role": "authenticated", "sub": "alice", "exp": now() + 2}),
        );
        let tok = user();
        let mut client = Client::connect(ctx.c.ws_port, &tok).await;
        let j = client
            .join(
                "short",
                json!([{"event": "*", "schema": "public", "table": "secret_rows"}]),
                &short,
            )
            .await;
        assert_eq!(j.system.unwrap()[4]["status"], "ok");
        ctx.c.psql("INSERT INTO secret_rows (owner) VALUES ('alice')");
        assert_eq!(record(&client.event().await)["owner"], "alice");
        // at expiry: the system error, then phx_close
        let system = client
            .recv_within(Duration::from_secs(10))
            .await
            .expect("no expiry message");
        assert_eq!(system[3], "system", "{system}");
        assert!(
            system[4]["message"].as_str().unwrap().starts_with("Token has expired"),
            "{system}"
        );
        let close = client.recv().await;
        assert_eq!(close[3], "phx_close", "{close}");
        // and nothing more for it
        ctx.c.psql("INSERT INTO secret_rows (owner) VALUES ('alice')");
        client.send(json!([null, "hb", "phoenix", "heartbeat", {}])).await;
        let next = client.recv().await;
        assert_eq!(next[2], "phoenix", "unexpected frame: {next}");
    });
}

/// A partitioned table in the publication: rows of every partition (also
/// one attached with another column order, and one created later) arrive
/// under the partitioned table's name, filtered, in the table's column order.
fn partitioned_tables_are_reported_under_their_name(ctx: &Ctx) {
    ctx.c.psql(
        "CREATE TABLE readings (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE readings_eu PARTITION OF readings FOR VALUES IN ('eu');
         CREATE TABLE readings_us (v int, region text, id int, PRIMARY KEY (id, region));
         ALTER TABLE readings ATTACH PARTITION readings_us FOR VALUES IN ('us');
         GRANT SELECT ON readings TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE readings;",
    );
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "readings",
            json!([{"event": "*", "schema": "public", "table": "readings", "filter": "region=neq.eu"}]),
        )
        .await;
        // a filter on a column that readings_us holds elsewhere: its value
        // is found in readings_us's own order
        let (mut v30, _) = subscriber(
            ctx,
            "readings_v30",
            json!([{"event": "INSERT", "schema": "public", "table": "readings", "filter": "v=eq.30"}]),
        )
        .await;
        ctx.c.psql(
            "INSERT INTO readings VALUES (1, 'eu', 10), (2, 'us', 20);
             INSERT INTO readings_us (id, region, v) VALUES (3, 'us', 30);
             CREATE TABLE readings_asia PARTITION OF readings FOR VALUES IN ('asia');
             INSERT INTO readings VALUES (4, 'asia', 40);
             UPDATE readings SET v = 21 WHERE id = 2;",
        );
        let events = client.events(4).await;
        let seen: Vec<String> = events
            .iter()
            .map(|e| {
                let d = &e[4]["data"];
                assert_eq!(d["table"], "readings", "{d}");
                format!(
                    "{} {} {}",
                    d["type"].as_str().unwrap(),
                    d["record"]["id"],
                    d["record"]["v"]
                )
            })
            .collect();
        assert_eq!(seen, ["INSERT 2 20", "INSERT 3 30", "INSERT 4 40", "UPDATE 2 21"]);
        let columns: Vec<&str> = events[1][4]["data"]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["id", "region", "v"]);
        assert_eq!(record(&v30.event().await)["id"], 3);
        ctx.c.psql("INSERT INTO readings VALUES (5, 'eu', 30)");
        assert_eq!(record(&v30.event().await)["id"], 5, "only rows with v = 30");
    });
}

fn token_refresh_switches_the_identity(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let admin = token("admin_bypass", 3600);
        let mut client = Client::connect(ctx.c.ws_port, &admin).await;
        let j = client
            .join(
                "refresh",
                json!([{"event": "INSERT", "schema": "public", "table": "secret_rows"}]),
                &admin,
            )
            .await;
        assert_eq!(j.system.unwrap()[4]["status"], "ok");
        ctx.c.psql("INSERT INTO secret_rows (owner) VALUES ('before')");
        assert_eq!(record(&client.event().await)["owner"], "before");
        // the same channel now acts as bob: re-subscribed, and his policies
        // decide from the next commit on
        client
            .send(json!(["1", "9", "realtime:refresh", "access_token", {"access_token": member("bob", None)}]))
            .await;
        let system = client.recv().await;
        assert_eq!(system[3], "system", "{system}");
        assert_eq!(system[4]["status"], "ok", "{system}");
        ctx.c
            .psql("INSERT INTO secret_rows (owner) VALUES ('not bob'), ('bob')");
        assert_eq!(record(&client.event().await)["owner"], "bob");
        // and then as alice of team red
        client
            .send(
                json!(["1", "10", "realtime:refresh", "access_token", {"access_token": member("alice", Some("red"))}]),
            )
            .await;
        let system = client.recv().await;
        assert_eq!(system[4]["status"], "ok", "{system}");
        ctx.c
            .psql("INSERT INTO secret_rows (owner, team) VALUES ('bob', NULL), ('dave', 'red')");
        assert_eq!(record(&client.event().await)["owner"], "dave");
    });
}

fn records_over_max_record_bytes_keep_small_fields(ctx: &Ctx) {
    ctx.c.psql("ALTER SYSTEM SET pg_realtime.max_record_bytes = '2kB'");
    ctx.c.psql("SELECT pg_reload_conf()");
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "big",
            json!([{"event": "INSERT", "schema": "public", "table": "items"}]),
        )
        .await;
        // the worker applies the reload on its own schedule: write until a
        // record comes back trimmed
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let data = loop {
            ctx.c.psql(&format!(
                "INSERT INTO items (name, note) VALUES ('big', '{}')",
                "y".repeat(5000)
            ));
            let e = client.event().await;
            if e[4]["data"]["errors"] != Value::Null {
                break e[4]["data"].clone();
            }
            assert!(std::time::Instant::now() < deadline, "max_record_bytes never applied");
        };
        assert_eq!(data["errors"], json!(["Error 413: Payload Too Large"]));
        assert_eq!(data["record"]["name"], "big");
        assert!(data["record"]["id"].is_number());
        assert!(data["record"].get("note").is_none(), "the long field was kept");
    });
    ctx.c.psql("ALTER SYSTEM RESET pg_realtime.max_record_bytes");
    ctx.c.psql("SELECT pg_reload_conf()");
}

fn overflow_is_signalled(_ctx: &Ctx) {
    // A cluster with the smallest ring: one big transaction cannot fit.
    let c = Cluster::start_with(ClusterConfig {
        settings: vec!["pg_realtime.queue_size = 64kB".into()],
        ..ClusterConfig::default()
    });
    c.psql(
        "CREATE EXTENSION pg_realtime; CREATE ROLE authenticated NOLOGIN; \
         CREATE ROLE authenticator NOINHERIT LOGIN; GRANT authenticated TO authenticator; \
         CREATE TABLE t (id bigserial PRIMARY KEY, body text); GRANT SELECT ON t TO authenticated; \
         CREATE PUBLICATION supabase_realtime FOR TABLE t;",
    );
    c.wait_for_websocket(Duration::from_secs(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tok = user();
        let mut client = Client::connect(c.ws_port, &tok).await;
        let j = client
            .join("t", json!([{"event": "*", "schema": "public", "table": "t"}]), &tok)
            .await;
        assert_eq!(j.system.unwrap()[4]["status"], "ok");
        c.psql("INSERT INTO t (body) SELECT repeat('x', 200) FROM generate_series(1, 2000)");
        let system = client.recv().await;
        assert_eq!(system[3], "system", "{system}");
        assert_eq!(system[4]["extension"], "postgres_changes");
        assert_eq!(system[4]["status"], "error");
        assert!(system[4]["message"].as_str().unwrap().contains("refetch"));
        // the backend's memory stayed bounded and the next commit flows again
        c.psql("INSERT INTO t (body) VALUES ('small')");
        assert_eq!(record(&client.event().await)["body"], "small");
    });
    assert!(c.stat("transactions_lost") >= 1);
}

/// A transaction writes while nobody listens, a subscriber joins, then the
/// transaction commits: its rows were never captured, so the subscriber
/// (for whom SUBSCRIBED means live) is told to refetch instead.
fn writes_before_a_join_that_commit_after_it_are_signalled(ctx: &Ctx) {
    use std::io::{BufRead, Write};
    let mut session = ctx.c.psql_session();
    let mut stdin = session.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(session.stdout.take().unwrap()).lines();
    // (late_rows: no other test subscribes to it)
    writeln!(stdin, "BEGIN; INSERT INTO late_rows VALUES (1, 1); \\echo written").unwrap();
    assert_eq!(out.next().unwrap().unwrap(), "written");
    ctx.rt.block_on(async {
        let (mut client, _) = subscriber(
            ctx,
            "late",
            json!([{"event": "*", "schema": "public", "table": "late_rows"}]),
        )
        .await;
        writeln!(stdin, "COMMIT; \\echo committed").unwrap();
        assert_eq!(out.next().unwrap().unwrap(), "committed");
        let notice = client.recv().await;
        assert_eq!(notice[3], "system", "{notice}");
        assert_eq!(notice[4]["status"], "error");
        assert!(notice[4]["message"].as_str().unwrap().contains("refetch"), "{notice}");
        // later commits flow normally
        ctx.c.psql("UPDATE late_rows SET v = 2 WHERE id = 1");
        assert_eq!(record(&client.event().await)["v"], 2);
    });
    drop(stdin);
    assert!(session.wait().unwrap().success());
}

/// As above for a key: a transaction drops a row whose key nobody wants,
/// a subscriber for that key joins, the transaction commits: the
/// subscriber is told to refetch. A join for another key is not.
fn writes_for_a_key_before_its_join_that_commit_after_it_are_signalled(ctx: &Ctx) {
    use std::io::{BufRead, Write};
    let filter = |owner: i32| json!([{"event": "*", "schema": "public", "table": "keyed_late", "filter": format!("owner=eq.{owner}")}]);
    ctx.rt.block_on(async {
        let (_first, _) = subscriber(ctx, "late-1", filter(1)).await;
        for (written, joined, told) in [(7, 7, true), (8, 9, false)] {
            let mut session = ctx.c.psql_session();
            let mut stdin = session.stdin.take().unwrap();
            let mut out = std::io::BufReader::new(session.stdout.take().unwrap()).lines();
            let dropped = ctx.c.stat("rows_filtered_out");
            writeln!(
                stdin,
                "BEGIN; INSERT INTO keyed_late VALUES ({written}, {written}); \\echo written"
            )
            .unwrap();
            assert_eq!(out.next().unwrap().unwrap(), "written");
            let (mut client, _) = subscriber(ctx, &format!("late-{joined}"), filter(joined)).await;
            writeln!(stdin, "COMMIT; \\echo committed").unwrap();
            assert_eq!(out.next().unwrap().unwrap(), "committed");
            drop(stdin);
            assert!(session.wait().unwrap().success());
            assert_eq!(ctx.c.stat("rows_filtered_out"), dropped + 1, "the row was dropped");
            // then a row for the joined key: the next frame is its event
            // unless the notice comes first
            ctx.c
                .psql(&format!("INSERT INTO keyed_late VALUES ({}, {joined})", 100 + joined));
            let first = client.recv().await;
            if told {
                assert_eq!(first[3], "system", "{first}");
                assert_eq!(first[4]["status"], "error");
                assert!(first[4]["message"].as_str().unwrap().contains("refetch"), "{first}");
                assert_eq!(record(&client.event().await)["id"], 100 + joined);
            } else {
                assert_eq!(
                    first[3], "postgres_changes",
                    "no notice for a key nobody joined for: {first}"
                );
                assert_eq!(record(&first)["id"], 100 + joined);
            }
        }
    });
}

fn captured(c: &Cluster) -> String {
    c.psql("SELECT coalesce(string_agg(format('%s:%s%s%s', relation, inserts::int, updates::int, deletes::int), ' ' ORDER BY relation::text), '') FROM realtime.captured_tables")
}

fn publication_sync_for_each_ddl_form(_ctx: &Ctx) {
    let c = Cluster::start();
    // a publication that exists before CREATE EXTENSION
    c.psql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); CREATE PUBLICATION supabase_realtime FOR TABLE a;");
    c.psql("CREATE EXTENSION pg_realtime");
    assert_eq!(captured(&c), "a:111");
    c.psql("ALTER PUBLICATION supabase_realtime ADD TABLE b");
    assert_eq!(captured(&c), "a:111 b:111");
    c.psql("ALTER PUBLICATION supabase_realtime DROP TABLE a");
    assert_eq!(captured(&c), "b:111");
    c.psql("ALTER PUBLICATION supabase_realtime SET TABLE a");
    assert_eq!(captured(&c), "a:111");
    c.psql("ALTER PUBLICATION supabase_realtime SET (publish = 'insert, delete')");
    assert_eq!(captured(&c), "a:101");
    c.psql("DROP TABLE a");
    assert_eq!(captured(&c), "");
    c.psql("DROP PUBLICATION supabase_realtime");
    c.psql("CREATE PUBLICATION supabase_realtime FOR ALL TABLES");
    assert_eq!(captured(&c), "b:111");
    c.psql("CREATE TABLE later (id int PRIMARY KEY)");
    assert_eq!(captured(&c), "b:111 later:111");
    c.psql("DROP PUBLICATION supabase_realtime");
    assert_eq!(captured(&c), "");
    if c.psql("SHOW server_version_num").parse::<i32>().unwrap() >= 150_000 {
        c.psql("CREATE SCHEMA s; CREATE TABLE s.x (id int PRIMARY KEY); CREATE PUBLICATION supabase_realtime FOR TABLES IN SCHEMA s");
        assert_eq!(captured(&c), "s.x:111");
        c.psql("CREATE TABLE s.y (id int PRIMARY KEY)");
    } else {
        // PostgreSQL 14 has no FOR TABLES IN SCHEMA
        c.psql("CREATE SCHEMA s; CREATE TABLE s.x (id int PRIMARY KEY); CREATE TABLE s.y (id int PRIMARY KEY); CREATE PUBLICATION supabase_realtime FOR TABLE s.x, s.y");
    }
    assert_eq!(captured(&c), "s.x:111 s.y:111");
    // another publication is not ours...
    c.psql("CREATE PUBLICATION other FOR TABLE b");
    assert_eq!(captured(&c), "s.x:111 s.y:111");
    // ...until pg_realtime.publication names it: the worker switches on reload
    c.psql("ALTER SYSTEM SET pg_realtime.publication = 'other'");
    c.psql("SELECT pg_reload_conf()");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while captured(&c) != "b:111" {
        assert!(std::time::Instant::now() < deadline, "still capturing {}", captured(&c));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` until it holds (the worker acts on its own clock).
fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A table nobody subscribes to has its capture triggers switched off after
/// pg_realtime.capture_idle_timeout, partitions included, so its writes fire
/// no trigger at all; a join switches them on before it is answered. A
/// writer still running when the join comes keeps it waiting until it has
/// finished (it wrote without the trigger); one that outlasts the join's
/// limit gets the join refused, and the socket stays.
///
/// (Longer than a screen: one scenario whose steps each start from the
/// state the previous one left, on one cluster.)
fn idle_tables_have_capture_switched_off_until_a_join(_ctx: &Ctx) {
    let c = Cluster::start_with(ClusterConfig {
        settings: vec!["pg_realtime.capture_idle_timeout = '1s'".into()],
        ..ClusterConfig::default()
    });
    c.psql(
        "CREATE EXTENSION pg_realtime; CREATE ROLE authenticated NOLOGIN;
         CREATE ROLE authenticator NOINHERIT LOGIN; GRANT authenticated TO authenticator;
         CREATE TABLE plain (id int PRIMARY KEY, v int);
         CREATE TABLE tree (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE tree_eu PARTITION OF tree FOR VALUES IN ('eu');
         CREATE TABLE tree_us PARTITION OF tree FOR VALUES IN ('us');
         GRANT SELECT ON plain, tree TO authenticated;
         CREATE PUBLICATION supabase_realtime FOR TABLE plain, tree WITH (publish_via_partition_root = true);",
    );
    c.wait_for_websocket(Duration::from_secs(10));
    let active = |c: &Cluster| {
        c.psql("SELECT string_agg(format('%s:%s', relation, active::int), ' ' ORDER BY relation::text) FROM realtime.captured_tables")
    };
    assert_eq!(active(&c), "plain:1 tree:1 tree_eu:1 tree_us:1");
    eventually("triggers off", Duration::from_secs(10), || {
        active(&c) == "plain:0 tree:0 tree_eu:0 tree_us:0"
    });
    assert_eq!(c.stat("captures_disabled"), 2);
    // the waiting join runs on a thread of its own while this one polls
    let rt = runtime();
    let tok = user();
    rt.block_on(async {
        // a join switches the table's trigger on before its answer
        let (mut plain, _) = subscriber_at(
            c.ws_port,
            "plain",
            json!([{"event": "*", "schema": "public", "table": "plain"}]),
        )
        .await;
        assert_eq!(active(&c), "plain:1 tree:0 tree_eu:0 tree_us:0");
        c.psql("INSERT INTO plain VALUES (1, 1)");
        assert_eq!(record(&plain.event().await)["v"], 1);

        // a transaction that wrote the tree without the trigger, still open
        use std::io::{BufRead, Write};
        let mut session = c.psql_session();
        let mut stdin = session.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(session.stdout.take().unwrap()).lines();
        writeln!(stdin, "BEGIN; INSERT INTO tree VALUES (1, 'eu'); \\echo written").unwrap();
        assert_eq!(out.next().unwrap().unwrap(), "written");
        let retries = c.stat("capture_lock_retries");
        let join = tokio::spawn(subscriber_at(
            c.ws_port,
            "tree",
            json!([{"event": "INSERT", "schema": "public", "table": "tree"}]),
        ));
        // the join is waiting for the writer: it keeps finding the lock held
        eventually("the join tried the lock", Duration::from_secs(5), || {
            c.stat("capture_lock_retries") >= retries + 3
        });
        assert!(
            !join.is_finished(),
            "answered while a writer without the trigger was running"
        );
        // a join that needs no trigger switched is answered meanwhile
        let (mut plain_too, _) = subscriber_at(
            c.ws_port,
            "plain-too",
            json!([{"event": "*", "schema": "public", "table": "plain"}]),
        )
        .await;
        c.psql("UPDATE plain SET v = 5 WHERE id = 1");
        assert_eq!(record(&plain_too.event().await)["v"], 5);
        assert!(!join.is_finished(), "the tree's join is still waiting");
        drop(plain_too);
        writeln!(stdin, "COMMIT; \\echo committed").unwrap();
        assert_eq!(out.next().unwrap().unwrap(), "committed");
        let (mut tree, _) = join.await.unwrap();
        assert_eq!(active(&c), "plain:1 tree:1 tree_eu:1 tree_us:1");
        // switched on ALWAYS, as created: replicated rows fire it too
        assert_eq!(
            c.psql("SELECT string_agg(DISTINCT tgenabled::text, '') FROM pg_trigger WHERE tgname = 'pg_realtime_capture'"),
            "A"
        );
        c.psql("INSERT INTO tree VALUES (2, 'us')");
        let event = tree.event().await;
        assert_eq!(event[4]["data"]["table"], "tree");
        assert_eq!(record(&event)["id"], 2);

        // nobody left: off again after the timeout
        drop(tree);
        drop(plain);
        eventually("triggers off again", Duration::from_secs(10), || {
            active(&c) == "plain:0 tree:0 tree_eu:0 tree_us:0"
        });

        // a writer that outlasts the join's limit: refused, told about its
        // own table only (another join waits for another), the socket stays
        writeln!(
            stdin,
            "BEGIN; INSERT INTO plain VALUES (2, 2); INSERT INTO tree VALUES (5, 'eu'); \\echo written"
        )
        .unwrap();
        assert_eq!(out.next().unwrap().unwrap(), "written");
        let ws_port = c.ws_port;
        let tree_refused = tokio::spawn(async move {
            let tok = user();
            let mut client = Client::connect(ws_port, &tok).await;
            let bindings = json!([{"event": "*", "schema": "public", "table": "tree"}]);
            client.join("tree-late", bindings, &tok).await.system.unwrap()
        });
        let mut client = Client::connect(c.ws_port, &tok).await;
        let joined = client
            .join(
                "plain",
                json!([{"event": "*", "schema": "public", "table": "plain"}]),
                &tok,
            )
            .await;
        let system = joined.system.unwrap();
        assert_eq!(system[4]["status"], "error", "{system}");
        let message = system[4]["message"].as_str().unwrap();
        assert!(
            message.contains("could not be switched on within 5 s for public.plain (a transaction that writes it holds a lock on it)"),
            "{message}"
        );
        assert!(!message.contains("public.tree"), "{message}");
        let tree_system = tree_refused.await.unwrap();
        let tree_message = tree_system[4]["message"].as_str().unwrap();
        assert_eq!(tree_system[4]["status"], "error", "{tree_system}");
        assert!(
            tree_message.contains("public.tree (") && !tree_message.contains("public.plain"),
            "{tree_message}"
        );
        writeln!(stdin, "COMMIT; \\echo committed").unwrap();
        assert_eq!(out.next().unwrap().unwrap(), "committed");
        let joined = client
            .join(
                "plain2",
                json!([{"event": "*", "schema": "public", "table": "plain"}]),
                &tok,
            )
            .await;
        assert_eq!(joined.system.unwrap()[4]["status"], "ok");
        c.psql("UPDATE plain SET v = 3 WHERE id = 2");
        assert_eq!(record(&client.event().await)["v"], 3);
        drop(stdin);
        assert!(session.wait().unwrap().success());
    });
}

/// A TRUNCATE of a captured table reaches its subscribers as a `system`
/// error naming the table, at commit and in order with the transaction's
/// other changes; never when rolled back (or in a rolled-back savepoint);
/// a partitioned table's TRUNCATE, or one partition's, once, under the
/// root's name; and PREPARE TRANSACTION after one is refused.
fn a_truncate_is_told_at_commit_in_commit_order(_ctx: &Ctx) {
    let c = Cluster::start_with(ClusterConfig {
        settings: vec!["pg_realtime.capture_idle_timeout = 0".into()],
        ..ClusterConfig::default()
    });
    c.psql(
        "CREATE EXTENSION pg_realtime; CREATE ROLE authenticated NOLOGIN;
         CREATE ROLE authenticator NOINHERIT LOGIN; GRANT authenticated TO authenticator;
         CREATE TABLE t (id int PRIMARY KEY);
         CREATE TABLE tree (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE tree_eu PARTITION OF tree FOR VALUES IN ('eu');
         GRANT SELECT ON t, tree TO authenticated;
         CREATE PUBLICATION supabase_realtime FOR TABLE t, tree WITH (publish_via_partition_root = true);
         -- a partition attached after the publication gets its trigger too
         CREATE TABLE tree_us PARTITION OF tree FOR VALUES IN ('us');",
    );
    assert_eq!(
        c.psql("SELECT string_agg(tgrelid::regclass::text || ':' || tgenabled::text, ' ' ORDER BY tgrelid::regclass::text) FROM pg_trigger WHERE tgname = 'pg_realtime_truncate'"),
        "t:A tree:A tree_eu:A tree_us:A"
    );
    // a trigger set to fire for origin sessions only (an older install):
    // the next sync (this ALTER TABLE runs it) makes it ALWAYS again
    c.psql("ALTER TABLE t ENABLE TRIGGER pg_realtime_capture");
    assert_eq!(
        c.psql("SELECT tgenabled FROM pg_trigger WHERE tgrelid = 't'::regclass AND tgname = 'pg_realtime_capture'"),
        "A"
    );
    c.wait_for_websocket(Duration::from_secs(10));
    let notice =
        |table: &str| format!("notice Table public.{table} was truncated: its rows are gone, refetch to catch up");
    runtime().block_on(async {
        // an INSERT-only subscriber is told too: the rows it has are gone
        let (mut t, _) = subscriber_at(
            c.ws_port,
            "t",
            json!([{"event": "INSERT", "schema": "public", "table": "t"}]),
        )
        .await;
        let (mut tree, _) = subscriber_at(
            c.ws_port,
            "tree",
            json!([{"event": "*", "schema": "public", "table": "tree"}]),
        )
        .await;
        c.psql("BEGIN; INSERT INTO t VALUES (1); TRUNCATE t; INSERT INTO t VALUES (2); COMMIT;");
        assert_eq!(t.heard().await, "event 1");
        assert_eq!(t.heard().await, notice("t"));
        assert_eq!(t.heard().await, "event 2");
        // rolled back, or in a rolled-back savepoint: nothing
        c.psql("BEGIN; TRUNCATE t; ROLLBACK;");
        c.psql("BEGIN; SAVEPOINT s; TRUNCATE t; ROLLBACK TO s; INSERT INTO t VALUES (3); COMMIT;");
        assert_eq!(t.heard().await, "event 3");
        // the partitioned table, then one partition: once each, as the root
        c.psql("TRUNCATE tree");
        c.psql("TRUNCATE tree_us");
        c.psql("INSERT INTO tree VALUES (5, 'eu')");
        assert_eq!(tree.heard().await, notice("tree"));
        assert_eq!(tree.heard().await, notice("tree"));
        assert_eq!(tree.heard().await, "event 5");
        // two-phase commit would lose it
        let out = c.psql_output("BEGIN; TRUNCATE t; PREPARE TRANSACTION 'tr';");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot PREPARE a transaction"), "{stderr}");
        c.psql("INSERT INTO t VALUES (4)");
        assert_eq!(t.heard().await, "event 4");
    });
}

/// Joins the `t` table's changes and returns the message that follows
/// SUBSCRIBED, if it comes before an event `sentinel` inserts.
async fn after_subscribed(c: &Cluster, topic: &str, sentinel: i32) -> Option<String> {
    let (mut client, _) = subscriber_at(
        c.ws_port,
        topic,
        json!([{"event": "INSERT", "schema": "public", "table": "t"}]),
    )
    .await;
    c.psql(&format!("INSERT INTO t VALUES ({sentinel})"));
    match client.heard().await {
        event if event == format!("event {sentinel}") => None,
        notice => {
            assert_eq!(client.heard().await, format!("event {sentinel}"));
            Some(notice)
        }
    }
}

/// For pg_realtime.restart_notice_window after the worker starts, each
/// postgres_changes join is told, after SUBSCRIBED, when the worker started
/// and to refetch: what was committed while it was down is gone. A worker
/// killed (a FATAL exit) is back within about a second, and says so again.
fn joins_after_a_worker_restart_are_told_to_refetch(_ctx: &Ctx) {
    let c = Cluster::start_with(ClusterConfig {
        settings: vec!["pg_realtime.restart_notice_window = '10min'".into()],
        ..ClusterConfig::default()
    });
    c.psql(
        "CREATE EXTENSION pg_realtime; CREATE ROLE authenticated NOLOGIN;
         CREATE ROLE authenticator NOINHERIT LOGIN; GRANT authenticated TO authenticator;
         CREATE TABLE t (id int PRIMARY KEY); GRANT SELECT ON t TO authenticated;
         CREATE PUBLICATION supabase_realtime FOR TABLE t;",
    );
    c.wait_for_websocket(Duration::from_secs(10));
    let rt = runtime();
    let started_at = |notice: &str| {
        let rest = notice
            .strip_prefix("notice The realtime server started at ")
            .unwrap_or_else(|| panic!("{notice}"));
        assert!(rest.ends_with("refetch to catch up"), "{notice}");
        // (ISO times of one format compare as strings)
        rest.split_once("Z: ")
            .map(|(at, _)| at.to_owned())
            .unwrap_or_else(|| panic!("{notice}"))
    };
    let first = rt
        .block_on(after_subscribed(&c, "before", 1))
        .expect("a restart notice");
    let worker = c.worker_pid().expect("the worker runs");
    c.psql(&format!("SELECT pg_terminate_backend({worker})"));
    let began = std::time::Instant::now();
    c.wait_for_a_new_worker(worker);
    eprintln!("a new worker after {:?}", began.elapsed());
    let second = rt.block_on(after_subscribed(&c, "after", 2)).expect("a restart notice");
    assert!(started_at(&second) > started_at(&first), "{first} / {second}");
    // past the window: none
    c.psql("ALTER SYSTEM SET pg_realtime.restart_notice_window = 0");
    c.psql("SELECT pg_reload_conf()");
    let mut sentinel = 2;
    eventually("the reload is applied", Duration::from_secs(10), || {
        sentinel += 1;
        rt.block_on(after_subscribed(&c, "later", sentinel)).is_none()
    });
}

/// A committer stuck between its commit record and publishing (here: a
/// synchronous standby that never answers) holds later commits back, but
/// in the ring, not in the worker: once the ring is full, the commits that
/// do not fit are announced to their subscribers as lost, while the stuck
/// one still waits. Released, it (if it found room) and the later ones
/// that fit are delivered in commit order.
fn a_stuck_committer_holds_back_only_a_ring_of_changes(_ctx: &Ctx) {
    let c = Cluster::start_with(ClusterConfig {
        settings: vec![
            "pg_realtime.capture_idle_timeout = 0".into(),
            "pg_realtime.queue_size = '64kB'".into(),
            "synchronous_standby_names = 'ghost'".into(),
            // only the session that asks for it waits for the standby
            "synchronous_commit = local".into(),
        ],
        ..ClusterConfig::default()
    });
    c.psql(
        "CREATE EXTENSION pg_realtime; CREATE ROLE authenticated NOLOGIN;
         CREATE ROLE authenticator NOINHERIT LOGIN; GRANT authenticated TO authenticator;
         CREATE TABLE t (id int PRIMARY KEY, pad text); GRANT SELECT ON t TO authenticated;
         CREATE PUBLICATION supabase_realtime FOR TABLE t;",
    );
    c.wait_for_websocket(Duration::from_secs(10));
    runtime().block_on(async {
        let (mut client, _) = subscriber_at(
            c.ws_port,
            "t",
            json!([{"event": "INSERT", "schema": "public", "table": "t"}]),
        )
        .await;
        use std::io::Write;
        let mut stuck = c.psql_session();
        let mut stdin = stuck.stdin.take().unwrap();
        writeln!(stdin, "SET synchronous_commit = on; INSERT INTO t VALUES (0, 'stuck');").unwrap();
        eventually("the commit waits for the standby", Duration::from_secs(10), || {
            c.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'") == "1"
        });
        // 2,000 commits of about 200 bytes each: far more than 64 kB
        c.psql(
            "DO $$ BEGIN FOR i IN 1..2000 LOOP
               INSERT INTO t VALUES (i, repeat('x', 100)); COMMIT;
             END LOOP; END $$",
        );
        let notice = client.heard().await;
        assert!(
            notice.starts_with("notice Some changes may not have been delivered"),
            "{notice}"
        );
        assert!(c.stat("transactions_lost") > 0);
        // the standby "answers"
        c.psql("ALTER SYSTEM SET synchronous_standby_names = ''");
        c.psql("SELECT pg_reload_conf()");
        // Then the stuck commit (unless it too found the ring full: then it
        // was announced like the others) and those that fit, in commit
        // order. (Each drain while the ring overflowed told it once more.)
        let overflowed = |heard: &str| heard.starts_with("notice Some changes may not have been delivered");
        c.psql("INSERT INTO t VALUES (5000, 'sentinel')");
        let mut last = -1;
        loop {
            let heard = client.heard().await;
            if overflowed(&heard) {
                continue;
            }
            let id: i64 = heard
                .strip_prefix("event ")
                .unwrap_or_else(|| panic!("{heard}"))
                .parse()
                .unwrap();
            assert!(id > last, "{id} after {last}");
            last = id;
            if id == 5000 {
                break;
            }
        }
        drop(stdin);
        assert!(stuck.wait().unwrap().success());
    });
}

/// A table's shape changed between two deliveries (a column added,
/// retyped, dropped): the next row is checked and sent in its new shape,
/// and a row the policy hides stays hidden.
fn a_table_reshaped_between_deliveries_is_checked_in_its_new_shape(ctx: &Ctx) {
    ctx.c.psql(
        "CREATE TABLE reshaped (id bigserial PRIMARY KEY, owner text, note text);
         ALTER TABLE reshaped ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON reshaped FOR SELECT USING (owner = current_setting('request.jwt.claim.sub', true));
         GRANT SELECT ON reshaped TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE reshaped;",
    );
    // (the last stage gives the policy's column a new place under the same
    // name, and the policy the same text: a plan kept from before would
    // read the dropped column)
    let stages: [(&str, &str, Value); 6] = [
        ("", "'first'", json!({"note": "first"})),
        (
            "ALTER TABLE reshaped ADD COLUMN extra int DEFAULT 7",
            "'added'",
            json!({"note": "added", "extra": 7}),
        ),
        (
            "ALTER TABLE reshaped ALTER COLUMN note TYPE int USING length(note)",
            "42",
            json!({"note": 42, "extra": 7}),
        ),
        ("ALTER TABLE reshaped DROP COLUMN extra", "43", json!({"note": 43})),
        (
            "ALTER TABLE reshaped ADD COLUMN extra text, ALTER COLUMN note TYPE text",
            "'back'",
            json!({"note": "back", "extra": null}),
        ),
        (
            "ALTER TABLE reshaped DROP COLUMN owner CASCADE;
             ALTER TABLE reshaped ADD COLUMN owner text;
             CREATE POLICY own ON reshaped FOR SELECT USING (owner = current_setting('request.jwt.claim.sub', true));",
            "'moved'",
            json!({"note": "moved", "extra": null}),
        ),
    ];
    ctx.rt.block_on(async {
        let alice = member("alice", None);
        let mut client = Client::connect(ctx.c.ws_port, &alice).await;
        let binding = json!([{"event": "INSERT", "schema": "public", "table": "reshaped"}]);
        assert_eq!(
            client.join("reshaped", binding, &alice).await.system.unwrap()[4]["status"],
            "ok"
        );
        // (every check on the one plan kept for the role, made for the
        // first: none planned afresh, the plan cache replanning it)
        let planned = ctx.c.stat("rls_checks_planned");
        for (ddl, note, want) in stages {
            if !ddl.is_empty() {
                ctx.c.psql(ddl);
            }
            ctx.c.psql(&format!(
                "INSERT INTO reshaped (owner, note) VALUES ('bob', {note});
                 INSERT INTO reshaped (owner, note) VALUES ('alice', {note});"
            ));
            let event = client.event().await;
            let mut got = record(&event).clone();
            assert_eq!(got["owner"], "alice", "after {ddl:?}: {event}");
            let got = got.as_object_mut().unwrap();
            got.retain(|k, _| k == "note" || k == "extra");
            assert_eq!(Value::Object(got.clone()), want, "after {ddl:?}: {event}");
        }
        assert_eq!(ctx.c.stat("rls_checks_planned"), planned + 1);
    });
}
