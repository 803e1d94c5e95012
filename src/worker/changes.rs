//! postgres_changes on the worker's main thread: validating subscriptions
//! against the catalog, keeping the interest table in step with them, and
//! draining the change ring into channels in commit order.

use super::catalog;
use pgrx::bgworkers::BackgroundWorker;
use realtime::changes::event;
use realtime::changes::filter::{self, Condition};
use realtime::changes::registry::{ChannelKey, EventFilter, Registry, Subscription, Target};
use realtime::changes::value::Kind;
use realtime::changes::wire::Transaction;
use realtime::join::PostgresChangesBinding;
use realtime::protocol::Outbound;
use realtime::server::fanout::{FanoutError, FanoutSender};
use realtime::server::link::{MainReceiver, MainRequest, Subscribe};
use realtime::stats::Counters;
use serde_json::Value;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a privilege answer is trusted before it is asked again, so a
/// REVOKE stops deliveries within this time.
const PRIVILEGE_TTL: Duration = Duration::from_secs(1);

/// Where a channel's events go, and who it acts as.
pub struct Sink {
    tx: FanoutSender,
    /// Events were dropped for this channel (its client is too slow) and
    /// it was told; cleared once its queue has drained.
    lagged: Cell<bool>,
    topic: String,
    subtopic: String,
    role: String,
}

pub struct Changes {
    requests: MainReceiver,
    registry: Registry<Sink>,
    /// Schema name to OID, for the interest table.
    schema_oids: HashMap<String, u32>,
    /// (role, relid) -> may the role receive the table's rows, and when that
    /// was established.
    allowed: HashMap<(String, u32), (bool, Instant)>,
    /// Transactions drained but not yet deliverable: a transaction with a
    /// lower commit LSN may still be about to publish.
    held: Vec<Transaction>,
}

/// The parameters as Supabase lists them in its messages.
fn params(b: &PostgresChangesBinding) -> String {
    format!(
        "[event: {}, schema: {}, table: {}, filters: [{}], select: nil]",
        b.event,
        b.schema.as_deref().unwrap_or("nil"),
        b.table.as_deref().unwrap_or("nil"),
        b.filter.as_deref().unwrap_or("")
    )
}

fn refused(b: &PostgresChangesBinding, why: &str) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: {why}",
        params(b)
    )
}

impl Changes {
    pub fn new(requests: MainReceiver) -> Changes {
        Changes {
            requests,
            registry: Registry::default(),
            schema_oids: HashMap::new(),
            allowed: HashMap::new(),
            held: Vec::new(),
        }
    }

    /// Handles every queued request from the network threads.
    pub fn handle_requests(&mut self) {
        while let Ok(request) = self.requests.try_recv() {
            match request {
                MainRequest::Subscribe(s) => self.subscribe(s),
                MainRequest::Unsubscribe(key) => {
                    if self.registry.unsubscribe(&key).is_some() {
                        Counters::decr(&crate::shmem::counters().subscriptions);
                        self.publish_interest();
                    }
                }
            }
        }
    }

    fn subscribe(&mut self, request: Subscribe) {
        let role = request.claims.role.clone();
        let validated = BackgroundWorker::transaction(|| {
            let r = validate(&request.bindings, &role);
            r.map(|(bindings, bypass)| {
                let schemas: Vec<(String, u32)> = bindings
                    .iter()
                    .filter_map(|b| match &b.target {
                        Target::Schema(s) => Some(s.clone()),
                        _ => None,
                    })
                    .filter_map(|s| catalog::schema_oid(&s).ok().flatten().map(|oid| (s, oid)))
                    .collect();
                (bindings, bypass, schemas)
            })
        });
        match validated {
            Ok((bindings, _bypass_rls, schemas)) => {
                self.schema_oids.extend(schemas);
                // Validation has just established that the role may read
                // these tables: that answer is fresh.
                let now = Instant::now();
                for binding in &bindings {
                    if let Target::Table(relid) = binding.target {
                        self.allowed.insert((role.clone(), relid), (true, now));
                    }
                }
                let sink = Sink {
                    tx: request.sink,
                    lagged: Cell::new(false),
                    topic: request.key.topic.clone(),
                    subtopic: request.subtopic,
                    role,
                };
                if self.registry.get(&request.key).is_none() {
                    Counters::incr(&crate::shmem::counters().subscriptions);
                }
                self.registry.subscribe(request.key, Subscription { bindings, sink });
                // Interest first, then the reply: once the client hears
                // back, every later commit on these tables is captured.
                self.publish_interest();
                let _ = request.reply.send(Ok(()));
            }
            Err(message) => {
                let _ = request.reply.send(Err(message));
            }
        }
    }

