//! Safe inside the database (`docs/security.md`): a hostile table owner, a
//! forged role claim or a misattached trigger gains no rights and crashes
//! nothing. One cluster; the table owner `mallory` is an ordinary role.

use pg_realtime_e2e::client::Client;
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
CREATE ROLE anon NOLOGIN;
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE outsider NOLOGIN;
CREATE ROLE authenticator NOINHERIT LOGIN;
GRANT anon, authenticated TO authenticator;
CREATE ROLE mallory LOGIN;
CREATE SCHEMA mallory AUTHORIZATION mallory;
GRANT USAGE ON SCHEMA mallory TO anon, authenticated, outsider;
CREATE PUBLICATION supabase_realtime;
-- private channels: anon may read and write topics starting with 'open'
CREATE POLICY open_read ON realtime.messages FOR SELECT TO anon USING (realtime.topic() LIKE 'open%');
CREATE POLICY open_write ON realtime.messages FOR INSERT TO anon WITH CHECK (realtime.topic() LIKE 'open%');
"#;

/// Written by the DBA, calling mallory's code: private topics starting with
/// 'hers' are decided by her function.
const HER_TOPICS: &str = r#"
CREATE POLICY hers_read ON realtime.messages FOR SELECT TO anon
  USING (realtime.topic() LIKE 'hers%' AND mallory.escalate('a private probe'));
"#;

/// What mallory, owner of her tables and nothing more, sets up: code that
/// tries to make her superuser whenever it runs with the rights to. (So
/// the tests never write `mallory.orders` as a superuser: her domain's
/// CHECK would run with those rights, as PostgreSQL runs it.)
const MALLORY: &str = r#"
SET ROLE mallory;
CREATE FUNCTION mallory.escalate(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  RAISE WARNING 'mallory: % ran as %', what, current_user;
  BEGIN
    PERFORM pg_catalog.set_config('role', 'none', true);
    RAISE WARNING 'mallory: % reset the role to %', what, current_user;
  EXCEPTION WHEN others THEN
    RAISE WARNING 'mallory: % could not reset the role: %', what, SQLERRM;
  END;
  BEGIN
    SET SESSION AUTHORIZATION DEFAULT;
    RAISE WARNING 'mallory: % became the session user %', what, current_user;
  EXCEPTION WHEN others THEN
    RAISE WARNING 'mallory: % could not set the session authorization: %', what, SQLERRM;
  END;
  BEGIN
    ALTER ROLE mallory SUPERUSER;
  EXCEPTION WHEN others THEN
    RAISE WARNING 'mallory: % could not alter her role: %', what, SQLERRM;
  END;
  BEGIN
    CREATE TEMP TABLE mallory_was_here (x int);
  EXCEPTION WHEN others THEN
    RAISE WARNING 'mallory: % could not create a temp table: %', what, SQLERRM;
  END;
  RETURN true;
END $$;
CREATE DOMAIN mallory.code AS text CHECK (mallory.escalate('a domain check'));
CREATE TABLE mallory.orders (id bigserial PRIMARY KEY, code mallory.code, note text);
CREATE TABLE mallory.notes (id bigserial PRIMARY KEY, body text);
ALTER TABLE mallory.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY sneaky ON mallory.notes FOR SELECT USING (mallory.escalate('a policy'));
GRANT SELECT ON mallory.orders, mallory.notes TO anon, authenticated;
RESET ROLE;
ALTER PUBLICATION supabase_realtime ADD TABLE mallory.orders, mallory.notes;
"#;

fn main() {
    let c = Cluster::start_with(ClusterConfig {
        settings: vec!["pg_realtime.capture_idle_timeout = 0".into()],
        ..ClusterConfig::default()
    });
    c.psql(SETUP);
    c.psql(MALLORY);
    c.psql(HER_TOPICS);
    c.wait_for_websocket(Duration::from_secs(10));
    let rt = runtime();
    let tests: &[Test<Ctx>] = &pg_realtime_e2e::tests![
        a_domain_check_on_a_filtered_column_runs_as_the_subscriber,
        a_policy_cannot_undo_the_subscribers_role,
        role_claims_are_honoured_as_postgrest_honours_them,
        revoking_a_role_from_the_authenticator_stops_its_deliveries,
        a_missing_authenticator_refuses_joins_and_says_how_to_fix_it,
        capture_changes_refuses_anything_but_after_row,
        internal_functions_are_for_superusers,
        types_are_known_by_oid_not_name,
        a_private_probe_runs_as_the_subscriber,
        a_membership_without_set_is_not_enough,
        a_slow_policy_is_cancelled_and_its_subscribers_told,
        a_private_policy_helper_sees_the_databases_search_path,
        a_revoked_membership_hides_what_a_policy_read_through_it,
        a_policy_helper_wrongly_marked_immutable_sees_each_subscriber,
        // (last: they restart the worker)
        a_policy_that_ends_the_worker_is_refused_after,
        a_policy_that_catches_its_cancel_ends_the_worker_not_the_cluster,
        the_worker_ignores_a_search_path_set_for_the_database,
    ];
    runner::run(Ctx { c, rt }, tests);
}

fn anon() -> String {
    token("anon", 3600)
}

fn is_superuser(c: &Cluster, role: &str) -> bool {
    c.psql(&format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'")) == "t"
}

/// The `mallory:` warnings the server logged for `what`.
fn mallory_said(c: &Cluster, what: &str) -> Vec<String> {
    c.log()
        .lines()
        .filter_map(|l| l.split_once("WARNING:  mallory: ").map(|(_, m)| m.to_owned()))
        .filter(|m| m.starts_with(what))
        .collect()
}

/// Joins `topic` with postgres_changes bindings as `tok`; returns the
/// status and message of the system message that follows (or the join
/// error's reason).
async fn subscribe(client: &mut Client, topic: &str, bindings: Value, tok: &str) -> (String, String) {
    let j = client.join(topic, bindings, tok).await;
    match j.system {
        Some(system) => (
            system[4]["status"].as_str().unwrap().to_owned(),
            system[4]["message"].as_str().unwrap().to_owned(),
        ),
        None => ("join error".into(), j.reply[4]["response"].to_string()),
    }
}

/// Joins a private channel as `tok`; returns the reply's status and
/// response.
async fn join_private(client: &mut Client, topic: &str, tok: &str) -> (String, Value) {
    let r = format!("p-{topic}");
    client
        .send(
            json!([r, r, format!("realtime:{topic}"), "phx_join", {"config": {"private": true}, "access_token": tok}]),
        )
        .await;
    loop {
        let reply = client.recv().await;
        if reply[3] == "phx_reply" && reply[1] == r {
            return (
                reply[4]["status"].as_str().unwrap().to_owned(),
                reply[4]["response"].clone(),
            );
        }
    }
}

fn a_domain_check_on_a_filtered_column_runs_as_the_subscriber(ctx: &Ctx) {
    let c = &ctx.c;
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let binding = json!([{"event": "*", "schema": "mallory", "table": "orders", "filter": "code=eq.A1"}]);
        let (status, message) = subscribe(&mut client, "orders", binding, &anon()).await;
        assert_eq!(status, "ok", "{message}");
    });
    let said = mallory_said(c, "a domain check");
    assert!(said.iter().any(|m| m == "a domain check ran as anon"), "{said:?}");
    assert!(!said.iter().any(|m| m.contains("ran as postgres")), "{said:?}");
    assert!(
        !said.iter().any(|m| m.starts_with("a domain check reset the role")),
        "{said:?}"
    );
    assert!(!said.iter().any(|m| m.contains("became the session user")), "{said:?}");
    assert!(
        said.iter().any(|m| m.contains("could not create a temp table")),
        "{said:?}"
    );
    assert!(!is_superuser(c, "mallory"));
}

