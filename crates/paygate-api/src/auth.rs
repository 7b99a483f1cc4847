//! Steps 3–6 of the pipeline. The middleware authenticates every `/v1` request
//! (known route or not) before any extractor runs; the [`Authorized`] extractor
//! then checks the scope the handler declares in its own signature, so a handler
//! cannot forget it, and a handler without it fails the route walk test.

use std::marker::PhantomData;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use paygate_domain::Scope;
use paygate_store::CompanyScope;
use paygate_store::auth::{AuthError, Authenticated};

use crate::AppState;
use crate::problem::ApiError;

/// Extracts the credential from `Authorization: Bearer <key>` (scheme
/// case-insensitive, per RFC 9110). `None` for anything else.
fn bearer(parts: &axum::http::HeaderMap) -> Option<&str> {
    let value = parts.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub async fn middleware(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let outcome = match bearer(request.headers()) {
        None => Err(AuthError::Missing),
        Some(token) => state.auth.authenticate(token, paygate_domain::now()).await,
    };
    match outcome {
        Ok(caller) => {
            let span = tracing::Span::current();
            span.record("company_id", tracing::field::display(caller.scope.company_id()));
            span.record("key_id", tracing::field::display(caller.record.key.id));
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => {
            metrics::counter!("paygate_auth_failures_total", "reason" => error.reason()).increment(1);
            tracing::info!(reason = error.reason(), "authentication failed");
            problem_for(error).into_response()
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
        AuthError::Unavailable(e) => ApiError::from(e),
    }
}

/// A scope requirement, declared as a type in the handler's signature.
pub trait RequiredScope: Send + Sync + 'static {
    /// `None` means any valid key may call the route (declared, not defaulted).
    const SCOPE: Option<Scope>;
}

pub mod scope {
    use super::RequiredScope;
    use paygate_domain::Scope;

    macro_rules! required_scopes {
        ($($name:ident => $scope:expr),+ $(,)?) => {
            $(
                pub struct $name;
                impl RequiredScope for $name {
                    const SCOPE: Option<Scope> = $scope;
                }
            )+
        };
    }

    required_scopes! {
        AnyValidKey => None,
        KeysRead => Some(Scope::KeysRead),
        KeysManage => Some(Scope::KeysManage),
    }
}

/// An authenticated caller holding the scope `S`.
pub struct Authorized<S: RequiredScope> {
    pub caller: Authenticated,
    _scope: PhantomData<S>,
}

impl<S: RequiredScope> Authorized<S> {
    pub fn scope(&self) -> &CompanyScope {
        &self.caller.scope
    }
}

impl<S: RequiredScope, T: Send + Sync> FromRequestParts<T> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &T) -> Result<Self, Self::Rejection> {
        // Absent only if a route escaped the auth middleware: refuse, never allow.
        let caller = parts.extensions.get::<Authenticated>().cloned().ok_or_else(ApiError::unauthenticated)?;
        if let Some(required) = S::SCOPE
            && !caller.record.key.scopes.contains(required)
        {
            return Err(ApiError::insufficient_scope(required.as_str()));
        }
        Ok(Self { caller, _scope: PhantomData })
    }
}
