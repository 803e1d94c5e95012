use super::*;
use crate::changes::registry::{Binding, EventFilter, Subscription, Target};
use crate::shared::wire::{Change, Column};
use serde_json::Value;

const NOTES: u32 = 10;
const OTHER: u32 = 11;

/// `public.notes (id int8, owner text, secret text)`.
fn notes(relid: u32) -> Arc<Relation> {
    let column = |name: &str, typname: &str, type_oid: u32| Column {
        name: name.into(),
        typname: typname.into(),
        type_oid,
    };
    Arc::new(Relation {
        relid,
        schema: "public".into(),
        table: if relid == NOTES { "notes".into() } else { "other".into() },
        columns: vec![
            column("id", "int8", 20),
            column("owner", "text", 25),
            column("secret", "text", 25),
        ],
        identity: vec![0],
        primary_key: vec![0],
    })
}

fn row(id: u32, owner: &str) -> String {
    format!(r#"{{"id":{id},"owner":"{owner}","secret":"s{id}"}}"#)
}

fn insert(id: u32, owner: &str) -> Change {
    Change {
        relation: 0,
        kind: ChangeKind::Insert,
        record: Some(row(id, owner)),
        old: None,
        filter_at: Vec::new(),
    }
}

fn txn(lsn: u64, relid: u32, changes: Vec<Change>) -> Transaction {
    Transaction {
        xid: lsn as u32,
        commit_lsn: lsn,
        commit_time_us: 1_700_000_000_000_000,
        relations: vec![notes(relid)],
        changes,
        broadcasts: Vec::new(),
        overflowed: false,
    }
}

struct Sink(Viewer);

impl Subscriber for Sink {
    fn viewer(&self) -> &Viewer {
        &self.0
    }
}

fn key(connection: u64) -> ChannelKey {
    ChannelKey {
        connection,
        topic: "realtime:notes".into(),
        join: 1,
    }
}

/// Subscribes channel `connection` to every change of `relid`, as `role`
/// with `sub`.
fn subscribe(registry: &mut Registry<Sink>, connection: u64, relid: u32, role: &str, sub: &str) {
    let binding = Binding {
        id: 5,
        target: Target::Table(relid),
        events: EventFilter::All,
        conditions: Vec::new(),
    };
    let viewer = Viewer {
        role: Arc::from(role),
        claims: Arc::from(format!(r#"{{"sub":"{sub}"}}"#)),
        sub: Some(sub.into()),
    };
    registry.subscribe(
        key(connection),
        Subscription {
            bindings: vec![binding],
            sink: Sink(viewer),
        },
    );
}

/// The catalog as the fake sees it, and a record of what was asked.
/// Row-level security lets a subscriber see the rows it owns.
#[derive(Default)]
struct FakeAccess {
    catalog: HashMap<RoleTable, Grants>,
    /// Pairs whose grants cannot be read (an error).
    unreadable: HashSet<RoleTable>,
    /// Roles whose checks fail (a policy raising an error).
    failing: HashSet<Arc<str>>,
    cache: HashMap<RoleTable, Option<Grants>>,
    reads: Vec<RoleTable>,
    /// Each check run: its key and the images it was given.
    checks: Vec<(CheckKey, Vec<String>)>,
}

impl FakeAccess {
    fn grant(&mut self, role: &str, relid: u32, columns: &[&str], rls: bool) {
        let all = ["id", "owner", "secret"];
        let grants = Grants {
            columns: all.iter().map(|c| (c.to_string(), columns.contains(c))).collect(),
            check: rls.then(|| "owner = sub".to_string()),
        };
        self.catalog.insert((Arc::from(role), relid), grants);
    }
}

impl Access for FakeAccess {
    fn is_stale(&self, role: &Arc<str>, relid: u32) -> bool {
        !self.cache.contains_key(&(role.clone(), relid))
    }

    fn read(&mut self, mut pairs: Vec<RoleTable>, _names: &HashMap<u32, (String, String)>) -> HashSet<RoleTable> {
        pairs.sort();
        let mut failed = HashSet::new();
        for pair in pairs {
            self.reads.push(pair.clone());
            if self.unreadable.contains(&pair) {
                failed.insert(pair);
            } else {
                let grants = self.catalog.get(&pair).cloned();
                self.cache.insert(pair, grants);
            }
        }
        failed
    }

    fn grants(&self, role: &Arc<str>, relid: u32) -> Option<&Grants> {
        self.cache.get(&(role.clone(), relid))?.as_ref()
    }

    fn check_rows<'a>(
        &mut self,
        groups: HashMap<CheckKey, CheckGroup>,
        image: impl Fn(usize) -> &'a str,
    ) -> HashMap<CheckKey, Option<HashSet<usize>>> {
        let mut out = HashMap::new();
        for (key, group) in groups {
            let images: Vec<String> = group.rows.iter().map(|&r| image(r).to_string()).collect();
            self.checks.push((key.clone(), images));
            if self.failing.contains(&key.role) {
                out.insert(key, None);
                continue;
            }
            let owner = format!(r#""owner":"{}""#, group.sub.unwrap_or_default());
            let seen = group.rows.into_iter().filter(|&r| image(r).contains(&owner)).collect();
            out.insert(key, Some(seen));
        }
        self.checks.sort_by(|a, b| a.0.claims.cmp(&b.0.claims));
        out
    }
}

/// Each send as (connection, the `id` of its record).
fn sent<S>(plan: &Plan<'_, S>) -> Vec<(u64, i64)> {
    plan.sends
        .iter()
        .map(|s| {
            let data: Value = serde_json::from_str(&plan.frames[s.frame]).unwrap();
            (s.channel.connection, data["record"]["id"].as_i64().unwrap())
        })
        .collect()
}

#[test]
fn each_identity_is_checked_once_and_sees_only_its_rows() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "authenticated", "alice");
    subscribe(&mut registry, 2, NOTES, "authenticated", "bob");
    subscribe(&mut registry, 3, NOTES, "authenticated", "alice");
    let mut access = FakeAccess::default();
    access.grant("authenticated", NOTES, &["id", "owner", "secret"], true);
    let batch = [
        txn(1, NOTES, vec![insert(1, "alice"), insert(2, "bob")]),
        txn(2, NOTES, vec![insert(3, "alice")]),
    ];
    let plan = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(sent(&plan), vec![(1, 1), (3, 1), (2, 2), (1, 3), (3, 3)]);
    // one check per identity over all its rows, not one per channel or row
    assert_eq!(access.checks.len(), 2);
    assert_eq!(access.checks[0].0.claims.as_ref(), r#"{"sub":"alice"}"#);
    assert_eq!(
        access.checks[0].1,
        vec![row(1, "alice"), row(2, "bob"), row(3, "alice")]
    );
    // alice's two channels share each frame: one per change
    assert_eq!(plan.frames.len(), 3);
    assert!(plan.unchecked.is_empty() && plan.lost.is_empty());
}

#[test]
fn a_frame_is_built_once_per_set_of_visible_columns() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "full", "a");
    subscribe(&mut registry, 2, NOTES, "limited", "b");
    subscribe(&mut registry, 3, NOTES, "full", "c");
    subscribe(&mut registry, 4, NOTES, "limited", "d");
    let mut access = FakeAccess::default();
    access.grant("full", NOTES, &["id", "owner", "secret"], false);
    access.grant("limited", NOTES, &["id", "owner"], false);
    let batch = [txn(1, NOTES, vec![insert(1, "x")])];
    let plan = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(sent(&plan), vec![(1, 1), (2, 1), (3, 1), (4, 1)]);
    assert_eq!(plan.frames.len(), 2);
    let frame_of = |connection: u64| {
        let send = plan.sends.iter().find(|s| s.channel.connection == connection).unwrap();
        serde_json::from_str::<Value>(&plan.frames[send.frame]).unwrap()
    };
    assert_eq!(frame_of(1)["record"]["secret"], "s1");
    assert_eq!(frame_of(2)["record"].get("secret"), None);
    assert_eq!(frame_of(2)["record"]["owner"], "x");
    // no row-level security: nothing checked
    assert!(access.checks.is_empty());
}

