//! Presence state (`docs/protocol.md`, "Presence"): who is tracked on each
//! topic, under which key, and which channels hear about it. Every change
//! is made and fanned out under one lock, so every listener sees the same
//! diffs in the same order, and a channel that starts listening gets a
//! state that the diffs queued after it continue exactly.
//!
//! A meta is stored as the JSON text of its payload (a few bytes per byte),
//! and the whole state is bounded in bytes (`pg_realtime.max_presence_bytes`).

use super::hub::{send_to, Member};
use crate::server::protocol::{Frame, JsonText, Outbound, Payload};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// What a meta costs besides its key and payload.
const META_OVERHEAD: usize = 96;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PresenceError {
    #[error("Presence state is full (pg_realtime.max_presence_bytes is {max} bytes)")]
    StateFull { max: usize },
    #[error("This connection tracks too much presence (pg_realtime.max_presence_bytes_per_connection is {max} bytes)")]
    ConnectionFull { max: usize },
}

/// How much presence state may be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceBounds {
    /// Over all topics.
    pub max_bytes: usize,
    /// By one connection's channels together.
    pub max_bytes_per_connection: usize,
}

/// One tracked presence: a channel's (one connection's) meta under a key.
struct Meta {
    connection: u64,
    phx_ref: String,
    /// The ref this meta replaced, after a re-track.
    prev: Option<String>,
    /// The payload as compact JSON object text, without `phx_ref` keys.
    payload: String,
}

impl Meta {
    fn bytes(&self, key: &str) -> usize {
        META_OVERHEAD + key.len() + self.payload.len()
    }

    /// `{"phx_ref": .., ["phx_ref_prev": ..,] ..payload}` appended to `out`.
    fn render(&self, out: &mut String) {
        let _ = write!(out, "{{\"phx_ref\":{}", Value::from(self.phx_ref.as_str()));
        if let Some(prev) = &self.prev {
            let _ = write!(out, ",\"phx_ref_prev\":{}", Value::from(prev.as_str()));
        }
        let inner = &self.payload[1..self.payload.len() - 1];
        if !inner.is_empty() {
            out.push(',');
            out.push_str(inner);
        }
        out.push('}');
    }
}

/// A topic's presences and listeners.
#[derive(Default)]
struct Topic {
    /// The wire topic (`realtime:room`), which diffs carry.
    wire: String,
    listeners: Vec<Member>,
    metas: BTreeMap<String, Vec<Meta>>,
}

impl Topic {
    fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.metas.is_empty()
    }

    /// The position of `connection`'s meta, under which key.
    fn find(&self, connection: u64) -> Option<(&str, usize)> {
        self.metas.iter().find_map(|(key, metas)| {
            let i = metas.iter().position(|m| m.connection == connection)?;
            Some((key.as_str(), i))
        })
    }

    /// `{"key":{"metas":[...]},...}` for every key.
    fn state(&self) -> String {
        let mut out = String::from("{");
        for (i, (key, metas)) in self.metas.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let refs: Vec<&Meta> = metas.iter().collect();
            render_key(&mut out, key, &refs);
        }
        out.push('}');
        out
    }

    fn send_diff(&self, joins: Option<(&str, &Meta)>, leaves: Option<(&str, &Meta)>) {
        let mut out = String::from("{\"joins\":{");
        if let Some((key, meta)) = joins {
            render_key(&mut out, key, &[meta]);
        }
        out.push_str("},\"leaves\":{");
        if let Some((key, meta)) = leaves {
            render_key(&mut out, key, &[meta]);
        }
        out.push_str("}}");
        let Ok(text) = JsonText::parse(out) else {
            return;
        };
        let diff = Outbound::Frame(Frame {
            join_ref: None,
            msg_ref: None,
            topic: self.wire.clone(),
            event: "presence_diff".into(),
            payload: Payload::Text(text),
        });
        send_to(&self.listeners, None, diff);
    }
}

fn render_key(out: &mut String, key: &str, metas: &[&Meta]) {
    let _ = write!(out, "{}:{{\"metas\":[", Value::from(key));
    for (i, meta) in metas.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        meta.render(out);
    }
    out.push_str("]}");
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    usage: Usage,
}

/// The bytes the metas hold, in all and by connection.
#[derive(Default)]
struct Usage {
    bytes: usize,
    /// (connections with none are absent)
    by_connection: HashMap<u64, usize>,
}

impl Usage {
    fn add(&mut self, connection: u64, bytes: usize) {
        self.bytes += bytes;
        *self.by_connection.entry(connection).or_default() += bytes;
    }

    fn remove(&mut self, connection: u64, bytes: usize) {
        self.bytes -= bytes;
        if let Some(held) = self.by_connection.get_mut(&connection) {
            *held -= bytes;
            if *held == 0 {
                self.by_connection.remove(&connection);
            }
        }
    }

