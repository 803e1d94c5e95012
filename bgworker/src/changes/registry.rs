//! Who subscribed to what, and which subscriptions a row change reaches.
//! Bindings are indexed by relation (or schema, or all), and bindings with
//! an equality condition by the value they want, so delivering an event
//! costs work proportional to the subscriptions it matches, not to all the
//! subscriptions on its table (`docs/architecture.md`, invariant 5).

use super::filter::FilterRow;
use super::filter::{Condition, Op};
use crate::shared::keys::{index_key, json_key, Kind};
use crate::shared::prefilter::{Bloom, CountingBloom};
use crate::shared::wire::{ChangeKind, Relation};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Identifies a channel: its connection, topic, and which join of the
/// topic it is (a rejoin is another channel: a late answer for the old
/// one cannot touch it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    pub connection: u64,
    pub topic: String,
    pub join: u64,
}

/// What a binding listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Table(u32),
    Schema(String),
    All,
}

/// Which change kinds a binding wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Only(ChangeKind),
}

impl EventFilter {
    /// `INSERT`/`UPDATE`/`DELETE` (any case); anything else means all, as
    /// Supabase treats it.
    pub fn parse(event: &str) -> EventFilter {
        match event.to_ascii_uppercase().as_str() {
            "INSERT" => EventFilter::Only(ChangeKind::Insert),
            "UPDATE" => EventFilter::Only(ChangeKind::Update),
            "DELETE" => EventFilter::Only(ChangeKind::Delete),
            _ => EventFilter::All,
        }
    }

    fn accepts(self, kind: ChangeKind) -> bool {
        match self {
            EventFilter::All => true,
            EventFilter::Only(k) => k == kind,
        }
    }
}

/// One validated `postgres_changes` binding of a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The id the join reply gave it.
    pub id: u32,
    pub target: Target,
    pub events: EventFilter,
    pub conditions: Vec<Condition>,
}

#[derive(Default)]
struct TargetIndex {
    /// Bindings without a usable equality condition.
    scan: Vec<(ChannelKey, usize)>,
    /// column -> key -> bindings whose first equality condition wants it.
    by_value: HashMap<String, HashMap<String, Vec<(ChannelKey, usize)>>>,
    /// The columns `by_value` is keyed on, with their kinds.
    columns: HashMap<String, Kind>,
    /// A table's: while `by_value` has one column, that column and the
    /// Bloom filter of its keys, kept as they come and go (the capture
    /// triggers' key filter, written once per batch of joins; rebuilt
    /// from every key each time, it was a quarter of the worker's time in
    /// a join storm). One per table at most (in each registry): 1 kB and
    /// about 20 bytes a key.
    bloom: Option<(String, CountingBloom)>,
    /// Every column a condition here looks at, with how many do: all a
    /// change's row needs to be parsed for to be matched.
    filtered: HashMap<String, usize>,
}

impl TargetIndex {
    /// Runs `change` on the kept Bloom filter if it is `column`'s.
    fn bloom_for(&mut self, column: &str, change: impl FnOnce(&mut CountingBloom)) {
        if let Some((c, bloom)) = &mut self.bloom {
            if c == column {
                change(bloom);
            }
        }
    }

    /// Keeps `bloom` for a table's one `by_value` column (built from its
    /// keys when it becomes the only one), none otherwise.
    fn settle_bloom(&mut self, target: &Target) {
        let mut columns = self.by_value.iter();
        match (target, columns.next(), columns.next()) {
            (Target::Table(_), Some((column, values)), None) => {
                if self.bloom.as_ref().is_none_or(|(c, _)| c != column) {
                    let mut bloom = CountingBloom::default();
                    for key in values.keys() {
                        bloom.add(key);
                    }
                    self.bloom = Some((column.clone(), bloom));
                }
            }
            _ => self.bloom = None,
        }
    }
}

/// A channel's subscription: its bindings and where its events go.
pub struct Subscription<S> {
    pub bindings: Vec<Binding>,
    pub sink: S,
}