#[test]
fn what_could_not_be_checked_is_told_and_what_is_not_granted_is_not() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "broken", "a");
    subscribe(&mut registry, 2, NOTES, "gone", "b");
    subscribe(&mut registry, 3, NOTES, "nobody", "c");
    subscribe(&mut registry, 4, NOTES, "reader", "d");
    subscribe(&mut registry, 5, NOTES, "broken", "e");
    let mut access = FakeAccess::default();
    access.grant("broken", NOTES, &["id"], true);
    access.grant("reader", NOTES, &["id", "owner", "secret"], false);
    access.unreadable.insert((Arc::from("gone"), NOTES));
    access.failing.insert(Arc::from("broken"));
    let batch = [txn(1, NOTES, vec![insert(1, "a"), insert(2, "b")])];
    let plan = plan(&registry, &mut access, &batch, 1 << 20);
    // the reader gets both rows: the batch was delivered, not dropped
    assert_eq!(sent(&plan), vec![(4, 1), (4, 2)]);
    let unchecked: Vec<u64> = plan.unchecked.iter().map(|k| k.connection).collect();
    // each once, although two rows failed for each
    assert_eq!(unchecked, vec![1, 2, 5]);
}

#[test]
fn a_transaction_too_large_to_keep_is_lost_aloud_and_the_next_one_delivered() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "reader", "a");
    let mut access = FakeAccess::default();
    access.grant("reader", NOTES, &["id", "owner", "secret"], false);
    let mut overflowed = txn(1, NOTES, Vec::new());
    overflowed.overflowed = true;
    let batch = [overflowed, txn(2, NOTES, vec![insert(9, "a")])];
    let plan = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(plan.lost, vec![vec![NOTES]]);
    assert_eq!(sent(&plan), vec![(1, 9)]);
}

