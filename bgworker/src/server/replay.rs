//! Broadcast replay (`docs/protocol.md`, "Replay"): the broadcasts sent
//! from the database to private topics, kept in the worker's memory,
//! bounded in count, bytes and age (`pg_realtime.replay_*`), for a private
//! join with `config.broadcast.replay: {since, limit}` to get the newest
//! of them again after its reply. A worker restart empties it.
//!
//! A message is fanned out and stored under one lock, and a replaying
//! channel joins the hub and reads the store under it too: each message
//! reaches it exactly once, replayed or live.

use crate::server::protocol::{JsonText, Outbound, Payload};
use crate::shared::wire::DbPayload;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

/// What one stored message costs besides its fields.
const OVERHEAD: usize = 96;

/// Messages one join may ask to replay (Supabase allows 25), and how many
/// it gets when it does not say.
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 10;

/// Which stored messages a join asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Committed at this time or later (Unix ms; the age bound applied).
    pub since_ms: i64,
    /// The newest this many.
    pub limit: usize,
}

/// The `limit` of a join's `replay`, clamped to 1..=`MAX_LIMIT`.
pub fn limit(asked: Option<i64>) -> usize {
    asked.map_or(DEFAULT_LIMIT, |n| n.clamp(1, MAX_LIMIT as i64) as usize)
}

/// A kept broadcast.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The topic without `realtime:`.
    pub topic: String,
    pub event: String,
    pub id: String,
    /// Its commit time, milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub payload: Arc<DbPayload>,
}

impl Stored {
    fn bytes(&self) -> usize {
        let payload = match &*self.payload {
            DbPayload::Json(text) => text.len(),
            DbPayload::Binary(bytes) => bytes.len(),
        };
        OVERHEAD + self.topic.len() + self.event.len() + self.id.len() + payload
    }
}

/// The store's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub max_age_ms: i64,
}

impl Stored {
    /// The message as a replay sends it, after the join reply: pushed with
    /// the join's ref, `meta: {"replayed": true, "id": ..}`; a binary
    /// payload as kind 4.
    /// (`None`: a payload that is not JSON, which was not delivered live
    /// either.)
    pub fn replayed(&self, join_ref: &str, wire_topic: &str) -> Option<Outbound> {
        let meta = serde_json::json!({"replayed": true, "id": self.id});
        Some(match &*self.payload {
            DbPayload::Json(text) => {
                let body = format!(
                    r#"{{"type":"broadcast","event":{},"payload":{text},"meta":{meta}}}"#,
                    serde_json::Value::from(self.event.as_str())
                );
                Outbound::push_text(join_ref, wire_topic, "broadcast", JsonText::parse(body).ok()?)
            }
            DbPayload::Binary(bytes) => Outbound::Broadcast {
                topic: wire_topic.to_owned(),
                event: self.event.clone(),
                metadata: Some(meta),
                payload: Payload::Binary(bytes.clone()),
                encoded: Default::default(),
            },
        })
    }
}

#[derive(Default)]
struct Inner {
    /// Oldest first.
    messages: VecDeque<Stored>,
    bytes: usize,
}

#[derive(Default)]
pub struct ReplayStore {
    inner: Mutex<Inner>,
}

impl ReplayStore {
    /// Runs `deliver` (the fan-out of `message`) and keeps the message,
    /// dropping the oldest past `bounds`; all under the store's lock.
    pub fn deliver_and_keep(&self, message: Stored, bounds: Bounds, now_ms: i64, deliver: impl FnOnce()) {
        let mut inner = self.inner.lock();
        deliver();
        if bounds.max_messages == 0 || message.bytes() > bounds.max_bytes {
            return;
        }
        inner.bytes += message.bytes();
        inner.messages.push_back(message);
        while let Some(oldest) = inner.messages.front() {
            let over = inner.messages.len() > bounds.max_messages
                || inner.bytes > bounds.max_bytes
                || oldest.at_ms < now_ms - bounds.max_age_ms;
            if !over {
                break;
            }
            let oldest = inner.messages.pop_front().expect("a front");
            inner.bytes -= oldest.bytes();
        }
    }

    /// Hands `join` (the channel joining the hub and queueing its replay)
    /// the newest `range.limit` messages of `topic` committed at
    /// `range.since_ms` or later, oldest first; under the store's lock.
    pub fn join_and_replay(&self, topic: &str, range: Range, join: impl FnOnce(&[&Stored])) {
        let inner = self.inner.lock();
        let mut newest: Vec<&Stored> = inner
            .messages
            .iter()
            .rev()
            .filter(|m| m.topic == topic && m.at_ms >= range.since_ms)
            .take(range.limit)
            .collect();
        newest.reverse();
        join(&newest);
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, n: i64) -> Stored {
        Stored {
            topic: topic.into(),
            event: "e".into(),
            id: format!("id-{n}"),
            at_ms: n,
            payload: Arc::new(DbPayload::Json(format!("{{\"n\":{n}}}"))),
        }
    }

    const WIDE: Bounds = Bounds {
        max_messages: 100,
        max_bytes: 1 << 20,
        max_age_ms: 1_000_000,
    };

    /// The ids a join of `topic` gets replayed.
    fn replay(store: &ReplayStore, topic: &str, since_ms: i64, limit: usize) -> Vec<String> {
        let mut got = Vec::new();
        store.join_and_replay(topic, Range { since_ms, limit }, |m| {
            got = m.iter().map(|m| m.id.clone()).collect();
        });
        got
    }

    #[test]
    fn replays_the_newest_of_a_topic_since_oldest_first() {
        let store = ReplayStore::default();
        for n in 1..=6 {
            let topic = if n % 2 == 0 { "even" } else { "odd" };
            store.deliver_and_keep(message(topic, n), WIDE, n, || {});
        }
        assert_eq!(replay(&store, "even", 0, 2), ["id-4", "id-6"]);
        assert_eq!(replay(&store, "even", 3, 10), ["id-4", "id-6"]);
        assert_eq!(replay(&store, "even", 5, 10), ["id-6"]);
        assert!(replay(&store, "none", 0, 10).is_empty());
    }

    #[test]
    fn bounds_drop_the_oldest() {
        let store = ReplayStore::default();
        let few = Bounds {
            max_messages: 3,
            ..WIDE
        };
        for n in 1..=5 {
            store.deliver_and_keep(message("t", n), few, n, || {});
        }
        assert_eq!(replay(&store, "t", 0, 10), ["id-3", "id-4", "id-5"]);
        let one = message("t", 9).bytes();
        let small = Bounds {
            max_bytes: one * 2,
            ..WIDE
        };
        store.deliver_and_keep(message("t", 9), small, 9, || {});
        assert_eq!(replay(&store, "t", 0, 10), ["id-5", "id-9"]);
        assert_eq!(store.bytes(), message("t", 5).bytes() + one);
        let young = Bounds { max_age_ms: 10, ..WIDE };
        store.deliver_and_keep(message("t", 100), young, 100, || {});
        assert_eq!(replay(&store, "t", 0, 10), ["id-100"]);
        // one too large for the store is delivered, not kept
        let mut delivered = false;
        let tiny = Bounds { max_bytes: 10, ..WIDE };
        store.deliver_and_keep(message("t", 101), tiny, 101, || delivered = true);
        assert!(delivered);
        assert_eq!(replay(&store, "t", 0, 10), ["id-100"]);
    }
}
