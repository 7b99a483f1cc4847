use std::sync::Arc;

use paygate_store::OperatorStore;
use paygate_store::conformance::TestStore;
use paygate_store_sqlite::SqliteStore;

async fn fresh_store() -> Option<TestStore> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("paygate.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Some(TestStore::new(Arc::new(store) as Arc<dyn OperatorStore>, dir))
}

paygate_store::conformance_tests!(fresh_store);
