//! Exponential back-off with jitter, for every reconnect loop: after a
//! dispatcher restart its clients come back spread out, not all at once.

use std::time::Duration;

/// Delays that double from `first` up to `max`, each scaled by a random
/// factor in [0.5, 1).
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { first: Duration::from_millis(200), max: Duration::from_secs(10), failures: 0 }
    }
}

impl Backoff {
    /// The delay before the next attempt, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.first.saturating_mul(2u32.saturating_pow(self.failures.min(16))).min(self.max);
        self.failures = self.failures.saturating_add(1);
        base.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(200), "{first:?}");
        for _ in 0..40 {
            assert!(b.next_delay() < Duration::from_secs(10));
        }
        assert!(b.next_delay() >= Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(200));
    }
}
