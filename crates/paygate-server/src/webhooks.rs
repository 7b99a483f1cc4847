//! The webhook delivery worker every node runs, and the key-expiry notices.
//!
//! All delivery state lives in the database: a node leases due deliveries
//! (the lease outlives one attempt's timeout), attempts them, and records each
//! outcome under its lease. A node killed mid-attempt loses nothing: the lease
//! runs out and any node attempts the delivery again (at least once). Per
//! endpoint, one object's events go out in sequence order: the store hands
//! out a delivery only when no earlier one of the same object is pending.

use std::sync::Arc;
use std::time::Duration;

use paygate_domain::audit::{ActorKind, AuditEntry, Outcome};
use paygate_domain::bank::DataKey;
use paygate_domain::webhook::{WebhookSecret, signature_header};
use paygate_store::{DeliveryAttempt, DeliveryJob, DeliveryResult, NextStep, OperatorStore};
use tokio::sync::watch;

use crate::config::Webhooks;
use crate::webhook_client::{Attempt, WebhookClient};

/// Keys expiring within this time get their `api_key.expiring` event.
pub const EXPIRY_NOTICE: time::Duration = time::Duration::days(7);
const EXPIRY_SCAN_EVERY: Duration = Duration::from_secs(60);

pub struct DeliveryWorker {
    pub store: Arc<dyn OperatorStore>,
    pub client: WebhookClient,
    pub data_key: Arc<DataKey>,
    pub config: Webhooks,
    /// This node's lease owner name (random per process).
    pub node: String,
}

fn system_entry(
    company: &str,
    action: &'static str,
    endpoint: &str,
    outcome: Outcome,
    status: u16,
    details: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        id: paygate_domain::AuditEventId::generate(),
        chain: company.to_owned(),
        occurred_at: paygate_domain::now(),
        actor_kind: ActorKind::System,
        actor_id: None,
        actor_name: Some("webhook_worker".to_owned()),
        action,
        resource_type: Some("webhook_endpoint".into()),
        resource_id: Some(endpoint.to_owned()),
        outcome,
        status,
        request_id: None,
        client_ip: None,
        user_agent: None,
        details: AuditEntry::details_from(&details),
    }
}

