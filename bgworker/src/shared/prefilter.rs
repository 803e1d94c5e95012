//! Which equality-filter keys anyone wants, per table, in shared memory, so
//! that capture triggers drop rows no subscriber could match before they
//! are encoded, published or woken up for.
//!
//! A table gets a filter slot when every binding on it has an equality
//! condition on one same column (the worker's equality index, see
//! `crate::changes::registry`): the slot holds the table, the column, how its
//! values compare, and a Bloom filter of the wanted keys
//! (`keys::json_key` of the values, so a trigger computes the key of a
//! row's value from the JSON text it writes, exactly as the worker would).
//! A false positive only sends a row on to the worker, which matches
//! exactly; there are no false negatives.
//!
//! The realtime worker is the only writer; each slot is a sequence lock
//! (odd while being rewritten), and readers that catch a rewrite or a slot
//! that no longer describes their table answer "wanted": never a row lost,
//! at worst one sent on for nothing. A slot's `generation` changes when its
//! table, column or kind does, so readers may cache which of their columns
//! it names.

use crate::shared::keys::Kind;
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Bits of a slot's Bloom filter (two per key): with 1,000 distinct keys
/// about 5% of unwanted rows still go on to the worker.
const BLOOM_BITS: usize = 8192;
const BLOOM_WORDS: usize = BLOOM_BITS / 64;
/// Column names are at most 63 bytes (NAMEDATALEN - 1).
const NAME_WORDS: usize = 8;
const SEQ: usize = 0;
const RELID: usize = 1;
const GENERATION: usize = 2;
const KIND: usize = 3;
const NAME: usize = 4;
const BLOOM: usize = NAME + NAME_WORDS;
/// Words per slot (a multiple of eight: slots start on cache lines).
pub const SLOT_WORDS: usize = BLOOM + BLOOM_WORDS + 4;
/// How often a reader re-reads a slot caught being rewritten before it
/// gives up and answers "wanted".
const READ_TRIES: usize = 1000;

/// A key's hash, which picks its two bits.
pub fn key_hash(key: &str) -> u64 {
    // FNV-1a, then a finalizer that spreads it over all 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn bits(hash: u64) -> [usize; 2] {
    [(hash as usize) % BLOOM_BITS, ((hash >> 32) as usize) % BLOOM_BITS]
}

fn kind_code(kind: Kind) -> u64 {
    match kind {
        Kind::Number => 1,
        Kind::Text => 2,
        Kind::Uuid => 3,
        Kind::Bool => 4,
        Kind::Date => 5,
        Kind::Timestamp => 6,
        Kind::Timestamptz => 7,
        Kind::Other => 8,
    }
}

fn kind_of(code: u64) -> Option<Kind> {
    Some(match code {
        1 => Kind::Number,
        2 => Kind::Text,
        3 => Kind::Uuid,
        4 => Kind::Bool,
        5 => Kind::Date,
        6 => Kind::Timestamp,
        7 => Kind::Timestamptz,
        8 => Kind::Other,
        _ => return None,
    })
}

/// The bits of a slot's Bloom filter for a set of keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Bloom([u64; BLOOM_WORDS]);

impl Default for Bloom {
    fn default() -> Self {
        Bloom([0; BLOOM_WORDS])
    }
}

impl std::fmt::Debug for Bloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "Bloom({set} bits set)")
    }
}

impl Bloom {
    /// The filter of exactly `keys`.
    pub fn of<'k>(keys: impl IntoIterator<Item = &'k str>) -> Bloom {
        let mut bloom = Bloom::default();
        for key in keys {
            for bit in bits(key_hash(key)) {
                bloom.0[bit / 64] |= 1 << (bit % 64);
            }
        }
        bloom
    }

    /// Adds the keys of `other`.
    pub fn union(&mut self, other: &Bloom) {
        for (word, more) in self.0.iter_mut().zip(other.0.iter()) {
            *word |= more;
        }
    }
}

/// A [`Bloom`] kept up to date as keys come and go, by a count per bit in
/// use (a Bloom filter cannot forget a key by itself): adding or removing
/// a key costs its own hash, not a rebuild from every key. The counts are
/// kept only for bits set, so a filter costs its 1 kB and about 20 bytes
/// a key. The caller adds each distinct key once and removes only keys it
/// added.
#[derive(Clone, Default)]
pub struct CountingBloom {
    counts: std::collections::HashMap<u16, u32>,
    bloom: Bloom,
}

