//! Steps 3–4 of the pipeline in isolation: parse a key, and parse + look up +
//! verify it with a warm cache (the hot path of every authenticated request).
//! Run: `cargo bench -p paygate-server --bench key_verification`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use paygate_domain::{ApiKeyText, KeyHasher, KeyMode, Label, Pepper, ScopeSet};
use paygate_server::admin::{KeyRequest, create_key, operator_entry};
use paygate_store::auth::{AuthConfig, Authenticator};
use paygate_store::{NewCompany, OperatorStore, Store};
use paygate_store_sqlite::SqliteStore;

fn key_verification(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hasher = KeyHasher::new(&Pepper::new(1, vec![11; 32]).unwrap());
    let (auth, text) = runtime.block_on(async {
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
        auth.verify_key(&text, paygate_domain::now()).await.unwrap();
        (auth, text.to_string())
    });
    // Keep the cache trusted during the measurement, as the server's watcher does.
    let watcher = runtime.spawn(auth.clone().watch_revisions());

    let mut group = c.benchmark_group("key_verification");
    group.bench_function("parse", |b| b.iter(|| ApiKeyText::parse(std::hint::black_box(&text)).unwrap()));
    let parsed = ApiKeyText::parse(&text).unwrap();
    let stored = hasher.hash(parsed.secret());
    group.bench_function("hmac_verify", |b| {
        b.iter(|| assert!(hasher.verify(std::hint::black_box(parsed.secret()), &stored, 1)))
    });
    group.bench_function("parse_lookup_verify_cache_hit", |b| {
        b.to_async(&runtime)
            .iter(|| async { auth.verify_key(std::hint::black_box(&text), paygate_domain::now()).await.unwrap() })
    });
    group.finish();
    watcher.abort();
}

criterion_group!(benches, key_verification);
criterion_main!(benches);
