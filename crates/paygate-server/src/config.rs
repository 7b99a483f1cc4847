//! Configuration: defaults, then an optional TOML file, then `PAYGATE_*`
//! environment variables. Every value is parsed here; an invalid one stops
//! start-up with one line naming the setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Each setting: its TOML key (the env var is `PAYGATE_` + upper case).
const SETTINGS: &[(&str, &str)] = &[
    ("database_url", "Database URL: sqlite://PATH (embedded) or postgres://… (scaled)."),
    ("listen", "API listener address."),
    ("ops_listen", "Operations listener (/metrics, /healthz, /readyz)."),
    ("redis_url", "Redis URL: rate limits shared by every node."),
    ("redis_prefix", "Prefix of every Redis key Paygate writes."),
    ("key_pepper", "Hex key pepper (≥ 32 bytes). Prefer key_pepper_file."),
    ("key_pepper_file", "File holding the hex key pepper."),
    ("key_pepper_version", "Version number of the current pepper."),
    ("audit_signing_key_file", "File with the hex Ed25519 seed that signs audit checkpoints."),
    ("audit_checkpoint_secs", "Seconds between signed audit checkpoints."),
    ("audit_aggregation_secs", "Interval over which failed-auth records of one address are aggregated."),
    ("log_format", "text or json."),
    ("log_level", "tracing filter, e.g. info or paygate=debug."),
    ("max_body_bytes", "Largest accepted request body."),
    ("request_timeout_secs", "Requests running longer get 503 timeout."),
    ("header_read_timeout_secs", "A client must send its request headers (and its body) within this time."),
    ("idle_timeout_secs", "A connection (HTTP/1 or HTTP/2) with no request in flight for this long is closed."),
    ("max_connections", "Open API connections per node; more are closed on accept."),
    ("migrate_on_start", "Apply migrations when serve starts."),
    ("key_cache_capacity", "Verified keys cached per node."),
    ("key_cache_ttl_secs", "Longest reuse of a cached verified key."),
    ("trusted_proxies", "Comma-separated CIDRs whose X-Forwarded-For is believed."),
    ("key_rate_limit", "Per key: requests per second and burst, RATE/BURST."),
    ("company_rate_limit", "Per company (all its keys): RATE/BURST."),
    ("client_rate_limit", "Per client address before authentication: RATE/BURST."),
    ("auth_failure_limit", "Failed authentications per client address: COUNT/WINDOW_SECONDS."),
    ("write_concurrency", "In-flight write requests per company."),
    ("max_in_flight", "In-flight requests per node before shedding with 503."),
    ("rate_limit_nodes", "Nodes sharing the limits; each enforces its share when Redis is down."),
    ("rate_limit_capacity", "Limits tracked in process (bounded memory)."),
    ("data_key_file", "File with the hex application data key (32 bytes) that encrypts bank account numbers."),
    ("payment_worker_interval_ms", "How often each node looks for due payment work (expiry, settlement)."),
    ("rail_submit_delay_ms", "Simulated rail (test mode): approved to processing after this delay."),
    ("rail_settle_delay_ms", "Simulated rail (test mode): processing to completed/failed, and completed to returned."),
    ("webhook_worker_interval_ms", "How often each node looks for due webhook deliveries."),
    ("webhook_retry_schedule", "Delay before each delivery attempt, e.g. 0s,5s,5m,30m,2h,5h,10h,10h."),
    ("webhook_connect_timeout_secs", "Webhook delivery: TCP/TLS connect timeout."),
    ("webhook_timeout_secs", "Webhook delivery: whole-attempt timeout."),
    ("webhook_disable_after_secs", "An endpoint whose deliveries all failed for this long is disabled."),
    ("webhook_concurrency", "Deliveries in flight per node."),
    ("webhook_allowed_networks", "Comma-separated CIDRs webhook endpoints may reach although private/loopback."),
];

#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite { url: String, path: PathBuf },
    Postgres { url: String },
}

/// Never prints a password, even through `{:?}`.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Database {
    /// The URL without credentials, for logs.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
            Self::Postgres { url } => {
                let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
                let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
                format!("postgres://{}", host.split('?').next().unwrap_or(host))
            }
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum PepperSource {
    Inline(String),
    File(PathBuf),
    /// Embedded default: a generated file beside the SQLite database.
    BesideDatabase(PathBuf),
}