impl DeliveryWorker {
    /// Keeps up to `concurrency` attempts in flight: a slot that frees is
    /// refilled at once, so a slow attempt holds one slot, not a whole round.
    /// On stop it claims nothing more and lets the attempts in flight finish
    /// (bounded by the attempt timeout), so a graceful restart records them.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut in_flight = tokio::task::JoinSet::new();
        let mut ticker = tokio::time::interval(this.config.worker_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry = tokio::time::interval(EXPIRY_SCAN_EVERY);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A claim ranks the due backlog: after an attempt ends, claim again
        // once half the slots are free (or at the next tick), not per attempt.
        let refill_at = (this.config.concurrency as usize).div_ceil(2);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {
                    while in_flight.try_join_next().is_some() {}
                    let free = (this.config.concurrency as usize).saturating_sub(in_flight.len());
                    if free < refill_at && !in_flight.is_empty() {
                        continue;
                    }
                }
                _ = expiry.tick() => {
                    this.notice_expiring_keys().await;
                    continue;
                }
                _ = stopped.changed() => {}
            }
            if *stopped.borrow() {
                break;
            }
            let free = (this.config.concurrency as usize).saturating_sub(in_flight.len());
            if free == 0 {
                continue;
            }
            for job in this.claim(free as u32).await {
                in_flight.spawn(this.clone().deliver(job));
            }
            metrics::gauge!("paygate_webhook_deliveries_in_flight").set(in_flight.len() as f64);
        }
        let grace = this.config.timeout + this.config.connect_timeout + Duration::from_secs(1);
        let drained = tokio::time::timeout(grace, async { while in_flight.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = in_flight.len(),
                "webhook attempts still running at shutdown; their leases will expire"
            );
        }
        metrics::gauge!("paygate_webhook_deliveries_in_flight").set(0.0);
    }

    async fn claim(&self, limit: u32) -> Vec<DeliveryJob> {
        let now = paygate_domain::now();
        let lease = self.config.timeout + self.config.connect_timeout + Duration::from_secs(10);
        let lease_until = now + time::Duration::try_from(lease).unwrap_or(time::Duration::minutes(1));
        match self.store.claim_deliveries(now, &self.node, lease_until, limit).await {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(%error, "webhook delivery claim failed");
                Vec::new()
            }
        }
    }

    fn secrets(&self, job: &DeliveryJob) -> Result<Vec<WebhookSecret>, &'static str> {
        let open = |sealed: &[u8]| {
            self.data_key
                .open_webhook_secret(sealed, job.event.company_id, &job.endpoint_id.to_string())
                .ok()
                .and_then(|bytes| WebhookSecret::from_bytes(&bytes))
        };
        let mut secrets = vec![open(&job.secret_sealed).ok_or("secret_unreadable")?];
        // A previous secret that cannot be opened is skipped: the current one still signs.
        secrets.extend(job.previous_secret_sealed.as_deref().and_then(open));
        Ok(secrets)
    }

    async fn deliver(self: Arc<Self>, job: DeliveryJob) {
        let attempted_at = paygate_domain::now();
        let body = job.event.to_json();
        let Ok(secrets) = self.secrets(&job) else {
            // This node's data key is wrong: not the endpoint's fault. Nothing is
            // recorded; the lease runs out and a correctly configured node delivers.
            metrics::counter!("paygate_webhook_secret_unreadable_total").increment(1);
            tracing::error!(endpoint = %job.endpoint_id, "webhook secret does not open with this node's data key");
            return;
        };
        let msg_id = job.event.id.to_string();
        let timestamp = attempted_at.unix_timestamp();
        let refs: Vec<&WebhookSecret> = secrets.iter().collect();
        let headers = [
            ("webhook-id", msg_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature_header(&refs, &msg_id, timestamp, body.as_bytes())),
        ];
        let attempt = self.client.post(&job.url, &headers, body.into()).await;
        self.record(job, attempted_at, attempt).await;
    }

    async fn record(&self, job: DeliveryJob, attempted_at: time::OffsetDateTime, attempt: Attempt) {
        let endpoint = job.endpoint_id.to_string();
        let gone = attempt.status == Some(410);
        let next = if attempt.succeeded() {
            NextStep::Succeeded
        } else if gone {
            NextStep::GiveUp
        } else {
            match self.config.retry_schedule.delay_before(job.attempt + 1) {
                Some(delay) => NextStep::RetryAt(
                    paygate_domain::now() + time::Duration::try_from(delay).unwrap_or(time::Duration::hours(1)),
                ),
                None => NextStep::GiveUp,
            }
        };
        let reason = attempt.error.as_ref().map(|e| e.reason).unwrap_or("none");
        // The company sees the reason, and the detail only of what its own
        // receiver said (a status, a timeout): what the network said about
        // other hosts and ports stays in this node's log.
        let error = attempt.error.as_ref().map(|e| match e.reason {
            "http_status" | "timeout" => format!("{}: {}", e.reason, e.detail),
            "address_not_allowed" => "address_not_allowed: the endpoint's address is not allowed".to_owned(),
            "tls" => "tls: the TLS handshake with the endpoint failed".to_owned(),
            reason => format!("{reason}: could not reach the endpoint"),
        });
        let latency_ms = u32::try_from(attempt.latency.as_millis()).unwrap_or(u32::MAX);
        if attempt.succeeded() {
            metrics::counter!("paygate_webhook_deliveries_total", "result" => "succeeded").increment(1);
        } else {
            metrics::counter!("paygate_webhook_deliveries_total", "result" => "failed").increment(1);
            // Endpoints are bounded per company (MAX_ENDPOINTS), so this label is too.
            metrics::counter!("paygate_webhook_delivery_failures_total", "endpoint" => endpoint.clone(), "reason" => reason)
                .increment(1);
            let detail = attempt.error.as_ref().map(|e| e.detail.as_str()).unwrap_or("");
            tracing::info!(endpoint = %endpoint, event = %job.event.id, attempt = job.attempt, reason, detail, "webhook delivery failed");
        }
        let company = job.event.company_id.to_string();
        let outcome = if attempt.succeeded() { Outcome::Success } else { Outcome::Failed };
        let audit = system_entry(
            &company,
            "webhook.deliver",
            &endpoint,
            outcome,
            attempt.status.unwrap_or(0),
            serde_json::json!({
                "event_id": job.event.id.to_string(),
                "event_type": job.event.kind.as_str(),
                "delivery_id": job.delivery_id.to_string(),
                "attempt": job.attempt,
                "status_code": attempt.status,
                "latency_ms": latency_ms,
                "error": reason,
                "next": match next {
                    NextStep::Succeeded => "succeeded".to_owned(),
                    NextStep::GiveUp => "gave_up".to_owned(),
                    NextStep::RetryAt(at) => paygate_store::views::rfc3339(at),
                },
            }),
        );
        let disable = gone.then_some("gone");
        let disable_audit = system_entry(
            &company,
            "webhook_endpoint.disable",
            &endpoint,
            Outcome::Success,
            200,
            serde_json::json!({ "reason": disable.unwrap_or("failing") }),
        );
        let disable_after = time::Duration::try_from(self.config.disable_after).unwrap_or(time::Duration::days(5));
        let result = DeliveryResult {
            delivery_id: job.delivery_id,
            lease_owner: self.node.clone(),
            attempt: DeliveryAttempt { attempted_at, status_code: attempt.status, latency_ms, error },
            next,
            disable,
            disable_if_failing_since: attempted_at - disable_after,
        };
        match self.store.finish_delivery(&result, &audit, &disable_audit).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(delivery = %job.delivery_id, "webhook delivery lease lost; outcome not recorded")
            }
            // The lease runs out and the delivery is attempted again: at least once.
            Err(error) => tracing::warn!(%error, delivery = %job.delivery_id, "recording a webhook delivery failed"),
        }
    }

    async fn notice_expiring_keys(&self) {
        let now = paygate_domain::now();
        let keys = match self.store.expiring_keys(now, now + EXPIRY_NOTICE, 100).await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(%error, "expiring key scan failed");
                return;
            }
        };
        for key in keys {
            let mut audit = system_entry(
                &key.company_id.to_string(),
                "api_key.expiry_notice",
                "",
                Outcome::Success,
                200,
                serde_json::json!({ "expires_at": key.expires_at.map(paygate_store::views::rfc3339) }),
            );
            audit.actor_name = Some("key_expiry".to_owned());
            audit.resource_type = Some("api_key".into());
            audit.resource_id = Some(key.id.to_string());
            if let Err(error) = self.store.note_key_expiring(key.id, &audit).await {
                tracing::warn!(%error, key = %key.id, "writing an expiry notice failed");
            }
        }
    }
}
