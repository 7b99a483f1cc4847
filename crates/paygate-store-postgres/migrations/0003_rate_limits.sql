-- Per-key and per-company rate limit overrides (requests per second, burst).
ALTER TABLE api_keys ADD COLUMN rate_limit_rate integer CHECK (rate_limit_rate > 0);
ALTER TABLE api_keys ADD COLUMN rate_limit_burst integer CHECK (rate_limit_burst > 0);
ALTER TABLE companies ADD COLUMN rate_limit_rate integer CHECK (rate_limit_rate > 0);
ALTER TABLE companies ADD COLUMN rate_limit_burst integer CHECK (rate_limit_burst > 0);
