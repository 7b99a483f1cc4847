//! Steps 2 and 7 of the pipeline: per-client-address limits before
//! authentication, failed-authentication throttling, per-key and per-company
//! GCRA limits and per-company write concurrency after it, plus overload
//! shedding. Every refusal is a 429 (or 503) problem naming the policy.

use crate::error_code::ErrorCode;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use paygate_domain::RateLimitOverride;
use paygate_domain::network::ClientBucket;
use paygate_ratelimit::{
    ConcurrencyLimiter, Decision, Limit, LimitKey, Mode, Outcome, Quota, RateLimiter, SharedLimiter,
};
use paygate_store::auth::Authenticated;

use crate::client::ClientAddr;
use crate::problem::ApiError;
use crate::ratelimit_headers;

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub key: Quota,
    pub company: Quota,
    pub client: Quota,
    /// Failed authentications per client address (count per window).
    pub auth_failures: Quota,
    /// In-flight write requests per company.
    pub write_concurrency: u32,
    /// In-flight requests per node before new ones are shed with 503.
    pub max_in_flight: usize,
    /// Benchmarks only: `false` skips the GCRA and concurrency stages so their
    /// cost can be measured against the same pipeline without them. Not a
    /// configuration setting: Paygate never runs without limits.
    pub enabled: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            key: Quota::new(100, 200),
            company: Quota::new(500, 1000),
            client: Quota::new(1000, 2000),
            auth_failures: Quota::per_window(20, 300),
            write_concurrency: 20,
            max_in_flight: 4096,
            enabled: true,
        }
    }
}

pub struct RateLimits {
    pub limiter: Arc<SharedLimiter>,
    pub concurrency: ConcurrencyLimiter,
    pub config: LimitsConfig,
    in_flight: AtomicUsize,
}

impl RateLimits {
    pub fn new(limiter: Arc<SharedLimiter>, concurrency: ConcurrencyLimiter, config: LimitsConfig) -> Self {
        Self { limiter, concurrency, config, in_flight: AtomicUsize::new(0) }
    }

    async fn decide(&self, limits: &[Limit], mode: Mode) -> Decision {
        // SharedLimiter never fails: without Redis it decides in process.
        match self.limiter.check(limits, mode).await {
            Ok(d) => d,
            Err(_) => Decision { outcomes: Vec::new() },
        }
    }

    fn client_bucket(addr: IpAddr) -> LimitKey {
        LimitKey::format(format_args!("client:{}", ClientBucket(addr)))
    }

    fn failures_limit(&self, addr: IpAddr) -> Limit {
        Limit {
            policy: "auth_failures",
            key: LimitKey::format(format_args!("authfail:client:{}", ClientBucket(addr))),
            quota: self.config.auth_failures,
        }
    }

    /// Refuses a client address that has used up its failed-authentication allowance.
    pub async fn auth_throttled(&self, addr: IpAddr) -> Option<Response> {
        if !self.config.enabled {
            return None;
        }
        let decision = self.decide(&[self.failures_limit(addr)], Mode::Peek).await;
        if decision.allowed() {
            return None;
        }
        let outcome = *decision.tightest()?;
        Some(refusal(
            ApiError::new(
                ErrorCode::AuthThrottled,
                "Too many failed authentication attempts from this address; wait before retrying.",
            ),
            &outcome,
        ))
    }

    /// Counts one failed authentication from `addr`.
    pub async fn note_auth_failure(&self, addr: IpAddr) {
        if !self.config.enabled {
            return;
        }
        self.decide(&[self.failures_limit(addr)], Mode::Consume).await;
    }

