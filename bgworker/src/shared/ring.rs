//! The change ring: many committing backends write, the realtime worker
//! reads. It lives in shared memory as a header and an array of 64-bit words;
//! all access is through atomics, so this code is safe Rust and is tested
//! here with threads standing in for backends.
//!
//! Writers reserve space under a short spin lock (a few loads and stores),
//! copy their record outside it, then mark it ready. The reader takes records
//! in reservation order and stops at the first one not yet ready: its writer
//! wakes the reader again when it is done. A writer never waits for the
//! reader: when the ring is full the record is refused and the loss is
//! recorded, so a commit is never blocked or failed (`docs/architecture.md`, invariant 4).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Set in a record's first word once its payload is complete.
const READY: u64 = 1 << 63;
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
        // Not ready yet: the reader stops here until the copy is done.
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

    /// Notes that a record touching `relations` was lost.
    pub fn record_loss(&self, relations: impl IntoIterator<Item = u32>) {
        self.header.lost_records.fetch_add(1, Ordering::Relaxed);
        for rel in relations {
            if !self.note_lost_relation(rel) {
                self.header.lost_all.store(1, Ordering::Release);
            }
        }
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

    /// Hands every ready record, in order, to `f` (sequence number, payload);
    /// stops at the first record still being written. Reader only. Each
    /// payload is copied out into `scratch`, which the caller keeps from
    /// drain to drain: no allocation per record.
    pub fn drain(&self, scratch: &mut Vec<u8>, mut f: impl FnMut(u64, &[u8])) -> usize {
        let mut count = 0;
        let mut tail = self.header.tail.load(Ordering::Relaxed);
        let head = self.header.head.load(Ordering::Acquire);
        while tail < head {
            let first = self.word(tail).load(Ordering::Acquire);
            if first & READY == 0 {
                break;
            }
            let need = first & !READY;
            let seq = self.word(tail + 1).load(Ordering::Relaxed);
            let len = self.word(tail + 2).load(Ordering::Relaxed) as usize;
            scratch.clear();
            scratch.reserve(len.div_ceil(8) * 8);
            let start = self.index(tail + RECORD_HEADER_WORDS);
            let words = self.words[start..].iter().chain(self.words.iter());
            for word in words.take(len.div_ceil(8)) {
                scratch.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
            scratch.truncate(len);
            // Clear the state word so a stale READY is never read again.
            self.word(tail).store(0, Ordering::Relaxed);
            tail += need;
            count += 1;
            // Space goes back to writers now and then, not per record: the
            // tail's cache line stays with the reader meanwhile.
            if count % 64 == 0 {
                self.header.tail.store(tail, Ordering::Release);
            }
            f(seq, scratch);
        }
        self.header.tail.store(tail, Ordering::Release);
        count
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

    /// Many writers, one reader: every record arrives whole, exactly once,
    /// and in sequence order; a writer that finds the ring full counts a loss.
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
        let mut last_seq = None;
        let mut per_writer = [0u32; 4];
        let mut received = 0;
        let mut scratch = Vec::new();
        while received < 8000 {
            r.drain(&mut scratch, |seq, p| {
                if let Some(last) = last_seq {
                    assert_eq!(seq, last + 1, "sequence gap");
                }
                last_seq = Some(seq);
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
