//! The example app's realtime patterns, with the real supabase-js under
//! Node 22 against a cluster loaded with `examples/marketplace/`: users
//! subscribe with their own tokens, and the schema's row-level security
//! policies decide what each one receives.

use pg_realtime_e2e::runner::{self, Test};
use pg_realtime_e2e::*;
use serde_json::Value;
use std::io::BufRead;
use std::time::Duration;

const BUYER: &str = "11111111-1111-1111-1111-111111111111";
const OTHER_BUYER: &str = "44444444-4444-4444-4444-444444444444";
const SUPPLIER: &str = "22222222-2222-2222-2222-222222222222";
const SUPPLIER_ORDER: &str = "bbbbbbbb-0000-0000-0000-000000000001";
const ADMIN: &str = "33333333-3333-3333-3333-333333333333";
const OTHER_SUPPLIER: &str = "55555555-5555-5555-5555-555555555555";

/// A user's token, as the app's auth would issue it.
fn user_token(sub: &str) -> String {
    token_with(
        SECRET,
        serde_json::json!({"role": "authenticated", "sub": sub, "exp": now() + 600}),
    )
}

struct Ctx {
    c: Cluster,
}

fn main() {
    let c = Cluster::start();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    c.psql("CREATE EXTENSION pg_realtime");
    for file in ["schema.sql", "seed.sql"] {
        let sql = std::fs::read_to_string(root.join("examples/marketplace").join(file)).unwrap();
        c.psql(&format!("SET client_min_messages = error; {sql}"));
    }
    c.wait_for_websocket(Duration::from_secs(10));
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        marketplace_patterns_with_supabase_js,
        each_user_receives_only_rows_its_policies_allow,
        private_order_channel_members_only,
        order_updates_broadcast_to_the_private_order_channel,
    ];
    runner::run(Ctx { c }, tests);
}

/// Runs a scenario script with `env`, waits for READY, runs `sql`, and
/// returns the lines it printed after READY.
fn run_script(c: &Cluster, script: &str, env: &[(&str, String)], sql: &str) -> Vec<String> {
    let mut child = std::process::Command::new(node())
        .arg(js_dir().join(script))
        .current_dir(js_dir())
        .env("SUPABASE_URL", c.http_url())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "READY" => break,
            Some(Ok(_)) => continue,
            _ => {
                let out = child.wait_with_output().unwrap();
                panic!("{script} ended before READY: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    c.psql(sql);
    let printed: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    printed
}

/// Runs seed-app.mjs as the buyer and returns the events it printed, as
/// (channel, payload).
fn run_scenario(c: &Cluster, expected: usize, sql: &str) -> Vec<(String, Value)> {
    let env = [
        ("KEY", user_token(BUYER)),
        ("BUYER_ID", BUYER.to_owned()),
        ("SUPPLIER_ORDER_ID", SUPPLIER_ORDER.to_owned()),
        ("EXPECTED", expected.to_string()),
    ];
    run_script(c, "seed-app.mjs", &env, sql)
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("EVENT ")?;
            let (channel, json) = rest.split_once(' ')?;
            Some((channel.to_owned(), serde_json::from_str(json).unwrap()))
        })
        .collect()
}

