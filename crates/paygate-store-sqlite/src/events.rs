//! Events, webhook endpoints and deliveries on SQLite.

use paygate_domain::audit::AuditEntry;
use paygate_domain::event::EventTypes;
use paygate_domain::{ApiKeyId, CompanyId, EventId, EventType, KeyMode, WebhookDeliveryId, WebhookEndpointId};
use paygate_store::{
    ApiKey, CompanyScope, Delivery, DeliveryAttempt, DeliveryJob, DeliveryResult, DeliveryStatus, EndpointPatch, Event,
    EventFilter, MAX_ENDPOINTS, MAX_IN_FLIGHT_PER_ENDPOINT, NewDelivery, NewEvent, NewWebhookEndpoint, NextStep, Page,
    PageRequest, StoreResult, WebhookEndpoint, assign_sequences, fan_out, objects_to_sequence,
};
use sqlx::SqliteConnection;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{SqliteStore, append_in, corrupt, from_micros, get, map_err, micros, opt_from_micros};

const EVENT_COLUMNS: &str =
    "id, company_id, mode, type, object_id, sequence, previous_status, object, created_at FROM events";
const ENDPOINT_COLUMNS: &str = "id, company_id, mode, url, description, event_types, enabled, disabled_reason, \
     failing_since, previous_secret_expires_at, created_at, updated_at FROM webhook_endpoints";

fn event_from_row(row: &SqliteRow) -> StoreResult<Event> {
    event_from_columns(row, "id")
}

/// An event from a row whose event id is in column `id_column`.
fn event_from_columns(row: &SqliteRow, id_column: &str) -> StoreResult<Event> {
    let mode: String = get(row, "mode")?;
    let kind: String = get(row, "type")?;
    Ok(Event {
        id: EventId::from_uuid(get(row, id_column)?),
        company_id: CompanyId::from_uuid(get(row, "company_id")?),
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("event mode", &mode))?,
        kind: EventType::parse(&kind).ok_or_else(|| corrupt("event type", &kind))?,
        object_id: get(row, "object_id")?,
        sequence: get::<i64>(row, "sequence")? as u64,
        previous_status: get(row, "previous_status")?,
        object: get(row, "object")?,
        created_at: from_micros(get(row, "created_at")?)?,
    })
}

fn endpoint_from_row(row: &SqliteRow) -> StoreResult<WebhookEndpoint> {
    let mode: String = get(row, "mode")?;
    let types: String = get(row, "event_types")?;
    Ok(WebhookEndpoint {
        id: WebhookEndpointId::from_uuid(get(row, "id")?),
        company_id: CompanyId::from_uuid(get(row, "company_id")?),
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("endpoint mode", &mode))?,
        url: get(row, "url")?,
        description: get(row, "description")?,
        event_types: EventTypes::from_storage(&types).ok_or_else(|| corrupt("event types", &types))?,
        enabled: get::<i64>(row, "enabled")? != 0,
        disabled_reason: get(row, "disabled_reason")?,
        failing_since: opt_from_micros(get(row, "failing_since")?)?,
        previous_secret_expires_at: opt_from_micros(get(row, "previous_secret_expires_at")?)?,
        created_at: from_micros(get(row, "created_at")?)?,
        updated_at: from_micros(get(row, "updated_at")?)?,
    })
}

/// Inserts a change's events, with their per-object sequence numbers, and
/// one delivery per subscribed enabled endpoint, in the caller's transaction.
pub(crate) async fn write_events(conn: &mut SqliteConnection, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let events = number_events(conn, events).await?;
    let mut tenants: Vec<(CompanyId, KeyMode)> = events.iter().map(|e| (e.company_id, e.mode)).collect();
    tenants.sort_by_key(|(c, m)| (*c, m.as_str()));
    tenants.dedup();
    let mut endpoints = Vec::new();
    for (company, mode) in tenants {
        let rows = sqlx::query(
            "SELECT id, event_types FROM webhook_endpoints WHERE company_id = ? AND mode = ? AND enabled = 1",
        )
        .bind(company.as_uuid())
        .bind(mode.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err)?;
        for row in &rows {
            endpoints.push((company, mode, WebhookEndpointId::from_uuid(get(row, "id")?), get(row, "event_types")?));
        }
    }
    insert_deliveries(conn, &fan_out(&events, &endpoints)?).await?;
    Ok(events)
}

