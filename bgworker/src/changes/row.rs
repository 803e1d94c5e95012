//! Reading a captured row (JSON text, as the capture trigger wrote it)
//! without building it: each value is kept as the text it has, so numbers
//! stay exact and nothing but the columns asked for is looked at.

use super::filter::FilterRow;
use crate::shared::wire::{Change, ChangeKind, Relation};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The row filters look at, as captured: the new row, or the whole old row
/// for DELETE.
pub fn filter_text(change: &Change) -> Option<&str> {
    if change.kind == ChangeKind::Delete {
        change.old.as_deref()
    } else {
        change.record.as_deref()
    }
}

/// Every field of a row, in its order: the column name and the value's
/// JSON text. Empty if the text is not a JSON object.
pub fn fields(text: &str) -> Vec<(Cow<'_, str>, &str)> {
    let mut json = serde_json::Deserializer::from_str(text);
    Pick(None).deserialize(&mut json).unwrap_or_default()
}

/// A change's row as far as matching needs it: the columns subscriptions
/// filter on, from the new row, or from the old row for DELETE, each as
/// its JSON text. The `data` frame, which needs the whole rows, is only
/// built (`super::event::data`) if something matched.
pub struct Parsed<'a> {
    values: Vec<(Cow<'a, str>, &'a str)>,
}

impl FilterRow for Parsed<'_> {
    fn value(&self, column: &str) -> Option<&str> {
        self.values.iter().find(|(name, _)| name == column).map(|(_, v)| *v)
    }
}

impl<'a> Parsed<'a> {
    /// With every column.
    #[cfg(test)]
    pub fn new(change: &'a Change) -> Parsed<'a> {
        Parsed {
            values: filter_text(change).map(fields).unwrap_or_default(),
        }
    }

    /// With only the columns `wanted` (what the subscriptions on the
    /// table filter on): read where the change says each value starts, or,
    /// without that, found by skipping over the rest of the row.
    pub fn with_columns(change: &'a Change, wanted: &'a FilterColumns) -> Parsed<'a> {
        let values = match filter_text(change) {
            Some(text) if !wanted.names.is_empty() => wanted.read(text, &change.filter_at),
            _ => Vec::new(),
        };
        Parsed { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values read, as a JSON object (tests).
    #[cfg(test)]
    pub fn to_json(&self) -> serde_json::Value {
        let object = self
            .values
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::from_str(v).unwrap()))
            .collect();
        serde_json::Value::Object(object)
    }
}

/// The columns matching needs from a relation's rows: their names and,
/// when each is a column of the relation, their positions in it.
pub struct FilterColumns {
    names: Vec<String>,
    positions: Option<Vec<usize>>,
    /// The relation's column count.
    width: usize,
}

impl FilterColumns {
    pub fn new(names: Vec<String>, relation: &Relation) -> FilterColumns {
        let positions = names
            .iter()
            .map(|name| relation.columns.iter().position(|c| c.name == *name))
            .collect();
        FilterColumns {
            names,
            positions,
            width: relation.columns.len(),
        }
    }

    /// The wanted values of a row, read at the offsets `at` gives (one per
    /// column of the relation), or found by scanning when there are none or
    /// they do not fit the text.
    fn read<'a>(&'a self, text: &'a str, at: &[u32]) -> Vec<(Cow<'a, str>, &'a str)> {
        if let Some(positions) = self.positions.as_ref().filter(|_| at.len() == self.width) {
            let read: Option<Vec<_>> = self
                .names
                .iter()
                .zip(positions)
                .map(|(name, position)| {
                    Some((
                        Cow::Borrowed(name.as_str()),
                        json_value_at(text, at[*position] as usize)?,
                    ))
                })
                .collect();
            if let Some(read) = read {
                return read;
            }
        }
        let mut json = serde_json::Deserializer::from_str(text);
        Pick(Some(&self.names)).deserialize(&mut json).unwrap_or_default()
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

/// Deserializes a JSON object into its fields' texts, keeping only the
/// given keys (all with None); the other values are skipped without being
/// built.
struct Pick<'a>(Option<&'a [String]>);

