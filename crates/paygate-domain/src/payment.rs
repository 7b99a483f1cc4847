//! Payments: the status machine, the company's approval policy, four-eyes
//! approval rules (invariant I8), and the small validated types a payment
//! request is made of. Pure: the store persists a [`Payment`] as a whole and
//! guards every write with its `revision`, so all rules live here.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::money::{Amount, Currency};
use crate::{ApiKeyId, PayeeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    PendingApproval,
    Approved,
    Rejected,
    Canceled,
    Expired,
    Processing,
    Completed,
    Failed,
    Returned,
}

impl PaymentStatus {
    pub const ALL: [Self; 9] = [
        Self::PendingApproval,
        Self::Approved,
        Self::Rejected,
        Self::Canceled,
        Self::Expired,
        Self::Processing,
        Self::Completed,
        Self::Failed,
        Self::Returned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingApproval => "pending_approval",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Returned => "returned",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The status machine: `pending_approval → approved | rejected | canceled |
    /// expired`; `approved → processing | canceled`; `processing → completed |
    /// failed`; `completed → returned`. Nothing else.
    pub fn can_become(self, next: Self) -> bool {
        use PaymentStatus::*;
        matches!(
            (self, next),
            (PendingApproval, Approved | Rejected | Canceled | Expired)
                | (Approved, Processing | Canceled)
                | (Processing, Completed | Failed)
                | (Completed, Returned)
        )
    }
}

/// Who made a change: a key (with its owner and principal, for four-eyes
/// rules) or a part of Paygate itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Actor {
    /// `api_key` or `system`.
    pub kind: String,
    /// `key_…` or the component (`rail:simulated`, `approval_expiry`).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The operator-issued key this key descends from (see ADR 0004): keys of
    /// one principal count as one pair of eyes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

impl Actor {
    pub fn key(id: ApiKeyId, owner: &str, principal: ApiKeyId) -> Self {
        Self {
            kind: "api_key".into(),
            id: id.to_string(),
            owner: Some(owner.to_owned()),
            principal: Some(principal.to_string()),
        }
    }

    pub fn system(component: &str) -> Self {
        Self { kind: "system".into(), id: component.to_owned(), owner: None, principal: None }
    }

    /// Same key, same owner, or same principal: the same pair of eyes.
    /// Owners compare as identities (case-folded NFKC and confusable
    /// skeleton, see `text::identity_key`), so "Alice", "alice " and a
    /// Cyrillic "аlice" are one person.
    pub fn same_eyes(&self, other: &Actor) -> bool {
        let owner = |a: &Actor| a.owner.as_deref().map(crate::text::identity_key);
        self.kind == "api_key"
            && other.kind == "api_key"
            && (self.id == other.id
                || (self.owner.is_some() && owner(self) == owner(other))
                || (self.principal.is_some() && self.principal == other.principal))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusChange {
    pub status: PaymentStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Approval {
    pub actor: Actor,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The payment's version and content hash when the vote was cast; a vote
    /// counts only while both still match.
    pub version: u32,
    pub content_hash: String,
}

/// One currency's thresholds in minor units. Below `one_approval_from` a
/// payment is approved automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ApprovalRule {
    pub one_approval_from: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub two_approvals_from: Option<u64>,
}

impl ApprovalRule {
    pub fn required(&self, amount: Amount) -> u8 {
        let v = amount.minor_units();
        if self.two_approvals_from.is_some_and(|t| v >= t) {
            2
        } else if v >= self.one_approval_from {
            1
        } else {
            0
        }
    }
}

/// A company's approval policy. A currency without a rule needs one approval
/// for every amount: a new company approves everything by hand until it says
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ApprovalPolicy {
    /// Thresholds per ISO 4217 currency code.
    pub rules: BTreeMap<String, ApprovalRule>,
    /// How long a payment waits for its approvals before it expires.
    pub approval_ttl_seconds: u32,
    /// Whether one key may hold `payments:write` together with
    /// `payments:approve` or `policy:manage` (either lets one credential
    /// create a payment and also approve it, or waive its approval).
    pub allow_write_and_approve_keys: bool,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self { rules: BTreeMap::new(), approval_ttl_seconds: Self::DEFAULT_TTL, allow_write_and_approve_keys: false }
    }
}

/// Scopes that, together on one key, let that key both create a payment and
/// approve it or waive its approval. `None` if `scopes` has no such pair.
pub fn conflicting_scopes(scopes: crate::ScopeSet) -> Option<(crate::Scope, crate::Scope)> {
    use crate::Scope::{PaymentsApprove, PaymentsWrite, PolicyManage};
    if !scopes.contains(PaymentsWrite) {
        return None;
    }
    [PaymentsApprove, PolicyManage].into_iter().find(|s| scopes.contains(*s)).map(|s| (PaymentsWrite, s))
}

impl ApprovalPolicy {
    pub const DEFAULT_TTL: u32 = 72 * 3600;
    pub const MAX_TTL: u32 = 30 * 24 * 3600;

