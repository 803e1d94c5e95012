//! The realtime background worker. Its main thread owns every Postgres call:
//! it waits on its latch and on a wake-up socket written by the network
//! threads, reloads settings on SIGHUP, writes the network threads' log
//! records to the server log, and on SIGTERM shuts the WebSocket server down.
//! The tokio runtime's threads start with every signal blocked and never call
//! Postgres.

mod access;
mod acting;
mod capture_switch;
mod catalog;
mod channels;
mod deadline;
mod deliver;
mod drain;
mod fds;
mod invalidations;
mod listen;
mod network;
mod plans;
mod postgres_changes;
mod private;
mod share;
mod subscribe;

use bgworker::server::log::{forwarder, LogReceiver};
use bgworker::server::wake::{wake_pair, WakeReceiver};
use bgworker::server::Context;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::sync::Arc;
use std::time::Duration;

/// How long after an error exit the postmaster restarts the worker.
/// (Short: changes committed while it is down are lost, and realtime-js on
/// Node's built-in WebSocket does not retry a refused connection.)
const RESTART_AFTER: Duration = Duration::from_secs(1);
/// How long the main thread works through network requests (joins, say)
/// before it drains the change ring again: a storm of joins holds
/// delivery back by about this much at a time (a single request may take
/// longer: the limits on joins bound it).
const REQUEST_SLICE: Duration = Duration::from_millis(2);
/// Slices in one pass of the main loop, and the time they may take (a
/// request may take up to pg_realtime.check_timeout); then it goes back to
/// its latch (signals, interrupts, postmaster death, logs) and comes
/// straight back.
const SLICES_PER_PASS: usize = 16;
const PASS_BUDGET: Duration = Duration::from_millis(50);

/// Registers the worker; called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("pg_realtime worker")
        .set_type("pg_realtime")
        .set_library("pg_realtime")
        .set_function("pg_realtime_worker_main")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// The worker's entry point. An ERROR (or a Rust panic, which pgrx turns
/// into one) ends the process with exit code 1: the postmaster restarts the
/// worker after `RESTART_AFTER`, and the cluster keeps running.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_realtime_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&crate::gucs::database()), None);
    prepare_session();

    let (waker, wake_rx) = wake_pair().unwrap_or_else(|e| error!("pg_realtime: cannot create the wake-up socket: {e}"));
    let (logger, logs) = forwarder(waker.clone(), network_log_level(), 4096);
    // Only this process's network threads log through it.
    let _ = tracing::subscriber::set_global_default(logger);

    let started = network::Network::start(&waker);

    let events = Events::new(wake_rx.fd());
    let mut main = MainLoop {
        events,
        wake_rx,
        logs,
        changes: postgres_changes::PostgresChanges::new(started.requests, started.ctx.clone()),
        ctx: started.ctx,
    };
    while main.wait() {
        if started.network.has_stopped() {
            main.forward_logs();
            error!("pg_realtime: the WebSocket server stopped unexpectedly");
        }
    }

    // SIGTERM (pg_ctl stop, pg_terminate_backend): close every socket with
    // 1001, then leave.
    started.network.stop();
    main.forward_logs();
    log!("pg_realtime: worker stopped");
    // Exit code 0 would unregister the worker for good; with 1 the
    // postmaster restarts it (after pg_terminate_backend, say), except when
    // the whole server is shutting down.
    // SAFETY: proc_exit runs Postgres's exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(1) };
}

/// Sets the worker's session up before it serves anyone: its time zone and
/// search_path, the check deadline, the quarantine it inherits, its latch,
/// and an empty interest table.
fn prepare_session() {
    // Filter values are rendered by this session: timestamps in UTC, like
    // the events themselves.
    // An empty search_path for the whole session: the worker's own
    // catalog questions run as superuser, and no operator or function a
    // user created (ALTER DATABASE ... SET search_path can put their schema
    // before pg_catalog) may stand in for a catalog one.
    // (the database's own is what subscribers' code runs with)
    let search_path = BackgroundWorker::transaction(|| {
        let search_path = Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')")?;
        Spi::run("SET TIME ZONE 'UTC'; SET search_path = ''")?;
        Ok::<_, pgrx::spi::Error>(search_path)
    })
    .unwrap_or_else(|e| error!("pg_realtime: cannot set the worker's time zone and search_path: {e}"));
    acting::remember_search_path(search_path.unwrap_or_default());
    deadline::register();
    invalidations::register();
    BackgroundWorker::transaction(acting::quarantine_on_start);
    crate::shmem::set_worker_latch();
    // Whatever subscribers the previous worker had are gone with it.
    crate::shmem::interest().set(&Default::default(), false);
}

/// The main loop's wait: its latch, the wake-up socket, postmaster death.
/// Built once: rebuilding it per wait (WaitLatchOrSocket) costs several
/// system calls on every wake-up.
struct Events(*mut pg_sys::WaitEventSet);

