//! Limits shared through Redis: two nodes admit what one would, and a Redis
//! outage degrades to bounded in-process limits and recovers by itself.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use paygate_ratelimit::Backend;
use reqwest::StatusCode;

use crate::harness::{BIN, TestApp, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Redis of this test's own, on a spare loopback port.
struct OwnRedis {
    child: Option<Child>,
}

impl OwnRedis {
    fn start(port: u16) -> Option<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "redis-server is needed under CI: {e}");
                return None;
            }
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child: Some(child) })
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn backend_of(app: &TestApp) -> Backend {
    app.server.as_ref().unwrap().state.limits.limiter.backend()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_to_bounded_local_limits_and_recovers() {
    let port = free_port();
    let Some(mut redis) = OwnRedis::start(port) else { return };
    let url = format!("redis://127.0.0.1:{port}");
    let app = TestApp::spawn_with(
        crate::harness::Backend::Sqlite,
        &[("PAYGATE_REDIS_URL", url.as_str()), ("PAYGATE_RATE_LIMIT_NODES", "2")],
    )
    .await
    .unwrap();
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let id = paygate_domain::ApiKeyText::parse(&key).unwrap().id().to_string();
    assert!(app.cli(&["admin", "key", "set-limits", &id, "--rate", "1", "--burst", "4"]).await.status.success());
    tokio::time::sleep(Duration::from_millis(400)).await;
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(backend_of(&app), Backend::Redis);

    redis.stop();
    // Authentication never depends on Redis, nothing answers 5xx, and the limit
    // still holds: this node enforces its share (burst 4 / 2 nodes = 2).
    let mut admitted = 0;
    for _ in 0..6 {
        let status = app.get("/v1/me", &key).send().await.unwrap().status();
        assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
        admitted += (status == StatusCode::OK) as u32;
    }
    assert_eq!(backend_of(&app), Backend::Degraded);
    assert!((1..=2).contains(&admitted), "admitted {admitted} while degraded: never fail open");

    let _redis = OwnRedis::start(port).unwrap();
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = app.get("/v1/me", &key).send().await.unwrap();
        if backend_of(&app) == Backend::Redis {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not return to Redis");
    }
    println!("returned to Redis {:?} after it restarted", started.elapsed());
}

/// Two `paygate serve` nodes on one PostgreSQL and one Redis, one key limited
/// to 10/s with a burst of 10, a steady 40 requests/s spread over both nodes
/// for 3 s: together they admit what one node would (burst + rate × time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_limit_through_redis() {
    let (Some(pg), Some(redis)) = (crate::harness::postgres_url(), crate::harness::redis_url()) else {
        eprintln!("PostgreSQL or Redis not configured: two-node shared limit skipped");
        return;
    };
    let deployment = crate::harness::SharedDeployment::create(&pg).await;
    let prefix = format!("paygate:test:{}:", crate::harness::uuid_like());
    let env: Vec<(String, String)> = deployment
        .with(&[
            ("PAYGATE_REDIS_URL", redis.as_str()),
            ("PAYGATE_REDIS_PREFIX", prefix.as_str()),
            ("PAYGATE_RATE_LIMIT_NODES", "2"),
            ("PAYGATE_LOG_LEVEL", "warn,paygate_server=info"),
            ("PAYGATE_LOG_FORMAT", "json"),
            ("PAYGATE_LISTEN", "127.0.0.1:0"),
            ("PAYGATE_OPS_LISTEN", "127.0.0.1:0"),
        ])
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let cli = |args: &[&str]| {
        let out = Command::new(BIN).args(args).envs(env.iter().map(|(k, v)| (k, v))).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let company = cli(&["admin", "company", "create", "--name", "Shared", "--json"])["id"].as_str().unwrap().to_owned();
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
        "keys:read",
        "--json",
    ]);
    let text = key["secret"].as_str().unwrap().to_owned();
    cli(&["admin", "key", "set-limits", key["id"].as_str().unwrap(), "--rate", "10", "--burst", "10"]);

    let mut nodes: Vec<(Child, String, String)> = Vec::new();
    for _ in 0..2 {
        let mut child = Command::new(BIN)
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (api, ops) = {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stderr).lines();
            loop {
                let line = lines.next().expect("node exited").unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["message"] == "paygate listening" {
                    break (v["api"].as_str().unwrap().to_owned(), v["ops"].as_str().unwrap().to_owned());
                }
            }
        };
        nodes.push((child, format!("http://{api}"), format!("http://{ops}")));
    }
    let http = crate::harness::http();
    let started = Instant::now();
    let mut admitted = 0u32;
    let mut sent = 0u32;
    let mut last_admitted_at = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(3) {
        let base = &nodes[(sent % 2) as usize].1;
        let status = http.get(format!("{base}/v1/me")).bearer_auth(&text).send().await.unwrap().status();
        assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
        if status == StatusCode::OK {
            admitted += 1;
            last_admitted_at = started.elapsed();
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 10.0 + 10.0 * elapsed;
    println!(
        "two nodes, one key at 10/s burst 10: sent {sent} in {elapsed:.2} s, admitted {admitted} (expected {expected:.1}, last admitted at {last_admitted_at:?})"
    );
    // Both nodes decided through Redis the whole time: a permanently degraded
    // pair would admit the same total (each its half), so check it.
    for (_, _, ops) in &nodes {
        let metrics = http.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("paygate_ratelimit_degraded 0"), "{metrics}");
        // The counter exists from start-up (at 0), so its value is what tells.
        assert_eq!(
            crate::process::metric(&metrics, "paygate_ratelimit_degradations_total"),
            0.0,
            "a node fell back to local limits"
        );
    }
    for (mut child, _, _) in nodes {
        let _ = child.kill();
        let _ = child.wait();
    }
    let error = (admitted as f64 - expected).abs() / expected;
    assert!(error <= 0.10, "admitted {admitted}, expected {expected:.1} ±10%");
}

/// A node starts and serves while its Redis is down (degraded, bounded), and
/// shares limits through Redis as soon as it comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_while_redis_is_down() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let app =
        TestApp::spawn_with(crate::harness::Backend::Sqlite, &[("PAYGATE_REDIS_URL", url.as_str())]).await.unwrap();
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(backend_of(&app), Backend::Degraded);
    let Some(_redis) = OwnRedis::start(port) else { return };
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
        if backend_of(&app) == Backend::Redis {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never connected to Redis");
    }
}
