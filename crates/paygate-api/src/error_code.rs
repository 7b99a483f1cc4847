//! Every problem `code` Paygate answers with: its status, title, what it
//! means and what the caller should do. `docs/errors.md` is generated from
//! this table (a test fails when they differ), and a problem's `type` points
//! at the code's section there, as served at `/errors`.

use axum::http::StatusCode;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $status:ident, $title:literal,
        meaning: $meaning:literal, action: $action:literal; )*) => {
        /// A stable problem `code` (snake_case on the wire).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $(#[$doc])* $variant, )* }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            pub const fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }

            pub const fn title(self) -> &'static str {
                match self { $(ErrorCode::$variant => $title,)* }
            }

            /// What the problem means, for `docs/errors.md`.
            pub const fn meaning(self) -> &'static str {
                match self { $(ErrorCode::$variant => $meaning,)* }
            }

            /// What the caller should do about it, for `docs/errors.md`.
            pub const fn action(self) -> &'static str {
                match self { $(ErrorCode::$variant => $action,)* }
            }
        }
    };
}

error_codes! {
    Unauthenticated = "unauthenticated", UNAUTHORIZED, "Unauthenticated",
        meaning: "No API key, or one that is malformed, has a bad checksum, is unknown or does not match. The answer never says which.",
        action: "Send `Authorization: Bearer <key>` with the full key text as it was shown at creation. Repeated failures from one address are throttled (`auth_throttled`).";
    ApiKeyRevoked = "api_key_revoked", UNAUTHORIZED, "API key revoked",
        meaning: "The key was revoked (or its rotation grace period ended).",
        action: "Use the key that replaced it, or have someone with `keys:manage` issue a new one.";
    ApiKeyExpired = "api_key_expired", UNAUTHORIZED, "API key expired",
        meaning: "The key is past its `expires_at`.",
        action: "Rotate or replace keys before they expire; responses carry `Paygate-Key-Expires` in the last 7 days.";
    CompanySuspended = "company_suspended", FORBIDDEN, "Company suspended",
        meaning: "The key's company is suspended by the operator; every key of it is refused.",
        action: "Contact the operator of this Paygate installation.";
    IpNotAllowed = "ip_not_allowed", FORBIDDEN, "Client address not allowed",
        meaning: "The key is pinned to client networks (`allowed_cidrs`) and this request came from elsewhere.",
        action: "Call from an allowed network, or use a key whose allow-list includes this address.";
    InsufficientScope = "insufficient_scope", FORBIDDEN, "Insufficient scope",
        meaning: "The key lacks the scope the operation requires; the problem's `scope` names it.",
        action: "Use a key holding that scope; do not retry with the same key.";
    ScopeEscalation = "scope_escalation", FORBIDDEN, "Scope escalation",
        meaning: "A key or grant would receive more than its creator holds (scopes, networks, expiry or limits).",
        action: "Ask only for what the calling key itself has, or use a wider key.";
    ConstraintEscalation = "constraint_escalation", FORBIDDEN, "Constraint escalation",
        meaning: "A key would be issued (or re-issued) with a wider client allow-list or a later expiry than the calling key's own; `errors[].pointer` names each widening field.",
        action: "Ask for an allow-list inside the caller's and an expiry no later than the caller's, or leave them out to inherit the caller's.";
    ModeMismatch = "mode_mismatch", FORBIDDEN, "Mode mismatch",
        meaning: "The request mixes test and live mode (for example a test key naming live data).",
        action: "Use a key of the mode the data belongs to.";
    ApproverIsInitiator = "approver_is_initiator", FORBIDDEN, "Approver is initiator",
        meaning: "Four eyes: the key, owner or principal that created the payment may not approve it.",
        action: "Approve with a key of another owner holding `payments:approve`.";
    NotFound = "not_found", NOT_FOUND, "Not found",
        meaning: "No such resource, or one that belongs to another company or mode (they answer alike).",
        action: "Check the id and that the key is of the company and mode that owns it.";
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED, "Method not allowed",
        meaning: "The path exists but not with this HTTP method.",
        action: "Use a method the operation lists in `openapi.json`.";
    InvalidParameter = "invalid_parameter", BAD_REQUEST, "Invalid parameter",
        meaning: "A query or path parameter is invalid; `errors[].parameter` names each.",
        action: "Fix the named parameters; retrying unchanged gives the same answer.";
    InvalidJson = "invalid_json", BAD_REQUEST, "Invalid JSON",
        meaning: "The body is not well-formed JSON.",
        action: "Send one JSON object, UTF-8 encoded.";
    InvalidBody = "invalid_body", BAD_REQUEST, "Invalid body",
        meaning: "The body is JSON but not the object the operation takes (an array, duplicate keys, wrong types).",
        action: "Send the request schema from `openapi.json`; `errors[].pointer` points at the problem.";
    HeadersTooLarge = "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE, "Request headers too large",
        meaning: "One header value is over 8 KiB, or all headers together are over 32 KiB.",
        action: "Send smaller headers; nothing Paygate reads needs more.";
    BadRequest = "bad_request", BAD_REQUEST, "Bad request",
        meaning: "The request could not be processed for a reason the framework found (the status says which).",
        action: "Check the request against `openapi.json`.";
    IdempotencyKeyMissing = "idempotency_key_missing", BAD_REQUEST, "Idempotency key missing",
        meaning: "A write that moves money was sent without an `Idempotency-Key` header.",
        action: "Send a fresh `Idempotency-Key` (a UUID, say) per logical operation and reuse it on retries.";
    InvalidIdempotencyKey = "invalid_idempotency_key", BAD_REQUEST, "Invalid idempotency key",
        meaning: "The `Idempotency-Key` is not 1 to 255 printable ASCII characters without spaces.",
        action: "Send a valid key, for example a UUID.";
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE, "Payload too large",
        meaning: "The body is larger than this installation accepts.",
        action: "Send a smaller body; list operations page instead of taking bulk bodies.";
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "Unsupported media type",
        meaning: "A body was sent without `Content-Type: application/json`.",
        action: "Send `Content-Type: application/json`.";
    ValidationFailed = "validation_failed", UNPROCESSABLE_ENTITY, "Validation failed",
        meaning: "The body has invalid fields; `errors[].pointer` points at each.",
        action: "Fix the named fields; retrying unchanged gives the same answer.";
    ConflictingScopes = "conflicting_scopes", UNPROCESSABLE_ENTITY, "Conflicting scopes",
        meaning: "The requested scopes may not be held together by one key.",
        action: "Split the work over two keys.";
    LifetimeExceedsPolicy = "lifetime_exceeds_policy", UNPROCESSABLE_ENTITY, "Lifetime exceeds policy",
        meaning: "The key's requested lifetime is longer than the company's key policy allows.",
        action: "Ask for an earlier `expires_at`.";
    PayeeDisabled = "payee_disabled", UNPROCESSABLE_ENTITY, "Payee disabled",
        meaning: "Payments cannot be made to a disabled payee.",
        action: "Use an active payee, or enable this one first.";
    IdempotencyKeyReused = "idempotency_key_reused", UNPROCESSABLE_ENTITY, "Idempotency key reused",
        meaning: "This `Idempotency-Key` was already used with a different request body.",
        action: "Use a new key for a new operation; resend the original body to get the original answer.";
    InvalidUrl = "invalid_url", UNPROCESSABLE_ENTITY, "Invalid URL",
        meaning: "The webhook URL is not an absolute URL Paygate accepts (credentials, a fragment, too long).",
        action: "Send an `https://` URL without userinfo or fragment, at most 2048 characters.";
    UrlSchemeNotAllowed = "url_scheme_not_allowed", UNPROCESSABLE_ENTITY, "URL scheme not allowed",
        meaning: "Webhook URLs must be `https://` (`http://` only for test-mode keys).",
        action: "Use `https://`.";
    UrlNotAllowed = "url_not_allowed", UNPROCESSABLE_ENTITY, "URL not allowed",
        meaning: "The webhook URL points at a private, loopback or otherwise forbidden address.",
        action: "Use a publicly reachable address.";
    InvalidState = "invalid_state", CONFLICT, "Invalid state",
        meaning: "The resource's state does not allow this change (a revoked key rotated, a settled payment cancelled).",
        action: "Read the resource, then decide; retrying unchanged gives the same answer.";
    AlreadyApproved = "already_approved", CONFLICT, "Already approved",
        meaning: "This approver already voted on the payment.",
        action: "Nothing to do; another approver may add the next vote.";
    ApprovalExpired = "approval_expired", CONFLICT, "Approval window closed",
        meaning: "The payment's approval window has closed.",
        action: "Create the payment again if it is still wanted.";
    PaymentChanged = "payment_changed", CONFLICT, "Payment changed",
        meaning: "The payment changed since the approver read it (version or content hash differ).",
        action: "Read the payment again and approve what it now says.";
    ConcurrentUpdate = "concurrent_update", CONFLICT, "Concurrent update",
        meaning: "Another request changed the resource at the same time.",
        action: "Read it again and retry.";
    EndpointDisabled = "endpoint_disabled", CONFLICT, "Endpoint disabled",
        meaning: "The webhook endpoint is disabled.",
        action: "Re-enable it with `enabled: true`, then retry.";
    EndpointLimitReached = "endpoint_limit_reached", CONFLICT, "Endpoint limit reached",
        meaning: "The company has as many webhook endpoints as it may.",
        action: "Delete an endpoint you no longer use.";
    IdempotencyKeyInUse = "idempotency_key_in_use", CONFLICT, "Idempotency key in use",
        meaning: "A request with this `Idempotency-Key` is still being processed.",
        action: "Retry the same request after a short delay; it then replays the first answer.";
    RateLimited = "rate_limited", TOO_MANY_REQUESTS, "Rate limited",
        meaning: "A rate limit is exhausted; the problem's `policy` names it (`key`, `company`, `client`).",
        action: "Wait `Retry-After` seconds; pace by the `RateLimit` header (send while `r` > 0, else wait `t`).";
    AuthThrottled = "auth_throttled", TOO_MANY_REQUESTS, "Too many failed authentications",
        meaning: "Too many failed authentications from this client address; even valid keys wait.",
        action: "Fix the failing credentials, then wait `Retry-After` seconds.";
    ConcurrencyLimited = "concurrency_limited", TOO_MANY_REQUESTS, "Too many concurrent writes",
        meaning: "The company already has as many write requests running as it may.",
        action: "Retry after `Retry-After`; send fewer writes in parallel.";
    AuditUnavailable = "audit_unavailable", SERVICE_UNAVAILABLE, "Audit unavailable",
        meaning: "The audit record could not be written, so nothing was done.",
        action: "Retry with backoff; writes are safe to retry with the same `Idempotency-Key`.";
    ServiceUnavailable = "service_unavailable", SERVICE_UNAVAILABLE, "Service unavailable",
        meaning: "Storage is temporarily unavailable.",
        action: "Retry with backoff.";
    Overloaded = "overloaded", SERVICE_UNAVAILABLE, "Overloaded",
        meaning: "This node is at capacity and shed the request before doing anything.",
        action: "Retry after `Retry-After`.";
    Timeout = "timeout", SERVICE_UNAVAILABLE, "Timeout",
        meaning: "The request (or its body) took longer than the request timeout.",
        action: "Retry; a write with an `Idempotency-Key` replays its first answer if it did complete.";
    InternalError = "internal_error", INTERNAL_SERVER_ERROR, "Internal error",
        meaning: "A bug in Paygate. It is logged with the request id.",
        action: "Report the `request_id` to the operator.";
}

