//! What a batch of committed transactions sends, decided without Postgres
//! (`docs/architecture.md`, "Life of a row"): each change is matched
//! against the subscriptions, each match grouped by who its channel acts
//! as, each identity's rows checked against its privileges and row-level
//! security once per table, and each event's `data` built once per set of
//! visible columns. The worker supplies the checks (through SPI, as the
//! subscriber) by implementing [`Access`], and sends what [`plan`] returns.

use super::event::{self, OldImage, Visible};
use super::registry::{ChannelKey, Registry};
use super::row::{FilterColumns, Parsed};
use crate::shared::wire::{ChangeKind, Relation, Transaction};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// Who a channel's subscription acts as: its role, the token's claims as
/// JSON (`request.jwt.claims`) and `sub`. Shared, so that keying look-ups
/// on them allocates nothing.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub role: Arc<str>,
    pub claims: Arc<str>,
    pub sub: Option<String>,
}

/// A subscription's sink, as far as delivery must know it.
pub trait Subscriber {
    fn viewer(&self) -> &Viewer;
}

/// One identity's row-level security check on one table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckKey {
    pub role: Arc<str>,
    pub claims: Arc<str>,
    pub relid: u32,
}

/// The rows (indices into the batch's matched rows) one check covers, and
/// its identity's `sub` claim.
#[derive(Debug)]
pub struct CheckGroup {
    pub sub: Option<String>,
    pub rows: BTreeSet<usize>,
}

/// A role and a table, as privileges are cached.
pub type RoleTable = (Arc<str>, u32);

/// What a role may read of a table, as last read from the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Grants {
    /// Each column and whether the role may SELECT it.
    pub columns: Vec<(String, bool)>,
    /// With row-level security applying to the role: the check query.
    pub check: Option<String>,
}

impl Grants {
    /// The columns of `relation` the role may see (None: none). A column
    /// the grants do not know (added since they were read) is not shown.
    pub fn visible(&self, relation: &Relation) -> Option<Visible> {
        let may_read = |name: &str| self.columns.iter().any(|(n, ok)| *ok && n == name);
        if relation.columns.iter().all(|c| may_read(&c.name)) {
            return Some(Visible::All);
        }
        if !self.columns.iter().any(|(_, ok)| *ok) {
            return None;
        }
        Some(Visible::Only(
            relation.columns.iter().map(|c| may_read(&c.name)).collect(),
        ))
    }

    /// Whether each row needs a row-level security check.
    pub fn checks_rows(&self) -> bool {
        self.check.is_some()
    }
}

/// Privileges and row-level security, as the worker reads and runs them.
pub trait Access {
    /// Takes note of the catalog changes committed so far (a table
    /// altered, a grant, a policy): pairs they touch become stale. Called
    /// before each batch's first `is_stale`.
    fn catch_up(&mut self) {}
    /// Whether the pair must be read (again) before it is used.
    fn is_stale(&self, role: &Arc<str>, relid: u32) -> bool;
    /// Reads each pair's grants; `names` gives each table's schema and
    /// name. Returns the pairs that could not be read.
    fn read(&mut self, pairs: Vec<RoleTable>, names: &HashMap<u32, (String, String)>) -> HashSet<RoleTable>;
    /// What the role may read of the table, if known (None: nothing, or
    /// not read).
    fn grants(&self, role: &Arc<str>, relid: u32) -> Option<&Grants>;
    /// Runs each group's check as its identity; returns the rows each may
    /// see, or None when its check failed. `image` gives a row's image as
    /// of the commit.
    fn check_rows<'a>(
        &mut self,
        groups: HashMap<CheckKey, CheckGroup>,
        image: impl Fn(usize) -> &'a str,
    ) -> HashMap<CheckKey, Option<HashSet<usize>>>;
}

/// One event for one channel: its binding ids and its `data`
/// (an index into [`Plan::frames`]); or a notice whose message is there.
#[derive(Debug)]
pub struct Send<'r, S> {
    pub channel: &'r ChannelKey,
    pub sink: &'r S,
    pub ids: Vec<u32>,
    pub frame: usize,
    /// The matched row it stands for: a row's sends come one after
    /// another.
    pub row: usize,
    pub kind: SendKind,
}

