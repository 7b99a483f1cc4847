use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Json;
use paygate_domain::{ApiKeyId, Label, Scope, ScopeSet};
use paygate_store::NewApiKey;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AppState;
use crate::auth::{Authorized, scope};
use crate::extract::{Json as JsonBody, Query};
use crate::pagination::{List, ListParams};
use crate::problem::{ApiError, FieldError, Problem};
use crate::views::ApiKeyView;

/// The company's API keys, newest first. Never shows secrets or hashes.
#[utoipa::path(
    get,
    path = "/api-keys",
    tag = "api-keys",
    security(("api_key" = ["keys:read"])),
    params(ListParams),
    responses(
        (status = 200, description = "A page of keys", body = List<ApiKeyView>),
        (status = 400, description = "Invalid limit or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_api_keys(
    auth: Authorized<scope::KeysRead>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<List<ApiKeyView>>, ApiError> {
    let page = params.parse(|c| ApiKeyId::parse(c).ok())?;
    let page = state.store.list_api_keys(auth.scope(), page).await?;
    let now = paygate_domain::now();
    let last = page.items.last().map(|k| k.id.to_string());
    let data = page.items.into_iter().map(|k| ApiKeyView::new(k, now)).collect();
    Ok(Json(List::new(data, page.has_more, last)))
}

/// One API key of the company. Another company's key answers exactly like a
/// key that does not exist.
#[utoipa::path(
    get,
    path = "/api-keys/{id}",
    tag = "api-keys",
    security(("api_key" = ["keys:read"])),
    params(("id" = String, Path, description = "The key id (`key_…`)")),
    responses(
        (status = 200, description = "The key", body = ApiKeyView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:read`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_api_key(
    auth: Authorized<scope::KeysRead>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ApiKeyView>, ApiError> {
    // A malformed id is just an id that does not exist: same 404, same body.
    let id = ApiKeyId::parse(&id).map_err(|_| ApiError::not_found("API key"))?;
    let key = state.store.get_api_key(auth.scope(), id).await?.ok_or_else(|| ApiError::not_found("API key"))?;
    Ok(Json(ApiKeyView::new(key, paygate_domain::now())))
}

/// Body of `POST /v1/api-keys`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// What the key is for, e.g. "SAP payment run".
    pub name: String,
    /// Who or which system holds it; approvals compare owners (four eyes).
    pub owner: String,
    /// A subset of the calling key's scopes.
    #[schema(value_type = Vec<Scope>)]
    pub scopes: Vec<String>,
    /// RFC 3339; must be in the future. Omit for no expiry.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
}

/// A newly issued key, with its text shown this once.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// The full key text. Shown only in this response; Paygate keeps only a hash.
    pub secret: String,
}

/// Issue a new key for the caller's company. Its scopes must be a subset of the
/// caller's and its mode is the caller's.
#[utoipa::path(
    post,
    path = "/api-keys",
    tag = "api-keys",
    security(("api_key" = ["keys:manage"])),
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "The key, with its text shown once", body = CreatedApiKey),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:manage`, or `scope_escalation`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_api_key(
    auth: Authorized<scope::KeysManage>,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, axum::response::Json<CreatedApiKey>), ApiError> {
    let now = paygate_domain::now();
    let mut errors = Vec::new();
    let name = Label::parse(&body.name).map_err(|e| errors.push(FieldError::pointer("/name", e.to_string()))).ok();
    let owner = Label::parse(&body.owner).map_err(|e| errors.push(FieldError::pointer("/owner", e.to_string()))).ok();
    let mut scopes = ScopeSet::empty();
    for (i, text) in body.scopes.iter().enumerate() {
        match Scope::parse(text) {
            Ok(s) => scopes.insert(s),
            Err(e) => errors.push(FieldError::pointer(format!("/scopes/{i}"), e.to_string())),
        }
    }
    let expires_at = match body.expires_at.as_deref().map(|t| OffsetDateTime::parse(t, &Rfc3339)) {
        None => None,
        Some(Ok(t)) if t > now => Some(paygate_domain::truncate_to_micros(t.to_offset(time::UtcOffset::UTC))),
        Some(Ok(_)) => {
            errors.push(FieldError::pointer("/expires_at", "must be in the future"));
            None
        }
        Some(Err(_)) => {
            errors.push(FieldError::pointer("/expires_at", "must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z"));
            None
        }
    };
    let (Some(name), Some(owner), true) = (name, owner, errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    let caller = &auth.caller.record.key;
    if !scopes.is_subset_of(caller.scopes) {
        let extra: Vec<_> = scopes.iter().filter(|s| !caller.scopes.contains(*s)).map(Scope::as_str).collect();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "scope_escalation",
            "Scope escalation",
            format!("A key cannot grant scopes it does not hold: {}.", extra.join(", ")),
        ));
    }
    let generated = state.auth.hasher().generate(caller.mode);
    let key = state
        .store
        .create_api_key(
            auth.scope(),
            NewApiKey {
                id: generated.id,
                name,
                owner,
                scopes,
                mode: caller.mode,
                created_at: now,
                expires_at,
                secret_hash: generated.hash,
                pepper_version: generated.pepper_version,
            },
        )
        .await?;
    let body = CreatedApiKey { key: ApiKeyView::new(key, now), secret: generated.text.to_string() };
    Ok((StatusCode::CREATED, axum::response::Json(body)))
}

/// Revoke a key of the caller's company at once. Revoking a revoked key changes
/// nothing and answers 200 with the key as it is.
#[utoipa::path(
    post,
    path = "/api-keys/{id}/revoke",
    tag = "api-keys",
    security(("api_key" = ["keys:manage"])),
    params(("id" = String, Path, description = "The key id (`key_…`)")),
    responses(
        (status = 200, description = "The revoked key", body = ApiKeyView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke_api_key(
    auth: Authorized<scope::KeysManage>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ApiKeyView>, ApiError> {
    let id = ApiKeyId::parse(&id).map_err(|_| ApiError::not_found("API key"))?;
    let now = paygate_domain::now();
    let key = state.store.revoke_api_key(auth.scope(), id, now).await?.ok_or_else(|| ApiError::not_found("API key"))?;
    state.auth.invalidate();
    Ok(Json(ApiKeyView::new(key, now)))
}
