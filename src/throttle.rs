//! A byte-rate limit shared by threads: the seed's "slow down disk IO to not
//! clobber the system when hashing a lot".

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: f64,
    /// The moment at which every byte accounted so far is within the budget.
    budget_until: Mutex<Instant>,
}

impl Throttle {
    /// `None` for a zero or negative rate: no limit.
    pub fn new(bytes_per_sec: f64) -> Option<Self> {
        (bytes_per_sec > 0.0).then(|| Throttle {
            bytes_per_sec,
            budget_until: Mutex::new(Instant::now()),
        })
    }

    /// Accounts for `bytes` just read and sleeps until they fit the rate.
    pub fn consume(&self, bytes: usize) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        let now = Instant::now();
        let wake = {
            // A poisoned lock only means another thread panicked mid-update; the
            // instant inside is still a valid instant.
            let mut until = self
                .budget_until
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *until = (*until).max(now) + cost;
            *until
        };
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_unlimited() {
        assert!(Throttle::new(0.0).is_none());
    }

    #[test]
    fn consuming_ahead_of_the_rate_sleeps() {
        let throttle = Throttle::new(1_000_000.0).unwrap();
        let start = Instant::now();
        for _ in 0..4 {
            throttle.consume(50_000);
        }
        // 200 kB at 1 MB/s must take at least 0.2 s (an upper bound would make the test timing-dependent).
        assert!(start.elapsed() >= Duration::from_millis(195));
    }
}
