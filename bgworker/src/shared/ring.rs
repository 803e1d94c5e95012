//! The change ring: many committing backends write, the realtime worker
//! reads. It lives in shared memory as a header and an array of 64-bit words;
//! all access is through atomics, so this code is safe Rust and is tested
//! here with threads standing in for backends.
//!
//! Writers reserve space under a short spin lock (a few loads and stores),
//! copy their record outside it, then mark it ready. The reader takes records
//! in reservation order, passing over one not yet ready (its writer wakes
//! the reader again when it is done) and leaving in place one it may not
//! deliver yet; space comes back to writers only past the records taken. A writer never waits for the
//! reader: when the ring is full the record is refused and the loss is
//! recorded, so a commit is never blocked or failed (`docs/architecture.md`, invariant 4).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Set in a record's first word once its payload is complete.
const READY: u64 = 1 << 63;
/// Set by the reader in a ready record's first word when it took the
/// record while an earlier one stays in the ring (`drain_where`).
const TAKEN: u64 = 1 << 62;
/// How much of a record's payload `drain_where` shows to decide.
pub const PEEK_BYTES: usize = 16;
/// Words before the payload: length/state, sequence number, byte length.
const RECORD_HEADER_WORDS: u64 = 3;
/// Relations whose losses are tracked one by one; beyond that, "all".
pub const LOST_RELATIONS: usize = 64;

/// The ring's shared state, beside its words.
///
/// It lives in shared memory, which the extension maps as this type
/// (`src/shmem/region.rs`, `SharedZeroed`): keep it `repr(C)`, made of
/// atomics and of padding nothing reads or writes, without pointers,
/// aligned to at most 8 bytes, and valid when all zero.
#[derive(Debug)]
#[repr(C)]
pub struct RingHeader {
    // What writers change on every record, then what the reader changes,
    // on separate cache lines: a committing backend and the worker then
    // do not take each other's line away on every write.
    lock: AtomicU64,
    /// Next word to reserve (monotonic; position = head % capacity).
    head: AtomicU64,
    next_seq: AtomicU64,
    _writers: [u64; 5],
    /// First word not yet consumed (monotonic).
    tail: AtomicU64,
    _reader: [u64; 7],
    /// Records refused because the ring was full or they were too large.
    lost_records: AtomicU64,
    /// Relation ids of lost records (0 = empty slot), for telling the
    /// affected subscribers; `lost_all` when the slots ran out.
    lost_relations: [AtomicU32; LOST_RELATIONS],
    lost_all: AtomicU32,
}

impl Default for RingHeader {
    fn default() -> Self {
        RingHeader {
            lock: AtomicU64::new(0),
            head: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
            _writers: [0; 5],
            tail: AtomicU64::new(0),
            _reader: [0; 7],
            lost_records: AtomicU64::new(0),
            lost_relations: std::array::from_fn(|_| AtomicU32::new(0)),
            lost_all: AtomicU32::new(0),
        }
    }
}

/// Why a record was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// Not enough free space now.
    Full,
    /// Larger than the whole ring.
    TooLarge,
}

/// A ring over shared words.
#[derive(Clone, Copy)]
pub struct ChangeRing<'a> {
    header: &'a RingHeader,
    words: &'a [AtomicU64],
}

/// Losses since the reader last looked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Losses {
    pub records: u64,
    pub relations: Vec<u32>,
    /// Too many relations to list: treat every relation as affected.
    pub all: bool,
}

impl Losses {
    /// Whether some subscriber must be told: a relation was noted (or all
    /// were), whatever the count read with it.
    pub fn needs_notice(&self) -> bool {
        self.all || !self.relations.is_empty()
    }
}

impl<'a> ChangeRing<'a> {
    pub fn new(header: &'a RingHeader, words: &'a [AtomicU64]) -> ChangeRing<'a> {
        assert!(words.len() > RECORD_HEADER_WORDS as usize, "ring too small");
        ChangeRing { header, words }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Largest payload a record may carry.
    pub fn max_payload(&self) -> usize {
        (self.words.len() - RECORD_HEADER_WORDS as usize) * 8
    }

    fn index(&self, pos: u64) -> usize {
        (pos % self.words.len() as u64) as usize
    }

    fn word(&self, pos: u64) -> &AtomicU64 {
        &self.words[self.index(pos)]
    }

