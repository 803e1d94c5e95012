//! A connection's queue of messages from others (broadcasts from other
//! sockets, postgres_changes from the main thread), bounded in bytes.
//!
//! - Each queue by `pg_realtime.max_pending_bytes`: what waits for one
//!   connection, counting each message whole.
//! - All queues together by `pg_realtime.max_pending_bytes_total` (a
//!   [`Budget`]): the memory held, counting a message (or a payload) shared
//!   by many queues once, through its [`Charge`].
//!
//! A queue over its limit, or the one furthest behind while all together
//! are over theirs, is *overflowed*: it is emptied at once (its messages'
//! memory is let go, whatever its connection is doing), takes nothing
//! more, and its connection tells the client and closes. A sender never
//! blocks and never waits for a client.

use crate::server::protocol::Outbound;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

/// How far past its limit a queue may go for the notices that say changes
/// were lost (`force`): they must get through, but not without bound.
pub const NOTICE_ALLOWANCE: usize = 64 * 1024;

/// The share of `pg_realtime.max_pending_bytes_total` that buffers outside
/// the queues (HTTP bodies being read) may reserve, besides it.
const RESERVABLE_SHARE: usize = 4;

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

/// The byte limits every queue shares, and the memory held.
#[derive(Debug)]
pub struct Budget {
    per_queue: AtomicUsize,
    total_limit: AtomicUsize,
    /// Bytes of every [`Charge`] some queue holds.
    total: AtomicUsize,
    /// Bytes reserved for buffers outside the queues ([`Budget::reserve`]),
    /// at most `RESERVABLE_SHARE` of the total limit, apart from `total`:
    /// they never make a queue overflow.
    reserved: AtomicUsize,
    queues: Mutex<HashMap<u64, Weak<Queue>>>,
    next_id: AtomicU64,
}

/// Bytes counted against the total while some queue holds a message that
/// carries them: one charge may be shared by the copies of a message (or
/// of a payload) queued for many connections, and counts once, from the
/// first copy queued until the last one leaves its queue. (Its creator
/// holding it does not count: a batch of frames being built is not
/// memory the queues hold.)
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
    holders: AtomicUsize,
}

/// One queue's hold on a charge.
#[derive(Debug)]
struct Hold(Arc<Charge>);

impl Hold {
    fn new(charge: &Arc<Charge>) -> Hold {
        if charge.holders.fetch_add(1, Ordering::AcqRel) == 0 {
            charge.budget.total.fetch_add(charge.bytes, Ordering::AcqRel);
        }
        Hold(charge.clone())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let charge = &self.0;
        if charge.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
            charge.budget.total.fetch_sub(charge.bytes, Ordering::AcqRel);
        }
    }
}

type Item = (Arc<Outbound>, usize, Hold);

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Item>,
    /// What the items weigh (`Outbound::weight`), each counted whole.
    bytes: usize,
    overflow: Option<Overflow>,
    closed: bool,
}

#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
    /// Pushed to and not woken yet: in some `LaterWakes`.
    wake_later: AtomicBool,
}

impl Queue {
    /// Marks the queue overflowed (unless it is closed or already is) and
    /// empties it; wakes its connection. The items are dropped after the
    /// lock is let go.
    fn overflow(&self, why: Overflow) {
        let dropped = {
            let mut state = self.state.lock();
            if state.overflow.is_some() || state.closed {
                return;
            }
            state.overflow = Some(why);
            state.bytes = 0;
            std::mem::take(&mut state.items)
        };
        drop(dropped);
        self.wake.notify_one();
    }
}

