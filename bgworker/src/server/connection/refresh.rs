//! `access_token` (`docs/protocol.md`, "Refreshing the token"): no reply; a bad token ends
//! the channel; a new identity is authorized again (a private channel's
//! read permission first, then the postgres_changes subscription), the
//! answers acted on when they come. Until then the channel keeps what it
//! had; an answer about an identity the channel has since left is ignored.

use super::asks::Stage;
use super::join::{hub_key, subscription_status};
use super::{Connection, Private, Subscription, REVALIDATE_EVERY};
use crate::server::errors::{AuthorizeError, SubscribeError};
use crate::server::hub::Member;
use crate::server::jwt;
use crate::server::link::{Authorize, Permissions, Question};
use crate::server::protocol::Frame;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;

impl Connection {
    pub(super) async fn refresh_token(&mut self, frame: Frame) -> Result<(), WsError> {
        let token = frame
            .payload
            .as_object()
            .and_then(|p| p.get("access_token"))
            .and_then(Value::as_str);
        let Some(token) = token.filter(|t| !t.starts_with("sb_") && !t.is_empty()) else {
            return Ok(());
        };
        let topic = frame.topic;
        if self.channels.get(&topic).is_none_or(|c| c.token == token) {
            return Ok(());
        }
        let claims = match self.ctx.settings().verifier.verify(token, jwt::now()) {
            Ok(claims) => claims,
            Err(e) => return self.end_channel(&topic, &e).await,
        };
        let Some(channel) = self.channels.get_mut(&topic) else {
            return Ok(());
        };
        let asks_main = channel.private.is_some() || !channel.config.postgres_changes.is_empty();
        if channel.claims.all == claims.all || !asks_main {
            // the same identity (or nothing to ask): taken as it is
            let changed = channel.claims.all != claims.all;
            channel.token = token.to_owned();
            channel.claims = claims;
            channel.identity += u64::from(changed);
            return Ok(());
        }
        // A new identity asks the main thread again, as a join does, within
        // the same rate limits: now if they allow it, else as soon as they
        // do. Until then the channel keeps its old identity, and its old
        // token's expiry; only the latest new one is asked about.
        channel.pending = Some(Box::new((token.to_owned(), claims)));
        self.revalidate_at.get_or_insert_with(Instant::now);
        self.revalidate_due();
        Ok(())
    }

