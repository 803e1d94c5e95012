//! The soak (`make bench-soak`; bench/README.md, "Soak"): for SOAK_SECONDS
//! (300), 4 writers commit rows numbered by writer and sequence, SOAK_RATE
//! (2,000) commits a second in all, across 3 tables (`c` with row-level
//! security), while SOAK_SUBSCRIBERS (200) subscribers with filters and
//! two roles receive them, leaving or dropping their socket and rejoining
//! at random. Then each subscription's events are checked against the
//! rows it may see that committed while it was subscribed (commit times
//! from `track_commit_timestamp`): every missing one must be covered by a
//! loss notice in that subscription; nothing may arrive twice, out of
//! commit order, that does not exist (phantom) or that its role may not
//! see (leaked). Not a test: it prints the counts.

use pg_realtime_e2e::client::Client;
use pg_realtime_e2e::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WRITERS: i64 = 4;
const OWNERS: i64 = 10;
/// Rows committed this close to a subscription's end are not expected (nor
/// held against it): in flight. (At its start none is needed: a row
/// committed after the client received SUBSCRIBED is owed to it.)
const EDGE: Duration = Duration::from_secs(2);

const SETUP: &str = "
CREATE EXTENSION pg_realtime;
CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN; GRANT anon, authenticated TO authenticator;
CREATE TABLE a (id bigserial PRIMARY KEY, writer int, seq int, owner text);
CREATE TABLE b (LIKE a INCLUDING ALL);
CREATE TABLE c (LIKE a INCLUDING ALL);
ALTER TABLE c ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON c FOR SELECT USING (owner = current_setting('request.jwt.claim.sub', true));
GRANT SELECT ON a, b TO anon, authenticated; GRANT SELECT ON c TO authenticated;
CREATE PUBLICATION supabase_realtime FOR TABLE a, b, c;
";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// A committed row: its table, writer, sequence, owner and commit time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Row {
    table: String,
    writer: i64,
    seq: i64,
    owner: String,
}

/// What one subscriber subscribes to, as whom.
#[derive(Clone)]
struct Kind {
    table: &'static str,
    /// `writer=eq.<w>`.
    writer: Option<i64>,
    role: &'static str,
    sub: String,
}

impl Kind {
    fn of(n: usize) -> Kind {
        let sub = format!("u{}", n as i64 % OWNERS);
        // (n / 4: each kind gets every writer, so the wanted keys change)
        let writer = Some((n / 4) as i64 % WRITERS);
        match n % 4 {
            0 => Kind {
                table: "a",
                writer: None,
                role: if n.is_multiple_of(8) { "anon" } else { "authenticated" },
                sub,
            },
            1 => Kind {
                table: "b",
                writer,
                role: "authenticated",
                sub,
            },
            2 => Kind {
                table: "c",
                writer: None,
                role: "authenticated",
                sub,
            },
            _ => Kind {
                table: "c",
                writer,
                role: "authenticated",
                sub,
            },
        }
    }

    fn sees(&self, row: &Row) -> bool {
        row.table == self.table
            && self.writer.is_none_or(|w| w == row.writer)
            && (self.table != "c" || row.owner == self.sub)
    }

    fn token(&self) -> String {
        token_with(SECRET, json!({"role": self.role, "sub": self.sub, "exp": now() + 3600}))
    }

    fn bindings(&self) -> Value {
        let mut binding = json!({"event": "INSERT", "schema": "public", "table": self.table});
        if let Some(w) = self.writer {
            binding["filter"] = json!(format!("writer=eq.{w}"));
        }
        json!([binding])
    }
}

/// One subscription, from its SUBSCRIBED to its leave.
struct Session {
    kind: Kind,
    from_us: i64,
    to_us: i64,
    events: Vec<(Row, String)>,
    /// When each `system` notice arrived (microseconds since the epoch).
    notices: Vec<i64>,
    /// Ended by the server (a close, or a frame that did not parse).
    ended_by_server: bool,
}

#[derive(Default, Debug)]
struct Counts {
    sessions: usize,
    /// Rows each subscription had to receive (committed inside its window,
    /// `EDGE` from either end, and visible to it), summed.
    expected: usize,
    delivered: usize,
    /// Expected but missing, in a subscription that got a loss notice.
    announced: usize,
    phantom: usize,
    leaked: usize,
    duplicated: usize,
    /// A writer's rows out of its sequence.
    out_of_order: usize,
    /// Expected but missing, with no notice after it.
    silently_lost: usize,
    /// Subscriptions the server ended.
    ended_by_server: usize,
    /// Consecutive events whose commit_timestamp goes back (delivery is
    /// by commit LSN; a backend takes its commit time just before its
    /// commit record, so concurrent commits may invert by a little), and
    /// the largest such step.
    time_inversions: usize,
    max_inversion_ms: i64,
}

