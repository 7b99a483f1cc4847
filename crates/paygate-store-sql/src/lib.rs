//! Paygate's storage, written once for both databases.
//!
//! Every query and transaction of the store traits lives here, over a small
//! seam, [`Dialect`], that each backend crate implements: how to connect and
//! migrate, how to run a statement and read a column, which row locks exist,
//! the multi-row insert form, and the delivery claim (the one statement whose
//! locking differs in shape). Statements use `$1, $2, …` placeholders on both
//! databases and bind [`Value`]s, so a time or a boolean is encoded the way its
//! backend stores it without the SQL knowing.
//!
//! Company data is reached only through [`Sql::company`] and [`Sql::tenant`],
//! which take the [`CompanyScope`] and write the filter themselves.

mod audit;
mod events;
mod keys;
mod operator;
mod payments;

use std::borrow::Cow;
use std::future::Future;
use std::ops::{Deref, DerefMut};

use async_trait::async_trait;
use paygate_store::{Backend, CompanyScope, Store, StoreError, StoreResult};
use time::OffsetDateTime;
use uuid::Uuid;

/// A bound parameter or a read column, typed even when null (PostgreSQL
/// wants a type for every parameter).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uuid(Option<Uuid>),
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
    Time(Option<OffsetDateTime>),
    Bytes(Option<Vec<u8>>),
}

/// The type of a [`Value`], asked of a column when it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Uuid,
    Text,
    Int,
    Bool,
    Time,
    Bytes,
}

impl Value {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Uuid(_) => Kind::Uuid,
            Self::Text(_) => Kind::Text,
            Self::Int(_) => Kind::Int,
            Self::Bool(_) => Kind::Bool,
            Self::Time(_) => Kind::Time,
            Self::Bytes(_) => Kind::Bytes,
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident $(via $conv:expr)?),* $(,)?) => {
        $(
            impl From<$t> for Value {
                fn from(v: $t) -> Self {
                    Value::$variant(Some(value_from!(@conv v $(, $conv)?)))
                }
            }
            impl From<Option<$t>> for Value {
                fn from(v: Option<$t>) -> Self {
                    Value::$variant(v.map(|v| value_from!(@conv v $(, $conv)?)))
                }
            }
        )*
    };
    (@conv $v:ident) => { $v };
    (@conv $v:ident, $conv:expr) => { ($conv)($v) };
}

value_from! {
    Uuid => Uuid,
    String => Text,
    &str => Text via str::to_owned,
    &String => Text via String::clone,
    i64 => Int,
    bool => Bool,
    OffsetDateTime => Time,
    Vec<u8> => Bytes,
    &[u8] => Bytes via <[u8]>::to_vec,
}

/// A column type the shared code reads.
pub trait FromValue: Sized {
    const KIND: Kind;
    fn from_value(v: Value) -> Result<Self, String>;
}

macro_rules! from_value {
    ($($t:ty => $variant:ident),* $(,)?) => {
        $(
            impl FromValue for Option<$t> {
                const KIND: Kind = Kind::$variant;
                fn from_value(v: Value) -> Result<Self, String> {
                    match v {
                        Value::$variant(v) => Ok(v),
                        other => Err(format!("expected {:?}, found {:?}", Kind::$variant, other.kind())),
                    }
                }
            }
            impl FromValue for $t {
                const KIND: Kind = Kind::$variant;
                fn from_value(v: Value) -> Result<Self, String> {
                    Option::<$t>::from_value(v)?.ok_or_else(|| "unexpected NULL".to_owned())
                }
            }
        )*
    };
}

from_value! { Uuid => Uuid, String => Text, i64 => Int, bool => Bool, OffsetDateTime => Time, Vec<u8> => Bytes }

macro_rules! from_int {
    ($($t:ty),*) => {
        $(
            impl FromValue for $t {
                const KIND: Kind = Kind::Int;
                fn from_value(v: Value) -> Result<Self, String> {
                    <$t>::try_from(i64::from_value(v)?).map_err(|e| e.to_string())
                }
            }
            impl FromValue for Option<$t> {
                const KIND: Kind = Kind::Int;
                fn from_value(v: Value) -> Result<Self, String> {
                    Option::<i64>::from_value(v)?.map(|n| <$t>::try_from(n).map_err(|e| e.to_string())).transpose()
                }
            }
        )*
    };
}

