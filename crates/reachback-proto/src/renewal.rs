//! When a certificate is renewed: once two thirds of its lifetime have passed
//! (the last third is the margin for a client that is offline or a server that
//! is down), and how often an unanswered request is repeated.

use std::time::{Duration, SystemTime};

/// How long a client waits for the broker's answer before it asks again.
pub const RENEWAL_RETRY: Duration = Duration::from_secs(30);

/// The instant a certificate valid from `not_before` to `not_after` is due for renewal.
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime * 2 / 3
}

/// How long from `now` until the renewal is due (zero when it is due already).
pub fn until_renewal(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    renewal_due(not_before, not_after).duration_since(now).unwrap_or_default()
}

/// How far a renewal request's `signed_at` may be from the server's clock, in seconds.
pub const RENEWAL_CLOCK_SKEW_SECONDS: i64 = 300;

/// What a client signs with its enrolled key to renew an expired certificate over
/// the API (`kind` is `device` or `connector`, `signed_at` Unix seconds).
pub fn renewal_message(kind: &str, id: &str, signed_at: i64) -> String {
    format!("reachback-renew:{kind}:{id}:{signed_at}")
}

/// What a client signs to tell the server it discards this identity (it enrolled
/// as another device or connector, or with another server).
pub fn leave_message(kind: &str, id: &str, signed_at: i64) -> String {
    format!("reachback-leave:{kind}:{id}:{signed_at}")
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90 * 86_400);
        assert_eq!(renewal_due(start, end), start + Duration::from_secs(60 * 86_400));
        assert_eq!(until_renewal(start, end, start), Duration::from_secs(60 * 86_400));
        assert_eq!(until_renewal(start, end, end), Duration::ZERO, "an expired certificate is due at once");
        assert_eq!(renewal_due(end, start), end, "a certificate whose dates are reversed is due at once");
    }
}
