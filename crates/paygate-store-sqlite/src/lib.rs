//! Paygate storage on one SQLite file.
//!
//! Every connection runs WAL with `synchronous=FULL` and foreign keys on; every
//! write transaction starts with `BEGIN IMMEDIATE` so it takes the write lock up
//! front and honours the busy timeout (a deferred transaction that upgrades to a
//! write fails at once when another writer is active). A CLI process and the
//! server share the file safely.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use paygate_domain::{
    AllowedCidrs, ApiKeyId, CompanyId, CompanyStatus, KeyMode, KeyPolicy, RateLimitOverride, ScopeSet, SecretHash,
};
use paygate_store::{
    ApiKey, Backend, Company, CompanyScope, KeyAuthRecord, KeyUsage, NewApiKey, NewCompany, OperatorStore, Page,
    PageRequest, Rotation, Store, StoreError, StoreResult,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use time::OffsetDateTime;
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection of its own for the auth revision poll, so a pool
    /// exhausted by requests cannot starve the revocation signal.
    signal_pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("invalid SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(map_err)?;
        let signal_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(500))
            .connect_with(options.busy_timeout(Duration::from_millis(500)))
            .await
            .map_err(map_err)?;
        Ok(Self { pool, signal_pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) if db.message().contains("database is locked") => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(m: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(m as i128 * 1_000)
        .map_err(|e| StoreError::Internal(format!("stored time out of range: {e}")))
}

fn opt_from_micros(m: Option<i64>) -> StoreResult<Option<OffsetDateTime>> {
    m.map(from_micros).transpose()
}

fn get<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r SqliteRow,
    col: &str,
) -> StoreResult<T> {
    row.try_get(col).map_err(|e| StoreError::Internal(format!("column {col}: {e}")))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("stored {what} is invalid: {e}"))
}

const COMPANY_SELECT: &str = "SELECT id, name, status, created_at, key_default_lifetime_secs, key_max_lifetime_secs, demo, \
     rate_limit_rate, rate_limit_burst FROM companies";

fn company_from_row(row: &SqliteRow) -> StoreResult<Company> {
    let status: String = get(row, "status")?;
    let default: Option<i64> = get(row, "key_default_lifetime_secs")?;
    let max: Option<i64> = get(row, "key_max_lifetime_secs")?;
    Ok(Company {
        id: CompanyId::from_uuid(get(row, "id")?),
        name: get(row, "name")?,
        status: CompanyStatus::parse(&status).ok_or_else(|| corrupt("company status", &status))?,
        created_at: from_micros(get(row, "created_at")?)?,
        key_policy: KeyPolicy {
            default_lifetime: default.map(time::Duration::seconds),
            max_lifetime: max.map(time::Duration::seconds),
        },
        demo: get::<i64>(row, "demo")? != 0,
        rate_limit: RateLimitOverride::from_columns(get(row, "rate_limit_rate")?, get(row, "rate_limit_burst")?),
    })
}

fn key_from_row(row: &SqliteRow) -> StoreResult<ApiKey> {
    let scopes: String = get(row, "scopes")?;
    let mode: String = get(row, "mode")?;
    let cidrs: String = get(row, "allowed_cidrs")?;
    let ip: Option<String> = get(row, "last_used_ip")?;
    let replaces: Option<Uuid> = get(row, "replaces")?;
    let replaced_by: Option<Uuid> = get(row, "replaced_by")?;
    Ok(ApiKey {
        id: ApiKeyId::from_uuid(get(row, "id")?),
        company_id: CompanyId::from_uuid(get(row, "company_id")?),
        name: get(row, "name")?,
        owner: get(row, "owner")?,
        scopes: ScopeSet::from_storage(&scopes).map_err(|e| corrupt("scopes", e))?,
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("key mode", &mode))?,
        created_at: from_micros(get(row, "created_at")?)?,
        expires_at: opt_from_micros(get(row, "expires_at")?)?,
        revoked_at: opt_from_micros(get(row, "revoked_at")?)?,
        last_used_at: opt_from_micros(get(row, "last_used_at")?)?,
        last_used_ip: ip.map(|i| i.parse::<IpAddr>().map_err(|e| corrupt("last_used_ip", e))).transpose()?,
        allowed_cidrs: AllowedCidrs::parse_list(&cidrs).map_err(|e| corrupt("allowed_cidrs", e))?,
        replaces: replaces.map(ApiKeyId::from_uuid),
        replaced_by: replaced_by.map(ApiKeyId::from_uuid),
        rate_limit: RateLimitOverride::from_columns(get(row, "rate_limit_rate")?, get(row, "rate_limit_burst")?),
    })
}

