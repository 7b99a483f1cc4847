//! The limiter the server holds. With Redis configured, every limit is shared
//! by all nodes; when Redis fails, each node falls back to in-process limits
//! at its share (quota ÷ configured node count), says so in logs and metrics,
//! and returns to Redis by itself once a probe succeeds. It never fails open
//! without a bound and never turns a Redis outage into a 5xx.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{Decision, DecisionTally, Limit, LimiterError, MemoryLimiter, Mode, RateLimiter, RedisLimiter, Tally};

/// A Redis connection that may arrive after start-up.
pub type RedisSlot = Arc<tokio::sync::OnceCell<RedisLimiter>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    /// Redis configured but failing: in-process at this node's share.
    Degraded,
}

pub struct SharedLimiter {
    /// Set when Redis is configured; filled once a connection is made (a node
    /// starts even while Redis is down, in its degraded share).
    redis: Option<RedisSlot>,
    /// Limits checked before authentication (client address, failed auth):
    /// a flood of addresses can only evict these, never authenticated state.
    anonymous: MemoryLimiter,
    /// Limits of authenticated callers (key, company).
    authenticated: MemoryLimiter,
    nodes: u32,
    degraded: AtomicBool,
    /// Microseconds since `epoch` before which Redis is not retried.
    retry_at_us: AtomicU64,
    epoch: Instant,
    probe_every: Duration,
    tally: DecisionTally,
}

impl SharedLimiter {
    pub fn in_process(capacity: usize) -> Arc<Self> {
        Arc::new(Self::build(None, capacity, 1))
    }

    pub fn with_redis(redis: RedisLimiter, capacity: usize, nodes: u32) -> Arc<Self> {
        let slot: RedisSlot = Arc::new(tokio::sync::OnceCell::new_with(Some(redis)));
        Arc::new(Self::build(Some(slot), capacity, nodes))
    }

    /// Redis configured but maybe not reachable yet: connects in the
    /// background, retrying every second; until then the node enforces its
    /// share in process. Returns the slot so other users (the concurrency cap)
    /// share the connection once it exists.
    pub async fn connecting(url: String, prefix: String, capacity: usize, nodes: u32) -> (Arc<Self>, RedisSlot) {
        let slot: RedisSlot = Arc::new(tokio::sync::OnceCell::new());
        let limiter = Arc::new(Self::build(Some(slot.clone()), capacity, nodes));
        // One attempt before serving, so a healthy Redis is used from the first request.
        if let Ok(redis) = RedisLimiter::connect(&url, &prefix, Duration::from_millis(250)).await {
            let _ = slot.set(redis);
            return (limiter, slot);
        }
        let filling = slot.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match RedisLimiter::connect(&url, &prefix, Duration::from_millis(250)).await {
                    Ok(redis) => {
                        let _ = filling.set(redis);
                        tracing::info!("connected to Redis; rate limits are shared");
                        return;
                    }
                    Err(error) => {
                        if !warned {
                            tracing::warn!(%error, "Redis unreachable at start; enforcing this node's share in process until it is");
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        (limiter, slot)
    }

    fn build(redis: Option<RedisSlot>, capacity: usize, nodes: u32) -> Self {
        metrics::gauge!("paygate_ratelimit_degraded").set(0.0);
        Self {
            redis,
            anonymous: MemoryLimiter::new(capacity),
            authenticated: MemoryLimiter::new(capacity),
            nodes: nodes.max(1),
            degraded: AtomicBool::new(false),
            retry_at_us: AtomicU64::new(0),
            epoch: Instant::now(),
            probe_every: Duration::from_millis(500),
            tally: DecisionTally::default(),
        }
    }

    pub fn backend(&self) -> Backend {
        match (&self.redis, self.degraded.load(Ordering::Acquire)) {
            (None, _) => Backend::Memory,
            (Some(slot), false) if slot.initialized() => Backend::Redis,
            (Some(_), _) => Backend::Degraded,
        }
    }

    /// Where this limiter's decisions were made so far.
    pub fn tally(&self) -> Tally {
        self.tally.get()
    }

    pub fn redis(&self) -> Option<&RedisLimiter> {
        self.redis.as_ref().and_then(|slot| slot.get())
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn memory_for(&self, limits: &[Limit]) -> &MemoryLimiter {
        let anonymous = limits.iter().any(|l| matches!(l.policy, "client" | "auth_failures"));
        let memory = if anonymous { &self.anonymous } else { &self.authenticated };
        let name = if anonymous { "anonymous" } else { "authenticated" };
        metrics::gauge!("paygate_ratelimit_entries", "map" => name).set(memory.len_hint() as f64);
        memory
    }

    fn fall_back(&self, limits: &[Limit], mode: Mode) -> Decision {
        self.tally.degraded();
        let shares: Vec<Limit> =
            limits.iter().map(|l| Limit { quota: l.quota.divided(self.nodes), ..l.clone() }).collect();
        let mut decision = self.memory_for(limits).decide(&shares, mode);
        // Report the configured quotas in headers; the node enforces its share.
        for (outcome, limit) in decision.outcomes.iter_mut().zip(limits) {
            outcome.quota = limit.quota;
        }
        decision
    }

    fn mark_degraded(&self, error: &LimiterError) {
        self.retry_at_us.store(self.now_us() + self.probe_every.as_micros() as u64, Ordering::Release);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            metrics::gauge!("paygate_ratelimit_degraded").set(1.0);
            metrics::counter!("paygate_ratelimit_degradations_total").increment(1);
            tracing::warn!(%error, nodes = self.nodes, "Redis rate limiting unavailable; enforcing this node's share in process");
        }
    }

    fn mark_recovered(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            metrics::gauge!("paygate_ratelimit_degraded").set(0.0);
            tracing::info!("Redis rate limiting recovered");
        }
    }
}

#[async_trait]
impl RateLimiter for SharedLimiter {
    async fn check(&self, limits: &[Limit], mode: Mode) -> Result<Decision, LimiterError> {
        let Some(slot) = &self.redis else {
            self.tally.in_process();
            return Ok(self.memory_for(limits).decide(limits, mode));
        };
        let Some(redis) = slot.get() else {
            self.mark_degraded(&LimiterError::Redis("not connected yet".into()));
            return Ok(self.fall_back(limits, mode));
        };
        if self.degraded.load(Ordering::Acquire) && self.now_us() < self.retry_at_us.load(Ordering::Acquire) {
            return Ok(self.fall_back(limits, mode));
        }
        match redis.check(limits, mode).await {
            Ok(decision) => {
                self.tally.redis();
                self.mark_recovered();
                Ok(decision)
            }
            Err(error) => {
                self.mark_degraded(&error);
                Ok(self.fall_back(limits, mode))
            }
        }
    }
}
