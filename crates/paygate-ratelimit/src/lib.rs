//! Rate limits for Paygate: GCRA (the state of a limit is one timestamp, the
//! theoretical arrival time) in process and on Redis with the same semantics,
//! plus per-company write concurrency caps.
//!
//! A request checks several limits at once (its key, its company); the check is
//! all-or-nothing, so a request refused by one limit consumes none of the others.

mod concurrency;
mod gcra;
mod memory;
mod redis_backend;
mod resilient;
mod tally;

pub use concurrency::{ConcurrencyGuard, ConcurrencyLimiter};
pub use gcra::{Outcome, Quota, evaluate};
pub use memory::MemoryLimiter;
pub use redis_backend::RedisLimiter;
pub use resilient::{Backend, RedisSlot, SharedLimiter};
pub use tally::{DecisionTally, Tally};

use async_trait::async_trait;

/// One limit to check: the policy it belongs to (named in headers and
/// problems), the bucket key, and its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub policy: &'static str,
    pub key: String,
    pub quota: Quota,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Consume one unit from every limit if all allow it.
    Consume,
    /// Only report whether one more unit would be allowed.
    Peek,
}

/// The outcome of one check: allowed only if every limit allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcomes: Vec<Outcome>,
}

impl Decision {
    /// An empty decision (no limit evaluated) refuses: never fail open by accident.
    pub fn allowed(&self) -> bool {
        !self.outcomes.is_empty() && self.outcomes.iter().all(|o| o.allowed)
    }

    /// The refusing limit with the longest wait, or, if all allow, the one
    /// closest to exhaustion (smallest share of its burst left).
    pub fn tightest(&self) -> Option<&Outcome> {
        if let Some(refused) = self.outcomes.iter().filter(|o| !o.allowed).max_by_key(|o| o.retry_after_us) {
            return Some(refused);
        }
        self.outcomes.iter().min_by(|a, b| {
            let ra = a.remaining as u64 * b.quota.burst as u64;
            let rb = b.remaining as u64 * a.quota.burst as u64;
            ra.cmp(&rb)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer in time")]
    Timeout,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    async fn check(&self, limits: &[Limit], mode: Mode) -> Result<Decision, LimiterError>;
}
