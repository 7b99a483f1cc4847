//! The operator CLI against the same database as a running server.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::backend_tests;
use crate::harness::{BIN, TestApp, json, secret_of};

backend_tests!(cli_revocation_and_suspension_reach_the_running_server_within_1s, admin_cli_round_trip);

fn stdout(output: &std::process::Output) -> String {
    assert!(output.status.success(), "CLI failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

async fn cli_key(app: &TestApp, company: &str, scopes: &str) -> Value {
    let out = app
        .cli(&[
            "admin",
            "key",
            "create",
            "--company",
            company,
            "--name",
            "cli",
            "--owner",
            "ops",
            "--scopes",
            scopes,
            "--mode",
            "test",
            "--json",
        ])
        .await;
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// Polls until `path` answers `status`; returns the time it took.
async fn time_until(app: &TestApp, key: &str, status: StatusCode) -> Duration {
    let started = Instant::now();
    loop {
        let r = app.get("/v1/me", key).send().await.unwrap();
        if r.status() == status {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still {} after 5 s", r.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn cli_revocation_and_suspension_reach_the_running_server_within_1s(app: TestApp) {
    let created: Value =
        serde_json::from_str(&stdout(&app.cli(&["admin", "company", "create", "--name", "Acme", "--json"]).await))
            .unwrap();
    let company = created["id"].as_str().unwrap().to_owned();
    let key = cli_key(&app, &company, "keys:read").await;
    let text = key["secret"].as_str().unwrap().to_owned();
    // Warm the node's cache, so only the revision signal can make it refuse.
    for _ in 0..3 {
        json(app.get("/v1/me", &text).send().await.unwrap(), StatusCode::OK).await;
    }
    stdout(&app.cli(&["admin", "key", "revoke", key["id"].as_str().unwrap()]).await);
    let revoked_after = time_until(&app, &text, StatusCode::UNAUTHORIZED).await;
    println!("{:?}: CLI revocation refused by the running server after {revoked_after:?}", app.backend);
    assert!(revoked_after < Duration::from_secs(1), "revocation took {revoked_after:?}");

    let other = cli_key(&app, &company, "keys:read").await["secret"].as_str().unwrap().to_owned();
    json(app.get("/v1/me", &other).send().await.unwrap(), StatusCode::OK).await;
    stdout(&app.cli(&["admin", "company", "suspend", &company]).await);
    let suspended_after = time_until(&app, &other, StatusCode::FORBIDDEN).await;
    println!("{:?}: CLI suspension refused by the running server after {suspended_after:?}", app.backend);
    assert!(suspended_after < Duration::from_secs(1), "suspension took {suspended_after:?}");
    stdout(&app.cli(&["admin", "company", "resume", &company]).await);
    let resumed_after = time_until(&app, &other, StatusCode::OK).await;
    assert!(resumed_after < Duration::from_secs(1));
}

async fn admin_cli_round_trip(app: TestApp) {
    let created: Value =
        serde_json::from_str(&stdout(&app.cli(&["admin", "company", "create", "--name", "Globex", "--json"]).await))
            .unwrap();
    let company = created["id"].as_str().unwrap();
    assert_eq!(created["status"], "active");
    let listed: Value = serde_json::from_str(&stdout(&app.cli(&["admin", "company", "list", "--json"]).await)).unwrap();
    assert!(listed.as_array().unwrap().iter().any(|c| c["id"] == company));

    let out = app
        .cli(&[
            "admin",
            "key",
            "create",
            "--company",
            company,
            "--name",
            "n",
            "--owner",
            "o",
            "--scopes",
            "payments:read,keys:read",
            "--expires-in",
            "30d",
            "--json",
        ])
        .await;
    let key: Value = serde_json::from_str(&stdout(&out)).unwrap();
    for field in ["id", "company_id", "secret", "scopes", "mode", "expires_at"] {
        assert!(key.get(field).is_some(), "missing {field} in {key}");
    }
    assert_eq!(key["mode"], "live", "live is the default mode");
    assert_eq!(key["scopes"], serde_json::json!(["payments:read", "keys:read"]));
    let text = key["secret"].as_str().unwrap();
    let me: Value = json(app.get("/v1/me", text).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["company"]["id"], company);

    let listed = stdout(&app.cli(&["admin", "key", "list", "--company", company, "--json"]).await);
    assert!(listed.contains(key["id"].as_str().unwrap()));
    assert!(!listed.contains(secret_of(text)), "list never shows secrets");

    // Bad input: clear message, non-zero exit, nothing written.
    for (args, expect) in [
        (
            vec![
                "admin",
                "key",
                "create",
                "--company",
                company,
                "--name",
                "n",
                "--owner",
                "o",
                "--scopes",
                "payments:read,payments:steal",
            ],
            "unknown scope",
        ),
        (
            vec![
                "admin",
                "key",
                "create",
                "--company",
                "cmp_0000000000000000000000",
                "--name",
                "n",
                "--owner",
                "o",
                "--scopes",
                "keys:read",
            ],
            "no such company",
        ),
        (
            vec![
                "admin",
                "key",
                "create",
                "--company",
                company,
                "--name",
                "n",
                "--owner",
                "o",
                "--scopes",
                "keys:read",
                "--expires-in",
                "soon",
            ],
            "--expires-in",
        ),
        (
            vec!["admin", "key", "create", "--company", "nope", "--name", "n", "--owner", "o", "--scopes", "keys:read"],
            "not a company id",
        ),
        (vec!["admin", "key", "revoke", "key_0000000000000000000000"], "no such key"),
        (vec!["admin", "company", "suspend", "cmp_0000000000000000000000"], "no such company"),
        (vec!["admin", "company", "create", "--name", "   "], "--name"),
    ] {
        let out = app.cli(&args).await;
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    let listed: Value =
        serde_json::from_str(&stdout(&app.cli(&["admin", "key", "list", "--company", company, "--json"]).await))
            .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[test]
fn key_check_accepts_keys_and_rejects_others_without_printing_them() {
    use paygate_domain::{KeyHasher, KeyMode, Pepper};
    let key = KeyHasher::new(&Pepper::new(1, vec![3; 32]).unwrap()).generate(KeyMode::Live).text.to_string();
    let ok = std::process::Command::new(BIN).args(["key", "check", &key]).output().unwrap();
    assert_eq!(ok.status.code(), Some(0));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("well-formed") && !out.contains(secret_of(&key)), "{out}");

    let mut typo = key.clone().into_bytes();
    typo[40] = if typo[40] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for bad in [typo.as_str(), "pgk_live_nope", "hello"] {
        let out = std::process::Command::new(BIN).args(["key", "check", bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(bad));
    }
    // From standard input, so the key stays out of shell history.
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .args(["key", "check", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{key}\n").as_bytes()).unwrap();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}
