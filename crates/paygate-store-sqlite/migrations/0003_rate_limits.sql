-- Per-key and per-company rate limit overrides (requests per second, burst).
ALTER TABLE api_keys ADD COLUMN rate_limit_rate INTEGER;
ALTER TABLE api_keys ADD COLUMN rate_limit_burst INTEGER;
ALTER TABLE companies ADD COLUMN rate_limit_rate INTEGER;
ALTER TABLE companies ADD COLUMN rate_limit_burst INTEGER;
