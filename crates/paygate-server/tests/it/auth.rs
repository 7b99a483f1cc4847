//! Authentication and authorization over HTTP (ADR 0001; invariant I3).

use paygate_domain::{CompanyStatus, KeyMode, Scope};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::backend_tests;
use crate::harness::{TestApp, json, problem, with_other_secret, without_request_id};

backend_tests!(
    unauthenticated_requests_all_get_the_same_401,
    revoked_expired_and_suspended_keys_are_refused,
    missing_scope_is_403_naming_the_scope,
    every_v1_route_declares_a_scope,
    me_returns_the_calling_key_and_company,
    a_route_without_a_scope_cannot_answer,
    a_handler_under_another_routes_declaration_cannot_answer,
    concurrent_requests_from_two_companies_never_cross,
);

async fn unauthenticated_requests_all_get_the_same_401(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let unknown = app.hasher.generate(KeyMode::Test).text.to_string();
    let mut bad_checksum = key.clone().into_bytes();
    let last = bad_checksum.len() - 1;
    bad_checksum[last] = if bad_checksum[last] == b'x' { b'y' } else { b'x' };
    let bad_checksum = String::from_utf8(bad_checksum).unwrap();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("empty bearer", Some("Bearer ".into())),
        ("other scheme", Some(format!("Basic {key}"))),
        ("malformed", Some("Bearer pgk_live_nonsense".into())),
        ("bad checksum", Some(format!("Bearer {bad_checksum}"))),
        ("unknown key", Some(format!("Bearer {unknown}"))),
        ("wrong secret", Some(format!("Bearer {}", with_other_secret(&key)))),
        ("mode edited", Some(format!("Bearer {}", key.replacen("pgk_test", "pgk_live", 1)))),
    ];
    let mut bodies = Vec::new();
    for (label, header) in cases {
        let mut request = app.http.get(format!("{}/v1/me", app.base));
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        let response = request.send().await.unwrap();
        let www = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        assert!(www.as_deref().is_some_and(|w| w.starts_with("Bearer")), "{label}: {www:?}");
        let body = problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
        bodies.push((label, without_request_id(body)));
    }
    for (label, body) in &bodies[1..] {
        assert_eq!(body, &bodies[0].1, "{label} must be indistinguishable from a missing key");
    }
    // The scheme is case-insensitive (RFC 9110): the same key works as "bearer".
    let ok = app
        .http
        .get(format!("{}/v1/me", app.base))
        .header("authorization", format!("bearer {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

async fn revoked_expired_and_suspended_keys_are_refused(app: TestApp) {
    let acme = app.company("Acme").await;
    let revoked = app.key(acme.id, "keys:read").await;
    let id = paygate_domain::ApiKeyText::parse(&revoked).unwrap().id();
    json(app.get("/v1/me", &revoked).send().await.unwrap(), StatusCode::OK).await;
    app.store
        .revoke_api_key_by_id(id, paygate_domain::now(), &crate::harness::op("api_key.revoke", acme.id))
        .await
        .unwrap();
    // Same node: the cache drops within one revision poll.
    let mut refused = None;
    for _ in 0..50 {
        let r = app.get("/v1/me", &revoked).send().await.unwrap();
        if r.status() == StatusCode::UNAUTHORIZED {
            refused = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let refused = refused.expect("revoked key refused within 1 s");
    assert!(refused.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
    problem(refused, StatusCode::UNAUTHORIZED, "api_key_revoked").await;

    let expiring = app.key_with(acme.id, "keys:read", KeyMode::Test, Some(time::Duration::seconds(1))).await;
    json(app.get("/v1/me", &expiring).send().await.unwrap(), StatusCode::OK).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    problem(app.get("/v1/me", &expiring).send().await.unwrap(), StatusCode::UNAUTHORIZED, "api_key_expired").await;

    let live = app.key(acme.id, "keys:read").await;
    // Cached before the suspension: only the revision signal can refuse it.
    json(app.get("/v1/me", &live).send().await.unwrap(), StatusCode::OK).await;
    app.store
        .set_company_status(acme.id, CompanyStatus::Suspended, &crate::harness::op("company.suspend", acme.id))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let body =
        problem(app.get("/v1/me", &live).send().await.unwrap(), StatusCode::FORBIDDEN, "company_suspended").await;
    assert!(!body.to_string().contains(&live), "the key is never echoed");
    app.store
        .set_company_status(acme.id, CompanyStatus::Active, &crate::harness::op("company.suspend", acme.id))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    json(app.get("/v1/me", &live).send().await.unwrap(), StatusCode::OK).await;
}

async fn missing_scope_is_403_naming_the_scope(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "payments:read").await;
    let response = app.get("/v1/api-keys", &key).send().await.unwrap();
    let www = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert_eq!(www, "Bearer realm=\"paygate\", error=\"insufficient_scope\", scope=\"keys:read\"");
    let body = problem(response, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert_eq!(body["scope"], "keys:read");
    assert!(body["detail"].as_str().unwrap().contains("keys:read"));
    // /v1/me is declared open to any valid key, even one with no scopes.
    let bare = app.key(acme.id, "").await;
    json(app.get("/v1/me", &bare).send().await.unwrap(), StatusCode::OK).await;
}

/// Walks every operation of the generated OpenAPI document (which utoipa-axum
/// builds from the same handlers as the router): each `/v1` operation must
/// declare a bearer security requirement, refuse a request without a key, and
/// refuse a key holding every scope but the declared one. A route added without
/// an `Authorized<…>` extractor, or whose documentation and extractor disagree,
/// fails here (invariant I3, deny by default).
async fn every_v1_route_declares_a_scope(app: TestApp) {
    let acme = app.company("Acme").await;
    let doc = paygate_api::openapi();
    let mut walked = 0;
    // The only operations open to any valid key, whatever its scopes.
    let open_to_any_key = ["GET /v1/me"];
    let mut open = Vec::new();
    for (path, item) in doc.paths.paths.iter() {
        assert!(path.starts_with("/v1/"), "{path} is outside /v1");
        let concrete = path.replace("{id}", "key_0000000000000000000000");
        let ops = [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::PATCH, &item.patch),
            (Method::DELETE, &item.delete),
        ];
        for (method, op) in ops {
            let Some(op) = op else { continue };
            walked += 1;
            let security = op.security.as_ref().unwrap_or_else(|| panic!("{method} {path} declares no security"));
            let value = serde_json::to_value(security).unwrap();
            let scopes: Vec<String> = value[0]["api_key"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path}: no api_key requirement in {value}"))
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect();
            assert!(scopes.len() <= 1, "{method} {path}: one scope per route");
            if scopes.is_empty() {
                open.push(format!("{method} {path}"));
            }

            let anonymous = app.request(method.clone(), &concrete, None).send().await.unwrap();
            assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{method} {path} without a key");

            if let Some(required) = scopes.first() {
                let scope =
                    Scope::parse(required).unwrap_or_else(|_| panic!("{method} {path}: unknown scope {required}"));
                let others: Vec<&str> = Scope::ALL.iter().filter(|s| **s != scope).map(|s| s.as_str()).collect();
                let key = app.key(acme.id, &others.join(",")).await;
                let response = app
                    .request(method.clone(), &concrete, Some(&key))
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                let body = problem(response, StatusCode::FORBIDDEN, "insufficient_scope").await;
                assert_eq!(body["scope"], required.as_str(), "{method} {path}");
            }
        }
    }
    assert!(walked >= 6, "walked only {walked} operations");
    assert_eq!(open, open_to_any_key, "an operation declares no scope");
}

async fn me_returns_the_calling_key_and_company(app: TestApp) {
    let acme = app.company("Acme GmbH").await;
    let key = app.key_with(acme.id, "keys:read,payments:read", KeyMode::Live, Some(time::Duration::days(30))).await;
    let body: Value = json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(body["company"]["id"], acme.id.to_string());
    assert_eq!(body["company"]["name"], "Acme GmbH");
    assert_eq!(body["key"]["id"], paygate_domain::ApiKeyText::parse(&key).unwrap().id().to_string());
    assert_eq!(body["key"]["mode"], "live");
    assert_eq!(body["key"]["scopes"], serde_json::json!(["payments:read", "keys:read"]));
    assert!(body["key"]["expires_at"].is_string());
    assert!(!body.to_string().contains(&key[key.len() - 49..]), "no secret in the body");
}

async fn concurrent_requests_from_two_companies_never_cross(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let mut keys = Vec::new();
    for i in 0..6 {
        let company = if i % 2 == 0 { &acme } else { &globex };
        keys.push((company.id, app.key(company.id, "keys:read").await));
    }
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (company, key) in &keys {
            let request = app.get("/v1/api-keys", key);
            let company = *company;
            tasks.push(tokio::spawn(async move {
                let body: Value = request.send().await.unwrap().json().await.unwrap();
                let data = body["data"].as_array().unwrap();
                assert_eq!(data.len(), 3, "round {round}");
                assert!(data.iter().all(|k| k["company_id"] == company.to_string()));
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The run-time half of deny by default: a handler served behind
/// `paygate_api::protect` that never takes `Authorized<R>` cannot answer 2xx.
async fn a_route_without_a_scope_cannot_answer(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, &Scope::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")).await;
    let state = app.server.as_ref().unwrap().state.clone();
    let forgetful = axum::Router::new().route("/v1/forgetful", axum::routing::get(|| async { "company data" }));
    paygate_api::route! { Guarded { scope: KeysRead, audit: ApiKeyList, limit: Read } }
    let guarded = axum::Router::new()
        .route("/v1/guarded", axum::routing::get(|_: paygate_api::auth::Authorized<Guarded>| async { "ok" }));
    let router = paygate_api::protect(forgetful.merge(guarded), state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    let http = crate::harness::http();
    let refused = http.get(format!("http://{addr}/v1/forgetful")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!refused.text().await.unwrap().contains("company data"));
    let allowed = http.get(format!("http://{addr}/v1/guarded")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
}

/// A handler whose `Authorized<R>` names another declaration than the route it
/// serves would check one scope and be limited and audited as another: it is
/// refused, whatever scopes the key holds.
async fn a_handler_under_another_routes_declaration_cannot_answer(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, &Scope::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")).await;
    let state = app.server.as_ref().unwrap().state.clone();
    paygate_api::route! { Borrowed { scope: KeysRead, audit: ApiKeyList, limit: Read } }
    // `/v1/me` is declared (as `GetMeRoute`) in the real router.
    let misdeclared = axum::Router::new()
        .route("/v1/me", axum::routing::get(|_: paygate_api::auth::Authorized<Borrowed>| async { "company data" }));
    let router = paygate_api::protect(misdeclared, state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    let http = crate::harness::http();
    let refused = http.get(format!("http://{addr}/v1/me")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!refused.text().await.unwrap().contains("company data"));
    // Served by the real router, the same path answers.
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
}
