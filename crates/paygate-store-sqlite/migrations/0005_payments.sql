-- Payments: four-eyes principals on keys, approval policy, payees, payments,
-- idempotency records. Times are microseconds since the Unix epoch (UTC).

-- The operator-issued key a key descends from (NULL: the key itself).
ALTER TABLE api_keys ADD COLUMN principal_id BLOB REFERENCES api_keys (id);

-- One approval policy per company and mode (JSON); none means the default.
-- Per mode, so a test key can never loosen the rules for live payments.
CREATE TABLE approval_policies (
    company_id  BLOB NOT NULL REFERENCES companies (id),
    mode        TEXT NOT NULL CHECK (mode IN ('live', 'test')),
    policy      TEXT NOT NULL,
    PRIMARY KEY (company_id, mode)
) STRICT;

CREATE TABLE payees (
    id              BLOB PRIMARY KEY,
    company_id      BLOB NOT NULL REFERENCES companies (id),
    mode            TEXT NOT NULL CHECK (mode IN ('live', 'test')),
    name            TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('business', 'individual')),
    email           TEXT,
    -- What may be shown: scheme, country/routing number, last4, fingerprint (JSON).
    bank_account    TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    -- The account number, ChaCha20-Poly1305 under the application data key.
    account_sealed  BLOB NOT NULL,
    metadata        TEXT NOT NULL,
    -- The key that created the payee (JSON actor): it may not approve payments to it.
    created_by      TEXT,
    status          TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    created_at      INTEGER NOT NULL,
    disabled_at     INTEGER
) STRICT;

CREATE INDEX payees_by_company ON payees (company_id, mode, id DESC);
CREATE INDEX payees_by_fingerprint ON payees (company_id, fingerprint);

CREATE TABLE payments (
    id                        BLOB PRIMARY KEY,
    company_id                BLOB NOT NULL REFERENCES companies (id),
    mode                      TEXT NOT NULL CHECK (mode IN ('live', 'test')),
    payee_id                  BLOB NOT NULL REFERENCES payees (id),
    amount                    INTEGER NOT NULL CHECK (amount > 0 AND amount <= 9007199254740991),
    currency                  TEXT NOT NULL,
    reference                 TEXT NOT NULL,
    requested_execution_date  TEXT,
    status                    TEXT NOT NULL,
    version                   INTEGER NOT NULL,
    -- Optimistic lock: every write checks and bumps it.
    revision                  INTEGER NOT NULL,
    approval_expires_at       INTEGER NOT NULL,
    rail_next_at              INTEGER,
    created_at                INTEGER NOT NULL,
    updated_at                INTEGER NOT NULL,
    -- Approvals, status history, initiators, metadata (JSON).
    doc                       TEXT NOT NULL
) STRICT;

CREATE INDEX payments_by_company ON payments (company_id, mode, id DESC);
CREATE INDEX payments_by_payee ON payments (company_id, payee_id, id DESC);
CREATE INDEX payments_pending_deadline ON payments (approval_expires_at) WHERE status = 'pending_approval';
CREATE INDEX payments_rail_due ON payments (rail_next_at) WHERE rail_next_at IS NOT NULL;

-- One row per (company, mode, Idempotency-Key), committed with the payment it created.
CREATE TABLE idempotency_keys (
    company_id       BLOB NOT NULL REFERENCES companies (id),
    mode             TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    response_status  INTEGER NOT NULL,
    response_body    TEXT NOT NULL,
    payment_id       BLOB NOT NULL REFERENCES payments (id),
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    PRIMARY KEY (company_id, mode, key)
) STRICT;

CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
