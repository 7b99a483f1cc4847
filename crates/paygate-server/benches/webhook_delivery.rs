//! Webhook deliveries per second: a backlog of events drained by one node's
//! delivery worker (lease, sign, POST, record with its audit record) into a
//! local receiver, next to a baseline measured in the same run: the same
//! number of POSTs of the same bodies to the same receiver with the same
//! concurrency, straight from an HTTP client (no Paygate).
//!
//! Run: `cargo bench -p paygate-server --bench webhook_delivery`
//! (PostgreSQL too when `PAYGATE_TEST_POSTGRES_URL` is set).
//! Options (env): `BENCH_EVENTS` (default 2000), `BENCH_CONCURRENCY` (default 16).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use paygate_domain::KeyMode;
use paygate_domain::bank::{BankAccount, BankAccountInput, DataKey};
use paygate_domain::event::EventTypes;
use paygate_server::admin::operator_entry;
use paygate_server::app;
use paygate_server::config::Config;
use paygate_store::{NewCompany, NewPayee, NewWebhookEndpoint, Payee, PayeeStatus, PayeeType, operator_scope};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A receiver on 127.0.0.1 that answers 204 and counts.
async fn receiver() -> (String, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, count)
}

async fn wait_for(count: &AtomicU64, target: u64) {
    let started = Instant::now();
    while count.load(Ordering::Relaxed) < target {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {} of {target} deliveries arrived",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// POSTs per second from a plain client: `events` bodies, `concurrency` at once.
async fn baseline(url: &str, body: &str, events: u64, concurrency: u64) -> f64 {
    paygate_server::install_tls_provider();
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, next, url, body) = (http.clone(), next.clone(), url.to_owned(), body.to_owned());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < events {
                let r = http.post(&url).header("content-type", "application/json").body(body.clone()).send().await;
                assert!(r.unwrap().status().is_success());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    events as f64 / started.elapsed().as_secs_f64()
}

async fn run(name: &str, mut env: BTreeMap<String, String>, events: u64, concurrency: u64) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("data-key");
    let data_key_hex = paygate_domain::Pepper::generate_hex();
    std::fs::write(&key_file, data_key_hex.as_bytes()).unwrap();
    env.insert("PAYGATE_DATA_KEY_FILE".into(), key_file.display().to_string());
    if !env.contains_key("PAYGATE_DATABASE_URL") {
        env.insert("PAYGATE_DATABASE_URL".into(), format!("sqlite://{}", dir.path().join("bench.db").display()));
    }
    for (k, v) in [
        ("PAYGATE_LISTEN", "127.0.0.1:0"),
        ("PAYGATE_OPS_LISTEN", "127.0.0.1:0"),
        ("PAYGATE_LOG_LEVEL", "error"),
        ("PAYGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ("PAYGATE_WEBHOOK_WORKER_INTERVAL_MS", "20"),
    ] {
        env.insert(k.into(), v.into());
    }
    env.insert("PAYGATE_WEBHOOK_CONCURRENCY".into(), concurrency.to_string());
    let config = Config::from_sources(None, env).unwrap();
    let data_key = DataKey::new(&hex::decode(data_key_hex.as_bytes()).unwrap()).unwrap();

    // The backlog, written before any node runs: events of `events` payees,
    // spread over 4 endpoints of one company (one endpoint may hold 4 slots).
    let (url, count) = receiver().await;
    let store = app::open_store(&config).await.unwrap();
    store.migrate().await.unwrap();
    let new = NewCompany::new(paygate_domain::Label::parse("Bench").unwrap());
    let record = operator_entry("company.create", new.id, ("company", new.id.to_string()), Default::default());
    let company = store.create_company(new, &record).await.unwrap();
    let scope = operator_scope(&*store, company.id, KeyMode::Test);
    let endpoints = (concurrency / 4).max(1);
    for _ in 0..endpoints {
        let id = paygate_domain::WebhookEndpointId::generate();
        let secret = paygate_domain::webhook::WebhookSecret::generate();
        let now = paygate_domain::now();
        let endpoint = paygate_store::WebhookEndpoint {
            id,
            company_id: company.id,
            mode: KeyMode::Test,
            url: url.clone(),
            description: None,
            event_types: EventTypes::All,
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            previous_secret_expires_at: None,
            created_at: now,
            updated_at: now,
        };
        let secret_sealed = data_key.seal_webhook_secret(secret.as_bytes(), company.id, &id.to_string());
        let record = operator_entry(
            "webhook_endpoint.create",
            company.id,
            ("company", company.id.to_string()),
            Default::default(),
        );
        assert!(
            store
                .create_webhook_endpoint(&scope, &NewWebhookEndpoint { endpoint, secret_sealed }, &record)
                .await
                .unwrap()
        );
    }
    let input: BankAccountInput =
        serde_json::from_value(serde_json::json!({"scheme": "iban", "iban": "DE89370400440532013000"})).unwrap();
    let account = BankAccount::parse(&input).unwrap();
    let per_payee = events / endpoints;
    for _ in 0..per_payee {
        let id = paygate_domain::PayeeId::generate();
        let payee = Payee {
            id,
            mode: KeyMode::Test,
            name: "Bench Supplier".into(),
            kind: PayeeType::Business,
            email: None,
            bank_account: account.details(data_key.fingerprint(&account, company.id, KeyMode::Test)),
            metadata: Default::default(),
            status: PayeeStatus::Active,
            created_at: paygate_domain::now(),
            disabled_at: None,
            created_by: None,
        };
        let sealed_account = data_key.seal(&account, company.id, &id.to_string());
        let record =
            operator_entry("payee.create", company.id, ("company", company.id.to_string()), Default::default());
        store.create_payee(&scope, &NewPayee { payee, sealed_account }, &record).await.unwrap();
    }
    let total = per_payee * endpoints;
    let body = store
        .list_events(&scope, &Default::default(), paygate_store::PageRequest { limit: 1, after: None })
        .await
        .unwrap()
        .items[0]
        .to_json();
    drop(store);

    // Paygate: start the node, time until the receiver has every delivery.
    let started = Instant::now();
    let server = app::start(&config, app::StartOptions::default()).await.unwrap();
    wait_for(&count, total).await;
    let paygate = total as f64 / started.elapsed().as_secs_f64();
    server.shutdown().await;

    // Baseline: the same POSTs from a plain client.
    let (url, _) = receiver().await;
    let plain = baseline(&url, &body, total, concurrency).await;
    println!(
        "{name}: {total} deliveries drained at {paygate:.0}/s by one node (lease, sign, POST, record + audit); \
         plain client POSTs {plain:.0}/s; ratio {:.2}; concurrency {concurrency}, {endpoints} endpoints",
        paygate / plain
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let events = env_num("BENCH_EVENTS", 2000);
    let concurrency = env_num("BENCH_CONCURRENCY", 16);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        run("sqlite (synchronous=FULL)", BTreeMap::new(), events, concurrency).await;
        if let Ok(admin) = std::env::var("PAYGATE_TEST_POSTGRES_URL") {
            let db = paygate_store_postgres::testing::TestDatabase::create(&admin).await;
            let dir = tempfile::tempdir().unwrap();
            let (pepper, audit) = (dir.path().join("pepper"), dir.path().join("audit-key"));
            std::fs::write(&pepper, paygate_domain::Pepper::generate_hex().as_bytes()).unwrap();
            std::fs::write(&audit, paygate_domain::audit::AuditSigner::generate_hex().as_bytes()).unwrap();
            let env = BTreeMap::from([
                ("PAYGATE_DATABASE_URL".to_owned(), db.url.clone()),
                ("PAYGATE_KEY_PEPPER_FILE".to_owned(), pepper.display().to_string()),
                ("PAYGATE_AUDIT_SIGNING_KEY_FILE".to_owned(), audit.display().to_string()),
            ]);
            run("postgres", env, events, concurrency).await;
        }
    });
}