fn a_policy_cannot_undo_the_subscribers_role(ctx: &Ctx) {
    let c = &ctx.c;
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let binding = json!([{"event": "INSERT", "schema": "mallory", "table": "notes"}]);
        let (status, message) = subscribe(&mut client, "notes", binding, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        c.psql("INSERT INTO mallory.notes (body) VALUES ('checked by her policy')");
        let event = client.event().await;
        assert_eq!(event[4]["data"]["record"]["body"], "checked by her policy");
    });
    let said = mallory_said(c, "a policy");
    assert!(said.iter().any(|m| m == "a policy ran as anon"), "{said:?}");
    assert!(!said.iter().any(|m| m.contains("ran as postgres")), "{said:?}");
    assert!(
        said.iter().any(|m| m.starts_with("a policy could not reset the role")),
        "{said:?}"
    );
    assert!(!said.iter().any(|m| m.contains("became the session user")), "{said:?}");
    assert!(!is_superuser(c, "mallory"));
}

fn role_claims_are_honoured_as_postgrest_honours_them(ctx: &Ctx) {
    let c = &ctx.c;
    let binding = json!([{"event": "*", "schema": "mallory", "table": "orders"}]);
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let refused = [
            ("none", "does not exist"),
            ("postgres", "it is a superuser"),
            ("authenticator", "it is the authenticator role itself"),
            ("outsider", "GRANT \"outsider\" TO \"authenticator\""),
            ("mallory", "GRANT \"mallory\" TO \"authenticator\""),
        ];
        for (i, (role, why)) in refused.iter().enumerate() {
            let tok = token(role, 600);
            let (status, message) = subscribe(&mut client, &format!("claim{i}"), binding.clone(), &tok).await;
            assert_eq!(status, "error", "{role}: {message}");
            assert!(
                message.contains("Unauthorized") && message.contains(why),
                "{role}: {message}"
            );
            let (status, response) = join_private(&mut client, &format!("open-{i}"), &tok).await;
            assert_eq!(status, "error", "{role}: {response}");
            let reason = response["reason"].as_str().unwrap();
            assert!(
                reason.contains("Unauthorized") && reason.contains(why),
                "{role}: {response}"
            );
        }
        // a granted role is honoured, for both
        let (status, message) = subscribe(&mut client, "granted", binding.clone(), &anon()).await;
        assert_eq!(status, "ok", "{message}");
        let (status, response) = join_private(&mut client, "open-granted", &anon()).await;
        assert_eq!(status, "ok", "{response}");
    });
}

