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
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditEntry, AuditRecord, Outcome};
use paygate_domain::payment::{ApprovalPolicy, Payment};
use paygate_domain::{PayeeId, PaymentId};

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

fn entry_for(company: CompanyId, action: &'static str, outcome: Outcome) -> AuditEntry {
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

fn new_payee(mode: KeyMode) -> NewPayee {
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

fn draft_payment(payee: PayeeId, amount: u64, policy: &ApprovalPolicy) -> Payment {
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

fn create_item(company: CompanyId, store: &dyn OperatorStore, payment: Payment, key: &str) -> PaymentCreate {
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
