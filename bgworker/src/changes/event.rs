//! Turning a captured row change into the `data` of a `postgres_changes`
//! event (`docs/protocol.md`, "Change events"): typed records, `columns`, the
//! replica identity in `old_record`, UTC timestamps, and the size limit.
//! Built once per change and shared by every channel it is delivered to.
//! Values go out as the JSON text they were captured as (so numbers stay
//! exact), but for the few the writer's session could have rendered
//! differently (`normalised`).

use super::row::fields;
#[cfg(test)]
use super::row::Parsed;
use super::value::timestamptz_to_utc;
use crate::shared::keys::{json_string, type_oid};
use crate::shared::wire::{Change, ChangeKind, Relation};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;

/// Values at most this long survive in an over-sized record.
const SMALL_VALUE_BYTES: usize = 64;

pub const ERROR_TOO_LARGE: &str = "Error 413: Payload Too Large";
pub const ERROR_NO_PRIMARY_KEY: &str = "Error 400: Bad Request, no primary key";
pub const ERROR_UNAUTHORIZED: &str = "Error 401: Unauthorized";

/// How much of an UPDATE's or DELETE's old row `old_record` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OldImage {
    /// Its replica identity (the primary key, or with `REPLICA IDENTITY
    /// FULL` every column).
    Identity,
    /// Only its primary key: the subscriber's row-level security hides the
    /// old row, though not the new one.
    PrimaryKey,
}

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
    pub filter_row: Value,
}

/// A captured value as clients get it, normalising what the writer's
/// session could have rendered differently: `timestamptz` to UTC, `bytea`
/// to bare hex. Anything else is its captured text.
fn normalised(type_oid: u32, json: &str) -> Cow<'_, str> {
    let rewritten = match type_oid {
        type_oid::TIMESTAMPTZ => json_string(json).map(|s| Value::String(timestamptz_to_utc(&s))),
        type_oid::TIMESTAMPTZ_ARRAY => match serde_json::from_str::<Vec<Value>>(json) {
            Ok(items) => Some(Value::Array(
                items
                    .into_iter()
                    .map(|item| match item {
                        Value::String(s) => Value::String(timestamptz_to_utc(&s)),
                        other => other,
                    })
                    .collect(),
            )),
            Err(_) => None,
        },
        type_oid::BYTEA => json_string(json).map(|s| Value::String(s.strip_prefix("\\x").unwrap_or(&s).to_owned())),
        _ => None,
    };
    rewritten.map_or(Cow::Borrowed(json), |v| Cow::Owned(v.to_string()))
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

/// A JSON object written field by field.
struct Object(String);

impl Object {
    fn new() -> Object {
        Object(String::from("{"))
    }

    /// A field whose value is JSON text already.
    fn raw(&mut self, key: &str, json: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(&quoted(key));
        self.0.push(':');
        self.0.push_str(json);
    }

    fn string(&mut self, key: &str, value: &str) {
        self.raw(key, &quoted(value));
    }

    fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn quoted(s: &str) -> String {
    Value::from(s).to_string()
}

/// The serialized `data` object of a change, with only the columns in
/// `visible` (and of the old row, only what `old` says). A role that may
/// not read the whole primary key gets the `Error 401: Unauthorized` form,
/// without values.
pub fn data(
    change: &Change,
    relation: &Relation,
    commit_time_us: i64,
    max_record_bytes: usize,
    visible: &Visible,
    old: OldImage,
) -> String {
    let kind = change.kind;
    let mut data = Object::new();
    data.string("schema", &relation.schema);
    data.string("table", &relation.table);
    data.string("commit_timestamp", &commit_timestamp(commit_time_us));
    data.string("type", kind.as_str());
    if relation.identity.is_empty() && kind != ChangeKind::Delete {
        data.raw("errors", &errors(&[ERROR_NO_PRIMARY_KEY]));
        return data.finish();
    }
    if !relation.key_columns().all(|i| visible.column(i)) {
        data.raw("errors", &errors(&[ERROR_UNAUTHORIZED]));
        return data.finish();
    }
    let columns: Vec<Value> = relation
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| visible.column(*i))
        .map(|(_, c)| serde_json::json!({"name": c.name, "type": c.typname}))
        .collect();
    data.raw("columns", &Value::Array(columns).to_string());
    let mut problems = Vec::new();
    if kind != ChangeKind::Delete {
        let record = shown(relation, visible, change.record.as_deref(), &|_| true);
        data.raw("record", &record_json(record, max_record_bytes, &mut problems));
    }
    if kind != ChangeKind::Insert {
        let shows = |i: usize| match old {
            OldImage::Identity => relation.identity.contains(&(i as u16)),
            OldImage::PrimaryKey => relation.primary_key.contains(&(i as u16)),
        };
        let old_record = shown(relation, visible, change.old.as_deref(), &shows);
        data.raw("old_record", &record_json(old_record, max_record_bytes, &mut problems));
    }
    problems.dedup();
    data.raw(
        "errors",
        &if problems.is_empty() {
            "null".to_owned()
        } else {
            errors(&problems)
        },
    );
    data.finish()
}

fn errors(messages: &[&str]) -> String {
    Value::from(messages.to_vec()).to_string()
}

