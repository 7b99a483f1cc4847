use std::collections::BTreeMap;
use std::process::Output;
use std::sync::Arc;

use paygate_api::limits::RateLimits;
use paygate_domain::{CompanyId, KeyHasher, KeyMode, Label, ScopeSet};
use paygate_server::app::{self, Server, StartOptions};
use paygate_server::config::Config;
use paygate_store::{Company, NewCompany, OperatorStore};
use paygate_store_postgres::testing::TestDatabase;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_paygate");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one test per backend for each named `async fn(TestApp)`.
#[macro_export]
macro_rules! backend_tests {
    ($($case:ident),+ $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(app) = $crate::harness::TestApp::spawn($crate::harness::Backend::Sqlite).await {
                        $crate::harness::run_case(app, super::$case).await;
                    }
                }
            )+
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(app) = $crate::harness::TestApp::spawn($crate::harness::Backend::Postgres).await {
                        $crate::harness::run_case(app, super::$case).await;
                    }
                }
            )+
        }
    };
}

tokio::task_local! {
    /// The rate limits of every server a case starts, so the case can be
    /// checked afterwards for where its limit decisions were made.
    static STARTED: Arc<std::sync::Mutex<Vec<Arc<RateLimits>>>>;
}

/// Runs one case, then asserts that every server it started with Redis
/// configured made its rate-limit and write-concurrency decisions on Redis: a
/// node that silently fell back to its in-process share would answer the same
/// way and let a Redis-variant case pass without testing Redis. A decision
/// that timed out against a loaded Redis falls back by design, so a few
/// degraded ones are tolerated; Redis must still have made at least nine in
/// ten, and "no Redis configured" decisions must never happen.
pub async fn run_case<F: std::future::Future<Output = ()>>(app: TestApp, case: impl FnOnce(TestApp) -> F) {
    let started = Arc::new(std::sync::Mutex::new(Vec::new()));
    if let Some(server) = &app.server {
        register(&app.env, server, &started);
    }
    STARTED.scope(started.clone(), case(app)).await;
    for limits in started.lock().unwrap().iter() {
        let (rates, caps) = (limits.limiter.tally(), limits.concurrency.tally());
        for (what, tally) in [("rates", rates), ("concurrency", caps)] {
            let total = tally.redis + tally.degraded + tally.in_process;
            assert!(
                tally.in_process == 0 && tally.degraded * 10 <= total && (total == 0 || tally.redis > 0),
                "with Redis configured, {what} decisions were made in process: rates {rates:?}, concurrency {caps:?}"
            );
        }
    }
}

fn register(env: &BTreeMap<String, String>, server: &Server, started: &std::sync::Mutex<Vec<Arc<RateLimits>>>) {
    if env.contains_key("PAYGATE_REDIS_URL") {
        started.lock().unwrap().push(server.state.limits.clone());
    }
}

/// Records a server started inside a case (outside one, nothing to record).
fn register_in_case(env: &BTreeMap<String, String>, server: &Server) {
    let _ = STARTED.try_with(|started| register(env, server, started));
}

/// The PostgreSQL server for tests. Unset: PostgreSQL cases are skipped, except
/// under CI (`CI` set), where a missing URL fails the run instead of passing it
/// without testing anything.
pub fn postgres_url() -> Option<String> {
    let url = std::env::var("PAYGATE_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() && std::env::var_os("CI").is_some() {
        panic!("CI is set but PAYGATE_TEST_POSTGRES_URL is not: PostgreSQL cases would silently pass");
    }
    url
}

/// The Redis server for tests; as for PostgreSQL, required under CI.
pub fn redis_url() -> Option<String> {
    let url = std::env::var("PAYGATE_TEST_REDIS_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() && std::env::var_os("CI").is_some() {
        panic!("CI is set but PAYGATE_TEST_REDIS_URL is not: Redis cases would silently pass");
    }
    url
}

