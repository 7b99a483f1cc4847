//! Step 9 of the pipeline: every `/v1` request leaves an audit record before
//! its response goes out (invariant I4).
//!
//! - A change writes its record in the change's own transaction (the handler
//!   passes an [`AuditContext::entry`] to the store and marks the response
//!   [`AuditWritten`]).
//! - Every other request (reads, denials, failures) is recorded by
//!   [`middleware`] through the group-commit [`AuditWriter`]: one writer task
//!   batches records from all requests into one transaction, and each response
//!   waits until its record is durable. If the record cannot be written, the
//!   response becomes 503 `audit_unavailable`.
//! - Floods of failed authentication from one address are aggregated: the
//!   first failure of an address in each interval is recorded like any other
//!   (the response waits for it); later ones in the interval are counted and
//!   written as one record per address when the interval closes.

use crate::error_code::ErrorCode;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditAction, AuditEntry, Outcome, PLATFORM_CHAIN};
use paygate_store::auth::Authenticated;
use paygate_store::{KeyAuthRecord, Store};
use tokio::sync::{mpsc, oneshot};

use crate::client::ClientAddr;
use crate::problem::ApiError;
use crate::request_id::RequestId;
use crate::route::{ResourceType, RouteSpec};

/// Response marker: the handler's change wrote this request's record in its transaction.
#[derive(Debug, Clone, Copy)]
pub struct AuditWritten;

impl axum::response::IntoResponseParts for AuditWritten {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// Response extension: the key that made the request (set by authentication,
/// also for refusals of a key whose secret verified). Shares the verified
/// record: no copy per request.
#[derive(Debug, Clone)]
pub struct AuditActor(pub Arc<KeyAuthRecord>);

impl AuditActor {
    pub fn of(caller: &Authenticated) -> Self {
        Self(caller.record.clone())
    }
}

/// The `{id}` segment of `path` under `template`.
fn path_id(template: &str, path: &str) -> Option<String> {
    template.split('/').zip(path.split('/')).find(|(t, _)| *t == "{id}").map(|(_, p)| p.chars().take(64).collect())
}

/// Request facts every record carries, as an extractor for handlers that
/// write their change's record themselves.
#[derive(Debug, Clone)]
pub struct AuditContext {
    request_id: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
    actor: Option<AuditActor>,
}

impl AuditContext {
    fn from_parts(extensions: &axum::http::Extensions, headers: &HeaderMap) -> Self {
        Self {
            request_id: extensions.get::<RequestId>().map(|r| r.as_str().to_owned()),
            client_ip: extensions.get::<ClientAddr>().map(|c| c.0.to_string()),
            user_agent: headers
                .get("user-agent")
                .map(|v| AuditEntry::clean_user_agent(&String::from_utf8_lossy(v.as_bytes()))),
            actor: extensions.get::<Authenticated>().map(AuditActor::of),
        }
    }

    /// The record of this request.
    pub fn entry(
        self,
        action: AuditAction,
        resource: Option<(ResourceType, String)>,
        status: StatusCode,
        details: serde_json::Value,
    ) -> AuditEntry {
        self.entry_with_details(action, resource, status, AuditEntry::details_from(&details))
    }

