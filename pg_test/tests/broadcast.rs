//! Broadcast and presence end to end: a real cluster with pg_realtime
//! preloaded and the real supabase-js under Node 22, several clients per
//! case.

use pg_realtime_e2e::runner::{self, Test};
use pg_realtime_e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
/// `pg_realtime.max_payload_size` in this suite's cluster.
const MAX_PAYLOAD_KB: usize = 64;

struct Ctx {
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
}

fn main() {
    let cluster = Cluster::start_with(ClusterConfig {
        settings: vec![
            format!("pg_realtime.max_payload_size = '{MAX_PAYLOAD_KB}kB'"),
            // small, for a transaction of broadcasts to overflow it
            "pg_realtime.queue_size = '1MB'".into(),
            "max_prepared_transactions = 2".into(),
        ],
        ..Default::default()
    });
    cluster.psql("CREATE EXTENSION pg_realtime");
    cluster.psql(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         CREATE PUBLICATION supabase_realtime FOR TABLE notes;
         CREATE ROLE authenticated NOLOGIN;
         CREATE ROLE authenticator NOINHERIT LOGIN;
         GRANT authenticated TO authenticator;
         GRANT SELECT ON notes TO authenticated;
         CREATE ROLE sender LOGIN;
         GRANT INSERT ON notes TO sender;
         CREATE POLICY sender_may_send_to_allowed ON realtime.messages FOR INSERT TO sender
           WITH CHECK (realtime.topic() = 'allowed' AND extension = 'broadcast');
         CREATE POLICY sender_waits_on_slow ON realtime.messages FOR INSERT TO sender
           WITH CHECK (realtime.topic() = 'slow' AND (SELECT true FROM pg_sleep(2)));
         CREATE POLICY writable_read ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() IN ('writable', 'replayroom'));
         CREATE POLICY writable_write ON realtime.messages FOR INSERT TO authenticated
           WITH CHECK (realtime.topic() = 'writable');",
    );
    cluster.wait_for_websocket(WAIT);
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        supabase_js_broadcast_self_ack_binary_and_vsn1,
        supabase_js_presence_syncs_tabs_and_leaves,
        supabase_js_http_broadcast_and_fallback,
        python_client_broadcast_and_presence,
        supabase_js_replays_database_broadcasts_after_a_rejoin,
        database_broadcasts_go_at_commit_in_commit_order,
        database_broadcasts_from_concurrent_sessions_follow_commit_order,
        bad_sends_warn_and_the_transaction_goes_on,
        sends_follow_the_insert_policies_on_realtime_messages,
        a_cancel_during_the_policy_check_is_not_swallowed,
        payload_numbers_arrive_exactly_as_committed,
        prepare_after_a_send_is_refused,
        a_lost_database_broadcast_is_announced,
    ];
    runner::run(Ctx { cluster, rt: runtime() }, tests);
}

/// A raw client joined to public `topic` with a postgres_changes binding
/// on `notes`.
async fn listener(ctx: &Ctx, topic: &str) -> pg_realtime_e2e::client::Client {
    let tok = token("authenticated", 600);
    let mut client = pg_realtime_e2e::client::Client::connect(ctx.cluster.ws_port, &tok).await;
    let joined = client
        .join(
            topic,
            json!([{"event": "*", "schema": "public", "table": "notes"}]),
            &tok,
        )
        .await;
    assert_eq!(joined.system.unwrap()[4]["status"], "ok");
    client
}

/// `realtime.send` of `{"n": n}` on public `topic`.
fn send_sql(n: i64, topic: &str) -> String {
    format!("SELECT realtime.send('{{\"n\": {n}}}', 'note', '{topic}', false);")
}

