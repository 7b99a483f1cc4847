//! Scenario 4's load generator: oha cannot vary a header per request, and
//! every `POST /v1/payments` needs a fresh `Idempotency-Key`. A closed loop
//! like oha's `-c N -z D`: N keep-alive HTTP/1.1 connections on one
//! current-thread tokio runtime, each sending its next request when the
//! previous one answered, every request with the key `<run>-<connection>-<n>`.
//! The harness runs it as its own hidden `fresh-key-load` subcommand under
//! `taskset -c 1` (like oha), reading the [`Outcome`] from its stdout as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http1;
use crate::oha::{Outcome, Request};

/// What the sender sends, for how long, over how many connections.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub connections: u32,
    pub duration: Duration,
}

/// `http://host:port/path` into the address and the path.
pub fn split_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url:?}: only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = authority.parse().with_context(|| format!("{url:?}: host must be an IP address and port"))?;
    Ok((addr, if path.is_empty() { "/".to_owned() } else { path.to_owned() }))
}

/// The percentile `p` (0..=1) of sorted latencies, nearest rank; NaN when empty.
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1e3
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

/// Runs the plan in this process (the hidden subcommand) and returns its outcome.
pub fn run_here(plan: Plan) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let run = run_prefix();
    runtime.block_on(async move {
        let plan = Rc::new(plan);
        let local = tokio::task::LocalSet::new();
        let started = Instant::now();
        let deadline = started + plan.duration;
        let tallies = local
            .run_until(async {
                let handles: Vec<_> = (0..plan.connections)
                    .map(|c| tokio::task::spawn_local(connection(plan.clone(), format!("{run}-{c}"), deadline)))
                    .collect();
                let mut tallies = Vec::new();
                for h in handles {
                    tallies.push(h.await?);
                }
                anyhow::Ok(tallies)
            })
            .await?;
        let mut all = Tally::default();
        for t in tallies {
            all.latencies_us.extend(t.latencies_us);
            for (s, n) in t.statuses {
                *all.statuses.entry(s).or_default() += n;
            }
            for (e, n) in t.errors {
                *all.errors.entry(e).or_default() += n;
            }
        }
        all.latencies_us.sort_unstable();
        let answered = all.latencies_us.len() as f64;
        Ok(Outcome {
            requests_per_sec: answered / plan.duration.as_secs_f64(),
            p50_ms: percentile_ms(&all.latencies_us, 0.50),
            p99_ms: percentile_ms(&all.latencies_us, 0.99),
            statuses: all.statuses,
            errors: all.errors,
        })
    })
}

/// A random prefix per run, so keys never repeat across rounds, warm-ups or runs.
fn run_prefix() -> String {
    paygate_domain::Pepper::generate_hex()[..16].to_owned()
}

/// One keep-alive connection in a closed loop until `deadline`. The request in
/// flight at the deadline is dropped uncounted, as oha does.
async fn connection(plan: Rc<Plan>, prefix: String, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut headers = plan.headers.clone();
    headers.push(("Idempotency-Key".to_owned(), String::new()));
    let deadline = tokio::time::Instant::from_std(deadline);
    for n in 1u64.. {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let s = match stream.as_mut() {
            Some(s) => s,
            None => match tokio::time::timeout_at(deadline, TcpStream::connect(plan.addr)).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    *tally.errors.entry(format!("connect: {}", e.kind())).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    buf.clear();
                    stream.insert(s)
                }
            },
        };
        headers.last_mut().expect("pushed above").1 = format!("{prefix}-{n}");
        let request = http1::encode_request(&plan.method, &plan.path, plan.addr, &headers, plan.body.as_deref());
        let sent = Instant::now();
        match tokio::time::timeout_at(deadline, exchange(s, &request, &mut buf)).await {
            Err(_) => break,
            Ok(Ok(response)) => {
                let micros = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
                tally.latencies_us.push(micros);
                *tally.statuses.entry(response.status).or_default() += 1;
                buf.drain(..response.len);
                if response.close {
                    stream = None;
                }
            }
            Ok(Err(e)) => {
                *tally.errors.entry(format!("{e:#}")).or_default() += 1;
                stream = None;
            }
        }
    }
    tally
}

async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<http1::Response> {
    stream.write_all(request).await.map_err(|e| anyhow::anyhow!("write: {}", e.kind()))?;
    loop {
        if let Some(response) = http1::parse_response(buf)? {
            return Ok(response);
        }
        let n = stream.read_buf(buf).await.map_err(|e| anyhow::anyhow!("read: {}", e.kind()))?;
        if n == 0 {
            bail!("connection closed before a whole response");
        }
    }
}

