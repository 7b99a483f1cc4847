//! Invariant I2: key secrets exist only as HMAC-SHA256 at rest.

use reqwest::StatusCode;
use serde_json::json as body;

use crate::backend_tests;
use crate::harness::{TestApp, json, secret_of};

backend_tests!(secrets_are_stored_only_as_hmac);

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

    // Every table and column; binary columns as their bytes, not as hex.
    let contents = app.raw_contents().await;
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
        assert!(!contents.contains_bytes(plain.as_slice()));
        let parsed = paygate_domain::ApiKeyText::parse(key).unwrap();
        let record = app.store.find_key_for_auth(parsed.id()).await.unwrap().unwrap();
        assert_eq!(record.secret_hash, app.hasher.hash(secret.as_bytes()), "the stored hash is the peppered HMAC");
    }
}