impl ErrorCode {
    /// The problem `type`: a reference to this code's section of the errors
    /// page each node serves at `/errors` (relative to the API's own URL).
    pub fn type_uri(self) -> String {
        format!("/errors#{}", self.as_str())
    }

    /// `docs/errors.md`, generated from this table.
    pub fn markdown() -> String {
        let mut out = String::from(
            "# Problem codes\n\n\
             <!-- Generated from crates/paygate-api/src/error_code.rs; a test fails when it differs. \
             Regenerate with PAYGATE_UPDATE_ERRORS_DOC=1 cargo test -p paygate-api errors_doc. -->\n\n\
             Every error is `application/problem+json` (RFC 9457) with `type`, `title`, `status`, `detail`, \
             a stable `code` to branch on and the `request_id`. `type` is `/errors#<code>`, a reference \
             relative to the API's URL: each node serves this page at `GET /errors`, and the anchor is the \
             code's section below. Field problems add `errors: [{pointer | parameter, detail}]`.\n\n\
             | code | status | title |\n|---|---|---|\n",
        );
        for code in Self::ALL {
            out.push_str(&format!(
                "| [`{c}`](#{c}) | {} | {} |\n",
                code.status().as_u16(),
                code.title(),
                c = code.as_str()
            ));
        }
        for code in Self::ALL {
            out.push_str(&format!(
                "\n<a id=\"{c}\"></a>\n## {c}\n\n**{} {}.** {}\n\nWhat to do: {}\n",
                code.status().as_u16(),
                code.title(),
                code.meaning(),
                code.action(),
                c = code.as_str()
            ));
        }
        out
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(s.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{s}");
            assert!(code.status().is_client_error() || code.status().is_server_error(), "{s}");
        }
    }

    #[test]
    fn errors_doc_matches_the_codes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md");
        let generated = ErrorCode::markdown();
        if std::env::var_os("PAYGATE_UPDATE_ERRORS_DOC").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/errors.md is stale: run PAYGATE_UPDATE_ERRORS_DOC=1 cargo test -p paygate-api errors_doc and commit it"
        );
    }
}
