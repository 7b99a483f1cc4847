//! Step 1 of the pipeline: the request id, the per-request span, metrics, and
//! the final rendering of problems (which needs the request id).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::problem::{self, ApiError, PROBLEM_CONTENT_TYPE};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of the current request, as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A client id is accepted only if short and made of `[A-Za-z0-9._-]`, so it is
/// safe in logs and headers; anything else is replaced by a generated one.
pub fn accept_client_id(value: Option<&HeaderValue>) -> Option<String> {
    let text = value?.to_str().ok()?;
    let ok = !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| text.to_owned())
}

pub fn generate() -> String {
    let mut s = String::with_capacity(26);
    s.push_str("req_");
    paygate_domain::base62::encode_fixed(uuid::Uuid::now_v7().as_u128(), paygate_domain::base62::U128_WIDTH, &mut s);
    s
}

pub async fn middleware(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = accept_client_id(request.headers().get(REQUEST_ID_HEADER)).unwrap_or_else(generate);
    request.extensions_mut().insert(RequestId(id.clone()));
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = %route,
        client_ip = tracing::field::Empty,
        company_id = tracing::field::Empty,
        key_id = tracing::field::Empty,
    );
    let mut response = next.run(request).instrument(span.clone()).await;

    if let Some(error) = response.extensions_mut().remove::<ApiError>() {
        response = problem::render(error, &id, response);
    } else if (response.status().is_client_error() || response.status().is_server_error()) && !is_problem(&response) {
        response = problem::render(ApiError::for_status(response.status()), &id, response);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }

    let status = response.status();
    let elapsed = started.elapsed();
    let class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let method = method_label(&method);
    metrics::counter!("paygate_http_requests_total", "route" => route.clone(), "method" => method, "status" => class)
        .increment(1);
    metrics::histogram!("paygate_http_request_duration_seconds", "route" => route, "method" => method)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(status = status.as_u16(), latency_us = elapsed.as_micros() as u64, "request completed");
    });
    response
}

/// A closed set of labels: a client-chosen method must never mint a metric series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn is_problem(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_CONTENT_TYPE.as_bytes()))
}
