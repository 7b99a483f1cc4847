//! A narrower key never gains through a wider key's objects: it cannot
//! redirect, re-enable or re-key a webhook endpoint whose events it may not
//! read, and the keys it mints or rotates are bounded by its own scopes,
//! allow-list and expiry. On both databases.

use paygate_domain::{AllowedCidrs, KeyMode, ScopeSet};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::backend_tests;
use crate::harness::{TestApp, json as body_of, problem};

backend_tests!(
    a_narrow_key_cannot_change_an_endpoint_it_could_not_read,
    minted_keys_stay_within_the_minters_allow_list_and_expiry,
    rotation_refuses_keys_wider_than_the_caller,
);

/// Every read scope: this key may subscribe to and change anything.
const WIDE: &str = "webhooks:manage,events:read,payees:read,payments:read,keys:read,policy:manage";

async fn endpoint(app: &TestApp, key: &str, url: &str, types: Value) -> Value {
    let body = json!({"url": url, "event_types": types});
    body_of(app.post("/v1/webhook-endpoints", key).json(&body).send().await.unwrap(), StatusCode::CREATED).await
}

/// Every write route on one endpoint, with a body that would change it.
fn endpoint_writes(id: &str) -> Vec<(Method, String, Option<Value>)> {
    let path = format!("/v1/webhook-endpoints/{id}");
    vec![
        (Method::PATCH, path.clone(), Some(json!({"url": "http://127.0.0.1:9/attacker"}))),
        (Method::PATCH, path.clone(), Some(json!({"enabled": true}))),
        (Method::PATCH, path.clone(), Some(json!({"enabled": false}))),
        (Method::PATCH, path.clone(), Some(json!({"description": "mine now"}))),
        (Method::PATCH, path.clone(), Some(json!({"event_types": ["*"]}))),
        (Method::PATCH, path.clone(), Some(json!({"event_types": ["webhook_endpoint.disabled"]}))),
        (Method::POST, format!("{path}/rotate-secret"), None),
    ]
}

async fn send(app: &TestApp, key: &str, (method, path, body): &(Method, String, Option<Value>)) -> reqwest::Response {
    let request = app.request(method.clone(), path, Some(key));
    match body {
        Some(b) => request.json(b),
        None => request,
    }
    .send()
    .await
    .unwrap()
}

