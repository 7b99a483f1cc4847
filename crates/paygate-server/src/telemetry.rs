//! Logs (tracing: readable text by default, JSON when configured) and the
//! Prometheus recorder behind `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global log subscriber. Logs go to stderr; stdout is for command
/// output (keys, JSON).
pub fn init_logs(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
    };
}

/// The process-wide Prometheus handle, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for metric in METRICS {
                if let Some(buckets) = metric.buckets {
                    builder = builder
                        .set_buckets_for_metric(Matcher::Full(metric.name.to_owned()), buckets)
                        .expect("static buckets are valid");
                }
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if a recorder is already installed (another test server).
            if metrics::set_global_recorder(recorder).is_ok() {
                describe_and_register();
            }
            handle
        })
        .clone()
}

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric Paygate exports: its HELP text, the buckets of a histogram,
/// and the label sets known up front (each registered at start-up, so a
/// dashboard or alert sees a zero before the first event, not a gap).
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub buckets: Option<&'static [f64]>,
    pub series: &'static [&'static [(&'static str, &'static str)]],
}

const NO_LABELS: &[&[(&str, &str)]] = &[&[]];
/// Latencies of requests served in microseconds to seconds.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Records or payments per group-commit transaction (the writers cap a batch at 1,000).
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

const fn counter(
    name: &'static str,
    help: &'static str,
    series: &'static [&'static [(&'static str, &'static str)]],
) -> Metric {
    Metric { name, kind: Kind::Counter, help, buckets: None, series }
}

const fn gauge(
    name: &'static str,
    help: &'static str,
    series: &'static [&'static [(&'static str, &'static str)]],
) -> Metric {
    Metric { name, kind: Kind::Gauge, help, buckets: None, series }
}

const fn histogram(name: &'static str, help: &'static str, buckets: &'static [f64]) -> Metric {
    Metric { name, kind: Kind::Histogram, help, buckets: Some(buckets), series: NO_LABELS }
}

/// Every metric, in one place (a test checks the code emits no other). The
/// per-route HTTP series are registered by the API router from its own routes.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "paygate_http_requests_total",
        kind: Kind::Counter,
        help: "HTTP API answers by route template, method and status class.",
        buckets: None,
        series: &[],
    },
    Metric {
        name: "paygate_http_request_duration_seconds",
        kind: Kind::Histogram,
        help: "Time from receiving an API request to its answer, by route template and method.",
        buckets: Some(LATENCY_BUCKETS),
        series: &[],
    },
    gauge("paygate_http_requests_in_flight", "API requests being served by this node.", NO_LABELS),
    gauge("paygate_http_connections_open", "Client connections open on the API listener of this node.", NO_LABELS),
    counter(
        "paygate_http_connections_refused_total",
        "Client connections closed at once because the node had max_connections open.",
        NO_LABELS,
    ),
    counter(
        "paygate_http_connections_idle_closed_total",
        "Client connections (HTTP/1 or h2c) closed after idle_timeout_secs without a request.",
        NO_LABELS,
    ),
    counter(
        "paygate_overload_shed_total",
        "API requests refused with 503 overloaded because the node was at max_in_flight.",
        NO_LABELS,
    ),
    counter(
        "paygate_auth_failures_total",
        "Refused authentications by reason.",
        &[
            &[("reason", "missing")],
            &[("reason", "malformed")],
            &[("reason", "bad_checksum")],
            &[("reason", "unknown_key")],
            &[("reason", "wrong_secret")],
            &[("reason", "revoked")],
            &[("reason", "expired")],
            &[("reason", "company_suspended")],
            &[("reason", "ip_not_allowed")],
            &[("reason", "store_unavailable")],
        ],
    ),
    counter(
        "paygate_key_cache_lookups_total",
        "Key lookups by the authenticator: hit (verified key cached), negative_hit (id cached as unknown), miss (read from the store).",
        &[&[("result", "hit")], &[("result", "negative_hit")], &[("result", "miss")]],
    ),
    counter("paygate_key_store_lookups_total", "Key records read from the store (cache misses).", NO_LABELS),
    gauge("paygate_key_cache_entries", "Verified keys cached on this node.", NO_LABELS),
    gauge("paygate_key_cache_unknown_entries", "Unknown key ids cached as absent on this node.", NO_LABELS),
    counter(
        "paygate_key_usage_dropped_total",
        "last_used_at updates dropped: queue_full (too many pending) or store (the flush failed).",
        &[&[("reason", "queue_full")], &[("reason", "store")]],
    ),
    gauge("paygate_key_usage_pending", "Key usage records waiting for the next flush.", NO_LABELS),
    counter(
        "paygate_rate_limited_total",
        "Requests refused by a limit, by policy.",
        &[
            &[("policy", "client")],
            &[("policy", "auth_failures")],
            &[("policy", "key")],
            &[("policy", "company")],
            &[("policy", "write_concurrency")],
        ],
    ),
    gauge(
        "paygate_ratelimit_degraded",
        "1 while Redis is configured but unreachable and limits are enforced in process.",
        NO_LABELS,
    ),
    counter(
        "paygate_ratelimit_degradations_total",
        "Times the limiter fell back from Redis to in-process limits.",
        NO_LABELS,
    ),
    gauge(
        "paygate_ratelimit_entries",
        "Limits tracked in process, by map (anonymous: client and failed-auth; authenticated: key and company).",
        &[&[("map", "anonymous")], &[("map", "authenticated")]],
    ),
    counter(
        "paygate_ratelimit_evictions_total",
        "Live in-process limits evicted early because their shard was full.",
        NO_LABELS,
    ),
    counter("paygate_audit_records_total", "Audit records appended to the store.", NO_LABELS),
    histogram("paygate_audit_batch_records", "Audit records per group-commit transaction.", BATCH_BUCKETS),
    gauge("paygate_audit_queue_records", "Audit records waiting for the writer, sampled at each enqueue.", NO_LABELS),
    counter(
        "paygate_audit_unavailable_total",
        "Audit records not written (the request got 503): queue (full too long), timeout (commit too slow), store (transaction failed), aggregate (an aggregated record).",
        &[&[("reason", "queue")], &[("reason", "timeout")], &[("reason", "store")], &[("reason", "aggregate")]],
    ),
    gauge(
        "paygate_audit_aggregating_addresses",
        "Address and action pairs with an open failed-authentication aggregate.",
        NO_LABELS,
    ),
    histogram("paygate_payment_batch_payments", "Payment creations per group-commit transaction.", BATCH_BUCKETS),
    counter(
        "paygate_payment_step_failures_total",
        "Payment worker steps (expiry, settlement) that failed and will be retried.",
        NO_LABELS,
    ),
    counter(
        "paygate_webhook_deliveries_total",
        "Webhook delivery attempts by result.",
        &[&[("result", "succeeded")], &[("result", "failed")]],
    ),
    Metric {
        name: "paygate_webhook_delivery_failures_total",
        kind: Kind::Counter,
        help: "Failed webhook delivery attempts by endpoint and reason.",
        buckets: None,
        series: &[],
    },
    gauge("paygate_webhook_deliveries_in_flight", "Webhook delivery attempts running on this node.", NO_LABELS),
    counter(
        "paygate_webhook_secret_unreadable_total",
        "Webhook deliveries skipped because the endpoint's secret could not be decrypted.",
        NO_LABELS,
    ),
];

