//! A heartbeat prober: one more socket that sends a Phoenix heartbeat
//! every 100 ms while a benchmark runs and notes how long each reply
//! took, to show the server kept answering (supabase-js reconnects when
//! a heartbeat goes unanswered until the next, 25 s later).

use futures_util::{SinkExt, StreamExt};
use pg_realtime_e2e::load::Ws;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// What the prober saw.
pub struct Heartbeats {
    pub sent: usize,
    pub answered: usize,
    pub max_ms: f64,
}

pub struct Prober {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Heartbeats>,
}

impl Prober {
    pub fn start(ws: Ws) -> Prober {
        let (stop, stopped) = oneshot::channel();
        Prober {
            stop,
            task: tokio::spawn(probe(ws, stopped)),
        }
    }

    /// Stops probing, after waiting (5 s at most) for the last replies.
    pub async fn stop(self) -> Heartbeats {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

async fn probe(mut ws: Ws, mut stopped: oneshot::Receiver<()>) -> Heartbeats {
    let mut beat = tokio::time::interval(Duration::from_millis(100));
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut seen = Heartbeats {
        sent: 0,
        answered: 0,
        max_ms: 0.0,
    };
    let mut draining: Option<Instant> = None;
    loop {
        if draining.is_some_and(|since| pending.is_empty() || since.elapsed() > Duration::from_secs(5)) {
            break;
        }
        tokio::select! {
            _ = beat.tick(), if draining.is_none() => {
                let r = format!("hb{}", seen.sent);
                let text = format!(r#"{{"topic":"phoenix","event":"heartbeat","payload":{{}},"ref":"{r}"}}"#);
                if ws.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
                pending.insert(r, Instant::now());
                seen.sent += 1;
            }
            frame = ws.next() => {
                let Some(Ok(Message::Text(text))) = frame else { break };
                let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if let Some(sent) = reply["ref"].as_str().and_then(|r| pending.remove(r)) {
                    seen.answered += 1;
                    seen.max_ms = seen.max_ms.max(sent.elapsed().as_secs_f64() * 1000.0);
                }
            }
            _ = &mut stopped, if draining.is_none() => draining = Some(Instant::now()),
            _ = tokio::time::sleep(Duration::from_millis(100)), if draining.is_some() => {}
        }
    }
    // (a reply still owed counts as late as it is now)
    for sent in pending.values() {
        seen.max_ms = seen.max_ms.max(sent.elapsed().as_secs_f64() * 1000.0);
    }
    seen
}
