//! Joining a channel (`docs/protocol.md`, "Joining"): the rate limits, the
//! checks that need nothing but the frame (topic, channel limit, config
//! limits, token), then what needs the main thread — a private channel's
//! read permission, then the postgres_changes subscription — asked without
//! waiting, and the reply once the answers are in.

use super::asks::{Answer, Asker, Reply, Stage};
use super::{Channel, Connection, Private, Subscription, TOPIC_PREFIX};
use crate::changes::{filter, registry};
use crate::server::errors::{JoinRefusal, OverLimit, SubscribeError};
use crate::server::hub::Member;
use crate::server::join::{parse_join, JoinConfig};
use crate::server::jwt;
use crate::server::link::{Authorize, Question, Subscribe};
use crate::server::log::escape;
use crate::server::protocol::{Frame, Outbound, Payload};
use crate::server::replay;
use crate::shared::stats::Counters;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::error::Error as WsError;

pub(super) use crate::server::hub::hub_key;

pub(super) fn no_read_permission(subtopic: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {subtopic}")
}

/// The ids the join reply gives a channel's postgres_changes entries.
pub(super) fn binding_ids(config: &JoinConfig) -> Vec<u32> {
    config
        .postgres_changes
        .iter()
        .map(|b| registry::binding_id(&b.event, b.schema.as_deref(), b.table.as_deref(), b.filter.as_deref()))
        .collect()
}

/// The `system` message that reports a postgres_changes (re)subscription.
pub(super) fn subscription_status(
    join_ref: &str,
    topic: &str,
    subtopic: &str,
    result: Result<(), SubscribeError>,
) -> Outbound {
    let (status, message) = match result {
        Ok(()) => ("ok", "Subscribed to PostgreSQL".to_owned()),
        Err(e) => ("error", e.to_string()),
    };
    Outbound::system(Some(join_ref), topic, "postgres_changes", status, &message, subtopic)
}

impl Connection {
    pub(super) async fn join(&mut self, frame: Frame) -> Result<(), WsError> {
        let Some(subtopic) = frame.topic.strip_prefix(TOPIC_PREFIX).map(str::to_owned) else {
            return self.unmatched(&frame).await;
        };
        let limits = self.ctx.settings().limits.clone();
        let now = std::time::Instant::now();
        if !self.joins.take(limits.joins_per_second_per_connection, now)
            || !self.ctx.joins.take(limits.joins_per_second, now)
        {
            return self.refuse_join(&frame, &JoinRefusal::TooManyJoins.to_string()).await;
        }
        // A second join of a joined (or joining) topic replaces the first.
        if let Some(old) = self.remove_channel(&frame.topic) {
            let close = Outbound::close(old.join_ref(), &frame.topic);
            self.send(&close).await?;
        }
        let channel = match self.admit(&frame, &subtopic) {
            Ok(channel) => channel,
            Err(reason) => return self.refuse_join(&frame, &reason.to_string()).await,
        };
        if channel.config.private {
            let asker = self.asker(&frame.topic, &channel, Stage::Join);
            let claims = channel.claims.clone();
            self.asks.authorize(self.ctx.main.as_ref(), asker, |reply| Authorize {
                subtopic,
                claims,
                question: Question::Read,
                reply,
            });
            self.joining.insert(frame.topic.clone(), (channel, frame));
            return Ok(());
        }
        self.subscribe_then_finish(channel, frame).await
    }

    /// One join's worth of the rate limits, per connection and in total.
    pub(super) fn take_join_token(&mut self) -> bool {
        let limits = &self.ctx.settings().limits;
        let now = std::time::Instant::now();
        self.joins.take(limits.joins_per_second_per_connection, now)
            && self.ctx.joins.take(limits.joins_per_second, now)
    }

    async fn refuse_join(&mut self, frame: &Frame, reason: &str) -> Result<(), WsError> {
        Counters::incr(&self.ctx.counters.joins_refused);
        self.log_refusal(&frame.topic, reason);
        self.send(&Outbound::reply(frame, "error", json!({ "reason": reason })))
            .await
    }

    pub(super) fn asker(&self, topic: &str, channel: &Channel, stage: Stage) -> Asker {
        Asker {
            topic: topic.to_owned(),
            join: channel.join,
            identity: channel.identity,
            stage,
        }
    }

    /// Asks the main thread to subscribe the channel's bindings (as its
    /// current identity); the answer comes back to `on_answer`.
    pub(super) fn ask_subscribe(&mut self, topic: &str, channel: &mut Channel, stage: Stage) {
        let ids = binding_ids(&channel.config);
        let (key, subtopic, claims, sink) = (
            self.key(topic, channel.join),
            channel.subtopic.clone(),
            channel.claims.clone(),
            self.fanout_tx.clone(),
        );
        let bindings = ids
            .into_iter()
            .zip(channel.config.postgres_changes.iter().cloned())
            .collect();
        let request = move |reply| Subscribe {
            key,
            subtopic,
            bindings,
            claims,
            sink,
            reply,
        };
        let asker = self.asker(topic, channel, stage);
        self.asks.subscribe(self.ctx.main.as_ref(), asker, request);
        if channel.subscription == Subscription::None {
            channel.subscription = Subscription::Asked;
        }
    }

