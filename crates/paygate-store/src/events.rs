//! Events (the transactional outbox) and webhook delivery rows, shared by
//! both backends.
//!
//! A change's events are built here from the rows the change wrote and are
//! inserted by the backend in the change's own transaction, together with one
//! delivery row per subscribed endpoint: no change commits without its events
//! and deliveries, and no event exists without its change. A delivery worker
//! on any node then claims due deliveries with a lease.

use paygate_domain::event::EventTypes;
use paygate_domain::payment::{ApprovalPolicy, Payment, PaymentStatus};
use paygate_domain::{CompanyId, EventId, EventType, KeyMode, WebhookDeliveryId, WebhookEndpointId};
use time::OffsetDateTime;

use crate::views::{ApiKeyView, ApprovalPolicyView, PayeeView, PaymentView, WebhookEndpointView};
use crate::{ApiKey, Payee, StoreError, StoreResult};

/// An event to insert; its per-object `sequence` is assigned on insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: EventId,
    pub company_id: CompanyId,
    pub mode: KeyMode,
    pub kind: EventType,
    pub object_id: String,
    pub previous_status: Option<String>,
    /// The object's snapshot as JSON: its API view right after the change.
    pub object: String,
    pub created_at: OffsetDateTime,
}

fn snapshot(view: &impl serde::Serialize) -> String {
    serde_json::to_string(view).expect("a view serializes")
}

impl NewEvent {
    fn new(
        company_id: CompanyId,
        mode: KeyMode,
        kind: EventType,
        object_id: String,
        previous_status: Option<String>,
        object: String,
    ) -> Self {
        Self {
            id: EventId::generate(),
            company_id,
            mode,
            kind,
            object_id,
            previous_status,
            object,
            created_at: paygate_domain::now(),
        }
    }

    /// A payment after a change. `previous` is its stored status before the
    /// change (`None` for a creation): a creation is `payment.created` (even
    /// when the policy approved it at once: its snapshot says so), a status
    /// change is named after the new status, any other change is
    /// `payment.updated`.
    pub fn payment(company: CompanyId, payment: &Payment, previous: Option<PaymentStatus>) -> Self {
        let kind = match previous {
            None => EventType::PaymentCreated,
            Some(before) if before == payment.status => EventType::PaymentUpdated,
            Some(_) => EventType::for_payment_status(payment.status),
        };
        Self::new(
            company,
            payment.mode,
            kind,
            payment.id.to_string(),
            previous.map(|p| p.as_str().to_owned()),
            snapshot(&PaymentView::from(payment)),
        )
    }

    /// The event of an update, or `None` when nothing a reader can see
    /// changed (a worker only rescheduling its next look): every visible
    /// change moves the status, the version or `updated_at`.
    pub fn payment_update(company: CompanyId, payment: &Payment, stored: &StoredPaymentState) -> Option<Self> {
        let visible = stored.status != payment.status
            || stored.version != payment.version
            || stored.updated_at != payment.updated_at;
        visible.then(|| Self::payment(company, payment, Some(stored.status)))
    }

    pub fn payee(company: CompanyId, kind: EventType, payee: &Payee, previous_status: Option<&str>) -> Self {
        Self::new(
            company,
            payee.mode,
            kind,
            payee.id.to_string(),
            previous_status.map(str::to_owned),
            snapshot(&PayeeView::from(payee.clone())),
        )
    }

    pub fn api_key(kind: EventType, key: &ApiKey, previous_status: Option<&str>) -> Self {
        let now = paygate_domain::now();
        Self::new(
            key.company_id,
            key.mode,
            kind,
            key.id.to_string(),
            previous_status.map(str::to_owned),
            snapshot(&ApiKeyView::new(key.clone(), now)),
        )
    }

    /// A key's revocation at `at`; it was `active`, or already `expired`.
    pub fn api_key_revoked(key: &ApiKey, at: OffsetDateTime) -> Self {
        let before = if key.is_expired_at(at) { "expired" } else { "active" };
        Self::api_key(EventType::ApiKeyRevoked, key, Some(before))
    }

    pub fn approval_policy(company: CompanyId, mode: KeyMode, policy: &ApprovalPolicy) -> Self {
        Self::new(
            company,
            mode,
            EventType::ApprovalPolicyUpdated,
            format!("approval_policy_{}", mode.as_str()),
            None,
            snapshot(&ApprovalPolicyView { object: "approval_policy", policy: policy.clone() }),
        )
    }

