//! The channels subscribed to `postgres_changes`, on the worker's main
//! thread: active subscriptions, joins waiting for their capture triggers,
//! what the interest table and key filters say about both, and the system
//! messages channels are sent when changes were lost or not checked.

use bgworker::changes::deliver::{Subscriber, Viewer};
use bgworker::changes::registry::{ChannelKey, Registry, RowFilter, Subscription};
use bgworker::changes::switch::Busy;
use bgworker::server::errors::SubscribeError;
use bgworker::server::fanout::FanoutSender;
use bgworker::server::protocol::Outbound;
use bgworker::shared::stats::Counters;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a waiting join is given up on.
pub const JOIN_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// Where a channel's events go, and who it acts as.
pub struct Sink {
    pub tx: FanoutSender,
    pub topic: String,
    pub subtopic: String,
    pub viewer: Viewer,
}

impl Subscriber for Sink {
    fn viewer(&self) -> &Viewer {
        &self.viewer
    }
}

/// The answer a join waits for: `Ok` once its changes are captured.
pub type JoinReply = tokio::sync::oneshot::Sender<Result<(), SubscribeError>>;

/// A join waiting for capture triggers to be switched on.
struct Waiting {
    key: ChannelKey,
    /// Its askers: the join, and any later ask for the same channel (a
    /// token refresh) while it waits, all answered alike.
    replies: Vec<JoinReply>,
    since: Instant,
}

impl Waiting {
    fn answer(self, answer: Result<(), SubscribeError>) {
        for reply in self.replies {
            let _ = reply.send(answer.clone());
        }
    }
}

#[derive(Default)]
pub struct Channels {
    active: Registry<Sink>,
    /// Joins validated but not answered yet: some table they cover has its
    /// capture trigger off and a writer holds the lock needed to switch it
    /// on. Their interest is published; `admit_waiting` answers them.
    waiting: Registry<Sink>,
    replies: Vec<Waiting>,
    /// Schema name to OID, for the interest table.
    schema_oids: HashMap<String, u32>,
    /// The key filter slot of each table that has one (see
    /// `publish_interest`).
    filter_slots: HashMap<u32, usize>,
    /// Joins or leaves not yet in the interest table: it is written once
    /// per batch of requests (each write reads every subscription).
    interest_stale: bool,
}

impl Channels {
    pub fn active(&self) -> &Registry<Sink> {
        &self.active
    }

    pub fn has_waiting(&self) -> bool {
        !self.replies.is_empty()
    }

    pub fn learn_schemas(&mut self, schemas: impl IntoIterator<Item = (String, u32)>) {
        self.schema_oids.extend(schemas);
    }

    /// Adds a validated join to the waiting ones and publishes its
    /// interest: from now on its tables' commits are captured (once their
    /// triggers are on).
    /// An ask for a channel that already waits (a token refresh) replaces
    /// its subscription and is answered with it, within the first ask's
    /// limit: one wait per channel, so one refusal cannot end another's
    /// subscription, nor an admission find none.
    pub fn wait(&mut self, key: ChannelKey, subscription: Subscription<Sink>, reply: JoinReply) {
        self.waiting.subscribe(key.clone(), subscription);
        match self.replies.iter_mut().find(|w| w.key == key) {
            Some(waiting) => waiting.replies.push(reply),
            None => self.replies.push(Waiting {
                key,
                replies: vec![reply],
                since: Instant::now(),
            }),
        }
        self.interest_stale = true;
    }

    /// Ends a channel's subscription, active or waiting (nothing if it has
    /// none); returns whether an active one ended.
    pub fn unsubscribe(&mut self, key: &ChannelKey) -> bool {
        let ended = self.active.unsubscribe(key).is_some();
        if ended {
            Counters::decr(&crate::shmem::counters().subscriptions);
            self.interest_stale = true;
        }
        if self.waiting.unsubscribe(key).is_some() {
            self.replies.retain(|w| w.key != *key);
            self.interest_stale = true;
        }
        ended
    }

    /// Writes the interest table and key filters if joins or leaves came
    /// since the last time. Before a join is answered: from its reply on,
    /// every commit it wants must be captured and let through.
    pub fn publish_if_stale(&mut self) {
        if std::mem::take(&mut self.interest_stale) {
            self.publish_interest();
        }
    }

