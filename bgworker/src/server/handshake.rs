//! The HTTP upgrade: path, `vsn`, the `apikey` token and the connection
//! limit are checked before a WebSocket exists. Refusals carry the status and
//! JSON body of `docs/protocol.md`, "Connecting".

use super::{ConnectionSlot, Context};
use crate::server::jwt::{self, AuthError};
use crate::server::protocol::{ProtocolError, Vsn};
use crate::shared::stats::Counters;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};

/// The paths realtime-js (`/realtime/v1/websocket`) and Phoenix clients
/// (`/socket/websocket`) connect to.
pub const PATHS: [&str; 2] = ["/realtime/v1/websocket", "/socket/websocket"];

/// An accepted upgrade.
pub struct Accepted {
    pub vsn: Vsn,
    /// The connect-time token, the default identity of every channel.
    pub token: String,
    /// Held for the connection's lifetime: frees its place when dropped.
    pub _slot: ConnectionSlot,
}

/// Why an upgrade was refused: `Display` is the `error` of the JSON body,
/// [`HandshakeError::status`] the HTTP status.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum HandshakeError {
    #[error("Not found")]
    NotFound,
    #[error(transparent)]
    Vsn(#[from] ProtocolError),
    #[error("{}", .0.handshake_message())]
    Token(#[from] AuthError),
    #[error("Too many connected users")]
    TooManyUsers,
}

impl HandshakeError {
    pub fn status(&self) -> StatusCode {
        match self {
            HandshakeError::NotFound => StatusCode::NOT_FOUND,
            HandshakeError::Vsn(_) => StatusCode::BAD_REQUEST,
            HandshakeError::Token(_) => StatusCode::UNAUTHORIZED,
            HandshakeError::TooManyUsers => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The HTTP response: `{"error": message}` with the status.
    pub fn response(&self) -> ErrorResponse {
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut response = ErrorResponse::new(Some(body));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// Checks an upgrade request; each refusal is counted.
pub fn check(ctx: &Arc<Context>, request: &Request) -> Result<Accepted, HandshakeError> {
    checked(ctx, request).inspect_err(|_| Counters::incr(&ctx.counters.handshakes_refused))
}

fn checked(ctx: &Arc<Context>, request: &Request) -> Result<Accepted, HandshakeError> {
    let path = request.uri().path().trim_end_matches('/');
    if !PATHS.contains(&path) {
        return Err(HandshakeError::NotFound);
    }
    let query = request.uri().query().unwrap_or("");
    let vsn = Vsn::from_param(query_param(query, "vsn").as_deref())?;
    let token = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query_param(query, "apikey"))
        .unwrap_or_default();
    let settings = ctx.settings();
    settings.verifier.verify(&token, jwt::now()).inspect_err(|e| {
        tracing::debug!(error = %e, "upgrade refused");
    })?;
    let slot = ConnectionSlot::acquire(ctx, settings.max_connections).ok_or(HandshakeError::TooManyUsers)?;
    Ok(Accepted {
        vsn,
        token,
        _slot: slot,
    })
}

/// Refusals of busy upgrades being written at once, at most: each holds
/// its socket for up to `REFUSE_WITHIN`.
const MAX_REFUSING: usize = 16;
const REFUSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);
static REFUSING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Answers an upgrade that arrives while the server is at its handshake
/// or socket limit with HTTP 429 and closes it: its request is read first
/// (a little of it, for a second at most), so that closing does not reset
/// the connection before the client reads the answer. Past
/// `MAX_REFUSING` at once, the socket is just closed.
pub fn refuse_busy(stream: tokio::net::TcpStream) {
    use std::sync::atomic::Ordering;
    if REFUSING.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
        REFUSING.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSE_WITHIN, refuse(stream)).await;
        REFUSING.fetch_sub(1, Ordering::AcqRel);
    });
}

async fn refuse(stream: tokio::net::TcpStream) {
    const BODY: &str = r#"{"error":"Too many connected users"}"#;
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut request = [0u8; 4096];
    let mut read = 0;
    // up to the end of the request's headers
    while read < request.len() && !request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut request[read..]) {
            Ok(0) => return,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
    let mut written = 0;
    while written < response.len() {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.try_write(&response.as_bytes()[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// The first value of `name` in a query string, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        let q = "apikey=a.b.c&log_level=info&vsn=2.0.0&x=%41%2b+b&flag";
        assert_eq!(query_param(q, "apikey").as_deref(), Some("a.b.c"));
        assert_eq!(query_param(q, "vsn").as_deref(), Some("2.0.0"));
        assert_eq!(query_param(q, "x").as_deref(), Some("A+ b"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param("a=%zz%4", "a").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn refusals_have_their_status_and_message() {
        let cases = [
            (HandshakeError::NotFound, StatusCode::NOT_FOUND, "Not found"),
            (
                HandshakeError::TooManyUsers,
                StatusCode::TOO_MANY_REQUESTS,
                "Too many connected users",
            ),
            (
                HandshakeError::Token(AuthError::Expired(3)),
                StatusCode::UNAUTHORIZED,
                "Token has expired",
            ),
        ];
        for (error, status, message) in cases {
            assert_eq!(error.status(), status);
            assert_eq!(error.to_string(), message);
            let response = error.response();
            assert_eq!(response.status(), status);
            let body: serde_json::Value = serde_json::from_str(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"], message);
        }
        let vsn = HandshakeError::from(Vsn::from_param(Some("9.0.0")).unwrap_err());
        assert_eq!(vsn.status(), StatusCode::BAD_REQUEST);
    }
}