fn database_broadcasts_go_at_commit_in_commit_order(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let mut client = listener(ctx, "room").await;
        let c = &ctx.cluster;
        c.psql(&format!(
            "BEGIN; INSERT INTO notes VALUES (1, 'a'); {} COMMIT;",
            send_sql(1, "room")
        ));
        c.psql(&format!("BEGIN; {} ROLLBACK;", send_sql(2, "room")));
        c.psql(&format!(
            "BEGIN; SAVEPOINT s; {} ROLLBACK TO s; INSERT INTO notes VALUES (2, 'b'); COMMIT;",
            send_sql(3, "room")
        ));
        // a transaction that only broadcasts
        c.psql(&send_sql(4, "room"));
        c.psql("INSERT INTO notes VALUES (3, 'sentinel')");
        let mut heard = Vec::new();
        let mut first = None;
        while heard.last().map(String::as_str) != Some("event 3") {
            let frame = client.recv().await;
            if frame[3] == "broadcast" && first.is_none() {
                first = Some(frame.clone());
            }
            if ["broadcast", "postgres_changes"].contains(&frame[3].as_str().unwrap()) {
                heard.push(match frame[3].as_str() {
                    Some("broadcast") => format!("broadcast {}", frame[4]["payload"]["n"]),
                    _ => format!("event {}", frame[4]["data"]["record"]["id"]),
                });
            }
        }
        assert_eq!(heard, ["event 1", "broadcast 1", "event 2", "broadcast 4", "event 3"]);
        // the payload gets an id, the same as meta.id
        let first = first.unwrap();
        let id = first[4]["meta"]["id"].as_str().unwrap();
        assert_eq!(id.len(), 36, "{first}");
        assert_eq!(first[4]["payload"]["id"], id, "{first}");
        assert_eq!(first[4]["event"], "note");
    });
}

fn database_broadcasts_from_concurrent_sessions_follow_commit_order(ctx: &Ctx) {
    use std::io::{BufRead, Write};
    ctx.rt.block_on(async {
        let mut client = listener(ctx, "order").await;
        let c = &ctx.cluster;
        let mut session = c.psql_session();
        let mut stdin = session.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(session.stdout.take().unwrap()).lines();
        // sent first, committed last
        let mut until = |line: &str| {
            // (a void result prints an empty line first)
            while out.next().unwrap().unwrap() != line {}
        };
        writeln!(stdin, "BEGIN; {} \\echo sent", send_sql(1, "order")).unwrap();
        until("sent");
        c.psql(&send_sql(2, "order"));
        writeln!(stdin, "COMMIT; \\echo committed").unwrap();
        until("committed");
        drop(stdin);
        session.wait().unwrap();
        let order: Vec<i64> = next_broadcasts(&mut client, 2)
            .await
            .iter()
            .map(|b| b["payload"]["n"].as_i64().unwrap())
            .collect();
        assert_eq!(order, [2, 1]);
    });
}

/// The next `n` broadcasts' messages (`{type, event, payload, meta}`);
/// other frames are skipped.
async fn next_broadcasts(client: &mut pg_realtime_e2e::client::Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let frame = client.recv().await;
        if frame[3] == "broadcast" {
            out.push(frame[4].clone());
        }
    }
    out
}

/// What the channel hears next: `broadcast <n>`, `event <id>` or
/// `notice <extension>: <message>`.
async fn heard(client: &mut pg_realtime_e2e::client::Client) -> String {
    loop {
        let frame = client.recv().await;
        match frame[3].as_str() {
            Some("broadcast") => return format!("broadcast {}", frame[4]["payload"]["n"]),
            Some("postgres_changes") => return format!("event {}", frame[4]["data"]["record"]["id"]),
            Some("system") => return format!("notice {}: {}", frame[4]["extension"], frame[4]["message"]),
            _ => continue,
        }
    }
}