/// Numbers the events per object (from each object's last stored sequence)
/// and inserts them, without fan-out.
async fn number_events(conn: &mut SqliteConnection, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
    let mut last = std::collections::HashMap::new();
    for key in objects_to_sequence(&events) {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE company_id = ? AND mode = ? AND object_id = ?",
        )
        .bind(key.0.as_uuid())
        .bind(key.1.as_str())
        .bind(&key.2)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
        last.insert(key, n as u64);
    }
    let events = assign_sequences(events, &last);
    insert_event_rows(conn, &events).await?;
    Ok(events)
}

async fn insert_deliveries(conn: &mut SqliteConnection, deliveries: &[NewDelivery]) -> StoreResult<()> {
    for chunk in deliveries.chunks(100) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO webhook_deliveries (id, company_id, endpoint_id, event_id, object_id, sequence, status, \
             attempts, next_attempt_at, created_at, updated_at) ",
        );
        insert.push_values(chunk, |mut row, d| {
            row.push_bind(d.id.as_uuid())
                .push_bind(d.company_id.as_uuid())
                .push_bind(d.endpoint_id.as_uuid())
                .push_bind(d.event_id.as_uuid())
                .push_bind(d.object_id.clone())
                .push_bind(d.sequence as i64)
                .push_bind("pending")
                .push_bind(0i64)
                .push_bind(micros(d.created_at))
                .push_bind(micros(d.created_at))
                .push_bind(micros(d.created_at));
        });
        insert.build().execute(&mut *conn).await.map_err(map_err)?;
    }
    Ok(())
}

/// The one way a change with events commits: the change, its events and
/// deliveries, and its audit record, in one transaction.
pub(crate) async fn commit_with_events(
    mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    audit: &AuditEntry,
    events: Vec<NewEvent>,
) -> StoreResult<()> {
    write_events(&mut tx, events).await?;
    crate::commit_change(tx, audit).await
}

async fn endpoint_in(
    conn: &mut SqliteConnection,
    company: CompanyId,
    mode: Option<KeyMode>,
    id: WebhookEndpointId,
) -> StoreResult<Option<WebhookEndpoint>> {
    let sql = format!("SELECT {ENDPOINT_COLUMNS} WHERE id = ?1 AND company_id = ?2 AND (?3 IS NULL OR mode = ?3)");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .bind(company.as_uuid())
        .bind(mode.map(|m| m.as_str()))
        .fetch_optional(conn)
        .await
        .map_err(map_err)?;
    row.as_ref().map(endpoint_from_row).transpose()
}

