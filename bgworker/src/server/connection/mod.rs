//! One WebSocket connection: its channels, their tokens and expiry timers,
//! and the Phoenix events of `docs/protocol.md` ("Heartbeat", "Channels", "Tokens").
//!
//! The loop never waits for the worker's main thread: what a join, a token
//! refresh or a private broadcast asks of it is in flight (`asks`) while
//! the loop goes on reading frames, answering heartbeats and sending other
//! channels' messages; each answer is acted on when it comes. Every write
//! to the socket has a timeout, and a connection whose queue overflowed
//! (`fanout`) is told and closed.

pub(super) mod accept;
mod asks;
mod broadcast;
mod join;
mod presence;
mod refresh;

use super::fanout::{FanoutReceiver, FanoutSender, Overflow, Received};
use super::handshake::Accepted;
use super::http;
use super::link::MainRequest;
use super::Context;
use crate::changes::registry::ChannelKey;
use crate::server::join::JoinConfig;
use crate::server::jwt::{self, AuthError, Claims};
use crate::server::log::escape;
use crate::server::protocol::{self, Frame, Inbound, Outbound, UserBroadcast, Vsn, TOPIC_PREFIX};
use crate::shared::stats::Counters;
use asks::Asks;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How often channels whose new identity the join rate limits held back
/// are tried again.
const REVALIDATE_EVERY: Duration = Duration::from_millis(100);

/// Where a channel's postgres_changes subscription stands on the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subscription {
    None,
    /// Asked for, not answered yet.
    Asked,
    Active,
}

/// A channel, joined or joining.
struct Channel {
    /// Which join of its topic this is (`ChannelKey::join`).
    join: u64,
    join_ref: Option<String>,
    subtopic: String,
    /// The token the channel acts with, and its verified claims; `identity`
    /// counts their changes, so an answer about an older one is known.
    token: String,
    claims: Claims,
    identity: u64,
    config: JoinConfig,
    subscription: Subscription,
    /// A private channel's permissions, as its identity's policies on
    /// `realtime.messages` gave them.
    private: Option<Private>,
    /// Its key in the broadcast hub, while it receives broadcasts.
    hub_key: Option<String>,
    /// Broadcasts waiting for the first answer about write permission.
    held: broadcast::Held,
    presence: presence::ChannelPresence,
    /// A new identity (token and claims) the main thread is still to be
    /// asked about (the join rate limits did not allow it yet).
    pending: Option<Box<(String, Claims)>>,
}

/// What a private channel's identity may do; read at join and after each
/// token refresh, write on first use and then kept until the token changes.
#[derive(Debug, Clone, Copy, Default)]
struct Private {
    read: super::link::Permissions,
    broadcast_write: Option<bool>,
    presence_write: Option<bool>,
}

impl Channel {
    fn join_ref(&self) -> &str {
        self.join_ref.as_deref().unwrap_or("")
    }
}

/// Why the loop ends.
enum Close {
    /// The client closed or the transport failed: nothing more to send.
    Gone,
    /// We close, with this code and reason.
    With(CloseCode, &'static str),
}

struct Connection {
    id: u64,
    peer: SocketAddr,
    ctx: Arc<Context>,
    ws: WebSocketStream<http::Prefixed>,
    accepted: Accepted,
    /// (Boxed: a map's table has room for more entries than it holds, and
    /// an inline `Channel` is 600 bytes; idle connections hold one.)
    channels: HashMap<String, Box<Channel>>,
    /// Channels whose join waits for the main thread, with the join frame
    /// the reply answers.
    /// (Let go of when it empties: most connections join once.)
    joining: HashMap<String, (Channel, Frame)>,
    fanout_tx: FanoutSender,
    asks: Asks,
    /// This connection's share of joins a second.
    joins: super::rate::Bucket,
    /// Broadcasts and presence messages it may send a second, and
    /// presence messages alone.
    messages: super::rate::Bucket,
    presence_rate: super::rate::Bucket,
    next_join: u64,
    /// When channels waiting with a new identity are tried again (a
    /// deadline, so that other traffic does not put it off).
    revalidate_at: Option<Instant>,
}

impl Connection {
    fn vsn(&self) -> Vsn {
        self.accepted.vsn
    }

    fn key(&self, topic: &str, join: u64) -> ChannelKey {
        ChannelKey {
            connection: self.id,
            topic: topic.to_owned(),
            join,
        }
    }

