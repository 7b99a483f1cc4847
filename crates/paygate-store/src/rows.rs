use paygate_domain::{ApiKeyId, CompanyId, CompanyStatus, KeyMode, Label, ScopeSet, SecretHash};
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Company {
    pub id: CompanyId,
    pub name: String,
    pub status: CompanyStatus,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct NewCompany {
    pub id: CompanyId,
    pub name: Label,
    pub created_at: OffsetDateTime,
}

impl NewCompany {
    pub fn new(name: Label) -> Self {
        Self { id: CompanyId::generate(), name, created_at: paygate_domain::now() }
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
    pub secret_hash: SecretHash,
    pub pepper_version: u16,
}

/// Everything authentication needs in one read.
#[derive(Debug, Clone)]
pub struct KeyAuthRecord {
    pub key: ApiKey,
    pub secret_hash: SecretHash,
    pub pepper_version: u16,
    pub company_name: String,
    pub company_status: CompanyStatus,
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