impl Events {
    fn new(wake_fd: std::os::fd::RawFd) -> Events {
        // SAFETY: main thread, after the latch is owned; TopMemoryContext
        // (or the resource owner on PG17+) keeps the set for the process's
        // life.
        unsafe {
            #[cfg(not(any(feature = "pg17", feature = "pg18")))]
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            #[cfg(any(feature = "pg17", feature = "pg18"))]
            let set = pg_sys::CreateWaitEventSet(std::ptr::null_mut(), 3);
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                wake_fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            Events(set)
        }
    }
}

struct MainLoop {
    events: Events,
    wake_rx: WakeReceiver,
    logs: LogReceiver,
    ctx: Arc<Context>,
    changes: postgres_changes::PostgresChanges,
}

impl MainLoop {
    /// Waits for the latch or a wake-up and handles what it finds. Returns
    /// false once SIGTERM has arrived.
    fn wait(&mut self) -> bool {
        let mut occurred = [pg_sys::WaitEvent::default(); 3];
        // Wake up by itself only when switching capture triggers is due.
        let timeout_ms = self
            .changes
            .settle_in()
            .map_or(-1, |d| d.as_micros().div_ceil(1000) as std::ffi::c_long);
        // SAFETY: the set was built on this thread for this process's latch
        // and the wake-up socket, both alive as long as `self`.
        let n = unsafe {
            let n = pg_sys::WaitEventSetWait(
                self.events.0,
                timeout_ms,
                occurred.as_mut_ptr(),
                occurred.len() as i32,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            n
        };
        pg_sys::check_for_interrupts!();
        if occurred[..n.max(0) as usize]
            .iter()
            .any(|e| e.events & pg_sys::WL_SOCKET_READABLE != 0)
        {
            self.wake_rx.drain();
            self.forward_logs();
        }
        if BackgroundWorker::sigterm_received() {
            return false;
        }
        if BackgroundWorker::sighup_received() {
            self.reload();
        }
        // Requests in slices, the ring drained after each: delivery never
        // waits for more than a slice of them.
        let mut delivered = 0;
        let pass = std::time::Instant::now();
        for _ in 0..SLICES_PER_PASS {
            if pass.elapsed() >= PASS_BUDGET {
                break;
            }
            let more = self.changes.handle_requests(REQUEST_SLICE);
            self.changes.settle_if_due();
            delivered += self.changes.drain();
            if !more {
                break;
            }
        }
        if self.changes.has_requests() {
            // SAFETY: the main thread setting its own latch: the next wait
            // returns at once.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
        if delivered > 0 {
            // Under a stream of commits, nap before waiting again: commits
            // arriving meanwhile find the latch already set (no signal to
            // send) and are taken together on the next pass. The nap grows
            // with the batch (bgworker::changes::batch): 250 µs after a lone commit,
            // at most 2 ms under a stream.
            let nap = bgworker::changes::batch::nap_after(delivered);
            // SAFETY: a plain sleep on the main thread; signals cut it short.
            unsafe { pg_sys::pg_usleep(nap.as_micros() as std::ffi::c_long) };
        }
        true
    }

    /// SIGHUP: re-read the configuration and hand the server its new
    /// settings; connections stay open.
    fn reload(&mut self) {
        let publication = crate::gucs::publication();
        // SAFETY: called on the main thread, outside any transaction, as
        // Postgres's own processes do on SIGHUP.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        if crate::gucs::publication() != publication {
            // Another publication: capture exactly its tables from now on.
            match catalog::in_transaction(|| Spi::run("SELECT realtime.sync_captured_tables()")) {
                Ok(()) => log!(
                    "pg_realtime: now capturing publication \"{}\"",
                    crate::gucs::publication()
                ),
                Err(e) => warning!("pg_realtime: could not switch publications: {e}"),
            }
        }
        let (settings, problem) = crate::gucs::server_settings();
        network::report_settings(&settings, problem);
        self.ctx.update_settings(settings);
        self.logs.set_max_level(network_log_level());
        log!("pg_realtime: configuration reloaded");
    }

    fn forward_logs(&self) {
        let (records, dropped) = self.logs.drain();
        for record in records {
            // Never ERROR here: that would end the worker. Network-side
            // errors are reported as warnings.
            match record.level {
                tracing::Level::ERROR | tracing::Level::WARN => {
                    warning!("pg_realtime: {}", record.message)
                }
                tracing::Level::INFO => log!("pg_realtime: {}", record.message),
                _ => debug1!("pg_realtime: {}", record.message),
            }
        }
        if dropped > 0 {
            warning!("pg_realtime: {dropped} log messages from network threads were dropped (log queue full)");
        }
    }
}

/// What the network threads log: their debug lines too when
/// `log_min_messages` is a DEBUG level.
fn network_log_level() -> tracing::Level {
    // SAFETY: a plain read of the setting's variable, on the main thread.
    let min = unsafe { pg_sys::log_min_messages };
    if min <= pg_sys::DEBUG1 as i32 {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    }
}
