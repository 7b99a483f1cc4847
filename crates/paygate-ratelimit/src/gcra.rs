//! The Generic Cell Rate Algorithm, shared by both backends. Backends only
//! store and report the backlog (theoretical arrival time minus now); the
//! arithmetic that turns it into a decision lives here, once.

/// `limit` requests per `window_s` seconds sustained, `burst` at once.
/// `limit` and `window_s` are what the `RateLimit-Policy` header advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub limit: u32,
    pub window_s: u32,
    pub burst: u32,
}

impl Quota {
    /// `rate` per second, `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self { limit: rate.max(1), window_s: 1, burst: burst.max(1) }
    }

    /// `count` per `window_s` seconds, all of them at once if need be.
    pub fn per_window(count: u32, window_s: u32) -> Self {
        Self { limit: count.max(1), window_s: window_s.max(1), burst: count.max(1) }
    }

    /// Microseconds between two requests at the sustained rate.
    pub fn interval_us(&self) -> u64 {
        (self.window_s as u64 * 1_000_000 / self.limit as u64).max(1)
    }

    /// How far ahead of now the arrival time may run: `burst` intervals.
    pub fn tolerance_us(&self) -> u64 {
        self.interval_us() * self.burst as u64
    }

    /// This quota shared among `nodes` nodes (each enforces its share).
    pub fn divided(&self, nodes: u32) -> Self {
        let nodes = nodes.max(1);
        Self { limit: self.limit.div_ceil(nodes), window_s: self.window_s, burst: self.burst.div_ceil(nodes) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub policy: &'static str,
    pub quota: Quota,
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// Microseconds until the limit is back to its full burst.
    pub reset_us: u64,
    /// Microseconds until one request would be allowed (0 when allowed).
    pub retry_after_us: u64,
}

/// The decision for one request given the current backlog (theoretical
/// arrival time minus now, never negative).
pub fn evaluate(policy: &'static str, quota: Quota, backlog_us: u64) -> Outcome {
    let t = quota.interval_us();
    let tolerance = quota.tolerance_us();
    let after = backlog_us + t;
    if after <= tolerance {
        Outcome {
            policy,
            quota,
            allowed: true,
            remaining: ((tolerance - after) / t) as u32,
            reset_us: after,
            retry_after_us: 0,
        }
    } else {
        Outcome { policy, quota, allowed: false, remaining: 0, reset_us: backlog_us, retry_after_us: after - tolerance }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let q = Quota::new(10, 5); // 100 ms interval, 5 at once
        let mut backlog = 0;
        for i in 0..5 {
            let o = evaluate("k", q, backlog);
            assert!(o.allowed, "request {i}");
            assert_eq!(o.remaining, 4 - i);
            backlog += q.interval_us();
        }
        let refused = evaluate("k", q, backlog);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_us, 100_000);
        // After one interval, one more.
        assert!(evaluate("k", q, backlog - 100_000).allowed);
    }

    #[test]
    fn division_never_reaches_zero() {
        assert_eq!(Quota::new(100, 200).divided(3), Quota::new(34, 67));
        assert_eq!(Quota::new(1, 1).divided(8), Quota::new(1, 1));
        let slow = Quota::per_window(20, 300);
        assert_eq!(slow.interval_us(), 15_000_000);
        assert_eq!(slow.burst, 20);
    }
}
