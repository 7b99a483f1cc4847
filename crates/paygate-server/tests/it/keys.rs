//! Self-service keys over the API: issue within scope, revoke at once.

use reqwest::StatusCode;
use serde_json::{Value, json as body};

use crate::backend_tests;
use crate::harness::{TestApp, json, problem};

backend_tests!(
    create_key_within_scope_and_use_it,
    scope_escalation_is_refused,
    create_key_rejects_invalid_fields_with_pointers,
    revoke_is_immediate_and_idempotent,
    concurrent_creates_all_land,
);

async fn create_key_within_scope_and_use_it(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:read,keys:manage,payments:read").await;
    let response = app
        .post("/v1/api-keys", &admin)
        .json(&body!({"name": "nightly sync", "owner": "erp@acme.test", "scopes": ["payments:read"], "expires_at": "2099-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store", "a response carrying a secret is never cached");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = json(response, StatusCode::CREATED).await;
    assert_eq!(location, format!("/v1/api-keys/{}", created["id"].as_str().unwrap()));
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("pgk_test_key_"), "mode follows the caller");
    assert_eq!(created["mode"], "test");
    assert_eq!(created["scopes"], body!(["payments:read"]));
    assert_eq!(created["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(created["status"], "active");
    let me: Value = json(app.get("/v1/me", &secret).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["key"]["id"], created["id"]);
    assert_eq!(me["company"]["id"], acme.id.to_string());
    // Shown once: reading the key back never includes the secret.
    let read: Value = json(
        app.get(&format!("/v1/api-keys/{}", created["id"].as_str().unwrap()), &admin).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(read.get("secret").is_none());
    assert!(!read.to_string().contains(&secret[secret.len() - 49..]));
}

async fn scope_escalation_is_refused(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:manage").await;
    let response = app
        .post("/v1/api-keys", &admin)
        .json(&body!({"name": "x", "owner": "y", "scopes": ["keys:manage", "payments:approve"]}))
        .send()
        .await
        .unwrap();
    let problem_body = problem(response, StatusCode::FORBIDDEN, "scope_escalation").await;
    assert!(problem_body["detail"].as_str().unwrap().contains("payments:approve"));
    let listed = app
        .store
        .list_api_keys(
            &paygate_store::operator_scope(&*app.store, acme.id, paygate_domain::KeyMode::Test),
            paygate_store::PageRequest { limit: 100, after: None },
        )
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1, "nothing was written");
}

async fn create_key_rejects_invalid_fields_with_pointers(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:manage").await;
    let cases = [
        (body!({"name": "", "owner": "o", "scopes": []}), "/name"),
        (body!({"name": "n", "owner": "a\u{7}b", "scopes": []}), "/owner"),
        (body!({"name": "n", "owner": "o", "scopes": ["keys:manage", "keys:admin"]}), "/scopes/1"),
        (body!({"name": "n", "owner": "o", "scopes": [], "expires_at": "tomorrow"}), "/expires_at"),
        (body!({"name": "n", "owner": "o", "scopes": [], "expires_at": "2001-01-01T00:00:00Z"}), "/expires_at"),
        // Valid RFC 3339 whose UTC form is past year 9999: refused, never a panic.
        (body!({"name": "n", "owner": "o", "scopes": [], "expires_at": "9999-12-31T23:59:59-23:59"}), "/expires_at"),
        (body!({"name": "n", "owner": "alice\u{200B}", "scopes": []}), "/owner"),
        (body!({"name": "x".repeat(201), "owner": "o", "scopes": []}), "/name"),
        (body!({"name": 5, "owner": "o", "scopes": []}), "/name"),
        (body!({"name": "n", "owner": "o", "scopes": "keys:manage"}), "/scopes"),
        (body!({"name": "n", "owner": "o"}), "/scopes"),
        // The company comes only from the key: a body field naming one is refused.
        (body!({"name": "n", "owner": "o", "scopes": [], "company_id": acme.id.to_string()}), "/company_id"),
    ];
    for (request, pointer) in cases {
        let response = app.post("/v1/api-keys", &admin).json(&request).send().await.unwrap();
        let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        let errors = body["errors"].as_array().unwrap_or_else(|| panic!("{request}: {body}"));
        assert!(errors.iter().any(|e| e["pointer"] == pointer), "{request}: {body}");
    }
    let listed = app
        .store
        .list_api_keys(
            &paygate_store::operator_scope(&*app.store, acme.id, paygate_domain::KeyMode::Test),
            paygate_store::PageRequest { limit: 100, after: None },
        )
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1, "no partial writes");
}

async fn revoke_is_immediate_and_idempotent(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:read,keys:manage").await;
    let victim = app.key(acme.id, "keys:read").await;
    let id = paygate_domain::ApiKeyText::parse(&victim).unwrap().id().to_string();
    json(app.get("/v1/me", &victim).send().await.unwrap(), StatusCode::OK).await;
    let first: Value =
        json(app.post(&format!("/v1/api-keys/{id}/revoke"), &admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(first["status"], "revoked");
    // Refused by this node at once, without waiting for the revision poll.
    problem(app.get("/v1/me", &victim).send().await.unwrap(), StatusCode::UNAUTHORIZED, "api_key_revoked").await;
    let second: Value =
        json(app.post(&format!("/v1/api-keys/{id}/revoke"), &admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(second["revoked_at"], first["revoked_at"], "the second revoke changes nothing");
}

async fn concurrent_creates_all_land(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:read,keys:manage").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let request = app
            .post("/v1/api-keys", &admin)
            .json(&body!({"name": format!("k{i}"), "owner": "o", "scopes": ["keys:read"]}));
        tasks.push(tokio::spawn(async move { request.send().await.unwrap().status() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    let body: Value = json(app.get("/v1/api-keys?limit=100", &admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 21);
}
