//! `paygate-bench`: the performance harness of issue 7. Builds `paygate` in
//! release mode, starts every server itself on loopback (pinned to CPU 0),
//! drives each scenario with oha (pinned to CPU 1) in interleaved rounds, and
//! prints one table of medians plus a JSON file. See docs/benchmarks.md.

mod callgrind;
mod hello;
mod http1;
mod keys;
mod oha;
mod process;
mod procstat;
mod report;
mod scenarios;
mod sender;
mod servers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::oha::{Load, Request};
use crate::report::{Case, Sample};
use crate::scenarios::{Keys, PaymentSeed, Scenario, Server};
use crate::servers::{Backend, Hello, Nginx, Paygate};

#[derive(Debug, Parser)]
#[command(name = "paygate-bench", about = "Paygate's HTTP pipeline against a bare server and an nginx-in-front peer")]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every scenario that applies to this build and machine.
    All,
    /// Only the named scenarios (the baseline always runs too: ratios need it).
    Run {
        #[arg(value_enum, required = true)]
        scenarios: Vec<Scenario>,
    },
    /// Scenario 1 alone.
    Baseline,
    /// Scenario 2: GET /v1/me.
    Me,
    /// Scenario 3: GET /v1/payments/{id} (skipped until payments exist).
    PaymentGet,
    /// Scenario 4: POST /v1/payments (skipped until payments exist).
    PaymentCreate,
    /// Scenario 5: the three floods of rejected requests.
    Floods,
    /// Scenario 6: nginx in front of the hello server.
    Peer,
    /// Scenario 2 at a fixed offered rate (--open-loop-rate).
    OpenLoop,
    /// Instructions per request of the baseline and of scenario 2 (SQLite), under
    /// valgrind's callgrind, with the functions of highest inclusive cost.
    Callgrind {
        /// Requests measured per server (after a warm-up of a fifth as many).
        #[arg(long, default_value_t = 5000)]
        requests: u64,
        /// Function lines of callgrind_annotate to print per server.
        #[arg(long, default_value_t = 40)]
        top: usize,
    },
    /// The bare axum server of scenario 1 (started by the harness itself).
    #[command(hide = true)]
    HelloServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Scenario 4's closed-loop sender, a fresh Idempotency-Key per request
    /// (started by the harness itself under taskset); prints its outcome as JSON.
    #[command(hide = true)]
    FreshKeyLoad {
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "POST")]
        method: String,
        #[arg(long = "header", value_parser = sender::parse_header)]
        headers: Vec<(String, String)>,
        #[arg(long, allow_hyphen_values = true)]
        body: Option<String>,
        #[arg(long)]
        load_connections: u32,
        #[arg(long)]
        load_duration_ms: u64,
    },
}