/// A grant revoked from the authenticator ends what its role receives
/// (checked again with its privileges, within a second) and refuses new
/// joins. Each row goes to a granted subscriber too, on the same socket:
/// its event is the sentinel after which the other's would have come.
fn revoking_a_role_from_the_authenticator_stops_its_deliveries(ctx: &Ctx) {
    let c = &ctx.c;
    let binding = json!([{"event": "INSERT", "schema": "mallory", "table": "notes"}]);
    ctx.rt.block_on(async {
        let user = token("authenticated", 600);
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, message) = subscribe(&mut client, "as-user", binding.clone(), &user).await;
        assert_eq!(status, "ok", "{message}");
        let (status, message) = subscribe(&mut client, "as-anon", binding.clone(), &anon()).await;
        assert_eq!(status, "ok", "{message}");
        // both receive, and what each may see is cached
        c.psql("INSERT INTO mallory.notes (body) VALUES ('granted')");
        let topics: std::collections::BTreeSet<String> = client
            .events(2)
            .await
            .iter()
            .map(|e| e[2].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(topics.len(), 2, "{topics:?}");
        c.psql("REVOKE authenticated FROM authenticator");
        // Row n's events all go out before row n+1's: the granted channel's
        // event for row n+1 settles whether the revoked one got row n.
        let mut user_saw = std::collections::BTreeSet::new();
        let mut settled = false;
        for n in 0..200usize {
            c.psql(&format!("INSERT INTO mallory.notes (body) VALUES ('row {n}')"));
            loop {
                let e = client.event().await;
                let body = e[4]["data"]["record"]["body"].as_str().unwrap().to_owned();
                if e[2] == "realtime:as-user" {
                    user_saw.insert(body);
                } else if body == format!("row {n}") {
                    break;
                }
            }
            if n >= 5 && (n - 5..n).all(|k| !user_saw.contains(&format!("row {k}"))) {
                settled = true;
                break;
            }
        }
        assert!(settled, "the revoked role kept receiving: {user_saw:?}");
        let (status, message) = subscribe(&mut client, "revoked", binding, &user).await;
        assert_eq!(status, "error", "{message}");
        assert!(
            message.contains("GRANT \"authenticated\" TO \"authenticator\""),
            "{message}"
        );
    });
    c.psql("GRANT authenticated TO authenticator");
}

fn a_missing_authenticator_refuses_joins_and_says_how_to_fix_it(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql("ALTER SYSTEM SET pg_realtime.authenticator = 'no_such_authenticator'");
    c.psql("SELECT pg_reload_conf()");
    let binding = json!([{"event": "*", "schema": "mallory", "table": "orders"}]);
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        // (the worker reloads on its next wake-up: a join wakes it)
        let mut attempt = 0;
        let message = loop {
            attempt += 1;
            let (status, message) = subscribe(&mut client, &format!("noauth{attempt}"), binding.clone(), &anon()).await;
            if status == "error" || attempt == 50 {
                break message;
            }
        };
        assert!(
            message.contains("\"no_such_authenticator\") does not exist"),
            "{message}"
        );
        assert!(
            message.contains("CREATE ROLE \"no_such_authenticator\" NOINHERIT LOGIN"),
            "{message}"
        );
        let (status, response) = join_private(&mut client, "open-noauth", &anon()).await;
        assert_eq!(status, "error", "{response}");
        assert!(
            response["reason"].as_str().unwrap().contains("does not exist"),
            "{response}"
        );
    });
    c.psql("ALTER SYSTEM RESET pg_realtime.authenticator");
    c.psql("SELECT pg_reload_conf()");
    // an authenticator that is a superuser could become any role: refused
    c.psql("ALTER ROLE authenticator SUPERUSER");
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let mut attempt = 0;
        let message = loop {
            attempt += 1;
            let (status, message) =
                subscribe(&mut client, &format!("superauth{attempt}"), binding.clone(), &anon()).await;
            if status == "error" || attempt == 50 {
                break message;
            }
        };
        assert!(message.contains("(\"authenticator\") is a superuser"), "{message}");
    });
    c.psql("ALTER ROLE authenticator NOSUPERUSER");
}

