//! Events (the transactional outbox), webhook endpoints and deliveries.
//!
//! Several nodes may share the tables: an object's next event number is read
//! while the change holds the object's row lock (the unique constraint on
//! `(company_id, mode, object_id, sequence)` backs it; SQLite's single writer
//! serialises it anyway), and deliveries are leased by the dialect's claim.

use async_trait::async_trait;
use paygate_domain::audit::AuditEntry;
use paygate_domain::event::EventTypes;
use paygate_domain::{CompanyId, EventId, EventType, KeyMode, WebhookDeliveryId, WebhookEndpointId};
use paygate_store::{
    CompanyScope, Delivery, DeliveryAttempt, DeliveryStatus, EndpointPatch, Event, EventFilter, EventStore,
    MAX_ENDPOINTS, NewDelivery, NewEvent, NewWebhookEndpoint, Page, PageRequest, StoreError, StoreResult,
    WebhookEndpoint, assign_sequences, fan_out, objects_to_sequence,
};
use time::OffsetDateTime;

use crate::audit::commit_change;
use crate::keys::lock_company;
use crate::{Dialect, Lock, Row, Sql, SqlStore, Value, all, cursor, execute, one, optional, overfetch, placeholders};

const EVENT_SELECT: &str =
    "SELECT id, company_id, mode, type, object_id, sequence, previous_status, object, created_at FROM events";
/// The endpoint columns an endpoint is read from (never its secrets).
pub(crate) const ENDPOINT_COLUMNS: &str = "id, company_id, mode, url, description, event_types, enabled, \
     disabled_reason, failing_since, previous_secret_expires_at, created_at, updated_at";

fn event_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<Event> {
    event_from_columns(row, "id")
}

/// An event from a row whose event id is in column `id_column`.
pub(crate) fn event_from_columns<D: Dialect>(row: &Row<D>, id_column: &str) -> StoreResult<Event> {
    let mode: String = row.get("mode")?;
    let kind: String = row.get("type")?;
    Ok(Event {
        id: EventId::from_uuid(row.get(id_column)?),
        company_id: CompanyId::from_uuid(row.get("company_id")?),
        mode: KeyMode::parse(&mode).ok_or_else(|| StoreError::corrupt("event mode", &mode))?,
        kind: EventType::parse(&kind).ok_or_else(|| StoreError::corrupt("event type", &kind))?,
        object_id: row.get("object_id")?,
        sequence: row.get("sequence")?,
        previous_status: row.get("previous_status")?,
        object: row.get("object")?,
        created_at: row.get("created_at")?,
    })
}

pub(crate) fn endpoint_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<WebhookEndpoint> {
    let mode: String = row.get("mode")?;
    let types: String = row.get("event_types")?;
    Ok(WebhookEndpoint {
        id: WebhookEndpointId::from_uuid(row.get("id")?),
        company_id: CompanyId::from_uuid(row.get("company_id")?),
        mode: KeyMode::parse(&mode).ok_or_else(|| StoreError::corrupt("endpoint mode", &mode))?,
        url: row.get("url")?,
        description: row.get("description")?,
        event_types: EventTypes::from_storage(&types).ok_or_else(|| StoreError::corrupt("event types", &types))?,
        enabled: row.get("enabled")?,
        disabled_reason: row.get("disabled_reason")?,
        failing_since: row.get("failing_since")?,
        previous_secret_expires_at: row.get("previous_secret_expires_at")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn attempt_from_row<D: Dialect>(row: &Row<D>) -> StoreResult<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        attempted_at: row.get("attempted_at")?,
        status_code: row.get("status_code")?,
        latency_ms: row.get("latency_ms")?,
        error: row.get("error")?,
    })
}