/// An HTTP client for tests (TLS on ring, as the server's own clients).
pub fn http() -> reqwest::Client {
    paygate_server::install_tls_provider();
    reqwest::Client::new()
}

/// A unique, key-safe token for namespacing a test's Redis keys.
pub fn uuid_like() -> String {
    paygate_domain::ApiKeyId::generate().to_string()
}

/// A running server on a fresh database, plus what a test needs to drive it.
pub struct TestApp {
    pub backend: Backend,
    pub base: String,
    pub ops: String,
    pub http: reqwest::Client,
    pub store: Arc<dyn OperatorStore>,
    pub hasher: KeyHasher,
    /// The configuration as environment variables, for CLI subprocesses.
    pub env: BTreeMap<String, String>,
    pub dir: TempDir,
    pub server: Option<Server>,
    _pg: Option<TestDatabase>,
}

impl TestApp {
    /// `None` when the backend is not configured (PostgreSQL without its URL).
    pub async fn spawn(backend: Backend) -> Option<Self> {
        Self::spawn_with(backend, &[]).await
    }

    /// As [`TestApp::spawn`], with extra `PAYGATE_*` settings.
    pub async fn spawn_with(backend: Backend, settings: &[(&str, &str)]) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mut env = BTreeMap::new();
        let mut pg = None;
        match backend {
            Backend::Sqlite => {
                env.insert(
                    "PAYGATE_DATABASE_URL".into(),
                    format!("sqlite://{}", dir.path().join("paygate.db").display()),
                );
            }
            Backend::Postgres => {
                let admin_url = postgres_url()?;
                let db = TestDatabase::create(&admin_url).await;
                env.insert("PAYGATE_DATABASE_URL".into(), db.url.clone());
                let pepper_file = dir.path().join("pepper");
                std::fs::write(&pepper_file, paygate_domain::Pepper::generate_hex().as_bytes()).unwrap();
                env.insert("PAYGATE_KEY_PEPPER_FILE".into(), pepper_file.display().to_string());
                let audit_key = dir.path().join("audit-key");
                std::fs::write(&audit_key, paygate_domain::audit::AuditSigner::generate_hex().as_bytes()).unwrap();
                env.insert("PAYGATE_AUDIT_SIGNING_KEY_FILE".into(), audit_key.display().to_string());
                let data_key = dir.path().join("data-key");
                std::fs::write(&data_key, paygate_domain::Pepper::generate_hex().as_bytes()).unwrap();
                env.insert("PAYGATE_DATA_KEY_FILE".into(), data_key.display().to_string());
                pg = Some(db);
                // PostgreSQL runs with the Redis limiter, SQLite with the in-process one.
                if let Some(redis) = redis_url() {
                    env.insert("PAYGATE_REDIS_URL".into(), redis);
                    env.insert("PAYGATE_REDIS_PREFIX".into(), format!("paygate:test:{}:", uuid_like()));
                }
            }
        }
        env.insert("PAYGATE_LISTEN".into(), "127.0.0.1:0".into());
        env.insert("PAYGATE_OPS_LISTEN".into(), "127.0.0.1:0".into());
        // Many cases poll until a key is refused; each refusal is a failed
        // authentication from 127.0.0.1. The throttle has its own cases
        // (`ratelimit::…`), which set their own allowance.
        env.insert("PAYGATE_AUTH_FAILURE_LIMIT".into(), "100000/1".into());
        // Settlement on the simulated rail within a fraction of a second.
        env.insert("PAYGATE_PAYMENT_WORKER_INTERVAL_MS".into(), "50".into());
        env.insert("PAYGATE_RAIL_SUBMIT_DELAY_MS".into(), "100".into());
        env.insert("PAYGATE_RAIL_SETTLE_DELAY_MS".into(), "100".into());
        // Webhook receivers run on loopback in the test process; deliveries
        // and retries within a fraction of a second.
        env.insert("PAYGATE_WEBHOOK_ALLOWED_NETWORKS".into(), "127.0.0.0/8".into());
        env.insert("PAYGATE_WEBHOOK_WORKER_INTERVAL_MS".into(), "50".into());
        env.insert("PAYGATE_WEBHOOK_RETRY_SCHEDULE".into(), "0s,100ms,200ms,300ms".into());
        env.insert("PAYGATE_WEBHOOK_TIMEOUT_SECS".into(), "2".into());
        env.insert("PAYGATE_WEBHOOK_CONNECT_TIMEOUT_SECS".into(), "1".into());
        for (k, v) in settings {
            env.insert(k.to_string(), v.to_string());
        }
        let config = Config::from_sources(None, env.clone()).unwrap();
        let server = app::start(&config, StartOptions::default()).await.unwrap();
        register_in_case(&env, &server);
        Some(Self {
            backend,
            base: format!("http://{}", server.api_addr),
            ops: format!("http://{}", server.ops_addr),
            http: http(),
            store: server.store.clone(),
            hasher: server.hasher.clone(),
            env,
            dir,
            server: Some(server),
            _pg: pg,
        })
    }

    /// Stops the server and starts a new one on the same database and files
    /// (a node restart). The API listens on a new port.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let config = Config::from_sources(None, self.env.clone()).unwrap();
        let server = app::start(&config, StartOptions::default()).await.unwrap();
        register_in_case(&self.env, &server);
        self.base = format!("http://{}", server.api_addr);
        self.ops = format!("http://{}", server.ops_addr);
        self.store = server.store.clone();
        self.server = Some(server);
    }

    /// Issues a key with its own owner (four-eyes cases need distinct owners).
    pub async fn key_owned(&self, company: CompanyId, scopes: &str, owner: &str, mode: KeyMode) -> String {
        self.issue(company, ScopeSet::parse_list(scopes).unwrap(), owner, mode, None).await
    }

    /// Issues a key as an operator would (the CLI's `create_key`).
    async fn issue(
        &self,
        company: CompanyId,
        scopes: ScopeSet,
        owner: &str,
        mode: KeyMode,
        expires_in: Option<time::Duration>,
    ) -> String {
        let request = paygate_server::admin::KeyRequest {
            company,
            name: "test key",
            owner,
            scopes,
            mode,
            expires_in,
            allowed_cidrs: Default::default(),
        };
        let (_, text) = paygate_server::admin::create_key(&*self.store, &self.hasher, request).await.unwrap();
        text.to_string()
    }

    /// Everything the database holds: every column of every row of every
    /// table, each value as its bytes (binary columns as stored, not hex; other
    /// values as their text), and on SQLite also the database and WAL files'
    /// raw bytes.
    pub async fn raw_contents(&self) -> RawContents {
        use sqlx::{Connection, Row};
        let url = &self.env["PAYGATE_DATABASE_URL"];
        let mut raw = RawContents::default();
        match self.backend {
            Backend::Sqlite => {
                for entry in std::fs::read_dir(self.dir.path()).unwrap() {
                    let path = entry.unwrap().path();
                    let name = path.file_name().unwrap().to_string_lossy().into_owned();
                    // The database, its WAL and shared memory; not the key files beside it.
                    if ["paygate.db", "paygate.db-wal", "paygate.db-shm", "paygate.db-journal"].contains(&name.as_str())
                    {
                        raw.bytes.extend(std::fs::read(&path).unwrap());
                    }
                }
                let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
                let tables: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                for table in tables {
                    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
                        .bind(&table)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                    for column in &columns {
                        // CAST AS BLOB: text as its bytes, numbers as their digits.
                        let sql = format!(r#"SELECT CAST("{column}" AS BLOB) FROM "{table}""#);
                        for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut conn).await.unwrap() {
                            raw.push(row.get::<Option<Vec<u8>>, _>(0));
                        }
                    }
                    raw.tables.push((table, columns));
                }
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                let columns: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT table_name::text, column_name::text, udt_name::text FROM information_schema.columns \
                     WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
                )
                .fetch_all(&mut conn)
                .await
                .unwrap();
                for (table, column, udt) in columns {
                    let value = match udt.as_str() {
                        "bytea" => format!(r#""{column}""#),
                        // Arrays of bytes: each element decoded, not rendered as hex.
                        "_bytea" => format!(r#"(SELECT string_agg(e, '\x0a'::bytea) FROM unnest("{column}") e)"#),
                        _ => format!(r#"convert_to("{column}"::text, 'UTF8')"#),
                    };
                    let sql = format!(r#"SELECT {value} FROM "{table}""#);
                    for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut conn).await.unwrap() {
                        raw.push(row.get::<Option<Vec<u8>>, _>(0));
                    }
                    match raw.tables.last_mut() {
                        Some((last, columns)) if *last == table => columns.push(column),
                        _ => raw.tables.push((table, vec![column])),
                    }
                }
            }
        }
        raw
    }

    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    pub async fn company(&self, name: &str) -> Company {
        let new = NewCompany::new(Label::parse(name).unwrap());
        let record = op("company.create", new.id);
        self.store.create_company(new, &record).await.unwrap()
    }

    /// Issues a key and returns its text.
    pub async fn key(&self, company: CompanyId, scopes: &str) -> String {
        self.key_with(company, scopes, KeyMode::Test, None).await
    }

    pub async fn key_with(
        &self,
        company: CompanyId,
        scopes: &str,
        mode: KeyMode,
        expires_in: Option<time::Duration>,
    ) -> String {
        let scopes = ScopeSet::parse_list(scopes).unwrap();
        if paygate_domain::payment::conflicting_scopes(scopes).is_some() {
            // Cases that want every scope on one key get a policy that allows it.
            let scope = paygate_store::operator_scope(&*self.store, company, mode);
            let mut policy = self.store.approval_policy(&scope).await.unwrap();
            if !policy.allow_write_and_approve_keys {
                policy.allow_write_and_approve_keys = true;
                let record = op("approval_policy.update", company);
                self.store.set_approval_policy(&scope, &policy, &record).await.unwrap();
            }
        }
        self.issue(company, scopes, "tester", mode, expires_in).await
    }

    /// Runs SQL directly on this app's database, bypassing Paygate (tamper tests).
    pub async fn raw_sql(&self, sql: &str) -> Result<u64, sqlx::Error> {
        use sqlx::Connection;
        let url = &self.env["PAYGATE_DATABASE_URL"];
        let statement = sqlx::AssertSqlSafe(sql.to_owned());
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(url).await?;
                Ok(sqlx::raw_sql(statement).execute(&mut conn).await?.rows_affected())
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                Ok(sqlx::raw_sql(statement).execute(&mut conn).await?.rows_affected())
            }
        }
    }

    pub fn request(&self, method: Method, path: &str, key: Option<&str>) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match key {
            Some(k) => builder.bearer_auth(k),
            None => builder,
        }
    }

    pub fn get(&self, path: &str, key: &str) -> RequestBuilder {
        self.request(Method::GET, path, Some(key))
    }

    pub fn post(&self, path: &str, key: &str) -> RequestBuilder {
        self.request(Method::POST, path, Some(key))
    }

    /// Runs the `paygate` binary against this app's database.
    pub async fn cli(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(BIN)
            .args(args)
            .envs(&self.env)
            .env("PAYGATE_LOG_LEVEL", "warn")
            .output()
            .await
            .unwrap()
    }
}

