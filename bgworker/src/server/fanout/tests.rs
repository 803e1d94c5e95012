use super::*;
use crate::server::protocol::Payload;

/// A message of about `bytes` bytes.
fn msg(bytes: usize) -> Arc<Outbound> {
    Arc::new(Outbound::Frame(crate::server::protocol::Frame {
        join_ref: None,
        msg_ref: None,
        topic: "realtime:t".into(),
        event: "e".into(),
        payload: Payload::Binary(vec![0; bytes]),
    }))
}

async fn next(rx: &mut FanoutReceiver) -> Received {
    rx.recv().await
}

#[tokio::test]
async fn a_queue_over_its_bytes_overflows_and_lets_go_at_once() {
    let budget = Budget::new(10_000, 1 << 30);
    let (tx, mut rx) = budget.queue();
    let big = msg(4_000);
    assert_eq!(tx.send(big.clone()), Ok(()));
    assert_eq!(tx.send(msg(4_000)), Ok(()));
    assert!(budget.pending_bytes() >= 8_000);
    assert!(matches!(next(&mut rx).await, Received::Message(_)));
    assert_eq!(tx.send(msg(4_000)), Ok(()));
    // 8,000 + 4,000 waiting would pass 10,000: emptied at once, before
    // its connection takes anything
    assert_eq!(tx.send(msg(4_000)), Err(FanoutError::Full));
    assert_eq!(budget.pending_bytes(), 0);
    assert_eq!(Arc::strong_count(&big), 1, "the queued copies are gone");
    assert!(matches!(
        next(&mut rx).await,
        Received::Overflowed(Overflow::Connection)
    ));
    // from then on, nothing more is taken
    assert_eq!(tx.send(msg(1)), Err(FanoutError::Full));
    assert_eq!(tx.force(msg(1)), Err(FanoutError::Full));
    drop(rx);
    assert_eq!(tx.send(msg(1)), Err(FanoutError::Closed));
    assert_eq!(budget.pending_bytes(), 0);
}

#[tokio::test]
async fn notices_may_pass_the_limit_by_the_allowance_only() {
    let budget = Budget::new(10_000, 1 << 30);
    let (tx, mut rx) = budget.queue();
    assert_eq!(tx.send(msg(9_000)), Ok(()));
    assert_eq!(tx.force(msg(NOTICE_ALLOWANCE / 2)), Ok(()));
    assert_eq!(tx.force(msg(NOTICE_ALLOWANCE)), Err(FanoutError::Full));
    assert!(matches!(next(&mut rx).await, Received::Overflowed(_)));
}

#[tokio::test]
async fn over_the_total_the_queue_furthest_behind_goes_first() {
    let budget = Budget::new(100_000, 25_000);
    let (near, mut near_rx) = budget.queue();
    let (far, mut far_rx) = budget.queue();
    assert_eq!(far.send(msg(15_000)), Ok(()));
    assert_eq!(near.send(msg(5_000)), Ok(()));
    // 26,000 in all: the far queue (15,000) goes, the near one stays
    assert_eq!(near.send(msg(6_000)), Ok(()));
    assert!(matches!(next(&mut far_rx).await, Received::Overflowed(Overflow::Total)));
    assert!(budget.pending_bytes() < 25_000);
    assert!(matches!(next(&mut near_rx).await, Received::Message(_)));
    assert!(matches!(next(&mut near_rx).await, Received::Message(_)));
    assert_eq!(budget.pending_bytes(), 0);
}

#[tokio::test]
async fn a_message_shared_by_many_queues_is_charged_once() {
    // 100 members of a topic, a 500 kB broadcast to each: 50 MB if
    // counted per queue, 500 kB held
    let budget = Budget::new(1 << 20, 2 << 20);
    let queues: Vec<_> = (0..100).map(|_| budget.queue()).collect();
    let message = msg(500_000);
    let charge = budget.charge(message.weight());
    for (tx, _) in &queues {
        assert_eq!(tx.send_shared(message.clone(), &charge), Ok(()));
    }
    drop(charge);
    assert!(budget.pending_bytes() < 600_000, "{}", budget.pending_bytes());
    // nobody was evicted; the charge goes with the last copy
    for (_tx, mut rx) in queues {
        assert!(rx.try_recv().is_some());
    }
    assert_eq!(budget.pending_bytes(), 0);
}

#[tokio::test]
async fn a_charge_counts_only_while_a_queue_holds_it() {
    // the frames of one batch, built and kept by their sender while
    // fast consumers take each at once: never more than one counts
    let budget = Budget::new(1 << 20, 1 << 20);
    let (tx, mut rx) = budget.queue();
    let (_idle, mut idle_rx) = budget.queue();
    assert_eq!(_idle.send(msg(10)), Ok(()));
    let mut kept = Vec::new();
    for _ in 0..4 {
        let message = msg(300_000);
        let charge = budget.charge(message.weight());
        assert_eq!(tx.send_shared(message, &charge), Ok(()));
        assert!(rx.try_recv().is_some());
        kept.push(charge);
    }
    assert!(budget.pending_bytes() < 1_000, "{}", budget.pending_bytes());
    // nobody was evicted
    assert_eq!(tx.send(msg(10)), Ok(()));
    assert!(idle_rx.try_recv().is_some());
}

#[tokio::test]
async fn a_closed_connection_releases_what_waited_for_it() {
    let budget = Budget::new(100_000, 1 << 30);
    let (tx, rx) = budget.queue();
    assert_eq!(tx.send(msg(5_000)), Ok(()));
    assert!(budget.pending_bytes() >= 5_000);
    drop(rx);
    assert_eq!(budget.pending_bytes(), 0);
    assert_eq!(budget.queues.lock().len(), 0);
}

