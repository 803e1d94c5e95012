//! How a committed transaction travels through the change ring: one record
//! per transaction, so its changes stay together, in statement order. Each
//! relation a transaction touched is described once (names, column names and
//! types, replica identity), so the worker needs no catalog lookup to encode
//! an event, even if the table was altered or dropped since.

use std::collections::HashMap;
use std::sync::Arc;
use thiserror::Error;

mod broadcast;
pub use broadcast::{put_broadcast, topic_loss_id, DbBroadcast, DbPayload};

/// Kinds of row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    /// The relation was truncated: no rows (its subscribers are told to
    /// refetch).
    Truncate,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
            ChangeKind::Truncate => "TRUNCATE",
        }
    }
}

/// A column as events list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// `pg_type.typname` (`int4`, `_text`, ...), for clients.
    pub typname: String,
    /// The type's OID, for everything that depends on the type
    /// (`keys::Kind::of_type_oid`).
    pub type_oid: u32,
}

/// A relation touched by the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub relid: u32,
    pub schema: String,
    pub table: String,
    pub columns: Vec<Column>,
    /// Positions (in `columns`) of the replica identity: the primary key by
    /// default; every column with `REPLICA IDENTITY FULL`.
    pub identity: Vec<u16>,
    /// Positions of the primary key, if there is one.
    pub primary_key: Vec<u16>,
}

/// One row change. Records are JSON objects as text (typed values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Index into [`Transaction::relations`].
    pub relation: u16,
    pub kind: ChangeKind,
    /// The new row (INSERT, UPDATE).
    pub record: Option<String>,
    /// The whole old row (UPDATE, DELETE); the worker trims it to the
    /// replica identity for `old_record`, but filters and checks use all of it.
    pub old: Option<String>,
    /// Where each column's value starts in the row filters look at (the new
    /// row, or the old row for DELETE), in the relation's column order:
    /// matching reads the values it needs without scanning the row. Empty
    /// when the writer could not tell.
    pub filter_at: Vec<u32>,
}

/// A committed transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transaction {
    pub xid: u32,
    /// Commit LSN: the worker delivers in this order.
    pub commit_lsn: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// Shared: the worker keeps decoded descriptions (see [`RelationCache`]).
    pub relations: Vec<Arc<Relation>>,
    pub changes: Vec<Change>,
    /// Broadcasts sent from SQL, in the order they were sent.
    pub broadcasts: Vec<DbBroadcast>,
    /// The transaction's changes could not all be kept (larger than the
    /// per-transaction limit): `changes` is empty, `relations` lists what it
    /// touched, so their subscribers can be told to refetch.
    pub overflowed: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed transaction record at byte {0}")]
pub struct WireError(usize);

