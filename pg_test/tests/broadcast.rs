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
}

fn main() {
    let cluster = Cluster::start_with(ClusterConfig {
        settings: vec![format!("pg_realtime.max_payload_size = '{MAX_PAYLOAD_KB}kB'")],
        ..Default::default()
    });
    cluster.psql("CREATE EXTENSION pg_realtime");
    cluster.wait_for_websocket(WAIT);
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        supabase_js_broadcast_self_ack_binary_and_vsn1,
        supabase_js_presence_syncs_tabs_and_leaves,
    ];
    runner::run(Ctx { cluster }, tests);
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
