//! The audit record, its canonical encoding (version 1), the hash chain and
//! signed checkpoints. Pure: the same code runs in the server, in
//! `paygate audit verify`, and (re-implemented from `docs/audit.md`) in a
//! customer's verifier.
//!
//! `hash = SHA-256(prev_hash ‖ canonical(record))`; the first record of a chain
//! has `prev_hash` = 32 zero bytes. The canonical encoding is a fixed sequence
//! of fields, never a map serialisation; see [`canonical`].

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::id::AuditEventId;

pub const ENCODING_VERSION: &str = "paygate-audit-v1";
pub const CHECKPOINT_VERSION: &str = "paygate-audit-checkpoint-v1";
/// The chain of requests that belong to no company (unauthenticated traffic).
pub const PLATFORM_CHAIN: &str = "platform";
/// `details` is at most this many bytes of JSON.
pub const MAX_DETAILS_BYTES: usize = 2048;
/// User agents are cut to this many characters.
pub const MAX_USER_AGENT_CHARS: usize = 256;

macro_rules! audit_actions {
    ($($variant:ident => $text:tt),+ $(,)?) => {
        /// What an audit record says happened: the closed list (documented in
        /// `docs/audit.md`). Routes name theirs in their declaration.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum AuditAction {
            $($variant,)+
        }

        impl AuditAction {
            pub const ALL: &'static [AuditAction] = &[$(AuditAction::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(AuditAction::$variant => $text,)+
                }
            }
        }

        /// The closed list of actions as stored.
        pub const ACTIONS: &[&str] = &[$($text),+];
    };
}

audit_actions! {
    AuthFailed => "auth.failed",
    AuthThrottled => "auth.throttled",
    RateLimitExceeded => "rate_limit.exceeded",
    RequestUnrouted => "request.unrouted",
    RequestTimeout => "request.timeout",
    RequestOverloaded => "request.overloaded",
    IdentityRead => "identity.read",
    ApiKeyList => "api_key.list",
    ApiKeyRead => "api_key.read",
    ApiKeyCreate => "api_key.create",
    ApiKeyRotate => "api_key.rotate",
    ApiKeyRevoke => "api_key.revoke",
    ApiKeyRevokeAll => "api_key.revoke_all",
    ApiKeySetLimits => "api_key.set_limits",
    CompanyCreate => "company.create",
    CompanySuspend => "company.suspend",
    CompanyResume => "company.resume",
    CompanySetKeyPolicy => "company.set_key_policy",
    CompanySetLimits => "company.set_limits",
    AuditList => "audit.list",
    AuditRead => "audit.read",
    AuditExport => "audit.export",
    AuditChainRead => "audit.chain_read",
    PayeeList => "payee.list",
    PayeeCreate => "payee.create",
    PayeeRead => "payee.read",
    PayeeDisable => "payee.disable",
    PaymentList => "payment.list",
    PaymentCreate => "payment.create",
    PaymentRead => "payment.read",
    PaymentUpdate => "payment.update",
    PaymentApprove => "payment.approve",
    PaymentReject => "payment.reject",
    PaymentCancel => "payment.cancel",
    PaymentExpire => "payment.expire",
    PaymentSettle => "payment.settle",
    ApprovalPolicyRead => "approval_policy.read",
    ApprovalPolicyUpdate => "approval_policy.update",
    ApiKeyExpiryNotice => "api_key.expiry_notice",
    EventList => "event.list",
    EventRead => "event.read",
    EventRedeliver => "event.redeliver",
    WebhookEndpointCreate => "webhook_endpoint.create",
    WebhookEndpointList => "webhook_endpoint.list",
    WebhookEndpointRead => "webhook_endpoint.read",
    WebhookEndpointUpdate => "webhook_endpoint.update",
    WebhookEndpointDelete => "webhook_endpoint.delete",
    WebhookEndpointRotateSecret => "webhook_endpoint.rotate_secret",
    WebhookEndpointTest => "webhook_endpoint.test",
    WebhookEndpointDisable => "webhook_endpoint.disable",
    WebhookDeliveryList => "webhook_delivery.list",
    WebhookDeliver => "webhook.deliver",
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Self::Success),
            "denied" => Some(Self::Denied),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// 2xx/3xx success; 401, 403, 429 denied; anything else failed.
    pub fn for_status(status: u16) -> Self {
        match status {
            200..=399 => Self::Success,
            401 | 403 | 429 => Self::Denied,
            _ => Self::Failed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    ApiKey,
    Operator,
    System,
    Anonymous,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::Operator => "operator",
            Self::System => "system",
            Self::Anonymous => "anonymous",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "api_key" => Some(Self::ApiKey),
            "operator" => Some(Self::Operator),
            "system" => Some(Self::System),
            "anonymous" => Some(Self::Anonymous),
            _ => None,
        }
    }
}

