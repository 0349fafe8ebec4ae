//! Deciding which failed handshakes get a log line.
//!
//! Anyone who can send UDP packets can make the dispatcher fail handshakes,
//! thousands a second; one line each would drown the log (and the disk).
//! [`FailureLog`] lets through the first failure from an address, then
//! counts that address's failures quietly until [`FAILURE_LOG_INTERVAL`] has
//! passed since its last line; the next failure after that is logged with
//! the count. It tracks at most [`MAX_TRACKED_ADDRESSES`] addresses and
//! forgets the one logged longest ago to make room, so memory stays bounded
//! whatever the number of sources.
//!
//! It is a plain data structure (time is passed in), tested as such; the
//! [`Listener`](crate::Listener) owns one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// At most one line per address per this interval.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How many addresses are remembered at once.
pub const MAX_TRACKED_ADDRESSES: usize = 1024;

/// Per-address counts of failed handshakes, deciding which to log.
#[derive(Debug)]
pub struct FailureLog {
    interval: Duration,
    cap: usize,
    /// For each address: when its last line was logged, and how many of its
    /// failures have been counted without a line since.
    by_addr: HashMap<IpAddr, (Instant, u64)>,
}

impl Default for FailureLog {
    fn default() -> Self {
        FailureLog::new(FAILURE_LOG_INTERVAL, MAX_TRACKED_ADDRESSES)
    }
}

impl FailureLog {
    /// A log allowing one line per address per `interval`, remembering at most `cap` addresses.
    pub fn new(interval: Duration, cap: usize) -> FailureLog {
        FailureLog { interval, cap: cap.max(1), by_addr: HashMap::new() }
    }

    /// Records a failure from `addr` at `now`. `Some(n)`: log it, saying
    /// that `n` earlier failures from that address were not logged; `None`:
    /// stay quiet (it has been counted).
    pub fn record(&mut self, addr: IpAddr, now: Instant) -> Option<u64> {
        if let Some((last, quiet)) = self.by_addr.get_mut(&addr) {
            if now.saturating_duration_since(*last) < self.interval {
                *quiet += 1;
                return None;
            }
            let n = *quiet;
            *last = now;
            *quiet = 0;
            return Some(n);
        }
        if self.by_addr.len() >= self.cap {
            // Forget the address logged longest ago. A linear scan: it runs
            // only for a new address when the table is full, and costs far
            // less than the handshake that failed.
            let oldest = self.by_addr.iter().min_by_key(|(_, (last, _))| *last).map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.by_addr.remove(&oldest);
            }
        }
        self.by_addr.insert(addr, (now, 0));
        Some(0)
    }

    /// How many addresses are remembered.
    pub fn tracked(&self) -> usize {
        self.by_addr.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn a_flood_from_one_address_gives_one_line_per_interval_with_the_count() {
        let mut log = FailureLog::new(Duration::from_secs(60), 16);
        let t0 = Instant::now();
        let lines: Vec<(u64, u64)> = (0..4_377u64)
            // One failure every 15 ms: 4,377 of them span about 65 s.
            .filter_map(|i| log.record(ip(1), t0 + Duration::from_millis(15 * i)).map(|n| (i, n)))
            .collect();
        // The first at once, the next after 60 s with everything in between counted.
        assert_eq!(lines, vec![(0, 0), (4_000, 3_999)]);
    }

    #[test]
    fn addresses_are_limited_separately() {
        let mut log = FailureLog::new(Duration::from_secs(60), 16);
        let t0 = Instant::now();
        assert_eq!(log.record(ip(1), t0), Some(0));
        assert_eq!(log.record(ip(2), t0), Some(0));
        assert_eq!(log.record(ip(1), t0 + Duration::from_secs(1)), None);
        assert_eq!(log.record(ip(2), t0 + Duration::from_secs(1)), None);
        assert_eq!(log.record(ip(2), t0 + Duration::from_secs(2)), None);
        assert_eq!(log.record(ip(1), t0 + Duration::from_secs(60)), Some(1));
        assert_eq!(log.record(ip(2), t0 + Duration::from_secs(61)), Some(2));
        // A quiet address starts over: its next failure is logged with nothing counted.
        assert_eq!(log.record(ip(1), t0 + Duration::from_secs(500)), Some(0));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_address_is_forgotten() {
        let mut log = FailureLog::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        for n in 0..3 {
            assert_eq!(log.record(ip(n), t0 + Duration::from_secs(u64::from(n))), Some(0));
        }
        assert_eq!(log.record(ip(0), t0 + Duration::from_secs(5)), None);
        // A fourth address evicts ip(0), whose last line is the oldest.
        assert_eq!(log.record(ip(3), t0 + Duration::from_secs(6)), Some(0));
        assert_eq!(log.tracked(), 3);
        assert_eq!(log.record(ip(1), t0 + Duration::from_secs(7)), None);
        // ip(0) was forgotten, so it is logged again (its count is lost, memory is not).
        assert_eq!(log.record(ip(0), t0 + Duration::from_secs(8)), Some(0));
        assert_eq!(log.tracked(), 3);
        for n in 100..10_000 {
            log.record(ip(n), t0 + Duration::from_secs(9));
        }
        assert_eq!(log.tracked(), 3);
    }
}
