//! Paygate's HTTP API.
//!
//! [`router`] builds the whole API: `/v1` behind the authentication middleware,
//! `/openapi.json` outside it, and the layers every response passes through
//! (request id, problem rendering, metrics, body limit, timeout).

pub mod audit;
pub mod auth;
pub mod client;
pub mod error_code;
pub mod extract;
pub mod limits;
pub mod pagination;
pub mod payment_writer;
pub mod problem;
pub mod ratelimit_headers;
pub mod request_id;
pub mod routes;
pub mod views;
pub mod wire;

use crate::error_code::ErrorCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use paygate_store::Store;
use paygate_store::auth::Authenticator;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::problem::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<limits::RateLimits>,
    pub audit: audit::AuditWriter,
    /// The Ed25519 public key that verifies this deployment's checkpoints.
    pub audit_public_key: [u8; 32],
    /// Encrypts payees' account numbers and computes their fingerprints.
    pub data_key: Arc<paygate_domain::bank::DataKey>,
    /// Group commit of payment creations.
    pub payments: payment_writer::PaymentWriter,
    /// How long an approved test-mode payment waits before the simulated
    /// rail picks it up.
    pub rail_submit_delay: Duration,
    /// Which addresses webhook endpoint URLs may name (operator allow-list).
    pub webhook_addresses: Arc<paygate_domain::webhook::AddressPolicy>,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The whole body must arrive within this time (408 otherwise).
    pub body_read_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
            body_read_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Paygate API",
        description = "Secure integration API for payment automation. Every `/v1` route needs `Authorization: Bearer <key>`; errors are RFC 9457 problem details.",
        version = "1.0.0",
    ),
    modifiers(&BearerAuth),
    components(schemas(problem::Problem, problem::FieldError)),
    tags(
        (name = "identity", description = "The calling key"),
        (name = "api-keys", description = "The company's API keys"),
        (name = "audit", description = "The company's tamper-evident audit log"),
        (name = "payees", description = "Who the company pays, with validated bank accounts"),
        (name = "payments", description = "Idempotent payments, four-eyes approval and settlement"),
        (name = "events", description = "Every change of a payment, payee, key or policy, for backfill"),
        (name = "webhooks", description = "Signed (Standard Webhooks) delivery of events to the company's endpoints"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("pgk_{live|test}_key_<id>_<secret><checksum>".into());
        components.add_security_scheme("api_key", SecurityScheme::Http(http));
    }
}

/// The `/v1` routes (paths relative to `/v1`) and their OpenAPI description,
/// built from the same handlers so neither can drift from the other.
fn v1() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(routes::me::get_me))
        .routes(routes!(routes::api_keys::list_api_keys, routes::api_keys::create_api_key))
        .routes(routes!(routes::api_keys::revoke_api_key))
        .routes(routes!(routes::api_keys::rotate_api_key))
        .routes(routes!(routes::audit::list_audit_events))
        .routes(routes!(routes::audit::export_audit_events))
        .routes(routes!(routes::audit::get_audit_event))
        .routes(routes!(routes::audit::get_audit_chain))
        .routes(routes!(routes::api_keys::get_api_key))
        .routes(routes!(routes::payees::list_payees, routes::payees::create_payee))
        .routes(routes!(routes::payees::get_payee))
        .routes(routes!(routes::payees::disable_payee))
        .routes(routes!(routes::payments::list_payments, routes::payments::create_payment))
        .routes(routes!(routes::payments::get_payment, routes::payments::update_payment))
        .routes(routes!(routes::payments::approve_payment))
        .routes(routes!(routes::payments::reject_payment))
        .routes(routes!(routes::payments::cancel_payment))
        .routes(routes!(routes::policy::get_approval_policy, routes::policy::put_approval_policy))
        .routes(routes!(routes::events::list_events))
        .routes(routes!(routes::events::get_event))
        .routes(routes!(routes::events::redeliver_event))
        .routes(routes!(routes::webhooks::list_webhook_endpoints, routes::webhooks::create_webhook_endpoint))
        .routes(routes!(
            routes::webhooks::get_webhook_endpoint,
            routes::webhooks::update_webhook_endpoint,
            routes::webhooks::delete_webhook_endpoint
        ))
        .routes(routes!(routes::webhooks::rotate_webhook_secret))
        .routes(routes!(routes::webhooks::test_webhook_endpoint))
        .routes(routes!(routes::webhooks::list_webhook_deliveries))
}

/// The OpenAPI document, as served at `/openapi.json` and committed as `openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi()).nest("/v1", v1()).split_for_parts().1
}