/// Never prints an inline pepper, even through `{:?}`.
impl std::fmt::Debug for PepperSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::BesideDatabase(p) => f.debug_tuple("BesideDatabase").field(p).finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database: Database,
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub pepper: PepperSource,
    pub pepper_version: u16,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub migrate_on_start: bool,
    pub key_cache_capacity: usize,
    pub key_cache_ttl: Duration,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub limits: Limits,
    pub audit_signing_key_file: Option<PathBuf>,
    pub audit_checkpoint: Duration,
    pub audit_aggregation: Duration,
    pub data_key_file: Option<PathBuf>,
    pub payment_worker_interval: Duration,
    pub rail_submit_delay: Duration,
    pub rail_settle_delay: Duration,
    pub webhooks: Webhooks,
    /// Create a missing SQLite directory (set by `migrate` and `serve --create`,
    /// never by a setting: a typo in a path must not start an empty installation).
    pub create_database_dir: bool,
}

/// Webhook delivery settings.
#[derive(Debug, Clone)]
pub struct Webhooks {
    pub worker_interval: Duration,
    pub retry_schedule: paygate_domain::webhook::RetrySchedule,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub disable_after: Duration,
    pub concurrency: u32,
    pub allowed_networks: Vec<ipnet::IpNet>,
}

/// Rate limits as configured: `(rate or count, burst or window seconds)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub key: (u32, u32),
    pub company: (u32, u32),
    pub client: (u32, u32),
    pub auth_failures: (u32, u32),
    pub write_concurrency: u32,
    pub max_in_flight: u32,
    pub nodes: u32,
    pub capacity: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting} ({env}): {message}")]
pub struct ConfigError {
    pub setting: String,
    pub env: String,
    pub message: String,
}

fn env_name(setting: &str) -> String {
    format!("PAYGATE_{}", setting.to_ascii_uppercase())
}

fn error(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { setting: setting.to_owned(), env: env_name(setting), message: message.into() }
}

struct Sources {
    file: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
}

impl Sources {
    fn get(&self, setting: &str) -> Option<&str> {
        self.env.get(setting).or_else(|| self.file.get(setting)).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn parse<T>(&self, setting: &str, default: T, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        match self.get(setting) {
            None => Ok(default),
            Some(text) => parse(text).map_err(|m| error(setting, m)),
        }
    }
}

impl Config {
    /// Loads from an optional TOML file and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::vars().collect();
        Self::from_sources(file, env)
    }

    pub fn from_sources(file: Option<&Path>, env: BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let file = match file {
            None => BTreeMap::new(),
            Some(path) => read_file(path)?,
        };
        unknown_variables(&env)?;
        let env = SETTINGS
            .iter()
            .filter_map(|(name, _)| env.get(&env_name(name)).map(|v| (name.to_string(), v.clone())))
            .collect();
        Self::from(Sources { file, env })
    }