impl CountingBloom {
    pub fn add(&mut self, key: &str) {
        for bit in bits(key_hash(key)) {
            *self.counts.entry(bit as u16).or_insert(0) += 1;
            self.bloom.0[bit / 64] |= 1 << (bit % 64);
        }
    }

    pub fn remove(&mut self, key: &str) {
        for bit in bits(key_hash(key)) {
            let Some(count) = self.counts.get_mut(&(bit as u16)) else {
                debug_assert!(false, "a key removed that was not added");
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&(bit as u16));
                self.bloom.0[bit / 64] &= !(1 << (bit % 64));
            }
        }
    }

    /// The filter of the keys added and not removed.
    pub fn bloom(&self) -> &Bloom {
        &self.bloom
    }
}

/// What a slot says about a table, as a reader caches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    pub generation: u64,
    pub name: String,
    pub kind: Kind,
}

/// The filter slots.
#[derive(Clone, Copy)]
pub struct KeyFilters<'a> {
    words: &'a [AtomicU64],
}

impl<'a> KeyFilters<'a> {
    /// `words` holds `words.len() / SLOT_WORDS` slots.
    pub fn new(words: &'a [AtomicU64]) -> KeyFilters<'a> {
        KeyFilters { words }
    }

    pub fn len(&self) -> usize {
        self.words.len() / SLOT_WORDS
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn word(&self, slot: usize, i: usize) -> &AtomicU64 {
        &self.words[slot * SLOT_WORDS + i]
    }

    /// Runs `read` on a consistent view of `slot` (seqlock): None if the
    /// slot was being rewritten every time it was tried.
    fn read<T>(&self, slot: usize, read: impl Fn() -> T) -> Option<T> {
        if slot >= self.len() {
            return None;
        }
        for _ in 0..READ_TRIES {
            let before = self.word(slot, SEQ).load(Ordering::Acquire);
            if before & 1 == 0 {
                let value = read();
                fence(Ordering::Acquire);
                if self.word(slot, SEQ).load(Ordering::Relaxed) == before {
                    return Some(value);
                }
            }
            std::hint::spin_loop();
        }
        None
    }

    /// The column and kind `slot` filters `relid` on, if it describes
    /// that table (readers cache it by `generation`).
    pub fn column(&self, slot: usize, relid: u32) -> Option<KeyColumn> {
        let (table, generation, kind, name) = self.read(slot, || {
            let mut name = [0u8; NAME_WORDS * 8];
            for (i, chunk) in name.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&self.word(slot, NAME + i).load(Ordering::Relaxed).to_le_bytes());
            }
            (
                self.word(slot, RELID).load(Ordering::Relaxed),
                self.word(slot, GENERATION).load(Ordering::Relaxed),
                self.word(slot, KIND).load(Ordering::Relaxed),
                name,
            )
        })?;
        if table != u64::from(relid) || relid == 0 {
            return None;
        }
        let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        Some(KeyColumn {
            generation,
            name: String::from_utf8(name[..len].to_vec()).ok()?,
            kind: kind_of(kind)?,
        })
    }

    /// Whether a row of `relid` may be wanted whose filtered column has
    /// the key hashed to `hash` (None: no key, as for NULL, which no
    /// equality condition takes), `slot` being as the reader cached it at
    /// `generation`. True whenever it cannot tell: the slot is being
    /// rewritten, or now describes another table, column or kind.
    pub fn wants(&self, slot: usize, relid: u32, generation: u64, hash: Option<u64>) -> bool {
        let seen = self.read(slot, || {
            let same = self.word(slot, RELID).load(Ordering::Relaxed) == u64::from(relid)
                && self.word(slot, GENERATION).load(Ordering::Relaxed) == generation;
            let set = |bit: usize| self.word(slot, BLOOM + bit / 64).load(Ordering::Relaxed) & (1 << (bit % 64)) != 0;
            !same || hash.is_some_and(|h| bits(h).into_iter().all(set))
        });
        seen.unwrap_or(true)
    }

    /// The slot's generation now (readers check their cached [`KeyColumn`]
    /// against it); `u64::MAX` for a slot out of range.
    pub fn generation(&self, slot: usize) -> u64 {
        if slot >= self.len() {
            return u64::MAX;
        }
        self.word(slot, GENERATION).load(Ordering::Acquire)
    }

