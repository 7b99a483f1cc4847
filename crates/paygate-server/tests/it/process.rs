//! The real `paygate` binary as a process: logs, metrics, demo, shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{BIN, secret_of, with_other_secret};

pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) api: String,
    pub(crate) ops: String,
    pub(crate) stdout: Arc<Mutex<Vec<String>>>,
    pub(crate) stderr: Arc<Mutex<Vec<String>>>,
}

pub(crate) fn collect(reader: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

pub(crate) fn start(dir: &std::path::Path, args: &[&str], level: &str) -> Process {
    let db = format!("sqlite://{}", dir.join("paygate.db").display());
    start_with(args, level, &[("PAYGATE_DATABASE_URL", db.as_str())])
}

pub(crate) fn start_with(args: &[&str], level: &str, env: &[(&str, &str)]) -> Process {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env("PAYGATE_LISTEN", "127.0.0.1:0")
        .env("PAYGATE_OPS_LISTEN", "127.0.0.1:0")
        .env("PAYGATE_LOG_FORMAT", "json")
        .env("PAYGATE_LOG_LEVEL", level)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let started = Instant::now();
    loop {
        let listening = stderr.lock().unwrap().iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["message"] == "paygate listening")
                .then(|| (v["api"].as_str().unwrap().to_owned(), v["ops"].as_str().unwrap().to_owned()))
        });
        if let Some((api, ops)) = listening {
            return Process { child, api: format!("http://{api}"), ops: format!("http://{ops}"), stdout, stderr };
        }
        if started.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start: {:?}", stderr.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Process {
    /// A failed test never leaves a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// SIGTERM, then the exit status.
    pub(crate) fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        let out = self.stdout.lock().unwrap().clone();
        let err = self.stderr.lock().unwrap().clone();
        (status, out, err)
    }

    /// Waits for the demo block on stdout and returns (initiator, approver, curl line).
    pub(crate) fn demo_keys(&self) -> (String, String, String) {
        let started = Instant::now();
        loop {
            let lines = self.stdout.lock().unwrap().clone();
            if let Some(curl) = lines.iter().find(|l| l.trim_start().starts_with("curl ")) {
                let keys: Vec<String> =
                    lines.iter().map(|l| l.trim()).filter(|l| l.starts_with("pgk_test_")).map(str::to_owned).collect();
                assert_eq!(keys.len(), 2, "{lines:?}");
                return (keys[0].clone(), keys[1].clone(), curl.trim().to_owned());
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no demo output: {lines:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn served_binary_never_logs_secrets_runs_the_payments_walkthrough_and_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["serve", "--demo"], "trace");
    let (initiator, approver, _) = server.demo_keys();
    let http = crate::harness::http();
    let me = http.get(format!("{}/v1/me", server.api)).bearer_auth(&initiator).send().await.unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let created: Value = http
        .post(format!("{}/v1/api-keys", server.api))
        .bearer_auth(&initiator)
        .json(&serde_json::json!({"name": "n", "owner": "o", "scopes": ["keys:read"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let issued = created["secret"].as_str().unwrap().to_owned();
    for key in [&approver, &issued, &with_other_secret(&initiator), &format!("{}x", &initiator)] {
        http.get(format!("{}/v1/api-keys", server.api)).bearer_auth(key).send().await.unwrap();
    }
    // The README's payments walk-through on the demo: a payee, a payment that
    // needs one approval (2,500.00 EUR under the demo policy), the approver's
    // vote, and settlement on the simulated rail.
    let iban = "DE89370400440532013000";
    let payee: Value = http
        .post(format!("{}/v1/payees", server.api))
        .bearer_auth(&initiator)
        .json(&serde_json::json!({"name": "Lieferant GmbH", "type": "business",
            "bank_account": {"scheme": "iban", "iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let payment: Value = http
        .post(format!("{}/v1/payments", server.api))
        .bearer_auth(&initiator)
        .header("Idempotency-Key", "inv-2026-0042")
        .json(&serde_json::json!({"payee_id": payee["id"], "amount": 250000, "currency": "EUR", "reference": "Invoice 2026-0042"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(payment["status"], "pending_approval", "{payment}");
    assert_eq!(payment["approvals"]["required"], 1);
    let url = format!("{}/v1/payments/{}", server.api, payment["id"].as_str().unwrap());
    let own = http.post(format!("{url}/approve")).bearer_auth(&initiator).send().await.unwrap();
    assert_eq!(own.status(), StatusCode::FORBIDDEN);
    let approved: Value = http
        .post(format!("{url}/approve"))
        .bearer_auth(&approver)
        .json(&serde_json::json!({"version": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(approved["status"], "approved", "{approved}");
    let started = std::time::Instant::now();
    loop {
        let p: Value = http.get(&url).bearer_auth(&approver).send().await.unwrap().json().await.unwrap();
        if p["status"] == "completed" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the demo payment never completed: {p}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _, logs) = server.terminate();
    for line in &logs {
        assert!(!line.contains(iban) && !line.contains("0532 0130"), "an account number reached the logs: {line}");
    }
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");
    assert!(logs.len() > 10, "trace logging produced lines");
    let request_line = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "request completed" && v["span"]["route"] == "/v1/me")
        .expect("a request log line");
    assert!(request_line["span"]["request_id"].as_str().unwrap().starts_with("req_"));
    assert!(request_line["span"]["key_id"].as_str().unwrap().starts_with("key_"));
    assert!(request_line["span"]["company_id"].as_str().unwrap().starts_with("cmp_"));
    for key in [&initiator, &approver, &issued] {
        for line in &logs {
            assert!(!line.contains(secret_of(key)), "a secret reached the logs: {line}");
            assert!(
                !line.to_ascii_lowercase().contains("bearer pgk_"),
                "an Authorization header reached the logs: {line}"
            );
        }
    }
}

#[tokio::test]
async fn malformed_keys_never_reach_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["serve", "--demo"], "warn,paygate_server=info");
    let (initiator, _, _) = server.demo_keys();
    let http = crate::harness::http();
    let scrape = || async { http.get(format!("{}/metrics", server.ops)).send().await.unwrap().text().await.unwrap() };
    let before = scrape().await;
    let mut bad_checksum = initiator.clone().into_bytes();
    let last = bad_checksum.len() - 1;
    bad_checksum[last] = if bad_checksum[last] == b'q' { b'r' } else { b'q' };
    let bad_checksum = String::from_utf8(bad_checksum).unwrap();
    // 8 failures here and 11 below: below the failed-authentication throttle (20 per 5 minutes).
    for i in 0..8 {
        let key = if i % 2 == 0 { bad_checksum.clone() } else { format!("pgk_live_{i}") };
        let r = http.get(format!("{}/v1/me", server.api)).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let after = scrape().await;
    let lookups = "paygate_key_store_lookups_total";
    assert_eq!(metric(&after, lookups), metric(&before, lookups), "a malformed key reached the store");
    assert_eq!(metric(&after, "paygate_auth_failures_total{reason=\"bad_checksum\"}"), 4.0);
    assert_eq!(metric(&after, "paygate_auth_failures_total{reason=\"malformed\"}"), 4.0);
    // The counter does move for a well-formed key the node has not seen.
    let fresh = paygate_domain::KeyHasher::new(&paygate_domain::Pepper::new(1, vec![9; 32]).unwrap())
        .generate(paygate_domain::KeyMode::Test);
    http.get(format!("{}/v1/me", server.api)).bearer_auth(&*fresh.text).send().await.unwrap();
    assert_eq!(metric(&scrape().await, lookups), metric(&before, lookups) + 1.0);
    // The unknown id is cached as absent, so repeating it reads (almost)
    // nothing: the cache is bypassed by design while the revision poll is
    // late, which a loaded machine can cause once or twice, never ten times.
    for _ in 0..10 {
        let again = http.get(format!("{}/v1/me", server.api)).bearer_auth(&*fresh.text).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::UNAUTHORIZED, "refused as unknown, not throttled");
    }
    let reads = metric(&scrape().await, lookups) - metric(&before, lookups) - 1.0;
    assert!(reads <= 2.0, "unknown ids are cached: 10 repeats cost {reads} store reads");
    let (status, _, _) = server.terminate();
    assert!(status.success());
}

#[tokio::test]
async fn demo_curl_line_returns_the_demo_company() {
    let dir = tempfile::tempdir().unwrap();
    // A real tenant that happens to be called "Demo Co" is never the sandbox.
    let out = Command::new(BIN)
        .args(["admin", "company", "create", "--name", "Demo Co", "--json"])
        .env("PAYGATE_DATABASE_URL", format!("sqlite://{}", dir.path().join("paygate.db").display()))
        .output()
        .unwrap();
    let tenant: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut company_ids = Vec::new();
    let mut first_keys: Option<String> = None;
    for _ in 0..2 {
        let server = start(dir.path(), &["serve", "--demo"], "info");
        let (initiator, approver, curl) = server.demo_keys();
        let url = curl.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_owned();
        let bearer = curl.split("Bearer ").nth(1).unwrap().trim_end_matches('\'').to_owned();
        assert_eq!(bearer, initiator);
        let me: Value =
            crate::harness::http().get(&url).bearer_auth(&bearer).send().await.unwrap().json().await.unwrap();
        assert_eq!(me["company"]["name"], "Demo Co");
        let scopes = me["key"]["scopes"].as_array().unwrap();
        assert!(!scopes.contains(&Value::from("payments:approve")) && scopes.contains(&Value::from("payments:write")));
        let approver_me: Value =
            crate::harness::http().get(&url).bearer_auth(&approver).send().await.unwrap().json().await.unwrap();
        assert_eq!(approver_me["key"]["scopes"], serde_json::json!(["payments:read", "payments:approve"]));
        company_ids.push(me["company"]["id"].as_str().unwrap().to_owned());
        if let Some(previous) = &first_keys {
            // Each start revokes the previous start's demo keys.
            let r = crate::harness::http().get(&url).bearer_auth(previous).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        first_keys = Some(initiator.clone());
        assert!(server.terminate().0.success());
    }
    assert_eq!(company_ids[0], company_ids[1], "the demo company is created once");
    assert_ne!(company_ids[0], tenant["id"].as_str().unwrap());
    // The embedded default generated a 0600 pepper file beside the database.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("paygate.db.pepper")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn invalid_configuration_stops_startup_with_one_line() {
    for (var, value) in
        [("PAYGATE_LISTEN", "not-an-address"), ("PAYGATE_DATABASE_URL", "mysql://x"), ("PAYGATE_MAX_BODY_BYTES", "-5")]
    {
        let out = Command::new(BIN).arg("serve").env(var, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
    }
}

/// Runs the `paygate` CLI with `env`; asserts success and returns its JSON output.
pub(crate) fn cli_json(env: &[(&str, &str)], args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).envs(env.iter().copied()).env("PAYGATE_LOG_LEVEL", "warn").output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
}

/// Two `paygate serve` processes on one PostgreSQL database: a revocation or
/// suspension made through one node, or through the CLI, is refused by every
/// node within 1 s (the measured times are printed).
#[tokio::test]
async fn two_nodes_refuse_revoked_and_suspended_keys_within_1s() {
    let Some(admin_url) = crate::harness::postgres_url() else {
        eprintln!("PAYGATE_TEST_POSTGRES_URL not set: two-node test skipped");
        return;
    };
    let deployment = crate::harness::SharedDeployment::create(&admin_url).await;
    // The test polls until keys are refused: relax the failed-auth throttle.
    let env = deployment.with(&[("PAYGATE_AUTH_FAILURE_LIMIT", "100000/1")]);
    let a = start_with(&["serve"], "warn,paygate_server=info", &env);
    let b = start_with(&["serve"], "warn,paygate_server=info", &env);
    let cli = |args: &[&str]| cli_json(&env, args);
    let company =
        cli(&["admin", "company", "create", "--name", "Two Nodes", "--json"])["id"].as_str().unwrap().to_owned();
    let key = |scopes: &str| {
        cli(&[
            "admin",
            "key",
            "create",
            "--company",
            &company,
            "--name",
            "n",
            "--owner",
            "o",
            "--scopes",
            scopes,
            "--mode",
            "test",
            "--json",
        ])
    };
    let http = crate::harness::http();
    let status = |node: &Process, text: &str| {
        let request = http.get(format!("{}/v1/me", node.api)).bearer_auth(text);
        async move { request.send().await.unwrap().status() }
    };
    let until = |node: &'static str, base: String, text: String, expected: StatusCode| {
        let http = http.clone();
        async move {
            let started = Instant::now();
            loop {
                let s = http.get(format!("{base}/v1/me")).bearer_auth(&text).send().await.unwrap().status();
                if s == expected {
                    return started.elapsed();
                }
                assert!(started.elapsed() < Duration::from_secs(5), "node {node} still answers {s}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let admin = key("keys:read,keys:manage")["secret"].as_str().unwrap().to_owned();

    // 1. Revoked through the API on node A; node B must refuse it.
    let victim = key("keys:read");
    let text = victim["secret"].as_str().unwrap().to_owned();
    for node in [&a, &b] {
        assert_eq!(status(node, &text).await, StatusCode::OK, "warm the cache");
    }
    let r = http
        .post(format!("{}/v1/api-keys/{}/revoke", a.api, victim["id"].as_str().unwrap()))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let on_b = until("B", b.api.clone(), text.clone(), StatusCode::UNAUTHORIZED).await;
    println!("API revocation on node A refused by node B after {on_b:?}");
    assert!(on_b < Duration::from_secs(1));

    // 2. Revoked through the CLI; both nodes must refuse it.
    let victim = key("keys:read");
    let text = victim["secret"].as_str().unwrap().to_owned();
    for node in [&a, &b] {
        assert_eq!(status(node, &text).await, StatusCode::OK);
    }
    cli(&["admin", "key", "revoke", victim["id"].as_str().unwrap()]);
    let (on_a, on_b) = tokio::join!(
        until("A", a.api.clone(), text.clone(), StatusCode::UNAUTHORIZED),
        until("B", b.api.clone(), text.clone(), StatusCode::UNAUTHORIZED)
    );
    println!("CLI revocation refused by node A after {on_a:?}, node B after {on_b:?}");
    assert!(on_a < Duration::from_secs(1) && on_b < Duration::from_secs(1));

    // 3. Company suspended through the CLI; both nodes must refuse its keys.
    let member = key("keys:read")["secret"].as_str().unwrap().to_owned();
    for node in [&a, &b] {
        assert_eq!(status(node, &member).await, StatusCode::OK);
    }
    cli(&["admin", "company", "suspend", &company]);
    let (on_a, on_b) = tokio::join!(
        until("A", a.api.clone(), member.clone(), StatusCode::FORBIDDEN),
        until("B", b.api.clone(), member.clone(), StatusCode::FORBIDDEN)
    );
    println!("CLI suspension refused by node A after {on_a:?}, node B after {on_b:?}");
    assert!(on_a < Duration::from_secs(1) && on_b < Duration::from_secs(1));
    cli(&["admin", "company", "resume", &company]);
    let (on_a, on_b) = tokio::join!(
        until("A", a.api.clone(), member.clone(), StatusCode::OK),
        until("B", b.api.clone(), member.clone(), StatusCode::OK)
    );
    assert!(on_a < Duration::from_secs(1) && on_b < Duration::from_secs(1));

    // 4. Rotated on node B with no grace: node A refuses the old key.
    let old = key("keys:read");
    let old_text = old["secret"].as_str().unwrap().to_owned();
    assert_eq!(status(&a, &old_text).await, StatusCode::OK);
    let r = http
        .post(format!("{}/v1/api-keys/{}/rotate", b.api, old["id"].as_str().unwrap()))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"grace_period_seconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let on_a = until("A", a.api.clone(), old_text, StatusCode::UNAUTHORIZED).await;
    println!("rotation (no grace) on node B refused by node A after {on_a:?}");
    assert!(on_a < Duration::from_secs(1));

    // 5. Emergency revocation of every key of the company.
    cli(&["admin", "key", "revoke-all", "--company", &company]);
    let (on_a, on_b) = tokio::join!(
        until("A", a.api.clone(), admin.clone(), StatusCode::UNAUTHORIZED),
        until("B", b.api.clone(), admin.clone(), StatusCode::UNAUTHORIZED)
    );
    println!("CLI revoke-all refused by node A after {on_a:?}, node B after {on_b:?}");
    assert!(on_a < Duration::from_secs(1) && on_b < Duration::from_secs(1));

    for node in [a, b] {
        assert!(node.terminate().0.success());
    }
}

/// Two nodes on one PostgreSQL append to the same company chain at the same
/// time (changes in their own transactions, reads through each node's group
/// writer); the chain never forks and `paygate audit verify` finds it intact.
#[tokio::test]
async fn two_nodes_append_to_one_audit_chain_without_forking() {
    let Some(admin_url) = crate::harness::postgres_url() else {
        eprintln!("PAYGATE_TEST_POSTGRES_URL not set: two-node audit test skipped");
        return;
    };
    let deployment = crate::harness::SharedDeployment::create(&admin_url).await;
    let env = deployment.with(&[("PAYGATE_AUDIT_CHECKPOINT_SECS", "1")]);
    let a = start_with(&["serve"], "warn,paygate_server=info", &env);
    let b = start_with(&["serve"], "warn,paygate_server=info", &env);
    let cli = |args: &[&str]| {
        let out =
            Command::new(BIN).args(args).envs(env.iter().copied()).env("PAYGATE_LOG_LEVEL", "warn").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), out.stdout)
    };
    let (_, _, out) = cli(&["admin", "company", "create", "--name", "Busy", "--json"]);
    let company = serde_json::from_slice::<Value>(&out).unwrap()["id"].as_str().unwrap().to_owned();
    let (_, _, out) = cli(&[
        "admin",
        "key",
        "create",
        "--company",
        &company,
        "--name",
        "n",
        "--owner",
        "o",
        "--scopes",
        "keys:read,keys:manage",
        "--json",
    ]);
    let key = serde_json::from_slice::<Value>(&out).unwrap()["secret"].as_str().unwrap().to_owned();
    let http = crate::harness::http();
    let mut tasks = Vec::new();
    for (i, node) in [a.api.clone(), b.api.clone(), a.api.clone(), b.api.clone()].into_iter().enumerate() {
        let (http, key) = (http.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..40 {
                let response = if (i + j) % 4 == 0 {
                    http.post(format!("{node}/v1/api-keys"))
                        .bearer_auth(&key)
                        .json(&serde_json::json!({"name": "n", "owner": "o", "scopes": []}))
                        .send()
                        .await
                } else {
                    http.get(format!("{node}/v1/me")).bearer_auth(&key).send().await
                };
                assert!(response.unwrap().status().is_success());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, report, _) = cli(&["audit", "verify", "--company", &company]);
    println!("{}", report.trim());
    assert!(ok, "{report}");
    // 2 operator records + 160 requests, all in one unbroken chain.
    assert!(report.contains(": 162 records"), "{report}");
    for node in [a, b] {
        assert!(node.terminate().0.success());
    }
}

/// Two `paygate serve` processes on one PostgreSQL database receive the same
/// payment with the same `Idempotency-Key` at once, many times over: each key
/// creates exactly one payment; the node that loses the race replays the
/// winner's response, at once or, if it answered 409 while the winner was in
/// flight, on the client's retry.
#[tokio::test]
async fn two_nodes_create_one_payment_per_idempotency_key() {
    let Some(admin_url) = crate::harness::postgres_url() else {
        eprintln!("PAYGATE_TEST_POSTGRES_URL not set: two-node test skipped");
        return;
    };
    let deployment = crate::harness::SharedDeployment::create(&admin_url).await;
    let env = deployment.with(&[("PAYGATE_WRITE_CONCURRENCY", "1000")]);
    let a = start_with(&["serve"], "warn,paygate_server=info", &env);
    let b = start_with(&["serve"], "warn,paygate_server=info", &env);
    let cli = |args: &[&str]| cli_json(&env, args);
    let company = cli(&["admin", "company", "create", "--name", "Race", "--json"])["id"].as_str().unwrap().to_owned();
    let key = cli(&[
        "admin",
        "key",
        "create",
        "--company",
        &company,
        "--name",
        "n",
        "--owner",
        "o",
        "--scopes",
        "payments:write,payments:read,payees:write",
        "--mode",
        "test",
        "--json",
    ])["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let http = crate::harness::http();
    let payee: Value = http
        .post(format!("{}/v1/payees", a.api))
        .bearer_auth(&key)
        .json(&serde_json::json!({"name": "P", "type": "business", "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for round in 0..20 {
        let body =
            serde_json::json!({"payee_id": payee["id"], "amount": 100 + round, "currency": "EUR", "reference": "race"});
        let idem = format!("race-{round}");
        let send = |base: String| {
            http.post(format!("{base}/v1/payments"))
                .bearer_auth(&key)
                .header("Idempotency-Key", &idem)
                .json(&body)
                .send()
        };
        let (ra, rb) = tokio::join!(send(a.api.clone()), send(b.api.clone()));
        let mut first = Vec::new();
        let mut replays = Vec::new();
        for (base, r) in [(&a.api, ra.unwrap()), (&b.api, rb.unwrap())] {
            let mut r = r;
            if r.status() == StatusCode::CONFLICT {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["code"], "idempotency_key_in_use", "round {round}");
                // In flight on the other node: the retry replays once it committed.
                let started = std::time::Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    r = send(base.clone()).await.unwrap();
                    if r.status() != StatusCode::CONFLICT {
                        break;
                    }
                    assert!(started.elapsed() < Duration::from_secs(10), "round {round}: still in flight");
                }
            }
            assert_eq!(r.status(), StatusCode::CREATED, "round {round}");
            let replayed = r.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned());
            let v: Value = r.json().await.unwrap();
            match replayed.as_deref() {
                None => first.push(v),
                Some("true") => replays.push(v),
                Some(other) => panic!("round {round}: Idempotent-Replayed: {other}"),
            }
        }
        assert_eq!(first.len(), 1, "round {round}: exactly one node created the payment");
        assert_eq!(replays, first, "round {round}: the other node replayed the winner's response");
    }
    let list: Value = http
        .get(format!("{}/v1/payments?limit=100", b.api))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 20);
    for node in [a, b] {
        let (status, _, _) = node.terminate();
        assert!(status.success());
    }
}