/// A dump of a database's stored bytes, for "never stored in clear" checks.
#[derive(Default)]
pub struct RawContents {
    pub bytes: Vec<u8>,
    /// Every table scanned, with its columns.
    pub tables: Vec<(String, Vec<String>)>,
}

impl RawContents {
    fn push(&mut self, value: Option<Vec<u8>>) {
        if let Some(value) = value {
            self.bytes.extend(value);
            self.bytes.push(b'\n');
        }
    }

    pub fn contains(&self, text: &str) -> bool {
        self.contains_bytes(text.as_bytes())
    }

    pub fn contains_bytes(&self, needle: &[u8]) -> bool {
        self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    pub fn has_table(&self, table: &str) -> bool {
        self.tables.iter().any(|(t, _)| t == table)
    }
}

/// An operator's record of a change made directly through the store.
pub fn op(action: &'static str, company: CompanyId) -> paygate_domain::audit::AuditEntry {
    paygate_server::admin::operator_entry(action, company, ("company", company.to_string()), serde_json::json!({}))
}

/// Asserts a problem+json response and returns its body.
pub async fn problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let request_id = response.headers().get("x-request-id").expect("x-request-id").to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["request_id"], request_id.as_str());
    // Every code the suite sees is documented in docs/errors.md (generated
    // from this table), with the status it is documented with.
    let documented = paygate_api::error_code::ErrorCode::ALL
        .iter()
        .find(|c| c.as_str() == code)
        .unwrap_or_else(|| panic!("{code} is not in docs/errors.md"));
    if code != "bad_request" {
        assert_eq!(documented.status(), status, "{code}: documented status");
    }
    assert_eq!(body["type"], format!("/errors#{code}"));
    assert_eq!(body["title"], documented.title());
    assert!(body["detail"].is_string());
    body
}

