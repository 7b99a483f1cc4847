//! Refusals at the edge of the protocol, as problem+json: header sizes hyper
//! would otherwise accept up to its buffer (about 400 KB per header), and a
//! body that stops arriving (408, not the request timeout's 503 half a minute
//! later).

use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::problem::ApiError;

/// Largest single header value.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// Largest sum of header names and values.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// 431 `headers_too_large` for one oversized header or too many bytes in all.
pub async fn header_bounds(request: Request, next: Next) -> Response {
    let mut total = 0;
    for (name, value) in request.headers() {
        total += name.as_str().len() + value.len();
        if value.len() > MAX_HEADER_VALUE_BYTES || total > MAX_HEADER_BYTES {
            return ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "Request headers too large",
                format!(
                    "A header value may have at most {MAX_HEADER_VALUE_BYTES} bytes, all headers together {MAX_HEADER_BYTES}."
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Reads the whole body (at most `max_bytes`) within `timeout` before the
/// request goes further: a client that stalls mid-body gets 408, an
/// oversized body 413, both before any handler or store work.
pub async fn body_deadline(timeout: Duration, max_bytes: usize, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let too_large = std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source())
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::payload_too_large().into_response()
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "Invalid body", "The body could not be read.")
                    .into_response()
            };
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "Request body timeout",
                format!("The request body did not arrive within {} seconds.", timeout.as_secs()),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}