    /// Asks the main thread about each channel's new identity that waits,
    /// as far as the join rate limits allow now; `force`: for this topic
    /// whatever they allow (its old token expired).
    pub(super) fn revalidate_due(&mut self) {
        let due: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, c)| c.pending.is_some())
            .map(|(t, _)| t.clone())
            .collect();
        self.revalidate_at = None;
        for topic in due {
            if !self.take_join_token() {
                self.revalidate_at = Some(Instant::now() + REVALIDATE_EVERY);
                return;
            }
            self.take_new_identity(&topic);
        }
    }

    /// The channel acts as its pending new identity from now on, and the
    /// main thread is asked about it.
    pub(super) fn take_new_identity(&mut self, topic: &str) {
        let Some(channel) = self.channels.get_mut(topic) else {
            return;
        };
        let Some(pending) = channel.pending.take() else {
            return;
        };
        let (token, claims) = *pending;
        channel.token = token;
        channel.claims = claims;
        channel.identity += 1;
        if let Some(private) = &mut channel.private {
            // what the old identity was allowed to write no longer counts
            private.broadcast_write = None;
            private.presence_write = None;
        }
        self.recheck_presence_write(topic);
        self.revalidate(topic);
    }

    /// Asks the main thread about the channel's current identity: a private
    /// channel's read permission first, else its subscription.
    fn revalidate(&mut self, topic: &str) {
        let Some(channel) = self.channels.get(topic) else {
            return;
        };
        if channel.private.is_none() {
            self.resubscribe(topic);
            return;
        }
        let (subtopic, claims) = (channel.subtopic.clone(), channel.claims.clone());
        let asker = self.asker(topic, channel, Stage::Refresh);
        self.asks.authorize(self.ctx.main.as_ref(), asker, |reply| Authorize {
            subtopic,
            claims,
            question: Question::Read,
            reply,
        });
    }

    /// The subscription acts as the channel's new identity: the main thread
    /// validates it again and replaces the old one, as Supabase
    /// re-subscribes on a refresh (also after a refused subscription: the
    /// new identity may be allowed).
    fn resubscribe(&mut self, topic: &str) {
        let Some(mut channel) = self.channels.remove(topic) else {
            return;
        };
        if !channel.config.postgres_changes.is_empty() {
            match self.over_binding_limits(&channel.config) {
                None => self.ask_subscribe(topic, &mut channel, Stage::Refresh),
                Some(problem) => {
                    // (limits lowered by a reload: the old identity's
                    // subscription must not go on, and the client is told)
                    if channel.subscription != Subscription::None {
                        self.unsubscribe(topic, channel.join);
                        channel.subscription = Subscription::None;
                    }
                    let status = subscription_status(channel.join_ref(), topic, &channel.subtopic, Err(problem.into()));
                    let _ = self.fanout_tx.force(std::sync::Arc::new(status));
                }
            }
        }
        self.channels.insert(topic.to_owned(), channel);
    }

    /// A private channel's read permission for its new identity: kept,
    /// changed (its broadcasts follow the broadcast permission), or lost
    /// (the channel ends).
    pub(super) async fn on_refresh_read(
        &mut self,
        topic: &str,
        join: u64,
        identity: u64,
        read: Result<Permissions, AuthorizeError>,
    ) -> Result<(), WsError> {
        let Some(channel) = self
            .channels
            .get(topic)
            .filter(|c| c.join == join && c.identity == identity)
        else {
            return Ok(());
        };
        let had = channel.private.unwrap_or_default().read;
        let subtopic = channel.subtopic.clone();
        let read = match read {
            Ok(read) if read.broadcast || read.presence => read,
            Ok(_) => {
                let message = if had.broadcast || had.presence {
                    format!("You no longer have permission to read from this Channel topic: {subtopic}")
                } else {
                    format!("You do not have permissions to read from this Channel topic: {subtopic}")
                };
                return self.end_channel_with(topic, &message).await;
            }
            Err(e) => return self.end_channel_with(topic, &e.to_string()).await,
        };
        let (id, tx) = (self.id, self.fanout_tx.clone());
        let hub = &self.ctx.hub;
        let Some(channel) = self.channels.get_mut(topic) else {
            return Ok(());
        };
        channel.private = Some(Private {
            read,
            broadcast_write: None,
            presence_write: None,
        });
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
        let hears_presence = channel.config.presence.enabled && read.presence;
        match (channel.presence.listening.take(), hears_presence) {
            (Some(key), false) => self.ctx.presences.unlisten(&key, id),
            (Some(key), true) => channel.presence.listening = Some(key),
            // (it starts from a state, as after a join)
            (None, true) => self.listen_presence(topic),
            (None, false) => {}
        }
        self.resubscribe(topic);
        Ok(())
    }

    /// The subscription for the channel's new identity: in place, or
    /// refused (then the old one ends too: it must not outlive its
    /// identity). An answer for an identity since replaced is ignored: the
    /// newer question decides.
    pub(super) async fn on_refresh_subscribed(
        &mut self,
        topic: &str,
        join: u64,
        identity: u64,
        result: Result<(), SubscribeError>,
    ) -> Result<(), WsError> {
        let Some(channel) = self.channels.get_mut(topic).filter(|c| c.join == join) else {
            return Ok(());
        };
        if channel.identity != identity {
            return Ok(());
        }
        channel.subscription = if result.is_ok() {
            Subscription::Active
        } else {
            Subscription::None
        };
        let (join_ref, subtopic) = (channel.join_ref().to_owned(), channel.subtopic.clone());
        if result.is_err() {
            self.unsubscribe(topic, join);
        }
        self.send(&subscription_status(&join_ref, topic, &subtopic, result))
            .await
    }
}