fn bad_sends_warn_and_the_transaction_goes_on(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let mut client = listener(ctx, "bad").await;
        let c = &ctx.cluster;
        let big = MAX_PAYLOAD_KB * 1024 + 1000;
        for (call, warning) in [
            ("realtime.send('{}', 'e', '', false)", "the topic is empty"),
            ("realtime.send('{}', NULL, 'bad', false)", "the event is null"),
            ("realtime.send('{}', 'e', 'bad', NULL)", "private is null"),
            (
                &format!("realtime.send(jsonb_build_object('blob', repeat('x', {big})), 'e', 'bad', false)") as &str,
                "more than pg_realtime.max_payload_size",
            ),
        ] {
            let out = c.psql_output(&format!(
                "BEGIN; SELECT {call}; INSERT INTO notes VALUES (100, 'after'); COMMIT;"
            ));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{call}: {stderr}");
            let line = stderr.lines().find(|l| l.contains("WarnSendingBroadcastMessage: "));
            assert!(line.is_some_and(|l| l.contains(warning)), "{call}: {stderr}");
            // the transaction committed: its row arrives, and nothing before it
            assert_eq!(heard(&mut client).await, "event 100");
            c.psql("DELETE FROM notes WHERE id = 100");
            assert!(heard(&mut client).await.starts_with("event "), "the delete");
        }
    });
}

fn sends_follow_the_insert_policies_on_realtime_messages(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let mut allowed = listener(ctx, "allowed").await;
        let mut other = listener(ctx, "other").await;
        let c = &ctx.cluster;
        // as a role the policies apply to: allowed on 'allowed' only
        let out = c.psql_output(&format!(
            "SET ROLE sender; {} {} RESET ROLE; {}",
            send_sql(1, "other"),
            send_sql(2, "allowed"),
            send_sql(3, "other")
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("WarnSendingBroadcastMessage: permission denied"),
            "{stderr}"
        );
        assert_eq!(heard(&mut allowed).await, "broadcast 2");
        // the refused one never came: the superuser's, sent after it, is first
        assert_eq!(heard(&mut other).await, "broadcast 3");
    });
}