#[test]
fn privileges_are_read_only_where_something_matched_and_only_when_stale() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "reader", "a");
    subscribe(&mut registry, 2, OTHER, "other", "b");
    let mut access = FakeAccess::default();
    access.grant("reader", NOTES, &["id", "owner", "secret"], false);
    access.grant("other", OTHER, &["id", "owner", "secret"], false);
    let batch = [txn(1, NOTES, vec![insert(1, "a")])];
    let first = sent(&plan(&registry, &mut access, &batch, 1 << 20));
    let second = sent(&plan(&registry, &mut access, &batch, 1 << 20));
    assert_eq!(first, vec![(1, 1)]);
    assert_eq!(second, first);
    // OTHER had no change: never read; NOTES read once, then cached
    assert_eq!(access.reads, vec![(Arc::from("reader"), NOTES)]);
}

#[test]
fn a_delete_is_checked_against_the_row_it_removed() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "authenticated", "alice");
    let mut access = FakeAccess::default();
    access.grant("authenticated", NOTES, &["id", "owner", "secret"], true);
    let delete = Change {
        relation: 0,
        kind: ChangeKind::Delete,
        record: None,
        old: Some(row(4, "alice")),
        filter_at: Vec::new(),
    };
    let batch = [txn(1, NOTES, vec![delete])];
    let plan = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(access.checks[0].1, vec![row(4, "alice")]);
    assert_eq!(plan.sends.len(), 1);
    let data: Value = serde_json::from_str(&plan.frames[0]).unwrap();
    assert_eq!(data["type"], "DELETE");
    assert_eq!(data["old_record"]["id"], 4);
}

/// An UPDATE of `id` from `from`'s row to `to`'s, on a table with
/// `REPLICA IDENTITY FULL` when `full`.
fn handover(id: u32, from: &str, to: &str, full: bool) -> Transaction {
    let update = Change {
        relation: 0,
        kind: ChangeKind::Update,
        record: Some(row(id, to)),
        old: Some(row(id, from)),
        filter_at: Vec::new(),
    };
    let mut t = txn(1, NOTES, vec![update]);
    if full {
        let mut relation = (*t.relations[0]).clone();
        relation.identity = vec![0, 1, 2];
        t.relations[0] = Arc::new(relation);
    }
    t
}

