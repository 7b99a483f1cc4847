use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Json;
use paygate_domain::{EventId, EventType, WebhookEndpointId};
use paygate_store::EventFilter;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::audit::{AuditContext, AuditWritten};
use crate::auth::Authorized;
use crate::extract::{OptionalJson, Query};
use crate::pagination::{List, page_request};
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
pub use crate::views::{EventData, EventView};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventListParams {
    /// 1..=100, default 25.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only events of this type, e.g. `payment.completed`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<String>,
    /// Only events of this object (`pay_…`, `pye_…`, `key_…`, `we_…`).
    pub object_id: Option<String>,
}

route! {
    ListEventsRoute { scope: EventsRead, audit: EventList, limit: Read }
}

/// The company's events (of the caller's mode), newest first: backfill what
/// a webhook endpoint missed. Events are kept at least 30 days.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(EventListParams),
    responses(
        (status = 200, description = "A page of events", body = List<EventView>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `events:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_events(
    auth: Authorized<ListEventsRoute>,
    State(state): State<AppState>,
    Query(params): Query<EventListParams>,
) -> Result<Json<List<EventView>>, ApiError> {
    let mut errors = Vec::new();
    let page = page_request(&mut errors, params.limit.as_deref(), params.cursor.as_deref(), |c| EventId::parse(c).ok());
    let kind = params.kind.as_deref().and_then(|t| {
        let parsed = EventType::parse(t);
        if parsed.is_none() {
            errors.push(FieldError::parameter("type", "is not an event type (see the README's list)"));
        }
        parsed
    });
    let object_id = params.object_id.filter(|o| {
        let ok = o.len() <= 64 && o.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            errors.push(FieldError::parameter("object_id", "must be an object id such as pay_…"));
        }
        ok
    });
    if !errors.is_empty() {
        return Err(ApiError::invalid_parameter(errors));
    }
    // Events never widen a key's view: only types whose objects it may read.
    let readable = EventType::readable_with(auth.caller.record.key.scopes);
    if let Some(k) = kind.filter(|k| !readable.contains(k)) {
        return Err(ApiError::insufficient_scope(k.read_scope().as_str()));
    }
    let types = (readable.len() < EventType::ALL.len()).then_some(readable);
    let filter = EventFilter { kind, object_id, types };
    let page = state.store.list_events(auth.scope(), &filter, page).await?;
    let last = page.items.last().map(|e| e.id.to_string());
    Ok(Json(List::new(page.items.iter().map(EventView::from).collect(), page.has_more, last)))
}

route! {
    GetEventRoute { scope: EventsRead, audit: EventRead on Event, limit: Read }
}

/// One event. Another company's event, or one of the other mode, answers
/// exactly like an event that does not exist.
#[utoipa::path(
    get,
    path = "/events/{id}",
    tag = "events",
    params(("id" = String, Path, description = "The event id (`evt_…`)")),
    responses(
        (status = 200, description = "The event", body = EventView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `events:read`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such event", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_event(
    auth: Authorized<GetEventRoute>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventView>, ApiError> {
    let id = EventId::parse(&id).map_err(|_| ApiError::not_found("event"))?;
    let event = readable_event(&state, &auth.caller, id).await?;
    Ok(Json(EventView::from(&event)))
}

/// The event, if it exists in the caller's company and mode and the caller's
/// scopes may read its object; otherwise the same 404 as a missing event.
async fn readable_event(
    state: &AppState,
    caller: &paygate_store::auth::Authenticated,
    id: EventId,
) -> Result<paygate_store::Event, ApiError> {
    let scopes = caller.record.key.scopes;
    let event = state.store.get_event(&caller.scope, id).await?;
    event.filter(|e| scopes.contains(e.kind.read_scope())).ok_or_else(|| ApiError::not_found("event"))
}

/// Optional body of `POST /v1/events/{id}/redeliver`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Redeliver {
    /// Only to this endpoint (even if it no longer subscribes to the type).
    /// Default: every enabled endpoint that subscribes to the event's type.
    pub endpoint_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Redelivery {
    #[schema(example = "redelivery")]
    pub object: &'static str,
    pub event_id: EventId,
    /// How many deliveries were queued.
    pub deliveries: u32,
}

route! {
    RedeliverEventRoute { scope: WebhooksManage, audit: EventRedeliver on Event, limit: Write }
}

/// Deliver an event again (same `webhook-id`: receivers deduplicate by it).
#[utoipa::path(
    post,
    path = "/events/{id}/redeliver",
    tag = "events",
    params(("id" = String, Path, description = "The event id (`evt_…`)")),
    request_body(content = Option<Redeliver>, description = "Optional: one endpoint"),
    responses(
        (status = 202, description = "Deliveries queued", body = Redelivery),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `webhooks:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such event, or no such endpoint", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn redeliver_event(
    auth: Authorized<RedeliverEventRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<Redeliver>,
) -> Result<(StatusCode, AuditWritten, Json<Redelivery>), ApiError> {
    let id = EventId::parse(&id).map_err(|_| ApiError::not_found("event"))?;
    let endpoint = match body.endpoint_id.as_deref() {
        None => None,
        Some(text) => Some(WebhookEndpointId::parse(text).map_err(|_| {
            ApiError::validation(vec![FieldError::pointer("/endpoint_id", "must be a webhook endpoint id (we_…)")])
        })?),
    };
    readable_event(&state, &auth.caller, id).await?;
    let record = audit.entry_for(
        auth.route(),
        Some(id.to_string()),
        StatusCode::ACCEPTED,
        serde_json::json!({ "endpoint_id": endpoint.map(|e| e.to_string()) }),
    );
    let queued = state
        .store
        .redeliver_event(auth.scope(), id, endpoint, &record)
        .await?
        .ok_or_else(|| ApiError::not_found(if endpoint.is_some() { "event or endpoint" } else { "event" }))?;
    Ok((
        StatusCode::ACCEPTED,
        AuditWritten,
        Json(Redelivery { object: "redelivery", event_id: id, deliveries: queued }),
    ))
}
