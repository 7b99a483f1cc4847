//! Extractors whose rejections are problems with stable codes, never the
//! framework's plain-text bodies.

use crate::error_code::ErrorCode;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::{ApiError, FieldError};

/// JSON body. 415 without a JSON content type, 413 over the body limit,
/// 400 `invalid_json` for syntax errors, 422 `validation_failed` with a pointer
/// for well-formed JSON of the wrong shape.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            ErrorCode::InvalidJson,
            format!(
                "The body is not valid JSON: {}",
                std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()
            ),
        ),
        JsonRejection::JsonDataError(e) => {
            // serde_path_to_error's message starts with the path of the bad field.
            let message = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.body_text());
            let (path, detail) = match message.split_once(": ") {
                Some((path, detail)) if !path.contains(' ') => (path.to_owned(), detail.to_owned()),
                _ => (".".to_owned(), message),
            };
            // serde appends the position; the pointer already says where.
            let detail = match detail.rfind(" at line ") {
                Some(i) => detail[..i].to_owned(),
                None => detail,
            };
            let mut pointer = to_json_pointer(&path);
            // A missing field is reported at its parent; point at the field itself.
            if let Some(field) = detail.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
                pointer.push('/');
                pointer.push_str(field);
            }
            ApiError::validation(vec![FieldError::pointer(pointer, detail)])
        }
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::payload_too_large()
        }
        other => ApiError::new(ErrorCode::InvalidBody, other.body_text()),
    }
}

/// `a.b[0].c` (serde_path_to_error) → `/a/b/0/c` (RFC 6901).
fn to_json_pointer(path: &str) -> String {
    if path == "." {
        return String::new();
    }
    let mut out = String::new();
    for segment in path.split('.') {
        let mut rest = segment;
        while let Some(open) = rest.find('[') {
            let (name, tail) = rest.split_at(open);
            if !name.is_empty() {
                out.push('/');
                out.push_str(&name.replace('~', "~0").replace('/', "~1"));
            }
            let close = tail.find(']').unwrap_or(tail.len());
            out.push('/');
            out.push_str(&tail[1..close]);
            rest = tail.get(close + 1..).unwrap_or("");
        }
        if !rest.is_empty() {
            out.push('/');
            out.push_str(&rest.replace('~', "~0").replace('/', "~1"));
        }
    }
    out
}

/// A JSON body that may be omitted entirely: an empty body (with or without a
/// JSON content type) is `T::default()`; anything else is parsed like [`Json`].
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large()
            } else {
                ApiError::new(ErrorCode::InvalidBody, rejection.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        let mut req = Request::new(axum::body::Body::from(bytes));
        *req.headers_mut() = headers;
        Json::<T>::from_request(req, state).await.map(|Json(v)| Self(v))
    }
}

/// Query string. Unknown or malformed parameters → 400 `invalid_parameter`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let detail = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.body_text());
                Err(ApiError::invalid_parameter(vec![FieldError::parameter(param_name(&detail), detail)]))
            }
            Err(other) => Err(ApiError::invalid_parameter(vec![FieldError::parameter("", other.body_text())])),
        }
    }
}

fn param_name(detail: &str) -> String {
    // serde messages quote the field: "unknown field `x`, expected ..." / "missing field `x`".
    detail.split('`').nth(1).unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::to_json_pointer;

    #[test]
    fn pointers() {
        assert_eq!(to_json_pointer("."), "");
        assert_eq!(to_json_pointer("name"), "/name");
        assert_eq!(to_json_pointer("bank_account.iban"), "/bank_account/iban");
        assert_eq!(to_json_pointer("scopes[2]"), "/scopes/2");
        assert_eq!(to_json_pointer("a/b"), "/a~1b");
    }
}
