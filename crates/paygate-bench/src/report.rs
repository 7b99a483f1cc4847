//! Rounds into medians, the printed table and the JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// One measured run of one scenario on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: u32,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Server CPU (user + system, every process of the server side) per answered request.
    pub cpu_us_per_request: f64,
    pub responses: u64,
    /// Answers other than the expected status (beyond any allowance), plus transport errors.
    pub unexpected: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
}

/// A scenario on a backend, with its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub scenario: String,
    pub backend: String,
    pub expected_status: u16,
    /// False where the generator fixes the rate (open loop): requests/s is the offer, not a capacity.
    pub throughput_comparable: bool,
    pub samples: Vec<Sample>,
}

/// The medians of a case and its ratios to the baseline of the same rounds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub backend: String,
    pub rounds: usize,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_us_per_request: f64,
    /// Median over rounds of (this rps ÷ baseline rps of the same round).
    pub rps_vs_baseline: Option<f64>,
    /// Median over rounds of (this CPU/request ÷ baseline CPU/request of the same round).
    pub cpu_vs_baseline: Option<f64>,
    pub unexpected: u64,
}

/// Median; the mean of the middle two for an even count; NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

fn per_round_ratio(case: &Case, baseline: &Case, value: fn(&Sample) -> f64) -> Option<f64> {
    let ratios: Vec<f64> = case
        .samples
        .iter()
        .filter_map(|s| {
            let b = baseline.samples.iter().find(|b| b.round == s.round)?;
            let (x, y) = (value(s), value(b));
            (y > 0.0 && x.is_finite() && y.is_finite()).then_some(x / y)
        })
        .collect();
    (!ratios.is_empty()).then(|| median(&ratios))
}

/// One row per case; `baseline` is the case the ratios are taken against.
pub fn rows(cases: &[Case], baseline: Option<&Case>) -> Vec<Row> {
    cases
        .iter()
        .map(|case| {
            let of = |f: fn(&Sample) -> f64| median(&case.samples.iter().map(f).collect::<Vec<_>>());
            let rps_ratio = baseline
                .filter(|_| case.throughput_comparable)
                .and_then(|b| per_round_ratio(case, b, |s| s.requests_per_sec));
            Row {
                scenario: case.scenario.clone(),
                backend: case.backend.clone(),
                rounds: case.samples.len(),
                requests_per_sec: of(|s| s.requests_per_sec),
                p50_ms: of(|s| s.p50_ms),
                p99_ms: of(|s| s.p99_ms),
                cpu_us_per_request: of(|s| s.cpu_us_per_request),
                rps_vs_baseline: rps_ratio,
                cpu_vs_baseline: baseline.and_then(|b| per_round_ratio(case, b, |s| s.cpu_us_per_request)),
                unexpected: case.samples.iter().map(|s| s.unexpected).sum(),
            }
        })
        .collect()
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into())
}

/// The table as printed and as pasted into docs/benchmarks.md (Markdown).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | backend | req/s (median) | p50 ms | p99 ms | server CPU µs/req | req/s ÷ baseline | CPU/req ÷ baseline | unexpected statuses |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {} |",
            r.scenario,
            r.backend,
            r.requests_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_request,
            ratio(r.rps_vs_baseline),
            ratio(r.cpu_vs_baseline),
            r.unexpected
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u32, rps: f64, cpu: f64) -> Sample {
        Sample {
            round,
            requests_per_sec: rps,
            p50_ms: 1.0,
            p99_ms: 2.0 + round as f64,
            cpu_us_per_request: cpu,
            responses: 10,
            unexpected: round as u64,
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    fn case(name: &str, samples: Vec<Sample>) -> Case {
        Case {
            scenario: name.into(),
            backend: "sqlite".into(),
            expected_status: 200,
            throughput_comparable: true,
            samples,
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        // The machine got slower in round 1: per-round ratios stay at 0.5.
        let base = case("baseline", vec![sample(0, 100.0, 10.0), sample(1, 50.0, 20.0), sample(2, 100.0, 10.0)]);
        let me = case("me", vec![sample(0, 50.0, 20.0), sample(1, 25.0, 40.0), sample(2, 50.0, 20.0)]);
        let rows = rows(&[base.clone(), me], Some(&base));
        assert_eq!(rows[0].rps_vs_baseline, Some(1.0));
        assert_eq!(rows[1].requests_per_sec, 50.0);
        assert_eq!(rows[1].rps_vs_baseline, Some(0.5));
        assert_eq!(rows[1].cpu_vs_baseline, Some(2.0));
        assert_eq!(rows[1].p99_ms, 3.0);
        assert_eq!(rows[1].unexpected, 3, "unexpected statuses are summed over rounds");
    }

    #[test]
    fn open_loop_rows_have_no_throughput_ratio() {
        let base = case("baseline", vec![sample(0, 100.0, 10.0)]);
        let mut open = case("open", vec![sample(0, 10.0, 20.0)]);
        open.throughput_comparable = false;
        let rows = rows(&[open], Some(&base));
        assert_eq!(rows[0].rps_vs_baseline, None);
        assert_eq!(rows[0].cpu_vs_baseline, Some(2.0));
        let t = table(&rows);
        assert!(t.contains("| open | sqlite | 10 | 1.00 | 2.00 | 20.0 | - | 2.00 | 0 |"), "{t}");
    }
}
