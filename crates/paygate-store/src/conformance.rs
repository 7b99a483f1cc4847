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

use crate::auth::{AuthConfig, AuthError, Authenticator};
use crate::{
    ApiKey, AuditFilter, Backend, Checkpoint, Company, CompanyScope, KeyAuthRecord, KeyUsage, NewApiKey, NewCompany,
    NewPayee, OperatorStore, Page, PageRequest, Payee, PayeeStatus, PaymentCreate, PaymentCreated, PaymentFilter,
    Rotation, Store, StoreError, StoreResult, StoredResponse, operator_scope,
};
use crate::{
    Delivery, DeliveryAttempt, DeliveryJob, DeliveryResult, DeliveryStatus, EndpointPatch, Event, EventFilter,
    MAX_ENDPOINTS, NewWebhookEndpoint, NextStep, WebhookEndpoint,
};
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditEntry, AuditRecord, Outcome};
use paygate_domain::event::EventTypes;
use paygate_domain::payment::{ApprovalPolicy, Payment};
use paygate_domain::{EventId, EventType, PayeeId, PaymentId, WebhookDeliveryId, WebhookEndpointId};

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
            &operator_scope(store, company),
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

fn scope(store: &dyn OperatorStore, company: CompanyId) -> CompanyScope {
    operator_scope(store, company)
}

pub async fn ping_answers(store: Arc<dyn OperatorStore>) {
    store.ping().await.unwrap();
    assert!(matches!(store.backend(), Backend::Sqlite | Backend::Postgres));
}

pub async fn companies_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme GmbH").await;
    let b = company(&*store, "Globex").await;
    assert_eq!(a.status, CompanyStatus::Active);
    assert_eq!(store.find_company(a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.find_company(CompanyId::generate()).await.unwrap(), None);
    let listed = store.list_companies().await.unwrap();
    assert_eq!(listed.iter().map(|c| c.id).collect::<Vec<_>>(), vec![b.id, a.id], "newest first");
    assert_eq!(store.get_company(&scope(&*store, a.id)).await.unwrap(), a);
}

pub async fn company_status_changes_bump_the_auth_revision(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let r0 = store.auth_revision().await.unwrap();
    let suspended =
        store.set_company_status(a.id, CompanyStatus::Suspended, &noted("company.suspend")).await.unwrap().unwrap();
    assert_eq!(suspended.status, CompanyStatus::Suspended);
    let r1 = store.auth_revision().await.unwrap();
    assert!(r1 > r0);
    let resumed =
        store.set_company_status(a.id, CompanyStatus::Active, &noted("company.suspend")).await.unwrap().unwrap();
    assert_eq!(resumed.status, CompanyStatus::Active);
    assert!(store.auth_revision().await.unwrap() > r1);
    assert_eq!(
        store
            .set_company_status(CompanyId::generate(), CompanyStatus::Suspended, &noted("company.suspend"))
            .await
            .unwrap(),
        None
    );
}

pub async fn api_key_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let expires = paygate_domain::now() + Duration::days(30);
    let issued = issue(&*store, a.id, "keys:read payments:read", Some(expires)).await;
    let got = store.get_api_key(&scope(&*store, a.id), issued.key.id).await.unwrap().unwrap();
    assert_eq!(got, issued.key);
    assert_eq!(got.expires_at, Some(expires));
    assert_eq!(got.scopes.to_storage(), "payments:read keys:read");
    assert_eq!(got.revoked_at, None);
    assert_eq!(got.last_used_at, None);
    assert_eq!(got.company_id, a.id);
}

pub async fn api_key_for_a_missing_company_is_not_found(store: Arc<dyn OperatorStore>) {
    let generated = hasher().generate(KeyMode::Live);
    let err = store
        .create_api_key(
            &scope(&*store, CompanyId::generate()),
            NewApiKey {
                id: generated.id,
                name: label("x"),
                owner: label("y"),
                scopes: ScopeSet::empty(),
                mode: KeyMode::Live,
                created_at: paygate_domain::now(),
                expires_at: None,
                allowed_cidrs: AllowedCidrs::default(),
                rate_limit: None,
                secret_hash: generated.hash,
                pepper_version: 1,
                principal: None,
            },
            &noted("api_key.create"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound("company")), "{err:?}");
}

pub async fn another_companys_key_is_invisible(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let key_a = issue(&*store, a.id, "keys:read", None).await.key;
    let scope_b = scope(&*store, b.id);
    assert_eq!(store.get_api_key(&scope_b, key_a.id).await.unwrap(), None);
    assert_eq!(store.get_api_key(&scope_b, ApiKeyId::generate()).await.unwrap(), None);
    let page = store.list_api_keys(&scope_b, PageRequest { limit: 100, after: None }).await.unwrap();
    assert!(page.items.is_empty());
    // A cursor taken from company A's list leaks nothing either.
    let page =
        store.list_api_keys(&scope_b, PageRequest { limit: 100, after: Some(ApiKeyId::generate()) }).await.unwrap();
    assert!(page.items.is_empty());
}

pub async fn api_keys_paginate_newest_first(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(issue(&*store, a.id, "keys:read", None).await.key.id);
        issue(&*store, b.id, "keys:read", None).await;
    }
    ids.reverse();
    let sa = scope(&*store, a.id);
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page: Page<ApiKey> = store.list_api_keys(&sa, PageRequest { limit: 2, after }).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|k| k.id));
        if !page.has_more {
            break;
        }
        after = page.items.last().map(|k| k.id);
        // A key created mid-walk is newer than every cursor: it never shifts later pages.
        issue(&*store, a.id, "keys:read", None).await;
    }
    assert_eq!(seen, ids);
}

pub async fn revocation_is_idempotent_and_bumps_the_revision(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let r0 = store.auth_revision().await.unwrap();
    let t1 = paygate_domain::now();
    let revoked = store.revoke_api_key_by_id(key.id, t1, &noted("api_key.revoke")).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(t1));
    assert!(store.auth_revision().await.unwrap() > r0);
    let again =
        store.revoke_api_key_by_id(key.id, t1 + Duration::seconds(5), &noted("api_key.revoke")).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(t1), "the first revocation time stands");
    assert_eq!(store.revoke_api_key_by_id(ApiKeyId::generate(), t1, &noted("api_key.revoke")).await.unwrap(), None);
}

pub async fn scoped_revocation_cannot_reach_another_company(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let key_a = issue(&*store, a.id, "keys:read", None).await.key;
    let r0 = store.auth_revision().await.unwrap();
    let now = paygate_domain::now();
    assert_eq!(
        store.revoke_api_key(&scope(&*store, b.id), key_a.id, now, &noted("api_key.revoke")).await.unwrap(),
        None
    );
    assert_eq!(store.auth_revision().await.unwrap(), r0, "nothing changed, nothing signalled");
    let still = store.get_api_key(&scope(&*store, a.id), key_a.id).await.unwrap().unwrap();
    assert_eq!(still.revoked_at, None);
    let revoked =
        store.revoke_api_key(&scope(&*store, a.id), key_a.id, now, &noted("api_key.revoke")).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(now));
}

pub async fn key_auth_record_carries_company_status(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let record: KeyAuthRecord = store.find_key_for_auth(issued.key.id).await.unwrap().unwrap();
    assert_eq!(record.key, issued.key);
    assert_eq!(record.company_name, "Acme");
    assert_eq!(record.company_status, CompanyStatus::Active);
    assert_eq!(record.pepper_version, 1);
    let secret = issued.text.rsplit('_').next().unwrap();
    assert!(hasher().verify(&secret.as_bytes()[..43], &record.secret_hash, 1));
    store.set_company_status(a.id, CompanyStatus::Suspended, &noted("company.suspend")).await.unwrap();
    let record = store.find_key_for_auth(issued.key.id).await.unwrap().unwrap();
    assert_eq!(record.company_status, CompanyStatus::Suspended);
    assert!(store.find_key_for_auth(ApiKeyId::generate()).await.unwrap().is_none());
}

fn authenticator(store: Arc<dyn Store>) -> Authenticator {
    Authenticator::new(store, hasher(), AuthConfig::default())
}

pub async fn authenticator_accepts_a_valid_key(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let auth = authenticator(store.clone());
    auth.poll_revision().await.unwrap();
    for _ in 0..2 {
        let ok = auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
        assert_eq!(ok.scope.company_id(), a.id);
        assert_eq!(ok.record.key.id, issued.key.id);
    }
    assert_eq!(auth.cached_keys(), 1);
}

pub async fn authenticator_refuses_each_bad_state(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let auth = authenticator(store.clone());
    let now = paygate_domain::now();

    let unknown = hasher().generate(KeyMode::Test);
    assert!(matches!(auth.verify_key(&unknown.text, now).await, Err(AuthError::UnknownKey)));

    let issued = issue(&*store, a.id, "keys:read", None).await;
    let other_pepper = KeyHasher::new(&Pepper::new(1, vec![1u8; 32]).unwrap());
    let wrong = Authenticator::new(store.clone(), other_pepper, AuthConfig::default());
    assert!(matches!(wrong.verify_key(&issued.text, now).await, Err(AuthError::WrongSecret)));

    // The cache is in use (polled) and warm for every key below, so each refusal
    // must come from the cached record or the revision signal.
    auth.poll_revision().await.unwrap();
    let expiring = issue(&*store, a.id, "keys:read", Some(now + Duration::seconds(60))).await;
    assert!(auth.verify_key(&expiring.text, now).await.is_ok());
    assert!(matches!(auth.verify_key(&expiring.text, now + Duration::seconds(60)).await, Err(AuthError::Expired)));

    assert!(auth.verify_key(&issued.text, now).await.is_ok());
    store.revoke_api_key_by_id(issued.key.id, now, &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap());
    assert!(matches!(auth.verify_key(&issued.text, now).await, Err(AuthError::Revoked)));

    let live = issue(&*store, a.id, "keys:read", None).await;
    assert!(auth.verify_key(&live.text, now).await.is_ok());
    store.set_company_status(a.id, CompanyStatus::Suspended, &noted("company.suspend")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap());
    assert!(matches!(auth.verify_key(&live.text, now).await, Err(AuthError::CompanySuspended)));
}