    /// The rule applied to a payment in `currency` (snapshotted onto it).
    pub fn rule_for(&self, currency: Currency) -> ApprovalRule {
        self.rules
            .get(currency.code())
            .copied()
            .unwrap_or(ApprovalRule { one_approval_from: 0, two_approvals_from: None })
    }

    /// The demo company's policy: one approval from 1,000.00 and two from
    /// 1,000,000.00 in EUR, USD and GBP.
    pub fn demo() -> Self {
        let rule = ApprovalRule { one_approval_from: 100_000, two_approvals_from: Some(100_000_000) };
        Self { rules: ["EUR", "USD", "GBP"].into_iter().map(|c| (c.to_owned(), rule)).collect(), ..Self::default() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("a payment in status {from} cannot be {action}")]
    InvalidState { from: &'static str, action: &'static str },
    #[error("the key, owner or principal that created or changed this payment cannot approve it")]
    ApproverIsInitiator,
    #[error("this owner has already approved this payment")]
    AlreadyApproved,
    #[error("the payment's approval window closed at {0}")]
    ApprovalExpired(String),
}

/// A payment. The store keeps it as one row and replaces it as a whole, only
/// if `revision` is still the one it was read with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: crate::PaymentId,
    /// Test-mode payments settle on the simulated rail; live ones need a real rail.
    pub mode: crate::KeyMode,
    pub payee_id: PayeeId,
    pub amount: Amount,
    pub currency: Currency,
    pub reference: String,
    pub requested_execution_date: Option<time::Date>,
    pub metadata: Metadata,
    pub status: PaymentStatus,
    /// Bumped by every status change and every content change.
    pub version: u32,
    /// The version of the last content change (creation: 1). Votes cast
    /// before it no longer count.
    pub content_version: u32,
    /// Bumped by every write (also votes): the store's optimistic lock.
    pub revision: u32,
    pub required_approvals: u8,
    pub approval_rule: ApprovalRule,
    pub approval_expires_at: OffsetDateTime,
    /// The creating key first, then every key that changed the content.
    pub initiators: Vec<Actor>,
    pub approvals: Vec<Approval>,
    pub rejection: Option<Approval>,
    pub status_history: Vec<StatusChange>,
    pub failure_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// When the settlement worker should next look at this payment.
    pub rail_next_at: Option<OffsetDateTime>,
}

/// Everything needed to create a payment, validated.
#[derive(Debug, Clone)]
pub struct PaymentDraft {
    pub payee_id: PayeeId,
    pub amount: Amount,
    pub currency: Currency,
    pub reference: String,
    pub requested_execution_date: Option<time::Date>,
    pub metadata: Metadata,
}

impl Payment {
    pub fn create(
        draft: PaymentDraft,
        mode: crate::KeyMode,
        creator: Actor,
        policy: &ApprovalPolicy,
        now: OffsetDateTime,
    ) -> Self {
        let rule = policy.rule_for(draft.currency);
        let mut payment = Self {
            id: crate::PaymentId::generate(),
            mode,
            payee_id: draft.payee_id,
            amount: draft.amount,
            currency: draft.currency,
            reference: draft.reference,
            requested_execution_date: draft.requested_execution_date,
            metadata: draft.metadata,
            status: PaymentStatus::PendingApproval,
            version: 1,
            content_version: 1,
            revision: 1,
            required_approvals: rule.required(draft.amount),
            approval_rule: rule,
            approval_expires_at: now + time::Duration::seconds(policy.approval_ttl_seconds.into()),
            initiators: vec![creator.clone()],
            approvals: Vec::new(),
            rejection: None,
            status_history: vec![StatusChange {
                status: PaymentStatus::PendingApproval,
                at: now,
                actor: creator,
                reason: None,
            }],
            failure_reason: None,
            created_at: now,
            updated_at: now,
            rail_next_at: None,
        };
        if payment.required_approvals == 0 {
            payment.transition(
                PaymentStatus::Approved,
                Actor::system("approval_policy"),
                now,
                Some("below the approval threshold".into()),
            );
        }
        payment
    }

