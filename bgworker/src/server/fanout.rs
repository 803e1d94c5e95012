//! A connection's queue of messages from others (broadcasts from other
//! sockets, postgres_changes from the main thread), bounded in bytes: each
//! queue by `pg_realtime.max_pending_bytes`, all of them together by
//! `pg_realtime.max_pending_bytes_total` (a [`Budget`]). A connection
//! whose queue goes over its limit, or the one furthest behind when all
//! together go over theirs, is *overflowed*: its queue takes nothing more,
//! what waits in it no longer counts, and its connection tells the client
//! and closes. A sender never blocks and never waits for a client.
//!
//! Bytes are counted per queue: a message queued for a hundred
//! connections counts a hundred times, since each connection serializes
//! and writes its own copy.

use crate::protocol::Outbound;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, Notify};

/// How far past its limit a queue may go for the notices that say changes
/// were lost (`force`): they must get through, but not without bound.
pub const NOTICE_ALLOWANCE: usize = 64 * 1024;

/// Why a queue overflowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Its own limit, `pg_realtime.max_pending_bytes`.
    Connection,
    /// All queues together went over `pg_realtime.max_pending_bytes_total`
    /// and this one was the furthest behind.
    Total,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum FanoutError {
    /// The queue overflowed (now, or before): its connection is closing.
    Full,
    /// The connection is gone.
    Closed,
}

/// The byte limits every queue shares, and their accounting.
#[derive(Debug)]
pub struct Budget {
    per_queue: AtomicUsize,
    total_limit: AtomicUsize,
    /// Bytes waiting in queues that have not overflowed.
    total: AtomicUsize,
    queues: Mutex<HashMap<u64, Weak<Queue>>>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct QueueState {
    bytes: usize,
    overflow: Option<Overflow>,
    closed: bool,
}

#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
}

impl Queue {
    /// Marks the queue overflowed (unless it is already) and takes its
    /// bytes out of the total; wakes its connection. Returns whether this
    /// call did it. Callers hold no queue lock.
    fn overflow(&self, budget: &Budget, why: Overflow) -> bool {
        let mut state = self.state.lock();
        if state.overflow.is_some() || state.closed {
            return false;
        }
        state.overflow = Some(why);
        budget.total.fetch_sub(state.bytes, Ordering::AcqRel);
        state.bytes = 0;
        drop(state);
        self.wake.notify_one();
        true
    }
}

