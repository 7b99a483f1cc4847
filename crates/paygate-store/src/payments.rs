//! Rows of the payments domain: payees, payments, idempotency records, and
//! the encoding of a payment's document column (shared by both backends).

use paygate_domain::audit::AuditEntry;
use paygate_domain::bank::BankAccountDetails;
use paygate_domain::payment::{
    Actor, Approval, ApprovalPolicy, ApprovalRule, Metadata, Payment, PaymentStatus, StatusChange,
};
use paygate_domain::{Amount, Currency, KeyMode, PayeeId, PaymentId};
use time::OffsetDateTime;

use crate::{CompanyScope, StoreError, StoreResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PayeeStatus {
    Active,
    Disabled,
}

impl PayeeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PayeeType {
    Business,
    Individual,
}

impl PayeeType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Business => "business",
            Self::Individual => "individual",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "business" => Some(Self::Business),
            "individual" => Some(Self::Individual),
            _ => None,
        }
    }
}

/// A payee as stored, without the account number (which only exists encrypted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payee {
    pub id: PayeeId,
    pub mode: KeyMode,
    pub name: String,
    pub kind: PayeeType,
    pub email: Option<String>,
    pub bank_account: BankAccountDetails,
    pub metadata: Metadata,
    pub status: PayeeStatus,
    pub created_at: OffsetDateTime,
    pub disabled_at: Option<OffsetDateTime>,
    /// Who created it: payments to a payee cannot be approved by the same eyes
    /// (one person adding their own account and approving payments to it).
    pub created_by: Option<Actor>,
}

/// A payee to insert: the row plus the sealed account number.
#[derive(Debug, Clone)]
pub struct NewPayee {
    pub payee: Payee,
    pub sealed_account: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct PaymentFilter {
    pub status: Option<PaymentStatus>,
    pub payee_id: Option<PayeeId>,
    pub created_from: Option<OffsetDateTime>,
    pub created_before: Option<OffsetDateTime>,
}

/// The response to replay for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub fingerprint: String,
    pub status: u16,
    pub body: String,
    pub payment_id: PaymentId,
}

