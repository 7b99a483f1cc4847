//! Refusals at the edge of the protocol, as problem+json: header sizes hyper
//! would otherwise accept up to its buffer (about 400 KB per header).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error_code::ErrorCode;
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
                ErrorCode::HeadersTooLarge,
                format!(
                    "A header value may have at most {MAX_HEADER_VALUE_BYTES} bytes, all headers together {MAX_HEADER_BYTES}."
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}