fn capture_changes_refuses_anything_but_after_row(ctx: &Ctx) {
    let c = &ctx.c;
    let worker = c.worker_pid().expect("the worker runs");
    let started = c.psql("SELECT pg_postmaster_start_time()");
    c.psql(
        "CREATE TABLE public.stmt (id int); CREATE TABLE public.before_row (id int);
         CREATE TRIGGER by_statement AFTER INSERT ON public.stmt
           FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_changes();
         CREATE TRIGGER too_early BEFORE INSERT ON public.before_row
           FOR EACH ROW EXECUTE FUNCTION realtime.capture_changes();
         CREATE TRIGGER by_row AFTER INSERT ON public.before_row
           FOR EACH ROW EXECUTE FUNCTION realtime.capture_truncate();
         CREATE TRIGGER before_truncate BEFORE TRUNCATE ON public.stmt
           FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_truncate();
         GRANT SELECT ON public.stmt, public.before_row TO anon;",
    );
    ctx.rt.block_on(async {
        // someone listens to everything: the trigger gets past its
        // "nobody listens" exit
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, message) = subscribe(&mut client, "all", json!([{"event": "*", "schema": "*"}]), &anon()).await;
        assert_eq!(status, "ok", "{message}");
        for (table, trigger) in [("stmt", "by_statement"), ("before_row", "too_early")] {
            let out = c.psql_output(&format!("INSERT INTO public.{table} VALUES (1)"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{table}: the insert went through");
            assert!(
                stderr.contains("realtime.capture_changes() must be fired AFTER INSERT, UPDATE or DELETE FOR EACH ROW")
                    && stderr.contains(trigger),
                "{table}: {stderr}"
            );
        }
        c.psql("DROP TRIGGER too_early ON public.before_row");
        for (sql, trigger) in [
            ("INSERT INTO public.before_row VALUES (1)", "by_row"),
            ("TRUNCATE public.stmt", "before_truncate"),
        ] {
            let out = c.psql_output(sql);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{sql}: went through");
            assert!(
                stderr.contains("realtime.capture_truncate() must be fired AFTER TRUNCATE FOR EACH STATEMENT")
                    && stderr.contains(trigger),
                "{sql}: {stderr}"
            );
        }
    });
    assert_eq!(
        c.psql("SELECT pg_postmaster_start_time()"),
        started,
        "the cluster restarted"
    );
    assert_eq!(c.worker_pid(), Some(worker), "the worker restarted");
    c.psql("DROP TABLE public.stmt, public.before_row");
}

fn internal_functions_are_for_superusers(ctx: &Ctx) {
    let c = &ctx.c;
    let as_mallory = |sql: &str| {
        let out = c.psql_output(&format!("SET ROLE mallory; {sql}"));
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = as_mallory(
        "CREATE TRIGGER mine AFTER INSERT ON mallory.notes FOR EACH ROW EXECUTE FUNCTION realtime.capture_changes()",
    );
    assert!(
        !ok && err.contains("permission denied for function realtime.capture_changes"),
        "{ok} {err}"
    );
    let (ok, err) = as_mallory(
        "CREATE TRIGGER mine AFTER TRUNCATE ON mallory.notes FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_truncate()",
    );
    assert!(
        !ok && err.contains("permission denied for function realtime.capture_truncate"),
        "{ok} {err}"
    );
    // nor make the publication sync skip her DDL
    let (ok, err) = as_mallory("SET pg_realtime.syncing = on");
    assert!(!ok && err.contains("permission denied to set parameter"), "{ok} {err}");
    for call in [
        "SELECT * FROM realtime.stats()",
        "SELECT realtime.interested('mallory.notes'::regclass)",
        "SELECT realtime.syncing()",
    ] {
        let (ok, err) = as_mallory(call);
        assert!(!ok && err.contains("permission denied for function"), "{call}: {err}");
    }
    c.psql("CREATE ROLE watcher; GRANT pg_monitor TO watcher");
    let out = c.psql("SET ROLE watcher; SELECT count(*) > 0 FROM realtime.stats()");
    assert_eq!(out, "t");
}

fn types_are_known_by_oid_not_name(ctx: &Ctx) {
    let c = &ctx.c;
    let worker = c.worker_pid().expect("the worker runs");
    // an enum named like a built-in type, with labels that look like
    // timestamps until a multi-byte character
    c.psql(
        r#"CREATE TYPE public.timestamptz AS ENUM ('2025-03-04T10:00:00+xé', '2025-03-04T10:00:00é');
           CREATE TABLE public.lookalike (id int PRIMARY KEY, at public.timestamptz);
           GRANT SELECT ON public.lookalike TO anon;
           ALTER PUBLICATION supabase_realtime ADD TABLE public.lookalike;"#,
    );
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let binding = json!([{"event": "INSERT", "schema": "public", "table": "lookalike",
                              "filter": "at=eq.2025-03-04T10:00:00+xé"}]);
        let (status, message) = subscribe(&mut client, "lookalike", binding, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        c.psql("INSERT INTO public.lookalike VALUES (1, '2025-03-04T10:00:00é'), (2, '2025-03-04T10:00:00+xé')");
        let event = client.event().await;
        let record = &event[4]["data"]["record"];
        assert_eq!(record["id"], 2, "{event}");
        assert_eq!(record["at"], "2025-03-04T10:00:00+xé", "{event}");
    });
    assert_eq!(c.worker_pid(), Some(worker), "the worker restarted");
}

fn a_private_probe_runs_as_the_subscriber(ctx: &Ctx) {
    let c = &ctx.c;
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, response) = join_private(&mut client, "hers-1", &anon()).await;
        assert_eq!(status, "ok", "{response}");
    });
    let said = mallory_said(c, "a private probe");
    assert!(said.iter().any(|m| m == "a private probe ran as anon"), "{said:?}");
    assert!(!said.iter().any(|m| m.contains("ran as postgres")), "{said:?}");
    assert!(
        !said.iter().any(|m| m.starts_with("a private probe reset the role")),
        "{said:?}"
    );
    assert!(!is_superuser(c, "mallory"));
}

