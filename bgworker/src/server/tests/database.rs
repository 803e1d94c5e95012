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
            .broadcast_from_database(&from_db("room", true, json_payload.clone())),
        0
    );
    server
        .ctx
        .broadcast_from_database(&from_db("room", false, json_payload));
    server
        .ctx
        .broadcast_from_database(&from_db("room", false, DbPayload::Binary(vec![1, 2])));
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
    heartbeat_ok(&mut other, "2").await;
    server.stop().await;
}