    pub fn webhook_endpoint(kind: EventType, endpoint: &WebhookEndpoint, previous_status: Option<&str>) -> Self {
        Self::new(
            endpoint.company_id,
            endpoint.mode,
            kind,
            endpoint.id.to_string(),
            previous_status.map(str::to_owned),
            snapshot(&WebhookEndpointView::from(endpoint)),
        )
    }

    /// The first event of a newly created object needs no sequence lookup.
    /// (A creation has no previous status; anything else is numbered after
    /// the object's stored events.)
    pub fn is_creation(&self) -> bool {
        self.previous_status.is_none()
            && matches!(self.kind, EventType::PaymentCreated | EventType::PayeeCreated | EventType::ApiKeyCreated)
    }

    pub fn with_sequence(self, sequence: u64) -> Event {
        Event {
            id: self.id,
            company_id: self.company_id,
            mode: self.mode,
            kind: self.kind,
            object_id: self.object_id,
            sequence,
            previous_status: self.previous_status,
            object: self.object,
            created_at: self.created_at,
        }
    }
}

/// What an update reads of the stored payment (under its revision) to decide
/// on the update's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPaymentState {
    pub status: PaymentStatus,
    pub version: u32,
    pub updated_at: OffsetDateTime,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: EventId,
    pub company_id: CompanyId,
    pub mode: KeyMode,
    pub kind: EventType,
    pub object_id: String,
    /// 1, 2, 3, … per object: consumers order one object's events by it.
    pub sequence: u64,
    pub previous_status: Option<String>,
    pub object: String,
    pub created_at: OffsetDateTime,
}

impl Event {
    /// The JSON every reader sees: `GET /v1/events/{id}` and the webhook body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&crate::views::EventView::from(self)).expect("an event serializes")
    }
}

/// Filters of `GET /v1/events`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub kind: Option<EventType>,
    pub object_id: Option<String>,
    /// Only these types (the ones the caller's scopes may read); `None`: any.
    pub types: Option<Vec<EventType>>,
}

impl EventFilter {
    /// `types` as one bound parameter: ` a b c ` (each name between spaces).
    pub fn types_param(&self) -> Option<String> {
        self.types.as_ref().map(|types| {
            let mut text = String::from(" ");
            for t in types {
                text.push_str(t.as_str());
                text.push(' ');
            }
            text
        })
    }
}

/// An object's events are numbered per (company, mode, object id).
pub type ObjectKey = (CompanyId, KeyMode, String);

/// The objects of a change's events whose last sequence number must be read
/// (every object but those the change creates), each once.
pub fn objects_to_sequence(events: &[NewEvent]) -> Vec<ObjectKey> {
    let mut keys: Vec<ObjectKey> =
        events.iter().filter(|e| !e.is_creation()).map(|e| (e.company_id, e.mode, e.object_id.clone())).collect();
    keys.sort_by(|a, b| (a.0, a.1.as_str(), &a.2).cmp(&(b.0, b.1.as_str(), &b.2)));
    keys.dedup();
    keys
}

/// Numbers the events from each object's last stored sequence (`last`;
/// missing means none), counting up within the change.
pub fn assign_sequences(events: Vec<NewEvent>, last: &std::collections::HashMap<ObjectKey, u64>) -> Vec<Event> {
    let mut next: std::collections::HashMap<ObjectKey, u64> = std::collections::HashMap::new();
    events
        .into_iter()
        .map(|event| {
            let key = (event.company_id, event.mode, event.object_id.clone());
            let n = next.entry(key.clone()).or_insert_with(|| last.get(&key).copied().unwrap_or(0));
            *n += 1;
            let sequence = *n;
            event.with_sequence(sequence)
        })
        .collect()
}

/// A webhook endpoint as stored, without its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    pub id: WebhookEndpointId,
    pub company_id: CompanyId,
    pub mode: KeyMode,
    pub url: String,
    pub description: Option<String>,
    pub event_types: EventTypes,
    pub enabled: bool,
    /// Why Paygate disabled it (`gone`: the endpoint answered 410;
    /// `failing`: every delivery failed for the configured time). `None` when
    /// enabled, or disabled by the company.
    pub disabled_reason: Option<String>,
    /// Since when every delivery failed; cleared by a success.
    pub failing_since: Option<OffsetDateTime>,
    /// Until when the previous secret still signs (rotation overlap).
    pub previous_secret_expires_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct NewWebhookEndpoint {
    pub endpoint: WebhookEndpoint,
    /// The signing secret, sealed with the data key (bound to company and endpoint).
    pub secret_sealed: Vec<u8>,
}

