//! Broadcast from SQL: Supabase's `realtime.send`, `realtime.send_binary`
//! and `realtime.broadcast_changes` (`sql/broadcast.sql`; the sending is
//! `capture::send`'s). `realtime.send` is SQL that hands `send_json` the
//! payload as `jsonb_out` writes it: numbers reach clients exactly as
//! committed, whatever their size or precision.

use crate::capture::send::{send_or_warn, Body};
use pgrx::prelude::*;

/// `realtime.send`'s work: `payload` is jsonb's text, `add_id` whether it
/// is an object without `id`.
#[pg_extern(volatile, parallel_unsafe)]
fn send_json(
    payload: Option<&str>,
    add_id: Option<bool>,
    event: Option<&str>,
    topic: Option<&str>,
    private: Option<bool>,
) {
    let body = Body::Json {
        text: payload,
        add_id: add_id.unwrap_or(false),
    };
    send_or_warn(topic, event, private, body);
}

#[pg_extern(volatile, parallel_unsafe)]
fn send_binary(
    payload: Option<&[u8]>,
    event: Option<&str>,
    topic: Option<&str>,
    private: default!(Option<bool>, true),
) {
    send_or_warn(topic, event, private, Body::Binary(payload));
}

extension_sql_file!(
    "../../sql/broadcast.sql",
    name = "broadcast_sql",
    requires = [send_json, send_binary]
);
