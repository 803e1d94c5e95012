//! A client's broadcasts (`docs/protocol.md`, "Broadcast"): fanned out to the
//! topic's members (back to the sender with `self: true`), `ok` replies
//! with `ack: true`. On a private channel the first one asks the main
//! thread for write permission; broadcasts sent meanwhile are held (a
//! bounded few) and sent or refused, in order, once it answers.

use super::asks::Stage;
use super::{broadcast_frame, Channel, Connection, TOPIC_PREFIX};
use crate::server::errors::AuthorizeError;
use crate::server::link::{Authorize, Question};
use crate::server::protocol::{Outbound, Payload, UserBroadcast};
use crate::server::PAYLOAD_SLACK;
use crate::shared::stats::Counters;
use serde_json::json;
use tokio_tungstenite::tungstenite::error::Error as WsError;

/// Broadcasts held while a private channel's write permission is asked.
const MAX_HELD: usize = 64;
const MAX_HELD_BYTES: usize = 1 << 20;

/// A private channel's broadcasts waiting for its write permission, and
/// the identity it was asked for.
#[derive(Default)]
pub(super) struct Held {
    broadcasts: Vec<UserBroadcast>,
    bytes: usize,
    asked_for: Option<u64>,
}

/// What a broadcast holds in memory while it waits.
fn size(b: &UserBroadcast) -> usize {
    b.event.len() + payload_size(b).max(64)
}

/// The bytes of a broadcast's payload, as `pg_realtime.max_payload_size` counts them.
fn payload_size(b: &UserBroadcast) -> usize {
    match &b.payload {
        Payload::Text(t) => t.get().len(),
        Payload::Binary(bytes) => bytes.len(),
        Payload::Json(v) => serde_json::to_vec(v).map_or(0, |v| v.len()),
    }
}

impl Connection {
    pub(super) async fn on_user_broadcast(&mut self, b: UserBroadcast) -> Result<(), WsError> {
        let topic = b.topic.clone();
        if !self.channels.contains_key(&topic) {
            return self.unmatched(&broadcast_frame(&b)).await;
        }
        if !self.within_message_rate() {
            return self.shut_channel(&topic, "Too many messages per second").await;
        }
        if payload_size(&b) > self.ctx.settings().limits.max_payload_bytes + PAYLOAD_SLACK {
            return self.refuse_oversized(b).await;
        }
        let Some(channel) = self.channels.get_mut(&topic) else {
            return Ok(());
        };
        match channel.private.map(|p| p.broadcast_write) {
            None | Some(Some(true)) => self.fan_out(b).await,
            Some(Some(false)) => {
                self.deny(
                    b,
                    "Unauthorized: You do not have permissions to write to this Channel topic",
                )
                .await
            }
            Some(None) => {
                let held = &mut channel.held;
                if held.broadcasts.len() >= MAX_HELD || held.bytes + size(&b) > MAX_HELD_BYTES {
                    let reason = format!(
                        "Too many broadcasts are waiting for this channel's write permission (for up to {} s)",
                        self.asks.timeout().as_secs()
                    );
                    return self.deny(b, &reason).await;
                }
                held.bytes += size(&b);
                held.broadcasts.push(b);
                self.ask_write(&topic);
                Ok(())
            }
        }
    }

    fn ask_write(&mut self, topic: &str) {
        self.ask_write_permission(topic, "broadcast", |c| &mut c.held.asked_for);
    }

    /// Asks whether the channel's identity may write `extension`, unless
    /// that was asked for its current identity already (`asked_for`, the
    /// channel's note of the identity it last asked for).
    pub(super) fn ask_write_permission(
        &mut self,
        topic: &str,
        extension: &'static str,
        asked_for: fn(&mut Channel) -> &mut Option<u64>,
    ) {
        let Some(channel) = self.channels.get_mut(topic) else {
            return;
        };
        let identity = channel.identity;
        if *asked_for(channel) == Some(identity) {
            return;
        }
        *asked_for(channel) = Some(identity);
        let (subtopic, claims) = (channel.subtopic.clone(), channel.claims.clone());
        let asker = self.asker(topic, &self.channels[topic], Stage::Join);
        self.asks.authorize(self.ctx.main.as_ref(), asker, |reply| Authorize {
            subtopic,
            claims,
            question: Question::Write(extension),
            reply,
        });
    }