/// The outcome as the subcommand prints it (JSON has no NaN).
#[derive(Serialize, Deserialize)]
struct Wire {
    requests_per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

pub fn to_json(o: &Outcome) -> String {
    let finite = |x: f64| x.is_finite().then_some(x);
    serde_json::to_string(&Wire {
        requests_per_sec: o.requests_per_sec,
        p50_ms: finite(o.p50_ms),
        p99_ms: finite(o.p99_ms),
        statuses: o.statuses.clone(),
        errors: o.errors.clone(),
    })
    .expect("plain data serialises")
}

pub fn from_json(text: &str) -> anyhow::Result<Outcome> {
    let w: Wire = serde_json::from_str(text.trim()).context("fresh-key-load output")?;
    Ok(Outcome {
        requests_per_sec: w.requests_per_sec,
        p50_ms: w.p50_ms.unwrap_or(f64::NAN),
        p99_ms: w.p99_ms.unwrap_or(f64::NAN),
        statuses: w.statuses,
        errors: w.errors,
    })
}

/// The hidden subcommand's arguments for `request` over `connections` for `duration`.
pub fn arguments(request: &Request, connections: u32, duration: Duration) -> Vec<String> {
    let mut args = vec![
        "fresh-key-load".to_owned(),
        "--url".into(),
        request.url.clone(),
        "--method".into(),
        request.method.into(),
        "--load-connections".into(),
        connections.to_string(),
        "--load-duration-ms".into(),
        duration.as_millis().to_string(),
    ];
    for (name, value) in &request.headers {
        args.extend(["--header".into(), format!("{name}: {value}")]);
    }
    if let Some(body) = &request.body {
        args.extend(["--body".into(), body.clone()]);
    }
    args
}

/// Runs this executable's `fresh-key-load` pinned to `cpu` (when given) and reads its outcome.
pub fn run_pinned(
    exe: &Path,
    cpu: Option<u32>,
    request: &Request,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let mut command = crate::process::launch(cpu, &[], exe);
    command.args(arguments(request, connections, duration));
    let output = command.output().context("cannot run paygate-bench fresh-key-load")?;
    if !output.status.success() {
        bail!("fresh-key-load failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    from_json(&String::from_utf8_lossy(&output.stdout))
}

/// `Name: value` from the command line.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once(':').ok_or_else(|| format!("{text:?}: expected `Name: value`"))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (addr, path) = split_url("http://127.0.0.1:8080/v1/payments").unwrap();
        assert_eq!((addr, path.as_str()), ("127.0.0.1:8080".parse().unwrap(), "/v1/payments"));
        assert_eq!(split_url("http://127.0.0.1:1").unwrap().1, "/");
        assert!(split_url("https://127.0.0.1:1/").is_err() && split_url("http://localhost:1/").is_err());
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), 50.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&[7000], 0.99), 7.0);
        assert!(percentile_ms(&[], 0.5).is_nan());
    }

    #[test]
    fn outcome_round_trips_without_nan() {
        let o = Outcome {
            requests_per_sec: 0.0,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            statuses: BTreeMap::from([(201, 0)]),
            errors: BTreeMap::from([("connect: ConnectionRefused".to_owned(), 3)]),
        };
        let back = from_json(&to_json(&o)).unwrap();
        assert!(back.p50_ms.is_nan() && back.p99_ms.is_nan());
        assert_eq!((back.statuses, back.errors), (o.statuses, o.errors));
    }

    #[test]
    fn subcommand_arguments_and_headers() {
        let request = Request {
            method: "POST",
            url: "http://127.0.0.1:1/v1/payments".into(),
            headers: vec![("Authorization".into(), "Bearer k".into())],
            body: Some("{}".into()),
        };
        let args = arguments(&request, 50, Duration::from_secs(2)).join(" ");
        assert_eq!(
            args,
            "fresh-key-load --url http://127.0.0.1:1/v1/payments --method POST --load-connections 50 \
             --load-duration-ms 2000 --header Authorization: Bearer k --body {}"
        );
        assert_eq!(parse_header("Authorization: Bearer k").unwrap(), ("Authorization".into(), "Bearer k".into()));
        assert!(parse_header("nonsense").is_err());
    }
}
