//! Broadcasts from the database (`realtime.send`, `docs/protocol.md`,
//! "Broadcast from the database"), fanned out by the worker's main thread
//! as it delivers each committed transaction: to the topic's members, on a
//! private topic those that may read its broadcasts, with `meta.id`.

use super::hub::hub_key;
use super::protocol::{JsonText, Outbound, Payload, TOPIC_PREFIX};
use super::replay::Stored;
use super::Context;
use crate::shared::stats::Counters;
use crate::shared::wire::{topic_loss_id, DbBroadcast, DbPayload};
use serde_json::json;
use std::sync::Arc;

/// Milliseconds since the Unix epoch, now.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Context {
    /// Sends `b` (committed at `commit_time_us`) to its topic's members,
    /// and keeps it for replay if its topic is private.
    pub fn broadcast_from_database(&self, b: &DbBroadcast, commit_time_us: i64) {
        if !b.private {
            self.fan_out_from_database(b);
            return;
        }
        let stored = Stored {
            topic: b.topic.clone(),
            event: b.event.clone(),
            id: b.id.clone(),
            at_ms: commit_time_us / 1000,
            payload: Arc::new(b.payload.clone()),
        };
        let bounds = self.settings().limits.replay;
        self.replay.deliver_and_keep(stored, bounds, now_ms(), || {
            self.fan_out_from_database(b);
        });
    }

    /// Sends `b` to its topic's members; returns how many were too far
    /// behind to take it (they are told and disconnected: `fanout`).
    pub(super) fn fan_out_from_database(&self, b: &DbBroadcast) -> usize {
        let payload = match &b.payload {
            DbPayload::Json(text) => match JsonText::parse(text.clone()) {
                Ok(text) => Payload::Text(text),
                // (a backend wrote it from a jsonb: not expected)
                Err(_) => return 0,
            },
            DbPayload::Binary(bytes) => Payload::Binary(bytes.clone()),
        };
        let topic = format!("{TOPIC_PREFIX}{}", b.topic);
        let key = hub_key(&topic, b.private);
        let out = Outbound::Broadcast {
            topic,
            event: b.event.clone(),
            metadata: Some(json!({ "id": b.id })),
            payload,
            encoded: Default::default(),
        };
        Counters::incr(&self.counters.broadcasts_sent);
        self.hub.send(&key, None, out)
    }

    /// Tells the members of every topic whose broadcasts from the database
    /// were lost (noted under `ids`, see `topic_loss_id`; every topic with
    /// `all`) that some may not have been delivered.
    pub fn announce_broadcast_loss(&self, ids: &[u32], all: bool) {
        let message = "Some broadcasts from the database may not have been delivered (the realtime queue \
                       overflowed): refetch to catch up";
        let wanted = |topic: &str, private: bool| {
            let subtopic = topic.strip_prefix(TOPIC_PREFIX).unwrap_or(topic);
            all || ids.contains(&topic_loss_id(subtopic, private))
        };
        self.hub.notify(wanted, |topic| {
            let subtopic = topic.strip_prefix(TOPIC_PREFIX).unwrap_or(topic);
            Outbound::system(None, topic, "broadcast", "error", message, subtopic)
        });
    }
}