/// The body without the per-request field, for "identical answer" comparisons.
pub fn without_request_id(mut body: Value) -> Value {
    body.as_object_mut().unwrap().remove("request_id");
    body
}

pub async fn json(response: Response, status: StatusCode) -> Value {
    let actual = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(actual, status, "{body}");
    body
}

/// A well-formed key (valid checksum) for the same key id with a different secret.
pub fn with_other_secret(text: &str) -> String {
    let secret_start = text.rfind('_').unwrap() + 1;
    let mut forged = text[..secret_start].to_owned();
    forged.push_str(&"Z".repeat(43));
    let checksum = crc32fast::hash(forged.as_bytes());
    paygate_domain::base62::encode_fixed(checksum as u128, 6, &mut forged);
    assert!(paygate_domain::ApiKeyText::parse(&forged).is_ok());
    forged
}

/// The 43-character secret inside a key text.
pub fn secret_of(text: &str) -> &str {
    let start = text.rfind('_').unwrap() + 1;
    &text[start..start + 43]
}

/// The shared parts of a multi-node deployment: one PostgreSQL database, one
/// key pepper and one audit signing key, as `PAYGATE_*` settings for nodes
/// and CLI processes.
pub struct SharedDeployment {
    pub env: Vec<(String, String)>,
    _db: TestDatabase,
    _dir: TempDir,
}

