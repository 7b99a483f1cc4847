//! At most N in-flight write requests per company. In process: a counter per
//! company. On Redis: a sorted set of request tokens per company scored by start
//! time, so tokens of a crashed node age out instead of leaking the slot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::{DecisionTally, RedisLimiter, RedisSlot, Tally};

const ACQUIRE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
return 0
";

pub struct ConcurrencyLimiter {
    local: Arc<Mutex<HashMap<String, u32>>>,
    redis: Option<RedisSlot>,
    /// Nodes sharing the cap: without Redis each node holds its share.
    nodes: u32,
    script: redis::Script,
    /// Longest a Redis slot can be held (the request timeout plus a margin).
    stale_after: Duration,
    tally: DecisionTally,
}

/// Holds a slot until dropped.
pub struct ConcurrencyGuard {
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for ConcurrencyGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl ConcurrencyLimiter {
    pub fn new(redis: Option<RedisSlot>, stale_after: Duration, nodes: u32) -> Self {
        Self {
            local: Default::default(),
            redis,
            nodes: nodes.max(1),
            script: redis::Script::new(ACQUIRE_SCRIPT),
            stale_after,
            tally: DecisionTally::default(),
        }
    }

    /// Where this cap's decisions were made so far.
    pub fn tally(&self) -> Tally {
        self.tally.get()
    }

    /// A slot for `company` if fewer than `limit` are held. Uses Redis when
    /// configured and reachable, else this node's own count.
    pub async fn acquire(&self, company: &str, limit: u32) -> Option<ConcurrencyGuard> {
        if let Some(slot) = &self.redis {
            if let Some(redis) = slot.get()
                && let Some(result) = self.acquire_shared(redis, company, limit).await
            {
                self.tally.redis();
                return result;
            }
            // Redis failed: this node's share of the cap, as for rate limits.
            self.tally.degraded();
            return self.acquire_local(company, limit.div_ceil(self.nodes));
        }
        self.tally.in_process();
        self.acquire_local(company, limit)
    }

    fn acquire_local(&self, company: &str, limit: u32) -> Option<ConcurrencyGuard> {
        let mut map = self.local.lock();
        let held = map.entry(company.to_owned()).or_insert(0);
        if *held >= limit {
            return None;
        }
        *held += 1;
        let local = self.local.clone();
        let company = company.to_owned();
        Some(ConcurrencyGuard {
            release: Some(Box::new(move || {
                let mut map = local.lock();
                if let Some(held) = map.get_mut(&company) {
                    *held -= 1;
                    if *held == 0 {
                        map.remove(&company);
                    }
                }
            })),
        })
    }

    /// `None` when Redis failed (the caller falls back to the local count).
    async fn acquire_shared(
        &self,
        redis: &RedisLimiter,
        company: &str,
        limit: u32,
    ) -> Option<Option<ConcurrencyGuard>> {
        let key = format!("{}conc:{company}", redis.prefix());
        let token = uuid::Uuid::now_v7().simple().to_string();
        let mut connection = redis.connection();
        let mut invocation = self.script.prepare_invoke();
        invocation.key(&key).arg(limit).arg(&token).arg(self.stale_after.as_millis() as u64);
        let acquired: i64 = tokio::time::timeout(Duration::from_millis(200), invocation.invoke_async(&mut connection))
            .await
            .ok()?
            .ok()?;
        if acquired == 0 {
            return Some(None);
        }
        Some(Some(ConcurrencyGuard {
            release: Some(Box::new(move || {
                tokio::spawn(async move {
                    let _: Result<i64, _> = redis::cmd("ZREM").arg(&key).arg(&token).query_async(&mut connection).await;
                });
            })),
        }))
    }
}