impl Budget {
    pub fn new(per_queue: usize, total: usize) -> Arc<Budget> {
        Arc::new(Budget {
            per_queue: AtomicUsize::new(per_queue),
            total_limit: AtomicUsize::new(total),
            total: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// New limits (a configuration reload); queues over them overflow on
    /// their next message.
    pub fn set_limits(&self, per_queue: usize, total: usize) {
        self.per_queue.store(per_queue, Ordering::Relaxed);
        self.total_limit.store(total, Ordering::Relaxed);
    }

    /// Bytes waiting now, over all queues that have not overflowed.
    pub fn pending_bytes(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// A new queue under this budget.
    pub fn queue(self: &Arc<Budget>) -> (FanoutSender, FanoutReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.queues.lock().insert(id, Arc::downgrade(&queue));
        (
            FanoutSender {
                tx,
                queue: queue.clone(),
                budget: self.clone(),
            },
            FanoutReceiver {
                rx,
                queue,
                budget: self.clone(),
                id,
            },
        )
    }

    /// While all queues together are over the total limit, overflows the
    /// one furthest behind.
    fn evict(&self) {
        let queues = self.queues.lock();
        while self.total.load(Ordering::Acquire) > self.total_limit.load(Ordering::Relaxed) {
            let furthest = queues
                .values()
                .filter_map(Weak::upgrade)
                .map(|q| {
                    let bytes = q.state.lock().bytes;
                    (bytes, q)
                })
                .max_by_key(|(bytes, _)| *bytes);
            match furthest {
                Some((bytes, queue)) if bytes > 0 => {
                    queue.overflow(self, Overflow::Total);
                }
                _ => break,
            }
        }
    }
}

/// The sending side; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct FanoutSender {
    tx: mpsc::UnboundedSender<(Arc<Outbound>, usize)>,
    queue: Arc<Queue>,
    budget: Arc<Budget>,
}

impl FanoutSender {
    /// Queues a message; a queue it would take over its limit overflows
    /// instead (`Full`).
    pub fn send(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        self.push(message, 0)
    }

    /// Queues even a little past the limit (`NOTICE_ALLOWANCE`): for the
    /// notices that say messages were lost.
    pub fn force(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        self.push(message, NOTICE_ALLOWANCE)
    }

    fn push(&self, message: Arc<Outbound>, allowance: usize) -> Result<(), FanoutError> {
        let size = message.weight();
        let budget = &self.budget;
        let mut state = self.queue.state.lock();
        if state.closed {
            return Err(FanoutError::Closed);
        }
        if state.overflow.is_some() {
            return Err(FanoutError::Full);
        }
        let limit = budget.per_queue.load(Ordering::Relaxed).saturating_add(allowance);
        if state.bytes.saturating_add(size) > limit {
            drop(state);
            self.queue.overflow(budget, Overflow::Connection);
            return Err(FanoutError::Full);
        }
        if self.tx.send((message, size)).is_err() {
            return Err(FanoutError::Closed);
        }
        state.bytes += size;
        let total = budget.total.fetch_add(size, Ordering::AcqRel) + size;
        drop(state);
        if total > budget.total_limit.load(Ordering::Relaxed) {
            budget.evict();
        }
        Ok(())
    }

    /// Bytes waiting in this queue now.
    pub fn pending_bytes(&self) -> usize {
        self.queue.state.lock().bytes
    }
}

/// What a connection takes from its queue.
#[derive(Debug)]
pub enum Received {
    Message(Arc<Outbound>),
    /// The queue overflowed: tell the client and close.
    Overflowed(Overflow),
}

pub struct FanoutReceiver {
    rx: mpsc::UnboundedReceiver<(Arc<Outbound>, usize)>,
    queue: Arc<Queue>,
    budget: Arc<Budget>,
    id: u64,
}

impl FanoutReceiver {
    /// The next message, or that the queue overflowed (from then on,
    /// always that). None once every sender is gone.
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(why) = self.queue.state.lock().overflow {
                return Some(Received::Overflowed(why));
            }
            tokio::select! {
                biased;
                _ = self.queue.wake.notified() => continue,
                item = self.rx.recv() => {
                    let (message, size) = item?;
                    let mut state = self.queue.state.lock();
                    if state.overflow.is_some() {
                        // (its bytes no longer count)
                        return Some(Received::Overflowed(state.overflow.unwrap_or(Overflow::Connection)));
                    }
                    state.bytes -= size;
                    self.budget.total.fetch_sub(size, Ordering::AcqRel);
                    return Some(Received::Message(message));
                }
            }
        }
    }
}

impl FanoutReceiver {
    /// The next message if one is waiting now (None: none, or the queue
    /// overflowed, which `recv` then reports).
    pub fn try_recv(&mut self) -> Option<Arc<Outbound>> {
        let mut state = self.queue.state.lock();
        if state.overflow.is_some() {
            return None;
        }
        let (message, size) = self.rx.try_recv().ok()?;
        state.bytes -= size;
        self.budget.total.fetch_sub(size, Ordering::AcqRel);
        Some(message)
    }
}

/// However the connection ends, what waits for it stops counting.
impl Drop for FanoutReceiver {
    fn drop(&mut self) {
        {
            let mut state = self.queue.state.lock();
            if state.overflow.is_none() {
                self.budget.total.fetch_sub(state.bytes, Ordering::AcqRel);
            }
            state.bytes = 0;
            state.closed = true;
        }
        self.budget.queues.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Payload;

    /// A broadcast of about `bytes` bytes.
    fn msg(bytes: usize) -> Arc<Outbound> {
        Arc::new(Outbound::Broadcast {
            topic: "realtime:t".into(),
            event: "e".into(),
            metadata: None,
            payload: Payload::Binary(vec![0; bytes]),
        })
    }

    async fn next(rx: &mut FanoutReceiver) -> Received {
        rx.recv().await.expect("a sender is alive")
    }

    #[tokio::test]
    async fn a_queue_over_its_bytes_overflows_and_stops_counting() {
        let budget = Budget::new(10_000, 1 << 30);
        let (tx, mut rx) = budget.queue();
        assert_eq!(tx.send(msg(4_000)), Ok(()));
        assert_eq!(tx.send(msg(4_000)), Ok(()));
        assert!(budget.pending_bytes() >= 8_000);
        assert!(matches!(next(&mut rx).await, Received::Message(_)));
        assert_eq!(tx.send(msg(4_000)), Ok(()));
        // 8,000 + 4,000 waiting would pass 10,000
        assert_eq!(tx.send(msg(4_000)), Err(FanoutError::Full));
        assert_eq!(budget.pending_bytes(), 0);
        assert!(matches!(
            next(&mut rx).await,
            Received::Overflowed(Overflow::Connection)
        ));
        // from then on, nothing more is taken
        assert_eq!(tx.send(msg(1)), Err(FanoutError::Full));
        assert_eq!(tx.force(msg(1)), Err(FanoutError::Full));
        drop(rx);
        assert_eq!(tx.send(msg(1)), Err(FanoutError::Closed));
        assert_eq!(budget.pending_bytes(), 0);
    }

    #[tokio::test]
    async fn notices_may_pass_the_limit_by_the_allowance_only() {
        let budget = Budget::new(10_000, 1 << 30);
        let (tx, mut rx) = budget.queue();
        assert_eq!(tx.send(msg(9_000)), Ok(()));
        assert_eq!(tx.force(msg(NOTICE_ALLOWANCE / 2)), Ok(()));
        assert_eq!(tx.force(msg(NOTICE_ALLOWANCE)), Err(FanoutError::Full));
        assert!(matches!(next(&mut rx).await, Received::Overflowed(_)));
    }

    #[tokio::test]
    async fn over_the_total_the_queue_furthest_behind_goes_first() {
        let budget = Budget::new(100_000, 25_000);
        let (near, mut near_rx) = budget.queue();
        let (far, mut far_rx) = budget.queue();
        assert_eq!(far.send(msg(15_000)), Ok(()));
        assert_eq!(near.send(msg(5_000)), Ok(()));
        // 26,000 in all: the far queue (15,000) goes, the near one stays
        assert_eq!(near.send(msg(6_000)), Ok(()));
        assert!(matches!(next(&mut far_rx).await, Received::Overflowed(Overflow::Total)));
        assert!(budget.pending_bytes() < 25_000);
        assert!(matches!(next(&mut near_rx).await, Received::Message(_)));
        assert!(matches!(next(&mut near_rx).await, Received::Message(_)));
        assert_eq!(budget.pending_bytes(), 0);
    }

    #[tokio::test]
    async fn a_closed_connection_releases_what_waited_for_it() {
        let budget = Budget::new(100_000, 1 << 30);
        let (tx, rx) = budget.queue();
        assert_eq!(tx.send(msg(5_000)), Ok(()));
        assert!(budget.pending_bytes() >= 5_000);
        drop(rx);
        assert_eq!(budget.pending_bytes(), 0);
        assert_eq!(budget.queues.lock().len(), 0);
    }
}
