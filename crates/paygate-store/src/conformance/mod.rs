//! The behaviour every storage backend must show. Each backend crate runs it with
//! [`crate::conformance_tests!`] against a fresh database per test.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use paygate_domain::{
    AllowedCidrs, ApiKeyId, CompanyId, CompanyStatus, KeyHasher, KeyMode, KeyPolicy, Label, Pepper, ScopeSet,
};
use time::{Duration, OffsetDateTime};

mod audit;
mod events;
mod keys;
mod payments;

pub use audit::*;
pub use events::*;
pub use keys::*;
pub use payments::*;

use crate::auth::{AuthConfig, AuthError, Authenticator};
use crate::prelude::*;
use crate::{
    ApiKey, AuditFilter, Checkpoint, Company, CompanyScope, KeyAuthRecord, KeyUsage, NewApiKey, NewCompany, NewPayee,
    Page, PageRequest, Payee, PayeeStatus, PaymentCreate, PaymentCreated, PaymentFilter, Rotation, StoreError,
    StoreResult, StoredResponse, operator_scope,
};
use crate::{
    Delivery, DeliveryAttempt, DeliveryJob, DeliveryResult, DeliveryStatus, EndpointPatch, Event, EventFilter,
    MAX_ENDPOINTS, NewWebhookEndpoint, NextStep, WebhookEndpoint,
};
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditEntry, Outcome};
use paygate_domain::event::EventTypes;
use paygate_domain::payment::{ApprovalPolicy, Payment};
use paygate_domain::{EventId, EventType, PayeeId, WebhookEndpointId};

/// A store on a database that exists for one test; the guard removes it.
pub struct TestStore {
    pub store: Arc<dyn OperatorStore>,
    _guard: Box<dyn Any + Send>,
}

impl TestStore {
    pub fn new(store: Arc<dyn OperatorStore>, guard: impl Any + Send) -> Self {
        Self { store, _guard: Box::new(guard) }
    }
}

/// Generates one `#[tokio::test]` per conformance case. `$factory` is an async fn
/// returning `Option<TestStore>`; `None` skips (a backend that is not configured).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::conformance_tests!(@cases $factory;
            ping_answers,
            companies_round_trip,
            company_status_changes_bump_the_auth_revision,
            api_key_round_trip,
            api_key_for_a_missing_company_is_not_found,
            another_companys_key_is_invisible,
            api_keys_paginate_newest_first,
            revocation_is_idempotent_and_bumps_the_revision,
            scoped_revocation_cannot_reach_another_company,
            key_auth_record_carries_company_status,
            authenticator_accepts_a_valid_key,
            authenticator_refuses_each_bad_state,
            authenticator_never_reads_the_store_for_malformed_keys,
            authenticator_cache_drops_on_revocation,
            authenticator_caches_unknown_ids_until_the_revision_moves,
            concurrent_key_creation_and_revocation,
            rotation_links_keys_and_shortens_the_old_expiry,
            rotation_refuses_revoked_expired_rotated_and_foreign_keys,
            concurrent_rotations_produce_one_successor,
            revoke_all_touches_only_the_company,
            key_usage_is_recorded_and_never_moves_backwards,
            key_policy_round_trip,
            authenticator_bypasses_the_cache_when_revision_polls_fail,
            audit_chains_link_filter_and_stay_in_their_company,
            a_change_and_its_record_commit_together,
            concurrent_appends_never_fork_a_chain,
            checkpoints_round_trip,
            revoke_all_races_creation_and_rotation_without_deadlock,
            payment_batches_isolate_items_and_commit_records,
            payment_updates_are_guarded_by_revision,
            due_payments_and_idempotency_purge,
            every_change_writes_its_events,
            events_fan_out_to_subscribed_enabled_endpoints,
            claims_lease_due_deliveries_in_object_order,
            failing_and_gone_endpoints_are_disabled,
            secret_rotation_signs_with_both_until_the_overlap_ends,
            redelivery_and_test_events,
            expiring_keys_are_noticed_once,
            endpoint_limit_updates_and_cascading_delete,
            concurrent_payment_updates_write_one_event,
            concurrent_claims_never_share_a_delivery,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(test_store) = $factory().await else { return };
                $crate::conformance::$case(test_store.store.clone()).await;
            }
        )*
    };
}

/// An operator's record of a change, for backend-specific tests.
pub fn operator_record(action: &'static str) -> AuditEntry {
    noted(action)
}

/// An operator's record of a change, for the store's change methods.
fn noted(action: &'static str) -> AuditEntry {
    AuditEntry {
        id: AuditEventId::generate(),
        chain: paygate_domain::audit::PLATFORM_CHAIN.into(),
        occurred_at: paygate_domain::now(),
        actor_kind: ActorKind::Operator,
        actor_id: None,
        actor_name: Some("conformance".into()),
        action,
        resource_type: None,
        resource_id: None,
        outcome: Outcome::Success,
        status: 200,
        request_id: None,
        client_ip: None,
        user_agent: None,
        details: "{}".into(),
    }
}

