//! The settings that bound what clients may ask of the worker: bytes
//! waiting for them, joins, filters, handshakes, socket writes (README,
//! "Limits"). All take effect on reload.

use bgworker::server::Limits;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::time::Duration;

pub static MAX_PENDING_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
pub static MAX_PENDING_TOTAL_KB: GucSetting<i32> = GucSetting::<i32>::new(512 * 1024);
pub static SOCKET_WRITE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static MAX_PENDING_HANDSHAKES: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static MAX_BINDINGS_PER_JOIN: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static MAX_FILTER_CONDITIONS: GucSetting<i32> = GucSetting::<i32>::new(16);
pub static MAX_FILTER_BYTES: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static MAX_JOINS_PER_SECOND_PER_CONNECTION: GucSetting<i32> = GucSetting::<i32>::new(50);
pub static MAX_JOINS_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static MAX_CONDITIONS_PER_JOIN: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static MAX_PAYLOAD_KB: GucSetting<i32> = GucSetting::<i32>::new(3000);
pub static MAX_MESSAGES_PER_SECOND_PER_CONNECTION: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static MAX_PRESENCE_PER_SECOND_PER_CONNECTION: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static MAX_PRESENCE_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static MAX_PRESENCE_PER_CONNECTION_KB: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static MAX_PRESENCE_PAYLOAD_KB: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static MAX_PRESENCE_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static MAX_HTTP_BROADCASTS_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static REPLAY_MAX_MESSAGES: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static REPLAY_MAX_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
pub static REPLAY_MAX_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(72 * 3600);
pub static CHECK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// An integer setting the worker reads on reload.
fn int(
    name: &'static std::ffi::CStr,
    short: &'static std::ffi::CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(name, short, c"", setting, min, i32::MAX, GucContext::Sighup, flags);
}