fn marketplace_patterns_with_supabase_js(ctx: &Ctx) {
    let sql = format!(
        "-- a message for the buyer, one for someone else, then the buyer reads theirs
         INSERT INTO messages (id, message, sender_id, recipient_id)
           VALUES ('cccccccc-0000-0000-0000-000000000001', 'Samples shipped', '{SUPPLIER}', '{BUYER}'),
                  ('cccccccc-0000-0000-0000-000000000002', 'Not for you', '{SUPPLIER}', '{OTHER_BUYER}');
         UPDATE messages SET read = true WHERE id = 'cccccccc-0000-0000-0000-000000000001';
         -- notifications: created, then marked as read (only the UPDATEs are subscribed)
         INSERT INTO notifications (id, user_id, title, message)
           VALUES ('dddddddd-0000-0000-0000-000000000001', '{BUYER}', 'Order update', 'Molding done'),
                  ('dddddddd-0000-0000-0000-000000000002', '{OTHER_BUYER}', 'Other', 'x');
         UPDATE notifications SET read = true;
         -- production stages of the buyer's supplier order: every kind
         INSERT INTO production_stages (id, supplier_order_id, stage_name, completion_percentage)
           VALUES ('eeeeeeee-0000-0000-0000-000000000001', '{SUPPLIER_ORDER}', 'glazing', 0);
         UPDATE production_stages SET completion_percentage = 60, metadata = '{{\"kiln\": 2}}'
           WHERE id = 'eeeeeeee-0000-0000-0000-000000000001';
         DELETE FROM production_stages WHERE id = 'eeeeeeee-0000-0000-0000-000000000001';
         -- order updates: all of them
         INSERT INTO order_updates (order_id, stage, message, completion_percentage)
           VALUES ('aaaaaaaa-0000-0000-0000-000000000001', 'glazing', 'Glazing started', 60);"
    );
    // inbox 2 + notifications 1 + stages 3 + order-updates 1
    let events = run_scenario(&ctx.c, 7, &sql);
    let of = |name: &str| {
        events
            .iter()
            .filter(|(c, _)| c == name)
            .map(|(_, p)| p)
            .collect::<Vec<_>>()
    };

    let inbox = of("inbox");
    assert_eq!(inbox.len(), 2, "{events:?}");
    assert_eq!(inbox[0]["eventType"], "INSERT");
    assert_eq!(inbox[0]["new"]["message"], "Samples shipped");
    assert_eq!(inbox[0]["new"]["attachments"], serde_json::json!([]));
    assert_eq!(inbox[1]["eventType"], "UPDATE");
    assert_eq!(inbox[1]["new"]["read"], true);
    // messages has REPLICA IDENTITY FULL: the old row is whole
    assert_eq!(inbox[1]["old"]["read"], false);

    let notifications = of("notifications");
    assert_eq!(notifications.len(), 1, "{events:?}");
    assert_eq!(notifications[0]["eventType"], "UPDATE");
    assert_eq!(notifications[0]["new"]["user_id"], BUYER);
    assert_eq!(notifications[0]["new"]["read"], true);

    let stages = of("stages");
    let kinds: Vec<&str> = stages.iter().map(|p| p["eventType"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"]);
    assert_eq!(stages[1]["new"]["completion_percentage"], 60);
    assert_eq!(stages[1]["new"]["metadata"], serde_json::json!({"kiln": 2}));
    assert_eq!(stages[2]["old"]["stage_name"], "glazing");

    let updates = of("order-updates");
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["new"]["message"], "Glazing started");
}

/// Four seed-app users subscribed through supabase-js, then inserts,
/// updates and deletes of rows belonging to different users: each receives
/// exactly the events its policies allow, in order.
///
/// (Longer than a screen: the writes and each user's expected events are
/// read best side by side.)
fn each_user_receives_only_rows_its_policies_allow(ctx: &Ctx) {
    // A second buyer with an order made by another supplier, so that every
    // user has rows the others must not see.
    ctx.c.psql(&format!(
        "INSERT INTO orders (id, buyer_id, title) VALUES ('aaaaaaaa-0000-0000-0000-000000000002', '{OTHER_BUYER}', 'teapots');
         INSERT INTO supplier_orders (id, order_id, supplier_id)
           VALUES ('bbbbbbbb-0000-0000-0000-000000000002', 'aaaaaaaa-0000-0000-0000-000000000002', '{OTHER_SUPPLIER}');"
    ));
    let users = serde_json::json!({
        "buyer": user_token(BUYER),
        "other_buyer": user_token(OTHER_BUYER),
        "supplier": user_token(SUPPLIER),
        "admin": user_token(ADMIN),
    });
    let sql = format!(
        "INSERT INTO messages (id, message, sender_id, recipient_id) VALUES
           ('cccccccc-0000-0000-0000-000000000011', 'm-buyer', '{SUPPLIER}', '{BUYER}'),
           ('cccccccc-0000-0000-0000-000000000012', 'm-other', '{OTHER_SUPPLIER}', '{OTHER_BUYER}');
         INSERT INTO notifications (user_id, title, message) VALUES
           ('{BUYER}', 'n-buyer', 'x'), ('{OTHER_BUYER}', 'n-other', 'x');
         INSERT INTO production_stages (id, supplier_order_id, stage_name) VALUES
           ('eeeeeeee-0000-0000-0000-000000000011', 'bbbbbbbb-0000-0000-0000-000000000001', 's-buyer'),
           ('eeeeeeee-0000-0000-0000-000000000012', 'bbbbbbbb-0000-0000-0000-000000000002', 's-other');
         UPDATE production_stages SET completion_percentage = 50
           WHERE id IN ('eeeeeeee-0000-0000-0000-000000000011', 'eeeeeeee-0000-0000-0000-000000000012');
         -- DELETE is judged on the deleted row
         DELETE FROM production_stages
           WHERE id IN ('eeeeeeee-0000-0000-0000-000000000011', 'eeeeeeee-0000-0000-0000-000000000012');
         DELETE FROM messages WHERE id = 'cccccccc-0000-0000-0000-000000000012';
         -- last: one notification per user, which tells each client it has everything
         INSERT INTO notifications (user_id, title, message) VALUES
           ('{BUYER}', 'fence', ''), ('{OTHER_BUYER}', 'fence', ''), ('{SUPPLIER}', 'fence', ''), ('{ADMIN}', 'fence', '');"
    );
    let env = [
        ("USERS", users.to_string()),
        ("TABLES", "messages,notifications,production_stages".to_owned()),
    ];
    let lines = run_script(&ctx.c, "watch.mjs", &env, &sql);
    // "<user> <table> <eventType> <what>", <what> naming the row
    let seen = |user: &str| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| {
                let mut parts = l.strip_prefix("EVENT ")?.splitn(4, ' ');
                let (who, table, kind, json) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                if who != user {
                    return None;
                }
                let p: Value = serde_json::from_str(json).unwrap();
                let row = if kind == "DELETE" { &p["old"] } else { &p["new"] };
                let what = row["message"]
                    .as_str()
                    .filter(|_| table == "messages")
                    .or_else(|| row["title"].as_str())
                    .or_else(|| row["stage_name"].as_str())
                    .unwrap_or("?");
                Some(format!("{table} {kind} {what}"))
            })
            .collect()
    };
    assert_eq!(
        seen("buyer"),
        [
            "messages INSERT m-buyer",
            "notifications INSERT n-buyer",
            "production_stages INSERT s-buyer",
            "production_stages UPDATE s-buyer",
            "production_stages DELETE s-buyer",
        ],
        "{lines:#?}"
    );
    assert_eq!(
        seen("other_buyer"),
        [
            "messages INSERT m-other",
            "notifications INSERT n-other",
            "production_stages INSERT s-other",
            "production_stages UPDATE s-other",
            "production_stages DELETE s-other",
            "messages DELETE m-other",
        ],
        "{lines:#?}"
    );
    // the supplier: messages it sent, stages of its own supplier order
    assert_eq!(
        seen("supplier"),
        [
            "messages INSERT m-buyer",
            "production_stages INSERT s-buyer",
            "production_stages UPDATE s-buyer",
            "production_stages DELETE s-buyer",
        ],
        "{lines:#?}"
    );
    // the admin: every production stage (no policy gives admins messages
    // or other users' notifications)
    assert_eq!(
        seen("admin"),
        [
            "production_stages INSERT s-buyer",
            "production_stages INSERT s-other",
            "production_stages UPDATE s-buyer",
            "production_stages UPDATE s-other",
            "production_stages DELETE s-buyer",
            "production_stages DELETE s-other",
        ],
        "{lines:#?}"
    );
}

