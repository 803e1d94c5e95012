//! The tokio runtime the WebSocket server runs on.

use tokio::runtime::{Builder, Runtime};

/// A multi-threaded runtime whose threads all run `on_thread_start` first.
/// The extension passes a function that blocks every signal there, so that
/// Postgres's signal handlers only ever run on the worker's main thread.
pub fn build(threads: usize, on_thread_start: impl Fn() + Send + Sync + 'static) -> std::io::Result<Runtime> {
    Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("pg_realtime net")
        .enable_all()
        .on_thread_start(on_thread_start)
        .build()
}