/// Inserts a change's events, with their per-object sequence numbers, and
/// one delivery per subscribed enabled endpoint, in the caller's transaction.
/// The caller holds the row lock of every object whose event is not its
/// creation, so no other writer numbers the same object meanwhile.
pub(crate) async fn write_events<D: Dialect>(conn: &mut D::Conn, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let events = number_events::<D>(conn, events).await?;
    let mut tenants: Vec<(CompanyId, KeyMode)> = events.iter().map(|e| (e.company_id, e.mode)).collect();
    tenants.sort_by_key(|(c, m)| (*c, m.as_str()));
    tenants.dedup();
    let mut endpoints = Vec::new();
    for (company, mode) in tenants {
        // Key-share locked: an endpoint being deleted is waited for and then
        // skipped, rather than failing this change on its foreign key.
        let sql = Sql::new(format!(
            "SELECT id, event_types FROM webhook_endpoints WHERE company_id = $1 AND mode = $2 AND enabled = TRUE{}",
            D::lock(Lock::KeyShare)
        ))
        .bind(company.as_uuid())
        .bind(mode.as_str());
        for row in all::<D>(conn, sql).await? {
            endpoints.push((company, mode, WebhookEndpointId::from_uuid(row.get("id")?), row.get("event_types")?));
        }
    }
    insert_deliveries::<D>(conn, &fan_out(&events, &endpoints)?).await?;
    Ok(events)
}

/// Numbers the events per object (from each object's last stored sequence)
/// and inserts them, without fan-out.
async fn number_events<D: Dialect>(conn: &mut D::Conn, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
    let mut last = std::collections::HashMap::new();
    for key in objects_to_sequence(&events) {
        let sql = Sql::new(
            "SELECT COALESCE(MAX(sequence), 0) AS last FROM events WHERE company_id = $1 AND mode = $2 AND object_id = $3",
        )
        .bind(key.0.as_uuid())
        .bind(key.1.as_str())
        .bind(key.2.as_str());
        let n: u64 = one::<D>(conn, sql).await?.get("last")?;
        last.insert(key, n);
    }
    let events = assign_sequences(events, &last);
    let rows = events
        .iter()
        .map(|e| {
            vec![
                Value::from(e.id.as_uuid()),
                Value::from(e.company_id.as_uuid()),
                Value::from(e.mode.as_str()),
                Value::from(e.kind.as_str()),
                Value::from(e.object_id.as_str()),
                Value::from(e.sequence as i64),
                Value::from(e.previous_status.clone()),
                Value::from(e.object.as_str()),
                Value::from(e.created_at),
            ]
        })
        .collect();
    D::insert_rows(
        conn,
        "events (id, company_id, mode, type, object_id, sequence, previous_status, object, created_at)",
        rows,
        "",
    )
    .await?;
    Ok(events)
}

pub(crate) async fn insert_deliveries<D: Dialect>(conn: &mut D::Conn, deliveries: &[NewDelivery]) -> StoreResult<()> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let rows = deliveries
        .iter()
        .map(|d| {
            vec![
                Value::from(d.id.as_uuid()),
                Value::from(d.company_id.as_uuid()),
                Value::from(d.endpoint_id.as_uuid()),
                Value::from(d.event_id.as_uuid()),
                Value::from(d.object_id.as_str()),
                Value::from(d.sequence as i64),
                Value::from("pending"),
                Value::from(0i64),
                Value::from(d.created_at),
                Value::from(d.created_at),
                Value::from(d.created_at),
            ]
        })
        .collect();
    D::insert_rows(
        conn,
        "webhook_deliveries (id, company_id, endpoint_id, event_id, object_id, sequence, status, attempts, \
         next_attempt_at, created_at, updated_at)",
        rows,
        "",
    )
    .await?;
    Ok(())
}

/// The one way a change with events commits: the change, its events and
/// deliveries, and its audit record, in one transaction.
pub(crate) async fn commit_with_events<D: Dialect>(
    mut tx: D::Tx,
    audit: &AuditEntry,
    events: Vec<NewEvent>,
) -> StoreResult<()> {
    write_events::<D>(&mut tx, events).await?;
    commit_change::<D>(tx, audit).await
}