/// `SELECT <key columns> [extra columns] FROM api_keys k <tail>`, as one literal.
macro_rules! key_select {
    ($tail:literal) => {
        key_select!("", $tail)
    };
    ($extra:literal, $tail:literal) => {
        concat!(
            "SELECT k.id, k.company_id, k.name, k.owner, k.scopes, k.mode, k.created_at, k.expires_at, ",
            "k.revoked_at, k.last_used_at, k.last_used_ip, k.allowed_cidrs, k.replaces, k.replaced_by, ",
            "k.rate_limit_rate, k.rate_limit_burst",
            $extra,
            " FROM api_keys k ",
            $tail
        )
    };
}

async fn bump_auth_revision(conn: &mut SqliteConnection) -> StoreResult<()> {
    sqlx::query("UPDATE auth_revision SET revision = revision + 1 WHERE id = 1")
        .execute(conn)
        .await
        .map_err(map_err)?;
    Ok(())
}

async fn insert_key(
    conn: &mut SqliteConnection,
    company_id: CompanyId,
    new: &NewApiKey,
    replaces: Option<ApiKeyId>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, company_id, name, owner, scopes, mode, secret_hash, pepper_version, \
         created_at, expires_at, allowed_cidrs, replaces, rate_limit_rate, rate_limit_burst) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new.id.as_uuid())
    .bind(company_id.as_uuid())
    .bind(new.name.as_str())
    .bind(new.owner.as_str())
    .bind(new.scopes.to_storage())
    .bind(new.mode.as_str())
    .bind(&new.secret_hash.0[..])
    .bind(new.pepper_version as i64)
    .bind(micros(new.created_at))
    .bind(new.expires_at.map(micros))
    .bind(new.allowed_cidrs.to_storage())
    .bind(replaces.map(|r| r.as_uuid()))
    .bind(new.rate_limit.map(|l| l.rate as i64))
    .bind(new.rate_limit.map(|l| l.burst as i64))
    .execute(conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn scoped_key(
    conn: &mut SqliteConnection,
    company: Option<CompanyId>,
    id: ApiKeyId,
) -> StoreResult<Option<ApiKey>> {
    let row = sqlx::query(key_select!("WHERE k.id = ?1 AND (?2 IS NULL OR k.company_id = ?2)"))
        .bind(id.as_uuid())
        .bind(company.map(|c| c.as_uuid()))
        .fetch_optional(conn)
        .await
        .map_err(map_err)?;
    row.as_ref().map(key_from_row).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    async fn find_key_for_auth(&self, id: ApiKeyId) -> StoreResult<Option<KeyAuthRecord>> {
        let row = sqlx::query(key_select!(
            ", k.secret_hash, k.pepper_version, c.name AS company_name, c.status AS company_status, \
             c.rate_limit_rate AS company_rate, c.rate_limit_burst AS company_burst",
            "JOIN companies c ON c.id = k.company_id WHERE k.id = ?"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let hash: Vec<u8> = get(&row, "secret_hash")?;
        let status: String = get(&row, "company_status")?;
        let pepper_version: i64 = get(&row, "pepper_version")?;
        Ok(Some(KeyAuthRecord {
            key: key_from_row(&row)?,
            secret_hash: SecretHash::from_slice(&hash).ok_or_else(|| corrupt("secret hash", hash.len()))?,
            pepper_version: u16::try_from(pepper_version).map_err(|e| corrupt("pepper version", e))?,
            company_name: get(&row, "company_name")?,
            company_status: CompanyStatus::parse(&status).ok_or_else(|| corrupt("company status", &status))?,
            company_rate_limit: RateLimitOverride::from_columns(
                get(&row, "company_rate")?,
                get(&row, "company_burst")?,
            ),
        }))
    }

    async fn auth_revision(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT revision FROM auth_revision WHERE id = 1")
            .fetch_one(&self.signal_pool)
            .await
            .map_err(map_err)
    }

    async fn get_company(&self, scope: &CompanyScope) -> StoreResult<Company> {
        self.find_company(scope.company_id()).await?.ok_or(StoreError::NotFound("company"))
    }

    async fn list_api_keys(&self, scope: &CompanyScope, page: PageRequest<ApiKeyId>) -> StoreResult<Page<ApiKey>> {
        // A missing cursor is the largest possible id: one statement for both cases.
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let rows = sqlx::query(key_select!("WHERE k.company_id = ? AND k.id < ? ORDER BY k.id DESC LIMIT ?"))
            .bind(scope.company_id().as_uuid())
            .bind(after)
            .bind(page.limit as i64 + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let keys = rows.iter().map(key_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(keys, page.limit))
    }

    async fn get_api_key(&self, scope: &CompanyScope, id: ApiKeyId) -> StoreResult<Option<ApiKey>> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        scoped_key(&mut conn, Some(scope.company_id()), id).await
    }

    async fn create_api_key(&self, scope: &CompanyScope, new: NewApiKey) -> StoreResult<ApiKey> {
        let company_id = scope.company_id();
        let mut tx = self.begin_write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM companies WHERE id = ?")
            .bind(company_id.as_uuid())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        if exists.is_none() {
            return Err(StoreError::NotFound("company"));
        }
        insert_key(&mut tx, company_id, &new, None).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(new.into_key(company_id, None))
    }

    async fn revoke_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        at: OffsetDateTime,
    ) -> StoreResult<Option<ApiKey>> {
        self.revoke(Some(scope.company_id()), id, at).await
    }

    async fn revoke_all_api_keys(&self, scope: &CompanyScope, at: OffsetDateTime) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let revoked = sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE company_id = ? AND revoked_at IS NULL")
            .bind(micros(at))
            .bind(scope.company_id().as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        bump_auth_revision(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(revoked)
    }

    async fn rotate_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        new: NewApiKey,
        old_expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> StoreResult<Rotation> {
        let company_id = scope.company_id();
        // BEGIN IMMEDIATE holds the write lock: the checks below cannot race.
        let mut tx = self.begin_write().await?;
        let Some(old) = scoped_key(&mut tx, Some(company_id), id).await? else { return Ok(Rotation::NotFound) };
        if old.revoked_at.is_some() {
            return Ok(Rotation::Revoked);
        }
        if old.is_expired_at(now) {
            return Ok(Rotation::Expired);
        }
        if old.replaced_by.is_some() {
            return Ok(Rotation::AlreadyRotated);
        }
        insert_key(&mut tx, company_id, &new, Some(id)).await?;
        sqlx::query(
            "UPDATE api_keys SET replaced_by = ?1, \
             expires_at = CASE WHEN expires_at IS NULL OR expires_at > ?2 THEN ?2 ELSE expires_at END WHERE id = ?3",
        )
        .bind(new.id.as_uuid())
        .bind(micros(old_expires_at))
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        bump_auth_revision(&mut tx).await?;
        let old = scoped_key(&mut tx, Some(company_id), id).await?.ok_or(StoreError::NotFound("API key"))?;
        tx.commit().await.map_err(map_err)?;
        Ok(Rotation::Rotated { old: Box::new(old), new: Box::new(new.into_key(company_id, Some(id))) })
    }

    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for u in usage {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = ?1, last_used_ip = ?2 \
                 WHERE id = ?3 AND (last_used_at IS NULL OR last_used_at < ?1)",
            )
            .bind(micros(u.at))
            .bind(u.ip.to_string())
            .bind(u.id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }
}

#[async_trait]
impl OperatorStore for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Internal(format!("migration failed: {e}")))
    }

    async fn create_company(&self, new: NewCompany) -> StoreResult<Company> {
        let company = Company {
            id: new.id,
            name: new.name.into_string(),
            status: CompanyStatus::Active,
            created_at: new.created_at,
            key_policy: KeyPolicy::default(),
            demo: new.demo,
            rate_limit: None,
        };
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO companies (id, name, status, created_at, demo) VALUES (?, ?, ?, ?, ?)")
            .bind(company.id.as_uuid())
            .bind(&company.name)
            .bind(company.status.as_str())
            .bind(micros(company.created_at))
            .bind(company.demo as i64)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(company)
    }

    async fn list_companies(&self) -> StoreResult<Vec<Company>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{COMPANY_SELECT} ORDER BY id DESC")))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(company_from_row).collect()
    }

    async fn find_company(&self, id: CompanyId) -> StoreResult<Option<Company>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{COMPANY_SELECT} WHERE id = ?")))
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(company_from_row).transpose()
    }

    async fn set_company_status(&self, id: CompanyId, status: CompanyStatus) -> StoreResult<Option<Company>> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query("UPDATE companies SET status = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        bump_auth_revision(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        self.find_company(id).await
    }

    async fn set_key_policy(&self, id: CompanyId, policy: KeyPolicy) -> StoreResult<Option<Company>> {
        let mut tx = self.begin_write().await?;
        let changed =
            sqlx::query("UPDATE companies SET key_default_lifetime_secs = ?, key_max_lifetime_secs = ? WHERE id = ?")
                .bind(policy.default_lifetime.map(|d| d.whole_seconds()))
                .bind(policy.max_lifetime.map(|d| d.whole_seconds()))
                .bind(id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
        tx.commit().await.map_err(map_err)?;
        if changed == 0 { Ok(None) } else { self.find_company(id).await }
    }

    async fn set_key_rate_limit(&self, id: ApiKeyId, limit: Option<RateLimitOverride>) -> StoreResult<Option<ApiKey>> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query("UPDATE api_keys SET rate_limit_rate = ?, rate_limit_burst = ? WHERE id = ?")
            .bind(limit.map(|l| l.rate as i64))
            .bind(limit.map(|l| l.burst as i64))
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        bump_auth_revision(&mut tx).await?;
        let key = scoped_key(&mut tx, None, id).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(key)
    }

    async fn set_company_rate_limit(
        &self,
        id: CompanyId,
        limit: Option<RateLimitOverride>,
    ) -> StoreResult<Option<Company>> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query("UPDATE companies SET rate_limit_rate = ?, rate_limit_burst = ? WHERE id = ?")
            .bind(limit.map(|l| l.rate as i64))
            .bind(limit.map(|l| l.burst as i64))
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        bump_auth_revision(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        self.find_company(id).await
    }

    async fn revoke_api_key_by_id(&self, id: ApiKeyId, at: OffsetDateTime) -> StoreResult<Option<ApiKey>> {
        self.revoke(None, id, at).await
    }
}

impl SqliteStore {
    async fn revoke(
        &self,
        company: Option<CompanyId>,
        id: ApiKeyId,
        at: OffsetDateTime,
    ) -> StoreResult<Option<ApiKey>> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL AND (?3 IS NULL OR company_id = ?3)",
        )
        .bind(micros(at))
        .bind(id.as_uuid())
        .bind(company.map(|c| c.as_uuid()))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if changed > 0 {
            bump_auth_revision(&mut tx).await?;
        }
        let key = scoped_key(&mut tx, company, id).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(key)
    }
}
