//! Rate limiting and resource protection over HTTP. SQLite cases use the
//! in-process limiter; PostgreSQL cases use Redis (when configured).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::backend_tests;
use crate::harness::{TestApp, json, problem};

backend_tests!(
    every_authenticated_response_names_its_tightest_policy,
    key_limit_refuses_with_retry_after,
    a_client_following_the_headers_gets_what_they_promise,
    company_limit_aggregates_its_keys,
    failed_authentication_throttles_the_address_even_for_a_valid_key,
    client_address_limit_applies_before_authentication,
    write_concurrency_is_capped_per_company,
    overload_sheds_new_requests_with_503,
);

/// Parses `"name";a=1;b=2` into (name, [(a, 1), (b, 2)]), strictly.
fn structured(value: &str) -> (String, Vec<(String, u64)>) {
    let mut parts = value.split(';');
    let name = parts.next().unwrap();
    assert!(name.starts_with('"') && name.ends_with('"') && name.len() > 2, "{value}");
    let params = parts
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("{value}"));
            assert!(k.chars().all(|c| c.is_ascii_lowercase()), "{value}");
            (k.to_owned(), v.parse().unwrap_or_else(|_| panic!("{value}")))
        })
        .collect();
    (name.trim_matches('"').to_owned(), params)
}

fn param(params: &[(String, u64)], name: &str) -> u64 {
    params.iter().find(|(k, _)| k == name).unwrap_or_else(|| panic!("no {name}")).1
}

async fn with(app: TestApp, settings: &[(&str, &str)]) -> TestApp {
    let backend = app.backend;
    app.shutdown().await;
    TestApp::spawn_with(backend, settings).await.unwrap()
}

async fn every_authenticated_response_names_its_tightest_policy(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let mut last_remaining = u64::MAX;
    let mut last_at = std::time::Instant::now();
    for _ in 0..3 {
        let r = app.get("/v1/me", &key).send().await.unwrap();
        // The key's bucket refills 100 a second: a slow round trip (PostgreSQL
        // and Redis on a loaded machine) may give back what a request took.
        let refilled = (last_at.elapsed().as_millis() as u64).div_ceil(10);
        last_at = std::time::Instant::now();
        let (policy_name, policy) = structured(r.headers()["ratelimit-policy"].to_str().unwrap());
        let (state_name, state) = structured(r.headers()["ratelimit"].to_str().unwrap());
        assert_eq!(policy_name, state_name);
        // Defaults: key 100/s burst 200, company 500/s burst 1000; the key is
        // tighter. Its burst refills in 2 s, during which it admits at most
        // 200 + 199 requests.
        assert_eq!(policy_name, "key");
        assert_eq!((param(&policy, "q"), param(&policy, "w")), (399, 2));
        let remaining = param(&state, "r");
        assert!(remaining <= last_remaining.saturating_add(refilled) && remaining < param(&policy, "q"));
        // More quota comes back within one interval (10 ms), not when the bucket is full.
        assert_eq!(param(&state, "t"), 1);
        last_remaining = remaining;
    }
    // Errors of an authenticated caller carry them too; unauthenticated ones do not.
    let r = app.get("/v1/api-keys/nope", &key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers().contains_key("ratelimit"));
    let r = app.request(Method::GET, "/v1/me", None).send().await.unwrap();
    assert!(!r.headers().contains_key("ratelimit"));
}

async fn key_limit_refuses_with_retry_after(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let other = app.key(acme.id, "keys:read").await;
    let id = paygate_domain::ApiKeyText::parse(&key).unwrap().id().to_string();
    let out = app.cli(&["admin", "key", "set-limits", &id, "--rate", "1", "--burst", "3"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(400)).await; // the override reaches the key cache
    for i in 0..3 {
        json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
        let _ = i;
    }
    let refused = app.get("/v1/me", &key).send().await.unwrap();
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry_after), "{retry_after}");
    let (name, policy) = structured(refused.headers()["ratelimit-policy"].to_str().unwrap());
    // 1/s, burst 3: refilled in 3 s, which admit 3 at once plus 2 refills.
    assert_eq!((name.as_str(), param(&policy, "q"), param(&policy, "w")), ("key", 5, 3));
    let (_, state) = structured(refused.headers()["ratelimit"].to_str().unwrap());
    assert_eq!((param(&state, "r"), param(&state, "t")), (0, retry_after));
    let body = problem(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(body["policy"], "key");
    // Another key of the same company is not affected.
    json(app.get("/v1/me", &other).send().await.unwrap(), StatusCode::OK).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    // With Redis configured (PostgreSQL runs), the decisions came from Redis.
    if app.env.contains_key("PAYGATE_REDIS_URL") {
        assert_eq!(app.server.as_ref().unwrap().state.limits.limiter.backend(), paygate_ratelimit::Backend::Redis);
    }
    // Bad input to the CLI.
    let out = app.cli(&["admin", "key", "set-limits", &id, "--rate", "0", "--burst", "3"]).await;
    assert!(!out.status.success());
}

