//! Audited request throughput with full durability, measured against the same
//! pipeline with auditing off, in the same run, under concurrency (group
//! commit only pays off when many requests wait at once). Also the raw rate of
//! records through the group-commit writer.
//!
//! Run: `cargo bench -p paygate-server --bench audit_throughput`
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
use paygate_api::{ApiConfig, AppState};
use paygate_domain::audit::{ActorKind, AuditEntry, Outcome};
use paygate_domain::{AuditEventId, KeyHasher, KeyMode, Label, Pepper, ScopeSet};
use paygate_ratelimit::{ConcurrencyLimiter, Quota, SharedLimiter};
use paygate_server::admin::{KeyRequest, create_key, operator_entry};
use paygate_store::auth::{AuthConfig, Authenticator};
use paygate_store::{NewCompany, OperatorStore, Store};
use tower::ServiceExt;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn requests_per_second(router: axum::Router, text: Arc<String>, seconds: u64, concurrency: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (router, text, done) = (router.clone(), text.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut r = Request::get("/v1/me")
                    .header("authorization", format!("Bearer {text}"))
                    .body(Body::empty())
                    .unwrap();
                r.extensions_mut().insert(ConnectInfo(peer));
                let response = router.clone().oneshot(r).await.unwrap();
                assert_eq!(response.status(), 200);
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

async fn records_per_second(writer: AuditWriter, chain: String, seconds: u64, concurrency: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (writer, chain, done) = (writer.clone(), chain.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let entry = AuditEntry {
                    id: AuditEventId::generate(),
                    chain: chain.clone(),
                    occurred_at: paygate_domain::now(),
                    actor_kind: ActorKind::ApiKey,
                    actor_id: Some("key_0000000000000000000000".into()),
                    actor_name: Some("bench".into()),
                    action: "identity.read",
                    resource_type: None,
                    resource_id: None,
                    outcome: Outcome::Success,
                    status: 200,
                    request_id: Some("req_bench".into()),
                    client_ip: Some("127.0.0.1".into()),
                    user_agent: Some("bench".into()),
                    details: "{\"method\":\"GET\",\"route\":\"/v1/me\"}".into(),
                };
                assert!(writer.record(entry).await);
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

async fn run(name: &str, store: Arc<dyn OperatorStore>, seconds: u64, concurrency: u64) {
    let hasher = KeyHasher::new(&Pepper::new(1, vec![5; 32]).unwrap());
    store.migrate().await.unwrap();
    let new = NewCompany::new(Label::parse("Bench").unwrap());
    let record = operator_entry("company.create", new.id, ("company", new.id.to_string()), Default::default());
    let company = store.create_company(new, &record).await.unwrap();
    let request = KeyRequest {
        company: company.id,
        name: "bench",
        owner: "bench",
        scopes: {
            // Every scope one key may hold under the default approval policy.
            let mut s = ScopeSet::all();
            s.remove(paygate_domain::Scope::PaymentsApprove);
            s.remove(paygate_domain::Scope::PolicyManage);
            s
        },
        mode: KeyMode::Live,
        expires_in: None,
        allowed_cidrs: Default::default(),
    };
    let (_, text) = create_key(&*store, &hasher, request).await.unwrap();
    let text = Arc::new(text.to_string());
    let api_store: Arc<dyn Store> = store.clone();
    let auth = Arc::new(Authenticator::new(api_store.clone(), hasher, AuthConfig::default()));
    auth.poll_revision().await.unwrap();
    let _watcher = tokio::spawn(auth.clone().watch_revisions());
    let huge = Quota::new(1_000_000, 1_000_000);
    let router = |audited: bool| {
        let limits = RateLimits::new(
            SharedLimiter::in_process(100_000),
            ConcurrencyLimiter::new(None, Duration::from_secs(35), 1),
            LimitsConfig { key: huge, company: huge, client: huge, ..LimitsConfig::default() },
        );
        let (audit, _) =
            AuditWriter::start(api_store.clone(), AuditConfig { enabled: audited, ..AuditConfig::default() });
        let state = AppState {
            store: api_store.clone(),
            auth: auth.clone(),
            limits: Arc::new(limits),
            audit,
            audit_public_key: [0; 32],
            data_key: Arc::new(paygate_domain::bank::DataKey::new(&[7; 32]).expect("32 bytes")),
            payments: paygate_api::payment_writer::PaymentWriter::spawn(api_store.clone()),
            rail_submit_delay: Duration::from_secs(1),
            webhook_addresses: Default::default(),
        };
        paygate_api::router(state, &ApiConfig::default())
    };
    // Interleaved rounds; the median of three of each.
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..3 {
        off.push(requests_per_second(router(false), text.clone(), seconds, concurrency).await);
        on.push(requests_per_second(router(true), text.clone(), seconds, concurrency).await);
    }
    off.sort_by(f64::total_cmp);
    on.sort_by(f64::total_cmp);
    let (writer, _) = AuditWriter::start(api_store.clone(), AuditConfig::default());
    let records = records_per_second(writer, company.id.to_string(), seconds, concurrency.max(1024)).await;
    println!(
        "{name}: GET /v1/me un-audited {:.0}/s, audited {:.0}/s, ratio {:.2}; group-commit writer {:.0} records/s (concurrency {concurrency}, {seconds} s rounds, medians of 3)",
        off[1],
        on[1],
        on[1] / off[1],
        records
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
