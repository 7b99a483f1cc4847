-- Events (the transactional outbox) and webhook endpoints, deliveries and
-- attempts.

-- When the key's `api_key.expiring` event was written (once per key).
ALTER TABLE api_keys ADD COLUMN expiry_noticed_at timestamptz;

-- Written in the same transaction as the change they describe. Append-only:
-- an event, once written, never changes. Writers of one object hold its row
-- lock while they number its next event; the unique constraint backs that.
CREATE TABLE events (
    id               uuid PRIMARY KEY,
    company_id       uuid NOT NULL REFERENCES companies (id),
    mode             text NOT NULL CHECK (mode IN ('live', 'test')),
    type             text NOT NULL,
    object_id        text NOT NULL,
    sequence         bigint NOT NULL CHECK (sequence > 0),
    previous_status  text,
    -- The object's API view right after the change (JSON, kept byte for byte).
    object           text NOT NULL,
    created_at       timestamptz NOT NULL,
    UNIQUE (company_id, mode, object_id, sequence)
);

CREATE INDEX events_by_company ON events (company_id, mode, id DESC);
CREATE INDEX events_by_type ON events (company_id, mode, type, id DESC);

CREATE TRIGGER events_append_only BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION paygate_append_only();

CREATE TABLE webhook_endpoints (
    id                          uuid PRIMARY KEY,
    company_id                  uuid NOT NULL REFERENCES companies (id),
    mode                        text NOT NULL CHECK (mode IN ('live', 'test')),
    url                         text NOT NULL,
    description                 text,
    -- `*` or event type names separated by spaces.
    event_types                 text NOT NULL,
    enabled                     boolean NOT NULL,
    disabled_reason             text,
    failing_since               timestamptz,
    -- Signing secrets, ChaCha20-Poly1305 under the application data key.
    secret_sealed               bytea NOT NULL,
    previous_secret_sealed      bytea,
    previous_secret_expires_at  timestamptz,
    created_at                  timestamptz NOT NULL,
    updated_at                  timestamptz NOT NULL
);

CREATE INDEX webhook_endpoints_by_company ON webhook_endpoints (company_id, mode, id DESC);

CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    company_id       uuid NOT NULL REFERENCES companies (id),
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         uuid NOT NULL REFERENCES events (id),
    -- The event's object and sequence: deliveries of one object to one
    -- endpoint go out in sequence order.
    object_id        text NOT NULL,
    sequence         bigint NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    -- The node working on it, until when (claims lock rows FOR UPDATE SKIP LOCKED).
    lease_owner      text,
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, object_id, sequence) WHERE status = 'pending';
-- The few deliveries leased right now (each endpoint's share of slots).
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (lease_until) WHERE status = 'pending' AND lease_until IS NOT NULL;
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id DESC);
CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries (event_id);

CREATE TABLE webhook_attempts (
    delivery_id   uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt       integer NOT NULL,
    attempted_at  timestamptz NOT NULL,
    status_code   integer,
    latency_ms    bigint NOT NULL,
    error         text,
    PRIMARY KEY (delivery_id, attempt)
);