fn label(s: &str) -> Label {
    Label::parse(s).unwrap()
}

fn hasher() -> KeyHasher {
    KeyHasher::new(&Pepper::new(1, vec![42u8; 32]).unwrap())
}

async fn company(store: &dyn OperatorStore, name: &str) -> Company {
    store.create_company(NewCompany::new(label(name)), &noted("company.create")).await.unwrap()
}

struct Issued {
    key: ApiKey,
    text: String,
}

async fn issue(
    store: &dyn OperatorStore,
    company: CompanyId,
    scopes: &str,
    expires_at: Option<OffsetDateTime>,
) -> Issued {
    let generated = hasher().generate(KeyMode::Test);
    let key = store
        .create_api_key(
            &scope(store, company),
            NewApiKey {
                id: generated.id,
                name: label("ci"),
                owner: label("erp@example.com"),
                scopes: ScopeSet::parse_list(scopes).unwrap(),
                mode: KeyMode::Test,
                created_at: paygate_domain::now(),
                expires_at,
                allowed_cidrs: AllowedCidrs::default(),
                rate_limit: None,
                secret_hash: generated.hash,
                pepper_version: generated.pepper_version,
                principal: None,
            },
            &noted("api_key.create"),
        )
        .await
        .unwrap();
    Issued { key, text: generated.text.to_string() }
}

/// The company's scope in test mode; `.in_mode(…)` for the other.
fn scope(store: &dyn OperatorStore, company: CompanyId) -> CompanyScope {
    operator_scope(store, company, KeyMode::Test)
}

fn new_key(mode: KeyMode, scopes: &str, cidrs: &str) -> (NewApiKey, String) {
    let generated = hasher().generate(mode);
    let new = NewApiKey {
        id: generated.id,
        name: label("rotated"),
        owner: label("erp@example.com"),
        scopes: ScopeSet::parse_list(scopes).unwrap(),
        mode,
        created_at: paygate_domain::now(),
        expires_at: None,
        allowed_cidrs: AllowedCidrs::parse_list(cidrs).unwrap(),
        rate_limit: None,
        secret_hash: generated.hash,
        pepper_version: generated.pepper_version,
        principal: None,
    };
    (new, generated.text.to_string())
}

/// A record of a change on the company's chain (also for backend-specific tests).
pub fn entry_for(company: CompanyId, action: &'static str, outcome: Outcome) -> AuditEntry {
    AuditEntry { chain: company.to_string(), action, outcome, ..noted(action) }
}

/// A business payee with a valid IBAN (also for backend-specific tests).
pub fn new_payee(mode: KeyMode) -> NewPayee {
    use paygate_domain::bank::{BankAccount, BankAccountInput, DataKey};
    let account = BankAccount::parse(&BankAccountInput {
        scheme: "iban".into(),
        iban: Some("DE89370400440532013000".into()),
        ..Default::default()
    })
    .unwrap();
    let key = DataKey::new(&[3; 32]).unwrap();
    let id = PayeeId::generate();
    let company = CompanyId::generate();
    NewPayee {
        payee: Payee {
            id,
            mode,
            name: "Supplier".into(),
            kind: crate::PayeeType::Business,
            email: None,
            bank_account: account.details(key.fingerprint(&account, company, mode)),
            metadata: Default::default(),
            status: PayeeStatus::Active,
            created_at: paygate_domain::now(),
            disabled_at: None,
            created_by: None,
        },
        sealed_account: key.seal(&account, company, &id.to_string()),
    }
}

/// A new EUR payment to `payee` (also for backend-specific tests).
pub fn draft_payment(payee: PayeeId, amount: u64, policy: &ApprovalPolicy) -> Payment {
    let draft = paygate_domain::payment::PaymentDraft {
        payee_id: payee,
        amount: paygate_domain::Amount::new(amount).unwrap(),
        currency: paygate_domain::Currency::parse("EUR").unwrap(),
        reference: "ref".into(),
        requested_execution_date: None,
        metadata: Default::default(),
    };
    let creator = paygate_domain::payment::Actor::system("conformance");
    Payment::create(draft, KeyMode::Test, creator, policy, paygate_domain::now())
}

/// One item of a payment batch, in test mode, under Idempotency-Key `key`.
pub fn create_item(company: CompanyId, store: &dyn OperatorStore, payment: Payment, key: &str) -> PaymentCreate {
    PaymentCreate {
        scope: scope(store, company),
        response: StoredResponse {
            fingerprint: format!("fp-{key}"),
            status: 201,
            body: format!("{{\"id\":\"{}\"}}", payment.id),
            payment_id: payment.id,
        },
        idempotency_key: key.into(),
        expires_at: paygate_domain::now() + Duration::hours(24),
        audit: entry_for(company, "payment.create", Outcome::Success),
        payment,
    }
}

const ALL: PageRequest<EventId> = PageRequest { limit: 100, after: None };

