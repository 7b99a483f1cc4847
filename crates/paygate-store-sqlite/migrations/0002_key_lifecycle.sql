-- Key lifecycle: rotation links, client allow-lists, usage, company key policy.
ALTER TABLE api_keys ADD COLUMN allowed_cidrs TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN replaces BLOB REFERENCES api_keys (id);
ALTER TABLE api_keys ADD COLUMN replaced_by BLOB REFERENCES api_keys (id);
ALTER TABLE api_keys ADD COLUMN last_used_ip TEXT;

ALTER TABLE companies ADD COLUMN key_default_lifetime_secs INTEGER;
ALTER TABLE companies ADD COLUMN key_max_lifetime_secs INTEGER;
-- The sandbox company of `serve --demo`, marked so no real tenant is mistaken for it.
ALTER TABLE companies ADD COLUMN demo INTEGER NOT NULL DEFAULT 0 CHECK (demo IN (0, 1));
