//! Reconnect backoff: exponential with full jitter, capped, reset once a tunnel
//! has stayed up long enough. Randomness comes in as a number in `[0, 1)`.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// a tunnel up this long counts as healthy: the next failure starts over
    stable_after: Duration,
    attempt: u32,
    connected_at: Option<Instant>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, stable_after: Duration) -> Self {
        Backoff { initial, max, stable_after, attempt: 0, connected_at: None }
    }

    /// The tunnel came up.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The tunnel went down or a connect failed: how long to wait before the next try.
    /// `random` is uniform in `[0, 1)`.
    pub fn next_delay(&mut self, now: Instant, random: f64) -> Duration {
        if let Some(since) = self.connected_at.take()
            && now.saturating_duration_since(since) >= self.stable_after
        {
            self.attempt = 0;
        }
        let ceiling = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // half fixed, half jitter: never a thundering herd, never a zero wait
        let random = random.clamp(0.0, 1.0);
        ceiling.mul_f64(0.5 + 0.5 * random)
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_jitters_and_resets_after_a_stable_tunnel() {
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10), Duration::from_secs(30));
        let ceilings: Vec<u128> = (0..10).map(|_| backoff.next_delay(start, 1.0).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]);
        assert_eq!(backoff.next_delay(start, 0.0), Duration::from_secs(5));
        // a short-lived tunnel does not reset the attempt count
        backoff.connected(start);
        assert_eq!(backoff.next_delay(start + Duration::from_secs(1), 1.0), Duration::from_secs(10));
        // a tunnel that stayed up does
        backoff.connected(start);
        assert_eq!(backoff.next_delay(start + Duration::from_secs(31), 1.0), Duration::from_millis(100));
        assert_eq!(backoff.attempt(), 1);
    }
}
