//! The seed app's inbox pattern the postgres_changes benchmarks use: user
//! i (a uuid made from i) subscribes to the INSERTs into `messages` whose
//! `recipient_id` is theirs, as themselves (`authenticated`, row-level
//! security on); a writer sends each message to one user, stamped in its
//! `message` column with the microsecond it was written.

use super::subscribers::{join_all, receive, Expect, Tally};
use pg_realtime_e2e::load::{await_subscribed, connect_and_join_with};
use pg_realtime_e2e::{now, token_with, SECRET};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The sender of every message (no subscriber is it).
const SENDER: &str = "00000000-0000-4000-8000-ffffffffffff";

/// What an inbox subscriber counts: postgres_changes events, stamped.
pub const EXPECT: Expect = Expect {
    marker: r#""event":"postgres_changes""#,
    stamp: Some(r#""message":""#),
    events: None,
};

pub fn user(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// The INSERT of message `k`, to user `k % users`.
pub fn message_to(k: u64, users: usize) -> String {
    format!(
        "INSERT INTO messages (message, sender_id, recipient_id) VALUES \
         ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text, '{SENDER}', '{}');",
        user((k % users as u64) as usize)
    )
}

/// Opens a socket per user in `users` from `source`, each subscribed to
/// its inbox, then reading into `tally`. Returns the readers once all are
/// subscribed, and how long that took.
pub async fn subscribe(
    url: &str,
    source: Ipv4Addr,
    users: Range<usize>,
    tally: &Arc<Tally>,
) -> (Vec<JoinHandle<()>>, Duration) {
    let started = Instant::now();
    let sockets = join_all(users, |i| {
        let (url, payload) = (url.to_owned(), payload(i));
        async move {
            let mut ws = connect_and_join_with(&url, source, &format!("realtime:inbox-{i}"), &payload).await;
            await_subscribed(&mut ws).await;
            ws
        }
    })
    .await;
    let elapsed = started.elapsed();
    let readers = sockets
        .into_iter()
        .map(|ws| tokio::spawn(receive(ws, tally.clone(), EXPECT)))
        .collect();
    (readers, elapsed)
}

/// A supabase-js join of user `i`'s inbox channel.
fn payload(i: usize) -> String {
    let token = token_with(
        SECRET,
        serde_json::json!({"role": "authenticated", "sub": user(i), "exp": now() + 3600}),
    );
    serde_json::json!({
        "config": {
            "broadcast": {"ack": false, "self": false},
            "presence": {"key": ""},
            "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "messages",
                                  "filter": format!("recipient_id=eq.{}", user(i))}],
            "private": false
        },
        "access_token": token
    })
    .to_string()
}