#[derive(Debug, Args)]
struct Options {
    /// Measured time per scenario and round (e.g. 10s, 500ms, 1m).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before each measurement.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Interleaved rounds; the table shows medians.
    #[arg(long, global = true, default_value_t = 3)]
    rounds: u32,
    /// Concurrent connections of the closed-loop scenarios.
    #[arg(long, global = true, default_value_t = 50)]
    connections: u32,
    /// Requests per second offered in the open-loop scenario.
    #[arg(long, global = true, default_value_t = 10_000)]
    open_loop_rate: u32,
    /// Where the JSON results go [default: <target dir>/bench-results.json].
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// PostgreSQL server (a database is created and dropped per run); with --redis-url
    /// adds scenarios 2–4 on PostgreSQL + Redis.
    #[arg(long, global = true, env = "PAYGATE_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
    #[arg(long, global = true, env = "PAYGATE_BENCH_REDIS_URL")]
    redis_url: Option<String>,
    /// The server's log filter (its default in production is info).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len()));
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 10s or 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    if seconds <= 0.0 {
        return Err("must be positive".into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let scenarios: Vec<Scenario> = match cli.command {
        Command::HelloServer { listen } => {
            return match hello::serve(listen) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hello server: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::FreshKeyLoad { url, method, headers, body, load_connections, load_duration_ms } => {
            let plan = sender::split_url(&url).map(|(addr, path)| sender::Plan {
                addr,
                method,
                path,
                headers,
                body,
                connections: load_connections,
                duration: Duration::from_millis(load_duration_ms),
            });
            return match plan.and_then(sender::run_here) {
                Ok(outcome) => {
                    println!("{}", sender::to_json(&outcome));
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fresh-key-load: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Callgrind { requests, top } => {
            return match run_callgrind(&cli.options, requests, top) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("paygate-bench: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::All => Scenario::ALL.to_vec(),
        Command::Run { scenarios } => scenarios,
        Command::Baseline => vec![Scenario::Baseline],
        Command::Me => vec![Scenario::Me],
        Command::PaymentGet => vec![Scenario::PaymentGet],
        Command::PaymentCreate => vec![Scenario::PaymentCreate],
        Command::Floods => vec![Scenario::FloodBadChecksum, Scenario::FloodUnknownKey, Scenario::FloodOverLimit],
        Command::Peer => vec![Scenario::Peer],
        Command::OpenLoop => vec![Scenario::OpenLoop],
    };
    match run(&cli.options, scenarios) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paygate-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A scenario on one server, ready to measure.
struct Target {
    scenario: Scenario,
    backend: String,
    request: Request,
    load: Load,
    pids: Vec<u32>,
    /// Answers of this status not counted as unexpected, up to this many per round
    /// (the over-limit key's own allowance of 1 request/s).
    allowance: Option<(u16, u64)>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

fn run(options: &Options, mut wanted: Vec<Scenario>) -> anyhow::Result<()> {
    if options.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let postgres = match (&options.postgres_url, &options.redis_url) {
        (Some(pg), Some(redis)) => Some(Backend::Postgres { admin_url: pg.clone(), redis_url: redis.clone() }),
        (None, None) => None,
        _ => bail!("PostgreSQL and Redis go together: give both --postgres-url and --redis-url (or neither)"),
    };
    let paygate = servers::build_paygate(&workspace_root())?;
    let target_dir = paygate.parent().and_then(Path::parent).context("paygate executable path")?.to_path_buf();
    let oha = oha::locate_or_install(&target_dir.join("bench-tools"))?;
    println!("load generator: {}", oha.display());

    let (server_cpu, load_cpu) = cpu_split();
    wanted.sort();
    wanted.dedup();
    if !wanted.contains(&Scenario::Baseline) {
        wanted.insert(0, Scenario::Baseline);
    }
    let mut scenarios = Vec::new();
    for s in wanted {
        let missing: Vec<&str> =
            s.needs_paths().iter().copied().filter(|p| !servers::api_has_path(&paygate, p).unwrap_or(false)).collect();
        if missing.is_empty() {
            scenarios.push(s);
        } else {
            println!(
                "skipped: {} (payments API not present: no {} in `paygate openapi`)",
                s.name(),
                missing.join(", ")
            );
        }
    }

    // Servers, all on the server CPU.
    let hello = Hello::start(server_cpu, &[])?;
    let peer_key = keys::unknown_key();
    let nginx =
        if scenarios.contains(&Scenario::Peer) { Nginx::start(server_cpu, hello.addr, &peer_key)? } else { None };
    if nginx.is_none() {
        scenarios.retain(|s| *s != Scenario::Peer);
    }
    let needs_paygate = scenarios.iter().any(|s| matches!(s.server(), Server::Paygate { .. }));
    let needs_postgres = scenarios.iter().any(|s| s.server() == Server::Paygate { also_postgres: true });
    let mut paygates = Vec::new();
    if needs_paygate {
        paygates.push(Paygate::start(&paygate, Backend::Sqlite, server_cpu, &options.log_level, &[])?);
        if let (Some(pg), true) = (&postgres, needs_postgres) {
            paygates.push(Paygate::start(&paygate, pg.clone(), server_cpu, &options.log_level, &[])?);
        }
    }

    // One payee and one payment per Paygate, for scenarios 3 and 4.
    let wants_payments = scenarios.iter().any(|s| matches!(s, Scenario::PaymentGet | Scenario::PaymentCreate));
    let mut seeds = Vec::new();
    for p in &paygates {
        seeds.push(if wants_payments { Some(seed_payment(p.addr, &p.seed.key)?) } else { None });
    }

    let unknown = keys::unknown_key();
    let mut targets = Vec::new();
    for &scenario in &scenarios {
        let load = scenarios::load(scenario, options.connections, options.open_loop_rate);
        match scenario.server() {
            Server::Hello | Server::Nginx => {
                let (addr, pids) = match (scenario.server(), &nginx) {
                    (Server::Nginx, Some(n)) => {
                        let mut pids = n.pids();
                        pids.push(hello.pid());
                        (n.addr, pids)
                    }
                    _ => (hello.addr, vec![hello.pid()]),
                };
                let keys = Keys { valid: &peer_key, bad_checksum: "", unknown: "", over_limit: "" };
                let request = scenarios::request(scenario, &format!("http://{addr}"), &keys, None)?;
                targets.push(Target { scenario, backend: "-".into(), request, load, pids, allowance: None });
            }
            Server::Paygate { also_postgres } => {
                for (p, seed) in paygates.iter().zip(&seeds) {
                    if matches!(p.backend, Backend::Postgres { .. }) && !also_postgres {
                        continue;
                    }
                    let bad = keys::with_bad_checksum(&p.seed.key);
                    let keys = Keys {
                        valid: &p.seed.key,
                        bad_checksum: &bad,
                        unknown: &unknown,
                        over_limit: &p.seed.limited_key,
                    };
                    let base = format!("http://{}", p.addr);
                    let request = scenarios::request(scenario, &base, &keys, seed.as_ref())?;
                    let allowance = (scenario == Scenario::FloodOverLimit).then(|| {
                        let seconds = (options.duration + options.warmup).as_secs() + 1;
                        (200, p.seed.limited_rate as u64 * seconds + 1)
                    });
                    targets.push(Target {
                        scenario,
                        backend: p.backend.name().into(),
                        request,
                        load,
                        pids: p.pids(),
                        allowance,
                    });
                }
            }
        }
    }

    let mut cases: Vec<Case> = targets
        .iter()
        .map(|t| Case {
            scenario: t.scenario.name().into(),
            backend: t.backend.clone(),
            expected_status: t.scenario.expected_status(),
            throughput_comparable: !matches!(t.load, Load::Open { .. }),
            samples: Vec::new(),
        })
        .collect();
    let total = targets.len() as u32 * options.rounds;
    let per = options.duration + options.warmup;
    println!(
        "{} cases × {} rounds, {:?} each (+ warm-up): about {} s",
        targets.len(),
        options.rounds,
        options.duration,
        (per * total).as_secs()
    );
    for round in 0..options.rounds {
        for (target, case) in targets.iter().zip(cases.iter_mut()) {
            let sample = measure(&oha, load_cpu, target, round, options)?;
            println!(
                "round {} {:<28} {:<15} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {:>6.1} µs CPU/req  unexpected {}",
                round + 1,
                case.scenario,
                case.backend,
                sample.requests_per_sec,
                sample.p50_ms,
                sample.p99_ms,
                sample.cpu_us_per_request,
                sample.unexpected
            );
            case.samples.push(sample);
        }
    }
    drop(paygates);
    drop(nginx);
    drop(hello);

    let baseline = cases.iter().find(|c| c.scenario == Scenario::Baseline.name()).cloned();
    let rows = report::rows(&cases, baseline.as_ref());
    let table = report::table(&rows);
    println!("\n{table}");
    let json_path = options.json.clone().unwrap_or_else(|| target_dir.join("bench-results.json"));
    let document = serde_json::json!({
        "machine": machine(),
        "date": date(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "settings": {
            "duration_s": options.duration.as_secs_f64(), "warmup_s": options.warmup.as_secs_f64(),
            "rounds": options.rounds, "connections": options.connections, "open_loop_rate": options.open_loop_rate,
            "server_cpu": server_cpu, "load_cpu": load_cpu, "log_level": options.log_level,
        },
        "rows": rows,
        "cases": cases,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("results: {}", json_path.display());
    Ok(())
}

fn run_callgrind(options: &Options, requests: u64, top: usize) -> anyhow::Result<()> {
    if oha::on_path("valgrind").is_none() || oha::on_path("callgrind_control").is_none() {
        bail!("valgrind not found: apt-get install -y valgrind");
    }
    let paygate = servers::build_paygate(&workspace_root())?;
    let target_dir = paygate.parent().and_then(Path::parent).context("paygate executable path")?.to_path_buf();
    let oha = oha::locate_or_install(&target_dir.join("bench-tools"))?;
    let dir = target_dir.join("bench-callgrind");
    std::fs::create_dir_all(&dir)?;
    let none = Keys { valid: "", bad_checksum: "", unknown: "", over_limit: "" };
    let mut profiles = Vec::new();
    {
        let hello = Hello::start(None, &callgrind::wrapper(&dir, "baseline"))?;
        let request = scenarios::request(Scenario::Baseline, &format!("http://{}", hello.addr), &none, None)?;
        profiles.push(callgrind::profile("baseline", hello.pid(), &dir, &oha, &request, requests)?);
    }
    {
        let p = Paygate::start(&paygate, Backend::Sqlite, None, &options.log_level, &callgrind::wrapper(&dir, "me"))?;
        let keys = Keys { valid: &p.seed.key, ..none };
        let request = scenarios::request(Scenario::Me, &format!("http://{}", p.addr), &keys, None)?;
        profiles.push(callgrind::profile("me", p.pids()[0], &dir, &oha, &request, requests)?);
    }
    for p in &profiles {
        println!(
            "\n== {}: {:.0} instructions/request ({} instructions, {} requests; {})",
            p.name,
            p.per_request(),
            p.instructions,
            p.requests,
            p.file.display()
        );
        println!("{}", callgrind::top_inclusive(&p.file, top)?);
    }
    if let [base, me] = &profiles[..] {
        println!("\nGET /v1/me ÷ baseline: {:.2}× the instructions per request", me.per_request() / base.per_request());
    }
    Ok(())
}

/// One run of the scenario's load: oha, or our own sender where every request
/// needs a fresh Idempotency-Key (closed loop only).
fn generate(oha: &Path, load_cpu: Option<u32>, target: &Target, duration: Duration) -> anyhow::Result<oha::Outcome> {
    match (target.scenario.fresh_idempotency_keys(), target.load) {
        (false, _) => oha::run(oha, load_cpu, &target.request, target.load, oha::Stop::After(duration)),
        (true, Load::Closed { connections }) => {
            sender::run_pinned(&std::env::current_exe()?, load_cpu, &target.request, connections, duration)
        }
        (true, Load::Open { .. }) => bail!("{}: the fresh-key sender has no open loop", target.scenario.name()),
    }
}

/// Warm up, then measure one scenario once.
fn measure(
    oha: &Path,
    load_cpu: Option<u32>,
    target: &Target,
    round: u32,
    options: &Options,
) -> anyhow::Result<Sample> {
    let warm = generate(oha, load_cpu, target, options.warmup)?;
    let expected = target.scenario.expected_status();
    if warm.statuses.get(&expected).copied().unwrap_or(0) == 0 {
        bail!(
            "{} ({}): no {expected} during warm-up (statuses {:?}, errors {:?}); refusing to benchmark the wrong answer",
            target.scenario.name(),
            target.backend,
            warm.statuses,
            warm.errors
        );
    }
    let before = procstat::cpu_seconds(&target.pids)?;
    let outcome = generate(oha, load_cpu, target, options.duration)?;
    let after = procstat::cpu_seconds(&target.pids)?;
    let responses = outcome.responses();
    Ok(Sample {
        round,
        requests_per_sec: outcome.requests_per_sec,
        p50_ms: outcome.p50_ms,
        p99_ms: outcome.p99_ms,
        cpu_us_per_request: if responses > 0 { (after - before) * 1e6 / responses as f64 } else { f64::NAN },
        responses,
        unexpected: unexpected(&outcome, expected, target.allowance),
        statuses: outcome.statuses,
        errors: outcome.errors,
    })
}

/// Answers without the expected status (beyond the allowance) plus transport errors.
fn unexpected(outcome: &oha::Outcome, expected: u16, allowance: Option<(u16, u64)>) -> u64 {
    let errors: u64 = outcome.errors.values().sum();
    let wrong: u64 = outcome
        .statuses
        .iter()
        .filter(|(code, _)| **code != expected)
        .map(|(code, n)| match allowance {
            Some((allowed, up_to)) if allowed == *code => n.saturating_sub(up_to),
            _ => *n,
        })
        .sum();
    wrong + errors
}

/// Scenarios 3 and 4's data, over HTTP with the bench key: one payee
/// (`POST /v1/payees`) and one payment to it (`POST /v1/payments`, a fixed
/// Idempotency-Key). A new company's policy wants one approval for any amount,
/// so the payment stays `pending_approval`; that is fine for reading it.
fn seed_payment(addr: SocketAddr, key: &str) -> anyhow::Result<PaymentSeed> {
    let headers = vec![("Authorization".to_owned(), format!("Bearer {key}"))];
    let payee = serde_json::json!({
        "name": "Bench Supplier",
        "type": "business",
        "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000"},
    });
    let payee_id = created_id(http1::call(addr, "POST", "/v1/payees", &headers, Some(&payee.to_string())), "payee")?;
    let mut headers = headers;
    headers.push(("Idempotency-Key".to_owned(), "bench-seed-1".to_owned()));
    let body = scenarios::payment_body(&payee_id);
    let payment_id = created_id(http1::call(addr, "POST", "/v1/payments", &headers, Some(&body)), "payment")?;
    println!("seeded payee {payee_id} and payment {payment_id} on {addr}");
    Ok(PaymentSeed { payee_id, payment_id })
}

/// The `id` of a 201 answer.
fn created_id(answer: anyhow::Result<(u16, String)>, what: &str) -> anyhow::Result<String> {
    let (status, body) = answer.with_context(|| format!("seeding a {what}"))?;
    if status != 201 {
        bail!("seeding a {what}: status {status}: {body}");
    }
    let value: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("seeding a {what}: {body}"))?;
    value["id"].as_str().map(str::to_owned).with_context(|| format!("seeding a {what}: no id in {body}"))
}

/// Server on CPU 0, generator on CPU 1, when taskset and two CPUs are there.
fn cpu_split() -> (Option<u32>, Option<u32>) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if oha::on_path("taskset").is_none() {
        println!("warning: taskset not found (util-linux): servers and generator are not pinned");
        return (None, None);
    }
    if cpus < 2 {
        println!("warning: fewer than 2 CPUs: servers and generator share one");
        return (None, None);
    }
    println!("pinning: servers (paygate, hello, nginx) on CPU 0, load generator on CPU 1");
    (Some(0), Some(1))
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']));
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
    })
}

fn date() -> Option<String> {
    let mut c = std::process::Command::new("date");
    c.args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    process::output(c, "date").ok().map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err() && parse_duration("ten").is_err() && parse_duration("5h").is_err());
    }

    #[test]
    fn unexpected_statuses_and_allowance() {
        let outcome = oha::Outcome {
            requests_per_sec: 1.0,
            p50_ms: 1.0,
            p99_ms: 1.0,
            statuses: BTreeMap::from([(429, 1000), (200, 15), (500, 2)]),
            errors: BTreeMap::from([("connection reset".to_owned(), 3)]),
        };
        assert_eq!(unexpected(&outcome, 429, Some((200, 13))), 2 + 2 + 3);
        assert_eq!(unexpected(&outcome, 429, None), 15 + 2 + 3);
        assert_eq!(unexpected(&outcome, 200, None), 1000 + 2 + 3);
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from(["paygate-bench", "all", "--rounds", "5", "--duration", "3s"]).unwrap();
        assert_eq!(cli.options.rounds, 5);
        assert_eq!(cli.options.duration, Duration::from_secs(3));
        let cli = Cli::try_parse_from(["paygate-bench", "run", "me", "flood-unknown-key"]).unwrap();
        assert!(matches!(cli.command, Command::Run { ref scenarios } if scenarios.len() == 2));
    }
}
