//! The in-process backend: sharded maps of arrival times with a hard bound on
//! entries. An entry whose arrival time has passed carries no information (the
//! limit is full again), so evicting it changes nothing; only when a shard is
//! full of live entries does one go early (counted).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Instant;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::{Decision, Limit, LimitKey, LimiterError, Mode, RateLimiter, evaluate};

/// 64: the shards one check locks are a `u64` bit set.
const SHARDS: usize = 64;

pub struct MemoryLimiter {
    shards: Vec<Mutex<HashMap<LimitKey, u64>>>,
    per_shard: usize,
    /// Entries across shards, kept approximately (for the gauge, lock-free).
    entries: std::sync::atomic::AtomicUsize,
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
}

impl MemoryLimiter {
    /// At most `capacity` tracked limits in all (rounded up to the shard count).
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard,
            entries: Default::default(),
            epoch: Instant::now(),
            hasher: Default::default(),
        }
    }

    fn shard_of(&self, key: &LimitKey) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    /// Synchronous core, also used by the resilient fallback.
    pub fn decide(&self, limits: &[Limit], mode: Mode) -> Decision {
        let now = self.now_us();
        // No heap work per check: the shards involved are a bit set, their
        // guards a fixed array indexed by shard.
        let mut first = [0u8; 8];
        for (slot, limit) in first.iter_mut().zip(limits) {
            *slot = self.shard_of(&limit.key) as u8;
        }
        let shard_at = |n: usize| if n < first.len() { first[n] as usize } else { self.shard_of(&limits[n].key) };
        let mut wanted: u64 = 0;
        for n in 0..limits.len() {
            wanted |= 1 << shard_at(n);
        }
        // Lock every shard involved, in index order: concurrent multi-limit
        // checks cannot deadlock and the decision is atomic across its limits.
        let mut guards: [Option<parking_lot::MutexGuard<'_, HashMap<LimitKey, u64>>>; SHARDS] =
            std::array::from_fn(|_| None);
        for (index, guard) in guards.iter_mut().enumerate() {
            if wanted & (1 << index) != 0 {
                *guard = Some(self.shards[index].lock());
            }
        }
        let mut outcomes = Vec::with_capacity(limits.len());
        for (n, limit) in limits.iter().enumerate() {
            let map = guards[shard_at(n)].as_ref().expect("locked");
            let tat = map.get(&limit.key).copied().unwrap_or(now).max(now);
            outcomes.push(evaluate(limit.policy, limit.quota, tat - now));
        }
        let decision = Decision { outcomes };
        if mode == Mode::Consume && decision.allowed() {
            for (n, (limit, outcome)) in limits.iter().zip(&decision.outcomes).enumerate() {
                let map = guards[shard_at(n)].as_mut().expect("locked");
                let new_tat = now + outcome.reset_us;
                let before = map.len();
                if !map.contains_key(&limit.key) && map.len() >= self.per_shard {
                    map.retain(|_, tat| *tat > now);
                    if map.len() >= self.per_shard {
                        if let Some(victim) = map.keys().next().copied() {
                            map.remove(&victim);
                        }
                        metrics::counter!("paygate_ratelimit_evictions_total").increment(1);
                    }
                }
                map.insert(limit.key, new_tat);
                let after = map.len();
                if after >= before {
                    self.entries.fetch_add(after - before, std::sync::atomic::Ordering::Relaxed);
                } else {
                    self.entries.fetch_sub(before - after, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        decision
    }

    /// About how many limits are tracked (cheap; for the metric).
    pub fn len_hint(&self) -> usize {
        self.entries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tracked limits, for the memory bound test and the metric.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn check(&self, limits: &[Limit], mode: Mode) -> Result<Decision, LimiterError> {
        Ok(self.decide(limits, mode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quota;

    fn limit(policy: &'static str, key: &str, rate: u32, burst: u32) -> Limit {
        Limit { policy, key: key.into(), quota: Quota::new(rate, burst) }
    }

    #[test]
    fn all_or_nothing_across_limits() {
        let l = MemoryLimiter::new(1000);
        // Distinct policies, so naming the refusing one can fail.
        let tight = limit("company", "company:1", 1, 1);
        let loose = limit("key", "key:1", 1000, 1000);
        assert!(l.decide(&[loose.clone(), tight.clone()], Mode::Consume).allowed());
        let refused = l.decide(&[loose.clone(), tight.clone()], Mode::Consume);
        assert!(!refused.allowed());
        assert_eq!(refused.tightest().unwrap().policy, "company");
        // The refused request consumed nothing from the loose limit.
        let after = l.decide(&[loose], Mode::Peek);
        assert_eq!(after.outcomes[0].remaining, 998);
    }

    #[test]
    fn peek_consumes_nothing() {
        let l = MemoryLimiter::new(10);
        let one = limit("key", "x", 1, 1);
        for _ in 0..5 {
            assert!(l.decide(std::slice::from_ref(&one), Mode::Peek).allowed());
        }
        assert!(l.decide(std::slice::from_ref(&one), Mode::Consume).allowed());
        assert!(!l.decide(&[one], Mode::Peek).allowed());
    }

    #[test]
    fn memory_stays_bounded_under_a_million_distinct_keys() {
        let l = MemoryLimiter::new(10_000);
        for i in 0..1_000_000u32 {
            let ip = std::net::Ipv4Addr::from(i.wrapping_mul(2_654_435_761));
            let d = l.decide(
                &[Limit {
                    policy: "client",
                    key: LimitKey::format(format_args!("client:{ip}")),
                    quota: Quota::new(1000, 2000),
                }],
                Mode::Consume,
            );
            assert!(d.allowed());
        }
        assert!(l.len() <= l.capacity(), "{} entries for capacity {}", l.len(), l.capacity());
        assert!(l.capacity() <= 10_048);
    }
}
