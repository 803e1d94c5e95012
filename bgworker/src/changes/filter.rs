//! `postgres_changes` filters: `column=[not.]op.value`, joined by `,` (AND),
//! as realtime-js's filter builder writes them (`docs/protocol.md`, "Filters").
//! Parsing is pure; turning each value into the column's type happens at join
//! time against the catalog (the worker's main thread), and matching
//! ([`Condition::matches`]) compares with the column type's semantics.

use super::value::compare;
use crate::shared::keys::Kind;
#[cfg(test)]
use serde_json::Value;
use std::cmp::Ordering;
use thiserror::Error;

/// Most values an `in` filter may list.
pub const MAX_IN_VALUES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            _ => return None,
        })
    }

    /// Whether the operator needs an order on the type (not just equality).
    pub fn is_ordering(self) -> bool {
        matches!(self, Op::Lt | Op::Lte | Op::Gt | Op::Gte)
    }
}

/// One `column=op.value` condition, as parsed: values are still text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCondition {
    pub column: String,
    pub op: Op,
    pub negate: bool,
    /// One value, or the list of an `in`.
    pub values: Vec<String>,
}

/// A condition whose values have been cast to the column's type: each the
/// JSON text the row encoder writes for that type (`42`, `"a"`), compared
/// as text, so exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub column: String,
    pub kind: Kind,
    pub op: Op,
    pub negate: bool,
    pub values: Vec<String>,
}

/// The values of a row's filtered columns, each as the JSON text the row
/// has (`None`: no such column, or not read).
pub trait FilterRow {
    fn value(&self, column: &str) -> Option<&str>;
}

/// A row of owned JSON texts, for tests.
#[cfg(test)]
pub(crate) struct TextRow(pub Vec<(String, String)>);

#[cfg(test)]
impl TextRow {
    /// The fields of a JSON object, each as its JSON text.
    pub fn of(object: Value) -> TextRow {
        let Value::Object(map) = object else {
            panic!("an object")
        };
        TextRow(map.into_iter().map(|(k, v)| (k, v.to_string())).collect())
    }
}

#[cfg(test)]
impl FilterRow for TextRow {
    fn value(&self, column: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == column).map(|(_, v)| v.as_str())
    }
}

/// A filter that cannot be used. `Display` is the client-facing message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FilterError {
    #[error("Error parsing `filter` params: {0}")]
    Parse(String),
    #[error("filter must not contain empty segments (check for extra commas)")]
    EmptySegment,
    #[error("`in` filter value must be wrapped by parentheses")]
    InWithoutParentheses,
    #[error("too many values for `in` filter. Maximum {MAX_IN_VALUES}")]
    TooManyValues,
}

/// Parses a whole filter string; whitespace-only means no filter.
pub fn parse(filter: &str) -> Result<Vec<ParsedCondition>, FilterError> {
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(filter)
        .into_iter()
        .map(|segment| parse_segment(&segment))
        .collect()
}

/// Splits on `,` at parenthesis depth 0 and outside double quotes. A quote
/// only opens a quoted section right after `.`, `(` or `,`.
fn split_top_level(filter: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let (mut depth, mut quoted, mut escaped) = (0i32, false, false);
    let mut prev: Option<char> = None;
    for c in filter.chars() {
        if quoted {
            current.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
        } else {
            match c {
                '"' if matches!(prev, Some('.') | Some('(') | Some(',')) => quoted = true,
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    segments.push(std::mem::take(&mut current));
                    prev = Some(c);
                    continue;
                }
                _ => {}
            }
            current.push(c);
        }
        prev = Some(c);
    }
    segments.push(current);
    segments
}

fn parse_segment(segment: &str) -> Result<ParsedCondition, FilterError> {
    let segment = segment.trim();
    if segment.is_empty() {
        return Err(FilterError::EmptySegment);
    }
    let parse_error = || FilterError::Parse(format!("{:?}", segment.splitn(2, '.').collect::<Vec<_>>()));
    let (column, rest) = segment.split_once('=').ok_or_else(parse_error)?;
    let column = column.trim();
    if column.is_empty() {
        return Err(parse_error());
    }
    let (negate, rest) = match rest.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (op_text, value) = rest.split_once('.').unwrap_or((rest, ""));
    let op = Op::parse(op_text).ok_or_else(|| FilterError::Parse(format!("[{op_text:?}, {value:?}]")))?;
    let values = if op == Op::In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or(FilterError::InWithoutParentheses)?;
        let items: Vec<String> = if inner.trim().is_empty() {
            Vec::new()
        } else {
            split_top_level(inner).iter().map(|v| unquote(v.trim())).collect()
        };
        if items.len() > MAX_IN_VALUES {
            return Err(FilterError::TooManyValues);
        }
        items
    } else {
        vec![unquote(value)]
    };
    Ok(ParsedCondition {
        column: column.to_owned(),
        op,
        negate,
        values,
    })
}

