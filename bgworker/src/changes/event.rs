//! Turning a captured row change into the `data` of a `postgres_changes`
//! event (`realtime-protocol.md` §3.1): typed records, `columns`, the
//! replica identity in `old_record`, UTC timestamps, and the size limit.
//! Built once per change and shared by every channel it is delivered to.

use super::value::timestamptz_to_utc;
use super::wire::{Change, ChangeKind, Relation};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::borrow::Cow;

/// Values at most this long survive in an over-sized record.
const SMALL_VALUE_BYTES: usize = 64;

pub const ERROR_TOO_LARGE: &str = "Error 413: Payload Too Large";
pub const ERROR_NO_PRIMARY_KEY: &str = "Error 400: Bad Request, no primary key";
pub const ERROR_UNAUTHORIZED: &str = "Error 401: Unauthorized";

/// Which of a relation's columns a subscriber's role may SELECT.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Visible {
    /// Every column (table-level SELECT).
    All,
    /// Only these, by position in [`Relation::columns`].
    Only(Vec<bool>),
}

impl Visible {
    fn column(&self, i: usize) -> bool {
        match self {
            Visible::All => true,
            Visible::Only(cols) => cols.get(i).copied().unwrap_or(false),
        }
    }
}

/// A change ready for delivery, built in one step (tests).
#[cfg(test)]
#[derive(Debug)]
pub struct Event {
    pub kind: ChangeKind,
    /// The serialized `data` object.
    pub data: String,
    /// The row filters look at: the new row, or the whole old row for DELETE.
    pub filter_row: Map<String, Value>,
}

/// Parses a record as captured. Filters compare timestamps as instants and
/// need nothing more; what goes out to clients is normalised by
/// [`normalised`].
pub fn parse_record(text: Option<&str>) -> Map<String, Value> {
    match text.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(map))) => map,
        _ => Map::new(),
    }
}

/// A captured value as clients get it, normalising what the writer's
/// session could have rendered differently: `timestamptz` to UTC, `bytea`
/// to bare hex.
fn normalised(type_oid: u32, value: &Value) -> Value {
    use crate::changes::value::type_oid::{BYTEA, TIMESTAMPTZ, TIMESTAMPTZ_ARRAY};
    let mut value = value.clone();
    match type_oid {
        TIMESTAMPTZ => normalise(&mut value, &|s| timestamptz_to_utc(s)),
        TIMESTAMPTZ_ARRAY => {
            if let Value::Array(items) = &mut value {
                for item in items {
                    normalise(item, &|s| timestamptz_to_utc(s));
                }
            }
        }
        BYTEA => normalise(&mut value, &|s| s.strip_prefix("\\x").unwrap_or(s).to_owned()),
        _ => {}
    }
    value
}

