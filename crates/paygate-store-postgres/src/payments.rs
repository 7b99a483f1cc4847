//! Payees, payments, approval policy and idempotency records on PostgreSQL.

use std::collections::HashMap;

use paygate_domain::audit::AuditEntry;
use paygate_domain::payment::{ApprovalPolicy, Payment, PaymentStatus};
use paygate_domain::{CompanyId, EventType, KeyMode, PayeeId, PaymentId};
use paygate_store::{
    CompanyScope, NewEvent, NewPayee, Page, PageRequest, Payee, PayeeColumns, PayeeStatus, PaymentColumns,
    PaymentCreate, PaymentCreated, PaymentFilter, StoreError, StoreResult, StoredPaymentState, StoredResponse,
    date_text, payment_doc, policy_from_text, policy_text,
};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::{commit_with_events, write_events};
use crate::{PostgresStore, append_in, corrupt, get, map_err};

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

type UsedKeys = HashMap<(CompanyId, KeyMode, String), StoredResponse>;

/// The stored responses of the batch's keys that are already used, in one read.
async fn used_keys(conn: &mut PgConnection, items: &[PaymentCreate]) -> StoreResult<UsedKeys> {
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "SELECT company_id, mode, key, fingerprint, response_status, response_body, payment_id \
         FROM idempotency_keys WHERE (company_id, mode, key) IN (",
    );
    let mut list = query.separated(", ");
    for item in items {
        list.push("(")
            .push_bind_unseparated(item.scope.company_id().as_uuid())
            .push_unseparated(", ")
            .push_bind_unseparated(item.mode.as_str())
            .push_unseparated(", ")
            .push_bind_unseparated(item.idempotency_key.as_str())
            .push_unseparated(")");
    }
    query.push(")");
    let rows = query.build().fetch_all(&mut *conn).await.map_err(map_err)?;
    let mut used = HashMap::with_capacity(rows.len());
    for row in &rows {
        let mode: String = get(row, "mode")?;
        let key = (
            CompanyId::from_uuid(get(row, "company_id")?),
            KeyMode::parse(&mode).ok_or_else(|| corrupt("idempotency mode", &mode))?,
            get::<String>(row, "key")?,
        );
        used.insert(key, response_from_row(row)?);
    }
    Ok(used)
}

/// The status of every payee the batch pays, by (payee, company, mode), in one read.
async fn payee_statuses(
    conn: &mut PgConnection,
    items: &[PaymentCreate],
) -> StoreResult<HashMap<(PayeeId, CompanyId, KeyMode), String>> {
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "SELECT id, company_id, mode, status FROM payees WHERE (id, company_id, mode) IN (",
    );
    let mut list = query.separated(", ");
    for item in items {
        list.push("(")
            .push_bind_unseparated(item.payment.payee_id.as_uuid())
            .push_unseparated(", ")
            .push_bind_unseparated(item.scope.company_id().as_uuid())
            .push_unseparated(", ")
            .push_bind_unseparated(item.mode.as_str())
            .push_unseparated(")");
    }
    query.push(") FOR SHARE");
    let rows = query.build().fetch_all(&mut *conn).await.map_err(map_err)?;
    let mut statuses = HashMap::with_capacity(rows.len());
    for row in &rows {
        let mode: String = get(row, "mode")?;
        statuses.insert(
            (
                PayeeId::from_uuid(get(row, "id")?),
                CompanyId::from_uuid(get(row, "company_id")?),
                KeyMode::parse(&mode).ok_or_else(|| corrupt("payee mode", &mode))?,
            ),
            get(row, "status")?,
        );
    }
    Ok(statuses)
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
    row.as_ref().map(response_from_row).transpose()
}

