//! Step 1 of the pipeline: the request id, the per-request span, metrics, and
//! the final rendering of problems (which needs the request id).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::problem::{self, ApiError, PROBLEM_CONTENT_TYPE};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of the current request, as an extension. Held inline (at
/// most 64 ASCII characters): it is made for every request.
#[derive(Clone, Copy)]
pub struct RequestId {
    len: u8,
    bytes: [u8; MAX_CLIENT_ID],
}

/// The longest client-supplied request id accepted.
const MAX_CLIENT_ID: usize = 64;

impl RequestId {
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever copied in (checked or generated).
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }

    fn from_ascii(text: &[u8]) -> Self {
        let mut id = Self { len: text.len() as u8, bytes: [0; MAX_CLIENT_ID] };
        id.bytes[..text.len()].copy_from_slice(text);
        id
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client id is accepted only if short and made of `[A-Za-z0-9._-]`, so it is
/// safe in logs and headers; anything else is replaced by a generated one.
pub fn accept_client_id(value: Option<&HeaderValue>) -> Option<RequestId> {
    let text = value?.as_bytes();
    let ok = !text.is_empty()
        && text.len() <= MAX_CLIENT_ID
        && text.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| RequestId::from_ascii(text))
}

/// `req_` and a UUIDv7 in base62: unique and time-ordered.
pub fn generate() -> RequestId {
    let digits = paygate_domain::base62::encode_fixed_array(uuid::Uuid::now_v7().as_u128());
    let mut text = [0u8; 4 + paygate_domain::base62::U128_WIDTH];
    text[..4].copy_from_slice(b"req_");
    text[4..].copy_from_slice(&digits);
    RequestId::from_ascii(&text)
}

/// Pre-registered series of `paygate_http_requests_total` and
/// `paygate_http_request_duration_seconds` for every documented operation:
/// every series exists from start-up, and a request bumps a handle instead
/// of building and hashing a metric key.
pub struct HttpMetrics {
    routes: HashMap<String, Vec<(&'static str, RouteSeries)>>,
}

struct RouteSeries {
    /// Answers by status class: 1xx … 5xx.
    by_class: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RouteSeries {
    fn register(route: &str, method: &'static str) -> Self {
        let counter = |class: &'static str| metrics::counter!(REQUESTS, "route" => route.to_owned(), "method" => method, "status" => class);
        Self {
            by_class: CLASSES.map(counter),
            duration: metrics::histogram!(DURATION, "route" => route.to_owned(), "method" => method),
        }
    }
}

const REQUESTS: &str = "paygate_http_requests_total";
const DURATION: &str = "paygate_http_request_duration_seconds";

impl HttpMetrics {
    /// Series for each `(route template, method)` pair, e.g. from the OpenAPI document.
    pub fn new<'a>(operations: impl IntoIterator<Item = (&'a str, &'static str)>) -> Self {
        let mut routes: HashMap<String, Vec<(&'static str, RouteSeries)>> = HashMap::new();
        for (route, method) in operations {
            let series = RouteSeries::register(route, method);
            routes.entry(route.to_owned()).or_default().push((method, series));
        }
        Self { routes }
    }

    fn record(&self, route: &str, method: &'static str, class: usize, elapsed: Duration) {
        let found = self.routes.get(route).and_then(|m| m.iter().find(|(name, _)| *name == method));
        match found {
            Some((_, series)) => {
                series.by_class[class].increment(1);
                series.duration.record(elapsed.as_secs_f64());
            }
            // Undocumented pairs (a HEAD, a 405, an unmatched path): still a
            // bounded label set, registered on first use.
            None => {
                let route = route.to_owned();
                metrics::counter!(REQUESTS, "route" => route.clone(), "method" => method, "status" => CLASSES[class])
                    .increment(1);
                metrics::histogram!(DURATION, "route" => route, "method" => method).record(elapsed.as_secs_f64());
            }
        }
    }
}

pub async fn middleware(State(http_metrics): State<Arc<HttpMetrics>>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = accept_client_id(request.headers().get(REQUEST_ID_HEADER)).unwrap_or_else(generate);
    request.extensions_mut().insert(id);
    let method = method_label(request.method());
    // The matched template is shared (`Arc<str>`): no copy per request.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map(MatchedPath::as_str).unwrap_or("unmatched");
    let span = tracing::info_span!(
        "request",
        request_id = %id.as_str(),
        method = %request.method().as_str(),
        route = %route,
        client_ip = tracing::field::Empty,
        company_id = tracing::field::Empty,
        key_id = tracing::field::Empty,
    );
    let mut response = next.run(request).instrument(span.clone()).await;

    if let Some(error) = response.extensions_mut().remove::<ApiError>() {
        response = problem::render(error, id.as_str(), response);
    } else if (response.status().is_client_error() || response.status().is_server_error()) && !is_problem(&response) {
        response = problem::render(ApiError::for_status(response.status()), id.as_str(), response);
    }
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }

    let status = response.status();
    let elapsed = started.elapsed();
    let class = match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    };
    http_metrics.record(route, method, class, elapsed);
    span.in_scope(|| {
        tracing::info!(status = status.as_u16(), latency_us = elapsed.as_micros() as u64, "request completed");
    });
    response
}

/// A closed set of labels: a client-chosen method must never mint a metric series.
pub fn method_label(method: &axum::http::Method) -> &'static str {
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