    fn publish_interest(&self) {
        let (tables, schemas, all) = self.registry.interest();
        let mut oids: HashSet<u32> = tables.into_iter().collect();
        oids.extend(schemas.iter().filter_map(|s| self.schema_oids.get(s)));
        crate::shmem::interest().set_with_schemas(&oids, all, !schemas.is_empty());
    }

    /// Delivers everything committed so far, in commit-LSN order; returns
    /// how many transactions there were.
    pub fn drain(&mut self) -> usize {
        // The watermark first: a committer that leaves the fence after this
        // read has published before leaving, so either it still bounds the
        // watermark or its record is in the ring for the drain below.
        let watermark = crate::shmem::fence().watermark();
        let ring = crate::shmem::ring();
        let held = &mut self.held;
        ring.drain(|_, bytes| match Transaction::decode(&bytes) {
            Ok(t) => held.push(t),
            Err(e) => pgrx::warning!("pg_realtime: dropped an unreadable change record: {e}"),
        });
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
        let transactions: Vec<Transaction> = self.held.drain(..ready).collect();
        let drained = transactions.len();
        let max_record_bytes = crate::gucs::max_record_bytes();
        // Match first; privileges are checked (through SPI, cached) only for
        // the roles and tables that something actually matched.
        let mut deliveries: Vec<(ChannelKey, Vec<u32>, Arc<str>, u32)> = Vec::new();
        for txn in &transactions {
            if txn.overflowed {
                let relids: Vec<u32> = txn.relations.iter().map(|r| r.relid).collect();
                self.notify_loss(&relids, false);
                continue;
            }
            for change in &txn.changes {
                let relation = &txn.relations[change.relation as usize];
                let parsed = event::Parsed::new(relation, change);
                let matches = self.registry.matches(relation, change.kind, parsed.filter_row());
                if matches.is_empty() {
                    continue;
                }
                let data: Arc<str> = Arc::from(parsed.data(relation, txn.commit_time_us, max_record_bytes));
                for m in matches {
                    deliveries.push((m.channel.clone(), m.ids, data.clone(), relation.relid));
                }
            }
        }
        if deliveries.is_empty() {
            return drained;
        }
        let stale: HashSet<(String, u32)> = deliveries
            .iter()
            .filter_map(|(key, _, _, relid)| {
                let role = &self.registry.get(key)?.sink.role;
                let fresh = self
                    .allowed
                    .get(&(role.clone(), *relid))
                    .is_some_and(|(_, at)| at.elapsed() < PRIVILEGE_TTL);
                (!fresh).then(|| (role.clone(), *relid))
            })
            .collect();
        if !stale.is_empty() {
            self.check_privileges(stale.into_iter().collect());
        }
        let counters = crate::shmem::counters();
        for (key, ids, data, relid) in deliveries {
            let Some(sub) = self.registry.get(&key) else { continue };
            let sink = &sub.sink;
            if !self.may_receive(sink, relid) {
                continue;
            }
            let out = Outbound::PostgresChanges {
                topic: sink.topic.clone(),
                ids,
                data,
            };
            match sink.tx.send(Arc::new(out)) {
                Ok(()) => {
                    Counters::incr(&counters.events_delivered);
                    if sink.lagged.get() && sink.tx.pending() == 0 {
                        sink.lagged.set(false);
                    }
                }
                Err(FanoutError::Full) => {
                    Counters::incr(&counters.events_dropped);
                    if !sink.lagged.replace(true) {
                        let message =
                            "Too many changes are waiting for this client: some were dropped, refetch to catch up";
                        let _ = sink.tx.force(Arc::new(system_error(sink, message)));
                    }
                }
                Err(FanoutError::Closed) => {}
            }
        }
        drained
    }

    fn may_receive(&self, sink: &Sink, relid: u32) -> bool {
        matches!(self.allowed.get(&(sink.role.clone(), relid)), Some((true, _)))
    }