/// All subscriptions. `S` is how events reach a channel (a queue sender in
/// the server; anything in tests).
pub struct Registry<S> {
    channels: BTreeMap<ChannelKey, Subscription<S>>,
    targets: HashMap<Target, TargetIndex>,
    /// Whether any target is a schema (else a change's schema is not
    /// looked up): set on subscribe, re-read when a schema target goes.
    schema_targets: bool,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            channels: BTreeMap::new(),
            targets: HashMap::new(),
            schema_targets: false,
        }
    }
}

/// Which rows of a table its bindings may want, for the capture trigger to
/// drop the others before they are sent (`crate::shared::prefilter`).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // (one per table, briefly, once per batch of joins)
pub enum RowFilter<'a> {
    /// No binding names the table.
    Unbound,
    /// Any row may be wanted.
    Every,
    /// Only rows whose value in `column` has one of the equality keys
    /// ([`json_key`]) of `bloom`: every binding has its indexed equality
    /// condition on that column.
    Keys { column: &'a str, kind: Kind, bloom: Bloom },
}

impl<'a> RowFilter<'a> {
    /// What two sets of bindings on one table want together.
    pub fn union(self, other: RowFilter<'a>) -> RowFilter<'a> {
        match (self, other) {
            (RowFilter::Unbound, f) | (f, RowFilter::Unbound) => f,
            (
                RowFilter::Keys {
                    column,
                    kind,
                    mut bloom,
                },
                RowFilter::Keys {
                    column: c,
                    kind: k,
                    bloom: more,
                },
            ) if column == c && kind == k => {
                bloom.union(&more);
                RowFilter::Keys { column, kind, bloom }
            }
            _ => RowFilter::Every,
        }
    }
}

/// A match: a channel and the ids of its bindings that an event satisfies.
#[derive(Debug, PartialEq)]
pub struct Match<'a, S> {
    pub channel: &'a ChannelKey,
    pub sink: &'a S,
    pub ids: Vec<u32>,
}

/// The equality condition a binding is indexed by, and the key it is
/// filed under (None: the binding is matched by scanning).
fn indexed_by(binding: &Binding) -> Option<(&Condition, String)> {
    let c = binding
        .conditions
        .iter()
        .find(|c| c.op == Op::Eq && !c.negate && c.values.len() == 1)?;
    Some((c, index_key(c.kind, &c.values[0])?))
}

impl<S> Registry<S> {
    /// Adds (or replaces) a channel's subscription.
    pub fn subscribe(&mut self, key: ChannelKey, subscription: Subscription<S>) {
        self.unsubscribe(&key);
        for (i, binding) in subscription.bindings.iter().enumerate() {
            self.schema_targets |= matches!(binding.target, Target::Schema(_));
            let index = self.targets.entry(binding.target.clone()).or_default();
            for c in &binding.conditions {
                *index.filtered.entry(c.column.clone()).or_default() += 1;
            }
            match indexed_by(binding) {
                Some((c, value_key)) => {
                    index.columns.insert(c.column.clone(), c.kind);
                    let known = index
                        .by_value
                        .get(&c.column)
                        .is_some_and(|v| v.contains_key(&value_key));
                    if !known {
                        index.bloom_for(&c.column, |bloom| bloom.add(&value_key));
                    }
                    index
                        .by_value
                        .entry(c.column.clone())
                        .or_default()
                        .entry(value_key)
                        .or_default()
                        .push((key.clone(), i));
                    index.settle_bloom(&binding.target);
                }
                None => index.scan.push((key.clone(), i)),
            }
        }
        self.channels.insert(key, subscription);
    }

