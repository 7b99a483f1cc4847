//! The Generic Cell Rate Algorithm, shared by both backends. Backends only
//! store and report the backlog (theoretical arrival time minus now); the
//! arithmetic that turns it into a decision lives here, once.

/// `rate` requests per second sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub rate: u32,
    pub burst: u32,
}

impl Quota {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self { rate: rate.max(1), burst: burst.max(1) }
    }

    /// Microseconds between two requests at the sustained rate.
    pub fn interval_us(&self) -> u64 {
        (1_000_000 / self.rate as u64).max(1)
    }

    /// How far ahead of now the arrival time may run: `burst` intervals.
    pub fn tolerance_us(&self) -> u64 {
        self.interval_us() * self.burst as u64
    }

    /// This quota shared among `nodes` nodes (each enforces its share).
    pub fn divided(&self, nodes: u32) -> Self {
        let nodes = nodes.max(1);
        Self::new(self.rate.div_ceil(nodes), self.burst.div_ceil(nodes))
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
    }
}
