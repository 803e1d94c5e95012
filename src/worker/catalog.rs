//! The catalog questions the worker's main thread asks, through SPI: is a
//! table published, may a role read it, what type is a column, does a filter
//! value cast. Every function here runs inside a transaction on the main
//! thread; the ones that can raise (a value that does not cast) run in a
//! subtransaction and turn the error into a [`CatalogError`].

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;

use super::plans;

/// A table as the catalog has it now.
pub struct Table {
    pub relid: u32,
}

pub type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// A catalog question (or code run as a subscriber) that failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Spi(#[from] pgrx::spi::Error),
    /// An ERROR raised inside, caught in a subtransaction: its message.
    #[error("{0}")]
    Raised(String),
    /// Checks of the table are refused for now (`acting::refused`): why.
    #[error("{0}")]
    Refused(String),
}

pub type CatalogResult<T> = Result<T, CatalogError>;

/// The first column of the first row (None: no row, or NULL).
fn first<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid<'_>]) -> SpiResult<Option<T>> {
    Spi::connect(|client| match plans::select(client, query, Some(1), args)?.next() {
        Some(row) => row.get::<T>(1),
        None => Ok(None),
    })
}

/// Each row, read by `read`.
fn rows<T>(
    query: &str,
    args: &[DatumWithOid<'_>],
    read: impl Fn(&SpiHeapTupleData<'_>) -> SpiResult<Option<T>>,
) -> SpiResult<Vec<T>> {
    Spi::connect(|client| {
        let mut out = Vec::new();
        for row in plans::select(client, query, None, args)? {
            out.extend(read(&row)?);
        }
        Ok(out)
    })
}

/// An OID as the extension keeps it.
fn oid(o: Option<pg_sys::Oid>) -> Option<u32> {
    o.map(u32::from)
}

thread_local! {
    /// The plan of [`captured`]'s query, kept: the worker asks it after
    /// every join and leave, and planning it costs more than running it.
    static CAPTURED_PLAN: std::cell::RefCell<Option<pgrx::spi::OwnedPreparedStatement>> =
        const { std::cell::RefCell::new(None) };
}

/// The table `schema.name`, if it exists.
pub fn table(schema: &str, name: &str) -> SpiResult<Option<Table>> {
    let relid = first::<pg_sys::Oid>(
        "SELECT c.oid FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        &[schema.into(), name.into()],
    )?;
    Ok(oid(relid).map(|relid| Table { relid }))
}

/// Whether the publication has the table (or, without a table, any table of
/// the schema; with neither, any table). A partitioned table counts when
/// its partitions are published: their rows are reported under its name.
pub fn published(publication: &str, schema: Option<&str>, table: Option<&str>) -> SpiResult<bool> {
    let found = first::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt \
           JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
           JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
           JOIN pg_catalog.pg_class r ON r.oid = coalesce(pg_catalog.pg_partition_root(c.oid), c.oid) \
           JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace \
         WHERE pt.pubname = $1 AND ($2::text IS NULL OR rn.nspname = $2) AND ($3::text IS NULL OR r.relname = $3))",
        &[publication.into(), schema.into(), table.into()],
    )?;
    Ok(found == Some(true))
}

/// Whether `role` may SELECT any column of the table (what subscribing
/// needs; deliveries then show only the columns it may SELECT).
pub fn can_select(role: &str, relid: u32) -> SpiResult<bool> {
    let may = first::<bool>(
        "SELECT pg_catalog.has_any_column_privilege($1, $2, 'SELECT')",
        &[role.into(), pg_sys::Oid::from(relid).into()],
    )?;
    Ok(may == Some(true))
}

/// Whether `role` may SELECT the column `name` of the table.
pub fn can_select_column(role: &str, relid: u32, name: &str) -> SpiResult<bool> {
    let may = first::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, $2, $3, 'SELECT')",
        &[role.into(), pg_sys::Oid::from(relid).into(), name.into()],
    )?;
    Ok(may == Some(true))
}

/// What a role may read of a table now.
pub struct Access {
    /// Each column and whether the role may SELECT it.
    pub columns: Vec<(String, bool)>,
    /// The table's policies for the role's SELECT, when row-level security
    /// applies to it (not for the owner without FORCE, superusers or
    /// BYPASSRLS roles, as Postgres decides).
    pub policies: Option<Vec<bgworker::changes::rls::Policy>>,
}

