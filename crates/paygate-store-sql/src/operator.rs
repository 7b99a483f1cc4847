//! Platform-wide operations: companies, operator key changes, background
//! workers (due payments, deliveries, expiry notices) and audit verification.

use async_trait::async_trait;
use paygate_domain::audit::{AuditEntry, AuditRecord};
use paygate_domain::payment::Payment;
use paygate_domain::{ApiKeyId, CompanyId, CompanyStatus, EventType, KeyPolicy, RateLimitOverride};
use paygate_domain::{WebhookDeliveryId, WebhookEndpointId};
use paygate_store::{
    ApiKey, Checkpoint, Company, DeliveryJob, DeliveryResult, DeliveryStatus, NewCompany, NewEvent, NextStep,
    OperatorStore, StoreResult,
};
use time::OffsetDateTime;

use crate::audit::{AUDIT_COLUMNS, CHECKPOINT_SELECT, append_in, audit_from_row, checkpoint_from_row, commit_change};
use crate::events::{ENDPOINT_COLUMNS, endpoint_from_row, event_from_columns, write_events};
use crate::keys::{COMPANY_SELECT, bump_auth_revision, company_from_row, key_from_row, key_in, key_select};
use crate::payments::{PAYMENT_COLUMNS, payment_from_row};
use crate::{Dialect, Row, Sql, SqlStore, execute, optional};

impl<D: Dialect> SqlStore<D> {
    /// Runs `update` (on one company or key) in a transaction with `audit`,
    /// bumping the auth revision when `bump`. `false` if it changed no row.
    async fn operator_change(&self, update: Sql, bump: bool, audit: &AuditEntry) -> StoreResult<bool> {
        let mut tx = self.db.begin().await?;
        if execute::<D>(&mut tx, update).await? == 0 {
            return Ok(false);
        }
        if bump {
            bump_auth_revision::<D>(&mut tx).await?;
        }
        commit_change::<D>(tx, audit).await?;
        Ok(true)
    }

    async fn company_after(&self, changed: bool, id: CompanyId) -> StoreResult<Option<Company>> {
        if !changed {
            return Ok(None);
        }
        self.find_company_by_id(id).await
    }
}

#[async_trait]
impl<D: Dialect> OperatorStore for SqlStore<D> {
    async fn migrate(&self) -> StoreResult<()> {
        self.db.migrate().await
    }

    async fn create_company(&self, new: NewCompany, audit: &AuditEntry) -> StoreResult<Company> {
        let company = Company {
            id: new.id,
            name: new.name.into_string(),
            status: CompanyStatus::Active,
            created_at: new.created_at,
            key_policy: KeyPolicy::default(),
            demo: new.demo,
            rate_limit: None,
        };
        let sql = Sql::new("INSERT INTO companies (id, name, status, created_at, demo) VALUES ($1, $2, $3, $4, $5)")
            .bind(company.id.as_uuid())
            .bind(company.name.as_str())
            .bind(company.status.as_str())
            .bind(company.created_at)
            .bind(company.demo);
        self.operator_change(sql, false, audit).await?;
        Ok(company)
    }

    async fn list_companies(&self) -> StoreResult<Vec<Company>> {
        self.read_all(Sql::new(format!("{COMPANY_SELECT} ORDER BY id DESC")))
            .await?
            .iter()
            .map(company_from_row)
            .collect()
    }

    async fn find_company(&self, id: CompanyId) -> StoreResult<Option<Company>> {
        self.find_company_by_id(id).await
    }

