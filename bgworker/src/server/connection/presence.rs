//! A channel's presence (`docs/protocol.md`, "Presence"): `track` and
//! `untrack` against the shared state (`server::presence`), within the
//! per-connection rate and the payload limit; on a private channel the
//! first one asks for the `presence` write permission, and what is sent
//! meanwhile is held (a bounded few) and applied, in order, once it is known.

use super::join::hub_key;
use super::Connection;
use crate::server::errors::AuthorizeError;
use crate::server::hub::Member;
use crate::server::protocol::{Frame, Outbound};
use crate::shared::stats::Counters;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::error::Error as WsError;

/// Presence messages held while a private channel's write permission is asked.
const MAX_HELD: usize = 8;

/// A channel's presence: its key, what it hears, what it has tracked.
#[derive(Default)]
pub(super) struct ChannelPresence {
    /// The key its meta goes under: the join's, or one the server made.
    pub key: String,
    /// The hub key whose presence it hears, while it does.
    pub listening: Option<String>,
    /// The hub key it is tracked on, while it is.
    pub tracked: Option<String>,
    /// Messages waiting for the write permission, and the identity it was
    /// asked for.
    held: Vec<Frame>,
    pub(super) asked_for: Option<u64>,
}

impl ChannelPresence {
    /// The presence of a new join: `key` as configured, else a UUID.
    pub fn new(key: &str) -> ChannelPresence {
        let key = if key.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            key.to_owned()
        };
        ChannelPresence {
            key,
            ..Default::default()
        }
    }
}

impl Connection {
    /// Starts hearing the channel's presence: its `presence_state` is
    /// queued, ahead of every diff, behind what is sent directly (the join
    /// reply, a replay).
    pub(super) fn listen_presence(&mut self, topic: &str) {
        let Some(channel) = self.channels.get_mut(topic) else {
            return;
        };
        let key = hub_key(topic, channel.private.is_some());
        let member = Member {
            connection: self.id,
            tx: self.fanout_tx.clone(),
        };
        self.ctx
            .presences
            .listen(&key, topic, channel.join_ref.as_deref().unwrap_or(""), member);
        channel.presence.listening = Some(key);
    }

    /// Leaves the presence of a channel being removed: it stops hearing,
    /// then its meta leaves (the others hear that).
    pub(super) fn leave_presence(&self, presence: &ChannelPresence) {
        if let Some(key) = &presence.listening {
            self.ctx.presences.unlisten(key, self.id);
        }
        if let Some(key) = &presence.tracked {
            self.ctx.presences.untrack(key, self.id);
        }
    }

    pub(super) async fn on_presence(&mut self, frame: Frame) -> Result<(), WsError> {
        let limits = self.ctx.settings().limits.clone();
        let now = std::time::Instant::now();
        if !self.presence_rate.take(limits.presence_per_second_per_connection, now) {
            Counters::incr(&self.ctx.counters.rate_limited);
            return self
                .shut_channel(&frame.topic, "Client presence rate limit exceeded")
                .await;
        }
        if !self.ctx.presence_rate.take(limits.presence_per_second, now) {
            // (everyone's limit: this channel is not to blame, and stays)
            Counters::incr(&self.ctx.counters.rate_limited);
            return self
                .presence_error(&frame, "Too many presence messages per second")
                .await;
        }
        let Some(channel) = self.channels.get_mut(&frame.topic) else {
            return Ok(());
        };
        match channel.private.map(|p| p.presence_write) {
            None | Some(Some(true)) => self.apply_presence(frame).await,
            Some(Some(false)) => {
                let reason = "Unauthorized: You do not have permissions to track presence on this Channel topic";
                self.presence_error(&frame, reason).await
            }
            Some(None) => {
                if channel.presence.held.len() >= MAX_HELD {
                    let reason = "Too many presence messages are waiting for this channel's write permission";
                    return self.presence_error(&frame, reason).await;
                }
                channel.presence.held.push(frame.clone());
                self.ask_presence_write(&frame.topic);
                Ok(())
            }
        }
    }

    /// After the channel's identity changed: whether it may still track
    /// is asked again if it tracks (a refusal untracks it).
    pub(super) fn recheck_presence_write(&mut self, topic: &str) {
        if self
            .channels
            .get(topic)
            .is_some_and(|c| c.private.is_some() && c.presence.tracked.is_some())
        {
            self.ask_presence_write(topic);
        }
    }

