//! The public representation of stored objects: what `GET` answers and what
//! an event carries as its snapshot. One definition for both, so an event's
//! `data.object` is exactly what the API shows for that object. Views never
//! carry a secret or a hash.

use paygate_domain::bank::BankAccountDetails;
use paygate_domain::payment::{Approval, ApprovalPolicy, Metadata, Payment, PaymentStatus, StatusChange};
use paygate_domain::{AllowedCidrs, ApiKeyId, CompanyId, KeyMode, PayeeId, PaymentId, ScopeSet};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{ApiKey, Payee, PayeeStatus, PayeeType};

/// RFC 3339 text of a time, as every response writes it.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[derive(Debug, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

/// An API key as its company sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    #[schema(example = "api_key")]
    pub object: &'static str,
    pub id: ApiKeyId,
    pub company_id: CompanyId,
    pub name: String,
    /// Who or which system the key was issued to.
    pub owner: String,
    pub mode: KeyMode,
    pub scopes: ScopeSet,
    pub status: KeyStatus,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
    /// Updated at most once a minute per key per node.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    #[schema(value_type = Option<String>, example = "203.0.113.7")]
    pub last_used_ip: Option<std::net::IpAddr>,
    /// Client networks the key may be used from; empty means any.
    #[schema(value_type = Vec<String>, example = json!(["203.0.113.0/24"]))]
    pub allowed_cidrs: AllowedCidrs,
    /// The key this one replaced by rotation.
    pub replaces: Option<ApiKeyId>,
    /// The key that replaced this one by rotation.
    pub replaced_by: Option<ApiKeyId>,
}

impl ApiKeyView {
    pub fn new(key: ApiKey, now: OffsetDateTime) -> Self {
        let status = if key.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if key.is_expired_at(now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        };
        Self {
            object: "api_key",
            id: key.id,
            company_id: key.company_id,
            name: key.name,
            owner: key.owner,
            mode: key.mode,
            scopes: key.scopes,
            status,
            created_at: key.created_at,
            expires_at: key.expires_at,
            revoked_at: key.revoked_at,
            last_used_at: key.last_used_at,
            last_used_ip: key.last_used_ip,
            allowed_cidrs: key.allowed_cidrs,
            replaces: key.replaces,
            replaced_by: key.replaced_by,
        }
    }
}

/// A payee. The account number is never shown: `last4` and a `fingerprint`
/// identify the account.
#[derive(Debug, Serialize, ToSchema)]
pub struct PayeeView {
    #[schema(example = "payee")]
    pub object: &'static str,
    pub id: PayeeId,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PayeeType,
    pub email: Option<String>,
    pub bank_account: BankAccountDetails,
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub metadata: Metadata,
    pub status: PayeeStatus,
    /// `false` for test-mode data.
    pub livemode: bool,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disabled_at: Option<OffsetDateTime>,
}

impl From<Payee> for PayeeView {
    fn from(p: Payee) -> Self {
        Self {
            object: "payee",
            id: p.id,
            name: p.name,
            kind: p.kind,
            email: p.email,
            bank_account: p.bank_account,
            metadata: p.metadata,
            status: p.status,
            livemode: p.mode == paygate_domain::KeyMode::Live,
            created_at: p.created_at,
            disabled_at: p.disabled_at,
        }
    }
}

