//! The WebSocket server: a listener per bound address, a handler per
//! connection, and one shutdown signal for all of them. `run` takes already
//! bound listeners, so tests bind `127.0.0.1:0` and the extension binds on
//! its main thread where errors can be reported to Postgres.

mod connection;
pub(crate) mod database;
pub mod errors;
pub mod fanout;
mod handshake;
mod http;
mod hub;
pub mod join;
pub mod jwt;
pub mod link;
pub mod log;
pub mod presence;
pub mod protocol;
pub mod rate;
pub mod replay;
pub mod runtime;
pub mod wake;

use crate::server::jwt::Verifier;
use crate::shared::stats::Counters;
use futures_util::FutureExt;
pub(crate) use handshake::query_param;
use hub::Hub;
use link::MainLink;
use parking_lot::RwLock;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Bytes a broadcast's or a track's payload may have over
/// `pg_realtime.max_payload_size`, as Supabase allows.
pub const PAYLOAD_SLACK: usize = 500;

/// Log lines a second about what clients do wrong (bad configs, frames
/// over the limit, slow writes), over all connections.
const LOG_LINES_PER_SECOND: u32 = 10;

/// Settings that a configuration reload may change while clients stay
/// connected.
#[derive(Debug)]
pub struct Settings {
    pub verifier: Verifier,
    /// Open WebSocket connections allowed at once.
    pub max_connections: usize,
    /// Channels one connection may join.
    pub max_channels_per_connection: usize,
    pub limits: Limits,
    /// For how long after the server started a postgres_changes join is
    /// told, after SUBSCRIBED, that changes committed before may not have
    /// been delivered (`pg_realtime.restart_notice_window`).
    pub restart_notice_window: Duration,
}

/// What one client may ask of the server, each a `pg_realtime.*`
/// setting (README, "Limits").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes that may wait to be sent to one connection.
    pub max_pending_bytes: usize,
    /// Bytes that may wait for all connections together.
    pub max_pending_bytes_total: usize,
    /// How long one write to a socket may take.
    pub write_timeout: Duration,
    /// Upgrades in progress (not yet authenticated) at once.
    pub max_pending_handshakes: usize,
    /// postgres_changes bindings in one join.
    pub max_bindings_per_join: usize,
    /// Conditions in one binding's filter.
    pub max_filter_conditions: usize,
    /// Conditions of all of one join's bindings together (each a cast the
    /// main thread runs).
    pub max_conditions_per_join: usize,
    /// Bytes of one binding's filter.
    pub max_filter_bytes: usize,
    /// Joins a second, per connection and over all of them.
    pub joins_per_second_per_connection: u32,
    pub joins_per_second: u32,
    /// Bytes of one broadcast's or presence track's payload (500 bytes of
    /// slack on top, as Supabase has).
    pub max_payload_bytes: usize,
    /// Broadcasts and presence messages a second one connection may send.
    pub messages_per_second_per_connection: u32,
    /// Presence messages a second one connection may send, and all of
    /// them together.
    pub presence_per_second_per_connection: u32,
    pub presence_per_second: u32,
    /// Bytes of one track's payload.
    pub max_presence_payload_bytes: usize,
    /// Bytes of presence state over all topics, and per connection.
    pub presence: presence::PresenceBounds,
    /// Messages a second over all HTTP broadcast requests.
    pub http_broadcasts_per_second: u32,
    /// What the replay store keeps of private broadcasts from the database.
    pub replay: replay::Bounds,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending_bytes: 16 << 20,
            max_pending_bytes_total: 512 << 20,
            write_timeout: Duration::from_secs(30),
            max_pending_handshakes: 1024,
            max_bindings_per_join: 100,
            max_filter_conditions: 16,
            max_conditions_per_join: 100,
            max_filter_bytes: 4096,
            joins_per_second_per_connection: 50,
            joins_per_second: 1000,
            max_payload_bytes: 3000 * 1024,
            messages_per_second_per_connection: 1000,
            presence_per_second_per_connection: 10,
            presence_per_second: 10_000,
            max_presence_payload_bytes: 64 << 10,
            presence: presence::PresenceBounds {
                max_bytes: 64 << 20,
                max_bytes_per_connection: 1 << 20,
            },
            http_broadcasts_per_second: 10_000,
            replay: replay::Bounds {
                max_messages: 10_000,
                max_bytes: 16 << 20,
                max_age_ms: 72 * 3600 * 1000,
            },
        }
    }
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
    /// How long a question to the main thread (a join's subscription, a
    /// private channel's permissions) waits for its answer.
    pub ask_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_frame_bytes: 5_000_000,
            idle_timeout: Duration::from_secs(60),
            close_grace: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(10),
            // realtime-js gives up on a join after 10 s
            ask_timeout: Duration::from_secs(8),
        }
    }
}

