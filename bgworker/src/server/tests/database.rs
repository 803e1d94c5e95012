//! Broadcasts from the database as the main thread hands them over.

use super::*;
use crate::shared::wire::{topic_loss_id, DbBroadcast, DbPayload};

fn from_db(topic: &str, private: bool, payload: DbPayload) -> DbBroadcast {
    DbBroadcast {
        topic: topic.into(),
        event: "INSERT".into(),
        id: "0b8e8a52-3b1d-4c4e-9a55-5d8f6b1f0c01".into(),
        private,
        payload,
    }
}

#[tokio::test]
async fn database_broadcasts_reach_their_topic_only_with_meta_id() {
    let server = TestServer::start().await;
    let mut v1 = server.connect_with(&token(60), Some("1.0.0")).await;
    let mut v2 = server.connect().await;
    let mut other = server.connect().await;
    send(
        &mut v1,
        json!({"topic": "realtime:room", "event": "phx_join", "payload": {}, "ref": "1"}),
    )
    .await;
    assert_eq!(recv(&mut v1).await["payload"]["status"], "ok");
    assert_eq!(join(&mut v2, "1", "realtime:room", json!({})).await[4]["status"], "ok");
    assert_eq!(
        join(&mut other, "1", "realtime:elsewhere", json!({})).await[4]["status"],
        "ok"
    );

    // a private topic of the same name has no members here
    let json_payload = DbPayload::Json(r#"{"n":1,"id":"x"}"#.into());
    assert_eq!(
        server
            .ctx
            .fan_out_from_database(&from_db("room", true, json_payload.clone())),
        0
    );
    server
        .ctx
        .broadcast_from_database(&from_db("room", false, json_payload), 0);
    server
        .ctx
        .broadcast_from_database(&from_db("room", false, DbPayload::Binary(vec![1, 2])), 0);
    let got = recv(&mut v1).await;
    assert_eq!(
        got["payload"],
        json!({"type": "broadcast", "event": "INSERT", "payload": {"n": 1, "id": "x"}, "meta": {"id": "0b8e8a52-3b1d-4c4e-9a55-5d8f6b1f0c01"}})
    );
    let first = recv_binary(&mut v2).await;
    assert_eq!(first[0], 4);
    assert!(String::from_utf8_lossy(&first).contains(r#"{"id":"0b8e8a52"#));
    assert_eq!(recv_binary(&mut v2).await.last(), Some(&2));

    // a loss noted under the topic's id tells its members, no one else;
    // the heartbeat reply shows nothing came before it
    server
        .ctx
        .announce_broadcast_loss(&[topic_loss_id("room", false)], false);
    let notice = recv(&mut v1).await;
    assert_eq!(notice["event"], "system");
    assert_eq!(notice["payload"]["extension"], "broadcast");
    assert_eq!(recv(&mut v2).await[4]["channel"], "room");
    // (a sentinel, sent after: the first thing `other` hears)
    server
        .ctx
        .broadcast_from_database(&from_db("elsewhere", false, DbPayload::Json("1".into())), 0);
    assert_eq!(recv_binary(&mut other).await.last(), Some(&b'1'));
    server.stop().await;
}

#[tokio::test]
async fn private_joins_replay_what_the_database_sent_then_hear_it_live() {
    let (waker, _wake_rx) = crate::server::wake::wake_pair().unwrap();
    let (link, rx) = link::main_link(waker);
    let rules: Rules = Arc::default();
    let read = link::Permissions {
        broadcast: true,
        presence: false,
    };
    rules.lock().unwrap().insert("member".into(), (read, false));
    rules.lock().unwrap().insert(
        "presence-only".into(),
        (
            link::Permissions {
                broadcast: false,
                presence: true,
            },
            false,
        ),
    );
    policy_main(rx, rules);
    let server = TestServer::with_main(settings(SECRET, 10, 10), Options::default(), Some(link)).await;
    let now_us = crate::server::database::now_ms() * 1000;
    for n in 1..=3 {
        let b = DbBroadcast {
            id: format!("id-{n}"),
            ..from_db("room", true, DbPayload::Json(format!(r#"{{"n":{n}}}"#)))
        };
        server.ctx.broadcast_from_database(&b, now_us + n);
    }
    let replay =
        |limit: i64| json!({"config": {"private": true, "broadcast": {"replay": {"since": 0, "limit": limit}}}});
    let mut member = server.connect_with(&user("member", 60), Some("2.0.0")).await;
    assert_eq!(
        join(&mut member, "7", "realtime:room", replay(2)).await[4]["status"],
        "ok"
    );
    for n in [2, 3] {
        let frame = recv(&mut member).await;
        assert_eq!(
            frame,
            json!(["7", null, "realtime:room", "broadcast",
                   {"type": "broadcast", "event": "INSERT", "payload": {"n": n}, "meta": {"replayed": true, "id": format!("id-{n}")}}])
        );
    }
    // what comes after the join is live, once
    server
        .ctx
        .broadcast_from_database(&from_db("room", true, DbPayload::Json(r#"{"n":4}"#.into())), now_us + 4);
    let live = recv_binary(&mut member).await;
    assert!(String::from_utf8_lossy(&live).ends_with(r#"{"n":4}"#));
    heartbeat_ok(&mut member, "9").await;

    // a public channel may not replay; nor a member who only reads presence
    let mut public = server.connect().await;
    let refused = join(
        &mut public,
        "1",
        "realtime:room",
        json!({"config": {"broadcast": {"replay": {"since": 0}}}}),
    )
    .await;
    assert_eq!(
        refused[4]["response"]["reason"],
        "UnableToReplayMessages: Replay is not allowed for public channels"
    );
    let mut presence_only = server.connect_with(&user("presence-only", 60), Some("2.0.0")).await;
    let refused = join(&mut presence_only, "1", "realtime:room", replay(5)).await;
    assert_eq!(refused[4]["status"], "error", "{refused}");
    server.stop().await;
}
