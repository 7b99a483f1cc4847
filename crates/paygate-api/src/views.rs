//! Response bodies. Views are built from store rows and never carry a secret
//! or a hash.

use paygate_domain::{AllowedCidrs, ApiKeyId, CompanyId, KeyMode, ScopeSet};
use paygate_store::ApiKey;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// RFC 3339 text of a time, as every response writes it.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[derive(Debug, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

/// An API key as its company sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    #[schema(example = "api_key")]
    pub object: &'static str,
    pub id: ApiKeyId,
    pub company_id: CompanyId,
    pub name: String,
    /// Who or which system the key was issued to.
    pub owner: String,
    pub mode: KeyMode,
    pub scopes: ScopeSet,
    pub status: KeyStatus,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
    /// Updated at most once a minute per key per node.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    #[schema(value_type = Option<String>, example = "203.0.113.7")]
    pub last_used_ip: Option<std::net::IpAddr>,
    /// Client networks the key may be used from; empty means any.
    #[schema(value_type = Vec<String>, example = json!(["203.0.113.0/24"]))]
    pub allowed_cidrs: AllowedCidrs,
    /// The key this one replaced by rotation.
    pub replaces: Option<ApiKeyId>,
    /// The key that replaced this one by rotation.
    pub replaced_by: Option<ApiKeyId>,
}

impl ApiKeyView {
    pub fn new(key: ApiKey, now: OffsetDateTime) -> Self {
        let status = if key.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if key.is_expired_at(now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        };
        Self {
            object: "api_key",
            id: key.id,
            company_id: key.company_id,
            name: key.name,
            owner: key.owner,
            mode: key.mode,
            scopes: key.scopes,
            status,
            created_at: key.created_at,
            expires_at: key.expires_at,
            revoked_at: key.revoked_at,
            last_used_at: key.last_used_at,
            last_used_ip: key.last_used_ip,
            allowed_cidrs: key.allowed_cidrs,
            replaces: key.replaces,
            replaced_by: key.replaced_by,
        }
    }
}
