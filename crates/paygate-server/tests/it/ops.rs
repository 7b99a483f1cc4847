//! The operations listener.

use reqwest::StatusCode;

use crate::backend_tests;
use crate::harness::TestApp;

backend_tests!(ops_listener_serves_health_readiness_and_metrics);

async fn ops_listener_serves_health_readiness_and_metrics(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    app.get("/v1/api-keys", &key).send().await.unwrap();
    app.request(reqwest::Method::GET, "/v1/me", None).send().await.unwrap();
    // Client-chosen methods never become metric labels (bounded series, I10).
    let odd = reqwest::Method::from_bytes(b"FROBNICATE").unwrap();
    app.request(odd, "/v1/me", Some(&key)).send().await.unwrap();
    let health = app.http.get(format!("{}/healthz", app.ops)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = app.http.get(format!("{}/readyz", app.ops)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = app.http.get(format!("{}/metrics", app.ops)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("paygate_http_requests_total{route=\"/v1/api-keys\",method=\"GET\",status=\"2xx\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("paygate_http_request_duration_seconds_bucket"));
    assert!(!metrics.contains("FROBNICATE"));
    assert!(metrics.contains("method=\"other\""));
    assert!(metrics.contains("paygate_auth_failures_total{reason=\"missing\"}"));
    // Metrics are not on the API listener.
    let on_api = app.request(reqwest::Method::GET, "/metrics", None).send().await.unwrap();
    assert_eq!(on_api.status(), StatusCode::NOT_FOUND);
    app.shutdown().await;
}
