//! Steps 3–6 of the pipeline. The middleware authenticates every `/v1` request
//! (known route or not) before any extractor runs; the [`Authorized`] extractor
//! then checks the scope of the route declaration named in the handler's own
//! signature (see [`crate::route`]), so a handler cannot forget it, and a
//! handler without it fails the route walk test.

use std::any::TypeId;
use std::marker::PhantomData;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use paygate_store::CompanyScope;
use paygate_store::auth::{AuthError, AuthFailure, Authenticated};

use crate::AppState;
use crate::audit::AuditActor;
use crate::client::ClientAddr;
use crate::error_code::ErrorCode;
use crate::problem::ApiError;
use crate::route::{DeclaredRoute, LimitClass, Route, RouteSpec};

pub const KEY_EXPIRES_HEADER: &str = "paygate-key-expires";

/// Extracts the credential from `Authorization: Bearer <key>` (scheme
/// case-insensitive, per RFC 9110). `None` for anything else, and for a
/// repeated header: a proxy may pick the last where we would pick the first.
fn bearer(parts: &axum::http::HeaderMap) -> Option<&str> {
    let mut values = parts.get_all(AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Keys this close to expiry get `Paygate-Key-Expires` on every response.
pub const EXPIRY_WARNING: time::Duration = time::Duration::days(7);

/// Every `/v1` answer is private to its caller, and some carry a key secret:
/// no shared or browser cache may keep one.
pub async fn middleware(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let mut response = authenticate_then(state, request, next).await;
    response.headers_mut().insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn authenticate_then(state: AppState, mut request: Request, next: Next) -> Response {
    let client = request.extensions().get::<ClientAddr>().map(|c| c.0).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    // An address that failed too often is refused before any key is looked at,
    // valid key or not: a success cannot launder earlier failures.
    if let Some(refused) = state.limits.auth_throttled(client).await {
        tracing::info!(reason = "auth_throttled", "authentication refused");
        return refused;
    }
    let now = paygate_domain::now();
    let outcome = match bearer(request.headers()) {
        None => Err(AuthError::Missing.into()),
        Some(token) => state.auth.authenticate(token, client, now).await,
    };
    match outcome {
        Ok(caller) => {
            let actor = AuditActor::of(&caller);
            let expires_at = caller.record.key.expires_at;
            // Every response to this key: its audit actor and, near expiry, the warning.
            let with_actor = |mut response: Response| {
                response.extensions_mut().insert(actor.clone());
                if let Some(expires_at) = expires_at.filter(|e| *e - now <= EXPIRY_WARNING)
                    && let Ok(text) = expires_at.format(&time::format_description::well_known::Rfc3339)
                    && let Ok(value) = HeaderValue::from_str(&text)
                {
                    response.headers_mut().insert(KEY_EXPIRES_HEADER, value);
                }
                response
            };
            // Step 7: per-key and per-company limits, then write concurrency.
            let limit = match state.limits.check_caller(&caller).await {
                Ok(outcome) => outcome,
                Err(refused) => return with_actor(refused),
            };
            // The route's declaration says whether it takes a write slot; an
            // unknown path takes none (it answers 404).
            let declared = request
                .extensions()
                .get::<MatchedPath>()
                .and_then(|route| crate::route::table().find(request.method(), route.as_str()));
            let _slot = if declared.is_some_and(|d| d.spec.limit == LimitClass::Write) {
                match state.limits.write_slot(&caller).await {
                    Ok(slot) => slot,
                    Err(refused) => return with_actor(refused),
                }
            } else {
                None
            };
            let span = tracing::Span::current();
            span.record("company_id", tracing::field::display(caller.scope.company_id()));
            span.record("key_id", tracing::field::display(caller.record.key.id));
            request.extensions_mut().insert(caller);
            if let Some(declared) = declared {
                request.extensions_mut().insert(declared);
            }
            let checked = ScopeChecked::default();
            request.extensions_mut().insert(checked.clone());
            let response = next.run(request).await;
            // Deny by default, at run time too: a handler that answered without
            // passing through `Authorized<S>` never gets its answer out.
            if response.status().as_u16() < 400 && !checked.0.load(Ordering::Acquire) {
                tracing::error!("route answered without declaring a scope; refused");
                return with_actor(ApiError::internal().into_response());
            }
            let mut response = with_actor(response);
            if let Some(limit) = &limit {
                crate::ratelimit_headers::insert(response.headers_mut(), limit);
            }
            response
        }
        Err(AuthFailure { error, key }) => {
            if !matches!(error, AuthError::Unavailable(_)) {
                state.limits.note_auth_failure(client).await;
            }
            metrics::counter!("paygate_auth_failures_total", "reason" => error.reason()).increment(1);
            tracing::info!(reason = error.reason(), "authentication failed");
            let mut response = problem_for(error).into_response();
            // The secret verified: the refusal goes to the key's company chain.
            if let Some(record) = key {
                response.extensions_mut().insert(AuditActor(record));
            }
            response
        }
    }
}

fn problem_for(error: AuthError) -> ApiError {
    match error {
        AuthError::Missing | AuthError::Malformed(_) | AuthError::UnknownKey | AuthError::WrongSecret => {
            ApiError::unauthenticated()
        }
        AuthError::Revoked => ApiError::key_revoked(),
        AuthError::Expired => ApiError::key_expired(),
        AuthError::CompanySuspended => ApiError::company_suspended(),
        AuthError::IpNotAllowed => {
            ApiError::new(ErrorCode::IpNotAllowed, "This API key may not be used from this client address.")
        }
        AuthError::Unavailable(e) => ApiError::from(e),
    }
}

/// Set by [`Authorized`] when the route's scope was checked.
#[derive(Clone, Default)]
struct ScopeChecked(Arc<AtomicBool>);

/// An authenticated caller holding the scope the route `R` declares.
pub struct Authorized<R: Route> {
    pub caller: Authenticated,
    _route: PhantomData<R>,
}

impl<R: Route> Authorized<R> {
    pub fn scope(&self) -> &CompanyScope {
        &self.caller.scope
    }

    /// The route's declaration (its audit action, for the change's record).
    pub fn route(&self) -> RouteSpec {
        R::SPEC
    }
}

impl<R: Route, T: Send + Sync> FromRequestParts<T> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &T) -> Result<Self, Self::Rejection> {
        // Absent only if a route escaped the auth middleware: refuse, never allow.
        let caller = parts.extensions.get::<Authenticated>().cloned().ok_or_else(ApiError::unauthenticated)?;
        // A handler registered under another route's declaration would check
        // one scope and be limited and audited as another: refuse.
        if let Some(declared) = parts.extensions.get::<DeclaredRoute>()
            && declared.declaration != TypeId::of::<R>()
        {
            tracing::error!("handler's declaration differs from the route's; refused");
            return Err(ApiError::internal());
        }
        if let Some(required) = R::SPEC.scope
            && !caller.record.key.scopes.contains(required)
        {
            return Err(ApiError::insufficient_scope(required.as_str()));
        }
        if let Some(checked) = parts.extensions.get::<ScopeChecked>() {
            checked.0.store(true, Ordering::Release);
        }
        Ok(Self { caller, _route: PhantomData })
    }
}
