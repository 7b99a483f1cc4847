//! Payees, payments, the approval policy and idempotency records.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use paygate_domain::audit::AuditEntry;
use paygate_domain::payment::{ApprovalPolicy, Payment, PaymentStatus};
use paygate_domain::{CompanyId, EventType, KeyMode, PayeeId, PaymentId};
use paygate_store::{
    CompanyScope, NewEvent, NewPayee, Page, PageRequest, Payee, PayeeColumns, PayeeStatus, PayeeStore, PaymentColumns,
    PaymentCreate, PaymentCreated, PaymentFilter, PaymentStore, StoreError, StoreResult, StoredPaymentState,
    StoredResponse, date_text, payment_doc, policy_from_text, policy_text,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::append_in;
use crate::events::{commit_with_events, write_events};
use crate::{Dialect, Lock, Row, Sql, SqlStore, Value, all, cursor, execute, optional, overfetch, placeholders};

const PAYEE_SELECT: &str = "SELECT id, mode, name, kind, email, bank_account, metadata, status, created_at, \
     disabled_at, created_by FROM payees";
pub(crate) const PAYMENT_COLUMNS: &str = "id, company_id, mode, payee_id, amount, currency, reference, \
     requested_execution_date, status, version, revision, approval_expires_at, rail_next_at, created_at, \
     updated_at, doc";

fn payee_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<Payee> {
    PayeeColumns {
        id: row.get("id")?,
        mode: row.get("mode")?,
        name: row.get("name")?,
        kind: row.get("kind")?,
        email: row.get("email")?,
        bank_account: row.get("bank_account")?,
        metadata: row.get("metadata")?,
        status: row.get("status")?,
        created_at: row.get("created_at")?,
        disabled_at: row.get("disabled_at")?,
        created_by: row.get("created_by")?,
    }
    .into_payee()
}

pub(crate) fn payment_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<Payment> {
    PaymentColumns {
        id: row.get("id")?,
        mode: row.get("mode")?,
        payee_id: row.get("payee_id")?,
        amount: row.get("amount")?,
        currency: row.get("currency")?,
        reference: row.get("reference")?,
        requested_execution_date: row.get("requested_execution_date")?,
        status: row.get("status")?,
        version: row.get("version")?,
        revision: row.get("revision")?,
        approval_expires_at: row.get("approval_expires_at")?,
        rail_next_at: row.get("rail_next_at")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
        doc: row.get("doc")?,
    }
    .into_payment()
}

fn response_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<StoredResponse> {
    Ok(StoredResponse {
        fingerprint: row.get("fingerprint")?,
        status: row.get("response_status")?,
        body: row.get("response_body")?,
        payment_id: PaymentId::from_uuid(row.get("payment_id")?),
    })
}

fn mode_of(text: &str, what: &str) -> StoreResult<KeyMode> {
    KeyMode::parse(text).ok_or_else(|| StoreError::corrupt(what, text))
}

/// `(a, b, c) IN ((…), (…))` over the batch's items: each item brings its own
/// scope's company and mode.
fn tuples(items: &[PaymentCreate], third: impl Fn(&PaymentCreate) -> Value) -> (String, Vec<Value>) {
    let mut text = Vec::with_capacity(items.len());
    let mut args = Vec::with_capacity(items.len() * 3);
    for (i, item) in items.iter().enumerate() {
        text.push(format!("({})", placeholders(i * 3 + 1, 3)));
        args.push(third(item));
        args.push(Value::from(item.scope.company_id().as_uuid()));
        args.push(Value::from(item.scope.mode().as_str()));
    }
    (text.join(", "), args)
}

type UsedKeys = HashMap<(CompanyId, KeyMode, String), StoredResponse>;

/// The stored responses of the batch's keys that are already used, in one read.
async fn used_keys<D: Dialect>(conn: &mut D::Conn, items: &[PaymentCreate]) -> StoreResult<UsedKeys> {
    let (list, args) = tuples(items, |item| Value::from(item.idempotency_key.as_str()));
    let sql = Sql {
        text: format!(
            "SELECT company_id, mode, key, fingerprint, response_status, response_body, payment_id \
             FROM idempotency_keys WHERE (key, company_id, mode) IN ({list})"
        )
        .into(),
        args,
    };
    let mut used = HashMap::new();
    for row in all::<D>(conn, sql).await? {
        let key = (
            CompanyId::from_uuid(row.get("company_id")?),
            mode_of(&row.get::<String>("mode")?, "idempotency mode")?,
            row.get::<String>("key")?,
        );
        used.insert(key, response_from_row(&row)?);
    }
    Ok(used)
}

/// The status of every payee the batch pays, by (payee, company, mode), in
/// one read, share-locked so none is disabled before the batch commits.
async fn payee_statuses<D: Dialect>(
    conn: &mut D::Conn,
    items: &[PaymentCreate],
) -> StoreResult<HashMap<(PayeeId, CompanyId, KeyMode), String>> {
    let (list, args) = tuples(items, |item| Value::from(item.payment.payee_id.as_uuid()));
    let sql = Sql {
        text: format!(
            "SELECT id, company_id, mode, status FROM payees WHERE (id, company_id, mode) IN ({list}){}",
            D::lock(Lock::Share)
        )
        .into(),
        args,
    };
    let mut statuses = HashMap::new();
    for row in all::<D>(conn, sql).await? {
        let key = (
            PayeeId::from_uuid(row.get("id")?),
            CompanyId::from_uuid(row.get("company_id")?),
            mode_of(&row.get::<String>("mode")?, "payee mode")?,
        );
        statuses.insert(key, row.get("status")?);
    }
    Ok(statuses)
}

async fn stored_response<D: Dialect>(
    conn: &mut D::Conn,
    scope: &CompanyScope,
    key: &str,
) -> StoreResult<Option<StoredResponse>> {
    let sql = Sql::tenant(
        scope,
        "SELECT fingerprint, response_status, response_body, payment_id FROM idempotency_keys \
         WHERE {tenant} AND key = $3",
    )
    .bind(key);
    optional::<D>(conn, sql).await?.as_ref().map(response_from_row).transpose()
}

async fn payee_in<D: Dialect>(conn: &mut D::Conn, scope: &CompanyScope, id: PayeeId) -> StoreResult<Option<Payee>> {
    let sql = Sql::tenant(scope, &format!("{PAYEE_SELECT} WHERE {{tenant}} AND id = $3")).bind(id.as_uuid());
    optional::<D>(conn, sql).await?.as_ref().map(payee_from_row).transpose()
}

fn payment_values(item: &PaymentCreate) -> Vec<Value> {
    let p = &item.payment;
    vec![
        Value::from(p.id.as_uuid()),
        Value::from(item.scope.company_id().as_uuid()),
        Value::from(item.scope.mode().as_str()),
        Value::from(p.payee_id.as_uuid()),
        Value::from(p.amount.minor_units() as i64),
        Value::from(p.currency.code()),
        Value::from(p.reference.as_str()),
        Value::from(p.requested_execution_date.map(date_text)),
        Value::from(p.status.as_str()),
        Value::from(i64::from(p.version)),
        Value::from(i64::from(p.revision)),
        Value::from(p.approval_expires_at),
        Value::from(p.rail_next_at),
        Value::from(p.created_at),
        Value::from(p.updated_at),
        Value::from(payment_doc(p)),
    ]
}

fn idempotency_values(item: &PaymentCreate) -> Vec<Value> {
    vec![
        Value::from(item.scope.company_id().as_uuid()),
        Value::from(item.scope.mode().as_str()),
        Value::from(item.idempotency_key.as_str()),
        Value::from(item.response.fingerprint.as_str()),
        Value::from(i64::from(item.response.status)),
        Value::from(item.response.body.as_str()),
        Value::from(item.payment.id.as_uuid()),
        Value::from(item.payment.created_at),
        Value::from(item.expires_at),
    ]
}

#[async_trait]
impl<D: Dialect> PayeeStore for SqlStore<D> {
    async fn create_payee(&self, scope: &CompanyScope, new: &NewPayee, audit: &AuditEntry) -> StoreResult<()> {
        let p = &new.payee;
        let (bank_account, metadata, created_by) = p.json_columns();
        let sql = Sql::new(
            "INSERT INTO payees (company_id, mode, id, name, kind, email, bank_account, fingerprint, \
             account_sealed, metadata, status, created_at, disabled_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL, $13)",
        )
        .bind(scope.company_id().as_uuid())
        .bind(scope.mode().as_str())
        .bind(p.id.as_uuid())
        .bind(p.name.as_str())
        .bind(p.kind.as_str())
        .bind(p.email.clone())
        .bind(bank_account)
        .bind(p.bank_account.fingerprint.as_str())
        .bind(new.sealed_account.clone())
        .bind(metadata)
        .bind(p.status.as_str())
        .bind(p.created_at)
        .bind(created_by);
        let mut tx = self.db.begin().await?;
        execute::<D>(&mut tx, sql).await?;
        let event = NewEvent::payee(scope.company_id(), EventType::PayeeCreated, p, None);
        commit_with_events::<D>(tx, audit, vec![event]).await
    }

    async fn list_payees(
        &self,
        scope: &CompanyScope,
        status: Option<PayeeStatus>,
        page: PageRequest<PayeeId>,
    ) -> StoreResult<Page<Payee>> {
        let sql = Sql::tenant(
            scope,
            &format!(
                "{PAYEE_SELECT} WHERE {{tenant}} AND id < $3 AND ($4 IS NULL OR status = $4) ORDER BY id DESC LIMIT $5"
            ),
        )
        .bind(cursor(page.after.map(|a| a.as_uuid())))
        .bind(status.map(PayeeStatus::as_str))
        .bind(overfetch(page.limit));
        let items = self.read_all(sql).await?.iter().map(payee_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    async fn get_payee(&self, scope: &CompanyScope, id: PayeeId) -> StoreResult<Option<Payee>> {
        payee_in::<D>(&mut *self.read().await?, scope, id).await
    }

    async fn payee_sealed_account(&self, scope: &CompanyScope, id: PayeeId) -> StoreResult<Option<Vec<u8>>> {
        let sql = Sql::tenant(scope, "SELECT account_sealed FROM payees WHERE {tenant} AND id = $3").bind(id.as_uuid());
        self.read_optional(sql).await?.map(|row| row.get("account_sealed")).transpose()
    }

    async fn disable_payee(
        &self,
        scope: &CompanyScope,
        id: PayeeId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Payee>> {
        let mut tx = self.db.begin().await?;
        let sql = Sql::tenant(
            scope,
            "UPDATE payees SET status = 'disabled', disabled_at = $3 WHERE {tenant} AND id = $4 AND status = 'active'",
        )
        .bind(at)
        .bind(id.as_uuid());
        let changed = execute::<D>(&mut tx, sql).await?;
        let Some(payee) = payee_in::<D>(&mut tx, scope, id).await? else { return Ok(None) };
        // Disabling twice changes nothing, and tells nobody again.
        let events = if changed > 0 {
            vec![NewEvent::payee(scope.company_id(), EventType::PayeeDisabled, &payee, Some("active"))]
        } else {
            vec![]
        };
        commit_with_events::<D>(tx, audit, events).await?;
        Ok(Some(payee))
    }
}

#[async_trait]
impl<D: Dialect> PaymentStore for SqlStore<D> {
    async fn approval_policy(&self, scope: &CompanyScope) -> StoreResult<ApprovalPolicy> {
        let sql = Sql::tenant(scope, "SELECT policy FROM approval_policies WHERE {tenant}");
        let text = self.read_optional(sql).await?.map(|row| row.get::<Option<String>>("policy")).transpose()?;
        policy_from_text(text.flatten())
    }

    async fn set_approval_policy(
        &self,
        scope: &CompanyScope,
        policy: &ApprovalPolicy,
        audit: &AuditEntry,
    ) -> StoreResult<()> {
        let mut tx = self.db.begin().await?;
        // The upsert holds the policy row's lock while its event is numbered.
        let sql = Sql::new(
            "INSERT INTO approval_policies (company_id, mode, policy) VALUES ($1, $2, $3) \
             ON CONFLICT (company_id, mode) DO UPDATE SET policy = excluded.policy \
             WHERE approval_policies.policy IS DISTINCT FROM excluded.policy",
        )
        .bind(scope.company_id().as_uuid())
        .bind(scope.mode().as_str())
        .bind(policy_text(policy));
        let changed = execute::<D>(&mut tx, sql).await?;
        let event = NewEvent::approval_policy(scope.company_id(), scope.mode(), policy);
        // The same policy again changes nothing and tells nobody.
        commit_with_events::<D>(tx, audit, if changed > 0 { vec![event] } else { vec![] }).await
    }

    /// The whole batch in a handful of statements: one read of the keys
    /// already used, one of the payees (share-locked where rows lock, so none
    /// is disabled before commit), one multi-row insert of the payments, one
    /// of the keys (`ON CONFLICT DO NOTHING`). A key another node claimed
    /// meanwhile makes that insert wait for it and skip the key; the payment
    /// inserted for it is deleted again and the item answers with the other
    /// node's response. (On SQLite the write lock held from the start makes
    /// that path unreachable.)
    async fn create_payments(&self, items: &[PaymentCreate]) -> StoreResult<Vec<PaymentCreated>> {
        let mut tx = self.db.begin().await?;
        let mut used = used_keys::<D>(&mut tx, items).await?;
        let payees = payee_statuses::<D>(&mut tx, items).await?;
        let mut outcomes = Vec::with_capacity(items.len());
        let mut created: Vec<usize> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let (company, mode) = (item.scope.company_id(), item.scope.mode());
            let key = (company, mode, item.idempotency_key.clone());
            // A key already used (also by an earlier item of this batch) answers with its response.
            if let Some(existing) = used.get(&key) {
                outcomes.push(PaymentCreated::Existing(existing.clone()));
                continue;
            }
            match payees.get(&(item.payment.payee_id, company, mode)).map(String::as_str) {
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
            D::commit(tx).await?;
            return Ok(outcomes);
        }
        // Keys are claimed in one global order, so two batches that share keys
        // wait for each other instead of deadlocking.
        created.sort_by(|&a, &b| {
            let k = |i: usize| {
                (items[i].scope.company_id().as_uuid(), items[i].scope.mode().as_str(), &items[i].idempotency_key)
            };
            k(a).cmp(&k(b))
        });
        let payments = created.iter().map(|&i| payment_values(&items[i])).collect();
        D::insert_rows(&mut tx, concat_payments_into(), payments, "").await?;
        let keys = created.iter().map(|&i| idempotency_values(&items[i])).collect();
        let claimed = D::insert_rows(
            &mut tx,
            "idempotency_keys (company_id, mode, key, fingerprint, response_status, response_body, payment_id, \
             created_at, expires_at)",
            keys,
            " ON CONFLICT DO NOTHING RETURNING payment_id",
        )
        .await?;
        let claimed: HashSet<Uuid> =
            claimed.into_iter().map(|row| Row::<D>(row).get("payment_id")).collect::<StoreResult<_>>()?;
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
            let mut sql = Sql::new(format!("DELETE FROM payments WHERE id IN ({})", placeholders(1, lost.len())));
            for &i in &lost {
                sql = sql.bind(items[i].payment.id.as_uuid());
            }
            execute::<D>(&mut tx, sql).await?;
            for i in lost {
                let item = &items[i];
                let existing = stored_response::<D>(&mut tx, &item.scope, &item.idempotency_key)
                    .await?
                    .ok_or_else(|| StoreError::Internal("idempotency key vanished while claimed".into()))?;
                outcomes[i] = PaymentCreated::Existing(existing);
            }
        }
        // Events only for the payments this batch created (not those whose key
        // another node claimed); before the audit heads, as in every change.
        write_events::<D>(&mut tx, events).await?;
        if !records.is_empty() {
            append_in::<D>(&mut tx, &records).await?;
        }
        D::commit(tx).await?;
        Ok(outcomes)
    }

    async fn idempotent_response(&self, scope: &CompanyScope, key: &str) -> StoreResult<Option<StoredResponse>> {
        stored_response::<D>(&mut *self.read().await?, scope, key).await
    }

    async fn get_payment(&self, scope: &CompanyScope, id: PaymentId) -> StoreResult<Option<Payment>> {
        let sql = Sql::tenant(scope, &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE {{tenant}} AND id = $3"))
            .bind(id.as_uuid());
        self.read_optional(sql).await?.as_ref().map(payment_from_row).transpose()
    }

    async fn list_payments(
        &self,
        scope: &CompanyScope,
        filter: &PaymentFilter,
        page: PageRequest<PaymentId>,
    ) -> StoreResult<Page<Payment>> {
        let sql = Sql::tenant(
            scope,
            &format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE {{tenant}} AND id < $3 \
                 AND ($4 IS NULL OR status = $4) AND ($5 IS NULL OR payee_id = $5) \
                 AND ($6 IS NULL OR created_at >= $6) AND ($7 IS NULL OR created_at < $7) \
                 ORDER BY id DESC LIMIT $8"
            ),
        )
        .bind(cursor(page.after.map(|a| a.as_uuid())))
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.payee_id.map(|p| p.as_uuid()))
        .bind(filter.created_from)
        .bind(filter.created_before)
        .bind(overfetch(page.limit));
        let items = self.read_all(sql).await?.iter().map(payment_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    async fn update_payment(
        &self,
        scope: &CompanyScope,
        p: &Payment,
        expected_revision: u32,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let mut tx = self.db.begin().await?;
        // The stored status under the expected revision, with the row locked:
        // the event is named after the change of status, and a writer that
        // loses the race finds the revision moved once the lock is released.
        let sql = Sql::company(
            scope,
            &format!(
                "SELECT status, version, updated_at FROM payments WHERE {{company}} AND id = $2 AND revision = $3{}",
                D::lock(Lock::NoKeyUpdate)
            ),
        )
        .bind(p.id.as_uuid())
        .bind(i64::from(expected_revision));
        let Some(row) = optional::<D>(&mut tx, sql).await? else { return Ok(false) };
        let status: String = row.get("status")?;
        let stored = StoredPaymentState {
            status: PaymentStatus::parse(&status).ok_or_else(|| StoreError::corrupt("payment status", &status))?,
            version: row.get("version")?,
            updated_at: row.get("updated_at")?,
        };
        let sql = Sql::company(
            scope,
            "UPDATE payments SET amount = $2, reference = $3, requested_execution_date = $4, status = $5, \
             version = $6, revision = $7, approval_expires_at = $8, rail_next_at = $9, updated_at = $10, doc = $11 \
             WHERE {company} AND id = $12 AND revision = $13",
        )
        .bind(p.amount.minor_units() as i64)
        .bind(p.reference.as_str())
        .bind(p.requested_execution_date.map(date_text))
        .bind(p.status.as_str())
        .bind(i64::from(p.version))
        .bind(i64::from(p.revision))
        .bind(p.approval_expires_at)
        .bind(p.rail_next_at)
        .bind(p.updated_at)
        .bind(payment_doc(p))
        .bind(p.id.as_uuid())
        .bind(i64::from(expected_revision));
        if execute::<D>(&mut tx, sql).await? == 0 {
            return Ok(false);
        }
        // None when nothing visible changed (a worker rescheduling its next look).
        let events = NewEvent::payment_update(scope.company_id(), p, &stored).into_iter().collect();
        commit_with_events::<D>(tx, audit, events).await?;
        Ok(true)
    }
}

const fn concat_payments_into() -> &'static str {
    "payments (id, company_id, mode, payee_id, amount, currency, reference, requested_execution_date, status, \
     version, revision, approval_expires_at, rail_next_at, created_at, updated_at, doc)"
}