impl Budget {
    pub fn new(per_queue: usize, total: usize) -> Arc<Budget> {
        Arc::new(Budget {
            per_queue: AtomicUsize::new(per_queue),
            total_limit: AtomicUsize::new(total),
            total: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// New limits (a configuration reload); queues over them overflow on
    /// their next message.
    pub fn set_limits(&self, per_queue: usize, total: usize) {
        self.per_queue.store(per_queue, Ordering::Relaxed);
        self.total_limit.store(total, Ordering::Relaxed);
        // (a queue waiting for its batch may now be past the quarter of a
        // lower limit, a mark no later push will cross: woken now)
        let queues: Vec<Arc<Queue>> = self.queues.lock().values().filter_map(Weak::upgrade).collect();
        for queue in queues {
            queue.wake.notify_one();
        }
    }

    /// Bytes held now by queued messages, each shared one once.
    pub fn pending_bytes(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// A charge of `bytes`, for messages to queue: it counts against the
    /// total while a queue holds one of them.
    pub fn charge(self: &Arc<Budget>, bytes: usize) -> Arc<Charge> {
        Arc::new(Charge {
            budget: self.clone(),
            bytes,
            holders: AtomicUsize::new(0),
        })
    }

    /// Reserves `bytes` for a buffer no queue holds (an HTTP body being
    /// read), if they fit in the reservable share (a quarter of the total
    /// limit, apart from what the queues hold: reservations never make a
    /// queue overflow); counted until the reservation is dropped.
    pub fn reserve(self: &Arc<Budget>, bytes: usize) -> Option<Reservation> {
        let limit = self.total_limit.load(Ordering::Relaxed) / RESERVABLE_SHARE;
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r.saturating_add(bytes) <= limit).then_some(r + bytes)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// A new queue under this budget.
    pub fn queue(self: &Arc<Budget>) -> (FanoutSender, FanoutReceiver) {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Notify::new(),
            wake_later: AtomicBool::new(false),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.queues.lock().insert(id, Arc::downgrade(&queue));
        (
            FanoutSender {
                queue: queue.clone(),
                budget: self.clone(),
            },
            FanoutReceiver {
                queue,
                budget: self.clone(),
                id,
            },
        )
    }

    /// While the memory held is over the total limit, overflows the queue
    /// furthest behind (which lets go of what only it held).
    fn evict(&self) {
        // (the map's lock, then one queue's at a time; overflow() takes
        // only the queue's)
        let queues: Vec<Arc<Queue>> = self.queues.lock().values().filter_map(Weak::upgrade).collect();
        while self.total.load(Ordering::Acquire) > self.total_limit.load(Ordering::Relaxed) {
            let furthest = queues
                .iter()
                .map(|q| (q.state.lock().bytes, q))
                .filter(|(bytes, _)| *bytes > 0)
                .max_by_key(|(bytes, _)| *bytes);
            match furthest {
                Some((_, queue)) => queue.overflow(Overflow::Total),
                None => break,
            }
        }
    }
}

/// Bytes of the total held outside the queues (`Budget::reserve`).
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The sending side; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct FanoutSender {
    queue: Arc<Queue>,
    budget: Arc<Budget>,
}

impl FanoutSender {
    /// Queues a message, charged whole against the total; a queue it would
    /// take over its limit overflows instead (`Full`).
    pub fn send(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        let charge = self.budget.charge(message.weight());
        self.push(message, charge, 0)
    }

    /// Queues a message whose bytes are already charged (`charge`, shared
    /// with the other connections it goes to).
    pub fn send_shared(&self, message: Arc<Outbound>, charge: &Arc<Charge>) -> Result<(), FanoutError> {
        self.push(message, charge.clone(), 0)
    }

    /// `send_shared`, its connection woken by `later` (with the others of
    /// the pass) rather than at once.
    pub fn send_shared_later(
        &self,
        message: Arc<Outbound>,
        charge: &Arc<Charge>,
        later: &mut LaterWakes,
    ) -> Result<(), FanoutError> {
        let size = message.weight();
        self.push_waking(message, size, charge.clone(), 0, Some(later))
    }

    /// `send_shared` of one message that weighs `size` (computed once for
    /// every queue it goes to).
    pub fn send_shared_sized(
        &self,
        message: Arc<Outbound>,
        size: usize,
        charge: &Arc<Charge>,
    ) -> Result<(), FanoutError> {
        self.push_sized(message, size, charge.clone(), 0)
    }

    /// Queues a message that may take the queue past its limit by its own
    /// size (a join's `presence_state`, which must reach the joiner
    /// however large the topic): still charged against the total.
    pub fn send_allowing_itself(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        let size = message.weight();
        let charge = self.budget.charge(size);
        self.push_sized(message, size, charge, size)
    }

    /// Drops what waits for `topic` (a channel that left): nothing queued
    /// for an old join reaches the topic's next one.
    pub fn purge_topic(&self, topic: &str) {
        let dropped: Vec<Item> = {
            let mut state = self.queue.state.lock();
            let (keep, drop): (VecDeque<Item>, VecDeque<Item>) = std::mem::take(&mut state.items)
                .into_iter()
                .partition(|(m, ..)| m.topic() != topic);
            state.items = keep;
            state.bytes -= drop.iter().map(|(_, size, _)| size).sum::<usize>();
            drop.into_iter().collect()
        };
        // (the charges are let go outside the queue's lock)
        std::mem::drop(dropped);
    }

    /// Queues even a little past the limit (`NOTICE_ALLOWANCE`): for the
    /// notices that say messages were lost.
    pub fn force(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        let charge = self.budget.charge(message.weight());
        self.push(message, charge, NOTICE_ALLOWANCE)
    }

    /// A charge against the total, for a payload shared by many messages.
    pub fn charge(&self, bytes: usize) -> Arc<Charge> {
        self.budget.charge(bytes)
    }

    fn push(&self, message: Arc<Outbound>, charge: Arc<Charge>, allowance: usize) -> Result<(), FanoutError> {
        let size = message.weight();
        self.push_sized(message, size, charge, allowance)
    }

    fn push_sized(
        &self,
        message: Arc<Outbound>,
        size: usize,
        charge: Arc<Charge>,
        allowance: usize,
    ) -> Result<(), FanoutError> {
        self.push_waking(message, size, charge, allowance, None)
    }

    /// Queues; wakes the connection now, or through `later`.
    fn push_waking(
        &self,
        message: Arc<Outbound>,
        size: usize,
        charge: Arc<Charge>,
        allowance: usize,
        later: Option<&mut LaterWakes>,
    ) -> Result<(), FanoutError> {
        let filling = {
            let mut state = self.queue.state.lock();
            if state.closed {
                return Err(FanoutError::Closed);
            }
            if state.overflow.is_some() {
                return Err(FanoutError::Full);
            }
            let limit = self.budget.per_queue.load(Ordering::Relaxed).saturating_add(allowance);
            if state.bytes.saturating_add(size) > limit {
                drop(state);
                self.queue.overflow(Overflow::Connection);
                return Err(FanoutError::Full);
            }
            let mark = limit / LaterWakes::WAKE_AT_FRACTION_OF_LIMIT;
            let below = state.bytes <= mark;
            state.bytes += size;
            state.items.push_back((message, size, Hold::new(&charge)));
            // A queue filling up is woken now, not with its batch: left
            // to wait, it could pass its limit before its connection ran.
            // (Once, as it passes the mark: a connection woken takes all
            // there is before it waits again, so it waits only on a queue
            // emptied, below the mark.)
            below && state.bytes > mark
        };
        match later {
            Some(later) if !filling => later.note(&self.queue),
            _ => self.queue.wake.notify_one(),
        }
        if self.budget.total.load(Ordering::Acquire) > self.budget.total_limit.load(Ordering::Relaxed) {
            self.budget.evict();
            // (this very queue may have been the one furthest behind)
            if self.queue.state.lock().overflow.is_some() {
                return Err(FanoutError::Full);
            }
        }
        Ok(())
    }

    /// Bytes waiting in this queue now.
    pub fn pending_bytes(&self) -> usize {
        self.queue.state.lock().bytes
    }
}

/// Connections whose queues got messages of one delivery pass and are not
/// woken yet: woken together when enough has gathered (`due`) and at the
/// latest when this is dropped, so that a connection receiving many
/// messages of a pass is woken for a batch of them, not for each (each
/// wake of a parked network thread is a system call and a task switch).
/// A queue passing a quarter of its limit is woken at once instead.
#[derive(Default)]
pub struct LaterWakes {
    queues: Vec<Arc<Queue>>,
    pushes: usize,
}

impl LaterWakes {
    /// Pushes per waiting queue (at least `MIN_PUSHES` in all) after which
    /// they are woken: a connection is woken for about this many.
    const PUSHES_PER_QUEUE: usize = 16;
    const MIN_PUSHES: usize = 4096;
    /// A queue holding more than its limit divided by this is woken at
    /// once instead.
    const WAKE_AT_FRACTION_OF_LIMIT: usize = 4;

    fn note(&mut self, queue: &Arc<Queue>) {
        if !queue.wake_later.swap(true, Ordering::AcqRel) {
            self.queues.push(queue.clone());
        }
        self.pushes += 1;
    }

    /// Whether enough is waiting to wake the connections now.
    pub fn due(&self) -> bool {
        self.pushes >= (Self::PUSHES_PER_QUEUE * self.queues.len()).max(Self::MIN_PUSHES)
    }

    /// Wakes every connection noted since the last time.
    pub fn wake(&mut self) {
        for queue in self.queues.drain(..) {
            queue.wake_later.store(false, Ordering::Release);
            queue.wake.notify_one();
        }
        self.pushes = 0;
    }
}

impl Drop for LaterWakes {
    fn drop(&mut self) {
        self.wake();
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
    queue: Arc<Queue>,
    budget: Arc<Budget>,
    id: u64,
}

impl FanoutReceiver {
    /// The next message, or that the queue overflowed (from then on,
    /// always that).
    pub async fn recv(&mut self) -> Received {
        loop {
            // (a notify between this look and the wait leaves a permit)
            if let Some(received) = self.take() {
                return received;
            }
            self.queue.wake.notified().await;
        }
    }

    /// The next message if one is waiting now (None: none, or the queue
    /// overflowed, which `recv` then reports).
    pub fn try_recv(&mut self) -> Option<Arc<Outbound>> {
        match self.take()? {
            Received::Message(m) => Some(m),
            Received::Overflowed(_) => None,
        }
    }

    fn take(&mut self) -> Option<Received> {
        let item = {
            let mut state = self.queue.state.lock();
            if let Some(why) = state.overflow {
                return Some(Received::Overflowed(why));
            }
            let item = state.items.pop_front()?;
            state.bytes -= item.1;
            item
        };
        // (its charge goes when `item` does, outside the lock)
        Some(Received::Message(item.0))
    }

    /// This queue's budget (tests).
    #[cfg(test)]
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

/// However the connection ends, what waits for it is let go.
impl Drop for FanoutReceiver {
    fn drop(&mut self) {
        let dropped = {
            let mut state = self.queue.state.lock();
            state.bytes = 0;
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        drop(dropped);
        self.budget.queues.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
