//! `postgres_changes`: filters, typed values, subscriptions and the event
//! frames delivered to channels (`realtime-protocol.md` §3).

pub mod event;
pub mod filter;
#[cfg(test)]
mod fixtures;
pub mod json;
pub mod registry;
pub mod rls;
pub mod row;
pub mod switch;
pub mod value;
pub mod wire;