    fn from(s: Sources) -> Result<Self, ConfigError> {
        let database = parse_database(s.get("database_url").unwrap_or("sqlite://./paygate.db"))
            .map_err(|m| error("database_url", m))?;
        let addr =
            |t: &str| t.parse::<SocketAddr>().map_err(|_| format!("{t:?} is not an address like 127.0.0.1:8080"));
        let listen = s.parse("listen", SocketAddr::from(([127, 0, 0, 1], 8080)), addr)?;
        let ops_listen = s.parse("ops_listen", SocketAddr::from(([127, 0, 0, 1], 9090)), addr)?;
        let redis_url = s.parse("redis_url", None, |t| {
            if t.starts_with("redis://") || t.starts_with("rediss://") {
                Ok(Some(t.to_owned()))
            } else {
                Err("must start with redis:// or rediss://".into())
            }
        })?;
        let redis_prefix = s.parse("redis_prefix", "paygate:".to_owned(), |t| {
            if t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()) {
                Ok(t.to_owned())
            } else {
                Err("must be at most 64 printable characters without spaces".into())
            }
        })?;
        let pepper_version = s.parse("key_pepper_version", 1u16, |t| {
            t.parse::<u16>().ok().filter(|v| *v >= 1).ok_or_else(|| "must be an integer from 1 to 65535".into())
        })?;
        let pepper = match (s.get("key_pepper"), s.get("key_pepper_file"), &database) {
            (Some(_), Some(_), _) => {
                return Err(error("key_pepper", "set either key_pepper or key_pepper_file, not both"));
            }
            (Some(hex), None, _) => {
                paygate_domain::Pepper::from_hex(pepper_version, hex)
                    .map_err(|e| error("key_pepper", e.to_string()))?;
                PepperSource::Inline(hex.to_owned())
            }
            (None, Some(path), _) => PepperSource::File(PathBuf::from(path)),
            (None, None, Database::Sqlite { path, .. }) => PepperSource::BesideDatabase(beside(path, ".pepper")),
            (None, None, Database::Postgres { .. }) => {
                return Err(error(
                    "key_pepper_file",
                    "a key pepper is required with PostgreSQL (every node must share it): set key_pepper_file or key_pepper",
                ));
            }
        };
        let log_format = s.parse("log_format", LogFormat::Text, |t| match t {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("must be text or json".into()),
        })?;
        let log_level = s.parse("log_level", "info".to_owned(), parse_log_level)?;
        let positive = |max: u64| {
            move |t: &str| {
                t.parse::<u64>()
                    .ok()
                    .filter(|v| (1..=max).contains(v))
                    .ok_or_else(|| format!("must be an integer from 1 to {max}"))
            }
        };
        let max_body_bytes = s.parse("max_body_bytes", 65_536, positive(64 * 1024 * 1024))? as usize;
        let request_timeout = Duration::from_secs(s.parse("request_timeout_secs", 30, positive(3_600))?);
        let header_read_timeout = Duration::from_secs(s.parse("header_read_timeout_secs", 10, positive(600))?);
        let idle_timeout = Duration::from_secs(s.parse("idle_timeout_secs", 60, positive(3_600))?);
        let max_connections = s.parse("max_connections", 10_000, positive(1_000_000))? as usize;
        let migrate_on_start = s.parse("migrate_on_start", true, |t| match t {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err("must be true or false".into()),
        })?;
        let key_cache_capacity = s.parse("key_cache_capacity", 10_000, positive(10_000_000))? as usize;
        let key_cache_ttl = Duration::from_secs(s.parse("key_cache_ttl_secs", 30, positive(3_600))?);
        let trusted_proxies = s.parse("trusted_proxies", Vec::new(), parse_cidrs)?;
        let pair = |t: &str| {
            let (a, b) = t.split_once('/').ok_or_else(|| format!("{t:?} is not N/M, e.g. 100/200"))?;
            let n = |v: &str| v.trim().parse::<u32>().ok().filter(|v| (1..=1_000_000).contains(v));
            match (n(a), n(b)) {
                (Some(a), Some(b)) => Ok((a, b)),
                _ => Err(format!("{t:?}: both numbers must be from 1 to 1000000")),
            }
        };
        let limits = Limits {
            key: s.parse("key_rate_limit", (100, 200), pair)?,
            company: s.parse("company_rate_limit", (500, 1000), pair)?,
            client: s.parse("client_rate_limit", (1000, 2000), pair)?,
            auth_failures: s.parse("auth_failure_limit", (20, 300), pair)?,
            write_concurrency: s.parse("write_concurrency", 20, positive(100_000))? as u32,
            max_in_flight: s.parse("max_in_flight", 4096, positive(1_000_000))? as u32,
            nodes: s.parse("rate_limit_nodes", 1, positive(1_000))? as u32,
            capacity: s.parse("rate_limit_capacity", 100_000, positive(100_000_000))? as u32,
        };
        let audit_signing_key_file = s.get("audit_signing_key_file").map(PathBuf::from);
        let audit_checkpoint = Duration::from_secs(s.parse("audit_checkpoint_secs", 60, positive(86_400))?);
        let audit_aggregation = Duration::from_secs(s.parse("audit_aggregation_secs", 10, positive(3_600))?);
        let data_key_file = s.get("data_key_file").map(PathBuf::from);
        let payment_worker_interval =
            Duration::from_millis(s.parse("payment_worker_interval_ms", 500, positive(60_000))?);
        let rail_submit_delay = Duration::from_millis(s.parse("rail_submit_delay_ms", 1_000, |t| {
            t.parse::<u64>().ok().filter(|v| *v <= 3_600_000).ok_or_else(|| "must be 0 to 3600000".to_owned())
        })?);
        let rail_settle_delay = Duration::from_millis(s.parse("rail_settle_delay_ms", 2_000, |t| {
            t.parse::<u64>().ok().filter(|v| *v <= 3_600_000).ok_or_else(|| "must be 0 to 3600000".to_owned())
        })?);
        let webhooks = Webhooks {
            worker_interval: Duration::from_millis(s.parse("webhook_worker_interval_ms", 500, positive(60_000))?),
            retry_schedule: s.parse(
                "webhook_retry_schedule",
                paygate_domain::webhook::RetrySchedule::default(),
                |t| {
                    let schedule = paygate_domain::webhook::RetrySchedule::parse(t)?;
                    // Deliveries are due when their change commits.
                    if schedule.delay_before(1) != Some(Duration::ZERO) {
                        return Err("the first attempt is immediate: the schedule must start with 0s".into());
                    }
                    Ok(schedule)
                },
            )?,
            connect_timeout: Duration::from_secs(s.parse("webhook_connect_timeout_secs", 5, positive(60))?),
            timeout: Duration::from_secs(s.parse("webhook_timeout_secs", 15, positive(300))?),
            disable_after: Duration::from_secs(s.parse(
                "webhook_disable_after_secs",
                5 * 86_400,
                positive(90 * 86_400),
            )?),
            concurrency: s.parse("webhook_concurrency", 16, positive(1_000))? as u32,
            allowed_networks: s.parse("webhook_allowed_networks", Vec::new(), parse_cidrs)?,
        };
        Ok(Self {
            create_database_dir: false,
            webhooks,
            data_key_file,
            payment_worker_interval,
            rail_submit_delay,
            rail_settle_delay,
            audit_signing_key_file,
            audit_checkpoint,
            audit_aggregation,
            database,
            listen,
            ops_listen,
            redis_url,
            redis_prefix,
            pepper,
            pepper_version,
            log_format,
            log_level,
            max_body_bytes,
            request_timeout,
            header_read_timeout,
            idle_timeout,
            max_connections,
            migrate_on_start,
            key_cache_capacity,
            key_cache_ttl,
            trusted_proxies,
            limits,
        })
    }

    /// The settings table for `--help` and the README.
    pub fn settings() -> impl Iterator<Item = (String, &'static str, &'static str)> {
        SETTINGS.iter().map(|(name, doc)| (env_name(name), *name, *doc))
    }
}