fn private_order_channel_members_only(ctx: &Ctx) {
    use std::io::Write;
    // an order of the buyer, made by the supplier
    ctx.c.psql(&format!(
        "INSERT INTO orders (id, buyer_id, title) VALUES ('aaaaaaaa-0000-0000-0000-000000000003', '{BUYER}', 'bowls');
         INSERT INTO supplier_orders (id, order_id, supplier_id)
           VALUES ('bbbbbbbb-0000-0000-0000-000000000003', 'aaaaaaaa-0000-0000-0000-000000000003', '{SUPPLIER}');"
    ));
    let topic = "order:aaaaaaaa-0000-0000-0000-000000000003";
    let supplier_later = token_with(
        SECRET,
        serde_json::json!({"role": "authenticated", "sub": SUPPLIER, "exp": now() + 900}),
    );
    let mut child = std::process::Command::new(node())
        .arg(js_dir().join("private.mjs"))
        .current_dir(js_dir())
        .env("SUPABASE_URL", ctx.c.http_url())
        .env("TOPIC", topic)
        .env("BUYER_KEY", user_token(BUYER))
        .env("SUPPLIER_KEY", user_token(SUPPLIER))
        .env("SUPPLIER_KEY2", supplier_later)
        .env("OUTSIDER_KEY", user_token(OTHER_BUYER))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().and_then(Result::ok);
    if ready.as_deref() != Some("READY") {
        let out = child.wait_with_output().unwrap();
        panic!("private.mjs: {ready:?} {}", String::from_utf8_lossy(&out.stderr));
    }
    // the supplier is taken off the order: it is no longer a member
    ctx.c
        .psql("DELETE FROM supplier_orders WHERE id = 'bbbbbbbb-0000-0000-0000-000000000003'");
    writeln!(child.stdin.as_mut().unwrap(), "GO").unwrap();
    let last = lines.map_while(Result::ok).last().unwrap_or_default();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "private.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(result["status"]["buyer"], "SUBSCRIBED", "{result}");
    assert_eq!(result["status"]["supplier"], "SUBSCRIBED", "{result}");
    assert_eq!(result["status"]["outsider"], "CHANNEL_ERROR", "{result}");
    assert!(
        result["outsider_seen"].to_string().contains(&format!(
            "Unauthorized: You do not have permissions to read from this Channel topic: {topic}"
        )),
        "{result}"
    );
    assert_eq!(result["ack"], "ok", "{result}");
    assert_eq!(result["buyer_got"]["text"], "kiln fired", "{result}");
    assert!(
        result["after_refresh"]["system"].to_string().contains(&format!(
            "You no longer have permission to read from this Channel topic: {topic}"
        )),
        "{result}"
    );
}

