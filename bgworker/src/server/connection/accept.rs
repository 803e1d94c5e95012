//! A new TCP connection: its first request is read; an HTTP request
//! (`server::http`) is answered, an upgrade is checked (`handshake`) and
//! becomes a `Connection`, all within the handshake timeout and slot.

use super::asks::Asks;
use super::Connection;
use crate::server::handshake::{self, Accepted};
use crate::server::http::{self, Prefixed};
use crate::server::rate::Bucket;
use crate::server::{Context, HandshakeSlot};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// What one read from a client's socket takes at most.
const READ_BUFFER_BYTES: usize = 2 * 1024;

/// Serves one accepted TCP connection to the end. `gate` counts it as a
/// handshake until the upgrade is done (or the HTTP request answered).
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
    gate: HandshakeSlot,
) {
    // (boxed: what the handshake held, its request head and more, would
    // otherwise stay in every connection's future for its whole life)
    let Some((ws, accepted)) = Box::pin(first_request(stream, peer, &ctx)).await else {
        return;
    };
    drop(gate);
    let (mut conn, fanout) = Connection::new(peer, ctx, ws, accepted);
    conn.run(fanout, shutdown).await;
}

/// Reads the first request: an HTTP request is answered (None), an
/// upgrade checked and done.
async fn first_request(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: &Arc<Context>,
) -> Option<(WebSocketStream<Prefixed>, Accepted)> {
    let deadline = Instant::now() + ctx.options.handshake_timeout;
    // (the HTTP paths are boxed: their buffers would otherwise be part of
    // every connection's future, for its whole life)
    let head = match tokio::time::timeout_at(deadline, Box::pin(http::read_head(&mut stream))).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "request refused");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "request timed out");
            return None;
        }
    };
    if head.method != "GET" {
        // (an HTTP broadcast, a preflight: answered within the same bounds)
        Box::pin(http::serve(head, stream, ctx, deadline)).await;
        return None;
    }
    Box::pin(upgrade(Prefixed::new(head.raw, stream), peer, ctx, deadline)).await
}

/// The WebSocket upgrade, checked by `handshake::check`, by `deadline`.
async fn upgrade(
    stream: Prefixed,
    peer: SocketAddr,
    ctx: &Arc<Context>,
    deadline: Instant,
) -> Option<(WebSocketStream<Prefixed>, Accepted)> {
    // tungstenite zero-fills its read buffer's free space (128 kB by
    // default) before every read, even one that finds nothing: with many
    // sockets woken for each broadcast that memset was 28% of the network
    // threads (perf, `make bench-broadcast`, 1,000 subscribers). Clients
    // send small frames; larger ones are read in more pieces.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(ctx.options.max_frame_bytes))
        .max_frame_size(Some(ctx.options.max_frame_bytes));
    let mut accepted = None;
    // The callback's error type is tungstenite's; it is built only to refuse.
    #[allow(clippy::result_large_err)]
    let callback = |request: &_, response| match handshake::check(ctx, request) {
        Ok(a) => {
            accepted = Some(a);
            Ok(response)
        }
        Err(refusal) => Err(refusal.response()),
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    match tokio::time::timeout_at(deadline, upgrade).await {
        Ok(Ok(ws)) => Some((ws, accepted?)),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "upgrade failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "upgrade timed out");
            None
        }
    }
}

impl Connection {
    /// A connection just upgraded, and the queue of what is to be sent to it.
    fn new(
        peer: SocketAddr,
        ctx: Arc<Context>,
        ws: WebSocketStream<Prefixed>,
        accepted: Accepted,
    ) -> (Connection, crate::server::fanout::FanoutReceiver) {
        let id = ctx.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (fanout_tx, fanout) = ctx.budget.queue();
        let limits = ctx.settings().limits.clone();
        let now = std::time::Instant::now();
        let conn = Connection {
            id,
            peer,
            asks: Asks::new(ctx.options.ask_timeout),
            ctx,
            ws,
            accepted,
            channels: HashMap::new(),
            joining: HashMap::new(),
            fanout_tx,
            joins: Bucket::new(limits.joins_per_second_per_connection, now),
            messages: Bucket::new(limits.messages_per_second_per_connection, now),
            presence_rate: Bucket::new(limits.presence_per_second_per_connection, now),
            next_join: 1,
            revalidate_at: None,
        };
        (conn, fanout)
    }
}

#[cfg(test)]
mod tests {
    /// What an idle connection's task holds besides its buffers: its
    /// future, which boxing the rare paths keeps small (bench/README.md,
    /// "Scale").
    #[tokio::test]
    async fn a_connection_s_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr);
        let (server, _) = tokio::join!(listener.accept(), client);
        let (stream, peer) = server.unwrap();
        let counters: &'static crate::shared::stats::Counters = Box::leak(Box::default());
        let settings = crate::server::Settings {
            verifier: crate::server::jwt::Verifier::new(Some("s"), None).unwrap(),
            max_connections: 10,
            max_channels_per_connection: 10,
            limits: Default::default(),
            restart_notice_window: std::time::Duration::ZERO,
        };
        let ctx = crate::server::Context::new(settings, Default::default(), counters, None);
        let gate = crate::server::HandshakeSlot::acquire(&ctx).unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let future = super::serve(stream, peer, ctx, rx, gate);
        // (9,248 bytes at first, then 2,400; 1,552 at the time of writing:
        // the handshake's state is boxed, one timer stands for three)
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1_800, "a connection's future takes {size} bytes");
    }
}
