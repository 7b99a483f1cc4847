//! The committed `openapi.json` is the one the code generates.

use std::path::Path;

#[test]
fn committed_openapi_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    let generated = paygate_api::openapi_json();
    if std::env::var_os("PAYGATE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json is stale: run `cargo run -- openapi > openapi.json` (or PAYGATE_UPDATE_OPENAPI=1 cargo test) and commit it"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
}

#[tokio::test]
async fn served_openapi_is_the_generated_one() {
    let app = crate::harness::TestApp::spawn(crate::harness::Backend::Sqlite).await.unwrap();
    let served = app.request(reqwest::Method::GET, "/openapi.json", None).send().await.unwrap().text().await.unwrap();
    assert_eq!(served, paygate_api::openapi_json());
}
