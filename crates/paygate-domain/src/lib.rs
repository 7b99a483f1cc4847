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
pub use id::{ApiKeyId, CompanyId, IdParseError};
pub use key::{ApiKeyText, KeyHasher, KeyMode, KeyParseError, Pepper, SecretHash};
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