    /// Why `bytes` more for `connection` do not fit, if they do not.
    fn room_for(&self, connection: u64, bytes: usize, bounds: PresenceBounds) -> Result<(), PresenceError> {
        let held = self.by_connection.get(&connection).copied().unwrap_or(0);
        if held + bytes > bounds.max_bytes_per_connection {
            return Err(PresenceError::ConnectionFull {
                max: bounds.max_bytes_per_connection,
            });
        }
        if self.bytes + bytes > bounds.max_bytes {
            return Err(PresenceError::StateFull { max: bounds.max_bytes });
        }
        Ok(())
    }
}

/// Every topic's presences, shared by all connections.
pub struct Presences {
    state: Mutex<State>,
    next_ref: AtomicU64,
    /// Makes refs unique across worker restarts too.
    ref_prefix: String,
}

impl Default for Presences {
    fn default() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Presences {
            state: Mutex::default(),
            next_ref: AtomicU64::new(1),
            ref_prefix: format!("{nanos:x}"),
        }
    }
}

impl Presences {
    /// `member` hears the presences of `key` (a hub key) from now on,
    /// starting from the state now: queued for it (charged like any
    /// message) as `presence_state` with `join_ref`, before any diff.
    pub fn listen(&self, key: &str, wire: &str, join_ref: &str, member: Member) {
        let mut state = self.state.lock();
        let topic = state.topics.entry(key.to_owned()).or_default();
        topic.wire = wire.to_owned();
        topic.listeners.retain(|m| m.connection != member.connection);
        let now = JsonText::parse(topic.state()).unwrap_or_else(|_| JsonText::parse("{}".into()).expect("{} is JSON"));
        // (past the queue's limit by its own size at most: a large topic's
        // state still reaches a joiner; the total bound still holds)
        let _ = member
            .tx
            .send_allowing_itself(Arc::new(Outbound::push_text(join_ref, wire, "presence_state", now)));
        topic.listeners.push(member);
    }

    pub fn unlisten(&self, key: &str, connection: u64) {
        let mut state = self.state.lock();
        if let Some(topic) = state.topics.get_mut(key) {
            topic.listeners.retain(|m| m.connection != connection);
            if topic.is_empty() {
                state.topics.remove(key);
            }
        }
    }

    /// Tracks `payload` as `connection`'s meta under `presence_key`,
    /// replacing its earlier one (a no-op if the payload is the same).
    /// Listeners get the diff.
    pub fn track(
        &self,
        key: &str,
        wire: &str,
        presence_key: &str,
        connection: u64,
        payload: &Map<String, Value>,
        bounds: PresenceBounds,
    ) -> Result<(), PresenceError> {
        let mut payload = payload.clone();
        payload.remove("phx_ref");
        payload.remove("phx_ref_prev");
        let payload = Value::Object(payload).to_string();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let topic = state.topics.entry(key.to_owned()).or_default();
        topic.wire = wire.to_owned();
        let old = match topic.find(connection) {
            Some((k, i)) if k == presence_key && topic.metas[k][i].payload == payload => return Ok(()),
            Some((k, i)) => {
                let k = k.to_owned();
                let metas = topic.metas.get_mut(&k).expect("found");
                let old = metas.remove(i);
                if metas.is_empty() {
                    topic.metas.remove(&k);
                }
                state.usage.remove(connection, old.bytes(&k));
                Some((k, old))
            }
            None => None,
        };
        let meta = Meta {
            connection,
            phx_ref: format!("{}{:x}", self.ref_prefix, self.next_ref.fetch_add(1, Ordering::Relaxed)),
            prev: old.as_ref().map(|(_, m)| m.phx_ref.clone()),
            payload,
        };
        if let Err(full) = state.usage.room_for(connection, meta.bytes(presence_key), bounds) {
            if let Some((k, old)) = old {
                // (refused: the old meta stays as it was)
                state.usage.add(connection, old.bytes(&k));
                topic.metas.entry(k).or_default().push(old);
            } else if topic.is_empty() {
                state.topics.remove(key);
            }
            return Err(full);
        }
        state.usage.add(connection, meta.bytes(presence_key));
        topic.send_diff(Some((presence_key, &meta)), old.as_ref().map(|(k, m)| (k.as_str(), m)));
        topic.metas.entry(presence_key.to_owned()).or_default().push(meta);
        Ok(())
    }

    /// Removes `connection`'s meta, if it has one; listeners get the leave.
    pub fn untrack(&self, key: &str, connection: u64) {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let Some(topic) = state.topics.get_mut(key) else {
            return;
        };
        if let Some((k, i)) = topic.find(connection) {
            let k = k.to_owned();
            let metas = topic.metas.get_mut(&k).expect("found");
            let old = metas.remove(i);
            if metas.is_empty() {
                topic.metas.remove(&k);
            }
            let bytes = old.bytes(&k);
            topic.send_diff(None, Some((&k, &old)));
            state.usage.remove(connection, bytes);
        }
        if topic.is_empty() {
            state.topics.remove(key);
        }
    }

    /// Bytes the state holds now.
    pub fn bytes(&self) -> usize {
        self.state.lock().usage.bytes
    }
}

#[cfg(test)]
mod tests;