/// What every connection shares.
pub struct Context {
    settings: RwLock<Arc<Settings>>,
    options: Options,
    counters: &'static Counters,
    open: AtomicUsize,
    /// Upgrades accepted but not finished.
    handshaking: AtomicUsize,
    /// Sockets the process's file-descriptor limit leaves for clients
    /// (open connections and handshakes together); see `set_socket_capacity`.
    socket_capacity: AtomicUsize,
    next_id: AtomicU64,
    hub: Hub,
    presences: presence::Presences,
    replay: replay::ReplayStore,
    /// Bytes waiting for clients, per connection and in total.
    budget: Arc<fanout::Budget>,
    /// Joins a second over all connections.
    joins: rate::SharedBucket,
    /// Messages a second over all HTTP broadcasts.
    http_broadcasts: rate::SharedBucket,
    /// Presence messages a second over all connections.
    presence_rate: rate::SharedBucket,
    /// Log lines a second about what clients do wrong.
    log_lines: rate::SharedBucket,
    /// The worker's main thread, for `postgres_changes`; without it (unit
    /// tests of the protocol alone) such joins are refused.
    main: Option<MainLink>,
    /// When the server started: the wall-clock time clients are told, and
    /// the monotonic one the restart notice's window is measured from.
    started: (std::time::SystemTime, std::time::Instant),
}

impl Context {
    pub fn new(
        settings: Settings,
        options: Options,
        counters: &'static Counters,
        main: Option<MainLink>,
    ) -> Arc<Context> {
        let limits = &settings.limits;
        Arc::new(Context {
            main,
            budget: fanout::Budget::new(limits.max_pending_bytes, limits.max_pending_bytes_total),
            joins: rate::SharedBucket::new(limits.joins_per_second),
            http_broadcasts: rate::SharedBucket::new(limits.http_broadcasts_per_second),
            presence_rate: rate::SharedBucket::new(limits.presence_per_second),
            log_lines: rate::SharedBucket::new(LOG_LINES_PER_SECOND),
            settings: RwLock::new(Arc::new(settings)),
            options,
            counters,
            open: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            socket_capacity: AtomicUsize::new(usize::MAX),
            next_id: AtomicU64::new(1),
            hub: Hub::default(),
            presences: presence::Presences::default(),
            replay: replay::ReplayStore::default(),
            started: (std::time::SystemTime::now(), std::time::Instant::now()),
        })
    }

    /// The notice a postgres_changes join gets after SUBSCRIBED while the
    /// server is younger than `restart_notice_window`: what was committed
    /// while it was down cannot be delivered, and the protocol has no way
    /// to resume, so the client is told to refetch.
    pub fn restart_notice(&self) -> Option<String> {
        let (wall, monotonic) = self.started;
        if monotonic.elapsed() >= self.settings().restart_notice_window {
            return None;
        }
        let micros = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        Some(errors::restarted(micros))
    }

    /// Applies reloaded settings; connections and channels stay as they are,
    /// later handshakes, joins and token refreshes use the new ones.
    pub fn update_settings(&self, settings: Settings) {
        let limits = &settings.limits;
        self.budget
            .set_limits(limits.max_pending_bytes, limits.max_pending_bytes_total);
        *self.settings.write() = Arc::new(settings);
    }

    /// How many client sockets (connections and handshakes) the process
    /// may hold: what its file-descriptor limit leaves after Postgres's
    /// own share. Past it, upgrades are refused with HTTP 429 before a
    /// descriptor runs out.
    pub fn set_socket_capacity(&self, sockets: usize) {
        self.socket_capacity.store(sockets, Ordering::Relaxed);
    }

    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    pub fn counters(&self) -> &'static Counters {
        self.counters
    }

    /// Whether a line about what one client did may be logged now: at
    /// most `LOG_LINES_PER_SECOND` of them, over all clients.
    pub(crate) fn may_log(&self) -> bool {
        self.log_lines.take(LOG_LINES_PER_SECOND, std::time::Instant::now())
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
                let Some(gate) = HandshakeSlot::acquire(&ctx) else {
                    // Over the handshake or socket limit: refused at once,
                    // before anything is read or allocated for it.
                    Counters::incr(&ctx.counters.handshakes_refused);
                    handshake::refuse_busy(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let served = AssertUnwindSafe(connection::accept::serve(stream, peer, ctx.clone(), shutdown, gate))
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

/// An upgrade in progress: counted against `max_pending_handshakes` and
/// the socket capacity until it is dropped.
pub struct HandshakeSlot {
    ctx: Arc<Context>,
}

impl HandshakeSlot {
    fn acquire(ctx: &Arc<Context>) -> Option<HandshakeSlot> {
        let max = ctx.settings().limits.max_pending_handshakes;
        let capacity = ctx.socket_capacity.load(Ordering::Relaxed);
        ctx.handshaking
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                let sockets = n + ctx.open.load(Ordering::Acquire);
                (n < max && sockets < capacity).then_some(n + 1)
            })
            .ok()?;
        Some(HandshakeSlot { ctx: ctx.clone() })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.ctx.handshaking.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps the open-connection count and gauge right however a connection ends.
struct ConnectionSlot {
    ctx: Arc<Context>,
}

impl ConnectionSlot {
    /// Takes a slot if fewer than `max` connections are open (and the
    /// socket capacity allows one more; the handshake taking it already
    /// holds its socket).
    fn acquire(ctx: &Arc<Context>, max: usize) -> Option<ConnectionSlot> {
        let max = max.min(ctx.socket_capacity.load(Ordering::Relaxed));
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