fn main() {
    let seconds = setting("SOAK_SECONDS", 300);
    let rate = setting("SOAK_RATE", 2000);
    let subscribers = setting("SOAK_SUBSCRIBERS", 200) as usize;
    let c = Cluster::start_with(ClusterConfig {
        settings: vec![
            "track_commit_timestamp = on".into(),
            "pg_realtime.capture_idle_timeout = 0".into(),
        ],
        ..ClusterConfig::default()
    });
    c.psql(SETUP);
    c.wait_for_websocket(Duration::from_secs(10));
    let worker = c.worker_pid();
    let until = Instant::now() + Duration::from_secs(seconds);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| write(&c, w, rate / WRITERS as u64, until))
        .collect();
    let rt = runtime();
    let sessions = rt.block_on(async {
        let tasks: Vec<_> = (0..subscribers)
            .map(|n| tokio::spawn(subscribe(c.ws_port, Kind::of(n), n as u64, until)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let committed: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let rows = committed_rows(&c);
    let counts = check(&sessions, &rows);
    println!(
        "soak: {seconds} s, {committed} commits ({:.0}/s), {subscribers} subscribers, {} subscriptions",
        committed as f64 / seconds as f64,
        counts.sessions
    );
    println!("{counts:?}");
    println!(
        "| {seconds} s | {committed} | {subscribers} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({} ms) |",
        counts.sessions,
        counts.expected,
        counts.delivered,
        counts.announced,
        counts.phantom,
        counts.leaked,
        counts.duplicated,
        counts.out_of_order,
        counts.silently_lost,
        counts.time_inversions,
        counts.max_inversion_ms
    );
    println!("lost by the ring: {} transactions", c.stat("transactions_lost"));
    let same = c.worker_pid() == worker;
    println!("the worker ran throughout: {same}");
}

/// Writer `w`: `per_second` single-row commits a second until `until`,
/// through one psql session; returns how many it sent.
fn write(c: &Cluster, w: i64, per_second: u64, until: Instant) -> std::thread::JoinHandle<usize> {
    let mut session = c.psql_session();
    std::thread::spawn(move || {
        let mut stdin = session.stdin.take().unwrap();
        let tick = Duration::from_millis(10);
        let per_tick = (per_second / 100).max(1) as i64;
        let mut seq = 0i64;
        let mut next = Instant::now();
        while Instant::now() < until {
            let mut sql = String::new();
            for _ in 0..per_tick {
                let table = ["a", "b", "c"][(seq % 3) as usize];
                sql += &format!(
                    "INSERT INTO {table} (writer, seq, owner) VALUES ({w}, {seq}, 'u{}');\n",
                    seq % OWNERS
                );
                seq += 1;
            }
            stdin.write_all(sql.as_bytes()).unwrap();
            next += tick;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        drop(stdin);
        session.wait().unwrap();
        seq as usize
    })
}

/// One subscriber until `until`: joins, listens 5 to 30 s, leaves (or
/// drops the socket), waits up to 2 s, again.
async fn subscribe(port: u16, kind: Kind, seed: u64, until: Instant) -> Vec<Session> {
    let mut random = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: u64| {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random % n
    };
    let mut sessions = Vec::new();
    let tok = kind.token();
    while Instant::now() + Duration::from_secs(5) < until {
        let Ok(mut client) = Client::try_connect(port, &tok).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let joined = client.join(&format!("soak{seed}"), kind.bindings(), &tok).await;
        if joined.system.as_ref().is_none_or(|s| s[4]["status"] != "ok") {
            panic!("join refused: {:?}", joined.system);
        }
        let mut session = Session {
            kind: kind.clone(),
            from_us: micros_now(),
            to_us: 0,
            events: Vec::new(),
            notices: Vec::new(),
            ended_by_server: false,
        };
        let end = (Instant::now() + Duration::from_secs(5 + next(25))).min(until);
        loop {
            let frame = match client.recv_or_end(end.saturating_duration_since(Instant::now())).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    session.ended_by_server = true;
                    break;
                }
            };
            match frame[3].as_str() {
                Some("postgres_changes") => {
                    let data = &frame[4]["data"];
                    let r = &data["record"];
                    let row = Row {
                        table: data["table"].as_str().unwrap_or("?").to_owned(),
                        writer: r["writer"].as_i64().unwrap_or(-1),
                        seq: r["seq"].as_i64().unwrap_or(-1),
                        owner: r["owner"].as_str().unwrap_or("?").to_owned(),
                    };
                    session
                        .events
                        .push((row, data["commit_timestamp"].as_str().unwrap_or("").to_owned()));
                }
                Some("system") => session.notices.push(micros_now()),
                _ => {}
            }
            if Instant::now() >= end {
                break;
            }
        }
        session.to_us = micros_now();
        if next(2) == 0 {
            let r = format!("{}", 1000 + sessions.len());
            client
                .send(json!([r, r, format!("realtime:soak{seed}"), "phx_leave", {}]))
                .await;
        }
        drop(client);
        sessions.push(session);
        tokio::time::sleep(Duration::from_millis(next(2000))).await;
    }
    sessions
}

/// Every committed row and its commit time (microseconds since the epoch).
fn committed_rows(c: &Cluster) -> Vec<(Row, i64)> {
    let of = |t: &str| {
        format!("SELECT '{t}', writer, seq, owner, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::bigint FROM {t}")
    };
    let out = c.psql(&format!("{} UNION ALL {} UNION ALL {}", of("a"), of("b"), of("c")));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let row = Row {
                table: f[0].to_owned(),
                writer: f[1].parse().unwrap(),
                seq: f[2].parse().unwrap(),
                owner: f[3].to_owned(),
            };
            (row, f[4].parse().unwrap())
        })
        .collect()
}

