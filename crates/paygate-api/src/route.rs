//! One declaration per route: the scope it requires, the audit action it
//! records and its rate-limit class, written once with [`route!`] beside the
//! handler. The authentication and limit middleware, the audit middleware, the
//! [`Authorized`](crate::auth::Authorized) extractor and the OpenAPI document
//! all read that declaration; nothing else says it again.
//!
//! A route is added to the router only through [`Routes::route`], which takes
//! the declaration as a type parameter; the extractor refuses to run under a
//! declaration other than the one the route was registered with, so the
//! handler's signature and the router cannot disagree.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::OnceLock;

use axum::http::Method;
// Public so that `route!` expands anywhere.
pub use paygate_domain::Scope;
pub use paygate_domain::audit::AuditAction;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::SecurityRequirement;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

use crate::AppState;

/// How the limit stage treats a route. Every class draws on the key's and the
/// company's GCRA limits; a `Write` also holds one of the company's
/// write-concurrency slots while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitClass {
    Read,
    Write,
}

impl LimitClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitClass::Read => "read",
            LimitClass::Write => "write",
        }
    }
}

/// What the `{id}` in a route's path names, as recorded in its audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    ApiKey,
    AuditEvent,
    Payee,
    Payment,
    Event,
    WebhookEndpoint,
}

impl ResourceType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ResourceType::ApiKey => "api_key",
            ResourceType::AuditEvent => "audit_event",
            ResourceType::Payee => "payee",
            ResourceType::Payment => "payment",
            ResourceType::Event => "event",
            ResourceType::WebhookEndpoint => "webhook_endpoint",
        }
    }

    /// Whether `text` is a well-formed id of this type: only those are
    /// recorded, so a client that pastes its key text into a path leaves no trace of it.
    pub fn is_id(self, text: &str) -> bool {
        use paygate_domain as d;
        match self {
            ResourceType::ApiKey => d::ApiKeyId::parse(text).is_ok(),
            ResourceType::AuditEvent => d::AuditEventId::parse(text).is_ok(),
            ResourceType::Payee => d::PayeeId::parse(text).is_ok(),
            ResourceType::Payment => d::PaymentId::parse(text).is_ok(),
            ResourceType::Event => d::EventId::parse(text).is_ok(),
            ResourceType::WebhookEndpoint => d::WebhookEndpointId::parse(text).is_ok(),
        }
    }
}

/// A route's declaration. Method and path are the ones of its `#[utoipa::path]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    /// `None`: any valid key may call the route (declared, never defaulted).
    pub scope: Option<Scope>,
    pub action: AuditAction,
    /// What the path's `{id}` names, if the route has one.
    pub resource: Option<ResourceType>,
    pub limit: LimitClass,
}

/// Implemented by each route's declaration type (see [`route!`]).
pub trait Route: Send + Sync + 'static {
    const SPEC: RouteSpec;
}

/// Declares a route:
///
/// ```ignore
/// route! {
///     /// `POST /v1/payees`
///     CreatePayee { scope: PayeesWrite, audit: PayeeCreate on Payee, limit: Write }
/// }
/// ```
///
/// `scope: AnyValidKey` opens the route to every valid key; `on …` names what
/// the path's `{id}` is.
#[macro_export]
macro_rules! route {
    (@scope AnyValidKey) => { None };
    (@scope $scope:ident) => { Some($crate::route::Scope::$scope) };
    (@resource) => { None };
    (@resource $resource:ident) => { Some($crate::route::ResourceType::$resource) };
    ($(#[$meta:meta])* $name:ident {
        scope: $scope:ident,
        audit: $action:ident $(on $resource:ident)?,
        limit: $limit:ident $(,)?
    }) => {
        $(#[$meta])*
        pub struct $name;
        impl $crate::route::Route for $name {
            const SPEC: $crate::route::RouteSpec = $crate::route::RouteSpec {
                scope: $crate::route!(@scope $scope),
                action: $crate::route::AuditAction::$action,
                resource: $crate::route!(@resource $($resource)?),
                limit: $crate::route::LimitClass::$limit,
            };
        }
    };
}

/// A declared route as the pipeline sees it: which declaration, and what it says.
#[derive(Debug, Clone, Copy)]
pub struct DeclaredRoute {
    pub(crate) declaration: TypeId,
    pub spec: RouteSpec,
}

/// The `/v1` router under construction, with every route's declaration.
pub struct Routes {
    router: OpenApiRouter<AppState>,
    table: HashMap<(Method, String), DeclaredRoute>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    pub fn new() -> Self {
        Self { router: OpenApiRouter::new(), table: HashMap::new() }
    }

    /// Adds the one handler of `routes!(handler)` under the declaration `R`,
    /// and writes `R` into its OpenAPI operation (security, description).
    pub fn route<R: Route>(mut self, (schemas, mut paths, method_router): UtoipaMethodRouter<AppState>) -> Self {
        let mut operations = paths.paths.iter_mut().flat_map(|(path, item)| {
            operations_mut(item).into_iter().map(move |(method, op)| (path.clone(), method, op))
        });
        let (path, method, operation) = operations.next().expect("routes! names one handler");
        assert!(operations.next().is_none(), "one handler per declaration ({path})");
        document(operation, &R::SPEC);
        let declared = DeclaredRoute { declaration: TypeId::of::<R>(), spec: R::SPEC };
        let previous = self.table.insert((method.clone(), format!("/v1{path}")), declared);
        assert!(previous.is_none(), "{method} {path} is registered twice");
        self.router = self.router.routes((schemas, paths, method_router));
        self
    }

    pub(crate) fn into_parts(self) -> (OpenApiRouter<AppState>, RouteTable) {
        (self.router, RouteTable(self.table))
    }
}

/// Every `/v1` route's declaration, by method and matched path.
#[derive(Debug, Default)]
pub struct RouteTable(HashMap<(Method, String), DeclaredRoute>);

impl RouteTable {
    /// The declaration of the route matched as `route` (`/v1/payments/{id}`).
    /// HEAD is answered by the GET route.
    pub fn find(&self, method: &Method, route: &str) -> Option<DeclaredRoute> {
        let method = if *method == Method::HEAD { Method::GET } else { method.clone() };
        self.0.get(&(method, route.to_owned())).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Method, &str, &DeclaredRoute)> {
        self.0.iter().map(|((m, p), d)| (m, p.as_str(), d))
    }
}

/// The table of the router [`crate::router`] serves.
pub fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| crate::v1().into_parts().1)
}