    /// [`AuditContext::entry`] with `details` already encoded (compact JSON, bounded).
    fn entry_with_details(
        self,
        action: AuditAction,
        resource: Option<(ResourceType, String)>,
        status: StatusCode,
        details: String,
    ) -> AuditEntry {
        let (chain, kind, id, name) = match &self.actor {
            Some(AuditActor(record)) => (
                record.key.company_id.to_string(),
                ActorKind::ApiKey,
                Some(record.key.id.to_string()),
                Some(record.key.owner.clone()),
            ),
            None => (PLATFORM_CHAIN.to_owned(), ActorKind::Anonymous, None, None),
        };
        AuditEntry {
            id: AuditEventId::generate(),
            chain,
            occurred_at: paygate_domain::now(),
            actor_kind: kind,
            actor_id: id,
            actor_name: name,
            action: action.as_str(),
            resource_type: resource.as_ref().map(|(t, _)| t.as_str().to_owned()),
            resource_id: resource.map(|(_, id)| id),
            outcome: Outcome::for_status(status.as_u16()),
            status: status.as_u16(),
            request_id: self.request_id,
            client_ip: self.client_ip,
            user_agent: self.user_agent,
            details,
        }
    }
}

impl AuditContext {
    /// The record of a change made by `route`: its declared action, and the
    /// declared resource type for `resource_id`.
    pub fn entry_for(
        self,
        route: RouteSpec,
        resource_id: Option<String>,
        status: StatusCode,
        details: serde_json::Value,
    ) -> AuditEntry {
        self.entry(route.action, route.resource.zip(resource_id), status, details)
    }
}

/// `details` of a request's own record, `{"code":…,"method":…,"route":…}`
/// (keys in the order `serde_json` writes a map), written straight into its
/// string instead of through a `serde_json::Value`.
fn request_details(code: Option<&str>, method: &str, route: &str) -> String {
    let mut out = Vec::with_capacity(48 + route.len());
    out.push(b'{');
    let field = |out: &mut Vec<u8>, name: &str, value: &str| {
        if out.len() > 1 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        // Escaping of a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    };
    if let Some(code) = code {
        field(&mut out, "code", code);
    }
    field(&mut out, "method", method);
    field(&mut out, "route", route);
    out.push(b'}');
    let text = String::from_utf8(out).unwrap_or_default();
    if text.len() <= paygate_domain::audit::MAX_DETAILS_BYTES {
        text
    } else {
        AuditEntry::details_from(&serde_json::from_str(&text).unwrap_or_default())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::from_parts(&parts.extensions, &parts.headers))
    }
}

struct Job {
    entry: AuditEntry,
    done: oneshot::Sender<bool>,
}

/// The group-commit writer: a bounded queue and one task that writes batches.
#[derive(Clone)]
pub struct AuditWriter {
    enabled: bool,
    queue: mpsc::Sender<Job>,
    aggregator: Arc<Aggregator>,
    enqueue_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Records waiting for the writer; when full, requests wait up to
    /// `enqueue_timeout`, then get 503 `audit_unavailable`.
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub enqueue_timeout: Duration,
    /// Failed authentications from one address are aggregated per interval.
    pub aggregation_interval: Duration,
    /// Addresses tracked by the aggregator; beyond it, failures are recorded one by one.
    pub aggregation_capacity: usize,
    /// Benchmarks only: `false` records nothing, to price the audit stage
    /// against the same pipeline without it. Not a configuration setting.
    pub enabled: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_batch: 1_000,
            enqueue_timeout: Duration::from_secs(2),
            aggregation_interval: Duration::from_secs(10),
            aggregation_capacity: 10_000,
            enabled: true,
        }
    }
}

impl AuditWriter {
    /// Starts the writer task and the aggregation flusher.
    pub fn start(store: Arc<dyn Store>, config: AuditConfig) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let (queue, rx) = mpsc::channel(config.queue_capacity.max(1));
        let aggregator = Arc::new(Aggregator::new(config.aggregation_capacity));
        let writer = Self {
            enabled: config.enabled,
            queue,
            aggregator: aggregator.clone(),
            enqueue_timeout: config.enqueue_timeout,
        };
        let task = tokio::spawn(write_batches(store, rx, config.max_batch.max(1)));
        let flusher = tokio::spawn({
            let writer = writer.clone();
            async move {
                let mut ticker = tokio::time::interval(config.aggregation_interval);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    writer.flush_aggregated().await;
                }
            }
        });
        (writer, vec![task, flusher])
    }

    /// Queues `entry` and waits until it is durable. `false`: not recorded.
    pub async fn record(&self, entry: AuditEntry) -> bool {
        let (done, wait) = oneshot::channel();
        let job = Job { entry, done };
        metrics::gauge!("paygate_audit_queue_records").set((self.queue.max_capacity() - self.queue.capacity()) as f64);
        match tokio::time::timeout(self.enqueue_timeout, self.queue.send(job)).await {
            // A stuck store must not hold requests forever: past the wait, 503.
            Ok(Ok(())) => match tokio::time::timeout(self.enqueue_timeout * 3, wait).await {
                Ok(Ok(durable)) => durable,
                Ok(Err(_)) => false,
                Err(_) => {
                    // Answered 503; the record may still land later.
                    metrics::counter!("paygate_audit_unavailable_total", "reason" => "timeout").increment(1);
                    false
                }
            },
            _ => {
                metrics::counter!("paygate_audit_unavailable_total", "reason" => "queue").increment(1);
                false
            }
        }
    }

    /// Writes the aggregated failure counts of the closing interval.
    pub async fn flush_aggregated(&self) {
        let entries = self.aggregator.drain();
        let count = entries.len();
        let mut lost = 0;
        for entry in entries {
            if !self.record(entry).await {
                lost += 1;
            }
        }
        if lost > 0 {
            metrics::counter!("paygate_audit_unavailable_total", "reason" => "aggregate").increment(lost);
            tracing::error!(lost, of = count, "aggregated failure records could not be written");
        }
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let (entries, done): (Vec<AuditEntry>, Vec<oneshot::Sender<bool>>) =
            batch.drain(..).map(|job| (job.entry, job.done)).unzip();
        metrics::histogram!("paygate_audit_batch_records").record(entries.len() as f64);
        let durable: Vec<bool> = match store.append_audit(&entries).await {
            Ok(_) => vec![true; entries.len()],
            Err(error) => {
                tracing::error!(%error, records = entries.len(), "audit batch failed; retrying chain by chain");
                retry_by_chain(&*store, &entries).await
            }
        };
        for (done, ok) in done.into_iter().zip(durable) {
            if !ok {
                metrics::counter!("paygate_audit_unavailable_total", "reason" => "store").increment(1);
            }
            let _ = done.send(ok);
        }
    }
}

