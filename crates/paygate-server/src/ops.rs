//! The operations listener: `/metrics`, `/healthz`, `/readyz`. Separate from the
//! API so metrics are never exposed to API clients by accident.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use paygate_store::Store;

#[derive(Clone)]
struct OpsState {
    store: Arc<dyn Store>,
    metrics: PrometheusHandle,
}

pub fn router(store: Arc<dyn Store>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(OpsState { store, metrics })
}

async fn render_metrics(State(state): State<OpsState>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    state.metrics.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

async fn ready(State(state): State<OpsState>) -> (StatusCode, &'static str) {
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n"),
    }
}
