//! Key lifecycle over the API: rotation with overlap, expiry warnings, usage,
//! client address allow-lists, key policy, emergency revocation.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json as body};

use crate::backend_tests;
use crate::harness::{Backend, TestApp, json, problem};

backend_tests!(
    revoke_all_racing_creation_and_rotation_misses_no_earlier_key,
    rotation_overlaps_then_the_old_key_expires,
    rotation_refuses_bad_states_escalation_and_foreign_keys,
    keys_near_expiry_carry_a_warning_header,
    last_use_is_recorded_without_a_write_per_request,
    allow_list_uses_the_tcp_peer_and_ignores_spoofed_forwarded_for,
    key_policy_sets_default_and_maximum_lifetimes,
    revoke_all_stops_every_key_of_one_company,
);

fn id_of(text: &str) -> String {
    paygate_domain::ApiKeyText::parse(text).unwrap().id().to_string()
}

async fn rotation_overlaps_then_the_old_key_expires(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:read,keys:manage,payments:read").await;
    let created: Value = json(
        app.post("/v1/api-keys", &admin)
            .json(
                &body!({"name": "sync", "owner": "erp", "scopes": ["payments:read"], "allowed_cidrs": ["127.0.0.0/8"]}),
            )
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let old = created["secret"].as_str().unwrap().to_owned();
    let old_id = created["id"].as_str().unwrap().to_owned();
    json(app.get("/v1/me", &old).send().await.unwrap(), StatusCode::OK).await;

    let rotated: Value = json(
        app.post(&format!("/v1/api-keys/{old_id}/rotate"), &admin)
            .json(&body!({"grace_period_seconds": 1}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(rotated["replaces"], old_id.as_str());
    assert_eq!(rotated["name"], "sync");
    assert_eq!(rotated["owner"], "erp");
    assert_eq!(rotated["scopes"], body!(["payments:read"]));
    assert_eq!(rotated["allowed_cidrs"], body!(["127.0.0.0/8"]));
    let old_view: Value =
        json(app.get(&format!("/v1/api-keys/{old_id}"), &admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(old_view["replaced_by"], rotated["id"]);

    // Both work during the grace period.
    json(app.get("/v1/me", &old).send().await.unwrap(), StatusCode::OK).await;
    json(app.get("/v1/me", &new).send().await.unwrap(), StatusCode::OK).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    problem(app.get("/v1/me", &old).send().await.unwrap(), StatusCode::UNAUTHORIZED, "api_key_expired").await;
    json(app.get("/v1/me", &new).send().await.unwrap(), StatusCode::OK).await;

    // An empty body takes the default grace period (24 h).
    let new_id = rotated["id"].as_str().unwrap();
    let again: Value =
        json(app.post(&format!("/v1/api-keys/{new_id}/rotate"), &admin).send().await.unwrap(), StatusCode::CREATED)
            .await;
    let view: Value =
        json(app.get(&format!("/v1/api-keys/{new_id}"), &admin).send().await.unwrap(), StatusCode::OK).await;
    let expires = time::OffsetDateTime::parse(
        view["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(left > time::Duration::hours(23) && left <= time::Duration::hours(24), "{left}");
    assert_eq!(again["replaces"], new_id);
}

async fn rotation_refuses_bad_states_escalation_and_foreign_keys(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let admin = app.key(acme.id, "keys:read,keys:manage").await;
    let rotate = |id: String, grace: Value| {
        app.post(&format!("/v1/api-keys/{id}/rotate"), &admin).json(&body!({"grace_period_seconds": grace}))
    };

    let revoked = id_of(&app.key(acme.id, "keys:read").await);
    json(app.post(&format!("/v1/api-keys/{revoked}/revoke"), &admin).send().await.unwrap(), StatusCode::OK).await;
    problem(rotate(revoked, body!(60)).send().await.unwrap(), StatusCode::CONFLICT, "invalid_state").await;

    let expired =
        app.key_with(acme.id, "keys:read", paygate_domain::KeyMode::Test, Some(time::Duration::seconds(1))).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    problem(rotate(id_of(&expired), body!(60)).send().await.unwrap(), StatusCode::CONFLICT, "invalid_state").await;

    let once = id_of(&app.key(acme.id, "keys:read").await);
    json(rotate(once.clone(), body!(60)).send().await.unwrap(), StatusCode::CREATED).await;
    problem(rotate(once, body!(60)).send().await.unwrap(), StatusCode::CONFLICT, "invalid_state").await;

    let broader = id_of(&app.key(acme.id, "keys:read,payments:approve").await);
    problem(rotate(broader, body!(60)).send().await.unwrap(), StatusCode::FORBIDDEN, "scope_escalation").await;

    let live = id_of(&app.key_with(acme.id, "keys:read", paygate_domain::KeyMode::Live, None).await);
    problem(rotate(live.clone(), body!(60)).send().await.unwrap(), StatusCode::FORBIDDEN, "mode_mismatch").await;
    // A test key cannot revoke a live key either: the modes are separate worlds.
    let r = app.post(&format!("/v1/api-keys/{live}/revoke"), &admin).send().await.unwrap();
    problem(r, StatusCode::FORBIDDEN, "mode_mismatch").await;

    let fine = id_of(&app.key(acme.id, "keys:read").await);
    for bad in [body!(-1), body!(604_801), body!("soon"), body!(1.5)] {
        let r = rotate(fine.clone(), bad.clone()).send().await.unwrap();
        let b = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(b["errors"][0]["pointer"], "/grace_period_seconds", "{bad}: {b}");
    }
    let r = app
        .post(&format!("/v1/api-keys/{fine}/rotate"), &admin)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_json").await;

    // Another company's key: the same 404 as a missing one; nothing written.
    let foreign = id_of(&app.key(globex.id, "keys:read").await);
    let a = problem(rotate(foreign, body!(60)).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    let b = problem(
        rotate(paygate_domain::ApiKeyId::generate().to_string(), body!(60)).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(crate::harness::without_request_id(a), crate::harness::without_request_id(b));
    let listed = app
        .store
        .list_api_keys(
            &paygate_store::operator_scope(&*app.store, globex.id, paygate_domain::KeyMode::Test),
            paygate_store::PageRequest { limit: 10, after: None },
        )
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
}

async fn keys_near_expiry_carry_a_warning_header(app: TestApp) {
    let acme = app.company("Acme").await;
    let soon =
        app.key_with(acme.id, "payments:read", paygate_domain::KeyMode::Test, Some(time::Duration::days(3))).await;
    let later = app.key_with(acme.id, "keys:read", paygate_domain::KeyMode::Test, Some(time::Duration::days(30))).await;
    let never = app.key(acme.id, "keys:read").await;
    let r = app.get("/v1/me", &soon).send().await.unwrap();
    let header = r.headers().get("paygate-key-expires").expect("warning header").to_str().unwrap().to_owned();
    let body: Value = json(r, StatusCode::OK).await;
    assert_eq!(header, body["key"]["expires_at"].as_str().unwrap());
    // On every response of that key, errors included.
    let r = app.get("/v1/api-keys", &soon).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().contains_key("paygate-key-expires"));
    for key in [&later, &never] {
        let r = app.get("/v1/me", key).send().await.unwrap();
        assert!(!r.headers().contains_key("paygate-key-expires"));
    }
}

async fn last_use_is_recorded_without_a_write_per_request(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let id = id_of(&key);
    let before: Value = json(app.get(&format!("/v1/api-keys/{id}"), &key).send().await.unwrap(), StatusCode::OK).await;
    // The first use ever may already be noted by the request above; wait for its flush.
    let mut seen = Value::Null;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v: Value = json(app.get(&format!("/v1/api-keys/{id}"), &key).send().await.unwrap(), StatusCode::OK).await;
        if !v["last_used_at"].is_null() {
            seen = v;
            break;
        }
    }
    assert!(before["last_used_at"].is_null() || before["last_used_at"] == seen["last_used_at"]);
    assert_eq!(seen["last_used_ip"], "127.0.0.1", "{seen}");
    let first = seen["last_used_at"].clone();
    // From here on the database counts every write to the key's usage columns.
    let counter = match app.backend {
        Backend::Sqlite => {
            "CREATE TABLE usage_writes (n INTEGER); \
             CREATE TRIGGER count_usage_writes AFTER UPDATE OF last_used_at, last_used_ip ON api_keys \
             BEGIN INSERT INTO usage_writes VALUES (1); END;"
        }
        Backend::Postgres => {
            "CREATE TABLE usage_writes (n integer); \
             CREATE FUNCTION count_usage_write() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN INSERT INTO usage_writes VALUES (1); RETURN NEW; END $$; \
             CREATE TRIGGER count_usage_writes AFTER UPDATE OF last_used_at, last_used_ip ON api_keys \
             FOR EACH ROW EXECUTE FUNCTION count_usage_write();"
        }
    };
    app.raw_sql(counter).await.unwrap();
    // Many more uses within the minute, past several flushes: no write at all.
    for _ in 0..20 {
        json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after: Value = json(app.get(&format!("/v1/api-keys/{id}"), &key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(after["last_used_at"], first);
    // DELETE's row count is the number of writes counted.
    assert_eq!(app.raw_sql("DELETE FROM usage_writes").await.unwrap(), 0, "usage written per request");
    // The counter is real: a use it does note (another key) is counted.
    let other = app.key(acme.id, "keys:read").await;
    json(app.get("/v1/me", &other).send().await.unwrap(), StatusCode::OK).await;
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.raw_sql("DELETE FROM usage_writes").await.unwrap() > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the counting trigger never fired");
    }
}

async fn allow_list_uses_the_tcp_peer_and_ignores_spoofed_forwarded_for(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:read,keys:manage").await;
    let create = |cidrs: Value| {
        app.post("/v1/api-keys", &admin)
            .json(&body!({"name": "n", "owner": "o", "scopes": ["keys:read"], "allowed_cidrs": cidrs}))
    };
    let elsewhere: Value =
        json(create(body!(["203.0.113.0/24", "2001:db8::/32"])).send().await.unwrap(), StatusCode::CREATED).await;
    let elsewhere = elsewhere["secret"].as_str().unwrap().to_owned();
    let local: Value = json(create(body!(["127.0.0.1"])).send().await.unwrap(), StatusCode::CREATED).await;
    assert_eq!(local["allowed_cidrs"], body!(["127.0.0.1/32"]));
    let local = local["secret"].as_str().unwrap().to_owned();

    json(app.get("/v1/me", &local).send().await.unwrap(), StatusCode::OK).await;
    problem(app.get("/v1/me", &elsewhere).send().await.unwrap(), StatusCode::FORBIDDEN, "ip_not_allowed").await;
    // This server trusts no proxy: a forged header from the peer changes nothing.
    let spoofed = app.get("/v1/me", &elsewhere).header("x-forwarded-for", "203.0.113.5").send().await.unwrap();
    problem(spoofed, StatusCode::FORBIDDEN, "ip_not_allowed").await;

    for (bad, pointer) in [
        (body!(["10.0.0.0/33"]), "/allowed_cidrs/0"),
        (body!(["localhost"]), "/allowed_cidrs/0"),
        (body!((0..33).map(|i| format!("10.0.{i}.0/24")).collect::<Vec<_>>()), "/allowed_cidrs"),
    ] {
        let b = problem(create(bad).send().await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(b["errors"][0]["pointer"], pointer, "{b}");
    }

    // Behind a trusted proxy (here: the loopback peer), the last untrusted hop counts.
    let proxied =
        TestApp::spawn_with(app.backend, &[("PAYGATE_TRUSTED_PROXIES", "127.0.0.1/32, 10.0.0.0/8")]).await.unwrap();
    let company = proxied.company("Behind a proxy").await;
    let padmin = proxied.key(company.id, "keys:read,keys:manage").await;
    let key: Value = json(
        proxied
            .post("/v1/api-keys", &padmin)
            .json(&body!({"name": "n", "owner": "o", "scopes": [], "allowed_cidrs": ["203.0.113.0/24"]}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let key = key["secret"].as_str().unwrap().to_owned();
    let via = |xff: &'static str| proxied.get("/v1/me", &key).header("x-forwarded-for", xff);
    json(via("203.0.113.5").send().await.unwrap(), StatusCode::OK).await;
    json(via("203.0.113.5, 10.1.2.3").send().await.unwrap(), StatusCode::OK).await;
    // The client may write anything on the left; the untrusted hop nearest us wins.
    problem(via("203.0.113.5, 198.51.100.1").send().await.unwrap(), StatusCode::FORBIDDEN, "ip_not_allowed").await;
    problem(proxied.get("/v1/me", &key).send().await.unwrap(), StatusCode::FORBIDDEN, "ip_not_allowed").await;
}

async fn key_policy_sets_default_and_maximum_lifetimes(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key(acme.id, "keys:read,keys:manage").await;
    let company = acme.id.to_string();
    let out = app
        .cli(&["admin", "company", "set-key-policy", &company, "--max-lifetime", "90d", "--default-lifetime", "30d"])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = app
        .cli(&["admin", "company", "set-key-policy", &company, "--max-lifetime", "7d", "--default-lifetime", "30d"])
        .await;
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("exceeds the maximum"));

    let create = |extra: Value| {
        let mut b = body!({"name": "n", "owner": "o", "scopes": ["keys:read"]});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        app.post("/v1/api-keys", &admin).json(&b)
    };
    let defaulted: Value = json(create(body!({})).send().await.unwrap(), StatusCode::CREATED).await;
    let expires = time::OffsetDateTime::parse(
        defaulted["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let lifetime = expires - time::OffsetDateTime::now_utc();
    assert!(lifetime > time::Duration::days(30) - time::Duration::minutes(1) && lifetime <= time::Duration::days(30));

    let too_long = (time::OffsetDateTime::now_utc() + time::Duration::days(91))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let b = problem(
        create(body!({"expires_at": too_long})).send().await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "lifetime_exceeds_policy",
    )
    .await;
    assert_eq!(b["errors"][0]["pointer"], "/expires_at");
    let fine = (time::OffsetDateTime::now_utc() + time::Duration::days(89))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json(create(body!({"expires_at": fine})).send().await.unwrap(), StatusCode::CREATED).await;
}

/// Emergency revocation racing key creation and rotation. A key whose creation
/// committed before revoke-all did (earlier in the company's audit chain,
/// which commits with each change) is revoked, as is one whose creation or
/// rotation had returned before revoke-all began; a key created after
/// revoke-all returned stays live; and nothing deadlocks (a hang fails).
async fn revoke_all_racing_creation_and_rotation_misses_no_earlier_key(app: TestApp) {
    use std::time::Instant;
    let acme = app.company("Race").await;
    let chain = acme.id.to_string();
    let mut earlier_in_chain = 0;
    for round in 0..6u64 {
        let admin = app.key(acme.id, "keys:read,keys:manage").await;
        let seed = id_of(&app.key(acme.id, "keys:read").await);
        let creator = {
            let (store, hasher, company) = (app.store.clone(), app.hasher.clone(), acme.id);
            tokio::spawn(async move {
                let mut created = Vec::new();
                for _ in 0..6 {
                    let request = paygate_server::admin::KeyRequest {
                        company,
                        name: "racer",
                        owner: "racer",
                        scopes: paygate_domain::ScopeSet::parse_list("keys:read").unwrap(),
                        mode: paygate_domain::KeyMode::Test,
                        expires_in: None,
                        allowed_cidrs: Default::default(),
                    };
                    let started = Instant::now();
                    let (key, _) = paygate_server::admin::create_key(&*store, &hasher, request).await.unwrap();
                    created.push((key.id.to_string(), started, Instant::now()));
                }
                created
            })
        };
        let rotation =
            app.post(&format!("/v1/api-keys/{seed}/rotate"), &admin).json(&body!({"grace_period_seconds": 0})).send();
        let rotator = async move {
            let response = rotation.await.unwrap();
            let done = Instant::now();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body["id"].as_str().map(str::to_owned), done)
        };
        let revoker = async {
            // Spread revoke-all over the creations across rounds.
            tokio::time::sleep(Duration::from_millis(2 * round)).await;
            let record = crate::harness::op("api_key.revoke_all", acme.id);
            let record_id = record.id;
            let scope = paygate_store::operator_scope(&*app.store, acme.id, paygate_domain::KeyMode::Test);
            let started = Instant::now();
            app.store.revoke_all_api_keys(&scope, paygate_domain::now(), &record).await.unwrap();
            (record_id, started, Instant::now())
        };
        let raced = tokio::time::timeout(Duration::from_secs(30), async {
            let (rotated, revoked) = tokio::join!(rotator, revoker);
            (creator.await.unwrap(), rotated, revoked)
        });
        let (created, rotated, (record_id, revoke_started, revoke_done)) =
            raced.await.unwrap_or_else(|_| panic!("round {round}: revoke-all, creation and rotation deadlocked"));

        let scope = paygate_store::operator_scope(&*app.store, acme.id, paygate_domain::KeyMode::Test);
        let keys = app.store.list_api_keys(&scope, paygate_store::PageRequest { limit: 100, after: None }).await;
        let revoked: std::collections::HashMap<String, bool> =
            keys.unwrap().items.iter().map(|k| (k.id.to_string(), k.revoked_at.is_some())).collect();
        let audit = app.store.audit_records(&chain, 0, 100_000).await.unwrap();
        let revoke_seq = audit.iter().find(|r| r.entry.id == record_id).expect("revoke-all's record").seq;
        for record in audit.iter().filter(|r| r.entry.action == "api_key.create") {
            let id = record.entry.resource_id.as_deref().unwrap();
            if record.seq < revoke_seq && created.iter().any(|(c, _, _)| c == id) {
                earlier_in_chain += 1;
                assert!(revoked[id], "round {round}: {id} committed before revoke-all and survived it");
            }
        }
        for (id, started, done) in &created {
            if *done < revoke_started {
                assert!(revoked[id], "round {round}: {id} was created before revoke-all began and survived it");
            }
            if *started > revoke_done {
                assert!(!revoked[id], "round {round}: {id} was created after revoke-all and is revoked");
            }
        }
        match rotated {
            (StatusCode::CREATED, Some(successor), done) if done < revoke_started => {
                assert!(revoked[&successor], "round {round}: a rotation done before revoke-all survived it");
            }
            (StatusCode::CREATED | StatusCode::UNAUTHORIZED | StatusCode::CONFLICT, _, _) => {}
            (other, _, _) => panic!("round {round}: rotation answered {other}"),
        }
        assert!(revoked[&seed], "round {round}: the seed key survived");
        // Revoke-all again: the next round starts with every key revoked.
        let record = crate::harness::op("api_key.revoke_all", acme.id);
        app.store.revoke_all_api_keys(&scope, paygate_domain::now(), &record).await.unwrap();
    }
    assert!(earlier_in_chain > 0, "no creation ever committed before a revoke-all: the race was never run");
}

async fn revoke_all_stops_every_key_of_one_company(app: TestApp) {
    let acme = app.company("Acme").await;
    let globex = app.company("Globex").await;
    let mut acme_keys = Vec::new();
    for _ in 0..3 {
        acme_keys.push(app.key(acme.id, "keys:read").await);
    }
    let globex_key = app.key(globex.id, "keys:read").await;
    for k in acme_keys.iter().chain([&globex_key]) {
        json(app.get("/v1/me", k).send().await.unwrap(), StatusCode::OK).await;
    }
    let out = app.cli(&["admin", "key", "revoke-all", "--company", &acme.id.to_string()]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked 3 key(s)"));
    let started = std::time::Instant::now();
    for k in &acme_keys {
        loop {
            let r = app.get("/v1/me", k).send().await.unwrap();
            if r.status() == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "revoke-all not seen within 1 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    json(app.get("/v1/me", &globex_key).send().await.unwrap(), StatusCode::OK).await;
}
