//! How long the worker's main loop naps after delivering, so that commits
//! arriving meanwhile are taken together.
//!
//! Each pass of the main loop costs a wake-up (a context switch on a busy
//! machine) besides its work, so under a stream of commits fewer, larger
//! batches cost the server less. The nap grows with the batch just
//! delivered: a lone commit waits at most [`MIN_NAP`] more; a sustained
//! stream of more than one commit per [`MIN_NAP`] settles at [`MAX_NAP`]
//! per batch.

use std::time::Duration;

/// The nap after a batch of one transaction.
pub const MIN_NAP: Duration = Duration::from_micros(250);
/// The longest nap: the most a busy stream adds to delivery latency.
pub const MAX_NAP: Duration = Duration::from_millis(2);

/// The nap after delivering `transactions` transactions in one pass.
pub fn nap_after(transactions: usize) -> Duration {
    MIN_NAP
        .saturating_mul(transactions.max(1).min(u32::MAX as usize) as u32)
        .min(MAX_NAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_commit_naps_least() {
        assert_eq!(nap_after(0), MIN_NAP);
        assert_eq!(nap_after(1), MIN_NAP);
    }

    #[test]
    fn larger_batches_nap_longer_up_to_the_cap() {
        assert_eq!(nap_after(2), MIN_NAP * 2);
        assert!(nap_after(4) > nap_after(3));
        assert_eq!(nap_after(8), MAX_NAP);
        assert_eq!(nap_after(100_000), MAX_NAP);
        assert_eq!(nap_after(usize::MAX), MAX_NAP);
    }
}
