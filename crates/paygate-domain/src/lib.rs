//! Paygate's domain: pure types and rules, no IO.
//!
//! Every type here follows "parse, don't validate": a value that exists is valid.

pub mod base62;
pub mod company;
pub mod duration;
pub mod id;
pub mod key;
pub mod scope;

pub use company::CompanyStatus;
pub use id::{ApiKeyId, CompanyId, EventId, IdParseError, PayeeId, PaymentId, WebhookDeliveryId, WebhookEndpointId};
pub mod event;
pub use event::EventType;
pub mod bank;
pub mod money;
pub mod payment;
pub use key::{ApiKeyText, KeyHasher, KeyMode, KeyParseError, Pepper, SecretHash};
pub use money::{Amount, Currency};
pub use scope::{Scope, ScopeParseError, ScopeSet};
pub mod text;
pub use text::{Label, LabelError};

/// Now, truncated to microseconds: the precision both databases store, so a
/// value read back equals the value written.
pub fn now() -> time::OffsetDateTime {
    truncate_to_micros(time::OffsetDateTime::now_utc())
}

pub fn truncate_to_micros(t: time::OffsetDateTime) -> time::OffsetDateTime {
    let micros = t.microsecond();
    t.replace_nanosecond(micros * 1_000).expect("microseconds fit in nanoseconds")
}
pub mod network;
pub use network::{AllowedCidrs, CidrError};
pub mod key_policy;
pub use key_policy::{KeyPolicy, LifetimeExceedsPolicy};

/// A rate limit override: `rate` requests per second sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RateLimitOverride {
    pub rate: u32,
    pub burst: u32,
}

impl RateLimitOverride {
    /// Both at least 1 and at most 1,000,000.
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        let ok = |v: u32| (1..=1_000_000).contains(&v);
        (ok(rate) && ok(burst)).then_some(Self { rate, burst })
    }

    pub fn from_columns(rate: Option<i64>, burst: Option<i64>) -> Option<Self> {
        Self::new(u32::try_from(rate?).ok()?, u32::try_from(burst?).ok()?)
    }
}
pub mod audit;
pub use id::AuditEventId;
pub mod webhook;
