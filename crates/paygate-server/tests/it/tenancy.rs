//! Company-scoped access (ADR 0002; invariant I1): another company's object is
//! indistinguishable from one that does not exist.

use reqwest::StatusCode;
use serde_json::Value;

use crate::backend_tests;
use crate::harness::{TestApp, json, problem, without_request_id};

backend_tests!(
    another_companys_key_is_indistinguishable_from_a_missing_one,
    lists_show_only_own_keys_and_paginate_newest_first,
    company_cannot_be_selected_by_any_request_field,
);

fn id_of(text: &str) -> String {
    paygate_domain::ApiKeyText::parse(text).unwrap().id().to_string()
}

async fn another_companys_key_is_indistinguishable_from_a_missing_one(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let acme_key = app.key(acme.id, "keys:read,keys:manage").await;
    let globex_key = app.key(globex.id, "keys:read").await;
    let globex_id = id_of(&globex_key);
    let random_id = paygate_domain::ApiKeyId::generate().to_string();

    let foreign = problem(
        app.get(&format!("/v1/api-keys/{globex_id}"), &acme_key).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let missing = problem(
        app.get(&format!("/v1/api-keys/{random_id}"), &acme_key).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let malformed =
        problem(app.get("/v1/api-keys/not-an-id", &acme_key).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found")
            .await;
    assert_eq!(without_request_id(foreign.clone()), without_request_id(missing.clone()));
    assert_eq!(without_request_id(foreign), without_request_id(malformed));

    // Revoking another company's key: same 404, and the key keeps working.
    let foreign = app.post(&format!("/v1/api-keys/{globex_id}/revoke"), &acme_key).send().await.unwrap();
    let foreign = problem(foreign, StatusCode::NOT_FOUND, "not_found").await;
    let missing = app.post(&format!("/v1/api-keys/{random_id}/revoke"), &acme_key).send().await.unwrap();
    let missing = problem(missing, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(without_request_id(foreign), without_request_id(missing));
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    json(app.get("/v1/me", &globex_key).send().await.unwrap(), StatusCode::OK).await;

    // The owner sees it.
    let own: Value =
        json(app.get(&format!("/v1/api-keys/{globex_id}"), &globex_key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(own["id"], globex_id);
    assert_eq!(own["company_id"], globex.id.to_string());
}

async fn lists_show_only_own_keys_and_paginate_newest_first(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let reader = app.key(acme.id, "keys:read").await;
    let mut expected = vec![id_of(&reader)];
    for _ in 0..4 {
        expected.push(id_of(&app.key(acme.id, "payments:read").await));
        app.key(globex.id, "keys:read").await;
    }
    expected.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/api-keys?limit=2&cursor={c}"),
            None => "/v1/api-keys?limit=2".to_owned(),
        };
        let body: Value = json(app.get(&path, &reader).send().await.unwrap(), StatusCode::OK).await;
        pages += 1;
        assert_eq!(body["object"], "list");
        for k in body["data"].as_array().unwrap() {
            assert_eq!(k["company_id"], acme.id.to_string());
            assert!(k.get("secret").is_none() && k.get("secret_hash").is_none());
            seen.push(k["id"].as_str().unwrap().to_owned());
        }
        if !body["has_more"].as_bool().unwrap() {
            assert!(body["next_cursor"].is_null());
            break;
        }
        cursor = Some(body["next_cursor"].as_str().unwrap().to_owned());
        // Inserted mid-walk: newer than the cursor, so it never shifts later pages.
        app.key(acme.id, "payments:read").await;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);
    let default_page: Value = json(app.get("/v1/api-keys", &reader).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(default_page["data"].as_array().unwrap().len(), 7);
}

async fn company_cannot_be_selected_by_any_request_field(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let acme_key = app.key(acme.id, "keys:read").await;
    app.key(globex.id, "keys:read").await;
    let g = globex.id.to_string();
    // Headers and query fields that might select a tenant are ignored or refused.
    let response = app
        .get("/v1/api-keys", &acme_key)
        .header("x-company-id", &g)
        .header("paygate-company", &g)
        .send()
        .await
        .unwrap();
    let body: Value = json(response, StatusCode::OK).await;
    assert!(body["data"].as_array().unwrap().iter().all(|k| k["company_id"] == acme.id.to_string()));
    let refused = app.get(&format!("/v1/api-keys?company_id={g}"), &acme_key).send().await.unwrap();
    problem(refused, StatusCode::BAD_REQUEST, "invalid_parameter").await;
    let me: Value =
        json(app.get("/v1/me", &acme_key).header("x-company-id", &g).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["company"]["id"], acme.id.to_string());
}
