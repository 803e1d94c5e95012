//! The example app's realtime patterns, with the real supabase-js under
//! Node 22 against a cluster loaded with `examples/marketplace/`.
//!
//! Until row-level security is enforced per delivered row, tables with RLS
//! deliver only to roles that bypass it: these suites subscribe as
//! `service_role` (BYPASSRLS in the seed schema), and check that an
//! ordinary user is refused rather than shown rows.

use pg_realtime_e2e::runner::{self, Test};
use pg_realtime_e2e::*;
use serde_json::Value;
use std::io::BufRead;
use std::time::{Duration, Instant};

const BUYER: &str = "11111111-1111-1111-1111-111111111111";
const OTHER_BUYER: &str = "44444444-4444-4444-4444-444444444444";
const SUPPLIER: &str = "22222222-2222-2222-2222-222222222222";
const SUPPLIER_ORDER: &str = "bbbbbbbb-0000-0000-0000-000000000001";

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
    let tests: &[Test<Ctx>] = &[
        (
            "marketplace_patterns_with_supabase_js",
            marketplace_patterns_with_supabase_js,
        ),
        (
            "ordinary_users_are_refused_on_rls_tables",
            ordinary_users_are_refused_on_rls_tables,
        ),
    ];
    runner::run(Ctx { c }, tests);
}

/// Runs seed-app.mjs, waits for READY, runs `sql`, and returns the events
/// it printed, as (channel, payload).
fn run_scenario(c: &Cluster, expected: usize, sql: &str) -> Vec<(String, Value)> {
    let mut child = std::process::Command::new(node())
        .arg(js_dir().join("seed-app.mjs"))
        .current_dir(js_dir())
        .env("SUPABASE_URL", c.http_url())
        .env("SERVICE_KEY", token("service_role", 3600))
        .env("BUYER_ID", BUYER)
        .env("SUPPLIER_ORDER_ID", SUPPLIER_ORDER)
        .env("EXPECTED", expected.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "READY" => break,
            Some(Ok(_)) => continue,
            _ => {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "seed-app.mjs ended before READY: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    assert!(Instant::now() < deadline);
    c.psql(sql);
    let events: Vec<(String, Value)> = lines
        .map_while(Result::ok)
        .filter_map(|l| {
            let rest = l.strip_prefix("EVENT ")?;
            let (channel, json) = rest.split_once(' ')?;
            Some((channel.to_owned(), serde_json::from_str(json).unwrap()))
        })
        .collect();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "seed-app.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    events
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

fn ordinary_users_are_refused_on_rls_tables(ctx: &Ctx) {
    use pg_realtime_e2e::client::Client;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let buyer = token_with(SECRET, serde_json::json!({"role": "authenticated", "sub": BUYER, "exp": now() + 600}));
        let mut client = Client::connect(ctx.c.ws_port, &buyer).await;
        let j = client
            .join(
                "inbox",
                serde_json::json!([{"event": "*", "schema": "public", "table": "messages", "filter": format!("recipient_id=eq.{BUYER}")}]),
                &buyer,
            )
            .await;
        let system = j.system.unwrap();
        assert_eq!(system[4]["status"], "error");
        assert!(system[4]["message"].as_str().unwrap().contains("row-level security"), "{system}");
        // and nothing arrives for it: the channel holds no subscription, so
        // the next frame after a write is the heartbeat reply
        ctx.c.psql(&format!(
            "INSERT INTO messages (message, sender_id, recipient_id) VALUES ('hidden', '{SUPPLIER}', '{BUYER}')"
        ));
        client.send(serde_json::json!([null, "hb", "phoenix", "heartbeat", {}])).await;
        let next = client.recv().await;
        assert_eq!(next[2], "phoenix", "unexpected frame: {next}");
    });
}
