//! The pg_realtime broadcaster, free of pgrx so it builds and tests in
//! seconds. Its modules follow a row's path (`docs/architecture.md`, "Life
//! of a row"):
//!
//! 1. [`shared`]: what committing backends and the worker share. A capture
//!    trigger asks the interest table and key filters whether anyone wants
//!    the row, encodes it into the transaction's record, registers with the
//!    commit fence and publishes the record into the change ring at commit.
//!    The extension's backend code uses this module and no other.
//! 2. [`changes`]: the worker's `postgres_changes` logic. It matches the
//!    rows of decoded records against the subscription registry, decides per
//!    subscriber what row-level security lets through and builds the event
//!    frames; it also decides which capture triggers should be on.
//! 3. [`server`]: the network side. The WebSocket handshake, connections
//!    speaking the Realtime protocol, join configs and JWT verification,
//!    fan-out of frames with bounded queues, and the wake-up and log links
//!    to the worker's main thread.
#![deny(unsafe_code)]

pub mod changes;
pub mod fuzzing;
pub mod server;
pub mod shared;
