//! How fast a connected peer delivers chunks, and how many bytes it still owes:
//! each chunk request goes to the peer expected to answer it first, so a file
//! held by several peers is fetched from all of them, each in proportion to its
//! speed, and a slow peer is given little.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of a peer's past pace is kept at each answer: the last ten or so
/// answers count.
const KEPT: f64 = 0.9;

#[derive(Default)]
pub struct Pace {
    state: Mutex<PaceState>,
}

#[derive(Default)]
struct PaceState {
    /// Bytes of chunks asked for and not answered yet.
    owed: u64,
    /// Bytes answered, and seconds spent owing some: the rate is their ratio.
    /// Time, not each answer's own wait, since the answers to requests that
    /// overlap arrive together.
    delivered: f64,
    busy: f64,
    /// Up to when `busy` is counted.
    counted_to: Option<Instant>,
}

impl PaceState {
    /// The seconds spent owing since the last call.
    fn busy_time(&mut self) -> f64 {
        let now = Instant::now();
        let from = self.counted_to.replace(now);
        match from.filter(|_| self.owed > 0) {
            Some(from) => now.saturating_duration_since(from).as_secs_f64(),
            None => 0.0,
        }
    }
}

impl Pace {
    fn state(&self) -> std::sync::MutexGuard<'_, PaceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `bytes` more would take to arrive, behind what the peer owes;
    /// `None` while it has answered nothing.
    pub fn expected_wait(&self, bytes: u64) -> Option<Duration> {
        let state = self.state();
        if state.delivered <= 0.0 {
            return None;
        }
        let seconds = (state.owed + bytes) as f64 * state.busy / state.delivered;
        Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
    }

    /// Whether the peer owes nothing now.
    pub fn is_idle(&self) -> bool {
        self.state().owed == 0
    }

    /// Records a request for `bytes`, settled when the ticket is answered or
    /// dropped (the time waited then counts, with nothing delivered).
    pub fn asked(self: &Arc<Self>, bytes: u64) -> Ticket {
        let mut state = self.state();
        state.busy += state.busy_time();
        state.owed += bytes;
        Ticket {
            pace: Arc::clone(self),
            bytes,
            answered: false,
        }
    }

    fn settle(&self, bytes: u64, answered: bool) {
        let mut state = self.state();
        let busy = state.busy_time();
        state.owed = state.owed.saturating_sub(bytes);
        if answered {
            state.delivered = state.delivered * KEPT + bytes as f64;
            state.busy *= KEPT;
        }
        state.busy += busy;
    }
}

/// A request a peer owes an answer to.
pub struct Ticket {
    pace: Arc<Pace>,
    bytes: u64,
    answered: bool,
}

impl Ticket {
    /// The peer answered.
    pub fn answered(mut self) {
        self.answered = true;
        self.pace.settle(self.bytes, true);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered {
            self.pace.settle(self.bytes, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_bytes_over_the_time_spent_owing_them() {
        let pace = Arc::new(Pace::default());
        assert_eq!(pace.expected_wait(1000), None);
        assert!(pace.is_idle());

        // Two requests that overlap, answered together after 20 ms or a bit
        // more: about 2 MB in that time, so 1 MB more takes about half as long.
        let (first, second) = (pace.asked(1_000_000), pace.asked(1_000_000));
        assert!(!pace.is_idle());
        std::thread::sleep(Duration::from_millis(20));
        first.answered();
        second.answered();
        assert!(pace.is_idle());
        let wait = pace.expected_wait(1_000_000).unwrap();
        assert!(
            wait >= Duration::from_millis(5) && wait < Duration::from_secs(2),
            "{wait:?}"
        );

        // What is owed is waited for first.
        let owed = pace.asked(1_000_000);
        let behind = pace.expected_wait(1_000_000).unwrap();
        assert!(behind >= 2 * wait - Duration::from_millis(1), "{behind:?}");

        // Given up on after 200 ms: that time counts, with nothing delivered.
        std::thread::sleep(Duration::from_millis(200));
        drop(owed);
        assert!(pace.is_idle());
        // About 1.9 MB delivered (the older answer weighs 0.9): 200 ms more
        // of waiting adds more than 100 ms to the time 1 MB takes.
        let slower = pace.expected_wait(1_000_000).unwrap();
        assert!(
            slower >= wait + Duration::from_millis(100),
            "{slower:?} against {wait:?}"
        );
    }
}