impl SharedDeployment {
    pub async fn create(postgres_admin_url: &str) -> Self {
        let db = TestDatabase::create(postgres_admin_url).await;
        let dir = tempfile::tempdir().unwrap();
        let pepper = dir.path().join("pepper");
        std::fs::write(&pepper, paygate_domain::Pepper::generate_hex().as_bytes()).unwrap();
        let audit_key = dir.path().join("audit-key");
        std::fs::write(&audit_key, paygate_domain::audit::AuditSigner::generate_hex().as_bytes()).unwrap();
        let data_key = dir.path().join("data-key");
        std::fs::write(&data_key, paygate_domain::Pepper::generate_hex().as_bytes()).unwrap();
        let env = vec![
            ("PAYGATE_DATABASE_URL".to_owned(), db.url.clone()),
            ("PAYGATE_KEY_PEPPER_FILE".to_owned(), pepper.display().to_string()),
            ("PAYGATE_AUDIT_SIGNING_KEY_FILE".to_owned(), audit_key.display().to_string()),
            ("PAYGATE_DATA_KEY_FILE".to_owned(), data_key.display().to_string()),
        ];
        Self { env, _db: db, _dir: dir }
    }

    /// The settings plus `extra`, borrowed as `(name, value)` pairs.
    pub fn with<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied()).collect()
    }
}