    /// The indexes a change of `relation` is matched against: its table's,
    /// its schema's, everything's.
    fn indexes_for<'r>(&'r self, relation: &Relation) -> impl Iterator<Item = &'r TargetIndex> + 'r {
        let schema = self
            .schema_targets
            .then(|| self.targets.get(&Target::Schema(relation.schema.clone())))
            .flatten();
        [
            self.targets.get(&Target::Table(relation.relid)),
            schema,
            self.targets.get(&Target::All),
        ]
        .into_iter()
        .flatten()
    }

    /// Removes a channel's subscription; returns it.
    pub fn unsubscribe(&mut self, key: &ChannelKey) -> Option<Subscription<S>> {
        let subscription = self.channels.remove(key)?;
        for binding in &subscription.bindings {
            let Some(index) = self.targets.get_mut(&binding.target) else {
                continue;
            };
            for c in &binding.conditions {
                if let Some(n) = index.filtered.get_mut(&c.column) {
                    *n -= 1;
                    if *n == 0 {
                        index.filtered.remove(&c.column);
                    }
                }
            }
        }
        // (each binding out of the one list it went into: a leave costs
        // its own entries, not a walk over every key of the table)
        for binding in &subscription.bindings {
            let Some(index) = self.targets.get_mut(&binding.target) else {
                continue;
            };
            match indexed_by(binding) {
                Some((c, value_key)) => {
                    if let Some(values) = index.by_value.get_mut(&c.column) {
                        let mut last = false;
                        if let Some(v) = values.get_mut(&value_key) {
                            v.retain(|(k, _)| k != key);
                            last = v.is_empty();
                            if last {
                                values.remove(&value_key);
                            }
                        }
                        if values.is_empty() {
                            index.by_value.remove(&c.column);
                        }
                        if last {
                            index.bloom_for(&c.column, |bloom| bloom.remove(&value_key));
                        }
                        index.settle_bloom(&binding.target);
                    }
                }
                None => index.scan.retain(|(k, _)| k != key),
            }
        }
        let targets: HashSet<&Target> = subscription.bindings.iter().map(|b| &b.target).collect();
        for target in targets {
            if let Some(index) = self.targets.get_mut(target) {
                if index.scan.is_empty() && index.by_value.is_empty() {
                    self.targets.remove(target);
                    if matches!(target, Target::Schema(_)) {
                        self.schema_targets = self.targets.keys().any(|t| matches!(t, Target::Schema(_)));
                    }
                }
            }
        }
        Some(subscription)
    }

    /// Removes every channel of a connection.
    pub fn unsubscribe_connection(&mut self, connection: u64) {
        let keys: Vec<ChannelKey> = self
            .channels
            .keys()
            .filter(|k| k.connection == connection)
            .cloned()
            .collect();
        for key in keys {
            self.unsubscribe(&key);
        }
    }

    pub fn get(&self, key: &ChannelKey) -> Option<&Subscription<S>> {
        self.channels.get(key)
    }

    /// Every channel's sink.
    pub fn sinks(&self) -> impl Iterator<Item = &S> {
        self.channels.values().map(|s| &s.sink)
    }

    /// Sinks of the channels that may have wanted changes of `relids`:
    /// table bindings on them, and every schema-wide or global binding (the
    /// relation's schema is not known here, so err towards telling). With
    /// `all`, every channel.
    pub fn sinks_for(&self, relids: &[u32], all: bool) -> Vec<&S> {
        self.channels
            .values()
            .filter(|sub| {
                all || sub.bindings.iter().any(|b| match &b.target {
                    Target::Table(r) => relids.contains(r),
                    Target::Schema(_) | Target::All => true,
                })
            })
            .map(|sub| &sub.sink)
            .collect()
    }

    /// The channels with a binding that covers `relation` (its table, its
    /// schema, or everything), whatever their event and row filters: who
    /// must hear of a TRUNCATE.
    pub fn subscribed_to(&self, relation: &Relation) -> Vec<(&ChannelKey, &S)> {
        self.channels
            .iter()
            .filter(|(_, sub)| {
                sub.bindings.iter().any(|b| match &b.target {
                    Target::Table(r) => *r == relation.relid,
                    Target::Schema(s) => *s == relation.schema,
                    Target::All => true,
                })
            })
            .map(|(key, sub)| (key, &sub.sink))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Relations with a table-level binding, schemas with a schema-level
    /// one, and whether any binding covers all schemas: what the capture
    /// triggers need to know.
    pub fn interest(&self) -> (Vec<u32>, Vec<String>, bool) {
        let mut tables = Vec::new();
        let mut schemas = Vec::new();
        let mut all = false;
        for target in self.targets.keys() {
            match target {
                Target::Table(relid) => tables.push(*relid),
                Target::Schema(s) => schemas.push(s.clone()),
                Target::All => all = true,
            }
        }
        (tables, schemas, all)
    }

    /// Which rows of table `relid` its table bindings may want. (Bindings
    /// on its schema or on everything are not looked at: the interest
    /// table has every row of their tables sent.)
    pub fn row_filter(&self, relid: u32) -> RowFilter<'_> {
        let Some(index) = self.targets.get(&Target::Table(relid)) else {
            return RowFilter::Unbound;
        };
        let mut columns = index.by_value.iter();
        match (index.scan.is_empty(), columns.next(), columns.next()) {
            (true, Some((column, _)), None) => match (index.columns.get(column), &index.bloom) {
                (Some(kind), Some((c, bloom))) if c == column => RowFilter::Keys {
                    column,
                    kind: *kind,
                    bloom: bloom.bloom().clone(),
                },
                _ => RowFilter::Every,
            },
            _ => RowFilter::Every,
        }
    }

    /// The columns that the conditions of bindings on `relation` (on it,
    /// its schema or everything) look at: all of a row that matching
    /// needs. None when no binding covers the relation at all.
    pub fn filtered_columns(&self, relation: &Relation) -> Option<Vec<String>> {
        let mut found = false;
        let mut columns: Vec<String> = Vec::new();
        for index in self.indexes_for(relation) {
            found = true;
            for column in index.filtered.keys() {
                if !columns.contains(column) {
                    columns.push(column.clone());
                }
            }
        }
        found.then_some(columns)
    }

    /// Whether a change of `relation` may satisfy some binding, judged from
    /// the JSON text of its filtered values alone (`value` gives a
    /// column's, as the row has it; None when it cannot tell): false only
    /// when no binding without an equality index takes changes of this
    /// kind and no equality index holds the row's value. No parsing and,
    /// for the usual values, no allocation: a change nobody wants costs a
    /// hash look-up per indexed column. [`Registry::matches`] decides the
    /// rest.
    pub fn may_match<'t>(
        &self,
        relation: &Relation,
        kind: ChangeKind,
        value: impl Fn(&str) -> Option<&'t str>,
    ) -> bool {
        for index in self.indexes_for(relation) {
            let scanned = index.scan.iter().any(|(key, i)| {
                self.channels
                    .get(key)
                    .is_some_and(|sub| sub.bindings[*i].events.accepts(kind))
            });
            if scanned {
                return true;
            }
            for (column, kind_of) in &index.columns {
                let Some(text) = value(column) else {
                    return true;
                };
                let Some(key) = json_key(*kind_of, text) else {
                    continue;
                };
                if index
                    .by_value
                    .get(column)
                    .is_some_and(|values| values.contains_key(&*key))
                {
                    return true;
                }
            }
        }
        false
    }

    /// Channels whose bindings a change satisfies, each with the matching
    /// binding ids. `row` is what filters look at: the new row, or the old
    /// row for DELETE.
    pub fn matches<'a>(&'a self, relation: &Relation, kind: ChangeKind, row: &dyn FilterRow) -> Vec<Match<'a, S>> {
        let mut hits: BTreeMap<&ChannelKey, Vec<u32>> = BTreeMap::new();
        for index in self.indexes_for(relation) {
            let mut candidates: Vec<&(ChannelKey, usize)> = index.scan.iter().collect();
            for (column, kind_of) in &index.columns {
                let Some(value) = row.value(column) else {
                    continue;
                };
                let Some(value_key) = json_key(*kind_of, value) else {
                    continue;
                };
                if let Some(list) = index.by_value.get(column).and_then(|values| values.get(&*value_key)) {
                    candidates.extend(list.iter());
                }
            }
            for (key, i) in candidates {
                let Some(sub) = self.channels.get(key) else { continue };
                let binding = &sub.bindings[*i];
                if binding.events.accepts(kind) && binding.conditions.iter().all(|c| c.matches(row)) {
                    let ids = hits.entry(key).or_default();
                    if !ids.contains(&binding.id) {
                        ids.push(binding.id);
                    }
                }
            }
        }
        hits.into_iter()
            .filter_map(|(key, mut ids)| {
                let (channel, sub) = self.channels.get_key_value(key)?;
                ids.sort_unstable();
                Some(Match {
                    channel,
                    sink: &sub.sink,
                    ids,
                })
            })
            .collect()
    }
}