    /// SHA-256 over what an approver agrees to: payee, amount, currency, reference.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.payee_id.to_string(),
            self.amount.minor_units().to_string(),
            self.currency.code().to_owned(),
            self.reference.clone(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Whether a vote still counts: cast on the current content, after its last change.
    /// `content_hash` is [`Payment::content_hash`], computed once by the caller.
    pub fn vote_counts(&self, vote: &Approval, content_hash: &str) -> bool {
        vote.version >= self.content_version && vote.content_hash == content_hash
    }

    /// Votes that still count.
    pub fn valid_approvals(&self) -> usize {
        let hash = self.content_hash();
        self.approvals.iter().filter(|a| self.vote_counts(a, &hash)).count()
    }

    fn transition(&mut self, next: PaymentStatus, actor: Actor, now: OffsetDateTime, reason: Option<String>) {
        debug_assert!(self.status.can_become(next), "{:?} -> {next:?}", self.status);
        self.status = next;
        self.version += 1;
        self.updated_at = now;
        self.status_history.push(StatusChange { status: next, at: now, actor, reason });
        // An approved payment is due for settlement on its execution date (or
        // now); the rail worker schedules later steps itself.
        self.rail_next_at = match next {
            PaymentStatus::Approved => {
                let date = self.requested_execution_date.map(|d| d.midnight().assume_utc());
                Some(date.map_or(now, |d| d.max(now)))
            }
            _ => None,
        };
    }

    fn require(&self, allowed: &[PaymentStatus], action: &'static str) -> Result<(), PaymentError> {
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(PaymentError::InvalidState { from: self.status.as_str(), action })
        }
    }

    fn open_for_votes(&self, now: OffsetDateTime, action: &'static str) -> Result<(), PaymentError> {
        self.require(&[PaymentStatus::PendingApproval], action)?;
        if now >= self.approval_expires_at {
            let at =
                self.approval_expires_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            return Err(PaymentError::ApprovalExpired(at));
        }
        Ok(())
    }

    /// One approval. Refused for any initiator (same key, owner or principal)
    /// and for a second vote of the same eyes. Reaching the quorum approves.
    /// [`Payment::approve`], also refused for whoever created the payee (one
    /// person adding their own account and approving payments to it).
    pub fn approve_checking_payee(
        &mut self,
        approver: Actor,
        payee_creator: Option<&Actor>,
        now: OffsetDateTime,
    ) -> Result<(), PaymentError> {
        if payee_creator.is_some_and(|creator| creator.same_eyes(&approver)) {
            self.open_for_votes(now, "approved")?;
            return Err(PaymentError::ApproverIsInitiator);
        }
        self.approve(approver, now)
    }

    pub fn approve(&mut self, approver: Actor, now: OffsetDateTime) -> Result<(), PaymentError> {
        self.open_for_votes(now, "approved")?;
        if self.initiators.iter().any(|i| i.same_eyes(&approver)) {
            return Err(PaymentError::ApproverIsInitiator);
        }
        let hash = self.content_hash();
        if self.approvals.iter().filter(|a| self.vote_counts(a, &hash)).any(|a| a.actor.same_eyes(&approver)) {
            return Err(PaymentError::AlreadyApproved);
        }
        self.approvals.push(Approval { actor: approver.clone(), at: now, version: self.version, content_hash: hash });
        self.revision += 1;
        self.updated_at = now;
        if self.valid_approvals() >= self.required_approvals as usize {
            self.transition(PaymentStatus::Approved, approver, now, None);
        }
        Ok(())
    }

