use crate::error_code::ErrorCode;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Json;
use paygate_domain::{AllowedCidrs, ApiKeyId, Label, LifetimeExceedsPolicy, Scope, ScopeSet};
use paygate_store::{NewApiKey, Rotation};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AppState;
use crate::audit::{AuditContext, AuditWritten};
use crate::auth::Authorized;
use crate::extract::{Json as JsonBody, OptionalJson, Query};
use crate::pagination::{List, ListParams};
use crate::problem::{ApiError, FieldError, Problem};
use crate::route;
use crate::views::ApiKeyView;
use crate::views::rfc3339;

route! {
    ListApiKeysRoute { scope: KeysRead, audit: ApiKeyList, limit: Read }
}

/// The company's API keys, newest first. Never shows secrets or hashes.
#[utoipa::path(
    get,
    path = "/api-keys",
    tag = "api-keys",
    params(ListParams),
    responses(
        (status = 200, description = "A page of keys", body = List<ApiKeyView>),
        (status = 400, description = "Invalid limit or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:read`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_api_keys(
    auth: Authorized<ListApiKeysRoute>,
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

route! {
    GetApiKeyRoute { scope: KeysRead, audit: ApiKeyRead on ApiKey, limit: Read }
}

/// One API key of the company. Another company's key answers exactly like a
/// key that does not exist.
#[utoipa::path(
    get,
    path = "/api-keys/{id}",
    tag = "api-keys",
    params(("id" = String, Path, description = "The key id (`key_…`)")),
    responses(
        (status = 200, description = "The key", body = ApiKeyView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:read`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_api_key(
    auth: Authorized<GetApiKeyRoute>,
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
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*[^\\s\\x00-\\x1F\\x7F-\\x9F][^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub name: String,
    /// Who or which system holds it; approvals compare owners (four eyes).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*[^\\s\\x00-\\x1F\\x7F-\\x9F][^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub owner: String,
    /// A subset of the calling key's scopes.
    #[schema(value_type = Vec<Scope>)]
    pub scopes: Vec<String>,
    /// RFC 3339; must be in the future, within the company's maximum key
    /// lifetime and no later than the calling key's expiry. Omitted: the
    /// company's default lifetime (else its maximum, else no expiry), capped
    /// at the calling key's expiry.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
    /// Client networks (IPv4/IPv6 CIDR, at most 32) the key may be used from,
    /// each inside the calling key's allow-list. Omitted or empty: the
    /// calling key's allow-list (any address if it has none).
    #[serde(default)]
    #[schema(example = json!(["203.0.113.0/24"]))]
    pub allowed_cidrs: Vec<String>,
}

/// A newly issued key, with its text shown this once.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// The full key text. Shown only in this response; Paygate keeps only a hash.
    pub secret: String,
}

route! {
    CreateApiKeyRoute { scope: KeysManage, audit: ApiKeyCreate on ApiKey, limit: Write }
}

/// Issue a new key for the caller's company. Its scopes must be a subset of the
/// caller's and its mode is the caller's.
#[utoipa::path(
    post,
    path = "/api-keys",
    tag = "api-keys",
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "The key, with its text shown once", body = CreatedApiKey),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:manage`; `scope_escalation`; `constraint_escalation` for an allow-list or expiry wider than the caller's", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or `lifetime_exceeds_policy`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_api_key(
    auth: Authorized<CreateApiKeyRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> Result<Created, ApiError> {
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
    // Converted to UTC with a checked conversion: an offset can push a valid
    // RFC 3339 time past year 9999.
    let parsed = body
        .expires_at
        .as_deref()
        .map(|t| OffsetDateTime::parse(t, &Rfc3339).ok().and_then(|t| t.checked_to_offset(time::UtcOffset::UTC)));
    let expires_at = match parsed {
        None => None,
        Some(Some(t)) if t > now => Some(paygate_domain::truncate_to_micros(t)),
        Some(Some(_)) => {
            errors.push(FieldError::pointer("/expires_at", "must be in the future"));
            None
        }
        Some(None) => {
            errors.push(FieldError::pointer("/expires_at", "must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z"));
            None
        }
    };
    let mut nets = Vec::new();
    for (i, text) in body.allowed_cidrs.iter().enumerate() {
        match paygate_domain::network::parse_cidr(text) {
            Ok(net) => nets.push(net),
            Err(e) => errors.push(FieldError::pointer(format!("/allowed_cidrs/{i}"), e.to_string())),
        }
    }
    let requested_nets = nets.clone();
    let allowed_cidrs =
        AllowedCidrs::new(nets).map_err(|e| errors.push(FieldError::pointer("/allowed_cidrs", e.to_string()))).ok();
    let (Some(name), Some(owner), Some(allowed_cidrs), true) = (name, owner, allowed_cidrs, errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    let caller = &auth.caller.record.key;
    if !scopes.is_subset_of(caller.scopes) {
        let extra: Vec<_> = scopes.iter().filter(|s| !caller.scopes.contains(*s)).map(Scope::as_str).collect();
        return Err(ApiError::new(
            ErrorCode::ScopeEscalation,
            format!("A key cannot grant scopes it does not hold: {}.", extra.join(", ")),
        ));
    }
    if let Some(pair) = paygate_domain::payment::conflicting_scopes(scopes) {
        let approval = state.store.approval_policy(auth.scope()).await?;
        if !approval.allow_write_and_approve_keys {
            return Err(conflicting_scopes(pair));
        }
    }
    // The caller's allow-list and expiry are ceilings, like its scopes.
    // Omitted, the new key gets the ceiling itself rather than "anywhere,
    // forever".
    let mut wider = Vec::new();
    let allowed_cidrs = if allowed_cidrs.is_empty() {
        caller.allowed_cidrs.clone()
    } else {
        for (i, net) in requested_nets.iter().enumerate() {
            if !caller.allowed_cidrs.is_empty() && !caller.allowed_cidrs.covers(net) {
                wider.push(FieldError::pointer(format!("/allowed_cidrs/{i}"), "outside the calling key's allow-list"));
            }
        }
        allowed_cidrs
    };
    if outlives(expires_at, caller.expires_at) && expires_at.is_some() {
        wider.push(FieldError::pointer("/expires_at", "later than the calling key's own expiry"));
    }
    if !wider.is_empty() {
        return Err(constraint_escalation(
            "A key cannot issue a key usable from more places or for longer than itself.",
            wider,
        ));
    }
    let policy = state.store.get_company(auth.scope()).await?.key_policy;
    let expires_at = policy.expiry_for(now, expires_at).map_err(lifetime_exceeded)?;
    let expires_at = earliest(expires_at, caller.expires_at);
    let generated = state.auth.hasher().generate(caller.mode);
    let record = audit.entry_for(
        auth.route(),
        Some(generated.id.to_string()),
        StatusCode::CREATED,
        serde_json::json!({"scopes": scopes, "mode": caller.mode, "expires_at": expires_at.map(rfc3339)}),
    );
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
                allowed_cidrs,
                rate_limit: None,
                secret_hash: generated.hash,
                pepper_version: generated.pepper_version,
                // A key issued through the API is the same pair of eyes as its issuer.
                principal: Some(caller.principal),
            },
            &record,
        )
        .await?;
    Ok(created(ApiKeyView::new(key, now), &generated.text))
}

route! {
    RevokeApiKeyRoute { scope: KeysManage, audit: ApiKeyRevoke on ApiKey, limit: Write }
}

/// Revoke a key of the caller's company at once. Revoking a revoked key changes
/// nothing and answers 200 with the key as it is.
#[utoipa::path(
    post,
    path = "/api-keys/{id}/revoke",
    tag = "api-keys",
    params(("id" = String, Path, description = "The key id (`key_…`)")),
    responses(
        (status = 200, description = "The revoked key", body = ApiKeyView),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:manage`; `mode_mismatch` for a key of the other mode", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke_api_key(
    auth: Authorized<RevokeApiKeyRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
) -> Result<(AuditWritten, Json<ApiKeyView>), ApiError> {
    let id = ApiKeyId::parse(&id).map_err(|_| ApiError::not_found("API key"))?;
    let now = paygate_domain::now();
    let target = state.store.get_api_key(auth.scope(), id).await?.ok_or_else(|| ApiError::not_found("API key"))?;
    // Test keys manage test keys; live keys are a separate world.
    check_mode(auth.caller.record.key.mode, target.mode, "revoke")?;
    let record = audit.entry_for(
        auth.route(),
        Some(id.to_string()),
        StatusCode::OK,
        serde_json::json!({"already_revoked": target.revoked_at.is_some()}),
    );
    let key = state
        .store
        .revoke_api_key(auth.scope(), id, now, &record)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    state.auth.invalidate();
    Ok((AuditWritten, Json(ApiKeyView::new(key, now))))
}

/// Whether an expiry (`None`: never) is later than a ceiling (`None`: none).
fn outlives(expiry: Option<OffsetDateTime>, ceiling: Option<OffsetDateTime>) -> bool {
    match (expiry, ceiling) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(e), Some(c)) => e > c,
    }
}

fn earliest(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> Option<OffsetDateTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A key asked to issue (or re-issue) a key with a wider allow-list or a
/// later expiry than its own.
fn constraint_escalation(detail: &str, errors: Vec<FieldError>) -> ApiError {
    let mut error = ApiError::new(ErrorCode::ConstraintEscalation, detail);
    error.errors = errors;
    error
}

fn check_mode(caller: paygate_domain::KeyMode, target: paygate_domain::KeyMode, action: &str) -> Result<(), ApiError> {
    if caller == target {
        return Ok(());
    }
    Err(ApiError::new(ErrorCode::ModeMismatch, format!("A {caller} key cannot {action} a {target} key.")))
}

/// A 201 with `Location` and the key text, shown this once.
type Created = (StatusCode, AuditWritten, [(axum::http::HeaderName, String); 1], axum::response::Json<CreatedApiKey>);

fn created(key: ApiKeyView, text: &str) -> Created {
    let location = format!("/v1/api-keys/{}", key.id);
    let body = CreatedApiKey { key, secret: text.to_owned() };
    (StatusCode::CREATED, AuditWritten, [(axum::http::header::LOCATION, location)], axum::response::Json(body))
}

/// One key may not both create payments and approve them (or waive their
/// approval) unless the company's approval policy allows it: four eyes need
/// two credentials.
pub fn conflicting_scopes((a, b): (Scope, Scope)) -> ApiError {
    let mut error = ApiError::new(
        ErrorCode::ConflictingScopes,
        format!("A key may not hold both {a} and {b} under this company's approval policy."),
    );
    error.errors = vec![FieldError::pointer("/scopes", format!("{a} and {b} on one key"))];
    error
}

fn lifetime_exceeded(e: LifetimeExceedsPolicy) -> ApiError {
    let mut error = ApiError::new(
        ErrorCode::LifetimeExceedsPolicy,
        format!("Keys of this company may live at most {} seconds.", e.max_seconds),
    );
    error.errors = vec![FieldError::pointer("/expires_at", e.to_string())];
    error
}

/// Body of `POST /v1/api-keys/{id}/rotate`; may be omitted.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateApiKey {
    /// How long the old key keeps working: 0 to 604800 seconds, default 86400.
    #[schema(minimum = 0, maximum = 604800, default = 86400)]
    pub grace_period_seconds: Option<i64>,
}

pub const DEFAULT_GRACE_SECONDS: i64 = 86_400;
pub const MAX_GRACE_SECONDS: i64 = 604_800;

route! {
    RotateApiKeyRoute { scope: KeysManage, audit: ApiKeyRotate on ApiKey, limit: Write }
}

/// Rotate a key: a new key with the same name, owner, scopes and allow-list;
/// the old one keeps working for the grace period, then is refused as expired.
/// The two point at each other (`replaces` / `replaced_by`).
#[utoipa::path(
    post,
    path = "/api-keys/{id}/rotate",
    tag = "api-keys",
    params(("id" = String, Path, description = "The key id (`key_…`)")),
    request_body(content = Option<RotateApiKey>, description = "Optional"),
    responses(
        (status = 201, description = "The new key, with its text shown once", body = CreatedApiKey),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing `keys:manage`; `scope_escalation` if the key holds scopes the caller lacks; `constraint_escalation` if its allow-list or expiry is wider than the caller's; `mode_mismatch`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: the key is revoked, expired or already rotated", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid grace period", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn rotate_api_key(
    auth: Authorized<RotateApiKeyRoute>,
    State(state): State<AppState>,
    audit: AuditContext,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<RotateApiKey>,
) -> Result<Created, ApiError> {
    let id = ApiKeyId::parse(&id).map_err(|_| ApiError::not_found("API key"))?;
    let grace = body.grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    if !(0..=MAX_GRACE_SECONDS).contains(&grace) {
        return Err(ApiError::validation(vec![FieldError::pointer(
            "/grace_period_seconds",
            format!("must be from 0 to {MAX_GRACE_SECONDS}"),
        )]));
    }
    let now = paygate_domain::now();
    let old = state.store.get_api_key(auth.scope(), id).await?.ok_or_else(|| ApiError::not_found("API key"))?;
    let caller = &auth.caller.record.key;
    // Rotating hands out a fresh secret for the old key's powers: the caller
    // must hold all of them, in the same mode.
    if !old.scopes.is_subset_of(caller.scopes) {
        return Err(ApiError::new(
            ErrorCode::ScopeEscalation,
            "A key can rotate only keys whose scopes it holds itself.",
        ));
    }
    check_mode(caller.mode, old.mode, "rotate")?;
    // Nor may the old key be usable from more places, or for longer, than
    // the caller: the successor's secret goes to the caller.
    if !old.allowed_cidrs.is_within(&caller.allowed_cidrs) || outlives(old.expires_at, caller.expires_at) {
        return Err(constraint_escalation(
            "A key can rotate only keys whose allow-list and expiry are within its own.",
            Vec::new(),
        ));
    }
    // The successor keeps the old key's lifetime, within today's policy and
    // never past the caller's own expiry.
    let policy = state.store.get_company(auth.scope()).await?.key_policy;
    let requested = old.expires_at.map(|e| now + (e - old.created_at));
    let expires_at = match policy.expiry_for(now, requested) {
        Ok(e) => e,
        Err(_) => policy.max_lifetime.map(|m| now + m),
    };
    let expires_at = earliest(expires_at, caller.expires_at);
    let generated = state.auth.hasher().generate(old.mode);
    let new = NewApiKey {
        id: generated.id,
        name: Label::parse(&old.name).map_err(|_| ApiError::internal())?,
        owner: Label::parse(&old.owner).map_err(|_| ApiError::internal())?,
        scopes: old.scopes,
        mode: old.mode,
        created_at: now,
        expires_at,
        allowed_cidrs: old.allowed_cidrs.clone(),
        rate_limit: old.rate_limit,
        secret_hash: generated.hash,
        pepper_version: generated.pepper_version,
        // Whoever receives the new secret holds the key: rotating another
        // principal's key hands the successor to the caller's principal, so a
        // key with keys:manage cannot collect a second pair of eyes by rotation.
        principal: Some(if old.principal == caller.principal { old.principal } else { caller.principal }),
    };
    let grace_until = now + time::Duration::seconds(grace);
    let invalid = |detail: &str| ApiError::new(ErrorCode::InvalidState, detail);
    let record = audit.entry_for(
        auth.route(),
        Some(id.to_string()),
        StatusCode::CREATED,
        serde_json::json!({"replaced_by": new.id, "old_key_expires_at": rfc3339(grace_until)}),
    );
    let new = match state.store.rotate_api_key(auth.scope(), id, new, grace_until, now, &record).await? {
        Rotation::Rotated { new, .. } => *new,
        Rotation::NotFound => return Err(ApiError::not_found("API key")),
        Rotation::Revoked => return Err(invalid("The key is revoked.")),
        Rotation::Expired => return Err(invalid("The key has expired.")),
        Rotation::AlreadyRotated => return Err(invalid("The key has already been rotated; rotate its successor.")),
    };
    // The old key's expiry changed: this node drops cached copies at once.
    state.auth.invalidate();
    Ok(created(ApiKeyView::new(new, now), &generated.text))
}