/// PostgreSQL 16 split membership: a role the authenticator is a member of
/// but may not SET ROLE to is not one a token may name.
fn a_membership_without_set_is_not_enough(ctx: &Ctx) {
    let c = &ctx.c;
    if c.major() < 16 {
        eprintln!("(PostgreSQL {}: no SET option on memberships; skipped)", c.major());
        return;
    }
    c.psql(
        "CREATE ROLE inherit_only NOLOGIN; GRANT inherit_only TO authenticator WITH SET FALSE; \
         GRANT SELECT ON mallory.notes TO inherit_only",
    );
    let binding = json!([{"event": "*", "schema": "mallory", "table": "notes"}]);
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, message) = subscribe(&mut client, "noset", binding, &token("inherit_only", 600)).await;
        assert_eq!(status, "error", "{message}");
        assert!(
            message.contains("GRANT \"inherit_only\" TO \"authenticator\""),
            "{message}"
        );
    });
}

/// A policy that sleeps is cancelled after pg_realtime.check_timeout: its
/// subscriber is told, and the worker goes on delivering (the row of an
/// unrelated table, committed after the slow one, arrives).
fn a_slow_policy_is_cancelled_and_its_subscribers_told(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql("ALTER SYSTEM SET pg_realtime.check_timeout = '300ms'");
    c.psql("SELECT pg_reload_conf()");
    c.psql(
        "SET ROLE mallory;
         CREATE TABLE mallory.slow (id bigserial PRIMARY KEY, body text);
         ALTER TABLE mallory.slow ENABLE ROW LEVEL SECURITY;
         CREATE POLICY sleepy ON mallory.slow FOR SELECT USING (pg_catalog.pg_sleep(30) IS NOT NULL);
         GRANT SELECT ON mallory.slow TO anon;
         RESET ROLE;
         ALTER PUBLICATION supabase_realtime ADD TABLE mallory.slow;",
    );
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let slow = json!([{"event": "INSERT", "schema": "mallory", "table": "slow"}]);
        let (status, message) = subscribe(&mut client, "slow", slow, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        let notes = json!([{"event": "INSERT", "schema": "mallory", "table": "notes"}]);
        let (status, message) = subscribe(&mut client, "after-slow", notes, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        let started = std::time::Instant::now();
        c.psql("INSERT INTO mallory.slow (body) VALUES ('checked too slowly')");
        c.psql("INSERT INTO mallory.notes (body) VALUES ('after the slow one')");
        // (the two may come in either order: different channels)
        let (mut told, mut after) = (false, false);
        while !(told && after) {
            let Some(frame) = client.recv_within(std::time::Duration::from_secs(5)).await else {
                let counters = c.psql("SELECT name, value FROM realtime.stats() WHERE value > 0");
                panic!("no frame in 5 s (told: {told}, delivered after it: {after}); counters:\n{counters}");
            };
            if frame[2] == "realtime:slow" && frame[3] == "system" {
                assert!(
                    frame[4]["message"].as_str().unwrap().contains("could not be checked"),
                    "{frame}"
                );
                told = true;
            }
            assert!(
                !(frame[2] == "realtime:slow" && frame[3] == "postgres_changes"),
                "{frame}"
            );
            after |= frame[2] == "realtime:after-slow" && frame[3] == "postgres_changes";
        }
        // (cancelled after about 300 ms, not after the policy's 30 s)
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // and for a minute the table's checks are refused: told again, at
        // once, the policy not run again
        c.psql("INSERT INTO mallory.slow (body) VALUES ('refused at once')");
        c.psql("INSERT INTO mallory.notes (body) VALUES ('after the refused one')");
        let (mut told, mut after) = (false, false);
        while !(told && after) {
            let frame = client.recv().await;
            assert!(
                !(frame[2] == "realtime:slow" && frame[3] == "postgres_changes"),
                "{frame}"
            );
            told |= frame[2] == "realtime:slow" && frame[3] == "system";
            after |= frame[2] == "realtime:after-slow" && frame[3] == "postgres_changes";
        }
    });
    let cancels = c.log().matches("canceling statement due to statement timeout").count();
    assert_eq!(cancels, 1, "the slow policy ran again");
    c.psql("ALTER SYSTEM RESET pg_realtime.check_timeout");
    c.psql("SELECT pg_reload_conf()");
}

