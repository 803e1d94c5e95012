//! Validating a channel's `postgres_changes` bindings against the catalog,
//! as the channel's identity: the tables exist and are published, the role
//! may read them and every filtered column, and each filter value casts to
//! its column's type. Casts run as the subscriber (`acting`): a domain's
//! CHECK or a cast function is code of the type's owner.

use super::acting::{self, Identity};
use super::catalog;
use bgworker::changes::deliver::Viewer;
use bgworker::changes::filter::{self, Condition, ParsedCondition};
use bgworker::changes::registry::{Binding, EventFilter, Target};
use bgworker::changes::value;
use bgworker::server::errors::{BindingProblem, Params, SubscribeError};
use bgworker::server::join::PostgresChangesBinding;
use bgworker::shared::keys::{self, Kind};
use serde_json::Value;

fn invalid(b: &PostgresChangesBinding, problem: BindingProblem) -> SubscribeError {
    SubscribeError::Invalid {
        params: Params::of(b),
        problem,
    }
}

fn unchecked(e: impl std::fmt::Display) -> SubscribeError {
    SubscribeError::Unchecked(e.to_string())
}

/// Validates a channel's bindings for the subscriber; returns them ready
/// for the registry, or the `system` error for the client. Runs inside a
/// transaction; a PostgreSQL error in it (a column dropped meanwhile, say)
/// is reported like any other reason.
pub fn validate(bindings: &[(u32, PostgresChangesBinding)], who: &Viewer) -> Result<Vec<Binding>, SubscribeError> {
    catalog::catching(|| checked(bindings, who)).unwrap_or_else(|e| Err(SubscribeError::Postgres(e.to_string())))
}