fn normalise(value: &mut Value, f: &dyn Fn(&str) -> String) {
    if let Value::String(s) = value {
        *s = f(s);
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for microseconds since the Unix epoch.
pub fn commit_timestamp(micros: i64) -> String {
    let utc = super::value::format_utc(i128::from(micros - micros.rem_euclid(1000)));
    // format_utc writes trimmed fractions and "+00:00"; the protocol wants
    // exactly three digits and "Z".
    let (base, _) = utc.split_once('+').unwrap_or((&utc, ""));
    let (seconds, frac) = base.split_once('.').unwrap_or((base, ""));
    format!("{seconds}.{:0<3}Z", &frac[..frac.len().min(3)])
}

/// A change's row as far as matching needs it: the columns subscriptions
/// filter on, from the new row, or from the old row for DELETE. The
/// `data` frame, which needs the whole rows, is only built (by [`data`])
/// if something matched.
pub struct Parsed {
    filter: Map<String, Value>,
}

/// The row filters look at, as captured: the new row, or the whole old row
/// for DELETE.
fn filter_text(change: &Change) -> Option<&str> {
    if change.kind == ChangeKind::Delete {
        change.old.as_deref()
    } else {
        change.record.as_deref()
    }
}

impl Parsed {
    /// With every column.
    #[cfg(test)]
    pub fn new(change: &Change) -> Parsed {
        Parsed {
            filter: parse_record(filter_text(change)),
        }
    }

    /// With only the columns `wanted` (what the subscriptions on the
    /// table filter on): read where the change says each value starts, or,
    /// without that, found by skipping over the rest of the row.
    pub fn with_columns(change: &Change, wanted: &Wanted) -> Parsed {
        let filter = match filter_text(change) {
            Some(text) if !wanted.names.is_empty() => wanted.read(text, &change.filter_at),
            _ => Map::new(),
        };
        Parsed { filter }
    }

    /// The row filters look at: the new row, or the whole old row for
    /// DELETE (as far as it was parsed).
    pub fn filter_row(&self) -> &Map<String, Value> {
        &self.filter
    }
}

/// The serialized `data` object of a change, with only the columns in
/// `visible`. A role that may not read the whole primary key gets the
/// `Error 401: Unauthorized` form, without values.
pub fn data(
    change: &Change,
    relation: &Relation,
    commit_time_us: i64,
    max_record_bytes: usize,
    visible: &Visible,
) -> String {
    let kind = change.kind;
    let mut data = Map::new();
    data.insert("schema".into(), json!(relation.schema));
    data.insert("table".into(), json!(relation.table));
    data.insert("type".into(), json!(kind.as_str()));
    data.insert("commit_timestamp".into(), json!(commit_timestamp(commit_time_us)));
    if relation.identity.is_empty() && kind != ChangeKind::Delete {
        data.insert("errors".into(), json!([ERROR_NO_PRIMARY_KEY]));
        return Value::Object(data).to_string();
    }
    if !relation.key_columns().all(|i| visible.column(i)) {
        data.insert("errors".into(), json!([ERROR_UNAUTHORIZED]));
        return Value::Object(data).to_string();
    }
    let shown = |row: &Map<String, Value>, keep: &dyn Fn(usize) -> bool| -> Map<String, Value> {
        relation
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| visible.column(*i) && keep(*i))
            .filter_map(|(_, c)| row.get(&c.name).map(|v| (c.name.clone(), normalised(c.type_oid, v))))
            .collect()
    };
    let columns: Vec<Value> = relation
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| visible.column(*i))
        .map(|(_, c)| json!({"name": c.name, "type": c.typname}))
        .collect();
    data.insert("columns".into(), Value::Array(columns));
    let mut errors = Vec::new();
    if kind != ChangeKind::Delete {
        let record = shown(&parse_record(change.record.as_deref()), &|_| true);
        data.insert(
            "record".into(),
            Value::Object(limit(record, max_record_bytes, &mut errors)),
        );
    }
    if kind != ChangeKind::Insert {
        let identity = |i: usize| relation.identity.contains(&(i as u16));
        let old_record = shown(&parse_record(change.old.as_deref()), &identity);
        data.insert(
            "old_record".into(),
            Value::Object(limit(old_record, max_record_bytes, &mut errors)),
        );
    }
    errors.dedup();
    data.insert(
        "errors".into(),
        if errors.is_empty() { Value::Null } else { json!(errors) },
    );
    Value::Object(data).to_string()
}

/// Builds the event for one change at once (tests; delivery matches on
/// [`Parsed`] and builds [`data`] only when something matched).
#[cfg(test)]
pub fn build(relation: &Relation, change: &Change, commit_time_us: i64, max_record_bytes: usize) -> Event {
    Event {
        kind: change.kind,
        data: data(change, relation, commit_time_us, max_record_bytes, &Visible::All),
        filter_row: Parsed::new(change).filter_row().clone(),
    }
}

/// The columns matching needs from a relation's rows: their names and,
/// when each is a column of the relation, their positions in it.
pub struct Wanted {
    names: Vec<String>,
    positions: Option<Vec<usize>>,
    /// The relation's column count.
    width: usize,
}

impl Wanted {
    pub fn new(names: Vec<String>, relation: &Relation) -> Wanted {
        let positions = names
            .iter()
            .map(|name| relation.columns.iter().position(|c| c.name == *name))
            .collect();
        Wanted {
            names,
            positions,
            width: relation.columns.len(),
        }
    }

    /// The wanted values of a row, read at the offsets `at` gives (one per
    /// column of the relation), or found by scanning when there are none or
    /// they do not fit the text.
    fn read(&self, text: &str, at: &[u32]) -> Map<String, Value> {
        if let Some(positions) = self.positions.as_ref().filter(|_| at.len() == self.width) {
            let mut out = Map::new();
            for (name, position) in self.names.iter().zip(positions) {
                match value_at(text, at[*position]) {
                    Some(value) => out.insert(name.clone(), value),
                    None => return pick(text, &self.names),
                };
            }
            return out;
        }
        pick(text, &self.names)
    }

