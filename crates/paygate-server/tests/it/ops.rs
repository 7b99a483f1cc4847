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
    // Every metric has HELP text, and known series exist before their first event.
    for metric in paygate_server::telemetry::METRICS {
        let name = metric.name;
        // A metric whose labels are open (e.g. per endpoint) has no series until used.
        if !metric.series.is_empty() || metrics.contains(&format!("\n{name}")) {
            assert!(metrics.contains(&format!("# HELP {name} ")), "{name} has no HELP line:\n{metrics}");
        }
    }
    assert!(metrics.contains("paygate_webhook_deliveries_total{result=\"failed\"}"), "{metrics}");
    assert!(metrics.contains("paygate_audit_batch_records_bucket{le=\"1000\"}"), "batch sizes have count buckets");
    assert!(
        metrics.contains("paygate_http_requests_total{route=\"/v1/payments\",method=\"POST\",status=\"5xx\"}"),
        "every documented operation's series exists from start-up"
    );
    promtool_check(&metrics);
    // Metrics are not on the API listener.
    let on_api = app.request(reqwest::Method::GET, "/metrics", None).send().await.unwrap();
    assert_eq!(on_api.status(), StatusCode::NOT_FOUND);
    app.shutdown().await;
}

/// `promtool check metrics` on a scrape. CI installs promtool (Debian package
/// `prometheus`); without CI a missing promtool skips the check, loudly.
fn promtool_check(metrics: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but promtool cannot run ({error}): apt-get install prometheus"
            );
            eprintln!("SKIPPED promtool check: promtool not found ({error})");
            return;
        }
    };
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let findings = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && findings.trim().is_empty(), "promtool check metrics:\n{findings}");
}