/// (type, sequence, previous status) of an event, for comparing trails.
type Step = (&'static str, u64, Option<String>);

fn step(kind: &'static str, sequence: u64, previous: Option<&str>) -> Step {
    (kind, sequence, previous.map(str::to_owned))
}

/// The object's events, oldest first.
async fn events_of(store: &dyn OperatorStore, scope: &CompanyScope, mode: KeyMode, object: &str) -> Vec<Event> {
    let filter = EventFilter { object_id: Some(object.to_owned()), ..EventFilter::default() };
    let mut events = store.list_events(&scope.in_mode(mode), &filter, ALL).await.unwrap().items;
    events.reverse();
    events
}

async fn trail(store: &dyn OperatorStore, scope: &CompanyScope, mode: KeyMode, object: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = events_of(store, scope, mode, object)
        .await
        .into_iter()
        .map(|e| (e.kind.as_str(), e.sequence, e.previous_status))
        .collect();
    // Ids order events of one object only within a millisecond's counter; the sequence is the order.
    steps.sort_by_key(|s| s.1);
    steps
}

fn event_types(types: &[&str]) -> EventTypes {
    EventTypes::parse(&types.iter().map(|t| t.to_string()).collect::<Vec<_>>()).unwrap()
}

async fn endpoint(
    store: &dyn OperatorStore,
    company: CompanyId,
    mode: KeyMode,
    types: &[&str],
    enabled: bool,
) -> WebhookEndpoint {
    let now = paygate_domain::now();
    let endpoint = WebhookEndpoint {
        id: WebhookEndpointId::generate(),
        company_id: company,
        mode,
        url: "https://hooks.example.com/paygate".into(),
        description: Some("erp".into()),
        event_types: event_types(types),
        enabled,
        disabled_reason: None,
        failing_since: None,
        previous_secret_expires_at: None,
        created_at: now,
        updated_at: now,
    };
    let new = NewWebhookEndpoint { endpoint: endpoint.clone(), secret_sealed: b"secret-1".to_vec() };
    let audit = entry_for(company, "webhook_endpoint.create", Outcome::Success);
    assert!(store.create_webhook_endpoint(&scope(store, company).in_mode(mode), &new, &audit).await.unwrap());
    endpoint
}

async fn deliveries(
    store: &dyn OperatorStore,
    company: CompanyId,
    mode: KeyMode,
    endpoint: WebhookEndpointId,
) -> Vec<Delivery> {
    store
        .list_deliveries(&scope(store, company).in_mode(mode), endpoint, PageRequest { limit: 100, after: None })
        .await
        .unwrap()
        .expect("the endpoint exists")
        .items
}

async fn claim(store: &dyn OperatorStore, at: OffsetDateTime, owner: &str) -> Vec<DeliveryJob> {
    store.claim_deliveries(at, owner, at + Duration::seconds(30), 100).await.unwrap()
}

/// An attempt's outcome. `failing_before`: disable the endpoint if it has failed since before then.
fn outcome(
    job: &DeliveryJob,
    owner: &str,
    at: OffsetDateTime,
    status_code: u16,
    next: NextStep,
    failing_before: OffsetDateTime,
) -> DeliveryResult {
    DeliveryResult {
        delivery_id: job.delivery_id,
        lease_owner: owner.into(),
        attempt: DeliveryAttempt {
            attempted_at: at,
            status_code: Some(status_code),
            latency_ms: 12,
            error: (status_code >= 300).then(|| format!("http_status: {status_code}")),
        },
        next,
        disable: None,
        disable_if_failing_since: failing_before,
    }
}

async fn finish(store: &dyn OperatorStore, company: CompanyId, result: &DeliveryResult) -> bool {
    store
        .finish_delivery(
            result,
            &entry_for(company, "webhook.deliver", Outcome::Success),
            &entry_for(company, "webhook_endpoint.disable", Outcome::Success),
        )
        .await
        .unwrap()
}

async fn ping(store: &dyn OperatorStore, company: CompanyId, endpoint: WebhookEndpointId) -> Event {
    let audit = entry_for(company, "webhook_endpoint.test", Outcome::Success);
    store.send_test_event(&scope(store, company).in_mode(KeyMode::Test), endpoint, &audit).await.unwrap().unwrap()
}

async fn payee_in(store: &dyn OperatorStore, company: CompanyId) -> NewPayee {
    let payee = new_payee(KeyMode::Test);
    let audit = entry_for(company, "payee.create", Outcome::Success);
    store.create_payee(&scope(store, company), &payee, &audit).await.unwrap();
    payee
}

fn approver(n: usize) -> paygate_domain::payment::Actor {
    paygate_domain::payment::Actor::key(ApiKeyId::generate(), &format!("approver{n}"), ApiKeyId::generate())
}

/// Recomputes a chain from the stored fields, as `paygate audit verify` does.
async fn assert_chain_intact(store: &dyn OperatorStore, chain: &str) -> u64 {
    let records = store.audit_records(chain, 0, 100_000).await.unwrap();
    let mut prev = [0u8; 32];
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "no gap");
        assert_eq!(r.prev_hash, prev, "linked");
        assert_eq!(r.recomputed_hash(), r.hash, "unmodified");
        prev = r.hash;
    }
    records.len() as u64
}