/// Milliseconds since the epoch of an event's `commit_timestamp`
/// (`YYYY-MM-DDTHH:MM:SS.mmmZ`), for inversions; 0 if unreadable.
fn millis(time: &str) -> i64 {
    let digits: String = time.chars().filter(char::is_ascii_digit).collect();
    // (within one run only differences matter: HHMMSSmmm of one day)
    digits.get(8..).and_then(|d| d.parse::<i64>().ok()).map_or(0, |hms| {
        let (h, m, s, ms) = (hms / 10_000_000, hms / 100_000 % 100, hms / 1000 % 100, hms % 1000);
        ((h * 60 + m) * 60 + s) * 1000 + ms
    })
}

fn check(sessions: &[Session], rows: &[(Row, i64)]) -> Counts {
    let exists: HashSet<&Row> = rows.iter().map(|(r, _)| r).collect();
    // each table's rows by commit time, for each subscription's window
    let mut by_table: HashMap<&str, Vec<(i64, &Row)>> = HashMap::new();
    for (r, at) in rows {
        by_table.entry(r.table.as_str()).or_default().push((*at, r));
    }
    for v in by_table.values_mut() {
        v.sort_by_key(|(at, _)| *at);
    }
    let mut counts = Counts {
        sessions: sessions.len(),
        ..Counts::default()
    };
    for s in sessions {
        let mut seen = HashSet::new();
        let mut last_seq: HashMap<i64, i64> = HashMap::new();
        let mut last_ms = i64::MIN;
        for (row, time) in &s.events {
            counts.delivered += 1;
            if !exists.contains(row) {
                counts.phantom += 1;
            } else if !s.kind.sees(row) {
                counts.leaked += 1;
            }
            if !seen.insert(row.clone()) {
                counts.duplicated += 1;
            }
            if last_seq.insert(row.writer, row.seq).is_some_and(|b| b >= row.seq) {
                counts.out_of_order += 1;
            }
            let ms = millis(time);
            if ms < last_ms {
                counts.time_inversions += 1;
                counts.max_inversion_ms = counts.max_inversion_ms.max(last_ms - ms);
            }
            last_ms = last_ms.max(ms);
        }
        counts.ended_by_server += usize::from(s.ended_by_server);
        let (from, to) = (s.from_us, s.to_us - EDGE.as_micros() as i64);
        let table = by_table.get(s.kind.table).map(Vec::as_slice).unwrap_or(&[]);
        let start = table.partition_point(|(at, _)| *at <= from);
        let window = table[start..].iter().take_while(|(at, _)| *at < to);
        let wanted: Vec<&(i64, &Row)> = window.filter(|(_, r)| s.kind.sees(r)).collect();
        counts.expected += wanted.len();
        // a missing row is announced by a notice that came after it committed
        let last_notice = s.notices.last().copied().unwrap_or(i64::MIN);
        for (at, r) in wanted {
            if !seen.contains(*r) {
                if *at < last_notice {
                    counts.announced += 1;
                } else {
                    counts.silently_lost += 1;
                }
            }
        }
    }
    counts
}