/// What a [`Send`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    /// A `postgres_changes` event; the frame is its `data`.
    Event,
    /// A `system` error telling the channel to refetch (a TRUNCATE); the
    /// frame is its message.
    Notice,
}

/// The notice a TRUNCATE sends every channel subscribed to the table.
pub fn truncated_message(relation: &Relation) -> String {
    format!(
        "Table {}.{} was truncated: its rows are gone, refetch to catch up",
        relation.schema, relation.table
    )
}

/// What a batch sends, in order: the loss notices (one per transaction
/// too large to keep, with the tables it touched), then the events and
/// TRUNCATE notices in commit order, then a notice to each channel some
/// change could not be checked for.
#[derive(Debug)]
pub struct Plan<'r, S> {
    pub lost: Vec<Vec<u32>>,
    /// Each event's `data`, shared by every channel it goes to.
    pub frames: Vec<Arc<str>>,
    pub sends: Vec<Send<'r, S>>,
    /// Sorted, each once.
    pub unchecked: Vec<&'r ChannelKey>,
}

impl<'r, S> Plan<'r, S> {
    /// Sends `frame` to the channel `p` waits for.
    fn push(&mut self, p: Pending<'r, S>, frame: usize, kind: SendKind) {
        self.sends.push(Send {
            channel: p.channel,
            sink: p.sink,
            ids: p.ids,
            frame,
            row: p.row,
            kind,
        });
    }
}

/// A change that matched at least one subscription in this batch, or
/// the old image of one, which is checked as a row of its own.
struct MatchedRow {
    txn: usize,
    change: usize,
    /// Whether this stands for the change's old row (of an UPDATE).
    before: bool,
    /// For an UPDATE whose `old_record` shows more than the primary key
    /// (`REPLICA IDENTITY FULL`): the row standing for its old image, which
    /// a subscriber's row-level security must let through too.
    old: Option<usize>,
}

/// A match waiting for its checks: a channel and the row it wants.
struct Pending<'r, S> {
    channel: &'r ChannelKey,
    sink: &'r S,
    ids: Vec<u32>,
    row: usize,
}

/// The rows of a batch that matched, and who wants each.
struct Matched<'t, 'r, S> {
    transactions: &'t [Transaction],
    rows: Vec<MatchedRow>,
    pending: Vec<Pending<'r, S>>,
}

impl<'t, S> Matched<'t, '_, S> {
    fn relation(&self, row: usize) -> &'t Relation {
        let r = &self.rows[row];
        let txn = &self.transactions[r.txn];
        &txn.relations[txn.changes[r.change].relation as usize]
    }

    /// Whether the row stands for a TRUNCATE (no row to check: its
    /// subscribers are told).
    fn is_truncate(&self, row: usize) -> bool {
        let r = &self.rows[row];
        self.transactions[r.txn].changes[r.change].kind == ChangeKind::Truncate
    }

    /// The row checked: as of the commit (the old one for DELETE), or
    /// the old one an UPDATE replaced.
    fn image(&self, row: usize) -> &'t str {
        let r = &self.rows[row];
        let change = &self.transactions[r.txn].changes[r.change];
        let image = match change.kind {
            ChangeKind::Delete => change.old.as_deref(),
            _ if r.before => change.old.as_deref(),
            _ => change.record.as_deref(),
        };
        image.unwrap_or("{}")
    }

    /// Adds the change as a matched row (and its old image, if that must
    /// be checked too); returns the row.
    fn push_row(&mut self, txn: usize, change: usize) -> usize {
        let t = &self.transactions[txn];
        let c = &t.changes[change];
        let relation = &t.relations[c.relation as usize];
        let shows_more_than_key = relation.identity.iter().any(|i| !relation.primary_key.contains(i));
        let old = (c.kind == ChangeKind::Update && c.old.is_some() && shows_more_than_key).then(|| {
            self.rows.push(MatchedRow {
                txn,
                change,
                before: true,
                old: None,
            });
            self.rows.len() - 1
        });
        self.rows.push(MatchedRow {
            txn,
            change,
            before: false,
            old,
        });
        self.rows.len() - 1
    }
}