/// Registers the limits. (Longer than a screen only because it is a list:
/// one `int` call per setting, in the README's order.)
pub fn define() {
    int(
        c"pg_realtime.max_pending_bytes",
        c"Bytes that may wait to be sent to one WebSocket connection; past it the client is told and disconnected.",
        &MAX_PENDING_KB,
        64,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.max_pending_bytes_total",
        c"Bytes that may wait for all WebSocket connections together; past it the connections furthest behind are disconnected first.",
        &MAX_PENDING_TOTAL_KB,
        1024,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.socket_write_timeout",
        c"How long one write to a client's socket may take before the connection is closed.",
        &SOCKET_WRITE_TIMEOUT_S,
        1,
        GucFlags::UNIT_S,
    );
    int(
        c"pg_realtime.max_pending_handshakes",
        c"WebSocket upgrades in progress at once; further ones get HTTP 429.",
        &MAX_PENDING_HANDSHAKES,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_bindings_per_join",
        c"postgres_changes bindings one join may have.",
        &MAX_BINDINGS_PER_JOIN,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_filter_conditions",
        c"Conditions one postgres_changes filter may have.",
        &MAX_FILTER_CONDITIONS,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_conditions_per_join",
        c"Filter conditions all of one join's postgres_changes bindings may have together.",
        &MAX_CONDITIONS_PER_JOIN,
        1,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_realtime.check_timeout",
        c"How long one filter-value cast, private-channel probe or row-level security check may take; then it is cancelled.",
        c"A cancelled row check delivers nothing, and its subscribers are told. 0 means no limit.",
        &CHECK_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    int(
        c"pg_realtime.max_filter_bytes",
        c"Bytes one postgres_changes filter may have.",
        &MAX_FILTER_BYTES,
        16,
        GucFlags::UNIT_BYTE,
    );
    int(
        c"pg_realtime.max_joins_per_second_per_connection",
        c"Channel joins a second one WebSocket connection may make.",
        &MAX_JOINS_PER_SECOND_PER_CONNECTION,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_joins_per_second",
        c"Channel joins a second over all WebSocket connections.",
        &MAX_JOINS_PER_SECOND,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_payload_size",
        c"Bytes of one broadcast's or presence track's payload (plus 500 bytes of slack); larger broadcasts are refused.",
        &MAX_PAYLOAD_KB,
        1,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.max_messages_per_second_per_connection",
        c"Broadcasts and presence messages a second one WebSocket connection may send; past it the channel is closed.",
        &MAX_MESSAGES_PER_SECOND_PER_CONNECTION,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_presence_per_second_per_connection",
        c"Presence messages a second one WebSocket connection may send; past it the channel is closed.",
        &MAX_PRESENCE_PER_SECOND_PER_CONNECTION,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_presence_bytes",
        c"Bytes of presence state over all topics; tracks past it are refused.",
        &MAX_PRESENCE_KB,
        64,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.max_presence_bytes_per_connection",
        c"Bytes of presence state one WebSocket connection's channels may hold together; tracks past it are refused.",
        &MAX_PRESENCE_PER_CONNECTION_KB,
        1,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.max_presence_payload_size",
        c"Bytes of one presence track's payload (at most 1MB, the limit of a control frame); past it the channel is closed.",
        &MAX_PRESENCE_PAYLOAD_KB,
        1,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.max_presence_per_second",
        c"Presence messages a second over all WebSocket connections; past it the channel sending is closed.",
        &MAX_PRESENCE_PER_SECOND,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.max_http_broadcasts_per_second",
        c"Messages a second over all HTTP broadcast requests; past it they are answered 429.",
        &MAX_HTTP_BROADCASTS_PER_SECOND,
        1,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.replay_max_messages",
        c"Broadcasts from the database to private topics kept for replay, over all topics; the oldest go first.",
        &REPLAY_MAX_MESSAGES,
        0,
        GucFlags::default(),
    );
    int(
        c"pg_realtime.replay_max_bytes",
        c"Memory the broadcasts kept for replay may take; the oldest go first.",
        &REPLAY_MAX_KB,
        0,
        GucFlags::UNIT_KB,
    );
    int(
        c"pg_realtime.replay_max_age",
        c"How long a broadcast is kept for replay.",
        &REPLAY_MAX_AGE_S,
        0,
        GucFlags::UNIT_S,
    );
}

fn count(setting: &GucSetting<i32>) -> usize {
    setting.get().max(0) as usize
}

/// `pg_realtime.check_timeout` in milliseconds (0: none).
pub fn check_timeout_ms() -> i32 {
    CHECK_TIMEOUT_MS.get()
}

/// The limits as configured now.
pub fn limits() -> Limits {
    Limits {
        max_pending_bytes: count(&MAX_PENDING_KB) * 1024,
        max_pending_bytes_total: count(&MAX_PENDING_TOTAL_KB) * 1024,
        write_timeout: Duration::from_secs(count(&SOCKET_WRITE_TIMEOUT_S) as u64),
        max_pending_handshakes: count(&MAX_PENDING_HANDSHAKES),
        max_bindings_per_join: count(&MAX_BINDINGS_PER_JOIN),
        max_filter_conditions: count(&MAX_FILTER_CONDITIONS),
        max_conditions_per_join: count(&MAX_CONDITIONS_PER_JOIN),
        max_filter_bytes: count(&MAX_FILTER_BYTES),
        joins_per_second_per_connection: MAX_JOINS_PER_SECOND_PER_CONNECTION.get().max(1) as u32,
        joins_per_second: MAX_JOINS_PER_SECOND.get().max(1) as u32,
        max_payload_bytes: max_payload_bytes(),
        messages_per_second_per_connection: MAX_MESSAGES_PER_SECOND_PER_CONNECTION.get().max(1) as u32,
        presence_per_second_per_connection: MAX_PRESENCE_PER_SECOND_PER_CONNECTION.get().max(1) as u32,
        presence_per_second: MAX_PRESENCE_PER_SECOND.get().max(1) as u32,
        max_presence_payload_bytes: count(&MAX_PRESENCE_PAYLOAD_KB) * 1024,
        presence: bgworker::server::presence::PresenceBounds {
            max_bytes: count(&MAX_PRESENCE_KB) * 1024,
            max_bytes_per_connection: count(&MAX_PRESENCE_PER_CONNECTION_KB) * 1024,
        },
        http_broadcasts_per_second: MAX_HTTP_BROADCASTS_PER_SECOND.get().max(1) as u32,
        replay: bgworker::server::replay::Bounds {
            max_messages: count(&REPLAY_MAX_MESSAGES),
            max_bytes: count(&REPLAY_MAX_KB) * 1024,
            max_age_ms: i64::from(REPLAY_MAX_AGE_S.get().max(0)) * 1000,
        },
    }
}

/// `pg_realtime.max_payload_size` in bytes, which `realtime.send` checks too.
pub fn max_payload_bytes() -> usize {
    count(&MAX_PAYLOAD_KB) * 1024
}
