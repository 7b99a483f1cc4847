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
mod openapi;
pub mod pagination;
pub mod payment_writer;
pub mod problem;
pub mod ratelimit_headers;
pub mod request_id;
pub mod route;
pub mod routes;
mod state;
pub mod views;
pub mod wire;

use crate::error_code::ErrorCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::problem::ApiError;
pub use crate::state::AppState;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { max_body_bytes: 64 * 1024, request_timeout: Duration::from_secs(30), trusted_proxies: Vec::new() }
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

/// The `/v1` routes (paths relative to `/v1`), each under its declaration,
/// and their OpenAPI description, built from the same handlers so neither can
/// drift from the other.
fn v1() -> route::Routes {
    use routes::*;
    route::Routes::new()
        .route::<me::GetMeRoute>(routes!(me::get_me))
        .route::<api_keys::ListApiKeysRoute>(routes!(api_keys::list_api_keys))
        .route::<api_keys::CreateApiKeyRoute>(routes!(api_keys::create_api_key))
        .route::<api_keys::RevokeApiKeyRoute>(routes!(api_keys::revoke_api_key))
        .route::<api_keys::RotateApiKeyRoute>(routes!(api_keys::rotate_api_key))
        .route::<audit::ListAuditEventsRoute>(routes!(audit::list_audit_events))
        .route::<audit::ExportAuditEventsRoute>(routes!(audit::export_audit_events))
        .route::<audit::GetAuditEventRoute>(routes!(audit::get_audit_event))
        .route::<audit::GetAuditChainRoute>(routes!(audit::get_audit_chain))
        .route::<api_keys::GetApiKeyRoute>(routes!(api_keys::get_api_key))
        .route::<payees::ListPayeesRoute>(routes!(payees::list_payees))
        .route::<payees::CreatePayeeRoute>(routes!(payees::create_payee))
        .route::<payees::GetPayeeRoute>(routes!(payees::get_payee))
        .route::<payees::DisablePayeeRoute>(routes!(payees::disable_payee))
        .route::<payments::ListPaymentsRoute>(routes!(payments::list_payments))
        .route::<payments::CreatePaymentRoute>(routes!(payments::create_payment))
        .route::<payments::GetPaymentRoute>(routes!(payments::get_payment))
        .route::<payments::UpdatePaymentRoute>(routes!(payments::update_payment))
        .route::<payments::ApprovePaymentRoute>(routes!(payments::approve_payment))
        .route::<payments::RejectPaymentRoute>(routes!(payments::reject_payment))
        .route::<payments::CancelPaymentRoute>(routes!(payments::cancel_payment))
        .route::<policy::GetApprovalPolicyRoute>(routes!(policy::get_approval_policy))
        .route::<policy::PutApprovalPolicyRoute>(routes!(policy::put_approval_policy))
        .route::<events::ListEventsRoute>(routes!(events::list_events))
        .route::<events::GetEventRoute>(routes!(events::get_event))
        .route::<events::RedeliverEventRoute>(routes!(events::redeliver_event))
        .route::<webhooks::ListWebhookEndpointsRoute>(routes!(webhooks::list_webhook_endpoints))
        .route::<webhooks::CreateWebhookEndpointRoute>(routes!(webhooks::create_webhook_endpoint))
        .route::<webhooks::GetWebhookEndpointRoute>(routes!(webhooks::get_webhook_endpoint))
        .route::<webhooks::UpdateWebhookEndpointRoute>(routes!(webhooks::update_webhook_endpoint))
        .route::<webhooks::DeleteWebhookEndpointRoute>(routes!(webhooks::delete_webhook_endpoint))
        .route::<webhooks::RotateWebhookSecretRoute>(routes!(webhooks::rotate_webhook_secret))
        .route::<webhooks::TestWebhookEndpointRoute>(routes!(webhooks::test_webhook_endpoint))
        .route::<webhooks::ListWebhookDeliveriesRoute>(routes!(webhooks::list_webhook_deliveries))
}

/// The OpenAPI document, as served at `/openapi.json` and committed as `openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    serde_json::from_value(openapi_value()).expect("the completed document is an OpenAPI document")
}

fn openapi_value() -> serde_json::Value {
    let generated =
        OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi()).nest("/v1", v1().into_parts().0).split_for_parts().1;
    let mut doc = serde_json::to_value(generated).expect("the OpenAPI document serializes");
    openapi::exact(&mut doc);
    doc
}

/// Pretty JSON of [`openapi`], with a trailing newline.
pub fn openapi_json() -> String {
    let mut text = serde_json::to_string_pretty(&openapi_value()).expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

pub fn router(state: AppState, config: &ApiConfig) -> Router {
    let (v1, _) = v1().into_parts().0.split_for_parts();
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
