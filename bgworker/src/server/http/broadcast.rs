//! `POST /realtime/v1/api/broadcast` (a batch of JSON messages) and
//! `POST /realtime/v1/api/broadcast/:topic/events/:event` (one payload,
//! JSON or bytes), as Supabase has them: authorized like a socket (the
//! `Authorization: Bearer` token, else `apikey`), private topics by the
//! broadcast write policies, answered 202 once fanned out.

use super::{Head, Response};
use crate::server::fanout::Reservation;
use crate::server::handshake::query_param;
use crate::server::hub::hub_key;
use crate::server::jwt::{self, Claims};
use crate::server::link::{Authorize, MainRequest, Question};
use crate::server::protocol::{JsonText, Outbound, Payload, TOPIC_PREFIX};
use crate::server::{Context, PAYLOAD_SLACK};
use crate::shared::stats::Counters;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFIXES: [&str; 2] = ["/realtime/v1/api/broadcast", "/api/broadcast"];
const TOO_LARGE: &str = "Payload size exceeds tenant limit";
const NO_DATABASE: &str = "Realtime was unable to connect to the project database";

/// Which endpoint a path is.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Batch,
    /// The topic (without `realtime:`) and event, percent-decoded.
    Event {
        topic: String,
        event: String,
    },
}

impl Route {
    pub fn of(path: &str) -> Option<Route> {
        let rest = PREFIXES.iter().find_map(|p| path.strip_prefix(p))?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return Some(Route::Batch);
        }
        let (topic, event) = rest.strip_prefix('/')?.split_once("/events/")?;
        let decode = |s: &str| percent_decode_path(s).filter(|v| !v.is_empty());
        Some(Route::Event {
            topic: decode(topic)?,
            event: decode(event)?,
        })
    }
}

/// `%XX` decoded (a `+` stays a `+`: this is a path, not a query).
fn percent_decode_path(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub async fn post(route: Route, head: &Head, stream: &mut TcpStream, ctx: &Arc<Context>) -> Response {
    let Some(claims) = caller(head, ctx) else {
        return Response::message(401, "Unauthorized");
    };
    let max_payload = ctx.settings().limits.max_payload_bytes + PAYLOAD_SLACK;
    let max_body = match route {
        Route::Batch => ctx.options.max_frame_bytes,
        Route::Event { .. } => max_payload,
    };
    let body = match read_body(head, stream, max_body, ctx).await {
        Ok(body) => body,
        // (one payload over the limit: Supabase's answer for it)
        Err(r) if r.status == 413 && max_body == max_payload => return Response::message(422, TOO_LARGE),
        Err(response) => return response,
    };
    match route {
        Route::Batch => batch(ctx, &claims, &body).await,
        Route::Event { topic, event } => one_event(ctx, &claims, head, topic, event, body).await,
    }
}

/// The caller's verified claims: the bearer token's, else the `apikey`'s.
fn caller(head: &Head, ctx: &Context) -> Option<Claims> {
    let bearer = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    let token = bearer.or_else(|| head.header("apikey"))?;
    ctx.settings().verifier.verify(token.trim(), jwt::now()).ok()
}

/// The body, by its `content-length` (at most `max` bytes), its bytes
/// reserved against `pg_realtime.max_pending_bytes_total` while it is read
/// and handled, and grown only as they arrive.
async fn read_body(head: &Head, stream: &mut TcpStream, max: usize, ctx: &Context) -> Result<Body, Response> {
    let Some(length) = head.header("content-length") else {
        return Err(Response::message(411, "Length Required"));
    };
    let length = length.trim();
    let Some(length) = length
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| length.parse::<usize>().ok())
        .flatten()
    else {
        return Err(Response::message(400, "content-length is not a number"));
    };
    if length > max {
        return Err(Response::message(413, "Payload Too Large"));
    }
    let Some(reservation) = ctx.budget.reserve(length) else {
        return Err(Response::message(
            503,
            "Too many bytes are waiting in the server; try again",
        ));
    };
    let early = &head.raw[head.head_len..];
    if early.len() > length {
        return Err(Response::message(400, "One request per connection"));
    }
    if head
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    let mut bytes = Vec::with_capacity(length.min(64 * 1024));
    bytes.extend_from_slice(early);
    let rest = (length - early.len()) as u64;
    let read = (&mut *stream).take(rest).read_to_end(&mut bytes).await;
    if read.is_err() || bytes.len() < length {
        return Err(Response::message(400, "The body ended early"));
    }
    Ok(Body {
        bytes,
        _reservation: reservation,
    })
}