/// Counts every call that reaches the wrapped store.
struct CountingStore {
    inner: Arc<dyn OperatorStore>,
    calls: AtomicUsize,
    /// Makes `auth_revision` fail, as when the database is unreachable.
    fail_revision: std::sync::atomic::AtomicBool,
}

impl CountingStore {
    fn new(inner: Arc<dyn OperatorStore>) -> Arc<Self> {
        Arc::new(Self { inner, calls: AtomicUsize::new(0), fail_revision: Default::default() })
    }
}

#[async_trait]
impl Store for CountingStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }
    async fn ping(&self) -> StoreResult<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.ping().await
    }
    async fn find_key_for_auth(&self, id: ApiKeyId) -> StoreResult<Option<KeyAuthRecord>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.find_key_for_auth(id).await
    }
    async fn auth_revision(&self) -> StoreResult<i64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_revision.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected".into()));
        }
        self.inner.auth_revision().await
    }
    async fn get_company(&self, scope: &CompanyScope) -> StoreResult<Company> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.get_company(scope).await
    }
    async fn list_api_keys(&self, scope: &CompanyScope, page: PageRequest<ApiKeyId>) -> StoreResult<Page<ApiKey>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.list_api_keys(scope, page).await
    }
    async fn get_api_key(&self, scope: &CompanyScope, id: ApiKeyId) -> StoreResult<Option<ApiKey>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.get_api_key(scope, id).await
    }
    async fn create_api_key(&self, scope: &CompanyScope, new: NewApiKey, audit: &AuditEntry) -> StoreResult<ApiKey> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.create_api_key(scope, new, audit).await
    }
    async fn revoke_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke_api_key(scope, id, at, audit).await
    }
    async fn revoke_all_api_keys(
        &self,
        scope: &CompanyScope,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<u64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.revoke_all_api_keys(scope, at, audit).await
    }
    async fn rotate_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        new: NewApiKey,
        old_expires_at: OffsetDateTime,
        now: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Rotation> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.rotate_api_key(scope, id, new, old_expires_at, now, audit).await
    }
    async fn append_audit(&self, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.append_audit(entries).await
    }
    async fn list_audit(
        &self,
        scope: &CompanyScope,
        filter: &AuditFilter,
        page: PageRequest<u64>,
    ) -> StoreResult<Page<AuditRecord>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.list_audit(scope, filter, page).await
    }
    async fn get_audit(&self, scope: &CompanyScope, id: AuditEventId) -> StoreResult<Option<AuditRecord>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.get_audit(scope, id).await
    }
    async fn export_audit(
        &self,
        scope: &CompanyScope,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.export_audit(scope, from, to, after_seq, limit).await
    }
    async fn audit_head(&self, scope: &CompanyScope) -> StoreResult<Option<(u64, [u8; 32])>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.audit_head(scope).await
    }
    async fn latest_checkpoint(&self, scope: &CompanyScope) -> StoreResult<Option<Checkpoint>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.latest_checkpoint(scope).await
    }
    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_revision.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected".into()));
        }
        self.inner.record_key_usage(usage).await
    }
    // Payments: not counted (the counting tests are about authentication).
    async fn approval_policy(&self, scope: &CompanyScope, mode: KeyMode) -> StoreResult<ApprovalPolicy> {
        self.inner.approval_policy(scope, mode).await
    }
    async fn set_approval_policy(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        p: &ApprovalPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        self.inner.set_approval_policy(scope, mode, p, audit).await
    }
    async fn create_payee(&self, scope: &CompanyScope, new: &NewPayee, audit: &AuditEntry) -> StoreResult<()> {
        self.inner.create_payee(scope, new, audit).await
    }
    async fn list_payees(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        status: Option<PayeeStatus>,
        page: PageRequest<PayeeId>,
    ) -> StoreResult<Page<Payee>> {
        self.inner.list_payees(scope, mode, status, page).await
    }
    async fn get_payee(&self, scope: &CompanyScope, mode: KeyMode, id: PayeeId) -> StoreResult<Option<Payee>> {
        self.inner.get_payee(scope, mode, id).await
    }
    async fn payee_sealed_account(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.inner.payee_sealed_account(scope, mode, id).await
    }
    async fn disable_payee(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Payee>> {
        self.inner.disable_payee(scope, mode, id, at, audit).await
    }
    async fn create_payments(&self, items: &[PaymentCreate]) -> StoreResult<Vec<PaymentCreated>> {
        self.inner.create_payments(items).await
    }
    async fn idempotent_response(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        key: &str,
    ) -> StoreResult<Option<StoredResponse>> {
        self.inner.idempotent_response(scope, mode, key).await
    }
    async fn get_payment(&self, scope: &CompanyScope, mode: KeyMode, id: PaymentId) -> StoreResult<Option<Payment>> {
        self.inner.get_payment(scope, mode, id).await
    }
    async fn list_payments(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &PaymentFilter,
        page: PageRequest<PaymentId>,
    ) -> StoreResult<Page<Payment>> {
        self.inner.list_payments(scope, mode, filter, page).await
    }
    async fn update_payment(
        &self,
        scope: &CompanyScope,
        p: &Payment,
        rev: u32,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.inner.update_payment(scope, p, rev, audit).await
    }
    // Events and webhooks: not counted either.
    async fn list_events(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &EventFilter,
        page: PageRequest<EventId>,
    ) -> StoreResult<Page<Event>> {
        self.inner.list_events(scope, mode, filter, page).await
    }
    async fn get_event(&self, scope: &CompanyScope, mode: KeyMode, id: EventId) -> StoreResult<Option<Event>> {
        self.inner.get_event(scope, mode, id).await
    }
    async fn create_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        new: &NewWebhookEndpoint,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.inner.create_webhook_endpoint(scope, new, audit).await
    }
    async fn list_webhook_endpoints(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        page: PageRequest<WebhookEndpointId>,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        self.inner.list_webhook_endpoints(scope, mode, page).await
    }
    async fn get_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.get_webhook_endpoint(scope, mode, id).await
    }
    async fn update_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        patch: &EndpointPatch,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.update_webhook_endpoint(scope, mode, id, patch, audit).await
    }
    async fn delete_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        self.inner.delete_webhook_endpoint(scope, mode, id, audit).await
    }
    async fn rotate_webhook_secret(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        new_sealed: &[u8],
        previous_expires_at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.rotate_webhook_secret(scope, mode, id, new_sealed, previous_expires_at, audit).await
    }
    async fn send_test_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Event>> {
        self.inner.send_test_event(scope, mode, id, audit).await
    }
    async fn redeliver_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: EventId,
        endpoint: Option<WebhookEndpointId>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<u32>> {
        self.inner.redeliver_event(scope, mode, id, endpoint, audit).await
    }
    async fn list_deliveries(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        endpoint: WebhookEndpointId,
        page: PageRequest<WebhookDeliveryId>,
    ) -> StoreResult<Option<Page<Delivery>>> {
        self.inner.list_deliveries(scope, mode, endpoint, page).await
    }
}

pub async fn authenticator_never_reads_the_store_for_malformed_keys(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    let mut bad_checksum = issued.text.clone().into_bytes();
    let last = bad_checksum.len() - 1;
    bad_checksum[last] = if bad_checksum[last] == b'A' { b'B' } else { b'A' };
    let bad_checksum = String::from_utf8(bad_checksum).unwrap();
    for text in ["", "pgk_", "Bearer", "pgk_test_key_nope", &bad_checksum, &issued.text.replace("pgk_test", "pgk_live")]
    {
        assert!(matches!(auth.verify_key(text, paygate_domain::now()).await, Err(AuthError::Malformed(_))), "{text:?}");
    }
    assert_eq!(counting.calls.load(Ordering::SeqCst), 0);
    // The counter does count: a well-formed key costs exactly one read.
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
}

pub async fn authenticator_cache_drops_on_revocation(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    auth.poll_revision().await.unwrap();
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    let before = counting.calls.load(Ordering::SeqCst);
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    assert_eq!(counting.calls.load(Ordering::SeqCst), before, "second call is served from the cache");

    store.revoke_api_key_by_id(issued.key.id, paygate_domain::now(), &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap(), "the revision moved");
    assert!(matches!(auth.verify_key(&issued.text, paygate_domain::now()).await, Err(AuthError::Revoked)));
}

pub async fn authenticator_caches_unknown_ids_until_the_revision_moves(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    auth.poll_revision().await.unwrap();
    let unknown = hasher().generate(KeyMode::Test);
    let calls = || counting.calls.load(Ordering::SeqCst);
    let before = calls();
    for _ in 0..3 {
        assert!(matches!(auth.verify_key(&unknown.text, paygate_domain::now()).await, Err(AuthError::UnknownKey)));
    }
    assert_eq!(calls(), before + 1, "a flood of one unknown id costs one store read");
    // Known keys are unaffected by the negative entries.
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    // The same signal that drops verified keys drops unknown ids.
    store.revoke_api_key_by_id(issued.key.id, paygate_domain::now(), &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap());
    let before = calls();
    assert!(matches!(auth.verify_key(&unknown.text, paygate_domain::now()).await, Err(AuthError::UnknownKey)));
    assert_eq!(calls(), before + 1, "read again after the revision moved");
}