/// A database owner may set a search_path that puts their schema before
/// pg_catalog; the worker's session sets its own, so an operator of theirs
/// never stands in for the catalog's in its superuser queries.
fn the_worker_ignores_a_search_path_set_for_the_database(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql(
        r#"SET ROLE mallory;
           CREATE FUNCTION mallory.name_eq_text(name, text) RETURNS boolean LANGUAGE plpgsql AS $$
           BEGIN PERFORM mallory.escalate('an operator'); RETURN $1::text = $2; END $$;
           CREATE OPERATOR mallory.= (LEFTARG = name, RIGHTARG = text, FUNCTION = mallory.name_eq_text);
           RESET ROLE;
           ALTER DATABASE postgres SET search_path = mallory, public, pg_catalog;"#,
    );
    let old = c.worker_pid().expect("the worker runs");
    c.psql(&format!("SELECT pg_terminate_backend({old})"));
    // the postmaster starts a new worker (after its restart time), which
    // connects with the database's search_path
    c.wait_for_a_new_worker(old);
    ctx.rt.block_on(async {
        // a private join resolves the role with a name = text comparison
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, response) = join_private(&mut client, "open-path", &anon()).await;
        assert_eq!(status, "ok", "{response}");
    });
    c.psql("ALTER DATABASE postgres RESET search_path");
    let said = mallory_said(c, "an operator");
    assert!(!said.iter().any(|m| m.contains("ran as postgres")), "{said:?}");
    assert!(!is_superuser(c, "mallory"));
}

/// A helper of a private channel's policy that names its table without a
/// schema and sets no search_path (common in Supabase projects) finds it:
/// the subscriber's code runs with the database's search_path.
fn a_private_policy_helper_sees_the_databases_search_path(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql(
        r#"CREATE TABLE public.room_members (topic text, member text);
           INSERT INTO public.room_members VALUES ('members-1', 'anon');
           GRANT SELECT ON public.room_members TO anon;
           CREATE FUNCTION public.is_member(t text) RETURNS boolean LANGUAGE sql STABLE
             AS 'SELECT EXISTS (SELECT 1 FROM room_members WHERE topic = t)';
           CREATE POLICY members_read ON realtime.messages FOR SELECT TO anon
             USING (realtime.topic() LIKE 'members%' AND public.is_member(realtime.topic()));"#,
    );
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, response) = join_private(&mut client, "members-1", &anon()).await;
        assert_eq!(status, "ok", "{response}");
        let (status, _) = join_private(&mut client, "members-2", &anon()).await;
        assert_eq!(status, "error");
    });
}

/// PostgreSQL 17's transaction_timeout, set by a policy, ends the worker
/// with a FATAL no one can catch. The postmaster starts it again (the
/// cluster stays), and the new worker refuses that table's checks for a
/// while, telling its subscribers, instead of ending again.
fn a_policy_that_ends_the_worker_is_refused_after(ctx: &Ctx) {
    let c = &ctx.c;
    if c.major() < 17 {
        eprintln!("(PostgreSQL {}: no transaction_timeout; skipped)", c.major());
        return;
    }
    let worker = c.worker_pid().expect("the worker runs");
    let started = c.psql("SELECT pg_postmaster_start_time()");
    c.psql(
        r#"SET ROLE mallory;
           CREATE FUNCTION mallory.short_fuse() RETURNS boolean LANGUAGE plpgsql AS $$
           BEGIN
             PERFORM pg_catalog.set_config('transaction_timeout', '1', true);
             PERFORM pg_catalog.pg_sleep(0.05);
             RETURN true;
           END $$;
           CREATE TABLE mallory.fused (id bigserial PRIMARY KEY, body text);
           ALTER TABLE mallory.fused ENABLE ROW LEVEL SECURITY;
           CREATE POLICY fused ON mallory.fused FOR SELECT USING (mallory.short_fuse());
           GRANT SELECT ON mallory.fused TO anon;
           RESET ROLE;
           ALTER PUBLICATION supabase_realtime ADD TABLE mallory.fused;"#,
    );
    let fused = json!([{"event": "INSERT", "schema": "mallory", "table": "fused"}]);
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, message) = subscribe(&mut client, "fused", fused.clone(), &anon()).await;
        assert_eq!(status, "ok", "{message}");
        c.psql("INSERT INTO mallory.fused (body) VALUES ('lit')");
        let (texts, _) = client.frames_until_close().await;
        assert!(texts.iter().all(|t| !t.contains("lit")), "{texts:?}");
    });
    let restarted = c.wait_for_a_new_worker(worker);
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let (status, message) = subscribe(&mut client, "fused-again", fused, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        let notes = json!([{"event": "INSERT", "schema": "mallory", "table": "notes"}]);
        let (status, message) = subscribe(&mut client, "notes-after", notes, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        c.psql("INSERT INTO mallory.fused (body) VALUES ('again')");
        c.psql("INSERT INTO mallory.notes (body) VALUES ('after the refused one')");
        let (mut told, mut after) = (false, false);
        while !(told && after) {
            let frame = client.recv().await;
            assert!(
                !(frame[2] == "realtime:fused-again" && frame[3] == "postgres_changes"),
                "{frame}"
            );
            told |= frame[2] == "realtime:fused-again" && frame[3] == "system";
            after |= frame[2] == "realtime:notes-after" && frame[3] == "postgres_changes";
        }
    });
    assert_eq!(c.worker_pid(), Some(restarted), "the worker ended again");
    assert_eq!(c.psql("SELECT pg_postmaster_start_time()"), started);
    let log = c.log();
    assert!(
        log.contains("the previous worker ended while running code of mallory.fused"),
        "{log}"
    );
}