/// A request's body and the budget it holds.
struct Body {
    bytes: Vec<u8>,
    _reservation: Reservation,
}

#[derive(Deserialize)]
struct Batch {
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    topic: String,
    event: String,
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    private: bool,
    id: Option<String>,
}

async fn batch(ctx: &Arc<Context>, claims: &Claims, body: &Body) -> Response {
    let Ok(batch) = serde_json::from_slice::<Batch>(&body.bytes) else {
        let errors = json!({"errors": {"messages": ["must be a list of {topic, event, payload, private}"]}});
        return Response::json(422, errors);
    };
    let max = ctx.settings().limits.max_payload_bytes + PAYLOAD_SLACK;
    if batch
        .messages
        .iter()
        .any(|m| m.payload.as_ref().is_some_and(|p| p.get().len() > max))
    {
        return Response::json(422, json!({"errors": {"messages": [TOO_LARGE]}}));
    }
    if batch.messages.iter().any(|m| m.topic.is_empty()) {
        return Response::json(422, json!({"errors": {"messages": ["topic can't be blank"]}}));
    }
    if let Err(response) = within_rate(ctx, batch.messages.len()) {
        return response;
    }
    // Every private topic is asked about first (once each): private
    // messages go only where the caller may write, and nothing goes out
    // before the answers are in.
    let mut may_write: HashMap<&str, bool> = HashMap::new();
    for m in batch.messages.iter().filter(|m| m.private) {
        if let Entry::Vacant(entry) = may_write.entry(m.topic.as_str()) {
            match may_write_to(ctx, claims, &m.topic).await {
                Ok(allowed) => entry.insert(allowed),
                Err(response) => return response,
            };
        }
    }
    let may_write: HashMap<String, bool> = may_write.into_iter().map(|(t, w)| (t.to_owned(), w)).collect();
    for m in batch.messages {
        if m.private && may_write.get(&m.topic) != Some(&true) {
            continue;
        }
        let payload = m.payload.map_or(Payload::Json(serde_json::Value::Null), |raw| {
            Payload::Text(JsonText::from_raw(raw))
        });
        let metadata = m.id.map(|id| json!({ "id": id }));
        fan_out(ctx, &m.topic, m.private, m.event, metadata, payload);
    }
    Response::empty(202)
}

async fn one_event(
    ctx: &Arc<Context>,
    claims: &Claims,
    head: &Head,
    topic: String,
    event: String,
    body: Body,
) -> Response {
    let content_type = head.header("content-type").unwrap_or("");
    let payload = match content_type.split(';').next().unwrap_or("").trim() {
        "application/json" => match String::from_utf8(body.bytes).ok().and_then(|t| JsonText::parse(t).ok()) {
            Some(text) => Payload::Text(text),
            None => return Response::message(422, "The body is not valid JSON"),
        },
        // (kind 4 holds names of up to 255 bytes, and bytes have no other form)
        "application/octet-stream" if TOPIC_PREFIX.len() + topic.len() > 255 || event.len() > 255 => {
            return Response::message(
                422,
                "A binary broadcast's topic and event may have at most 255 bytes each",
            );
        }
        "application/octet-stream" => Payload::Binary(body.bytes),
        _ => {
            let error = "Unsupported Media Type. Use application/json or application/octet-stream";
            return Response::json(415, json!({ "error": error }));
        }
    };
    if let Err(response) = within_rate(ctx, 1) {
        return response;
    }
    let private = query_param(&head.query, "private").is_some_and(|v| v == "true");
    if private {
        match may_write_to(ctx, claims, &topic).await {
            Ok(true) => {}
            Ok(false) => return Response::message(403, "Unauthorized"),
            Err(response) => return response,
        }
    }
    fan_out(ctx, &topic, private, event, None, payload);
    Response::empty(202)
}

