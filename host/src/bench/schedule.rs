//! The open-loop arrival schedule: send `i` is due at `start + i / rate`, whatever happened to
//! the sends before it.
//!
//! A closed-loop client waits for each answer before it sends again, so when the server
//! stalls the client stops sending, and the stall shows up in one sample instead of in every
//! request that should have been sent meanwhile ("coordinated omission", Gil Tene). An open
//! loop keeps the schedule, and its latency is measured from the time a send was *due*, not
//! from when it actually went out: queueing in the generator or in the server counts.

use std::time::Duration;

/// A fixed arrival rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    rate: f64,
}

impl Schedule {
    /// `rate` sends per second; must be finite and above 0.
    pub fn new(rate: f64) -> Result<Schedule, String> {
        if rate.is_finite() && rate > 0.0 {
            Ok(Schedule { rate })
        } else {
            Err(format!("the rate must be a number of sagas per second above 0, got {rate}"))
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// When send `i` is due, from the start of the run.
    pub fn due(&self, i: u64) -> Duration {
        // Computed from i each time (not by adding intervals), so rounding never accumulates;
        // rounded to the nanosecond, so 99 / 50 is 1.98 s and not a nanosecond short of it.
        Duration::from_nanos((i as f64 * 1e9 / self.rate).round() as u64)
    }

    /// How many sends fall within `window` from the start: those due strictly before its end.
    pub fn sends_within(&self, window: Duration) -> u64 {
        let exact = window.as_secs_f64() * self.rate;
        // ceil, except that a send due exactly at the end belongs to the next window.
        let n = exact.ceil() as u64;
        if n > 0 && self.due(n - 1) >= window {
            n - 1
        } else {
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_due_at_even_intervals_from_the_start() {
        let s = Schedule::new(50.0).unwrap();
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_millis(20));
        assert_eq!(s.due(50), Duration::from_secs(1));
        assert_eq!(s.due(99), Duration::from_millis(1980));
        // No drift after many sends.
        let fast = Schedule::new(3000.0).unwrap();
        assert_eq!(fast.due(3_000_000), Duration::from_secs(1000));
        let slow = Schedule::new(0.5).unwrap();
        assert_eq!(slow.due(3), Duration::from_secs(6));
    }

    #[test]
    fn a_window_holds_rate_times_its_length() {
        let s = Schedule::new(50.0).unwrap();
        assert_eq!(s.sends_within(Duration::from_secs(2)), 100);
        assert_eq!(s.sends_within(Duration::from_millis(1990)), 100);
        assert_eq!(s.sends_within(Duration::from_millis(1980)), 99);
        assert_eq!(s.sends_within(Duration::ZERO), 0);
        assert_eq!(Schedule::new(3.0).unwrap().sends_within(Duration::from_secs(1)), 3);
        assert_eq!(Schedule::new(0.4).unwrap().sends_within(Duration::from_secs(5)), 2);
    }

    #[test]
    fn rates_must_be_positive_numbers() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Schedule::new(bad).is_err(), "{bad}");
        }
    }
}
