//! Events, webhook endpoints and deliveries on PostgreSQL.
//!
//! Several nodes share the tables: an object's next event number is read
//! while the change holds the object's row lock (the unique constraint on
//! `(company_id, mode, object_id, sequence)` backs it), and deliveries are
//! leased with `FOR UPDATE SKIP LOCKED`, so two nodes never work on one.

use paygate_domain::audit::AuditEntry;
use paygate_domain::event::EventTypes;
use paygate_domain::{ApiKeyId, CompanyId, EventId, EventType, KeyMode, WebhookDeliveryId, WebhookEndpointId};
use paygate_store::{
    ApiKey, CompanyScope, Delivery, DeliveryAttempt, DeliveryJob, DeliveryResult, DeliveryStatus, EndpointPatch, Event,
    EventFilter, MAX_ENDPOINTS, MAX_IN_FLIGHT_PER_ENDPOINT, NewDelivery, NewEvent, NewWebhookEndpoint, NextStep, Page,
    PageRequest, StoreResult, WebhookEndpoint, assign_sequences, fan_out, objects_to_sequence,
};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{PostgresStore, append_in, commit_change, corrupt, get, map_err};

const EVENT_COLUMNS: &str =
    "id, company_id, mode, type, object_id, sequence, previous_status, object, created_at FROM events";
/// The endpoint columns an endpoint is read from (never its secrets).
macro_rules! endpoint_fields {
    () => {
        "id, company_id, mode, url, description, event_types, enabled, disabled_reason, failing_since, \
         previous_secret_expires_at, created_at, updated_at"
    };
}
const ENDPOINT_COLUMNS: &str = concat!(endpoint_fields!(), " FROM webhook_endpoints");

fn event_from_row(row: &PgRow) -> StoreResult<Event> {
    event_from_columns(row, "id")
}

/// An event from a row whose event id is in column `id_column`.
fn event_from_columns(row: &PgRow, id_column: &str) -> StoreResult<Event> {
    let mode: String = get(row, "mode")?;
    let kind: String = get(row, "type")?;
    let sequence: i64 = get(row, "sequence")?;
    Ok(Event {
        id: EventId::from_uuid(get(row, id_column)?),
        company_id: CompanyId::from_uuid(get(row, "company_id")?),
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("event mode", &mode))?,
        kind: EventType::parse(&kind).ok_or_else(|| corrupt("event type", &kind))?,
        object_id: get(row, "object_id")?,
        sequence: u64::try_from(sequence).map_err(|e| corrupt("event sequence", e))?,
        previous_status: get(row, "previous_status")?,
        object: get(row, "object")?,
        created_at: get(row, "created_at")?,
    })
}

