//! The servers under test: Paygate (built, seeded and started by the harness),
//! the bare hello server and nginx in front of it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use paygate_domain::Pepper;

use crate::process::{self, Owned};

/// Limits high enough never to decide anything (the maximum the config accepts).
const UNLIMITED: &str = "1000000/1000000";

/// `cargo build --release -p paygate-server`; returns the `paygate` executable.
pub fn build_paygate(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("building: cargo build --release -p paygate-server");
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "paygate-server",
            "--bin",
            "paygate",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo build")?;
    if !out.status.success() {
        bail!("cargo build --release -p paygate-server failed");
    }
    executable_from_messages(&String::from_utf8_lossy(&out.stdout), "paygate")
        .ok_or_else(|| anyhow!("cargo build reported no `paygate` executable"))
}

/// The `executable` of the compiler artifact named `name` in cargo's JSON messages.
pub fn executable_from_messages(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Paths the `paygate` binary knows about: whether its API has `path`.
pub fn api_has_path(paygate: &Path, path: &str) -> anyhow::Result<bool> {
    let text = process::output(
        {
            let mut c = Command::new(paygate);
            c.arg("openapi");
            c
        },
        "paygate openapi",
    )?;
    let doc: serde_json::Value = serde_json::from_str(&text).context("paygate openapi output")?;
    Ok(doc["paths"].get(path).is_some())
}

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres { admin_url: String, redis_url: String },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres { .. } => "postgres+redis",
        }
    }
}

/// `url` with its database name replaced by `database` (query kept).
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database URL without ://")? + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(base.len());
    Ok(format!("{}/{database}{query}", &base[..authority_end]))
}

/// A uniquely named PostgreSQL database, dropped with this guard.
pub struct TempDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TempDatabase {
    pub fn create(admin_url: &str, name: String) -> anyhow::Result<Self> {
        psql(admin_url, &format!("CREATE DATABASE \"{name}\""))?;
        Ok(Self { admin_url: admin_url.to_owned(), url: with_database(admin_url, &name)?, name })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        match psql(&self.admin_url, &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)) {
            Ok(_) => println!("dropped database {}", self.name),
            Err(e) => eprintln!("could not drop database {}: {e:#}", self.name),
        }
    }
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let mut c = Command::new("psql");
    c.args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql]);
    process::output(c, "psql (install postgresql-client)")
}

/// What the seeding left for the scenarios.
#[derive(Debug, Clone)]
pub struct Seed {
    /// Valid, with every limit out of the way.
    pub key: String,
    /// Valid, limited to 1 request/s with a burst of 1.
    pub limited_key: String,
    pub limited_rate: u32,
}

/// A running `paygate serve` with its own database, pepper and signing key.
pub struct Paygate {
    pub backend: Backend,
    pub addr: SocketAddr,
    pub seed: Seed,
    server: Owned,
    // Dropped after the server (field order): the database outlives the process.
    _database: Option<TempDatabase>,
    _dir: tempfile::TempDir,
}

impl Paygate {
    pub fn pids(&self) -> Vec<u32> {
        vec![self.server.pid()]
    }