    /// Until row-level security is enforced per row, fail closed: a role
    /// receives a table's rows only if it may SELECT them and row-level
    /// security does not apply to it.
    fn check_privileges(&mut self, pairs: Vec<(String, u32)>) {
        let answers = BackgroundWorker::transaction(|| {
            pairs
                .into_iter()
                .map(|(role, relid)| {
                    let ok = catalog::role(&role).ok().flatten().is_some_and(|r| {
                        catalog::can_select(&role, relid).unwrap_or(false)
                            && (r.bypass_rls || !catalog::rls_enabled(relid).unwrap_or(true))
                    });
                    ((role, relid), ok)
                })
                .collect::<Vec<_>>()
        });
        let now = Instant::now();
        for (key, ok) in answers {
            self.allowed.insert(key, (ok, now));
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

/// Validates a channel's bindings for `role`; returns them ready for the
/// registry and whether the role bypasses row-level security, or the
/// message of the `system` error.
fn validate(
    bindings: &[(u32, PostgresChangesBinding)],
    role: &str,
) -> Result<(Vec<realtime::changes::registry::Binding>, bool), String> {
    let publication = crate::gucs::publication();
    let spi = |e: pgrx::spi::Error| format!("Realtime was unable to check the subscription: {e}");
    let role_info = catalog::role(role).map_err(spi)?;
    let Some(role_info) = role_info else {
        return Err(format!("Unauthorized: role \"{role}\" of the token does not exist"));
    };
    let mut out = Vec::with_capacity(bindings.len());
    for (id, b) in bindings {
        let schema = match (&b.schema, &b.table) {
            (None, None) => {
                return Err(format!(
                "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {}",
                params(b)
            ))
            }
            (None, Some(_)) => "public".to_owned(),
            (Some(s), _) => s.clone(),
        };
        let table = b.table.clone().filter(|t| t != "*");
        let mut conditions: Vec<Condition> = Vec::new();
        let parsed = filter::parse(b.filter.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
        let target = match (&schema[..], table) {
            ("*", _) | (_, None) => {
                let schema_filter = (schema != "*").then_some(schema.as_str());
                if !catalog::published(&publication, schema_filter, None).map_err(spi)? {
                    return Err(not_enabled(b));
                }
                if !parsed.is_empty() {
                    return Err(refused(b, "filters need an explicit table"));
                }
                if schema == "*" {
                    Target::All
                } else {
                    Target::Schema(schema.clone())
                }
            }
            (_, Some(table)) => {
                let Some(found) = catalog::table(&schema, &table).map_err(spi)? else {
                    return Err(refused(b, &format!("relation \"{schema}.{table}\" does not exist")));
                };
                if !catalog::published(&publication, Some(&schema), Some(&table)).map_err(spi)? {
                    return Err(not_enabled(b));
                }
                if !catalog::can_select(role, found.relid).map_err(spi)? {
                    return Err(refused(
                        b,
                        &format!("permission denied: role \"{role}\" cannot SELECT from \"{schema}.{table}\""),
                    ));
                }
                if found.rls && !role_info.bypass_rls {
                    return Err(refused(
                        b,
                        &format!(
                            "row-level security is enabled on \"{schema}.{table}\": this version of pg_realtime delivers its changes only to roles that bypass row-level security"
                        ),
                    ));
                }
                for condition in parsed {
                    let Some(column) = catalog::column(found.relid, &condition.column).map_err(spi)? else {
                        return Err(refused(b, &format!("invalid column for filter {}", condition.column)));
                    };
                    let kind = Kind::of_type(&column.typname);
                    if condition.op.is_ordering() && !kind.is_ordered() {
                        return Err(refused(
                            b,
                            &format!(
                                "filter on {} of type {}: only eq, neq and in are supported",
                                condition.column, column.typname
                            ),
                        ));
                    }
                    let mut values = Vec::with_capacity(condition.values.len());
                    for raw in &condition.values {
                        let json = catalog::cast_to_json(raw, &column.sql_type)
                            .map_err(|e| refused(b, &format!("invalid value for filter {}: {e}", condition.column)))?;
                        let value: Value = serde_json::from_str(&json).map_err(|e| refused(b, &e.to_string()))?;
                        values.push(normalise(kind, value));
                    }
                    conditions.push(Condition {
                        column: condition.column,
                        kind,
                        op: condition.op,
                        negate: condition.negate,
                        values,
                    });
                }
                Target::Table(found.relid)
            }
        };
        out.push(realtime::changes::registry::Binding {
            id: *id,
            target,
            events: EventFilter::parse(&b.event),
            conditions,
        });
    }
    Ok((out, role_info.bypass_rls))
}

fn not_enabled(b: &PostgresChangesBinding) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}",
        params(b)
    )
}

/// Filter values are compared with captured values, which the worker
/// normalises the same way (timestamps to UTC).
fn normalise(kind: Kind, value: Value) -> Value {
    match (kind, value) {
        (Kind::Timestamptz, Value::String(s)) => Value::String(realtime::changes::value::timestamptz_to_utc(&s)),
        (_, v) => v,
    }
}
