//! The audit log: hash-chained records, chain heads and checkpoints.

use std::collections::HashMap;

use async_trait::async_trait;
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditEntry, AuditRecord, Outcome};
use paygate_store::{AuditFilter, AuditStore, Checkpoint, CompanyScope, Page, PageRequest, StoreError, StoreResult};
use time::OffsetDateTime;

use crate::{Dialect, Lock, Row, Sql, SqlStore, Value, execute, one};

pub(crate) const AUDIT_COLUMNS: &str = "chain, seq, id, occurred_at, actor_kind, actor_id, actor_name, action, \
     resource_type, resource_id, outcome, status, request_id, client_ip, user_agent, details, prev_hash, hash";

pub(crate) fn audit_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<AuditRecord> {
    let action: String = row.get("action")?;
    let action = paygate_domain::audit::ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .ok_or_else(|| StoreError::corrupt("audit action", &action))?;
    let kind: String = row.get("actor_kind")?;
    let outcome: String = row.get("outcome")?;
    Ok(AuditRecord {
        entry: AuditEntry {
            id: AuditEventId::from_uuid(row.get("id")?),
            chain: row.get("chain")?,
            occurred_at: row.get("occurred_at")?,
            actor_kind: ActorKind::parse(&kind).ok_or_else(|| StoreError::corrupt("actor kind", &kind))?,
            actor_id: row.get("actor_id")?,
            actor_name: row.get("actor_name")?,
            action,
            resource_type: row.get("resource_type")?,
            resource_id: row.get("resource_id")?,
            outcome: Outcome::parse(&outcome).ok_or_else(|| StoreError::corrupt("outcome", &outcome))?,
            status: row.get("status")?,
            request_id: row.get("request_id")?,
            client_ip: row.get("client_ip")?,
            user_agent: row.get("user_agent")?,
            details: row.get("details")?,
        },
        seq: row.get("seq")?,
        prev_hash: row.hash("prev_hash")?,
        hash: row.hash("hash")?,
    })
}

pub(crate) const CHECKPOINT_SELECT: &str =
    "SELECT chain, seq, hash, signed_at, key_id, signature FROM audit_checkpoints";

pub(crate) fn checkpoint_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<Checkpoint> {
    Ok(Checkpoint {
        chain: row.get("chain")?,
        seq: row.get("seq")?,
        hash: row.hash("hash")?,
        signed_at: row.get("signed_at")?,
        key_id: row.get("key_id")?,
        signature: row.get("signature")?,
    })
}

/// The one way a change commits: its audit record is appended in the same
/// transaction, so the change and its record are durable together or not at all.
pub(crate) async fn commit_change<D: Dialect>(mut tx: D::Tx, audit: &AuditEntry) -> StoreResult<()> {
    append_in::<D>(&mut tx, std::slice::from_ref(audit)).await?;
    D::commit(tx).await
}

/// Appends `entries` to their chains inside the caller's transaction. Heads are
/// locked in chain order, so concurrent appenders (other nodes, change
/// transactions) queue behind each other instead of forking a chain.
pub(crate) async fn append_in<D: Dialect>(conn: &mut D::Conn, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>> {
    let mut chains: Vec<&str> = entries.iter().map(|e| e.chain.as_str()).collect();
    chains.sort_unstable();
    chains.dedup();
    let mut heads = HashMap::new();
    for chain in chains {
        let create =
            Sql::new("INSERT INTO audit_heads (chain, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (chain) DO NOTHING")
                .bind(chain)
                .bind(&[0u8; 32][..]);
        execute::<D>(conn, create).await?;
        let head = Sql::new(format!("SELECT seq, hash FROM audit_heads WHERE chain = $1{}", D::lock(Lock::Update)))
            .bind(chain);
        let row = one::<D>(conn, head).await?;
        heads.insert(chain.to_owned(), (row.get::<u64>("seq")?, row.hash("hash")?));
    }
    let mut records = Vec::with_capacity(entries.len());
    for entry in entries {
        let (seq, hash) = heads[&entry.chain];
        let record = AuditRecord::append(entry.clone(), seq, hash);
        heads.insert(entry.chain.clone(), (record.seq, record.hash));
        records.push(record);
    }
    let rows = records
        .iter()
        .map(|record| {
            let e = &record.entry;
            vec![
                Value::from(e.chain.as_str()),
                Value::from(record.seq as i64),
                Value::from(e.id.as_uuid()),
                Value::from(e.occurred_at),
                Value::from(e.actor_kind.as_str()),
                Value::from(e.actor_id.clone()),
                Value::from(e.actor_name.clone()),
                Value::from(e.action),
                Value::from(e.resource_type.clone()),
                Value::from(e.resource_id.clone()),
                Value::from(e.outcome.as_str()),
                Value::from(i64::from(e.status)),
                Value::from(e.request_id.clone()),
                Value::from(e.client_ip.clone()),
                Value::from(e.user_agent.clone()),
                Value::from(e.details.as_str()),
                Value::from(record.prev_hash.to_vec()),
                Value::from(record.hash.to_vec()),
            ]
        })
        .collect();
    D::insert_rows(conn, concat_audit_into(), rows, "").await?;
    let mut heads: Vec<_> = heads.into_iter().collect();
    heads.sort_by(|a, b| a.0.cmp(&b.0));
    for (chain, (seq, hash)) in heads {
        let sql = Sql::new("UPDATE audit_heads SET seq = $1, hash = $2 WHERE chain = $3")
            .bind(seq as i64)
            .bind(&hash[..])
            .bind(chain);
        execute::<D>(conn, sql).await?;
    }
    metrics::counter!("paygate_audit_records_total").increment(records.len() as u64);
    Ok(records)
}

const fn concat_audit_into() -> &'static str {
    "audit_events (chain, seq, id, occurred_at, actor_kind, actor_id, actor_name, action, resource_type, \
     resource_id, outcome, status, request_id, client_ip, user_agent, details, prev_hash, hash)"
}

