//! The load generator: oha (crates.io). Found on PATH or in the harness's own
//! tool root, else installed there with `cargo install oha --locked`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// One request shape, as oha sends it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

/// How the load is offered.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `connections` clients, each sending its next request when the previous answered.
    Closed { connections: u32 },
    /// `rate` requests per second whatever the answers, latency corrected for
    /// coordinated omission.
    Open { connections: u32, rate: u32 },
}

/// What one oha run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub statuses: BTreeMap<u16, u64>,
    /// Transport errors, by oha's description; in-flight requests cut by the
    /// deadline are left out (they are an artefact of stopping, not of the server).
    pub errors: BTreeMap<String, u64>,
}

impl Outcome {
    pub fn responses(&self) -> u64 {
        self.statuses.values().sum()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    summary: Summary,
    latency_percentiles: Percentiles,
    #[serde(default)]
    status_code_distribution: BTreeMap<String, u64>,
    #[serde(default)]
    error_distribution: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    requests_per_sec: f64,
}

#[derive(Deserialize)]
struct Percentiles {
    p50: Option<f64>,
    p99: Option<f64>,
}

/// Parses `oha --output-format json` (latencies in seconds).
pub fn parse_report(json: &str) -> anyhow::Result<Outcome> {
    let report: Report = serde_json::from_str(json).context("oha JSON output")?;
    let mut statuses = BTreeMap::new();
    for (code, count) in report.status_code_distribution {
        statuses.insert(code.parse().with_context(|| format!("status code {code:?}"))?, count);
    }
    let errors =
        report.error_distribution.into_iter().filter(|(e, _)| !e.contains("aborted due to deadline")).collect();
    Ok(Outcome {
        requests_per_sec: report.summary.requests_per_sec,
        p50_ms: report.latency_percentiles.p50.unwrap_or(f64::NAN) * 1e3,
        p99_ms: report.latency_percentiles.p99.unwrap_or(f64::NAN) * 1e3,
        statuses,
        errors,
    })
}

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    After(Duration),
    Requests(u64),
}

/// The oha command line for `request` under `load` until `stop`.
pub fn arguments(request: &Request, load: Load, stop: Stop) -> Vec<String> {
    let mut args: Vec<String> = vec!["--no-tui".into(), "--output-format".into(), "json".into()];
    match stop {
        Stop::After(duration) => args.extend(["-z".into(), format!("{}ms", duration.as_millis())]),
        Stop::Requests(n) => args.extend(["-n".into(), n.to_string()]),
    }
    match load {
        Load::Closed { connections } => args.extend(["-c".into(), connections.to_string()]),
        Load::Open { connections, rate } => {
            args.extend(["-c".into(), connections.to_string(), "-q".into(), rate.to_string()]);
            args.push("--latency-correction".into());
        }
    }
    args.extend(["-m".into(), request.method.into()]);
    for (name, value) in &request.headers {
        args.extend(["-H".into(), format!("{name}: {value}")]);
    }
    if let Some(body) = &request.body {
        args.extend(["-d".into(), body.clone()]);
    }
    args.push(request.url.clone());
    args
}

/// Runs oha pinned to `cpu` (when taskset is available) and parses its report.
pub fn run(oha: &Path, cpu: Option<u32>, request: &Request, load: Load, stop: Stop) -> anyhow::Result<Outcome> {
    let args = arguments(request, load, stop);
    let mut command = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(oha);
            c
        }
        None => Command::new(oha),
    };
    let output = command.args(&args).output().with_context(|| format!("cannot run {}", oha.display()))?;
    if !output.status.success() {
        bail!("oha failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    parse_report(&String::from_utf8_lossy(&output.stdout))
}

/// oha on PATH, else in `tools/bin`, else installed there (printed first).
pub fn locate_or_install(tools: &Path) -> anyhow::Result<PathBuf> {
    if let Some(found) = on_path("oha") {
        return Ok(found);
    }
    let local = tools.join("bin").join("oha");
    if local.is_file() {
        return Ok(local);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("oha not found: running `cargo install oha --locked --root {}` (one-off, a few minutes)", tools.display());
    let status = Command::new(&cargo)
        .args(["install", "oha", "--locked", "--root"])
        .arg(tools)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() || !local.is_file() {
        bail!("cargo install oha failed ({status}); install it by hand: cargo install oha --locked");
    }
    Ok(local)
}

/// The first executable `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "summary": {"successRate": 1.0, "total": 10.0, "slowest": 0.02, "fastest": 0.0001,
                  "average": 0.002, "requestsPerSec": 24810.5, "totalData": 100, "sizePerRequest": 5, "sizePerSec": 50},
      "responseTimeHistogram": {"0.001": 10},
      "latencyPercentiles": {"p10": 0.001, "p25": 0.0015, "p50": 0.0019, "p75": 0.0022, "p90": 0.003,
                             "p95": 0.004, "p99": 0.0071, "p99.9": 0.01, "p99.99": 0.02},
      "rps": {"mean": 24000},
      "details": {},
      "statusCodeDistribution": {"200": 248000, "503": 5},
      "errorDistribution": {"aborted due to deadline": 49, "connection closed before message completed": 2}
    }"#;

    #[test]
    fn parses_the_json_report() {
        let o = parse_report(SAMPLE).unwrap();
        assert_eq!(o.requests_per_sec, 24810.5);
        assert!((o.p50_ms - 1.9).abs() < 1e-9 && (o.p99_ms - 7.1).abs() < 1e-9);
        assert_eq!(o.statuses, BTreeMap::from([(200, 248000), (503, 5)]));
        assert_eq!(o.responses(), 248005);
        assert_eq!(o.errors.len(), 1, "deadline aborts are not errors: {:?}", o.errors);
    }

    #[test]
    fn a_run_without_answers_has_no_percentiles() {
        let json = r#"{"summary": {"requestsPerSec": 0.0}, "latencyPercentiles": {"p50": null, "p99": null},
                       "errorDistribution": {"connection refused": 7}}"#;
        let o = parse_report(json).unwrap();
        assert!(o.p99_ms.is_nan());
        assert_eq!(o.responses(), 0);
        assert_eq!(o.errors.get("connection refused"), Some(&7));
    }

    #[test]
    fn command_lines() {
        let request = Request {
            method: "GET",
            url: "http://127.0.0.1:1/v1/me".into(),
            headers: vec![("Authorization".into(), "Bearer k".into())],
            body: None,
        };
        let closed = arguments(&request, Load::Closed { connections: 50 }, Stop::After(Duration::from_secs(10)));
        assert_eq!(
            closed.join(" "),
            "--no-tui --output-format json -z 10000ms -c 50 -m GET -H Authorization: Bearer k http://127.0.0.1:1/v1/me"
        );
        let open = arguments(&request, Load::Open { connections: 100, rate: 10_000 }, Stop::Requests(7));
        assert!(open.join(" ").contains("-n 7 -c 100 -q 10000 --latency-correction"));
    }
}