    fn ask_presence_write(&mut self, topic: &str) {
        self.ask_write_permission(topic, "presence", |c| &mut c.presence.asked_for);
    }

    /// The `presence` write permission came: held messages are applied or
    /// refused in order. An answer for a replaced identity asks again.
    pub(super) async fn on_presence_write_answer(
        &mut self,
        topic: &str,
        join: u64,
        identity: u64,
        allowed: Result<bool, AuthorizeError>,
    ) -> Result<(), WsError> {
        let Some(channel) = self.channels.get_mut(topic).filter(|c| c.join == join) else {
            return Ok(());
        };
        if channel.identity != identity {
            if !channel.presence.held.is_empty() {
                self.ask_presence_write(topic);
            }
            return Ok(());
        }
        let allowed = match allowed {
            Ok(allowed) => allowed,
            Err(e) => {
                // Not known (a timeout, no database): held messages are
                // refused with why, a tracked meta stays, and the next
                // track asks again.
                channel.presence.asked_for = None;
                let held = std::mem::take(&mut channel.presence.held);
                for frame in held {
                    self.presence_error(&frame, &e.to_string()).await?;
                }
                return Ok(());
            }
        };
        if let Some(private) = &mut channel.private {
            private.presence_write = Some(allowed);
        }
        // (tracked by an earlier identity that could: it leaves, and the
        // client is told)
        let untracked = channel.presence.tracked.take_if(|_| !allowed).map(|key| {
            self.ctx.presences.untrack(&key, self.id);
            Outbound::system(
                Some(channel.join_ref()),
                topic,
                "presence",
                "error",
                "Unauthorized: this channel's identity may no longer track presence on this Channel topic; it was untracked",
                &channel.subtopic,
            )
        });
        let held = std::mem::take(&mut channel.presence.held);
        if let Some(notice) = untracked {
            self.send(&notice).await?;
        }
        for frame in held {
            if allowed {
                self.apply_presence(frame).await?;
            } else {
                let reason = "Unauthorized: You do not have permissions to track presence on this Channel topic";
                self.presence_error(&frame, reason).await?;
            }
        }
        Ok(())
    }

    /// `track` (a payload object) or `untrack`, the event named in any case.
    async fn apply_presence(&mut self, frame: Frame) -> Result<(), WsError> {
        let body = frame.payload.as_object();
        let event = body
            .and_then(|b| b.get("event"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        let Some(channel) = self.channels.get_mut(&frame.topic) else {
            return Ok(());
        };
        match event.as_deref() {
            Some("track") => {
                let Some(payload) = body.and_then(|b| b.get("payload")).and_then(Value::as_object) else {
                    return self
                        .presence_error(&frame, "Presence track payload must be a map")
                        .await;
                };
                let limits = &self.ctx.settings().limits;
                let bytes = serde_json::to_vec(payload).map_or(0, |v| v.len());
                if bytes > limits.max_presence_payload_bytes {
                    return self.shut_channel(&frame.topic, "Track message size exceeded").await;
                }
                let key = hub_key(&frame.topic, channel.private.is_some());
                let tracked = self.ctx.presences.track(
                    &key,
                    &frame.topic,
                    &channel.presence.key,
                    self.id,
                    payload,
                    limits.presence,
                );
                match tracked {
                    Ok(()) => {
                        Counters::incr(&self.ctx.counters.presence_tracks);
                        channel.presence.tracked = Some(key);
                        self.send(&Outbound::reply(&frame, "ok", json!({}))).await
                    }
                    Err(e) => self.presence_error(&frame, &e.to_string()).await,
                }
            }
            Some("untrack") => {
                if let Some(key) = channel.presence.tracked.take() {
                    self.ctx.presences.untrack(&key, self.id);
                }
                self.send(&Outbound::reply(&frame, "ok", json!({}))).await
            }
            _ => {
                self.presence_error(&frame, "Presence event must be track or untrack")
                    .await
            }
        }
    }

    async fn presence_error(&mut self, frame: &Frame, reason: &str) -> Result<(), WsError> {
        self.send(&Outbound::reply(frame, "error", json!({ "reason": reason })))
            .await
    }
}
