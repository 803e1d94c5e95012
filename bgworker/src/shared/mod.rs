//! What every committing backend and the worker share: the structures in
//! shared memory (over atomics only), the record a transaction's changes
//! travel in, and the rules both sides must agree on (a value's kind and
//! canonical key, which settings are secret). Capture triggers run this
//! code inside user transactions, so none of it waits for the worker: its
//! one lock is the ring's writer spin lock, held while a record's space is
//! reserved (`docs/architecture.md`, "Life of a row").

pub mod fence;
pub mod interest;
pub mod json;
pub mod keys;
pub mod prefilter;
pub mod quarantine;
pub mod redact;
pub mod ring;
pub mod stats;
pub mod wire;
