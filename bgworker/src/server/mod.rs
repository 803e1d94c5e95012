//! The WebSocket server: a listener per bound address, a handler per
//! connection, and one shutdown signal for all of them. `run` takes already
//! bound listeners, so tests bind `127.0.0.1:0` and the extension binds on
//! its main thread where errors can be reported to Postgres.

mod connection;
pub mod fanout;
mod handshake;
mod hub;
pub mod link;

use crate::jwt::Verifier;
use crate::stats::Counters;
use futures_util::FutureExt;
use hub::Hub;
use link::MainLink;
use parking_lot::RwLock;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Settings that a configuration reload may change while clients stay
/// connected.
#[derive(Debug)]
pub struct Settings {
    pub verifier: Verifier,
    /// Open WebSocket connections allowed at once.
    pub max_connections: usize,
    /// Channels one connection may join.
    pub max_channels_per_connection: usize,
}

/// Fixed properties of a server instance.
#[derive(Debug, Clone)]
pub struct Options {
    /// Largest frame or message accepted; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// A socket silent this long is closed.
    pub idle_timeout: Duration,
    /// How long a closing socket may take to answer our close frame.
    pub close_grace: Duration,
    /// How long a client may take to complete the HTTP upgrade.
    pub handshake_timeout: Duration,
    /// Messages that may wait for one connection (broadcasts and
    /// postgres_changes); past that they are dropped and the channel told.
    pub outbound_queue: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_frame_bytes: 5_000_000,
            idle_timeout: Duration::from_secs(60),
            close_grace: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(10),
            outbound_queue: 100_000,
        }
    }
}

/// What every connection shares.
pub struct Context {
    settings: RwLock<Arc<Settings>>,
    options: Options,
    counters: &'static Counters,
    open: AtomicUsize,
    next_id: AtomicU64,
    hub: Hub,
    /// The worker's main thread, for `postgres_changes`; without it (unit
    /// tests of the protocol alone) such joins are refused.
    main: Option<MainLink>,
}

impl Context {
    pub fn new(
        settings: Settings,
        options: Options,
        counters: &'static Counters,
        main: Option<MainLink>,
    ) -> Arc<Context> {
        Arc::new(Context {
            main,
            settings: RwLock::new(Arc::new(settings)),
            options,
            counters,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            hub: Hub::default(),
        })
    }

    /// Applies reloaded settings; connections and channels stay as they are,
    /// later handshakes, joins and token refreshes use the new ones.
    pub fn update_settings(&self, settings: Settings) {
        *self.settings.write() = Arc::new(settings);
    }

    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    pub fn counters(&self) -> &'static Counters {
        self.counters
    }
}

/// Serves every listener until `shutdown` turns true (or its sender is
/// dropped), then closes every connection with 1001 and returns once they
/// have all finished.
pub async fn run(listeners: Vec<TcpListener>, ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    // Each connection holds a clone of `done_tx`; when the last one is
    // dropped, `done_rx` yields `None` and every connection has finished.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let accepts: Vec<_> = listeners
        .into_iter()
        .map(|listener| tokio::spawn(accept_loop(listener, ctx.clone(), shutdown.clone(), done_tx.clone())))
        .collect();
    drop(done_tx);
    for accept in accepts {
        let _ = accept.await;
    }
    let _ = done_rx.recv().await;
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(50);
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let served = AssertUnwindSafe(connection::serve(stream, peer, ctx.clone(), shutdown))
                        .catch_unwind()
                        .await;
                    if served.is_err() {
                        Counters::incr(&ctx.counters.network_panics);
                        tracing::error!(%peer, "a panic ended this connection; the server goes on");
                    }
                    drop(done);
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Keeps the open-connection count and gauge right however a connection ends.
struct ConnectionSlot {
    ctx: Arc<Context>,
}

impl ConnectionSlot {
    /// Takes a slot if fewer than `max` connections are open.
    fn acquire(ctx: &Arc<Context>, max: usize) -> Option<ConnectionSlot> {
        ctx.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()?;
        Counters::incr(&ctx.counters.connections_open);
        Counters::incr(&ctx.counters.connections_total);
        Some(ConnectionSlot { ctx: ctx.clone() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.ctx.open.fetch_sub(1, Ordering::AcqRel);
        Counters::decr(&self.ctx.counters.connections_open);
    }
}

#[cfg(test)]
mod tests;