/// One broken chain must not fail every request in a batch: retry chain by
/// chain and fail only the chains that still fail. If the store itself is
/// unavailable, stop retrying at once. Returns, per entry, whether it is durable.
async fn retry_by_chain(store: &dyn Store, entries: &[AuditEntry]) -> Vec<bool> {
    let mut chains: Vec<&str> = entries.iter().map(|e| e.chain.as_str()).collect();
    chains.sort_unstable();
    chains.dedup();
    let mut durable_chains = std::collections::HashSet::new();
    for chain in chains {
        let group: Vec<AuditEntry> = entries.iter().filter(|e| e.chain == chain).cloned().collect();
        match store.append_audit(&group).await {
            Ok(_) => {
                durable_chains.insert(chain);
            }
            Err(error) => {
                tracing::error!(%error, %chain, records = group.len(), "audit records could not be written");
                if matches!(error, paygate_store::StoreError::Unavailable(_)) {
                    break;
                }
            }
        }
    }
    entries.iter().map(|e| durable_chains.contains(e.chain.as_str())).collect()
}

/// (client address, action) → (failures counted after the first, the first's record).
type OpenAggregates = HashMap<(String, &'static str), (u64, AuditEntry)>;

/// Counts failed authentications per (address, action) per interval.
struct Aggregator {
    capacity: usize,
    open: Mutex<OpenAggregates>,
}

impl Aggregator {
    fn new(capacity: usize) -> Self {
        Self { capacity, open: Mutex::new(HashMap::new()) }
    }

    /// `true` if this failure opens its interval (record it now); `false` if
    /// it was counted into the open aggregate.
    fn admit(&self, entry: &AuditEntry) -> bool {
        // Grouped like the client limiter: an IPv6 /64 is one client.
        let Some(ip) = entry
            .client_ip
            .as_deref()
            .and_then(|i| i.parse::<std::net::IpAddr>().ok())
            .map(paygate_domain::network::client_bucket)
        else {
            return true;
        };
        let mut open = self.open.lock();
        if let Some((count, _)) = open.get_mut(&(ip.clone(), entry.action)) {
            *count += 1;
            return false;
        }
        if open.len() < self.capacity {
            open.insert((ip, entry.action), (0, entry.clone()));
        }
        metrics::gauge!("paygate_audit_aggregating_addresses").set(open.len() as f64);
        true
    }

    fn drain(&self) -> Vec<AuditEntry> {
        let open = std::mem::take(&mut *self.open.lock());
        open.into_values()
            .filter(|(count, _)| *count > 0)
            .map(|(count, first)| AuditEntry {
                id: AuditEventId::generate(),
                occurred_at: paygate_domain::now(),
                request_id: None,
                details: AuditEntry::details_from(&serde_json::json!({
                    "aggregated": true,
                    "count": count,
                    "first_request_id": first.request_id,
                })),
                ..first
            })
            .collect()
    }
}

fn aggregated_action(action: AuditAction) -> bool {
    matches!(action, AuditAction::AuthFailed | AuditAction::AuthThrottled | AuditAction::RateLimitExceeded)
}

/// Records the request unless its change already did, and refuses to answer
/// without a durable record.
pub async fn middleware(State(writer): State<AuditWriter>, request: Request, next: Next) -> Response {
    let mut context = AuditContext::from_parts(request.extensions(), request.headers());
    let method = request.method().clone();
    // Shared, not copied: the parsed URI and the router's template.
    let uri = request.uri().clone();
    let path = uri.path();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map(MatchedPath::as_str);
    let response = next.run(request).await;
    let under_v1 = path == "/v1" || path.starts_with("/v1/");
    if !writer.enabled || response.extensions().get::<AuditWritten>().is_some() || !under_v1 {
        return response;
    }
    context.actor = response.extensions().get::<AuditActor>().cloned();
    let status = response.status();
    let code = response.extensions().get::<ApiError>().map(|e| e.code);
    let declared = route.and_then(|r| crate::route::table().find(&method, r)).map(|d| d.spec);
    let action = match code {
        Some(
            ErrorCode::Unauthenticated
            | ErrorCode::ApiKeyRevoked
            | ErrorCode::ApiKeyExpired
            | ErrorCode::CompanySuspended
            | ErrorCode::IpNotAllowed,
        ) => AuditAction::AuthFailed,
        Some(ErrorCode::AuthThrottled) => AuditAction::AuthThrottled,
        Some(ErrorCode::RateLimited | ErrorCode::ConcurrencyLimited) => AuditAction::RateLimitExceeded,
        Some(ErrorCode::Timeout) => AuditAction::RequestTimeout,
        Some(ErrorCode::Overloaded) => AuditAction::RequestOverloaded,
        _ => declared.map_or(AuditAction::RequestUnrouted, |d| d.action),
    };
    // Only a well-formed id of the resource's type is recorded: a client that
    // pastes something else (its key text, say) into the path leaves no trace of it.
    let resource = declared
        .filter(|d| d.action == action)
        .and_then(|d| d.resource)
        .and_then(|t| route.and_then(|r| path_id(r, path)).filter(|id| t.is_id(id)).map(|id| (t, id)));
    let details = request_details(code.as_ref().map(|c| c.as_str()), method.as_str(), route.unwrap_or("unmatched"));
    let entry = context.entry_with_details(action, resource, status, details);
    // Only anonymous floods are aggregated: an authenticated caller's denials
    // belong, one by one, to its own company's chain.
    if entry.actor_kind == ActorKind::Anonymous && aggregated_action(action) && !writer.aggregator.admit(&entry) {
        return response;
    }
    if writer.record(entry).await {
        response
    } else {
        let mut refused = ApiError::new(
            ErrorCode::AuditUnavailable,
            "The request could not be recorded, so it was not answered; retry shortly.",
        )
        .into_response();
        refused.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directly written details are exactly what `serde_json` writes for the same map.
    #[test]
    fn request_details_match_serde_json() {
        for (code, method, route) in [
            (None, "GET", "/v1/me"),
            (Some("rate_limited"), "POST", "/v1/payments/{id}"),
            (None, "GET", "a\"b\\c\u{1}"),
        ] {
            let mut expected = serde_json::json!({"method": method, "route": route});
            if let Some(code) = code {
                expected["code"] = serde_json::Value::from(code);
            }
            assert_eq!(request_details(code, method, route), expected.to_string());
        }
        let long = "x".repeat(3000);
        assert_eq!(
            request_details(None, "GET", &long),
            AuditEntry::details_from(&serde_json::json!({"method": "GET", "route": long}))
        );
    }

    #[test]
    fn the_id_in_the_path_is_found() {
        assert_eq!(path_id("/v1/api-keys/{id}/revoke", "/v1/api-keys/abc/revoke").as_deref(), Some("abc"));
        assert!(ResourceType::ApiKey.is_id("key_0000000000000000000000"));
        assert!(!ResourceType::ApiKey.is_id("pgk_live_key_0000000000000000000000_secret"));
    }
}