/// A policy that catches its own cancel and goes on waiting cannot hold
/// the worker for good: past twice pg_realtime.check_timeout and two
/// seconds, the worker ends (a FATAL, not a crash: the cluster stays) and
/// the postmaster starts it again.
fn a_policy_that_catches_its_cancel_ends_the_worker_not_the_cluster(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql("ALTER SYSTEM SET pg_realtime.check_timeout = '300ms'");
    c.psql("SELECT pg_reload_conf()");
    c.psql(
        r#"SET ROLE mallory;
           CREATE FUNCTION mallory.stubborn() RETURNS boolean LANGUAGE plpgsql AS $$
           BEGIN
             LOOP
               BEGIN
                 PERFORM pg_catalog.pg_sleep(1);
               EXCEPTION WHEN query_canceled THEN
                 NULL;
               END;
             END LOOP;
           END $$;
           CREATE TABLE mallory.stuck (id bigserial PRIMARY KEY, body text);
           ALTER TABLE mallory.stuck ENABLE ROW LEVEL SECURITY;
           CREATE POLICY stubborn ON mallory.stuck FOR SELECT USING (mallory.stubborn());
           GRANT SELECT ON mallory.stuck TO anon;
           RESET ROLE;
           ALTER PUBLICATION supabase_realtime ADD TABLE mallory.stuck;"#,
    );
    let worker = c.worker_pid().expect("the worker runs");
    let started = c.psql("SELECT pg_postmaster_start_time()");
    let began = std::time::Instant::now();
    ctx.rt.block_on(async {
        let mut client = Client::connect(c.ws_port, &anon()).await;
        let binding = json!([{"event": "INSERT", "schema": "mallory", "table": "stuck"}]);
        let (status, message) = subscribe(&mut client, "stuck", binding, &anon()).await;
        assert_eq!(status, "ok", "{message}");
        c.psql("INSERT INTO mallory.stuck (body) VALUES ('never decided')");
        // the worker ends: the socket closes, with no event first
        let (texts, _) = client.frames_until_close().await;
        assert!(texts.iter().all(|t| !t.contains("never decided")), "{texts:?}");
    });
    c.wait_for_a_new_worker(worker);
    eprintln!("a new worker after {:?}", began.elapsed());
    assert_eq!(c.psql("SELECT pg_postmaster_start_time()"), started);
    let log = c.log();
    assert!(log.contains("terminating background worker"), "{log}");
    assert!(!log.contains("terminating any other active server processes"), "{log}");
    assert!(
        log.contains("the previous worker ended while running code of mallory.stuck"),
        "{log}"
    );
    c.psql("ALTER SYSTEM RESET pg_realtime.check_timeout");
    c.psql("SELECT pg_reload_conf()");
}

/// Two subscribers' tokens for `mallory.inbox`: its policy lets each see
/// the rows addressed to its `sub` claim.
fn inbox_reader(sub: &str) -> String {
    token_with(
        SECRET,
        json!({"role": "authenticated", "sub": sub, "exp": now() + 3600}),
    )
}

/// Rows for A, then B, then A again: each subscriber's next event must be
/// its own row (B's own row is the sentinel that proves A's first did not
/// reach B; A's second, that B's did not reach A).
async fn each_sees_only_its_own(c: &Cluster, a: &mut Client, b: &mut Client, round: &str) {
    c.psql(&format!(
        "INSERT INTO mallory.inbox (recipient, body) VALUES ('reader-a', 'a1 {round}');
         INSERT INTO mallory.inbox (recipient, body) VALUES ('reader-b', 'b1 {round}');
         INSERT INTO mallory.inbox (recipient, body) VALUES ('reader-a', 'a2 {round}');"
    ));
    for (client, want) in [(a, ["a1", "a2"].as_slice()), (b, ["b1"].as_slice())] {
        for want in want {
            let event = client.event().await;
            assert_eq!(event[4]["data"]["record"]["body"], format!("{want} {round}"), "{event}");
        }
    }
}