fn endpoint_from_row(row: &PgRow) -> StoreResult<WebhookEndpoint> {
    let mode: String = get(row, "mode")?;
    let types: String = get(row, "event_types")?;
    Ok(WebhookEndpoint {
        id: WebhookEndpointId::from_uuid(get(row, "id")?),
        company_id: CompanyId::from_uuid(get(row, "company_id")?),
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("endpoint mode", &mode))?,
        url: get(row, "url")?,
        description: get(row, "description")?,
        event_types: EventTypes::from_storage(&types).ok_or_else(|| corrupt("event types", &types))?,
        enabled: get(row, "enabled")?,
        disabled_reason: get(row, "disabled_reason")?,
        failing_since: get(row, "failing_since")?,
        previous_secret_expires_at: get(row, "previous_secret_expires_at")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}

fn attempt_from_row(row: &PgRow) -> StoreResult<DeliveryAttempt> {
    let code: Option<i32> = get(row, "status_code")?;
    let latency: i64 = get(row, "latency_ms")?;
    Ok(DeliveryAttempt {
        attempted_at: get(row, "attempted_at")?,
        status_code: code.map(|c| u16::try_from(c).map_err(|e| corrupt("status code", e))).transpose()?,
        latency_ms: u32::try_from(latency).map_err(|e| corrupt("latency", e))?,
        error: get(row, "error")?,
    })
}

/// Inserts a change's events, with their per-object sequence numbers, and
/// one delivery per subscribed enabled endpoint, in the caller's transaction.
/// The caller holds the row lock of every object whose event is not its
/// creation, so no other writer numbers the same object meanwhile.
pub(crate) async fn write_events(conn: &mut PgConnection, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let events = number_events(conn, events).await?;
    let mut tenants: Vec<(CompanyId, KeyMode)> = events.iter().map(|e| (e.company_id, e.mode)).collect();
    tenants.sort_by_key(|(c, m)| (*c, m.as_str()));
    tenants.dedup();
    let mut endpoints = Vec::new();
    for (company, mode) in tenants {
        // Key-share locked: an endpoint being deleted is waited for and then
        // skipped, rather than failing this change on its foreign key.
        let rows = sqlx::query(
            "SELECT id, event_types FROM webhook_endpoints WHERE company_id = $1 AND mode = $2 AND enabled \
             FOR KEY SHARE",
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

/// The one way a change with events commits: the change, its events and
/// deliveries, and its audit record, in one transaction.
pub(crate) async fn commit_with_events(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    audit: &AuditEntry,
    events: Vec<NewEvent>,
) -> StoreResult<()> {
    write_events(&mut tx, events).await?;
    commit_change(tx, audit).await
}

async fn insert_event_rows(conn: &mut PgConnection, events: &[Event]) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    // One statement whatever the count (arrays unnested), as for audit records.
    sqlx::query(
        "INSERT INTO events (id, company_id, mode, type, object_id, sequence, previous_status, object, created_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
         $7::text[], $8::text[], $9::timestamptz[])",
    )
    .bind(events.iter().map(|e| e.id.as_uuid()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.company_id.as_uuid()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.mode.as_str().to_owned()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind.as_str().to_owned()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.object_id.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.sequence as i64).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.previous_status.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.object.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.created_at).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Numbers the events per object (from each object's last stored sequence)
/// and inserts them, without fan-out.
async fn number_events(conn: &mut PgConnection, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
    let keys = objects_to_sequence(&events);
    let mut last = std::collections::HashMap::with_capacity(keys.len());
    if !keys.is_empty() {
        // Every object's last number in one statement, in the order of `keys`.
        let numbers: Vec<i64> = sqlx::query_scalar(
            "SELECT COALESCE(l.sequence, 0) FROM UNNEST($1::uuid[], $2::text[], $3::text[]) \
             WITH ORDINALITY AS o(company_id, mode, object_id, n) \
             LEFT JOIN LATERAL (SELECT e.sequence FROM events e WHERE e.company_id = o.company_id \
                 AND e.mode = o.mode AND e.object_id = o.object_id ORDER BY e.sequence DESC LIMIT 1) l ON true \
             ORDER BY o.n",
        )
        .bind(keys.iter().map(|k| k.0.as_uuid()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1.as_str().to_owned()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2.clone()).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err)?;
        for (key, n) in keys.into_iter().zip(numbers) {
            last.insert(key, n as u64);
        }
    }
    let events = assign_sequences(events, &last);
    insert_event_rows(conn, &events).await?;
    Ok(events)
}

async fn insert_deliveries(conn: &mut PgConnection, deliveries: &[NewDelivery]) -> StoreResult<()> {
    if deliveries.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, company_id, endpoint_id, event_id, object_id, sequence, status, \
         attempts, next_attempt_at, created_at, updated_at) \
         SELECT d.id, d.company_id, d.endpoint_id, d.event_id, d.object_id, d.sequence, 'pending', 0, \
         d.created_at, d.created_at, d.created_at \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::bigint[], $7::timestamptz[]) \
         AS d(id, company_id, endpoint_id, event_id, object_id, sequence, created_at)",
    )
    .bind(deliveries.iter().map(|d| d.id.as_uuid()).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.company_id.as_uuid()).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.endpoint_id.as_uuid()).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.event_id.as_uuid()).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.object_id.clone()).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.sequence as i64).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.created_at).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// How [`endpoint_in`] locks the row it reads.
#[derive(Clone, Copy)]
enum Lock {
    None,
    /// Deliveries will reference it: a deletion waits for us.
    KeyShare,
    /// Its state or events change: other such writers queue behind us.
    Update,
}

