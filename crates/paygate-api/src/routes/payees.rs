use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Json;
use paygate_domain::bank::{BankAccount, BankAccountInput};
use paygate_domain::{Label, PayeeId};
use paygate_store::{NewPayee, Payee, PayeeStatus, PayeeType};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::audit::{AuditContext, AuditWritten};
use crate::auth::Authorized;
use crate::extract::{Json as JsonBody, Query};
use crate::pagination::{List, page_request};
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
use crate::routes::shared::{caller_actor, metadata_field};
pub use crate::views::PayeeView;

/// Body of `POST /v1/payees`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePayee {
    /// 1–200 characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*[^\\s\\x00-\\x1F\\x7F-\\x9F][^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub name: String,
    /// `business` or `individual`.
    #[serde(rename = "type")]
    #[schema(value_type = PayeeType)]
    pub kind: String,
    #[schema(max_length = 254, pattern = "^\\s*[^\\s@]+@[^\\s@]+\\.[^\\s@.]+\\s*$")]
    pub email: Option<String>,
    #[schema(value_type = BankAccountInput)]
    pub bank_account: serde_json::Value,
    /// At most 20 string pairs; keys up to 40 characters, values up to 500.
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
}

fn parse_email(text: &str) -> Result<String, &'static str> {
    let t = text.trim();
    let ok = t.len() <= 254
        && !t.chars().any(|c| c.is_whitespace() || paygate_domain::text::is_refused(c))
        && t.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        });
    if ok { Ok(t.to_owned()) } else { Err("must be an email address like ap@example.com") }
}

route! {
    CreatePayeeRoute { scope: PayeesWrite, audit: PayeeCreate on Payee, limit: Write }
}