fn operations_mut(item: &mut PathItem) -> Vec<(Method, &mut Operation)> {
    [
        (Method::GET, item.get.as_mut()),
        (Method::POST, item.post.as_mut()),
        (Method::PUT, item.put.as_mut()),
        (Method::PATCH, item.patch.as_mut()),
        (Method::DELETE, item.delete.as_mut()),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.map(|op| (m, op)))
    .collect()
}

/// The declaration, as the OpenAPI operation states it: the security
/// requirement, and a closing paragraph of the description.
fn document(operation: &mut Operation, spec: &RouteSpec) {
    let scopes: Vec<&str> = spec.scope.map(Scope::as_str).into_iter().collect();
    operation.security = Some(vec![SecurityRequirement::new("api_key", scopes)]);
    let scope = match spec.scope {
        Some(scope) => format!("Requires the `{scope}` scope."),
        None => "Open to any valid key.".to_owned(),
    };
    let limit = match spec.limit {
        LimitClass::Read => "Rate-limit class `read`: the key's and the company's limits.",
        LimitClass::Write => {
            "Rate-limit class `write`: the key's and the company's limits, and one of the company's concurrent-write slots."
        }
    };
    let facts = format!("{scope} Audit action `{}`. {limit}", spec.action);
    operation.description = Some(match operation.description.take() {
        Some(text) if !text.is_empty() => format!("{text}\n\n{facts}"),
        _ => facts,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router walk: every operation of the document is declared, and
    /// nothing is declared that the router does not serve.
    #[test]
    fn every_operation_is_declared_exactly_once() {
        let doc = crate::openapi();
        let mut operations = 0;
        for (path, item) in doc.paths.paths.iter() {
            let mut item = item.clone();
            for (method, op) in operations_mut(&mut item) {
                operations += 1;
                let declared = table().find(&method, path).unwrap_or_else(|| panic!("{method} {path} is undeclared"));
                let security = serde_json::to_value(&op.security).unwrap();
                let scopes: Vec<String> = declared.spec.scope.map(|s| s.to_string()).into_iter().collect();
                assert_eq!(security, serde_json::json!([{ "api_key": scopes }]), "{method} {path}");
                let description = op.description.as_deref().unwrap_or_default();
                assert!(description.contains(declared.spec.action.as_str()), "{method} {path}: {description}");
                // Changes hold a write slot; reads never do.
                assert_eq!(declared.spec.limit == LimitClass::Write, method != Method::GET, "{method} {path}");
            }
        }
        assert_eq!(table().iter().count(), operations);
        assert_eq!(table().find(&Method::HEAD, "/v1/me").map(|d| d.spec.action), Some(AuditAction::IdentityRead));
    }

    #[test]
    fn route_actions_are_in_the_closed_list() {
        for (_, _, declared) in table().iter() {
            assert!(paygate_domain::audit::ACTIONS.contains(&declared.spec.action.as_str()));
        }
        assert_eq!(AuditAction::ALL.len(), paygate_domain::audit::ACTIONS.len());
    }
}
