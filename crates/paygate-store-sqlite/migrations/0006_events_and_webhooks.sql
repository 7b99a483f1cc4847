-- Events (the transactional outbox) and webhook endpoints, deliveries and
-- attempts. Times are microseconds since the Unix epoch (UTC).

-- When the key's `api_key.expiring` event was written (once per key).
ALTER TABLE api_keys ADD COLUMN expiry_noticed_at INTEGER;

-- Written in the same transaction as the change they describe. Append-only:
-- an event, once written, never changes.
CREATE TABLE events (
    id               BLOB PRIMARY KEY,
    company_id       BLOB NOT NULL REFERENCES companies (id),
    mode             TEXT NOT NULL CHECK (mode IN ('live', 'test')),
    type             TEXT NOT NULL,
    object_id        TEXT NOT NULL,
    sequence         INTEGER NOT NULL CHECK (sequence > 0),
    previous_status  TEXT,
    -- The object's API view right after the change (JSON).
    object           TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    UNIQUE (company_id, mode, object_id, sequence)
) STRICT;

CREATE INDEX events_by_company ON events (company_id, mode, id DESC);
CREATE INDEX events_by_type ON events (company_id, mode, type, id DESC);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

CREATE TABLE webhook_endpoints (
    id                          BLOB PRIMARY KEY,
    company_id                  BLOB NOT NULL REFERENCES companies (id),
    mode                        TEXT NOT NULL CHECK (mode IN ('live', 'test')),
    url                         TEXT NOT NULL,
    description                 TEXT,
    -- `*` or event type names separated by spaces.
    event_types                 TEXT NOT NULL,
    enabled                     INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    disabled_reason             TEXT,
    failing_since               INTEGER,
    -- Signing secrets, ChaCha20-Poly1305 under the application data key.
    secret_sealed               BLOB NOT NULL,
    previous_secret_sealed      BLOB,
    previous_secret_expires_at  INTEGER,
    created_at                  INTEGER NOT NULL,
    updated_at                  INTEGER NOT NULL
) STRICT;

CREATE INDEX webhook_endpoints_by_company ON webhook_endpoints (company_id, mode, id DESC);

CREATE TABLE webhook_deliveries (
    id               BLOB PRIMARY KEY,
    company_id       BLOB NOT NULL REFERENCES companies (id),
    endpoint_id      BLOB NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         BLOB NOT NULL REFERENCES events (id),
    -- The event's object and sequence: deliveries of one object to one
    -- endpoint go out in sequence order.
    object_id        TEXT NOT NULL,
    sequence         INTEGER NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    lease_owner      TEXT,
    lease_until      INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
) STRICT;

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, object_id, sequence) WHERE status = 'pending';
-- The few deliveries leased right now (each endpoint's share of slots).
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (lease_until) WHERE status = 'pending' AND lease_until IS NOT NULL;
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id DESC);

CREATE TABLE webhook_attempts (
    delivery_id   BLOB NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL,
    attempted_at  INTEGER NOT NULL,
    status_code   INTEGER,
    latency_ms    INTEGER NOT NULL,
    error         TEXT,
    PRIMARY KEY (delivery_id, attempt)
) STRICT;
