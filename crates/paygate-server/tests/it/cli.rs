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

trait OutputWithin {
    fn output_within(&mut self, limit: Duration) -> std::process::Output;
}

impl OutputWithin for std::process::Command {
    fn output_within(&mut self, limit: Duration) -> std::process::Output {
        let mut child = self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }
}

/// The binary with a fresh SQLite database URL in its own temporary directory.
fn paygate(dir: &std::path::Path, db: &str) -> std::process::Command {
    let mut command = std::process::Command::new(BIN);
    command.env("PAYGATE_DATABASE_URL", format!("sqlite://{}", dir.join(db).display()));
    command
}

#[test]
fn every_command_and_flag_has_help() {
    use clap::CommandFactory;
    fn walk(command: &clap::Command, path: &str, blank: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if arg.get_help().is_none() && !["help", "version"].contains(&arg.get_id().as_str()) {
                blank.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
            if sub.get_about().is_none() {
                blank.push(format!("{path} {}", sub.get_name()));
            }
            walk(sub, &format!("{path} {}", sub.get_name()), blank);
        }
    }
    let mut blank = Vec::new();
    walk(&paygate_server::cli::Cli::command(), "paygate", &mut blank);
    assert!(blank.is_empty(), "no help text: {blank:?}");
    // And the real binary prints them.
    let out = std::process::Command::new(BIN).args(["admin", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("company  Create, list, suspend"), "{help}");
    let out = std::process::Command::new(BIN).args(["admin", "key", "create", "-h"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--company <COMPANY>", "--name <NAME>", "--json", "--mode <MODE>"] {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{flag}: {help}"));
        assert!(line.trim_start().len() > flag.len() + 2, "{flag} has no help: {line:?}");
    }
}

#[test]
fn settings_are_validated_and_misspelled_variables_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = paygate(dir.path(), "p.db").env("PAYGATE_LOG_LEVEL", "inof").arg("migrate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PAYGATE_LOG_LEVEL") && stderr.contains("did you mean info"), "{stderr}");
    // Directives with levels are fine; a bad level inside one is not.
    let ok = paygate(dir.path(), "p.db").env("PAYGATE_LOG_LEVEL", "warn,paygate=debug").arg("migrate").output();
    assert!(ok.unwrap().status.success());
    let out = paygate(dir.path(), "p.db").env("PAYGATE_LOG_LEVEL", "paygate=verbose").arg("migrate").output();
    assert_eq!(out.unwrap().status.code(), Some(2));
    let out = paygate(dir.path(), "p.db").env("PAYGATE_LISTN", "127.0.0.1:1").arg("migrate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PAYGATE_LISTN") && stderr.contains("did you mean PAYGATE_LISTEN?"), "{stderr}");
}

#[test]
fn a_missing_database_directory_is_refused_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("dta");
    for args in [vec!["serve"], vec!["admin", "company", "list"]] {
        // A server that wrongly starts is stopped by the timeout, not left running.
        let out = paygate(dir.path(), "dta/paygate.db")
            .args(&args)
            .env("PAYGATE_LISTEN", "127.0.0.1:0")
            .env("PAYGATE_OPS_LISTEN", "127.0.0.1:0")
            .output_within(Duration::from_secs(20));
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("does not exist") && stderr.contains("--create"), "{args:?}: {stderr}");
        assert!(!typo.exists(), "{args:?} created the directory");
    }
    let out = paygate(dir.path(), "dta/paygate.db").arg("migrate").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(typo.join("paygate.db").exists());
}

#[test]
fn key_create_says_which_mode_it_chose() {
    let dir = tempfile::tempdir().unwrap();
    assert!(paygate(dir.path(), "p.db").arg("migrate").output().unwrap().status.success());
    let out = paygate(dir.path(), "p.db").args(["admin", "company", "create", "--name", "Acme", "--json"]).output();
    let company: Value = serde_json::from_slice(&out.unwrap().stdout).unwrap();
    let create = |mode: Option<&str>| {
        let mut c = paygate(dir.path(), "p.db");
        let id = company["id"].as_str().unwrap();
        c.args(["admin", "key", "create", "--company", id, "--name", "n", "--owner", "o", "--scopes", "keys:read"]);
        c.arg("--json");
        if let Some(mode) = mode {
            c.args(["--mode", mode]);
        }
        c.output().unwrap()
    };
    let out = create(None);
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(key["mode"], "live");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("live key") && stderr.contains("--mode test"), "{stderr}");
    let out = create(Some("test"));
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(key["mode"], "test");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_without_a_company_prints_the_next_steps() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = paygate(dir.path(), "p.db")
        .args(["serve"])
        .env("PAYGATE_LISTEN", "127.0.0.1:0")
        .env("PAYGATE_OPS_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref().take(8) {
        seen.push(line.unwrap());
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(text.contains("has no company yet"), "{text}");
    assert!(text.contains("paygate admin company create") && text.contains("--mode test"), "{text}");
    assert!(text.contains("serve --demo"), "{text}");
}