/// Decides what `transactions` (in commit order) send to the channels of
/// `registry`; `max_record_bytes` bounds a record in an event.
pub fn plan<'r, S: Subscriber>(
    registry: &'r Registry<S>,
    access: &mut impl Access,
    transactions: &[Transaction],
    max_record_bytes: usize,
) -> Plan<'r, S> {
    let mut lost = Vec::new();
    let matched = match_changes(registry, transactions, &mut lost);
    let mut plan = Plan {
        lost,
        frames: Vec::new(),
        sends: Vec::new(),
        unchecked: Vec::new(),
    };
    if matched.pending.is_empty() {
        return plan;
    }
    access.catch_up();
    let unreadable = read_stale(access, &matched);
    let visible = check_rows(access, &matched);
    build_sends(&mut plan, access, matched, &unreadable, &visible, max_record_bytes);
    plan.unchecked.sort();
    plan.unchecked.dedup();
    plan
}

/// Matches every change against the subscriptions; notes in `lost` the
/// tables of each transaction too large to have been kept.
fn match_changes<'t, 'r, S>(
    registry: &'r Registry<S>,
    transactions: &'t [Transaction],
    lost: &mut Vec<Vec<u32>>,
) -> Matched<'t, 'r, S> {
    let mut matched = Matched {
        transactions,
        rows: Vec::new(),
        pending: Vec::new(),
    };
    // The columns each relation's subscriptions filter on (None: no
    // subscription covers it): rows are parsed that far and no further.
    // (A batch touches few relations: a vector beats a map.)
    let mut filtered: Vec<(u32, Option<FilterColumns>)> = Vec::new();
    for (t, txn) in transactions.iter().enumerate() {
        if txn.overflowed {
            lost.push(txn.relations.iter().map(|r| r.relid).collect());
            continue;
        }
        for (c, change) in txn.changes.iter().enumerate() {
            let relation = &txn.relations[change.relation as usize];
            if change.kind == ChangeKind::Truncate {
                let row = matched.push_row(t, c);
                for (channel, sink) in registry.subscribed_to(relation) {
                    matched.pending.push(Pending {
                        channel,
                        sink,
                        ids: Vec::new(),
                        row,
                    });
                }
                continue;
            }
            let at = match filtered.iter().position(|(relid, _)| *relid == relation.relid) {
                Some(at) => at,
                None => {
                    let columns = registry
                        .filtered_columns(relation)
                        .map(|names| FilterColumns::new(names, relation));
                    filtered.push((relation.relid, columns));
                    filtered.len() - 1
                }
            };
            let Some(columns) = &filtered[at].1 else { continue };
            // Most changes match nobody: ruled out on the raw values
            // first, without parsing them.
            if let Some(value) = columns.raw_values(change) {
                if !registry.may_match(relation, change.kind, value) {
                    continue;
                }
            }
            let parsed = Parsed::with_columns(change, columns);
            let matches = registry.matches(relation, change.kind, &parsed);
            if matches.is_empty() {
                continue;
            }
            let row = matched.push_row(t, c);
            for m in matches {
                matched.pending.push(Pending {
                    channel: m.channel,
                    sink: m.sink,
                    ids: m.ids,
                    row,
                });
            }
        }
    }
    matched
}

/// Reads what each (role, table) pair something matched may read, where
/// the cache has it stale; returns the pairs that could not be read.
fn read_stale<S: Subscriber>(access: &mut impl Access, matched: &Matched<'_, '_, S>) -> HashSet<RoleTable> {
    let stale: HashSet<RoleTable> = matched
        .pending
        .iter()
        .filter_map(|p| {
            let role = &p.sink.viewer().role;
            let relid = matched.relation(p.row).relid;
            access.is_stale(role, relid).then(|| (role.clone(), relid))
        })
        .collect();
    if stale.is_empty() {
        return HashSet::new();
    }
    let names: HashMap<u32, (String, String)> = matched
        .transactions
        .iter()
        .flat_map(|t| t.relations.iter())
        .map(|r| (r.relid, (r.schema.clone(), r.table.clone())))
        .collect();
    access.read(stale.into_iter().collect(), &names)
}

