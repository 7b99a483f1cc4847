//! Settlement: the [`Rail`] interface, the simulated rail used in test mode,
//! and the payment worker every node runs (approval expiry, settlement steps,
//! idempotency record clean-up).
//!
//! All state lives in the payment rows: a step is taken by writing the next
//! status under the payment's revision, so two nodes (or a node restarted
//! mid-step) never take the same step twice. A real rail must be idempotent
//! by payment id: the worker records `processing` in the same write that
//! decides to submit, and a crash between that write and the submission is
//! resolved by asking the rail again with the same payment id.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use paygate_domain::audit::{ActorKind, AuditEntry, Outcome};
use paygate_domain::payment::{Payment, PaymentStatus, SettlementStep};
use paygate_domain::{CompanyId, KeyMode};
use paygate_store::{OperatorStore, operator_scope};
use tokio::sync::watch;

/// What the rail says should happen next to a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailDecision {
    pub step: SettlementStep,
    /// When to ask again (e.g. a completed payment that may still be returned).
    pub next_check: Option<Duration>,
}

#[async_trait]
pub trait Rail: Send + Sync {
    fn name(&self) -> &'static str;

    /// The next step for a payment in `approved`, `processing` or `completed`;
    /// `None` when nothing more will happen. Must not move money: it may run
    /// on several nodes for the same payment. For `approved` the step is
    /// `Submitted`, and the money moves only in [`Rail::submit`].
    async fn next_step(&self, payment: &Payment) -> anyhow::Result<Option<RailDecision>>;

    /// Hands the payment to the rail. Called only by the node whose write of
    /// `processing` won, after that write committed; must be idempotent by
    /// payment id (a crash after the write and before this call is followed,
    /// at the next step, by the rail saying it does not know the payment, and
    /// the worker submitting again). `account` is the decrypted account number.
    async fn submit(&self, payment: &Payment, account: &str) -> anyhow::Result<()>;
}

/// The test-mode rail. Outcomes follow the amount's last two digits (minor units):
///
/// | amount ends in | outcome |
/// |---|---|
/// | `13` | `failed`, reason `insufficient_funds` |
/// | `21` | `failed`, reason `invalid_account` |
/// | `66` | `completed`, then `returned` with reason `account_closed` |
/// | anything else | `completed` |
///
/// Approved payments reach it after `rail_submit_delay` (set when they are
/// approved); each later step comes `settle_delay` after the previous one.
pub struct SimulatedRail {
    pub settle_delay: Duration,
}

#[async_trait]
impl Rail for SimulatedRail {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn submit(&self, _payment: &Payment, _account: &str) -> anyhow::Result<()> {
        Ok(())
    }

    async fn next_step(&self, payment: &Payment) -> anyhow::Result<Option<RailDecision>> {
        let cents = payment.amount.minor_units() % 100;
        let decision = match payment.status {
            PaymentStatus::Approved => {
                RailDecision { step: SettlementStep::Submitted, next_check: Some(self.settle_delay) }
            }
            PaymentStatus::Processing => match cents {
                13 => RailDecision { step: SettlementStep::Failed("insufficient_funds".into()), next_check: None },
                21 => RailDecision { step: SettlementStep::Failed("invalid_account".into()), next_check: None },
                66 => RailDecision { step: SettlementStep::Completed, next_check: Some(self.settle_delay) },
                _ => RailDecision { step: SettlementStep::Completed, next_check: None },
            },
            PaymentStatus::Completed if cents == 66 => {
                RailDecision { step: SettlementStep::Returned("account_closed".into()), next_check: None }
            }
            _ => return Ok(None),
        };
        Ok(Some(decision))
    }
}

fn system_entry(component: &str, company: CompanyId, payment: &Payment, details: serde_json::Value) -> AuditEntry {
    let action = if payment.status == PaymentStatus::Expired { "payment.expire" } else { "payment.settle" };
    AuditEntry {
        id: paygate_domain::AuditEventId::generate(),
        chain: company.to_string(),
        occurred_at: paygate_domain::now(),
        actor_kind: ActorKind::System,
        actor_id: None,
        actor_name: Some(component.to_owned()),
        action,
        resource_type: Some("payment".into()),
        resource_id: Some(payment.id.to_string()),
        outcome: Outcome::Success,
        status: 200,
        request_id: None,
        client_ip: None,
        user_agent: None,
        details: AuditEntry::details_from(&details),
    }
}

pub struct PaymentWorker {
    pub store: Arc<dyn OperatorStore>,
    pub rail: Arc<dyn Rail>,
    pub data_key: Arc<paygate_domain::bank::DataKey>,
    pub interval: Duration,
}

