//! Presence and the broadcast limits, between real sockets.

use super::*;

fn presence_join(key: &str) -> Value {
    json!({"config": {"presence": {"key": key, "enabled": true}}})
}

fn track(join_ref: &str, r: &str, topic: &str, payload: Value) -> Value {
    json!([join_ref, r, topic, "presence", {"type": "presence", "event": "track", "payload": payload}])
}

/// Joins `topic` with presence on and returns the state it starts from.
async fn join_presence(c: &mut Client, topic: &str, key: &str) -> Value {
    let reply = join(c, "1", topic, presence_join(key)).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let state = recv(c).await;
    assert_eq!(state[3], "presence_state", "{state}");
    state[4].clone()
}

/// The next frame, which must be a presence_diff; its payload.
async fn diff(c: &mut Client) -> Value {
    let d = recv(c).await;
    assert_eq!((&d[0], &d[3]), (&Value::Null, &json!("presence_diff")), "{d}");
    d[4].clone()
}

async fn reply_status(c: &mut Client, r: &str) -> Value {
    let reply = recv(c).await;
    assert_eq!((&reply[1], &reply[3]), (&json!(r), &json!("phx_reply")), "{reply}");
    reply[4].clone()
}

/// (Longer than a screen: one scenario, tracked step by step.)
#[tokio::test]
async fn presence_syncs_members_retracks_and_leaves_on_a_dropped_socket() {
    let server = TestServer::start().await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    assert_eq!(join_presence(&mut a, "realtime:room", "a").await, json!({}));
    assert_eq!(join_presence(&mut b, "realtime:room", "").await, json!({}));

    send(&mut a, track("1", "2", "realtime:room", json!({"name": "a"}))).await;
    assert_eq!(reply_status(&mut a, "2").await["status"], "ok");
    // the tracker hears its own join, as everyone does
    let first = diff(&mut a).await;
    assert_eq!(diff(&mut b).await, first);
    let a_ref = first["joins"]["a"]["metas"][0]["phx_ref"].as_str().unwrap().to_owned();
    assert_eq!(first["joins"]["a"]["metas"][0]["name"], "a");

    // b has no key of its own: the server made one up
    send(&mut b, track("1", "2", "realtime:room", json!({"name": "b"}))).await;
    assert_eq!(reply_status(&mut b, "2").await["status"], "ok");
    let joined = diff(&mut b).await;
    assert_eq!(diff(&mut a).await, joined);
    let b_key = joined["joins"].as_object().unwrap().keys().next().unwrap().clone();
    assert_eq!(b_key.len(), 36, "a UUID: {b_key}");

    // a later joiner starts from both members
    let mut c = server.connect().await;
    let state = join_presence(&mut c, "realtime:room", "c").await;
    assert_eq!(state["a"]["metas"][0]["name"], "a");
    assert_eq!(state[&b_key]["metas"][0]["name"], "b");

    // the same payload again is no change: the heartbeat reply comes first
    send(&mut a, track("1", "3", "realtime:room", json!({"name": "a"}))).await;
    assert_eq!(reply_status(&mut a, "3").await["status"], "ok");
    heartbeat_ok(&mut a, "4").await;
    // a new one replaces the meta: a leave and a join naming the old ref
    send(&mut a, track("1", "5", "realtime:room", json!({"name": "a2"}))).await;
    assert_eq!(reply_status(&mut a, "5").await["status"], "ok");
    let changed = diff(&mut c).await;
    assert_eq!(diff(&mut a).await, changed);
    assert_eq!(changed["leaves"]["a"]["metas"][0]["phx_ref"], a_ref.as_str());
    assert_eq!(changed["joins"]["a"]["metas"][0]["phx_ref_prev"], a_ref.as_str());
    assert_eq!(changed["joins"]["a"]["metas"][0]["name"], "a2");

    // b's socket drops without a leave: everyone hears b leave
    drop(b);
    let left = diff(&mut c).await;
    assert_eq!(left["leaves"][&b_key]["metas"][0]["name"], "b");
    assert_eq!(left["joins"], json!({}));
    assert_eq!(diff(&mut a).await, left);
    // a untracks: a leave, and the state is empty for the next joiner
    send(
        &mut a,
        json!(["1", "6", "realtime:room", "presence", {"type": "presence", "event": "UNTRACK"}]),
    )
    .await;
    assert_eq!(reply_status(&mut a, "6").await["status"], "ok");
    assert_eq!(diff(&mut c).await["leaves"]["a"]["metas"][0]["name"], "a2");
    let mut d = server.connect().await;
    assert_eq!(join_presence(&mut d, "realtime:room", "d").await, json!({}));
    assert_eq!(server.ctx.presences.bytes(), 0);
    server.stop().await;
}