from_int!(u64, u32, u16);

/// One statement and its parameters.
#[derive(Debug, Clone)]
pub struct Sql {
    pub text: Cow<'static, str>,
    pub args: Vec<Value>,
}

impl Sql {
    pub fn new(text: impl Into<Cow<'static, str>>) -> Self {
        Self { text: text.into(), args: Vec::new() }
    }

    pub fn bind(mut self, value: impl Into<Value>) -> Self {
        self.args.push(value.into());
        self
    }

    /// A statement on the scope's company: `{company}` stands for
    /// `company_id = $1` (prefix it with a table alias as needed), and the
    /// statement's own parameters start at `$2`.
    pub fn company(scope: &CompanyScope, text: &str) -> Self {
        Self::new(scoped(text, "{company}", "company_id = $1")).bind(scope.company_id().as_uuid())
    }

    /// A statement on the scope's company row itself: `{company}` stands for `id = $1`.
    pub fn company_row(scope: &CompanyScope, text: &str) -> Self {
        Self::new(scoped(text, "{company}", "id = $1")).bind(scope.company_id().as_uuid())
    }

    /// A statement on the scope's company and mode: `{tenant}` stands for
    /// `company_id = $1 AND mode = $2`, and the statement's own parameters
    /// start at `$3`.
    pub fn tenant(scope: &CompanyScope, text: &str) -> Self {
        Self::new(scoped(text, "{tenant}", "company_id = $1 AND mode = $2"))
            .bind(scope.company_id().as_uuid())
            .bind(scope.mode().as_str())
    }
}

fn scoped(text: &str, token: &str, filter: &str) -> String {
    // A scoped statement that forgot its filter is a tenancy bug, not a typo.
    assert!(text.contains(token), "a scoped statement must contain {token}: {text}");
    text.replace(token, filter)
}

/// A row as the backend returned it; columns decode through the dialect.
pub struct Row<D: Dialect>(pub D::Row);

impl<D: Dialect> Row<D> {
    pub fn get<T: FromValue>(&self, col: &str) -> StoreResult<T> {
        let value = D::value(&self.0, col, T::KIND)?;
        T::from_value(value).map_err(|e| StoreError::corrupt(&format!("column {col}"), e))
    }

    /// A 32-byte hash column.
    pub fn hash(&self, col: &str) -> StoreResult<[u8; 32]> {
        self.get::<Vec<u8>>(col)?.try_into().map_err(|_| StoreError::corrupt(col, "length"))
    }
}

/// Row locks a read-then-write transaction takes (PostgreSQL's names). A
/// dialect without row locks (SQLite: one writer at a time) answers "".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    Update,
    NoKeyUpdate,
    Share,
    KeyShare,
}

/// What differs between the databases. Everything else is in this crate.
pub trait Dialect: Send + Sync + Sized + 'static {
    type Conn: Send;
    /// A write transaction.
    type Tx: DerefMut<Target = Self::Conn> + Send;
    /// A pooled connection for reads.
    type Pooled: DerefMut<Target = Self::Conn> + Send;
    type Row: Send + Sync;

    const BACKEND: Backend;
    /// Whether the database locks rows. Statements that only take a lock run
    /// only where it does.
    const ROW_LOCKS: bool;
    /// `f(haystack, needle)`: the needle's position, 0 when absent.
    const STRPOS: &'static str;

    fn connect(url: &str) -> impl Future<Output = StoreResult<Self>> + Send;
    fn migrate(&self) -> impl Future<Output = StoreResult<()>> + Send;
    fn acquire(&self) -> impl Future<Output = StoreResult<Self::Pooled>> + Send;
    /// A write transaction (SQLite takes the write lock up front).
    fn begin(&self) -> impl Future<Output = StoreResult<Self::Tx>> + Send;
    fn commit(tx: Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;

    fn fetch_all(conn: &mut Self::Conn, sql: Sql) -> impl Future<Output = StoreResult<Vec<Self::Row>>> + Send;
    fn fetch_optional(conn: &mut Self::Conn, sql: Sql) -> impl Future<Output = StoreResult<Option<Self::Row>>> + Send;
    /// Rows affected.
    fn execute(conn: &mut Self::Conn, sql: Sql) -> impl Future<Output = StoreResult<u64>> + Send;
    /// Column `col` of `row`, decoded as `kind`.
    fn value(row: &Self::Row, col: &str, kind: Kind) -> StoreResult<Value>;

    /// The clause that takes `lock` on the rows a `SELECT` reads ("" if none).
    fn lock(lock: Lock) -> &'static str;

    /// Inserts `rows` (one value per column of `into`: `table (col, …)`) in as
    /// few statements as the database does well; `tail` (`ON CONFLICT …`,
    /// `RETURNING …`) ends each statement and the returned rows are collected.
    fn insert_rows(
        conn: &mut Self::Conn,
        into: &'static str,
        rows: Vec<Vec<Value>>,
        tail: &'static str,
    ) -> impl Future<Output = StoreResult<Vec<Self::Row>>> + Send;

    /// The auth revision, read on a connection of its own so that a pool
    /// exhausted by requests cannot starve the revocation signal.
    fn auth_revision(&self) -> impl Future<Output = StoreResult<i64>> + Send;

    /// Leases due deliveries (see `OperatorStore::claim_deliveries`) and returns
    /// the rows [`events`] decodes into jobs.
    fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<Self::Row>>> + Send;

    /// A statement run first in an audit batch's transaction, if any.
    const AUDIT_BATCH_SETUP: Option<&'static str> = None;
}