/// `PAYGATE_*` variables that are not settings but are read elsewhere: the
/// CLI's own (`--config`, the webhook listener's secret, the operator name).
const OTHER_VARIABLES: &[&str] = &["PAYGATE_CONFIG", "PAYGATE_WEBHOOK_SECRET", "PAYGATE_OPERATOR"];
/// Prefixes of variables the test and benchmark tools read from the same environment.
const TOOL_PREFIXES: &[&str] = &["PAYGATE_TEST_", "PAYGATE_BENCH_", "PAYGATE_UPDATE_"];

/// A misspelled variable would silently fall back to a default (a typo in
/// `PAYGATE_LISTEN` binds the default address), so an unknown one is refused
/// with the nearest known name.
fn unknown_variables(env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let known: Vec<String> =
        SETTINGS.iter().map(|(name, _)| env_name(name)).chain(OTHER_VARIABLES.iter().map(|v| v.to_string())).collect();
    for name in env.keys().filter(|k| k.starts_with("PAYGATE_")) {
        if known.contains(name) || TOOL_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let nearest = known.iter().min_by_key(|k| edit_distance(k, name)).expect("settings exist");
        return Err(ConfigError {
            setting: name.trim_start_matches("PAYGATE_").to_ascii_lowercase(),
            env: name.clone(),
            message: format!("unknown setting; did you mean {nearest}?"),
        });
    }
    Ok(())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// A level (`info`) or comma-separated `target=level` directives. A bare word
/// is a valid target for tracing's filter, so `inof` would silently turn all
/// other logging off: only level names are accepted bare.
fn parse_log_level(text: &str) -> Result<String, String> {
    for directive in text.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            _ => directive,
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let nearest = LOG_LEVELS.iter().min_by_key(|l| edit_distance(l, level)).expect("levels exist");
            return Err(format!(
                "{level:?} is not a log level (one of {}, or target=level); did you mean {nearest}?",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// Comma- or space-separated networks.
fn parse_cidrs(text: &str) -> Result<Vec<ipnet::IpNet>, String> {
    text.split([',', ' '])
        .filter(|p| !p.trim().is_empty())
        .map(|p| paygate_domain::network::parse_cidr(p).map_err(|e| e.to_string()))
        .collect()
}

/// `paygate.db` → `paygate.db<suffix>`: secrets generated in the embedded default.
pub fn beside(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    database.with_file_name(name)
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let file_error =
        |m: String| ConfigError { setting: "config file".into(), env: "PAYGATE_CONFIG".into(), message: m };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| file_error(format!("{}: {}", path.display(), e.message())))?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        if !SETTINGS.iter().any(|(name, _)| *name == key) {
            return Err(error(&key, format!("unknown setting in {}", path.display())));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(error(&key, format!("expected a string, integer or boolean, found {}", other.type_str())));
            }
        };
        out.insert(key, text);
    }
    Ok(out)
}

fn parse_database(url: &str) -> Result<Database, String> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() || path.contains(":memory:") || path.starts_with("file::memory") {
            return Err("in-memory SQLite is not supported: use a file path, e.g. sqlite://./paygate.db".into());
        }
        return Ok(Database::Sqlite { url: url.to_owned(), path: PathBuf::from(path) });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Database::Postgres { url: url.to_owned() });
    }
    Err("must start with sqlite:// or postgres://".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], file: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paygate.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_sources(file.map(|_| path.as_path()), env)
    }

    #[test]
    fn defaults() {
        let c = load(&[], None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.ops_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.database, Database::Sqlite { url: "sqlite://./paygate.db".into(), path: "./paygate.db".into() });
        assert_eq!(c.pepper, PepperSource::BesideDatabase("./paygate.db.pepper".into()));
        assert_eq!(c.max_body_bytes, 65_536);
        assert!(c.trusted_proxies.is_empty());
        assert_eq!((c.limits.key, c.limits.company, c.limits.auth_failures), ((100, 200), (500, 1000), (20, 300)));
        let c = load(&[("PAYGATE_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")], None).unwrap();
        assert_eq!(c.trusted_proxies.len(), 2);
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let c = load(
            &[("PAYGATE_LISTEN", "127.0.0.1:7000")],
            Some("listen = \"127.0.0.1:6000\"\nops_listen = \"127.0.0.1:6001\"\nmax_body_bytes = 1024\n"),
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.ops_listen.to_string(), "127.0.0.1:6001");
        assert_eq!(c.max_body_bytes, 1024);
    }

    #[test]
    fn errors_name_the_setting() {
        let e = load(&[("PAYGATE_LISTEN", "nope")], None).unwrap_err().to_string();
        assert!(e.contains("listen (PAYGATE_LISTEN)"), "{e}");
        let e = load(&[("PAYGATE_DATABASE_URL", "mysql://x")], None).unwrap_err().to_string();
        assert!(e.contains("database_url"), "{e}");
        let e = load(&[("PAYGATE_DATABASE_URL", "postgres://h/db")], None).unwrap_err().to_string();
        assert!(e.contains("key_pepper_file"), "{e}");
        let e = load(&[("PAYGATE_KEY_PEPPER", "abcd")], None).unwrap_err().to_string();
        assert!(e.contains("key_pepper (PAYGATE_KEY_PEPPER)"), "{e}");
        let e = load(&[], Some("lisen = \"x\"")).unwrap_err().to_string();
        assert!(e.contains("lisen") && e.contains("unknown setting"), "{e}");
        let e = load(&[("PAYGATE_MAX_BODY_BYTES", "0")], None).unwrap_err().to_string();
        assert!(e.contains("max_body_bytes"), "{e}");
        let e = load(&[("PAYGATE_TRUSTED_PROXIES", "10.0.0.0/8, proxy.local")], None).unwrap_err().to_string();
        assert!(e.contains("trusted_proxies (PAYGATE_TRUSTED_PROXIES)"), "{e}");
        let e = load(&[("PAYGATE_KEY_RATE_LIMIT", "100")], None).unwrap_err().to_string();
        assert!(e.contains("key_rate_limit (PAYGATE_KEY_RATE_LIMIT)"), "{e}");
        let e = load(&[("PAYGATE_KEY_RATE_LIMIT", "0/5")], None).unwrap_err().to_string();
        assert!(e.contains("key_rate_limit"), "{e}");
        let e = load(&[("PAYGATE_DATABASE_URL", "sqlite::memory:")], None).unwrap_err().to_string();
        assert!(e.contains("in-memory"), "{e}");
    }

    #[test]
    fn secrets_are_redacted_even_in_debug_output() {
        let d = parse_database("postgres://user:secret@db.internal:5432/paygate?sslmode=require").unwrap();
        assert_eq!(d.redacted(), "postgres://db.internal:5432/paygate");
        let pepper = "ab".repeat(32);
        let c = load(&[("PAYGATE_DATABASE_URL", "postgres://user:secret@db/x"), ("PAYGATE_KEY_PEPPER", &pepper)], None)
            .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret") && !debug.contains(&pepper), "{debug}");
    }
}
