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

/// The served document is the committed file, byte for byte, and what it
/// tells a client (read with a plain JSON parser, not the generator) is what
/// the server enforces: every operation answers 403 naming the scope the
/// document declares when the key lacks it.
#[tokio::test]
async fn served_openapi_is_the_committed_one_and_its_scopes_are_enforced() {
    let app = crate::harness::TestApp::spawn(crate::harness::Backend::Sqlite).await.unwrap();
    let response = app.request(reqwest::Method::GET, "/openapi.json", None).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    let committed = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json")).unwrap();
    assert!(served == committed, "the served document differs from the committed openapi.json");
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let acme = app.company("Acme").await;
    let held = "events:read";
    let key = app.key(acme.id, held).await;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete: String = path
            .split('/')
            .map(|segment| if segment.starts_with('{') { "x" } else { segment })
            .collect::<Vec<_>>()
            .join("/");
        for (method, operation) in item.as_object().unwrap() {
            let Some(scope) = operation["security"][0]["api_key"][0].as_str() else { continue };
            if scope == held {
                continue;
            }
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app.request(method.clone(), &concrete, Some(&key)).send().await.unwrap();
            let body = crate::harness::problem(response, reqwest::StatusCode::FORBIDDEN, "insufficient_scope").await;
            assert_eq!(body["scope"], scope, "{method} {path}");
            checked += 1;
        }
    }
    assert!(checked >= 25, "{checked} operations checked");
}
