//! The customer's view of its own audit chain (`audit:read`). Reading the
//! audit log is itself audited, like every request.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Json, Response};
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ENCODING_VERSION, Outcome};
use paygate_store::AuditFilter;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::Authorized;
use crate::extract::Query;
use crate::pagination::{List, page_request};
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
use crate::routes::shared::parse_time;
use crate::views::rfc3339;

/// One audit record.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventView {
    #[schema(example = "audit_event")]
    pub object: &'static str,
    #[schema(value_type = String, example = "aud_0Fq3rY7b8cJ2kLmNpQsTuV")]
    pub id: String,
    /// The company id (this company's chain).
    pub chain: String,
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// RFC 3339, microseconds, UTC.
    pub occurred_at: String,
    pub actor: AuditActorView,
    pub action: String,
    pub resource: Option<AuditResourceView>,
    pub outcome: Outcome,
    /// The HTTP status of the request (200 for operator changes).
    pub status: u16,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// Hex SHA-256 of the previous record (64 zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256(prev_hash ‖ canonical encoding); see docs/audit.md.
    pub hash: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditActorView {
    #[schema(value_type = String, example = "api_key")]
    pub kind: &'static str,
    pub id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditResourceView {
    #[serde(rename = "type")]
    pub type_: String,
    pub id: Option<String>,
}

impl AuditEventView {
    fn new(r: paygate_domain::audit::AuditRecord) -> Self {
        let e = r.entry;
        Self {
            object: "audit_event",
            id: e.id.to_string(),
            chain: e.chain,
            seq: r.seq,
            occurred_at: rfc3339(e.occurred_at),
            actor: AuditActorView { kind: e.actor_kind.as_str(), id: e.actor_id, name: e.actor_name },
            action: e.action.to_owned(),
            resource: e.resource_type.map(|t| AuditResourceView { type_: t, id: e.resource_id }),
            outcome: e.outcome,
            status: e.status,
            request_id: e.request_id,
            client_ip: e.client_ip,
            user_agent: e.user_agent,
            details: serde_json::from_str(&e.details).unwrap_or(serde_json::Value::Null),
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditListParams {
    /// 1..=100, default 25.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// An action from the closed list, e.g. `api_key.revoke`.
    pub action: Option<String>,
    /// Records made with this key (`key_…`).
    pub actor_key_id: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// `success`, `denied` or `failed`.
    pub outcome: Option<String>,
    /// RFC 3339, inclusive.
    #[param(format = DateTime)]
    pub from: Option<String>,
    /// RFC 3339, exclusive.
    #[param(format = DateTime)]
    pub to: Option<String>,
}

fn bounded(errors: &mut Vec<FieldError>, name: &str, value: Option<&String>) -> Option<String> {
    let v = value?;
    if v.is_empty() || v.len() > 100 {
        errors.push(FieldError::parameter(name, "must be 1 to 100 characters"));
        return None;
    }
    Some(v.clone())
}

route! {
    ListAuditEventsRoute { scope: AuditRead, audit: AuditList, limit: Read }
}

/// The company's audit records, newest first, with filters.
#[utoipa::path(
    get,
    path = "/audit-events",
    tag = "audit",
    params(AuditListParams),
    responses(
        (status = 200, description = "A page of records", body = List<AuditEventView>),
        (status = 400, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `audit:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_audit_events(
    auth: Authorized<ListAuditEventsRoute>,
    State(state): State<AppState>,
    Query(params): Query<AuditListParams>,
) -> Result<Json<List<AuditEventView>>, ApiError> {
    let mut errors = Vec::new();
    let page = page_request(&mut errors, params.limit.as_deref(), params.cursor.as_deref(), |c| c.parse::<u64>().ok());
    let outcome = params.outcome.as_deref().and_then(|o| {
        let parsed = Outcome::parse(o);
        if parsed.is_none() {
            errors.push(FieldError::parameter("outcome", "must be success, denied or failed"));
        }
        parsed
    });
    if let Some(a) = params.action.as_deref()
        && !paygate_domain::audit::ACTIONS.contains(&a)
    {
        errors.push(FieldError::parameter("action", "is not an audit action"));
    }
    let filter = AuditFilter {
        action: bounded(&mut errors, "action", params.action.as_ref()),
        actor_key_id: bounded(&mut errors, "actor_key_id", params.actor_key_id.as_ref()),
        resource_type: bounded(&mut errors, "resource_type", params.resource_type.as_ref()),
        resource_id: bounded(&mut errors, "resource_id", params.resource_id.as_ref()),
        outcome,
        from: parse_time(&mut errors, "from", params.from.as_deref()),
        to: parse_time(&mut errors, "to", params.to.as_deref()),
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid_parameter(errors));
    }
    let page = state.store.list_audit(auth.scope(), &filter, page).await?;
    let last = page.items.last().map(|r| r.seq.to_string());
    let data = page.items.into_iter().map(AuditEventView::new).collect();
    Ok(Json(List::new(data, page.has_more, last)))
}

route! {
    GetAuditEventRoute { scope: AuditRead, audit: AuditRead on AuditEvent, limit: Read }
}

/// One audit record of the company. Another company's record answers 404.
#[utoipa::path(
    get,
    path = "/audit-events/{id}",
    tag = "audit",
    params(("id" = String, Path, description = "The record id (`aud_…`)")),
    responses(
        (status = 200, description = "The record", body = AuditEventView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `audit:read`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such record", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_audit_event(
    auth: Authorized<GetAuditEventRoute>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AuditEventView>, ApiError> {
    let id = AuditEventId::parse(&id).map_err(|_| ApiError::not_found("audit event"))?;
    let record = state.store.get_audit(auth.scope(), id).await?.ok_or_else(|| ApiError::not_found("audit event"))?;
    Ok(Json(AuditEventView::new(record)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportParams {
    /// RFC 3339, inclusive. Omitted with `to`: the whole chain.
    #[param(format = DateTime)]
    pub from: Option<String>,
    /// RFC 3339, exclusive.
    #[param(format = DateTime)]
    pub to: Option<String>,
}

/// One line of the export (`application/x-ndjson`: one such object per
/// line, in chain order): every field the hash covers, as stored.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AuditExportLine)]
pub struct ExportLine {
    encoding: &'static str,
    chain: String,
    seq: u64,
    id: String,
    occurred_at_us: i64,
    actor_kind: &'static str,
    actor_id: Option<String>,
    actor_name: Option<String>,
    action: &'static str,
    resource_type: Option<String>,
    resource_id: Option<String>,
    outcome: &'static str,
    status: u16,
    request_id: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
    /// The details JSON text exactly as hashed.
    details: String,
    prev_hash: String,
    hash: String,
}

route! {
    ExportAuditEventsRoute { scope: AuditRead, audit: AuditExport, limit: Read }
}

/// Streams the company's chain as NDJSON (one record per line, in chain
/// order) with every field needed to recompute the hashes.
#[utoipa::path(
    get,
    path = "/audit-events/export",
    tag = "audit",
    params(ExportParams),
    responses(
        (status = 200, description = "NDJSON: one `AuditExportLine` object per line, in chain order", body = ExportLine, content_type = "application/x-ndjson"),
        (status = 400, description = "Invalid time range", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `audit:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn export_audit_events(
    auth: Authorized<ExportAuditEventsRoute>,
    State(state): State<AppState>,
    Query(params): Query<ExportParams>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let from = parse_time(&mut errors, "from", params.from.as_deref());
    let to = parse_time(&mut errors, "to", params.to.as_deref());
    if !errors.is_empty() {
        return Err(ApiError::invalid_parameter(errors));
    }
    let scope = *auth.scope();
    let store = state.store.clone();
    // The chain as of this request: a slow reader of a busy chain still gets
    // an end, and never a half-written tail.
    let head = state.store.audit_head(&scope).await?.map(|(seq, _)| seq).unwrap_or(0);
    // Pages of 500 records, fetched as the client reads: memory stays bounded
    // whatever the size of the chain.
    let pages = futures_util::stream::unfold(Some(0u64), move |after| {
        let store = store.clone();
        async move {
            let after = after.filter(|a| *a < head)?;
            match store.export_audit(&scope, from, to, after, 500).await {
                Ok(records) if records.is_empty() => None,
                Ok(mut records) => {
                    records.retain(|r| r.seq <= head);
                    if records.is_empty() {
                        return None;
                    }
                    let next = records.last().map(|r| r.seq);
                    let mut text = String::new();
                    for r in records {
                        let e = r.entry;
                        let line = ExportLine {
                            encoding: ENCODING_VERSION,
                            chain: e.chain,
                            seq: r.seq,
                            id: e.id.to_string(),
                            occurred_at_us: (e.occurred_at.unix_timestamp_nanos() / 1_000) as i64,
                            actor_kind: e.actor_kind.as_str(),
                            actor_id: e.actor_id,
                            actor_name: e.actor_name,
                            action: e.action,
                            resource_type: e.resource_type,
                            resource_id: e.resource_id,
                            outcome: e.outcome.as_str(),
                            status: e.status,
                            request_id: e.request_id,
                            client_ip: e.client_ip,
                            user_agent: e.user_agent,
                            details: e.details,
                            prev_hash: hex::encode(r.prev_hash),
                            hash: hex::encode(r.hash),
                        };
                        text.push_str(&serde_json::to_string(&line).unwrap_or_default());
                        text.push('\n');
                    }
                    Some((Ok::<_, std::io::Error>(text), next))
                }
                Err(error) => Some((Err(std::io::Error::other(error.to_string())), None)),
            }
        }
    });
    let mut response = Body::from_stream(pages).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

/// The chain's head, its latest signed checkpoint and the public key, so a
/// customer can verify an export without trusting Paygate.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditChainView {
    #[schema(example = "audit_chain")]
    pub object: &'static str,
    pub chain: String,
    #[schema(example = "paygate-audit-v1")]
    pub encoding: &'static str,
    pub head: Option<ChainPoint>,
    pub checkpoint: Option<CheckpointView>,
    /// Hex Ed25519 public key that signs checkpoints.
    pub public_key: String,
    pub key_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChainPoint {
    pub seq: u64,
    pub hash: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckpointView {
    pub seq: u64,
    pub hash: String,
    pub signed_at: String,
    pub key_id: String,
    /// Hex Ed25519 signature over the checkpoint message (docs/audit.md).
    pub signature: String,
}

route! {
    GetAuditChainRoute { scope: AuditRead, audit: AuditChainRead, limit: Read }
}

/// The chain's head, its latest signed checkpoint and the public key that
/// verifies checkpoints: where a verifier of an export starts.
#[utoipa::path(
    get,
    path = "/audit-chain",
    tag = "audit",
    responses(
        (status = 200, description = "Head, latest checkpoint, public key", body = AuditChainView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `audit:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_audit_chain(
    auth: Authorized<GetAuditChainRoute>,
    State(state): State<AppState>,
) -> Result<Json<AuditChainView>, ApiError> {
    let head = state.store.audit_head(auth.scope()).await?;
    let checkpoint = state.store.latest_checkpoint(auth.scope()).await?;
    Ok(Json(AuditChainView {
        object: "audit_chain",
        chain: auth.scope().company_id().to_string(),
        encoding: ENCODING_VERSION,
        head: head.map(|(seq, hash)| ChainPoint { seq, hash: hex::encode(hash) }),
        checkpoint: checkpoint.map(|c| CheckpointView {
            seq: c.seq,
            hash: hex::encode(c.hash),
            signed_at: rfc3339(c.signed_at),
            key_id: c.key_id,
            signature: hex::encode(c.signature),
        }),
        public_key: hex::encode(state.audit_public_key),
        key_id: paygate_domain::audit::key_id(&state.audit_public_key),
    }))
}
