//! Logging from network threads. They must not call `elog`, so a small
//! `tracing` subscriber turns each event into a [`LogRecord`] and hands it to
//! the worker's main thread, which writes it to the Postgres log. When the
//! queue is full, records are dropped and counted rather than blocking a
//! network thread.

use crate::server::wake::Waker;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One log line for the main thread.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub level: Level,
    pub message: String,
}

/// Forwards `tracing` events to the main thread.
pub struct Forwarder {
    tx: Sender<LogRecord>,
    waker: Waker,
    /// The most verbose level forwarded (`level_number`), which the main
    /// thread sets from `log_min_messages`.
    max_level: Arc<AtomicU8>,
    dropped: Arc<AtomicU64>,
}

/// Levels as numbers, most severe first.
fn level_number(level: Level) -> u8 {
    match level {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    }
}

/// Builds the subscriber and the receiving end. `capacity` bounds the queue.
pub fn forwarder(waker: Waker, max_level: Level, capacity: usize) -> (Forwarder, LogReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    let max_level = Arc::new(AtomicU8::new(level_number(max_level)));
    (
        Forwarder {
            tx,
            waker,
            max_level: max_level.clone(),
            dropped: dropped.clone(),
        },
        LogReceiver { rx, dropped, max_level },
    )
}

/// The main thread's end.
pub struct LogReceiver {
    rx: Receiver<LogRecord>,
    dropped: Arc<AtomicU64>,
    max_level: Arc<AtomicU8>,
}

impl LogReceiver {
    /// The most verbose level forwarded from now on.
    pub fn set_max_level(&self, level: Level) {
        if self.max_level.swap(level_number(level), Ordering::Relaxed) != level_number(level) {
            // Call sites cache whether they are enabled: ask them again.
            tracing::callsite::rebuild_interest_cache();
        }
    }

    /// Pending records, and how many were dropped since the last call.
    pub fn drain(&self) -> (Vec<LogRecord>, u64) {
        (self.rx.try_iter().collect(), self.dropped.swap(0, Ordering::Relaxed))
    }
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        level_number(*metadata.level()) <= self.max_level.load(Ordering::Relaxed)
    }

    // Cached per call site, so a disabled `debug!` costs one load; the
    // cache is rebuilt when the level changes (`set_max_level`).
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if self.enabled(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(
            match self.max_level.load(Ordering::Relaxed) {
                0 => Level::ERROR,
                1 => Level::WARN,
                2 => Level::INFO,
                3 => Level::DEBUG,
                _ => Level::TRACE,
            }
            .into(),
        )
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        // Fields carry what clients sent (topics, events, config): one
        // log record stays one line.
        let message = match escape(&fields.0) {
            std::borrow::Cow::Borrowed(_) => fields.0,
            std::borrow::Cow::Owned(escaped) => escaped,
        };
        let record = LogRecord {
            level: *event.metadata().level(),
            message,
        };
        match self.tx.try_send(record) {
            Ok(()) => self.waker.wake(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// `text` with control characters and Unicode line breaks written as
/// escapes (`\n`, `\u{2028}`), so that a string a client chose cannot
/// start a forged line in the server log.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::wake::wake_pair;

    #[test]
    fn events_reach_the_receiver_and_wake_it() {
        let (waker, mut wake_rx) = wake_pair().unwrap();
        let (fwd, rx) = forwarder(waker, Level::INFO, 2);
        tracing::subscriber::with_default(fwd, || {
            tracing::info!(peer = "127.0.0.1:1", "connection opened");
            tracing::debug!("too verbose");
            tracing::warn!("second");
            tracing::warn!("third, over capacity");
        });
        let (records, dropped) = rx.drain();
        assert_eq!(
            records,
            vec![
                LogRecord {
                    level: Level::INFO,
                    message: "connection opened peer=127.0.0.1:1".into()
                },
                LogRecord {
                    level: Level::WARN,
                    message: "second".into()
                },
            ]
        );
        assert_eq!(dropped, 1);
        assert_eq!(wake_rx.drain(), 2);
    }

    #[test]
    fn the_level_follows_what_the_main_thread_sets() {
        let (waker, _wake_rx) = wake_pair().unwrap();
        let (fwd, rx) = forwarder(waker, Level::INFO, 8);
        let dispatch = tracing::Dispatch::new(fwd);
        // (one call site, logged before and after the change)
        let log = |n: u32| tracing::dispatcher::with_default(&dispatch, || tracing::debug!("call {n}"));
        log(1);
        rx.set_max_level(Level::DEBUG);
        log(2);
        let (records, _) = rx.drain();
        assert_eq!(
            records.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
            ["call 2"]
        );
    }

    #[test]
    fn client_strings_cannot_forge_log_lines() {
        let (waker, _wake_rx) = wake_pair().unwrap();
        let (fwd, rx) = forwarder(waker, Level::INFO, 4);
        let topic = "realtime:x\nLOG:  database system is shut down\r\u{2028}\u{7}";
        tracing::subscriber::with_default(fwd, || {
            tracing::info!(topic = %topic, "join refused: {topic}");
        });
        let (records, _) = rx.drain();
        let message = &records[0].message;
        assert!(!message.contains(['\n', '\r', '\u{2028}', '\u{7}']), "{message:?}");
        assert!(message.contains("realtime:x\\nLOG:  database"), "{message}");
        assert!(message.contains("\\u{2028}\\u{7}"), "{message}");
        assert_eq!(escape("plain é"), "plain é");
        assert!(matches!(escape("plain"), std::borrow::Cow::Borrowed(_)));
    }
}
