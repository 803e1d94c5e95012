//! Token buckets for the join rate limits: `rate` tokens a second, at most
//! one second's worth saved up, one taken per join.

use parking_lot::Mutex;
use std::time::Instant;

/// A token bucket owned by one connection.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Takes a token if one is there, refilling at `rate` a second (the
    /// rate may change between calls: a configuration reload).
    pub fn take(&mut self, rate: u32, now: Instant) -> bool {
        self.take_n(1, rate, now)
    }

    /// Takes `n` tokens if that many are there (none otherwise).
    pub fn take_n(&mut self, n: u32, rate: u32, now: Instant) -> bool {
        let (n, rate) = (f64::from(n), f64::from(rate));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A bucket shared by every connection.
#[derive(Debug)]
pub struct SharedBucket(Mutex<Bucket>);

impl SharedBucket {
    pub fn new(rate: u32) -> SharedBucket {
        SharedBucket(Mutex::new(Bucket::new(rate, Instant::now())))
    }

    pub fn take(&self, rate: u32, now: Instant) -> bool {
        self.0.lock().take(rate, now)
    }

    pub fn take_n(&self, n: u32, rate: u32, now: Instant) -> bool {
        self.0.lock().take_n(n, rate, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_second_of_tokens_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(50, t0);
        assert_eq!((0..60).filter(|_| b.take(50, t0)).count(), 50);
        // 100 ms later, five more
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..10).filter(|_| b.take(50, t1)).count(), 5);
        // never more than a second's worth saved up
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(50, t2)).count(), 50);
        // a lower rate applies at once
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| b.take(2, t3)).count(), 2);
    }
}
