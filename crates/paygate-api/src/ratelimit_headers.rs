//! `RateLimit-Policy` / `RateLimit` per draft-ietf-httpapi-ratelimit-headers
//! (structured fields), and `Retry-After`. All formatting lives here: the
//! draft still moves.

use axum::http::{HeaderMap, HeaderValue};
use paygate_ratelimit::Outcome;

pub const POLICY: &str = "ratelimit-policy";
pub const STATE: &str = "ratelimit";

/// `"key";q=200;w=2`. GCRA admits at most `burst` requests in any window of
/// `burst × interval`, so that is the quota advertised: `r` (what is left now)
/// is then always a part of `q`, as the draft means it.
pub fn policy_value(outcome: &Outcome) -> String {
    let window_us = outcome.quota.tolerance_us();
    format!("\"{}\";q={};w={}", outcome.policy, outcome.quota.burst, window_us.div_ceil(1_000_000).max(1))
}

/// `"key";r=42;t=1`: `r` requests left now, `t` seconds until the limit is full again.
pub fn state_value(outcome: &Outcome) -> String {
    format!("\"{}\";r={};t={}", outcome.policy, outcome.remaining, seconds_up(outcome.reset_us))
}

/// Whole seconds, rounded up, at least 1 for a refusal.
pub fn retry_after_seconds(outcome: &Outcome) -> u64 {
    seconds_up(outcome.retry_after_us).max(1)
}

fn seconds_up(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

pub fn insert(headers: &mut HeaderMap, outcome: &Outcome) {
    if let Ok(v) = HeaderValue::from_str(&policy_value(outcome)) {
        headers.insert(POLICY, v);
    }
    if let Ok(v) = HeaderValue::from_str(&state_value(outcome)) {
        headers.insert(STATE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paygate_ratelimit::{Quota, evaluate};

    #[test]
    fn structured_field_syntax() {
        let o = evaluate("key", Quota::new(100, 200), 0);
        assert_eq!(policy_value(&o), "\"key\";q=200;w=2");
        assert_eq!(state_value(&o), "\"key\";r=199;t=1");
        let refused = evaluate("auth_failures", Quota::per_window(20, 300), 20 * 15_000_000);
        assert_eq!(policy_value(&refused), "\"auth_failures\";q=20;w=300");
        let r = evaluate("company", Quota::new(500, 1000), 0);
        assert_eq!(policy_value(&r), "\"company\";q=1000;w=2");
        assert_eq!(retry_after_seconds(&refused), 15);
    }
}