/// Over several advertised windows a client that sends while `r` > 0 and
/// otherwise waits `t` is never refused, and gets the advertised quota in the
/// first window and never more in any window.
async fn a_client_following_the_headers_gets_what_they_promise(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let id = paygate_domain::ApiKeyText::parse(&key).unwrap().id().to_string();
    // 1/s, burst 2: the burst refills in 2 s, which admit 2 + 1 (t is whole
    // seconds, so a slow rate keeps the waits exact).
    let out = app.cli(&["admin", "key", "set-limits", &id, "--rate", "1", "--burst", "2"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = std::time::Instant::now();
    let mut admitted: Vec<(std::time::Instant, std::time::Instant)> = Vec::new();
    let mut window = None;
    while started.elapsed() < Duration::from_secs(6) {
        let sent = std::time::Instant::now();
        let r = app.get("/v1/me", &key).send().await.unwrap();
        let answered = std::time::Instant::now();
        assert_eq!(r.status(), StatusCode::OK, "refused after following the headers");
        let (_, policy) = structured(r.headers()["ratelimit-policy"].to_str().unwrap());
        let (_, state) = structured(r.headers()["ratelimit"].to_str().unwrap());
        let (q, w) = (param(&policy, "q"), param(&policy, "w"));
        assert_eq!((q, w), (3, 2));
        window = Some((q, Duration::from_secs(w)));
        admitted.push((sent, answered));
        if param(&state, "r") == 0 {
            tokio::time::sleep(Duration::from_secs(param(&state, "t"))).await;
        }
    }
    let (quota, window) = window.unwrap();
    let first = admitted.iter().filter(|(sent, _)| *sent < started + window).count() as u64;
    assert_eq!(first, quota, "the first window admits the advertised quota");
    for (i, (sent, _)) in admitted.iter().enumerate() {
        let within = admitted[i..].iter().take_while(|(_, answered)| *answered < *sent + window).count() as u64;
        assert!(within <= quota, "{within} admitted within one window of {window:?}");
    }
    // One more than allowed right now is refused with t equal to Retry-After.
    let mut last = None;
    for _ in 0..3 {
        last = Some(app.get("/v1/me", &key).send().await.unwrap());
    }
    let refused = last.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let (_, state) = structured(refused.headers()["ratelimit"].to_str().unwrap());
    assert_eq!((param(&state, "r"), param(&state, "t")), (0, retry_after));
    if app.env.contains_key("PAYGATE_REDIS_URL") {
        assert_eq!(app.server.as_ref().unwrap().state.limits.limiter.backend(), paygate_ratelimit::Backend::Redis);
    }
}

async fn company_limit_aggregates_its_keys(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let keys = [app.key(acme.id, "keys:read").await, app.key(acme.id, "keys:read").await];
    let globex_key = app.key(globex.id, "keys:read").await;
    let out = app.cli(&["admin", "company", "set-limits", &acme.id.to_string(), "--rate", "1", "--burst", "4"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut admitted = 0;
    let mut refused = None;
    for i in 0..8 {
        let r = app.get("/v1/me", &keys[i % 2]).send().await.unwrap();
        if r.status() == StatusCode::OK {
            admitted += 1;
        } else {
            refused = Some(r);
        }
    }
    assert_eq!(admitted, 4, "the company's burst is shared by its keys");
    let body = problem(refused.unwrap(), StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(body["policy"], "company");
    if app.env.contains_key("PAYGATE_REDIS_URL") {
        assert_eq!(app.server.as_ref().unwrap().state.limits.limiter.backend(), paygate_ratelimit::Backend::Redis);
    }
    // One company cannot starve another.
    json(app.get("/v1/me", &globex_key).send().await.unwrap(), StatusCode::OK).await;
}

async fn failed_authentication_throttles_the_address_even_for_a_valid_key(app: TestApp) {
    let app = with(app, &[("PAYGATE_AUTH_FAILURE_LIMIT", "5/2")]).await;
    let acme = app.company("Acme").await;
    let valid = app.key(acme.id, "keys:read").await;
    json(app.get("/v1/me", &valid).send().await.unwrap(), StatusCode::OK).await;
    for bad in ["pgk_live_guess1", "pgk_live_guess2", "nonsense", "pgk_test_x", "pgk_test_y"] {
        problem(app.get("/v1/me", bad).send().await.unwrap(), StatusCode::UNAUTHORIZED, "unauthenticated").await;
    }
    // The sixth attempt is refused before any key is looked at, valid or not.
    let refused = app.get("/v1/me", &valid).send().await.unwrap();
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry_after), "{retry_after}");
    let body = problem(refused, StatusCode::TOO_MANY_REQUESTS, "auth_throttled").await;
    assert_eq!(body["policy"], "auth_failures");
    problem(
        app.get("/v1/me", "pgk_live_guess3").send().await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "auth_throttled",
    )
    .await;
    // After the cool-down (one 400 ms slot of a 5-per-2-s allowance), the valid key works.
    tokio::time::sleep(Duration::from_millis(500)).await;
    json(app.get("/v1/me", &valid).send().await.unwrap(), StatusCode::OK).await;
}

async fn client_address_limit_applies_before_authentication(app: TestApp) {
    let app = with(app, &[("PAYGATE_CLIENT_RATE_LIMIT", "1/4")]).await;
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    for _ in 0..4 {
        json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    }
    let body = problem(
        app.request(Method::GET, "/v1/me", None).send().await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
    assert_eq!(body["policy"], "client");
}

/// A request whose body arrives slowly holds its write slot (and its in-flight
/// place) until the body is complete.
fn slow_body(delay: Duration) -> reqwest::Body {
    let chunks = futures_util::stream::unfold(0u8, move |step| async move {
        match step {
            0 => Some((Ok::<_, std::io::Error>(b"{\"name\":\"slow\",".to_vec()), 1)),
            1 => {
                tokio::time::sleep(delay).await;
                Some((Ok(b"\"owner\":\"o\",\"scopes\":[]}".to_vec()), 2))
            }
            _ => None,
        }
    });
    reqwest::Body::wrap_stream(chunks)
}

async fn write_concurrency_is_capped_per_company(app: TestApp) {
    let app = with(app, &[("PAYGATE_WRITE_CONCURRENCY", "2")]).await;
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let key = app.key(acme.id, "keys:read,keys:manage").await;
    let globex_key = app.key(globex.id, "keys:manage").await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let request = app
            .post("/v1/api-keys", &key)
            .header("content-type", "application/json")
            .body(slow_body(Duration::from_millis(1500)));
        slow.push(tokio::spawn(async move { request.send().await.unwrap().status() }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = app
        .post("/v1/api-keys", &key)
        .json(&serde_json::json!({"name": "n", "owner": "o", "scopes": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(third.headers()["retry-after"], "1");
    let body = problem(third, StatusCode::TOO_MANY_REQUESTS, "concurrency_limited").await;
    assert_eq!(body["policy"], "write_concurrency");
    // Reads are not writes, and other companies have their own slots.
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    json(
        app.post("/v1/api-keys", &globex_key)
            .json(&serde_json::json!({"name": "n", "owner": "o", "scopes": []}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    for t in slow {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    // Slots are released when the requests end.
    json(
        app.post("/v1/api-keys", &key)
            .json(&serde_json::json!({"name": "n", "owner": "o", "scopes": []}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
}

async fn overload_sheds_new_requests_with_503(app: TestApp) {
    let app = with(app, &[("PAYGATE_MAX_IN_FLIGHT", "2")]).await;
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:manage").await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let request = app
            .post("/v1/api-keys", &key)
            .header("content-type", "application/json")
            .body(slow_body(Duration::from_millis(1500)));
        slow.push(tokio::spawn(async move { request.send().await.unwrap().status() }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shed = app.get("/v1/me", &key).send().await.unwrap();
    assert_eq!(shed.headers()["retry-after"], "1");
    problem(shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    // Health endpoints keep answering.
    let health = app.http.get(format!("{}/healthz", app.ops)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    for t in slow {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    let body: Value = json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(body["company"]["id"], acme.id.to_string());
}