    /// The join's step once its private read permission (if any) is known:
    /// the postgres_changes subscription, if it has bindings, else the reply.
    async fn subscribe_then_finish(&mut self, mut channel: Channel, frame: Frame) -> Result<(), WsError> {
        if channel.config.postgres_changes.is_empty() {
            return self.finish_join(channel, frame, None).await;
        }
        if let Some(problem) = self.over_binding_limits(&channel.config) {
            return self.finish_join(channel, frame, Some(Err(problem.into()))).await;
        }
        self.ask_subscribe(&frame.topic.clone(), &mut channel, Stage::Join);
        self.joining.insert(frame.topic.clone(), (channel, frame));
        Ok(())
    }

    /// Why a join's postgres_changes bindings are more than one join may
    /// ask of the main thread (`Limits`), if they are.
    pub(super) fn over_binding_limits(&self, config: &JoinConfig) -> Option<OverLimit> {
        let limits = &self.ctx.settings().limits;
        let bindings = config.postgres_changes.len();
        if bindings > limits.max_bindings_per_join {
            return Some(OverLimit::Bindings {
                count: bindings,
                max: limits.max_bindings_per_join,
            });
        }
        let mut in_all = 0;
        for f in config.postgres_changes.iter().filter_map(|b| b.filter.as_deref()) {
            if f.len() > limits.max_filter_bytes {
                return Some(OverLimit::FilterBytes {
                    bytes: f.len(),
                    max: limits.max_filter_bytes,
                });
            }
            let conditions = filter::parse(f).map_or(0, |c| c.len());
            if conditions > limits.max_filter_conditions {
                return Some(OverLimit::FilterConditions {
                    count: conditions,
                    max: limits.max_filter_conditions,
                });
            }
            in_all += conditions;
        }
        if in_all > limits.max_conditions_per_join {
            return Some(OverLimit::JoinConditions {
                count: in_all,
                max: limits.max_conditions_per_join,
            });
        }
        None
    }

    /// Replies to the join: the channel joins the hub (if it may read its
    /// broadcasts) and the gauges, then the reply, `presence_state` and the
    /// subscription's status go out, in that order.
    async fn finish_join(
        &mut self,
        mut channel: Channel,
        frame: Frame,
        subscription: Option<Result<(), SubscribeError>>,
    ) -> Result<(), WsError> {
        let ids = binding_ids(&channel.config);
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
        if channel.private.is_none_or(|p| p.read.broadcast) {
            self.join_hub(&mut channel, &frame.topic);
        }
        Counters::incr(&self.ctx.counters.channels_joined);
        let join_ref = channel.join_ref().to_owned();
        let hears_presence = channel.config.presence.enabled && channel.private.is_none_or(|p| p.read.presence);
        let subtopic = channel.subtopic.clone();
        self.channels.insert(frame.topic.clone(), Box::new(channel));
        // (its state is queued: it follows the reply and any replay)
        if hears_presence {
            self.listen_presence(&frame.topic);
        }
        self.send(&Outbound::reply(
            &frame,
            "ok",
            json!({ "postgres_changes": postgres_changes }),
        ))
        .await?;
        if let Some(result) = subscription {
            let subscribed = result.is_ok();
            self.send(&subscription_status(&join_ref, &frame.topic, &subtopic, result))
                .await?;
            if let Some(notice) = self.ctx.restart_notice().filter(|_| subscribed) {
                let notice = Outbound::system(
                    Some(&join_ref),
                    &frame.topic,
                    "postgres_changes",
                    "error",
                    &notice,
                    &subtopic,
                );
                self.send(&notice).await?;
            }
        }
        Ok(())
    }

    /// The channel joins the hub of its topic, to hear its broadcasts. A
    /// private channel that asked for a replay gets it queued (charged
    /// like any message) in the same step, under the replay store's lock:
    /// each stored message reaches it once, replayed or live.
    fn join_hub(&mut self, channel: &mut Channel, topic: &str) {
        let key = hub_key(topic, channel.private.is_some());
        let member = Member {
            connection: self.id,
            tx: self.fanout_tx.clone(),
        };
        let hub = &self.ctx.hub;
        let asked = channel
            .config
            .broadcast
            .replay
            .as_ref()
            .filter(|_| channel.private.is_some());
        match asked {
            Some(asked) => {
                let bounds = self.ctx.settings().limits.replay;
                let cutoff = crate::server::database::now_ms().saturating_sub(bounds.max_age_ms);
                let (join_ref, tx) = (channel.join_ref().to_owned(), &self.fanout_tx);
                let range = replay::Range {
                    since_ms: asked.since_ms.max(cutoff),
                    limit: replay::limit(asked.limit),
                };
                self.ctx.replay.join_and_replay(&channel.subtopic, range, |replayed| {
                    hub.join(&key, member);
                    for message in replayed.iter().filter_map(|m| m.replayed(&join_ref, topic)) {
                        // (too much for its queue: the connection is told and closed)
                        let _ = tx.send(Arc::new(message));
                    }
                });
            }
            None => hub.join(&key, member),
        }
        channel.hub_key = Some(key);
    }