/// `PATCH /v1/webhook-endpoints/{id}`: each present field replaces.
#[derive(Debug, Clone, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub event_types: Option<EventTypes>,
    pub enabled: Option<bool>,
}

impl EndpointPatch {
    /// The endpoint after the patch. Enabling clears the failure state.
    pub fn apply(&self, mut e: WebhookEndpoint, now: OffsetDateTime) -> WebhookEndpoint {
        if let Some(url) = self.url.as_ref().filter(|u| **u != e.url) {
            // Another receiver: earlier failures say nothing about it.
            e.url = url.clone();
            e.failing_since = None;
        }
        if let Some(d) = &self.description {
            e.description = d.clone();
        }
        if let Some(t) = &self.event_types {
            e.event_types = t.clone();
        }
        if let Some(enabled) = self.enabled {
            if enabled && !e.enabled {
                e.failing_since = None;
            }
            if enabled || e.enabled {
                e.disabled_reason = None;
            }
            e.enabled = enabled;
        }
        e.updated_at = now;
        e
    }
}

/// At most this many endpoints per company and mode.
pub const MAX_ENDPOINTS: u32 = 16;

/// At most this many deliveries of one endpoint are leased at once (per
/// claim's view; two nodes claiming together may each reach it), so one slow
/// or hanging endpoint cannot take every delivery slot of a node.
pub const MAX_IN_FLIGHT_PER_ENDPOINT: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (or for an earlier event of the same object).
    Pending,
    Succeeded,
    /// Every attempt of the schedule failed, or the endpoint answered 410.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(Self::Pending),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    pub attempted_at: OffsetDateTime,
    pub status_code: Option<u16>,
    pub latency_ms: u32,
    /// `reason: detail`, without secrets.
    pub error: Option<String>,
}

/// A delivery of one event to one endpoint, with its attempts (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: WebhookDeliveryId,
    pub endpoint_id: WebhookEndpointId,
    pub event_id: EventId,
    pub event_type: EventType,
    pub status: DeliveryStatus,
    pub next_attempt_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub attempts: Vec<DeliveryAttempt>,
}

/// A new delivery row: pending, due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub id: WebhookDeliveryId,
    pub company_id: CompanyId,
    pub endpoint_id: WebhookEndpointId,
    pub event_id: EventId,
    pub object_id: String,
    pub sequence: u64,
    pub created_at: OffsetDateTime,
}

impl NewDelivery {
    pub fn of(event: &Event, endpoint: WebhookEndpointId) -> Self {
        Self {
            id: WebhookDeliveryId::generate(),
            company_id: event.company_id,
            endpoint_id: endpoint,
            event_id: event.id,
            object_id: event.object_id.clone(),
            sequence: event.sequence,
            created_at: event.created_at,
        }
    }
}

/// Fan-out: one delivery per event and enabled endpoint of its company and
/// mode that subscribes to its type. `endpoints` holds (company, mode, id,
/// stored event types) of the enabled endpoints.
pub fn fan_out(
    events: &[Event],
    endpoints: &[(CompanyId, KeyMode, WebhookEndpointId, String)],
) -> StoreResult<Vec<NewDelivery>> {
    let mut out = Vec::new();
    for (company, mode, id, types) in endpoints {
        let types =
            EventTypes::from_storage(types).ok_or_else(|| StoreError::corrupt("event types of endpoint", id))?;
        for event in events {
            if event.company_id == *company && event.mode == *mode && types.includes(event.kind) {
                out.push(NewDelivery::of(event, *id));
            }
        }
    }
    Ok(out)
}

/// What a worker needs to attempt one delivery.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub delivery_id: WebhookDeliveryId,
    pub endpoint_id: WebhookEndpointId,
    pub url: String,
    pub secret_sealed: Vec<u8>,
    /// The previous secret while its overlap lasts.
    pub previous_secret_sealed: Option<Vec<u8>>,
    pub event: Event,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    Succeeded,
    RetryAt(OffsetDateTime),
    /// No attempt left, or the endpoint is gone.
    GiveUp,
}

/// The outcome of one attempt, recorded by the node that holds the lease.
#[derive(Debug, Clone)]
pub struct DeliveryResult {
    pub delivery_id: WebhookDeliveryId,
    pub lease_owner: String,
    pub attempt: DeliveryAttempt,
    pub next: NextStep,
    /// Disable the endpoint with this reason (`gone` for a 410).
    pub disable: Option<&'static str>,
    /// Disable the endpoint (reason `failing`) if it has been failing since
    /// before this time and this attempt failed too.
    pub disable_if_failing_since: OffsetDateTime,
}
