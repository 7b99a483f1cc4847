//! The Redis backend: one atomic Lua script per decision, with Redis `TIME` as
//! the clock so nodes with skewed clocks still share one limit. The script is
//! sent by hash (`EVALSHA`) and re-loaded automatically on `NOSCRIPT`.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::{Decision, Limit, LimiterError, Mode, RateLimiter, evaluate};

/// KEYS: the limits' buckets. ARGV[1]: 1 to consume, 0 to peek; then for each
/// key its interval and tolerance in microseconds. Returns each key's backlog
/// (arrival time minus now, microseconds, before this request). Stores the new
/// arrival times only if every limit allows the request.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local backlog = {}
local new_tat = {}
local all = true
for i = 1, n do
  local interval = tonumber(ARGV[i * 2])
  local tolerance = tonumber(ARGV[i * 2 + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  backlog[i] = tat - now
  new_tat[i] = tat + interval
  if new_tat[i] - now > tolerance then all = false end
end
if all and ARGV[1] == '1' then
  for i = 1, n do
    redis.call('SET', KEYS[i], string.format('%d', new_tat[i]), 'PX', math.ceil((new_tat[i] - now) / 1000) + 1)
  end
end
return backlog
";

#[derive(Clone)]
pub struct RedisLimiter {
    connection: ConnectionManager,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
}

impl RedisLimiter {
    /// Connects (failing if Redis is unreachable now). `prefix` namespaces
    /// the keys, e.g. `paygate:rl:`.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, LimiterError> {
        let client = redis::Client::open(url).map_err(|e| LimiterError::Redis(e.to_string()))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let connection = tokio::time::timeout(timeout * 4, ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| LimiterError::Timeout)?
            .map_err(|e| LimiterError::Redis(e.to_string()))?;
        Ok(Self { connection, script: redis::Script::new(GCRA_SCRIPT), prefix: prefix.to_owned(), timeout })
    }

    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn check(&self, limits: &[Limit], mode: Mode) -> Result<Decision, LimiterError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(if mode == Mode::Consume { "1" } else { "0" });
        for limit in limits {
            invocation.key(format!("{}{}", self.prefix, limit.key.as_str()));
            invocation.arg(limit.quota.interval_us()).arg(limit.quota.tolerance_us());
        }
        let mut connection = self.connection.clone();
        let backlogs: Vec<i64> = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| LimiterError::Timeout)?
            .map_err(|e| LimiterError::Redis(e.to_string()))?;
        if backlogs.len() != limits.len() {
            return Err(LimiterError::Redis("unexpected script reply".into()));
        }
        let outcomes = limits
            .iter()
            .zip(backlogs)
            .map(|(limit, backlog)| evaluate(limit.policy, limit.quota, backlog.max(0) as u64))
            .collect();
        Ok(Decision { outcomes })
    }
}
