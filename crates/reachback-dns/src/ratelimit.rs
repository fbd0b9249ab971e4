//! Queries per second per source address (a token bucket each), so a flood from
//! one source cannot starve the others. Bounded: past `max_sources` buckets the
//! ones that are full again (idle long enough) are forgotten, and if that is not
//! enough, new sources share one overflow bucket. Time comes in as an argument.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    max_sources: usize,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    overflow: (f64, Instant),
}

impl RateLimiter {
    /// `per_second` queries a second per source, bursts up to twice that; 0 disables.
    pub fn new(per_second: u32, max_sources: usize, now: Instant) -> Self {
        let per_second = f64::from(per_second);
        RateLimiter { per_second, burst: (2.0 * per_second).max(1.0), max_sources, buckets: HashMap::new(), overflow: ((2.0 * per_second).max(1.0), now) }
    }

    fn refill(&self, bucket: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.1).as_secs_f64();
        bucket.0 = (bucket.0 + elapsed * self.per_second).min(self.burst);
        bucket.1 = now;
    }

    /// Whether a query from `source` may be answered now.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            let (per_second, burst) = (self.per_second, self.burst);
            self.buckets.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second < burst);
            if self.buckets.len() >= self.max_sources {
                let mut overflow = self.overflow;
                self.refill(&mut overflow, now);
                let allowed = overflow.0 >= 1.0;
                if allowed {
                    overflow.0 -= 1.0;
                }
                self.overflow = overflow;
                return allowed;
            }
        }
        let burst = self.burst;
        let mut bucket = *self.buckets.get(&source).unwrap_or(&(burst, now));
        self.refill(&mut bucket, now);
        let allowed = bucket.0 >= 1.0;
        if allowed {
            bucket.0 -= 1.0;
        }
        self.buckets.insert(source, bucket);
        allowed
    }

    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_flood_from_one_source_does_not_starve_another() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(100, 1000, start);
        let flooder: IpAddr = "10.0.0.1".parse().expect("ip");
        let quiet: IpAddr = "10.0.0.2".parse().expect("ip");
        let allowed = (0..10_000).filter(|_| limiter.allow(flooder, start)).count();
        assert_eq!(allowed, 200, "the burst, then nothing within the same instant");
        assert!(limiter.allow(quiet, start), "another source is answered");
        // a second later the flooder has its rate again
        let later = start + Duration::from_secs(1);
        assert_eq!((0..1000).filter(|_| limiter.allow(flooder, later)).count(), 100);
    }

    #[test]
    fn buckets_are_bounded() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10, 100, start);
        for index in 0..1000u32 {
            let _ = limiter.allow(IpAddr::from(index.to_be_bytes()), start);
        }
        assert!(limiter.sources() <= 100, "{}", limiter.sources());
        // once they refill, old buckets make room for new sources
        let later = start + Duration::from_secs(10);
        assert!(limiter.allow("192.0.2.1".parse().expect("ip"), later));
        assert!(limiter.sources() <= 100);
        assert!(RateLimiter::new(0, 1, start).allow("192.0.2.2".parse().expect("ip"), start), "0 disables");
    }
}
