//! A connection's queue of messages from others (broadcasts from other
//! sockets, postgres_changes from the main thread). Unbounded in type but
//! bounded in use: senders give up once `limit` messages wait, so a stalled
//! client costs bounded memory, and the sender learns it so it can say so.

use crate::protocol::Outbound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The sending side; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct FanoutSender {
    tx: mpsc::UnboundedSender<Arc<Outbound>>,
    pending: Arc<AtomicUsize>,
    limit: usize,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum FanoutError {
    /// `limit` messages are waiting already.
    Full,
    /// The connection is gone.
    Closed,
}

pub struct FanoutReceiver {
    rx: mpsc::UnboundedReceiver<Arc<Outbound>>,
    pending: Arc<AtomicUsize>,
}

pub fn fanout(limit: usize) -> (FanoutSender, FanoutReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    (
        FanoutSender {
            tx,
            pending: pending.clone(),
            limit,
        },
        FanoutReceiver { rx, pending },
    )
}

impl FanoutSender {
    pub fn send(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        if self.pending.load(Ordering::Relaxed) >= self.limit {
            return Err(FanoutError::Full);
        }
        self.force(message)
    }

    /// Queues even past the limit: for the one notice that says messages
    /// were dropped.
    pub fn force(&self, message: Arc<Outbound>) -> Result<(), FanoutError> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.tx.send(message).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            FanoutError::Closed
        })
    }

    /// Messages waiting now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

impl FanoutReceiver {
    pub async fn recv(&mut self) -> Option<Arc<Outbound>> {
        let message = self.rx.recv().await?;
        self.pending.fetch_sub(1, Ordering::Relaxed);
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Arc<Outbound> {
        Arc::new(Outbound::close("1", "realtime:t"))
    }

    #[tokio::test]
    async fn limit_and_force() {
        let (tx, mut rx) = fanout(2);
        assert_eq!(tx.send(msg()), Ok(()));
        assert_eq!(tx.send(msg()), Ok(()));
        assert_eq!(tx.send(msg()), Err(FanoutError::Full));
        assert_eq!(tx.force(msg()), Ok(()));
        assert_eq!(tx.pending(), 3);
        rx.recv().await.unwrap();
        assert_eq!(tx.pending(), 2);
        drop(rx);
        assert_eq!(tx.force(msg()), Err(FanoutError::Closed));
    }
}
