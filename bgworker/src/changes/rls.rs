//! Row-level security judged on the captured row image.
//!
//! Postgres applies a table's policies only to rows it reads from the table,
//! and an event's row may no longer be there (DELETE) or may have changed
//! since the commit. So the worker evaluates the policies that would apply to
//! a role's SELECT against the event's own row: the policies' `USING`
//! expressions, as `pg_get_expr` prints them, combined the way Postgres
//! combines them (permissive ones OR-ed, restrictive ones AND-ed, no
//! permissive policy means no row), in a query over the captured rows
//! (`jsonb_populate_record` into the table's row type, aliased as the table,
//! so table-qualified references in policies resolve to the row). The query
//! runs as the subscriber's role with its JWT claims set, as PostgREST and
//! Supabase set them, so `auth.uid()`-style helpers and policies that read
//! other tables behave as in a SELECT by that user; other tables are read as
//! of the check, not as of the commit.

/// A policy that applies to a role's SELECT on a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub permissive: bool,
    /// The `USING` expression, printed with every name schema-qualified.
    pub using: String,
}

/// The condition a row must meet: SQL over the table's columns.
pub fn predicate(policies: &[Policy]) -> String {
    let permissive: Vec<String> = policies
        .iter()
        .filter(|p| p.permissive)
        .map(|p| format!("({})", p.using))
        .collect();
    let restrictive: Vec<String> = policies
        .iter()
        .filter(|p| !p.permissive)
        .map(|p| format!("({})", p.using))
        .collect();
    if permissive.is_empty() {
        // Postgres: without a permissive policy, no row is visible.
        return "false".to_owned();
    }
    let mut sql = format!("({})", permissive.join(" OR "));
    for r in restrictive {
        sql.push_str(" AND ");
        sql.push_str(&r);
    }
    sql
}

/// Column names of the row set, chosen not to clash with a table's columns.
const ROW: &str = "__pg_realtime_row";
const ORD: &str = "__pg_realtime_ord";

/// The query that returns the 1-based positions of the rows (a JSON array
/// of captured records, parameter `$1`) that meet `predicate` for
/// `schema.table` (`relid`). The table's OID as a `regclass` in the
/// second column makes a kept plan of it depend on the table: PostgreSQL
/// replans it after an ALTER TABLE (the rows are read as its row type,
/// which the plan does not otherwise name).
pub fn check_query(schema: &str, table: &str, relid: u32, predicate: &str) -> String {
    let (schema, table) = (quote_ident(schema), quote_ident(table));
    format!(
        "SELECT {ORD}::pg_catalog.int4, '{relid}'::pg_catalog.regclass \
         FROM pg_catalog.jsonb_array_elements($1::pg_catalog.jsonb) \
         WITH ORDINALITY AS __pg_realtime_rows({ROW}, {ORD}), \
         LATERAL pg_catalog.jsonb_populate_record(NULL::{schema}.{table}, {ROW}) AS {table} \
         WHERE {predicate}"
    )
}

/// A JSON array of raw captured records, for `$1` of [`check_query`].
pub fn rows_array<'a>(rows: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (i, row) in rows.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(row);
    }
    out.push(']');
    out
}

/// An identifier, always quoted (quoting is harmless where not needed).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(permissive: bool, using: &str) -> Policy {
        Policy {
            permissive,
            using: using.into(),
        }
    }

    #[test]
    fn no_permissive_policy_means_no_row() {
        assert_eq!(predicate(&[]), "false");
        assert_eq!(predicate(&[policy(false, "a = 1")]), "false");
    }

    #[test]
    fn permissive_or_restrictive_and() {
        assert_eq!(
            predicate(&[
                policy(true, "a = 1"),
                policy(false, "b"),
                policy(true, "c"),
                policy(false, "d")
            ]),
            "((a = 1) OR (c)) AND (b) AND (d)"
        );
    }

    #[test]
    fn the_row_is_aliased_as_the_table() {
        let q = check_query("public", "Odd\"Name", 16384, "(x = 1)");
        assert!(q.contains("'16384'::pg_catalog.regclass"), "{q}");
        assert!(q.contains("NULL::\"public\".\"Odd\"\"Name\""), "{q}");
        assert!(q.contains("AS \"Odd\"\"Name\" WHERE (x = 1)"), "{q}");
    }

    #[test]
    fn rows_become_one_array() {
        assert_eq!(rows_array(["{\"a\":1}", "{\"a\":2}"]), "[{\"a\":1},{\"a\":2}]");
        assert_eq!(rows_array([]), "[]");
    }
}
