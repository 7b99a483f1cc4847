//! Helpers more than one route file uses. Route files import from here, never
//! from each other.

use paygate_domain::payment::{Actor, Metadata};
use paygate_store::auth::Authenticated;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::problem::FieldError;

/// The caller as the actor of a change (creator, approver, editor).
pub fn caller_actor(caller: &Authenticated) -> Actor {
    let key = &caller.record.key;
    Actor::key(key.id, &key.owner, key.principal)
}

/// Validates an optional metadata object, adding its problems under `prefix`.
pub fn metadata_field(
    errors: &mut Vec<FieldError>,
    prefix: &str,
    value: Option<&serde_json::Value>,
) -> Option<Metadata> {
    let value = value?;
    match Metadata::from_json(value) {
        Ok(m) => Some(m),
        Err(problems) => {
            for (pointer, message) in problems {
                errors.push(FieldError::pointer(format!("{prefix}{pointer}"), message));
            }
            None
        }
    }
}

/// An optional RFC 3339 query parameter, in UTC; a problem for `errors` if malformed.
pub fn parse_time(errors: &mut Vec<FieldError>, name: &str, value: Option<&str>) -> Option<OffsetDateTime> {
    let text = value?;
    match OffsetDateTime::parse(text, &Rfc3339).ok().and_then(|t| t.checked_to_offset(time::UtcOffset::UTC)) {
        Some(t) => Some(t),
        None => {
            errors.push(FieldError::parameter(name, "must be an RFC 3339 date-time"));
            None
        }
    }
}

/// For `#[serde(deserialize_with)]`: tells a field sent as `null` (clear it)
/// from a field left out (keep it).
pub fn double_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}
