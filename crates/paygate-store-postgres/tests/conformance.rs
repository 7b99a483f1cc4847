//! Runs the storage conformance suite on PostgreSQL when
//! `PAYGATE_TEST_POSTGRES_URL` is set (CI sets it and fails if it is unreachable).

use std::sync::Arc;

use paygate_store::conformance::operator_record;
use paygate_store::prelude::*;
use paygate_store_postgres::PostgresStore;
use paygate_store_postgres::testing::TestDatabase;

/// The generic suite's store plus the concrete backend, for PostgreSQL-only cases.
struct TestStore {
    store: Arc<dyn OperatorStore>,
    postgres: Option<PostgresStore>,
    _guard: paygate_store::conformance::TestStore,
}

async fn fresh_generic() -> Option<paygate_store::conformance::TestStore> {
    fresh_store().await.map(|t| t._guard)
}

async fn fresh_store() -> Option<TestStore> {
    let Ok(admin_url) = std::env::var("PAYGATE_TEST_POSTGRES_URL") else {
        // Under CI a missing URL must fail, not pass without testing anything.
        assert!(std::env::var_os("CI").is_none(), "CI is set but PAYGATE_TEST_POSTGRES_URL is not");
        eprintln!("PAYGATE_TEST_POSTGRES_URL not set: PostgreSQL conformance case skipped");
        return None;
    };
    let db = TestDatabase::create(&admin_url).await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let shared: Arc<dyn OperatorStore> = Arc::new(store.clone());
    Some(TestStore {
        store: shared.clone(),
        postgres: Some(store),
        _guard: paygate_store::conformance::TestStore::new(shared, db),
    })
}

paygate_store::conformance_tests!(fresh_generic);

/// Revoke-all against a key whose creating transaction is still open: the
/// creation holds the company row shared, revoke-all waits for it, and then
/// revokes the new key too. Without the lock the key would survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_waits_for_an_open_key_creation() {
    use paygate_domain::{CompanyId, Label};
    use paygate_store::{NewCompany, PageRequest, operator_scope};
    use sqlx::Connection;
    let Some(test) = fresh_store().await else { return };
    let store = test.store.clone();
    let new = NewCompany::new(Label::parse("Race").unwrap());
    let company: CompanyId = new.id;
    let record = paygate_store::conformance::operator_record("company.create");
    store.create_company(new, &record).await.unwrap();
    let url = std::env::var("PAYGATE_TEST_POSTGRES_URL").unwrap();
    let db_url = {
        // The store's database: find it from the store's own connection.
        let name: String = sqlx::query_scalar("SELECT current_database()").fetch_one(store_pool(&test)).await.unwrap();
        paygate_store_postgres::testing::with_database(&url, &name)
    };
    let mut session = sqlx::PgConnection::connect(&db_url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut session).await.unwrap();
    sqlx::query("SELECT 1 FROM companies WHERE id = $1 FOR SHARE")
        .bind(company.as_uuid())
        .execute(&mut session)
        .await
        .unwrap();
    let key_id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO api_keys (id, company_id, name, owner, scopes, mode, secret_hash, pepper_version, created_at) \
         VALUES ($1, $2, 'n', 'o', '', 'test', $3, 1, now())",
    )
    .bind(key_id)
    .bind(company.as_uuid())
    .bind(vec![0u8; 32])
    .execute(&mut session)
    .await
    .unwrap();
    let revoker = {
        let store = store.clone();
        tokio::spawn(async move {
            let scope = operator_scope(&*store, company, paygate_domain::KeyMode::Test);
            let record = paygate_store::conformance::operator_record("api_key.revoke_all");
            store.revoke_all_api_keys(&scope, paygate_domain::now(), &record).await.unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!revoker.is_finished(), "revoke-all must wait for the open creation");
    sqlx::raw_sql("COMMIT").execute(&mut session).await.unwrap();
    assert_eq!(revoker.await.unwrap(), 1, "the key committed while revoke-all waited is revoked");
    let page = store
        .list_api_keys(
            &operator_scope(&*store, company, paygate_domain::KeyMode::Test),
            PageRequest { limit: 10, after: None },
        )
        .await
        .unwrap();
    assert!(page.items.iter().all(|k| k.revoked_at.is_some()));
}

fn store_pool(test: &TestStore) -> &sqlx::PgPool {
    test.postgres.as_ref().unwrap().pool()
}

/// Not a test: prints how long one audit batch takes by size (run with --ignored --nocapture).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn audit_batch_latency_by_size() {
    let Some(test) = fresh_store().await else { return };
    let store = test.store.clone();
    for size in [1usize, 10, 100, 500] {
        let batch: Vec<_> = (0..size)
            .map(|_| paygate_domain::audit::AuditEntry {
                id: paygate_domain::AuditEventId::generate(),
                ..paygate_store::conformance::operator_record("identity.read")
            })
            .collect();
        let started = std::time::Instant::now();
        for _ in 0..10 {
            let batch: Vec<_> = batch
                .iter()
                .cloned()
                .map(|e| paygate_domain::audit::AuditEntry { id: paygate_domain::AuditEventId::generate(), ..e })
                .collect();
            store.append_audit(&batch).await.unwrap();
        }
        println!("batch of {size}: {:?} per batch", started.elapsed() / 10);
    }
}