/// The scope's endpoint `id`, read under `lock` (`None`: no lock).
async fn endpoint_in<D: Dialect>(
    conn: &mut D::Conn,
    scope: &CompanyScope,
    id: WebhookEndpointId,
    lock: Option<Lock>,
) -> StoreResult<Option<WebhookEndpoint>> {
    let lock = lock.map(D::lock).unwrap_or("");
    let sql = Sql::tenant(
        scope,
        &format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE {{tenant}} AND id = $3{lock}"),
    )
    .bind(id.as_uuid());
    optional::<D>(conn, sql).await?.as_ref().map(endpoint_from_row).transpose()
}

async fn event_in<D: Dialect>(conn: &mut D::Conn, scope: &CompanyScope, id: EventId) -> StoreResult<Option<Event>> {
    let sql = Sql::tenant(scope, &format!("{EVENT_SELECT} WHERE {{tenant}} AND id = $3")).bind(id.as_uuid());
    optional::<D>(conn, sql).await?.as_ref().map(event_from_row).transpose()
}

#[async_trait]
impl<D: Dialect> EventStore for SqlStore<D> {
    async fn list_events(
        &self,
        scope: &CompanyScope,
        filter: &EventFilter,
        page: PageRequest<EventId>,
    ) -> StoreResult<Page<Event>> {
        let sql = Sql::tenant(
            scope,
            &format!(
                "{EVENT_SELECT} WHERE {{tenant}} AND id < $3 AND ($4 IS NULL OR type = $4) \
                 AND ($5 IS NULL OR object_id = $5) AND ($6 IS NULL OR {}($6, ' ' || type || ' ') > 0) \
                 ORDER BY id DESC LIMIT $7",
                D::STRPOS
            ),
        )
        .bind(cursor(page.after.map(|a| a.as_uuid())))
        .bind(filter.kind.map(|k| k.as_str()))
        .bind(filter.object_id.clone())
        .bind(filter.types_param())
        .bind(overfetch(page.limit));
        let items = self.read_all(sql).await?.iter().map(event_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    async fn get_event(&self, scope: &CompanyScope, id: EventId) -> StoreResult<Option<Event>> {
        event_in::<D>(&mut *self.read().await?, scope, id).await
    }

    async fn create_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        new: &NewWebhookEndpoint,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let e = &new.endpoint;
        let mut tx = self.db.begin().await?;
        // The company row, so two creations cannot both pass the count. (No
        // KEY SHARE conflict: rows referencing the company still insert.)
        if !lock_company::<D>(&mut tx, scope, Lock::NoKeyUpdate).await? {
            return Err(StoreError::NotFound("company"));
        }
        let count = Sql::tenant(scope, "SELECT COUNT(*) AS n FROM webhook_endpoints WHERE {tenant}");
        if one::<D>(&mut tx, count).await?.get::<i64>("n")? >= i64::from(MAX_ENDPOINTS) {
            return Ok(false);
        }
        let sql = Sql::new(
            "INSERT INTO webhook_endpoints (company_id, mode, id, url, description, event_types, enabled, \
             disabled_reason, failing_since, secret_sealed, previous_secret_sealed, previous_secret_expires_at, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, $8, NULL, NULL, $9, $10)",
        )
        .bind(scope.company_id().as_uuid())
        .bind(scope.mode().as_str())
        .bind(e.id.as_uuid())
        .bind(e.url.as_str())
        .bind(e.description.clone())
        .bind(e.event_types.to_storage())
        .bind(e.enabled)
        .bind(new.secret_sealed.clone())
        .bind(e.created_at)
        .bind(e.updated_at);
        execute::<D>(&mut tx, sql).await?;
        commit_change::<D>(tx, audit).await?;
        Ok(true)
    }

    async fn list_webhook_endpoints(
        &self,
        scope: &CompanyScope,
        page: PageRequest<WebhookEndpointId>,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        let sql = Sql::tenant(
            scope,
            &format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE {{tenant}} AND id < $3 ORDER BY id DESC LIMIT $4"),
        )
        .bind(cursor(page.after.map(|a| a.as_uuid())))
        .bind(overfetch(page.limit));
        let items = self.read_all(sql).await?.iter().map(endpoint_from_row).collect::<StoreResult<Vec<_>>>()?;
        Ok(Page::from_overfetch(items, page.limit))
    }

    async fn get_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        endpoint_in::<D>(&mut *self.read().await?, scope, id, None).await
    }

