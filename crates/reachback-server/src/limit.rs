//! Limits on failed console sign-ins, per account and per source address: a
//! sliding window of failure times kept in memory, bounded in size (entries whose
//! failures have all aged out go first, then the least recently failed). Each
//! replica keeps its own. Time is an argument, so tests drive it.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// At most `failures` failed sign-ins within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub failures: usize,
    pub window: Duration,
}

/// Failed sign-ins an account may have in 15 minutes.
pub const ACCOUNT_RULE: Rule = Rule { failures: 5, window: Duration::from_secs(15 * 60) };
/// Failed sign-ins a source address (an IPv6 /64) may have in 15 minutes.
pub const ADDRESS_RULE: Rule = Rule { failures: 20, window: Duration::from_secs(15 * 60) };
/// Accounts and addresses remembered at most, each.
pub const CAPACITY: usize = 10_000;

/// Which limit refused an attempt, and when to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub scope: &'static str,
    pub retry_after: Duration,
}

/// The failed sign-ins of accounts and of source addresses.
pub struct LoginLimiter {
    accounts: Window,
    addresses: Window,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        Self::new(ACCOUNT_RULE, ADDRESS_RULE, CAPACITY)
    }
}

impl LoginLimiter {
    pub fn new(account: Rule, address: Rule, capacity: usize) -> Self {
        LoginLimiter { accounts: Window::new(account, capacity), addresses: Window::new(address, capacity) }
    }

    /// Admits a sign-in attempt, counting it as a failure in advance (so attempts
    /// running at the same time cannot pass the limit together), or refuses it
    /// without counting when the account or the address is at its limit.
    pub fn begin(&mut self, account: &str, address: Option<IpAddr>, now: Instant) -> Result<(), Limited> {
        let (account, address) = (account_key(account), address_key(address));
        let wait = |scope, window: &mut Window, key: &str| window.wait(key, now).map(|retry_after| Limited { scope, retry_after });
        if let Some(limited) = wait("account", &mut self.accounts, &account).or_else(|| wait("address", &mut self.addresses, &address)) {
            return Err(limited);
        }
        self.accounts.record(&account, now);
        self.addresses.record(&address, now);
        Ok(())
    }

    /// A successful sign-in: the account's failures are forgotten, and the failure
    /// counted in advance against the address is given back.
    pub fn succeeded(&mut self, account: &str, address: Option<IpAddr>) {
        self.accounts.entries.remove(&account_key(account));
        let address = address_key(address);
        if let Some(times) = self.addresses.entries.get_mut(&address) {
            times.pop_back();
            if times.is_empty() {
                self.addresses.entries.remove(&address);
            }
        }
    }

    /// Accounts and addresses remembered (for tests of the bound).
    pub fn remembered(&self) -> (usize, usize) {
        (self.accounts.entries.len(), self.addresses.entries.len())
    }
}

/// Usernames compare case-insensitively.
fn account_key(username: &str) -> String {
    username.trim().chars().take(128).collect::<String>().to_lowercase()
}

/// An IPv4 address, or an IPv6 address's /64 (one host usually holds a whole /64).
fn address_key(address: Option<IpAddr>) -> String {
    match address {
        Some(IpAddr::V4(address)) => address.to_string(),
        Some(IpAddr::V6(address)) => match address.to_ipv4_mapped() {
            Some(mapped) => mapped.to_string(),
            None => {
                let segments = address.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", segments[0], segments[1], segments[2], segments[3])
            }
        },
        // every caller without a known address shares one budget
        None => "unknown".into(),
    }
}

/// Failure times per key, oldest first, at most `rule.failures` each.
struct Window {
    rule: Rule,
    capacity: usize,
    entries: HashMap<String, VecDeque<Instant>>,
}

impl Window {
    fn new(rule: Rule, capacity: usize) -> Self {
        Window { rule, capacity: capacity.max(1), entries: HashMap::new() }
    }

    /// How long `key` must wait before its next attempt, if it is at its limit.
    fn wait(&mut self, key: &str, now: Instant) -> Option<Duration> {
        let times = self.entries.get_mut(key)?;
        while times.front().is_some_and(|at| now.saturating_duration_since(*at) >= self.rule.window) {
            times.pop_front();
        }
        if times.len() < self.rule.failures {
            return None;
        }
        let oldest = *times.front()?;
        let wait = self.rule.window.saturating_sub(now.saturating_duration_since(oldest));
        Some(wait.max(Duration::from_secs(1)))
    }

