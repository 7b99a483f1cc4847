use crate::error_code::ErrorCode;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Json;
use paygate_domain::event::{EventTypes, EventTypesError};
use paygate_domain::webhook::{EndpointUrl, UrlError, WebhookSecret};
use paygate_domain::{KeyMode, WebhookDeliveryId, WebhookEndpointId};
use paygate_store::{EndpointPatch, NewWebhookEndpoint, WebhookEndpoint};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::audit::{AuditContext, AuditWritten};
use crate::auth::Authorized;
use crate::extract::{Json as JsonBody, Query};
use crate::pagination::{List, ListParams};
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
pub use crate::views::{DeliveryAttemptView, DeliveryView, EventView, WebhookEndpointView};

/// How long a rotated-out signing secret keeps signing beside the new one.
pub const SECRET_OVERLAP: time::Duration = time::Duration::hours(24);

/// An endpoint with its signing secret: only in the answers to creation and
/// rotation. Store the secret; Paygate never shows it again.
#[derive(Serialize, ToSchema)]
pub struct WebhookEndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: WebhookEndpointView,
    /// `whsec_` + base64 of 32 random bytes (Standard Webhooks).
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwAbCdEfGhIjK=")]
    pub secret: String,
}

/// Never prints the secret.
impl std::fmt::Debug for WebhookEndpointWithSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpointWithSecret").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

/// Body of `POST /v1/webhook-endpoints`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpoint {
    /// `https://…` (`http://` only with a test-mode key). Must not point to a
    /// loopback, private, link-local or metadata address.
    pub url: String,
    /// Event types to deliver, or `["*"]` for all.
    pub event_types: Vec<String>,
    /// Up to 200 characters.
    pub description: Option<String>,
}

/// Body of `PATCH /v1/webhook-endpoints/{id}`: each field present replaces.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookEndpoint {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "crate::routes::shared::double_option")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    /// `true` re-enables an endpoint Paygate disabled (its failure clock restarts).
    pub enabled: Option<bool>,
}

/// A refused URL answers with its own stable code (the reason matters to
/// the caller): `invalid_url`, `url_scheme_not_allowed` or `url_not_allowed`.
fn parse_url(text: &str, state: &AppState, mode: KeyMode) -> Result<EndpointUrl, ApiError> {
    EndpointUrl::parse(text, mode == KeyMode::Test, &state.webhook_addresses).map_err(|e: UrlError| {
        let code = match e {
            UrlError::Forbidden(_) => ErrorCode::UrlNotAllowed,
            UrlError::SchemeNotAllowed => ErrorCode::UrlSchemeNotAllowed,
            UrlError::Invalid(_) | UrlError::Credentials | UrlError::Fragment | UrlError::TooLong => {
                ErrorCode::InvalidUrl
            }
        };
        debug_assert_eq!(code.as_str(), e.code());
        ApiError::new(code, e.to_string()).with_errors(vec![FieldError::pointer("/url", e.to_string())])
    })
}

/// The subscription, bounded by what the caller may read: `["*"]` becomes
/// every type its scopes read; naming a type it may not read is 403.
fn event_types_field(
    errors: &mut Vec<FieldError>,
    items: &[String],
    scopes: paygate_domain::ScopeSet,
) -> Result<Option<EventTypes>, ApiError> {
    use paygate_domain::EventType;
    let readable = EventType::readable_with(scopes);
    match EventTypes::parse(items) {
        Ok(EventTypes::All) if readable.len() == EventType::ALL.len() => Ok(Some(EventTypes::All)),
        Ok(EventTypes::All) => Ok(Some(EventTypes::Only(readable.into_iter().filter(|t| t.subscribable()).collect()))),
        Ok(EventTypes::Only(types)) => match types.iter().find(|t| !readable.contains(t)) {
            Some(t) => Err(ApiError::insufficient_scope(t.read_scope().as_str())),
            None => Ok(Some(EventTypes::Only(types))),
        },
        Err(problems) => {
            for (i, e) in problems {
                let pointer = if matches!(e, EventTypesError::Empty | EventTypesError::TooMany) {
                    "/event_types".to_owned()
                } else {
                    format!("/event_types/{i}")
                };
                errors.push(FieldError::pointer(pointer, e.to_string()));
            }
            Ok(None)
        }
    }
}