impl Transaction {
    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            xid: self.xid,
            commit_lsn: self.commit_lsn,
            commit_time_us: self.commit_time_us,
            overflowed: self.overflowed,
        };
        let relations: Vec<Vec<u8>> = self.relations.iter().map(|r| r.encode()).collect();
        let mut changes = Vec::new();
        for change in &self.changes {
            change.encode_into(&mut changes);
        }
        for broadcast in &self.broadcasts {
            broadcast.encode_into(&mut changes);
        }
        let mut out = Vec::new();
        let count = self.changes.len() + self.broadcasts.len();
        encode_record(&mut out, &header, &relations, count, &changes);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Transaction, WireError> {
        Self::decode_cached(bytes, &mut RelationCache::default())
    }

    /// Decodes, reusing the descriptions in `cache` whose bytes are
    /// unchanged (most transactions touch tables seen before: their
    /// descriptions then cost a comparison, not a dozen allocations).
    pub fn decode_cached(bytes: &[u8], cache: &mut RelationCache) -> Result<Transaction, WireError> {
        let mut r = Reader { bytes, pos: 0 };
        let overflowed = r.u8()? != 0;
        let xid = r.u32()?;
        let commit_lsn = r.u64()?;
        let commit_time_us = r.u64()? as i64;
        let mut relations = Vec::new();
        for _ in 0..r.u32()? {
            let start = r.pos;
            r.skip_relation()?;
            let raw = &bytes[start..r.pos];
            let relid = u32::from_le_bytes(raw[..4].try_into().unwrap());
            match cache.0.get(&relid) {
                Some((known, relation)) if known.as_slice() == raw => relations.push(relation.clone()),
                _ => {
                    let relation = Arc::new(Reader { bytes: raw, pos: 0 }.relation()?);
                    cache.0.insert(relid, (raw.to_vec(), relation.clone()));
                    relations.push(relation);
                }
            }
        }
        let count = r.u32()?;
        // Sized up front, but never beyond what the bytes left could hold
        // (11 bytes per change at least), whatever a damaged count says.
        let mut changes = Vec::with_capacity((count as usize).min((bytes.len() - r.pos) / 11));
        let mut broadcasts = Vec::new();
        for _ in 0..count {
            let relation = r.u16()?;
            let kind = r.u8()?;
            if relation == broadcast::NO_RELATION && kind == broadcast::KIND {
                broadcasts.push(broadcast::read(&mut r)?);
                continue;
            }
            if relation as usize >= relations.len() {
                return Err(WireError(r.pos));
            }
            let kind = match kind {
                0 => ChangeKind::Insert,
                1 => ChangeKind::Update,
                2 => ChangeKind::Delete,
                3 => ChangeKind::Truncate,
                _ => return Err(WireError(r.pos)),
            };
            let record = r.opt_string()?;
            let record_at = if record.is_some() { r.offsets()? } else { Vec::new() };
            let old = r.opt_string()?;
            let old_at = if old.is_some() { r.offsets()? } else { Vec::new() };
            changes.push(Change {
                relation,
                kind,
                record,
                old,
                filter_at: if kind == ChangeKind::Delete { old_at } else { record_at },
            });
        }
        Ok(Transaction {
            xid,
            commit_lsn,
            commit_time_us,
            relations,
            changes,
            broadcasts,
            overflowed,
        })
    }
}

/// The commit LSN of the record whose first bytes are `head` (at least
/// 13: overflow flag, xid, LSN), as [`encode_record`] writes it.
pub fn peek_commit_lsn(head: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(head.get(5..13)?.try_into().ok()?))
}

/// A transaction record's fixed fields, for [`encode_record`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    pub xid: u32,
    pub commit_lsn: u64,
    pub commit_time_us: i64,
    pub overflowed: bool,
}

/// Writes a transaction record into `out` (cleared first) from its parts,
/// as a committing backend keeps them: relation descriptions encoded once
/// ([`Relation::encode`]) and `count` changes already encoded back to back
/// in `changes` ([`Change::encode_into`], or [`begin_change`] with
/// [`put_row`] / [`put_no_row`]). [`Transaction::decode`] reads it.
pub fn encode_record<R: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    header: &Header,
    relations: &[R],
    count: usize,
    changes: &[u8],
) {
    out.clear();
    let rel_bytes: usize = relations.iter().map(|r| r.as_ref().len()).sum();
    out.reserve(29 + rel_bytes + 4 + changes.len());
    out.push(u8::from(header.overflowed));
    out.extend_from_slice(&header.xid.to_le_bytes());
    out.extend_from_slice(&header.commit_lsn.to_le_bytes());
    out.extend_from_slice(&header.commit_time_us.to_le_bytes());
    out.extend_from_slice(&(relations.len() as u32).to_le_bytes());
    for rel in relations {
        out.extend_from_slice(rel.as_ref());
    }
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(changes);
}

/// Starts a change in `out`: its relation (index into the record's
/// relations) and kind. Its new row and its old row follow, each written
/// with [`put_row`] or [`put_no_row`].
pub fn begin_change(out: &mut Vec<u8>, relation: u16, kind: ChangeKind) {
    out.extend_from_slice(&relation.to_le_bytes());
    out.push(match kind {
        ChangeKind::Insert => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
        ChangeKind::Truncate => 3,
    });
}

/// The relation (index into the record's relations) of the change
/// encoded at the start of `change` (by [`begin_change`]), if it is a
/// TRUNCATE.
pub fn truncated_relation(change: &[u8]) -> Option<u16> {
    match change {
        [lo, hi, 3, ..] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    }
}