impl<'a> DeserializeSeed<'a> for Pick<'a> {
    type Value = Vec<(Cow<'a, str>, &'a str)>;

    fn deserialize<D: Deserializer<'a>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'a> Visitor<'a> for Pick<'a> {
    type Value = Vec<(Cow<'a, str>, &'a str)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a row as a JSON object")
    }

    fn visit_map<A: MapAccess<'a>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            let name = match self.0 {
                None => Some(key),
                Some(wanted) => wanted.iter().find(|c| **c == *key).map(|c| Cow::Borrowed(c.as_str())),
            };
            match name {
                Some(name) => {
                    let raw: &'a RawValue = map.next_value()?;
                    out.push((name, raw.get()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::fixtures::{change, relation, ROW};
    use serde_json::{json, Value};

    #[test]
    fn matching_parses_only_the_filtered_columns() {
        let row = r#"{"id":7,"na\"me":"x","tags":[1,{"a":"}"}],"doc":{"k":[true,null]},"n":-1.50}"#;
        let insert = change(ChangeKind::Insert, Some(row), None);
        // (none of these is a column of the relation: found by scanning)
        let wanted =
            |names: &[&str]| FilterColumns::new(names.iter().map(|n| n.to_string()).collect(), &relation(vec![0]));
        let some = wanted(&["n", "na\"me", "absent"]);
        let parsed = Parsed::with_columns(&insert, &some);
        assert_eq!(
            parsed.to_json(),
            serde_json::from_str::<Value>(r#"{"n":-1.50,"na\"me":"x"}"#).unwrap(),
            "escaped keys found, nested values skipped, absent columns absent"
        );
        assert!(Parsed::with_columns(&insert, &wanted(&[])).is_empty());
        // DELETE: the old row
        let delete = change(ChangeKind::Delete, None, Some(r#"{"id":9,"n":2}"#));
        assert_eq!(
            Parsed::with_columns(&delete, &wanted(&["id"])).to_json()["id"],
            json!(9)
        );
        // the exact text of a number, as captured
        assert_eq!(parsed.value("n"), Some("-1.50"));
    }

    #[test]
    fn values_are_read_where_the_offsets_say() {
        let relation = relation(vec![0]);
        let wanted = FilterColumns::new(vec!["blob".into(), "id".into()], &relation);
        // ROW's values start at 6, 16, 27 and 66
        let mut insert = change(ChangeKind::Insert, Some(ROW), None);
        insert.filter_at = vec![6, 16, 27, 66];
        assert_eq!(
            Parsed::with_columns(&insert, &wanted).to_json(),
            json!({"blob": "\\xdeadbeef", "id": 7})
        );
        // offsets that point elsewhere are believed (they come from the
        // capture trigger): here "title"'s value is read as "id"'s
        insert.filter_at = vec![16, 16, 27, 66];
        assert_eq!(Parsed::with_columns(&insert, &wanted).to_json()["id"], json!("new"));
        // too few offsets, or one outside the text: the row is scanned
        for bad in [vec![6, 16, 27], vec![6, 16, 27, 9999]] {
            insert.filter_at = bad;
            assert_eq!(
                Parsed::with_columns(&insert, &wanted).to_json(),
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
            Parsed::with_columns(&delete, &wanted).to_json(),
            json!({"blob": null, "id": 9})
        );
    }

    #[test]
    fn raw_values_are_the_json_text_at_the_offsets() {
        let relation = relation(vec![0]);
        let wanted = FilterColumns::new(vec!["title".into(), "at".into(), "blob".into()], &relation);
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
        let unknown = FilterColumns::new(vec!["gone".into()], &relation);
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
    fn fields_keep_their_text_and_order() {
        let text = r#"{"b":1.50,"a\u0022":"x","n":null}"#;
        let got: Vec<(String, &str)> = fields(text).into_iter().map(|(k, v)| (k.into_owned(), v)).collect();
        assert_eq!(
            got,
            vec![
                ("b".to_owned(), "1.50"),
                ("a\"".to_owned(), r#""x""#),
                ("n".to_owned(), "null")
            ]
        );
        assert!(fields("[1]").is_empty());
        let _: Value = serde_json::from_str(text).unwrap();
    }
}
