//! Storage for Paygate: the traits both backends implement, the rows they return,
//! [`CompanyScope`] (the only way to reach company data), the key
//! [`auth::Authenticator`], and the conformance suite both backends must pass.
//!
//! The capabilities are small traits, one per resource ([`AuthStore`],
//! [`KeyStore`], [`AuditStore`], [`PayeeStore`], [`PaymentStore`],
//! [`EventStore`]), gathered in two:
//! - [`Store`] is what the HTTP API holds. Every method that touches company data
//!   takes a [`CompanyScope`] (company and mode), and only authentication creates one.
//! - [`OperatorStore`] adds platform-wide operations (companies, key issuance and
//!   revocation by id) for the CLI. The API never holds one.
//!
//! Both backends implement them once, in `paygate-store-sql`.

pub mod auth;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod events;
mod payments;
mod rows;
mod scope;
pub mod views;

use async_trait::async_trait;
use paygate_domain::audit::{AuditEntry, AuditRecord};
use paygate_domain::payment::{ApprovalPolicy, Payment};
use paygate_domain::{
    ApiKeyId, AuditEventId, CompanyId, CompanyStatus, EventId, KeyPolicy, PayeeId, PaymentId, RateLimitOverride,
    WebhookDeliveryId, WebhookEndpointId,
};
use time::OffsetDateTime;

/// The store traits, for calling store methods on `dyn Store` / `dyn OperatorStore`.
pub mod prelude {
    pub use crate::{AuditStore, AuthStore, EventStore, KeyStore, OperatorStore, PayeeStore, PaymentStore, Store};
}

pub use events::*;
pub use payments::*;
pub use rows::*;
pub use scope::{CompanyScope, operator_scope};