/// What `role` may read of the table; None if the role or table is gone.
/// Expressions are printed for the transaction's `search_path`, which
/// the caller sets empty (see `clear_search_path`), so they name every
/// object with its schema.
pub fn access(role: &str, relid: u32) -> SpiResult<Option<Access>> {
    let args = || [role.into(), pg_sys::Oid::from(relid).into()];
    // (a row, with a NULL in it, whenever the role and table exist)
    let applies = rows(
        "SELECT (c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls \
                 AND NOT (pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)) \
         FROM pg_catalog.pg_class c, pg_catalog.pg_roles r WHERE r.rolname = $1 AND c.oid = $2",
        &args(),
        |row| Ok(Some(row.get::<bool>(1)?)),
    )?;
    let Some(applies) = applies.first().map(|applies| *applies == Some(true)) else {
        return Ok(None);
    };
    let columns = rows(
        "SELECT a.attname::text, pg_catalog.has_column_privilege($1, a.attrelid, a.attnum, 'SELECT') \
         FROM pg_catalog.pg_attribute a WHERE a.attrelid = $2 AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
        &args(),
        |row| {
            let may = row.get::<bool>(2)? == Some(true);
            Ok(row.get::<String>(1)?.map(|name| (name, may)))
        },
    )?;
    let policies = if applies {
        // Policies for SELECT (or ALL) whose roles include PUBLIC or one
        // the role has the privileges of; a policy without USING adds no
        // rows, as in Postgres.
        Some(rows(
            "SELECT p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid) \
             FROM pg_catalog.pg_policy p WHERE p.polrelid = $2 AND p.polcmd IN ('r', '*') \
             AND p.polqual IS NOT NULL \
             AND EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) pr \
                         WHERE pr = 0 OR pg_catalog.pg_has_role($1, pr, 'USAGE'))",
            &args(),
            |row| {
                let permissive = row.get::<bool>(1)? == Some(true);
                Ok(row
                    .get::<String>(2)?
                    .map(|using| bgworker::changes::rls::Policy { permissive, using }))
            },
        )?)
    } else {
        None
    };
    Ok(Some(Access { columns, policies }))
}

/// Whether the database has a function that a plan would fold as a
/// constant (IMMUTABLE) but whose result might depend on who runs it:
/// any but those a superuser owns that are in C or internal or in the
/// system schemas. Extensions' members count too: anyone's SQL may be
/// packaged as one (`pg_tle`), and whoever installs it, a superuser
/// included, has not checked its markings. Such a function in a policy,
/// wrongly marked, is run once when a plan is made, not once per
/// subscriber (`access::share`).
pub fn user_immutable_functions_exist() -> SpiResult<bool> {
    let found = first::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_proc p \
           JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
           JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
           WHERE p.provolatile = 'i' \
             AND NOT (EXISTS (SELECT FROM pg_catalog.pg_roles r \
                              WHERE r.oid = p.proowner AND r.rolsuper) \
               AND (l.lanname IN ('c', 'internal') \
                 OR n.nspname IN ('pg_catalog', 'information_schema'))))",
        &[],
    )?;
    // (no answer: assume there is one)
    Ok(found != Some(false))
}

/// Makes the transaction's `search_path` empty: expressions are printed
/// with, and later run under, fully qualified names.
pub fn clear_search_path() -> SpiResult<()> {
    run("SELECT pg_catalog.set_config('search_path', '', true)")
}

/// Runs a SELECT for its effect, on its kept plan.
fn run(query: &str) -> SpiResult<()> {
    Spi::connect(|client| plans::select(client, query, None, &[]).map(drop))
}

/// Runs `query` (a row check from `bgworker::changes::rls`) over `rows`;
/// returns the 1-based positions of the rows it keeps. Run it as the
/// subscriber (`acting::as_identity`). With `kept_for`, on the plan kept
/// for that role, shared by its subscribers (only while `access::share`
/// allows); without, planned afresh.
pub fn visible_rows(query: &str, rows: &str, kept_for: Option<u32>) -> SpiResult<Vec<i32>> {
    Spi::connect(|client| {
        let table = match kept_for {
            Some(role) => plans::select_check(client, role, query, rows)?,
            None => client.select(query, None, &[rows.into()])?,
        };
        let mut out = Vec::new();
        for row in table {
            if let Some(n) = row.get::<i32>(1)? {
                out.push(n);
            }
        }
        Ok(out)
    })
}