pub async fn concurrent_key_creation_and_revocation(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { issue(&*store, a.id, "keys:read", None).await.key }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.push(t.await.unwrap());
    }
    let now = paygate_domain::now();
    let mut tasks = Vec::new();
    for key in &keys {
        // Each key revoked twice at once: both calls succeed, one timestamp stands.
        for offset in [0, 1] {
            let store = store.clone();
            let id = key.id;
            tasks.push(tokio::spawn(async move {
                store.revoke_api_key_by_id(id, now + Duration::seconds(offset), &noted("api_key.revoke")).await
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap().unwrap());
    }
    for pair in results.chunks(2) {
        assert_eq!(pair[0].revoked_at, pair[1].revoked_at, "both callers see the one timestamp that stands");
    }
    let page = store.list_api_keys(&scope(&*store, a.id), PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 16);
    for key in &page.items {
        let seen = results.iter().find(|r| r.id == key.id).unwrap();
        assert_eq!(key.revoked_at, seen.revoked_at);
    }
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

pub async fn rotation_links_keys_and_shortens_the_old_expiry(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let (first, _) = new_key(KeyMode::Test, "keys:read", "203.0.113.0/24");
    let old = store.create_api_key(&sa, first, &noted("api_key.create")).await.unwrap();
    assert_eq!(old.allowed_cidrs.to_storage(), "203.0.113.0/24");
    let r0 = store.auth_revision().await.unwrap();
    let now = paygate_domain::now();
    let grace = now + Duration::hours(24);
    let (second, _) = new_key(KeyMode::Test, "keys:read", "203.0.113.0/24");
    let second_id = second.id;
    let Rotation::Rotated { old: rotated, new } =
        store.rotate_api_key(&sa, old.id, second, grace, now, &noted("api_key.rotate")).await.unwrap()
    else {
        panic!("rotation refused")
    };
    assert_eq!(rotated.replaced_by, Some(second_id));
    assert_eq!(rotated.expires_at, Some(grace));
    assert_eq!(new.replaces, Some(old.id));
    assert_eq!(store.get_api_key(&sa, second_id).await.unwrap().unwrap(), *new);
    assert!(store.auth_revision().await.unwrap() > r0, "cached copies of the old key must drop");

    // An earlier expiry is never extended by the grace period.
    let soon = now + Duration::minutes(5);
    let expiring = issue(&*store, a.id, "keys:read", Some(soon)).await.key;
    let (third, _) = new_key(KeyMode::Test, "keys:read", "");
    let Rotation::Rotated { old, .. } =
        store.rotate_api_key(&sa, expiring.id, third, grace, now, &noted("api_key.rotate")).await.unwrap()
    else {
        panic!("rotation refused")
    };
    assert_eq!(old.expires_at, Some(soon));
}

pub async fn rotation_refuses_revoked_expired_rotated_and_foreign_keys(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let sa = scope(&*store, a.id);
    let now = paygate_domain::now();
    let later = now + Duration::hours(1);
    let revoked = issue(&*store, a.id, "keys:read", None).await.key;
    store.revoke_api_key(&sa, revoked.id, now, &noted("api_key.revoke")).await.unwrap();
    assert_eq!(
        store
            .rotate_api_key(&sa, revoked.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::Revoked
    );
    let expired = issue(&*store, a.id, "keys:read", Some(now)).await.key;
    assert_eq!(
        store
            .rotate_api_key(&sa, expired.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::Expired
    );
    let live = issue(&*store, a.id, "keys:read", None).await.key;
    assert_eq!(
        store
            .rotate_api_key(
                &scope(&*store, b.id),
                live.id,
                new_key(KeyMode::Test, "", "").0,
                later,
                now,
                &noted("api_key.rotate")
            )
            .await
            .unwrap(),
        Rotation::NotFound
    );
    assert!(matches!(
        store
            .rotate_api_key(&sa, live.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::Rotated { .. }
    ));
    assert_eq!(
        store
            .rotate_api_key(&sa, live.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::AlreadyRotated
    );
    let page = store.list_api_keys(&sa, PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 4, "refused rotations wrote nothing");
}

pub async fn concurrent_rotations_produce_one_successor(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let now = paygate_domain::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let sa = scope(&*store, a.id);
        tasks.push(tokio::spawn(async move {
            store
                .rotate_api_key(
                    &sa,
                    key.id,
                    new_key(KeyMode::Test, "keys:read", "").0,
                    now + Duration::hours(1),
                    now,
                    &noted("api_key.rotate"),
                )
                .await
        }));
    }
    let mut rotated = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Rotation::Rotated { .. } => rotated += 1,
            Rotation::AlreadyRotated => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rotated, 1);
    let page = store.list_api_keys(&scope(&*store, a.id), PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 2);
}

pub async fn revoke_all_touches_only_the_company(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let now = paygate_domain::now();
    for _ in 0..3 {
        issue(&*store, a.id, "keys:read", None).await;
    }
    let already = issue(&*store, a.id, "keys:read", None).await.key;
    store.revoke_api_key_by_id(already.id, now - Duration::hours(1), &noted("api_key.revoke")).await.unwrap();
    let other = issue(&*store, b.id, "keys:read", None).await.key;
    let r0 = store.auth_revision().await.unwrap();
    assert_eq!(store.revoke_all_api_keys(&scope(&*store, a.id), now, &noted("api_key.revoke_all")).await.unwrap(), 3);
    assert!(store.auth_revision().await.unwrap() > r0);
    let page = store.list_api_keys(&scope(&*store, a.id), PageRequest { limit: 100, after: None }).await.unwrap();
    assert!(page.items.iter().all(|k| k.revoked_at.is_some()));
    let kept = page.items.iter().find(|k| k.id == already.id).unwrap();
    assert_eq!(kept.revoked_at, Some(now - Duration::hours(1)), "earlier revocation time stands");
    assert_eq!(store.get_api_key(&scope(&*store, b.id), other.id).await.unwrap().unwrap().revoked_at, None);
}

pub async fn key_usage_is_recorded_and_never_moves_backwards(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let k1 = issue(&*store, a.id, "keys:read", None).await.key;
    let k2 = issue(&*store, a.id, "keys:read", None).await.key;
    let now = paygate_domain::now();
    let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let ip6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
    store
        .record_key_usage(&[KeyUsage { id: k2.id, at: now, ip: ip6 }, KeyUsage { id: k1.id, at: now, ip }])
        .await
        .unwrap();
    store.record_key_usage(&[KeyUsage { id: k1.id, at: now - Duration::minutes(5), ip: ip6 }]).await.unwrap();
    store.record_key_usage(&[]).await.unwrap();
    let sa = scope(&*store, a.id);
    let got = store.get_api_key(&sa, k1.id).await.unwrap().unwrap();
    assert_eq!((got.last_used_at, got.last_used_ip), (Some(now), Some(ip)));
    let got = store.get_api_key(&sa, k2.id).await.unwrap().unwrap();
    assert_eq!((got.last_used_at, got.last_used_ip), (Some(now), Some(ip6)));
}

pub async fn key_policy_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    assert_eq!(a.key_policy, KeyPolicy::default());
    let policy = KeyPolicy::new(Some(Duration::days(30)), Some(Duration::days(90))).unwrap();
    let updated = store.set_key_policy(a.id, policy, &noted("company.set_key_policy")).await.unwrap().unwrap();
    assert_eq!(updated.key_policy, policy);
    assert_eq!(store.get_company(&scope(&*store, a.id)).await.unwrap().key_policy, policy);
    assert_eq!(
        store.set_key_policy(CompanyId::generate(), policy, &noted("company.set_key_policy")).await.unwrap(),
        None
    );
    store.set_key_policy(a.id, KeyPolicy::default(), &noted("company.set_key_policy")).await.unwrap();
    assert_eq!(store.find_company(a.id).await.unwrap().unwrap().key_policy, KeyPolicy::default());
}

/// A node that cannot read the revision must stop trusting its cache: a lost
/// signal costs database reads, never a stale accept.
pub async fn authenticator_bypasses_the_cache_when_revision_polls_fail(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    auth.poll_revision().await.unwrap();
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    counting.fail_revision.store(true, Ordering::SeqCst);
    store.revoke_api_key_by_id(issued.key.id, paygate_domain::now(), &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.is_err());
    tokio::time::sleep(AuthConfig::default().max_staleness + std::time::Duration::from_millis(50)).await;
    assert!(matches!(auth.verify_key(&issued.text, paygate_domain::now()).await, Err(AuthError::Revoked)));
}

/// A record of a change on the company's chain (also for backend-specific tests).
pub fn entry_for(company: CompanyId, action: &'static str, outcome: Outcome) -> AuditEntry {
    AuditEntry { chain: company.to_string(), action, outcome, ..noted(action) }
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

pub async fn audit_chains_link_filter_and_stay_in_their_company(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let batch = vec![
        entry_for(a.id, "api_key.list", Outcome::Success),
        entry_for(b.id, "api_key.read", Outcome::Success),
        entry_for(a.id, "api_key.read", Outcome::Denied),
        entry_for(a.id, "identity.read", Outcome::Success),
    ];
    let written = store.append_audit(&batch).await.unwrap();
    assert_eq!(written.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 1, 2, 3]);
    assert_eq!(written[2].prev_hash, written[0].hash);
    assert_eq!(assert_chain_intact(&*store, &a.id.to_string()).await, 3);
    assert_eq!(assert_chain_intact(&*store, &b.id.to_string()).await, 1);

    let sa = scope(&*store, a.id);
    let sb = scope(&*store, b.id);
    let all = store.list_audit(&sa, &AuditFilter::default(), PageRequest { limit: 2, after: None }).await.unwrap();
    assert_eq!(all.items.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 2], "newest first");
    assert!(all.has_more);
    let rest = store.list_audit(&sa, &AuditFilter::default(), PageRequest { limit: 2, after: Some(2) }).await.unwrap();
    assert_eq!(rest.items.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
    let denied = AuditFilter { outcome: Some(Outcome::Denied), ..AuditFilter::default() };
    let page = store.list_audit(&sa, &denied, PageRequest { limit: 10, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].entry.action, "api_key.read");
    let reads = AuditFilter { action: Some("api_key.read".into()), ..AuditFilter::default() };
    assert_eq!(store.list_audit(&sb, &reads, PageRequest { limit: 10, after: None }).await.unwrap().items.len(), 1);

    // Another company's record is invisible.
    assert!(store.get_audit(&sa, written[0].entry.id).await.unwrap().is_some());
    assert!(store.get_audit(&sb, written[0].entry.id).await.unwrap().is_none());
    let exported = store.export_audit(&sa, None, None, 0, 100).await.unwrap();
    assert_eq!(exported.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(store.export_audit(&sa, None, None, 2, 100).await.unwrap().len(), 1);
    assert_eq!(store.audit_head(&sa).await.unwrap(), Some((3, written[3].hash)));
    let future = AuditFilter { from: Some(paygate_domain::now() + Duration::hours(1)), ..AuditFilter::default() };
    assert!(store.list_audit(&sa, &future, PageRequest { limit: 10, after: None }).await.unwrap().items.is_empty());
}

pub async fn a_change_and_its_record_commit_together(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let before = store.audit_records(&a.id.to_string(), 0, 1000).await.unwrap().len();
    let record = entry_for(a.id, "api_key.revoke", Outcome::Success);
    store.revoke_api_key(&sa, key.id, paygate_domain::now(), &record).await.unwrap().unwrap();
    let after = store.audit_records(&a.id.to_string(), 0, 1000).await.unwrap();
    assert_eq!(after.len(), before + 1);
    assert_eq!(after.last().unwrap().entry.id, record.id);
    // A change that does not happen leaves no record of having happened.
    let missing = entry_for(a.id, "api_key.revoke", Outcome::Success);
    assert!(store.revoke_api_key(&sa, ApiKeyId::generate(), paygate_domain::now(), &missing).await.unwrap().is_none());
    let refused = entry_for(a.id, "api_key.rotate", Outcome::Success);
    let now = paygate_domain::now();
    let outcome =
        store.rotate_api_key(&sa, key.id, new_key(KeyMode::Test, "", "").0, now, now, &refused).await.unwrap();
    assert_eq!(outcome, Rotation::Revoked);
    assert_eq!(store.audit_records(&a.id.to_string(), 0, 1000).await.unwrap().len(), before + 1);
    assert!(store.get_audit(&sa, missing.id).await.unwrap().is_none());
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn concurrent_appends_never_fork_a_chain(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                if (t + i) % 3 == 0 {
                    // Interleave change transactions with batch appends.
                    let key = issue(&*store, a.id, "keys:read", None).await.key;
                    let sa = scope(&*store, a.id);
                    let record = entry_for(a.id, "api_key.revoke", Outcome::Success);
                    store.revoke_api_key(&sa, key.id, paygate_domain::now(), &record).await.unwrap();
                } else {
                    let batch = vec![entry_for(a.id, "api_key.list", Outcome::Success); 3];
                    let batch: Vec<_> =
                        batch.into_iter().map(|e| AuditEntry { id: AuditEventId::generate(), ..e }).collect();
                    store.append_audit(&batch).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = assert_chain_intact(&*store, &a.id.to_string()).await;
    assert!(n >= 80, "{n} records");
    let heads = store.audit_heads().await.unwrap();
    let head = heads.iter().find(|(c, _, _)| *c == a.id.to_string()).unwrap();
    assert_eq!(head.1, n);
}

pub async fn checkpoints_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let written = store.append_audit(&[entry_for(a.id, "identity.read", Outcome::Success)]).await.unwrap();
    let signer = paygate_domain::audit::AuditSigner::from_bytes(&[3; 32]);
    let chain = a.id.to_string();
    let checkpoint = Checkpoint {
        chain: chain.clone(),
        seq: 1,
        hash: written[0].hash,
        signed_at: paygate_domain::now(),
        key_id: signer.key_id(),
        signature: signer.sign(&chain, 1, &written[0].hash).to_vec(),
    };
    store.add_checkpoint(&checkpoint).await.unwrap();
    assert_eq!(store.audit_checkpoints(&chain).await.unwrap(), vec![checkpoint.clone()]);
    assert_eq!(store.latest_checkpoint(&scope(&*store, a.id)).await.unwrap(), Some(checkpoint));
    assert!(store.audit_chains().await.unwrap().contains(&chain));
}

/// Emergency revocation racing key creation and rotation completes without
/// errors or deadlocks on both backends. (The ordering itself is by locking:
/// on PostgreSQL revoke-all holds the company row exclusively and creation and
/// rotation hold it shared, so no key committed before revoke-all's update is
/// missed; SQLite serialises every write with BEGIN IMMEDIATE. A precise
/// interleaving test needs two sessions driven step by step; see the note in
/// ADR 0001.)
pub async fn revoke_all_races_creation_and_rotation_without_deadlock(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    for round in 0..5 {
        let seed = issue(&*store, a.id, "keys:read", None).await.key;
        let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
        let creator = tokio::spawn(async move {
            for _ in 0..5 {
                issue(&*s1, a.id, "keys:read", None).await;
            }
        });
        let rotator = tokio::spawn(async move {
            let now = paygate_domain::now();
            let sa = scope(&*s2, a.id);
            let _ = s2
                .rotate_api_key(
                    &sa,
                    seed.id,
                    new_key(KeyMode::Test, "keys:read", "").0,
                    now + Duration::hours(1),
                    now,
                    &noted("api_key.rotate"),
                )
                .await;
        });
        let revoker = tokio::spawn(async move {
            tokio::task::yield_now().await;
            let sa = scope(&*s3, a.id);
            s3.revoke_all_api_keys(&sa, paygate_domain::now(), &noted("api_key.revoke_all")).await.unwrap();
        });
        revoker.await.unwrap();
        creator.await.unwrap();
        rotator.await.unwrap();
        // Whatever finished after revoke-all is caught by a second one; after it, nothing is live.
        let sa = scope(&*store, a.id);
        store.revoke_all_api_keys(&sa, paygate_domain::now(), &noted("api_key.revoke_all")).await.unwrap();
        let page = store.list_api_keys(&sa, PageRequest { limit: 100, after: None }).await.unwrap();
        assert!(page.items.iter().all(|k| k.revoked_at.is_some()), "round {round}: a key survived");
    }
}

// ---------------------------------------------------------------------------
// Payments

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
        mode: KeyMode::Test,
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

pub async fn payment_batches_isolate_items_and_commit_records(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "A").await;
    let b = company(&*store, "B").await;
    let policy = ApprovalPolicy::default();
    let active = new_payee(KeyMode::Test);
    store
        .create_payee(&scope(&*store, a.id), &active, &entry_for(a.id, "payee.create", Outcome::Success))
        .await
        .unwrap();
    let disabled = new_payee(KeyMode::Test);
    let sa = scope(&*store, a.id);
    store.create_payee(&sa, &disabled, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let at = paygate_domain::now();
    let off = store
        .disable_payee(&sa, KeyMode::Test, disabled.payee.id, at, &entry_for(a.id, "payee.disable", Outcome::Success))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(off.status, PayeeStatus::Disabled);
    let live = new_payee(KeyMode::Live);
    store.create_payee(&sa, &live, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let ok1 = draft_payment(active.payee.id, 100, &policy);
    let items = vec![
        create_item(a.id, &*store, ok1.clone(), "k1"),
        create_item(a.id, &*store, draft_payment(disabled.payee.id, 100, &policy), "k2"),
        // Same key as the first item, in the same batch: the first one's response.
        create_item(a.id, &*store, draft_payment(active.payee.id, 100, &policy), "k1"),
        // Company B cannot pay A's payee, nor a payee of the other mode.
        create_item(b.id, &*store, draft_payment(active.payee.id, 100, &policy), "k1"),
        create_item(a.id, &*store, draft_payment(live.payee.id, 100, &policy), "k3"),
        create_item(a.id, &*store, draft_payment(active.payee.id, 200, &policy), "k4"),
    ];
    let outcomes = store.create_payments(&items).await.unwrap();
    assert_eq!(outcomes[0], PaymentCreated::Created);
    assert_eq!(outcomes[1], PaymentCreated::PayeeDisabled);
    assert!(matches!(&outcomes[2], PaymentCreated::Existing(r) if r.payment_id == ok1.id), "{:?}", outcomes[2]);
    assert_eq!(outcomes[3], PaymentCreated::PayeeNotFound);
    assert_eq!(outcomes[4], PaymentCreated::PayeeNotFound);
    assert_eq!(outcomes[5], PaymentCreated::Created);
    let listed = store
        .list_payments(&sa, KeyMode::Test, &PaymentFilter::default(), PageRequest { limit: 10, after: None })
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);
    let got = store.get_payment(&sa, KeyMode::Test, ok1.id).await.unwrap().unwrap();
    assert_eq!(got, ok1, "a payment reads back as written");
    assert!(store.get_payment(&scope(&*store, b.id), KeyMode::Test, ok1.id).await.unwrap().is_none());
    assert!(store.get_payment(&sa, KeyMode::Live, ok1.id).await.unwrap().is_none());
    assert_eq!(store.idempotent_response(&sa, KeyMode::Test, "k1").await.unwrap().unwrap().payment_id, ok1.id);
    assert!(store.idempotent_response(&scope(&*store, b.id), KeyMode::Test, "k1").await.unwrap().is_none());
    assert!(store.idempotent_response(&sa, KeyMode::Live, "k1").await.unwrap().is_none(), "keys are per mode");
    // Records only for what was created: 3 payee changes + 2 payments on A's chain.
    let records = assert_chain_intact(&*store, &a.id.to_string()).await;
    assert_eq!(records, 6, "3 payees created, 1 disabled, 2 payments");
    // A later batch with a used key replays it.
    let again = store
        .create_payments(&[create_item(a.id, &*store, draft_payment(active.payee.id, 5, &policy), "k4")])
        .await
        .unwrap();
    assert!(matches!(&again[0], PaymentCreated::Existing(_)));
}

pub async fn payment_updates_are_guarded_by_revision(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "A").await;
    let sa = scope(&*store, a.id);
    let payee = new_payee(KeyMode::Test);
    store.create_payee(&sa, &payee, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let p = draft_payment(payee.payee.id, 100, &ApprovalPolicy::default());
    store.create_payments(&[create_item(a.id, &*store, p.clone(), "k")]).await.unwrap();
    let approver =
        |n: u8| paygate_domain::payment::Actor::key(ApiKeyId::generate(), &format!("owner{n}"), ApiKeyId::generate());
    // Two writers read the same revision; only the first write lands.
    let (mut first, mut second) = (p.clone(), p.clone());
    first.approve(approver(1), paygate_domain::now()).unwrap();
    second.cancel(approver(2), paygate_domain::now()).unwrap();
    let audit = || entry_for(a.id, "payment.approve", Outcome::Success);
    assert!(store.update_payment(&sa, &first, p.revision, &audit()).await.unwrap());
    assert!(!store.update_payment(&sa, &second, p.revision, &audit()).await.unwrap(), "stale revision");
    let stored = store.get_payment(&sa, KeyMode::Test, p.id).await.unwrap().unwrap();
    assert_eq!(stored, first);
    // Another company's scope cannot write it, whatever the revision.
    let b = company(&*store, "B").await;
    let mut third = stored.clone();
    third.cancel(approver(3), paygate_domain::now()).unwrap();
    assert!(!store.update_payment(&scope(&*store, b.id), &third, stored.revision, &audit()).await.unwrap());
    assert_eq!(assert_chain_intact(&*store, &a.id.to_string()).await, 3, "payee, payment, one approval");
}

pub async fn due_payments_and_idempotency_purge(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "A").await;
    let sa = scope(&*store, a.id);
    let payee = new_payee(KeyMode::Test);
    store.create_payee(&sa, &payee, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let short = ApprovalPolicy { approval_ttl_seconds: 1, ..ApprovalPolicy::default() };
    let pending = draft_payment(payee.payee.id, 100, &short);
    let auto = draft_payment(payee.payee.id, 100, &ApprovalPolicy::demo());
    assert!(auto.rail_next_at.is_some(), "auto-approved payments are due for settlement");
    store
        .create_payments(&[
            create_item(a.id, &*store, pending.clone(), "p"),
            create_item(a.id, &*store, auto.clone(), "q"),
        ])
        .await
        .unwrap();
    let now = paygate_domain::now();
    let due: Vec<_> = store.due_payments(now, 100).await.unwrap().into_iter().map(|(c, p)| (c, p.id)).collect();
    assert_eq!(due, vec![(a.id, auto.id)]);
    let later = now + Duration::seconds(2);
    let due: Vec<_> = store.due_payments(later, 100).await.unwrap().into_iter().map(|(_, p)| p.id).collect();
    assert_eq!(due, vec![pending.id, auto.id]);
    assert_eq!(store.purge_idempotency(now).await.unwrap(), 0);
    assert_eq!(store.purge_idempotency(now + Duration::hours(25)).await.unwrap(), 2);
    assert!(store.idempotent_response(&sa, KeyMode::Test, "p").await.unwrap().is_none());
}

// ---------------------------------------------------------------------------
// Events and webhooks

const ALL: PageRequest<EventId> = PageRequest { limit: 100, after: None };

/// (type, sequence, previous status) of an event, for comparing trails.
type Step = (&'static str, u64, Option<String>);

fn step(kind: &'static str, sequence: u64, previous: Option<&str>) -> Step {
    (kind, sequence, previous.map(str::to_owned))
}

/// The object's events, oldest first.
async fn events_of(store: &dyn OperatorStore, scope: &CompanyScope, mode: KeyMode, object: &str) -> Vec<Event> {
    let filter = EventFilter { object_id: Some(object.to_owned()), ..EventFilter::default() };
    let mut events = store.list_events(scope, mode, &filter, ALL).await.unwrap().items;
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
    assert!(store.create_webhook_endpoint(&scope(store, company), &new, &audit).await.unwrap());
    endpoint
}

async fn deliveries(
    store: &dyn OperatorStore,
    company: CompanyId,
    mode: KeyMode,
    endpoint: WebhookEndpointId,
) -> Vec<Delivery> {
    store
        .list_deliveries(&scope(store, company), mode, endpoint, PageRequest { limit: 100, after: None })
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
    store.send_test_event(&scope(store, company), KeyMode::Test, endpoint, &audit).await.unwrap().unwrap()
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

pub async fn every_change_writes_its_events(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let now = paygate_domain::now();

    // A key: created, rotated, revoked; revoking again tells nobody.
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let (next, _) = new_key(test, "keys:read", "");
    let Rotation::Rotated { new: successor, .. } =
        store.rotate_api_key(&sa, key.id, next, now + Duration::hours(1), now, &noted("api_key.rotate")).await.unwrap()
    else {
        panic!("rotation refused")
    };
    store.revoke_api_key(&sa, key.id, now, &noted("api_key.revoke")).await.unwrap().unwrap();
    store.revoke_api_key_by_id(key.id, now, &noted("api_key.revoke")).await.unwrap().unwrap();
    let key_trail = vec![
        step("api_key.created", 1, None),
        step("api_key.rotated", 2, None),
        step("api_key.revoked", 3, Some("active")),
    ];
    assert_eq!(trail(&*store, &sa, test, &key.id.to_string()).await, key_trail);
    // Revoke-all: one event per key it revoked, none for the key already revoked.
    assert_eq!(store.revoke_all_api_keys(&sa, now, &noted("api_key.revoke_all")).await.unwrap(), 1);
    assert_eq!(
        trail(&*store, &sa, test, &successor.id.to_string()).await,
        vec![step("api_key.created", 1, None), step("api_key.revoked", 2, Some("active"))]
    );
    assert_eq!(trail(&*store, &sa, test, &key.id.to_string()).await, key_trail);

    // A payee: created, disabled; disabling again tells nobody.
    let payee = payee_in(&*store, a.id).await;
    for _ in 0..2 {
        let audit = entry_for(a.id, "payee.disable", Outcome::Success);
        store.disable_payee(&sa, test, payee.payee.id, now, &audit).await.unwrap().unwrap();
    }
    assert_eq!(
        trail(&*store, &sa, test, &payee.payee.id.to_string()).await,
        vec![step("payee.created", 1, None), step("payee.disabled", 2, Some("active"))]
    );

    // The approval policy, per mode.
    let two = ApprovalPolicy {
        rules: [(
            "EUR".to_owned(),
            paygate_domain::payment::ApprovalRule { one_approval_from: 0, two_approvals_from: Some(0) },
        )]
        .into_iter()
        .collect(),
        ..ApprovalPolicy::default()
    };
    for policy in [&ApprovalPolicy::default(), &two, &two] {
        let audit = entry_for(a.id, "approval_policy.update", Outcome::Success);
        store.set_approval_policy(&sa, test, policy, &audit).await.unwrap();
    }
    // Setting the same policy again tells nobody.
    let updated = vec![step("approval_policy.updated", 1, None), step("approval_policy.updated", 2, None)];
    assert_eq!(trail(&*store, &sa, test, "approval_policy_test").await, updated);

    // A payment through its life: each status change is named after the new status.
    let active = payee_in(&*store, a.id).await;
    let mut p = draft_payment(active.payee.id, 100, &ApprovalPolicy::default());
    store.create_payments(&[create_item(a.id, &*store, p.clone(), "life")]).await.unwrap();
    let audit = || entry_for(a.id, "payment.approve", Outcome::Success);
    let stale = p.clone();
    let revision = p.revision;
    p.approve(approver(1), paygate_domain::now()).unwrap();
    assert!(store.update_payment(&sa, &p, revision, &audit()).await.unwrap());
    let mut lost = stale.clone();
    lost.cancel(approver(2), paygate_domain::now()).unwrap();
    assert!(!store.update_payment(&sa, &lost, stale.revision, &audit()).await.unwrap(), "a refused write tells nobody");
    use paygate_domain::payment::SettlementStep;
    for settlement in [SettlementStep::Submitted, SettlementStep::Completed] {
        let revision = p.revision;
        p.settle(settlement, "test", paygate_domain::now()).unwrap();
        assert!(store.update_payment(&sa, &p, revision, &audit()).await.unwrap());
    }
    // A worker only rescheduling its next look changes nothing a reader sees: no event.
    let revision = p.revision;
    p.revision += 1;
    p.rail_next_at = Some(paygate_domain::now() + Duration::minutes(1));
    assert!(store.update_payment(&sa, &p, revision, &audit()).await.unwrap());
    assert_eq!(
        trail(&*store, &sa, test, &p.id.to_string()).await,
        vec![
            step("payment.created", 1, None),
            step("payment.approved", 2, Some("pending_approval")),
            step("payment.processing", 3, Some("approved")),
            step("payment.completed", 4, Some("processing")),
        ]
    );
    // A change that keeps the status is an update; an approval at creation is still a creation.
    let mut two_eyes = draft_payment(active.payee.id, 100, &two);
    let auto = draft_payment(active.payee.id, 100, &ApprovalPolicy::demo());
    store
        .create_payments(&[
            create_item(a.id, &*store, two_eyes.clone(), "two"),
            create_item(a.id, &*store, auto.clone(), "auto"),
        ])
        .await
        .unwrap();
    let revision = two_eyes.revision;
    two_eyes.approve(approver(3), paygate_domain::now()).unwrap();
    assert!(store.update_payment(&sa, &two_eyes, revision, &audit()).await.unwrap());
    assert_eq!(
        trail(&*store, &sa, test, &two_eyes.id.to_string()).await,
        vec![step("payment.created", 1, None), step("payment.updated", 2, Some("pending_approval"))]
    );
    assert_eq!(trail(&*store, &sa, test, &auto.id.to_string()).await, vec![step("payment.created", 1, None)]);
    let created = events_of(&*store, &sa, test, &auto.id.to_string()).await;
    let snapshot: serde_json::Value = serde_json::from_str(&created[0].object).unwrap();
    assert_eq!(snapshot["status"], "approved", "the snapshot is the object right after the change");

    // Reads: newest first, filtered, paged, and only in the company and mode they belong to.
    let all = store.list_events(&sa, test, &EventFilter::default(), ALL).await.unwrap().items;
    assert_eq!(all.len(), 3 + 2 + 2 + 2 + 4 + 2 + 1 + 1);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(all.iter().all(|e| e.company_id == a.id && e.mode == test));
    let first = store.list_events(&sa, test, &EventFilter::default(), PageRequest { limit: 5, after: None }).await;
    let first = first.unwrap();
    assert!(first.has_more);
    let rest = PageRequest { limit: 100, after: first.items.last().map(|e| e.id) };
    let rest = store.list_events(&sa, test, &EventFilter::default(), rest).await.unwrap();
    assert_eq!([first.items, rest.items].concat(), all);
    let disabled = EventFilter { kind: Some(EventType::PayeeDisabled), ..EventFilter::default() };
    let payees_only =
        EventFilter { types: Some(vec![EventType::PayeeCreated, EventType::PayeeDisabled]), ..EventFilter::default() };
    let readable = store.list_events(&sa, test, &payees_only, ALL).await.unwrap().items;
    assert_eq!(readable.len(), 3, "two payees created, one disabled");
    assert!(readable.iter().all(|e| e.kind.object_type() == "payee"));
    assert_eq!(store.list_events(&sa, test, &disabled, ALL).await.unwrap().items.len(), 1);
    assert!(store.list_events(&sb, test, &EventFilter::default(), ALL).await.unwrap().items.is_empty());
    assert!(store.list_events(&sa, KeyMode::Live, &EventFilter::default(), ALL).await.unwrap().items.is_empty());
    for event in &all {
        assert_eq!(store.get_event(&sa, test, event.id).await.unwrap().as_ref(), Some(event));
        assert_eq!(store.get_event(&sb, test, event.id).await.unwrap(), None, "another company's event");
        assert_eq!(store.get_event(&sa, KeyMode::Live, event.id).await.unwrap(), None, "the other mode's event");
        let json: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(json["id"], event.id.to_string());
    }
    assert_eq!(store.get_event(&sa, test, EventId::generate()).await.unwrap(), None);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn events_fan_out_to_subscribed_enabled_endpoints(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let payees = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let payments = endpoint(&*store, a.id, test, &["payment.created"], true).await;
    let off = endpoint(&*store, a.id, test, &["*"], false).await;
    let live = endpoint(&*store, a.id, KeyMode::Live, &["*"], true).await;
    let other = endpoint(&*store, b.id, test, &["*"], true).await;
    let payee = payee_in(&*store, a.id).await;

    let got = deliveries(&*store, a.id, test, payees.id).await;
    assert_eq!(got.len(), 1);
    let event = &events_of(&*store, &sa, test, &payee.payee.id.to_string()).await[0];
    assert_eq!(
        (got[0].event_id, got[0].event_type, got[0].status),
        (event.id, EventType::PayeeCreated, DeliveryStatus::Pending)
    );
    assert_eq!(got[0].endpoint_id, payees.id);
    assert!(got[0].attempts.is_empty());
    assert!(got[0].next_attempt_at.is_some(), "due at once");
    assert!(deliveries(&*store, a.id, test, payments.id).await.is_empty(), "not subscribed");
    assert!(deliveries(&*store, a.id, test, off.id).await.is_empty(), "disabled");
    assert!(deliveries(&*store, a.id, KeyMode::Live, live.id).await.is_empty(), "the other mode");
    assert!(deliveries(&*store, b.id, test, other.id).await.is_empty(), "another company");

    // Endpoints and their deliveries exist only in their company and mode.
    let page = PageRequest { limit: 100, after: None };
    assert!(store.list_deliveries(&sb, test, payees.id, page).await.unwrap().is_none());
    assert!(store.list_deliveries(&sa, KeyMode::Live, payees.id, page).await.unwrap().is_none());
    assert!(store.get_webhook_endpoint(&sb, test, payees.id).await.unwrap().is_none());
    assert!(store.get_webhook_endpoint(&sa, KeyMode::Live, payees.id).await.unwrap().is_none());
    assert_eq!(store.get_webhook_endpoint(&sa, test, payees.id).await.unwrap(), Some(payees.clone()));
    let listed = store.list_webhook_endpoints(&sa, test, PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(listed.items.iter().map(|e| e.id).collect::<Vec<_>>(), vec![off.id, payments.id, payees.id]);

    // Disabled by the company: no new deliveries, and the pending one waits.
    let patch = EndpointPatch { enabled: Some(false), ..EndpointPatch::default() };
    let audit = entry_for(a.id, "webhook_endpoint.update", Outcome::Success);
    let patched = store.update_webhook_endpoint(&sa, test, payees.id, &patch, &audit).await.unwrap().unwrap();
    assert!(!patched.enabled);
    assert_eq!(patched.disabled_reason, None, "disabled by the company, not by Paygate");
    payee_in(&*store, a.id).await;
    assert_eq!(deliveries(&*store, a.id, test, payees.id).await.len(), 1);
    let other_deliveries = claim(&*store, paygate_domain::now(), "node").await;
    assert_eq!(
        other_deliveries.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(),
        vec![],
        "nothing due to an enabled endpoint"
    );
}

pub async fn claims_lease_due_deliveries_in_object_order(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let test = KeyMode::Test;
    let hook = endpoint(&*store, a.id, test, &["payee.created", "payee.disabled"], true).await;
    let payee = payee_in(&*store, a.id).await;
    let audit = entry_for(a.id, "payee.disable", Outcome::Success);
    store.disable_payee(&sa, test, payee.payee.id, paygate_domain::now(), &audit).await.unwrap();
    let events = events_of(&*store, &sa, test, &payee.payee.id.to_string()).await;
    let long_ago = paygate_domain::now() - Duration::days(1);

    let t = paygate_domain::now();
    let first = claim(&*store, t, "node-a").await;
    assert_eq!(first.len(), 1, "the second event of the payee waits for the first");
    let job = &first[0];
    assert_eq!((job.endpoint_id, job.attempt, job.url.as_str()), (hook.id, 1, hook.url.as_str()));
    assert_eq!(job.event, events[0]);
    assert_eq!(job.event.sequence, 1);
    assert_eq!(job.secret_sealed, b"secret-1");
    assert_eq!(job.previous_secret_sealed, None);
    assert!(claim(&*store, t, "node-b").await.is_empty(), "leased, and the next event waits behind it");

    // Once the lease has passed another node takes the delivery over; the
    // first node's result is then refused and writes nothing.
    let later = t + Duration::seconds(31);
    let taken = claim(&*store, later, "node-b").await;
    assert_eq!(taken.iter().map(|j| (j.delivery_id, j.attempt)).collect::<Vec<_>>(), vec![(job.delivery_id, 1)]);
    let stale = outcome(job, "node-a", later, 200, NextStep::Succeeded, long_ago);
    assert!(!finish(&*store, a.id, &stale).await, "a lease that is no longer ours");
    assert!(deliveries(&*store, a.id, test, hook.id).await.iter().all(|d| d.attempts.is_empty()));
    let done = outcome(job, "node-b", later, 200, NextStep::Succeeded, long_ago);
    assert!(finish(&*store, a.id, &done).await);
    assert!(!finish(&*store, a.id, &done).await, "a finished delivery is not finished again");

    // The next event of the object is due now; a retry waits for its time.
    let second = claim(&*store, later, "node-a").await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].event, events[1]);
    let retry_at = later + Duration::hours(1);
    assert!(
        finish(&*store, a.id, &outcome(&second[0], "node-a", later, 503, NextStep::RetryAt(retry_at), long_ago)).await
    );
    assert!(claim(&*store, later + Duration::minutes(59), "node-a").await.is_empty());
    let retry = claim(&*store, retry_at, "node-b").await;
    assert_eq!(retry.iter().map(|j| (j.delivery_id, j.attempt)).collect::<Vec<_>>(), vec![(second[0].delivery_id, 2)]);
    assert!(finish(&*store, a.id, &outcome(&retry[0], "node-b", retry_at, 500, NextStep::GiveUp, long_ago)).await);
    assert!(claim(&*store, retry_at + Duration::days(1), "node-b").await.is_empty(), "nothing left");

    let listed = deliveries(&*store, a.id, test, hook.id).await;
    assert_eq!(
        listed.iter().map(|d| d.status).collect::<Vec<_>>(),
        vec![DeliveryStatus::Failed, DeliveryStatus::Succeeded]
    );
    assert_eq!(listed[0].next_attempt_at, None);
    let codes = |d: &Delivery| d.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>();
    assert_eq!(codes(&listed[0]), vec![Some(503), Some(500)], "oldest attempt first");
    assert_eq!(codes(&listed[1]), vec![Some(200)]);
    assert_eq!(listed[0].attempts[0].error.as_deref(), Some("http_status: 503"));
    assert_eq!(listed[0].attempts[0].attempted_at, later);
    assert_eq!(listed[0].attempts[0].latency_ms, 12);
    assert_eq!(listed[1].attempts[0].error, None);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn failing_and_gone_endpoints_are_disabled(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let test = KeyMode::Test;
    // Subscribed to payee.created only, so no endpoint receives another's disablement.
    let gone = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let failing = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let flaky = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let get = |id| {
        let store = store.clone();
        async move { store.get_webhook_endpoint(&sa, test, id).await.unwrap().unwrap() }
    };

    // 410: disabled at once, with its event and its record.
    ping(&*store, a.id, gone.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![gone.id]);
    let mut result = outcome(&jobs[0], "node", t, 410, NextStep::GiveUp, t - Duration::days(1));
    result.disable = Some("gone");
    let disable_audit = entry_for(a.id, "webhook_endpoint.disable", Outcome::Success);
    let audit = entry_for(a.id, "webhook.deliver", Outcome::Success);
    assert!(store.finish_delivery(&result, &audit, &disable_audit).await.unwrap());
    let e = get(gone.id).await;
    assert_eq!((e.enabled, e.disabled_reason.as_deref()), (false, Some("gone")));
    assert_eq!(
        trail(&*store, &sa, test, &gone.id.to_string()).await,
        vec![step("ping", 1, None), step("webhook_endpoint.disabled", 2, Some("enabled"))]
    );
    let disabled = &events_of(&*store, &sa, test, &gone.id.to_string()).await[1];
    let snapshot: serde_json::Value = serde_json::from_str(&disabled.object).unwrap();
    assert_eq!(snapshot["id"], gone.id.to_string());
    assert!(store.get_audit(&sa, audit.id).await.unwrap().is_some());
    assert!(store.get_audit(&sa, disable_audit.id).await.unwrap().is_some());
    assert_eq!(deliveries(&*store, a.id, test, gone.id).await[0].status, DeliveryStatus::Failed);
    // A disabled endpoint's deliveries wait.
    ping(&*store, a.id, gone.id).await;
    assert!(claim(&*store, paygate_domain::now(), "node").await.is_empty());

    // Failing: the first failure starts the clock; a failure after the threshold disables.
    ping(&*store, a.id, failing.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![failing.id]);
    let retry_at = t + Duration::hours(1);
    let first = outcome(&jobs[0], "node", t, 500, NextStep::RetryAt(retry_at), t - Duration::hours(1));
    assert!(finish(&*store, a.id, &first).await);
    let e = get(failing.id).await;
    assert_eq!((e.enabled, e.failing_since), (true, Some(t)));
    let jobs = claim(&*store, retry_at, "node").await;
    assert_eq!(jobs.iter().map(|j| (j.endpoint_id, j.attempt)).collect::<Vec<_>>(), vec![(failing.id, 2)]);
    let second = outcome(
        &jobs[0],
        "node",
        retry_at,
        500,
        NextStep::RetryAt(retry_at + Duration::hours(1)),
        t + Duration::minutes(30),
    );
    assert!(finish(&*store, a.id, &second).await);
    let e = get(failing.id).await;
    assert_eq!((e.enabled, e.disabled_reason.as_deref()), (false, Some("failing")));
    assert_eq!(trail(&*store, &sa, test, &failing.id.to_string()).await.last().unwrap().0, "webhook_endpoint.disabled");

    // Flaky: a success clears the failure state.
    ping(&*store, a.id, flaky.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![flaky.id]);
    let retry_at = t + Duration::hours(1);
    assert!(
        finish(&*store, a.id, &outcome(&jobs[0], "node", t, 502, NextStep::RetryAt(retry_at), t - Duration::hours(1)))
            .await
    );
    assert_eq!(get(flaky.id).await.failing_since, Some(t));
    let jobs = claim(&*store, retry_at, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![flaky.id]);
    assert!(finish(&*store, a.id, &outcome(&jobs[0], "node", retry_at, 204, NextStep::Succeeded, retry_at)).await);
    let e = get(flaky.id).await;
    assert_eq!((e.enabled, e.failing_since), (true, None));
    assert_eq!(trail(&*store, &sa, test, &flaky.id.to_string()).await, vec![step("ping", 1, None)]);

    // The company enables a disabled endpoint again: its failure state is gone.
    let patch = EndpointPatch { enabled: Some(true), ..EndpointPatch::default() };
    let audit = entry_for(a.id, "webhook_endpoint.update", Outcome::Success);
    let e = store.update_webhook_endpoint(&sa, test, failing.id, &patch, &audit).await.unwrap().unwrap();
    assert_eq!((e.enabled, e.disabled_reason.as_deref(), e.failing_since), (true, None, None));
    assert_eq!(get(failing.id).await, e);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn secret_rotation_signs_with_both_until_the_overlap_ends(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let sa = scope(&*store, a.id);
    let test = KeyMode::Test;
    let hook = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let overlap = paygate_domain::now() + Duration::hours(1);
    let audit = || entry_for(a.id, "webhook_endpoint.rotate_secret", Outcome::Success);
    let rotated = store.rotate_webhook_secret(&sa, test, hook.id, b"secret-2", overlap, &audit()).await.unwrap();
    let rotated = rotated.unwrap();
    assert_eq!(rotated.previous_secret_expires_at, Some(overlap));
    assert_eq!(store.get_webhook_endpoint(&sa, test, hook.id).await.unwrap(), Some(rotated));
    let sb = scope(&*store, b.id);
    assert!(store.rotate_webhook_secret(&sb, test, hook.id, b"x", overlap, &audit()).await.unwrap().is_none());
    assert!(store.rotate_webhook_secret(&sa, KeyMode::Live, hook.id, b"x", overlap, &audit()).await.unwrap().is_none());

    ping(&*store, a.id, hook.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].secret_sealed, b"secret-2");
    assert_eq!(jobs[0].previous_secret_sealed.as_deref(), Some(&b"secret-1"[..]));
    // After the overlap (and the lease) the previous secret no longer signs.
    let jobs = claim(&*store, overlap + Duration::seconds(1), "node").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].secret_sealed, b"secret-2");
    assert_eq!(jobs[0].previous_secret_sealed, None);
}

pub async fn redelivery_and_test_events(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let all = endpoint(&*store, a.id, test, &["*"], true).await;
    let payees = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let payments = endpoint(&*store, a.id, test, &["payment.created"], true).await;
    let payee = payee_in(&*store, a.id).await;
    let event = events_of(&*store, &sa, test, &payee.payee.id.to_string()).await.remove(0);
    let audit = || entry_for(a.id, "event.redeliver", Outcome::Success);

    assert_eq!(store.redeliver_event(&sa, test, event.id, None, &audit()).await.unwrap(), Some(2));
    assert_eq!(deliveries(&*store, a.id, test, all.id).await.len(), 2);
    assert_eq!(deliveries(&*store, a.id, test, payees.id).await.len(), 2);
    assert!(deliveries(&*store, a.id, test, payments.id).await.is_empty());
    // Named, an endpoint gets it whatever it subscribes to.
    assert_eq!(store.redeliver_event(&sa, test, event.id, Some(payments.id), &audit()).await.unwrap(), Some(1));
    let got = deliveries(&*store, a.id, test, payments.id).await;
    assert_eq!((got.len(), got[0].event_id), (1, event.id));
    assert_eq!(store.redeliver_event(&sa, test, EventId::generate(), None, &audit()).await.unwrap(), None);
    let unknown = Some(WebhookEndpointId::generate());
    assert_eq!(store.redeliver_event(&sa, test, event.id, unknown, &audit()).await.unwrap(), None);
    assert_eq!(store.redeliver_event(&sb, test, event.id, None, &audit()).await.unwrap(), None);
    assert_eq!(store.redeliver_event(&sa, KeyMode::Live, event.id, None, &audit()).await.unwrap(), None);
    let other = endpoint(&*store, b.id, test, &["*"], true).await;
    assert_eq!(store.redeliver_event(&sa, test, event.id, Some(other.id), &audit()).await.unwrap(), None);

    // A ping is delivered to its endpoint only.
    let pinged = ping(&*store, a.id, payees.id).await;
    assert_eq!((pinged.kind, pinged.object_id.clone(), pinged.sequence), (EventType::Ping, payees.id.to_string(), 1));
    assert_eq!(store.get_event(&sa, test, pinged.id).await.unwrap(), Some(pinged.clone()));
    let got = deliveries(&*store, a.id, test, payees.id).await;
    assert_eq!((got.len(), got[0].event_id, got[0].event_type), (3, pinged.id, EventType::Ping));
    assert_eq!(deliveries(&*store, a.id, test, all.id).await.len(), 2, "nobody else hears a ping");
    let test_audit = || entry_for(a.id, "webhook_endpoint.test", Outcome::Success);
    assert!(store.send_test_event(&sb, test, payees.id, &test_audit()).await.unwrap().is_none());
    assert!(store.send_test_event(&sa, test, WebhookEndpointId::generate(), &test_audit()).await.unwrap().is_none());

    // Concurrent pings of one endpoint each get their own number.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { ping(&*store, a.id, payees.id).await.sequence }));
    }
    let mut numbers = Vec::new();
    for t in tasks {
        numbers.push(t.await.unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (2..=9).collect::<Vec<u64>>());
    assert_eq!(deliveries(&*store, a.id, test, payees.id).await.len(), 11);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn expiring_keys_are_noticed_once(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let now = paygate_domain::now();
    let soon = issue(&*store, a.id, "keys:read", Some(now + Duration::days(1))).await.key;
    issue(&*store, a.id, "keys:read", Some(now + Duration::days(10))).await;
    issue(&*store, a.id, "keys:read", None).await;
    issue(&*store, a.id, "keys:read", Some(now - Duration::minutes(1))).await;
    let revoked = issue(&*store, a.id, "keys:read", Some(now + Duration::days(1))).await.key;
    store.revoke_api_key(&sa, revoked.id, now, &noted("api_key.revoke")).await.unwrap();
    let rotated = issue(&*store, a.id, "keys:read", Some(now + Duration::days(1))).await.key;
    let (next, _) = new_key(KeyMode::Test, "keys:read", "");
    let grace = now + Duration::hours(1);
    store.rotate_api_key(&sa, rotated.id, next, grace, now, &noted("api_key.rotate")).await.unwrap();

    let until = now + Duration::days(2);
    let due = store.expiring_keys(now, until, 100).await.unwrap();
    assert_eq!(due.iter().map(|k| k.id).collect::<Vec<_>>(), vec![soon.id], "unrevoked, unrotated, in the window");
    let first = entry_for(a.id, "api_key.expiry_notice", Outcome::Success);
    assert!(store.note_key_expiring(soon.id, &first).await.unwrap());
    let second = entry_for(a.id, "api_key.expiry_notice", Outcome::Success);
    assert!(!store.note_key_expiring(soon.id, &second).await.unwrap(), "noticed once");
    assert!(!store.note_key_expiring(ApiKeyId::generate(), &second).await.unwrap());
    assert!(store.expiring_keys(now, until, 100).await.unwrap().is_empty());
    assert_eq!(
        trail(&*store, &sa, KeyMode::Test, &soon.id.to_string()).await,
        vec![step("api_key.created", 1, None), step("api_key.expiring", 2, None)]
    );
    assert!(store.get_audit(&sa, first.id).await.unwrap().is_some());
    assert!(store.get_audit(&sa, second.id).await.unwrap().is_none(), "nothing happened, nothing recorded");
}

pub async fn endpoint_limit_updates_and_cascading_delete(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let mut ids = Vec::new();
    for _ in 0..MAX_ENDPOINTS {
        ids.push(endpoint(&*store, a.id, test, &["*"], true).await.id);
    }
    let now = paygate_domain::now();
    let one_more = NewWebhookEndpoint {
        endpoint: WebhookEndpoint {
            id: WebhookEndpointId::generate(),
            company_id: a.id,
            mode: test,
            url: "https://hooks.example.com/17".into(),
            description: None,
            event_types: EventTypes::All,
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            previous_secret_expires_at: None,
            created_at: now,
            updated_at: now,
        },
        secret_sealed: b"secret".to_vec(),
    };
    let audit = || entry_for(a.id, "webhook_endpoint.create", Outcome::Success);
    let refused = audit();
    assert!(!store.create_webhook_endpoint(&sa, &one_more, &refused).await.unwrap(), "at most {MAX_ENDPOINTS}");
    assert!(store.get_audit(&sa, refused.id).await.unwrap().is_none());
    assert!(store.get_webhook_endpoint(&sa, test, one_more.endpoint.id).await.unwrap().is_none());
    // The limit is per company and mode.
    endpoint(&*store, a.id, KeyMode::Live, &["*"], true).await;
    endpoint(&*store, b.id, test, &["*"], true).await;
    let first = store.list_webhook_endpoints(&sa, test, PageRequest { limit: 10, after: None }).await.unwrap();
    assert!(first.has_more);
    let after = first.items.last().map(|e| e.id);
    let rest = store.list_webhook_endpoints(&sa, test, PageRequest { limit: 10, after }).await.unwrap();
    assert!(!rest.has_more);
    let mut listed: Vec<_> = [first.items, rest.items].concat().into_iter().map(|e| e.id).collect();
    listed.reverse();
    assert_eq!(listed, ids, "newest first");

    // Updates replace the fields they carry.
    let patch = EndpointPatch {
        url: Some("https://hooks.example.com/v2".into()),
        description: Some(None),
        event_types: Some(event_types(&["payment.approved"])),
        enabled: None,
    };
    let update = || entry_for(a.id, "webhook_endpoint.update", Outcome::Success);
    let patched = store.update_webhook_endpoint(&sa, test, ids[1], &patch, &update()).await.unwrap().unwrap();
    assert_eq!((patched.url.as_str(), patched.description.as_deref()), ("https://hooks.example.com/v2", None));
    assert_eq!(patched.event_types, event_types(&["payment.approved"]));
    assert_eq!(store.get_webhook_endpoint(&sa, test, ids[1]).await.unwrap(), Some(patched));
    assert!(store.update_webhook_endpoint(&sb, test, ids[1], &patch, &update()).await.unwrap().is_none());
    let unknown = WebhookEndpointId::generate();
    assert!(store.update_webhook_endpoint(&sa, test, unknown, &patch, &update()).await.unwrap().is_none());

    // Deleting an endpoint deletes its deliveries and their attempts.
    payee_in(&*store, a.id).await;
    assert_eq!(deliveries(&*store, a.id, test, ids[0]).await.len(), 1);
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.len(), MAX_ENDPOINTS as usize - 1, "every endpoint but the one that unsubscribed");
    let job = jobs.iter().find(|j| j.endpoint_id == ids[0]).unwrap();
    assert!(finish(&*store, a.id, &outcome(job, "node", t, 500, NextStep::RetryAt(t), t - Duration::days(1))).await);
    let delete = || entry_for(a.id, "webhook_endpoint.delete", Outcome::Success);
    assert!(!store.delete_webhook_endpoint(&sb, test, ids[0], &delete()).await.unwrap());
    assert!(!store.delete_webhook_endpoint(&sa, KeyMode::Live, ids[0], &delete()).await.unwrap());
    assert!(store.delete_webhook_endpoint(&sa, test, ids[0], &delete()).await.unwrap());
    assert!(!store.delete_webhook_endpoint(&sa, test, ids[0], &delete()).await.unwrap(), "already gone");
    assert!(store.get_webhook_endpoint(&sa, test, ids[0]).await.unwrap().is_none());
    let page = PageRequest { limit: 100, after: None };
    assert!(store.list_deliveries(&sa, test, ids[0], page).await.unwrap().is_none());
    assert!(claim(&*store, t + Duration::minutes(1), "node").await.iter().all(|j| j.endpoint_id != ids[0]));
    // Room for one again.
    assert!(store.create_webhook_endpoint(&sa, &one_more, &audit()).await.unwrap());
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn concurrent_payment_updates_write_one_event(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let payee = payee_in(&*store, a.id).await;
    let p = draft_payment(payee.payee.id, 100, &ApprovalPolicy::default());
    store.create_payments(&[create_item(a.id, &*store, p.clone(), "race")]).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        let mut mine = p.clone();
        tasks.push(tokio::spawn(async move {
            if n % 2 == 0 {
                mine.approve(approver(n), paygate_domain::now()).unwrap();
            } else {
                mine.cancel(approver(n), paygate_domain::now()).unwrap();
            }
            let audit = entry_for(a.id, "payment.approve", Outcome::Success);
            let sa = scope(&*store, a.id);
            store.update_payment(&sa, &mine, p.revision, &audit).await.unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap() as usize;
    }
    assert_eq!(won, 1, "one writer per revision");
    let steps = trail(&*store, &sa, KeyMode::Test, &p.id.to_string()).await;
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0], step("payment.created", 1, None));
    assert!(["payment.approved", "payment.canceled"].contains(&steps[1].0));
    assert_eq!((steps[1].1, steps[1].2.as_deref()), (2, Some("pending_approval")));
    assert_eq!(assert_chain_intact(&*store, &a.id.to_string()).await, 3, "payee, payment, one change");
}

pub async fn concurrent_claims_never_share_a_delivery(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    const ENDPOINTS: usize = 10;
    const PAYEES: usize = 10;
    for _ in 0..ENDPOINTS {
        endpoint(&*store, a.id, KeyMode::Test, &["payee.created"], true).await;
    }
    for _ in 0..PAYEES {
        payee_in(&*store, a.id).await;
    }
    let at = paygate_domain::now();
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("node-{n}");
            let mut mine = Vec::new();
            // Bounded: a store that hands out leased deliveries again must fail, not spin.
            for _ in 0..ENDPOINTS * PAYEES {
                let jobs = store.claim_deliveries(at, &owner, at + Duration::minutes(1), 3).await.unwrap();
                if jobs.is_empty() {
                    break;
                }
                mine.extend(jobs.into_iter().map(|j| (j.delivery_id, j.endpoint_id)));
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let total = claimed.len();
    let mut ids: Vec<_> = claimed.iter().map(|(d, _)| *d).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "a delivery was leased twice");
    // Each endpoint's share: at most MAX_IN_FLIGHT_PER_ENDPOINT leased at once.
    let mut per_endpoint = std::collections::HashMap::new();
    for (_, e) in &claimed {
        *per_endpoint.entry(*e).or_insert(0u32) += 1;
    }
    assert_eq!(per_endpoint.len(), ENDPOINTS);
    assert!(per_endpoint.values().all(|n| *n <= crate::MAX_IN_FLIGHT_PER_ENDPOINT), "{per_endpoint:?}");
    assert_eq!(total, ENDPOINTS * crate::MAX_IN_FLIGHT_PER_ENDPOINT as usize);
    assert!(store.claim_deliveries(at, "late", at + Duration::minutes(1), 100).await.unwrap().is_empty());
    // Once the leases pass, the rest is handed out.
    let later = at + Duration::minutes(2);
    assert!(!store.claim_deliveries(later, "late", later + Duration::minutes(1), 100).await.unwrap().is_empty());
}