async fn event_in(
    conn: &mut SqliteConnection,
    company: CompanyId,
    mode: KeyMode,
    id: EventId,
) -> StoreResult<Option<Event>> {
    let sql = format!("SELECT {EVENT_COLUMNS} WHERE id = ? AND company_id = ? AND mode = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .bind(company.as_uuid())
        .bind(mode.as_str())
        .fetch_optional(conn)
        .await
        .map_err(map_err)?;
    row.as_ref().map(event_from_row).transpose()
}

impl SqliteStore {
    pub(crate) async fn events_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &EventFilter,
        page: PageRequest<EventId>,
    ) -> StoreResult<Page<Event>> {
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let sql = format!(
            "SELECT {EVENT_COLUMNS} WHERE company_id = ?1 AND mode = ?2 AND id < ?3 \
             AND (?4 IS NULL OR type = ?4) AND (?5 IS NULL OR object_id = ?5) \
             AND (?7 IS NULL OR instr(?7, ' ' || type || ' ') > 0) ORDER BY id DESC LIMIT ?6"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .bind(after)
            .bind(filter.kind.map(|k| k.as_str()))
            .bind(filter.object_id.as_deref())
            .bind(page.limit as i64 + 1)
            .bind(filter.types_param())
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        let items = rows.iter().map(event_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    pub(crate) async fn find_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: EventId,
    ) -> StoreResult<Option<Event>> {
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        event_in(&mut conn, scope.company_id(), mode, id).await
    }

    pub(crate) async fn insert_endpoint(
        &self,
        scope: &CompanyScope,
        new: &NewWebhookEndpoint,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let e = &new.endpoint;
        let mut tx = self.begin_write().await?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_endpoints WHERE company_id = ? AND mode = ?")
            .bind(scope.company_id().as_uuid())
            .bind(e.mode.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        if count >= MAX_ENDPOINTS as i64 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, company_id, mode, url, description, event_types, enabled, \
             disabled_reason, failing_since, secret_sealed, previous_secret_sealed, previous_secret_expires_at, \
             created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, NULL, NULL, ?, ?)",
        )
        .bind(e.id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(e.mode.as_str())
        .bind(&e.url)
        .bind(&e.description)
        .bind(e.event_types.to_storage())
        .bind(e.enabled as i64)
        .bind(&new.secret_sealed)
        .bind(micros(e.created_at))
        .bind(micros(e.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        crate::commit_change(tx, audit).await?;
        Ok(true)
    }

    pub(crate) async fn endpoints_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        page: PageRequest<WebhookEndpointId>,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let sql =
            format!("SELECT {ENDPOINT_COLUMNS} WHERE company_id = ? AND mode = ? AND id < ? ORDER BY id DESC LIMIT ?");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .bind(after)
            .bind(page.limit as i64 + 1)
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        let items = rows.iter().map(endpoint_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    pub(crate) async fn find_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        endpoint_in(&mut conn, scope.company_id(), Some(mode), id).await
    }

    pub(crate) async fn patch_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        patch: &EndpointPatch,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let mut tx = self.begin_write().await?;
        let Some(current) = endpoint_in(&mut tx, scope.company_id(), Some(mode), id).await? else { return Ok(None) };
        let e = patch.apply(current, paygate_domain::now());
        sqlx::query(
            "UPDATE webhook_endpoints SET url = ?, description = ?, event_types = ?, enabled = ?, \
             disabled_reason = ?, failing_since = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&e.url)
        .bind(&e.description)
        .bind(e.event_types.to_storage())
        .bind(e.enabled as i64)
        .bind(&e.disabled_reason)
        .bind(e.failing_since.map(micros))
        .bind(micros(e.updated_at))
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        crate::commit_change(tx, audit).await?;
        Ok(Some(e))
    }

    pub(crate) async fn remove_endpoint(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM webhook_endpoints WHERE id = ? AND company_id = ? AND mode = ?")
            .bind(id.as_uuid())
            .bind(scope.company_id().as_uuid())
            .bind(mode.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        crate::commit_change(tx, audit).await?;
        Ok(true)
    }

    pub(crate) async fn rotate_secret(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        new_sealed: &[u8],
        previous_expires_at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE webhook_endpoints SET previous_secret_sealed = secret_sealed, secret_sealed = ?, \
             previous_secret_expires_at = ?, updated_at = ? WHERE id = ? AND company_id = ? AND mode = ?",
        )
        .bind(new_sealed)
        .bind(micros(previous_expires_at))
        .bind(micros(paygate_domain::now()))
        .bind(id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(mode.as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        let endpoint = endpoint_in(&mut tx, scope.company_id(), Some(mode), id).await?;
        crate::commit_change(tx, audit).await?;
        Ok(endpoint)
    }

    pub(crate) async fn test_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Event>> {
        let mut tx = self.begin_write().await?;
        let Some(endpoint) = endpoint_in(&mut tx, scope.company_id(), Some(mode), id).await? else { return Ok(None) };
        let new = NewEvent::webhook_endpoint(EventType::Ping, &endpoint, None);
        // A ping goes to this endpoint only: it is written without fan-out.
        let event = number_events(&mut tx, vec![new]).await?.remove(0);
        insert_deliveries(&mut tx, &[NewDelivery::of(&event, id)]).await?;
        crate::commit_change(tx, audit).await?;
        Ok(Some(event))
    }

    pub(crate) async fn redeliver(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: EventId,
        endpoint: Option<WebhookEndpointId>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<u32>> {
        let company = scope.company_id();
        let mut tx = self.begin_write().await?;
        let Some(event) = event_in(&mut tx, company, mode, id).await? else { return Ok(None) };
        let targets: Vec<WebhookEndpointId> = match endpoint {
            Some(eid) => match endpoint_in(&mut tx, company, Some(mode), eid).await? {
                Some(e) => vec![e.id],
                None => return Ok(None),
            },
            None => {
                let sql = format!("SELECT {ENDPOINT_COLUMNS} WHERE company_id = ? AND mode = ? AND enabled = 1");
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(company.as_uuid())
                    .bind(mode.as_str())
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(map_err)?;
                let endpoints = rows.iter().map(endpoint_from_row).collect::<StoreResult<Vec<_>>>()?;
                endpoints.into_iter().filter(|e| e.event_types.includes(event.kind)).map(|e| e.id).collect()
            }
        };
        let now = paygate_domain::now();
        let deliveries: Vec<NewDelivery> =
            targets.iter().map(|t| NewDelivery { created_at: now, ..NewDelivery::of(&event, *t) }).collect();
        insert_deliveries(&mut tx, &deliveries).await?;
        crate::commit_change(tx, audit).await?;
        Ok(Some(deliveries.len() as u32))
    }

    pub(crate) async fn deliveries_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        endpoint: WebhookEndpointId,
        page: PageRequest<WebhookDeliveryId>,
    ) -> StoreResult<Option<Page<Delivery>>> {
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        if endpoint_in(&mut conn, scope.company_id(), Some(mode), endpoint).await?.is_none() {
            return Ok(None);
        }
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let rows = sqlx::query(
            "SELECT d.id, d.endpoint_id, d.event_id, e.type, d.status, d.next_attempt_at, d.created_at \
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.endpoint_id = ? AND d.company_id = ? AND d.id < ? ORDER BY d.id DESC LIMIT ?",
        )
        .bind(endpoint.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(after)
        .bind(page.limit as i64 + 1)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err)?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let kind: String = get(row, "type")?;
            let status: String = get(row, "status")?;
            items.push(Delivery {
                id: WebhookDeliveryId::from_uuid(get(row, "id")?),
                endpoint_id: WebhookEndpointId::from_uuid(get(row, "endpoint_id")?),
                event_id: EventId::from_uuid(get(row, "event_id")?),
                event_type: EventType::parse(&kind).ok_or_else(|| corrupt("event type", &kind))?,
                status: DeliveryStatus::parse(&status).ok_or_else(|| corrupt("delivery status", &status))?,
                next_attempt_at: opt_from_micros(get(row, "next_attempt_at")?)?,
                created_at: from_micros(get(row, "created_at")?)?,
                attempts: Vec::new(),
            });
        }
        let mut page = Page::from_overfetch(items, page.limit);
        if !page.items.is_empty() {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT delivery_id, attempted_at, status_code, latency_ms, error FROM webhook_attempts \
                 WHERE delivery_id IN (",
            );
            let mut list = query.separated(", ");
            for d in &page.items {
                list.push_bind(d.id.as_uuid());
            }
            query.push(") ORDER BY delivery_id, attempt");
            let rows = query.build().fetch_all(&mut *conn).await.map_err(map_err)?;
            for row in &rows {
                let id = WebhookDeliveryId::from_uuid(get(row, "delivery_id")?);
                let attempt = attempt_from_row(row)?;
                if let Some(d) = page.items.iter_mut().find(|d| d.id == id) {
                    d.attempts.push(attempt);
                }
            }
        }
        Ok(Some(page))
    }

    pub(crate) async fn claim(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.begin_write().await?;
        // Due, enabled, not under a live lease, first in line for its object
        // at its endpoint (no earlier one pending, none of it in flight), and
        // within its endpoint's share: one slow endpoint cannot take every slot.
        let rows = sqlx::query(
            "SELECT c.id, c.endpoint_id, c.attempts, w.url, w.secret_sealed, \
             CASE WHEN w.previous_secret_expires_at > ?1 THEN w.previous_secret_sealed END AS previous_secret_sealed, \
             e.id AS event_id, e.company_id, e.mode, e.type, e.object_id, e.sequence, e.previous_status, e.object, \
             e.created_at \
             FROM (SELECT d.id, d.endpoint_id, d.event_id, d.attempts, d.next_attempt_at, \
                     ROW_NUMBER() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) \
                       + COALESCE(b.leased, 0) AS rank \
                   FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                   LEFT JOIN (SELECT endpoint_id, COUNT(*) AS leased FROM webhook_deliveries \
                       WHERE status = 'pending' AND lease_until > ?1 GROUP BY endpoint_id) b \
                     ON b.endpoint_id = d.endpoint_id \
                   WHERE d.status = 'pending' AND d.next_attempt_at <= ?1 \
                   AND (d.lease_until IS NULL OR d.lease_until <= ?1) AND w.enabled = 1 \
                   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id \
                       AND p.object_id = d.object_id AND p.status = 'pending' \
                       AND (p.sequence < d.sequence OR (p.sequence = d.sequence AND p.id < d.id) \
                            OR p.lease_until > ?1))) c \
             JOIN webhook_endpoints w ON w.id = c.endpoint_id \
             JOIN events e ON e.id = c.event_id \
             WHERE c.rank <= ?3 \
             ORDER BY c.next_attempt_at, c.id LIMIT ?2",
        )
        .bind(micros(now))
        .bind(limit as i64)
        .bind(MAX_IN_FLIGHT_PER_ENDPOINT as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let event = event_from_columns(row, "event_id")?;
            jobs.push(DeliveryJob {
                delivery_id: WebhookDeliveryId::from_uuid(get(row, "id")?),
                endpoint_id: WebhookEndpointId::from_uuid(get(row, "endpoint_id")?),
                url: get(row, "url")?,
                secret_sealed: get(row, "secret_sealed")?,
                previous_secret_sealed: get(row, "previous_secret_sealed")?,
                event,
                attempt: get::<i64>(row, "attempts")? as u32 + 1,
            });
        }
        for job in &jobs {
            sqlx::query("UPDATE webhook_deliveries SET lease_owner = ?, lease_until = ? WHERE id = ?")
                .bind(owner)
                .bind(micros(lease_until))
                .bind(job.delivery_id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(jobs)
    }

    pub(crate) async fn finish(
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
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?, next_attempt_at = ?, \
             lease_owner = NULL, lease_until = NULL, updated_at = ? \
             WHERE id = ? AND lease_owner = ? AND status = 'pending' RETURNING endpoint_id, company_id, attempts",
        )
        .bind(status.as_str())
        .bind(next_at.map(micros))
        .bind(micros(a.attempted_at))
        .bind(result.delivery_id.as_uuid())
        .bind(&result.lease_owner)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(false) };
        let endpoint_id = WebhookEndpointId::from_uuid(get(&row, "endpoint_id")?);
        let company = CompanyId::from_uuid(get(&row, "company_id")?);
        let attempt_no: i64 = get(&row, "attempts")?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, latency_ms, error) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(result.delivery_id.as_uuid())
        .bind(attempt_no)
        .bind(micros(a.attempted_at))
        .bind(a.status_code.map(i64::from))
        .bind(a.latency_ms as i64)
        .bind(&a.error)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let succeeded = result.next == NextStep::Succeeded;
        let failing_since: Option<i64> = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET failing_since = CASE WHEN ?1 THEN NULL ELSE COALESCE(failing_since, ?2) END \
             WHERE id = ?3 RETURNING failing_since",
        )
        .bind(succeeded)
        .bind(micros(a.attempted_at))
        .bind(endpoint_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?
        .flatten();
        let reason = result.disable.or_else(|| {
            failing_since.filter(|since| *since <= micros(result.disable_if_failing_since)).map(|_| "failing")
        });
        let mut records = vec![audit.clone()];
        if let Some(reason) = reason {
            let changed = sqlx::query(
                "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ?, updated_at = ? WHERE id = ? AND enabled = 1",
            )
            .bind(reason)
            .bind(micros(a.attempted_at))
            .bind(endpoint_id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
            if changed > 0 {
                if let Some(endpoint) = endpoint_in(&mut tx, company, None, endpoint_id).await? {
                    write_events(
                        &mut tx,
                        vec![NewEvent::webhook_endpoint(
                            EventType::WebhookEndpointDisabled,
                            &endpoint,
                            Some("enabled"),
                        )],
                    )
                    .await?;
                }
                records.push(disable_audit.clone());
            }
        }
        append_in(&mut tx, &records).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    pub(crate) async fn keys_expiring(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(crate::key_select!(
            "WHERE k.revoked_at IS NULL AND k.replaced_by IS NULL AND k.expiry_noticed_at IS NULL \
             AND k.expires_at > ?1 AND k.expires_at <= ?2 ORDER BY k.expires_at LIMIT ?3"
        ))
        .bind(micros(now))
        .bind(micros(until))
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter().map(crate::key_from_row).collect()
    }

    pub(crate) async fn note_expiring(&self, id: ApiKeyId, audit: &AuditEntry) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let changed =
            sqlx::query("UPDATE api_keys SET expiry_noticed_at = ? WHERE id = ? AND expiry_noticed_at IS NULL")
                .bind(micros(paygate_domain::now()))
                .bind(id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        let Some(key) = crate::scoped_key(&mut tx, None, id).await? else { return Ok(false) };
        commit_with_events(tx, audit, vec![NewEvent::api_key(EventType::ApiKeyExpiring, &key, None)]).await?;
        Ok(true)
    }
}

fn attempt_from_row(row: &SqliteRow) -> StoreResult<DeliveryAttempt> {
    let code: Option<i64> = get(row, "status_code")?;
    Ok(DeliveryAttempt {
        attempted_at: from_micros(get(row, "attempted_at")?)?,
        status_code: code.map(|c| c as u16),
        latency_ms: get::<i64>(row, "latency_ms")? as u32,
        error: get(row, "error")?,
    })
}

async fn insert_event_rows(conn: &mut SqliteConnection, events: &[Event]) -> StoreResult<()> {
    for chunk in events.chunks(100) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO events (id, company_id, mode, type, object_id, sequence, previous_status, object, created_at) ",
        );
        insert.push_values(chunk, |mut row, e| {
            row.push_bind(e.id.as_uuid())
                .push_bind(e.company_id.as_uuid())
                .push_bind(e.mode.as_str())
                .push_bind(e.kind.as_str())
                .push_bind(e.object_id.clone())
                .push_bind(e.sequence as i64)
                .push_bind(e.previous_status.clone())
                .push_bind(e.object.clone())
                .push_bind(micros(e.created_at));
        });
        insert.build().execute(&mut *conn).await.map_err(map_err)?;
    }
    Ok(())
}
