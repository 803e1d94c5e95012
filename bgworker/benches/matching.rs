//! How long the worker takes to decide that a captured change reaches no
//! subscriber, the common case on a table whose subscribers filter on an
//! equality (bench (c)'s subscriber, or `recipient_id=eq.<me>` with many
//! users): the raw pre-check (`Registry::may_match` on the values' JSON
//! text) against parsing the filtered values and running the full match,
//! in the same process. Not a test; run with
//!
//!     cargo bench -p bgworker --bench matching
//!
//! It prints nanoseconds per change for each and their ratio.

use bgworker::changes::filter::{Condition, Op};
use bgworker::changes::registry::{Binding, ChannelKey, EventFilter, Registry, Subscription, Target};
use bgworker::changes::row::{FilterColumns, Parsed};
use bgworker::shared::keys::Kind;
use bgworker::shared::wire::{Change, ChangeKind, Column, Relation};
use std::hint::black_box;
use std::time::Instant;

const CHANGES: usize = 20_000;
const ROUNDS: usize = 15;

fn relation() -> Relation {
    let column = |name: &str, typname: &str, type_oid: u32| Column {
        name: name.into(),
        typname: typname.into(),
        type_oid,
    };
    Relation {
        relid: 1,
        schema: "public".into(),
        table: "bench_c".into(),
        columns: vec![
            column("id", "int8", 20),
            column("n", "int4", 23),
            column("body", "text", 25),
            column("ts", "timestamptz", 1184),
        ],
        identity: vec![0],
        primary_key: vec![0],
    }
}

/// A row as the capture trigger writes it, with where its values start.
fn change(i: usize) -> Change {
    let record = format!(
        r#"{{"id":{},"n":{},"body":"a short message body of some forty bytes","ts":"2026-11-26T16:00:00.{:06}+00:00"}}"#,
        i + 1,
        i % 2 + 1,
        i % 1_000_000
    );
    let filter_at = ["id", "n", "body", "ts"]
        .iter()
        .map(|name| (record.find(&format!("\"{name}\":")).unwrap() + name.len() + 3) as u32)
        .collect();
    Change {
        relation: 0,
        kind: ChangeKind::Insert,
        record: Some(record),
        old: None,
        filter_at,
    }
}

/// `users` subscribers, each on `n=eq.-<k>` (no bench row matches).
fn registry(users: u64) -> Registry<u64> {
    let mut registry = Registry::default();
    for k in 0..users {
        registry.subscribe(
            ChannelKey {
                connection: k,
                topic: "realtime:bench".into(),
                join: 1,
            },
            Subscription {
                bindings: vec![Binding {
                    id: 1,
                    target: Target::Table(1),
                    events: EventFilter::Only(ChangeKind::Insert),
                    conditions: vec![Condition {
                        column: "n".into(),
                        kind: Kind::Number,
                        op: Op::Eq,
                        negate: false,
                        values: vec![(-1 - k as i64).to_string()],
                    }],
                }],
                sink: k,
            },
        );
    }
    registry
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let relation = relation();
    let changes: Vec<Change> = (0..CHANGES).map(change).collect();
    for users in [1, 1000] {
        let registry = registry(users);
        let wanted = FilterColumns::new(registry.filtered_columns(&relation).unwrap(), &relation);
        let (mut parsing, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let mut matched = 0;
            for change in &changes {
                let parsed = Parsed::with_columns(change, &wanted);
                matched += registry.matches(&relation, change.kind, &parsed).len();
            }
            black_box(matched);
            parsing.push(t.elapsed().as_nanos() as f64 / CHANGES as f64);

            let t = Instant::now();
            let mut may = 0;
            for change in &changes {
                let value = wanted.raw_values(change).unwrap();
                may += usize::from(registry.may_match(&relation, change.kind, value));
            }
            assert_eq!(may, 0, "no bench row matches");
            raw.push(t.elapsed().as_nanos() as f64 / CHANGES as f64);
        }
        let (p, r) = (median(parsing), median(raw));
        println!(
            "{users:>5} subscriber(s): parse and match {p:7.1} ns/change, raw pre-check {r:7.1} ns/change, ratio {:.3}",
            r / p
        );
    }
}