    /// Any reject is final.
    pub fn reject(&mut self, actor: Actor, reason: String, now: OffsetDateTime) -> Result<(), PaymentError> {
        self.open_for_votes(now, "rejected")?;
        self.rejection =
            Some(Approval { actor: actor.clone(), at: now, version: self.version, content_hash: self.content_hash() });
        self.revision += 1;
        self.transition(PaymentStatus::Rejected, actor, now, Some(reason));
        Ok(())
    }

    pub fn cancel(&mut self, actor: Actor, now: OffsetDateTime) -> Result<(), PaymentError> {
        self.require(&[PaymentStatus::PendingApproval, PaymentStatus::Approved], "canceled")?;
        self.revision += 1;
        self.rail_next_at = None;
        self.transition(PaymentStatus::Canceled, actor, now, None);
        Ok(())
    }

    /// Changes what approvers agree to. Only while pending approval; earlier
    /// votes stop counting (new version and content hash), and the editor
    /// joins the initiators, who cannot approve.
    pub fn edit(&mut self, editor: Actor, edit: PaymentEdit, now: OffsetDateTime) -> Result<(), PaymentError> {
        self.require(&[PaymentStatus::PendingApproval], "changed")?;
        if now >= self.approval_expires_at {
            return self.open_for_votes(now, "changed");
        }
        if let Some(amount) = edit.amount {
            self.amount = amount;
        }
        if let Some(reference) = edit.reference {
            self.reference = reference;
        }
        if let Some(date) = edit.requested_execution_date {
            self.requested_execution_date = date;
        }
        if let Some(metadata) = edit.metadata {
            self.metadata = metadata;
        }
        self.version += 1;
        self.content_version = self.version;
        self.revision += 1;
        self.updated_at = now;
        self.required_approvals = self.approval_rule.required(self.amount);
        if !self.initiators.iter().any(|i| i.kind == editor.kind && i.id == editor.id) {
            self.initiators.push(editor);
        }
        if self.required_approvals == 0 {
            self.transition(
                PaymentStatus::Approved,
                Actor::system("approval_policy"),
                now,
                Some("below the approval threshold".into()),
            );
        }
        Ok(())
    }

    /// The expiry sweep: `true` if the payment expired now.
    pub fn expire_if_due(&mut self, now: OffsetDateTime) -> bool {
        if self.status != PaymentStatus::PendingApproval || now < self.approval_expires_at {
            return false;
        }
        self.revision += 1;
        self.transition(PaymentStatus::Expired, Actor::system("approval_expiry"), now, None);
        true
    }

