//! postgres_changes on the worker's main thread: answering the network
//! threads' requests (joins validated by `subscribe`, private-channel
//! checks by `private`), keeping the capture triggers in step with the
//! subscriptions (`capture_switch`), and draining the change ring
//! (`drain`) into channels (`deliver`, with what each subscriber may see
//! from `access`).

use super::access::AccessCache;
use super::capture_switch::CaptureSwitch;
use super::channels::{Channels, Sink};
use super::drain::Drain;
use super::{catalog, deliver, subscribe};
use bgworker::changes::deliver::Viewer;
use bgworker::changes::registry::{ChannelKey, Subscription, Target};
use bgworker::server::link::{MainReceiver, MainRequest, Subscribe};
use bgworker::server::Context;
use pgrx::bgworkers::BackgroundWorker;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct PostgresChanges {
    requests: MainReceiver,
    /// The server, for broadcasts from the database.
    server: Arc<Context>,
    channels: Channels,
    /// What each role may read of each table.
    access: AccessCache,
    capture: CaptureSwitch,
    drain: Drain,
    /// Joins validated in this batch of requests: settled (triggers, then
    /// replies) once at its end, not one by one.
    joins_to_settle: bool,
}

impl PostgresChanges {
    pub fn new(requests: MainReceiver, server: Arc<Context>) -> PostgresChanges {
        PostgresChanges {
            requests,
            server,
            channels: Channels::default(),
            access: AccessCache::default(),
            capture: CaptureSwitch::default(),
            drain: Drain::default(),
            joins_to_settle: false,
        }
    }

    /// How long the main loop may sleep before `settle` is due (None: until
    /// woken).
    pub fn settle_in(&self) -> Option<Duration> {
        self.capture.due_in(self.channels.has_waiting())
    }

    /// Runs `settle` if it is due.
    pub fn settle_if_due(&mut self) {
        self.capture.note_syncs();
        if self.settle_in() == Some(Duration::ZERO) {
            self.settle();
        }
    }

    /// Brings the capture triggers in line with the subscriptions, then
    /// answers the waiting joins whose triggers are all on; of the others,
    /// those that have waited `channels::JOIN_WAIT_LIMIT` get an error.
    fn settle(&mut self) {
        // (the triggers follow the interest table: joins first in it)
        self.channels.publish_if_stale();
        let now = Instant::now();
        let interest = crate::shmem::interest();
        let busy = self.capture.switch_triggers(now, |oids| interest.any(oids));
        if !self.channels.has_waiting() {
            return;
        }
        self.channels.admit_waiting(&busy);
        if !busy.is_empty() {
            self.channels.give_up_late(now, &busy);
        }
    }

    /// Handles queued requests from the network threads for about `slice`;
    /// returns whether some are left.
    pub fn handle_requests(&mut self, slice: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < slice {
            let Ok(request) = self.requests.try_recv() else {
                break;
            };
            match request {
                // (one whose asker stopped waiting is not worth the work:
                // it unsubscribes, or was refused, already)
                MainRequest::Subscribe(s) if s.reply.is_closed() => {}
                MainRequest::Authorize(a) if a.reply.is_closed() => {}
                MainRequest::Subscribe(s) => self.subscribe(s),
                MainRequest::Authorize(request) => super::private::authorize(request),
                MainRequest::Unsubscribe(key) => self.unsubscribe(&key),
            }
        }
        self.channels.publish_if_stale();
        if std::mem::take(&mut self.joins_to_settle) {
            self.settle();
        }
        !self.requests.is_empty()
    }

    /// Whether network requests are waiting.
    pub fn has_requests(&self) -> bool {
        !self.requests.is_empty()
    }

    fn unsubscribe(&mut self, key: &ChannelKey) {
        if self.channels.unsubscribe(key) {
            self.capture.unsettle();
        }
    }

    fn subscribe(&mut self, request: Subscribe) {
        let viewer = Viewer {
            role: Arc::from(request.claims.role.as_str()),
            claims: Arc::from(request.claims.json.as_str()),
            sub: request.claims.sub.clone(),
        };
        let validated = BackgroundWorker::transaction(|| {
            let r = subscribe::validate(&request.bindings, &viewer);
            r.map(|bindings| {
                let schemas: Vec<(String, u32)> = bindings
                    .iter()
                    .filter_map(|b| match &b.target {
                        Target::Schema(s) => Some(s.clone()),
                        _ => None,
                    })
                    .filter_map(|s| catalog::schema_oid(&s).ok().flatten().map(|oid| (s, oid)))
                    .collect();
                (bindings, schemas)
            })
        });
        match validated {
            Ok((bindings, schemas)) => {
                self.channels.learn_schemas(schemas);
                let sink = Sink {
                    tx: request.sink,
                    topic: request.key.topic.clone(),
                    subtopic: request.subtopic,
                    viewer,
                };
                // Interest first, then the triggers, then the reply: once
                // the client hears back, every later commit on these tables
                // is captured.
                self.channels
                    .wait(request.key, Subscription { bindings, sink }, request.reply);
                self.joins_to_settle = true;
            }
            Err(message) => {
                let _ = request.reply.send(Err(message));
            }
        }
    }

    /// Delivers everything committed so far, in commit-LSN order; returns
    /// how many transactions there were.
    pub fn drain(&mut self) -> usize {
        let (losses, batch) = self.drain.take();
        if losses.needs_notice() {
            self.channels.notify_loss(&losses.relations, losses.all);
            self.server.announce_broadcast_loss(&losses.relations, losses.all);
        }
        let ready = batch.len();
        if ready > 0 && deliver::deliver(&mut self.channels, &mut self.access, &self.server, &batch) {
            self.capture.unsettle();
        }
        self.drain.recycle(batch);
        ready
    }
}
