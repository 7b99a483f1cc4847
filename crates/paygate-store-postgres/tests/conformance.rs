//! Runs the storage conformance suite on PostgreSQL when
//! `PAYGATE_TEST_POSTGRES_URL` is set (CI sets it and fails if it is unreachable).

use std::sync::Arc;

use paygate_store::OperatorStore;
use paygate_store::conformance::TestStore;
use paygate_store_postgres::PostgresStore;
use paygate_store_postgres::testing::TestDatabase;

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
    Some(TestStore::new(Arc::new(store) as Arc<dyn OperatorStore>, db))
}

paygate_store::conformance_tests!(fresh_store);