fn checked(bindings: &[(u32, PostgresChangesBinding)], who: &Viewer) -> Result<Vec<Binding>, SubscribeError> {
    catalog::clear_search_path().map_err(unchecked)?;
    let role = acting::resolve(&who.role).map_err(unchecked)??;
    let identity = Identity {
        role,
        role_name: &who.role,
        claims: &who.claims,
        sub: who.sub.as_deref(),
        topic: None,
        // (each cast notes its own table)
        subject: 0,
    };
    let publication = crate::gucs::publication();
    // The catalog first, as the worker; then every cast of the join at
    // once, as the subscriber.
    let mut targets = Vec::with_capacity(bindings.len());
    for (_, b) in bindings {
        targets.push(target(b, &publication, identity.role_name)?);
    }
    let casts: Vec<&Uncast> = targets.iter().flat_map(|(_, c)| c.iter()).collect();
    let timeout = std::time::Duration::from_millis(crate::gucs::check_timeout_ms().max(0) as u64);
    let cast = acting::as_identity(&identity, || {
        let started = std::time::Instant::now();
        Ok(casts
            .iter()
            .map(|c| {
                // (once the deadline passed, its cancel was spent: the rest
                // are not run)
                if !timeout.is_zero() && started.elapsed() >= timeout {
                    return Err("the casts took longer than pg_realtime.check_timeout".to_owned());
                }
                if let Some(why) = acting::refused(c.relid) {
                    return Err(why);
                }
                let _noted = acting::checking(c.relid);
                let _timed = acting::Timed::start(c.relid, crate::gucs::check_timeout_ms());
                catalog::catching(|| catalog::cast_all_to_json(&c.values, &c.sql_type))
                    .and_then(|r| Ok(r?))
                    .map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>())
    })
    .map_err(unchecked)?;
    let _ = catalog::release_session_locks();
    let mut cast = cast.into_iter();
    let mut out = Vec::with_capacity(bindings.len());
    for ((id, b), (target, uncast)) in bindings.iter().zip(targets) {
        let mut conditions = Vec::with_capacity(uncast.len());
        for c in uncast {
            let values = cast.next().unwrap_or_else(|| Err("no answer".into()));
            conditions.push(c.finish(b, values)?);
        }
        out.push(Binding {
            id: *id,
            target,
            events: EventFilter::parse(&b.event),
            conditions,
        });
    }
    Ok(out)
}

/// What one binding covers, and its filter's conditions.
fn target(b: &PostgresChangesBinding, publication: &str, role: &str) -> Result<(Target, Vec<Uncast>), SubscribeError> {
    let schema = match (&b.schema, &b.table) {
        (None, None) => return Err(SubscribeError::NoTarget(Params::of(b))),
        (None, Some(_)) => "public".to_owned(),
        (Some(s), _) => s.clone(),
    };
    let parsed = filter::parse(b.filter.as_deref().unwrap_or(""))?;
    let table = b.table.clone().filter(|t| t != "*" && schema != "*");
    let Some(table) = table else {
        let schema_filter = (schema != "*").then_some(schema.as_str());
        if !catalog::published(publication, schema_filter, None).map_err(unchecked)? {
            return Err(SubscribeError::NotPublished(Params::of(b)));
        }
        if !parsed.is_empty() {
            return Err(invalid(b, BindingProblem::FilterWithoutTable));
        }
        let target = if schema == "*" {
            Target::All
        } else {
            Target::Schema(schema)
        };
        return Ok((target, Vec::new()));
    };
    let Some(found) = catalog::table(&schema, &table).map_err(unchecked)? else {
        return Err(invalid(b, BindingProblem::NoSuchTable { schema, table }));
    };
    if !catalog::published(publication, Some(&schema), Some(&table)).map_err(unchecked)? {
        return Err(SubscribeError::NotPublished(Params::of(b)));
    }
    if !catalog::can_select(role, found.relid).map_err(unchecked)? {
        let role = role.to_owned();
        return Err(invalid(b, BindingProblem::CannotSelect { role, schema, table }));
    }
    let conditions = parsed
        .into_iter()
        .map(|c| condition(b, role, found.relid, &format!("{schema}.{table}"), c))
        .collect::<Result<_, _>>()?;
    Ok((Target::Table(found.relid), conditions))
}

/// A filter condition checked against its column, its values still to be
/// cast to the column's type (as the subscriber).
struct Uncast {
    relid: u32,
    column: String,
    sql_type: String,
    kind: Kind,
    op: filter::Op,
    negate: bool,
    values: Vec<String>,
}

impl Uncast {
    /// The condition with its values cast (`cast`: their JSON texts, in
    /// order, or why they did not cast).
    fn finish(
        self,
        b: &PostgresChangesBinding,
        cast: Result<Vec<Option<String>>, String>,
    ) -> Result<Condition, SubscribeError> {
        let not_cast = |why: &str| {
            let column = self.column.clone();
            invalid(
                b,
                BindingProblem::InvalidValue {
                    column,
                    why: why.into(),
                },
            )
        };
        let values = cast
            .map_err(|e| not_cast(&e))?
            .into_iter()
            .map(|v| {
                v.map(|json| normalise(self.kind, json))
                    .ok_or_else(|| not_cast("the value did not cast"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if values.len() != self.values.len() {
            return Err(not_cast("the value did not cast"));
        }
        Ok(Condition {
            column: self.column,
            kind: self.kind,
            op: self.op,
            negate: self.negate,
            values,
        })
    }
}

/// One filter condition, checked against its column.
fn condition(
    b: &PostgresChangesBinding,
    role: &str,
    relid: u32,
    table: &str,
    condition: ParsedCondition,
) -> Result<Uncast, SubscribeError> {
    let Some(column) = catalog::column(relid, &condition.column).map_err(unchecked)? else {
        return Err(invalid(b, BindingProblem::NoSuchColumn(condition.column)));
    };
    // A filter on a column the role may not read would tell it that
    // column's values.
    if !catalog::can_select_column(role, relid, &condition.column).map_err(unchecked)? {
        let (role, table) = (role.to_owned(), table.to_owned());
        let column = condition.column;
        return Err(invalid(b, BindingProblem::CannotSelectColumn { role, column, table }));
    }
    let kind = Kind::of_type_oid(column.type_oid);
    if condition.op.is_ordering() && !kind.is_ordered() {
        let (column, typname) = (condition.column, column.typname);
        return Err(invalid(b, BindingProblem::NotOrdered { column, typname }));
    }
    Ok(Uncast {
        relid,
        column: condition.column,
        sql_type: column.sql_type,
        kind,
        op: condition.op,
        negate: condition.negate,
        values: condition.values,
    })
}

/// A filter value's JSON text, compared with captured values as the worker
/// normalises them (timestamps to UTC).
fn normalise(kind: Kind, json: String) -> String {
    match (kind, keys::json_string(&json)) {
        (Kind::Timestamptz, Some(s)) => Value::String(value::timestamptz_to_utc(&s)).to_string(),
        _ => json,
    }
}
