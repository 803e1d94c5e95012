//! One WebSocket connection: its channels, their tokens and expiry timers,
//! and the Phoenix events of `realtime-protocol.md` §1.5, §2 and §6.

use super::fanout::{fanout, FanoutReceiver, FanoutSender};
use super::handshake::{self, Accepted};
use super::hub::Member;
use super::link::{Authorize, MainLink, MainRequest, Permissions, Question, Subscribe};
use super::Context;
use crate::changes::registry::{self, ChannelKey};
use crate::join::{parse_join, JoinConfig};
use crate::jwt::{self, AuthError, Claims};
use crate::protocol::{self, Frame, Inbound, Outbound, Payload, UserBroadcast, Vsn};
use crate::stats::Counters;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const TOPIC_PREFIX: &str = "realtime:";
/// How long a join waits for the main thread to set up postgres_changes
/// (realtime-js gives up on a join after 10 s).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(8);

/// Serves one accepted TCP connection to the end.
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(ctx.options.max_frame_bytes))
        .max_frame_size(Some(ctx.options.max_frame_bytes));
    let mut accepted = None;
    // The callback's error type is tungstenite's; it is built only to refuse.
    #[allow(clippy::result_large_err)]
    let callback = |request: &_, response| match handshake::check(&ctx, request) {
        Ok(a) => {
            accepted = Some(a);
            Ok(response)
        }
        Err(refusal) => Err(refusal.response()),
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let ws = match tokio::time::timeout(ctx.options.handshake_timeout, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "upgrade failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "upgrade timed out");
            return;
        }
    };
    let Some(accepted) = accepted else { return };
    let id = ctx.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = fanout(ctx.options.outbound_queue);
    let mut conn = Connection {
        id,
        peer,
        ctx,
        ws,
        accepted,
        channels: HashMap::new(),
        fanout_tx: tx,
    };
    conn.run(rx, shutdown).await;
}

/// A joined channel.
struct Channel {
    join_ref: Option<String>,
    subtopic: String,
    /// The token the channel acts with, and its verified claims.
    token: String,
    claims: Claims,
    config: JoinConfig,
    /// Whether the main thread holds a `postgres_changes` subscription for it.
    subscribed: bool,
    /// A private channel's permissions, as its identity's policies on
    /// `realtime.messages` gave them.
    private: Option<Private>,
    /// Its key in the broadcast hub, while it receives broadcasts.
    hub_key: Option<String>,
}

/// What a private channel's identity may do; read at join and after each
/// token refresh, write on first use and then kept until the token changes.
#[derive(Debug, Clone, Copy, Default)]
struct Private {
    read: Permissions,
    broadcast_write: Option<bool>,
}

/// What the client hears when the main thread cannot answer.
const NO_DATABASE: &str = "Realtime was unable to connect to the project database";

/// Sends `request` to the main thread and waits (at most SUBSCRIBE_TIMEOUT)
/// for its answer on `answer`; `Err` is a message for the client.
async fn ask_main<T>(
    main: &MainLink,
    request: MainRequest,
    answer: oneshot::Receiver<Result<T, String>>,
    timed_out: impl FnOnce() -> String,
) -> Result<T, String> {
    if !main.send(request) {
        return Err(NO_DATABASE.into());
    }
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(NO_DATABASE.into()),
        Err(_) => Err(timed_out()),
    }
}

/// The hub key of a topic: private and public channels of the same name
/// never hear each other.
fn hub_key(topic: &str, private: bool) -> String {
    if private {
        format!("private\u{0}{topic}")
    } else {
        topic.to_owned()
    }
}

fn no_read_permission(subtopic: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {subtopic}")
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
    ws: WebSocketStream<TcpStream>,
    accepted: Accepted,
    channels: HashMap<String, Channel>,
    fanout_tx: FanoutSender,
}

impl Connection {
    fn vsn(&self) -> Vsn {
        self.accepted.vsn
    }