/// Changing where an endpoint's events go, whether they flow, or who can
/// verify them hands its whole subscription to the caller: the caller must be
/// able to read every type the endpoint receives, whoever created it. Without
/// this, a `webhooks:manage` key could point a wider key's endpoint at itself
/// and receive payee or key events it may not read.
fn require_reads_subscription(endpoint: &WebhookEndpoint, scopes: paygate_domain::ScopeSet) -> Result<(), ApiError> {
    use paygate_domain::EventType;
    let missing = EventType::ALL
        .iter()
        .copied()
        .filter(|t| endpoint.event_types.includes(*t))
        .map(EventType::read_scope)
        .find(|s| !scopes.contains(*s));
    match missing {
        Some(scope) => Err(ApiError::insufficient_scope(scope.as_str())),
        None => Ok(()),
    }
}

/// The endpoint as stored, for a change that must first check its subscription.
async fn endpoint_to_change(
    state: &AppState,
    caller: &paygate_store::auth::Authenticated,
    id: WebhookEndpointId,
) -> Result<WebhookEndpoint, ApiError> {
    let endpoint = state
        .store
        .get_webhook_endpoint(&caller.scope, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    require_reads_subscription(&endpoint, caller.record.key.scopes)?;
    Ok(endpoint)
}

fn description_field(errors: &mut Vec<FieldError>, text: Option<&str>) -> Option<String> {
    match paygate_domain::text::field(text?, 200, true) {
        Ok(text) => (!text.is_empty()).then_some(text),
        Err(e) => {
            errors.push(FieldError::pointer("/description", format!("at most 200 characters: {e}")));
            None
        }
    }
}

fn with_secret(endpoint: &WebhookEndpoint, secret: &WebhookSecret) -> WebhookEndpointWithSecret {
    WebhookEndpointWithSecret { endpoint: endpoint.into(), secret: secret.to_text().to_string() }
}

route! {
    CreateWebhookEndpointRoute { scope: WebhooksManage, audit: WebhookEndpointCreate on WebhookEndpoint, limit: Write }
}

/// Register a webhook endpoint. The answer holds its signing secret, shown
/// once.
#[utoipa::path(
    post,
    path = "/webhook-endpoints",
    tag = "webhooks",
    request_body = CreateWebhookEndpoint,
    responses(
        (status = 201, description = "The endpoint and its signing secret", body = WebhookEndpointWithSecret),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`endpoint_limit_reached`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`, `invalid_url`, `url_scheme_not_allowed` or `url_not_allowed`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_webhook_endpoint(
    auth: Authorized<CreateWebhookEndpointRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    JsonBody(body): JsonBody<CreateWebhookEndpoint>,
) -> Result<(StatusCode, AuditWritten, [(axum::http::HeaderName, String); 1], Json<WebhookEndpointWithSecret>), ApiError>
{
    let mode = auth.caller.record.key.mode;
    let url = parse_url(&body.url, &state, mode)?;
    let mut errors = Vec::new();
    let event_types = event_types_field(&mut errors, &body.event_types, auth.caller.record.key.scopes)?;
    let description = description_field(&mut errors, body.description.as_deref());
    let (Some(event_types), true) = (event_types, errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    let company = auth.scope().company_id();
    let id = WebhookEndpointId::generate();
    let now = paygate_domain::now();
    let endpoint = WebhookEndpoint {
        id,
        company_id: company,
        mode,
        url: url.as_str().to_owned(),
        description,
        event_types,
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        previous_secret_expires_at: None,
        created_at: now,
        updated_at: now,
    };
    let secret = WebhookSecret::generate();
    let secret_sealed = state.data_key.seal_webhook_secret(secret.as_bytes(), company, &id.to_string());
    let record = audit.entry_for(
        auth.route(),
        Some(id.to_string()),
        StatusCode::CREATED,
        serde_json::json!({ "url": endpoint.url, "event_types": endpoint.event_types.to_list() }),
    );
    let new = NewWebhookEndpoint { endpoint: endpoint.clone(), secret_sealed };
    if !state.store.create_webhook_endpoint(auth.scope(), &new, &record).await? {
        return Err(ApiError::new(
            ErrorCode::EndpointLimitReached,
            format!("A company may have at most {} webhook endpoints per mode.", paygate_store::MAX_ENDPOINTS),
        ));
    }
    let location = format!("/v1/webhook-endpoints/{id}");
    Ok((
        StatusCode::CREATED,
        AuditWritten,
        [(axum::http::header::LOCATION, location)],
        Json(with_secret(&endpoint, &secret)),
    ))
}

route! {
    ListWebhookEndpointsRoute { scope: WebhooksManage, audit: WebhookEndpointList, limit: Read }
}

/// The company's webhook endpoints (of the caller's mode), newest first.
#[utoipa::path(
    get,
    path = "/webhook-endpoints",
    tag = "webhooks",
    params(ListParams),
    responses(
        (status = 200, description = "A page of endpoints", body = List<WebhookEndpointView>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_webhook_endpoints(
    auth: Authorized<ListWebhookEndpointsRoute>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<List<WebhookEndpointView>>, ApiError> {
    let page = params.parse(|c| WebhookEndpointId::parse(c).ok())?;
    let page = state.store.list_webhook_endpoints(auth.scope(), page).await?;
    let last = page.items.last().map(|e| e.id.to_string());
    Ok(Json(List::new(page.items.iter().map(WebhookEndpointView::from).collect(), page.has_more, last)))
}

fn endpoint_id(text: &str) -> Result<WebhookEndpointId, ApiError> {
    WebhookEndpointId::parse(text).map_err(|_| ApiError::not_found("webhook endpoint"))
}

route! {
    GetWebhookEndpointRoute { scope: WebhooksManage, audit: WebhookEndpointRead on WebhookEndpoint, limit: Read }
}

/// One webhook endpoint (never its secret).
#[utoipa::path(
    get,
    path = "/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)")),
    responses(
        (status = 200, description = "The endpoint", body = WebhookEndpointView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_webhook_endpoint(
    auth: Authorized<GetWebhookEndpointRoute>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WebhookEndpointView>, ApiError> {
    let id = endpoint_id(&id)?;
    let endpoint = state.store.get_webhook_endpoint(auth.scope(), id).await?;
    Ok(Json((&endpoint.ok_or_else(|| ApiError::not_found("webhook endpoint"))?).into()))
}

route! {
    UpdateWebhookEndpointRoute { scope: WebhooksManage, audit: WebhookEndpointUpdate on WebhookEndpoint, limit: Write }
}

/// Change an endpoint's URL, event types, description, or enable/disable it.
#[utoipa::path(
    patch,
    path = "/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)")),
    request_body = UpdateWebhookEndpoint,
    responses(
        (status = 200, description = "The changed endpoint", body = WebhookEndpointView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`, or a read scope for a type the endpoint receives", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`, `invalid_url`, `url_scheme_not_allowed` or `url_not_allowed`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update_webhook_endpoint(
    auth: Authorized<UpdateWebhookEndpointRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateWebhookEndpoint>,
) -> Result<(AuditWritten, Json<WebhookEndpointView>), ApiError> {
    let id = endpoint_id(&id)?;
    let mode = auth.caller.record.key.mode;
    let url = body.url.as_deref().map(|u| parse_url(u, &state, mode)).transpose()?;
    let mut errors = Vec::new();
    let scopes = auth.caller.record.key.scopes;
    let event_types = match body.event_types.as_deref() {
        Some(t) => event_types_field(&mut errors, t, scopes)?,
        None => None,
    };
    let description = body.description.as_ref().map(|d| description_field(&mut errors, d.as_deref()));
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    // Every field counts: even narrowing a wider key's subscription changes
    // what that key's receiver sees.
    endpoint_to_change(&state, &auth.caller, id).await?;
    let patch =
        EndpointPatch { url: url.map(|u| u.as_str().to_owned()), description, event_types, enabled: body.enabled };
    let record = audit.entry_for(
        auth.route(),
        Some(id.to_string()),
        StatusCode::OK,
        serde_json::json!({
            "url": patch.url,
            "event_types": patch.event_types.as_ref().map(EventTypes::to_list),
            "enabled": patch.enabled,
        }),
    );
    let endpoint = state
        .store
        .update_webhook_endpoint(auth.scope(), id, &patch, &record)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    Ok((AuditWritten, Json((&endpoint).into())))
}

route! {
    DeleteWebhookEndpointRoute { scope: WebhooksManage, audit: WebhookEndpointDelete on WebhookEndpoint, limit: Write }
}

/// Delete an endpoint; its pending deliveries are dropped.
#[utoipa::path(
    delete,
    path = "/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_webhook_endpoint(
    auth: Authorized<DeleteWebhookEndpointRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
) -> Result<(StatusCode, AuditWritten, ()), ApiError> {
    let id = endpoint_id(&id)?;
    let record = audit.entry_for(auth.route(), Some(id.to_string()), StatusCode::NO_CONTENT, serde_json::json!({}));
    if !state.store.delete_webhook_endpoint(auth.scope(), id, &record).await? {
        return Err(ApiError::not_found("webhook endpoint"));
    }
    Ok((StatusCode::NO_CONTENT, AuditWritten, ()))
}

