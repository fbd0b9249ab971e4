//! Keepalive on the control stream: a `Ping` after `interval` without traffic, the
//! tunnel is dead when nothing arrived for `timeout`. TCP keepalive finds a dead link;
//! this one also catches a peer whose event loop is stuck while its socket lives.

use std::time::{Duration, Instant};

/// What the shell must do when the timer fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LivenessAction {
    /// send `Ping { seq }`
    SendPing(u64),
    /// close the tunnel: nothing heard for the whole timeout
    Dead,
}

#[derive(Clone, Debug)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    last_sent: Instant,
    next_seq: u64,
}

impl Liveness {
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Liveness { interval, timeout, last_heard: now, last_sent: now, next_seq: 1 }
    }

    /// Anything arrived from the peer.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Anything was sent to the peer.
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = self.last_sent.max(now);
    }

    /// When the shell must call [`Liveness::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Instant {
        (self.last_sent.max(self.last_heard) + self.interval).min(self.last_heard + self.timeout)
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Option<LivenessAction> {
        if now >= self.last_heard + self.timeout {
            return Some(LivenessAction::Dead);
        }
        if now >= self.last_sent.max(self.last_heard) + self.interval {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.sent(now);
            return Some(LivenessAction::SendPing(seq));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_when_quiet_and_declares_death_after_the_timeout() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut liveness = Liveness::new(start, 10 * second, 30 * second);
        assert_eq!(liveness.poll_timeout(), start + 10 * second);
        assert_eq!(liveness.handle_timeout(start + 5 * second), None);
        assert_eq!(liveness.handle_timeout(start + 10 * second), Some(LivenessAction::SendPing(1)));
        liveness.heard(start + 12 * second);
        assert_eq!(liveness.poll_timeout(), start + 22 * second);
        assert_eq!(liveness.handle_timeout(start + 22 * second), Some(LivenessAction::SendPing(2)));
        assert_eq!(liveness.handle_timeout(start + 32 * second), Some(LivenessAction::SendPing(3)));
        assert_eq!(liveness.poll_timeout(), start + 42 * second);
        assert_eq!(liveness.handle_timeout(start + 42 * second), Some(LivenessAction::Dead));
    }

    #[test]
    fn steady_traffic_never_pings() {
        let start = Instant::now();
        let mut liveness = Liveness::new(start, Duration::from_secs(10), Duration::from_secs(30));
        for tick in 1..100 {
            let now = start + Duration::from_secs(tick * 3);
            liveness.heard(now);
            liveness.sent(now);
            assert_eq!(liveness.handle_timeout(now), None);
        }
    }
}
