use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Json;
use paygate_domain::Currency;
use paygate_domain::money::threshold_from_json;
use paygate_domain::payment::{ApprovalPolicy, ApprovalRule};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::audit::{AuditContext, AuditWritten};
use crate::auth::Authorized;
use crate::extract::Json as JsonBody;
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
pub use crate::views::ApprovalPolicyView;

/// Body of `PUT /v1/approval-policy`: the whole policy.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutApprovalPolicy {
    /// Per ISO 4217 code: `one_approval_from` (minor units; below it payments
    /// are approved automatically) and optionally `two_approvals_from`. A
    /// currency without a rule needs one approval for every amount.
    #[schema(value_type = BTreeMap<String, ApprovalRule>)]
    pub rules: BTreeMap<String, serde_json::Value>,
    /// 1 to 2592000 (30 days); default 259200 (72 h).
    pub approval_ttl_seconds: Option<i64>,
    /// Default `false`: key creation with `payments:write` together with
    /// `payments:approve` or `policy:manage` is refused with `conflicting_scopes`.
    pub allow_write_and_approve_keys: Option<bool>,
}

route! {
    GetApprovalPolicyRoute { scope: PolicyManage, audit: ApprovalPolicyRead, limit: Read }
}

/// The company's approval policy for the caller's mode (test and live
/// payments each have their own).
#[utoipa::path(
    get,
    path = "/approval-policy",
    tag = "payments",
    responses(
        (status = 200, description = "The policy in force for new payments", body = ApprovalPolicyView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `policy:manage`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_approval_policy(
    auth: Authorized<GetApprovalPolicyRoute>,
    State(state): State<AppState>,
) -> Result<Json<ApprovalPolicyView>, ApiError> {
    let policy = state.store.approval_policy(auth.scope()).await?;
    Ok(Json(ApprovalPolicyView { object: "approval_policy", policy }))
}

route! {
    PutApprovalPolicyRoute { scope: PolicyManage, audit: ApprovalPolicyUpdate, limit: Write }
}

/// Replace the approval policy. It applies to payments created from now on;
/// each payment keeps the rule it was created under.
#[utoipa::path(
    put,
    path = "/approval-policy",
    tag = "payments",
    request_body = PutApprovalPolicy,
    responses(
        (status = 200, description = "The new policy", body = ApprovalPolicyView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `policy:manage`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_approval_policy(
    auth: Authorized<PutApprovalPolicyRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    JsonBody(body): JsonBody<PutApprovalPolicy>,
) -> Result<(AuditWritten, Json<ApprovalPolicyView>), ApiError> {
    let mut errors = Vec::new();
    let mut rules = BTreeMap::new();
    if body.rules.len() > 200 {
        errors.push(FieldError::pointer("/rules", "at most 200 currencies"));
    }
    for (code, rule) in &body.rules {
        let at = |field: &str| format!("/rules/{}{field}", code.replace('~', "~0").replace('/', "~1"));
        if let Err(e) = Currency::parse(code) {
            errors.push(FieldError::pointer(at(""), e.to_string()));
            continue;
        }
        let Some(obj) = rule.as_object() else {
            errors.push(FieldError::pointer(at(""), "must be an object with one_approval_from"));
            continue;
        };
        if let Some(extra) = obj.keys().find(|k| *k != "one_approval_from" && *k != "two_approvals_from") {
            errors.push(FieldError::pointer(at(&format!("/{extra}")), "unknown field"));
        }
        let one = match obj.get("one_approval_from") {
            None => Err("is required".to_owned()),
            Some(v) => threshold_from_json(v).map_err(|e| e.to_string()),
        }
        .map_err(|e| errors.push(FieldError::pointer(at("/one_approval_from"), e)))
        .ok();
        let two = match obj.get("two_approvals_from") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => threshold_from_json(v).map(Some).map_err(|e| e.to_string()),
        }
        .map_err(|e| errors.push(FieldError::pointer(at("/two_approvals_from"), e)))
        .ok();
        if let (Some(one), Some(two)) = (one, two) {
            if two.is_some_and(|t| t < one) {
                errors.push(FieldError::pointer(at("/two_approvals_from"), "must be at least one_approval_from"));
            }
            rules.insert(code.clone(), ApprovalRule { one_approval_from: one, two_approvals_from: two });
        }
    }
    let ttl = body.approval_ttl_seconds.unwrap_or(ApprovalPolicy::DEFAULT_TTL.into());
    if !(1..=ApprovalPolicy::MAX_TTL as i64).contains(&ttl) {
        errors.push(FieldError::pointer("/approval_ttl_seconds", "must be 1 to 2592000 (30 days)"));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let policy = ApprovalPolicy {
        rules,
        approval_ttl_seconds: ttl as u32,
        allow_write_and_approve_keys: body.allow_write_and_approve_keys.unwrap_or(false),
    };
    let record = audit.entry_for(auth.route(), None, StatusCode::OK, serde_json::to_value(&policy).unwrap_or_default());
    state.store.set_approval_policy(auth.scope(), &policy, &record).await?;
    Ok((AuditWritten, Json(ApprovalPolicyView { object: "approval_policy", policy })))
}