fn prepare_after_a_send_is_refused(ctx: &Ctx) {
    let out = ctx
        .cluster
        .psql_output(&format!("BEGIN; {} PREPARE TRANSACTION 'p';", send_sql(1, "prepared")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot PREPARE a transaction"), "{stderr}");
    assert_eq!(ctx.cluster.psql("SELECT count(*) FROM pg_prepared_xacts"), "0");
}

fn a_lost_database_broadcast_is_announced(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let mut client = listener(ctx, "flood").await;
        let mut bystander = listener(ctx, "calm").await;
        let c = &ctx.cluster;
        let lost = c.stat("transactions_lost");
        // 40 broadcasts of 60 kB in one transaction: more than the 1 MB ring
        c.psql(
            "SELECT realtime.send(jsonb_build_object('blob', repeat('x', 60000)), 'big', 'flood', false) \
                FROM generate_series(1, 40)",
        );
        assert_eq!(c.stat("transactions_lost"), lost + 1);
        c.psql(&send_sql(1, "flood"));
        c.psql(&send_sql(1, "calm"));
        let notice = heard(&mut client).await;
        assert!(
            notice.starts_with(r#"notice "broadcast": "Some broadcasts from the database may not"#),
            "{notice}"
        );
        assert_eq!(heard(&mut client).await, "broadcast 1");
        assert_eq!(heard(&mut bystander).await, "broadcast 1");
    });
}

fn js_env(cluster: &Cluster) -> Vec<(&'static str, String)> {
    vec![
        ("SUPABASE_URL", cluster.http_url()),
        ("ANON_KEY", token("anon", 600)),
        ("BIG_BYTES", (MAX_PAYLOAD_KB * 1024 + 1000).to_string()),
    ]
}

fn last_json(out: &str) -> Value {
    serde_json::from_str(out.lines().last().expect("a result line")).expect("JSON")
}

fn events(got: &Value) -> Vec<&str> {
    got.as_array()
        .unwrap()
        .iter()
        .map(|m| m["event"].as_str().unwrap())
        .collect()
}

fn supabase_js_broadcast_self_ack_binary_and_vsn1(ctx: &Ctx) {
    let refused = ctx.cluster.stat("broadcasts_refused");
    let result = last_json(&node_ok("broadcast.mjs", &js_env(&ctx.cluster)));
    let acks = &result["acks"];
    assert_eq!(
        acks,
        &json!({"json": "ok", "binary": "ok", "big": "error", "from_b": "ok", "from_c": "ok", "end": "ok"}),
        "{result}"
    );
    let got = &result["got"];
    // a has self off: only the others' messages
    assert_eq!(events(&got["a"]), ["from_b", "from_c", "end"], "{result}");
    // b has self on: everything but the oversized one, its own too
    assert_eq!(
        events(&got["b"]),
        ["json", "binary", "from_b", "from_c", "end"],
        "{result}"
    );
    // c speaks vsn 1.0.0: JSON only (a binary payload has no JSON form)
    assert_eq!(events(&got["c"]), ["json", "from_b", "end"], "{result}");
    assert_eq!(got["b"][0]["payload"], json!({"n": 1, "nested": {"keep": [1, "two"]}}));
    assert_eq!(got["c"][0]["payload"], got["b"][0]["payload"]);
    assert_eq!(got["b"][1]["payload"], json!({"bytes": [0, 1, 255]}));
    assert_eq!(ctx.cluster.stat("broadcasts_refused"), refused + 1);
}

fn supabase_js_http_broadcast_and_fallback(ctx: &Ctx) {
    let forged = token_with(
        "not-the-secret-not-the-secret-not-the-secret",
        json!({"role": "authenticated", "exp": now() + 600}),
    );
    let mut env = js_env(&ctx.cluster);
    env.push(("USER_KEY", token("authenticated", 600)));
    env.push(("FORGED_KEY", forged));
    let result = last_json(&node_ok("http.mjs", &env));
    assert_eq!(
        result["sends"],
        json!({"fallback": "ok", "http_json": true, "http_bytes": true, "private_ok": true,
               "private_locked": "rejected: Unauthorized", "end": true, "end_private": true}),
        "{result}"
    );
    assert_eq!(
        result["forged"],
        json!({"fallback": "error", "http": "rejected: Unauthorized"}),
        "{result}"
    );
    let got = &result["got"];
    assert_eq!(
        events(&got["room"]),
        ["fallback", "http_json", "http_bytes", "end"],
        "{result}"
    );
    assert_eq!(got["room"][0]["payload"], json!({"n": 1}));
    assert_eq!(got["room"][2]["payload"], json!({"bytes": [7, 8]}));
    assert_eq!(events(&got["writable"]), ["private_ok", "end"], "{result}");
}

fn supabase_js_replays_database_broadcasts_after_a_rejoin(ctx: &Ctx) {
    use std::io::{BufRead, Write};
    let c = &ctx.cluster;
    let since = c.psql("SELECT (extract(epoch FROM now()) * 1000)::bigint");
    for n in 1..=3 {
        c.psql(&format!("SELECT realtime.send('{{\"n\": {n}}}', 'note', 'replayroom')"));
    }
    let mut env = js_env(c);
    env.push(("USER_KEY", token("authenticated", 600)));
    env.push(("SINCE", since));
    let mut child = std::process::Command::new(node())
        .arg(js_dir().join("replay.mjs"))
        .current_dir(js_dir())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "JOINED");
    // sent while it is joined: live, once
    c.psql("SELECT realtime.send('{\"n\": 4}', 'note', 'replayroom')");
    writeln!(child.stdin.as_mut().unwrap(), "GO").unwrap();
    let last = lines.map_while(Result::ok).last().unwrap_or_default();
    assert!(child.wait().unwrap().success(), "replay.mjs failed");
    let result: Value = serde_json::from_str(&last).unwrap();
    let seen = |round: &str| -> Vec<(i64, bool)> {
        result[round]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["payload"]["n"].as_i64().unwrap(), m["meta"]["replayed"] == true))
            .collect()
    };
    // the newest two (limit 2), oldest first, then the live one
    assert_eq!(seen("first"), [(2, true), (3, true), (4, false)], "{result}");
    // joined again: the newest two, which now include the live one
    assert_eq!(seen("rejoined"), [(3, true), (4, true)], "{result}");
    assert_eq!(result["first"][0]["meta"]["id"], result["first"][0]["payload"]["id"]);
}