/// The id a join reply gives a binding: a hash of what the client sent
/// (event, schema, table, filter), so identical entries get identical ids;
/// never 0 (realtime-js ignores falsy ids), and below 2^27 like Supabase's.
pub fn binding_id(event: &str, schema: Option<&str>, table: Option<&str>, filter: Option<&str>) -> u32 {
    // FNV-1a: stable across processes and releases.
    let mut hash: u32 = 0x811c_9dc5;
    for part in [Some(event), schema, table, filter] {
        for byte in part.unwrap_or("\u{0}").bytes().chain(std::iter::once(0xff)) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    (hash % ((1 << 27) - 1)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::filter::TextRow;
    use crate::shared::wire::Column;
    use serde_json::{json, Value};

    fn relation() -> Relation {
        Relation {
            relid: 100,
            schema: "public".into(),
            table: "messages".into(),
            columns: vec![Column {
                name: "recipient_id".into(),
                typname: "uuid".into(),
                type_oid: 2950,
            }],
            identity: vec![0],
            primary_key: vec![0],
        }
    }

    fn key(c: u64) -> ChannelKey {
        ChannelKey {
            connection: c,
            topic: "realtime:t".into(),
            join: 1,
        }
    }

    fn eq(column: &str, kind: Kind, v: Value) -> Condition {
        Condition {
            column: column.into(),
            kind,
            op: Op::Eq,
            negate: false,
            values: vec![v.to_string()],
        }
    }

    fn row(v: Value) -> TextRow {
        TextRow::of(v)
    }

    #[test]
    fn equality_index_finds_only_the_matching_subscriber() {
        let mut r: Registry<&str> = Registry::default();
        for i in 0..1000u64 {
            let binding = Binding {
                id: 7,
                target: Target::Table(100),
                events: EventFilter::All,
                conditions: vec![eq("recipient_id", Kind::Uuid, json!(format!("u{i}")))],
            };
            r.subscribe(
                key(i),
                Subscription {
                    bindings: vec![binding],
                    sink: "s",
                },
            );
        }
        let m = r.matches(&relation(), ChangeKind::Insert, &row(json!({"recipient_id": "U42"})));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].channel, &key(42));
        assert_eq!(m[0].ids, vec![7]);
        // the index is what made it cheap: one candidate list of one entry
        let index = r.targets.get(&Target::Table(100)).unwrap();
        assert!(index.scan.is_empty());
        assert_eq!(index.by_value["recipient_id"].len(), 1000);
    }

    #[test]
    fn may_match_rules_out_only_what_no_binding_could_take() {
        let mut r: Registry<u8> = Registry::default();
        let number = Relation {
            columns: vec![Column {
                name: "n".into(),
                typname: "int4".into(),
                type_oid: 23,
            }],
            ..relation()
        };
        let value = |text: &'static str| move |_: &str| Some(text);
        r.subscribe(
            key(1),
            Subscription {
                bindings: vec![Binding {
                    id: 1,
                    target: Target::Table(100),
                    events: EventFilter::Only(ChangeKind::Insert),
                    conditions: vec![eq("n", Kind::Number, json!(5))],
                }],
                sink: 1,
            },
        );
        assert!(r.may_match(&number, ChangeKind::Insert, value("5")));
        assert!(r.may_match(&number, ChangeKind::Insert, value("5.00")));
        assert!(!r.may_match(&number, ChangeKind::Insert, value("6")));
        assert!(!r.may_match(&number, ChangeKind::Insert, value("null")));
        // a value that cannot be read: it may match
        assert!(r.may_match(&number, ChangeKind::Insert, |_: &str| None));
        // another table: nothing
        let other = Relation {
            relid: 101,
            ..number.clone()
        };
        assert!(!r.may_match(&other, ChangeKind::Insert, value("5")));
        // a binding the index cannot serve (n > 100) takes every UPDATE
        r.subscribe(
            key(2),
            Subscription {
                bindings: vec![Binding {
                    id: 2,
                    target: Target::Table(100),
                    events: EventFilter::Only(ChangeKind::Update),
                    conditions: vec![Condition {
                        op: Op::Gt,
                        ..eq("n", Kind::Number, json!(100))
                    }],
                }],
                sink: 2,
            },
        );
        assert!(!r.may_match(&number, ChangeKind::Insert, value("6")));
        assert!(r.may_match(&number, ChangeKind::Update, value("6")));
        // whatever may_match rules out, matches finds nothing for
        for (kind, n) in [
            (ChangeKind::Insert, 6),
            (ChangeKind::Delete, 5),
            (ChangeKind::Insert, 5),
        ] {
            let text = n.to_string();
            let ruled_out = !r.may_match(&number, kind, |_: &str| Some(text.as_str()));
            let found = r.matches(&number, kind, &row(json!({ "n": n })));
            assert!(!ruled_out || found.is_empty(), "{kind:?} {n}");
        }
    }

    #[test]
    fn one_match_per_channel_listing_every_matching_id() {
        let mut r: Registry<u8> = Registry::default();
        let bindings = vec![
            Binding {
                id: 1,
                target: Target::Table(100),
                events: EventFilter::All,
                conditions: vec![],
            },
            Binding {
                id: 2,
                target: Target::Schema("public".into()),
                events: EventFilter::Only(ChangeKind::Insert),
                conditions: vec![],
            },
            Binding {
                id: 3,
                target: Target::All,
                events: EventFilter::Only(ChangeKind::Delete),
                conditions: vec![],
            },
        ];
        r.subscribe(key(1), Subscription { bindings, sink: 0 });
        let m = r.matches(&relation(), ChangeKind::Insert, &row(json!({})));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].ids, vec![1, 2]);
        let m = r.matches(&relation(), ChangeKind::Delete, &row(json!({})));
        assert_eq!(m[0].ids, vec![1, 3]);
        let other_schema = Relation {
            schema: "private".into(),
            relid: 5,
            ..relation()
        };
        assert_eq!(r.matches(&other_schema, ChangeKind::Update, &row(json!({}))).len(), 0);
    }

    #[test]
    fn unsubscribe_cleans_the_indexes() {
        let mut r: Registry<()> = Registry::default();
        let b = Binding {
            id: 1,
            target: Target::Table(100),
            events: EventFilter::All,
            conditions: vec![eq("recipient_id", Kind::Uuid, json!("a"))],
        };
        r.subscribe(
            key(1),
            Subscription {
                bindings: vec![b.clone()],
                sink: (),
            },
        );
        r.subscribe(
            key(2),
            Subscription {
                bindings: vec![b],
                sink: (),
            },
        );
        assert_eq!(r.interest().0, vec![100]);
        r.unsubscribe_connection(1);
        assert_eq!(r.len(), 1);
        assert!(r.unsubscribe(&key(2)).is_some());
        assert!(r.is_empty());
        assert!(r.targets.is_empty());
        assert_eq!(r.interest(), (vec![], vec![], false));
    }

    #[test]
    fn a_leave_takes_only_its_own_entries() {
        let mut r: Registry<()> = Registry::default();
        let on = |v: Option<&str>| Binding {
            id: 1,
            target: Target::Table(100),
            events: EventFilter::All,
            conditions: v
                .map(|v| eq("recipient_id", Kind::Uuid, json!(v)))
                .into_iter()
                .collect(),
        };
        for (c, v) in [(1, Some("a")), (2, Some("b")), (3, Some("a")), (4, None)] {
            let bindings = vec![on(v)];
            r.subscribe(key(c), Subscription { bindings, sink: () });
        }
        let heard = |r: &Registry<()>, v: &str| -> Vec<u64> {
            let m = r.matches(&relation(), ChangeKind::Insert, &row(json!({ "recipient_id": v })));
            m.iter().map(|m| m.channel.connection).collect()
        };
        r.unsubscribe(&key(1));
        assert_eq!(heard(&r, "a"), vec![3, 4]);
        assert_eq!(heard(&r, "b"), vec![2, 4]);
        r.unsubscribe(&key(3));
        assert_eq!(heard(&r, "a"), vec![4]);
        assert_eq!(
            r.targets[&Target::Table(100)].by_value["recipient_id"].len(),
            1,
            "a's list went"
        );
        r.unsubscribe(&key(2));
        assert!(r.targets[&Target::Table(100)].by_value.is_empty());
        assert_eq!(heard(&r, "b"), vec![4]);
        r.unsubscribe(&key(4));
        assert!(r.targets.is_empty());
    }

    #[test]
    fn filtered_columns_follow_subscriptions() {
        let mut r: Registry<()> = Registry::default();
        assert_eq!(
            r.filtered_columns(&relation()),
            None,
            "nobody listens: nothing to parse"
        );
        let on = |conditions| Binding {
            id: 1,
            target: Target::Table(100),
            events: EventFilter::All,
            conditions,
        };
        let gt = Condition {
            op: Op::Gt,
            ..eq("n", Kind::Number, json!(3))
        };
        r.subscribe(
            key(1),
            Subscription {
                bindings: vec![on(vec![])],
                sink: (),
            },
        );
        assert_eq!(r.filtered_columns(&relation()), Some(vec![]), "listened to, unfiltered");
        r.subscribe(
            key(2),
            Subscription {
                bindings: vec![on(vec![eq("recipient_id", Kind::Uuid, json!("a")), gt.clone()])],
                sink: (),
            },
        );
        r.subscribe(
            key(3),
            Subscription {
                bindings: vec![on(vec![gt])],
                sink: (),
            },
        );
        let mut columns = r.filtered_columns(&relation()).unwrap();
        columns.sort();
        assert_eq!(columns, vec!["n", "recipient_id"]);
        r.unsubscribe(&key(2));
        assert_eq!(
            r.filtered_columns(&relation()),
            Some(vec!["n".to_string()]),
            "n is still used by 3"
        );
        r.unsubscribe(&key(3));
        assert_eq!(r.filtered_columns(&relation()), Some(vec![]));
        let other = Relation {
            relid: 5,
            schema: "private".into(),
            ..relation()
        };
        assert_eq!(r.filtered_columns(&other), None);
    }

    /// A table's row filter names the keys its bindings want while every
    /// binding has its equality condition on one column; anything else
    /// sends every row on.
    #[test]
    fn row_filters_follow_the_equality_index() {
        let mut r: Registry<()> = Registry::default();
        assert_eq!(r.row_filter(100), RowFilter::Unbound);
        let sub = |conditions: Vec<Condition>| Subscription {
            bindings: vec![Binding {
                id: 1,
                target: Target::Table(100),
                events: EventFilter::Only(ChangeKind::Insert),
                conditions,
            }],
            sink: (),
        };
        let keys = |f: RowFilter| match f {
            RowFilter::Keys { column, kind, bloom } => Some((column.to_string(), kind, bloom)),
            _ => None,
        };
        let gt = Condition {
            op: Op::Gt,
            ..eq("n", Kind::Number, json!(3))
        };
        r.subscribe(key(1), sub(vec![eq("n", Kind::Number, json!(5))]));
        r.subscribe(key(2), sub(vec![gt.clone(), eq("n", Kind::Number, json!(6.0))]));
        assert_eq!(
            keys(r.row_filter(100)),
            Some(("n".into(), Kind::Number, Bloom::of(["5", "6"])))
        );
        // a binding with no equality condition: every row
        r.subscribe(key(3), sub(vec![gt]));
        assert_eq!(r.row_filter(100), RowFilter::Every);
        r.unsubscribe(&key(3));
        // equality on another column: every row (one column per table)
        r.subscribe(key(4), sub(vec![eq("title", Kind::Text, json!("x"))]));
        assert_eq!(r.row_filter(100), RowFilter::Every);
        r.unsubscribe(&key(4));
        assert!(keys(r.row_filter(100)).is_some());
        // joins still waiting are another registry: the union
        let mut waiting: Registry<()> = Registry::default();
        waiting.subscribe(key(5), sub(vec![eq("n", Kind::Number, json!(7))]));
        let both = r.row_filter(100).union(waiting.row_filter(100));
        assert_eq!(keys(both), Some(("n".into(), Kind::Number, Bloom::of(["5", "6", "7"]))));
        assert_eq!(r.row_filter(100).union(RowFilter::Every), RowFilter::Every);
        waiting.subscribe(key(5), sub(vec![eq("title", Kind::Text, json!("x"))]));
        assert_eq!(r.row_filter(100).union(waiting.row_filter(100)), RowFilter::Every);
        assert_eq!(RowFilter::Unbound.union(RowFilter::Unbound), RowFilter::Unbound);
        r.unsubscribe(&key(1));
        r.unsubscribe(&key(2));
        assert_eq!(r.row_filter(100), RowFilter::Unbound);
    }

    /// The Bloom filter kept as keys come and go is always the one built
    /// from the keys wanted now: never a key missing (a row lost), and no
    /// key left over after its last binding went.
    #[test]
    fn kept_row_filters_equal_filters_built_from_the_keys() {
        // A binding: its equality column (None: a range condition, matched
        // by scanning) and a value.
        type Wanted = Vec<(Option<&'static str>, u64)>;
        let binding = |(column, v): (Option<&str>, u64)| Binding {
            id: 1,
            target: Target::Table(100),
            events: EventFilter::Only(ChangeKind::Insert),
            conditions: vec![match column {
                Some(column) => eq(column, Kind::Number, json!(v)),
                None => Condition {
                    op: Op::Gt,
                    ..eq("n", Kind::Number, json!(v))
                },
            }],
        };
        let mut r: Registry<()> = Registry::default();
        let mut wanted: HashMap<u64, Wanted> = HashMap::new(); // channel -> bindings
        let mut one_column = 0;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for _ in 0..20_000 {
            let channel = next(200);
            if next(3) == 0 {
                r.unsubscribe(&key(channel));
                wanted.remove(&channel);
            } else {
                // 1-3 bindings, equality on n (values repeat, also within
                // one subscription); a few channels now and then on m or a
                // range, so the table goes from one column to several and
                // back; a join again on the same channel replaces its
                // bindings
                let odd = channel < 4;
                let bindings: Wanted = (0..1 + next(3))
                    .map(|_| match if odd { next(6) } else { 9 } {
                        0 => (Some("m"), next(5)),
                        1 => (None, next(5)),
                        _ => (Some("n"), next(50)),
                    })
                    .collect();
                let subscription = Subscription {
                    bindings: bindings.iter().copied().map(binding).collect(),
                    sink: (),
                };
                r.subscribe(key(channel), subscription);
                wanted.insert(channel, bindings);
            }
            let all: Vec<(Option<&str>, u64)> = wanted.values().flatten().copied().collect();
            let columns: HashSet<Option<&str>> = all.iter().map(|(c, _)| *c).collect();
            let expected = match columns.into_iter().collect::<Vec<_>>()[..] {
                [] => RowFilter::Unbound,
                [Some(column)] => {
                    one_column += 1;
                    let keys: Vec<String> = all.iter().map(|(_, v)| v.to_string()).collect();
                    RowFilter::Keys {
                        column,
                        kind: Kind::Number,
                        bloom: Bloom::of(keys.iter().map(String::as_str)),
                    }
                }
                _ => RowFilter::Every,
            };
            assert_eq!(r.row_filter(100), expected);
        }
        assert!(one_column > 2_000, "the kept filter checked often: {one_column}");
    }

    #[test]
    fn binding_ids_are_stable_non_zero_and_distinct() {
        let a = binding_id("*", Some("public"), Some("messages"), Some("recipient_id=eq.1"));
        assert_eq!(
            a,
            binding_id("*", Some("public"), Some("messages"), Some("recipient_id=eq.1"))
        );
        assert_ne!(
            a,
            binding_id("*", Some("public"), Some("messages"), Some("recipient_id=eq.2"))
        );
        assert_ne!(
            binding_id("*", Some("a"), None, None),
            binding_id("*", None, Some("a"), None)
        );
        for i in 0..10_000 {
            let id = binding_id("INSERT", Some("s"), Some(&i.to_string()), None);
            assert!(id > 0 && id < (1 << 27));
        }
    }
}
