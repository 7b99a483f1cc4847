//! Paygate storage on one SQLite file: connection setup, migrations, and the
//! dialect the shared SQL of `paygate-store-sql` runs over.
//!
//! Every connection runs WAL with `synchronous=FULL` and foreign keys on; every
//! write transaction starts with `BEGIN IMMEDIATE` so it takes the write lock up
//! front and honours the busy timeout (a deferred transaction that upgrades to a
//! write fails at once when another writer is active). A CLI process and the
//! server share the file safely. One writer at a time also means there are no
//! row locks: the shared code's lock clauses are empty here.

use std::str::FromStr;
use std::time::Duration;

use paygate_store::{Backend, MAX_IN_FLIGHT_PER_ENDPOINT, StoreError, StoreResult};
use paygate_store_sql::{Dialect, Kind, Lock, Sql, SqlStore, Value};
use sqlx::sqlite::SqliteSynchronous;
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Arguments, Row, Sqlite, SqliteConnection, SqlitePool};
use time::OffsetDateTime;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The store on SQLite.
pub type SqliteStore = SqlStore<SqliteDialect>;

#[derive(Clone)]
pub struct SqliteDialect {
    pool: SqlitePool,
    /// One connection of its own for the auth revision poll, so a pool
    /// exhausted by requests cannot starve the revocation signal.
    signal_pool: SqlitePool,
}

impl SqliteDialect {
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db.message().contains("database is locked"),
        _ => false,
    };
    if unavailable { StoreError::Unavailable(Box::new(e)) } else { StoreError::Internal(Box::new(e)) }
}

/// Times are stored as microseconds since the epoch.
fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(m: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(m) * 1_000).map_err(|e| StoreError::corrupt("time", e))
}

fn arguments(values: Vec<Value>) -> StoreResult<SqliteArguments> {
    let mut args = SqliteArguments::default();
    for value in values {
        let added = match value {
            Value::Uuid(v) => args.add(v),
            Value::Text(v) => args.add(v),
            Value::Int(v) => args.add(v),
            Value::Bool(v) => args.add(v),
            Value::Time(v) => args.add(v.map(micros)),
            Value::Bytes(v) => args.add(v),
        };
        added.map_err(StoreError::Internal)?;
    }
    Ok(args)
}

fn query(sql: Sql) -> StoreResult<sqlx::query::Query<'static, Sqlite, SqliteArguments>> {
    Ok(sqlx::query_with(sqlx::AssertSqlSafe(sql.text), arguments(sql.args)?))
}

fn get<'r, T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>>(row: &'r SqliteRow, col: &str) -> StoreResult<T> {
    row.try_get(col).map_err(|e| StoreError::Internal(Box::new(e)))
}

impl Dialect for SqliteDialect {
    type Conn = SqliteConnection;
    type Tx = sqlx::Transaction<'static, Sqlite>;
    type Pooled = sqlx::pool::PoolConnection<Sqlite>;
    type Row = SqliteRow;

    const BACKEND: Backend = Backend::Sqlite;
    const ROW_LOCKS: bool = false;
    const STRPOS: &'static str = "instr";