#[tokio::test]
async fn two_tabs_with_one_key_leave_one_at_a_time() {
    let server = TestServer::start().await;
    let mut watcher = server.connect().await;
    join_presence(&mut watcher, "realtime:room", "w").await;
    let mut tabs = Vec::new();
    for tab in 1..=2 {
        let mut c = server.connect().await;
        // (a tab that does not listen still shows up to those who do)
        assert_eq!(
            join(
                &mut c,
                "1",
                "realtime:room",
                json!({"config": {"presence": {"key": "u"}}})
            )
            .await[4]["status"],
            "ok"
        );
        send(&mut c, track("1", "2", "realtime:room", json!({"tab": tab}))).await;
        assert_eq!(reply_status(&mut c, "2").await["status"], "ok");
        assert_eq!(diff(&mut watcher).await["joins"]["u"]["metas"][0]["tab"], tab);
        tabs.push(c);
    }
    send(&mut tabs[0], json!(["1", "3", "realtime:room", "phx_leave", {}])).await;
    let left = diff(&mut watcher).await;
    assert_eq!(left["leaves"]["u"]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(left["leaves"]["u"]["metas"][0]["tab"], 1);
    let mut late = server.connect().await;
    let state = join_presence(&mut late, "realtime:room", "l").await;
    assert_eq!(state["u"]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(state["u"]["metas"][0]["tab"], 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_presence_messages_get_error_replies() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    join_presence(&mut c, "realtime:room", "k").await;
    send(&mut c, track("1", "2", "realtime:room", json!([1, 2]))).await;
    assert_eq!(
        reply_status(&mut c, "2").await,
        json!({"status": "error", "response": {"reason": "Presence track payload must be a map"}})
    );
    send(
        &mut c,
        json!(["1", "3", "realtime:room", "presence", {"type": "presence", "event": "dance"}]),
    )
    .await;
    assert_eq!(reply_status(&mut c, "3").await["status"], "error");
    // nothing was tracked: the next joiner sees an empty state
    let mut d = server.connect().await;
    assert_eq!(join_presence(&mut d, "realtime:room", "d").await, json!({}));
    server.stop().await;
}

fn limited(limits: Limits) -> Settings {
    Settings {
        limits,
        ..settings(SECRET, 100, 100)
    }
}

/// The channel's end for a reason: a `system` error, then `phx_close`.
async fn shut(c: &mut Client, message: &str) {
    let system = recv(c).await;
    assert_eq!(
        (&system[3], &system[4]["message"]),
        (&json!("system"), &json!(message)),
        "{system}"
    );
    assert_eq!(recv(c).await[3], "phx_close");
}

/// Frames until the channel is shut for `message`; how many `ok` replies
/// came before. (Sends are pipelined: a rate of a few a second is passed
/// in microseconds, however slow the machine.)
async fn oks_until_shut(c: &mut Client, message: &str) -> usize {
    let mut oks = 0;
    loop {
        let frame = recv(c).await;
        if frame[3] == "phx_reply" && frame[4]["status"] == "ok" {
            oks += 1;
        }
        if frame[3] == "system" {
            assert_eq!(frame[4]["message"], message, "{frame}");
            assert_eq!(recv(c).await[3], "phx_close");
            return oks;
        }
    }
}

#[tokio::test]
async fn presence_rate_and_track_size_close_the_channel() {
    let server = TestServer::with(
        limited(Limits {
            presence_per_second_per_connection: 2,
            max_presence_payload_bytes: 100,
            ..Limits::default()
        }),
        Options::default(),
    )
    .await;
    let mut c = server.connect().await;
    join_presence(&mut c, "realtime:room", "k").await;
    for r in 2..30 {
        send(&mut c, track("1", &r.to_string(), "realtime:room", json!({"n": r}))).await;
    }
    // a second's worth, then the end
    assert_eq!(oks_until_shut(&mut c, "Client presence rate limit exceeded").await, 2);
    assert_eq!(server.counter("rate_limited"), 1);

    let mut big = server.connect().await;
    join_presence(&mut big, "realtime:big", "k").await;
    send(
        &mut big,
        track("1", "2", "realtime:big", json!({"blob": "x".repeat(700)})),
    )
    .await;
    shut(&mut big, "Track message size exceeded").await;
    server.stop().await;
}

fn note(r: &str, text: &str) -> Value {
    json!(["1", r, "realtime:room", "broadcast", {"type": "broadcast", "event": "note", "payload": {"text": text}}])
}

#[tokio::test]
async fn oversized_broadcasts_are_refused_and_fast_senders_closed() {
    let server = TestServer::with(
        limited(Limits {
            max_payload_bytes: 1000,
            messages_per_second_per_connection: 3,
            ..Limits::default()
        }),
        Options::default(),
    )
    .await;
    let mut sender = server.connect().await;
    let mut hearer = server.connect_with(&token(60), Some("1.0.0")).await;
    let ack = json!({"config": {"broadcast": {"ack": true}}});
    assert_eq!(join(&mut sender, "1", "realtime:room", ack).await[4]["status"], "ok");
    send(
        &mut hearer,
        json!({"topic": "realtime:room", "event": "phx_join", "payload": {}, "ref": "1"}),
    )
    .await;
    assert_eq!(recv(&mut hearer).await["payload"]["status"], "ok");

    // 1,000 bytes and the 500 of slack pass; more does not
    send(&mut sender, note("2", &"x".repeat(1400))).await;
    assert_eq!(reply_status(&mut sender, "2").await["status"], "ok");
    send(&mut sender, note("3", &"x".repeat(1600))).await;
    assert_eq!(
        reply_status(&mut sender, "3").await,
        json!({"status": "error", "response": "payload_size_exceeded"})
    );
    send(&mut sender, note("4", "sentinel")).await;
    assert_eq!(reply_status(&mut sender, "4").await["status"], "ok");
    let first = recv(&mut hearer).await;
    assert_eq!(first["payload"]["payload"]["text"].as_str().unwrap().len(), 1400);
    // the refused one never arrives: the sentinel is next
    assert_eq!(recv(&mut hearer).await["payload"]["payload"]["text"], "sentinel");
    assert_eq!(server.counter("broadcasts_refused"), 1);

    // three a second: a burst is cut off after a second's worth
    let mut fast = server.connect().await;
    let ack = json!({"config": {"broadcast": {"ack": true}}});
    assert_eq!(join(&mut fast, "1", "realtime:room", ack).await[4]["status"], "ok");
    for r in 2..30 {
        send(&mut fast, note(&r.to_string(), "burst")).await;
    }
    assert_eq!(oks_until_shut(&mut fast, "Too many messages per second").await, 3);
    server.stop().await;
}

#[tokio::test]
async fn private_presence_follows_the_presence_policies() {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let rules: Rules = Arc::default();
    let read = |presence| link::Permissions {
        broadcast: true,
        presence,
    };
    rules.lock().unwrap().insert("member".into(), (read(true), true));
    rules.lock().unwrap().insert("reader".into(), (read(true), false));
    rules.lock().unwrap().insert("blind".into(), (read(false), true));
    policy_main(rx, rules);
    let server = TestServer::with_main(settings(SECRET, 10, 10), Options::default(), Some(link)).await;
    let private = json!({"config": {"private": true, "presence": {"key": "", "enabled": true}}});
    let mut member = server.connect_with(&user("member", 60), Some("2.0.0")).await;
    let mut reader = server.connect_with(&user("reader", 60), Some("2.0.0")).await;
    let mut blind = server.connect_with(&user("blind", 60), Some("2.0.0")).await;
    let mut public = server.connect().await;
    for c in [&mut member, &mut reader] {
        assert_eq!(join(c, "1", "realtime:room", private.clone()).await[4]["status"], "ok");
        assert_eq!(recv(c).await[3], "presence_state");
    }
    // without presence read: joined (broadcast read), no presence state
    assert_eq!(
        join(&mut blind, "1", "realtime:room", private.clone()).await[4]["status"],
        "ok"
    );
    join_presence(&mut public, "realtime:room", "p").await;

    send(&mut reader, track("1", "2", "realtime:room", json!({"who": "reader"}))).await;
    assert_eq!(reply_status(&mut reader, "2").await["status"], "error");
    send(&mut member, track("1", "2", "realtime:room", json!({"who": "member"}))).await;
    assert_eq!(reply_status(&mut member, "2").await["status"], "ok");
    assert_eq!(
        diff(&mut reader).await["joins"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()["metas"][0]["who"],
        "member"
    );
    // neither the public channel of that name nor the blind member hears
    // it: a broadcast sent after is the first thing each hears
    for (c, private) in [(&mut public, false), (&mut blind, true)] {
        let sentinel = crate::shared::wire::DbBroadcast {
            topic: "room".into(),
            event: "sentinel".into(),
            id: "s".into(),
            private,
            payload: crate::shared::wire::DbPayload::Json("1".into()),
        };
        server.ctx.broadcast_from_database(&sentinel, 0);
        let heard = recv_binary(c).await;
        assert!(String::from_utf8_lossy(&heard).contains("sentinel"), "{heard:?}");
    }
    server.stop().await;
}