    /// `wrapper`: a command the server runs under (valgrind for instruction counts).
    pub fn start(
        paygate: &Path,
        backend: Backend,
        cpu: Option<u32>,
        log_level: &str,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("paygate-bench-").tempdir()?;
        let run_id = format!("{}_{}", std::process::id(), unix_millis());
        let pepper = dir.path().join("pepper");
        let signing = dir.path().join("audit-key");
        let data_key = dir.path().join("data-key");
        for file in [&pepper, &signing, &data_key] {
            write_secret(file, &Pepper::generate_hex())?;
        }
        let (database, database_url, redis) = match &backend {
            Backend::Sqlite => (None, format!("sqlite://{}", dir.path().join("paygate.db").display()), None),
            Backend::Postgres { admin_url, redis_url } => {
                let db = TempDatabase::create(admin_url, format!("paygate_bench_{run_id}"))?;
                println!("created database {}", db.name);
                let url = db.url.clone();
                (Some(db), url, Some(redis_url.clone()))
            }
        };
        let mut env: Vec<(&str, String)> = vec![
            ("PAYGATE_DATABASE_URL", database_url),
            ("PAYGATE_KEY_PEPPER_FILE", pepper.display().to_string()),
            ("PAYGATE_AUDIT_SIGNING_KEY_FILE", signing.display().to_string()),
            // Seals payees' bank account numbers; required with PostgreSQL.
            ("PAYGATE_DATA_KEY_FILE", data_key.display().to_string()),
            ("PAYGATE_LISTEN", "127.0.0.1:0".into()),
            ("PAYGATE_OPS_LISTEN", "127.0.0.1:0".into()),
            ("PAYGATE_LOG_LEVEL", log_level.into()),
            ("PAYGATE_KEY_RATE_LIMIT", UNLIMITED.into()),
            ("PAYGATE_COMPANY_RATE_LIMIT", UNLIMITED.into()),
            ("PAYGATE_CLIENT_RATE_LIMIT", UNLIMITED.into()),
            ("PAYGATE_AUTH_FAILURE_LIMIT", "1000000/1".into()),
            ("PAYGATE_WRITE_CONCURRENCY", "100000".into()),
            ("PAYGATE_MAX_IN_FLIGHT", "1000000".into()),
        ];
        if let Some(redis) = redis {
            env.push(("PAYGATE_REDIS_URL", redis));
            env.push(("PAYGATE_REDIS_PREFIX", format!("paygate-bench-{run_id}:")));
        }
        let cli = |args: &[&str]| -> anyhow::Result<String> {
            let mut c = paygate_command(paygate, None, &[], &env);
            c.args(args).env("PAYGATE_LOG_LEVEL", "warn");
            process::output(c, &format!("paygate {}", args.join(" ")))
        };
        let company: serde_json::Value =
            serde_json::from_str(&cli(&["admin", "company", "create", "--name", "Bench Co", "--json"])?)?;
        let company = company["id"].as_str().context("company id")?.to_owned();
        let create_key = |name: &str| -> anyhow::Result<(String, String)> {
            // Never payments:approve: a key may not both create and approve payments.
            let scopes = "payments:read,payments:write,payees:read,payees:write,keys:read";
            let out = cli(&[
                "admin",
                "key",
                "create",
                "--company",
                &company,
                "--name",
                name,
                "--owner",
                "bench",
                "--scopes",
                scopes,
                "--mode",
                "test",
                "--json",
            ])?;
            let key: serde_json::Value = serde_json::from_str(&out)?;
            Ok((key["id"].as_str().context("key id")?.into(), key["secret"].as_str().context("key secret")?.into()))
        };
        let (_, key) = create_key("bench")?;
        let (limited_id, limited_key) = create_key("bench limited")?;
        let limited_rate = 1;
        cli(&["admin", "key", "set-limits", &limited_id, "--rate", &limited_rate.to_string(), "--burst", "1"])?;

        let log = dir.path().join("server.log");
        let mut command = paygate_command(paygate, cpu, wrapper, &env);
        command.arg("serve").stderr(std::fs::File::create(&log)?);
        let (server, line) =
            process::spawn_watching_log("paygate", command, &log, "paygate listening", Duration::from_secs(300))?;
        let addr = listen_address(&line).with_context(|| format!("no api= address in {line:?}"))?;
        println!("paygate ({}) on {addr}, pid {}, log {}", backend.name(), server.pid(), log.display());
        Ok(Self {
            backend,
            addr,
            seed: Seed { key, limited_key, limited_rate },
            server,
            _database: database,
            _dir: dir,
        })
    }
}

fn paygate_command(paygate: &Path, cpu: Option<u32>, wrapper: &[String], env: &[(&str, String)]) -> Command {
    let mut c = process::launch(cpu, wrapper, paygate);
    // Only the settings chosen here: nothing from the caller's PAYGATE_* environment.
    for (name, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if name.starts_with("PAYGATE_") {
            c.env_remove(name);
        }
    }
    c.envs(env.iter().map(|(k, v)| (*k, v)));
    c
}

/// The `api=ADDR` of the server's "paygate listening" log line.
pub fn listen_address(line: &str) -> Option<SocketAddr> {
    line.split_whitespace().find_map(|w| w.strip_prefix("api="))?.trim_matches('"').parse().ok()
}