    async fn set_company_status(
        &self,
        id: CompanyId,
        status: CompanyStatus,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>> {
        let sql = Sql::new("UPDATE companies SET status = $1 WHERE id = $2").bind(status.as_str()).bind(id.as_uuid());
        let changed = self.operator_change(sql, true, audit).await?;
        self.company_after(changed, id).await
    }

    async fn set_key_policy(
        &self,
        id: CompanyId,
        policy: KeyPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>> {
        let sql =
            Sql::new("UPDATE companies SET key_default_lifetime_secs = $1, key_max_lifetime_secs = $2 WHERE id = $3")
                .bind(policy.default_lifetime.map(|d| d.whole_seconds()))
                .bind(policy.max_lifetime.map(|d| d.whole_seconds()))
                .bind(id.as_uuid());
        let changed = self.operator_change(sql, false, audit).await?;
        self.company_after(changed, id).await
    }

    async fn set_key_rate_limit(
        &self,
        id: ApiKeyId,
        limit: Option<RateLimitOverride>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        let mut tx = self.db.begin().await?;
        let sql = Sql::new("UPDATE api_keys SET rate_limit_rate = $1, rate_limit_burst = $2 WHERE id = $3")
            .bind(limit.map(|l| i64::from(l.rate)))
            .bind(limit.map(|l| i64::from(l.burst)))
            .bind(id.as_uuid());
        if execute::<D>(&mut tx, sql).await? == 0 {
            return Ok(None);
        }
        bump_auth_revision::<D>(&mut tx).await?;
        let key = key_in::<D>(&mut tx, None, id).await?;
        commit_change::<D>(tx, audit).await?;
        Ok(key)
    }

    async fn set_company_rate_limit(
        &self,
        id: CompanyId,
        limit: Option<RateLimitOverride>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Company>> {
        let sql = Sql::new("UPDATE companies SET rate_limit_rate = $1, rate_limit_burst = $2 WHERE id = $3")
            .bind(limit.map(|l| i64::from(l.rate)))
            .bind(limit.map(|l| i64::from(l.burst)))
            .bind(id.as_uuid());
        let changed = self.operator_change(sql, true, audit).await?;
        self.company_after(changed, id).await
    }

    async fn revoke_api_key_by_id(
        &self,
        id: ApiKeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<ApiKey>> {
        self.revoke(None, id, at, audit).await
    }

    async fn due_payments(&self, now: OffsetDateTime, limit: u32) -> StoreResult<Vec<(CompanyId, Payment)>> {
        // Two index range scans (one per partial index), oldest deadline first,
        // rather than one OR that the planner may answer with a table scan.
        let sql = Sql::new(format!(
            "SELECT * FROM (SELECT {PAYMENT_COLUMNS} FROM payments WHERE status = 'pending_approval' \
             AND approval_expires_at <= $1 ORDER BY approval_expires_at LIMIT $2) AS expiring \
             UNION ALL SELECT * FROM (SELECT {PAYMENT_COLUMNS} FROM payments WHERE rail_next_at IS NOT NULL \
             AND rail_next_at <= $1 ORDER BY rail_next_at LIMIT $2) AS settling"
        ))
        .bind(now)
        .bind(i64::from(limit));
        let rows = self.read_all(sql).await?;
        rows.iter().map(|row| Ok((CompanyId::from_uuid(row.get("company_id")?), payment_from_row(row)?))).collect()
    }

    async fn purge_idempotency(&self, now: OffsetDateTime) -> StoreResult<u64> {
        // In slices: each holds its locks (SQLite: the write lock) only briefly.
        let mut total = 0;
        loop {
            let mut tx = self.db.begin().await?;
            let sql = Sql::new(
                "DELETE FROM idempotency_keys WHERE (company_id, mode, key) IN \
                 (SELECT company_id, mode, key FROM idempotency_keys WHERE expires_at < $1 LIMIT 1000)",
            )
            .bind(now);
            let n = execute::<D>(&mut tx, sql).await?;
            D::commit(tx).await?;
            total += n;
            if n < 1000 {
                return Ok(total);
            }
        }
    }

    async fn audit_chains(&self) -> StoreResult<Vec<String>> {
        // Every chain any table knows of: a chain whose head row went missing
        // is still verified.
        let sql = Sql::new(
            "SELECT chain FROM audit_heads UNION SELECT DISTINCT chain FROM audit_events \
             UNION SELECT DISTINCT chain FROM audit_checkpoints ORDER BY 1",
        );
        self.read_all(sql).await?.iter().map(|row| row.get("chain")).collect()
    }

    async fn audit_records(&self, chain: &str, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditRecord>> {
        let sql = Sql::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(chain)
        .bind(after_seq as i64)
        .bind(i64::from(limit));
        self.read_all(sql).await?.iter().map(audit_from_row).collect()
    }

    async fn audit_checkpoints(&self, chain: &str) -> StoreResult<Vec<Checkpoint>> {
        let sql = Sql::new(format!("{CHECKPOINT_SELECT} WHERE chain = $1 ORDER BY seq")).bind(chain);
        self.read_all(sql).await?.iter().map(checkpoint_from_row).collect()
    }

    async fn add_checkpoint(&self, checkpoint: &Checkpoint) -> StoreResult<()> {
        let sql = Sql::new(
            "INSERT INTO audit_checkpoints (chain, seq, hash, signed_at, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(checkpoint.chain.as_str())
        .bind(checkpoint.seq as i64)
        .bind(&checkpoint.hash[..])
        .bind(checkpoint.signed_at)
        .bind(checkpoint.key_id.as_str())
        .bind(checkpoint.signature.clone());
        execute::<D>(&mut *self.read().await?, sql).await?;
        Ok(())
    }

    async fn checkpointed_seqs(&self) -> StoreResult<Vec<(String, u64)>> {
        let sql = Sql::new("SELECT chain, MAX(seq) AS seq FROM audit_checkpoints GROUP BY chain");
        self.read_all(sql).await?.iter().map(|row| Ok((row.get("chain")?, row.get("seq")?))).collect()
    }

    async fn audit_heads(&self) -> StoreResult<Vec<(String, u64, [u8; 32])>> {
        let sql = Sql::new("SELECT chain, seq, hash FROM audit_heads WHERE seq > 0 ORDER BY chain");
        self.read_all(sql)
            .await?
            .iter()
            .map(|row| Ok((row.get("chain")?, row.get("seq")?, row.hash("hash")?)))
            .collect()
    }

    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let rows = self.db.claim_deliveries(now, owner, lease_until, limit).await?;
        rows.into_iter()
            .map(|row| {
                let row = Row::<D>(row);
                Ok(DeliveryJob {
                    delivery_id: WebhookDeliveryId::from_uuid(row.get("id")?),
                    endpoint_id: WebhookEndpointId::from_uuid(row.get("endpoint_id")?),
                    url: row.get("url")?,
                    secret_sealed: row.get("secret_sealed")?,
                    previous_secret_sealed: row.get("previous_secret_sealed")?,
                    event: event_from_columns(&row, "event_id")?,
                    attempt: row.get::<u32>("attempts")? + 1,
                })
            })
            .collect()
    }

    async fn finish_delivery(
        &self,
        result: &DeliveryResult,
        audit: &AuditEntry,
        disable_audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let a = &result.attempt;
        let (status, next_at) = match result.next {
            NextStep::Succeeded => (DeliveryStatus::Succeeded, None),
            NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(at)),
            NextStep::GiveUp => (DeliveryStatus::Failed, None),
        };
        let mut tx = self.db.begin().await?;
        if D::ROW_LOCKS {
            // The endpoint row first, then the delivery: the order a deletion of
            // the endpoint (cascading to its deliveries) takes them in.
            let sql = Sql::new(
                "SELECT w.id FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                 WHERE d.id = $1 FOR NO KEY UPDATE OF w",
            )
            .bind(result.delivery_id.as_uuid());
            if optional::<D>(&mut tx, sql).await?.is_none() {
                return Ok(false);
            }
        }
        let sql = Sql::new(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, status = $1, next_attempt_at = $2, \
             lease_owner = NULL, lease_until = NULL, updated_at = $3 \
             WHERE id = $4 AND lease_owner = $5 AND status = 'pending' RETURNING endpoint_id, company_id, attempts",
        )
        .bind(status.as_str())
        .bind(next_at)
        .bind(a.attempted_at)
        .bind(result.delivery_id.as_uuid())
        .bind(result.lease_owner.as_str());
        let Some(row) = optional::<D>(&mut tx, sql).await? else { return Ok(false) };
        let endpoint_id = WebhookEndpointId::from_uuid(row.get("endpoint_id")?);
        let attempt_no: i64 = row.get("attempts")?;
        let sql = Sql::new(
            "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, latency_ms, error) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(result.delivery_id.as_uuid())
        .bind(attempt_no)
        .bind(a.attempted_at)
        .bind(a.status_code.map(i64::from))
        .bind(i64::from(a.latency_ms))
        .bind(a.error.clone());
        execute::<D>(&mut tx, sql).await?;
        let succeeded = result.next == NextStep::Succeeded;
        let sql = Sql::new(
            "UPDATE webhook_endpoints SET failing_since = CASE WHEN $1 THEN NULL ELSE COALESCE(failing_since, $2) END \
             WHERE id = $3 RETURNING failing_since",
        )
        .bind(succeeded)
        .bind(a.attempted_at)
        .bind(endpoint_id.as_uuid());
        let failing_since: Option<OffsetDateTime> = match optional::<D>(&mut tx, sql).await? {
            Some(row) => row.get("failing_since")?,
            None => None,
        };
        let reason = result
            .disable
            .or_else(|| failing_since.filter(|since| *since <= result.disable_if_failing_since).map(|_| "failing"));
        let mut records = vec![audit.clone()];
        if let Some(reason) = reason {
            let sql = Sql::new(format!(
                "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = $1, updated_at = $2 \
                 WHERE id = $3 AND enabled = TRUE RETURNING {ENDPOINT_COLUMNS}"
            ))
            .bind(reason)
            .bind(a.attempted_at)
            .bind(endpoint_id.as_uuid());
            if let Some(row) = optional::<D>(&mut tx, sql).await? {
                let endpoint = endpoint_from_row(&row)?;
                let event = NewEvent::webhook_endpoint(EventType::WebhookEndpointDisabled, &endpoint, Some("enabled"));
                write_events::<D>(&mut tx, vec![event]).await?;
                records.push(disable_audit.clone());
            }
        }
        append_in::<D>(&mut tx, &records).await?;
        D::commit(tx).await?;
        Ok(true)
    }

    async fn expiring_keys(&self, now: OffsetDateTime, until: OffsetDateTime, limit: u32) -> StoreResult<Vec<ApiKey>> {
        let sql = Sql::new(key_select(
            "",
            "WHERE k.revoked_at IS NULL AND k.replaced_by IS NULL AND k.expiry_noticed_at IS NULL \
             AND k.expires_at > $1 AND k.expires_at <= $2 ORDER BY k.expires_at LIMIT $3",
        ))
        .bind(now)
        .bind(until)
        .bind(i64::from(limit));
        self.read_all(sql).await?.iter().map(key_from_row).collect()
    }

    async fn note_key_expiring(&self, id: ApiKeyId, audit: &AuditEntry) -> StoreResult<bool> {
        let mut tx = self.db.begin().await?;
        // The update locks the key row: another node noting it waits, then changes nothing.
        let sql = Sql::new("UPDATE api_keys SET expiry_noticed_at = $1 WHERE id = $2 AND expiry_noticed_at IS NULL")
            .bind(paygate_domain::now())
            .bind(id.as_uuid());
        if execute::<D>(&mut tx, sql).await? == 0 {
            return Ok(false);
        }
        let Some(key) = key_in::<D>(&mut tx, None, id).await? else { return Ok(false) };
        let event = NewEvent::api_key(EventType::ApiKeyExpiring, &key, None);
        crate::events::commit_with_events::<D>(tx, audit, vec![event]).await?;
        Ok(true)
    }
}