    fn record(&mut self, key: &str, now: Instant) {
        if !self.entries.contains_key(key) && self.entries.len() >= self.capacity {
            self.evict(now);
        }
        let times = self.entries.entry(key.to_string()).or_default();
        times.push_back(now);
        while times.len() > self.rule.failures {
            times.pop_front();
        }
    }

    /// Makes room: keys whose failures have all aged out go, or else the one that
    /// failed least recently.
    fn evict(&mut self, now: Instant) {
        let window = self.rule.window;
        self.entries.retain(|_, times| times.back().is_some_and(|at| now.saturating_duration_since(*at) < window));
        if self.entries.len() >= self.capacity
            && let Some(stalest) = self.entries.iter().min_by_key(|(_, times)| times.back().copied()).map(|(key, _)| key.clone())
        {
            self.entries.remove(&stalest);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn address(text: &str) -> Option<IpAddr> {
        text.parse().ok()
    }

    #[test]
    fn an_account_is_limited_after_five_failures_until_the_oldest_ages_out() {
        let mut limiter = LoginLimiter::default();
        let start = Instant::now();
        for minute in 0..5 {
            assert_eq!(limiter.begin("Alice", address("192.0.2.1"), start + MINUTE * minute), Ok(()));
        }
        let refused = limiter.begin("alice", address("192.0.2.2"), start + MINUTE * 5).unwrap_err();
        assert_eq!(refused, Limited { scope: "account", retry_after: MINUTE * 10 });
        // a refused attempt is not counted: the first failure ages out at minute 15
        assert!(limiter.begin("ALICE ", address("192.0.2.3"), start + MINUTE * 14).is_err());
        assert_eq!(limiter.begin("alice", address("192.0.2.3"), start + MINUTE * 15), Ok(()));
        assert!(limiter.begin("bob", address("192.0.2.1"), start + MINUTE * 15).is_ok(), "other accounts go on");
    }

    #[test]
    fn a_success_forgets_the_account_and_gives_the_address_its_attempt_back() {
        let mut limiter = LoginLimiter::default();
        let now = Instant::now();
        for _ in 0..4 {
            limiter.begin("alice", address("192.0.2.1"), now).unwrap();
        }
        limiter.begin("alice", address("192.0.2.1"), now).unwrap();
        limiter.succeeded("alice", address("192.0.2.1"));
        for _ in 0..5 {
            assert!(limiter.begin("alice", address("192.0.2.1"), now).is_ok());
        }
        assert!(limiter.begin("alice", address("192.0.2.1"), now).is_err());
    }

    #[test]
    fn an_address_is_limited_across_accounts_and_ipv6_by_its_64() {
        let mut limiter = LoginLimiter::default();
        let now = Instant::now();
        for index in 0..20 {
            assert!(limiter.begin(&format!("user{index}"), address(&format!("2001:db8:1:2::{index:x}")), now).is_ok());
        }
        let refused = limiter.begin("someone", address("2001:db8:1:2:ffff::1"), now).unwrap_err();
        assert_eq!(refused.scope, "address");
        assert_eq!(refused.retry_after, Duration::from_secs(15 * 60));
        assert!(limiter.begin("someone", address("2001:db8:1:3::1"), now).is_ok(), "another /64");
        assert!(limiter.begin("someone", address("192.0.2.9"), now).is_ok());
    }

    #[test]
    fn memory_stays_bounded() {
        let mut limiter = LoginLimiter::new(ACCOUNT_RULE, ADDRESS_RULE, 100);
        let start = Instant::now();
        for index in 0..1_000u32 {
            let ip = IpAddr::from(index.to_be_bytes());
            assert!(limiter.begin(&format!("user{index}"), Some(ip), start + Duration::from_millis(u64::from(index))).is_ok());
        }
        assert_eq!(limiter.remembered(), (100, 100));
        // the most recent failures are the ones kept
        for _ in 0..4 {
            limiter.begin("user999", Some(IpAddr::from(999u32.to_be_bytes())), start + MINUTE).unwrap();
        }
        assert!(limiter.begin("user999", None, start + MINUTE).is_err());
    }
}