fn write_secret(path: &Path, hex: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    writeln!(f, "{hex}")?;
    Ok(())
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// The bare hello server: this binary's hidden `hello-server` subcommand.
pub struct Hello {
    pub addr: SocketAddr,
    server: Owned,
}

impl Hello {
    pub fn start(cpu: Option<u32>, wrapper: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut command = process::launch(cpu, wrapper, &exe);
        command.args(["hello-server", "--listen", "127.0.0.1:0"]);
        let (server, line) = process::spawn_reading_stdout("hello server", command, "listening on")?;
        let addr = line.rsplit(' ').next().unwrap_or_default().parse().context("hello server address")?;
        println!("hello server on {addr}, pid {}", server.pid());
        Ok(Self { addr, server })
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }
}

/// nginx in front of the hello server: key `map`, `limit_req`, keep-alive upstream.
pub struct Nginx {
    pub addr: SocketAddr,
    server: Owned,
    _dir: tempfile::TempDir,
}

/// nginx's configuration for the peer scenario (one worker; access log on, as
/// a gateway that must keep a record of requests would run).
pub fn nginx_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, key: &str) -> String {
    let d = dir.display();
    format!(
        r#"worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map_hash_bucket_size 256;
    map $http_authorization $api_key_allowed {{
        default 0;
        "Bearer {key}" 1;
    }}
    limit_req_zone $http_authorization zone=per_key:10m rate=1000000r/s;
    limit_req_status 429;
    upstream app {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            if ($api_key_allowed = 0) {{ return 401; }}
            limit_req zone=per_key burst=1000000 nodelay;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://app;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// None (with what to install) when nginx is not on this machine.
    pub fn start(cpu: Option<u32>, upstream: SocketAddr, key: &str) -> anyhow::Result<Option<Self>> {
        let Some(nginx) = crate::oha::on_path("nginx").or_else(|| {
            let sbin = PathBuf::from("/usr/sbin/nginx");
            sbin.is_file().then_some(sbin)
        }) else {
            println!("skipped: peer (nginx not installed; run `apt-get install -y nginx`)");
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("paygate-bench-nginx-").tempdir()?;
        let listen = free_port()?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_config(dir.path(), listen, upstream, key))?;
        let mut command = process::launch(cpu, &[], &nginx);
        command.arg("-p").arg(dir.path()).arg("-c").arg(&conf).args(["-g", "daemon off;"]);
        command.stderr(Stdio::inherit());
        let server = Owned::spawn("nginx", command)?;
        // Ready when it accepts connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("nginx did not listen on {listen}; see {}", dir.path().join("error.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("nginx on {listen}, pids {:?}", server.pids());
        Ok(Some(Self { addr: listen, server, _dir: dir }))
    }

    /// Master and worker.
    pub fn pids(&self) -> Vec<u32> {
        self.server.pids()
    }
}

/// A port free right now (nginx needs a number up front).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_rewriting() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "b1").unwrap(),
            "postgres://postgres@127.0.0.1:5432/b1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/test?sslmode=disable", "b2").unwrap(),
            "postgres://u:p@h/b2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:5432", "b3").unwrap(), "postgres://h:5432/b3");
        assert!(with_database("nonsense", "x").is_err());
    }

    #[test]
    fn listening_line() {
        let line = "2026-12-01T10:00:00Z  INFO paygate_server::app: paygate listening api=127.0.0.1:41234 ops=127.0.0.1:41235 database=sqlite:///tmp/x backend=\"sqlite\"";
        assert_eq!(listen_address(line), Some("127.0.0.1:41234".parse().unwrap()));
        assert_eq!(listen_address("nothing here"), None);
    }

    #[test]
    fn cargo_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"paygate_api"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"paygate"},"executable":"/t/release/paygate"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#
        );
        assert_eq!(executable_from_messages(messages, "paygate"), Some(PathBuf::from("/t/release/paygate")));
        assert_eq!(executable_from_messages(messages, "oha"), None);
    }

    #[test]
    fn nginx_config_names_the_key_and_upstream() {
        let conf = nginx_config(
            Path::new("/tmp/n"),
            "127.0.0.1:8000".parse().unwrap(),
            "127.0.0.1:9000".parse().unwrap(),
            "pgk_x",
        );
        assert!(conf.contains("\"Bearer pgk_x\" 1;"));
        assert!(conf.contains("server 127.0.0.1:9000;"));
        assert!(conf.contains("listen 127.0.0.1:8000;"));
        assert!(conf.contains("worker_processes 1;"));
    }
}