/// Row-level security: one check per (identity, table), over all of its
/// rows in this batch.
fn check_rows<S: Subscriber>(
    access: &mut impl Access,
    matched: &Matched<'_, '_, S>,
) -> HashMap<CheckKey, Option<HashSet<usize>>> {
    let mut groups: HashMap<CheckKey, CheckGroup> = HashMap::new();
    for p in matched.pending.iter().filter(|p| !matched.is_truncate(p.row)) {
        let viewer = p.sink.viewer();
        let relid = matched.relation(p.row).relid;
        if access.grants(&viewer.role, relid).is_some_and(Grants::checks_rows) {
            let key = CheckKey {
                role: viewer.role.clone(),
                claims: viewer.claims.clone(),
                relid,
            };
            groups
                .entry(key)
                .or_insert_with(|| CheckGroup {
                    sub: viewer.sub.clone(),
                    rows: BTreeSet::new(),
                })
                .rows
                .extend(std::iter::once(p.row).chain(matched.rows[p.row].old));
        }
    }
    if groups.is_empty() {
        return HashMap::new();
    }
    access.check_rows(groups, |row| matched.image(row))
}

/// Turns each match its checks let through into an event, building each
/// change's `data` once per set of visible columns; notes the channels
/// some change could not be checked for.
fn build_sends<'r, S: Subscriber>(
    plan: &mut Plan<'r, S>,
    access: &impl Access,
    mut matched: Matched<'_, 'r, S>,
    unreadable: &HashSet<RoleTable>,
    visible: &HashMap<CheckKey, Option<HashSet<usize>>>,
    max_record_bytes: usize,
) {
    let mut frames: HashMap<(usize, Visible, OldImage), usize> = HashMap::new();
    let mut notices: HashMap<usize, usize> = HashMap::new();
    for p in std::mem::take(&mut matched.pending) {
        let viewer = p.sink.viewer();
        let relation = matched.relation(p.row);
        let Some(grants) = access.grants(&viewer.role, relation.relid) else {
            if unreadable.contains(&(viewer.role.clone(), relation.relid)) {
                plan.unchecked.push(p.channel);
            }
            continue;
        };
        if matched.is_truncate(p.row) {
            // (named only to a role that may still read the table: a
            // schema-wide binding covers tables it may not)
            if grants.visible(relation).is_none() {
                continue;
            }
            let frame = *notices.entry(p.row).or_insert_with(|| {
                plan.frames.push(Arc::from(truncated_message(relation)));
                plan.frames.len() - 1
            });
            plan.push(p, frame, SendKind::Notice);
            continue;
        }
        let mut old = OldImage::Identity;
        if grants.checks_rows() {
            let key = CheckKey {
                role: viewer.role.clone(),
                claims: viewer.claims.clone(),
                relid: relation.relid,
            };
            match visible.get(&key) {
                Some(Some(seen)) if seen.contains(&p.row) => {
                    // a row that became visible: its old values stay hidden
                    if matched.rows[p.row].old.is_some_and(|o| !seen.contains(&o)) {
                        old = OldImage::PrimaryKey;
                    }
                }
                Some(None) => {
                    plan.unchecked.push(p.channel);
                    continue;
                }
                _ => continue,
            }
        }
        let Some(columns) = grants.visible(relation) else {
            continue;
        };
        let frame = *frames
            .entry((p.row, columns, old))
            .or_insert_with_key(|(row, columns, old)| {
                let r = &matched.rows[*row];
                let txn = &matched.transactions[r.txn];
                let data = event::data(
                    &txn.changes[r.change],
                    relation,
                    txn.commit_time_us,
                    max_record_bytes,
                    columns,
                    *old,
                );
                plan.frames.push(Arc::from(data));
                plan.frames.len() - 1
            });
        plan.push(p, frame, SendKind::Event);
    }
}

#[cfg(test)]
mod tests;