/// A column: its type's name and OID, and its full type (with modifiers)
/// for casts.
pub struct ColumnType {
    pub typname: String,
    pub type_oid: u32,
    pub sql_type: String,
}

pub fn column(relid: u32, name: &str) -> SpiResult<Option<ColumnType>> {
    let found = rows(
        "SELECT t.typname::text, t.oid, pg_catalog.format_type(a.atttypid, a.atttypmod) \
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[pg_sys::Oid::from(relid).into(), name.into()],
        |row| {
            let (typname, type_oid, sql_type) = (row.get::<String>(1)?, oid(row.get(2)?), row.get::<String>(3)?);
            Ok(typname
                .zip(type_oid)
                .zip(sql_type)
                .map(|((typname, type_oid), sql_type)| ColumnType {
                    typname,
                    type_oid,
                    sql_type,
                }))
        },
    )?;
    Ok(found.into_iter().next())
}

/// OIDs of schemas by name (for the interest table).
pub fn schema_oid(name: &str) -> SpiResult<Option<u32>> {
    let found = first::<pg_sys::Oid>(
        "SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1",
        &[name.into()],
    )?;
    Ok(oid(found))
}

/// `values` cast to `sql_type` and rendered as JSON the way captured rows
/// are (`to_json`), in order, in one query. The cast may run code of the
/// type's owner (a domain's CHECK, a cast function): run it as the
/// subscriber (`acting::as_identity`); an error is the first value's
/// that did not cast.
pub fn cast_all_to_json(values: &[String], sql_type: &str) -> SpiResult<Vec<Option<String>>> {
    // The type comes from format_type() of a real column: safe to splice.
    let query = format!(
        "SELECT pg_catalog.to_json(v::{sql_type})::pg_catalog.text \
         FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u(v, i) ORDER BY i"
    );
    Spi::connect(|client| {
        // (planned afresh: a type dropped and made again keeps its name)
        let table = client.select(&query, None, &[values.to_vec().into()])?;
        let mut out = Vec::with_capacity(values.len());
        for row in table {
            out.push(row.get::<String>(1)?);
        }
        Ok(out)
    })
}

/// Lets go of session-level advisory locks that code run as a subscriber
/// (a policy function) may have taken: a subtransaction's rollback does
/// not release them.
pub fn release_session_locks() -> SpiResult<()> {
    run("SELECT pg_catalog.pg_advisory_unlock_all()")
}

/// Runs `f` in a subtransaction; a Postgres error in it becomes
/// [`CatalogError::Raised`] and leaves the surrounding transaction usable.
pub fn catching<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> CatalogResult<T> {
    subtransaction(f, true)
}

/// Runs `f` in a transaction of its own, an ERROR in it caught
/// ([`catching`]).
pub fn in_transaction<T>(
    f: impl FnOnce() -> SpiResult<T> + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> CatalogResult<T> {
    pgrx::bgworkers::BackgroundWorker::transaction(move || catching(f)).and_then(|r| Ok(r?))
}

/// Like [`catching`], but whatever `f` did is rolled back even when it
/// succeeds: for probes that write only to ask.
pub fn rolled_back<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> CatalogResult<T> {
    subtransaction(f, false)
}

fn subtransaction<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe, keep: bool) -> CatalogResult<T> {
    crate::subxact::run(f, keep).map_err(|caught| CatalogError::Raised(caught.message))
}

/// Inserts a private topic's probe rows (`broadcast` and `presence`) as
/// the worker, for [`visible_probes`] to select back as the subscriber;
/// returns their ids as a uuid[] literal. Run it inside [`rolled_back`]:
/// no probe is ever kept.
pub fn insert_probes(topic: &str) -> SpiResult<String> {
    Spi::connect_mut(|client| {
        let inserted = client.update(
            "INSERT INTO realtime.messages (topic, extension, private) \
             VALUES ($1, 'broadcast', true), ($1, 'presence', true) RETURNING id::pg_catalog.text",
            None,
            &[topic.into()],
        )?;
        let mut ids = Vec::new();
        for row in inserted {
            if let Some(id) = row.get::<String>(1)? {
                ids.push(id);
            }
        }
        Ok(format!("{{{}}}", ids.join(",")))
    })
}

