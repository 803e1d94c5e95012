//! The pg_realtime broadcaster, free of pgrx so it builds and tests in
//! seconds: the Realtime wire protocol, join configs, JWT verification and
//! the tokio WebSocket server. The extension crate connects it to Postgres.
#![deny(unsafe_code)]

pub mod batch;
pub mod changes;
pub mod fence;
pub mod interest;
pub mod join;
pub mod jwt;
pub mod log;
pub mod prefilter;
pub mod protocol;
pub mod quarantine;
pub mod redact;
pub mod ring;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod wake;
