-- Payments: four-eyes principals on keys, approval policy, payees, payments,
-- idempotency records.

-- The operator-issued key a key descends from (NULL: the key itself).
ALTER TABLE api_keys ADD COLUMN principal_id uuid REFERENCES api_keys (id);

-- One approval policy per company and mode (JSON); none means the default.
-- Per mode, so a test key can never loosen the rules for live payments.
CREATE TABLE approval_policies (
    company_id  uuid NOT NULL REFERENCES companies (id),
    mode        text NOT NULL CHECK (mode IN ('live', 'test')),
    policy      text NOT NULL,
    PRIMARY KEY (company_id, mode)
);

CREATE TABLE payees (
    id              uuid PRIMARY KEY,
    company_id      uuid NOT NULL REFERENCES companies (id),
    mode            text NOT NULL CHECK (mode IN ('live', 'test')),
    name            text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('business', 'individual')),
    email           text,
    -- What may be shown: scheme, country/routing number, last4, fingerprint (JSON).
    bank_account    text NOT NULL,
    fingerprint     text NOT NULL,
    -- The account number, ChaCha20-Poly1305 under the application data key.
    account_sealed  bytea NOT NULL,
    metadata        text NOT NULL,
    -- The key that created the payee (JSON actor): it may not approve payments to it.
    created_by      text,
    status          text NOT NULL CHECK (status IN ('active', 'disabled')),
    created_at      timestamptz NOT NULL,
    disabled_at     timestamptz
);

CREATE INDEX payees_by_company ON payees (company_id, mode, id DESC);
CREATE INDEX payees_by_fingerprint ON payees (company_id, fingerprint);

CREATE TABLE payments (
    id                        uuid PRIMARY KEY,
    company_id                uuid NOT NULL REFERENCES companies (id),
    mode                      text NOT NULL CHECK (mode IN ('live', 'test')),
    payee_id                  uuid NOT NULL REFERENCES payees (id),
    amount                    bigint NOT NULL CHECK (amount > 0 AND amount <= 9007199254740991),
    currency                  text NOT NULL,
    reference                 text NOT NULL,
    requested_execution_date  text,
    status                    text NOT NULL,
    version                   bigint NOT NULL,
    -- Optimistic lock: every write checks and bumps it.
    revision                  bigint NOT NULL,
    approval_expires_at       timestamptz NOT NULL,
    rail_next_at              timestamptz,
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL,
    -- Approvals, status history, initiators, metadata (JSON).
    doc                       text NOT NULL
);

CREATE INDEX payments_by_company ON payments (company_id, mode, id DESC);
CREATE INDEX payments_by_payee ON payments (company_id, payee_id, id DESC);
CREATE INDEX payments_pending_deadline ON payments (approval_expires_at) WHERE status = 'pending_approval';
CREATE INDEX payments_rail_due ON payments (rail_next_at) WHERE rail_next_at IS NOT NULL;

-- One row per (company, mode, Idempotency-Key), committed with the payment it created.
CREATE TABLE idempotency_keys (
    company_id       uuid NOT NULL REFERENCES companies (id),
    mode             text NOT NULL,
    key              text NOT NULL,
    fingerprint      text NOT NULL,
    response_status  integer NOT NULL,
    response_body    text NOT NULL,
    payment_id       uuid NOT NULL REFERENCES payments (id),
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (company_id, mode, key)
);

CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