    /// Acts on an answer from the main thread.
    pub(super) async fn on_answer(&mut self, answer: Answer) -> Result<(), WsError> {
        match (answer.stage, answer.reply) {
            (Stage::Join, Reply::Read(read)) => {
                let Some((mut channel, frame)) = self.take_joining(&answer.topic, answer.join) else {
                    return Ok(());
                };
                match read {
                    // (a replay needs the broadcasts themselves)
                    Ok(read) if channel.config.broadcast.replay.is_some() && !read.broadcast => {
                        self.refuse_join(&frame, &no_read_permission(&channel.subtopic)).await
                    }
                    Ok(read) if read.broadcast || read.presence => {
                        channel.private = Some(Private {
                            read,
                            broadcast_write: None,
                            presence_write: None,
                        });
                        self.subscribe_then_finish(channel, frame).await
                    }
                    Ok(_) => self.refuse_join(&frame, &no_read_permission(&channel.subtopic)).await,
                    Err(e) => self.refuse_join(&frame, &e.to_string()).await,
                }
            }
            (Stage::Join, Reply::Subscribed(result)) => {
                let Some((mut channel, frame)) = self.take_joining(&answer.topic, answer.join) else {
                    // left before the answer came (its removal ended it)
                    return Ok(());
                };
                channel.subscription = if result.is_ok() {
                    Subscription::Active
                } else {
                    // (the main thread may yet set it up: a timed-out ask)
                    self.unsubscribe(&answer.topic, answer.join);
                    Subscription::None
                };
                self.finish_join(channel, frame, Some(result)).await
            }
            (Stage::Refresh, Reply::Read(read)) => {
                self.on_refresh_read(&answer.topic, answer.join, answer.identity, read)
                    .await
            }
            (Stage::Refresh, Reply::Subscribed(result)) => {
                self.on_refresh_subscribed(&answer.topic, answer.join, answer.identity, result)
                    .await
            }
            (_, Reply::Write("presence", allowed)) => {
                self.on_presence_write_answer(&answer.topic, answer.join, answer.identity, allowed)
                    .await
            }
            (_, Reply::Write(_, allowed)) => {
                self.on_write_answer(&answer.topic, answer.join, answer.identity, allowed)
                    .await
            }
        }
    }

    /// The joining channel of `topic` if it is that join (else the answer
    /// is about a join that was left or replaced).
    fn take_joining(&mut self, topic: &str, join: u64) -> Option<(Channel, Frame)> {
        match self.joining.get(topic) {
            Some((channel, _)) if channel.join == join => self.take_joining_any(topic),
            _ => None,
        }
    }

    /// Takes `topic`'s joining channel out, whichever join it is; the map's
    /// table goes with its last entry.
    pub(super) fn take_joining_any(&mut self, topic: &str) -> Option<(Channel, Frame)> {
        let taken = self.joining.remove(topic);
        if self.joining.is_empty() {
            self.joining = std::collections::HashMap::new();
        }
        taken
    }

    /// Decides what needs only the frame; `Err` is the reply's `reason`.
    fn admit(&mut self, frame: &Frame, subtopic: &str) -> Result<Channel, JoinRefusal> {
        if subtopic.is_empty() {
            return Err(JoinRefusal::TopicNameRequired);
        }
        let settings = self.ctx.settings();
        if self.channels.len() + self.joining.len() >= settings.max_channels_per_connection {
            return Err(JoinRefusal::TooManyChannels);
        }
        let payload = match &frame.payload {
            Payload::Json(v) => v.clone(),
            Payload::Text(_) | Payload::Binary(_) => Value::Null,
        };
        let request = parse_join(&payload);
        if let Some(warning) = request.warnings.first().filter(|_| self.ctx.may_log()) {
            tracing::info!(
                peer = %self.peer,
                topic = %escape(&frame.topic),
                "join config: {}; using the default{}",
                escape(warning),
                if request.warnings.len() > 1 { " (and more)" } else { "" }
            );
        }
        if request.config.broadcast.replay.is_some() && !request.config.private {
            return Err(JoinRefusal::ReplayOnPublic);
        }
        let token = request.access_token.unwrap_or_else(|| self.accepted.token.clone());
        let claims = settings.verifier.verify(&token, jwt::now())?;
        let join = self.next_join;
        self.next_join += 1;
        let presence = super::presence::ChannelPresence::new(&request.config.presence.key);
        Ok(Channel {
            join,
            join_ref: frame.join_ref.clone(),
            subtopic: subtopic.to_owned(),
            token,
            claims,
            identity: 0,
            config: request.config,
            subscription: Subscription::None,
            private: None,
            hub_key: None,
            held: Default::default(),
            presence,
            pending: None,
        })
    }
}