/// The endpoint, if it is the company's (and of `mode`, when given).
async fn endpoint_in(
    conn: &mut PgConnection,
    company: CompanyId,
    mode: Option<KeyMode>,
    id: WebhookEndpointId,
    lock: Lock,
) -> StoreResult<Option<WebhookEndpoint>> {
    let sql = format!(
        "SELECT {ENDPOINT_COLUMNS} WHERE id = $1 AND company_id = $2 AND ($3::text IS NULL OR mode = $3){}",
        match lock {
            Lock::None => "",
            Lock::KeyShare => " FOR KEY SHARE",
            Lock::Update => " FOR NO KEY UPDATE",
        }
    );
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
    conn: &mut PgConnection,
    company: CompanyId,
    mode: KeyMode,
    id: EventId,
) -> StoreResult<Option<Event>> {
    let sql = format!("SELECT {EVENT_COLUMNS} WHERE id = $1 AND company_id = $2 AND mode = $3");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .bind(company.as_uuid())
        .bind(mode.as_str())
        .fetch_optional(conn)
        .await
        .map_err(map_err)?;
    row.as_ref().map(event_from_row).transpose()
}

impl PostgresStore {
    pub(crate) async fn events_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        filter: &EventFilter,
        page: PageRequest<EventId>,
    ) -> StoreResult<Page<Event>> {
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let sql = format!(
            "SELECT {EVENT_COLUMNS} WHERE company_id = $1 AND mode = $2 AND id < $3 \
             AND ($4::text IS NULL OR type = $4) AND ($5::text IS NULL OR object_id = $5) \
             AND ($7::text IS NULL OR position(' ' || type || ' ' in $7) > 0) ORDER BY id DESC LIMIT $6"
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
        let company = scope.company_id();
        let mut tx = self.begin_write().await?;
        // The company row, so two creations cannot both pass the count. (No
        // KEY SHARE conflict: rows referencing the company still insert.)
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM companies WHERE id = $1 FOR NO KEY UPDATE")
            .bind(company.as_uuid())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        if exists.is_none() {
            return Err(paygate_store::StoreError::NotFound("company"));
        }
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_endpoints WHERE company_id = $1 AND mode = $2")
                .bind(company.as_uuid())
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
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, $8, NULL, NULL, $9, $10)",
        )
        .bind(e.id.as_uuid())
        .bind(company.as_uuid())
        .bind(e.mode.as_str())
        .bind(&e.url)
        .bind(&e.description)
        .bind(e.event_types.to_storage())
        .bind(e.enabled)
        .bind(&new.secret_sealed)
        .bind(e.created_at)
        .bind(e.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        commit_change(tx, audit).await?;
        Ok(true)
    }

    pub(crate) async fn endpoints_page(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        page: PageRequest<WebhookEndpointId>,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let sql = format!(
            "SELECT {ENDPOINT_COLUMNS} WHERE company_id = $1 AND mode = $2 AND id < $3 ORDER BY id DESC LIMIT $4"
        );
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
        endpoint_in(&mut conn, scope.company_id(), Some(mode), id, Lock::None).await
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
        // Locked: a delivery finishing meanwhile cannot interleave its failure state.
        let Some(current) = endpoint_in(&mut tx, scope.company_id(), Some(mode), id, Lock::Update).await? else {
            return Ok(None);
        };
        let e = patch.apply(current, paygate_domain::now());
        sqlx::query(
            "UPDATE webhook_endpoints SET url = $1, description = $2, event_types = $3, enabled = $4, \
             disabled_reason = $5, failing_since = $6, updated_at = $7 WHERE id = $8",
        )
        .bind(&e.url)
        .bind(&e.description)
        .bind(e.event_types.to_storage())
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(e.failing_since)
        .bind(e.updated_at)
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        commit_change(tx, audit).await?;
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
        let deleted = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1 AND company_id = $2 AND mode = $3")
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
        commit_change(tx, audit).await?;
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
        let row = sqlx::query(concat!(
            "UPDATE webhook_endpoints SET previous_secret_sealed = secret_sealed, secret_sealed = $1, \
             previous_secret_expires_at = $2, updated_at = $3 WHERE id = $4 AND company_id = $5 AND mode = $6 \
             RETURNING ",
            endpoint_fields!()
        ))
        .bind(new_sealed)
        .bind(previous_expires_at)
        .bind(paygate_domain::now())
        .bind(id.as_uuid())
        .bind(scope.company_id().as_uuid())
        .bind(mode.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let endpoint = endpoint_from_row(&row)?;
        commit_change(tx, audit).await?;
        Ok(Some(endpoint))
    }

    pub(crate) async fn test_event(
        &self,
        scope: &CompanyScope,
        mode: KeyMode,
        id: WebhookEndpointId,
        audit: &AuditEntry,
    ) -> StoreResult<Option<Event>> {
        let mut tx = self.begin_write().await?;
        // Locked: the endpoint's events (pings, disablement) are numbered one writer at a time.
        let Some(endpoint) = endpoint_in(&mut tx, scope.company_id(), Some(mode), id, Lock::Update).await? else {
            return Ok(None);
        };
        let new = NewEvent::webhook_endpoint(EventType::Ping, &endpoint, None);
        // A ping goes to this endpoint only: it is written without fan-out.
        let event = number_events(&mut tx, vec![new]).await?.remove(0);
        insert_deliveries(&mut tx, &[NewDelivery::of(&event, id)]).await?;
        commit_change(tx, audit).await?;
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
            Some(eid) => match endpoint_in(&mut tx, company, Some(mode), eid, Lock::KeyShare).await? {
                Some(e) => vec![e.id],
                None => return Ok(None),
            },
            None => {
                let sql =
                    format!("SELECT {ENDPOINT_COLUMNS} WHERE company_id = $1 AND mode = $2 AND enabled FOR KEY SHARE");
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
        commit_change(tx, audit).await?;
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
        if endpoint_in(&mut conn, scope.company_id(), Some(mode), endpoint, Lock::None).await?.is_none() {
            return Ok(None);
        }
        let after = page.after.map(|a| a.as_uuid()).unwrap_or(Uuid::max());
        let rows = sqlx::query(
            "SELECT d.id, d.endpoint_id, d.event_id, e.type, d.status, d.next_attempt_at, d.created_at \
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.endpoint_id = $1 AND d.company_id = $2 AND d.id < $3 ORDER BY d.id DESC LIMIT $4",
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
                next_attempt_at: get(row, "next_attempt_at")?,
                created_at: get(row, "created_at")?,
                attempts: Vec::new(),
            });
        }
        let mut page = Page::from_overfetch(items, page.limit);
        if !page.items.is_empty() {
            let ids: Vec<Uuid> = page.items.iter().map(|d| d.id.as_uuid()).collect();
            let rows = sqlx::query(
                "SELECT delivery_id, attempted_at, status_code, latency_ms, error FROM webhook_attempts \
                 WHERE delivery_id = ANY($1) ORDER BY delivery_id, attempt",
            )
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(map_err)?;
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

    /// One statement: pick due deliveries (skipping rows another node is
    /// picking right now), lease them, and return what the worker needs. A
    /// row another node leased after this statement's snapshot is re-checked
    /// under its lock and dropped, so no delivery is leased twice.
    pub(crate) async fn claim(
        &self,
        now: OffsetDateTime,
        owner: &str,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let rows = sqlx::query(
            "WITH busy AS ( \
                 SELECT endpoint_id, COUNT(*) AS leased FROM webhook_deliveries \
                 WHERE status = 'pending' AND lease_until > $1 GROUP BY endpoint_id), \
             candidates AS ( \
                 SELECT d.id, d.next_attempt_at, \
                 ROW_NUMBER() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) \
                     + COALESCE(b.leased, 0) AS slot \
                 FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                 LEFT JOIN busy b ON b.endpoint_id = d.endpoint_id \
                 WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
                 AND (d.lease_until IS NULL OR d.lease_until <= $1) AND w.enabled \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id \
                     AND p.object_id = d.object_id AND p.status = 'pending' \
                     AND (p.sequence < d.sequence OR (p.sequence = d.sequence AND p.id < d.id) \
                          OR p.lease_until > $1))), \
             picked AS MATERIALIZED ( \
                 SELECT d.id FROM webhook_deliveries d JOIN candidates c ON c.id = d.id WHERE c.slot <= $5 \
                 ORDER BY c.next_attempt_at, c.id LIMIT $2 \
                 FOR UPDATE OF d SKIP LOCKED), \
             leased AS ( \
                 UPDATE webhook_deliveries d SET lease_owner = $3, lease_until = $4 FROM picked \
                 WHERE d.id = picked.id AND d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until <= $1) \
                 RETURNING d.id, d.endpoint_id, d.event_id, d.attempts, d.next_attempt_at) \
             SELECT l.id, l.endpoint_id, l.attempts, w.url, w.secret_sealed, \
             CASE WHEN w.previous_secret_expires_at > $1 THEN w.previous_secret_sealed END AS previous_secret_sealed, \
             e.id AS event_id, e.company_id, e.mode, e.type, e.object_id, e.sequence, e.previous_status, e.object, \
             e.created_at \
             FROM leased l JOIN webhook_endpoints w ON w.id = l.endpoint_id JOIN events e ON e.id = l.event_id \
             ORDER BY l.next_attempt_at, l.id",
        )
        .bind(now)
        .bind(limit as i64)
        .bind(owner)
        .bind(lease_until)
        .bind(MAX_IN_FLIGHT_PER_ENDPOINT as i64)
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let attempts: i32 = get(row, "attempts")?;
            jobs.push(DeliveryJob {
                delivery_id: WebhookDeliveryId::from_uuid(get(row, "id")?),
                endpoint_id: WebhookEndpointId::from_uuid(get(row, "endpoint_id")?),
                url: get(row, "url")?,
                secret_sealed: get(row, "secret_sealed")?,
                previous_secret_sealed: get(row, "previous_secret_sealed")?,
                event: event_from_columns(row, "event_id")?,
                attempt: attempts as u32 + 1,
            });
        }
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
        // The endpoint row first, then the delivery: the order a deletion of
        // the endpoint (cascading to its deliveries) takes them in.
        let endpoint: Option<Uuid> = sqlx::query_scalar(
            "SELECT w.id FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
             WHERE d.id = $1 FOR NO KEY UPDATE OF w",
        )
        .bind(result.delivery_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if endpoint.is_none() {
            return Ok(false);
        }
        let row = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, status = $1, next_attempt_at = $2, \
             lease_owner = NULL, lease_until = NULL, updated_at = $3 \
             WHERE id = $4 AND lease_owner = $5 AND status = 'pending' RETURNING endpoint_id, company_id, attempts",
        )
        .bind(status.as_str())
        .bind(next_at)
        .bind(a.attempted_at)
        .bind(result.delivery_id.as_uuid())
        .bind(&result.lease_owner)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(false) };
        let endpoint_id = WebhookEndpointId::from_uuid(get(&row, "endpoint_id")?);
        let company = CompanyId::from_uuid(get(&row, "company_id")?);
        let attempt_no: i32 = get(&row, "attempts")?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, latency_ms, error) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(result.delivery_id.as_uuid())
        .bind(attempt_no)
        .bind(a.attempted_at)
        .bind(a.status_code.map(i32::from))
        .bind(i64::from(a.latency_ms))
        .bind(&a.error)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let succeeded = result.next == NextStep::Succeeded;
        let failing_since: Option<OffsetDateTime> = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET failing_since = CASE WHEN $1 THEN NULL ELSE COALESCE(failing_since, $2) END \
             WHERE id = $3 RETURNING failing_since",
        )
        .bind(succeeded)
        .bind(a.attempted_at)
        .bind(endpoint_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?
        .flatten();
        let reason = result
            .disable
            .or_else(|| failing_since.filter(|since| *since <= result.disable_if_failing_since).map(|_| "failing"));
        let mut records = vec![audit.clone()];
        if let Some(reason) = reason {
            let changed = sqlx::query(
                "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $1, updated_at = $2 \
                 WHERE id = $3 AND enabled",
            )
            .bind(reason)
            .bind(a.attempted_at)
            .bind(endpoint_id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
            if changed > 0 {
                if let Some(endpoint) = endpoint_in(&mut tx, company, None, endpoint_id, Lock::None).await? {
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
             AND k.expires_at > $1 AND k.expires_at <= $2 ORDER BY k.expires_at LIMIT $3"
        ))
        .bind(now)
        .bind(until)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter().map(crate::key_from_row).collect()
    }

    pub(crate) async fn note_expiring(&self, id: ApiKeyId, audit: &AuditEntry) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        // The update locks the key row: another node noting it waits, then changes nothing.
        let changed =
            sqlx::query("UPDATE api_keys SET expiry_noticed_at = $1 WHERE id = $2 AND expiry_noticed_at IS NULL")
                .bind(paygate_domain::now())
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
