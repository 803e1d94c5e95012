//! Bounded inside the database (`docs/security.md`): a reader that stops
//! costs the worker bounded memory, a storm of joins does not hold back
//! delivery, a join never queues for a writer's lock, and client sockets
//! run out before PostgreSQL's own descriptors do. The heavier checks of
//! the suites: they run on PostgreSQL 15 only, to keep CI short.

use pg_realtime_e2e::client::Client;
use pg_realtime_e2e::runner::{self, Test};
use pg_realtime_e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The one major these run on.
const HEAVY_MAJOR: u32 = 15;

struct Ctx {
    c: Cluster,
    rt: tokio::runtime::Runtime,
}

const SETUP: &str = "
CREATE EXTENSION pg_realtime;
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN;
GRANT anon TO authenticator;
CREATE TABLE feed (id bigserial PRIMARY KEY, body text);
CREATE TABLE storm (id int PRIMARY KEY, body text);
CREATE TABLE locked (id bigserial PRIMARY KEY, body text);
GRANT SELECT ON feed, storm, locked TO anon;
CREATE PUBLICATION supabase_realtime FOR TABLE feed, storm, locked;
";

fn main() {
    if pg_config_major() != HEAVY_MAJOR {
        println!("\nrunning 0 tests (these run on PostgreSQL {HEAVY_MAJOR} only)\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n");
        return;
    }
    let c = Cluster::start_with(ClusterConfig {
        // idle tables lose their trigger quickly: the lock test needs one off
        settings: vec!["pg_realtime.capture_idle_timeout = 1s".into()],
        ..ClusterConfig::default()
    });
    c.psql(SETUP);
    c.wait_for_websocket(Duration::from_secs(10));
    let rt = runtime();
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        a_reader_that_stops_costs_bounded_memory,
        a_storm_of_joins_does_not_hold_back_delivery,
        a_join_never_queues_for_a_writers_lock,
        client_sockets_run_out_before_postgres_descriptors,
    ];
    runner::run(Ctx { c, rt }, tests);
}

fn anon() -> String {
    token("anon", 3600)
}

/// A broadcast of about `bytes` bytes: an array of numbers, the payload
/// that cost most as a parsed tree.
fn big_broadcast(topic: &str, bytes: usize) -> String {
    let numbers: Vec<String> = (0..bytes / 8).map(|n| (1_000_000 + n).to_string()).collect();
    format!(
        r#"[null,null,"realtime:{topic}","broadcast",{{"type":"broadcast","event":"big","payload":{{"n":[{}]}}}}]"#,
        numbers.join(",")
    )
}

fn a_reader_that_stops_costs_bounded_memory(ctx: &Ctx) {
    let c = &ctx.c;
    ctx.rt.block_on(async {
        let mut stalled = Client::connect(c.ws_port, &anon()).await;
        let mut sender = Client::connect(c.ws_port, &anon()).await;
        for client in [&mut stalled, &mut sender] {
            let joined = client.join("big", json!([]), &anon()).await;
            assert_eq!(joined.reply[4]["status"], "ok");
        }
        // 96 MB of broadcasts while `stalled` reads nothing
        let frame = big_broadcast("big", 1 << 20);
        let before = c.worker_rss_kb();
        let mut most = before;
        for n in 0..96 {
            sender.send_text(frame.clone()).await;
            if n % 8 == 7 {
                // (a round trip: the worker has taken what came before)
                sender.heartbeat().await;
                most = most.max(c.worker_rss_kb());
            }
        }
        let grew_mb = (most - before) / 1024;
        eprintln!("worker RSS {before} kB before, {most} kB at most: +{grew_mb} MB for 96 MB sent");
        // the queue holds 16 MB (pg_realtime.max_pending_bytes), the socket
        // buffers are the kernel's; a broadcast is parsed no more
        assert!(grew_mb < 64, "the worker grew by {grew_mb} MB");
        // the stalled reader: what was written before, one notice, the close
        let (texts, code) = stalled.frames_until_close().await;
        assert_eq!(code, Some(1013), "{:?}", texts.last());
        let notice = texts.iter().rev().find(|t| t.contains("\"system\"")).expect("a notice");
        assert!(notice.contains("pg_realtime.max_pending_bytes"), "{notice}");
        assert!(c.stat("clients_too_far_behind") >= 1);
        sender.heartbeat().await;
    });
}