    /// Per-key and per-company limits of an authenticated caller.
    pub async fn check_caller(&self, caller: &Authenticated) -> Result<Option<Outcome>, Response> {
        if !self.config.enabled {
            return Ok(None);
        }
        let key = &caller.record.key;
        let quota =
            |o: Option<RateLimitOverride>, default: Quota| o.map(|o| Quota::new(o.rate, o.burst)).unwrap_or(default);
        let limits = [
            Limit {
                policy: "key",
                key: LimitKey::format(format_args!("key:{}", key.id)),
                quota: quota(key.rate_limit, self.config.key),
            },
            Limit {
                policy: "company",
                key: LimitKey::format(format_args!("company:{}", key.company_id)),
                quota: quota(caller.record.company_rate_limit, self.config.company),
            },
        ];
        let decision = self.decide(&limits, Mode::Consume).await;
        let Some(outcome) = decision.tightest().copied() else { return Err(ApiError::internal().into_response()) };
        if decision.allowed() {
            return Ok(Some(outcome));
        }
        Err(refusal(
            ApiError::new(
                ErrorCode::RateLimited,
                format!("The `{}` rate limit is exhausted; retry after the indicated delay.", outcome.policy),
            ),
            &outcome,
        ))
    }

    /// A write slot for the company, held until the guard drops.
    pub async fn write_slot(
        &self,
        caller: &Authenticated,
    ) -> Result<Option<paygate_ratelimit::ConcurrencyGuard>, Response> {
        if !self.config.enabled {
            return Ok(None);
        }
        let company = caller.record.key.company_id.to_string();
        match self.concurrency.acquire(&company, self.config.write_concurrency).await {
            Some(guard) => Ok(Some(guard)),
            None => {
                metrics::counter!("paygate_rate_limited_total", "policy" => "write_concurrency").increment(1);
                let mut error = ApiError::new(
                    ErrorCode::ConcurrencyLimited,
                    format!("At most {} write requests may run at once per company.", self.config.write_concurrency),
                );
                error.policy = Some("write_concurrency");
                let mut response = error.into_response();
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(response)
            }
        }
    }
}

/// A 429 problem naming the violated policy, with `Retry-After` and the
/// rate-limit headers of that policy.
fn refusal(mut error: ApiError, outcome: &Outcome) -> Response {
    metrics::counter!("paygate_rate_limited_total", "policy" => outcome.policy).increment(1);
    error.policy = Some(outcome.policy);
    let mut response = error.into_response();
    ratelimit_headers::insert(response.headers_mut(), outcome);
    if let Ok(v) = HeaderValue::from_str(&ratelimit_headers::retry_after_seconds(outcome).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Step 2: the per-client-address limit, before any key is looked at.
pub async fn client_middleware(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    let Some(ClientAddr(addr)) = request.extensions().get::<ClientAddr>().copied().filter(|_| limits.config.enabled)
    else {
        return next.run(request).await;
    };
    let limit = Limit { policy: "client", key: RateLimits::client_bucket(addr), quota: limits.config.client };
    let decision = limits.decide(&[limit], Mode::Consume).await;
    if !decision.allowed()
        && let Some(outcome) = decision.tightest()
    {
        return refusal(
            ApiError::new(
                ErrorCode::RateLimited,
                "Too many requests from this client address; retry after the indicated delay.",
            ),
            outcome,
        );
    }
    next.run(request).await
}

/// Sheds new requests with 503 `overloaded` when the node already has
/// `max_in_flight` requests running. The ops listener is separate and unaffected.
pub async fn overload_middleware(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    let running = limits.in_flight.fetch_add(1, Ordering::AcqRel);
    let _release = InFlight(&limits.in_flight);
    if running >= limits.config.max_in_flight {
        metrics::counter!("paygate_overload_shed_total").increment(1);
        let mut response =
            ApiError::new(ErrorCode::Overloaded, "This node is at capacity; retry shortly.").into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    metrics::gauge!("paygate_http_requests_in_flight").set(running as f64 + 1.0);
    next.run(request).await
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a Redis write slot may be held before it ages out.
pub fn slot_lifetime(request_timeout: Duration) -> Duration {
    request_timeout + Duration::from_secs(5)
}
