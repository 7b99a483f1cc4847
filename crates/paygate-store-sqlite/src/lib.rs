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
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditEntry, AuditRecord, Outcome as AuditOutcome};
use paygate_domain::payment::{ApprovalPolicy, Payment};
use paygate_domain::{
    AllowedCidrs, ApiKeyId, CompanyId, CompanyStatus, KeyMode, KeyPolicy, RateLimitOverride, ScopeSet, SecretHash,
};
use paygate_domain::{EventId, EventType, PayeeId, PaymentId, WebhookDeliveryId, WebhookEndpointId};
use paygate_store::{
    ApiKey, AuditFilter, Backend, Checkpoint, Company, CompanyScope, KeyAuthRecord, KeyUsage, NewApiKey, NewCompany,
    NewPayee, OperatorStore, Page, PageRequest, Payee, PayeeStatus, PaymentCreate, PaymentCreated, PaymentFilter,
    Rotation, Store, StoreError, StoreResult, StoredResponse,
};
use paygate_store::{
    Delivery, DeliveryJob, DeliveryResult, EndpointPatch, Event, EventFilter, NewEvent, NewWebhookEndpoint,
    WebhookEndpoint,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use time::OffsetDateTime;
use uuid::Uuid;

mod events;
mod payments;

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
        create_private(options.get_filename())?;
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

/// Creates a missing database file readable by its owner only: it holds key
/// hashes, sealed account numbers and the audit log. SQLite gives the -wal
/// and -shm files the main file's mode, so they follow.
fn create_private(path: &std::path::Path) -> StoreResult<()> {
    if path.as_os_str().is_empty() || path.to_str().is_some_and(|p| p.starts_with(':')) || path.exists() {
        return Ok(());
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    match open.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable(format!("cannot create {}: {e}", path.display()))),
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
    let id = ApiKeyId::from_uuid(get(row, "id")?);
    let principal: Option<Uuid> = get(row, "principal_id")?;
    Ok(ApiKey {
        id,
        principal: principal.map(ApiKeyId::from_uuid).unwrap_or(id),
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
        $crate::key_select!("", $tail)
    };
    ($extra:literal, $tail:literal) => {
        concat!(
            "SELECT k.id, k.company_id, k.name, k.owner, k.scopes, k.mode, k.created_at, k.expires_at, ",
            "k.revoked_at, k.last_used_at, k.last_used_ip, k.allowed_cidrs, k.replaces, k.replaced_by, ",
            "k.rate_limit_rate, k.rate_limit_burst, k.principal_id",
            $extra,
            " FROM api_keys k ",
            $tail
        )
    };
}
pub(crate) use key_select;

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
         created_at, expires_at, allowed_cidrs, replaces, rate_limit_rate, rate_limit_burst, principal_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .bind(new.principal.map(|p| p.as_uuid()))
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

// ---------------------------------------------------------------------------
// Audit log

const AUDIT_COLUMNS: &str = "chain, seq, id, occurred_at, actor_kind, actor_id, actor_name, action, resource_type, \
     resource_id, outcome, status, request_id, client_ip, user_agent, details, prev_hash, hash";

fn audit_from_row(row: &SqliteRow) -> StoreResult<AuditRecord> {
    let action: String = get(row, "action")?;
    let action = paygate_domain::audit::ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .ok_or_else(|| corrupt("audit action", &action))?;
    let kind: String = get(row, "actor_kind")?;
    let outcome: String = get(row, "outcome")?;
    let hash32 = |col: &str| -> StoreResult<[u8; 32]> {
        let bytes: Vec<u8> = get(row, col)?;
        bytes.try_into().map_err(|_| corrupt(col, "length"))
    };
    let seq: i64 = get(row, "seq")?;
    let status: i64 = get(row, "status")?;
    Ok(AuditRecord {
        entry: AuditEntry {
            id: AuditEventId::from_uuid(get(row, "id")?),
            chain: get(row, "chain")?,
            occurred_at: from_micros(get(row, "occurred_at")?)?,
            actor_kind: ActorKind::parse(&kind).ok_or_else(|| corrupt("actor kind", &kind))?,
            actor_id: get(row, "actor_id")?,
            actor_name: get(row, "actor_name")?,
            action,
            resource_type: get(row, "resource_type")?,
            resource_id: get(row, "resource_id")?,
            outcome: AuditOutcome::parse(&outcome).ok_or_else(|| corrupt("outcome", &outcome))?,
            status: status as u16,
            request_id: get(row, "request_id")?,
            client_ip: get(row, "client_ip")?,
            user_agent: get(row, "user_agent")?,
            details: get(row, "details")?,
        },
        seq: seq as u64,
        prev_hash: hash32("prev_hash")?,
        hash: hash32("hash")?,
    })
}

/// The one way a change commits: its audit record is appended in the same
/// transaction, so the change and its record are durable together or not at all.
async fn commit_change(mut tx: sqlx::Transaction<'static, sqlx::Sqlite>, audit: &AuditEntry) -> StoreResult<()> {
    append_in(&mut tx, std::slice::from_ref(audit)).await?;
    tx.commit().await.map_err(map_err)
}

/// Appends `entries` to their chains inside the caller's transaction. Heads are
/// locked in chain order, so concurrent appenders (other nodes, change
/// transactions) queue behind each other instead of forking a chain.
async fn append_in(conn: &mut SqliteConnection, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>> {
    let mut chains: Vec<&str> = entries.iter().map(|e| e.chain.as_str()).collect();
    chains.sort_unstable();
    chains.dedup();
    let mut heads = std::collections::HashMap::new();
    for chain in chains {
        sqlx::query("INSERT INTO audit_heads (chain, seq, hash) VALUES (?1, 0, ?2) ON CONFLICT (chain) DO NOTHING")
            .bind(chain)
            .bind(&[0u8; 32][..])
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let row = sqlx::query("SELECT seq, hash FROM audit_heads WHERE chain = ?1")
            .bind(chain)
            .fetch_one(&mut *conn)
            .await
            .map_err(map_err)?;
        let seq: i64 = get(&row, "seq")?;
        let hash: Vec<u8> = get(&row, "hash")?;
        let hash: [u8; 32] = hash.try_into().map_err(|_| corrupt("audit head", "length"))?;
        heads.insert(chain.to_owned(), (seq as u64, hash));
    }
    let mut records = Vec::with_capacity(entries.len());
    for entry in entries {
        let (seq, hash) = heads[&entry.chain];
        let record = AuditRecord::append(entry.clone(), seq, hash);
        heads.insert(entry.chain.clone(), (record.seq, record.hash));
        records.push(record);
    }
    // Multi-row inserts: one statement per 100 records keeps a group commit cheap.
    for chunk in records.chunks(100) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO audit_events (chain, seq, id, occurred_at, actor_kind, actor_id, actor_name, action, \
             resource_type, resource_id, outcome, status, request_id, client_ip, user_agent, details, prev_hash, hash) ",
        );
        insert.push_values(chunk, |mut row, record| {
            let e = &record.entry;
            row.push_bind(e.chain.clone())
                .push_bind(record.seq as i64)
                .push_bind(e.id.as_uuid())
                .push_bind(micros(e.occurred_at))
                .push_bind(e.actor_kind.as_str())
                .push_bind(e.actor_id.clone())
                .push_bind(e.actor_name.clone())
                .push_bind(e.action)
                .push_bind(e.resource_type.clone())
                .push_bind(e.resource_id.clone())
                .push_bind(e.outcome.as_str())
                .push_bind(e.status as i64)
                .push_bind(e.request_id.clone())
                .push_bind(e.client_ip.clone())
                .push_bind(e.user_agent.clone())
                .push_bind(e.details.clone())
                .push_bind(record.prev_hash.to_vec())
                .push_bind(record.hash.to_vec());
        });
        insert.build().execute(&mut *conn).await.map_err(map_err)?;
    }
    for (chain, (seq, hash)) in heads {
        sqlx::query("UPDATE audit_heads SET seq = ?1, hash = ?2 WHERE chain = ?3")
            .bind(seq as i64)
            .bind(&hash[..])
            .bind(chain)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
    }
    metrics::counter!("paygate_audit_records_total").increment(records.len() as u64);
    Ok(records)
}

fn checkpoint_from_row(row: &SqliteRow) -> StoreResult<Checkpoint> {
    let hash: Vec<u8> = get(row, "hash")?;
    let seq: i64 = get(row, "seq")?;
    Ok(Checkpoint {
        chain: get(row, "chain")?,
        seq: seq as u64,
        hash: hash.try_into().map_err(|_| corrupt("checkpoint hash", "length"))?,
        signed_at: from_micros(get(row, "signed_at")?)?,
        key_id: get(row, "key_id")?,
        signature: get(row, "signature")?,
    })
}

impl SqliteStore {
    async fn audit_query(
        &self,
        chain: &str,
        filter: &AuditFilter,
        after_seq: Option<u64>,
        before_seq: Option<u64>,
        newest_first: bool,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = ?1 \
             AND (?2 IS NULL OR action = ?2) AND (?3 IS NULL OR actor_id = ?3) \
             AND (?4 IS NULL OR resource_type = ?4) AND (?5 IS NULL OR resource_id = ?5) \
             AND (?6 IS NULL OR outcome = ?6) AND (?7 IS NULL OR occurred_at >= ?7) \
             AND (?8 IS NULL OR occurred_at < ?8) AND seq > ?9 AND seq < ?10 \
             ORDER BY seq {} LIMIT ?11",
            if newest_first { "DESC" } else { "ASC" }
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(chain)
            .bind(&filter.action)
            .bind(&filter.actor_key_id)
            .bind(&filter.resource_type)
            .bind(&filter.resource_id)
            .bind(filter.outcome.map(|o| o.as_str()))
            .bind(filter.from.map(micros))
            .bind(filter.to.map(micros))
            .bind(after_seq.unwrap_or(0) as i64)
            .bind(before_seq.map(|b| b as i64).unwrap_or(i64::MAX))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(audit_from_row).collect()
    }
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

    async fn create_api_key(&self, scope: &CompanyScope, new: NewApiKey, audit: &AuditEntry) -> StoreResult<ApiKey> {
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
        let key = new.into_key(company_id, None);
        events::commit_with_events(tx, audit, vec![NewEvent::api_key(EventType::ApiKeyCreated, &key, None)]).await?;
        Ok(key)
    }

    async fn revoke_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        self.revoke(Some(scope.company_id()), id, at, audit).await
    }

    async fn revoke_all_api_keys(
        &self,
        scope: &CompanyScope,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let revoked: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE api_keys SET revoked_at = ? WHERE company_id = ? AND revoked_at IS NULL RETURNING id",
        )
        .bind(micros(at))
        .bind(scope.company_id().as_uuid())
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        bump_auth_revision(&mut tx).await?;
        let mut events = Vec::with_capacity(revoked.len());
        for id in &revoked {
            if let Some(key) = scoped_key(&mut tx, Some(scope.company_id()), ApiKeyId::from_uuid(*id)).await? {
                events.push(NewEvent::api_key_revoked(&key, at));
            }
        }
        events::commit_with_events(tx, audit, events).await?;
        Ok(revoked.len() as u64)
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
        let new = new.into_key(company_id, Some(id));
        let events = vec![
            NewEvent::api_key(EventType::ApiKeyCreated, &new, None),
            NewEvent::api_key(EventType::ApiKeyRotated, &old, None),
        ];
        events::commit_with_events(tx, audit, events).await?;
        Ok(Rotation::Rotated { old: Box::new(old), new: Box::new(new) })
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

    async fn append_audit(&self, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let records = append_in(&mut tx, entries).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(records)
    }

    async fn list_audit(
        &self,
        scope: &CompanyScope,
        filter: &AuditFilter,
        page: PageRequest<u64>,
    ) -> StoreResult<Page<AuditRecord>> {
        let chain = scope.company_id().to_string();
        let rows = self.audit_query(&chain, filter, None, page.after, true, page.limit + 1).await?;
        Ok(Page::from_overfetch(rows, page.limit))
    }

    async fn get_audit(&self, scope: &CompanyScope, id: AuditEventId) -> StoreResult<Option<AuditRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE id = ?1 AND chain = ?2"
        )))
        .bind(id.as_uuid())
        .bind(scope.company_id().to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(audit_from_row).transpose()
    }

    async fn export_audit(
        &self,
        scope: &CompanyScope,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>> {
        let filter = AuditFilter { from, to, ..AuditFilter::default() };
        self.audit_query(&scope.company_id().to_string(), &filter, Some(after_seq), None, false, limit).await
    }

    async fn audit_head(&self, scope: &CompanyScope) -> StoreResult<Option<(u64, [u8; 32])>> {
        let row = sqlx::query("SELECT seq, hash FROM audit_heads WHERE chain = ?1 AND seq > 0")
            .bind(scope.company_id().to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let seq: i64 = get(&row, "seq")?;
        let hash: Vec<u8> = get(&row, "hash")?;
        Ok(Some((seq as u64, hash.try_into().map_err(|_| corrupt("audit head", "length"))?)))
    }

    async fn latest_checkpoint(&self, scope: &CompanyScope) -> StoreResult<Option<Checkpoint>> {
        let row = sqlx::query(
            "SELECT chain, seq, hash, signed_at, key_id, signature FROM audit_checkpoints WHERE chain = ?1 \
             ORDER BY seq DESC, signed_at DESC LIMIT 1",
        )
        .bind(scope.company_id().to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(checkpoint_from_row).transpose()
    }

    async fn approval_policy(&self, scope: &CompanyScope, mode: KeyMode) -> StoreResult<ApprovalPolicy> {
        self.approval_policy_of(scope, mode).await
    }

    async fn set_approval_policy(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        policy: &ApprovalPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        self.write_approval_policy(scope, mode, policy, audit).await
    }

    async fn create_payee(&self, scope: &CompanyScope, new: &NewPayee, audit: &AuditEntry) -> StoreResult<()> {
        self.insert_payee(scope, new, audit).await
    }

    async fn list_payees(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        status: Option<PayeeStatus>,
        page: PageRequest<PayeeId>,
    ) -> StoreResult<Page<Payee>> {
        self.payees_page(scope, mode, status, page).await
    }

    async fn get_payee(&self, scope: &CompanyScope, mode: KeyMode, id: PayeeId) -> StoreResult<Option<Payee>> {
        self.find_payee(scope, mode, id).await
    }

    async fn payee_sealed_account(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.sealed_account(scope, mode, id).await
    }

    async fn disable_payee(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Payee>> {
        self.disable(scope, mode, id, at, audit).await
    }

    async fn create_payments(&self, items: &[PaymentCreate]) -> StoreResult<Vec<PaymentCreated>> {
        self.create_payment_batch(items).await
    }

    async fn idempotent_response(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        key: &str,
    ) -> StoreResult<Option<StoredResponse>> {
        self.find_stored_response(scope, mode, key).await
    }

    async fn get_payment(&self, scope: &CompanyScope, mode: KeyMode, id: PaymentId) -> StoreResult<Option<Payment>> {
        self.find_payment(scope, mode, id).await
    }

    async fn list_payments(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &PaymentFilter,
        page: PageRequest<PaymentId>,
    ) -> StoreResult<Page<Payment>> {
        self.payments_page(scope, mode, filter, page).await
    }

    async fn update_payment(
        &self,
        scope: &CompanyScope,
        payment: &Payment,
        expected_revision: u32,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.replace_payment(scope, payment, expected_revision, audit).await
    }

    async fn list_events(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &EventFilter,
        page: PageRequest<EventId>,
    ) -> StoreResult<Page<Event>> {
        self.events_page(scope, mode, filter, page).await
    }

    async fn get_event(&self, scope: &CompanyScope, mode: KeyMode, id: EventId) -> StoreResult<Option<Event>> {
        self.find_event(scope, mode, id).await
    }

    async fn create_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        new: &NewWebhookEndpoint,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.insert_endpoint(scope, new, audit).await
    }

    async fn list_webhook_endpoints(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        page: PageRequest<WebhookEndpointId>,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        self.endpoints_page(scope, mode, page).await
    }

    async fn get_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.find_endpoint(scope, mode, id).await
    }

    async fn update_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        patch: &EndpointPatch,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.patch_endpoint(scope, mode, id, patch, audit).await
    }

    async fn delete_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.remove_endpoint(scope, mode, id, audit).await
    }

    async fn rotate_webhook_secret(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        new_sealed: &[u8],
        previous_expires_at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.rotate_secret(scope, mode, id, new_sealed, previous_expires_at, audit).await
    }

    async fn send_test_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Event>> {
        self.test_event(scope, mode, id, audit).await
    }

    async fn redeliver_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: EventId,
        endpoint: Option<WebhookEndpointId>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<u32>> {
        self.redeliver(scope, mode, id, endpoint, audit).await
    }

    async fn list_deliveries(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        endpoint: WebhookEndpointId,
        page: PageRequest<WebhookDeliveryId>,
    ) -> StoreResult<Option<Page<Delivery>>> {
        self.deliveries_page(scope, mode, endpoint, page).await
    }
}