async fn a_narrow_key_cannot_change_an_endpoint_it_could_not_read(app: TestApp) {
    let acme = app.company("Acme").await;
    let wide = app.key(acme.id, WIDE).await;
    let everything = endpoint(&app, &wide, "http://127.0.0.1:9/all", json!(["*"])).await;
    let payees_only = endpoint(&app, &wide, "http://127.0.0.1:9/payees", json!(["payee.created"])).await;
    let keys_only = endpoint(&app, &wide, "http://127.0.0.1:9/keys", json!(["api_key.created"])).await;
    let everything_id = everything["id"].as_str().unwrap();
    let payees_id = payees_only["id"].as_str().unwrap();
    let keys_id = keys_only["id"].as_str().unwrap();

    // `webhooks:manage` alone reads none of these types: every write is refused,
    // naming the scope it lacks, and changes nothing.
    let narrow = app.key(acme.id, "webhooks:manage").await;
    for (id, missing) in [(everything_id, None), (payees_id, Some("payees:read")), (keys_id, Some("keys:read"))] {
        let before =
            body_of(app.get(&format!("/v1/webhook-endpoints/{id}"), &wide).send().await.unwrap(), StatusCode::OK).await;
        for write in endpoint_writes(id) {
            let refused = problem(send(&app, &narrow, &write).await, StatusCode::FORBIDDEN, "insufficient_scope").await;
            if let Some(scope) = missing {
                assert!(refused["detail"].as_str().unwrap().contains(scope), "{write:?}: {refused}");
            }
        }
        let after =
            body_of(app.get(&format!("/v1/webhook-endpoints/{id}"), &wide).send().await.unwrap(), StatusCode::OK).await;
        assert_eq!(before, after, "a refused write changed the endpoint");
        assert!(after["previous_secret_expires_at"].is_null(), "the secret was rotated");
    }

    // The same refusals under concurrency: none slips through.
    let burst = endpoint_writes(payees_id);
    let results = futures_join(&app, &narrow, &burst).await;
    assert!(results.iter().all(|s| *s == StatusCode::FORBIDDEN), "{results:?}");

    // A key that reads what the endpoint receives may change it; the
    // subscription decides, not who created the endpoint.
    let payee_reader = app.key(acme.id, "webhooks:manage,payees:read").await;
    for write in endpoint_writes(payees_id).into_iter().filter(|(_, _, b)| {
        // Widening to "*" is bounded to what this key reads, checked separately below.
        b.as_ref().is_none_or(|b| b.get("event_types").is_none())
    }) {
        let response = send(&app, &payee_reader, &write).await;
        assert_eq!(response.status(), StatusCode::OK, "{write:?}");
    }
    problem(send(&app, &payee_reader, &endpoint_writes(keys_id)[0]).await, StatusCode::FORBIDDEN, "insufficient_scope")
        .await;
    let widened = body_of(
        send(
            &app,
            &payee_reader,
            &(Method::PATCH, format!("/v1/webhook-endpoints/{payees_id}"), Some(json!({"event_types": ["*"]}))),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert!(
        !widened["event_types"].as_array().unwrap().iter().any(|t| t.as_str().unwrap().starts_with("api_key.")),
        "{widened}"
    );

    // The narrow key still manages endpoints of its own.
    let own = endpoint(&app, &narrow, "http://127.0.0.1:9/own", json!(["*"])).await;
    for write in endpoint_writes(own["id"].as_str().unwrap()) {
        assert_eq!(send(&app, &narrow, &write).await.status(), StatusCode::OK, "{write:?}");
    }

    // Another company, and the other mode, see no endpoint at all.
    let other = app.company("Other").await;
    let other_wide = app.key(other.id, WIDE).await;
    let live_wide = app.key_with(acme.id, WIDE, KeyMode::Live, None).await;
    for key in [&other_wide, &live_wide] {
        for mut write in endpoint_writes(everything_id) {
            // A live key may not name an http:// URL at all (422 before any lookup).
            if let Some(body) = write.2.as_mut().filter(|b| b.get("url").is_some()) {
                body["url"] = json!("https://127.0.0.1:9/attacker");
            }
            problem(send(&app, key, &write).await, StatusCode::NOT_FOUND, "not_found").await;
        }
    }
    // Bad input is still a 422 for a caller allowed to change the endpoint,
    // and the scope check does not turn a missing endpoint into a 403.
    let bad = (Method::PATCH, format!("/v1/webhook-endpoints/{everything_id}"), Some(json!({"url": "ftp://x"})));
    assert_eq!(send(&app, &wide, &bad).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let missing = endpoint_writes("we_00000000000000000000000000");
    problem(send(&app, &narrow, &missing[0]).await, StatusCode::NOT_FOUND, "not_found").await;
}

async fn futures_join(app: &TestApp, key: &str, writes: &[(Method, String, Option<Value>)]) -> Vec<StatusCode> {
    let mut tasks = tokio::task::JoinSet::new();
    for write in writes.iter().cloned() {
        let request = app.request(write.0.clone(), &write.1, Some(key));
        let request = match write.2 {
            Some(b) => request.json(&b),
            None => request,
        };
        tasks.spawn(async move { request.send().await.unwrap().status() });
    }
    tasks.join_all().await
}

/// An operator-issued key pinned to loopback and expiring in an hour.
async fn pinned_key(app: &TestApp, company: paygate_domain::CompanyId, scopes: &str) -> String {
    let request = paygate_server::admin::KeyRequest {
        company,
        name: "pinned",
        owner: "ops",
        scopes: ScopeSet::parse_list(scopes).unwrap(),
        mode: KeyMode::Test,
        expires_in: Some(time::Duration::hours(1)),
        allowed_cidrs: AllowedCidrs::parse_list("127.0.0.0/8").unwrap(),
    };
    let (_, text) = paygate_server::admin::create_key(&*app.store, &app.hasher, request).await.unwrap();
    text.to_string()
}

fn ts(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
}

async fn minted_keys_stay_within_the_minters_allow_list_and_expiry(app: TestApp) {
    let acme = app.company("Acme").await;
    let minter = pinned_key(&app, acme.id, "keys:manage,keys:read,payments:read").await;
    let me = body_of(app.get("/v1/me", &minter).send().await.unwrap(), StatusCode::OK).await;
    let minter_expiry = ts(&me["key"]["expires_at"]);
    let create = |extra: Value| {
        let mut body = json!({"name": "child", "owner": "ops", "scopes": ["payments:read"]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        app.post("/v1/api-keys", &minter).json(&body).send()
    };

    // Omitted constraints are the minter's, not "anywhere, forever".
    let child = body_of(create(json!({})).await.unwrap(), StatusCode::CREATED).await;
    assert_eq!(child["allowed_cidrs"], json!(["127.0.0.0/8"]));
    assert!(ts(&child["expires_at"]) <= minter_expiry, "{child}");
    body_of(app.get("/v1/me", child["secret"].as_str().unwrap()).send().await.unwrap(), StatusCode::OK).await;

    // Narrower is fine.
    let soon = (time::OffsetDateTime::now_utc() + time::Duration::minutes(30)).replace_nanosecond(0).unwrap();
    let soon_text = soon.format(&time::format_description::well_known::Rfc3339).unwrap();
    let narrower = body_of(
        create(json!({"allowed_cidrs": ["127.0.0.1"], "expires_at": soon_text})).await.unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(narrower["allowed_cidrs"], json!(["127.0.0.1/32"]));
    assert_eq!(ts(&narrower["expires_at"]), soon);

    // Wider is refused with a pointer at each widening field.
    for (extra, pointers) in [
        (json!({"allowed_cidrs": ["0.0.0.0/0"]}), vec!["/allowed_cidrs/0"]),
        (json!({"allowed_cidrs": ["127.0.0.1", "10.0.0.0/8"]}), vec!["/allowed_cidrs/1"]),
        (json!({"allowed_cidrs": ["::/0"]}), vec!["/allowed_cidrs/0"]),
        (json!({"expires_at": "2099-01-01T00:00:00Z"}), vec!["/expires_at"]),
        (
            json!({"allowed_cidrs": ["127.0.0.0/7"], "expires_at": "2099-01-01T00:00:00Z"}),
            vec!["/allowed_cidrs/0", "/expires_at"],
        ),
    ] {
        let refused =
            problem(create(extra.clone()).await.unwrap(), StatusCode::FORBIDDEN, "constraint_escalation").await;
        let got: Vec<&str> =
            refused["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
        assert_eq!(got, pointers, "{extra}");
    }
    // Nothing was created by the refusals.
    let keys = body_of(app.get("/v1/api-keys", &minter).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 3, "{keys}");

    // A second company's pinned minter has its own ceiling, and the ceilings
    // hold when several children are minted at once.
    let other = app.company("Other").await;
    let other_minter = pinned_key(&app, other.id, "keys:manage,payments:read").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let request = app
            .post("/v1/api-keys", &other_minter)
            .json(&json!({"name": "child", "owner": "ops", "scopes": ["payments:read"]}));
        tasks.spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() });
    }
    for child in tasks.join_all().await {
        assert_eq!(child["allowed_cidrs"], json!(["127.0.0.0/8"]), "{child}");
        assert!(child["expires_at"].is_string(), "{child}");
    }
}

async fn rotation_refuses_keys_wider_than_the_caller(app: TestApp) {
    let acme = app.company("Acme").await;
    let pinned_admin = pinned_key(&app, acme.id, "keys:manage,keys:read,payments:read").await;
    let id_of = |text: &str| paygate_domain::ApiKeyText::parse(text).unwrap().id().to_string();
    let rotate = |key: &str, id: &str| app.post(&format!("/v1/api-keys/{id}/rotate"), key).send();

    // A key usable from anywhere, forever: a pinned, expiring caller may not
    // re-issue it, since the successor's secret would be the caller's.
    let unbounded = app.key(acme.id, "payments:read").await;
    problem(rotate(&pinned_admin, &id_of(&unbounded)).await.unwrap(), StatusCode::FORBIDDEN, "constraint_escalation")
        .await;
    // Nor one with the same allow-list but no expiry.
    let request = paygate_server::admin::KeyRequest {
        company: acme.id,
        name: "forever",
        owner: "ops",
        scopes: ScopeSet::parse_list("payments:read").unwrap(),
        mode: KeyMode::Test,
        expires_in: None,
        allowed_cidrs: AllowedCidrs::parse_list("127.0.0.0/8").unwrap(),
    };
    let (forever, _) = paygate_server::admin::create_key(&*app.store, &app.hasher, request).await.unwrap();
    problem(
        rotate(&pinned_admin, &forever.id.to_string()).await.unwrap(),
        StatusCode::FORBIDDEN,
        "constraint_escalation",
    )
    .await;
    // The refused keys were not rotated: a wide admin still can.
    let wide_admin = app.key(acme.id, "keys:manage,payments:read").await;
    body_of(rotate(&wide_admin, &id_of(&unbounded)).await.unwrap(), StatusCode::CREATED).await;

    // A key within the caller's ceilings rotates, and its successor never
    // outlives the caller.
    let me = body_of(app.get("/v1/me", &pinned_admin).send().await.unwrap(), StatusCode::OK).await;
    let child = body_of(
        app.post("/v1/api-keys", &pinned_admin)
            .json(&json!({"name": "child", "owner": "ops", "scopes": ["payments:read"]}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let successor =
        body_of(rotate(&pinned_admin, child["id"].as_str().unwrap()).await.unwrap(), StatusCode::CREATED).await;
    assert!(ts(&successor["expires_at"]) <= ts(&me["key"]["expires_at"]), "{successor}");
    assert_eq!(successor["allowed_cidrs"], json!(["127.0.0.0/8"]));
    // Rotating itself keeps its own expiry: a key cannot renew itself forever.
    let own = body_of(rotate(&pinned_admin, &id_of(&pinned_admin)).await.unwrap(), StatusCode::CREATED).await;
    assert!(ts(&own["expires_at"]) <= ts(&me["key"]["expires_at"]), "{own}");

    // Another company's key does not exist for this caller.
    let other = app.company("Other").await;
    let foreign = app.key(other.id, "payments:read").await;
    problem(rotate(&wide_admin, &id_of(&foreign)).await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
}