/// A plan shared between subscribers would fold a policy helper wrongly
/// marked IMMUTABLE with the first subscriber's claims; the worker must
/// not share plans while such a helper exists, nor after one is made so.
fn a_policy_helper_wrongly_marked_immutable_sees_each_subscriber(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql(
        "SET ROLE mallory;
         CREATE FUNCTION mallory.reader() RETURNS text LANGUAGE sql STABLE
           AS $$ SELECT pg_catalog.current_setting('request.jwt.claim.sub', true) $$;
         CREATE TABLE mallory.inbox (id bigserial PRIMARY KEY, recipient text, body text);
         ALTER TABLE mallory.inbox ENABLE ROW LEVEL SECURITY;
         CREATE POLICY addressed ON mallory.inbox FOR SELECT USING (recipient = mallory.reader());
         GRANT SELECT ON mallory.inbox TO authenticated;
         RESET ROLE;
         GRANT authenticated TO authenticator;
         ALTER PUBLICATION supabase_realtime ADD TABLE mallory.inbox;",
    );
    ctx.rt.block_on(async {
        let binding = json!([{"event": "INSERT", "schema": "mallory", "table": "inbox"}]);
        let (ta, tb) = (inbox_reader("reader-a"), inbox_reader("reader-b"));
        let mut a = Client::connect(c.ws_port, &ta).await;
        let mut b = Client::connect(c.ws_port, &tb).await;
        assert_eq!(subscribe(&mut a, "inbox", binding.clone(), &ta).await.0, "ok");
        assert_eq!(subscribe(&mut b, "inbox", binding, &tb).await.0, "ok");
        // correctly marked STABLE: read again for every subscriber
        each_sees_only_its_own(c, &mut a, &mut b, "stable").await;
        // made IMMUTABLE after plans were kept, then a new helper so from
        // the start
        c.psql("SET ROLE mallory; ALTER FUNCTION mallory.reader() IMMUTABLE;");
        each_sees_only_its_own(c, &mut a, &mut b, "altered").await;
        c.psql(
            "SET ROLE mallory;
             CREATE FUNCTION mallory.reader2() RETURNS text LANGUAGE plpgsql IMMUTABLE
               AS $$ BEGIN RETURN pg_catalog.current_setting('request.jwt.claim.sub', true); END $$;
             ALTER POLICY addressed ON mallory.inbox USING (recipient = mallory.reader2());",
        );
        each_sees_only_its_own(c, &mut a, &mut b, "created").await;
        // an extension's member counts too (a function changed, so that
        // the guard is read again at once)
        c.psql(
            "ALTER FUNCTION mallory.reader() STABLE;
             ALTER EXTENSION pg_realtime ADD FUNCTION mallory.reader2();
             ALTER FUNCTION mallory.reader2() COST 101;",
        );
        each_sees_only_its_own(c, &mut a, &mut b, "extension").await;
        c.psql(
            "ALTER EXTENSION pg_realtime DROP FUNCTION mallory.reader2();
             ALTER FUNCTION mallory.reader2() STABLE;",
        );
    });
}

/// A policy that reads another table sees that table through the
/// policies of the subscriber's role and memberships: a plan kept from
/// before a membership was revoked must not keep what it let through.
fn a_revoked_membership_hides_what_a_policy_read_through_it(ctx: &Ctx) {
    let c = &ctx.c;
    c.psql(
        "CREATE ROLE staff NOLOGIN;
         CREATE ROLE support NOLOGIN;
         GRANT staff TO support;
         GRANT support TO authenticator;
         GRANT USAGE ON SCHEMA mallory TO support;
         SET ROLE mallory;
         CREATE TABLE mallory.rooms (room text);
         ALTER TABLE mallory.rooms ENABLE ROW LEVEL SECURITY;
         CREATE POLICY staff_all ON mallory.rooms FOR SELECT TO staff USING (true);
         INSERT INTO mallory.rooms VALUES ('r1');
         CREATE TABLE mallory.room_notes (id bigserial PRIMARY KEY, room text, body text);
         ALTER TABLE mallory.room_notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY in_room ON mallory.room_notes FOR SELECT
           USING (EXISTS (SELECT FROM mallory.rooms r WHERE r.room = room_notes.room));
         CREATE POLICY open ON mallory.room_notes FOR SELECT USING (room = 'open');
         GRANT SELECT ON mallory.rooms, mallory.room_notes TO support;
         RESET ROLE;
         ALTER PUBLICATION supabase_realtime ADD TABLE mallory.room_notes;",
    );
    let note = |room: &str, body: &str| {
        c.psql(&format!(
            "INSERT INTO mallory.room_notes (room, body) VALUES ('{room}', '{body}')"
        ))
    };
    ctx.rt.block_on(async {
        let tok = token_with(SECRET, json!({"role": "support", "exp": now() + 3600}));
        let mut client = Client::connect(c.ws_port, &tok).await;
        let binding = json!([{"event": "INSERT", "schema": "mallory", "table": "room_notes"}]);
        assert_eq!(subscribe(&mut client, "rooms", binding, &tok).await.0, "ok");
        let mut next_body = async || client.event().await[4]["data"]["record"]["body"].clone();
        note("r1", "seen");
        assert_eq!(next_body().await, "seen");
        // (the second check runs on the plan kept by the first)
        let planned = c.stat("rls_checks_planned");
        note("r1", "seen again");
        assert_eq!(next_body().await, "seen again");
        assert_eq!(c.stat("rls_checks_planned"), planned, "a kept plan was not used");
        c.psql("REVOKE staff FROM support");
        note("r1", "hidden");
        note("open", "sentinel");
        assert_eq!(next_body().await, "sentinel");
        assert!(c.stat("rls_checks_planned") > planned, "the kept plan was not let go");
    });
}