    /// Settlement steps, driven by the rail worker.
    pub fn settle(&mut self, step: SettlementStep, rail: &str, now: OffsetDateTime) -> Result<(), PaymentError> {
        let actor = Actor::system(&format!("rail:{rail}"));
        let (from, to, reason) = match &step {
            SettlementStep::Submitted => (PaymentStatus::Approved, PaymentStatus::Processing, None),
            SettlementStep::Completed => (PaymentStatus::Processing, PaymentStatus::Completed, None),
            SettlementStep::Failed(r) => (PaymentStatus::Processing, PaymentStatus::Failed, Some(r.clone())),
            SettlementStep::Returned(r) => (PaymentStatus::Completed, PaymentStatus::Returned, Some(r.clone())),
        };
        self.require(&[from], to.as_str())?;
        if reason.is_some() {
            self.failure_reason = reason.clone();
        }
        self.revision += 1;
        self.transition(to, actor, now, reason);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettlementStep {
    Submitted,
    Completed,
    Failed(String),
    Returned(String),
}

/// A content change of a pending payment (`PATCH /v1/payments/{id}`).
#[derive(Debug, Clone, Default)]
pub struct PaymentEdit {
    pub amount: Option<Amount>,
    pub reference: Option<String>,
    pub requested_execution_date: Option<Option<time::Date>>,
    pub metadata: Option<Metadata>,
}

/// Free-form string pairs the integrator attaches: at most 20, keys 1–40
/// characters, values up to 500.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Metadata(pub BTreeMap<String, String>);

impl Metadata {
    pub const MAX_PAIRS: usize = 20;
    pub const MAX_KEY_CHARS: usize = 40;
    pub const MAX_VALUE_CHARS: usize = 500;

    /// Problems carry a JSON pointer relative to the metadata object.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, Vec<(String, String)>> {
        let serde_json::Value::Object(map) = value else {
            return Err(vec![(String::new(), "must be an object of string keys and string values".into())]);
        };
        let mut problems = Vec::new();
        if map.len() > Self::MAX_PAIRS {
            problems.push((String::new(), format!("must have at most {} keys", Self::MAX_PAIRS)));
        }
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let pointer = format!("/{}", k.replace('~', "~0").replace('/', "~1"));
            // Keys are matched by integrators: kept as sent, but held to the
            // same text rules as values (no NUL, escapes or invisible marks).
            let chars = k.chars().count();
            if chars == 0 || chars > Self::MAX_KEY_CHARS || crate::text::normalize(k).is_err() {
                problems.push((
                    pointer.clone(),
                    format!(
                        "keys must be 1 to {} characters without control or invisible characters",
                        Self::MAX_KEY_CHARS
                    ),
                ));
            }
            match v {
                serde_json::Value::String(s) => match crate::text::normalize(s) {
                    Ok(s) if s.chars().count() <= Self::MAX_VALUE_CHARS => {
                        out.insert(k.clone(), s);
                    }
                    Ok(_) => problems.push((pointer, format!("must be at most {} characters", Self::MAX_VALUE_CHARS))),
                    Err(e) => problems.push((pointer, e.to_string())),
                },
                _ => problems.push((pointer, "must be a string".into())),
            }
        }
        if problems.is_empty() { Ok(Self(out)) } else { Err(problems) }
    }
}

/// A payment reference: 1–140 characters of text the payee and the
/// approvers read as stored (no bidi overrides or invisible characters).
pub fn parse_reference(text: &str) -> Result<String, String> {
    match crate::text::field(text, 140, false) {
        Ok(t) => Ok(t),
        Err(crate::text::LabelError::ControlCharacter) => Err(crate::text::LabelError::ControlCharacter.to_string()),
        Err(_) => Err("must be 1 to 140 characters".into()),
    }
}

/// `YYYY-MM-DD`, today (UTC) or up to one year ahead.
pub fn parse_execution_date(text: &str, now: OffsetDateTime) -> Result<time::Date, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(text, format).map_err(|_| "must be a date like 2027-01-31".to_owned())?;
    let today = now.date();
    if date < today {
        return Err("must not be in the past".into());
    }
    if date > today + time::Duration::days(366) {
        return Err("must be at most one year ahead".into());
    }
    Ok(date)
}

/// The `Idempotency-Key` header: 1–255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Option<Self> {
        let ok = !text.is_empty() && text.len() <= 255 && text.bytes().all(|b| (0x21..=0x7e).contains(&b));
        ok.then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Fingerprint of a request for idempotency: method, route and the body as
/// canonical JSON (keys sorted), so formatting and key order do not matter.
pub fn request_fingerprint(method: &str, route: &str, body: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(route.as_bytes());
    h.update([0]);
    // serde_json's Map is a BTreeMap (no preserve_order feature): sorted keys.
    h.update(serde_json::to_vec(body).expect("a Value serializes"));
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_actor(n: u8, owner: &str) -> Actor {
        Actor {
            kind: "api_key".into(),
            id: format!("key_{n}"),
            owner: Some(owner.into()),
            principal: Some(format!("key_{n}")),
        }
    }

    fn draft(amount: u64) -> PaymentDraft {
        PaymentDraft {
            payee_id: PayeeId::generate(),
            amount: Amount::new(amount).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            reference: "INV-1".into(),
            requested_execution_date: None,
            metadata: Metadata::default(),
        }
    }

    fn now() -> OffsetDateTime {
        crate::now()
    }

    #[test]
    fn the_status_machine_allows_exactly_the_documented_edges() {
        use PaymentStatus::*;
        let allowed = [
            (PendingApproval, Approved),
            (PendingApproval, Rejected),
            (PendingApproval, Canceled),
            (PendingApproval, Expired),
            (Approved, Processing),
            (Approved, Canceled),
            (Processing, Completed),
            (Processing, Failed),
            (Completed, Returned),
        ];
        for a in PaymentStatus::ALL {
            for b in PaymentStatus::ALL {
                assert_eq!(a.can_become(b), allowed.contains(&(a, b)), "{a:?} -> {b:?}");
            }
            assert_eq!(PaymentStatus::parse(a.as_str()), Some(a));
        }
    }

    #[test]
    fn thresholds_decide_how_many_approvals() {
        let policy = ApprovalPolicy::demo();
        let p = |amount| Payment::create(draft(amount), crate::KeyMode::Test, key_actor(1, "erp"), &policy, now());
        assert_eq!(p(99_999).status, PaymentStatus::Approved);
        assert_eq!(p(100_000).required_approvals, 1);
        assert_eq!(p(100_000_000).required_approvals, 2);
        let mut usd = draft(5);
        usd.currency = Currency::parse("CHF").unwrap();
        assert_eq!(
            Payment::create(usd, crate::KeyMode::Test, key_actor(1, "erp"), &policy, now()).required_approvals,
            1,
            "unlisted currency"
        );
    }

    #[test]
    fn look_alike_owners_are_the_same_eyes() {
        let policy = ApprovalPolicy::demo();
        for (n, variant) in crate::text::identity_tests::ALICE_LOOKALIKES.iter().enumerate() {
            let mut p =
                Payment::create(draft(200_000_000), crate::KeyMode::Test, key_actor(1, "alice"), &policy, now());
            // Whether or not the text rules would accept this owner today, a
            // stored one never counts as a second person.
            let approver = key_actor(u8::try_from(n).unwrap() + 10, variant);
            assert_eq!(p.approve(approver, now()), Err(PaymentError::ApproverIsInitiator), "{variant:?}");
        }
    }

    #[test]
    fn four_eyes() {
        let policy = ApprovalPolicy::demo();
        let mut p = Payment::create(draft(200_000_000), crate::KeyMode::Test, key_actor(1, "erp"), &policy, now());
        assert_eq!(p.approve(key_actor(1, "erp"), now()), Err(PaymentError::ApproverIsInitiator), "same key");
        assert_eq!(p.approve(key_actor(2, "erp"), now()), Err(PaymentError::ApproverIsInitiator), "same owner");
        assert_eq!(
            p.approve(key_actor(2, " ERP "), now()),
            Err(PaymentError::ApproverIsInitiator),
            "same owner, other case"
        );
        let mut same_principal = key_actor(3, "someone else");
        same_principal.principal = Some("key_1".into());
        assert_eq!(p.approve(same_principal, now()), Err(PaymentError::ApproverIsInitiator), "same principal");
        p.approve(key_actor(4, "alice"), now()).unwrap();
        assert_eq!(p.status, PaymentStatus::PendingApproval);
        assert_eq!(p.approve(key_actor(5, "alice"), now()), Err(PaymentError::AlreadyApproved), "one vote per owner");
        p.approve(key_actor(6, "bob"), now()).unwrap();
        assert_eq!(p.status, PaymentStatus::Approved);
        assert!(matches!(p.approve(key_actor(7, "carol"), now()), Err(PaymentError::InvalidState { .. })));
    }

    #[test]
    fn a_content_change_voids_earlier_votes_and_the_editor_cannot_approve() {
        let mut p = Payment::create(
            draft(200_000_000),
            crate::KeyMode::Test,
            key_actor(1, "erp"),
            &ApprovalPolicy::demo(),
            now(),
        );
        p.approve(key_actor(4, "alice"), now()).unwrap();
        p.edit(
            key_actor(8, "mallory"),
            PaymentEdit { amount: Some(Amount::new(300_000_000).unwrap()), ..Default::default() },
            now(),
        )
        .unwrap();
        assert_eq!(p.valid_approvals(), 0);
        assert_eq!(p.approve(key_actor(8, "mallory"), now()), Err(PaymentError::ApproverIsInitiator));
        p.approve(key_actor(6, "bob"), now()).unwrap();
        assert_eq!(p.status, PaymentStatus::PendingApproval, "alice's vote was for other content");
        p.approve(key_actor(4, "alice"), now()).unwrap();
        assert_eq!(p.status, PaymentStatus::Approved);
    }

    #[test]
    fn reject_is_final_and_expiry_closes_votes() {
        let t = now();
        let mut p =
            Payment::create(draft(200_000), crate::KeyMode::Test, key_actor(1, "erp"), &ApprovalPolicy::demo(), t);
        p.reject(key_actor(2, "alice"), "wrong payee".into(), t).unwrap();
        assert_eq!(p.status, PaymentStatus::Rejected);
        assert!(p.approve(key_actor(3, "bob"), t).is_err());
        let mut q =
            Payment::create(draft(200_000), crate::KeyMode::Test, key_actor(1, "erp"), &ApprovalPolicy::demo(), t);
        let late = t + time::Duration::seconds(ApprovalPolicy::DEFAULT_TTL as i64);
        assert!(matches!(q.approve(key_actor(3, "bob"), late), Err(PaymentError::ApprovalExpired(_))));
        assert!(!q.expire_if_due(t));
        assert!(q.expire_if_due(late));
        assert_eq!(q.status, PaymentStatus::Expired);
    }

    #[test]
    fn settlement_follows_the_machine() {
        let mut p =
            Payment::create(draft(5), crate::KeyMode::Test, key_actor(1, "erp"), &ApprovalPolicy::demo(), now());
        assert!(p.settle(SettlementStep::Completed, "simulated", now()).is_err());
        p.settle(SettlementStep::Submitted, "simulated", now()).unwrap();
        p.settle(SettlementStep::Completed, "simulated", now()).unwrap();
        p.settle(SettlementStep::Returned("account_closed".into()), "simulated", now()).unwrap();
        assert_eq!(p.status, PaymentStatus::Returned);
        assert_eq!(p.failure_reason.as_deref(), Some("account_closed"));
        let versions: Vec<_> = p.status_history.iter().map(|s| s.status.as_str()).collect();
        assert_eq!(versions, ["pending_approval", "approved", "processing", "completed", "returned"]);
        assert_eq!(p.version, 5);
    }

    #[test]
    fn metadata_limits() {
        assert!(Metadata::from_json(&serde_json::json!({"a": "b"})).is_ok());
        let too_many: serde_json::Map<_, _> = (0..21).map(|i| (format!("k{i}"), serde_json::json!("v"))).collect();
        assert!(Metadata::from_json(&serde_json::Value::Object(too_many)).is_err());
        let e = Metadata::from_json(&serde_json::json!({"a/b": 1})).unwrap_err();
        assert_eq!(e[0].0, "/a~1b");
        assert!(Metadata::from_json(&serde_json::json!({"k": "v".repeat(501)})).is_err());
        assert!(Metadata::from_json(&serde_json::json!({"k".repeat(41): "v"})).is_err());
        assert!(Metadata::from_json(&serde_json::json!([])).is_err());
    }

    #[test]
    fn request_fingerprints_ignore_key_order() {
        let a = serde_json::from_str(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b = serde_json::from_str(r#"{ "b":[1,2], "a":1 }"#).unwrap();
        assert_eq!(request_fingerprint("POST", "/v1/payments", &a), request_fingerprint("POST", "/v1/payments", &b));
        let c = serde_json::from_str(r#"{"a":2,"b":[1,2]}"#).unwrap();
        assert_ne!(request_fingerprint("POST", "/v1/payments", &a), request_fingerprint("POST", "/v1/payments", &c));
        assert!(IdempotencyKey::parse("abc-123").is_some());
        assert!(IdempotencyKey::parse("").is_none());
        assert!(IdempotencyKey::parse("has space").is_none());
        assert!(IdempotencyKey::parse(&"x".repeat(256)).is_none());
    }
}