/// One payment creation: the payment, its idempotency record (committed
/// together) and its audit record, in the scope's company and mode.
#[derive(Debug, Clone)]
pub struct PaymentCreate {
    pub scope: CompanyScope,
    pub payment: Payment,
    pub idempotency_key: String,
    pub response: StoredResponse,
    pub expires_at: OffsetDateTime,
    pub audit: AuditEntry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCreated {
    Created,
    /// The key was already used (by a request that committed first): its response.
    Existing(StoredResponse),
    /// No such payee in the company and mode.
    PayeeNotFound,
    PayeeDisabled,
}

/// The parts of a payment kept in its JSON document column (not filtered on).
#[derive(serde::Serialize, serde::Deserialize)]
struct PaymentDoc {
    #[serde(default = "first_version")]
    content_version: u32,
    metadata: Metadata,
    required_approvals: u8,
    approval_rule: ApprovalRule,
    initiators: Vec<Actor>,
    approvals: Vec<Approval>,
    rejection: Option<Approval>,
    status_history: Vec<StatusChange>,
    failure_reason: Option<String>,
}

fn first_version() -> u32 {
    1
}

pub fn payment_doc(p: &Payment) -> String {
    serde_json::to_string(&PaymentDoc {
        content_version: p.content_version,
        metadata: p.metadata.clone(),
        required_approvals: p.required_approvals,
        approval_rule: p.approval_rule,
        initiators: p.initiators.clone(),
        approvals: p.approvals.clone(),
        rejection: p.rejection.clone(),
        status_history: p.status_history.clone(),
        failure_reason: p.failure_reason.clone(),
    })
    .expect("a payment document serializes")
}

pub const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

pub fn date_text(d: time::Date) -> String {
    d.format(DATE_FORMAT).expect("a date formats")
}

/// Column values of a payment row, as read by either backend.
pub struct PaymentColumns {
    pub id: uuid::Uuid,
    pub mode: String,
    pub payee_id: uuid::Uuid,
    pub amount: i64,
    pub currency: String,
    pub reference: String,
    pub requested_execution_date: Option<String>,
    pub status: String,
    pub version: i64,
    pub revision: i64,
    pub approval_expires_at: OffsetDateTime,
    pub rail_next_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub doc: String,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(what, e)
}

impl PaymentColumns {
    pub fn into_payment(self) -> StoreResult<Payment> {
        let doc: PaymentDoc = serde_json::from_str(&self.doc).map_err(|e| corrupt("payment document", e))?;
        Ok(Payment {
            id: PaymentId::from_uuid(self.id),
            mode: KeyMode::parse(&self.mode).ok_or_else(|| corrupt("payment mode", &self.mode))?,
            payee_id: PayeeId::from_uuid(self.payee_id),
            amount: Amount::new(self.amount as u64).map_err(|e| corrupt("amount", e))?,
            currency: Currency::parse(&self.currency).map_err(|e| corrupt("currency", e))?,
            reference: self.reference,
            requested_execution_date: self
                .requested_execution_date
                .map(|d| time::Date::parse(&d, DATE_FORMAT).map_err(|e| corrupt("execution date", e)))
                .transpose()?,
            metadata: doc.metadata,
            status: PaymentStatus::parse(&self.status).ok_or_else(|| corrupt("payment status", &self.status))?,
            version: self.version as u32,
            content_version: doc.content_version,
            revision: self.revision as u32,
            required_approvals: doc.required_approvals,
            approval_rule: doc.approval_rule,
            approval_expires_at: self.approval_expires_at,
            initiators: doc.initiators,
            approvals: doc.approvals,
            rejection: doc.rejection,
            status_history: doc.status_history,
            failure_reason: doc.failure_reason,
            created_at: self.created_at,
            updated_at: self.updated_at,
            rail_next_at: self.rail_next_at,
        })
    }
}

/// Column values of a payee row.
pub struct PayeeColumns {
    pub id: uuid::Uuid,
    pub mode: String,
    pub name: String,
    pub kind: String,
    pub email: Option<String>,
    pub bank_account: String,
    pub metadata: String,
    pub status: String,
    pub created_at: OffsetDateTime,
    pub disabled_at: Option<OffsetDateTime>,
    pub created_by: Option<String>,
}

impl PayeeColumns {
    pub fn into_payee(self) -> StoreResult<Payee> {
        Ok(Payee {
            id: PayeeId::from_uuid(self.id),
            mode: KeyMode::parse(&self.mode).ok_or_else(|| corrupt("payee mode", &self.mode))?,
            name: self.name,
            kind: PayeeType::parse(&self.kind).ok_or_else(|| corrupt("payee type", &self.kind))?,
            email: self.email,
            bank_account: serde_json::from_str(&self.bank_account).map_err(|e| corrupt("bank account", e))?,
            metadata: serde_json::from_str(&self.metadata).map_err(|e| corrupt("payee metadata", e))?,
            status: PayeeStatus::parse(&self.status).ok_or_else(|| corrupt("payee status", &self.status))?,
            created_at: self.created_at,
            disabled_at: self.disabled_at,
            created_by: self
                .created_by
                .map(|t| serde_json::from_str(&t).map_err(|e| corrupt("payee creator", e)))
                .transpose()?,
        })
    }
}

/// The policy column: JSON, `NULL` for the default policy.
pub fn policy_text(policy: &ApprovalPolicy) -> String {
    serde_json::to_string(policy).expect("a policy serializes")
}

pub fn policy_from_text(text: Option<String>) -> StoreResult<ApprovalPolicy> {
    match text {
        None => Ok(ApprovalPolicy::default()),
        Some(t) => serde_json::from_str(&t).map_err(|e| corrupt("approval policy", e)),
    }
}

impl Payee {
    /// The `bank_account`, `metadata` and `created_by` columns (JSON).
    pub fn json_columns(&self) -> (String, String, Option<String>) {
        (
            serde_json::to_string(&self.bank_account).expect("account details serialize"),
            serde_json::to_string(&self.metadata).expect("metadata serializes"),
            self.created_by.as_ref().map(|a| serde_json::to_string(a).expect("an actor serializes")),
        )
    }
}