    /// The write permission came: the held broadcasts go out, or are
    /// refused, in the order they came. (An error is a denial.) An answer
    /// for an identity since replaced asks again.
    pub(super) async fn on_write_answer(
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
            if !channel.held.broadcasts.is_empty() {
                self.ask_write(topic);
            }
            return Ok(());
        }
        let allowed = allowed.unwrap_or(false);
        if let Some(private) = &mut channel.private {
            private.broadcast_write = Some(allowed);
        }
        let held = std::mem::take(&mut channel.held);
        for b in held.broadcasts {
            if allowed {
                self.fan_out(b).await?;
            } else {
                self.deny(
                    b,
                    "Unauthorized: You do not have permissions to write to this Channel topic",
                )
                .await?;
            }
        }
        Ok(())
    }

    /// A broadcast over the payload limit is dropped; with `ack: true` the
    /// reply says `payload_size_exceeded`, as Supabase's does.
    async fn refuse_oversized(&mut self, b: UserBroadcast) -> Result<(), WsError> {
        Counters::incr(&self.ctx.counters.broadcasts_refused);
        let ack = self.channels.get(&b.topic).is_some_and(|c| c.config.broadcast.ack);
        if !ack {
            return Ok(());
        }
        self.send(&Outbound::reply(
            &broadcast_frame(&b),
            "error",
            json!("payload_size_exceeded"),
        ))
        .await
    }

    /// Refuses a broadcast: dropped, and with `ack: true` an error reply
    /// says why (`reason` is followed by the topic when it ends with
    /// "topic").
    async fn deny(&mut self, b: UserBroadcast, reason: &str) -> Result<(), WsError> {
        Counters::incr(&self.ctx.counters.broadcasts_refused);
        tracing::debug!(topic = %crate::server::log::escape(&b.topic), "broadcast refused: {reason}");
        let ack = self.channels.get(&b.topic).is_some_and(|c| c.config.broadcast.ack);
        if !ack {
            return Ok(());
        }
        let reason = if reason.ends_with("topic") {
            format!("{reason}: {}", b.topic.strip_prefix(TOPIC_PREFIX).unwrap_or(&b.topic))
        } else {
            reason.to_owned()
        };
        self.send(&Outbound::reply(
            &broadcast_frame(&b),
            "error",
            json!({ "reason": reason }),
        ))
        .await
    }

    /// Sends a broadcast to the topic's members (and back with `self`).
    async fn fan_out(&mut self, b: UserBroadcast) -> Result<(), WsError> {
        let Some(channel) = self.channels.get(&b.topic) else {
            return Ok(());
        };
        let (ack, include_self) = (channel.config.broadcast.ack, channel.config.broadcast.self_);
        // (also for a private channel that may write but not read)
        let hub_topic = super::join::hub_key(&b.topic, channel.private.is_some());
        let reply_to = broadcast_frame(&b);
        let out = Outbound::Broadcast {
            topic: b.topic,
            event: b.event,
            metadata: None,
            payload: b.payload,
            encoded: Default::default(),
        };
        if include_self {
            self.send(&out).await?;
        }
        Counters::incr(&self.ctx.counters.broadcasts_sent);
        let missed = self.ctx.hub.send(&hub_topic, Some(self.id), out);
        if missed > 0 {
            tracing::debug!(topic = %crate::server::log::escape(&reply_to.topic), missed, "broadcast skipped members too far behind");
        }
        if ack {
            self.send(&Outbound::reply(&reply_to, "ok", json!({}))).await?;
        }
        Ok(())
    }
}