    /// The JSON text of each wanted value of the row filters look at, read
    /// where the change's offsets say (for [`super::registry::Registry::may_match`]):
    /// None when the change has no usable offsets, and from the function
    /// when a column is not wanted or its value cannot be read there.
    pub fn raw_values<'c>(&'c self, change: &'c Change) -> Option<impl Fn(&str) -> Option<&'c str> + 'c> {
        let text = filter_text(change)?;
        let positions = self.positions.as_ref()?;
        let at = &change.filter_at;
        if at.len() != self.width {
            return None;
        }
        Some(move |name: &str| {
            let i = self.names.iter().position(|n| n == name)?;
            json_value_at(text, *at.get(*positions.get(i)?)? as usize)
        })
    }
}

/// The text of the JSON value that starts at byte `offset` of `text`.
fn json_value_at(text: &str, offset: usize) -> Option<&str> {
    let rest = text.get(offset..)?;
    let bytes = rest.as_bytes();
    let end = match bytes.first()? {
        b'"' => {
            let mut i = 1;
            loop {
                match bytes.get(i)? {
                    b'\\' => i += 2,
                    b'"' => break i + 1,
                    _ => i += 1,
                }
            }
        }
        b'{' | b'[' => {
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<IgnoredAny>();
            values.next()?.ok()?;
            values.byte_offset()
        }
        _ => bytes
            .iter()
            .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
            .unwrap_or(bytes.len()),
    };
    rest.get(..end)
}

/// The JSON value that starts at byte `offset` of `text` (what follows it
/// is not read).
fn value_at(text: &str, offset: u32) -> Option<Value> {
    let rest = text.get(offset as usize..)?;
    Value::deserialize(&mut serde_json::Deserializer::from_str(rest)).ok()
}

/// The values of `columns` in a row, the rest skipped over.
fn pick(text: &str, columns: &[String]) -> Map<String, Value> {
    let mut json = serde_json::Deserializer::from_str(text);
    Pick(columns).deserialize(&mut json).unwrap_or_default()
}