#[tokio::test]
async fn reservations_have_their_own_share_and_never_evict() {
    let budget = Budget::new(100_000, 40_000);
    let (tx, mut rx) = budget.queue();
    // a quarter of the total may be reserved, apart from the queues
    let held = budget.reserve(10_000).expect("a quarter fits");
    assert!(budget.reserve(1).is_none());
    // the queues still have all of the total
    for _ in 0..3 {
        assert_eq!(tx.send(msg(10_000)), Ok(()));
    }
    assert!(matches!(next(&mut rx).await, Received::Message(_)));
    drop(held);
    assert!(budget.reserve(10_000).is_some());
}

#[tokio::test]
async fn a_topic_s_queued_messages_go_when_it_leaves() {
    let budget = Budget::new(100_000, 1 << 30);
    let (tx, mut rx) = budget.queue();
    let on = |topic: &str| {
        Arc::new(Outbound::Frame(crate::server::protocol::Frame {
            join_ref: None,
            msg_ref: None,
            topic: topic.into(),
            event: "e".into(),
            payload: Payload::Binary(vec![0; 100]),
        }))
    };
    for topic in ["realtime:a", "realtime:b", "realtime:a"] {
        assert_eq!(tx.send(on(topic)), Ok(()));
    }
    tx.purge_topic("realtime:a");
    assert_eq!(
        rx.try_recv().map(|m| m.topic().to_owned()).as_deref(),
        Some("realtime:b")
    );
    assert!(rx.try_recv().is_none());
    assert_eq!(budget.pending_bytes(), 0);
}

#[tokio::test]
async fn later_wakes_wake_a_queue_once_for_a_batch() {
    let budget = Budget::new(1 << 20, 1 << 30);
    let (tx, mut rx) = budget.queue();
    let charge = tx.charge(100);
    let mut later = LaterWakes::default();
    let receiving = tokio::spawn(async move {
        let mut taken = 0;
        while taken < 3 {
            if let Received::Message(_) = rx.recv().await {
                taken += 1;
            }
        }
        taken
    });
    // (one thread: the receiver runs when this one yields, and parks)
    tokio::task::yield_now().await;
    for _ in 0..3 {
        assert_eq!(tx.send_shared_later(msg(10), &charge, &mut later), Ok(()));
    }
    assert_eq!(later.queues.len(), 1, "one queue, noted once");
    assert!(!later.due(), "3 pushes: not yet");
    tokio::task::yield_now().await;
    assert!(!receiving.is_finished(), "not woken by the pushes");
    drop(later);
    let taken = tokio::time::timeout(std::time::Duration::from_secs(10), receiving).await;
    assert_eq!(taken.expect("woken when the wakes were let go").unwrap(), 3);
    // enough pushes make it due; after a wake, a queue is noted again
    // (one far below its limit: a filling one is woken at once)
    let budget = Budget::new(1 << 30, 1 << 31);
    let (tx, _rx) = budget.queue();
    let mut later = LaterWakes::default();
    for _ in 0..LaterWakes::MIN_PUSHES {
        assert_eq!(tx.send_shared_later(msg(10), &charge, &mut later), Ok(()));
    }
    assert!(later.due());
    later.wake();
    assert!(later.queues.is_empty() && !later.due());
    assert_eq!(tx.send_shared_later(msg(10), &charge, &mut later), Ok(()));
    assert_eq!(later.queues.len(), 1);
}

#[tokio::test]
async fn later_wakes_wake_a_filling_queue_at_once() {
    // Left to its batch, a queue could pass its limit before its
    // connection ran: past a quarter of it, it is woken at each push.
    let budget = Budget::new(1_000, 1 << 30);
    let (tx, mut rx) = budget.queue();
    let charge = tx.charge(100);
    let mut later = LaterWakes::default();
    let receiving = tokio::spawn(async move { matches!(rx.recv().await, Received::Message(_)) });
    tokio::task::yield_now().await;
    while tx.pending_bytes() <= 1_000 / LaterWakes::WAKE_AT_FRACTION_OF_LIMIT {
        assert_eq!(tx.send_shared_later(msg(10), &charge, &mut later), Ok(()));
    }
    assert!(!later.due(), "a few pushes: the batch is not due");
    let woken = tokio::time::timeout(std::time::Duration::from_secs(10), receiving).await;
    assert!(woken.expect("woken before the batch").unwrap());
    drop(later);
}

#[tokio::test]
async fn a_lower_limit_wakes_queues_waiting_for_their_batch() {
    // No later push would cross the quarter mark of the new limit.
    let budget = Budget::new(1 << 20, 1 << 30);
    let (tx, mut rx) = budget.queue();
    let charge = tx.charge(100);
    let mut later = LaterWakes::default();
    let receiving = tokio::spawn(async move { matches!(rx.recv().await, Received::Message(_)) });
    tokio::task::yield_now().await;
    for _ in 0..3 {
        assert_eq!(tx.send_shared_later(msg(10), &charge, &mut later), Ok(()));
    }
    tokio::task::yield_now().await;
    assert!(!receiving.is_finished(), "waiting for its batch");
    budget.set_limits(tx.pending_bytes() * 2, 1 << 30);
    let woken = tokio::time::timeout(std::time::Duration::from_secs(10), receiving).await;
    assert!(woken.expect("woken by the new limits").unwrap());
    drop(later);
}
