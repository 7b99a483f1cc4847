-- Ids are UUIDv7, so their order is creation order.
CREATE TABLE companies (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('active', 'suspended')),
    created_at  timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id              uuid PRIMARY KEY,
    company_id      uuid NOT NULL REFERENCES companies (id),
    name            text NOT NULL,
    owner           text NOT NULL,
    scopes          text NOT NULL,
    mode            text NOT NULL CHECK (mode IN ('live', 'test')),
    -- HMAC-SHA256(pepper, secret); the secret itself is never stored.
    secret_hash     bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    pepper_version  integer NOT NULL,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz
);

CREATE INDEX api_keys_by_company ON api_keys (company_id, id DESC);

-- Bumped in the same transaction as every change that can make a verified key
-- unusable; every node polls it to drop its key cache.
CREATE TABLE auth_revision (
    id        integer PRIMARY KEY CHECK (id = 1),
    revision  bigint NOT NULL
);

INSERT INTO auth_revision (id, revision) VALUES (1, 0);