    async fn update_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        patch: &EndpointPatch,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let mut tx = self.db.begin().await?;
        // Locked: a delivery finishing meanwhile cannot interleave its failure state.
        let Some(current) = endpoint_in::<D>(&mut tx, scope, id, Some(Lock::NoKeyUpdate)).await? else {
            return Ok(None);
        };
        let e = patch.apply(current, paygate_domain::now());
        let sql = Sql::tenant(
            scope,
            "UPDATE webhook_endpoints SET url = $3, description = $4, event_types = $5, enabled = $6, \
             disabled_reason = $7, failing_since = $8, updated_at = $9 WHERE {tenant} AND id = $10",
        )
        .bind(e.url.as_str())
        .bind(e.description.clone())
        .bind(e.event_types.to_storage())
        .bind(e.enabled)
        .bind(e.disabled_reason.clone())
        .bind(e.failing_since)
        .bind(e.updated_at)
        .bind(id.as_uuid());
        execute::<D>(&mut tx, sql).await?;
        commit_change::<D>(tx, audit).await?;
        Ok(Some(e))
    }

    async fn delete_webhook_endpoint(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<bool> {
        let mut tx = self.db.begin().await?;
        let sql = Sql::tenant(scope, "DELETE FROM webhook_endpoints WHERE {tenant} AND id = $3").bind(id.as_uuid());
        if execute::<D>(&mut tx, sql).await? == 0 {
            return Ok(false);
        }
        commit_change::<D>(tx, audit).await?;
        Ok(true)
    }

    async fn rotate_webhook_secret(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        new_sealed: &[u8],
        previous_expires_at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        let mut tx = self.db.begin().await?;
        let sql = Sql::tenant(
            scope,
            &format!(
                "UPDATE webhook_endpoints SET previous_secret_sealed = secret_sealed, secret_sealed = $3, \
                 previous_secret_expires_at = $4, updated_at = $5 WHERE {{tenant}} AND id = $6 \
                 RETURNING {ENDPOINT_COLUMNS}"
            ),
        )
        .bind(new_sealed)
        .bind(previous_expires_at)
        .bind(paygate_domain::now())
        .bind(id.as_uuid());
        let Some(row) = optional::<D>(&mut tx, sql).await? else { return Ok(None) };
        let endpoint = endpoint_from_row(&row)?;
        commit_change::<D>(tx, audit).await?;
        Ok(Some(endpoint))
    }

    async fn send_test_event(
        &self,
        scope: &CompanyScope,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Event>> {
        let mut tx = self.db.begin().await?;
        // Locked: the endpoint's events (pings, disablement) are numbered one writer at a time.
        let Some(endpoint) = endpoint_in::<D>(&mut tx, scope, id, Some(Lock::NoKeyUpdate)).await? else {
            return Ok(None);
        };
        let new = NewEvent::webhook_endpoint(EventType::Ping, &endpoint, None);
        // A ping goes to this endpoint only: it is written without fan-out.
        let event = number_events::<D>(&mut tx, vec![new]).await?.remove(0);
        insert_deliveries::<D>(&mut tx, &[NewDelivery::of(&event, id)]).await?;
        commit_change::<D>(tx, audit).await?;
        Ok(Some(event))
    }

    async fn redeliver_event(
        &self,
        scope: &CompanyScope,
        id: EventId,
        endpoint: Option<WebhookEndpointId>,
        audit: &AuditEntry,
    ) -> StoreResult<Option<u32>> {
        let mut tx = self.db.begin().await?;
        let Some(event) = event_in::<D>(&mut tx, scope, id).await? else { return Ok(None) };
        let targets: Vec<WebhookEndpointId> = match endpoint {
            Some(eid) => match endpoint_in::<D>(&mut tx, scope, eid, Some(Lock::KeyShare)).await? {
                Some(e) => vec![e.id],
                None => return Ok(None),
            },
            None => {
                let sql = Sql::tenant(
                    scope,
                    &format!(
                        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE {{tenant}} AND enabled = TRUE{}",
                        D::lock(Lock::KeyShare)
                    ),
                );
                let endpoints =
                    all::<D>(&mut tx, sql).await?.iter().map(endpoint_from_row).collect::<StoreResult<Vec<_>>>()?;
                endpoints.into_iter().filter(|e| e.event_types.includes(event.kind)).map(|e| e.id).collect()
            }
        };
        let now = paygate_domain::now();
        let deliveries: Vec<NewDelivery> =
            targets.iter().map(|t| NewDelivery { created_at: now, ..NewDelivery::of(&event, *t) }).collect();
        insert_deliveries::<D>(&mut tx, &deliveries).await?;
        commit_change::<D>(tx, audit).await?;
        Ok(Some(deliveries.len() as u32))
    }

    async fn list_deliveries(
        &self,
        scope: &CompanyScope,
        endpoint: WebhookEndpointId,
        page: PageRequest<WebhookDeliveryId>,
    ) -> StoreResult<Option<Page<Delivery>>> {
        let mut conn = self.read().await?;
        if endpoint_in::<D>(&mut conn, scope, endpoint, None).await?.is_none() {
            return Ok(None);
        }
        let sql = Sql::company(
            scope,
            "SELECT d.id, d.endpoint_id, d.event_id, e.type, d.status, d.next_attempt_at, d.created_at \
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.{company} AND d.endpoint_id = $2 AND d.id < $3 ORDER BY d.id DESC LIMIT $4",
        )
        .bind(endpoint.as_uuid())
        .bind(cursor(page.after.map(|a| a.as_uuid())))
        .bind(overfetch(page.limit));
        let mut items = Vec::new();
        for row in all::<D>(&mut conn, sql).await? {
            let kind: String = row.get("type")?;
            let status: String = row.get("status")?;
            items.push(Delivery {
                id: WebhookDeliveryId::from_uuid(row.get("id")?),
                endpoint_id: WebhookEndpointId::from_uuid(row.get("endpoint_id")?),
                event_id: EventId::from_uuid(row.get("event_id")?),
                event_type: EventType::parse(&kind).ok_or_else(|| StoreError::corrupt("event type", &kind))?,
                status: DeliveryStatus::parse(&status)
                    .ok_or_else(|| StoreError::corrupt("delivery status", &status))?,
                next_attempt_at: row.get("next_attempt_at")?,
                created_at: row.get("created_at")?,
                attempts: Vec::new(),
            });
        }
        let mut page = Page::from_overfetch(items, page.limit);
        if !page.items.is_empty() {
            let mut sql = Sql::new(format!(
                "SELECT delivery_id, attempted_at, status_code, latency_ms, error FROM webhook_attempts \
                 WHERE delivery_id IN ({}) ORDER BY delivery_id, attempt",
                placeholders(1, page.items.len())
            ));
            for d in &page.items {
                sql = sql.bind(d.id.as_uuid());
            }
            for row in all::<D>(&mut conn, sql).await? {
                let id = WebhookDeliveryId::from_uuid(row.get("delivery_id")?);
                let attempt = attempt_from_row(&row)?;
                if let Some(d) = page.items.iter_mut().find(|d| d.id == id) {
                    d.attempts.push(attempt);
                }
            }
        }
        Ok(Some(page))
    }
}
