//! postgres_changes on the worker's main thread: subscriptions (validated
//! by `subscribe`), keeping the interest table in step with them, and
//! draining the change ring into channels in commit order (what each
//! subscriber may see is `access`'s).

use super::access::{AccessCache, CheckGroup, CheckKey};
use super::{catalog, subscribe};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use realtime::changes::event::{self, Visible};
use realtime::changes::registry::{ChannelKey, Registry, RowFilter, Subscription, Target};
use realtime::changes::row;
use realtime::changes::switch::Switches;
use realtime::changes::wire::{ChangeKind, RelationCache, Transaction};
use realtime::protocol::Outbound;
use realtime::server::fanout::{Charge, FanoutError, FanoutSender};
use realtime::server::link::{MainReceiver, MainRequest, Subscribe};
use realtime::stats::Counters;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most the worker keeps, from one drain to the next, of its record
/// buffer and of its batch vector (transactions).
const KEEP_SCRATCH_BYTES: usize = 1 << 20;
const KEEP_BATCH: usize = 16 * 1024;

/// After the publication sync ran (it wakes the worker), when the
/// captured tables are read again: its transaction may not have committed
/// at the first look. (Nothing else is polled: subscribing, unsubscribing
/// and a table's idle time running out are acted on when they happen, and
/// a table whose trigger nobody switches off merely costs its writers.)
const LOOK_AGAIN: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)];
/// The least time between two settles, but for waiting joins.
const SETTLE_AGAIN: Duration = Duration::from_secs(1);
/// While a join waits for a table's lock, how often it is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(10);
/// When a waiting join is given up on.
const JOIN_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// Where a channel's events go, and who it acts as.
pub struct Sink {
    tx: FanoutSender,
    topic: String,
    subtopic: String,
    /// Shared, like `claims`: the delivery loop keys look-ups on both, and
    /// cloning them must not allocate.
    role: Arc<str>,
    /// The token's claims as JSON (`request.jwt.claims`) and `sub`.
    claims: Arc<str>,
    sub: Option<String>,
}

/// A join waiting for capture triggers to be switched on.
struct Waiting {
    key: ChannelKey,
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    since: Instant,
}

/// A change that matched at least one subscription in this batch.
struct Row {
    txn: usize,
    change: usize,
}

pub struct Changes {
    requests: MainReceiver,
    registry: Registry<Sink>,
    /// Schema name to OID, for the interest table.
    schema_oids: HashMap<String, u32>,
    /// What each role may read of each table.
    access: AccessCache,
    /// Transactions drained but not yet deliverable: a transaction with a
    /// lower commit LSN may still be about to publish.
    held: Vec<Transaction>,
    /// Relation descriptions decoded before, reused while unchanged.
    relation_cache: RelationCache,
    /// Kept from drain to drain, so that a batch allocates no buffer the
    /// size of a record or of the batch: the record being decoded, and
    /// the transactions being delivered (up to `KEEP_SCRATCH_BYTES` and
    /// `KEEP_BATCH`: one huge transaction or burst does not pin its
    /// memory for the worker's life).
    scratch: Vec<u8>,
    batch: Vec<Transaction>,
    /// Joins validated but not answered yet: some table they cover has its
    /// capture trigger off and a writer holds the lock needed to switch it
    /// on. Their interest is published; `settle` answers them.
    waiting: Registry<Sink>,
    replies: Vec<Waiting>,
    switches: Switches,
    /// When `settle` last ran.
    settled: Instant,
    /// A subscription ended (its tables' idle time starts), or the
    /// publication sync ran: settle now.
    unsettled: bool,
    /// The publication sync ran: settle again at these times
    /// (`LOOK_AGAIN`).
    look_again: Vec<Instant>,
    /// `capture_syncs` when last looked at.
    syncs_seen: u64,
    /// The key filter slot of each table that has one (see
    /// `publish_interest`).
    filter_slots: HashMap<u32, usize>,
}

impl Changes {
    pub fn new(requests: MainReceiver) -> Changes {
        Changes {
            requests,
            registry: Registry::default(),
            schema_oids: HashMap::new(),
            access: AccessCache::default(),
            held: Vec::new(),
            relation_cache: RelationCache::default(),
            scratch: Vec::new(),
            batch: Vec::new(),
            waiting: Registry::default(),
            replies: Vec::new(),
            switches: Switches::default(),
            settled: Instant::now(),
            unsettled: true,
            look_again: Vec::new(),
            syncs_seen: 0,
            filter_slots: HashMap::new(),
        }
    }