/// Takes `n` of the HTTP broadcasts a second (`pg_realtime.max_http_broadcasts_per_second`).
fn within_rate(ctx: &Context, n: usize) -> Result<(), Response> {
    let rate = ctx.settings().limits.http_broadcasts_per_second;
    if n > rate as usize {
        return Err(Response::message(
            429,
            "Too many messages to broadcast, please reduce the batch size",
        ));
    }
    if !ctx.http_broadcasts.take_n(n as u32, rate, std::time::Instant::now()) {
        return Err(Response::message(429, "You have exceeded your rate limit"));
    }
    Ok(())
}

/// Whether the caller's identity may broadcast on private `topic`, by the
/// policies (asked of the main thread, as for a channel's first
/// broadcast, and counted against the join rates as a join's checks
/// are). `Err` is the answer when it cannot be known.
async fn may_write_to(ctx: &Context, claims: &Claims, topic: &str) -> Result<bool, Response> {
    let unavailable = || Response::message(503, NO_DATABASE);
    let Some(main) = &ctx.main else {
        return Err(unavailable());
    };
    if !ctx
        .joins
        .take(ctx.settings().limits.joins_per_second, std::time::Instant::now())
    {
        return Err(Response::message(429, "You have exceeded your rate limit"));
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let asked = main.send(MainRequest::Authorize(Authorize {
        subtopic: topic.to_owned(),
        claims: claims.clone(),
        question: Question::Write("broadcast"),
        reply,
    }));
    if !asked {
        return Err(unavailable());
    }
    match tokio::time::timeout(ctx.options.ask_timeout, answer).await {
        Ok(Ok(Ok(permissions))) => Ok(permissions.broadcast),
        Ok(Ok(Err(_))) => Ok(false),
        Ok(Err(_)) | Err(_) => Err(unavailable()),
    }
}

fn fan_out(
    ctx: &Context,
    subtopic: &str,
    private: bool,
    event: String,
    metadata: Option<serde_json::Value>,
    payload: Payload,
) {
    let topic = format!("{TOPIC_PREFIX}{subtopic}");
    let key = hub_key(&topic, private);
    Counters::incr(&ctx.counters.broadcasts_sent);
    ctx.hub.send(
        &key,
        None,
        Outbound::Broadcast {
            topic,
            event,
            metadata,
            payload,
            encoded: Default::default(),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::of("/realtime/v1/api/broadcast"), Some(Route::Batch));
        assert_eq!(Route::of("/api/broadcast/"), Some(Route::Batch));
        assert_eq!(
            Route::of("/realtime/v1/api/broadcast/room%3A1/events/cur%20pos"),
            Some(Route::Event {
                topic: "room:1".into(),
                event: "cur pos".into()
            })
        );
        assert_eq!(Route::of("/realtime/v1/api/broadcast//events/e"), None);
        assert_eq!(Route::of("/realtime/v1/api/broadcast/t/other/e"), None);
        assert_eq!(Route::of("/realtime/v1/websocket"), None);
        // a path keeps its plus signs; a broken escape is no route
        assert_eq!(
            Route::of("/api/broadcast/a+b/events/e"),
            Some(Route::Event {
                topic: "a+b".into(),
                event: "e".into()
            })
        );
        assert_eq!(Route::of("/api/broadcast/a%zz/events/e"), None);
        assert_eq!(Route::of("/api/broadcast/a%+f/events/e"), None);
    }
}
