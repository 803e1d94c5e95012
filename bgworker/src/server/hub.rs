//! Which connections have joined which topic, for broadcast fan-out.
//! Delivering a message costs work proportional to the topic's members.

use super::fanout::{FanoutError, FanoutSender};
use crate::server::protocol::Outbound;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

const PRIVATE_PREFIX: &str = "private\u{0}";

/// The hub key of a topic (`realtime:room`): private and public channels
/// of the same name never hear each other.
pub fn hub_key(topic: &str, private: bool) -> String {
    if private {
        format!("{PRIVATE_PREFIX}{topic}")
    } else {
        topic.to_owned()
    }
}

/// The topic and whether it is private, from a hub key.
pub fn topic_of(key: &str) -> (&str, bool) {
    match key.strip_prefix(PRIVATE_PREFIX) {
        Some(topic) => (topic, true),
        None => (key, false),
    }
}

/// A connection's fan-out queue and its id.
#[derive(Clone, Debug)]
pub struct Member {
    pub connection: u64,
    pub tx: FanoutSender,
}

#[derive(Default)]
pub struct Hub {
    topics: RwLock<HashMap<String, Vec<Member>>>,
}

impl Hub {
    pub fn join(&self, topic: &str, member: Member) {
        let mut topics = self.topics.write();
        let members = topics.entry(topic.to_owned()).or_default();
        members.retain(|m| m.connection != member.connection);
        members.push(member);
    }

    pub fn leave(&self, topic: &str, connection: u64) {
        let mut topics = self.topics.write();
        if let Some(members) = topics.get_mut(topic) {
            members.retain(|m| m.connection != connection);
            if members.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// Queues `message` for every member of `topic` but `except`, its bytes
    /// charged once against the total however many queue it. Returns how
    /// many members were too far behind and missed it.
    pub fn send(&self, topic: &str, except: Option<u64>, message: Outbound) -> usize {
        let topics = self.topics.read();
        topics.get(topic).map_or(0, |members| send_to(members, except, message))
    }

    /// Queues, within the notices' allowance, a message for every member
    /// of each topic `wanted` picks (by its topic and privacy), made by
    /// `message` from the topic: for what must not be lost.
    pub fn notify(&self, wanted: impl Fn(&str, bool) -> bool, message: impl Fn(&str) -> Outbound) {
        let topics = self.topics.read();
        for (key, members) in topics.iter() {
            let (topic, private) = topic_of(key);
            if !wanted(topic, private) {
                continue;
            }
            let notice = Arc::new(message(topic));
            for member in members {
                let _ = member.tx.force(notice.clone());
            }
        }
    }

    #[cfg(test)]
    pub fn members(&self, topic: &str) -> usize {
        self.topics.read().get(topic).map_or(0, Vec::len)
    }
}

/// Queues `message` for each of `members` but `except`, its bytes charged
/// once against the total. Returns how many were too far behind and
/// missed it (their connections are told and closed: `fanout`).
pub fn send_to(members: &[Member], except: Option<u64>, message: Outbound) -> usize {
    let Some(first) = members.first() else {
        return 0;
    };
    let message = Arc::new(message);
    let size = message.weight();
    let charge = first.tx.charge(size);
    members
        .iter()
        .filter(|m| Some(m.connection) != except)
        .filter(|m| m.tx.send_shared_sized(message.clone(), size, &charge) == Err(FanoutError::Full))
        .count()
}
