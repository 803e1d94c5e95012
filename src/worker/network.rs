//! The worker's network side: binding the listeners, starting the
//! WebSocket server on its own threads, and stopping it on SIGTERM. The
//! threads start with every signal blocked and never call Postgres.

use super::{fds, listen};
use bgworker::server::link::{main_link, MainReceiver};
use bgworker::server::wake::Waker;
use bgworker::server::{self, Context, Options};
use pgrx::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Network threads for the WebSocket server.
const NETWORK_THREADS: usize = 2;
/// After SIGTERM, how long clients get to receive their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1200);

/// The running WebSocket server.
pub(super) struct Network {
    runtime: Runtime,
    server: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

/// What the main loop keeps of a started server: the state it shares with
/// the network threads, and the requests they send it.
pub(super) struct Started {
    pub(super) network: Network,
    pub(super) ctx: Arc<Context>,
    pub(super) requests: MainReceiver,
}

impl Network {
    /// Reads the settings, binds `pg_realtime.listen_addresses` and starts
    /// the server; `waker` wakes the main loop. An ERROR if it cannot listen
    /// anywhere it was asked to.
    pub(super) fn start(waker: &Waker) -> Started {
        let (settings, problem) = crate::gucs::server_settings();
        report_settings(&settings, problem);
        let addresses = crate::gucs::listen_addresses();
        let listeners = listen::bind(&addresses, crate::gucs::port());
        if listeners.is_empty() && !addresses.trim().is_empty() {
            error!("pg_realtime: could not listen on any of pg_realtime.listen_addresses = '{addresses}'");
        }
        let runtime = bgworker::server::runtime::build(NETWORK_THREADS, block_all_signals)
            .unwrap_or_else(|e| error!("pg_realtime: cannot start the network threads: {e}"));
        let (link, requests) = main_link(waker.clone());
        let max_connections = settings.max_connections;
        let ctx = Context::new(settings, Options::default(), crate::shmem::counters(), Some(link));
        ctx.set_socket_capacity(fds::client_socket_capacity(max_connections));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let server = {
            let _entered = runtime.enter();
            let listeners = listeners
                .into_iter()
                .filter_map(|l| tokio::net::TcpListener::from_std(l).ok())
                .collect::<Vec<_>>();
            let (ctx, waker) = (ctx.clone(), waker.clone());
            runtime.spawn(async move {
                server::run(listeners, ctx, shutdown_rx).await;
                // Wake the main loop: the server ending is news to it.
                waker.wake();
            })
        };
        Started {
            network: Network {
                runtime,
                server,
                shutdown,
            },
            ctx,
            requests,
        }
    }

    /// Whether the server ended (it only should after `stop`).
    pub(super) fn has_stopped(&self) -> bool {
        self.server.is_finished()
    }

    /// Closes every socket with 1001, gives clients `SHUTDOWN_GRACE` to
    /// receive it, and stops the threads.
    pub(super) fn stop(self) {
        let _ = self.shutdown.send(true);
        let server = self.server;
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(SHUTDOWN_GRACE, server).await });
        self.runtime.shutdown_timeout(Duration::from_millis(200));
    }
}

/// Warns about settings that make tokens (or every connection) refused.
pub(super) fn report_settings(settings: &server::Settings, problem: Option<String>) {
    if let Some(problem) = problem {
        warning!("pg_realtime: {problem}; tokens that need it are refused until it is fixed");
    }
    if !settings.verifier.has_keys() {
        warning!(
            "pg_realtime: neither pg_realtime.jwt_secret nor pg_realtime.jwks is set; every WebSocket connection will be refused"
        );
    }
}

/// Runs first on every runtime thread: block all signals there, so that
/// Postgres's handlers (which touch process state) only run on the main thread.
fn block_all_signals() {
    // SAFETY: sigfillset initialises a local set; pthread_sigmask changes
    // only the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