fn order_updates_broadcast_to_the_private_order_channel(ctx: &Ctx) {
    use pg_realtime_e2e::client::Client;
    let order = "aaaaaaaa-0000-0000-0000-000000000004";
    ctx.c.psql(&format!(
        "INSERT INTO orders (id, buyer_id, title) VALUES ('{order}', '{BUYER}', 'jugs');
         INSERT INTO supplier_orders (id, order_id, supplier_id)
           VALUES ('bbbbbbbb-0000-0000-0000-000000000004', '{order}', '{SUPPLIER}');"
    ));
    let topic = format!("order:{order}");
    let private = serde_json::json!({"private": true});
    runtime().block_on(async {
        let mut members = Vec::new();
        for user in [BUYER, SUPPLIER] {
            let key = user_token(user);
            let mut client = Client::connect(ctx.c.ws_port, &key).await;
            let reply = client.join_with(&topic, private.clone(), &key).await;
            assert_eq!(reply[4]["status"], "ok", "{reply}");
            members.push(client);
        }
        let outsider_key = user_token(OTHER_BUYER);
        let mut outsider = Client::connect(ctx.c.ws_port, &outsider_key).await;
        let refused = outsider.join_with(&topic, private.clone(), &outsider_key).await;
        assert_eq!(refused[4]["status"], "error", "{refused}");
        // the public channel of the same name is another topic
        let mut public = Client::connect(ctx.c.ws_port, &outsider_key).await;
        let joined = public.join_with(&topic, serde_json::json!({}), &outsider_key).await;
        assert_eq!(joined[4]["status"], "ok");

        // the app's backend posts the supplier's update: the trigger sends it
        ctx.c.psql(&format!(
            "INSERT INTO order_updates (order_id, stage, message, completion_percentage, created_by)
               VALUES ('{order}', 'glazing', 'glaze on', 60, '{SUPPLIER}')"
        ));
        for member in &mut members {
            let b = member.broadcast().await;
            assert_eq!(b["event"], "INSERT", "{b}");
            let p = &b["payload"];
            assert_eq!(
                (&p["operation"], &p["table"], &p["schema"]),
                (&"INSERT".into(), &"order_updates".into(), &"public".into()),
                "{b}"
            );
            assert_eq!(p["record"]["message"], "glaze on", "{b}");
            assert_eq!(p["old_record"], Value::Null, "{b}");
            assert_eq!(p["id"], b["meta"]["id"], "{b}");
        }
        // the public channel heard none of it: a public send made after is its first
        ctx.c.psql(&format!(
            "SELECT realtime.send('{{\"n\": 1}}', 'sentinel', '{topic}', false)"
        ));
        assert_eq!(public.broadcast().await["event"], "sentinel");
    });
}
