//! Companies, API keys and what authentication reads.

use std::net::IpAddr;

use async_trait::async_trait;
use paygate_domain::audit::AuditEntry;
use paygate_domain::{AllowedCidrs, ApiKeyId, CompanyId, CompanyStatus, EventType, KeyMode, KeyPolicy, ScopeSet};
use paygate_domain::{RateLimitOverride, SecretHash};
use paygate_store::{
    ApiKey, AuthStore, Company, CompanyScope, KeyAuthRecord, KeyStore, KeyUsage, NewApiKey, NewEvent, Page,
    PageRequest, Rotation, StoreError, StoreResult,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::commit_with_events;
use crate::{Dialect, Lock, Row, Sql, SqlStore, all, cursor, execute, optional, overfetch};

pub(crate) const COMPANY_SELECT: &str = "SELECT id, name, status, created_at, key_default_lifetime_secs, \
     key_max_lifetime_secs, demo, rate_limit_rate, rate_limit_burst FROM companies";

pub(crate) fn company_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<Company> {
    let status: String = row.get("status")?;
    let default: Option<i64> = row.get("key_default_lifetime_secs")?;
    let max: Option<i64> = row.get("key_max_lifetime_secs")?;
    Ok(Company {
        id: CompanyId::from_uuid(row.get("id")?),
        name: row.get("name")?,
        status: CompanyStatus::parse(&status).ok_or_else(|| StoreError::corrupt("company status", &status))?,
        created_at: row.get("created_at")?,
        key_policy: KeyPolicy {
            default_lifetime: default.map(time::Duration::seconds),
            max_lifetime: max.map(time::Duration::seconds),
        },
        demo: row.get("demo")?,
        rate_limit: RateLimitOverride::from_columns(row.get("rate_limit_rate")?, row.get("rate_limit_burst")?),
    })
}

/// The key columns, unqualified (as `RETURNING` lists them) and of alias `k`.
const KEY_COLUMNS: &str = "id, company_id, name, owner, scopes, mode, created_at, expires_at, revoked_at, \
     last_used_at, last_used_ip, allowed_cidrs, replaces, replaced_by, rate_limit_rate, rate_limit_burst, principal_id";
const KEY_COLUMNS_K: &str = "k.id, k.company_id, k.name, k.owner, k.scopes, k.mode, k.created_at, k.expires_at, \
     k.revoked_at, k.last_used_at, k.last_used_ip, k.allowed_cidrs, k.replaces, k.replaced_by, k.rate_limit_rate, \
     k.rate_limit_burst, k.principal_id";

/// `SELECT <key columns><extra> FROM api_keys k <tail>`.
pub(crate) fn key_select(extra: &str, tail: &str) -> String {
    format!("SELECT {KEY_COLUMNS_K}{extra} FROM api_keys k {tail}")
}

pub(crate) fn key_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<ApiKey> {
    let scopes: String = row.get("scopes")?;
    let mode: String = row.get("mode")?;
    let cidrs: String = row.get("allowed_cidrs")?;
    let ip: Option<String> = row.get("last_used_ip")?;
    let id = ApiKeyId::from_uuid(row.get("id")?);
    let principal: Option<Uuid> = row.get("principal_id")?;
    Ok(ApiKey {
        id,
        principal: principal.map(ApiKeyId::from_uuid).unwrap_or(id),
        company_id: CompanyId::from_uuid(row.get("company_id")?),
        name: row.get("name")?,
        owner: row.get("owner")?,
        scopes: ScopeSet::from_storage(&scopes).map_err(|e| StoreError::corrupt("scopes", e))?,
        mode: KeyMode::parse(&mode).ok_or_else(|| StoreError::corrupt("key mode", &mode))?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        revoked_at: row.get("revoked_at")?,
        last_used_at: row.get("last_used_at")?,
        last_used_ip: ip
            .map(|i| i.parse::<IpAddr>().map_err(|e| StoreError::corrupt("last_used_ip", e)))
            .transpose()?,
        allowed_cidrs: AllowedCidrs::parse_list(&cidrs).map_err(|e| StoreError::corrupt("allowed_cidrs", e))?,
        replaces: row.get::<Option<Uuid>>("replaces")?.map(ApiKeyId::from_uuid),
        replaced_by: row.get::<Option<Uuid>>("replaced_by")?.map(ApiKeyId::from_uuid),
        rate_limit: RateLimitOverride::from_columns(row.get("rate_limit_rate")?, row.get("rate_limit_burst")?),
    })
}

pub(crate) async fn bump_auth_revision<D: Dialect>(conn: &mut D::Conn) -> StoreResult<()> {
    execute::<D>(conn, Sql::new("UPDATE auth_revision SET revision = revision + 1 WHERE id = 1")).await?;
    Ok(())
}

async fn insert_key<D: Dialect>(
    conn: &mut D::Conn,
    scope: &CompanyScope,
    new: &NewApiKey,
    replaces: Option<ApiKeyId>,
) -> StoreResult<()> {
    let sql = Sql::new(
        "INSERT INTO api_keys (company_id, id, name, owner, scopes, mode, secret_hash, pepper_version, \
         created_at, expires_at, allowed_cidrs, replaces, rate_limit_rate, rate_limit_burst, principal_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(scope.company_id().as_uuid())
    .bind(new.id.as_uuid())
    .bind(new.name.as_str())
    .bind(new.owner.as_str())
    .bind(new.scopes.to_storage())
    .bind(new.mode.as_str())
    .bind(&new.secret_hash.0[..])
    .bind(i64::from(new.pepper_version))
    .bind(new.created_at)
    .bind(new.expires_at)
    .bind(new.allowed_cidrs.to_storage())
    .bind(replaces.map(|r| r.as_uuid()))
    .bind(new.rate_limit.map(|l| i64::from(l.rate)))
    .bind(new.rate_limit.map(|l| i64::from(l.burst)))
    .bind(new.principal.map(|p| p.as_uuid()));
    execute::<D>(conn, sql).await?;
    Ok(())
}

/// The key `id`: of the scope's company, or of any company (`None`, operators).
pub(crate) async fn key_in<D: Dialect>(
    conn: &mut D::Conn,
    scope: Option<&CompanyScope>,
    id: ApiKeyId,
) -> StoreResult<Option<ApiKey>> {
    let sql = match scope {
        Some(scope) => Sql::company(scope, &key_select("", "WHERE k.{company} AND k.id = $2")),
        None => Sql::new(key_select("", "WHERE k.id = $1")),
    };
    optional::<D>(conn, sql.bind(id.as_uuid())).await?.as_ref().map(key_from_row).transpose()
}

/// Takes `lock` on the scope's company row, where the database locks rows;
/// `false` if there is no such company.
pub(crate) async fn lock_company<D: Dialect>(
    conn: &mut D::Conn,
    scope: &CompanyScope,
    lock: Lock,
) -> StoreResult<bool> {
    let sql = Sql::company_row(scope, &format!("SELECT 1 AS one FROM companies WHERE {{company}}{}", D::lock(lock)));
    Ok(optional::<D>(conn, sql).await?.is_some())
}

impl<D: Dialect> SqlStore<D> {
    pub(crate) async fn find_company_by_id(&self, id: CompanyId) -> StoreResult<Option<Company>> {
        let row = self.read_optional(Sql::new(format!("{COMPANY_SELECT} WHERE id = $1")).bind(id.as_uuid())).await?;
        row.as_ref().map(company_from_row).transpose()
    }

    /// Revokes key `id` (of the scope's company, or of any for operators).
    pub(crate) async fn revoke(
        &self,
        scope: Option<&CompanyScope>,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        let mut tx = self.db.begin().await?;
        let sql = match scope {
            Some(scope) => Sql::company(
                scope,
                "UPDATE api_keys SET revoked_at = $2 WHERE {company} AND id = $3 AND revoked_at IS NULL",
            ),
            None => Sql::new("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"),
        };
        let changed = execute::<D>(&mut tx, sql.bind(at).bind(id.as_uuid())).await?;
        if changed > 0 {
            bump_auth_revision::<D>(&mut tx).await?;
        }
        let Some(key) = key_in::<D>(&mut tx, scope, id).await? else { return Ok(None) };
        // Revoking twice changes nothing, and tells nobody again.
        let events = if changed > 0 { vec![NewEvent::api_key_revoked(&key, at)] } else { vec![] };
        commit_with_events::<D>(tx, audit, events).await?;
        Ok(Some(key))
    }
}

#[async_trait]
impl<D: Dialect> AuthStore for SqlStore<D> {
    async fn find_key_for_auth(&self, id: ApiKeyId) -> StoreResult<Option<KeyAuthRecord>> {
        let sql = Sql::new(key_select(
            ", k.secret_hash, k.pepper_version, c.name AS company_name, c.status AS company_status, \
             c.rate_limit_rate AS company_rate, c.rate_limit_burst AS company_burst",
            "JOIN companies c ON c.id = k.company_id WHERE k.id = $1",
        ))
        .bind(id.as_uuid());
        let Some(row) = self.read_optional(sql).await? else { return Ok(None) };
        let hash: Vec<u8> = row.get("secret_hash")?;
        let status: String = row.get("company_status")?;
        Ok(Some(KeyAuthRecord {
            key: key_from_row(&row)?,
            secret_hash: SecretHash::from_slice(&hash).ok_or_else(|| StoreError::corrupt("secret hash", hash.len()))?,
            pepper_version: row.get("pepper_version")?,
            company_name: row.get("company_name")?,
            company_status: CompanyStatus::parse(&status)
                .ok_or_else(|| StoreError::corrupt("company status", &status))?,
            company_rate_limit: RateLimitOverride::from_columns(row.get("company_rate")?, row.get("company_burst")?),
        }))
    }

    async fn auth_revision(&self) -> StoreResult<i64> {
        self.db.auth_revision().await
    }

    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        // Rows in id order: two nodes flushing at once cannot deadlock.
        let mut usage = usage.to_vec();
        usage.sort_by_key(|u| u.id);
        let mut tx = self.db.begin().await?;
        for u in &usage {
            let sql = Sql::new(
                "UPDATE api_keys SET last_used_at = $1, last_used_ip = $2 \
                 WHERE id = $3 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(u.at)
            .bind(u.ip.to_string())
            .bind(u.id.as_uuid());
            execute::<D>(&mut tx, sql).await?;
        }
        D::commit(tx).await
    }
}

#[async_trait]
impl<D: Dialect> KeyStore for SqlStore<D> {
    async fn get_company(&self, scope: &CompanyScope) -> StoreResult<Company> {
        let sql = Sql::company_row(scope, &format!("{COMPANY_SELECT} WHERE {{company}}"));
        let row = self.read_optional(sql).await?.ok_or(StoreError::NotFound("company"))?;
        company_from_row(&row)
    }

    async fn list_api_keys(&self, scope: &CompanyScope, page: PageRequest<ApiKeyId>) -> StoreResult<Page<ApiKey>> {
        let sql = Sql::company(scope, &key_select("", "WHERE k.{company} AND k.id < $2 ORDER BY k.id DESC LIMIT $3"))
            .bind(cursor(page.after.map(|a| a.as_uuid())))
            .bind(overfetch(page.limit));
        let keys = self.read_all(sql).await?.iter().map(key_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(keys, page.limit))
    }

    async fn get_api_key(&self, scope: &CompanyScope, id: ApiKeyId) -> StoreResult<Option<ApiKey>> {
        key_in::<D>(&mut *self.read().await?, Some(scope), id).await
    }

    async fn create_api_key(&self, scope: &CompanyScope, new: NewApiKey, audit: &AuditEntry) -> StoreResult<ApiKey> {
        let mut tx = self.db.begin().await?;
        // Shared: an emergency revoke-all (exclusive) waits for us, then revokes this key too.
        if !lock_company::<D>(&mut tx, scope, Lock::Share).await? {
            return Err(StoreError::NotFound("company"));
        }
        insert_key::<D>(&mut tx, scope, &new, None).await?;
        let key = new.into_key(scope.company_id(), None);
        commit_with_events::<D>(tx, audit, vec![NewEvent::api_key(EventType::ApiKeyCreated, &key, None)]).await?;
        Ok(key)
    }

    async fn revoke_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        self.revoke(Some(scope), id, at, audit).await
    }

    async fn revoke_all_api_keys(
        &self,
        scope: &CompanyScope,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<u64> {
        let mut tx = self.db.begin().await?;
        if D::ROW_LOCKS {
            // The company row, exclusively: key creations and rotations take it
            // shared, so none can slip a new key past this statement's snapshot.
            lock_company::<D>(&mut tx, scope, Lock::Update).await?;
        }
        let sql = Sql::company(
            scope,
            &format!(
                "UPDATE api_keys SET revoked_at = $2 WHERE {{company}} AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
            ),
        )
        .bind(at);
        let rows = all::<D>(&mut tx, sql).await?;
        bump_auth_revision::<D>(&mut tx).await?;
        let mut keys = rows.iter().map(key_from_row).collect::<StoreResult<Vec<_>>>()?;
        keys.sort_by_key(|k| k.id);
        // One event per key this call revoked.
        let events = keys.iter().map(|key| NewEvent::api_key_revoked(key, at)).collect();
        commit_with_events::<D>(tx, audit, events).await?;
        Ok(keys.len() as u64)
    }

    async fn rotate_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        new: NewApiKey,
        old_expires_at: OffsetDateTime,
        now: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Rotation> {
        // On SQLite the write lock held from BEGIN makes the checks below race-free.
        let mut tx = self.db.begin().await?;
        if D::ROW_LOCKS {
            // Shared lock on the company: an emergency revoke-all waits for us,
            // and then sees (and revokes) the successor too.
            lock_company::<D>(&mut tx, scope, Lock::Share).await?;
            // Lock the old key: concurrent rotations and revocations wait for us.
            let sql = Sql::company(
                scope,
                &format!("SELECT 1 AS one FROM api_keys WHERE {{company}} AND id = $2{}", D::lock(Lock::Update)),
            );
            if optional::<D>(&mut tx, sql.bind(id.as_uuid())).await?.is_none() {
                return Ok(Rotation::NotFound);
            }
        }
        let Some(old) = key_in::<D>(&mut tx, Some(scope), id).await? else { return Ok(Rotation::NotFound) };
        if old.revoked_at.is_some() {
            return Ok(Rotation::Revoked);
        }
        if old.is_expired_at(now) {
            return Ok(Rotation::Expired);
        }
        if old.replaced_by.is_some() {
            return Ok(Rotation::AlreadyRotated);
        }
        insert_key::<D>(&mut tx, scope, &new, Some(id)).await?;
        let sql = Sql::company(
            scope,
            "UPDATE api_keys SET replaced_by = $2, \
             expires_at = CASE WHEN expires_at IS NULL OR expires_at > $3 THEN $3 ELSE expires_at END \
             WHERE {company} AND id = $4",
        )
        .bind(new.id.as_uuid())
        .bind(old_expires_at)
        .bind(id.as_uuid());
        execute::<D>(&mut tx, sql).await?;
        bump_auth_revision::<D>(&mut tx).await?;
        let old = key_in::<D>(&mut tx, Some(scope), id).await?.ok_or(StoreError::NotFound("API key"))?;
        let new = new.into_key(scope.company_id(), Some(id));
        let events = vec![
            NewEvent::api_key(EventType::ApiKeyCreated, &new, None),
            NewEvent::api_key(EventType::ApiKeyRotated, &old, None),
        ];
        commit_with_events::<D>(tx, audit, events).await?;
        Ok(Rotation::Rotated { old: Box::new(old), new: Box::new(new) })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_key_column_lists_name_the_same_columns() {
        let qualified: Vec<String> = super::KEY_COLUMNS.split(", ").map(|c| format!("k.{c}")).collect();
        assert_eq!(qualified.join(", "), super::KEY_COLUMNS_K);
    }
}
