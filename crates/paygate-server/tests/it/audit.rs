//! The audit log over HTTP and in the database: a record for every request
//! before its response, append-only tables, tamper evidence found by
//! `paygate audit verify`, and a customer's own verification of an export.

use std::time::Duration;

use paygate_domain::audit::{AuditRecord, PLATFORM_CHAIN};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json as body};

use crate::backend_tests;
use crate::harness::{Backend, TestApp, json, problem};

backend_tests!(
    every_request_leaves_a_record_before_its_response,
    audit_is_company_scoped_and_filterable,
    audit_tables_refuse_update_and_delete,
    verify_names_each_kind_of_tampering,
    a_customer_verifies_an_export_with_only_the_public_key,
    no_record_no_answer,
    failed_authentication_floods_are_aggregated,
);

async fn records(app: &TestApp, chain: &str) -> Vec<AuditRecord> {
    app.store.audit_records(chain, 0, 100_000).await.unwrap()
}

async fn every_request_leaves_a_record_before_its_response(app: TestApp) {
    let acme = app.company("Acme").await;
    let chain = acme.id.to_string();
    let key = app.key(acme.id, "keys:read,keys:manage,audit:read").await;
    let key_id = paygate_domain::ApiKeyText::parse(&key).unwrap().id().to_string();
    let cases: Vec<(Method, String, Option<Value>, StatusCode, &str)> = vec![
        (Method::GET, "/v1/me".into(), None, StatusCode::OK, "identity.read"),
        (Method::GET, "/v1/api-keys".into(), None, StatusCode::OK, "api_key.list"),
        (Method::GET, "/v1/api-keys/key_0000000000000000000000".into(), None, StatusCode::NOT_FOUND, "api_key.read"),
        (
            Method::POST,
            "/v1/api-keys".into(),
            Some(body!({"name": ""})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "api_key.create",
        ),
        (
            Method::POST,
            "/v1/api-keys".into(),
            Some(body!({"name": "n", "owner": "o", "scopes": ["keys:read"]})),
            StatusCode::CREATED,
            "api_key.create",
        ),
        (Method::GET, "/v1/nope".into(), None, StatusCode::NOT_FOUND, "request.unrouted"),
        (Method::GET, "/v1/audit-chain".into(), None, StatusCode::OK, "audit.chain_read"),
    ];
    for (method, path, payload, status, action) in cases {
        let mut request =
            app.request(method.clone(), &path, Some(&key)).header("user-agent", "erp-sync/2.1\tInjected: yes");
        if let Some(p) = payload {
            request = request.json(&p);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        // Durable before the response: read straight from the database, no wait.
        let all = records(&app, &chain).await;
        let record = all.last().unwrap();
        assert_eq!(record.entry.action, action, "{method} {path}");
        assert_eq!(record.entry.status, status.as_u16());
        assert_eq!(record.entry.request_id.as_deref(), Some(request_id.as_str()));
        assert_eq!(record.entry.actor_id.as_deref(), Some(key_id.as_str()));
        assert_eq!(record.entry.actor_name.as_deref(), Some("tester"));
        assert_eq!(record.entry.client_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(record.entry.user_agent.as_deref(), Some("erp-sync/2.1Injected: yes"), "control characters removed");
    }
    // The created key's record names it; the change and its record are one.
    let all = records(&app, &chain).await;
    let create = all.iter().find(|r| r.entry.action == "api_key.create" && r.entry.status == 201).unwrap();
    assert!(create.entry.resource_id.as_deref().unwrap().starts_with("key_"));
    // Unauthenticated requests go to the platform chain, not to a company's.
    let before = records(&app, PLATFORM_CHAIN).await.len();
    problem(
        app.request(Method::GET, "/v1/me", None).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    let platform = records(&app, PLATFORM_CHAIN).await;
    assert_eq!(platform.len(), before + 1);
    assert_eq!(platform.last().unwrap().entry.action, "auth.failed");
    assert_eq!(platform.last().unwrap().entry.outcome, paygate_domain::audit::Outcome::Denied);
    // A key whose secret verifies but is refused (here: revoked) is recorded in
    // its company's chain with the key, so the company sees its key misused.
    let victim = app.key(acme.id, "keys:read").await;
    let victim_id = paygate_domain::ApiKeyText::parse(&victim).unwrap().id().to_string();
    json(app.post(&format!("/v1/api-keys/{victim_id}/revoke"), &key).send().await.unwrap(), StatusCode::OK).await;
    problem(app.get("/v1/me", &victim).send().await.unwrap(), StatusCode::UNAUTHORIZED, "api_key_revoked").await;
    let misuse = records(&app, &chain).await.into_iter().last().unwrap();
    assert_eq!(misuse.entry.action, "auth.failed");
    assert_eq!(misuse.entry.actor_id.as_deref(), Some(victim_id.as_str()));
    assert_eq!(misuse.entry.outcome, paygate_domain::audit::Outcome::Denied);
    // Operator changes through the CLI are recorded with the operator's name.
    let out = app.cli(&["admin", "company", "suspend", &chain]).await;
    assert!(out.status.success());
    let suspended = records(&app, &chain).await.into_iter().last().unwrap();
    assert_eq!(suspended.entry.action, "company.suspend");
    assert_eq!(suspended.entry.actor_kind, paygate_domain::audit::ActorKind::Operator);
    assert!(suspended.entry.actor_name.is_some());
}

async fn audit_is_company_scoped_and_filterable(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let reader = app.key(acme.id, "audit:read,keys:read").await;
    let other = app.key(globex.id, "audit:read").await;
    app.get("/v1/api-keys/nope", &reader).send().await.unwrap();
    for _ in 0..3 {
        app.get("/v1/me", &reader).send().await.unwrap();
    }
    let page: Value = json(app.get("/v1/audit-events?limit=2", &reader).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert!(page["has_more"].as_bool().unwrap());
    let first = &page["data"][0];
    assert_eq!(first["chain"], acme.id.to_string());
    assert!(first["seq"].as_u64().unwrap() > page["data"][1]["seq"].as_u64().unwrap(), "newest first");
    let next: Value = json(
        app.get(&format!("/v1/audit-events?limit=100&cursor={}", page["next_cursor"].as_str().unwrap()), &reader)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(next["data"].as_array().unwrap().iter().all(|r| r["seq"].as_u64() < page["data"][1]["seq"].as_u64()));
    let failed: Value = json(
        app.get("/v1/audit-events?outcome=failed&action=api_key.read", &reader).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 1);
    assert_eq!(failed["data"][0]["status"], 404);
    // Another company sees none of it, and a record id of Acme is a 404 for Globex.
    let id = first["id"].as_str().unwrap();
    let theirs: Value = json(app.get("/v1/audit-events", &other).send().await.unwrap(), StatusCode::OK).await;
    assert!(theirs["data"].as_array().unwrap().iter().all(|r| r["chain"] == globex.id.to_string()));
    problem(
        app.get(&format!("/v1/audit-events/{id}"), &other).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let own: Value =
        json(app.get(&format!("/v1/audit-events/{id}"), &reader).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(own["id"], id);
    // Bad filters are 400s, never 5xx.
    for q in ["outcome=maybe", "action=api_key.steal", "from=yesterday", "cursor=x", "limit=0", "colour=red"] {
        problem(
            app.get(&format!("/v1/audit-events?{q}"), &reader).send().await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        )
        .await;
    }
    // Reading the audit log is itself audited.
    let reads =
        records(&app, &acme.id.to_string()).await.into_iter().filter(|r| r.entry.action == "audit.list").count();
    assert!(reads >= 4, "{reads}");
}

async fn disable_triggers(app: &TestApp) {
    let sql = match app.backend {
        Backend::Sqlite => "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete;",
        Backend::Postgres => "ALTER TABLE audit_events DISABLE TRIGGER USER;",
    };
    app.raw_sql(sql).await.unwrap();
}

async fn audit_tables_refuse_update_and_delete(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    app.get("/v1/me", &key).send().await.unwrap();
    assert!(app.cli(&["audit", "checkpoint"]).await.status.success());
    let chain = acme.id.to_string();
    for sql in [
        format!("UPDATE audit_events SET status = 299 WHERE chain = '{chain}'"),
        format!("DELETE FROM audit_events WHERE chain = '{chain}'"),
        "UPDATE audit_checkpoints SET seq = 1".to_owned(),
        // Deleting the checkpoints would drop the signatures that catch a rewrite.
        "DELETE FROM audit_checkpoints".to_owned(),
    ] {
        let err = app.raw_sql(&sql).await.err().unwrap_or_else(|| panic!("{sql} was allowed"));
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    // The head only moves forward: removing it would hide a truncation.
    let err = app.raw_sql("DELETE FROM audit_heads").await.unwrap_err();
    assert!(err.to_string().contains("only moves forward"), "{err}");
    let err = app.raw_sql(&format!("UPDATE audit_heads SET seq = 1 WHERE chain = '{chain}'")).await.unwrap_err();
    assert!(err.to_string().contains("only moves forward"), "{err}");
    if app.backend == Backend::Postgres {
        for table in ["audit_events", "audit_checkpoints"] {
            let err = app.raw_sql(&format!("TRUNCATE {table}")).await.unwrap_err();
            assert!(err.to_string().contains("append-only"), "{table}: {err}");
        }
    }
    // company.create and api_key.create by the operator, then the request.
    assert_eq!(records(&app, &chain).await.len(), 3);
}

/// An INSERT statement for a forged record, in this backend's dialect.
fn insert_sql(backend: Backend, r: &AuditRecord) -> String {
    let e = &r.entry;
    let text = |s: &Option<String>| s.as_ref().map(|v| format!("'{}'", v.replace('\'', "''"))).unwrap_or("NULL".into());
    let micros = (e.occurred_at.unix_timestamp_nanos() / 1000) as i64;
    let blob = |b: &[u8]| match backend {
        Backend::Sqlite => format!("X'{}'", hex::encode(b)),
        Backend::Postgres => format!("decode('{}', 'hex')", hex::encode(b)),
    };
    let (id, at) = match backend {
        Backend::Sqlite => (blob(e.id.as_uuid().as_bytes()), micros.to_string()),
        Backend::Postgres => (
            format!("'{}'::uuid", e.id.as_uuid()),
            format!("'1970-01-01T00:00:00Z'::timestamptz + interval '{micros} microseconds'"),
        ),
    };
    format!(
        "INSERT INTO audit_events (chain, seq, id, occurred_at, actor_kind, actor_id, actor_name, action, resource_type, resource_id, \
         outcome, status, request_id, client_ip, user_agent, details, prev_hash, hash) VALUES ('{}', {}, {id}, {at}, '{}', {}, {}, '{}', {}, {}, '{}', {}, {}, {}, {}, '{}', {}, {})",
        e.chain,
        r.seq,
        e.actor_kind.as_str(),
        text(&e.actor_id),
        text(&e.actor_name),
        e.action,
        text(&e.resource_type),
        text(&e.resource_id),
        e.outcome.as_str(),
        e.status,
        text(&e.request_id),
        text(&e.client_ip),
        text(&e.user_agent),
        e.details.replace('\'', "''"),
        blob(&r.prev_hash),
        blob(&r.hash)
    )
}

async fn verify(app: &TestApp, chain: &str) -> (bool, String) {
    let out = app.cli(&["audit", "verify", "--company", chain]).await;
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn verify_names_each_kind_of_tampering(app: TestApp) {
    let backend = app.backend;
    // (name, expected first bad seq, expected words); the chain holds 9 records
    // (company and key created by the operator, then 7 requests); each case
    // gets a fresh database.
    let cases: [(&str, u64, &str); 6] = [
        ("modify", 3, "modified"),
        ("delete", 3, "missing"),
        ("insert", 4, "broken link"),
        ("reorder", 2, "modified"),
        ("truncate", 8, "truncated"),
        ("rewrite", 9, "rewritten"),
    ];
    app.shutdown().await;
    for (name, bad_seq, words) in cases {
        let app = TestApp::spawn(backend).await.unwrap();
        let acme = app.company("Acme").await;
        let chain = acme.id.to_string();
        let key = app.key(acme.id, "keys:read").await;
        for _ in 0..7 {
            json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
        }
        let out = app.cli(&["audit", "checkpoint"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (ok, report) = verify(&app, &chain).await;
        assert!(ok, "untouched chain verifies: {report}");
        disable_triggers(&app).await;
        let all = records(&app, &chain).await;
        assert_eq!(all.len(), 9);
        let sql = match name {
            "modify" => format!("UPDATE audit_events SET status = 500 WHERE chain = '{chain}' AND seq = 3"),
            "delete" => format!("DELETE FROM audit_events WHERE chain = '{chain}' AND seq = 3"),
            "insert" => {
                // Record 3 replaced by a forgery that is itself well formed.
                let mut forged = all[2].entry.clone();
                forged.action = "api_key.list";
                forged.id = paygate_domain::AuditEventId::generate();
                let forged = AuditRecord::append(forged, 2, all[1].hash);
                format!(
                    "DELETE FROM audit_events WHERE chain = '{chain}' AND seq = 3; {}",
                    insert_sql(backend, &forged)
                )
            }
            "reorder" => format!(
                "UPDATE audit_events SET seq = 1000000 WHERE chain = '{chain}' AND seq = 2; \
                 UPDATE audit_events SET seq = 2 WHERE chain = '{chain}' AND seq = 3; \
                 UPDATE audit_events SET seq = 3 WHERE chain = '{chain}' AND seq = 1000000;"
            ),
            "truncate" => format!("DELETE FROM audit_events WHERE chain = '{chain}' AND seq >= 8"),
            "rewrite" => {
                // The attacker recomputes every hash after changing record 2:
                // the chain is self-consistent, only the signature catches it.
                let mut rewritten = Vec::new();
                let mut prev = all[0].hash;
                for (i, r) in all.iter().enumerate().skip(1) {
                    let mut e = r.entry.clone();
                    if i == 1 {
                        e.status = 204;
                    }
                    let rec = AuditRecord::append(e, i as u64, prev);
                    prev = rec.hash;
                    rewritten.push(insert_sql(backend, &rec));
                }
                format!("DELETE FROM audit_events WHERE chain = '{chain}' AND seq >= 2; {}", rewritten.join("; "))
            }
            _ => unreachable!(),
        };
        app.raw_sql(&sql).await.unwrap();
        let (ok, report) = verify(&app, &chain).await;
        assert!(!ok, "{name}: tampering not found: {report}");
        assert!(report.contains(&format!("seq {bad_seq}:")) && report.contains(words), "{name}: {report}");
        println!("{backend:?} {name}: {}", report.trim());
    }
}

/// What a customer does with `docs/audit.md`: only the export and the public
/// key, an independent implementation of the encoding, no Paygate code.
async fn a_customer_verifies_an_export_with_only_the_public_key(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "audit:read,keys:read").await;
    for _ in 0..5 {
        app.get("/v1/me", &key).send().await.unwrap();
    }
    assert!(app.cli(&["audit", "checkpoint"]).await.status.success());
    let chain: Value = json(app.get("/v1/audit-chain", &key).send().await.unwrap(), StatusCode::OK).await;
    let export = app.get("/v1/audit-events/export", &key).send().await.unwrap();
    assert_eq!(export.headers()["content-type"], "application/x-ndjson");
    let text = export.text().await.unwrap();

    fn field(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::Null => out.extend_from_slice(&[0xff; 4]),
            Value::String(s) => {
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            other => {
                let s = other.to_string();
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
    use sha2::Digest;
    let mut prev = [0u8; 32];
    let mut count = 0;
    let mut hashes = std::collections::HashMap::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let mut enc = Vec::new();
        for name in [
            "encoding",
            "chain",
            "seq",
            "id",
            "occurred_at_us",
            "actor_kind",
            "actor_id",
            "actor_name",
            "action",
            "resource_type",
            "resource_id",
            "outcome",
            "status",
            "request_id",
            "client_ip",
            "user_agent",
            "details",
        ] {
            field(&mut enc, &r[name]);
        }
        assert_eq!(r["prev_hash"], hex::encode(prev), "linked");
        let mut h = sha2::Sha256::new();
        h.update(prev);
        h.update(&enc);
        let hash: [u8; 32] = h.finalize().into();
        assert_eq!(r["hash"], hex::encode(hash), "recomputed");
        prev = hash;
        count += 1;
        hashes.insert(r["seq"].as_u64().unwrap(), hash);
    }
    assert!(count >= 6, "{count} records");
    // The checkpoint: Ed25519 over the same length-prefixed layout.
    let cp = &chain["checkpoint"];
    let seq = cp["seq"].as_u64().unwrap();
    assert_eq!(hex::encode(hashes[&seq]), cp["hash"].as_str().unwrap());
    let mut message = Vec::new();
    for v in [body!("paygate-audit-checkpoint-v1"), chain["chain"].clone(), body!(seq.to_string())] {
        field(&mut message, &v);
    }
    message.extend_from_slice(&32u32.to_be_bytes());
    message.extend_from_slice(&hashes[&seq]);
    let public: [u8; 32] = hex::decode(chain["public_key"].as_str().unwrap()).unwrap().try_into().unwrap();
    let signature: [u8; 64] = hex::decode(cp["signature"].as_str().unwrap()).unwrap().try_into().unwrap();
    use ed25519_dalek::Verifier;
    ed25519_dalek::VerifyingKey::from_bytes(&public)
        .unwrap()
        .verify(&message, &ed25519_dalek::Signature::from_bytes(&signature))
        .expect("the checkpoint signature verifies with the published key");
    // A bad time range is a 400.
    problem(
        app.get("/v1/audit-events/export?from=soon", &key).send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    )
    .await;
}

async fn no_record_no_answer(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read,keys:manage").await;
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    // The audit store breaks (the table disappears): nothing answers without a record.
    app.raw_sql("DROP TABLE audit_events").await.unwrap();
    problem(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable").await;
    let r =
        app.post("/v1/api-keys", &key).json(&body!({"name": "n", "owner": "o", "scopes": []})).send().await.unwrap();
    problem(r, StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable").await;
    let keys = app
        .store
        .list_api_keys(
            &paygate_store::operator_scope(&*app.store, acme.id, paygate_domain::KeyMode::Test),
            paygate_store::PageRequest { limit: 10, after: None },
        )
        .await
        .unwrap();
    assert_eq!(keys.items.len(), 1, "the change rolled back with its record");
}

async fn failed_authentication_floods_are_aggregated(app: TestApp) {
    let app = {
        let backend = app.backend;
        app.shutdown().await;
        TestApp::spawn_with(backend, &[("PAYGATE_AUDIT_AGGREGATION_SECS", "1")]).await.unwrap()
    };
    let before = records(&app, PLATFORM_CHAIN).await.len();
    for i in 0..30 {
        let r = app
            .request(Method::GET, "/v1/me", None)
            .header("authorization", format!("Bearer pgk_live_{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let during = records(&app, PLATFORM_CHAIN).await.len() - before;
    // One record opens each interval (the burst may straddle one boundary); the rest are counted.
    assert!((1..=3).contains(&during), "{during} records for 30 failures");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = records(&app, PLATFORM_CHAIN).await;
    let new: Vec<_> = after[before..].iter().filter(|r| r.entry.action == "auth.failed").collect();
    assert!(new.len() <= 6, "{} records: floods must not amplify", new.len());
    // Every failure is accounted for: individual records plus aggregated counts.
    let total: u64 = new
        .iter()
        .map(|r| {
            let d: Value = serde_json::from_str(&r.entry.details).unwrap();
            if d["aggregated"] == true { d["count"].as_u64().unwrap() } else { 1 }
        })
        .sum();
    assert_eq!(total, 30);
    let aggregate = new.iter().find(|r| r.entry.details.contains("\"aggregated\":true")).expect("an aggregate record");
    assert_eq!(aggregate.entry.client_ip.as_deref(), Some("127.0.0.1"));
}