    /// The slot's version: it changes whenever the slot is rewritten, so
    /// a reader that finds it unchanged knows nobody's keys changed.
    pub fn version(&self, slot: usize) -> u64 {
        if slot >= self.len() {
            return u64::MAX;
        }
        self.word(slot, SEQ).load(Ordering::Acquire)
    }

    /// Makes `slot` filter `relid` on `column` (compared as `kind`) for
    /// the keys of `bloom`. Writer only (the realtime worker); leaves the slot
    /// untouched when it already says just that. False, and nothing
    /// written, for a column name longer than a slot holds (63 bytes, as
    /// Postgres's NAMEDATALEN allows): the table gets no key filter.
    pub fn write(&self, slot: usize, relid: u32, column: &str, kind: Kind, bloom: &Bloom) -> bool {
        if column.len() >= NAME_WORDS * 8 || column.contains('\0') {
            return false;
        }
        let bloom = &bloom.0;
        let mut name = [0u64; NAME_WORDS];
        let bytes = column.as_bytes();
        assert!(
            bytes.len() < NAME_WORDS * 8,
            "column names are shorter than NAMEDATALEN"
        );
        for (i, word) in name.iter_mut().enumerate() {
            let mut chunk = [0u8; 8];
            let part = bytes.get(i * 8..).unwrap_or(&[]);
            let n = part.len().min(8);
            chunk[..n].copy_from_slice(&part[..n]);
            *word = u64::from_le_bytes(chunk);
        }
        let load = |i: usize| self.word(slot, i).load(Ordering::Relaxed);
        let same_column = load(RELID) == u64::from(relid)
            && load(KIND) == kind_code(kind)
            && (0..NAME_WORDS).all(|i| load(NAME + i) == name[i]);
        if same_column && (0..BLOOM_WORDS).all(|i| load(BLOOM + i) == bloom[i]) {
            return true;
        }
        self.rewrite(slot, |store| {
            if !same_column {
                store(RELID, u64::from(relid));
                store(GENERATION, load(GENERATION) + 1);
                store(KIND, kind_code(kind));
                for (i, word) in name.iter().enumerate() {
                    store(NAME + i, *word);
                }
            }
            for (i, word) in bloom.iter().enumerate() {
                store(BLOOM + i, *word);
            }
        });
        true
    }

    /// Frees `slot`: it describes no table. Writer only.
    pub fn clear(&self, slot: usize) {
        if self.word(slot, RELID).load(Ordering::Relaxed) == 0 {
            return;
        }
        let generation = self.word(slot, GENERATION).load(Ordering::Relaxed);
        self.rewrite(slot, |store| {
            store(RELID, 0);
            store(GENERATION, generation + 1);
        });
    }

