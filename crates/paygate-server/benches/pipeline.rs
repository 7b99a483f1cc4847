//! The whole API pipeline for `GET /v1/me` driven in process (no sockets):
//! request id, client address, limits, authentication (cache hit), scope,
//! handler, problem rendering and metrics. Run with limits on and off in the
//! same process to price the limiting stage as a ratio.
//! Run: `cargo bench -p paygate-server --bench pipeline`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use paygate_api::audit::{AuditConfig, AuditWriter};
use paygate_api::limits::{LimitsConfig, RateLimits};
use paygate_api::{ApiConfig, AppState};
use paygate_domain::{KeyHasher, KeyMode, Label, Pepper, ScopeSet};
use paygate_ratelimit::{ConcurrencyLimiter, Quota, SharedLimiter};
use paygate_server::admin::{KeyRequest, create_key, operator_entry};
use paygate_store::auth::{AuthConfig, Authenticator};
use paygate_store::{NewCompany, OperatorStore, Store};
use paygate_store_sqlite::SqliteStore;
use tower::ServiceExt;

fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hasher = KeyHasher::new(&Pepper::new(1, vec![5; 32]).unwrap());
    let (store, auth, text) = runtime.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store: Arc<dyn OperatorStore> = Arc::new(SqliteStore::connect(&url).await.unwrap());
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
        let api_store: Arc<dyn Store> = store.clone();
        let auth = Arc::new(Authenticator::new(api_store, hasher.clone(), AuthConfig::default()));
        auth.poll_revision().await.unwrap();
        (store, auth, text.to_string())
    });
    let _watcher = runtime.spawn(auth.clone().watch_revisions());
    let huge = Quota::new(1_000_000, 1_000_000);
    let router = |enabled: bool| {
        let config = LimitsConfig { key: huge, company: huge, client: huge, enabled, ..LimitsConfig::default() };
        let limits = RateLimits::new(
            SharedLimiter::in_process(100_000),
            ConcurrencyLimiter::new(None, std::time::Duration::from_secs(35), 1),
            config,
        );
        let api_store: Arc<dyn Store> = store.clone();
        let audit_config = AuditConfig { enabled: false, ..AuditConfig::default() };
        let (audit, _) = AuditWriter::start(api_store.clone(), audit_config);
        let state = AppState {
            store: api_store.clone(),
            auth: auth.clone(),
            limits: Arc::new(limits),
            audit,
            audit_public_key: [0; 32],
            data_key: Arc::new(paygate_domain::bank::DataKey::new(&[7; 32]).expect("32 bytes")),
            payments: paygate_api::payment_writer::PaymentWriter::spawn(api_store.clone()),
            rail_submit_delay: std::time::Duration::from_secs(1),
            webhook_addresses: Default::default(),
        };
        paygate_api::router(state, &ApiConfig::default())
    };
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let request = |text: &str| {
        let mut r =
            Request::get("/v1/me").header("authorization", format!("Bearer {text}")).body(Body::empty()).unwrap();
        r.extensions_mut().insert(ConnectInfo(peer));
        r
    };

    let mut group = c.benchmark_group("pipeline_get_me");
    for (name, enabled) in [("limits_off", false), ("limits_on", true)] {
        let app = router(enabled);
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let app = app.clone();
                let req = request(&text);
                async move {
                    let response = app.oneshot(req).await.unwrap();
                    assert_eq!(response.status(), 200);
                    axum::body::to_bytes(response.into_body(), 4096).await.unwrap()
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