impl PaymentWorker {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut purge_at = tokio::time::Instant::now();
        loop {
            if let Err(error) = self.tick().await {
                tracing::warn!(%error, "payment worker tick failed; retrying");
            }
            if tokio::time::Instant::now() >= purge_at {
                purge_at = tokio::time::Instant::now() + Duration::from_secs(600);
                match self.store.purge_idempotency(paygate_domain::now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "purged expired idempotency records"),
                    Err(error) => tracing::warn!(%error, "idempotency purge failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass over due payments. Returns how many steps this node took.
    pub async fn tick(&self) -> anyhow::Result<usize> {
        let now = paygate_domain::now();
        let due = self.store.due_payments(now, 200).await?;
        let mut taken = 0;
        for (company, payment) in due {
            let (id, mode) = (payment.id, payment.mode);
            match self.advance(company, payment, now).await {
                Ok(true) => taken += 1,
                Ok(false) => {}
                Err(error) => {
                    metrics::counter!("paygate_payment_step_failures_total").increment(1);
                    tracing::warn!(%error, company = %company, payment = %id, "payment step failed; retrying in 60 s");
                    if let Err(error) = self.defer(company, mode, id, &error.to_string()).await {
                        tracing::warn!(%error, payment = %id, "could not defer the failed payment step");
                    }
                }
            }
        }
        Ok(taken)
    }

    /// Moves a payment whose step failed to the back of the queue, so one
    /// broken payment cannot hold up the others, and records the failure.
    async fn defer(
        &self,
        company: CompanyId,
        mode: KeyMode,
        id: paygate_domain::PaymentId,
        error: &str,
    ) -> anyhow::Result<()> {
        let scope = operator_scope(self.store.as_ref(), company, mode);
        let Some(mut payment) = self.store.get_payment(&scope, id).await? else { return Ok(()) };
        let read_revision = payment.revision;
        payment.revision += 1;
        payment.rail_next_at = Some(paygate_domain::now() + Duration::from_secs(60));
        let mut record =
            system_entry("rail", company, &payment, serde_json::json!({"outcome": "retry_later", "error": error}));
        record.outcome = Outcome::Failed;
        self.store.update_payment(&scope, &payment, read_revision, &record).await?;
        Ok(())
    }

    async fn advance(
        &self,
        company: CompanyId,
        mut payment: Payment,
        now: time::OffsetDateTime,
    ) -> anyhow::Result<bool> {
        let scope = operator_scope(self.store.as_ref(), company, payment.mode);
        let read_revision = payment.revision;
        let previous = payment.status;
        let record = if payment.expire_if_due(now) {
            system_entry("approval_expiry", company, &payment, serde_json::json!({"previous_status": previous}))
        } else if payment.mode == KeyMode::Live {
            // No real rail exists yet: a live payment is never settled by pretending.
            tracing::warn!(payment = %payment.id, "live payment approved but no rail is configured; it stays approved");
            payment.rail_next_at = None;
            payment.revision += 1;
            system_entry("rail:none", company, &payment, serde_json::json!({"outcome": "no_rail_configured"}))
        } else {
            let Some(decision) = self.rail.next_step(&payment).await? else {
                payment.rail_next_at = None;
                payment.revision += 1;
                let record = system_entry("rail", company, &payment, serde_json::json!({"outcome": "nothing_due"}));
                return Ok(self.store.update_payment(&scope, &payment, read_revision, &record).await?);
            };
            payment.settle(decision.step.clone(), self.rail.name(), now)?;
            payment.rail_next_at = decision.next_check.map(|d| now + d);
            let reason = match &decision.step {
                SettlementStep::Failed(r) | SettlementStep::Returned(r) => Some(r.clone()),
                _ => None,
            };
            let record = system_entry(
                &format!("rail:{}", self.rail.name()),
                company,
                &payment,
                serde_json::json!({"previous_status": previous, "status": payment.status, "reason": reason}),
            );
            if decision.step == SettlementStep::Submitted {
                // Record `processing` first; only the node whose write won submits.
                if !self.store.update_payment(&scope, &payment, read_revision, &record).await? {
                    return Ok(false);
                }
                let sealed = self.store.payee_sealed_account(&scope, payment.payee_id).await?.ok_or_else(|| {
                    anyhow::anyhow!("payee {} of payment {} is missing", payment.payee_id, payment.id)
                })?;
                let account = self.data_key.open(&sealed, company, &payment.payee_id.to_string())?;
                self.rail.submit(&payment, &account).await?;
                tracing::info!(payment = %payment.id, from = previous.as_str(), "payment submitted to the rail");
                return Ok(true);
            }
            record
        };
        let written = self.store.update_payment(&scope, &payment, read_revision, &record).await?;
        if written {
            tracing::info!(payment = %payment.id, from = previous.as_str(), to = payment.status.as_str(), "payment advanced");
        }
        Ok(written)
    }
}
