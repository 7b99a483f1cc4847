//! A company's key policy: the lifetime of keys created over the API.

use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyPolicy {
    /// Given to keys created without `expires_at`.
    pub default_lifetime: Option<Duration>,
    /// No key created over the API may live longer.
    pub max_lifetime: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPolicyError {
    #[error("the default lifetime ({default}s) exceeds the maximum ({max}s)")]
    DefaultExceedsMax { default: i64, max: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the key would live longer than the company's maximum of {max_seconds} seconds")]
pub struct LifetimeExceedsPolicy {
    pub max_seconds: i64,
}

impl KeyPolicy {
    pub fn new(default_lifetime: Option<Duration>, max_lifetime: Option<Duration>) -> Result<Self, KeyPolicyError> {
        if let (Some(d), Some(m)) = (default_lifetime, max_lifetime)
            && d > m
        {
            return Err(KeyPolicyError::DefaultExceedsMax { default: d.whole_seconds(), max: m.whole_seconds() });
        }
        Ok(Self { default_lifetime, max_lifetime })
    }

    /// The expiry of a key created at `now` that asked for `requested`.
    /// Without a request: the default lifetime, else the maximum (a company
    /// with a maximum never gets a key that lives forever), else none.
    pub fn expiry_for(
        &self,
        now: OffsetDateTime,
        requested: Option<OffsetDateTime>,
    ) -> Result<Option<OffsetDateTime>, LifetimeExceedsPolicy> {
        let Some(requested) = requested else {
            return Ok(self.default_lifetime.or(self.max_lifetime).map(|d| now + d));
        };
        match self.max_lifetime {
            Some(max) if requested - now > max => Err(LifetimeExceedsPolicy { max_seconds: max.whole_seconds() }),
            _ => Ok(Some(requested)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_rules() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let none = KeyPolicy::default();
        assert_eq!(none.expiry_for(now, None), Ok(None));
        assert_eq!(none.expiry_for(now, Some(now + Duration::days(9999))), Ok(Some(now + Duration::days(9999))));
        let p = KeyPolicy::new(Some(Duration::days(30)), Some(Duration::days(90))).unwrap();
        assert_eq!(p.expiry_for(now, None), Ok(Some(now + Duration::days(30))));
        assert_eq!(p.expiry_for(now, Some(now + Duration::days(90))), Ok(Some(now + Duration::days(90))));
        assert!(p.expiry_for(now, Some(now + Duration::days(91))).is_err());
        let max_only = KeyPolicy::new(None, Some(Duration::days(7))).unwrap();
        assert_eq!(max_only.expiry_for(now, None), Ok(Some(now + Duration::days(7))));
        assert!(KeyPolicy::new(Some(Duration::days(91)), Some(Duration::days(90))).is_err());
    }
}
