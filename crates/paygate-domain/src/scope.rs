//! The closed set of scopes a key can hold. Unknown scopes are refused when a key
//! is created, so a typo can never silently grant nothing (or everything).

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! scopes {
    ($($variant:ident => $text:tt),+ $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        pub enum Scope {
            $(#[serde(rename = $text)] $variant,)+
        }

        impl Scope {
            pub const ALL: &'static [Scope] = &[$(Scope::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Scope::$variant => $text,)+
                }
            }

            pub fn parse(text: &str) -> Result<Self, ScopeParseError> {
                match text {
                    $($text => Ok(Scope::$variant),)+
                    _ => Err(ScopeParseError(text.chars().take(64).collect())),
                }
            }
        }
    };
}

scopes! {
    PaymentsRead => "payments:read",
    PaymentsWrite => "payments:write",
    PaymentsApprove => "payments:approve",
    PayeesRead => "payees:read",
    PayeesWrite => "payees:write",
    KeysRead => "keys:read",
    KeysManage => "keys:manage",
    AuditRead => "audit:read",
    PolicyManage => "policy:manage",
    EventsRead => "events:read",
    WebhooksManage => "webhooks:manage",
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}")]
pub struct ScopeParseError(pub String);

/// A set of scopes, stored as a bit set; iterates in the canonical order of [`Scope::ALL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet(u32);

impl ScopeSet {
    pub const fn empty() -> Self {
        Self(0)
    }

    pub fn all() -> Self {
        Scope::ALL.iter().copied().collect()
    }

    fn bit(scope: Scope) -> u32 {
        1 << (scope as u32)
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & Self::bit(scope) != 0
    }

    pub fn insert(&mut self, scope: Scope) {
        self.0 |= Self::bit(scope);
    }

    pub fn remove(&mut self, scope: Scope) {
        self.0 &= !Self::bit(scope);
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn is_subset_of(self, other: ScopeSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.iter().copied().filter(move |s| self.contains(*s))
    }

    /// Parses a comma- or space-separated list; duplicates collapse, unknown names fail.
    pub fn parse_list(text: &str) -> Result<Self, ScopeParseError> {
        text.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()).map(Scope::parse).collect()
    }

    /// The canonical storage form: names in canonical order joined by spaces.
    pub fn to_storage(self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
    }

    pub fn from_storage(text: &str) -> Result<Self, ScopeParseError> {
        Self::parse_list(text)
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut set = ScopeSet::empty();
        for s in iter {
            set.insert(s);
        }
        set
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Scope::as_str)).finish()
    }
}

impl Serialize for ScopeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ScopeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let scopes = Vec::<Scope>::deserialize(d)?;
        Ok(scopes.into_iter().collect())
    }
}

impl utoipa::PartialSchema for ScopeSet {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(<Scope as utoipa::PartialSchema>::schema())
            .unique_items(true)
            .into()
    }
}

impl utoipa::ToSchema for ScopeSet {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scope_round_trips() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Ok(*s));
        }
        assert!(Scope::ALL.len() < 32, "ScopeSet is a u32 bit set");
    }

    #[test]
    fn list_parsing() {
        let set = ScopeSet::parse_list("keys:read, payments:read,keys:read").unwrap();
        assert_eq!(set.to_storage(), "payments:read keys:read");
        assert!(ScopeSet::parse_list("keys:read,keys:admin").is_err());
        assert!(ScopeSet::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn subset() {
        let small = ScopeSet::parse_list("keys:read").unwrap();
        let big = ScopeSet::parse_list("keys:read keys:manage").unwrap();
        assert!(small.is_subset_of(big));
        assert!(!big.is_subset_of(small));
    }
}
