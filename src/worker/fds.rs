//! File descriptors: each client socket is one, and Postgres needs its own
//! (its file cache of `max_safe_fds`, plus the few it reserves, plus what
//! loading a library or opening a relation file takes). At start the worker
//! raises its soft `RLIMIT_NOFILE` to the hard limit and leaves Postgres's
//! share free; the server refuses upgrades past what remains (HTTP 429)
//! before a descriptor runs out.

use pgrx::prelude::*;

/// Descriptors Postgres keeps for itself beyond `max_safe_fds`
/// (`NUM_RESERVED_FDS` in fd.c).
const POSTGRES_RESERVED: usize = 10;
/// Beyond that, for what Postgres opens outside its file cache (a library
/// loaded by a policy's language, a WAL segment), tokio's own, and the
/// (at most 16) upgrades being refused with 429 at a time.
const SLACK: usize = 32;

/// Raises the soft limit, logs what it allows, and returns how many client
/// sockets (connections and handshakes together) the worker may hold.
pub fn client_socket_capacity(max_connections: usize) -> usize {
    let (before, limit) = raise_soft_limit();
    let open = open_descriptors();
    // SAFETY: a plain read of fd.c's global, set by the postmaster at start
    // and inherited.
    let postgres = unsafe { pg_sys::max_safe_fds }.max(0) as usize + POSTGRES_RESERVED;
    let capacity = limit.saturating_sub(open + postgres + SLACK);
    log!(
        "pg_realtime: file descriptor limit {limit} (soft limit raised from {before}); {open} open, {postgres} kept for PostgreSQL: at most {capacity} client sockets"
    );
    if max_connections > capacity {
        warning!(
            "pg_realtime: pg_realtime.max_connections is {max_connections} but the file descriptor limit allows {capacity} client sockets; \
             upgrades past {capacity} are refused with HTTP 429. Raise the hard limit (LimitNOFILE= in the PostgreSQL systemd unit, \
             or ulimit -Hn for pg_ctl) to allow more"
        );
    }
    capacity
}

/// Sets the soft `RLIMIT_NOFILE` to the hard one; returns (old soft, new
/// soft). On failure the old limit stays.
fn raise_soft_limit() -> (usize, usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the local struct and the
    // process's own limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return (1024, 1024);
        }
        let before = limit.rlim_cur;
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if limit.rlim_max != libc::RLIM_INFINITY && libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
        (clamp(before), clamp(limit.rlim_cur))
    }
}

fn clamp(n: libc::rlim_t) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).min(1 << 24)
}

/// Descriptors this process has open now.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count())
}