fn response_from_row(row: &PgRow) -> StoreResult<StoredResponse> {
    Ok(StoredResponse {
        fingerprint: get(row, "fingerprint")?,
        status: u16::try_from(get::<i32>(row, "response_status")?).map_err(|e| corrupt("status", e))?,
        body: get(row, "response_body")?,
        payment_id: PaymentId::from_uuid(get(row, "payment_id")?),
    })
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
        let changed = sqlx::query(
            "INSERT INTO approval_policies (company_id, mode, policy) VALUES ($1, $2, $3) \
             ON CONFLICT (company_id, mode) DO UPDATE SET policy = excluded.policy WHERE approval_policies.policy IS DISTINCT FROM excluded.policy",
        )
        .bind(scope.company_id().as_uuid())
        .bind(mode.as_str())
        .bind(policy_text(policy))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        // The upsert holds the policy row's lock while its event is numbered.
        let event = NewEvent::approval_policy(scope.company_id(), mode, policy);
        // The same policy again changes nothing and tells nobody.
        commit_with_events(tx, audit, if changed > 0 { vec![event] } else { vec![] }).await
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
        let event = NewEvent::payee(scope.company_id(), EventType::PayeeCreated, p, None);
        commit_with_events(tx, audit, vec![event]).await
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
        let changed = sqlx::query(
            "UPDATE payees SET status = 'disabled', disabled_at = $1 \
             WHERE id = $2 AND company_id = $3 AND mode = $4 AND status = 'active'",
        )
        .bind(at)
        .bind(id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(mode.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        let Some(payee) = Self::payee_in(&mut tx, scope, mode, id).await? else { return Ok(None) };
        // Disabling twice changes nothing, and tells nobody again.
        let events = if changed > 0 {
            vec![NewEvent::payee(scope.company_id(), EventType::PayeeDisabled, &payee, Some("active"))]
        } else {
            vec![]
        };
        commit_with_events(tx, audit, events).await?;
        Ok(Some(payee))
    }

    /// The whole batch in a handful of statements: one read of the keys
    /// already used, one of the payees (`FOR SHARE`, so none is disabled
    /// before commit), one multi-row insert of the payments, one of the keys
    /// (`ON CONFLICT DO NOTHING`). A key another node claimed meanwhile makes
    /// that insert wait for it and skip the key; the payment inserted for it
    /// is deleted again and the item answers with the other node's response.
    pub(crate) async fn create_payment_batch(&self, items: &[PaymentCreate]) -> StoreResult<Vec<PaymentCreated>> {
        let mut tx = self.begin_write().await?;
        let mut used = used_keys(&mut tx, items).await?;
        let payees = payee_statuses(&mut tx, items).await?;
        let mut outcomes = Vec::with_capacity(items.len());
        let mut created: Vec<usize> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let company = item.scope.company_id();
            let key = (company, item.mode, item.idempotency_key.clone());
            if let Some(existing) = used.get(&key) {
                outcomes.push(PaymentCreated::Existing(existing.clone()));
                continue;
            }
            match payees.get(&(item.payment.payee_id, company, item.mode)).map(String::as_str) {
                None => outcomes.push(PaymentCreated::PayeeNotFound),
                Some("active") => {
                    used.insert(key, item.response.clone());
                    created.push(i);
                    outcomes.push(PaymentCreated::Created);
                }
                Some(_) => outcomes.push(PaymentCreated::PayeeDisabled),
            }
        }
        if created.is_empty() {
            tx.commit().await.map_err(map_err)?;
            return Ok(outcomes);
        }
        // Keys are claimed in one global order, so two batches that share keys
        // wait for each other instead of deadlocking.
        created.sort_by(|&a, &b| {
            let k =
                |i: usize| (items[i].scope.company_id().as_uuid(), items[i].mode.as_str(), &items[i].idempotency_key);
            k(a).cmp(&k(b))
        });
        let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO payments (id, company_id, mode, payee_id, amount, currency, reference, \
             requested_execution_date, status, version, revision, approval_expires_at, rail_next_at, created_at, \
             updated_at, doc) ",
        );
        insert.push_values(&created, |mut row, &i| {
            let (item, p) = (&items[i], &items[i].payment);
            row.push_bind(p.id.as_uuid())
                .push_bind(item.scope.company_id().as_uuid())
                .push_bind(p.mode.as_str())
                .push_bind(p.payee_id.as_uuid())
                .push_bind(p.amount.minor_units() as i64)
                .push_bind(p.currency.code())
                .push_bind(p.reference.as_str())
                .push_bind(p.requested_execution_date.map(date_text))
                .push_bind(p.status.as_str())
                .push_bind(p.version as i64)
                .push_bind(p.revision as i64)
                .push_bind(p.approval_expires_at)
                .push_bind(p.rail_next_at)
                .push_bind(p.created_at)
                .push_bind(p.updated_at)
                .push_bind(payment_doc(p));
        });
        insert.build().execute(&mut *tx).await.map_err(map_err)?;
        let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO idempotency_keys (company_id, mode, key, fingerprint, response_status, response_body, \
             payment_id, created_at, expires_at) ",
        );
        insert.push_values(&created, |mut row, &i| {
            let item = &items[i];
            row.push_bind(item.scope.company_id().as_uuid())
                .push_bind(item.mode.as_str())
                .push_bind(item.idempotency_key.as_str())
                .push_bind(item.response.fingerprint.as_str())
                .push_bind(item.response.status as i32)
                .push_bind(item.response.body.as_str())
                .push_bind(item.payment.id.as_uuid())
                .push_bind(item.payment.created_at)
                .push_bind(item.expires_at);
        });
        insert.push(" ON CONFLICT DO NOTHING RETURNING payment_id");
        let claimed: std::collections::HashSet<Uuid> =
            insert.build_query_scalar::<Uuid>().fetch_all(&mut *tx).await.map_err(map_err)?.into_iter().collect();
        let mut records = Vec::with_capacity(created.len());
        let mut events = Vec::with_capacity(created.len());
        let mut lost = Vec::new();
        for &i in &created {
            if claimed.contains(&items[i].payment.id.as_uuid()) {
                records.push(items[i].audit.clone());
                events.push(NewEvent::payment(items[i].scope.company_id(), &items[i].payment, None));
            } else {
                lost.push(i);
            }
        }
        if !lost.is_empty() {
            let ids: Vec<Uuid> = lost.iter().map(|&i| items[i].payment.id.as_uuid()).collect();
            sqlx::query("DELETE FROM payments WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            for i in lost {
                let item = &items[i];
                let existing = stored_response(&mut tx, item.scope.company_id(), item.mode, &item.idempotency_key)
                    .await?
                    .ok_or_else(|| StoreError::Internal("idempotency key vanished while claimed".into()))?;
                outcomes[i] = PaymentCreated::Existing(existing);
            }
        }
        // Events only for the payments this batch created (not those whose key
        // another node claimed); before the audit heads, as in every change.
        write_events(&mut tx, events).await?;
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
        // The stored status under the expected revision, with the row locked:
        // the event is named after the change of status, and a writer that
        // loses the race finds the revision moved once the lock is released.
        let row = sqlx::query(
            "SELECT status, version, updated_at FROM payments WHERE id = $1 AND company_id = $2 AND revision = $3 \
             FOR NO KEY UPDATE",
        )
        .bind(p.id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(expected_revision as i64)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(false) };
        let status: String = get(&row, "status")?;
        let stored = StoredPaymentState {
            status: PaymentStatus::parse(&status).ok_or_else(|| corrupt("payment status", &status))?,
            version: get::<i64>(&row, "version")? as u32,
            updated_at: get(&row, "updated_at")?,
        };
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
        // None when nothing visible changed (a worker rescheduling its next look).
        let events = NewEvent::payment_update(scope.company_id(), p, &stored).into_iter().collect();
        commit_with_events(tx, audit, events).await?;
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
