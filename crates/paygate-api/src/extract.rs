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
        if !json_content_type(req.headers()) {
            return Err(ApiError::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        }
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(bytes_rejection)?;
        // serde would take an array for a struct and let the last duplicate
        // key win: two parsers (ours and a proxy's, a client's) would then
        // disagree about what was sent. Refused before any field is read.
        check_shape(&bytes)?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `application/json` or `application/…+json`, as axum's own extractor.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn bytes_rejection(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large()
    } else {
        ApiError::new(ErrorCode::InvalidBody, "The body could not be read.")
    }
}

/// A body must be one JSON object, and no object in it may repeat a key.
fn check_shape(bytes: &[u8]) -> Result<(), ApiError> {
    let invalid = |detail: String| ApiError::new(ErrorCode::InvalidJson, detail);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde::Deserialize::deserialize(&mut de).and_then(|shape: Shape| de.end().map(|()| shape)) {
        Ok(Shape::Object) => Ok(()),
        Ok(Shape::Other) => Err(ApiError::validation(vec![FieldError::pointer("", "the body must be a JSON object")])),
        Err(e) => Err(invalid(format!("The body is not valid JSON: {e}"))),
    }
}

/// What a JSON value was, after checking every object in it for repeated keys.
enum Shape {
    Object,
    Other,
}

impl<'de> serde::Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> serde::de::Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !seen.insert(key.clone()) {
                let shown: String = key.chars().take(64).collect();
                return Err(serde::de::Error::custom(format!("duplicate key {shown:?}")));
            }
            map.next_value::<Shape>()?;
        }
        Ok(Shape::Object)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element::<Shape>()?.is_some() {}
        Ok(Shape::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
}

/// serde names the Rust type it expected ("expected struct CreatePayment",
/// "expected u64"): the caller gets the JSON kind instead.
fn without_type_names(detail: &str) -> String {
    let mut out = Vec::new();
    let mut words = detail.split(' ').peekable();
    while let Some(word) = words.next() {
        match word {
            "struct" | "enum" | "tuple" if words.peek().is_some() => {
                let name = words.next().unwrap_or("");
                let trail: String = name.chars().skip_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.push(format!(
                    "{}{trail}",
                    if word == "enum" { "one of the documented values" } else { "an object" }
                ));
            }
            w => {
                let (core, trail) = w.split_at(w.find(|c: char| !c.is_alphanumeric()).unwrap_or(w.len()));
                let kind = match core {
                    "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i16" | "i32" | "i64" | "i128"
                    | "isize" => Some("an integer"),
                    "f32" | "f64" => Some("a number"),
                    _ => None,
                };
                out.push(kind.map(|k| format!("{k}{trail}")).unwrap_or_else(|| w.to_owned()));
            }
        }
    }
    out.join(" ")
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
            let detail = without_type_names(&detail);
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
    use super::{check_shape, to_json_pointer, without_type_names};

    #[test]
    fn shapes() {
        assert!(check_shape(br#"{"a": {"b": [1, {"c": 2}]}, "d": null}"#).is_ok());
        for (body, code) in [
            (&br#"["pye_1", 777700, "EUR"]"#[..], "validation_failed"),
            (br#""text""#, "validation_failed"),
            (br#"{"a": 1, "a": 2}"#, "invalid_json"),
            (br#"{"a": {"b": 1, "b": 1}}"#, "invalid_json"),
            (br#"{"a": [{"x": 1, "x": 2}]}"#, "invalid_json"),
            (br#"{"a": 1} {"b": 2}"#, "invalid_json"),
        ] {
            let error = check_shape(body).unwrap_err();
            assert_eq!(error.code.as_str(), code, "{}", String::from_utf8_lossy(body));
        }
        let error = check_shape(br#"{"amount": 1, "amount": 2}"#).unwrap_err();
        assert!(error.detail.contains("duplicate key \"amount\""), "{}", error.detail);
    }

    #[test]
    fn details_name_json_kinds_not_rust_types() {
        assert_eq!(
            without_type_names("invalid type: sequence, expected struct CreatePayment"),
            "invalid type: sequence, expected an object"
        );
        assert_eq!(
            without_type_names("invalid type: string \"x\", expected u64"),
            "invalid type: string \"x\", expected an integer"
        );
        assert_eq!(
            without_type_names("unknown variant `x`, expected one of `a`, `b`"),
            "unknown variant `x`, expected one of `a`, `b`"
        );
    }

    #[test]
    fn pointers() {
        assert_eq!(to_json_pointer("."), "");
        assert_eq!(to_json_pointer("name"), "/name");
        assert_eq!(to_json_pointer("bank_account.iban"), "/bank_account/iban");
        assert_eq!(to_json_pointer("scopes[2]"), "/scopes/2");
        assert_eq!(to_json_pointer("a/b"), "/a~1b");
    }
}
