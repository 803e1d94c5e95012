//! The catalog questions the worker's main thread asks, through SPI: is a
//! table published, may a role read it, what type is a column, does a filter
//! value cast. Every function here runs inside a transaction on the main
//! thread; the ones that can raise (a value that does not cast) run in a
//! subtransaction and turn the error into a message.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;

/// A table as the catalog has it now.
pub struct Table {
    pub relid: u32,
    pub rls: bool,
}

pub type SpiResult<T> = Result<T, pgrx::spi::Error>;

fn text_rows(query: &str, args: Vec<pgrx::datum::DatumWithOid<'_>>) -> SpiResult<Vec<Vec<Option<String>>>> {
    Spi::connect(|client| {
        let table = client.select(query, None, &args)?;
        let columns = table.columns()?;
        let mut rows = Vec::new();
        for row in table {
            let mut values = Vec::with_capacity(columns);
            for i in 1..=columns {
                values.push(row.get::<String>(i)?);
            }
            rows.push(values);
        }
        Ok(rows)
    })
}

/// The table `schema.name`, if it exists.
pub fn table(schema: &str, name: &str) -> SpiResult<Option<Table>> {
    let rows = text_rows(
        "SELECT c.oid::text, c.relrowsecurity::text FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        vec![schema.into(), name.into()],
    )?;
    Ok(rows.into_iter().next().and_then(|r| {
        Some(Table {
            relid: r[0].as_deref()?.parse().ok()?,
            rls: r[1].as_deref() == Some("true"),
        })
    }))
}

/// Whether the publication has the table (or, without a table, any table of
/// the schema; with neither, any table).
pub fn published(publication: &str, schema: Option<&str>, table: Option<&str>) -> SpiResult<bool> {
    let rows = text_rows(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables \
         WHERE pubname = $1 AND ($2::text IS NULL OR schemaname = $2) AND ($3::text IS NULL OR tablename = $3))::text",
        vec![publication.into(), schema.into(), table.into()],
    )?;
    Ok(rows.first().and_then(|r| r[0].as_deref()) == Some("true"))
}

/// A role: whether it exists, and whether it bypasses row-level security.
pub struct Role {
    pub bypass_rls: bool,
}

pub fn role(name: &str) -> SpiResult<Option<Role>> {
    let rows = text_rows(
        "SELECT (rolsuper OR rolbypassrls)::text FROM pg_catalog.pg_roles WHERE rolname = $1",
        vec![name.into()],
    )?;
    Ok(rows.into_iter().next().map(|r| Role {
        bypass_rls: r[0].as_deref() == Some("true"),
    }))
}

/// Whether `role` may SELECT from the table (any column privilege is not
/// enough: the whole row is delivered until column filtering lands).
pub fn can_select(role: &str, relid: u32) -> SpiResult<bool> {
    let rows = text_rows(
        "SELECT pg_catalog.has_table_privilege($1, $2::oid, 'SELECT')::text",
        vec![role.into(), relid.to_string().into()],
    )?;
    Ok(rows.first().and_then(|r| r[0].as_deref()) == Some("true"))
}

/// Whether row-level security is enabled on the table now.
pub fn rls_enabled(relid: u32) -> SpiResult<bool> {
    let rows = text_rows(
        "SELECT relrowsecurity::text FROM pg_catalog.pg_class WHERE oid = $1::oid",
        vec![relid.to_string().into()],
    )?;
    Ok(rows.first().and_then(|r| r[0].as_deref()) == Some("true"))
}

/// A column: its `typname` and its full type (with modifiers) for casts.
pub struct ColumnType {
    pub typname: String,
    pub sql_type: String,
}

pub fn column(relid: u32, name: &str) -> SpiResult<Option<ColumnType>> {
    let rows = text_rows(
        "SELECT t.typname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) \
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = $1::oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        vec![relid.to_string().into(), name.into()],
    )?;
    Ok(rows.into_iter().next().and_then(|r| {
        Some(ColumnType {
            typname: r[0].clone()?,
            sql_type: r[1].clone()?,
        })
    }))
}

/// OIDs of schemas by name (for the interest table).
pub fn schema_oid(name: &str) -> SpiResult<Option<u32>> {
    let rows = text_rows(
        "SELECT oid::text FROM pg_catalog.pg_namespace WHERE nspname = $1",
        vec![name.into()],
    )?;
    Ok(rows.into_iter().next().and_then(|r| r[0].as_deref()?.parse().ok()))
}

/// `value` cast to `sql_type` and rendered as JSON the way captured rows
/// are (`to_json`), or the cast's error message.
pub fn cast_to_json(value: &str, sql_type: &str) -> Result<String, String> {
    // The type comes from format_type() of a real column: safe to splice.
    let query = format!("SELECT pg_catalog.to_json($1::text::{sql_type})::text");
    let value = value.to_owned();
    catching(move || {
        text_rows(&query, vec![value.as_str().into()])
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|r| r[0].clone())
    })
    .and_then(|v| v.ok_or_else(|| "the value did not cast".to_owned()))
}

/// Runs `f` in a subtransaction; a Postgres error in it becomes `Err` with
/// its message and leaves the surrounding transaction usable.
pub fn catching<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    // SAFETY: the main thread, inside a transaction; the memory context and
    // resource owner are restored whichever way the subtransaction ends, as
    // PL/pgSQL does around an exception block.
    let (context, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    // SAFETY: puts back the context and owner saved above, on this thread.
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    PgTryBuilder::new(move || {
        let value = f();
        // SAFETY: ends the subtransaction begun above.
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        restore();
        Ok(value)
    })
    .catch_others(move |error| {
        // SAFETY: rolls back the subtransaction begun above.
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        restore();
        Err(match error {
            CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) => e.message().to_owned(),
            CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
        })
    })
    .execute()
}