/// A payment, with its approvals and every status it went through.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentView {
    #[schema(example = "payment")]
    pub object: &'static str,
    pub id: PaymentId,
    pub payee_id: PayeeId,
    /// Integer minor units of `currency` (1050 EUR = 10.50 EUR).
    pub amount: u64,
    /// ISO 4217.
    #[schema(example = "EUR")]
    pub currency: String,
    pub reference: String,
    #[schema(value_type = Option<String>, format = Date)]
    pub requested_execution_date: Option<String>,
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub metadata: paygate_domain::payment::Metadata,
    pub status: PaymentStatus,
    /// Bumped by every status or content change.
    pub version: u32,
    pub livemode: bool,
    pub approvals: ApprovalsView,
    /// Why the payment failed or was returned.
    pub failure_reason: Option<String>,
    pub status_history: Vec<StatusChangeView>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalsView {
    /// Approvals this payment needs (0: approved automatically).
    pub required: u8,
    /// Approvals that count: cast on the current version and content.
    pub received: usize,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: String,
    /// SHA-256 over payee, amount, currency and reference: what approvers agree to.
    pub content_hash: String,
    pub votes: Vec<VoteView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VoteView {
    /// `approve` or `reject`.
    pub decision: &'static str,
    pub key_id: String,
    pub owner: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub at: String,
    pub version: u32,
    /// Whether the vote still counts (same version and content).
    pub counts: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusChangeView {
    pub status: PaymentStatus,
    #[schema(value_type = String, format = DateTime)]
    pub at: String,
    /// `api_key` or `system`.
    pub actor_type: String,
    /// The key id, or the Paygate component (`rail:simulated`, `approval_expiry`).
    pub actor_id: String,
    pub reason: Option<String>,
}

impl From<&Payment> for PaymentView {
    fn from(p: &Payment) -> Self {
        let hash = p.content_hash();
        let vote = |a: &Approval, decision: &'static str| VoteView {
            decision,
            key_id: a.actor.id.clone(),
            owner: a.actor.owner.clone(),
            at: rfc3339(a.at),
            version: a.version,
            counts: decision == "reject" || p.vote_counts(a, &hash),
        };
        let mut votes: Vec<_> = p.approvals.iter().map(|a| vote(a, "approve")).collect();
        let received = votes.iter().filter(|v| v.counts).count();
        votes.extend(p.rejection.iter().map(|a| vote(a, "reject")));
        Self {
            object: "payment",
            id: p.id,
            payee_id: p.payee_id,
            amount: p.amount.minor_units(),
            currency: p.currency.code().to_owned(),
            reference: p.reference.clone(),
            requested_execution_date: p.requested_execution_date.map(crate::date_text),
            metadata: p.metadata.clone(),
            status: p.status,
            version: p.version,
            livemode: p.mode == paygate_domain::KeyMode::Live,
            approvals: ApprovalsView {
                required: p.required_approvals,
                received,
                expires_at: rfc3339(p.approval_expires_at),
                content_hash: hash.clone(),
                votes,
            },
            failure_reason: p.failure_reason.clone(),
            status_history: p.status_history.iter().map(StatusChangeView::from).collect(),
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

impl From<&StatusChange> for StatusChangeView {
    fn from(c: &StatusChange) -> Self {
        Self {
            status: c.status,
            at: rfc3339(c.at),
            actor_type: c.actor.kind.clone(),
            actor_id: c.actor.id.clone(),
            reason: c.reason.clone(),
        }
    }
}

/// A company's approval policy for one mode.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalPolicyView {
    #[schema(example = "approval_policy")]
    pub object: &'static str,
    #[serde(flatten)]
    pub policy: ApprovalPolicy,
}

/// A webhook endpoint. Its signing secret is shown only when created or rotated.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointView {
    #[schema(example = "webhook_endpoint")]
    pub object: &'static str,
    pub id: paygate_domain::WebhookEndpointId,
    pub url: String,
    pub description: Option<String>,
    /// Event types delivered here, or `["*"]` for every type.
    #[schema(example = json!(["payment.approved", "payment.completed"]))]
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Set when Paygate disabled the endpoint: `gone` (it answered 410) or
    /// `failing` (every delivery failed for too long).
    pub disabled_reason: Option<String>,
    pub livemode: bool,
    /// Until when the previous secret still signs, after a rotation.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

impl From<&crate::WebhookEndpoint> for WebhookEndpointView {
    fn from(e: &crate::WebhookEndpoint) -> Self {
        Self {
            object: "webhook_endpoint",
            id: e.id,
            url: e.url.clone(),
            description: e.description.clone(),
            event_types: e.event_types.to_list(),
            enabled: e.enabled,
            disabled_reason: e.disabled_reason.clone(),
            livemode: e.mode == KeyMode::Live,
            previous_secret_expires_at: e.previous_secret_expires_at,
            created_at: e.created_at,
            updated_at: e.updated_at,
        }
    }
}

/// An event: one change of one object, with the object as it was right after.
/// Webhook deliveries carry exactly this JSON.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    #[schema(example = "event")]
    pub object: &'static str,
    pub id: paygate_domain::EventId,
    #[serde(rename = "type")]
    pub kind: paygate_domain::EventType,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub livemode: bool,
    pub company_id: CompanyId,
    /// `payment`, `payee`, `api_key`, `approval_policy` or `webhook_endpoint`.
    pub object_type: &'static str,
    pub object_id: String,
    /// 1, 2, 3, … per object: order one object's events by it.
    pub sequence: u64,
    /// The object's status before the change, where it has one.
    pub previous_status: Option<String>,
    pub data: EventData,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventData {
    /// The object as `GET` shows it, right after the change.
    #[schema(value_type = Object)]
    pub object: serde_json::Value,
}

impl From<&crate::Event> for EventView {
    fn from(e: &crate::Event) -> Self {
        Self {
            object: "event",
            id: e.id,
            kind: e.kind,
            created_at: e.created_at,
            livemode: e.mode == KeyMode::Live,
            company_id: e.company_id,
            object_type: e.kind.object_type(),
            object_id: e.object_id.clone(),
            sequence: e.sequence,
            previous_status: e.previous_status.clone(),
            data: EventData { object: serde_json::from_str(&e.object).unwrap_or(serde_json::Value::Null) },
        }
    }
}

/// One delivery of an event to an endpoint, with every attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    #[schema(example = "webhook_delivery")]
    pub object: &'static str,
    pub id: paygate_domain::WebhookDeliveryId,
    pub endpoint_id: paygate_domain::WebhookEndpointId,
    pub event_id: paygate_domain::EventId,
    pub event_type: paygate_domain::EventType,
    pub status: crate::DeliveryStatus,
    /// When the next attempt is due, while pending.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub attempts: Vec<DeliveryAttemptView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryAttemptView {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub attempted_at: OffsetDateTime,
    /// The endpoint's HTTP status; null when no response arrived.
    pub status_code: Option<u16>,
    pub latency_ms: u32,
    /// `reason: detail` (`timeout`, `connect`, `address_not_allowed`, `http_status`, …).
    pub error: Option<String>,
}

impl From<&crate::Delivery> for DeliveryView {
    fn from(d: &crate::Delivery) -> Self {
        Self {
            object: "webhook_delivery",
            id: d.id,
            endpoint_id: d.endpoint_id,
            event_id: d.event_id,
            event_type: d.event_type,
            status: d.status,
            next_attempt_at: d.next_attempt_at,
            created_at: d.created_at,
            attempts: d
                .attempts
                .iter()
                .map(|a| DeliveryAttemptView {
                    attempted_at: a.attempted_at,
                    status_code: a.status_code,
                    latency_ms: a.latency_ms,
                    error: a.error.clone(),
                })
                .collect(),
        }
    }
}
