//! Payees, payments, approval policy and idempotency records on PostgreSQL.

use paygate_domain::audit::AuditEntry;
use paygate_domain::payment::{ApprovalPolicy, Payment};
use paygate_domain::{CompanyId, KeyMode, PayeeId, PaymentId};
use paygate_store::{
    CompanyScope, NewPayee, Page, PageRequest, Payee, PayeeColumns, PayeeStatus, PaymentColumns, PaymentCreate,
    PaymentCreated, PaymentFilter, StoreError, StoreResult, StoredResponse, date_text, payment_doc, policy_from_text,
    policy_text,
};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{PostgresStore, append_in, commit_change, corrupt, get, map_err};

const PAYEE_COLUMNS: &str =
    "id, mode, name, kind, email, bank_account, metadata, status, created_at, disabled_at, created_by FROM payees";
const PAYMENT_COLUMNS: &str = "id, company_id, mode, payee_id, amount, currency, reference, requested_execution_date, \
     status, version, revision, approval_expires_at, rail_next_at, created_at, updated_at, doc FROM payments";

fn payee_from_row(row: &PgRow) -> StoreResult<Payee> {
    PayeeColumns {
        id: get(row, "id")?,
        mode: get(row, "mode")?,
        name: get(row, "name")?,
        kind: get(row, "kind")?,
        email: get(row, "email")?,
        bank_account: get(row, "bank_account")?,
        metadata: get(row, "metadata")?,
        status: get(row, "status")?,
        created_at: get(row, "created_at")?,
        disabled_at: get(row, "disabled_at")?,
        created_by: get(row, "created_by")?,
    }
    .into_payee()
}

fn payment_from_row(row: &PgRow) -> StoreResult<Payment> {
    PaymentColumns {
        id: get(row, "id")?,
        mode: get(row, "mode")?,
        payee_id: get(row, "payee_id")?,
        amount: get(row, "amount")?,
        currency: get(row, "currency")?,
        reference: get(row, "reference")?,
        requested_execution_date: get(row, "requested_execution_date")?,
        status: get(row, "status")?,
        version: get(row, "version")?,
        revision: get(row, "revision")?,
        approval_expires_at: get(row, "approval_expires_at")?,
        rail_next_at: get(row, "rail_next_at")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
        doc: get(row, "doc")?,
    }
    .into_payment()
}

