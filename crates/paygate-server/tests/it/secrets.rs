//! Invariant I2: key secrets exist only as HMAC-SHA256 at rest.

use reqwest::StatusCode;
use serde_json::json as body;

use crate::backend_tests;
use crate::harness::{Backend, TestApp, json, secret_of};

backend_tests!(secrets_are_stored_only_as_hmac);

/// Every byte the database holds, as text: the raw SQLite files (main, WAL and
/// shared memory), or every row of every PostgreSQL table rendered as text.
async fn database_contents(app: &TestApp) -> String {
    match app.backend {
        Backend::Sqlite => {
            let mut all = Vec::new();
            for entry in std::fs::read_dir(app.dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.file_name().unwrap().to_string_lossy().starts_with("paygate.db")
                    && !path.to_string_lossy().ends_with(".pepper")
                {
                    all.extend(std::fs::read(&path).unwrap());
                }
            }
            String::from_utf8_lossy(&all).into_owned()
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&app.env["PAYGATE_DATABASE_URL"]).await.unwrap();
            let tables: Vec<String> =
                sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            let mut all = String::new();
            for table in tables {
                let rows: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM \"{table}\" t")))
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                all.push_str(&rows.join("\n"));
            }
            all
        }
    }
}

/// Raw bytes (SQLite files; PostgreSQL `bytea` columns as stored bytes).
async fn contents_bytes(app: &TestApp) -> Vec<u8> {
    match app.backend {
        Backend::Sqlite => database_contents(app).await.into_bytes().into_iter().chain(raw_sqlite_files(app)).collect(),
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&app.env["PAYGATE_DATABASE_URL"]).await.unwrap();
            let hashes: Vec<Vec<u8>> =
                sqlx::query_scalar("SELECT secret_hash FROM api_keys").fetch_all(&mut conn).await.unwrap();
            hashes.concat()
        }
    }
}

fn raw_sqlite_files(app: &TestApp) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(app.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("paygate.db")
            && !path.to_string_lossy().ends_with(".pepper")
        {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

async fn secrets_are_stored_only_as_hmac(app: TestApp) {
    let acme = app.company("Plaintext Probe Co").await;
    let admin = app.key(acme.id, "keys:read,keys:manage").await;
    let created: serde_json::Value = json(
        app.post("/v1/api-keys", &admin)
            .json(&body!({"name": "n", "owner": "o", "scopes": ["keys:read"]}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let api_issued = created["secret"].as_str().unwrap().to_owned();
    json(app.get("/v1/me", &api_issued).send().await.unwrap(), StatusCode::OK).await;
    json(app.get("/v1/api-keys", &admin).send().await.unwrap(), StatusCode::OK).await;
    // Traffic of every kind the audit log records: rotation (a second secret),
    // revoked and mistyped keys, a key pasted where an id belongs, bad input.
    let id = created["id"].as_str().unwrap();
    let rotated: serde_json::Value = json(
        app.post(&format!("/v1/api-keys/{id}/rotate"), &admin)
            .json(&body!({"grace_period_seconds": 0}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let rotated = rotated["secret"].as_str().unwrap().to_owned();
    app.get("/v1/me", &api_issued).send().await.unwrap();
    let mut typo = rotated.clone().into_bytes();
    typo[50] = if typo[50] == b'a' { b'b' } else { b'a' };
    app.get("/v1/me", &String::from_utf8(typo).unwrap()).send().await.unwrap();
    app.get(&format!("/v1/api-keys/{rotated}"), &admin).send().await.unwrap();
    app.post("/v1/api-keys", &admin).json(&body!({"name": rotated.clone()})).send().await.unwrap();

    let contents = database_contents(&app).await;
    // The scan sees stored text: the company name is there in clear.
    assert!(contents.contains("Plaintext Probe Co"), "the scan must be able to see stored text");
    for key in [&admin, &api_issued, &rotated] {
        let secret = secret_of(key);
        assert!(!contents.contains(secret), "a key secret is stored in clear");
        assert!(!contents.contains(&key[key.len() - 20..]), "a fragment of a key is stored in clear");
        // Neither is an unkeyed digest of it: what is stored is HMAC(pepper, secret).
        use sha2::Digest;
        let plain = sha2::Sha256::digest(secret.as_bytes());
        let plain_hex: String = plain.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!contents.contains(&plain_hex));
        assert!(!contents_bytes(&app).await.windows(32).any(|w| w == plain.as_slice()));
        let parsed = paygate_domain::ApiKeyText::parse(key).unwrap();
        let record = app.store.find_key_for_auth(parsed.id()).await.unwrap().unwrap();
        assert_eq!(record.secret_hash, app.hasher.hash(secret.as_bytes()), "the stored hash is the peppered HMAC");
    }
}
