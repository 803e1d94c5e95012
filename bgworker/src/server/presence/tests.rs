use super::*;
use crate::server::fanout::{Budget, FanoutReceiver};
use serde_json::json;

fn member(connection: u64) -> (Member, FanoutReceiver) {
    let (tx, rx) = Budget::new(1 << 20, 1 << 30).queue();
    (Member { connection, tx }, rx)
}

fn map(v: Value) -> Map<String, Value> {
    v.as_object().expect("an object").clone()
}

/// The payload of the next queued message, which must be a presence_diff.
fn diff(rx: &mut FanoutReceiver) -> Value {
    let out = rx.try_recv().expect("a diff is queued");
    let Outbound::Frame(Frame {
        event,
        topic,
        payload: Payload::Text(t),
        ..
    }) = &*out
    else {
        panic!("not a diff: {out:?}");
    };
    assert_eq!((event.as_str(), topic.as_str()), ("presence_diff", "realtime:room"));
    serde_json::from_str(t.get()).unwrap()
}

/// Listens on "room" and returns the state queued for it.
fn state(p: &Presences, connection: u64) -> (Value, FanoutReceiver) {
    let (m, mut rx) = member(connection);
    p.listen("room", "realtime:room", "1", m);
    (queued_state(&mut rx), rx)
}

/// The next queued message, which must be a presence_state; its payload.
fn queued_state(rx: &mut FanoutReceiver) -> Value {
    let out = rx.try_recv().expect("a state is queued");
    let Outbound::Frame(Frame {
        event,
        join_ref,
        payload: Payload::Text(t),
        ..
    }) = &*out
    else {
        panic!("not a state: {out:?}");
    };
    assert_eq!((event.as_str(), join_ref.as_deref()), ("presence_state", Some("1")));
    serde_json::from_str(t.get()).unwrap()
}

const MAX: PresenceBounds = PresenceBounds {
    max_bytes: 1 << 20,
    max_bytes_per_connection: 1 << 20,
};

#[test]
fn track_retrack_and_untrack_are_diffs_every_listener_sees() {
    let p = Presences::default();
    let (empty, mut a) = state(&p, 1);
    assert_eq!(empty, json!({}));
    p.track("room", "realtime:room", "u1", 1, &map(json!({"name": "a"})), MAX)
        .unwrap();
    let joined = diff(&mut a);
    let metas = &joined["joins"]["u1"]["metas"];
    assert_eq!(metas[0]["name"], "a");
    let first_ref = metas[0]["phx_ref"].as_str().unwrap().to_owned();
    assert_eq!(joined["leaves"], json!({}));

    // a listener joining now starts from the state, then hears what follows
    let (now, mut b) = state(&p, 2);
    assert_eq!(now["u1"]["metas"][0]["phx_ref"], first_ref.as_str());
    // the same payload again changes nothing
    p.track("room", "realtime:room", "u1", 1, &map(json!({"name": "a"})), MAX)
        .unwrap();
    // a new one is a leave of the old meta and a join with phx_ref_prev
    p.track(
        "room",
        "realtime:room",
        "u1",
        1,
        &map(json!({"name": "a2", "phx_ref": "forged"})),
        MAX,
    )
    .unwrap();
    for rx in [&mut a, &mut b] {
        let d = diff(rx);
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], first_ref.as_str());
        let new = &d["joins"]["u1"]["metas"][0];
        assert_eq!(new["phx_ref_prev"], first_ref.as_str());
        assert_ne!(new["phx_ref"], first_ref.as_str());
        assert_ne!(new["phx_ref"], "forged");
        assert_eq!(new["name"], "a2");
        assert!(rx.try_recv().is_none(), "one diff per change");
    }
    p.untrack("room", 1);
    assert_eq!(diff(&mut b)["leaves"]["u1"]["metas"][0]["name"], "a2");
    assert_eq!(diff(&mut a)["joins"], json!({}));
    assert_eq!(p.bytes(), 0);
    // untracking what is not tracked says nothing
    p.untrack("room", 1);
    assert!(b.try_recv().is_none());
}

#[test]
fn two_tabs_share_a_key_and_leave_one_at_a_time() {
    let p = Presences::default();
    let (_, mut watcher) = state(&p, 9);
    p.track("room", "realtime:room", "u1", 1, &map(json!({"tab": 1})), MAX)
        .unwrap();
    p.track("room", "realtime:room", "u1", 2, &map(json!({"tab": 2})), MAX)
        .unwrap();
    let (both, _other) = state(&p, 8);
    let tabs: Vec<i64> = both["u1"]["metas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["tab"].as_i64().unwrap())
        .collect();
    assert_eq!(tabs, [1, 2]);
    p.untrack("room", 1);
    let (one, _third) = state(&p, 7);
    assert_eq!(one["u1"]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(one["u1"]["metas"][0]["tab"], 2);
    assert_eq!(diff(&mut watcher)["joins"]["u1"]["metas"][0]["tab"], 1);
}

#[test]
fn topics_are_apart_and_state_is_bounded_in_bytes() {
    let p = Presences::default();
    let (_, mut public) = state(&p, 1);
    let (m, mut private) = member(2);
    p.listen("private\0realtime:room", "realtime:room", "1", m);
    assert_eq!(queued_state(&mut private), json!({}));
    p.track("private\0realtime:room", "realtime:room", "k", 3, &map(json!({})), MAX)
        .unwrap();
    assert!(public.try_recv().is_none());
    assert_eq!(
        diff(&mut private)["joins"]["k"]["metas"][0].as_object().unwrap().len(),
        1
    );
    let big = map(json!({"blob": "x".repeat(2000)}));
    let max = PresenceBounds {
        max_bytes: p.bytes() + 1000,
        ..MAX
    };
    assert_eq!(
        p.track("room", "realtime:room", "k", 4, &big, max),
        Err(PresenceError::StateFull { max: max.max_bytes })
    );
    // a refused re-track keeps the old meta
    assert!(p
        .track("private\0realtime:room", "realtime:room", "k", 3, &big, max)
        .is_err());
    let kept = {
        let (m, mut rx) = member(5);
        p.listen("private\0realtime:room", "realtime:room", "1", m);
        queued_state(&mut rx)
    };
    assert!(kept["k"]["metas"][0].get("blob").is_none());
    p.untrack("private\0realtime:room", 3);
    assert_eq!(p.bytes(), 0);
}

#[test]
fn one_connection_may_hold_only_its_share() {
    let p = Presences::default();
    let (_, mut watcher) = state(&p, 9);
    let small = PresenceBounds {
        max_bytes: 1 << 20,
        max_bytes_per_connection: 1000,
    };
    let blob = map(json!({"blob": "x".repeat(600)}));
    p.track("room", "realtime:room", "a", 1, &blob, small).unwrap();
    diff(&mut watcher);
    // a second channel of the same connection would pass its share
    assert_eq!(
        p.track("other", "realtime:other", "a", 1, &blob, small),
        Err(PresenceError::ConnectionFull { max: 1000 })
    );
    // another connection still may; and a re-track of the same meta fits
    p.track("room", "realtime:room", "b", 2, &blob, small).unwrap();
    p.track(
        "room",
        "realtime:room",
        "a",
        1,
        &map(json!({"blob": "y".repeat(600)})),
        small,
    )
    .unwrap();
    p.untrack("room", 1);
    p.untrack("room", 2);
    assert_eq!(p.bytes(), 0);
}
