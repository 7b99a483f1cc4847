use crate::error_code::ErrorCode;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use paygate_domain::payment::{
    Actor, IdempotencyKey, Payment, PaymentDraft, PaymentEdit, PaymentError, PaymentStatus, parse_execution_date,
    parse_reference, request_fingerprint,
};
use paygate_domain::{Amount, Currency, PayeeId, PaymentId};
use paygate_store::auth::Authenticated;
use paygate_store::{PaymentCreate, PaymentCreated, PaymentFilter, StoredResponse};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::audit::{AuditContext, AuditWritten};
use crate::auth::Authorized;
use crate::extract::{Json as JsonBody, OptionalJson, Query};
use crate::pagination::{List, page_request};
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
use crate::route::RouteSpec;
use crate::routes::shared::{caller_actor, double_option, metadata_field, parse_time};
pub use crate::views::{ApprovalsView, PaymentView, StatusChangeView, VoteView};

/// How long an idempotency key and its response are kept.
pub const IDEMPOTENCY_TTL: time::Duration = time::Duration::hours(24);

/// Approved test-mode payments reach the simulated rail after its submit
/// delay (never before their execution date).
fn delay_settlement(state: &AppState, payment: &mut Payment, now: OffsetDateTime) {
    if let (paygate_domain::KeyMode::Test, Some(at)) = (payment.mode, payment.rail_next_at.as_mut()) {
        *at = (*at).max(now + state.rail_submit_delay);
    }
}

/// Body of `POST /v1/payments`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePayment {
    #[schema(pattern = "^pye_[0-9A-Za-z]{22}$")]
    pub payee_id: String,
    /// Integer minor units: > 0, ≤ 2^53 − 1.
    #[schema(value_type = u64, minimum = 1, maximum = 9007199254740991_u64)]
    pub amount: serde_json::Value,
    /// ISO 4217 code, upper case.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// 1–140 characters, shown to the payee.
    #[schema(
        min_length = 1,
        max_length = 140,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*[^\\s\\x00-\\x1F\\x7F-\\x9F][^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub reference: String,
    /// `YYYY-MM-DD`, today or later (UTC), at most a year ahead.
    pub requested_execution_date: Option<String>,
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
}

fn idempotency_problem(code: ErrorCode, detail: &str) -> ApiError {
    ApiError::new(code, detail.to_owned())
}

fn replay(stored: &StoredResponse, fingerprint: &str) -> Result<Response, ApiError> {
    if stored.fingerprint != fingerprint {
        return Err(idempotency_problem(
            ErrorCode::IdempotencyKeyReused,
            "This Idempotency-Key was used with a different request body; use a new key for a new payment.",
        ));
    }
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::CREATED);
    let mut response = created_response(status, stored.body.clone(), stored.payment_id);
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
}

/// The answer to a creation, first time or replayed: the stored JSON body and
/// the payment's `Location`.
fn created_response(status: StatusCode, body: String, id: PaymentId) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/payments/{id}")) {
        headers.insert(axum::http::header::LOCATION, location);
    }
    response
}

fn parse_draft(body: CreatePayment, now: OffsetDateTime) -> Result<PaymentDraft, ApiError> {
    let mut errors = Vec::new();
    let mut field = |pointer: &str, message: String| errors.push(FieldError::pointer(pointer, message));
    let payee_id =
        PayeeId::parse(&body.payee_id).map_err(|_| field("/payee_id", "must be a payee id (pye_…)".into())).ok();
    let currency = Currency::parse(&body.currency).map_err(|e| field("/currency", e.to_string())).ok();
    let amount = Amount::from_json(&body.amount).map_err(|e| field("/amount", e.to_string())).ok();
    let reference = parse_reference(&body.reference).map_err(|e| field("/reference", e)).ok();
    let date = match body.requested_execution_date.as_deref() {
        None => Some(None),
        Some(d) => parse_execution_date(d, now).map(Some).map_err(|e| field("/requested_execution_date", e)).ok(),
    };
    let metadata = metadata_field(&mut errors, "/metadata", body.metadata.as_ref()).unwrap_or_default();
    match (payee_id, currency, amount, reference, date) {
        (Some(payee_id), Some(currency), Some(amount), Some(reference), Some(requested_execution_date))
            if errors.is_empty() =>
        {
            Ok(PaymentDraft { payee_id, amount, currency, reference, requested_execution_date, metadata })
        }
        _ => Err(ApiError::validation(errors)),
    }
}

route! {
    CreatePaymentRoute { scope: PaymentsWrite, audit: PaymentCreate on Payment, limit: Write }
}

