//! Validating a channel's `postgres_changes` bindings against the catalog,
//! as the channel's identity: the tables exist and are published, the role
//! may read them and every filtered column, and each filter value casts to
//! its column's type. Casts run as the subscriber (`acting`): a domain's
//! CHECK or a cast function is code of the type's owner.

use super::acting::{self, Identity};
use super::catalog;
use realtime::changes::filter::{self, Condition, ParsedCondition};
use realtime::changes::registry::{Binding, EventFilter, Target};
use realtime::changes::value::{self, Kind};
use realtime::join::PostgresChangesBinding;
use serde_json::Value;

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

fn not_enabled(b: &PostgresChangesBinding) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}",
        params(b)
    )
}

fn spi(e: pgrx::spi::Error) -> String {
    format!("Realtime was unable to check the subscription: {e}")
}

/// Who subscribes: the token's role claim and claims.
pub struct Subscriber<'a> {
    pub role: &'a str,
    /// The claims as JSON (`request.jwt.claims`).
    pub claims: &'a str,
    pub sub: Option<&'a str>,
}

/// Validates a channel's bindings for the subscriber; returns them ready
/// for the registry, or the message of the `system` error. Runs inside a
/// transaction.
pub fn validate(bindings: &[(u32, PostgresChangesBinding)], who: &Subscriber<'_>) -> Result<Vec<Binding>, String> {
    catalog::clear_search_path().map_err(spi)?;
    let role = acting::resolve(who.role)
        .map_err(spi)?
        .map_err(|refusal| refusal.to_string())?;
    let identity = Identity {
        role,
        role_name: who.role,
        claims: who.claims,
        sub: who.sub,
        topic: None,
    };
    let publication = crate::gucs::publication();
    bindings
        .iter()
        .map(|(id, b)| {
            let (target, conditions) = target(b, &publication, &identity)?;
            Ok(Binding {
                id: *id,
                target,
                events: EventFilter::parse(&b.event),
                conditions,
            })
        })
        .collect()
}

/// What one binding covers, and its filter's conditions.
fn target(
    b: &PostgresChangesBinding,
    publication: &str,
    identity: &Identity<'_>,
) -> Result<(Target, Vec<Condition>), String> {
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
    let parsed = filter::parse(b.filter.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
    let table = b.table.clone().filter(|t| t != "*" && schema != "*");
    let Some(table) = table else {
        let schema_filter = (schema != "*").then_some(schema.as_str());
        if !catalog::published(publication, schema_filter, None).map_err(spi)? {
            return Err(not_enabled(b));
        }
        if !parsed.is_empty() {
            return Err(refused(b, "filters need an explicit table"));
        }
        let target = if schema == "*" {
            Target::All
        } else {
            Target::Schema(schema)
        };
        return Ok((target, Vec::new()));
    };
    let Some(found) = catalog::table(&schema, &table).map_err(spi)? else {
        return Err(refused(b, &format!("relation \"{schema}.{table}\" does not exist")));
    };
    if !catalog::published(publication, Some(&schema), Some(&table)).map_err(spi)? {
        return Err(not_enabled(b));
    }
    let role = identity.role_name;
    if !catalog::can_select(role, found.relid).map_err(spi)? {
        return Err(refused(
            b,
            &format!("permission denied: role \"{role}\" cannot SELECT from \"{schema}.{table}\""),
        ));
    }
    let conditions = parsed
        .into_iter()
        .map(|c| condition(b, identity, found.relid, &format!("{schema}.{table}"), c))
        .collect::<Result<_, _>>()?;
    Ok((Target::Table(found.relid), conditions))
}

/// One filter condition, checked against its column and with its values
/// cast to the column's type.
fn condition(
    b: &PostgresChangesBinding,
    identity: &Identity<'_>,
    relid: u32,
    table: &str,
    condition: ParsedCondition,
) -> Result<Condition, String> {
    let Some(column) = catalog::column(relid, &condition.column).map_err(spi)? else {
        return Err(refused(b, &format!("invalid column for filter {}", condition.column)));
    };
    // A filter on a column the role may not read would tell it that
    // column's values.
    let role = identity.role_name;
    if !catalog::can_select_column(role, relid, &condition.column).map_err(spi)? {
        return Err(refused(
            b,
            &format!(
                "permission denied: role \"{role}\" cannot SELECT column {} of \"{table}\"",
                condition.column
            ),
        ));
    }
    let kind = Kind::of_type_oid(column.type_oid);
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
        let invalid = |e: &str| refused(b, &format!("invalid value for filter {}: {e}", condition.column));
        let json = acting::as_identity(identity, || catalog::cast_to_json(raw, &column.sql_type))
            .map_err(|e| invalid(&e))?
            .ok_or_else(|| invalid("the value did not cast"))?;
        values.push(normalise(kind, json));
    }
    Ok(Condition {
        column: condition.column,
        kind,
        op: condition.op,
        negate: condition.negate,
        values,
    })
}

/// A filter value's JSON text, compared with captured values as the worker
/// normalises them (timestamps to UTC).
fn normalise(kind: Kind, json: String) -> String {
    match (kind, value::json_string(&json)) {
        (Kind::Timestamptz, Some(s)) => Value::String(value::timestamptz_to_utc(&s)).to_string(),
        _ => json,
    }
}
