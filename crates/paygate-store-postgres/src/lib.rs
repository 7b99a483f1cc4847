//! Paygate storage on PostgreSQL: connection setup, migrations, and the
//! dialect the shared SQL of `paygate-store-sql` runs over. Many `paygate
//! serve` nodes share one database; nothing here depends on node-local state.
//! Read-then-write transactions lock the rows they decide on (`FOR UPDATE` and
//! its weaker forms, through [`Dialect::lock`]).

#[cfg(feature = "testing")]
pub mod testing;

use std::str::FromStr;
use std::time::Duration;

use paygate_store::{Backend, MAX_IN_FLIGHT_PER_ENDPOINT, StoreError, StoreResult};
use paygate_store_sql::{Dialect, Kind, Lock, Sql, SqlStore, Value};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Arguments, PgConnection, PgPool, Postgres, Row};
use time::OffsetDateTime;
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The store on PostgreSQL.
pub type PostgresStore = SqlStore<PostgresDialect>;

#[derive(Clone)]
pub struct PostgresDialect {
    pool: PgPool,
    /// One connection of its own for the auth revision poll, so a pool
    /// exhausted by requests cannot starve the revocation signal.
    signal_pool: PgPool,
}

impl PostgresDialect {
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // Connection exceptions and operator intervention (shutdown, cancel).
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57")),
        _ => false,
    };
    if unavailable { StoreError::Unavailable(Box::new(e)) } else { StoreError::Internal(Box::new(e)) }
}

fn arguments(values: Vec<Value>) -> StoreResult<PgArguments> {
    let mut args = PgArguments::default();
    for value in values {
        let added = match value {
            Value::Uuid(v) => args.add(v),
            Value::Text(v) => args.add(v),
            Value::Int(v) => args.add(v),
            Value::Bool(v) => args.add(v),
            Value::Time(v) => args.add(v),
            Value::Bytes(v) => args.add(v),
        };
        added.map_err(StoreError::Internal)?;
    }
    Ok(args)
}

fn query(sql: Sql) -> StoreResult<sqlx::query::Query<'static, Postgres, PgArguments>> {
    Ok(sqlx::query_with(sqlx::AssertSqlSafe(sql.text), arguments(sql.args)?))
}

fn get<'r, T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>>(row: &'r PgRow, col: &str) -> StoreResult<T> {
    row.try_get(col).map_err(|e| StoreError::Internal(Box::new(e)))
}

/// One column of a multi-row insert, as the array `UNNEST` takes.
enum Column {
    Uuid(Vec<Option<Uuid>>),
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<Option<bool>>),
    Time(Vec<Option<OffsetDateTime>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn of(kind: Kind, len: usize) -> Self {
        match kind {
            Kind::Uuid => Self::Uuid(Vec::with_capacity(len)),
            Kind::Text => Self::Text(Vec::with_capacity(len)),
            Kind::Int => Self::Int(Vec::with_capacity(len)),
            Kind::Bool => Self::Bool(Vec::with_capacity(len)),
            Kind::Time => Self::Time(Vec::with_capacity(len)),
            Kind::Bytes => Self::Bytes(Vec::with_capacity(len)),
        }
    }

    fn push(&mut self, value: Value) -> StoreResult<()> {
        match (self, value) {
            (Self::Uuid(c), Value::Uuid(v)) => c.push(v),
            (Self::Text(c), Value::Text(v)) => c.push(v),
            (Self::Int(c), Value::Int(v)) => c.push(v),
            (Self::Bool(c), Value::Bool(v)) => c.push(v),
            (Self::Time(c), Value::Time(v)) => c.push(v),
            (Self::Bytes(c), Value::Bytes(v)) => c.push(v),
            (_, v) => return Err(StoreError::Internal(format!("mixed column types in one insert: {v:?}").into())),
        }
        Ok(())
    }

    fn array_type(&self) -> &'static str {
        match self {
            Self::Uuid(_) => "uuid[]",
            Self::Text(_) => "text[]",
            Self::Int(_) => "bigint[]",
            Self::Bool(_) => "boolean[]",
            Self::Time(_) => "timestamptz[]",
            Self::Bytes(_) => "bytea[]",
        }
    }

    fn bind(self, args: &mut PgArguments) -> StoreResult<()> {
        match self {
            Self::Uuid(c) => args.add(c),
            Self::Text(c) => args.add(c),
            Self::Int(c) => args.add(c),
            Self::Bool(c) => args.add(c),
            Self::Time(c) => args.add(c),
            Self::Bytes(c) => args.add(c),
        }
        .map_err(StoreError::Internal)
    }
}

impl Dialect for PostgresDialect {
    type Conn = PgConnection;
    type Tx = sqlx::Transaction<'static, Postgres>;
    type Pooled = sqlx::pool::PoolConnection<Postgres>;
    type Row = PgRow;

    const BACKEND: Backend = Backend::Postgres;
    const ROW_LOCKS: bool = true;
    const STRPOS: &'static str = "strpos";
    // A batch never waits long for a chain head: requests are waiting on it.
    const AUDIT_BATCH_SETUP: Option<&'static str> = Some("SET LOCAL lock_timeout = '2s'");