    /// The loop of a connection's life. The handlers of what comes in
    /// (frames, answers, expiries) are boxed when called: inline, the
    /// largest of their states would be part of every connection's future
    /// all its life (the whole future went from 9.2 kB to 1.6 kB,
    /// `accept::tests::a_connection_s_future_stays_small`); sending, the
    /// hot path, is not.
    async fn run(&mut self, mut fanout: FanoutReceiver, mut shutdown: watch::Receiver<bool>) {
        let idle_timeout = self.ctx.options.idle_timeout;
        let mut idle_deadline = Instant::now() + idle_timeout;
        let close = loop {
            if *shutdown.borrow() {
                break Close::With(CloseCode::Away, "server shutting down");
            }
            // (checked here too: a stream of messages to send must not
            // keep the idle timer from firing)
            if Instant::now() >= idle_deadline {
                Counters::incr(&self.ctx.counters.idle_closed);
                break Close::With(CloseCode::Normal, "idle timeout");
            }
            // (timers are looked at here too, for the same reason)
            let expiry = self.next_expiry();
            if expiry.is_some_and(|at| Instant::now() >= at) && Box::pin(self.expire_tokens()).await.is_err() {
                break Close::Gone;
            }
            if self.revalidate_at.is_some_and(|at| Instant::now() >= at) {
                self.revalidate_due();
            }
            // (one timer for the three: what it wakes for is done above,
            // and a sleep is a tenth of an idle connection's future)
            let next_timer = [self.next_expiry(), self.revalidate_at]
                .into_iter()
                .flatten()
                .fold(idle_deadline, Instant::min);
            // Answers before queued messages: the main thread answers a
            // subscription before it queues the subscription's first event.
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Close::With(CloseCode::Away, "server shutting down"),
                message = self.ws.next() => match message {
                    None => break Close::Gone,
                    Some(Err(WsError::Capacity(e))) => {
                        Counters::incr(&self.ctx.counters.oversized_frames);
                        if self.ctx.may_log() {
                            tracing::info!(peer = %self.peer, error = %e, "frame over the size limit; closing");
                        }
                        break Close::With(CloseCode::Size, "frame too large");
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "transport error");
                        break Close::Gone;
                    }
                    Some(Ok(message)) => {
                        idle_deadline = Instant::now() + idle_timeout;
                        if Box::pin(self.on_message(message)).await.is_err() {
                            break Close::Gone;
                        }
                    }
                },
                Some(answer) = self.asks.next(), if !self.asks.is_empty() => {
                    if Box::pin(self.on_answer(answer)).await.is_err() {
                        break Close::Gone;
                    }
                }
                _ = tokio::time::sleep_until(next_timer) => {}
                received = fanout.recv() => match received {
                    Received::Message(out) => {
                        if self.send_queued(out, &mut fanout).await.is_err() {
                            break Close::Gone;
                        }
                    }
                    Received::Overflowed(why) => {
                        Box::pin(self.too_far_behind(why)).await;
                        break Close::With(CloseCode::Again, "too far behind");
                    }
                },
            }
        };
        if let Close::With(code, reason) = close {
            Box::pin(self.close(code, reason)).await;
        }
    }

    /// Sends our close frame and waits briefly for the client's answer.
    async fn close(&mut self, code: CloseCode, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let grace = self.ctx.options.close_grace;
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(grace, async {
            if ws.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }

    /// The queue overflowed: each channel gets one `system` error saying
    /// why (if the client takes it within the close grace), then the
    /// socket closes and the client reconnects.
    async fn too_far_behind(&mut self, why: Overflow) {
        Counters::incr(&self.ctx.counters.clients_too_far_behind);
        let setting = match why {
            Overflow::Connection => "pg_realtime.max_pending_bytes",
            Overflow::Total => "pg_realtime.max_pending_bytes_total",
        };
        let message = format!(
            "Too many messages are waiting for this client ({setting}): it is disconnected; \
             reconnect and refetch to catch up"
        );
        if self.ctx.may_log() {
            tracing::info!(peer = %self.peer, "a client too far behind is disconnected ({setting})");
        }
        let notices: Vec<Outbound> = self
            .channels
            .iter()
            .map(|(topic, c)| Outbound::system(Some(c.join_ref()), topic, "system", "error", &message, &c.subtopic))
            .collect();
        let grace = self.ctx.options.close_grace;
        let _ = tokio::time::timeout(grace, async {
            for notice in &notices {
                if self.send(notice).await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Writes a queued message and whatever else is queued behind it (up
    /// to 64), flushed once, all within
    /// `pg_realtime.socket_write_timeout`: under a stream of messages one
    /// write call and one timer serve many.
    async fn send_queued(&mut self, first: Arc<Outbound>, fanout: &mut FanoutReceiver) -> Result<(), WsError> {
        // While an answer may be on its way, one at a time: the loop takes
        // answers first, so a subscription's reply precedes its events.
        let batch = if self.asks.is_empty() { 64 } else { 1 };
        let timeout = self.ctx.settings().limits.write_timeout;
        let (vsn, ws) = (self.vsn(), &mut self.ws);
        let written = tokio::time::timeout(timeout, async {
            let mut next = Some(first);
            let mut fed = 0;
            while let Some(out) = next.take() {
                if let Some(message) = protocol::encode(vsn, &out) {
                    ws.feed(message).await?;
                }
                fed += 1;
                if fed < batch {
                    next = fanout.try_recv();
                }
            }
            ws.flush().await
        })
        .await;
        written.unwrap_or_else(|_| {
            if self.ctx.may_log() {
                tracing::info!(peer = %self.peer, "a write took longer than {timeout:?}; closing");
            }
            Err(WsError::Io(std::io::ErrorKind::TimedOut.into()))
        })
    }

    /// Writes one message, within `pg_realtime.socket_write_timeout`.
    async fn send(&mut self, out: &Outbound) -> Result<(), WsError> {
        let Some(message) = protocol::encode(self.vsn(), out) else {
            return Ok(());
        };
        let timeout = self.ctx.settings().limits.write_timeout;
        match tokio::time::timeout(timeout, self.ws.send(message)).await {
            Ok(sent) => sent,
            Err(_) => {
                if self.ctx.may_log() {
                    tracing::info!(peer = %self.peer, "a write took longer than {timeout:?}; closing");
                }
                Err(WsError::Io(std::io::ErrorKind::TimedOut.into()))
            }
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), WsError> {
        let vsn = self.vsn();
        let decoded = match message {
            Message::Text(text) => protocol::decode_text(vsn, &text),
            Message::Binary(bytes) => protocol::decode_binary(vsn, &bytes),
            // Pings are answered by tungstenite; a close is answered there too
            // and then ends the stream.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => return Ok(()),
        };
        Counters::incr(&self.ctx.counters.frames_received);
        match decoded {
            Ok(Inbound::Frame(frame)) => self.on_frame(frame).await,
            Ok(Inbound::Broadcast(b)) => self.on_user_broadcast(b).await,
            Err(e) => {
                Counters::incr(&self.ctx.counters.malformed_frames);
                tracing::debug!(peer = %self.peer, error = %e, "malformed frame dropped");
                Ok(())
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), WsError> {
        #[cfg(test)]
        if frame.event == "__test_panic__" {
            panic!("test-only panic on a network thread");
        }
        if frame.topic == "phoenix" && frame.event == "heartbeat" {
            return self.send(&Outbound::reply(&frame, "ok", json!({}))).await;
        }
        if frame.event == "phx_join" {
            return self.join(frame).await;
        }
        if frame.event == "phx_leave" && self.joining.contains_key(&frame.topic) {
            // (realtime-js leaves a join it gave up waiting for)
            self.remove_channel(&frame.topic);
            return self.send(&Outbound::reply(&frame, "ok", json!({}))).await;
        }
        if !self.channels.contains_key(&frame.topic) {
            return self.unmatched(&frame).await;
        }
        match frame.event.as_str() {
            "phx_leave" => self.leave(frame).await,
            "access_token" => self.refresh_token(frame).await,
            "presence" => {
                if !self.within_message_rate() {
                    return self.shut_channel(&frame.topic, "Too many messages per second").await;
                }
                self.on_presence(frame).await
            }
            // Unknown channel events are ignored without reply, as Supabase does.
            _ => Ok(()),
        }
    }

    /// `[null, ref, topic, "phx_reply", {"status":"error","response":{"reason":"unmatched topic"}}]`
    async fn unmatched(&mut self, frame: &Frame) -> Result<(), WsError> {
        let mut reply_to = frame.clone();
        reply_to.join_ref = None;
        self.send(&Outbound::reply(
            &reply_to,
            "error",
            json!({"reason": "unmatched topic"}),
        ))
        .await
    }

    async fn leave(&mut self, frame: Frame) -> Result<(), WsError> {
        if let Some(channel) = self.remove_channel(&frame.topic) {
            self.send(&Outbound::reply(&frame, "ok", json!({}))).await?;
            self.send(&Outbound::close(channel.join_ref(), &frame.topic)).await?;
        }
        Ok(())
    }

    /// Removes a channel, joined or joining: it leaves the hub and the
    /// gauges, and its subscription (if one was ever asked for) ends on the
    /// main thread.
    fn remove_channel(&mut self, topic: &str) -> Option<Box<Channel>> {
        let (channel, joined) = match self.channels.remove(topic) {
            Some(channel) => (channel, true),
            None => (Box::new(self.take_joining_any(topic)?.0), false),
        };
        if let Some(key) = &channel.hub_key {
            self.ctx.hub.leave(key, self.id);
        }
        self.leave_presence(&channel.presence);
        // (what was queued for it must not reach the topic's next join)
        self.fanout_tx.purge_topic(topic);
        if channel.subscription != Subscription::None {
            self.unsubscribe(topic, channel.join);
        }
        if joined {
            Counters::decr(&self.ctx.counters.channels_joined);
        }
        Some(channel)
    }

    /// Ends a subscription on the main thread (a no-op there if it has none).
    fn unsubscribe(&self, topic: &str, join: u64) {
        if let Some(main) = &self.ctx.main {
            main.send(MainRequest::Unsubscribe(self.key(topic, join)));
        }
    }

    /// The earliest token expiry over all joined channels.
    fn next_expiry(&self) -> Option<Instant> {
        let exp = self.channels.values().map(|c| c.claims.exp).min()?;
        let secs = (exp - jwt::now()).max(0) as u64;
        Some(Instant::now() + Duration::from_secs(secs))
    }

    async fn expire_tokens(&mut self) -> Result<(), WsError> {
        let now = jwt::now();
        let expired: Vec<(String, i64, bool)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.claims.exp <= now)
            .map(|(t, c)| {
                (
                    t.clone(),
                    c.claims.exp,
                    c.pending.as_ref().is_some_and(|p| p.1.exp > now),
                )
            })
            .collect();
        for (topic, exp, renewed) in expired {
            if renewed {
                // a new identity waits: taken now, whatever the rate
                self.take_new_identity(&topic);
            } else {
                self.end_channel(&topic, &AuthError::Expired(now - exp)).await?;
            }
        }
        Ok(())
    }

    /// The fatal-channel pattern: a `system` error, then `phx_close`.
    async fn end_channel(&mut self, topic: &str, error: &AuthError) -> Result<(), WsError> {
        self.end_channel_with(topic, &error.to_string()).await
    }

    async fn end_channel_with(&mut self, topic: &str, message: &str) -> Result<(), WsError> {
        if self.channels.contains_key(topic) || self.joining.contains_key(topic) {
            Counters::incr(&self.ctx.counters.tokens_rejected);
        }
        self.shut_channel(topic, message).await
    }

    /// Ends a channel with a `system` error saying why, then `phx_close`.
    async fn shut_channel(&mut self, topic: &str, message: &str) -> Result<(), WsError> {
        let Some(channel) = self.remove_channel(topic) else {
            return Ok(());
        };
        let system = Outbound::system(
            Some(channel.join_ref()),
            topic,
            "system",
            "error",
            message,
            &channel.subtopic,
        );
        self.send(&system).await?;
        self.send(&Outbound::close(channel.join_ref(), topic)).await
    }

    /// Takes one of the connection's messages a second
    /// (`pg_realtime.max_messages_per_second_per_connection`); false when
    /// it is over, and the channel is closed.
    fn within_message_rate(&mut self) -> bool {
        let rate = self.ctx.settings().limits.messages_per_second_per_connection;
        let within = self.messages.take(rate, std::time::Instant::now());
        if !within {
            Counters::incr(&self.ctx.counters.rate_limited);
        }
        within
    }

    /// Logs a refused join, its client strings escaped.
    fn log_refusal(&self, topic: &str, reason: &str) {
        tracing::debug!(peer = %self.peer, topic = %escape(topic), reason = %escape(reason), "join refused");
    }
}

/// However the connection ends (even by a panic), its channels leave the
/// hub and the gauges, and their subscriptions end.
impl Drop for Connection {
    fn drop(&mut self) {
        let topics: Vec<String> = self.channels.keys().chain(self.joining.keys()).cloned().collect();
        for topic in topics {
            self.remove_channel(&topic);
        }
    }
}

/// What is held for a user broadcast that is not sent yet.
fn broadcast_frame(b: &UserBroadcast) -> Frame {
    Frame {
        join_ref: b.join_ref.clone(),
        msg_ref: b.msg_ref.clone(),
        topic: b.topic.clone(),
        event: "broadcast".into(),
        payload: protocol::Payload::Json(serde_json::Value::Null),
    }
}