    fn lock(&self) {
        while self
            .header
            .lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
    }

    fn unlock(&self) {
        self.header.lock.store(0, Ordering::Release);
    }

    /// Writes one record; returns its sequence number. Never blocks on the
    /// reader.
    pub fn publish(&self, payload: &[u8]) -> Result<u64, PublishError> {
        let payload_words = payload.len().div_ceil(8) as u64;
        let need = RECORD_HEADER_WORDS + payload_words;
        if need > self.words.len() as u64 {
            return Err(PublishError::TooLarge);
        }
        self.map_pages(need);
        self.lock();
        let head = self.header.head.load(Ordering::Relaxed);
        let tail = self.header.tail.load(Ordering::Acquire);
        if head + need - tail > self.words.len() as u64 {
            self.unlock();
            return Err(PublishError::Full);
        }
        let seq = self.header.next_seq.fetch_add(1, Ordering::Relaxed);
        // Not ready yet: the reader passes over it until the copy is done.
        self.word(head).store(need, Ordering::Relaxed);
        self.header.head.store(head + need, Ordering::Release);
        self.unlock();

        self.word(head + 1).store(seq, Ordering::Relaxed);
        self.word(head + 2).store(payload.len() as u64, Ordering::Relaxed);
        // Whole words up to the end of the ring, then from its start (two
        // plain loops), then the last, partial word.
        let start = self.index(head + RECORD_HEADER_WORDS);
        let whole = payload.len() / 8;
        let before_end = whole.min(self.words.len() - start);
        let (first, second) = payload[..whole * 8].split_at(before_end * 8);
        for (chunk, word) in first.chunks_exact(8).zip(&self.words[start..]) {
            word.store(u64::from_le_bytes(chunk.try_into().unwrap()), Ordering::Relaxed);
        }
        for (chunk, word) in second.chunks_exact(8).zip(self.words) {
            word.store(u64::from_le_bytes(chunk.try_into().unwrap()), Ordering::Relaxed);
        }
        let rest = &payload[whole * 8..];
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.word(head + RECORD_HEADER_WORDS + whole as u64)
                .store(u64::from_le_bytes(last), Ordering::Relaxed);
        }
        self.word(head).store(need | READY, Ordering::Release);
        Ok(seq)
    }

    /// Reads a word of each page where a record of `need` words is about
    /// to go, before the lock is taken. A process's first access to a
    /// page of shared memory faults even though the page exists; a first
    /// read maps the pages around it too (the kernel's fault-around, 64
    /// KiB by default), where a first write faults once per page. So a
    /// new backend crossing the ring takes a sixteenth of the faults, and
    /// not while it holds the lock. (Where the record goes is only a guess
    /// until the lock is held; a wrong guess costs a fault, nothing else.)
    fn map_pages(&self, need: u64) {
        const WORDS_PER_PAGE: usize = 4096 / 8;
        let (mut pos, end) = {
            let guess = self.header.head.load(Ordering::Relaxed);
            (guess, guess + need)
        };
        while pos < end {
            std::hint::black_box(self.word(pos).load(Ordering::Relaxed));
            pos += WORDS_PER_PAGE as u64;
        }
        std::hint::black_box(self.word(end - 1).load(Ordering::Relaxed));
    }

    /// Notes that a record touching `relations` was lost: the relations
    /// first, then the count, so a reader that sees the count sees them.
    /// A reader may still take the relations before the count (between the
    /// two): which is why subscribers are told by the relations
    /// (`Losses::needs_notice`), never by the count.
    pub fn record_loss(&self, relations: impl IntoIterator<Item = u32>) {
        for rel in relations {
            if !self.note_lost_relation(rel) {
                self.header.lost_all.store(1, Ordering::Release);
            }
        }
        self.header.lost_records.fetch_add(1, Ordering::Release);
    }

    /// Notes that a loss concerns every relation and topic (too many to
    /// list); the record is counted by the `record_loss` that follows.
    pub fn record_loss_of_all(&self) {
        self.header.lost_all.store(1, Ordering::Release);
    }

    fn note_lost_relation(&self, rel: u32) -> bool {
        for slot in &self.header.lost_relations {
            match slot.compare_exchange(0, rel, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(existing) if existing == rel => return true,
                Err(_) => continue,
            }
        }
        false
    }

    /// Takes (and clears) the losses recorded since the last call. Reader only.
    pub fn take_losses(&self) -> Losses {
        let records = self.header.lost_records.swap(0, Ordering::AcqRel);
        let relations = self
            .header
            .lost_relations
            .iter()
            .map(|s| s.swap(0, Ordering::AcqRel))
            .filter(|r| *r != 0)
            .collect();
        let all = self.header.lost_all.swap(0, Ordering::AcqRel) != 0;
        Losses {
            records,
            relations,
            all,
        }
    }

    /// Hands every ready record, in reservation order, to `f` (sequence
    /// number, payload); one still being written is passed over, for a
    /// later drain (so this is not commit order: the worker orders by the
    /// commit fence, `src/worker/drain.rs`). Reader only. Each
    /// payload is copied out into `scratch`, which the caller keeps from
    /// drain to drain: no allocation per record.
    pub fn drain(&self, scratch: &mut Vec<u8>, f: impl FnMut(u64, &[u8])) -> usize {
        self.drain_where(scratch, |_| true, f)
    }

    /// As [`ChangeRing::drain`], but only the records `take` accepts, shown
    /// their first [`PEEK_BYTES`] (fewer for a shorter record): the others
    /// stay in the ring, in place, for a later drain, so what the reader
    /// may not use yet is bounded by the ring's size, not the reader's
    /// memory. Records still being written are passed over too, not
    /// waited for. A record taken ahead of one left is marked taken, and
    /// its space goes back to writers once every record before it is taken.
    pub fn drain_where(
        &self,
        scratch: &mut Vec<u8>,
        mut take: impl FnMut(&[u8]) -> bool,
        mut f: impl FnMut(u64, &[u8]),
    ) -> usize {
        let (mut count, mut passed) = (0, 0);
        let mut tail = self.header.tail.load(Ordering::Relaxed);
        let head = self.header.head.load(Ordering::Acquire);
        let mut pos = tail;
        // Whether every record from the tail to `pos` has been taken.
        let mut prefix = true;
        while pos < head {
            let first = self.word(pos).load(Ordering::Acquire);
            let need = first & !(READY | TAKEN);
            if need < RECORD_HEADER_WORDS || pos + need > head {
                break; // (a reserved record always has its length: never)
            }
            if first & READY == 0 {
                // Still being written: left in place like a record not
                // taken, and passed (its length was stored before `head`).
                // Its writer has not left the commit fence, so nothing
                // behind it that is taken can have committed after it.
                prefix = false;
                pos += need;
                continue;
            }
            if first & TAKEN == 0 {
                let len = self.word(pos + 2).load(Ordering::Relaxed) as usize;
                self.copy_payload(pos, len.min(PEEK_BYTES), scratch);
                if take(scratch) {
                    let seq = self.word(pos + 1).load(Ordering::Relaxed);
                    self.copy_payload(pos, len, scratch);
                    f(seq, scratch);
                    count += 1;
                    if !prefix {
                        // (only the reader writes a ready record's first word)
                        self.word(pos).store(first | TAKEN, Ordering::Relaxed);
                    }
                } else {
                    prefix = false;
                }
            }
            if prefix {
                // Clear the state word so a stale READY is never read again.
                self.word(pos).store(0, Ordering::Relaxed);
                tail = pos + need;
                passed += 1;
                // Space goes back to writers now and then, not per record:
                // the tail's cache line stays with the reader meanwhile.
                if passed % 64 == 0 {
                    self.header.tail.store(tail, Ordering::Release);
                }
            }
            pos += need;
        }
        self.header.tail.store(tail, Ordering::Release);
        count
    }

    /// Copies the first `len` payload bytes of the record at `pos` into
    /// `out` (cleared first).
    fn copy_payload(&self, pos: u64, len: usize, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(len.div_ceil(8) * 8);
        let start = self.index(pos + RECORD_HEADER_WORDS);
        let words = self.words[start..].iter().chain(self.words.iter());
        for word in words.take(len.div_ceil(8)) {
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
    }

    /// Bytes reserved and not yet consumed.
    pub fn used_bytes(&self) -> usize {
        let head = self.header.head.load(Ordering::Acquire);
        let tail = self.header.tail.load(Ordering::Acquire);
        ((head - tail) * 8) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Owned {
        header: RingHeader,
        words: Vec<AtomicU64>,
    }

    fn owned(words: usize) -> Arc<Owned> {
        Arc::new(Owned {
            header: RingHeader::default(),
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn ring(o: &Owned) -> ChangeRing<'_> {
        ChangeRing::new(&o.header, &o.words)
    }

    #[test]
    fn round_trip_in_order() {
        let o = owned(64);
        let r = ring(&o);
        assert_eq!(r.publish(b"hello"), Ok(0));
        assert_eq!(r.publish(b""), Ok(1));
        assert_eq!(r.publish(&[7u8; 17]), Ok(2));
        let mut got = Vec::new();
        assert_eq!(r.drain(&mut Vec::new(), |seq, p| got.push((seq, p.to_vec()))), 3);
        assert_eq!(got, vec![(0, b"hello".to_vec()), (1, vec![]), (2, vec![7u8; 17])]);
        assert_eq!(r.used_bytes(), 0);
        assert_eq!(r.drain(&mut Vec::new(), |_, _| panic!("nothing left")), 0);
    }

    #[test]
    fn full_and_too_large_never_block() {
        let o = owned(16);
        let r = ring(&o);
        assert_eq!(r.publish(&[0u8; 14 * 8]), Err(PublishError::TooLarge));
        assert_eq!(r.publish(&[1u8; 64]), Ok(0)); // 3 + 8 = 11 words
        assert_eq!(r.publish(&[2u8; 24]), Err(PublishError::Full)); // 3 + 3 = 6 > 5 free
        assert_eq!(r.publish(&[3u8; 16]), Ok(1)); // exactly fills
        let mut n = 0;
        r.drain(&mut Vec::new(), |_, _| n += 1);
        assert_eq!(n, 2);
        // space is back, and records wrap around the end
        for i in 0..20u8 {
            assert_eq!(r.publish(&[i; 40]), Ok(2 + i as u64));
            let mut got = None;
            r.drain(&mut Vec::new(), |_, p| got = Some(p.to_vec()));
            assert_eq!(got, Some(vec![i; 40]));
        }
    }

    #[test]
    fn losses_are_counted_per_relation() {
        let o = owned(16);
        let r = ring(&o);
        r.record_loss([10, 11]);
        r.record_loss([10]);
        let losses = r.take_losses();
        assert_eq!(losses.records, 2);
        assert_eq!(losses.relations, vec![10, 11]);
        assert!(!losses.all);
        assert_eq!(r.take_losses(), Losses::default());
        r.record_loss(1..=(LOST_RELATIONS as u32 + 1));
        let losses = r.take_losses();
        assert!(losses.all);
        assert_eq!(losses.relations.len(), LOST_RELATIONS);
    }

    /// Records left in the ring stay there, in place, until taken; those
    /// taken past them are not handed out again; the space comes back once
    /// the records before it are taken; and a ring full behind a left
    /// record refuses writers, as any full ring does.
    #[test]
    fn records_left_in_place_are_taken_later_and_only_once() {
        let o = owned(32);
        let r = ring(&o);
        for payload in [b"a1", b"b2", b"c3"] {
            r.publish(payload).unwrap();
        }
        let used = r.used_bytes();
        let mut got = Vec::new();
        let not_a = |peek: &[u8]| peek != b"a1";
        assert_eq!(
            r.drain_where(&mut Vec::new(), not_a, |seq, p| got.push((seq, p.to_vec()))),
            2
        );
        assert_eq!(got, vec![(1, b"b2".to_vec()), (2, b"c3".to_vec())]);
        assert_eq!(r.used_bytes(), used, "nothing is given back while a1 stays");
        // full behind it: 3 records of 4 words in 32, and room for 5 more
        let mut accepted = 0;
        while r.publish(&[7; 8]).is_ok() {
            accepted += 1;
        }
        assert_eq!(accepted, 5);
        got.clear();
        assert_eq!(r.drain(&mut Vec::new(), |seq, p| got.push((seq, p.to_vec()))), 6);
        assert_eq!(got[0], (0, b"a1".to_vec()));
        assert_eq!(
            got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            vec![0, 3, 4, 5, 6, 7]
        );
        assert_eq!(r.used_bytes(), 0);
        assert_eq!(r.publish(b"again"), Ok(8));
    }

    /// A record still being written does not stop the drain: the ready
    /// ones behind it are taken, and it is taken once ready.
    #[test]
    fn a_record_being_written_is_passed_over_not_waited_for() {
        let o = owned(64);
        let r = ring(&o);
        r.publish(b"a").unwrap();
        r.publish(b"b").unwrap();
        r.publish(b"c").unwrap();
        // b's writer has not finished copying: its state word lacks READY
        let b_at = RECORD_HEADER_WORDS + 1;
        r.word(b_at).fetch_and(!READY, Ordering::Relaxed);
        let mut got = Vec::new();
        assert_eq!(r.drain(&mut Vec::new(), |_, p| got.push(p.to_vec())), 2);
        assert_eq!(got, vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(r.used_bytes() > 0, "b's space and what follows stay reserved");
        r.word(b_at).fetch_or(READY, Ordering::Release);
        got.clear();
        assert_eq!(r.drain(&mut Vec::new(), |_, p| got.push(p.to_vec())), 1);
        assert_eq!(got, vec![b"b".to_vec()]);
        assert_eq!(r.used_bytes(), 0);
    }

    /// `take` sees at most PEEK_BYTES of a payload.
    #[test]
    fn take_sees_the_head_of_each_record() {
        let o = owned(64);
        let r = ring(&o);
        r.publish(&[1; 40]).unwrap();
        r.publish(b"short").unwrap();
        let mut seen = Vec::new();
        r.drain_where(
            &mut Vec::new(),
            |peek| {
                seen.push(peek.to_vec());
                true
            },
            |_, _| {},
        );
        assert_eq!(seen, vec![vec![1; PEEK_BYTES], b"short".to_vec()]);
    }

    /// A reader that takes the losses while a writer is between noting the
    /// relations and counting the record still tells the relations'
    /// subscribers; the count, read later, asks nothing more.
    #[test]
    fn a_loss_taken_half_recorded_still_needs_notice() {
        let o = owned(16);
        let r = ring(&o);
        // the writer's first half: the relation, not yet the count
        assert!(r.note_lost_relation(10));
        let losses = r.take_losses();
        assert_eq!((losses.records, losses.relations.clone()), (0, vec![10]));
        assert!(losses.needs_notice());
        // the second half, taken on the next drain
        r.header.lost_records.fetch_add(1, Ordering::Release);
        let losses = r.take_losses();
        assert_eq!(losses.records, 1);
        assert!(!losses.needs_notice());
        // a whole loss
        r.record_loss([11]);
        assert!(r.take_losses().needs_notice());
    }

    /// Many writers, one reader: every record arrives whole, exactly once,
    /// each writer's in its order; a writer that finds the ring full waits.
    #[test]
    fn concurrent_writers_one_reader() {
        let o = owned(256);
        let writers: Vec<_> = (0..4u8)
            .map(|w| {
                let o = o.clone();
                std::thread::spawn(move || {
                    let r = ring(&o);
                    let mut written = 0u64;
                    for i in 0..2000u32 {
                        let mut payload = vec![w; 3 + (i % 29) as usize];
                        payload.extend_from_slice(&i.to_le_bytes());
                        loop {
                            match r.publish(&payload) {
                                Ok(_) => {
                                    written += 1;
                                    break;
                                }
                                Err(PublishError::Full) => std::thread::yield_now(),
                                Err(e) => panic!("{e:?}"),
                            }
                        }
                    }
                    written
                })
            })
            .collect();
        let r = ring(&o);
        let mut seen = std::collections::HashSet::new();
        let mut per_writer = [0u32; 4];
        let mut received = 0;
        let mut scratch = Vec::new();
        while received < 8000 {
            // (a record still being written is passed over and taken on a
            // later drain: each writer's own records stay in its order)
            r.drain(&mut scratch, |seq, p| {
                assert!(seen.insert(seq), "record {seq} twice");
                let w = p[0] as usize;
                let i = u32::from_le_bytes(p[p.len() - 4..].try_into().unwrap());
                assert_eq!(i, per_writer[w], "writer {w} out of order");
                assert!(p[..p.len() - 4].iter().all(|b| *b as usize == w), "torn record");
                per_writer[w] += 1;
                received += 1;
            });
            std::thread::yield_now();
        }
        let written: u64 = writers.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(written, 8000);
        assert_eq!(per_writer, [2000; 4]);
    }
}