/// The underlying cause of a [`StoreError`], kept for logs and `source()`.
pub type StoreSource = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation for a transient
    /// reason (pool timeout, connection lost, busy beyond the timeout).
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] StoreSource),
    /// The referenced parent object does not exist (e.g. a key for a missing company).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A uniqueness rule was violated.
    #[error("conflict: {0}")]
    Conflict(#[source] StoreSource),
    /// Stored data that cannot be decoded, or any other bug-level failure.
    #[error("storage error: {0}")]
    Internal(#[source] StoreSource),
}

impl StoreError {
    /// Stored data that does not decode: `what` names the value.
    pub fn corrupt(what: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("stored {what} is invalid: {e}").into())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Everything the HTTP API may do, as one object. Company data is reachable
/// only through a [`CompanyScope`]. The methods live in the per-resource
/// traits; `use paygate_store::prelude::*` brings them into scope.
#[async_trait]
pub trait Store: AuthStore + KeyStore + AuditStore + PayeeStore + PaymentStore + EventStore {
    fn backend(&self) -> Backend;

    /// Cheap round trip, for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;
}

/// What [`auth::Authenticator`] reads and writes: the only store methods that
/// run before a [`CompanyScope`] exists.
#[async_trait]
pub trait AuthStore: Send + Sync + 'static {
    /// Step 4 of the pipeline: the key row, its hash and its company's status.
    /// Called only by [`auth::Authenticator`] on a cache miss.
    async fn find_key_for_auth(&self, id: ApiKeyId) -> StoreResult<Option<KeyAuthRecord>>;

    /// A counter bumped in the same transaction as any change that can make an
    /// authenticated key unusable (revocation, suspension). Nodes poll it to drop
    /// their key caches.
    async fn auth_revision(&self) -> StoreResult<i64>;

    /// Records key usage (`last_used_at`, `last_used_ip`); a time never moves
    /// backwards. Called in batches by the usage recorder, not per request.
    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()>;
}

/// The company and its API keys. Keys belong to the company as a whole: these
/// methods read and change keys of both modes.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn get_company(&self, scope: &CompanyScope) -> StoreResult<Company>;

    /// Newest first; `page.after` is the last id of the previous page.
    async fn list_api_keys(&self, scope: &CompanyScope, page: PageRequest<ApiKeyId>) -> StoreResult<Page<ApiKey>>;

    /// `None` both when the key does not exist and when it belongs to another company.
    async fn get_api_key(&self, scope: &CompanyScope, id: ApiKeyId) -> StoreResult<Option<ApiKey>>;

    /// Inserts a key for the scope's company. Fails with `NotFound("company")` if
    /// the company does not exist (possible only for an operator scope).
    async fn create_api_key(&self, scope: &CompanyScope, new: NewApiKey, audit: &AuditEntry) -> StoreResult<ApiKey>;

    /// Sets `revoked_at` if not yet set (the first revocation time stands) and
    /// bumps the auth revision in the same transaction. `None` when the key does
    /// not exist or belongs to another company.
    async fn revoke_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>>;

    /// Revokes every unrevoked key of the company in one transaction (emergency
    /// revocation) and bumps the auth revision. Returns how many were revoked.
    async fn revoke_all_api_keys(
        &self,
        scope: &CompanyScope,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<u64>;

    /// In one transaction: checks that key `id` of the scope's company is
    /// neither revoked, expired at `now`, nor already rotated; inserts `new`
    /// (pointing back with `replaces`); points the old key at it with
    /// `replaced_by`; moves the old key's expiry to `old_expires_at` if that is
    /// sooner; bumps the auth revision.
    async fn rotate_api_key(
        &self,
        scope: &CompanyScope,
        id: ApiKeyId,
        new: NewApiKey,
        old_expires_at: OffsetDateTime,
        now: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Rotation>;
}

/// The company's audit chain (one chain per company, both modes).
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends records to their chains in one transaction (the group writer's
    /// batch). A change's own record is written by the change's method instead,
    /// in the change's transaction.
    async fn append_audit(&self, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>>;

    /// The company's records, newest first; `page.after` is a sequence number.
    async fn list_audit(
        &self,
        scope: &CompanyScope,
        filter: &AuditFilter,
        page: PageRequest<u64>,
    ) -> StoreResult<Page<AuditRecord>>;

    async fn get_audit(&self, scope: &CompanyScope, id: AuditEventId) -> StoreResult<Option<AuditRecord>>;

    /// The company's records in chain order after `after_seq`, within the time range.
    async fn export_audit(
        &self,
        scope: &CompanyScope,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>>;

    /// The company chain's head (seq, hash), if it has any record.
    async fn audit_head(&self, scope: &CompanyScope) -> StoreResult<Option<(u64, [u8; 32])>>;

    async fn latest_checkpoint(&self, scope: &CompanyScope) -> StoreResult<Option<Checkpoint>>;
}

/// Payees of the scope's company and mode.
#[async_trait]
pub trait PayeeStore: Send + Sync + 'static {
    /// Inserts the payee in the scope's company and mode.
    async fn create_payee(&self, scope: &CompanyScope, new: &NewPayee, audit: &AuditEntry) -> StoreResult<()>;

    /// Newest first.
    async fn list_payees(
        &self,
        scope: &CompanyScope,
        status: Option<PayeeStatus>,
        page: PageRequest<PayeeId>,
    ) -> StoreResult<Page<Payee>>;

    async fn get_payee(&self, scope: &CompanyScope, id: PayeeId) -> StoreResult<Option<Payee>>;

    /// The sealed account number, for the rail.
    async fn payee_sealed_account(&self, scope: &CompanyScope, id: PayeeId) -> StoreResult<Option<Vec<u8>>>;

    /// Sets the status to disabled (the first `disabled_at` stands). `None` if
    /// there is no such payee.
    async fn disable_payee(
        &self,
        scope: &CompanyScope,
        id: PayeeId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Payee>>;
}

/// Payments, their idempotency records and the approval policy of the scope's
/// company and mode.
#[async_trait]
pub trait PaymentStore: Send + Sync + 'static {
    /// The approval policy of the scope's mode (the default if it never set one).
    async fn approval_policy(&self, scope: &CompanyScope) -> StoreResult<ApprovalPolicy>;

    async fn set_approval_policy(
        &self,
        scope: &CompanyScope,
        policy: &ApprovalPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<()>;

    /// Creates payments in one transaction (group commit). Per item, in order:
    /// a key already used (also earlier in the batch) answers `Existing`; a
    /// payee missing from the item scope's company and mode, or disabled,
    /// answers with that; otherwise the payment, its idempotency record and its
    /// audit record are written. Refused items leave no trace and do not affect
    /// the others.
    async fn create_payments(&self, items: &[PaymentCreate]) -> StoreResult<Vec<PaymentCreated>>;

    /// The stored response of an idempotency key, if it is still kept.
    async fn idempotent_response(&self, scope: &CompanyScope, key: &str) -> StoreResult<Option<StoredResponse>>;

    async fn get_payment(&self, scope: &CompanyScope, id: PaymentId) -> StoreResult<Option<Payment>>;

    /// Newest first.
    async fn list_payments(
        &self,
        scope: &CompanyScope,
        filter: &PaymentFilter,
        page: PageRequest<PaymentId>,
    ) -> StoreResult<Page<Payment>>;

    /// Replaces the payment's row with `payment` if its stored revision is still
    /// `expected_revision`; appends `audit` in the same transaction. `false`
    /// (nothing written) if another writer got there first.
    async fn update_payment(
        &self,
        scope: &CompanyScope,
        payment: &Payment,
        expected_revision: u32,
        audit: &AuditEntry,
    ) -> StoreResult<bool>;
}

/// Events and webhook endpoints of the scope's company and mode. Every change
/// elsewhere writes its events itself.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Newest first; `page.after` is the last id of the previous page.
    async fn list_events(
        &self,
        scope: &CompanyScope,
        filter: &EventFilter,
        page: PageRequest<EventId>,
    ) -> StoreResult<Page<Event>>;

    async fn get_event(&self, scope: &CompanyScope, id: EventId) -> StoreResult<Option<Event>>;

    /// `false` (nothing written) when the company already has
    /// [`MAX_ENDPOINTS`] endpoints in this mode.
    async fn create_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        new: &NewWebhookEndpoint,
        audit: &AuditEntry,
    ) -> StoreResult<bool>;

    /// Newest first.
    async fn list_webhook_endpoints(
        &self,
        scope: &CompanyScope,
        page: PageRequest<WebhookEndpointId>,
    ) -> StoreResult<Page<WebhookEndpoint>>;

    async fn get_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpoint>>;

    async fn update_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        patch: &EndpointPatch,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>>;

    /// Deletes the endpoint and its deliveries. `false` if there is no such endpoint.
    async fn delete_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<bool>;

    /// The current secret becomes the previous one (signing until
    /// `previous_expires_at`); `new_sealed` becomes current.
    async fn rotate_webhook_secret(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        new_sealed: &[u8],
        previous_expires_at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>>;

    /// Writes a `ping` event delivered to this endpoint only. `None` if there
    /// is no such endpoint.
    async fn send_test_event(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Event>>;

    /// New deliveries of the event: to `endpoint`, or to every enabled
    /// endpoint that subscribes to its type. `None` if the event (or the
    /// named endpoint) does not exist; otherwise how many were queued.
    async fn redeliver_event(
        &self,
        scope: &CompanyScope,
        id: EventId,
        endpoint: Option<WebhookEndpointId>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<u32>>;

    /// The endpoint's deliveries, newest first, each with its attempts.
    /// `None` if there is no such endpoint.
    async fn list_deliveries(
        &self,
        scope: &CompanyScope,
        endpoint: WebhookEndpointId,
        page: PageRequest<WebhookDeliveryId>,
    ) -> StoreResult<Option<Page<Delivery>>>;
}

/// Platform-wide operations for operators (the CLI). Never handed to the HTTP API.
#[async_trait]
pub trait OperatorStore: Store {
    /// Applies the embedded migrations of this backend.
    async fn migrate(&self) -> StoreResult<()>;

    async fn create_company(&self, new: NewCompany, audit: &AuditEntry) -> StoreResult<Company>;
    async fn list_companies(&self) -> StoreResult<Vec<Company>>;
    async fn find_company(&self, id: CompanyId) -> StoreResult<Option<Company>>;
    /// Sets the status and bumps the auth revision in one transaction.
    /// `None` if the company does not exist.
    async fn set_company_status(
        &self,
        id: CompanyId,
        status: CompanyStatus,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>>;

    /// Sets the company's key policy. `None` if the company does not exist.
    async fn set_key_policy(
        &self,
        id: CompanyId,
        policy: KeyPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>>;

    /// Sets or clears a key's rate limit override; bumps the auth revision so
    /// every node picks it up. `None` if the key does not exist.
    async fn set_key_rate_limit(
        &self,
        id: ApiKeyId,
        limit: Option<RateLimitOverride>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>>;

    /// Sets or clears a company's rate limit override; bumps the auth revision.
    async fn set_company_rate_limit(
        &self,
        id: CompanyId,
        limit: Option<RateLimitOverride>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>>;

    /// Revokes a key by id alone, whichever company owns it (emergency
    /// revocation by an operator). Same semantics as [`KeyStore::revoke_api_key`].
    async fn revoke_api_key_by_id(
        &self,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>>;

    /// Payments the background workers must look at by `now`: pending approvals
    /// past their deadline, and test-mode payments whose settlement step is due.
    async fn due_payments(&self, now: OffsetDateTime, limit: u32) -> StoreResult<Vec<(CompanyId, Payment)>>;

    /// Deletes idempotency records that expired before `now`. Returns how many.
    async fn purge_idempotency(&self, now: OffsetDateTime) -> StoreResult<u64>;

    /// Every chain with at least one record.
    async fn audit_chains(&self) -> StoreResult<Vec<String>>;
    /// A chain's records in order after `after_seq`, unfiltered (verification).
    async fn audit_records(&self, chain: &str, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditRecord>>;
    async fn audit_checkpoints(&self, chain: &str) -> StoreResult<Vec<Checkpoint>>;
    async fn add_checkpoint(&self, checkpoint: &Checkpoint) -> StoreResult<()>;
    /// The highest checkpointed sequence of every chain, in one query.
    async fn checkpointed_seqs(&self) -> StoreResult<Vec<(String, u64)>>;
    /// Every chain's head (chain, seq, hash).
    async fn audit_heads(&self) -> StoreResult<Vec<(String, u64, [u8; 32])>>;

    /// Leases up to `limit` due deliveries to `owner` until `lease_until`:
    /// pending, due by `now`, endpoint enabled, not leased by a live lease,
    /// and no earlier pending delivery of the same object to the same
    /// endpoint (per-object order). Two nodes never lease the same delivery.
    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>>;

    /// Records an attempt, moves the delivery on, and updates the endpoint's
    /// failure state, in one transaction with `audit`. Disabling the endpoint
    /// writes its `webhook_endpoint.disabled` event and `disable_audit`.
    /// `false` (nothing written) if the lease is no longer `owner`'s.
    async fn finish_delivery(
        &self,
        result: &DeliveryResult,
        audit: &AuditEntry,
        disable_audit: &AuditEntry,
    ) -> StoreResult<bool>;

    /// Unrevoked, unrotated keys expiring in `(now, until]` that have had no
    /// expiry notice yet.
    async fn expiring_keys(&self, now: OffsetDateTime, until: OffsetDateTime, limit: u32) -> StoreResult<Vec<ApiKey>>;

    /// Marks the key's expiry notice sent and writes its `api_key.expiring`
    /// event. `false` if another node did it first.
    async fn note_key_expiring(&self, id: ApiKeyId, audit: &AuditEntry) -> StoreResult<bool>;
}
