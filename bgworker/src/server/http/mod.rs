//! Plain HTTP on the WebSocket port (`docs/protocol.md`, "HTTP
//! broadcast"): a request's head is read first; a `GET` goes on to the
//! WebSocket upgrade with what was read put back (`Prefixed`), anything
//! else is answered here, one request per connection, within the same
//! bounds as an upgrade (its handshake slot, `MAX_HEAD_BYTES`, the
//! handshake timeout).

mod broadcast;
mod head;
mod prefixed;
mod response;

pub use head::{read_head, Head};
pub use prefixed::Prefixed;
pub use response::Response;

use super::Context;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Answers a request that is not an upgrade, by `deadline`.
pub async fn serve(head: Head, mut stream: TcpStream, ctx: &Arc<Context>, deadline: Instant) {
    let response = match tokio::time::timeout_at(deadline, respond(&head, &mut stream, ctx)).await {
        Ok(response) => response,
        Err(_) => Response::message(408, "Request Timeout"),
    };
    let write_timeout = ctx.settings().limits.write_timeout;
    if let Ok(Ok(())) = tokio::time::timeout(write_timeout, response.write(&mut stream)).await {
        drain(&mut stream, deadline).await;
    }
}

/// What a client may still be sending when it is answered early (a
/// refused upload) is read and dropped, for a while: closing a socket with
/// unread bytes resets it, and the client would see a broken connection
/// instead of the answer.
async fn drain(stream: &mut TcpStream, deadline: Instant) {
    use tokio::io::AsyncReadExt;
    const MAX_DRAIN: usize = 8 << 20;
    const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(2);
    let mut sink = [0u8; 8192];
    let mut drained = 0;
    // (within the request's deadline, which its handshake slot is held for)
    let until = deadline.min(Instant::now() + DRAIN_FOR);
    let _ = tokio::time::timeout_at(until, async {
        while drained < MAX_DRAIN {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

async fn respond(head: &Head, stream: &mut TcpStream, ctx: &Arc<Context>) -> Response {
    let Some(route) = broadcast::Route::of(&head.path) else {
        return Response::message(404, "Not found");
    };
    match head.method.as_str() {
        "OPTIONS" => Response::preflight(head.header("access-control-request-headers")),
        "POST" => broadcast::post(route, head, stream, ctx).await,
        _ => Response::message(405, "Method Not Allowed"),
    }
}