#[async_trait]
impl OperatorStore for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Internal(format!("migration failed: {e}")))
    }

    async fn create_company(&self, new: NewCompany, audit: &AuditEntry) -> StoreResult<Company> {
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
        commit_change(tx, audit).await?;
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

    async fn set_company_status(
        &self,
        id: CompanyId,
        status: CompanyStatus,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>> {
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
        commit_change(tx, audit).await?;
        self.find_company(id).await
    }

    async fn set_key_policy(
        &self,
        id: CompanyId,
        policy: KeyPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>> {
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
        if changed == 0 {
            return Ok(None);
        }
        commit_change(tx, audit).await?;
        self.find_company(id).await
    }

    async fn set_key_rate_limit(
        &self,
        id: ApiKeyId,
        limit: Option<RateLimitOverride>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
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
        commit_change(tx, audit).await?;
        Ok(key)
    }

    async fn set_company_rate_limit(
        &self,
        id: CompanyId,
        limit: Option<RateLimitOverride>,
        audit: &AuditEntry,
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
        commit_change(tx, audit).await?;
        self.find_company(id).await
    }

    async fn revoke_api_key_by_id(
        &self,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        self.revoke(None, id, at, audit).await
    }

    async fn due_payments(&self, now: OffsetDateTime, limit: u32) -> StoreResult<Vec<(CompanyId, Payment)>> {
        self.due(now, limit).await
    }

    async fn purge_idempotency(&self, now: OffsetDateTime) -> StoreResult<u64> {
        self.purge_idempotency_before(now).await
    }

    async fn audit_chains(&self) -> StoreResult<Vec<String>> {
        // Every chain any table knows of: a chain whose head row went missing
        // is still verified.
        sqlx::query_scalar(
            "SELECT chain FROM audit_heads UNION SELECT DISTINCT chain FROM audit_events \
             UNION SELECT DISTINCT chain FROM audit_checkpoints ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn audit_records(&self, chain: &str, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        )))
        .bind(chain)
        .bind(after_seq as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_checkpoints(&self, chain: &str) -> StoreResult<Vec<Checkpoint>> {
        let rows = sqlx::query(
            "SELECT chain, seq, hash, signed_at, key_id, signature FROM audit_checkpoints WHERE chain = ?1 ORDER BY seq",
        )
        .bind(chain)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(checkpoint_from_row).collect()
    }

    async fn add_checkpoint(&self, checkpoint: &Checkpoint) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (chain, seq, hash, signed_at, key_id, signature) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&checkpoint.chain)
        .bind(checkpoint.seq as i64)
        .bind(&checkpoint.hash[..])
        .bind(micros(checkpoint.signed_at))
        .bind(&checkpoint.key_id)
        .bind(&checkpoint.signature)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn checkpointed_seqs(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT chain, MAX(seq) FROM audit_checkpoints GROUP BY chain")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(|(c, s)| (c, s as u64)).collect())
    }

    async fn audit_heads(&self) -> StoreResult<Vec<(String, u64, [u8; 32])>> {
        let rows = sqlx::query("SELECT chain, seq, hash FROM audit_heads WHERE seq > 0 ORDER BY chain")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = get(row, "seq")?;
                let hash: Vec<u8> = get(row, "hash")?;
                Ok((get(row, "chain")?, seq as u64, hash.try_into().map_err(|_| corrupt("audit head", "length"))?))
            })
            .collect()
    }

    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        self.claim(now, owner, lease_until, limit).await
    }

    async fn finish_delivery(
        &self,
        result: &DeliveryResult,
        audit: &AuditEntry,
        disable_audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.finish(result, audit, disable_audit).await
    }

    async fn expiring_keys(&self, now: OffsetDateTime, until: OffsetDateTime, limit: u32) -> StoreResult<Vec<ApiKey>> {
        self.keys_expiring(now, until, limit).await
    }

    async fn note_key_expiring(&self, id: ApiKeyId, audit: &AuditEntry) -> StoreResult<bool> {
        self.note_expiring(id, audit).await
    }
}

impl SqliteStore {
    async fn revoke(
        &self,
        company: Option<CompanyId>,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
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
        let Some(key) = scoped_key(&mut tx, company, id).await? else { return Ok(None) };
        // Revoking twice changes nothing, and tells nobody again.
        let events = if changed > 0 { vec![NewEvent::api_key_revoked(&key, at)] } else { vec![] };
        events::commit_with_events(tx, audit, events).await?;
        Ok(Some(key))
    }
}
