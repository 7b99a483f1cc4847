-- The audit log: append-only, one hash chain per company (chain = company id)
-- plus the `platform` chain for unauthenticated traffic.
CREATE TABLE audit_events (
    chain          text NOT NULL,
    seq            bigint NOT NULL CHECK (seq >= 1),
    id             uuid NOT NULL UNIQUE,
    occurred_at    timestamptz NOT NULL,
    actor_kind     text NOT NULL,
    actor_id       text,
    actor_name     text,
    action         text NOT NULL,
    resource_type  text,
    resource_id    text,
    outcome        text NOT NULL,
    status         integer NOT NULL,
    request_id     text,
    client_ip      text,
    user_agent     text,
    details        text NOT NULL,
    prev_hash      bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash           bytea NOT NULL CHECK (octet_length(hash) = 32),
    PRIMARY KEY (chain, seq)
);

CREATE INDEX audit_events_by_time ON audit_events (chain, occurred_at);

-- Where each chain ends; appends lock the row (FOR UPDATE), so nodes never fork a chain.
CREATE TABLE audit_heads (
    chain  text PRIMARY KEY,
    seq    bigint NOT NULL,
    hash   bytea NOT NULL
);

-- Ed25519 signatures over (chain, seq, head hash), made with a key held outside the database.
CREATE TABLE audit_checkpoints (
    chain      text NOT NULL,
    seq        bigint NOT NULL,
    hash       bytea NOT NULL,
    signed_at  timestamptz NOT NULL,
    key_id     text NOT NULL,
    signature  bytea NOT NULL
);

CREATE INDEX audit_checkpoints_by_chain ON audit_checkpoints (chain, seq);

CREATE FUNCTION paygate_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION paygate_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION paygate_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION paygate_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION paygate_append_only();

-- The head only moves forward: deleting it or moving it back would hide a
-- truncated chain from verification.
CREATE FUNCTION paygate_head_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.seq < OLD.seq OR NEW.chain <> OLD.chain THEN
        RAISE EXCEPTION 'audit_heads only moves forward';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_heads_forward_only BEFORE UPDATE OR DELETE ON audit_heads
    FOR EACH ROW EXECUTE FUNCTION paygate_head_forward_only();
CREATE TRIGGER audit_heads_no_truncate BEFORE TRUNCATE ON audit_heads
    FOR EACH STATEMENT EXECUTE FUNCTION paygate_append_only();
