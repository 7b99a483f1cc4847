//! Created payments per second through the whole pipeline (auth, scope,
//! limits, idempotency, audit) with full durability, under concurrency, on
//! SQLite (`synchronous=FULL`) and PostgreSQL. Reported next to two baselines
//! measured in the same run: the same payments with one transaction per
//! payment (group commit off), and audited `GET /v1/me`. A third round prices
//! the webhook fan-out: the same payments for a company with two subscribed
//! endpoints (every payment also writes two delivery rows), as a ratio to the
//! company without endpoints (whose payments still write their event).
//!
//! Run: `cargo bench -p paygate-server --bench payment_throughput`
//! (PostgreSQL too when `PAYGATE_TEST_POSTGRES_URL` is set).
//! Options (env): `BENCH_SECONDS` (default 5), `BENCH_CONCURRENCY` (default 256).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use paygate_api::audit::{AuditConfig, AuditWriter};
use paygate_api::limits::{LimitsConfig, RateLimits};
use paygate_api::payment_writer::PaymentWriter;
use paygate_api::{ApiConfig, AppState};
use paygate_domain::{KeyHasher, KeyMode, Label, Pepper, ScopeSet};
use paygate_ratelimit::{ConcurrencyLimiter, Quota, SharedLimiter};
use paygate_server::admin::{KeyRequest, create_key, operator_entry};
use paygate_store::auth::{AuthConfig, Authenticator};
use paygate_store::{NewCompany, OperatorStore, Store};
use tower::ServiceExt;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Requests per second of `make` (a request factory) that answer `expect`.
async fn rate(
    router: axum::Router,
    make: Arc<dyn Fn(u64) -> Request<Body> + Send + Sync>,
    expect: u16,
    seconds: u64,
    concurrency: u64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (router, make, done, counter) = (router.clone(), make.clone(), done.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut r = make(counter.fetch_add(1, Ordering::Relaxed));
                r.extensions_mut().insert(ConnectInfo(peer));
                let response = router.clone().oneshot(r).await.unwrap();
                assert_eq!(response.status(), expect);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// A company and a key for it; with `endpoints` webhook endpoints subscribed to everything.
async fn company_key(store: &dyn OperatorStore, hasher: &KeyHasher, endpoints: usize) -> String {
    let new = NewCompany::new(Label::parse("Bench").unwrap());
    let record = operator_entry("company.create", new.id, ("company", new.id.to_string()), Default::default());
    let company = store.create_company(new, &record).await.unwrap();
    let mut scopes = ScopeSet::all();
    scopes.remove(paygate_domain::Scope::PaymentsApprove);
    scopes.remove(paygate_domain::Scope::PolicyManage);
    let request = KeyRequest {
        company: company.id,
        name: "bench",
        owner: "bench",
        scopes,
        mode: KeyMode::Test,
        expires_in: None,
        allowed_cidrs: Default::default(),
    };
    let (_, text) = create_key(store, hasher, request).await.unwrap();
    let scope = paygate_store::operator_scope(store, company.id, KeyMode::Test);
    for _ in 0..endpoints {
        let now = paygate_domain::now();
        let endpoint = paygate_store::WebhookEndpoint {
            id: paygate_domain::WebhookEndpointId::generate(),
            company_id: company.id,
            mode: KeyMode::Test,
            url: "https://hooks.example.com/bench".into(),
            description: None,
            event_types: paygate_domain::event::EventTypes::All,
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            previous_secret_expires_at: None,
            created_at: now,
            updated_at: now,
        };
        let record = operator_entry(
            "webhook_endpoint.create",
            company.id,
            ("company", company.id.to_string()),
            Default::default(),
        );
        let new = paygate_store::NewWebhookEndpoint { endpoint, secret_sealed: vec![1; 45] };
        assert!(store.create_webhook_endpoint(&scope, &new, &record).await.unwrap());
    }
    text.to_string()
}

async fn run(name: &str, store: Arc<dyn OperatorStore>, seconds: u64, concurrency: u64) {
    let hasher = KeyHasher::new(&Pepper::new(1, vec![5; 32]).unwrap());
    store.migrate().await.unwrap();
    let text = Arc::new(company_key(&*store, &hasher, 0).await);
    let fanned = Arc::new(company_key(&*store, &hasher, 2).await);
    let api_store: Arc<dyn Store> = store.clone();
    let auth = Arc::new(Authenticator::new(api_store.clone(), hasher, AuthConfig::default()));
    auth.poll_revision().await.unwrap();
    let _watcher = tokio::spawn(auth.clone().watch_revisions());
    let huge = Quota::new(1_000_000, 1_000_000);
    let writers = if store.backend() == paygate_store::Backend::Postgres { 4 } else { 1 };
    let router = |max_batch: usize| {
        let limits = RateLimits::new(
            SharedLimiter::in_process(100_000),
            ConcurrencyLimiter::new(None, Duration::from_secs(35), 100_000),
            LimitsConfig {
                key: huge,
                company: huge,
                client: huge,
                write_concurrency: 1_000_000,
                ..LimitsConfig::default()
            },
        );
        let (audit, _) = AuditWriter::start(api_store.clone(), AuditConfig::default());
        let state = AppState {
            store: api_store.clone(),
            auth: auth.clone(),
            limits: Arc::new(limits),
            audit,
            audit_public_key: [0; 32],
            data_key: Arc::new(paygate_domain::bank::DataKey::new(&[7; 32]).expect("32 bytes")),
            payments: PaymentWriter::spawn_with(api_store.clone(), max_batch, writers),
            rail_submit_delay: Duration::from_secs(1),
            webhook_addresses: Default::default(),
        };
        paygate_api::router(state, &ApiConfig::default())
    };
    // One payee per company, created through the API.
    let payee_of = |text: Arc<String>| {
        let body = r#"{"name":"Bench Supplier","type":"business","bank_account":{"scheme":"iban","iban":"DE89370400440532013000"}}"#;
        let mut r = Request::post("/v1/payees")
            .header("authorization", format!("Bearer {text}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        r.extensions_mut().insert(ConnectInfo("127.0.0.1:40000".parse::<SocketAddr>().unwrap()));
        let router = router(1);
        async move {
            let response = router.oneshot(r).await.unwrap();
            assert_eq!(response.status(), 201);
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            v["id"].as_str().unwrap().to_owned()
        }
    };
    let payee = payee_of(text.clone()).await;
    let fanned_payee = payee_of(fanned.clone()).await;
    let run_id = uuid::Uuid::now_v7();
    let payments = |text: Arc<String>, payee: String| {
        Arc::new(move |n: u64| {
            let body = format!(
                r#"{{"payee_id":"{payee}","amount":{},"currency":"EUR","reference":"bench {n}"}}"#,
                100 + n % 50_000
            );
            Request::post("/v1/payments")
                .header("authorization", format!("Bearer {text}"))
                .header("content-type", "application/json")
                .header("idempotency-key", format!("{run_id}-{n}-{}", uuid::Uuid::now_v7()))
                .body(Body::from(body))
                .unwrap()
        }) as Arc<dyn Fn(u64) -> Request<Body> + Send + Sync>
    };
    let pay = payments(text.clone(), payee.clone());
    let pay_fanned = payments(fanned.clone(), fanned_payee);
    let me = {
        let text = text.clone();
        Arc::new(move |_| {
            Request::get("/v1/me").header("authorization", format!("Bearer {text}")).body(Body::empty()).unwrap()
        }) as Arc<dyn Fn(u64) -> Request<Body> + Send + Sync>
    };
    let (mut grouped, mut single, mut reads, mut fan) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        grouped.push(rate(router(256), pay.clone(), 201, seconds, concurrency).await);
        single.push(rate(router(1), pay.clone(), 201, seconds, concurrency).await);
        reads.push(rate(router(256), me.clone(), 200, seconds, concurrency).await);
        fan.push(rate(router(256), pay_fanned.clone(), 201, seconds, concurrency).await);
    }
    for v in [&mut grouped, &mut single, &mut reads, &mut fan] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{name}: POST /v1/payments {:.0}/s with group commit, {:.0}/s one transaction each (x{:.1}); \
         audited GET /v1/me {:.0}/s (payments/reads {:.2}); with 2 subscribed webhook endpoints {:.0}/s \
         (fan-out/no endpoint {:.2}); concurrency {concurrency}, {seconds} s rounds, medians of 3",
        grouped[1],
        single[1],
        grouped[1] / single[1],
        reads[1],
        grouped[1] / reads[1],
        fan[1],
        fan[1] / grouped[1],
    );
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds = env_num("BENCH_SECONDS", 5);
    let concurrency = env_num("BENCH_CONCURRENCY", 256);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let sqlite = Arc::new(paygate_store_sqlite::SqliteStore::connect(&url).await.unwrap());
        run("sqlite (synchronous=FULL)", sqlite, seconds, concurrency).await;
        if let Ok(admin) = std::env::var("PAYGATE_TEST_POSTGRES_URL") {
            let db = paygate_store_postgres::testing::TestDatabase::create(&admin).await;
            let pg = Arc::new(paygate_store_postgres::PostgresStore::connect(&db.url).await.unwrap());
            run("postgres", pg, seconds, concurrency).await;
        }
    });
}