/// The columns of a captured row a subscriber sees (visible, and kept by
/// `keep`), in the relation's order, each with its normalised JSON text.
fn shown<'a>(
    relation: &'a Relation,
    visible: &Visible,
    text: Option<&'a str>,
    keep: &dyn Fn(usize) -> bool,
) -> Vec<(&'a str, Cow<'a, str>)> {
    let row: HashMap<Cow<'a, str>, &'a str> = text.map(fields).unwrap_or_default().into_iter().collect();
    relation
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| visible.column(*i) && keep(*i))
        .filter_map(|(_, c)| Some((c.name.as_str(), normalised(c.type_oid, row.get(c.name.as_str())?))))
        .collect()
}

/// A record as a JSON object; over the limit, only its small values, and
/// the problem said.
fn record_json(record: Vec<(&str, Cow<'_, str>)>, max_bytes: usize, problems: &mut Vec<&'static str>) -> String {
    let size: usize = record.iter().map(|(k, v)| k.len() + v.len()).sum();
    let over = size > max_bytes;
    if over {
        problems.push(ERROR_TOO_LARGE);
    }
    let mut object = Object::new();
    for (name, value) in &record {
        if !over || value.len() <= SMALL_VALUE_BYTES {
            object.raw(name, value);
        }
    }
    object.finish()
}

/// Builds the event for one change at once (tests; delivery matches on
/// [`Parsed`] and builds [`data`] only when something matched).
#[cfg(test)]
pub fn build(relation: &Relation, change: &Change, commit_time_us: i64, max_record_bytes: usize) -> Event {
    Event {
        kind: change.kind,
        data: data(
            change,
            relation,
            commit_time_us,
            max_record_bytes,
            &Visible::All,
            OldImage::Identity,
        ),
        filter_row: Parsed::new(change).to_json(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::fixtures::{change, relation, ROW};
    use serde_json::json;

    fn data(e: &Event) -> Value {
        serde_json::from_str(&e.data).unwrap()
    }

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

    /// `data` as a role that sees `visible`, the old row whole.
    fn shown_data(change: &Change, relation: &Relation, visible: &Visible) -> Value {
        serde_json::from_str(&super::data(change, relation, 0, 1 << 20, visible, OldImage::Identity)).unwrap()
    }

    #[test]
    fn only_visible_columns_are_shown() {
        let old = r#"{"id":7,"title":"old","at":null,"blob":"\\x00"}"#;
        let relation = relation(vec![0, 1, 2, 3]);
        let change = change(ChangeKind::Update, Some(ROW), Some(old));
        let parsed = Parsed::new(&change);
        let visible = Visible::Only(vec![true, true, false, false]);
        let d = shown_data(&change, &relation, &visible);
        assert_eq!(d["record"], json!({"id": 7, "title": "new"}));
        assert_eq!(d["old_record"], json!({"id": 7, "title": "old"}));
        assert_eq!(
            d["columns"],
            json!([{"name": "id", "type": "int8"}, {"name": "title", "type": "text"}])
        );
        // filters still see the whole row, as captured
        assert_eq!(parsed.to_json()["at"], json!("2025-03-04T11:11:12.345+01:00"));
    }

    #[test]
    fn a_hidden_primary_key_is_unauthorized() {
        let relation = relation(vec![0]);
        let change = change(ChangeKind::Insert, Some(ROW), None);
        let visible = Visible::Only(vec![false, true, true, true]);
        let d = shown_data(&change, &relation, &visible);
        assert_eq!(d["errors"], json!([ERROR_UNAUTHORIZED]));
        assert!(d.get("record").is_none());
        assert!(d.get("columns").is_none());
        assert_eq!(d["table"], "t");
    }

    #[test]
    fn values_go_out_as_captured_exactly() {
        let row = r#"{"id":7,"title":"12345678901234567890.100","at":null,"blob":null}"#;
        let exact = r#"{"id":123456789012345678901234567890,"title":"t","at":["2025-03-04T11:00:00+01:00",null],"blob":"\\x00"}"#;
        let mut relation = relation(vec![0]);
        relation.columns[2].type_oid = type_oid::TIMESTAMPTZ_ARRAY;
        let e = build(&relation, &change(ChangeKind::Insert, Some(exact), None), 0, 1 << 20);
        assert!(
            e.data
                .contains(r#""record":{"id":123456789012345678901234567890,"title":"t","#),
            "{}",
            e.data
        );
        assert!(
            e.data.contains(r#""at":["2025-03-04T10:00:00+00:00",null]"#),
            "{}",
            e.data
        );
        assert!(e.data.contains(r#""blob":"00""#), "{}", e.data);
        let e = build(&relation, &change(ChangeKind::Insert, Some(row), None), 0, 1 << 20);
        assert!(e.data.contains(r#""title":"12345678901234567890.100""#), "{}", e.data);
    }

    #[test]
    fn commit_timestamps_have_milliseconds() {
        assert_eq!(commit_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(commit_timestamp(1_500_000), "1970-01-01T00:00:01.500Z");
        assert_eq!(commit_timestamp(1_741_083_072_000_999), "2025-03-04T10:11:12.000Z");
    }
}