    async fn connect(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("invalid PostgreSQL URL: {e}").into()))?
            .application_name("paygate");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(map_err)?;
        let signal_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(500))
            .connect_with(options)
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
        self.pool.begin().await.map_err(map_err)
    }

    async fn commit(tx: Self::Tx) -> StoreResult<()> {
        tx.commit().await.map_err(map_err)
    }

    async fn fetch_all(conn: &mut PgConnection, sql: Sql) -> StoreResult<Vec<PgRow>> {
        query(sql)?.fetch_all(conn).await.map_err(map_err)
    }

    async fn fetch_optional(conn: &mut PgConnection, sql: Sql) -> StoreResult<Option<PgRow>> {
        query(sql)?.fetch_optional(conn).await.map_err(map_err)
    }

    async fn execute(conn: &mut PgConnection, sql: Sql) -> StoreResult<u64> {
        Ok(query(sql)?.execute(conn).await.map_err(map_err)?.rows_affected())
    }

    fn value(row: &PgRow, col: &str, kind: Kind) -> StoreResult<Value> {
        Ok(match kind {
            Kind::Uuid => Value::Uuid(get(row, col)?),
            Kind::Text => Value::Text(get(row, col)?),
            // `integer` columns read as i64 too.
            Kind::Int => Value::Int(match row.try_get::<Option<i64>, _>(col) {
                Ok(v) => v,
                Err(_) => get::<Option<i32>>(row, col)?.map(i64::from),
            }),
            Kind::Bool => Value::Bool(get(row, col)?),
            Kind::Time => Value::Time(get(row, col)?),
            Kind::Bytes => Value::Bytes(get(row, col)?),
        })
    }

    fn lock(lock: Lock) -> &'static str {
        match lock {
            Lock::Update => " FOR UPDATE",
            Lock::NoKeyUpdate => " FOR NO KEY UPDATE",
            Lock::Share => " FOR SHARE",
            Lock::KeyShare => " FOR KEY SHARE",
        }
    }

    /// One statement for the whole batch (arrays unnested), whatever its size:
    /// the statement is prepared once per connection, not once per batch size.
    async fn insert_rows(
        conn: &mut PgConnection,
        into: &'static str,
        rows: Vec<Vec<Value>>,
        tail: &'static str,
    ) -> StoreResult<Vec<PgRow>> {
        let Some(first) = rows.first() else { return Ok(Vec::new()) };
        let mut columns: Vec<Column> = first.iter().map(|v| Column::of(v.kind(), rows.len())).collect();
        for row in rows {
            for (column, value) in columns.iter_mut().zip(row) {
                column.push(value)?;
            }
        }
        let arrays: Vec<String> =
            columns.iter().enumerate().map(|(i, c)| format!("${}::{}", i + 1, c.array_type())).collect();
        let text = format!("INSERT INTO {into} SELECT * FROM UNNEST({}){tail}", arrays.join(", "));
        let mut args = PgArguments::default();
        for column in columns {
            column.bind(&mut args)?;
        }
        sqlx::query_with(sqlx::AssertSqlSafe(text), args).fetch_all(conn).await.map_err(map_err)
    }

    async fn auth_revision(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT revision FROM auth_revision WHERE id = 1")
            .fetch_one(&self.signal_pool)
            .await
            .map_err(map_err)
    }

    /// One statement: pick due deliveries (skipping rows another node is
    /// picking right now), lease them, and return what the worker needs. A
    /// row another node leased after this statement's snapshot is re-checked
    /// under its lock and dropped, so no delivery is leased twice.
    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<PgRow>> {
        let sql = Sql::new(
            "WITH busy AS ( \
                 SELECT endpoint_id, COUNT(*) AS leased FROM webhook_deliveries \
                 WHERE status = 'pending' AND lease_until > $1 GROUP BY endpoint_id), \
             candidates AS ( \
                 SELECT d.id, d.next_attempt_at, \
                 ROW_NUMBER() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) \
                     + COALESCE(b.leased, 0) AS slot \
                 FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                 LEFT JOIN busy b ON b.endpoint_id = d.endpoint_id \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
                 AND (d.lease_until IS NULL OR d.lease_until <= $1) AND w.enabled \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id \
                     AND p.object_id = d.object_id AND p.status = 'pending' \
                     AND (p.sequence < d.sequence OR (p.sequence = d.sequence AND p.id < d.id) \
                          OR p.lease_until > $1))), \
             picked AS MATERIALIZED ( \
                 SELECT d.id FROM webhook_deliveries d JOIN candidates c ON c.id = d.id WHERE c.slot <= $5 \
                 ORDER BY c.next_attempt_at, c.id LIMIT $2 \
                 FOR UPDATE OF d SKIP LOCKED), \
             leased AS ( \
                 UPDATE webhook_deliveries d SET lease_owner = $3, lease_until = $4 FROM picked \
                 WHERE d.id = picked.id AND d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until <= $1) \
                 RETURNING d.id, d.endpoint_id, d.event_id, d.attempts, d.next_attempt_at) \
             SELECT l.id, l.endpoint_id, l.attempts, w.url, w.secret_sealed, \
             CASE WHEN w.previous_secret_expires_at > $1 THEN w.previous_secret_sealed END AS previous_secret_sealed, \
             e.id AS event_id, e.company_id, e.mode, e.type, e.object_id, e.sequence, e.previous_status, e.object, \
             e.created_at \
             FROM leased l JOIN webhook_endpoints w ON w.id = l.endpoint_id JOIN events e ON e.id = l.event_id \
             ORDER BY l.next_attempt_at, l.id",
        )
        .bind(now)
        .bind(i64::from(limit))
        .bind(owner)
        .bind(lease_until)
        .bind(i64::from(MAX_IN_FLIGHT_PER_ENDPOINT));
        Self::fetch_all(&mut *self.acquire().await?, sql).await
    }
}