/// Sixteen connections send 50 postgres_changes joins each at once; a row
/// committed once they are all sent reaches an unrelated subscriber before
/// the storm's last join is answered (each client's arrival times, on one
/// clock, are the evidence).
fn a_storm_of_joins_does_not_hold_back_delivery(ctx: &Ctx) {
    let c = &ctx.c;
    ctx.rt.block_on(async {
        let mut watcher = Client::connect(c.ws_port, &anon()).await;
        let joined = watcher
            .join("feed", json!([{"event": "INSERT", "schema": "public", "table": "feed"}]), &anon())
            .await;
        assert_eq!(joined.system.unwrap()[4]["status"], "ok");
        let mut storm = Vec::new();
        for k in 0..16 {
            let mut client = Client::connect(c.ws_port, &anon()).await;
            for n in 0..50 {
                let r = format!("{k}-{n}");
                let binding = json!([{"event": "*", "schema": "public", "table": "storm", "filter": format!("id=eq.{}", k * 50 + n)}]);
                client
                    .send(json!([r, r, format!("realtime:storm{n}"), "phx_join", {"config": {"postgres_changes": binding}, "access_token": anon()}]))
                    .await;
            }
            storm.push(client);
        }
        let answered: Vec<_> = storm
            .into_iter()
            .map(|mut client| {
                tokio::spawn(async move {
                    let mut at = Vec::with_capacity(50);
                    while at.len() < 50 {
                        let frame = client.recv().await;
                        if frame[3] == "system" {
                            assert_eq!(frame[4]["status"], "ok", "{frame}");
                            at.push(Instant::now());
                        }
                    }
                    at
                })
            })
            .collect();
        c.psql("INSERT INTO feed (body) VALUES ('during the storm')");
        let event = watcher.event().await;
        let delivered = Instant::now();
        assert_eq!(event[4]["data"]["record"]["body"], "during the storm");
        let mut answers = Vec::new();
        for handle in answered {
            answers.extend(handle.await.unwrap());
        }
        let before = answers.iter().filter(|at| **at < delivered).count();
        let last_answer = answers.iter().max().copied().unwrap();
        // the row does not wait for the storm: most of it is answered after
        assert!(
            before < answers.len() / 2,
            "{before} of {} joins were answered before the row was delivered",
            answers.len()
        );
        eprintln!(
            "{before} of {} joins answered before the row; it came {:?} before the last",
            answers.len(),
            last_answer - delivered
        );
    });
}

/// A table whose trigger is off, a writer holding it: the join asking for
/// the trigger retries NOWAIT (pg_locks never shows the worker waiting,
/// which would queue every later writer behind it) until it gives up.
fn a_join_never_queues_for_a_writers_lock(ctx: &Ctx) {
    let c = &ctx.c;
    let active = || c.psql("SELECT active FROM realtime.captured_tables WHERE relation = 'locked'::regclass");
    let deadline = Instant::now() + Duration::from_secs(30);
    while active() != "f" {
        assert!(Instant::now() < deadline, "the idle trigger was never switched off");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut writer = c.psql_session();
    {
        use std::io::{BufRead, Write};
        let stdin = writer.stdin.as_mut().unwrap();
        writeln!(
            stdin,
            "BEGIN; INSERT INTO locked (body) VALUES ('held'); SELECT 'holding';"
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(writer.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "holding");
    }
    let port = c.ws_port;
    let join = ctx.rt.spawn(async move {
        let mut client = Client::connect(port, &anon()).await;
        client
            .join(
                "locked",
                json!([{"event": "*", "schema": "public", "table": "locked"}]),
                &anon(),
            )
            .await
            .system
            .unwrap()
    });
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                   WHERE a.backend_type = 'pg_realtime' AND NOT l.granted";
    let mut looks = 0;
    while !join.is_finished() {
        assert_eq!(c.psql(waiting), "0", "the worker waits for a lock");
        looks += 1;
    }
    let system = ctx.rt.block_on(join).unwrap();
    assert!(looks > 20, "looked only {looks} times");
    assert_eq!(system[4]["status"], "error", "{system}");
    let message = system[4]["message"].as_str().unwrap();
    assert!(
        message.contains("could not be switched on within 5 s") && message.contains("locked"),
        "{message}"
    );
    drop(writer.stdin.take());
    let _ = writer.wait();
}

/// Under a hard limit of 256 descriptors (prlimit), with PostgreSQL's file
/// cache at 100, upgrades past what is left are refused with 429, and the
/// worker can still load a policy's language and deliver.
fn client_sockets_run_out_before_postgres_descriptors(_ctx: &Ctx) {
    let c = Cluster::start_with(ClusterConfig {
        settings: vec!["max_files_per_process = 100".into()],
        nofile: Some(256),
        ..ClusterConfig::default()
    });
    c.psql(
        "CREATE EXTENSION pg_realtime;
         CREATE ROLE anon NOLOGIN; CREATE ROLE authenticator NOINHERIT LOGIN; GRANT anon TO authenticator;
         CREATE TABLE guarded (id bigserial PRIMARY KEY, body text);
         CREATE FUNCTION allowed(body text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RETURN body <> 'hidden'; END $$;
         ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
         CREATE POLICY by_function ON guarded FOR SELECT USING (allowed(body));
         GRANT SELECT ON guarded TO anon;
         CREATE PUBLICATION supabase_realtime FOR TABLE guarded;",
    );
    c.wait_for_websocket(Duration::from_secs(10));
    let log = c.log();
    assert!(log.contains("client sockets"), "{log}");
    assert!(
        log.contains("pg_realtime.max_connections is 1000 but the file descriptor limit allows"),
        "{log}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut open: Vec<Client> = Vec::new();
        let refused = loop {
            assert!(open.len() < 256, "no upgrade was refused");
            match Client::try_connect(c.ws_port, &anon()).await {
                Ok(client) => open.push(client),
                Err(status) => break status,
            }
        };
        assert_eq!(refused, 429);
        assert!(open.len() >= 50, "only {} connections", open.len());
        eprintln!("{} connections, then 429", open.len());
        // PostgreSQL still has its descriptors: the policy's language loads
        // in the worker and the row is checked and delivered
        let first = &mut open[0];
        let joined = first
            .join(
                "guarded",
                json!([{"event": "INSERT", "schema": "public", "table": "guarded"}]),
                &anon(),
            )
            .await;
        assert_eq!(joined.system.unwrap()[4]["status"], "ok");
        c.psql("INSERT INTO guarded (body) VALUES ('hidden'), ('shown')");
        let event: Value = first.event().await;
        assert_eq!(event[4]["data"]["record"]["body"], "shown");
    });
}