/// Create a payee with a validated bank account (IBAN or US ACH). The account
/// number is stored only encrypted.
#[utoipa::path(
    post,
    path = "/payees",
    tag = "payees",
    request_body = CreatePayee,
    responses(
        (status = 201, description = "The payee", body = PayeeView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payees:write`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (pointer to each)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_payee(
    auth: Authorized<CreatePayeeRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    JsonBody(body): JsonBody<CreatePayee>,
) -> Result<(StatusCode, AuditWritten, [(axum::http::HeaderName, String); 1], Json<PayeeView>), ApiError> {
    let mut errors = Vec::new();
    let name = Label::parse(&body.name).map_err(|e| errors.push(FieldError::pointer("/name", e.to_string()))).ok();
    let kind = PayeeType::parse(&body.kind);
    if kind.is_none() {
        errors.push(FieldError::pointer("/type", "must be business or individual"));
    }
    let email = match body.email.as_deref() {
        None => None,
        Some(e) => parse_email(e).map_err(|m| errors.push(FieldError::pointer("/email", m))).ok(),
    };
    let account = match serde_json::from_value::<BankAccountInput>(body.bank_account) {
        Ok(input) => BankAccount::parse(&input)
            .map_err(|problems| {
                for (pointer, message) in problems {
                    errors.push(FieldError::pointer(format!("/bank_account{pointer}"), message));
                }
            })
            .ok(),
        // serde's message can quote the value, which may be an account
        // number: say what was expected, never what was sent.
        Err(_) => {
            errors.push(FieldError::pointer(
                "/bank_account",
                "must be an object of strings: scheme, and iban/bic or routing_number/account_number/account_type",
            ));
            None
        }
    };
    let metadata = metadata_field(&mut errors, "/metadata", body.metadata.as_ref()).unwrap_or_default();
    let (Some(name), Some(kind), Some(account), true) = (name, kind, account, errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    let now = paygate_domain::now();
    let id = PayeeId::generate();
    let company = auth.scope().company_id();
    let fingerprint = state.data_key.fingerprint(&account, company, auth.caller.record.key.mode);
    let sealed_account = state.data_key.seal(&account, company, &id.to_string());
    let payee = Payee {
        id,
        mode: auth.caller.record.key.mode,
        name: name.into_string(),
        kind,
        email,
        bank_account: account.details(fingerprint),
        metadata,
        status: PayeeStatus::Active,
        created_at: now,
        disabled_at: None,
        created_by: Some(caller_actor(&auth.caller)),
    };
    let record = audit.entry_for(auth.route(), Some(id.to_string()),
        StatusCode::CREATED,
        serde_json::json!({"scheme": account.scheme(), "last4": account.last4(), "fingerprint": payee.bank_account.fingerprint}),
    );
    drop(account);
    state.store.create_payee(auth.scope(), &NewPayee { payee: payee.clone(), sealed_account }, &record).await?;
    let location = format!("/v1/payees/{id}");
    Ok((StatusCode::CREATED, AuditWritten, [(axum::http::header::LOCATION, location)], Json(payee.into())))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PayeeListParams {
    /// 1..=100, default 25.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `active` or `disabled`.
    pub status: Option<String>,
}

route! {
    ListPayeesRoute { scope: PayeesRead, audit: PayeeList, limit: Read }
}

/// The company's payees (of the caller's mode), newest first.
#[utoipa::path(
    get,
    path = "/payees",
    tag = "payees",
    params(PayeeListParams),
    responses(
        (status = 200, description = "A page of payees", body = List<PayeeView>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payees:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_payees(
    auth: Authorized<ListPayeesRoute>,
    State(state): State<AppState>,
    Query(params): Query<PayeeListParams>,
) -> Result<Json<List<PayeeView>>, ApiError> {
    let mut errors = Vec::new();
    let page = page_request(&mut errors, params.limit.as_deref(), params.cursor.as_deref(), |c| PayeeId::parse(c).ok());
    let status = params.status.as_deref().and_then(|s| {
        let parsed = PayeeStatus::parse(s);
        if parsed.is_none() {
            errors.push(FieldError::parameter("status", "must be active or disabled"));
        }
        parsed
    });
    if !errors.is_empty() {
        return Err(ApiError::invalid_parameter(errors));
    }
    let page = state.store.list_payees(auth.scope(), status, page).await?;
    let last = page.items.last().map(|p| p.id.to_string());
    Ok(Json(List::new(page.items.into_iter().map(Into::into).collect(), page.has_more, last)))
}

route! {
    GetPayeeRoute { scope: PayeesRead, audit: PayeeRead on Payee, limit: Read }
}

/// One payee. Another company's payee, or one of the other mode, answers
/// exactly like a payee that does not exist.
#[utoipa::path(
    get,
    path = "/payees/{id}",
    tag = "payees",
    params(("id" = String, Path, description = "The payee id (`pye_…`)")),
    responses(
        (status = 200, description = "The payee", body = PayeeView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payees:read`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payee", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_payee(
    auth: Authorized<GetPayeeRoute>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PayeeView>, ApiError> {
    let id = PayeeId::parse(&id).map_err(|_| ApiError::not_found("payee"))?;
    let payee = state.store.get_payee(auth.scope(), id).await?;
    Ok(Json(payee.ok_or_else(|| ApiError::not_found("payee"))?.into()))
}

route! {
    DisablePayeeRoute { scope: PayeesWrite, audit: PayeeDisable on Payee, limit: Write }
}

/// Disable a payee: no new payments to it. Payments already created are not
/// affected. Disabling a disabled payee changes nothing.
#[utoipa::path(
    post,
    path = "/payees/{id}/disable",
    tag = "payees",
    params(("id" = String, Path, description = "The payee id (`pye_…`)")),
    responses(
        (status = 200, description = "The disabled payee", body = PayeeView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `payees:write`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such payee", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn disable_payee(
    auth: Authorized<DisablePayeeRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
) -> Result<(AuditWritten, Json<PayeeView>), ApiError> {
    let id = PayeeId::parse(&id).map_err(|_| ApiError::not_found("payee"))?;
    let record = audit.entry_for(auth.route(), Some(id.to_string()), StatusCode::OK, serde_json::json!({}));
    let payee = state
        .store
        .disable_payee(auth.scope(), id, paygate_domain::now(), &record)
        .await?
        .ok_or_else(|| ApiError::not_found("payee"))?;
    Ok((AuditWritten, Json(payee.into())))
}
