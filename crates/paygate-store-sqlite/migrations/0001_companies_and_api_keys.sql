-- Times are Unix microseconds (UTC); ids are UUIDv7 as 16-byte blobs, so byte
-- order is creation order.
CREATE TABLE companies (
    id          BLOB PRIMARY KEY CHECK (length(id) = 16),
    name        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id              BLOB PRIMARY KEY CHECK (length(id) = 16),
    company_id      BLOB NOT NULL REFERENCES companies (id),
    name            TEXT NOT NULL,
    owner           TEXT NOT NULL,
    scopes          TEXT NOT NULL,
    mode            TEXT NOT NULL CHECK (mode IN ('live', 'test')),
    -- HMAC-SHA256(pepper, secret); the secret itself is never stored.
    secret_hash     BLOB NOT NULL CHECK (length(secret_hash) = 32),
    pepper_version  INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    revoked_at      INTEGER,
    last_used_at    INTEGER
) STRICT;

CREATE INDEX api_keys_by_company ON api_keys (company_id, id DESC);

-- Bumped in the same transaction as every change that can make a verified key
-- unusable; every node polls it to drop its key cache.
CREATE TABLE auth_revision (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    revision  INTEGER NOT NULL
) STRICT;

INSERT INTO auth_revision (id, revision) VALUES (1, 0);
