-- Key lifecycle: rotation links, client allow-lists, usage, company key policy.
ALTER TABLE api_keys ADD COLUMN allowed_cidrs text NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN replaces uuid REFERENCES api_keys (id);
ALTER TABLE api_keys ADD COLUMN replaced_by uuid REFERENCES api_keys (id);
ALTER TABLE api_keys ADD COLUMN last_used_ip text;

ALTER TABLE companies ADD COLUMN key_default_lifetime_secs bigint;
ALTER TABLE companies ADD COLUMN key_max_lifetime_secs bigint;
-- The sandbox company of `serve --demo`, marked so no real tenant is mistaken for it.
ALTER TABLE companies ADD COLUMN demo boolean NOT NULL DEFAULT false;