/// What a caller gives to be recorded; the chain position is assigned on append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: AuditEventId,
    /// The company's public id, or [`PLATFORM_CHAIN`].
    pub chain: String,
    pub occurred_at: OffsetDateTime,
    pub actor_kind: ActorKind,
    /// Key id for `api_key`; none otherwise.
    pub actor_id: Option<String>,
    /// Key owner, operator name, or system component.
    pub actor_name: Option<String>,
    pub action: &'static str,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub outcome: Outcome,
    pub status: u16,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// Compact JSON, at most [`MAX_DETAILS_BYTES`].
    pub details: String,
}

impl AuditEntry {
    /// Bounded, printable details: oversized details are replaced by a marker.
    pub fn details_from(value: &serde_json::Value) -> String {
        let text = value.to_string();
        if text.len() <= MAX_DETAILS_BYTES {
            text
        } else {
            serde_json::json!({"truncated": true, "bytes": text.len()}).to_string()
        }
    }

    /// Truncated to [`MAX_USER_AGENT_CHARS`], control characters removed,
    /// any Paygate key redacted (before truncation, which could hide one).
    pub fn clean_user_agent(raw: &str) -> String {
        crate::key::redact_keys(raw).chars().filter(|c| !c.is_control()).take(MAX_USER_AGENT_CHARS).collect()
    }
}

/// A record in its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub entry: AuditEntry,
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

fn put(out: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        Some(bytes) => {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

fn text(s: &Option<String>) -> Option<&[u8]> {
    s.as_deref().map(str::as_bytes)
}

/// Canonical encoding v1 of a record at `seq` in its chain: each field in
/// this fixed order as a 4-byte big-endian length then its bytes (absent:
/// length `0xFFFFFFFF`, no bytes). Texts are UTF-8; numbers are decimal text.
///
/// 1 `paygate-audit-v1` · 2 chain · 3 seq · 4 id (`aud_…`) · 5 occurred_at
/// (Unix microseconds) · 6 actor kind · 7 actor id · 8 actor name · 9 action ·
/// 10 resource type · 11 resource id · 12 outcome · 13 HTTP status ·
/// 14 request id · 15 client address · 16 user agent · 17 details (JSON text
/// exactly as stored).
pub fn canonical(entry: &AuditEntry, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + entry.details.len());
    let micros = (entry.occurred_at.unix_timestamp_nanos() / 1_000).to_string();
    put(&mut out, Some(ENCODING_VERSION.as_bytes()));
    put(&mut out, Some(entry.chain.as_bytes()));
    put(&mut out, Some(seq.to_string().as_bytes()));
    put(&mut out, Some(entry.id.to_string().as_bytes()));
    put(&mut out, Some(micros.as_bytes()));
    put(&mut out, Some(entry.actor_kind.as_str().as_bytes()));
    put(&mut out, text(&entry.actor_id));
    put(&mut out, text(&entry.actor_name));
    put(&mut out, Some(entry.action.as_bytes()));
    put(&mut out, text(&entry.resource_type));
    put(&mut out, text(&entry.resource_id));
    put(&mut out, Some(entry.outcome.as_str().as_bytes()));
    put(&mut out, Some(entry.status.to_string().as_bytes()));
    put(&mut out, text(&entry.request_id));
    put(&mut out, text(&entry.client_ip));
    put(&mut out, text(&entry.user_agent));
    put(&mut out, Some(entry.details.as_bytes()));
    out
}

pub fn chain_hash(prev_hash: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(canonical);
    h.finalize().into()
}

impl AuditRecord {
    /// Places `entry` after a chain head (`prev_seq`, `prev_hash`).
    pub fn append(entry: AuditEntry, prev_seq: u64, prev_hash: [u8; 32]) -> Self {
        let seq = prev_seq + 1;
        let hash = chain_hash(&prev_hash, &canonical(&entry, seq));
        Self { entry, seq, prev_hash, hash }
    }

    /// Recomputes the hash from the stored fields.
    pub fn recomputed_hash(&self) -> [u8; 32] {
        chain_hash(&self.prev_hash, &canonical(&self.entry, self.seq))
    }
}

/// The bytes an Ed25519 checkpoint signs: version, chain, seq and head hash,
/// length-prefixed like the records.
pub fn checkpoint_message(chain: &str, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, Some(CHECKPOINT_VERSION.as_bytes()));
    put(&mut out, Some(chain.as_bytes()));
    put(&mut out, Some(seq.to_string().as_bytes()));
    put(&mut out, Some(hash));
    out
}