/// Writes a row, as `write` appends its JSON text to `out`, behind its
/// length.
pub fn put_row(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    write(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Writes where each column's value starts in the row just written with
/// [`put_row`] (byte offsets into its JSON text, in the relation's column
/// order; none when unknown).
pub fn put_offsets(out: &mut Vec<u8>, offsets: impl ExactSizeIterator<Item = u32>) {
    out.extend_from_slice(&(offsets.len() as u16).to_le_bytes());
    for offset in offsets {
        out.extend_from_slice(&offset.to_le_bytes());
    }
}

/// Writes "no row" (the old row of an INSERT, the new row of a DELETE).
pub fn put_no_row(out: &mut Vec<u8>) {
    out.extend_from_slice(&u32::MAX.to_le_bytes());
}

impl Relation {
    /// The columns that identify a row to a client: the primary key, else
    /// the replica identity.
    pub fn key_columns(&self) -> impl Iterator<Item = usize> + '_ {
        let key = if self.primary_key.is_empty() {
            &self.identity
        } else {
            &self.primary_key
        };
        key.iter().map(|i| *i as usize)
    }

    /// The description as records carry it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.relid.to_le_bytes());
        put_str(&mut out, &self.schema);
        put_str(&mut out, &self.table);
        out.extend_from_slice(&(self.columns.len() as u32).to_le_bytes());
        for col in &self.columns {
            put_str(&mut out, &col.name);
            put_str(&mut out, &col.typname);
            out.extend_from_slice(&col.type_oid.to_le_bytes());
        }
        for key in [&self.identity, &self.primary_key] {
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            for i in key {
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        out
    }
}

impl Change {
    /// Appends this change's encoding (what [`Transaction::decode`] reads).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        begin_change(out, self.relation, self.kind);
        let filter_is_old = self.kind == ChangeKind::Delete;
        for (row, is_old) in [(&self.record, false), (&self.old, true)] {
            match row {
                Some(text) => {
                    put_row(out, |out| out.extend_from_slice(text.as_bytes()));
                    let offsets: &[u32] = if is_old == filter_is_old { &self.filter_at } else { &[] };
                    put_offsets(out, offsets.iter().copied());
                }
                None => put_no_row(out),
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Decoded relation descriptions by OID, with the bytes they came from.
#[derive(Default)]
pub struct RelationCache(HashMap<u32, (Vec<u8>, Arc<Relation>)>);

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let slice = self.bytes.get(self.pos..self.pos + n).ok_or(WireError(self.pos))?;
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn relation(&mut self) -> Result<Relation, WireError> {
        let relid = self.u32()?;
        let schema = self.string()?;
        let table = self.string()?;
        let mut columns = Vec::new();
        for _ in 0..self.u32()? {
            columns.push(Column {
                name: self.string()?,
                typname: self.string()?,
                type_oid: self.u32()?,
            });
        }
        let identity = self.positions()?;
        let primary_key = self.positions()?;
        Ok(Relation {
            relid,
            schema,
            table,
            columns,
            identity,
            primary_key,
        })
    }

    /// Moves past a relation description without decoding it.
    fn skip_relation(&mut self) -> Result<(), WireError> {
        self.u32()?;
        for _ in 0..2 {
            let len = self.u32()? as usize;
            self.take(len)?;
        }
        for _ in 0..self.u32()? {
            for _ in 0..2 {
                let len = self.u32()? as usize;
                self.take(len)?;
            }
            self.u32()?; // the type's OID
        }
        for _ in 0..2 {
            let n = self.u32()? as usize;
            self.take(n.checked_mul(2).ok_or(WireError(self.pos))?)?;
        }
        Ok(())
    }

    fn positions(&mut self) -> Result<Vec<u16>, WireError> {
        let n = self.u32()?;
        let mut out = Vec::with_capacity(n.min(1600) as usize);
        for _ in 0..n {
            out.push(self.u16()?);
        }
        Ok(out)
    }

    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        let at = self.pos;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| WireError(at))
    }

    fn offsets(&mut self) -> Result<Vec<u32>, WireError> {
        let n = self.u16()?;
        let mut out = Vec::with_capacity(usize::from(n).min(self.bytes.len().saturating_sub(self.pos) / 4));
        for _ in 0..n {
            out.push(self.u32()?);
        }
        Ok(out)
    }

    fn opt_string(&mut self) -> Result<Option<String>, WireError> {
        let len = self.u32()?;
        if len == u32::MAX {
            return Ok(None);
        }
        let at = self.pos;
        String::from_utf8(self.take(len as usize)?.to_vec())
            .map(Some)
            .map_err(|_| WireError(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Transaction {
        Transaction {
            xid: 742,
            commit_lsn: 0x1_6B37_4D48,
            commit_time_us: 1_741_083_072_345_000,
            relations: vec![Arc::new(Relation {
                relid: 16384,
                schema: "public".into(),
                table: "messages".into(),
                columns: vec![
                    Column {
                        name: "id".into(),
                        typname: "uuid".into(),
                        type_oid: 2950,
                    },
                    Column {
                        name: "body".into(),
                        typname: "text".into(),
                        type_oid: 25,
                    },
                ],
                identity: vec![0],
                primary_key: vec![0],
            })],
            changes: vec![
                Change {
                    relation: 0,
                    kind: ChangeKind::Insert,
                    record: Some(r#"{"id":"a","body":"hé"}"#.into()),
                    old: None,
                    filter_at: vec![6, 17],
                },
                Change {
                    relation: 0,
                    kind: ChangeKind::Update,
                    record: Some(r#"{"id":"a","body":"x"}"#.into()),
                    old: Some(r#"{"id":"a","body":"hé"}"#.into()),
                    filter_at: vec![6, 17],
                },
                Change {
                    relation: 0,
                    kind: ChangeKind::Delete,
                    record: None,
                    old: Some("{}".into()),
                    filter_at: vec![],
                },
                Change {
                    relation: 0,
                    kind: ChangeKind::Truncate,
                    record: None,
                    old: None,
                    filter_at: vec![],
                },
            ],
            broadcasts: Vec::new(),
            overflowed: false,
        }
    }

    /// Writes the `record` fuzz target's seeds (`fuzz/corpus/record/`):
    /// these samples as a backend encodes them.
    /// (`cargo test -p bgworker write_record_seeds -- --ignored`)
    #[test]
    #[ignore]
    fn write_record_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/record");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("four_kinds"), sample().encode()).unwrap();
        let overflowed = Transaction {
            changes: vec![],
            overflowed: true,
            ..sample()
        };
        std::fs::write(dir.join("overflowed"), overflowed.encode()).unwrap();
    }

    #[test]
    fn the_commit_lsn_is_read_from_the_head() {
        let bytes = sample().encode();
        assert_eq!(peek_commit_lsn(&bytes[..16]), Some(sample().commit_lsn));
        assert_eq!(peek_commit_lsn(&bytes[..12]), None);
    }

    #[test]
    fn a_truncate_is_known_by_its_head() {
        let mut out = Vec::new();
        begin_change(&mut out, 2, ChangeKind::Truncate);
        put_no_row(&mut out);
        put_no_row(&mut out);
        assert_eq!(truncated_relation(&out), Some(2));
        let mut delete = Vec::new();
        begin_change(&mut delete, 2, ChangeKind::Delete);
        assert_eq!(truncated_relation(&delete), None);
        assert_eq!(truncated_relation(&[]), None);
    }

    #[test]
    fn round_trip() {
        let t = sample();
        assert_eq!(Transaction::decode(&t.encode()), Ok(t));
        let overflow = Transaction {
            changes: vec![],
            overflowed: true,
            ..sample()
        };
        assert_eq!(Transaction::decode(&overflow.encode()), Ok(overflow));
    }

    #[test]
    fn broadcasts_ride_with_the_changes() {
        let json = DbBroadcast {
            topic: "order:7".into(),
            event: "UPDATE".into(),
            id: "3f1c5a9e-0000-4000-8000-000000000001".into(),
            private: true,
            payload: DbPayload::Json(r#"{"id":"3f1c5a9e-0000-4000-8000-000000000001","n":1}"#.into()),
        };
        let binary = DbBroadcast {
            private: false,
            payload: DbPayload::Binary(vec![0, 255, 7]),
            ..json.clone()
        };
        let t = Transaction {
            broadcasts: vec![json.clone(), binary],
            ..sample()
        };
        assert_eq!(Transaction::decode(&t.encode()), Ok(t.clone()));
        // a broadcast between row changes, as a backend writes them
        let relations: Vec<Vec<u8>> = t.relations.iter().map(|r| r.encode()).collect();
        let mut changes = Vec::new();
        t.changes[0].encode_into(&mut changes);
        let at = changes.len();
        put_broadcast(
            &mut changes,
            true,
            false,
            ["order:7", "UPDATE", &json.id],
            br#"{"n":1}"#,
        );
        let broadcast_bytes = changes.len() - at;
        t.changes[1].encode_into(&mut changes);
        let mut out = Vec::new();
        encode_record(&mut out, &Header::default(), &relations, 3, &changes);
        let decoded = Transaction::decode(&out).unwrap();
        assert_eq!(decoded.changes, t.changes[..2]);
        assert_eq!(decoded.broadcasts[0].payload, DbPayload::Json(r#"{"n":1}"#.into()));
        // a broadcast cut short anywhere, or JSON that is not UTF-8, is an error
        let start = out.len() - changes.len() + at;
        for end in start..start + broadcast_bytes {
            let mut cut = Vec::new();
            encode_record(
                &mut cut,
                &Header::default(),
                &relations,
                2,
                &changes[..end - (out.len() - changes.len())],
            );
            assert!(Transaction::decode(&cut).is_err(), "cut at {end}");
        }
        let mut bad = Vec::new();
        put_broadcast(&mut bad, false, false, ["t", "e", "i"], &[0xff]);
        encode_record(&mut out, &Header::default(), &relations, 1, &bad);
        assert!(Transaction::decode(&out).is_err());
        // loss ids keep public and private apart and are never 0
        assert_ne!(json.loss_id(), topic_loss_id("order:7", false));
        assert!(topic_loss_id("", false) & 0x8000_0000 != 0);
    }

    #[test]
    fn records_built_from_parts_decode_alike() {
        // As a committing backend builds one: descriptions encoded once,
        // rows written into one buffer as they come.
        let t = sample();
        let relations: Vec<Vec<u8>> = t.relations.iter().map(|r| r.encode()).collect();
        let mut changes = Vec::new();
        for c in &t.changes {
            begin_change(&mut changes, c.relation, c.kind);
            for (row, is_old) in [(&c.record, false), (&c.old, true)] {
                match row {
                    Some(text) => {
                        put_row(&mut changes, |out| out.extend_from_slice(text.as_bytes()));
                        let filter_row = is_old == (c.kind == ChangeKind::Delete);
                        let offsets = if filter_row { c.filter_at.clone() } else { vec![] };
                        put_offsets(&mut changes, offsets.into_iter());
                    }
                    None => put_no_row(&mut changes),
                }
            }
        }
        let header = Header {
            xid: t.xid,
            commit_lsn: t.commit_lsn,
            commit_time_us: t.commit_time_us,
            overflowed: false,
        };
        let mut out = vec![9; 3]; // a reused buffer: cleared first
        encode_record(&mut out, &header, &relations, t.changes.len(), &changes);
        assert_eq!(out, t.encode());
        assert_eq!(Transaction::decode(&out), Ok(t));
    }

    #[test]
    fn the_cache_shares_unchanged_descriptions_only() {
        let mut cache = RelationCache::default();
        let first = Transaction::decode_cached(&sample().encode(), &mut cache).unwrap();
        let again = Transaction::decode_cached(&sample().encode(), &mut cache).unwrap();
        assert!(Arc::ptr_eq(&first.relations[0], &again.relations[0]));
        // the table changed (a column renamed): decoded anew
        let mut altered = sample();
        Arc::make_mut(&mut altered.relations[0]).columns[1].name = "text".into();
        let changed = Transaction::decode_cached(&altered.encode(), &mut cache).unwrap();
        assert_eq!(changed.relations[0].columns[1].name, "text");
        assert!(!Arc::ptr_eq(&first.relations[0], &changed.relations[0]));
        assert_eq!(changed, altered);
    }

    #[test]
    fn truncated_or_corrupt_input_is_an_error() {
        let bytes = sample().encode();
        for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(Transaction::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = sample();
        bad_kind.changes.truncate(1);
        let mut bytes = bad_kind.encode();
        let first = &bad_kind.changes[0];
        let kind_at =
            bytes.len() - 4 - (2 + 4 * first.filter_at.len()) - (4 + first.record.as_ref().unwrap().len()) - 1;
        bytes[kind_at] = 9;
        assert!(Transaction::decode(&bytes).is_err());
    }
}