/// Helpers over a connection, so the queries read as `all(c, sql)`.
pub async fn all<D: Dialect>(conn: &mut D::Conn, sql: Sql) -> StoreResult<Vec<Row<D>>> {
    Ok(D::fetch_all(conn, sql).await?.into_iter().map(Row).collect())
}

pub async fn optional<D: Dialect>(conn: &mut D::Conn, sql: Sql) -> StoreResult<Option<Row<D>>> {
    Ok(D::fetch_optional(conn, sql).await?.map(Row))
}

pub async fn one<D: Dialect>(conn: &mut D::Conn, sql: Sql) -> StoreResult<Row<D>> {
    optional(conn, sql).await?.ok_or_else(|| StoreError::Internal("a statement returned no row".into()))
}

pub async fn execute<D: Dialect>(conn: &mut D::Conn, sql: Sql) -> StoreResult<u64> {
    D::execute(conn, sql).await
}

/// The store of both backends: `SqlStore<SqliteDialect>`, `SqlStore<PostgresDialect>`.
pub struct SqlStore<D: Dialect> {
    db: D,
}

impl<D: Dialect> SqlStore<D> {
    /// Connects to the database at `url` (the backend's URL scheme).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Ok(Self { db: D::connect(url).await? })
    }

    pub fn from_dialect(db: D) -> Self {
        Self { db }
    }

    pub fn dialect(&self) -> &D {
        &self.db
    }

    async fn read(&self) -> StoreResult<D::Pooled> {
        self.db.acquire().await
    }

    /// Rows from a pooled connection.
    async fn read_all(&self, sql: Sql) -> StoreResult<Vec<Row<D>>> {
        all::<D>(&mut *self.read().await?, sql).await
    }

    async fn read_optional(&self, sql: Sql) -> StoreResult<Option<Row<D>>> {
        optional::<D>(&mut *self.read().await?, sql).await
    }
}

impl<D: Dialect + Clone> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        Self { db: self.db.clone() }
    }
}

/// The backend's own methods (its pool, for tests) through the store.
impl<D: Dialect> Deref for SqlStore<D> {
    type Target = D;
    fn deref(&self) -> &D {
        &self.db
    }
}

#[async_trait]
impl<D: Dialect> Store for SqlStore<D> {
    fn backend(&self) -> Backend {
        D::BACKEND
    }

    async fn ping(&self) -> StoreResult<()> {
        execute::<D>(&mut *self.read().await?, Sql::new("SELECT 1")).await?;
        Ok(())
    }
}

/// `Uuid::max()` when there is no cursor: one statement for the first page and the next.
fn cursor(after: Option<Uuid>) -> Uuid {
    after.unwrap_or(Uuid::max())
}

/// `limit + 1` rows, to tell whether there is a next page.
fn overfetch(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// `IN (…)` with one placeholder per value, numbered from `$first`.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}
