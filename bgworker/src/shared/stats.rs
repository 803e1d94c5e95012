//! Counters the server keeps while it runs. The extension places them in
//! shared memory, so `realtime.stats()` can read them from any session; the
//! network threads only touch them with atomic operations.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Server counters; gauges go up and down, the rest only grow.
        #[derive(Debug, Default)]
        #[repr(C)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Gauge: WebSocket connections open now.
    connections_open,
    /// Connections accepted since the worker started.
    connections_total,
    /// Upgrades refused (bad path, bad or missing token, limits).
    handshakes_refused,
    /// Gauge: channels joined now, over all connections.
    channels_joined,
    /// Join requests answered with an error.
    joins_refused,
    /// Frames received from clients.
    frames_received,
    /// Frames that could not be decoded; dropped, the socket stays.
    malformed_frames,
    /// Frames over the size limit; the socket is closed with 1009.
    oversized_frames,
    /// Sockets closed after a silent idle period.
    idle_closed,
    /// Channels closed because their token expired or a refresh was invalid.
    tokens_rejected,
    /// Panics caught on network threads (each ends one connection only).
    network_panics,
    /// Row changes encoded by capture triggers (none while nobody listens).
    rows_captured,
    /// Row changes a capture trigger dropped because no subscriber's
    /// equality filter wants their value (only that value was encoded).
    rows_filtered_out,
    /// Committed transactions written to the change ring.
    transactions_published,
    /// Committed transactions whose changes were lost (ring full, or larger
    /// than the ring); their subscribers were told to refetch.
    transactions_lost,
    /// postgres_changes frames queued for channels.
    events_delivered,
    /// postgres_changes frames a connection too far behind could not take
    /// (it was disconnected, its channels told).
    events_dropped,
    /// Connections closed because too many bytes waited for them
    /// (`pg_realtime.max_pending_bytes`, or the one furthest behind past
    /// `pg_realtime.max_pending_bytes_total`).
    clients_too_far_behind,
    /// Gauge: channels with a postgres_changes subscription.
    subscriptions,
    /// Row-level security check queries run (one per identity and table
    /// per batch of commits).
    rls_checks,
    /// Rows judged by those queries.
    rls_rows_checked,
    /// Row check plans made: a plan kept for a role and table, prepared,
    /// or a query planned afresh (all of them while the database has a
    /// function that blocks sharing plans; `docs/security.md`, "Kept
    /// checks").
    rls_checks_planned,
    /// Capture triggers switched on for a join (see `changes::switch`).
    captures_enabled,
    /// Capture triggers switched off after `pg_realtime.capture_idle_timeout`.
    captures_disabled,
    /// Times the publication sync ran (`realtime.sync_captured_tables()`,
    /// on DDL that can change the captured tables).
    capture_syncs,
    /// Attempts to switch a capture trigger on that found the table locked
    /// by a writer (retried until the join gives up).
    capture_lock_retries,
    /// Broadcasts fanned out (from clients, over HTTP, from the database).
    broadcasts_sent,
    /// Broadcasts refused: over `pg_realtime.max_payload_size`, or no
    /// write permission on a private channel.
    broadcasts_refused,
    /// Channels closed for sending too fast
    /// (`pg_realtime.max_messages_per_second_per_connection`,
    /// `pg_realtime.max_presence_per_second_per_connection`).
    rate_limited,
    /// Presence tracks and re-tracks applied.
    presence_tracks,
}

impl Counters {
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn decr(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}