    async fn run(&mut self, mut fanout: FanoutReceiver, mut shutdown: watch::Receiver<bool>) {
        let idle_timeout = self.ctx.options.idle_timeout;
        let mut idle_deadline = Instant::now() + idle_timeout;
        let close = loop {
            if *shutdown.borrow() {
                break Close::With(CloseCode::Away, "server shutting down");
            }
            let expiry = self.next_expiry();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Close::With(CloseCode::Away, "server shutting down"),
                message = self.ws.next() => match message {
                    None => break Close::Gone,
                    Some(Err(WsError::Capacity(e))) => {
                        Counters::incr(&self.ctx.counters.oversized_frames);
                        tracing::info!(peer = %self.peer, error = %e, "frame over the size limit; closing");
                        break Close::With(CloseCode::Size, "frame too large");
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "transport error");
                        break Close::Gone;
                    }
                    Some(Ok(message)) => {
                        idle_deadline = Instant::now() + idle_timeout;
                        if self.on_message(message).await.is_err() {
                            break Close::Gone;
                        }
                    }
                },
                Some(out) = fanout.recv() => {
                    if self.send(&out).await.is_err() {
                        break Close::Gone;
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    Counters::incr(&self.ctx.counters.idle_closed);
                    break Close::With(CloseCode::Normal, "idle timeout");
                }
                _ = sleep_until_opt(expiry) => {
                    if self.expire_tokens().await.is_err() {
                        break Close::Gone;
                    }
                }
            }
        };
        if let Close::With(code, reason) = close {
            self.close(code, reason).await;
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

    async fn send(&mut self, out: &Outbound) -> Result<(), WsError> {
        match protocol::encode(self.vsn(), out) {
            Some(message) => self.ws.send(message).await,
            None => Ok(()),
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
        if !self.channels.contains_key(&frame.topic) {
            return self.unmatched(&frame).await;
        }
        match frame.event.as_str() {
            "phx_leave" => self.leave(frame).await,
            "access_token" => self.refresh_token(frame).await,
            "broadcast" => self.on_json_broadcast(frame).await,
            "presence" => {
                let reason = "presence is not supported by this version of pg_realtime";
                self.send(&Outbound::reply(&frame, "error", json!({ "reason": reason })))
                    .await
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

    async fn join(&mut self, frame: Frame) -> Result<(), WsError> {
        let Some(subtopic) = frame.topic.strip_prefix(TOPIC_PREFIX).map(str::to_owned) else {
            return self.unmatched(&frame).await;
        };
        // A second join of a joined topic replaces the first.
        if let Some(old) = self.remove_channel(&frame.topic) {
            let close = Outbound::close(old.join_ref(), &frame.topic);
            self.send(&close).await?;
        }
        let mut channel = match self.admit(&frame, &subtopic) {
            Ok(channel) => channel,
            Err(reason) => {
                Counters::incr(&self.ctx.counters.joins_refused);
                tracing::debug!(peer = %self.peer, topic = %frame.topic, %reason, "join refused");
                return self
                    .send(&Outbound::reply(&frame, "error", json!({ "reason": reason })))
                    .await;
            }
        };
        if channel.config.private {
            let refused = match self.authorize(&channel, Question::Read).await {
                Ok(read) if read.broadcast || read.presence => {
                    channel.private = Some(Private {
                        read,
                        broadcast_write: None,
                    });
                    None
                }
                Ok(_) => Some(no_read_permission(&subtopic)),
                Err(message) => Some(message),
            };
            if let Some(reason) = refused {
                Counters::incr(&self.ctx.counters.joins_refused);
                return self
                    .send(&Outbound::reply(&frame, "error", json!({ "reason": reason })))
                    .await;
            }
        }
        let ids = binding_ids(&channel.config);
        // postgres_changes: the main thread validates the bindings and starts
        // delivery before we reply, so SUBSCRIBED means live.
        let subscription = if ids.is_empty() {
            None
        } else {
            Some(self.subscribe(&frame.topic, &channel, &ids).await)
        };
        channel.subscribed = matches!(subscription, Some(Ok(())));
        let postgres_changes: Vec<Value> = channel
            .config
            .postgres_changes
            .iter()
            .zip(&ids)
            .map(|(b, id)| {
                let mut entry = b.raw.clone();
                entry.insert("id".into(), json!(id));
                Value::Object(entry)
            })
            .collect();
        let presence = channel.config.presence.enabled;
        if channel.private.is_none_or(|p| p.read.broadcast) {
            let key = hub_key(&frame.topic, channel.private.is_some());
            self.ctx.hub.join(
                &key,
                Member {
                    connection: self.id,
                    tx: self.fanout_tx.clone(),
                },
            );
            channel.hub_key = Some(key);
        }
        Counters::incr(&self.ctx.counters.channels_joined);
        let join_ref = channel.join_ref().to_owned();
        self.channels.insert(frame.topic.clone(), channel);
        self.send(&Outbound::reply(
            &frame,
            "ok",
            json!({ "postgres_changes": postgres_changes }),
        ))
        .await?;
        if presence {
            // Nobody can be tracked yet (presence is not supported), so
            // the state is truthfully empty; realtime-js waits for it.
            self.send(&Outbound::push(&join_ref, &frame.topic, "presence_state", json!({})))
                .await?;
        }
        if let Some(result) = subscription {
            self.send(&subscription_status(&join_ref, &frame.topic, &subtopic, result))
                .await?;
        }
        Ok(())
    }

    /// Asks the main thread to subscribe the channel's bindings; `Err` is
    /// the message of the `system` error the client gets.
    async fn subscribe(&self, topic: &str, channel: &Channel, ids: &[u32]) -> Result<(), String> {
        let Some(main) = &self.ctx.main else {
            return Err("postgres_changes is not available: the server runs without a database".into());
        };
        let (reply, answer) = oneshot::channel();
        let request = MainRequest::Subscribe(Subscribe {
            key: ChannelKey {
                connection: self.id,
                topic: topic.to_owned(),
            },
            subtopic: channel.subtopic.clone(),
            bindings: ids
                .iter()
                .copied()
                .zip(channel.config.postgres_changes.iter().cloned())
                .collect(),
            claims: channel.claims.clone(),
            sink: self.fanout_tx.clone(),
            reply,
        });
        ask_main(main, request, answer, || {
            format!(
                "Timed out after {}ms waiting for the postgres_changes subscription",
                SUBSCRIBE_TIMEOUT.as_millis()
            )
        })
        .await
    }

    /// Asks the main thread what the channel's identity may do on its
    /// private topic; `Err` is a message for the client.
    async fn authorize(&self, channel: &Channel, question: Question) -> Result<Permissions, String> {
        let Some(main) = &self.ctx.main else {
            return Err(NO_DATABASE.into());
        };
        let (reply, answer) = oneshot::channel();
        let request = MainRequest::Authorize(Authorize {
            subtopic: channel.subtopic.clone(),
            claims: channel.claims.clone(),
            question,
            reply,
        });
        ask_main(main, request, answer, || "Query was cancelled, please try again".into()).await
    }

    /// Decides a join; `Err` is the reply's `reason`.
    fn admit(&self, frame: &Frame, subtopic: &str) -> Result<Channel, String> {
        if subtopic.is_empty() {
            return Err("TopicNameRequired: You must provide a topic name".into());
        }
        let settings = self.ctx.settings();
        if self.channels.len() >= settings.max_channels_per_connection {
            return Err("ChannelRateLimitReached: Too many channels".into());
        }
        let payload = match &frame.payload {
            Payload::Json(v) => v.clone(),
            Payload::Binary(_) => Value::Null,
        };
        let request = parse_join(&payload);
        for warning in &request.warnings {
            tracing::info!(peer = %self.peer, topic = %frame.topic, "join config: {warning}; using the default");
        }
        let token = request.access_token.unwrap_or_else(|| self.accepted.token.clone());
        let claims = settings
            .verifier
            .verify(&token, jwt::now())
            .map_err(|e| e.join_reason())?;
        Ok(Channel {
            join_ref: frame.join_ref.clone(),
            subtopic: subtopic.to_owned(),
            token,
            claims,
            config: request.config,
            subscribed: false,
            private: None,
            hub_key: None,
        })
    }

    async fn leave(&mut self, frame: Frame) -> Result<(), WsError> {
        if let Some(channel) = self.remove_channel(&frame.topic) {
            self.send(&Outbound::reply(&frame, "ok", json!({}))).await?;
            self.send(&Outbound::close(channel.join_ref(), &frame.topic)).await?;
        }
        Ok(())
    }

    fn remove_channel(&mut self, topic: &str) -> Option<Channel> {
        let channel = self.channels.remove(topic)?;
        if let Some(key) = &channel.hub_key {
            self.ctx.hub.leave(key, self.id);
        }
        if channel.subscribed {
            if let Some(main) = &self.ctx.main {
                main.send(MainRequest::Unsubscribe(ChannelKey {
                    connection: self.id,
                    topic: topic.to_owned(),
                }));
            }
        }
        Counters::decr(&self.ctx.counters.channels_joined);
        Some(channel)
    }

    /// `access_token`: no reply; a bad token ends the channel.
    async fn refresh_token(&mut self, frame: Frame) -> Result<(), WsError> {
        let token = frame
            .payload
            .as_object()
            .and_then(|p| p.get("access_token"))
            .and_then(Value::as_str);
        let Some(token) = token.filter(|t| !t.starts_with("sb_") && !t.is_empty()) else {
            return Ok(());
        };
        let channel = self.channels.get_mut(&frame.topic).expect("checked by the caller");
        if channel.token == token {
            return Ok(());
        }
        match self.ctx.settings().verifier.verify(token, jwt::now()) {
            Ok(claims) => {
                channel.token = token.to_owned();
                let identity_changed = channel.claims.all != claims.all;
                channel.claims = claims;
                if identity_changed && channel.private.is_some() && !self.reauthorize(&frame.topic).await? {
                    return Ok(());
                }
                let channel = self.channels.get_mut(&frame.topic).expect("present");
                // (also after a refused subscription: the new identity may
                // be allowed)
                if channel.config.postgres_changes.is_empty() || !identity_changed {
                    return Ok(());
                }
                // The subscription acts as the new identity from now on: the
                // main thread re-validates it (and replaces the old one), as
                // Supabase re-subscribes on a refresh.
                let channel = self.channels.get(&frame.topic).expect("present");
                let ids = binding_ids(&channel.config);
                let (join_ref, subtopic) = (channel.join_ref().to_owned(), channel.subtopic.clone());
                let result = self.subscribe(&frame.topic, channel, &ids).await;
                if let Some(channel) = self.channels.get_mut(&frame.topic) {
                    channel.subscribed = result.is_ok();
                }
                if result.is_err() {
                    // the old subscription must not outlive its identity
                    if let Some(main) = &self.ctx.main {
                        main.send(MainRequest::Unsubscribe(ChannelKey {
                            connection: self.id,
                            topic: frame.topic.clone(),
                        }));
                    }
                }
                self.send(&subscription_status(&join_ref, &frame.topic, &subtopic, result))
                    .await
            }
            Err(e) => self.end_channel(&frame.topic, &e).await,
        }
    }

    /// The earliest token expiry over all channels.
    fn next_expiry(&self) -> Option<Instant> {
        let exp = self.channels.values().map(|c| c.claims.exp).min()?;
        let secs = (exp - jwt::now()).max(0) as u64;
        Some(Instant::now() + Duration::from_secs(secs))
    }

    async fn expire_tokens(&mut self) -> Result<(), WsError> {
        let now = jwt::now();
        let expired: Vec<(String, i64)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.claims.exp <= now)
            .map(|(t, c)| (t.clone(), c.claims.exp))
            .collect();
        for (topic, exp) in expired {
            self.end_channel(&topic, &AuthError::Expired(now - exp)).await?;
        }
        Ok(())
    }

    /// A private channel's identity changed: reads its permissions again.
    /// Returns false if the channel ended (read permission lost, or the
    /// database could not answer).
    async fn reauthorize(&mut self, topic: &str) -> Result<bool, WsError> {
        let channel = self.channels.get(topic).expect("checked by the caller");
        let had = channel.private.unwrap_or_default().read;
        let subtopic = channel.subtopic.clone();
        let answer = self.authorize(channel, Question::Read).await;
        let read = match answer {
            Ok(read) if read.broadcast || read.presence => read,
            Ok(_) => {
                let message = if had.broadcast || had.presence {
                    format!("You no longer have permission to read from this Channel topic: {subtopic}")
                } else {
                    format!("You do not have permissions to read from this Channel topic: {subtopic}")
                };
                self.end_channel_with(topic, &message).await?;
                return Ok(false);
            }
            Err(message) => {
                self.end_channel_with(topic, &message).await?;
                return Ok(false);
            }
        };
        let (id, tx) = (self.id, self.fanout_tx.clone());
        let hub = &self.ctx.hub;
        let channel = self.channels.get_mut(topic).expect("present");
        channel.private = Some(Private {
            read,
            broadcast_write: None,
        });
        // broadcasts follow the broadcast read permission
        match (&channel.hub_key, read.broadcast) {
            (Some(key), false) => {
                hub.leave(key, id);
                channel.hub_key = None;
            }
            (None, true) => {
                let key = hub_key(topic, true);
                hub.join(&key, Member { connection: id, tx });
                channel.hub_key = Some(key);
            }
            _ => {}
        }
        Ok(true)
    }

    /// The fatal-channel pattern: a `system` error, then `phx_close`.
    async fn end_channel(&mut self, topic: &str, error: &AuthError) -> Result<(), WsError> {
        self.end_channel_with(topic, &error.to_string()).await
    }

    async fn end_channel_with(&mut self, topic: &str, message: &str) -> Result<(), WsError> {
        let Some(channel) = self.remove_channel(topic) else {
            return Ok(());
        };
        Counters::incr(&self.ctx.counters.tokens_rejected);
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

    /// A broadcast in its JSON form: `{"type":"broadcast","event":..,"payload":..}`.
    async fn on_json_broadcast(&mut self, frame: Frame) -> Result<(), WsError> {
        let Some(body) = frame.payload.as_object() else {
            Counters::incr(&self.ctx.counters.malformed_frames);
            return Ok(());
        };
        let event = body.get("event").and_then(Value::as_str).unwrap_or("").to_owned();
        let payload = body.get("payload").cloned().unwrap_or(Value::Null);
        let broadcast = UserBroadcast {
            join_ref: frame.join_ref.clone(),
            msg_ref: frame.msg_ref.clone(),
            topic: frame.topic.clone(),
            event,
            metadata: body.get("meta").cloned(),
            payload: Payload::Json(payload),
        };
        self.on_user_broadcast(broadcast).await
    }

    /// Fans a client's broadcast out to the topic's members (and back to the
    /// sender with `self: true`); replies `ok` with `ack: true`.
    async fn on_user_broadcast(&mut self, b: UserBroadcast) -> Result<(), WsError> {
        let Some(channel) = self.channels.get(&b.topic) else {
            let frame = Frame {
                join_ref: b.join_ref,
                msg_ref: b.msg_ref,
                topic: b.topic,
                event: "broadcast".into(),
                payload: Payload::Json(Value::Null),
            };
            return self.unmatched(&frame).await;
        };
        let (ack, include_self) = (channel.config.broadcast.ack, channel.config.broadcast.self_);
        let hub_topic = hub_key(&b.topic, channel.private.is_some());
        if let Some(private) = channel.private {
            let allowed = match private.broadcast_write {
                Some(known) => known,
                None => {
                    let answer = self.authorize(channel, Question::Write("broadcast")).await;
                    let allowed = answer.is_ok_and(|p| p.broadcast);
                    if let Some(Private { broadcast_write, .. }) =
                        self.channels.get_mut(&b.topic).and_then(|c| c.private.as_mut())
                    {
                        *broadcast_write = Some(allowed);
                    }
                    allowed
                }
            };
            if !allowed {
                tracing::debug!(topic = %b.topic, "broadcast without write permission dropped");
                if ack {
                    let frame = Frame {
                        join_ref: b.join_ref,
                        msg_ref: b.msg_ref,
                        topic: b.topic.clone(),
                        event: "broadcast".into(),
                        payload: Payload::Json(Value::Null),
                    };
                    let reason = format!(
                        "Unauthorized: You do not have permissions to write to this Channel topic: {}",
                        b.topic.strip_prefix(TOPIC_PREFIX).unwrap_or(&b.topic)
                    );
                    self.send(&Outbound::reply(&frame, "error", json!({ "reason": reason })))
                        .await?;
                }
                return Ok(());
            }
        }
        let out = Outbound::Broadcast {
            topic: b.topic.clone(),
            event: b.event,
            metadata: None,
            payload: b.payload,
        };
        if include_self {
            self.send(&out).await?;
        }
        let missed = self.ctx.hub.send(&hub_topic, Some(self.id), out);
        if missed > 0 {
            tracing::debug!(topic = %b.topic, missed, "broadcast skipped members with full queues");
        }
        if ack {
            let frame = Frame {
                join_ref: b.join_ref,
                msg_ref: b.msg_ref,
                topic: b.topic,
                event: "broadcast".into(),
                payload: Payload::Json(Value::Null),
            };
            self.send(&Outbound::reply(&frame, "ok", json!({}))).await?;
        }
        Ok(())
    }
}

/// However the connection ends (even by a panic), its channels leave the
/// hub and the gauges.
impl Drop for Connection {
    fn drop(&mut self) {
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for topic in topics {
            self.remove_channel(&topic);
        }
    }
}

/// The ids the join reply gives a channel's postgres_changes entries.
fn binding_ids(config: &JoinConfig) -> Vec<u32> {
    config
        .postgres_changes
        .iter()
        .map(|b| registry::binding_id(&b.event, b.schema.as_deref(), b.table.as_deref(), b.filter.as_deref()))
        .collect()
}

/// The `system` message that reports a postgres_changes (re)subscription.
fn subscription_status(join_ref: &str, topic: &str, subtopic: &str, result: Result<(), String>) -> Outbound {
    let (status, message) = match result {
        Ok(()) => ("ok", "Subscribed to PostgreSQL".to_owned()),
        Err(message) => ("error", message),
    };
    Outbound::system(Some(join_ref), topic, "postgres_changes", status, &message, subtopic)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