    /// How long the main loop may sleep before `settle` is due (None: until
    /// woken).
    pub fn settle_in(&self) -> Option<Duration> {
        if !self.replies.is_empty() {
            return Some(RETRY_EVERY.saturating_sub(self.settled.elapsed()));
        }
        let timeout = crate::gucs::capture_idle_timeout()?;
        if self.unsettled {
            return Some(Duration::ZERO);
        }
        let off = self.switches.next_due(timeout).map(|off| {
            // (a table a writer kept busy is tried again a second later)
            off.max(self.settled + SETTLE_AGAIN)
        });
        let due = self.look_again.iter().copied().chain(off).min()?;
        Some(due.saturating_duration_since(Instant::now()))
    }

    /// Runs `settle` if it is due.
    pub fn settle_if_due(&mut self) {
        let syncs = crate::shmem::counters()
            .capture_syncs
            .load(std::sync::atomic::Ordering::Relaxed);
        if syncs != self.syncs_seen {
            self.syncs_seen = syncs;
            self.unsettled = true;
            let now = Instant::now();
            self.look_again = LOOK_AGAIN.iter().map(|d| now + *d).collect();
        }
        if self.settle_in() == Some(Duration::ZERO) {
            self.settle();
        }
    }

    /// Brings the capture triggers in line with the subscriptions (see
    /// `realtime::changes::switch`): on for every table a subscription or a
    /// waiting join covers, off for tables unwanted for
    /// `pg_realtime.capture_idle_timeout`. Then answers the waiting joins:
    /// all of them once every wanted trigger is on, else an error to those
    /// that have waited `JOIN_WAIT_LIMIT`.
    fn settle(&mut self) {
        let now = Instant::now();
        self.settled = now;
        self.unsettled = false;
        self.look_again.retain(|again| *again > now);
        // Why waiting joins cannot be answered yet (each a table and the
        // reason): until every wanted trigger is known to be on, none is.
        let mut busy: Vec<String> = Vec::new();
        // SAFETY: reads shared state; on a standby no trigger fires at all.
        if !unsafe { pg_sys::RecoveryInProgress() } {
            let captured = catalog::in_transaction(catalog::captured).unwrap_or_else(|e| {
                pgrx::warning!("pg_realtime: could not list the captured tables: {e}");
                busy.push(format!("the captured tables (could not list them: {e})"));
                Vec::new()
            });
            let interest = crate::shmem::interest();
            let plan = self
                .switches
                .plan(now, &captured, crate::gucs::capture_idle_timeout(), |t| {
                    interest.any(&[t.relid, t.namespace])
                });
            let counters = crate::shmem::counters();
            for i in plan.enable {
                let table = &captured[i];
                // Only ever NOWAIT: a lock request that queued would make
                // every later writer of the table queue behind it.
                match switch(table.relid, true, 0) {
                    Ok(true) => Counters::incr(&counters.captures_enabled),
                    Ok(false) => {
                        Counters::incr(&counters.capture_lock_retries);
                        busy.push(format!(
                            "{} (a transaction that writes it holds a lock on it)",
                            table.name
                        ));
                    }
                    Err(e) => {
                        pgrx::warning!("pg_realtime: could not switch on capture of {}: {e}", table.name);
                        busy.push(format!("{} ({e})", table.name));
                    }
                }
            }
            for i in plan.disable {
                let table = &captured[i];
                match switch(table.relid, false, 0) {
                    Ok(true) => Counters::incr(&counters.captures_disabled),
                    Ok(false) => {} // a writer is busy with it: next time
                    Err(e) => pgrx::warning!("pg_realtime: could not switch off capture of {}: {e}", table.name),
                }
            }
            // The switches ran the publication sync (ALTER TABLE fires its
            // event trigger): that is no news to look again for. (A sync of
            // someone else's in the meantime is missed, which can only
            // leave a trigger on for longer.)
            self.syncs_seen = counters.capture_syncs.load(std::sync::atomic::Ordering::Relaxed);
        }
        if self.replies.is_empty() {
            return;
        }
        if busy.is_empty() {
            for waiting in std::mem::take(&mut self.replies) {
                if let Some(subscription) = self.waiting.unsubscribe(&waiting.key) {
                    if self.registry.get(&waiting.key).is_none() {
                        Counters::incr(&crate::shmem::counters().subscriptions);
                    }
                    self.registry.subscribe(waiting.key, subscription);
                }
                let _ = waiting.reply.send(Ok(()));
            }
            return;
        }
        let (late, patient): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.replies)
            .into_iter()
            .partition(|w| now.duration_since(w.since) >= JOIN_WAIT_LIMIT);
        self.replies = patient;
        if late.is_empty() {
            return;
        }
        for waiting in late {
            self.waiting.unsubscribe(&waiting.key);
            let _ = waiting.reply.send(Err(format!(
                "Unable to subscribe to changes: capture could not be switched on within {} s for {}. Retry later.",
                JOIN_WAIT_LIMIT.as_secs(),
                busy.join(", ")
            )));
        }
        self.publish_interest();
    }

    /// Handles queued requests from the network threads for about `slice`;
    /// returns whether some are left.
    pub fn handle_requests(&mut self, slice: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < slice {
            let Ok(request) = self.requests.try_recv() else {
                return false;
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
        !self.requests.is_empty()
    }

    /// Whether network requests are waiting.
    pub fn has_requests(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Ends a channel's subscription, active or waiting (nothing if it has
    /// none).
    fn unsubscribe(&mut self, key: &ChannelKey) {
        if self.registry.unsubscribe(key).is_some() {
            Counters::decr(&crate::shmem::counters().subscriptions);
            self.publish_interest();
            self.unsettled = true;
        }
        if self.waiting.unsubscribe(key).is_some() {
            self.replies.retain(|w| w.key != *key);
            self.publish_interest();
        }
    }

    fn subscribe(&mut self, request: Subscribe) {
        let role = request.claims.role.clone();
        let claims: Arc<str> = Arc::from(request.claims.json.as_str());
        let who = subscribe::Subscriber {
            role: &role,
            claims: &claims,
            sub: request.claims.sub.as_deref(),
        };
        let validated = BackgroundWorker::transaction(|| {
            let r = subscribe::validate(&request.bindings, &who);
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
                self.schema_oids.extend(schemas);
                let sink = Sink {
                    tx: request.sink,
                    topic: request.key.topic.clone(),
                    subtopic: request.subtopic,
                    role: Arc::from(role),
                    claims,
                    sub: request.claims.sub.clone(),
                };
                // Interest first, then the triggers, then the reply: once
                // the client hears back, every later commit on these tables
                // is captured.
                self.waiting
                    .subscribe(request.key.clone(), Subscription { bindings, sink });
                self.replies.push(Waiting {
                    key: request.key,
                    reply: request.reply,
                    since: Instant::now(),
                });
                self.publish_interest();
                self.settle();
            }
            Err(message) => {
                let _ = request.reply.send(Err(message));
            }
        }
    }

    /// Publishes what the subscriptions and the waiting joins cover: the
    /// tables and schemas anyone listens to and, for each table whose
    /// bindings all have an equality condition on one column, the keys
    /// they want there (capture triggers drop other rows). The filters
    /// are written before the interest table points at them, and a slot
    /// is freed only after nothing points at it; a trigger that reads a
    /// slot meanwhile rewritten for another table sends its row on.
    fn publish_interest(&mut self) {
        let (mut tables, mut schemas, mut all) = self.registry.interest();
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
            let filter = self.registry.row_filter(*relid).union(self.waiting.row_filter(*relid));
            let RowFilter::Keys { column, kind, keys } = filter else {
                continue;
            };
            let Some(slot) = self.filter_slots.get(relid).copied().or_else(|| free.pop()) else {
                continue; // no slot left: every row of this table goes on
            };
            if filters.write(slot, *relid, column, kind, keys) {
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

    /// Delivers everything committed so far, in commit-LSN order; returns
    /// how many transactions there were.
    pub fn drain(&mut self) -> usize {
        // The WAL insert position, then the fence, then the ring. A
        // committer that registered after the position was read commits
        // beyond it; one registered before the fence is read bounds the
        // watermark, and if it leaves after that read, it has published
        // first, so its record is in the ring for the drain below.
        // SAFETY: reads the WAL insert position (under its spinlock).
        let position = unsafe { pg_sys::GetXLogInsertRecPtr() };
        let watermark = crate::shmem::fence().deliverable(position);
        let ring = crate::shmem::ring();
        let (held, cache) = (&mut self.held, &mut self.relation_cache);
        ring.drain(&mut self.scratch, |_, bytes| {
            match Transaction::decode_cached(bytes, cache) {
                Ok(t) => held.push(t),
                Err(e) => pgrx::warning!("pg_realtime: dropped an unreadable change record: {e}"),
            }
        });
        if self.scratch.capacity() > KEEP_SCRATCH_BYTES {
            self.scratch = Vec::new();
        }
        let losses = ring.take_losses();
        if losses.records > 0 {
            self.notify_loss(&losses.relations, losses.all);
        }
        if self.held.is_empty() {
            return 0;
        }
        // Deliver in commit-LSN order what is below every commit still in
        // flight; hold the rest until the stragglers have published (they
        // wake the worker when they leave the fence).
        self.held.sort_by_key(|t| t.commit_lsn);
        let ready = self.held.partition_point(|t| t.commit_lsn < watermark);
        if ready == 0 {
            return 0;
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.extend(self.held.drain(..ready));
        self.deliver(&batch);
        batch.clear();
        if batch.capacity() <= KEEP_BATCH {
            self.batch = batch;
        }
        ready
    }

    /// Matches the transactions against the subscriptions and sends each
    /// channel its events.
    fn deliver(&mut self, transactions: &[Transaction]) {
        let max_record_bytes = crate::gucs::max_record_bytes();
        // 1. Match every change against the subscriptions.
        let mut rows: Vec<Row> = Vec::new();
        let mut pending: Vec<(ChannelKey, Vec<u32>, usize)> = Vec::new();
        // The columns each relation's subscriptions filter on (None: no
        // subscription covers it): rows are parsed that far and no further.
        // (A batch touches few relations: a vector beats a map.)
        let mut filtered: Vec<(u32, Option<row::Wanted>)> = Vec::new();
        for (t, txn) in transactions.iter().enumerate() {
            if txn.overflowed {
                let relids: Vec<u32> = txn.relations.iter().map(|r| r.relid).collect();
                self.notify_loss(&relids, false);
                continue;
            }
            for (c, change) in txn.changes.iter().enumerate() {
                let relation = &txn.relations[change.relation as usize];
                let at = match filtered.iter().position(|(relid, _)| *relid == relation.relid) {
                    Some(at) => at,
                    None => {
                        let wanted = self
                            .registry
                            .filtered_columns(relation)
                            .map(|names| row::Wanted::new(names, relation));
                        filtered.push((relation.relid, wanted));
                        filtered.len() - 1
                    }
                };
                let Some(columns) = &filtered[at].1 else { continue };
                // Most changes match nobody: ruled out on the raw values
                // first, without parsing them.
                if let Some(value) = columns.raw_values(change) {
                    if !self.registry.may_match(relation, change.kind, value) {
                        continue;
                    }
                }
                let parsed = row::Parsed::with_columns(change, columns);
                let matches = self.registry.matches(relation, change.kind, &parsed);
                if matches.is_empty() {
                    continue;
                }
                rows.push(Row { txn: t, change: c });
                for m in matches {
                    pending.push((m.channel.clone(), m.ids, rows.len() - 1));
                }
            }
        }
        if pending.is_empty() {
            return;
        }
        let relation_of = |r: &Row| {
            let txn = &transactions[r.txn];
            &txn.relations[txn.changes[r.change].relation as usize]
        };
        // 2. What each (role, table) may read: privileges and policies, read
        //    through SPI only for the pairs something matched, and cached.
        let mut unreadable = HashSet::new();
        let stale: HashSet<(Arc<str>, u32)> = pending
            .iter()
            .filter_map(|(key, _, row)| {
                let role = &self.registry.get(key)?.sink.role;
                let relid = relation_of(&rows[*row]).relid;
                self.access.is_stale(role, relid).then(|| (role.clone(), relid))
            })
            .collect();
        if !stale.is_empty() {
            let names: HashMap<u32, (String, String)> = transactions
                .iter()
                .flat_map(|t| t.relations.iter())
                .map(|r| (r.relid, (r.schema.clone(), r.table.clone())))
                .collect();
            unreadable = self.access.read(stale.into_iter().collect(), &names);
        }
        // 3. Row-level security: one check per (identity, table), over all
        //    of its rows in this batch.
        let mut groups: HashMap<CheckKey, CheckGroup> = HashMap::new();
        for (key, _, row) in &pending {
            let Some(sub) = self.registry.get(key) else { continue };
            let relid = relation_of(&rows[*row]).relid;
            if self.access.get(&sub.sink.role, relid).is_some_and(|g| g.checks_rows()) {
                groups
                    .entry((sub.sink.role.clone(), sub.sink.claims.clone(), relid))
                    .or_insert_with(|| CheckGroup {
                        sub: sub.sink.sub.clone(),
                        rows: BTreeSet::new(),
                    })
                    .rows
                    .insert(*row);
            }
        }
        let visible = if groups.is_empty() {
            HashMap::new()
        } else {
            self.access.check_rows(groups, |i| {
                let change = &transactions[rows[i].txn].changes[rows[i].change];
                // the row as of the commit: the old one for DELETE
                let image = match change.kind {
                    ChangeKind::Delete => change.old.as_deref(),
                    _ => change.record.as_deref(),
                };
                image.unwrap_or("{}")
            })
        };
        // 4. Deliver, building each change's frame once per column set.
        let mut frames: HashMap<(usize, Visible), (Arc<str>, Arc<Charge>)> = HashMap::new();
        let mut gone: Vec<ChannelKey> = Vec::new();
        // Channels some change could not be checked for: they are told.
        let mut unchecked: Vec<ChannelKey> = Vec::new();
        let counters = crate::shmem::counters();
        for (key, ids, row) in pending {
            let Some(sub) = self.registry.get(&key) else { continue };
            let sink = &sub.sink;
            let r = &rows[row];
            let relation = relation_of(r);
            let Some(grants) = self.access.get(&sink.role, relation.relid) else {
                if unreadable.contains(&(sink.role.clone(), relation.relid)) {
                    unchecked.push(key);
                }
                continue;
            };
            if grants.checks_rows() {
                match visible.get(&(sink.role.clone(), sink.claims.clone(), relation.relid)) {
                    Some(Some(seen)) if seen.contains(&row) => {}
                    Some(None) => {
                        unchecked.push(key);
                        continue;
                    }
                    _ => continue,
                }
            }
            let Some(columns) = grants.visible(relation) else {
                continue;
            };
            let commit_time_us = transactions[r.txn].commit_time_us;
            // (a frame's data is shared by every channel it goes to, and
            // its memory counted once against the total)
            let (data, charge) = frames.entry((row, columns)).or_insert_with_key(|(_, columns)| {
                let change = &transactions[r.txn].changes[r.change];
                let data: Arc<str> =
                    Arc::from(event::data(change, relation, commit_time_us, max_record_bytes, columns));
                let charge = sink.tx.charge(data.len());
                (data, charge)
            });
            let out = Outbound::PostgresChanges {
                topic: sink.topic.clone(),
                ids,
                data: data.clone(),
            };
            match sink.tx.send_shared(Arc::new(out), charge) {
                Ok(()) => Counters::incr(&counters.events_delivered),
                // Too far behind: its connection tells each channel and
                // closes (`server::fanout`).
                Err(FanoutError::Full) => Counters::incr(&counters.events_dropped),
                Err(FanoutError::Closed) => gone.push(key),
            }
        }
        // (a connection that closed without its leaves reaching us)
        gone.sort();
        gone.dedup();
        for key in gone {
            self.unsubscribe(&key);
        }
        self.notify_unchecked(unchecked);
    }

    /// Tells each channel that some change it may have wanted could not be
    /// checked against its privileges or policies (an error, or a check
    /// over `pg_realtime.check_timeout`; the server log says which) and was
    /// not delivered.
    fn notify_unchecked(&self, mut keys: Vec<ChannelKey>) {
        keys.sort();
        keys.dedup();
        let message = "Some changes could not be checked against this subscription's privileges or row-level \
                       security policies and were not delivered: refetch to catch up";
        for key in keys {
            if let Some(sub) = self.registry.get(&key) {
                let _ = sub.sink.tx.force(Arc::new(system_error(&sub.sink, message)));
            }
        }
    }

    /// Tells every channel subscribed to one of `relids` (or to anything,
    /// with `all`) that changes were lost, so it can refetch.
    fn notify_loss(&self, relids: &[u32], all: bool) {
        let message = "Some changes may not have been delivered (the realtime queue overflowed, or they were written \
                       while this subscription was being set up): refetch to catch up";
        for sink in self.registry.sinks_for(relids, all) {
            let _ = sink.tx.force(Arc::new(system_error(sink, message)));
        }
    }
}

/// A `system` error on a channel, `extension: postgres_changes`.
fn system_error(sink: &Sink, message: &str) -> Outbound {
    Outbound::system(None, &sink.topic, "postgres_changes", "error", message, &sink.subtopic)
}

/// Switches a table's capture triggers in a transaction of its own, so the
/// worker never holds one table's lock while waiting for another's.
fn switch(relid: u32, on: bool, wait_ms: i32) -> Result<bool, String> {
    catalog::in_transaction(|| catalog::switch_capture(relid, on, wait_ms))
}
