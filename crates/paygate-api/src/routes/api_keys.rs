use axum::extract::{Path, State};
use axum::response::Json;
use paygate_domain::ApiKeyId;

use crate::AppState;
use crate::auth::{Authorized, scope};
use crate::extract::Query;
use crate::pagination::{List, ListParams};
use crate::problem::{ApiError, Problem};
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