/// HELP text for every metric and a zero for every known series.
fn describe_and_register() {
    for metric in METRICS {
        let labels = |set: &[(&'static str, &'static str)]| -> Vec<metrics::Label> {
            set.iter().map(|(k, v)| metrics::Label::from_static_parts(k, v)).collect()
        };
        match metric.kind {
            Kind::Counter => {
                metrics::describe_counter!(metric.name, metric.help);
                for set in metric.series {
                    metrics::counter!(metric.name, labels(set)).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(metric.name, metric.help);
                for set in metric.series {
                    metrics::gauge!(metric.name, labels(set)).increment(0.0);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(metric.name, metric.help);
                for set in metric.series {
                    let _ = metrics::histogram!(metric.name, labels(set));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code emits is in [`METRICS`] (so it has HELP text),
    /// and every catalogued metric is emitted somewhere.
    #[test]
    fn every_emitted_metric_is_catalogued() {
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let mut emitted = std::collections::BTreeSet::new();
        let mut stack = vec![crates];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    if !matches!(name.as_str(), "target" | "tests" | "benches" | "paygate-bench") {
                        stack.push(path);
                    }
                    continue;
                }
                if !name.ends_with(".rs") || path.ends_with("telemetry.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    let metric_like =
                        piece.starts_with("paygate_") && piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                    // A metrics macro call: `counter!("name"`, `gauge!("name"`, `histogram!("name"`.
                    if metric_like && text.contains(&format!("!(\"{piece}\"")) {
                        emitted.insert(piece.to_owned());
                    }
                }
            }
        }
        emitted.insert("paygate_http_requests_total".into());
        emitted.insert("paygate_http_request_duration_seconds".into());
        let catalogued: std::collections::BTreeSet<String> = METRICS.iter().map(|m| m.name.to_owned()).collect();
        let missing: Vec<_> = emitted.difference(&catalogued).collect();
        assert!(missing.is_empty(), "emitted without HELP text in METRICS: {missing:?}");
        let unused: Vec<_> = catalogued.difference(&emitted).collect();
        assert!(unused.is_empty(), "catalogued but never emitted: {unused:?}");
        for metric in METRICS {
            assert!(!metric.help.is_empty(), "{} has no HELP", metric.name);
            assert_eq!(metric.kind == Kind::Histogram, metric.buckets.is_some(), "{}", metric.name);
            if metric.kind == Kind::Counter {
                assert!(metric.name.ends_with("_total"), "{}: counters end in _total", metric.name);
            }
        }
    }
}