fn python_client_broadcast_and_presence(ctx: &Ctx) {
    let url = format!("ws://127.0.0.1:{}/realtime/v1", ctx.cluster.ws_port);
    let out = python_ok(
        "broadcast_presence.py",
        &[("REALTIME_URL", url), ("ANON_KEY", token("anon", 600))],
    );
    let result = last_json(&out);
    assert_eq!(result["presence"]["tracked"], json!(["alice", "bob"]), "{result}");
    assert_eq!(result["presence"]["after_untrack"], json!(["alice"]), "{result}");
    let got = &result["got"];
    // self on for both: each hears its own broadcasts too
    for who in ["alice", "bob"] {
        assert_eq!(events(&got[who]), ["hello", "reply", "end"], "{who}: {result}");
    }
    assert_eq!(got["bob"][0]["payload"], json!({"n": 1}));
}

fn supabase_js_presence_syncs_tabs_and_leaves(ctx: &Ctx) {
    let result = last_json(&node_ok("presence.mjs", &js_env(&ctx.cluster)));
    let steps = &result["steps"];
    assert_eq!(result["acks"], json!(["ok", "ok", "ok", "ok"]), "{result}");
    assert_eq!(steps["tracked"], json!({"alice": [1, 2], "bob": ["bob"]}), "{result}");
    assert_eq!(steps["bob_untracked"], json!({"alice": [1, 2]}), "{result}");
    // a tab killed without a leave or a close frame leaves all the same
    assert_eq!(steps["carol_killed"], json!({"alice": [1, 2]}), "{result}");
    assert_eq!(steps["tab1_left"], json!({"alice": [2]}), "{result}");
    let heard: Vec<Value> = result["heard"].as_array().unwrap().clone();
    for expected in [
        json!({"leave": "bob", "metas": 1}),
        json!({"join": "carol", "metas": 1}),
        json!({"leave": "carol", "metas": 1}),
        json!({"leave": "alice", "metas": 1}),
    ] {
        assert!(heard.contains(&expected), "{expected} not in {heard:?}");
    }
}

fn a_cancel_during_the_policy_check_is_not_swallowed(ctx: &Ctx) {
    // the probe of a slow policy outlives statement_timeout: an ERROR,
    // not a WARNING that lets the statement carry on
    let out = ctx.cluster.psql_output(&format!(
        "SET statement_timeout = '200ms'; SET ROLE sender; {}",
        send_sql(1, "slow")
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("canceling statement due to statement timeout"),
        "{stderr}"
    );
    assert!(!stderr.contains("WarnSendingBroadcastMessage"), "{stderr}");
}

fn payload_numbers_arrive_exactly_as_committed(ctx: &Ctx) {
    ctx.rt.block_on(async {
        let mut client = listener(ctx, "numbers").await;
        // numbers JSON parsers round, and nesting parsers refuse
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        ctx.cluster.psql(&format!(
            "SELECT realtime.send('{{\"big\": 123456789012345678901234, \"p\": 1.10, \"huge\": 1e400}}', 'n', 'numbers', false);
             SELECT realtime.send('{deep}', 'deep', 'numbers', false);
             SELECT realtime.send('{{\"n\": 2}}', 'after', 'numbers', false);"
        ));
        let first = client.broadcast().await;
        assert_eq!(first["event"], "n");
        let raw = client.last_text.clone();
        // (jsonb writes 1e400 out in full)
        let huge = format!("1{}", "0".repeat(400));
        for exact in ["123456789012345678901234", "1.10", &huge] {
            assert!(raw.contains(exact), "{exact} not in {raw}");
        }
        // deep nesting passes through as it is, too
        assert_eq!(client.broadcast().await["event"], "deep");
        assert!(client.last_text.ends_with(&deep), "{}", client.last_text);
        assert_eq!(client.broadcast().await["event"], "after");
    });
}
