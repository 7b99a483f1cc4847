//! What every handler and middleware can reach: the store, authentication,
//! limits, the audit writer and the keys and settings the routes need.

use std::sync::Arc;
use std::time::Duration;

use paygate_store::Store;
use paygate_store::auth::Authenticator;

use crate::{audit, limits, payment_writer};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<limits::RateLimits>,
    pub audit: audit::AuditWriter,
    /// The Ed25519 public key that verifies this deployment's checkpoints.
    pub audit_public_key: [u8; 32],
    /// Encrypts payees' account numbers and computes their fingerprints.
    pub data_key: Arc<paygate_domain::bank::DataKey>,
    /// Group commit of payment creations.
    pub payments: payment_writer::PaymentWriter,
    /// How long an approved test-mode payment waits before the simulated
    /// rail picks it up.
    pub rail_submit_delay: Duration,
    /// Which addresses webhook endpoint URLs may name (operator allow-list).
    pub webhook_addresses: Arc<paygate_domain::webhook::AddressPolicy>,
}
