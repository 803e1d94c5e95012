//! A relation and changes of it, for the tests of the modules that read
//! and send captured rows.

use crate::shared::wire::{Change, ChangeKind, Column, Relation};

/// `public.t (id int8, title text, at timestamptz, blob bytea)`, with this
/// replica identity (positions) and, unless it is empty, `id` as its
/// primary key.
pub fn relation(identity: Vec<u16>) -> Relation {
    let column = |name: &str, typname: &str, type_oid: u32| Column {
        name: name.into(),
        typname: typname.into(),
        type_oid,
    };
    Relation {
        relid: 1,
        schema: "public".into(),
        table: "t".into(),
        columns: vec![
            column("id", "int8", 20),
            column("title", "text", 25),
            column("at", "timestamptz", 1184),
            column("blob", "bytea", 17),
        ],
        primary_key: if identity.is_empty() { vec![] } else { vec![0] },
        identity,
    }
}

pub fn change(kind: ChangeKind, record: Option<&str>, old: Option<&str>) -> Change {
    Change {
        relation: 0,
        kind,
        record: record.map(Into::into),
        old: old.map(Into::into),
        filter_at: Vec::new(),
    }
}

/// A row of [`relation`] as the capture trigger writes it.
pub const ROW: &str = r#"{"id":7,"title":"new","at":"2025-03-04T11:11:12.345+01:00","blob":"\\xdeadbeef"}"#;
