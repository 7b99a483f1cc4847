//! The Generic Cell Rate Algorithm, shared by both backends. Backends only
//! store and report the backlog (theoretical arrival time minus now); the
//! arithmetic that turns it into a decision lives here, once.

/// `limit` requests per `window_s` seconds sustained, `burst` at once.
/// What a client may send in a window follows from both: see `max_in_window`.
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

    /// The most requests this limit admits in any window of `window_us`
    /// (start included, end excluded): the full burst at the start, then one
    /// more per interval that begins inside the window. A fresh bucket
    /// reaches it exactly, so it is a ceiling and not an estimate.
    pub fn max_in_window(&self, window_us: u64) -> u64 {
        self.burst as u64 + window_us.div_ceil(self.interval_us()).saturating_sub(1)
    }

    /// How long an emptied bucket takes to hold its full burst again.
    pub fn refill_us(&self) -> u64 {
        self.tolerance_us()
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

impl Outcome {
    /// Microseconds until one more request is allowed than `remaining` says:
    /// for a refusal the wait for the first one, otherwise the time until the
    /// next unit of the burst comes back (at most one interval).
    pub fn more_quota_us(&self) -> u64 {
        if !self.allowed {
            return self.retry_after_us;
        }
        let t = self.quota.interval_us();
        // After this request the backlog is `reset_us`; `remaining + 1` more
        // fit once it has shrunk to `tolerance - (remaining + 1) * t`.
        let fits_at = self.quota.tolerance_us().saturating_sub((self.remaining as u64 + 1) * t);
        self.reset_us.saturating_sub(fits_at).max(1)
    }
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
    fn window_ceiling_matches_a_greedy_client() {
        // 2/s, burst 3: 3 at once, then one at 0.5 s, 1 s and 1.5 s: 6 in 2 s.
        let q = Quota::new(2, 3);
        assert_eq!(q.max_in_window(2_000_000), 6);
        assert_eq!(Quota::new(100, 200).max_in_window(2_000_000), 399);
        assert_eq!(Quota::per_window(20, 300).max_in_window(300_000_000), 39);
        // Replay a greedy client at every microsecond tick that matters.
        for quota in [Quota::new(2, 3), Quota::new(7, 3), Quota::new(3, 1), Quota::per_window(5, 2)] {
            let window = quota.refill_us().div_ceil(1_000_000) * 1_000_000;
            let (mut tat, mut admitted, mut now) = (0u64, 0u64, 0u64);
            while now < window {
                let o = evaluate("k", quota, tat.saturating_sub(now));
                if o.allowed {
                    admitted += 1;
                    tat = now + o.reset_us;
                } else {
                    now += o.retry_after_us;
                }
            }
            assert_eq!(admitted, quota.max_in_window(window), "{quota:?}");
        }
    }

    #[test]
    fn more_quota_comes_when_promised() {
        let q = Quota::new(2, 3); // 500 ms interval
        let first = evaluate("k", q, 0);
        assert_eq!((first.remaining, first.more_quota_us()), (2, 500_000));
        let last = evaluate("k", q, 2 * q.interval_us());
        assert_eq!((last.remaining, last.more_quota_us()), (0, 500_000));
        // 200 ms after the last one, the unit comes back 300 ms later.
        let refused = evaluate("k", q, 3 * q.interval_us() - 200_000);
        assert!(!refused.allowed);
        assert_eq!(refused.more_quota_us(), 300_000);
        let later = evaluate("k", q, 3 * q.interval_us() - 500_000);
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
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