/// Pretty JSON of [`openapi`], with a trailing newline.
pub fn openapi_json() -> String {
    let mut text = openapi().to_pretty_json().expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

pub fn router(state: AppState, config: &ApiConfig) -> Router {
    let (v1, _) = v1().split_for_parts();
    let doc = openapi();
    let http_metrics = Arc::new(request_id::HttpMetrics::new(operations(&doc)));
    let doc_json = Arc::new(openapi_json());
    let limits = state.limits.clone();
    let audit_writer = state.audit.clone();
    let v1 = protect(v1, state);
    let timeout = config.request_timeout;
    Router::new()
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc_json.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], doc.as_str().to_owned()) }
            }),
        )
        // The page each problem `type` points into.
        .route(
            "/errors",
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
                    error_code::ErrorCode::markdown(),
                )
            }),
        )
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(config.max_body_bytes))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(middleware::from_fn(move |req: Request, next: Next| with_timeout(timeout, req, next)))
        .layer(middleware::from_fn_with_state(limits.clone(), limits::client_middleware))
        .layer(middleware::from_fn_with_state(limits, limits::overload_middleware))
        // Inside the audit layer too, so a panic's 500 is recorded like any answer.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(wire::header_bounds))
        .layer(middleware::from_fn_with_state(audit_writer, audit::middleware))
        .layer(middleware::from_fn_with_state(Arc::new(config.trusted_proxies.clone()), client::middleware))
        // A panic in a handler is a bug: answer 500 problem+json, keep serving.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn_with_state(http_metrics, request_id::middleware))
}

/// Every `(path template, method)` the document describes.
fn operations(doc: &utoipa::openapi::OpenApi) -> Vec<(&str, &'static str)> {
    let mut out = Vec::new();
    for (path, item) in doc.paths.paths.iter() {
        for (method, op) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ] {
            if op.is_some() {
                out.push((path.as_str(), method));
            }
        }
    }
    out
}

/// Puts routes behind authentication and the run-time scope guard. Public so
/// that tests can prove the guard refuses a route that declares no scope.
///
/// Authentication wraps the fallback too: an unknown `/v1` path is 401 without
/// a valid key and 404 with one, so route existence is not an oracle.
pub fn protect(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::middleware))
        .with_state(state)
}

/// A panic is a bug: answer 500 problem+json and keep serving.
fn panicked(_: Box<dyn std::any::Any + Send>) -> Response {
    tracing::error!("request handler panicked");
    ApiError::internal().into_response()
}

async fn not_found() -> ApiError {
    ApiError::for_status(axum::http::StatusCode::NOT_FOUND)
}

async fn method_not_allowed() -> ApiError {
    ApiError::for_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
}

async fn with_timeout(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(ErrorCode::Timeout, "The request took too long; it may or may not have taken effect.")
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    /// ADR 0002: the API crate never reaches for operator powers. A
    /// `CompanyScope` here comes only from authentication.
    #[test]
    fn the_api_never_names_operator_capabilities() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![src];
        let mut files = 0;
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                files += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                let code: String =
                    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
                let code = without_test_items(&code);
                for forbidden in ["OperatorStore", "operator_scope", "revoke_api_key_by_id"] {
                    assert!(!code.contains(forbidden), "{} names {forbidden}", path.display());
                }
            }
        }
        assert!(files > 5);
    }

    /// The code with each `#[cfg(test)]` item cut out (up to its `;` or its
    /// matching closing brace): whatever follows a test module is still scanned.
    fn without_test_items(code: &str) -> String {
        let mut kept = String::new();
        let mut rest = code;
        while let Some(start) = rest.find("#[cfg(test)]") {
            kept.push_str(&rest[..start]);
            let item = &rest[start..];
            let end = match (item.find('{'), item.find(';')) {
                (Some(open), semi) if semi.is_none_or(|s| open < s) => {
                    let mut depth = 0;
                    let close = item[open..]
                        .char_indices()
                        .find(|&(_, c)| {
                            depth += match c {
                                '{' => 1,
                                '}' => -1,
                                _ => 0,
                            };
                            depth == 0
                        })
                        .map(|(i, _)| open + i + 1);
                    close.unwrap_or(item.len())
                }
                (_, Some(semi)) => semi + 1,
                _ => item.len(),
            };
            rest = &item[end..];
        }
        kept.push_str(rest);
        kept
    }

    #[test]
    fn the_capability_scan_reads_past_test_modules() {
        let code = "fn a() {}\n#[cfg(test)]\nmod tests { fn t() { let _ = \"{}\"; } }\nfn b() { operator_scope() }\n#[cfg(test)] use x;\nfn c() {}";
        let kept = without_test_items(code);
        assert!(kept.contains("fn a()") && kept.contains("operator_scope") && kept.contains("fn c()"), "{kept}");
        assert!(!kept.contains("fn t()") && !kept.contains("use x"), "{kept}");
    }
}
