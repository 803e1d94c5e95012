//! Sending a batch of committed transactions to the channels: what goes
//! where is `bgworker::changes::deliver::plan`'s, with the checks run
//! through SPI (`access`); this queues each event and tells channels what
//! was lost or could not be checked.

use super::access::AccessCache;
use super::channels::{system_error, Channels};
use bgworker::changes::deliver::{self, SendKind};
use bgworker::changes::registry::ChannelKey;
use bgworker::server::fanout::{Charge, FanoutError, LaterWakes};
use bgworker::server::protocol::ChangeMessages;
use bgworker::server::Context;
use bgworker::shared::stats::Counters;
use bgworker::shared::wire::Transaction;
use std::sync::Arc;

/// Delivers `transactions` (in commit order): each one's postgres_changes
/// events, then its broadcasts from the database, before the next one's.
/// Returns whether a subscription ended (its connection had closed).
pub fn deliver(
    channels: &mut Channels,
    access: &mut AccessCache,
    server: &Context,
    transactions: &[Transaction],
) -> bool {
    let mut ended = false;
    let mut start = 0;
    // (runs of transactions without broadcasts are planned together)
    for (i, t) in transactions.iter().enumerate() {
        if t.broadcasts.is_empty() {
            continue;
        }
        ended |= deliver_changes(channels, access, &transactions[start..=i]);
        for b in &t.broadcasts {
            server.broadcast_from_database(b, t.commit_time_us);
        }
        start = i + 1;
    }
    if start < transactions.len() {
        ended |= deliver_changes(channels, access, &transactions[start..]);
    }
    ended
}

/// Matches `transactions` (in commit order) against the subscriptions and
/// queues each channel its events; returns whether a subscription ended
/// (its connection had closed).
fn deliver_changes(channels: &mut Channels, access: &mut AccessCache, transactions: &[Transaction]) -> bool {
    let max_record_bytes = crate::gucs::max_record_bytes();
    let deliver::Plan {
        lost,
        frames,
        sends,
        unchecked,
    } = deliver::plan(channels.active(), access, transactions, max_record_bytes);
    for relids in &lost {
        channels.notify_loss(relids, false);
    }
    // Each frame's memory is counted once against the total, however many
    // channels it goes to.
    let mut charges: Vec<Option<Arc<Charge>>> = vec![None; frames.len()];
    // (connections that closed without their leaves reaching us)
    let mut gone: Vec<ChannelKey> = Vec::new();
    let counters = crate::shmem::counters();
    let mut messages = ChangeMessages::default();
    // (connections woken for batches of their events, the last ones when
    // this goes at the end of the pass)
    let mut later = LaterWakes::default();
    for send in sends {
        let data = &frames[send.frame];
        if send.kind == SendKind::Notice {
            // Tiny, and it must not be lost: sent within the notices'
            // allowance over the byte budget. (Full: that connection is
            // told it fell behind, and closes.)
            let notice = Arc::new(system_error(send.sink, data));
            if let Err(FanoutError::Closed) = send.sink.tx.force(notice) {
                gone.push(send.channel.clone());
            }
            continue;
        }
        let charge = charges[send.frame].get_or_insert_with(|| send.sink.tx.charge(data.len()));
        let out = messages.get(send.row, send.frame, &send.sink.topic, send.ids, data);
        let sent = send.sink.tx.send_shared_later(out, charge, &mut later);
        if later.due() {
            later.wake();
        }
        match sent {
            Ok(()) => Counters::incr(&counters.events_delivered),
            // Too far behind: its connection tells each channel and
            // closes (`server::fanout`).
            Err(FanoutError::Full) => Counters::incr(&counters.events_dropped),
            Err(FanoutError::Closed) => gone.push(send.channel.clone()),
        }
    }
    channels.notify_unchecked(&unchecked);
    gone.sort();
    gone.dedup();
    let mut ended = false;
    for key in gone {
        ended |= channels.unsubscribe(&key);
    }
    ended
}
