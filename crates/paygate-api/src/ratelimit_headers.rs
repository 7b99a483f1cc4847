//! `RateLimit-Policy` / `RateLimit` per draft-ietf-httpapi-ratelimit-headers
//! (structured fields), and `Retry-After`. All formatting lives here: the
//! draft still moves.

use axum::http::{HeaderMap, HeaderValue};
use paygate_ratelimit::Outcome;

pub const POLICY: &str = "ratelimit-policy";
pub const STATE: &str = "ratelimit";

/// `"key";q=399;w=2`. `w` is the time an emptied bucket takes to refill, in
/// whole seconds (rounded up); `q` is the most requests the limit admits in
/// any window of `w` seconds: its burst plus what refills meanwhile. A fresh
/// bucket admits exactly `q` in its first window, later windows at most `q`.
pub fn policy_value(outcome: &Outcome) -> String {
    let (quota, window_s) = policy_window(outcome);
    format!("\"{}\";q={};w={}", outcome.policy, quota, window_s)
}

/// The advertised window in seconds and the quota the limit admits in it.
pub fn policy_window(outcome: &Outcome) -> (u64, u64) {
    let window_s = seconds_up(outcome.quota.refill_us()).max(1);
    (outcome.quota.max_in_window(window_s * 1_000_000), window_s)
}

/// `"key";r=42;t=1`: `r` requests allowed now back to back, `t` seconds
/// (rounded up) until quota beyond `r` comes back (the draft's "additional
/// quota"); on a refusal `t` equals `Retry-After`.
pub fn state_value(outcome: &Outcome) -> String {
    format!("\"{}\";r={};t={}", outcome.policy, outcome.remaining, seconds_up(outcome.more_quota_us()).max(1))
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
        // 200 at once plus 199 refills within the 2 s the burst takes to refill.
        assert_eq!(policy_value(&o), "\"key\";q=399;w=2");
        assert_eq!(state_value(&o), "\"key\";r=199;t=1");
        let refused = evaluate("auth_failures", Quota::per_window(20, 300), 20 * 15_000_000);
        assert_eq!(policy_value(&refused), "\"auth_failures\";q=39;w=300");
        assert_eq!(state_value(&refused), "\"auth_failures\";r=0;t=15");
        assert_eq!(retry_after_seconds(&refused), 15);
        let small = evaluate("key", Quota::new(2, 3), 0);
        assert_eq!(policy_value(&small), "\"key\";q=6;w=2");
    }

    #[test]
    fn a_refusal_says_t_equal_to_retry_after() {
        let q = Quota::new(1, 3);
        for backlog in [3_000_000 - 1, 2_500_000, 2_000_001] {
            let refused = evaluate("key", q, backlog);
            assert!(!refused.allowed);
            assert_eq!(state_value(&refused), format!("\"key\";r=0;t={}", retry_after_seconds(&refused)));
        }
    }
}