async fn insert_payment(conn: &mut PgConnection, company: CompanyId, p: &Payment) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO payments (id, company_id, mode, payee_id, amount, currency, reference, requested_execution_date, \
         status, version, revision, approval_expires_at, rail_next_at, created_at, updated_at, doc) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(p.id.as_uuid())
    .bind(company.as_uuid())
    .bind(p.mode.as_str())
    .bind(p.payee_id.as_uuid())
    .bind(p.amount.minor_units() as i64)
    .bind(p.currency.code())
    .bind(&p.reference)
    .bind(p.requested_execution_date.map(date_text))
    .bind(p.status.as_str())
    .bind(p.version as i64)
    .bind(p.revision as i64)
    .bind(p.approval_expires_at)
    .bind(p.rail_next_at)
    .bind(p.created_at)
    .bind(p.updated_at)
    .bind(payment_doc(p))
    .execute(conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn savepoint(conn: &mut PgConnection, sql: &'static str) -> StoreResult<()> {
    sqlx::query(sql).execute(conn).await.map_err(map_err).map(|_| ())
}

/// One item of a payment batch, inside its savepoint. Another node may claim
/// the same key between the check and the insert: the insert then waits for
/// it and finds the key taken (`ON CONFLICT DO NOTHING`), and the savepoint
/// undoes this item's payment.
async fn create_one(conn: &mut PgConnection, item: &PaymentCreate) -> StoreResult<PaymentCreated> {
    let company = item.scope.company_id();
    if let Some(existing) = stored_response(&mut *conn, company, item.mode, &item.idempotency_key).await? {
        return Ok(PaymentCreated::Existing(existing));
    }
    let payee: Option<String> =
        sqlx::query_scalar("SELECT status FROM payees WHERE id = $1 AND company_id = $2 AND mode = $3 FOR SHARE")
            .bind(item.payment.payee_id.as_uuid())
            .bind(company.as_uuid())
            .bind(item.mode.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
    match payee.as_deref() {
        None => return Ok(PaymentCreated::PayeeNotFound),
        Some("active") => {}
        Some(_) => return Ok(PaymentCreated::PayeeDisabled),
    }
    insert_payment(conn, company, &item.payment).await?;
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (company_id, mode, key, fingerprint, response_status, response_body, \
         payment_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    )
    .bind(company.as_uuid())
    .bind(item.mode.as_str())
    .bind(&item.idempotency_key)
    .bind(&item.response.fingerprint)
    .bind(item.response.status as i32)
    .bind(&item.response.body)
    .bind(item.payment.id.as_uuid())
    .bind(item.payment.created_at)
    .bind(item.expires_at)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?
    .rows_affected();
    if claimed == 0 {
        let existing = stored_response(conn, company, item.mode, &item.idempotency_key).await?;
        return existing.map(PaymentCreated::Existing).ok_or_else(|| StoreError::Internal("idempotency race".into()));
    }
    Ok(PaymentCreated::Created)
}

async fn stored_response(
    conn: &mut PgConnection,
    company: CompanyId,
    mode: KeyMode,
    key: &str,
) -> StoreResult<Option<StoredResponse>> {
    let row = sqlx::query(
        "SELECT fingerprint, response_status, response_body, payment_id FROM idempotency_keys \
         WHERE company_id = $1 AND mode = $2 AND key = $3",
    )
    .bind(company.as_uuid())
    .bind(mode.as_str())
    .bind(key)
    .fetch_optional(conn)
    .await
    .map_err(map_err)?;
    row.map(|row| {
        Ok(StoredResponse {
            fingerprint: get(&row, "fingerprint")?,
            status: u16::try_from(get::<i32>(&row, "response_status")?).map_err(|e| corrupt("status", e))?,
            body: get(&row, "response_body")?,
            payment_id: PaymentId::from_uuid(get(&row, "payment_id")?),
        })
    })
    .transpose()
}

impl PostgresStore {
    pub(crate) async fn approval_policy_of(&self, scope: &CompanyScope, mode: KeyMode) -> StoreResult<ApprovalPolicy> {
        let text: Option<String> =
            sqlx::query_scalar("SELECT policy FROM approval_policies WHERE company_id = $1 AND mode = $2")
                .bind(scope.company_id().as_uuid())
                .bind(mode.as_str())
                .fetch_optional(self.pool())
                .await
                .map_err(map_err)?;
        policy_from_text(text)
    }

    pub(crate) async fn write_approval_policy(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        policy: &ApprovalPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO approval_policies (company_id, mode, policy) VALUES ($1, $2, $3) \
             ON CONFLICT (company_id, mode) DO UPDATE SET policy = excluded.policy",
        )
        .bind(scope.company_id().as_uuid())
        .bind(mode.as_str())
        .bind(policy_text(policy))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        commit_change(tx, audit).await
    }

    pub(crate) async fn insert_payee(
        &self,
        scope: &CompanyScope,
        new: &NewPayee,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        let p = &new.payee;
        let (bank_account, metadata, created_by) = p.json_columns();
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO payees (id, company_id, mode, name, kind, email, bank_account, fingerprint, account_sealed, \
             metadata, status, created_at, disabled_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13)",
        )
        .bind(p.id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(p.mode.as_str())
        .bind(&p.name)
        .bind(p.kind.as_str())
        .bind(&p.email)
        .bind(bank_account)
        .bind(&p.bank_account.fingerprint)
        .bind(&new.sealed_account)
        .bind(metadata)
        .bind(p.status.as_str())
        .bind(p.created_at)
        .bind(created_by)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        commit_change(tx, audit).await
    }

    pub(crate) async fn payees_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        status: Option<PayeeStatus>,
        page: PageRequest<PayeeId>,
    ) -> StoreResult<Page<Payee>> {
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let sql = format!(
            "SELECT {PAYEE_COLUMNS} WHERE company_id = $1 AND mode = $2 AND id < $3 AND ($4 IS NULL OR status = $4) \
             ORDER BY id DESC LIMIT $5"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .bind(after)
            .bind(status.map(PayeeStatus::as_str))
            .bind(page.limit as i64 + 1)
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        let items = rows.iter().map(payee_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    async fn payee_in(
        conn: &mut PgConnection,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
    ) -> StoreResult<Option<Payee>> {
        let sql = format!("SELECT {PAYEE_COLUMNS} WHERE id = $1 AND company_id = $2 AND mode = $3");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.as_uuid())
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .fetch_optional(conn)
            .await
            .map_err(map_err)?;
        row.as_ref().map(payee_from_row).transpose()
    }

    pub(crate) async fn find_payee(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
    ) -> StoreResult<Option<Payee>> {
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        Self::payee_in(&mut conn, scope, mode, id).await
    }

    pub(crate) async fn sealed_account(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
    ) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT account_sealed FROM payees WHERE id = $1 AND company_id = $2 AND mode = $3")
            .bind(id.as_uuid())
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(map_err)
    }

    pub(crate) async fn disable(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PayeeId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Payee>> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE payees SET status = 'disabled', disabled_at = $1 \
             WHERE id = $2 AND company_id = $3 AND mode = $4 AND status = 'active'",
        )
        .bind(at)
        .bind(id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(mode.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(payee) = Self::payee_in(&mut tx, scope, mode, id).await? else { return Ok(None) };
        commit_change(tx, audit).await?;
        Ok(Some(payee))
    }

    pub(crate) async fn create_payment_batch(&self, items: &[PaymentCreate]) -> StoreResult<Vec<PaymentCreated>> {
        let mut tx = self.begin_write().await?;
        let mut outcomes = vec![PaymentCreated::Created; items.len()];
        let mut records = Vec::with_capacity(items.len());
        // Keys are claimed in one global order, so two batches that share keys
        // wait for each other instead of deadlocking.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| {
            (items[a].scope.company_id().as_uuid(), &items[a].idempotency_key)
                .cmp(&(items[b].scope.company_id().as_uuid(), &items[b].idempotency_key))
        });
        for i in order {
            let item = &items[i];
            savepoint(&mut tx, "SAVEPOINT payment").await?;
            let outcome = create_one(&mut tx, item).await;
            match outcome {
                Ok(PaymentCreated::Created) => {
                    savepoint(&mut tx, "RELEASE payment").await?;
                    records.push(item.audit.clone());
                }
                Ok(other) => {
                    savepoint(&mut tx, "ROLLBACK TO payment").await?;
                    savepoint(&mut tx, "RELEASE payment").await?;
                    outcomes[i] = other;
                }
                Err(StoreError::Internal(e) | StoreError::Conflict(e)) => {
                    // One item's failure stays with that item.
                    tracing::warn!(error = %e, "payment batch item failed; rolled back alone");
                    savepoint(&mut tx, "ROLLBACK TO payment").await?;
                    savepoint(&mut tx, "RELEASE payment").await?;
                    outcomes[i] = PaymentCreated::Failed(e);
                }
                Err(e) => return Err(e),
            }
        }
        if !records.is_empty() {
            append_in(&mut tx, &records).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(outcomes)
    }

    pub(crate) async fn find_stored_response(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        key: &str,
    ) -> StoreResult<Option<StoredResponse>> {
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        stored_response(&mut conn, scope.company_id(), mode, key).await
    }

    pub(crate) async fn find_payment(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: PaymentId,
    ) -> StoreResult<Option<Payment>> {
        let sql = format!("SELECT {PAYMENT_COLUMNS} WHERE id = $1 AND company_id = $2 AND mode = $3");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.as_uuid())
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(map_err)?;
        row.as_ref().map(payment_from_row).transpose()
    }

    pub(crate) async fn payments_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &PaymentFilter,
        page: PageRequest<PaymentId>,
    ) -> StoreResult<Page<Payment>> {
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let sql = format!(
            "SELECT {PAYMENT_COLUMNS} WHERE company_id = $1 AND mode = $2 AND id < $3 \
             AND ($4 IS NULL OR status = $4) AND ($5 IS NULL OR payee_id = $5) \
             AND ($6 IS NULL OR created_at >= $6) AND ($7 IS NULL OR created_at < $7) \
             ORDER BY id DESC LIMIT $8"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .bind(after)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.payee_id.map(|p| p.as_uuid()))
            .bind(filter.created_from)
            .bind(filter.created_before)
            .bind(page.limit as i64 + 1)
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        let items = rows.iter().map(payment_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    pub(crate) async fn replace_payment(
        &self,
        scope: &CompanyScope,
        p: &Payment,
        expected_revision: u32,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE payments SET amount = $1, reference = $2, requested_execution_date = $3, status = $4, version = $5, \
             revision = $6, approval_expires_at = $7, rail_next_at = $8, updated_at = $9, doc = $10 \
             WHERE id = $11 AND company_id = $12 AND revision = $13",
        )
        .bind(p.amount.minor_units() as i64)
        .bind(&p.reference)
        .bind(p.requested_execution_date.map(date_text))
        .bind(p.status.as_str())
        .bind(p.version as i64)
        .bind(p.revision as i64)
        .bind(p.approval_expires_at)
        .bind(p.rail_next_at)
        .bind(p.updated_at)
        .bind(payment_doc(p))
        .bind(p.id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(expected_revision as i64)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        commit_change(tx, audit).await?;
        Ok(true)
    }

    pub(crate) async fn due(&self, now: OffsetDateTime, limit: u32) -> StoreResult<Vec<(CompanyId, Payment)>> {
        // Two index range scans (one per partial index), oldest deadline first,
        // rather than one OR that the planner may answer with a table scan.
        let sql = format!(
            "SELECT * FROM (SELECT {PAYMENT_COLUMNS} WHERE status = 'pending_approval' AND approval_expires_at <= $1 \
             ORDER BY approval_expires_at LIMIT $2) AS expiring \
             UNION ALL SELECT * FROM (SELECT {PAYMENT_COLUMNS} WHERE rail_next_at IS NOT NULL AND rail_next_at <= $1 \
             ORDER BY rail_next_at LIMIT $2) AS settling"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(limit as i64)
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        rows.iter().map(|row| Ok((CompanyId::from_uuid(get(row, "company_id")?), payment_from_row(row)?))).collect()
    }

    pub(crate) async fn purge_idempotency_before(&self, now: OffsetDateTime) -> StoreResult<u64> {
        // In slices, so no single statement holds locks on a large backlog.
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM idempotency_keys WHERE ctid IN \
                 (SELECT ctid FROM idempotency_keys WHERE expires_at < $1 LIMIT 1000)",
            )
            .bind(now)
            .execute(self.pool())
            .await
            .map_err(map_err)?
            .rows_affected();
            total += n;
            if n < 1000 {
                return Ok(total);
            }
        }
    }
}