/// The extensions of the probes `ids` the current user may see under the
/// policies on `realtime.messages`. Run it as the subscriber.
pub fn visible_probes(ids: &str) -> SpiResult<Vec<String>> {
    Spi::connect_mut(|client| {
        // read-write, so that the probes inserted before are visible
        let table = client.update(
            "SELECT extension FROM realtime.messages WHERE id = ANY($1::pg_catalog.uuid[])",
            None,
            &[ids.into()],
        )?;
        let mut found = Vec::new();
        for row in table {
            if let Some(e) = row.get::<String>(1)? {
                found.push(e);
            }
        }
        Ok(found)
    })
}

/// Inserts an `extension` message on `topic` as the current user: whether
/// it may write there. Run it as the subscriber; an error is a denial.
pub fn insert_message(topic: &str, extension: &str) -> SpiResult<()> {
    Spi::connect_mut(|client| {
        client
            .update(
                "INSERT INTO realtime.messages (topic, extension, private) VALUES ($1, $2, true)",
                None,
                &[topic.into(), extension.into()],
            )
            .map(|_| ())
    })
}

/// Every captured table (a partitioned table standing for its tree, with
/// the triggers cloned to its partitions) and whether its capture triggers
/// fire.
pub fn captured() -> SpiResult<Vec<bgworker::changes::switch::Captured>> {
    // (the capture function found by name, not as a constant OID: the
    // plan outlives a DROP and CREATE EXTENSION)
    const QUERY: &str = "SELECT c.oid, c.relnamespace, pg_catalog.format('%I.%I', n.nspname, c.relname), \
                pg_catalog.bool_and(p.tgenabled <> 'D'), pg_catalog.bool_or(p.tgenabled <> 'D') \
         FROM pg_catalog.pg_trigger t \
         JOIN pg_catalog.pg_proc f ON f.oid = t.tgfoid AND f.proname = 'capture_changes' \
         JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace AND fn.nspname = 'realtime' \
         JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_trigger p ON p.tgfoid = t.tgfoid AND (p.tgrelid = c.oid \
           OR p.tgrelid IN (SELECT relid FROM pg_catalog.pg_partition_tree(c.oid))) \
         WHERE t.tgparentid = 0 \
         GROUP BY c.oid, c.relnamespace, n.nspname, c.relname";
    Spi::connect(|client| {
        CAPTURED_PLAN.with(|plan| {
            let mut plan = plan.borrow_mut();
            if plan.is_none() {
                *plan = Some(client.prepare(QUERY, &[])?.keep());
            }
            let mut out = Vec::new();
            for row in client.select(plan.as_ref().expect("prepared above"), None, &[])? {
                out.extend(captured_table(&row)?);
            }
            Ok(out)
        })
    })
}

fn captured_table(row: &SpiHeapTupleData<'_>) -> SpiResult<Option<bgworker::changes::switch::Captured>> {
    let (relid, namespace, name) = (oid(row.get(1)?), oid(row.get(2)?), row.get::<String>(3)?);
    let (all_on, any_on) = (row.get::<bool>(4)? == Some(true), row.get::<bool>(5)? == Some(true));
    Ok(relid
        .zip(namespace)
        .zip(name)
        .map(|((relid, namespace), name)| bgworker::changes::switch::Captured {
            relid,
            namespace,
            name,
            all_on,
            any_on,
        }))
}

/// Switches a table's capture triggers on or off (`realtime.switch_capture`):
/// false when a transaction holding a conflicting lock on it is still
/// running (after `wait_ms`, or at once with 0).
pub fn switch_capture(relid: u32, on: bool, wait_ms: i32) -> SpiResult<bool> {
    let switched = first::<bool>(
        "SELECT realtime.switch_capture($1, $2, $3)",
        &[pg_sys::Oid::from(relid).into(), on.into(), wait_ms.into()],
    )?;
    Ok(switched == Some(true))
}
