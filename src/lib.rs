//! pg_realtime: live database updates over WebSockets, served from inside
//! PostgreSQL. This crate is the thin Postgres layer; the protocol, JWT and
//! WebSocket server live in the pgrx-free `bgworker/` crate.

use pgrx::prelude::*;

mod api;
mod capture;
mod gucs;
mod hooks;
mod shmem;
mod subxact;
mod unguarded;
mod worker;

::pgrx::pg_module_magic!(name, version);

/// Whether this library was loaded through `shared_preload_libraries`.
/// Backends inherit the postmaster's value when they fork.
static PRELOADED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn preloaded() -> bool {
    PRELOADED.load(std::sync::atomic::Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a flag Postgres sets while it loads preload libraries.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::define(preloading);
    if !preloading {
        // Loaded by CREATE EXTENSION or a function call: without the worker
        // and shared memory nothing can run; the SQL API reports that.
        return;
    }
    PRELOADED.store(true, std::sync::atomic::Ordering::Relaxed);
    hooks::install();
    shmem::init();
    worker::register();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    include!("pg_tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_realtime'",
            // Off the default port, so a test cluster never meets a demo one.
            "pg_realtime.port = 54399",
            "pg_realtime.listen_addresses = '127.0.0.1'",
        ]
    }
}