#[test]
fn an_old_row_the_subscriber_may_not_see_shows_only_its_key() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "authenticated", "alice");
    subscribe(&mut registry, 2, NOTES, "authenticated", "bob");
    let mut access = FakeAccess::default();
    access.grant("authenticated", NOTES, &["id", "owner", "secret"], true);
    let old_record = |plan: &Plan<'_, Sink>, send: usize| {
        serde_json::from_str::<Value>(&plan.frames[plan.sends[send].frame]).unwrap()["old_record"].clone()
    };
    // bob's row becomes alice's: alice sees it now, but not what it was;
    // bob no longer sees it at all
    let batch = [handover(7, "bob", "alice", true)];
    let planned = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(sent(&planned), vec![(1, 7)]);
    assert_eq!(old_record(&planned, 0), serde_json::json!({"id": 7}));
    // both images were checked, in one query per identity
    assert_eq!(access.checks.len(), 2);
    assert_eq!(access.checks[0].1, vec![row(7, "bob"), row(7, "alice")]);
    // a row alice saw before and after keeps its whole old image
    let batch = [handover(8, "alice", "alice", true)];
    let planned = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(old_record(&planned, 0)["secret"], "s8");
    assert_eq!(old_record(&planned, 0)["owner"], "alice");
    // without FULL the old image is the key anyway: only the new row is
    // checked
    access.checks.clear();
    let batch = [handover(9, "bob", "alice", false)];
    let planned = plan(&registry, &mut access, &batch, 1 << 20);
    assert_eq!(old_record(&planned, 0), serde_json::json!({"id": 9}));
    assert_eq!(access.checks[0].1, vec![row(9, "alice")]);
}

#[test]
fn a_truncate_tells_every_reader_of_its_table_in_commit_order() {
    let mut registry = Registry::default();
    subscribe(&mut registry, 1, NOTES, "authenticated", "alice");
    subscribe(&mut registry, 2, OTHER, "authenticated", "alice");
    // an INSERT-only binding with a row filter is told too: its rows are gone
    let binding = Binding {
        id: 6,
        target: Target::Table(NOTES),
        events: EventFilter::Only(ChangeKind::Insert),
        conditions: Vec::new(),
    };
    let viewer = Viewer {
        role: Arc::from("authenticated"),
        claims: Arc::from(r#"{"sub":"bob"}"#),
        sub: Some("bob".into()),
    };
    registry.subscribe(
        key(3),
        Subscription {
            bindings: vec![binding],
            sink: Sink(viewer),
        },
    );
    // a role that may not read the table is not told its name
    subscribe(&mut registry, 4, NOTES, "nobody", "carol");
    let mut access = FakeAccess::default();
    access.grant("authenticated", NOTES, &["id", "owner", "secret"], true);
    let truncate = Change {
        relation: 0,
        kind: ChangeKind::Truncate,
        record: None,
        old: None,
        filter_at: Vec::new(),
    };
    let batch = [
        txn(1, NOTES, vec![insert(1, "alice")]),
        txn(2, NOTES, vec![truncate, insert(2, "alice")]),
    ];
    let plan = plan(&registry, &mut access, &batch, 1 << 20);
    let order: Vec<(u64, SendKind)> = plan.sends.iter().map(|s| (s.channel.connection, s.kind)).collect();
    assert_eq!(
        order,
        [
            (1, SendKind::Event),
            (1, SendKind::Notice),
            (3, SendKind::Notice),
            (1, SendKind::Event)
        ]
    );
    let notice = &plan.frames[plan.sends[1].frame];
    assert_eq!(
        notice.as_ref(),
        "Table public.notes was truncated: its rows are gone, refetch to catch up"
    );
    // one message for both channels, and no row checked for it
    assert_eq!(plan.sends[1].frame, plan.sends[2].frame);
    assert!(access
        .checks
        .iter()
        .all(|(_, images)| !images.contains(&"{}".to_string())));
}

#[test]
fn grants_show_the_columns_a_role_may_select() {
    let relation = notes(NOTES);
    let grants = |columns: &[(&str, bool)]| Grants {
        columns: columns.iter().map(|(c, ok)| (c.to_string(), *ok)).collect(),
        check: None,
    };
    let all = grants(&[("id", true), ("owner", true), ("secret", true)]);
    assert_eq!(all.visible(&relation), Some(Visible::All));
    let some = grants(&[("id", true), ("owner", false), ("secret", true)]);
    assert_eq!(some.visible(&relation), Some(Visible::Only(vec![true, false, true])));
    // a column added since the grants were read is not shown
    let stale = grants(&[("id", true), ("owner", true)]);
    assert_eq!(stale.visible(&relation), Some(Visible::Only(vec![true, true, false])));
    let none = grants(&[("id", false), ("owner", false), ("secret", false)]);
    assert_eq!(none.visible(&relation), None);
}
