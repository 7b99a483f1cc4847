//! Public ids: a type prefix and a UUIDv7 in fixed-width base62 (`cmp_0Fq…`).
//! The prefix makes a pasted id self-describing; UUIDv7 makes ids time-ordered,
//! which gives lists a stable newest-first order.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::base62;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind} id")]
pub struct IdParseError {
    pub kind: &'static str,
}

macro_rules! public_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            /// Length of the textual form.
            pub const TEXT_LEN: usize = $prefix.len() + base62::U128_WIDTH;

            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            pub fn parse(text: &str) -> Result<Self, IdParseError> {
                let err = IdParseError { kind: $kind };
                let body = text.strip_prefix($prefix).ok_or(err.clone())?;
                if body.len() != base62::U128_WIDTH {
                    return Err(err);
                }
                base62::decode(body).map(|v| Self(Uuid::from_u128(v))).ok_or(err)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Written whole (padding and width apply to the id as one
                // string), from the stack: ids are displayed on every request.
                let digits = base62::encode_fixed_array(self.0.as_u128());
                let mut text = [0u8; 64];
                let (head, tail) = text.split_at_mut($prefix.len());
                head.copy_from_slice($prefix.as_bytes());
                tail[..digits.len()].copy_from_slice(&digits);
                f.pad(base62::as_text(&text[..$prefix.len() + digits.len()]))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some(concat!("^", $prefix, "[0-9A-Za-z]{22}$")))
                    .examples([concat!($prefix, "0Fq3rY7b8cJ2kLmNpQsTuV")])
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

public_id!(
    /// A company (tenant). Every company-owned object belongs to exactly one.
    CompanyId,
    "cmp_",
    "company"
);
public_id!(
    /// An audit record.
    AuditEventId,
    "aud_",
    "audit event"
);
public_id!(
    /// A payee: someone the company pays, with a validated bank account.
    PayeeId,
    "pye_",
    "payee"
);
public_id!(
    /// A payment.
    PaymentId,
    "pay_",
    "payment"
);
public_id!(
    /// An API key's public id; it is also embedded in the key text.
    ApiKeyId,
    "key_",
    "API key"
);
public_id!(
    /// An event: one change of one object, as integrators receive it.
    EventId,
    "evt_",
    "event"
);
public_id!(
    /// A webhook endpoint: where a company's events are delivered.
    WebhookEndpointId,
    "we_",
    "webhook endpoint"
);
public_id!(
    /// One delivery of one event to one endpoint (with its attempts).
    WebhookDeliveryId,
    "whd_",
    "webhook delivery"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_prefix() {
        let id = CompanyId::generate();
        let text = id.to_string();
        assert!(text.starts_with("cmp_"));
        assert_eq!(text.len(), CompanyId::TEXT_LEN);
        assert_eq!(CompanyId::parse(&text), Ok(id));
    }

    #[test]
    fn wrong_prefix_or_length_is_rejected() {
        let key = ApiKeyId::generate().to_string();
        assert!(CompanyId::parse(&key).is_err());
        assert!(ApiKeyId::parse(&key[..key.len() - 1]).is_err());
        assert!(ApiKeyId::parse("key_").is_err());
        assert!(ApiKeyId::parse("key_!!!!!!!!!!!!!!!!!!!!!!").is_err());
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = ApiKeyId::generate();
        let b = ApiKeyId::generate();
        assert!(a < b);
        assert!(a.to_string() < b.to_string(), "text order must equal id order");
    }
}
