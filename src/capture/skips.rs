//! What a transaction wrote but did not capture: rows of tables nobody
//! listened to, and rows a key filter dropped. If a subscriber that may
//! want them has joined by commit time, it joined while the transaction
//! ran and may expect them: at commit it is told to refetch.

use super::described::Probe;
use bgworker::shared::interest::Wanted;

/// Distinct keys remembered per relation and transaction (bounded memory
/// for a huge transaction; past it, any change to the table's filter
/// before commit counts as a possible miss).
const MAX_KEY_SKIPS: usize = 1024;

/// What the transaction skipped so far.
#[derive(Default)]
pub(super) struct Skips {
    /// Relations (and their schemas) whose rows were skipped because nobody
    /// listened then.
    tables: Vec<(u32, u32)>,
    /// Rows dropped by key filters, per relation.
    keyed: Vec<KeySkips>,
    /// The dropped rows' keys' hashes, by relation (None: no key, as for
    /// NULL).
    keys: Vec<(u32, Option<u64>)>,
    /// Rows dropped by key filters, for `rows_filtered_out`.
    pub(super) filtered_out: u64,
}

/// Rows of one relation a transaction dropped because no subscriber's
/// equality filter wanted their keys.
struct KeySkips {
    relid: u32,
    namespace: u32,
    slot: usize,
    generation: u64,
    /// The slot's version before the first of these rows was judged
    /// (`u64::MAX`, which no version reaches, once the filter moved).
    version: u64,
    /// How many of the transaction's `keys` are this relation's (at most
    /// `MAX_KEY_SKIPS`; past that, `saturated`: only whether the slot
    /// changed is known), and the last one.
    count: usize,
    last: Option<Option<u64>>,
    saturated: bool,
}

impl Skips {
    /// Notes that rows of `relid` were written while nobody listened.
    pub(super) fn note_table(&mut self, relid: u32, namespace: u32) {
        if !self.tables.iter().any(|(r, _)| *r == relid) {
            self.tables.push((relid, namespace));
        }
    }

    /// Notes a row of `relid` that the key filter `probe` dropped, whose
    /// key hashed to `hash`; `version` is the slot's version read before
    /// the row was judged.
    pub(super) fn note_key(&mut self, relid: u32, namespace: u32, probe: &Probe, version: u64, hash: Option<u64>) {
        self.filtered_out += 1;
        let skips = match self.keyed.iter().position(|s| s.relid == relid) {
            Some(i) => &mut self.keyed[i],
            None => {
                self.keyed.push(KeySkips {
                    relid,
                    namespace,
                    slot: probe.slot,
                    generation: probe.generation,
                    version,
                    count: 0,
                    last: None,
                    saturated: false,
                });
                self.keyed.last_mut().expect("just pushed")
            }
        };
        if skips.slot != probe.slot || skips.generation != probe.generation {
            // The table's filter moved to another column or slot during the
            // transaction: whether it now wants the rows dropped before is
            // not known, so they count as missed if anyone listens at commit.
            (skips.slot, skips.generation, skips.version) = (probe.slot, probe.generation, u64::MAX);
            skips.saturated = true;
        }
        if !skips.saturated && skips.last != Some(hash) {
            if skips.count == MAX_KEY_SKIPS {
                skips.saturated = true;
            } else {
                skips.count += 1;
                skips.last = Some(hash);
                self.keys.push((relid, hash));
            }
        }
    }

    /// Whether nothing was skipped. (Skipped rows make PREPARE TRANSACTION
    /// refused, as captured ones do: had a subscriber that wants them
    /// joined before COMMIT PREPARED, nothing would tell it.)
    pub(super) fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.keyed.is_empty()
    }

    /// At commit: tells the subscribers who may have missed skipped rows
    /// to refetch, through the ring's loss side channel. Reads shared
    /// atomics only: nothing here can fail.
    pub(super) fn announce_missed(&self) {
        let interest = crate::shmem::interest();
        let missed_table = |(r, nsp): &&(u32, u32)| interest.any(&[*r, *nsp]);
        let missed_keys = |s: &&KeySkips| missed(s, &self.keys);
        if self.tables.iter().any(|s| missed_table(&s)) || self.keyed.iter().any(|s| missed_keys(&s)) {
            let tables = self.tables.iter().filter(missed_table).map(|(r, _)| *r);
            let keyed = self.keyed.iter().filter(missed_keys).map(|s| s.relid);
            crate::shmem::ring().record_loss(tables.chain(keyed));
            crate::shmem::wake_worker();
        }
    }

    /// Forgets the transaction, keeping the allocations up to `keep_bytes`.
    pub(super) fn clear(&mut self, keep_bytes: usize) {
        self.tables.clear();
        self.keyed.clear();
        self.keys.clear();
        if self.keys.capacity() > keep_bytes / 16 {
            self.keys = Vec::new();
        }
        self.filtered_out = 0;
    }
}

/// Whether a subscriber may have joined, since these rows were dropped,
/// that wants some of them (then it is told to refetch); `keys` are the
/// transaction's dropped keys. Reads shared atomics only.
fn missed(skips: &KeySkips, keys: &[(u32, Option<u64>)]) -> bool {
    let filters = crate::shmem::key_filters();
    match crate::shmem::interest().wanted(skips.relid, skips.namespace) {
        Wanted::Nothing => false,
        Wanted::Every => true,
        Wanted::Keys(slot) if slot != skips.slot => true,
        // not rewritten since the first row was dropped: nobody new
        Wanted::Keys(slot) if filters.version(slot) == skips.version => false,
        Wanted::Keys(_) if skips.saturated => true,
        Wanted::Keys(slot) => keys
            .iter()
            .filter(|(relid, _)| *relid == skips.relid)
            .any(|(_, hash)| filters.wants(slot, skips.relid, skips.generation, *hash)),
    }
}