/// Create a payment. Requires an `Idempotency-Key` header: a retry with the
/// same key and body replays the first response (`Idempotent-Replayed: true`)
/// and creates nothing. The company's approval policy decides how many
/// approvals the payment needs; below the first threshold it is approved at once.
#[utoipa::path(
    post,
    path = "/payments",
    tag = "payments",
    params(("Idempotency-Key" = String, Header, pattern = "^[!-~]{1,255}$", description = "1–255 printable ASCII characters, unique per payment; kept 24 h")),
    request_body = CreatePayment,
    responses(
        (status = 201, description = "The payment (also replayed for a retry)", body = PaymentView),
        (status = 400, description = "`idempotency_key_missing`, `invalid_idempotency_key` or malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:write`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`idempotency_key_in_use`: the first request with this key is still running", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, `payee_disabled`, or `idempotency_key_reused` with another body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_payment(
    auth: Authorized<CreatePaymentRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => {
            return Err(idempotency_problem(
                ErrorCode::IdempotencyKeyMissing,
                "POST /v1/payments requires an Idempotency-Key header (e.g. a UUID per payment).",
            ));
        }
        Some(v) => v.to_str().ok().and_then(IdempotencyKey::parse).ok_or_else(|| {
            idempotency_problem(
                ErrorCode::InvalidIdempotencyKey,
                "The Idempotency-Key must be 1 to 255 printable ASCII characters without spaces.",
            )
        })?,
    };
    let mode = auth.caller.record.key.mode;
    let fingerprint = request_fingerprint("POST", &format!("/v1/payments {}", mode.as_str()), &raw);
    let company = auth.scope().company_id();
    let Some(_in_flight) = state.payments.claim(company, mode, key.as_str()) else {
        return Err(idempotency_problem(
            ErrorCode::IdempotencyKeyInUse,
            "A request with this Idempotency-Key is still being processed; retry after it completes.",
        ));
    };
    let now = paygate_domain::now();
    let parsed = serde_json::from_value::<CreatePayment>(raw)
        .map_err(|e| ApiError::validation(vec![FieldError::pointer("", e.to_string())]))
        .and_then(|body| parse_draft(body, now));
    let draft = match parsed {
        Ok(draft) => draft,
        // A retry of a request that succeeded replays it even if it would no
        // longer validate (an execution date now in the past). New keys skip
        // this read: the batch checks the key inside its transaction.
        Err(error) => match state.store.idempotent_response(auth.scope(), key.as_str()).await? {
            Some(stored) => return replay(&stored, &fingerprint),
            None => return Err(error),
        },
    };
    let policy = state.store.approval_policy(auth.scope()).await?;
    let mut payment = Payment::create(draft, mode, caller_actor(&auth.caller), &policy, now);
    delay_settlement(&state, &mut payment, now);
    let view = PaymentView::from(&payment);
    let response_body = serde_json::to_string(&view).map_err(|_| ApiError::internal())?;
    let record = audit.entry_for(
        auth.route(),
        Some(payment.id.to_string()),
        StatusCode::CREATED,
        serde_json::json!({
            "payee_id": payment.payee_id,
            "amount": payment.amount,
            "currency": payment.currency.code(),
            "status": payment.status,
            "required_approvals": payment.required_approvals,
            "idempotency_key": key.as_str(),
        }),
    );
    let payment_id = payment.id;
    let outcome = state
        .payments
        .create(PaymentCreate {
            scope: *auth.scope(),
            payment,
            idempotency_key: key.as_str().to_owned(),
            response: StoredResponse {
                fingerprint: fingerprint.clone(),
                status: 201,
                body: response_body.clone(),
                payment_id,
            },
            expires_at: now + IDEMPOTENCY_TTL,
            audit: record,
        })
        .await?;
    match outcome {
        PaymentCreated::Created => {
            Ok((AuditWritten, created_response(StatusCode::CREATED, response_body, payment_id)).into_response())
        }
        PaymentCreated::Existing(stored) => replay(&stored, &fingerprint),
        PaymentCreated::PayeeNotFound => {
            Err(ApiError::validation(vec![FieldError::pointer("/payee_id", "no such payee")]))
        }
        PaymentCreated::PayeeDisabled => {
            let mut e = ApiError::new(ErrorCode::PayeeDisabled, "The payee is disabled; payments to it are refused.");
            e.errors = vec![FieldError::pointer("/payee_id", "payee is disabled")];
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PaymentListParams {
    /// 1..=100, default 25.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// One status, e.g. `pending_approval`.
    pub status: Option<String>,
    pub payee_id: Option<String>,
    /// RFC 3339: created at or after.
    #[param(format = DateTime)]
    pub created_from: Option<String>,
    /// RFC 3339: created before.
    #[param(format = DateTime)]
    pub created_before: Option<String>,
}

route! {
    ListPaymentsRoute { scope: PaymentsRead, audit: PaymentList, limit: Read }
}

/// The company's payments (of the caller's mode), newest first.
#[utoipa::path(
    get,
    path = "/payments",
    tag = "payments",
    params(PaymentListParams),
    responses(
        (status = 200, description = "A page of payments", body = List<PaymentView>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_payments(
    auth: Authorized<ListPaymentsRoute>,
    State(state): State<AppState>,
    Query(params): Query<PaymentListParams>,
) -> Result<Json<List<PaymentView>>, ApiError> {
    let mut errors = Vec::new();
    let page =
        page_request(&mut errors, params.limit.as_deref(), params.cursor.as_deref(), |c| PaymentId::parse(c).ok());
    let mut filter = PaymentFilter::default();
    if let Some(s) = params.status.as_deref() {
        filter.status = PaymentStatus::parse(s);
        if filter.status.is_none() {
            errors.push(FieldError::parameter("status", "must be a payment status, e.g. pending_approval"));
        }
    }
    if let Some(p) = params.payee_id.as_deref() {
        // An id of the wrong shape filters to nothing, like an unknown id.
        filter.payee_id = Some(PayeeId::parse(p).unwrap_or_else(|_| PayeeId::from_uuid(uuid::Uuid::nil())));
    }
    filter.created_from = parse_time(&mut errors, "created_from", params.created_from.as_deref());
    filter.created_before = parse_time(&mut errors, "created_before", params.created_before.as_deref());
    if !errors.is_empty() {
        return Err(ApiError::invalid_parameter(errors));
    }
    let page = state.store.list_payments(auth.scope(), &filter, page).await?;
    let last = page.items.last().map(|p| p.id.to_string());
    Ok(Json(List::new(page.items.iter().map(PaymentView::from).collect(), page.has_more, last)))
}

route! {
    GetPaymentRoute { scope: PaymentsRead, audit: PaymentRead on Payment, limit: Read }
}

/// One payment. Another company's payment answers like one that does not exist.
#[utoipa::path(
    get,
    path = "/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "The payment id (`pay_…`)")),
    responses(
        (status = 200, description = "The payment", body = PaymentView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:read`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_payment(
    auth: Authorized<GetPaymentRoute>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PaymentView>, ApiError> {
    let id = PaymentId::parse(&id).map_err(|_| ApiError::not_found("payment"))?;
    let payment = state.store.get_payment(auth.scope(), id).await?;
    Ok(Json(PaymentView::from(&payment.ok_or_else(|| ApiError::not_found("payment"))?)))
}

fn payment_error(e: PaymentError) -> ApiError {
    let detail = e.to_string();
    match e {
        PaymentError::InvalidState { .. } => ApiError::new(ErrorCode::InvalidState, detail),
        PaymentError::ApproverIsInitiator => ApiError::new(ErrorCode::ApproverIsInitiator, detail),
        PaymentError::AlreadyApproved => ApiError::new(ErrorCode::AlreadyApproved, detail),
        PaymentError::ApprovalExpired(_) => ApiError::new(ErrorCode::ApprovalExpired, detail),
    }
}

/// Reads the payment, applies `change`, and writes it back if nobody else
/// wrote in between (else reads again): concurrent approvals and cancels each
/// see the result of the previous one.
/// Whether a change is bound to the version its caller saw.
#[derive(Debug, Clone, Copy)]
enum Binding {
    /// Re-apply on whatever the payment has become (cancel, edit).
    Latest,
    /// A vote: only on this version (the client's, or the one first read by
    /// this request); a payment that changed meanwhile is 409 `payment_changed`.
    Version(Option<u32>),
}

fn payment_changed(expected: u32, actual: u32) -> ApiError {
    ApiError::new(
        ErrorCode::PaymentChanged,
        format!("The payment is at version {actual}, not {expected}: read it again and decide on what it is now."),
    )
}

/// What a change is: its route (for the audit action), the version it is bound to, and
/// whether the payee's creator must be known (approvals).
struct ChangeKind {
    route: RouteSpec,
    binding: Binding,
    with_payee_creator: bool,
}

async fn change_payment(
    state: &AppState,
    auth: &Authenticated,
    audit: AuditContext,
    id: &str,
    kind: ChangeKind,
    mut change: impl FnMut(&mut Payment, Option<&Actor>) -> Result<(), PaymentError>,
) -> Result<(AuditWritten, Json<PaymentView>), ApiError> {
    let id = PaymentId::parse(id).map_err(|_| ApiError::not_found("payment"))?;
    let mode = auth.record.key.mode;
    let ChangeKind { route, binding, with_payee_creator } = kind;
    let mut bound = match binding {
        Binding::Latest => None,
        Binding::Version(v) => Some(v),
    };
    // Read once: a payment's payee never changes.
    let mut payee_creator: Option<Option<Actor>> = None;
    for _ in 0..20 {
        let mut payment =
            state.store.get_payment(&auth.scope, id).await?.ok_or_else(|| ApiError::not_found("payment"))?;
        if with_payee_creator && payee_creator.is_none() {
            let payee = state.store.get_payee(&auth.scope, payment.payee_id).await?;
            payee_creator = Some(payee.and_then(|p| p.created_by));
        }
        if let Some(expected) = &mut bound {
            let expected = *expected.get_or_insert(payment.version);
            if payment.version != expected {
                return Err(payment_changed(expected, payment.version));
            }
        }
        let read_revision = payment.revision;
        let before = payment.status;
        change(&mut payment, payee_creator.as_ref().and_then(Option::as_ref)).map_err(payment_error)?;
        delay_settlement(state, &mut payment, paygate_domain::now());
        let record = audit.clone().entry_for(
            route,
            Some(id.to_string()),
            StatusCode::OK,
            serde_json::json!({
                "previous_status": before,
                "status": payment.status,
                "version": payment.version,
                "content_hash": payment.content_hash(),
                "approvals": payment.valid_approvals(),
                "required_approvals": payment.required_approvals,
            }),
        );
        if state.store.update_payment(&auth.scope, &payment, read_revision, &record).await? {
            if payment.status == PaymentStatus::Approved
                && before != PaymentStatus::Approved
                && mode == paygate_domain::KeyMode::Live
            {
                tracing::info!(payment = %id, "live payment approved; it stays approved until a real rail is configured");
            }
            return Ok((AuditWritten, Json(PaymentView::from(&payment))));
        }
        tokio::task::yield_now().await;
    }
    Err(ApiError::new(
        ErrorCode::ConcurrentUpdate,
        "The payment changed too often while this request ran; read it and retry.",
    ))
}

route! {
    ApprovePaymentRoute { scope: PaymentsApprove, audit: PaymentApprove on Payment, limit: Write }
}

/// Approve a payment (four eyes). Refused for the key that created or changed
/// the payment, any key with the same owner, and any key of the same
/// principal; one vote per owner. When enough approvals count, the payment
/// becomes `approved`.
#[utoipa::path(
    post,
    path = "/payments/{id}/approve",
    tag = "payments",
    params(("id" = String, Path, description = "The payment id (`pay_…`)")),
    request_body(content = Option<Vote>, description = "Optional: the version the approver reviewed"),
    responses(
        (status = 200, description = "The payment after the vote", body = PaymentView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:approve`, or `approver_is_initiator`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`, `already_approved`, `approval_expired`, or `payment_changed` since the given version", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn approve_payment(
    auth: Authorized<ApprovePaymentRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<Vote>,
) -> Result<(AuditWritten, Json<PaymentView>), ApiError> {
    let actor = caller_actor(&auth.caller);
    change_payment(
        &state,
        &auth.caller,
        audit,
        &id,
        ChangeKind { route: auth.route(), binding: Binding::Version(body.version), with_payee_creator: true },
        |p, payee_creator| p.approve_checking_payee(actor.clone(), payee_creator, paygate_domain::now()),
    )
    .await
}

/// Optional body of `POST /v1/payments/{id}/approve`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vote {
    /// The version the approver reviewed. Recommended: if the payment has
    /// changed since, the vote is refused with 409 `payment_changed` instead
    /// of approving something the approver has not seen. Omitted: the version
    /// this request reads first.
    pub version: Option<u32>,
}

/// Body of `POST /v1/payments/{id}/reject`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectPayment {
    /// 1–500 characters.
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*[^\\s\\x00-\\x1F\\x7F-\\x9F][^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub reason: String,
    /// The version the reviewer saw (see approve).
    pub version: Option<u32>,
}

route! {
    RejectPaymentRoute { scope: PaymentsApprove, audit: PaymentReject on Payment, limit: Write }
}

/// Reject a payment. Any reject is final.
#[utoipa::path(
    post,
    path = "/payments/{id}/reject",
    tag = "payments",
    params(("id" = String, Path, description = "The payment id (`pay_…`)")),
    request_body = RejectPayment,
    responses(
        (status = 200, description = "The rejected payment", body = PaymentView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:approve`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`, `approval_expired` or `payment_changed`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Missing or invalid reason", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reject_payment(
    auth: Authorized<RejectPaymentRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RejectPayment>,
) -> Result<(AuditWritten, Json<PaymentView>), ApiError> {
    let reason = paygate_domain::text::field(&body.reason, 500, false)
        .map_err(|e| ApiError::validation(vec![FieldError::pointer("/reason", format!("1 to 500 characters: {e}"))]))?;
    let actor = caller_actor(&auth.caller);
    change_payment(
        &state,
        &auth.caller,
        audit,
        &id,
        ChangeKind { route: auth.route(), binding: Binding::Version(body.version), with_payee_creator: false },
        |p, _| p.reject(actor.clone(), reason.clone(), paygate_domain::now()),
    )
    .await
}

route! {
    CancelPaymentRoute { scope: PaymentsWrite, audit: PaymentCancel on Payment, limit: Write }
}

/// Cancel a payment that has not started settling (`pending_approval` or `approved`).
#[utoipa::path(
    post,
    path = "/payments/{id}/cancel",
    tag = "payments",
    params(("id" = String, Path, description = "The payment id (`pay_…`)")),
    responses(
        (status = 200, description = "The canceled payment", body = PaymentView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:write`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: already settling or final", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_payment(
    auth: Authorized<CancelPaymentRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
) -> Result<(AuditWritten, Json<PaymentView>), ApiError> {
    let actor = caller_actor(&auth.caller);
    change_payment(
        &state,
        &auth.caller,
        audit,
        &id,
        ChangeKind { route: auth.route(), binding: Binding::Latest, with_payee_creator: false },
        |p, _| p.cancel(actor.clone(), paygate_domain::now()),
    )
    .await
}

/// Body of `PATCH /v1/payments/{id}`; every field optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePayment {
    #[schema(value_type = Option<u64>)]
    pub amount: Option<serde_json::Value>,
    #[schema(
        min_length = 1,
        max_length = 140,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*[^\\s\\x00-\\x1F\\x7F-\\x9F][^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub reference: Option<String>,
    /// `YYYY-MM-DD`; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = Date)]
    pub requested_execution_date: Option<Option<String>>,
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
}

route! {
    UpdatePaymentRoute { scope: PaymentsWrite, audit: PaymentUpdate on Payment, limit: Write }
}

/// Change a payment awaiting approval. Votes already cast stop counting (the
/// version and content hash change), the number of approvals is recomputed
/// with the policy snapshotted at creation, and the changing key joins the
/// initiators, who cannot approve.
#[utoipa::path(
    patch,
    path = "/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "The payment id (`pay_…`)")),
    request_body = UpdatePayment,
    responses(
        (status = 200, description = "The changed payment", body = PaymentView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payments:write`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: no longer pending approval", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update_payment(
    auth: Authorized<UpdatePaymentRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<UpdatePayment>,
) -> Result<(AuditWritten, Json<PaymentView>), ApiError> {
    let now = paygate_domain::now();
    let mut errors = Vec::new();
    let mut edit = PaymentEdit::default();
    if let Some(a) = &body.amount {
        edit.amount = Amount::from_json(a).map_err(|e| errors.push(FieldError::pointer("/amount", e.to_string()))).ok();
    }
    if let Some(r) = &body.reference {
        edit.reference = parse_reference(r).map_err(|e| errors.push(FieldError::pointer("/reference", e))).ok();
    }
    match &body.requested_execution_date {
        None => {}
        Some(None) => edit.requested_execution_date = Some(None),
        Some(Some(d)) => {
            edit.requested_execution_date = parse_execution_date(d, now).map(|d| Some(Some(d))).unwrap_or_else(|e| {
                errors.push(FieldError::pointer("/requested_execution_date", e));
                None
            })
        }
    }
    edit.metadata = metadata_field(&mut errors, "/metadata", body.metadata.as_ref());
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    if edit.amount.is_none()
        && edit.reference.is_none()
        && edit.requested_execution_date.is_none()
        && edit.metadata.is_none()
    {
        return Err(ApiError::validation(vec![FieldError::pointer("", "change at least one field")]));
    }
    let actor = caller_actor(&auth.caller);
    change_payment(
        &state,
        &auth.caller,
        audit,
        &id,
        ChangeKind { route: auth.route(), binding: Binding::Latest, with_payee_creator: false },
        |p, _| p.edit(actor.clone(), edit.clone(), paygate_domain::now()),
    )
    .await
}