/// Events are append-only in the database itself: an UPDATE is refused by a trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refuse_updates() {
    use paygate_domain::Label;
    use paygate_store::{NewCompany, operator_scope};
    let Some(test) = fresh_store().await else { return };
    let store = test.store.clone();
    let company =
        store.create_company(NewCompany::new(Label::parse("Acme").unwrap()), &operator_record("company.create")).await;
    let company = company.unwrap();
    let policy = paygate_domain::payment::ApprovalPolicy::default();
    let scope = operator_scope(&*store, company.id, paygate_domain::KeyMode::Test);
    store.set_approval_policy(&scope, &policy, &operator_record("approval_policy.update")).await.unwrap();
    let err = sqlx::query("UPDATE events SET object = '{}'").execute(store_pool(&test)).await.unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let kept: String = sqlx::query_scalar("SELECT object FROM events").fetch_one(store_pool(&test)).await.unwrap();
    assert_ne!(kept, "{}");
}

/// A batch whose Idempotency-Key another node claims while the batch runs:
/// the item answers with the other node's response, and the payment the
/// batch had inserted for it leaves no event (nor delivery) behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_lost_to_another_node_writes_no_event() {
    use paygate_domain::audit::Outcome;
    use paygate_domain::payment::ApprovalPolicy;
    use paygate_domain::{KeyMode, Label};
    use paygate_store::conformance::{create_item, draft_payment, entry_for, new_payee};
    use paygate_store::{EventFilter, NewCompany, PageRequest, PaymentCreated, operator_scope};
    use sqlx::Connection;
    let Some(test) = fresh_store().await else { return };
    let store = test.store.clone();
    let company =
        store.create_company(NewCompany::new(Label::parse("Acme").unwrap()), &operator_record("company.create")).await;
    let a = company.unwrap().id;
    let scope = operator_scope(&*store, a, KeyMode::Test);
    let payee = new_payee(KeyMode::Test);
    store.create_payee(&scope, &payee, &entry_for(a, "payee.create", Outcome::Success)).await.unwrap();
    let policy = ApprovalPolicy::default();
    let seed = draft_payment(payee.payee.id, 100, &policy);
    store.create_payments(&[create_item(a, &*store, seed.clone(), "seed")]).await.unwrap();

    // "Another node" claims key `k` and has not committed yet.
    let name: String = sqlx::query_scalar("SELECT current_database()").fetch_one(store_pool(&test)).await.unwrap();
    let url =
        paygate_store_postgres::testing::with_database(&std::env::var("PAYGATE_TEST_POSTGRES_URL").unwrap(), &name);
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (company_id, mode, key, fingerprint, response_status, response_body, \
         payment_id, created_at, expires_at) VALUES ($1, 'test', 'k', 'fp-other', 201, '{}', $2, now(), \
         now() + interval '1 day')",
    )
    .bind(a.as_uuid())
    .bind(seed.id.as_uuid())
    .execute(&mut other)
    .await
    .unwrap();
    let lost = draft_payment(payee.payee.id, 100, &policy);
    let batch = {
        let store = store.clone();
        let item = create_item(a, &*store, lost.clone(), "k");
        tokio::spawn(async move { store.create_payments(&[item]).await.unwrap() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!batch.is_finished(), "the batch waits for the other node's key");
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    let outcomes = batch.await.unwrap();
    assert!(matches!(&outcomes[0], PaymentCreated::Existing(r) if r.payment_id == seed.id), "{outcomes:?}");
    assert!(store.get_payment(&scope, lost.id).await.unwrap().is_none());
    let of = |id: String| EventFilter { object_id: Some(id), ..EventFilter::default() };
    let page = PageRequest { limit: 10, after: None };
    let events = store.list_events(&scope, &of(lost.id.to_string()), page).await.unwrap();
    assert!(events.items.is_empty(), "no event for a payment that was not created");
    let events = store.list_events(&scope, &of(seed.id.to_string()), page).await.unwrap();
    assert_eq!(events.items.len(), 1);
}