/// `"a,b"` → `a,b`, with `\"` and `\\` escapes; unquoted text as is.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Condition {
    /// Whether `row` passes. SQL semantics: a NULL (or absent) column makes
    /// the comparison unknown, and unknown rows are not delivered, negated or
    /// not.
    pub fn matches(&self, row: &dyn FilterRow) -> bool {
        let Some(actual) = row.value(&self.column).filter(|v| v.trim() != "null") else {
            return false;
        };
        let result = match self.op {
            Op::In => {
                let mut unknown = false;
                let mut found = false;
                for v in &self.values {
                    match compare(self.kind, actual, v) {
                        Some(Ordering::Equal) => {
                            found = true;
                            break;
                        }
                        Some(_) => {}
                        None => unknown = true,
                    }
                }
                if found {
                    Some(true)
                } else if unknown {
                    None
                } else {
                    Some(false)
                }
            }
            op => {
                let Some(expected) = self.values.first() else {
                    return false;
                };
                compare(self.kind, actual, expected).map(|ord| match op {
                    Op::Eq => ord == Ordering::Equal,
                    Op::Neq => ord != Ordering::Equal,
                    Op::Lt => ord == Ordering::Less,
                    Op::Lte => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    Op::Gte => ord != Ordering::Less,
                    Op::In => unreachable!(),
                })
            }
        };
        match result {
            Some(r) => r != self.negate,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(filter: &str) -> ParsedCondition {
        let mut v = parse(filter).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    #[test]
    fn each_operator_parses() {
        for (text, op) in [
            ("eq", Op::Eq),
            ("neq", Op::Neq),
            ("lt", Op::Lt),
            ("lte", Op::Lte),
            ("gt", Op::Gt),
            ("gte", Op::Gte),
        ] {
            let c = one(&format!("id={text}.5"));
            assert_eq!(
                c,
                ParsedCondition {
                    column: "id".into(),
                    op,
                    negate: false,
                    values: vec!["5".into()]
                }
            );
        }
    }

    #[test]
    fn in_lists_and_quotes() {
        let c = one(r#"status=in.(draft,"a,b",  "say \"hi\"" ,x)"#);
        assert_eq!(c.op, Op::In);
        assert_eq!(c.values, vec!["draft", "a,b", "say \"hi\"", "x"]);
        assert_eq!(one("status=in.()").values, Vec::<String>::new());
    }

    #[test]
    fn not_prefix_and_dotted_values() {
        let c = one("status=not.in.(draft,archived)");
        assert!(c.negate);
        assert_eq!(c.values, vec!["draft", "archived"]);
        // only the first dot after the operator separates: values may hold dots
        assert_eq!(one("price=gt.10.5").values, vec!["10.5"]);
        assert_eq!(one("email=eq.a.b@c.d").values, vec!["a.b@c.d"]);
    }

    #[test]
    fn several_conditions_and_quoted_commas() {
        let v = parse(r#"a=eq.1,b=eq."x,y",c=in.(1,2)"#).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].values, vec!["x,y"]);
        assert_eq!(v[2].values, vec!["1", "2"]);
        assert!(parse("   ").unwrap().is_empty());
    }

    #[test]
    fn errors_have_the_protocol_messages() {
        assert_eq!(
            parse("id=foo.hey").unwrap_err().to_string(),
            r#"Error parsing `filter` params: ["foo", "hey"]"#
        );
        assert!(parse("undefined")
            .unwrap_err()
            .to_string()
            .starts_with("Error parsing `filter` params: "));
        assert_eq!(parse("a=eq.1,,b=eq.2").unwrap_err(), FilterError::EmptySegment);
        assert_eq!(parse("a=in.1,2").unwrap_err(), FilterError::InWithoutParentheses);
        let many = (0..101).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert_eq!(
            parse(&format!("a=in.({many})")).unwrap_err(),
            FilterError::TooManyValues
        );
        let hundred = (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert_eq!(one(&format!("a=in.({hundred})")).values.len(), 100);
        assert!(parse("=eq.1").is_err());
    }

    fn cond(column: &str, kind: Kind, op: Op, negate: bool, values: Vec<Value>) -> Condition {
        Condition {
            column: column.into(),
            kind,
            op,
            negate,
            values: values.iter().map(Value::to_string).collect(),
        }
    }

    #[test]
    fn numeric_semantics() {
        let row = TextRow::of(json!({"n": 10, "big": 12345678901234567890.5f64}));
        assert!(cond("n", Kind::Number, Op::Gt, false, vec![json!(9)]).matches(&row));
        // numeric order, not text order ("10" < "9" as text)
        assert!(!cond("n", Kind::Number, Op::Lt, false, vec![json!(9)]).matches(&row));
        assert!(cond("n", Kind::Number, Op::Eq, false, vec![json!(10.0)]).matches(&row));
        assert!(cond("n", Kind::Number, Op::In, false, vec![json!(1), json!(10)]).matches(&row));
        assert!(!cond("n", Kind::Number, Op::In, true, vec![json!(1), json!(10)]).matches(&row));
        assert!(cond("n", Kind::Number, Op::Neq, false, vec![json!(11)]).matches(&row));
        assert!(cond("n", Kind::Number, Op::Lte, false, vec![json!(10)]).matches(&row));
        assert!(cond("n", Kind::Number, Op::Gte, false, vec![json!(10)]).matches(&row));
    }

    #[test]
    fn long_numbers_compare_exactly_from_their_text() {
        let row = TextRow(vec![("n".into(), "12345678901234567890123.000000000000000001".into())]);
        let c = |op, value: &str| Condition {
            column: "n".into(),
            kind: Kind::Number,
            op,
            negate: false,
            values: vec![value.into()],
        };
        assert!(c(Op::Gt, "12345678901234567890123").matches(&row));
        assert!(!c(Op::Eq, "12345678901234567890123").matches(&row));
        assert!(c(Op::Eq, "12345678901234567890123.000000000000000001000").matches(&row));
        assert!(c(Op::Lt, "1.2345678901234567890123000000000000000011e22").matches(&row));
    }

    #[test]
    fn nulls_and_absent_columns_never_match() {
        let row = TextRow::of(json!({"a": null}));
        for negate in [false, true] {
            for op in [Op::Eq, Op::Neq, Op::Lt, Op::In] {
                assert!(!cond("a", Kind::Number, op, negate, vec![json!(1)]).matches(&row));
                assert!(!cond("missing", Kind::Text, op, negate, vec![json!("x")]).matches(&row));
            }
        }
    }

    #[test]
    fn text_uuid_bool_semantics() {
        let row = TextRow::of(json!({"t": "banana", "u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "b": true}));
        assert!(cond("t", Kind::Text, Op::Gt, false, vec![json!("apple")]).matches(&row));
        assert!(cond("t", Kind::Text, Op::Eq, false, vec![json!("banana")]).matches(&row));
        assert!(!cond("t", Kind::Text, Op::Eq, false, vec![json!("Banana")]).matches(&row));
        assert!(cond(
            "u",
            Kind::Uuid,
            Op::Eq,
            false,
            vec![json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")]
        )
        .matches(&row));
        assert!(cond("b", Kind::Bool, Op::Eq, false, vec![json!(true)]).matches(&row));
        assert!(cond("b", Kind::Bool, Op::Gt, false, vec![json!(false)]).matches(&row));
    }

    #[test]
    fn dates_and_timestamps() {
        let row = TextRow::of(json!({"d": "2025-03-04", "ts": "2025-03-04T11:00:00+01:00"}));
        assert!(cond("d", Kind::Date, Op::Lt, false, vec![json!("2025-12-01")]).matches(&row));
        // same instant, different offsets
        assert!(cond(
            "ts",
            Kind::Timestamptz,
            Op::Eq,
            false,
            vec![json!("2025-03-04T10:00:00+00:00")]
        )
        .matches(&row));
        assert!(cond(
            "ts",
            Kind::Timestamptz,
            Op::Gt,
            false,
            vec![json!("2025-03-04T09:59:59.999+00:00")]
        )
        .matches(&row));
        assert!(!cond(
            "ts",
            Kind::Timestamptz,
            Op::Gt,
            false,
            vec![json!("2025-03-04T10:00:00.5+00:00")]
        )
        .matches(&row));
    }
}