impl<D: Dialect> SqlStore<D> {
    /// Records of one chain, filtered, between two sequence numbers.
    pub(crate) async fn audit_query(
        &self,
        chain: String,
        filter: &AuditFilter,
        after_seq: Option<u64>,
        before_seq: Option<u64>,
        newest_first: bool,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>> {
        let sql = Sql::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = $1 \
             AND ($2 IS NULL OR action = $2) AND ($3 IS NULL OR actor_id = $3) \
             AND ($4 IS NULL OR resource_type = $4) AND ($5 IS NULL OR resource_id = $5) \
             AND ($6 IS NULL OR outcome = $6) AND ($7 IS NULL OR occurred_at >= $7) \
             AND ($8 IS NULL OR occurred_at < $8) AND seq > $9 AND seq < $10 \
             ORDER BY seq {} LIMIT $11",
            if newest_first { "DESC" } else { "ASC" }
        ))
        .bind(chain)
        .bind(filter.action.clone())
        .bind(filter.actor_key_id.clone())
        .bind(filter.resource_type.clone())
        .bind(filter.resource_id.clone())
        .bind(filter.outcome.map(|o| o.as_str()))
        .bind(filter.from)
        .bind(filter.to)
        .bind(after_seq.unwrap_or(0) as i64)
        .bind(before_seq.map(|b| b as i64).unwrap_or(i64::MAX))
        .bind(i64::from(limit));
        self.read_all(sql).await?.iter().map(audit_from_row).collect()
    }
}

/// A company's chain is named after the company: both modes share it.
fn chain_of(scope: &CompanyScope) -> String {
    scope.company_id().to_string()
}

#[async_trait]
impl<D: Dialect> AuditStore for SqlStore<D> {
    async fn append_audit(&self, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.db.begin().await?;
        if let Some(setup) = D::AUDIT_BATCH_SETUP {
            execute::<D>(&mut tx, Sql::new(setup)).await?;
        }
        let records = append_in::<D>(&mut tx, entries).await?;
        D::commit(tx).await?;
        Ok(records)
    }

    async fn list_audit(
        &self,
        scope: &CompanyScope,
        filter: &AuditFilter,
        page: PageRequest<u64>,
    ) -> StoreResult<Page<AuditRecord>> {
        let rows = self.audit_query(chain_of(scope), filter, None, page.after, true, page.limit + 1).await?;
        Ok(Page::from_overfetch(rows, page.limit))
    }

    async fn get_audit(&self, scope: &CompanyScope, id: AuditEventId) -> StoreResult<Option<AuditRecord>> {
        let sql = Sql::new(format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE chain = $1 AND id = $2"))
            .bind(chain_of(scope))
            .bind(id.as_uuid());
        self.read_optional(sql).await?.as_ref().map(audit_from_row).transpose()
    }

    async fn export_audit(
        &self,
        scope: &CompanyScope,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>> {
        let filter = AuditFilter { from, to, ..AuditFilter::default() };
        self.audit_query(chain_of(scope), &filter, Some(after_seq), None, false, limit).await
    }

    async fn audit_head(&self, scope: &CompanyScope) -> StoreResult<Option<(u64, [u8; 32])>> {
        let sql = Sql::new("SELECT seq, hash FROM audit_heads WHERE chain = $1 AND seq > 0").bind(chain_of(scope));
        let Some(row) = self.read_optional(sql).await? else { return Ok(None) };
        Ok(Some((row.get("seq")?, row.hash("hash")?)))
    }

    async fn latest_checkpoint(&self, scope: &CompanyScope) -> StoreResult<Option<Checkpoint>> {
        let sql = Sql::new(format!("{CHECKPOINT_SELECT} WHERE chain = $1 ORDER BY seq DESC, signed_at DESC LIMIT 1"))
            .bind(chain_of(scope));
        self.read_optional(sql).await?.as_ref().map(checkpoint_from_row).transpose()
    }
}
