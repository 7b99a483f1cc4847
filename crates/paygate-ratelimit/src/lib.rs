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
    pub key: LimitKey,
    pub quota: Quota,
}

/// A bucket key held inline: every request checks several limits, and a heap
/// string per limit per request was a measurable share of the hot path.
/// Text longer than the inline capacity (none of Paygate's own keys) is kept
/// as its head plus a fixed 64-bit FNV-1a digest of the whole, the same on
/// every node, so it still names one bucket in memory and on Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LimitKey {
    len: u8,
    bytes: [u8; LimitKey::CAPACITY],
}

impl LimitKey {
    pub const CAPACITY: usize = 64;

    /// The key formatted from `args` (e.g. `format_args!("key:{id}")`), without a heap allocation.
    pub fn format(args: std::fmt::Arguments<'_>) -> Self {
        let mut writer = KeyWriter { key: Self { len: 0, bytes: [0; Self::CAPACITY] }, overflow: None };
        let _ = std::fmt::Write::write_fmt(&mut writer, args);
        match writer.overflow {
            None => writer.key,
            Some(full) => Self::digested(&full),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole `str`s are copied in (see `KeyWriter`), so the bytes are UTF-8.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }

    fn digested(full: &str) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in full.bytes() {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        // The head, cut at a character boundary, then `#` and 16 hex digits.
        let mut head = Self::CAPACITY - 17;
        while !full.is_char_boundary(head) {
            head -= 1;
        }
        Self::format(format_args!("{}#{hash:016x}", &full[..head]))
    }
}

struct KeyWriter {
    key: LimitKey,
    overflow: Option<String>,
}

impl std::fmt::Write for KeyWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if let Some(full) = &mut self.overflow {
            full.push_str(s);
            return Ok(());
        }
        let at = self.key.len as usize;
        if at + s.len() <= LimitKey::CAPACITY {
            self.key.bytes[at..at + s.len()].copy_from_slice(s.as_bytes());
            self.key.len = (at + s.len()) as u8;
        } else {
            let mut full = String::with_capacity(at + s.len());
            full.push_str(self.key.as_str());
            full.push_str(s);
            self.overflow = Some(full);
        }
        Ok(())
    }
}

impl std::hash::Hash for LimitKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.bytes[..self.len as usize]);
    }
}

impl From<&str> for LimitKey {
    fn from(text: &str) -> Self {
        Self::format(format_args!("{text}"))
    }
}

impl From<String> for LimitKey {
    fn from(text: String) -> Self {
        Self::from(text.as_str())
    }
}

impl std::ops::Deref for LimitKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
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

#[cfg(test)]
mod tests {
    use super::LimitKey;

    #[test]
    fn short_keys_are_kept_verbatim() {
        let id = "key_0123456789abcdefghijkl";
        assert_eq!(LimitKey::format(format_args!("key:{id}")).as_str(), format!("key:{id}"));
        assert_eq!(LimitKey::from("client:2001:db8:1:2::/64").as_str(), "client:2001:db8:1:2::/64");
        assert_eq!(LimitKey::from(""), LimitKey::from(String::new()));
    }

    #[test]
    fn long_keys_keep_their_head_and_a_digest_of_the_whole() {
        let a = "x".repeat(200);
        let b = format!("{}y", "x".repeat(199));
        let (ka, kb) = (LimitKey::from(a.as_str()), LimitKey::from(b.as_str()));
        assert_ne!(ka, kb, "keys differing after the inline capacity stay distinct");
        assert_eq!(ka, LimitKey::from(a.as_str()), "deterministic");
        assert_eq!(ka.len(), LimitKey::CAPACITY);
        assert!(ka.starts_with(&"x".repeat(LimitKey::CAPACITY - 17)));
        // A multi-byte character straddling the cut is not split.
        let wide = "é".repeat(100);
        assert!(LimitKey::from(wide.as_str()).as_str().starts_with('é'));
    }
}
