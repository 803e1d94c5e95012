//! RLS-checked delivery throughput: 1,000 subscribers across 100 users.
//!
//!     cargo bench -p pg_realtime_e2e --bench rls     (after `make install-release`)
//!
//! A cluster with two identical tables, `feed_open` (no row-level
//! security) and `feed_rls` (RLS: a post is visible to the users of its
//! organisation, read from the JWT claims). 100 users (distinct `sub`, all
//! in organisation 1) each open one WebSocket with 10 channels subscribed to
//! the table's INSERTs: 1,000 subscriptions, so every row is delivered 1,000
//! times, and on `feed_rls` each delivery is decided by a check of the row
//! as the user's identity (100 identities). One psql session then commits
//! ROWS single-row INSERTs as fast as it can; the figure is deliveries per
//! second from the first INSERT until every client has received every
//! event. Rounds alternate the two tables; medians are reported, and the RLS
//! rate as a ratio of the no-RLS rate measured in the same run.
use pg_realtime_e2e::client::Client;
use pg_realtime_e2e::*;
use serde_json::json;
use std::io::Write;
use std::time::Instant;

const USERS: usize = 100;
const CHANNELS_PER_USER: usize = 10;

const SETUP: &str = "
CREATE EXTENSION pg_realtime;
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN;
GRANT authenticated TO authenticator;
CREATE TABLE feed_open (id bigserial PRIMARY KEY, org int NOT NULL, author uuid, body text);
CREATE TABLE feed_rls (LIKE feed_open INCLUDING ALL);
ALTER TABLE feed_rls ENABLE ROW LEVEL SECURITY;
CREATE POLICY same_org ON feed_rls FOR SELECT TO authenticated
  USING (org = (current_setting('request.jwt.claims', true)::jsonb ->> 'org')::int);
GRANT SELECT ON feed_open, feed_rls TO authenticated;
CREATE PUBLICATION supabase_realtime FOR TABLE feed_open, feed_rls;
";

struct Run {
    deliveries: usize,
    secs: f64,
    checks: i64,
    rows_checked: i64,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rows = env_usize("ROWS", 500);
    let rounds = env_usize("ROUNDS", 3);
    let c = Cluster::start();
    c.psql(SETUP);
    let rt = runtime();
    println!(
        "{USERS} users x {CHANNELS_PER_USER} channels = {} subscribers; {rows} single-row INSERTs per run, {rounds} rounds",
        USERS * CHANNELS_PER_USER
    );
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, table) in ["feed_open", "feed_rls"].into_iter().enumerate() {
            let run = rt.block_on(burst(&c, table, rows, round));
            let rate = run.deliveries as f64 / run.secs;
            println!(
                "  round {round}  {table:9}  {:>9} deliveries in {:6.2} s = {:>9.0}/s   RLS check queries {:>5}, rows judged {:>6}",
                run.deliveries, run.secs, rate, run.checks, run.rows_checked
            );
            rates[i].push(rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (open, rls) = (median(&mut rates[0]), median(&mut rates[1]));
    println!();
    println!(
        "median deliveries/s: no RLS {open:.0}, RLS-checked {rls:.0}; ratio {:.3}",
        rls / open
    );
    println!("events dropped (slow clients): {}", c.stat("events_dropped"));
}

async fn burst(c: &Cluster, table: &str, rows: usize, round: usize) -> Run {
    // subscribers
    let mut clients = Vec::with_capacity(USERS);
    for u in 0..USERS {
        let token = token_with(
            SECRET,
            json!({"role": "authenticated", "sub": format!("00000000-0000-0000-0000-{u:012}"), "org": 1, "exp": now() + 3600}),
        );
        let mut client = Client::connect(c.ws_port, &token).await;
        for ch in 0..CHANNELS_PER_USER {
            let topic = format!("{table}-{round}-{ch}");
            let joined = client
                .join(
                    &topic,
                    json!([{"event": "INSERT", "schema": "public", "table": table}]),
                    &token,
                )
                .await;
            let system = joined.system.expect("a subscription status");
            assert_eq!(system[4]["status"], "ok", "{system}");
        }
        clients.push(client);
    }
    let expected = rows * CHANNELS_PER_USER;
    let receivers: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { client.count_events(expected).await }))
        .collect();
    let (checks, rows_checked) = (c.stat("rls_checks"), c.stat("rls_rows_checked"));
    // the burst: one session, each INSERT its own transaction
    let start = Instant::now();
    let mut session = c.psql_session();
    {
        let stdin = session.stdin.as_mut().unwrap();
        for i in 0..rows {
            writeln!(
                stdin,
                "INSERT INTO {table} (org, body) VALUES (1, 'post {i} of round {round}');"
            )
            .unwrap();
        }
    }
    drop(session.stdin.take());
    for receiver in receivers {
        assert!(receiver.await.unwrap(), "a client did not receive every event");
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(session.wait().unwrap().success());
    Run {
        deliveries: rows * USERS * CHANNELS_PER_USER,
        secs,
        checks: c.stat("rls_checks") - checks,
        rows_checked: c.stat("rls_rows_checked") - rows_checked,
    }
}