    /// Makes each waiting join whose tables' triggers are all on (none in
    /// `busy`) active, and answers it.
    pub fn admit_waiting(&mut self, busy: &Busy) {
        self.publish_if_stale();
        let (ready, held): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.replies)
            .into_iter()
            .partition(|w| !self.held_up(&w.key, busy));
        self.replies = held;
        for waiting in ready {
            if let Some(subscription) = self.waiting.unsubscribe(&waiting.key) {
                if self.active.get(&waiting.key).is_none() {
                    Counters::incr(&crate::shmem::counters().subscriptions);
                }
                self.active.subscribe(waiting.key.clone(), subscription);
            }
            waiting.answer(Ok(()));
        }
    }

    /// Why a waiting join's tables are not all captured yet.
    fn busy_reasons(&self, key: &ChannelKey, busy: &Busy) -> String {
        let schema_oid = |name: &str| self.schema_oids.get(name).copied();
        let mut reasons: Vec<&str> = self
            .waiting
            .get(key)
            .into_iter()
            .flat_map(|s| s.bindings.iter())
            .flat_map(|b| busy.reasons_for(&b.target, schema_oid))
            .collect();
        reasons.sort_unstable();
        reasons.dedup();
        reasons.join(", ")
    }

    /// Whether a waiting join covers a table whose trigger is not on.
    fn held_up(&self, key: &ChannelKey, busy: &Busy) -> bool {
        let Some(subscription) = self.waiting.get(key) else {
            return false;
        };
        let schema_oid = |name: &str| self.schema_oids.get(name).copied();
        subscription
            .bindings
            .iter()
            .any(|b| busy.holds_up(&b.target, schema_oid))
    }

    /// Some wanted trigger is not on (`busy`): refuses the joins that have
    /// waited `JOIN_WAIT_LIMIT`, each told why its own tables are off.
    pub fn give_up_late(&mut self, now: Instant, busy: &Busy) {
        let (late, patient): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.replies)
            .into_iter()
            .partition(|w| now.duration_since(w.since) >= JOIN_WAIT_LIMIT);
        self.replies = patient;
        if late.is_empty() {
            return;
        }
        for waiting in late {
            let why = self.busy_reasons(&waiting.key, busy);
            self.waiting.unsubscribe(&waiting.key);
            waiting.answer(Err(SubscribeError::CaptureOff {
                secs: JOIN_WAIT_LIMIT.as_secs(),
                busy: why,
            }));
        }
        self.publish_interest();
    }

    /// Publishes what the subscriptions and the waiting joins cover: the
    /// tables and schemas anyone listens to and, for each table whose
    /// bindings all have an equality condition on one column, the keys
    /// they want there (capture triggers drop other rows). The filters
    /// are written before the interest table points at them, and a slot
    /// is freed only after nothing points at it; a trigger that reads a
    /// slot meanwhile rewritten for another table sends its row on.
    fn publish_interest(&mut self) {
        self.interest_stale = false;
        let (mut tables, mut schemas, mut all) = self.active.interest();
        let (waiting_tables, waiting_schemas, waiting_all) = self.waiting.interest();
        tables.extend(waiting_tables);
        schemas.extend(waiting_schemas);
        all |= waiting_all;
        let mut oids: HashSet<u32> = tables.iter().copied().collect();
        let filters = crate::shmem::key_filters();
        let mut free: Vec<usize> = (0..filters.len())
            .rev()
            .filter(|slot| !self.filter_slots.values().any(|s| s == slot))
            .collect();
        let mut slots: HashMap<u32, usize> = HashMap::new();
        for relid in &oids {
            let filter = self.active.row_filter(*relid).union(self.waiting.row_filter(*relid));
            let RowFilter::Keys { column, kind, bloom } = filter else {
                continue;
            };
            let Some(slot) = self.filter_slots.get(relid).copied().or_else(|| free.pop()) else {
                continue; // no slot left: every row of this table goes on
            };
            if filters.write(slot, *relid, column, kind, &bloom) {
                slots.insert(*relid, slot);
            }
        }
        oids.extend(schemas.iter().filter_map(|s| self.schema_oids.get(s)));
        crate::shmem::interest().set_with_schemas(&oids, all, !schemas.is_empty(), |oid| slots.get(&oid).copied());
        for (relid, slot) in &self.filter_slots {
            if slots.get(relid) != Some(slot) {
                filters.clear(*slot);
            }
        }
        self.filter_slots = slots;
    }

    /// Tells each channel that some change it may have wanted could not be
    /// checked against its privileges or policies (an error, or a check
    /// over `pg_realtime.check_timeout`; the server log says which) and was
    /// not delivered.
    pub fn notify_unchecked(&self, keys: &[&ChannelKey]) {
        let message = "Some changes could not be checked against this subscription's privileges or row-level \
                       security policies and were not delivered: refetch to catch up";
        for key in keys {
            if let Some(sub) = self.active.get(key) {
                let _ = sub.sink.tx.force(Arc::new(system_error(&sub.sink, message)));
            }
        }
    }

    /// Tells every channel subscribed to one of `relids` (or to anything,
    /// with `all`) that changes were lost, so it can refetch.
    pub fn notify_loss(&self, relids: &[u32], all: bool) {
        let message = "Some changes may not have been delivered (the realtime queue overflowed, or they were written \
                       while this subscription was being set up): refetch to catch up";
        for sink in self.active.sinks_for(relids, all) {
            let _ = sink.tx.force(Arc::new(system_error(sink, message)));
        }
    }
}

/// A `system` error on a channel, `extension: postgres_changes`.
pub fn system_error(sink: &Sink, message: &str) -> Outbound {
    Outbound::system(None, &sink.topic, "postgres_changes", "error", message, &sink.subtopic)
}