    /// Opens (creating if missing) the database at `url` (`sqlite://path`).
    async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("invalid SQLite URL: {e}").into()))?
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

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Internal(Box::new(e)))
    }

    async fn acquire(&self) -> StoreResult<Self::Pooled> {
        self.pool.acquire().await.map_err(map_err)
    }

    async fn begin(&self) -> StoreResult<Self::Tx> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)
    }

    async fn commit(tx: Self::Tx) -> StoreResult<()> {
        tx.commit().await.map_err(map_err)
    }

    async fn fetch_all(conn: &mut SqliteConnection, sql: Sql) -> StoreResult<Vec<SqliteRow>> {
        query(sql)?.fetch_all(conn).await.map_err(map_err)
    }

    async fn fetch_optional(conn: &mut SqliteConnection, sql: Sql) -> StoreResult<Option<SqliteRow>> {
        query(sql)?.fetch_optional(conn).await.map_err(map_err)
    }

    async fn execute(conn: &mut SqliteConnection, sql: Sql) -> StoreResult<u64> {
        Ok(query(sql)?.execute(conn).await.map_err(map_err)?.rows_affected())
    }

    fn value(row: &SqliteRow, col: &str, kind: Kind) -> StoreResult<Value> {
        Ok(match kind {
            Kind::Uuid => Value::Uuid(get(row, col)?),
            Kind::Text => Value::Text(get(row, col)?),
            Kind::Int => Value::Int(get(row, col)?),
            Kind::Bool => Value::Bool(get::<Option<i64>>(row, col)?.map(|b| b != 0)),
            Kind::Time => Value::Time(get::<Option<i64>>(row, col)?.map(from_micros).transpose()?),
            Kind::Bytes => Value::Bytes(get(row, col)?),
        })
    }

    fn lock(_: Lock) -> &'static str {
        ""
    }

    /// Multi-row `VALUES`, one statement per 100 rows: a group commit stays cheap.
    async fn insert_rows(
        conn: &mut SqliteConnection,
        into: &'static str,
        rows: Vec<Vec<Value>>,
        tail: &'static str,
    ) -> StoreResult<Vec<SqliteRow>> {
        let mut returned = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<Vec<Value>> = rows.by_ref().take(100).collect();
            let width = chunk[0].len();
            let tuples: Vec<String> = (0..chunk.len())
                .map(|r| {
                    format!("({})", (1..=width).map(|c| format!("${}", r * width + c)).collect::<Vec<_>>().join(", "))
                })
                .collect();
            let sql = Sql {
                text: format!("INSERT INTO {into} VALUES {}{tail}", tuples.join(", ")).into(),
                args: chunk.into_iter().flatten().collect(),
            };
            returned.extend(query(sql)?.fetch_all(&mut *conn).await.map_err(map_err)?);
        }
        Ok(returned)
    }

    async fn auth_revision(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT revision FROM auth_revision WHERE id = 1")
            .fetch_one(&self.signal_pool)
            .await
            .map_err(map_err)
    }

    /// Under the write lock: pick the due deliveries, then lease them.
    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<SqliteRow>> {
        let mut tx = self.begin().await?;
        // Due, enabled, not under a live lease, first in line for its object
        // at its endpoint (no earlier one pending, none of it in flight), and
        // within its endpoint's share: one slow endpoint cannot take every slot.
        let sql = Sql::new(
            "SELECT c.id, c.endpoint_id, c.attempts, w.url, w.secret_sealed, \
             CASE WHEN w.previous_secret_expires_at > $1 THEN w.previous_secret_sealed END AS previous_secret_sealed, \
             e.id AS event_id, e.company_id, e.mode, e.type, e.object_id, e.sequence, e.previous_status, e.object, \
             e.created_at \
             FROM (SELECT d.id, d.endpoint_id, d.event_id, d.attempts, d.next_attempt_at, \
                     ROW_NUMBER() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) \
                       + COALESCE(b.leased, 0) AS rank \
                   FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                   LEFT JOIN (SELECT endpoint_id, COUNT(*) AS leased FROM webhook_deliveries \
                       WHERE status = 'pending' AND lease_until > $1 GROUP BY endpoint_id) b \
                     ON b.endpoint_id = d.endpoint_id \
                   WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
                   AND (d.lease_until IS NULL OR d.lease_until <= $1) AND w.enabled = 1 \
                   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id \
                       AND p.object_id = d.object_id AND p.status = 'pending' \
                       AND (p.sequence < d.sequence OR (p.sequence = d.sequence AND p.id < d.id) \
                            OR p.lease_until > $1))) c \
             JOIN webhook_endpoints w ON w.id = c.endpoint_id \
             JOIN events e ON e.id = c.event_id \
             WHERE c.rank <= $3 \
             ORDER BY c.next_attempt_at, c.id LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .bind(i64::from(MAX_IN_FLIGHT_PER_ENDPOINT));
        let rows = Self::fetch_all(&mut tx, sql).await?;
        for row in &rows {
            let lease = Sql::new("UPDATE webhook_deliveries SET lease_owner = $1, lease_until = $2 WHERE id = $3")
                .bind(owner)
                .bind(lease_until)
                .bind(get::<uuid::Uuid>(row, "id")?);
            Self::execute(&mut tx, lease).await?;
        }
        Self::commit(tx).await?;
        Ok(rows)
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
        Err(e) => Err(StoreError::Unavailable(format!("cannot create {}: {e}", path.display()).into())),
    }
}