/// Deserializes a JSON object keeping only the given keys; the other
/// values are skipped without being built.
struct Pick<'c>(&'c [String]);

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a row as a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(key)) = map.next_key()? {
            match self.0.iter().find(|c| **c == *key) {
                Some(column) => {
                    out.insert(column.clone(), map.next_value()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// An object key, borrowed from the text unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Over the limit, keep only small values and say so.
fn limit(record: Map<String, Value>, max_bytes: usize, errors: &mut Vec<&'static str>) -> Map<String, Value> {
    let size: usize = record.iter().map(|(k, v)| k.len() + v.to_string().len()).sum();
    if size <= max_bytes {
        return record;
    }
    errors.push(ERROR_TOO_LARGE);
    record
        .into_iter()
        .filter(|(_, v)| v.to_string().len() <= SMALL_VALUE_BYTES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::wire::Column;

    fn relation(identity: Vec<u16>) -> Relation {
        Relation {
            relid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    typname: "int8".into(),
                    type_oid: 20,
                },
                Column {
                    name: "title".into(),
                    typname: "text".into(),
                    type_oid: 25,
                },
                Column {
                    name: "at".into(),
                    typname: "timestamptz".into(),
                    type_oid: 1184,
                },
                Column {
                    name: "blob".into(),
                    typname: "bytea".into(),
                    type_oid: 17,
                },
            ],
            primary_key: if identity.is_empty() { vec![] } else { vec![0] },
            identity,
        }
    }

    fn change(kind: ChangeKind, record: Option<&str>, old: Option<&str>) -> Change {
        Change {
            relation: 0,
            kind,
            record: record.map(Into::into),
            old: old.map(Into::into),
            filter_at: Vec::new(),
        }
    }

    fn data(e: &Event) -> Value {
        serde_json::from_str(&e.data).unwrap()
    }

    const ROW: &str = r#"{"id":7,"title":"new","at":"2025-03-04T11:11:12.345+01:00","blob":"\\xdeadbeef"}"#;

    #[test]
    fn insert_has_record_only_with_normalised_values() {
        let e = build(
            &relation(vec![0]),
            &change(ChangeKind::Insert, Some(ROW), None),
            1_741_083_072_345_678,
            1 << 20,
        );
        let d = data(&e);
        assert_eq!(d["type"], "INSERT");
        assert_eq!(d["commit_timestamp"], "2025-03-04T10:11:12.345Z");
        assert_eq!(
            d["record"],
            json!({"id": 7, "title": "new", "at": "2025-03-04T10:11:12.345+00:00", "blob": "deadbeef"})
        );
        assert!(d.get("old_record").is_none());
        assert_eq!(d["errors"], Value::Null);
        assert_eq!(d["columns"][2], json!({"name": "at", "type": "timestamptz"}));
        assert_eq!(e.filter_row["id"], json!(7));
    }

    #[test]
    fn update_old_record_follows_replica_identity() {
        let old = r#"{"id":7,"title":"old","at":null,"blob":null}"#;
        let d = data(&build(
            &relation(vec![0]),
            &change(ChangeKind::Update, Some(ROW), Some(old)),
            0,
            1 << 20,
        ));
        assert_eq!(d["old_record"], json!({"id": 7}));
        assert_eq!(d["record"]["title"], "new");
        let full = data(&build(
            &relation(vec![0, 1, 2, 3]),
            &change(ChangeKind::Update, Some(ROW), Some(old)),
            0,
            1 << 20,
        ));
        assert_eq!(
            full["old_record"],
            json!({"id": 7, "title": "old", "at": null, "blob": null})
        );
    }

    #[test]
    fn delete_filters_on_the_whole_old_row() {
        let old = r#"{"id":7,"title":"gone","at":null,"blob":null}"#;
        let e = build(
            &relation(vec![0]),
            &change(ChangeKind::Delete, None, Some(old)),
            0,
            1 << 20,
        );
        let d = data(&e);
        assert!(d.get("record").is_none());
        assert_eq!(d["old_record"], json!({"id": 7}));
        assert_eq!(e.filter_row["title"], "gone");
    }

    #[test]
    fn oversized_records_keep_small_fields_and_say_so() {
        let big = format!(r#"{{"id":7,"title":"{}","at":null,"blob":null}}"#, "x".repeat(2000));
        let d = data(&build(
            &relation(vec![0]),
            &change(ChangeKind::Insert, Some(&big), None),
            0,
            1000,
        ));
        assert_eq!(d["errors"], json!([ERROR_TOO_LARGE]));
        assert_eq!(d["record"], json!({"id": 7, "at": null, "blob": null}));
    }

    #[test]
    fn no_primary_key() {
        let d = data(&build(
            &relation(vec![]),
            &change(ChangeKind::Insert, Some(ROW), None),
            0,
            1 << 20,
        ));
        assert_eq!(d["errors"], json!([ERROR_NO_PRIMARY_KEY]));
        assert!(d.get("record").is_none());
    }

    #[test]
    fn only_visible_columns_are_shown() {
        let old = r#"{"id":7,"title":"old","at":null,"blob":"\\x00"}"#;
        let relation = relation(vec![0, 1, 2, 3]);
        let change = change(ChangeKind::Update, Some(ROW), Some(old));
        let parsed = Parsed::new(&change);
        let visible = Visible::Only(vec![true, true, false, false]);
        let d: Value = serde_json::from_str(&super::data(&change, &relation, 0, 1 << 20, &visible)).unwrap();
        assert_eq!(d["record"], json!({"id": 7, "title": "new"}));
        assert_eq!(d["old_record"], json!({"id": 7, "title": "old"}));
        assert_eq!(
            d["columns"],
            json!([{"name": "id", "type": "int8"}, {"name": "title", "type": "text"}])
        );
        // filters still see the whole row, as captured
        assert_eq!(parsed.filter_row()["at"], json!("2025-03-04T11:11:12.345+01:00"));
    }

    #[test]
    fn matching_parses_only_the_filtered_columns() {
        let row = r#"{"id":7,"na\"me":"x","tags":[1,{"a":"}"}],"doc":{"k":[true,null]},"n":-1.50}"#;
        let insert = change(ChangeKind::Insert, Some(row), None);
        // (none of these is a column of the relation: found by scanning)
        let wanted = |names: &[&str]| Wanted::new(names.iter().map(|n| n.to_string()).collect(), &relation(vec![0]));
        let parsed = Parsed::with_columns(&insert, &wanted(&["n", "na\"me", "absent"]));
        assert_eq!(
            Value::Object(parsed.filter_row().clone()),
            serde_json::from_str::<Value>(r#"{"n":-1.50,"na\"me":"x"}"#).unwrap(),
            "escaped keys found, nested values skipped, absent columns absent"
        );
        assert!(Parsed::with_columns(&insert, &wanted(&[])).filter_row().is_empty());
        // DELETE: the old row
        let delete = change(ChangeKind::Delete, None, Some(r#"{"id":9,"n":2}"#));
        assert_eq!(
            Parsed::with_columns(&delete, &wanted(&["id"])).filter_row()["id"],
            json!(9)
        );
        // the frame shows the whole row, whatever matching parsed
        let d: Value =
            serde_json::from_str(&super::data(&insert, &relation(vec![0]), 0, 1 << 20, &Visible::All)).unwrap();
        assert_eq!(d["record"]["id"], json!(7));
    }

    #[test]
    fn values_are_read_where_the_offsets_say() {
        let relation = relation(vec![0]);
        let wanted = Wanted::new(vec!["blob".into(), "id".into()], &relation);
        // ROW's values start at 6, 16, 27 and 66
        let mut insert = change(ChangeKind::Insert, Some(ROW), None);
        insert.filter_at = vec![6, 16, 27, 66];
        assert_eq!(
            Value::Object(Parsed::with_columns(&insert, &wanted).filter_row().clone()),
            json!({"blob": "\\xdeadbeef", "id": 7})
        );
        // offsets that point elsewhere are believed (they come from the
        // capture trigger): here "title"'s value is read as "id"'s
        insert.filter_at = vec![16, 16, 27, 66];
        assert_eq!(Parsed::with_columns(&insert, &wanted).filter_row()["id"], json!("new"));
        // too few offsets, or one outside the text: the row is scanned
        for bad in [vec![6, 16, 27], vec![6, 16, 27, 9999]] {
            insert.filter_at = bad;
            assert_eq!(
                Value::Object(Parsed::with_columns(&insert, &wanted).filter_row().clone()),
                json!({"blob": "\\xdeadbeef", "id": 7})
            );
        }
        // DELETE: the old row's offsets
        let mut delete = change(
            ChangeKind::Delete,
            None,
            Some(r#"{"id":9,"title":"x","at":null,"blob":null}"#),
        );
        delete.filter_at = vec![6, 16, 25, 37];
        assert_eq!(
            Value::Object(Parsed::with_columns(&delete, &wanted).filter_row().clone()),
            json!({"blob": null, "id": 9})
        );
    }

    #[test]
    fn raw_values_are_the_json_text_at_the_offsets() {
        let relation = relation(vec![0]);
        let wanted = Wanted::new(vec!["title".into(), "at".into(), "blob".into()], &relation);
        // values start at 6, 16, 31 and 52; one string has escapes and
        // delimiters inside, one value is a nested object
        let text = r#"{"id":7,"title":"a\"b,}c","at":{"x":[1,"]"]},"blob":null}"#;
        let mut insert = change(ChangeKind::Insert, Some(text), None);
        insert.filter_at = vec![6, 16, 31, 52];
        {
            let value = wanted.raw_values(&insert).unwrap();
            assert_eq!(value("title"), Some(r#""a\"b,}c""#));
            assert_eq!(value("at"), Some(r#"{"x":[1,"]"]}"#));
            assert_eq!(value("blob"), Some("null"));
            // a column matching does not look at
            assert_eq!(value("id"), None);
        }
        // an offset outside the text
        insert.filter_at = vec![6, 16, 31, 9999];
        assert_eq!(wanted.raw_values(&insert).unwrap()("blob"), None);
        // no offsets, too few, or a column the relation lacks: not usable
        insert.filter_at = vec![];
        assert!(wanted.raw_values(&insert).is_none());
        insert.filter_at = vec![6, 16, 31];
        assert!(wanted.raw_values(&insert).is_none());
        let unknown = Wanted::new(vec!["gone".into()], &relation);
        insert.filter_at = vec![6, 16, 31, 52];
        assert!(unknown.raw_values(&insert).is_none());
        // DELETE: the old row
        let mut delete = change(
            ChangeKind::Delete,
            None,
            Some(r#"{"id":9,"title":"x","at":1,"blob":2}"#),
        );
        delete.filter_at = vec![6, 16, 25, 34];
        assert_eq!(wanted.raw_values(&delete).unwrap()("title"), Some(r#""x""#));
        assert_eq!(wanted.raw_values(&delete).unwrap()("blob"), Some("2"));
    }

    #[test]
    fn a_hidden_primary_key_is_unauthorized() {
        let relation = relation(vec![0]);
        let change = change(ChangeKind::Insert, Some(ROW), None);
        let visible = Visible::Only(vec![false, true, true, true]);
        let d: Value = serde_json::from_str(&super::data(&change, &relation, 0, 1 << 20, &visible)).unwrap();
        assert_eq!(d["errors"], json!([ERROR_UNAUTHORIZED]));
        assert!(d.get("record").is_none());
        assert!(d.get("columns").is_none());
        assert_eq!(d["table"], "t");
    }

    #[test]
    fn commit_timestamps_have_milliseconds() {
        assert_eq!(commit_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(commit_timestamp(1_500_000), "1970-01-01T00:00:01.500Z");
        assert_eq!(commit_timestamp(1_741_083_072_000_999), "2025-03-04T10:11:12.000Z");
    }
}