/// The audit signing key, held outside the database.
pub struct AuditSigner {
    key: SigningKey,
}

impl AuditSigner {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(bytes) }
    }

    pub fn generate_hex() -> zeroize::Zeroizing<String> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut bytes[..]).expect("the OS CSPRNG is available");
        zeroize::Zeroizing::new(hex::encode(&bytes[..]))
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// First 8 bytes of SHA-256(public key), hex: names the key in checkpoints.
    pub fn key_id(&self) -> String {
        key_id(&self.public_key())
    }

    pub fn sign(&self, chain: &str, seq: u64, hash: &[u8; 32]) -> [u8; 64] {
        self.key.sign(&checkpoint_message(chain, seq, hash)).to_bytes()
    }
}

pub fn key_id(public_key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

pub fn verify_checkpoint(public_key: &[u8; 32], chain: &str, seq: u64, hash: &[u8; 32], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else { return false };
    let Ok(signature) = Signature::from_slice(signature) else { return false };
    key.verify(&checkpoint_message(chain, seq, hash), &signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &'static str) -> AuditEntry {
        AuditEntry {
            id: AuditEventId::generate(),
            chain: "cmp_0000000000000000000001".into(),
            occurred_at: crate::now(),
            actor_kind: ActorKind::ApiKey,
            actor_id: Some("key_0000000000000000000002".into()),
            actor_name: Some("erp".into()),
            action,
            resource_type: Some("api_key".into()),
            resource_id: None,
            outcome: Outcome::Success,
            status: 200,
            request_id: Some("req_1".into()),
            client_ip: Some("203.0.113.7".into()),
            user_agent: Some("curl/8".into()),
            details: "{}".into(),
        }
    }

    #[test]
    fn chain_links_and_detects_changes() {
        let first = AuditRecord::append(entry("api_key.list"), 0, [0; 32]);
        let second = AuditRecord::append(entry("api_key.read"), first.seq, first.hash);
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(second.prev_hash, first.hash);
        assert_eq!(second.recomputed_hash(), second.hash);
        let mut tampered = second.clone();
        tampered.entry.status = 500;
        assert_ne!(tampered.recomputed_hash(), second.hash);
    }

    #[test]
    fn absent_and_empty_fields_encode_differently() {
        let mut a = entry("api_key.list");
        let mut b = a.clone();
        a.resource_id = None;
        b.resource_id = Some(String::new());
        assert_ne!(canonical(&a, 1), canonical(&b, 1));
        // Moving bytes between adjacent fields changes the encoding.
        let mut c = a.clone();
        c.actor_id = Some("key_0000000000000000000002e".into());
        c.actor_name = Some("rp".into());
        assert_ne!(canonical(&a, 1), canonical(&c, 1));
    }

    #[test]
    fn checkpoints_sign_and_verify() {
        let signer = AuditSigner::from_bytes(&[7; 32]);
        let sig = signer.sign("platform", 9, &[1; 32]);
        assert!(verify_checkpoint(&signer.public_key(), "platform", 9, &[1; 32], &sig));
        assert!(!verify_checkpoint(&signer.public_key(), "platform", 10, &[1; 32], &sig));
        assert!(!verify_checkpoint(&AuditSigner::from_bytes(&[8; 32]).public_key(), "platform", 9, &[1; 32], &sig));
        assert_eq!(signer.key_id().len(), 16);
    }

    #[test]
    fn user_agents_are_cleaned_and_details_bounded() {
        assert_eq!(AuditEntry::clean_user_agent("a\r\nb\u{1b}[31m"), "ab[31m");
        assert_eq!(AuditEntry::clean_user_agent(&"x".repeat(1000)).len(), 256);
        let big = serde_json::json!({"x": "y".repeat(5000)});
        assert!(AuditEntry::details_from(&big).contains("truncated"));
    }
}
