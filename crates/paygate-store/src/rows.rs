use std::net::IpAddr;

use paygate_domain::{
    AllowedCidrs, ApiKeyId, CompanyId, CompanyStatus, KeyMode, KeyPolicy, Label, RateLimitOverride, ScopeSet,
    SecretHash,
};
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Company {
    pub id: CompanyId,
    pub name: String,
    pub status: CompanyStatus,
    pub created_at: OffsetDateTime,
    pub key_policy: KeyPolicy,
    /// The sandbox company of `serve --demo`.
    pub demo: bool,
    /// Overrides the configured per-company limit.
    pub rate_limit: Option<RateLimitOverride>,
}

#[derive(Debug, Clone)]
pub struct NewCompany {
    pub id: CompanyId,
    pub name: Label,
    pub created_at: OffsetDateTime,
    pub demo: bool,
}

impl NewCompany {
    pub fn new(name: Label) -> Self {
        Self { id: CompanyId::generate(), name, created_at: paygate_domain::now(), demo: false }
    }
}

/// An API key as stored, without its hash. Safe to show to the owning company.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub company_id: CompanyId,
    pub name: String,
    pub owner: String,
    pub scopes: ScopeSet,
    pub mode: KeyMode,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub last_used_at: Option<OffsetDateTime>,
    pub last_used_ip: Option<IpAddr>,
    /// Empty: any client address.
    pub allowed_cidrs: AllowedCidrs,
    /// The key this one replaced by rotation.
    pub replaces: Option<ApiKeyId>,
    /// The key that replaced this one by rotation.
    pub replaced_by: Option<ApiKeyId>,
    /// Overrides the configured per-key limit.
    pub rate_limit: Option<RateLimitOverride>,
    /// The operator-issued key this key descends from (itself for a key an
    /// operator issued): keys created or rotated through the API inherit their
    /// creator's principal, and four-eyes rules count a principal once.
    pub principal: ApiKeyId,
}

impl ApiKey {
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// A key to insert. Carries only the hash: the secret never reaches storage.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: ApiKeyId,
    pub name: Label,
    pub owner: Label,
    pub scopes: ScopeSet,
    pub mode: KeyMode,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub allowed_cidrs: AllowedCidrs,
    pub rate_limit: Option<RateLimitOverride>,
    pub secret_hash: SecretHash,
    pub pepper_version: u16,
    /// `None`: issued by an operator, the key is its own principal.
    pub principal: Option<ApiKeyId>,
}

impl NewApiKey {
    /// The row as it reads back right after insertion.
    pub fn into_key(self, company_id: CompanyId, replaces: Option<ApiKeyId>) -> ApiKey {
        ApiKey {
            id: self.id,
            company_id,
            name: self.name.into_string(),
            owner: self.owner.into_string(),
            scopes: self.scopes,
            mode: self.mode,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: None,
            last_used_at: None,
            last_used_ip: None,
            allowed_cidrs: self.allowed_cidrs,
            replaces,
            replaced_by: None,
            rate_limit: self.rate_limit,
            principal: self.principal.unwrap_or(self.id),
        }
    }
}

/// The outcome of a rotation, decided inside the rotating transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    Rotated { old: Box<ApiKey>, new: Box<ApiKey> },
    NotFound,
    Revoked,
    Expired,
    AlreadyRotated,
}

/// A successful use of a key, recorded at most once a minute per key per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsage {
    pub id: ApiKeyId,
    pub at: OffsetDateTime,
    pub ip: IpAddr,
}

/// Everything authentication needs in one read.
#[derive(Debug, Clone)]
pub struct KeyAuthRecord {
    pub key: ApiKey,
    pub secret_hash: SecretHash,
    pub pepper_version: u16,
    pub company_name: String,
    pub company_status: CompanyStatus,
    pub company_rate_limit: Option<RateLimitOverride>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest<Id> {
    /// 1..=100, enforced by the caller.
    pub limit: u32,
    pub after: Option<Id>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows fetched newest first.
    pub fn from_overfetch(mut rows: Vec<T>, limit: u32) -> Self {
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Self { items: rows, has_more }
    }
}

/// A signed checkpoint of one audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub chain: String,
    pub seq: u64,
    pub hash: [u8; 32],
    pub signed_at: OffsetDateTime,
    pub key_id: String,
    pub signature: Vec<u8>,
}

/// Filters of `GET /v1/audit-events`; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub actor_key_id: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub outcome: Option<paygate_domain::audit::Outcome>,
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
}
