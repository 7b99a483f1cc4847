-- The audit log: append-only, one hash chain per company (chain = company id)
-- plus the `platform` chain for unauthenticated traffic.
CREATE TABLE audit_events (
    chain          TEXT NOT NULL,
    seq            INTEGER NOT NULL CHECK (seq >= 1),
    id             BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
    occurred_at    INTEGER NOT NULL,
    actor_kind     TEXT NOT NULL,
    actor_id       TEXT,
    actor_name     TEXT,
    action         TEXT NOT NULL,
    resource_type  TEXT,
    resource_id    TEXT,
    outcome        TEXT NOT NULL,
    status         INTEGER NOT NULL,
    request_id     TEXT,
    client_ip      TEXT,
    user_agent     TEXT,
    details        TEXT NOT NULL,
    prev_hash      BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash           BLOB NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (chain, seq)
) STRICT;

CREATE INDEX audit_events_by_time ON audit_events (chain, occurred_at);

-- Where each chain ends; appends read and move it in their transaction.
CREATE TABLE audit_heads (
    chain  TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL,
    hash   BLOB NOT NULL
) STRICT;

-- Ed25519 signatures over (chain, seq, head hash), made with a key held outside the database.
CREATE TABLE audit_checkpoints (
    chain      TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    hash       BLOB NOT NULL,
    signed_at  INTEGER NOT NULL,
    key_id     TEXT NOT NULL,
    signature  BLOB NOT NULL
) STRICT;

CREATE INDEX audit_checkpoints_by_chain ON audit_checkpoints (chain, seq);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;

-- The head only moves forward: deleting it or moving it back would hide a
-- truncated chain from verification.
CREATE TRIGGER audit_heads_no_delete BEFORE DELETE ON audit_heads
BEGIN SELECT RAISE(ABORT, 'audit_heads only moves forward'); END;
CREATE TRIGGER audit_heads_forward_only BEFORE UPDATE ON audit_heads
WHEN NEW.seq < OLD.seq OR NEW.chain != OLD.chain
BEGIN SELECT RAISE(ABORT, 'audit_heads only moves forward'); END;