    /// The writer's side of the sequence lock.
    fn rewrite(&self, slot: usize, write: impl FnOnce(&dyn Fn(usize, u64))) {
        let seq = self.word(slot, SEQ);
        let before = seq.load(Ordering::Relaxed);
        seq.store(before + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        write(&|i, value| self.word(slot, i).store(value, Ordering::Relaxed));
        seq.store(before + 2, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn hash_of(key: &str) -> Option<u64> {
        Some(key_hash(key))
    }

    fn slots(n: usize) -> Vec<AtomicU64> {
        (0..n * SLOT_WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_slot_wants_exactly_its_keys_of_its_table() {
        let words = slots(2);
        let f = KeyFilters::new(&words);
        assert_eq!(f.column(0, 7), None, "an empty slot describes no table");
        f.write(0, 7, "recipient_id", Kind::Number, &Bloom::of(["5", "6"]));
        let column = f.column(0, 7).unwrap();
        assert_eq!((column.name.as_str(), column.kind), ("recipient_id", Kind::Number));
        assert_eq!(f.column(0, 8), None);
        let g = column.generation;
        assert!(f.wants(0, 7, g, hash_of("5")) && f.wants(0, 7, g, hash_of("6")));
        let unwanted = (0..1000).filter(|k| !f.wants(0, 7, g, hash_of(&k.to_string()))).count();
        assert!(unwanted >= 997, "only 5 and 6 (and rare false positives): {unwanted}");
        // another table, or another generation: cannot tell, so wanted
        assert!(f.wants(0, 8, g, hash_of("9")));
        assert!(f.wants(0, 7, g + 1, hash_of("9")));
        // a slot out of range is never trusted
        assert!(f.wants(5, 7, g, hash_of("9")));
        // no key (NULL): wanted by nobody, unless the slot changed
        assert!(!f.wants(0, 7, g, None) && f.wants(0, 7, g + 1, None));
        let v = f.version(0);
        f.write(0, 7, "recipient_id", Kind::Number, &Bloom::of(["6", "5"]));
        assert_eq!(f.version(0), v, "the same keys: not rewritten");
        f.write(0, 7, "recipient_id", Kind::Number, &Bloom::of(["5"]));
        assert_ne!(f.version(0), v);
        assert_eq!(f.generation(0), g);
    }

    #[test]
    fn a_counting_bloom_forgets_a_key_without_a_rebuild() {
        let mut kept = CountingBloom::default();
        for key in ["a", "b", "c"] {
            kept.add(key);
        }
        assert_eq!(kept.bloom(), &Bloom::of(["a", "b", "c"]));
        kept.remove("b");
        assert_eq!(kept.bloom(), &Bloom::of(["a", "c"]));
        // a bit two keys share stays set while either is there
        let keys: Vec<String> = (0..5_000).map(|k| k.to_string()).collect();
        for key in &keys {
            kept.add(key);
        }
        for key in &keys[..4_000] {
            kept.remove(key);
        }
        let left = ["a", "c"].into_iter().chain(keys[4_000..].iter().map(String::as_str));
        assert_eq!(kept.bloom(), &Bloom::of(left));
        for key in keys[4_000..].iter().map(String::as_str).chain(["a", "c"]) {
            kept.remove(key);
        }
        assert_eq!(kept.bloom(), &Bloom::default());
    }

    #[test]
    fn generations_change_with_the_column_not_the_keys() {
        let words = slots(1);
        let f = KeyFilters::new(&words);
        f.write(0, 7, "a", Kind::Number, &Bloom::of(["1"]));
        let g = f.column(0, 7).unwrap().generation;
        f.write(0, 7, "a", Kind::Number, &Bloom::of(["1", "2"]));
        assert_eq!(f.column(0, 7).unwrap().generation, g);
        assert!(f.wants(0, 7, g, hash_of("2")));
        f.write(0, 7, "a", Kind::Number, &Bloom::of(["2"]));
        assert!(!f.wants(0, 7, g, hash_of("1")), "a key nobody wants any more");
        f.write(0, 7, "b", Kind::Number, &Bloom::of(["2"]));
        let h = f.column(0, 7).unwrap();
        assert_ne!(h.generation, g);
        assert_eq!(h.name, "b");
        f.write(0, 7, "b", Kind::Text, &Bloom::of(["2"]));
        assert_ne!(f.column(0, 7).unwrap().generation, h.generation);
        f.clear(0);
        assert_eq!(f.column(0, 7), None);
        let long = "x".repeat(63);
        assert!(f.write(0, 9, &long, Kind::Uuid, &Bloom::of([])));
        assert_eq!(f.column(0, 9).unwrap().name, long);
        // longer than a slot holds: refused, the slot untouched
        assert!(!f.write(0, 9, &"y".repeat(64), Kind::Uuid, &Bloom::of([])));
        assert_eq!(f.column(0, 9).unwrap().name, long);
    }

    /// A reader racing the writer never acts on a torn slot: whenever the
    /// slot says column "a" (for which "keep" is always wanted), the key
    /// is wanted, though the writer keeps switching it to column "b",
    /// which wants nothing.
    #[test]
    fn readers_racing_rewrites_never_see_a_torn_slot() {
        let words = slots(1);
        let f = KeyFilters::new(&words);
        f.write(0, 7, "a", Kind::Text, &Bloom::of(["keep"]));
        let stop = AtomicBool::new(false);
        let hash = key_hash("keep");
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..20_000 {
                    if i % 2 == 0 {
                        f.write(0, 7, "b", Kind::Text, &Bloom::of([]));
                    } else {
                        f.write(0, 7, "a", Kind::Text, &Bloom::of(["keep"]));
                    }
                }
                stop.store(true, Ordering::Release);
            });
            let mut checked = 0;
            while !stop.load(Ordering::Acquire) || checked == 0 {
                if let Some(column) = f.column(0, 7).filter(|c| c.name == "a") {
                    assert!(f.wants(0, 7, column.generation, Some(hash)));
                    checked += 1;
                }
            }
        });
    }
}
