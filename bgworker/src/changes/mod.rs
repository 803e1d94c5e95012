//! `postgres_changes` in the worker: filters and typed values, the
//! subscription registry, row-level-security checks, the events built from
//! a decoded record, the capture-switch decisions and the main loop's
//! batching (`docs/protocol.md`, "postgres_changes").

pub mod batch;
pub mod deliver;
pub mod event;
pub mod filter;
#[cfg(test)]
mod fixtures;
pub mod registry;
pub mod rls;
pub mod row;
pub mod switch;
pub mod value;
