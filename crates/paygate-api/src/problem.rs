//! RFC 9457 problem details. Every error Paygate sends, including the
//! framework's own rejections, leaves as `application/problem+json` with a
//! stable `code` and the request id.
//!
//! Handlers return [`ApiError`]; it travels as a response extension and the
//! outermost middleware ([`crate::request_id`]) renders it, because only that
//! layer knows the request id. Any other 4xx/5xx response without a problem body
//! (a 405 from the router, a 413 from the body limit) is rendered there too.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error_code::ErrorCode;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One field-level problem: `pointer` is a JSON Pointer into the request body,
/// `parameter` names a query or path parameter.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn pointer(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { pointer: Some(pointer.into()), parameter: None, detail: detail.into() }
    }

    pub fn parameter(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { pointer: None, parameter: Some(name.into()), detail: detail.into() }
    }
}

/// The problem body. `type` is `/errors#<code>`: the code's section of the
/// errors page this API serves at `/errors` (a reference relative to its URL).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    #[schema(example = "/errors#not_found")]
    pub type_: String,
    #[schema(example = "Not found")]
    pub title: String,
    #[schema(example = 404, minimum = 100, maximum = 599)]
    pub status: u16,
    #[schema(example = "No such API key.")]
    pub detail: String,
    /// Stable, snake_case; safe to branch on.
    #[schema(example = "not_found")]
    pub code: String,
    pub request_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The scope that was missing, for `insufficient_scope`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The violated limit, for `rate_limited`, `auth_throttled`, `concurrency_limited`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// An error a handler or extractor returns. Boxed: errors travel through
/// `Result`s on hot paths, and the fields are read through `Deref`.
#[derive(Debug, Clone)]
pub struct ApiError(Box<ApiErrorFields>);

impl std::ops::Deref for ApiError {
    type Target = ApiErrorFields;
    fn deref(&self) -> &ApiErrorFields {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ApiErrorFields {
        &mut self.0
    }
}

#[derive(Debug, Clone)]
pub struct ApiErrorFields {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub scope: Option<&'static str>,
    pub policy: Option<&'static str>,
    pub www_authenticate: Option<Box<str>>,
}

impl ApiError {
    /// A problem with `code`'s status and title.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self::with_status(code.status(), code, detail)
    }

    /// Only for statuses the framework chose (`for_status`): the code's own
    /// status is what everything else answers with.
    fn with_status(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> Self {
        Self(Box::new(ApiErrorFields {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            scope: None,
            policy: None,
            www_authenticate: None,
        }))
    }

    /// The one 401 for missing, malformed, bad-checksum, unknown and wrong keys:
    /// the body never says which, so it cannot be used as an oracle.
    pub fn unauthenticated() -> Self {
        let mut e =
            Self::new(ErrorCode::Unauthenticated, "A valid API key is required: send `Authorization: Bearer <key>`.");
        e.www_authenticate = Some("Bearer realm=\"paygate\"".into());
        e
    }

    pub fn key_revoked() -> Self {
        let mut e = Self::new(ErrorCode::ApiKeyRevoked, "This API key has been revoked.");
        e.www_authenticate = Some("Bearer realm=\"paygate\", error=\"invalid_token\"".into());
        e
    }

    pub fn key_expired() -> Self {
        let mut e = Self::new(ErrorCode::ApiKeyExpired, "This API key has expired.");
        e.www_authenticate = Some("Bearer realm=\"paygate\", error=\"invalid_token\"".into());
        e
    }

    pub fn company_suspended() -> Self {
        Self::new(ErrorCode::CompanySuspended, "This company is suspended; contact support.")
    }

    pub fn insufficient_scope(scope: &'static str) -> Self {
        let mut e = Self::new(ErrorCode::InsufficientScope, format!("This API key lacks the `{scope}` scope."));
        e.scope = Some(scope);
        e.www_authenticate =
            Some(format!("Bearer realm=\"paygate\", error=\"insufficient_scope\", scope=\"{scope}\"").into());
        e
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("No such {what}."))
    }

    pub fn invalid_parameter(errors: Vec<FieldError>) -> Self {
        let mut e = Self::new(ErrorCode::InvalidParameter, "A query or path parameter is invalid.");
        e.errors = errors;
        e
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let mut e = Self::new(ErrorCode::ValidationFailed, "The request body has invalid fields.");
        e.errors = errors;
        e
    }

    /// The same problem with field-level details.
    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    pub fn unavailable() -> Self {
        Self::new(ErrorCode::ServiceUnavailable, "Storage is temporarily unavailable; retry with backoff.")
    }

    pub fn internal() -> Self {
        Self::new(ErrorCode::InternalError, "An unexpected error occurred.")
    }

    /// The generic problem for an error status produced outside our handlers.
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::new(ErrorCode::NotFound, "No such resource."),
            StatusCode::METHOD_NOT_ALLOWED => {
                Self::new(ErrorCode::MethodNotAllowed, "This resource does not support that method.")
            }
            StatusCode::PAYLOAD_TOO_LARGE => Self::payload_too_large(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Self::new(ErrorCode::UnsupportedMediaType, "Send the body as `Content-Type: application/json`.")
            }
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
                Self::new(ErrorCode::Timeout, "The request took too long.")
            }
            s if s.is_server_error() => Self::internal(),
            s => Self::with_status(s, ErrorCode::BadRequest, "The request could not be processed."),
        }
    }

    pub fn payload_too_large() -> Self {
        Self::new(ErrorCode::PayloadTooLarge, "The request body is too large.")
    }

    pub fn into_problem(self, request_id: &str) -> Problem {
        let this = *self.0;
        Problem {
            type_: this.code.type_uri(),
            title: this.code.title().to_owned(),
            status: this.status.as_u16(),
            detail: this.detail,
            code: this.code.as_str().to_owned(),
            request_id: request_id.to_owned(),
            errors: this.errors,
            scope: this.scope.map(str::to_owned),
            policy: this.policy.map(str::to_owned),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        if let Some(value) = self.www_authenticate.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        response.extensions_mut().insert(self);
        response
    }
}

impl From<paygate_store::StoreError> for ApiError {
    #[track_caller]
    fn from(error: paygate_store::StoreError) -> Self {
        use paygate_store::StoreError::*;
        let location = std::panic::Location::caller();
        match error {
            Unavailable(_) => {
                tracing::warn!(%error, %location, "storage unavailable");
                Self::unavailable()
            }
            NotFound(what) => Self::not_found(what),
            Conflict(_) | Internal(_) => {
                tracing::error!(%error, %location, "storage error");
                Self::internal()
            }
        }
    }
}

/// Renders `error` as the final problem+json response.
pub fn render(error: ApiError, request_id: &str, mut response: Response) -> Response {
    *response.status_mut() = error.status;
    let body = serde_json::to_vec(&error.into_problem(request_id)).unwrap_or_default();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
    response.headers_mut().remove(header::CONTENT_LENGTH);
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, axum::body::Body::from(body))
}