route! {
    RotateWebhookSecretRoute { scope: WebhooksManage, audit: WebhookEndpointRotateSecret on WebhookEndpoint, limit: Write }
}

/// Issue a new signing secret. For 24 hours deliveries carry two signatures
/// (new and old), so receivers can switch without missing a message.
#[utoipa::path(
    post,
    path = "/webhook-endpoints/{id}/rotate-secret",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)")),
    responses(
        (status = 200, description = "The endpoint and its new secret", body = WebhookEndpointWithSecret),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`, or a read scope for a type the endpoint receives", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn rotate_webhook_secret(
    auth: Authorized<RotateWebhookSecretRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
) -> Result<(AuditWritten, Json<WebhookEndpointWithSecret>), ApiError> {
    let id = endpoint_id(&id)?;
    // The new secret verifies every event the endpoint receives.
    endpoint_to_change(&state, &auth.caller, id).await?;
    let company = auth.scope().company_id();
    let secret = WebhookSecret::generate();
    let sealed = state.data_key.seal_webhook_secret(secret.as_bytes(), company, &id.to_string());
    let overlap_until = paygate_domain::now() + SECRET_OVERLAP;
    let record = audit.entry_for(
        auth.route(),
        Some(id.to_string()),
        StatusCode::OK,
        serde_json::json!({ "previous_secret_expires_at": crate::views::rfc3339(overlap_until) }),
    );
    let endpoint = state
        .store
        .rotate_webhook_secret(auth.scope(), id, &sealed, overlap_until, &record)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    Ok((AuditWritten, Json(with_secret(&endpoint, &secret))))
}

route! {
    TestWebhookEndpointRoute { scope: WebhooksManage, audit: WebhookEndpointTest on WebhookEndpoint, limit: Write }
}

/// Send a `ping` event to this endpoint only.
#[utoipa::path(
    post,
    path = "/webhook-endpoints/{id}/test",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)")),
    responses(
        (status = 202, description = "The ping event, queued for delivery", body = EventView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`endpoint_disabled`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn test_webhook_endpoint(
    auth: Authorized<TestWebhookEndpointRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
) -> Result<(StatusCode, AuditWritten, Json<EventView>), ApiError> {
    let id = endpoint_id(&id)?;
    let endpoint = state
        .store
        .get_webhook_endpoint(auth.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    if !endpoint.enabled {
        return Err(ApiError::new(
            ErrorCode::EndpointDisabled,
            "The endpoint is disabled; enable it with PATCH {\"enabled\": true} first.",
        ));
    }
    let record = audit.entry_for(auth.route(), Some(id.to_string()), StatusCode::ACCEPTED, serde_json::json!({}));
    let event = state
        .store
        .send_test_event(auth.scope(), id, &record)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    Ok((StatusCode::ACCEPTED, AuditWritten, Json(EventView::from(&event))))
}

route! {
    ListWebhookDeliveriesRoute { scope: WebhooksManage, audit: WebhookDeliveryList on WebhookEndpoint, limit: Read }
}

/// The endpoint's deliveries, newest first, each with its attempts (status
/// code, latency, error) and when the next one is due.
#[utoipa::path(
    get,
    path = "/webhook-endpoints/{id}/deliveries",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)"), ListParams),
    responses(
        (status = 200, description = "A page of deliveries", body = List<DeliveryView>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_webhook_deliveries(
    auth: Authorized<ListWebhookDeliveriesRoute>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<List<DeliveryView>>, ApiError> {
    let id = endpoint_id(&id)?;
    let page = params.parse(|c| WebhookDeliveryId::parse(c).ok())?;
    let page = state
        .store
        .list_deliveries(auth.scope(), id, page)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))?;
    let last = page.items.last().map(|d| d.id.to_string());
    Ok(Json(List::new(page.items.iter().map(DeliveryView::from).collect(), page.has_more, last)))
}
