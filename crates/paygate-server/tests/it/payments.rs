//! Payees, idempotent payments, four-eyes approvals and the simulated rail,
//! over real HTTP on both databases.

use std::time::Duration;

use paygate_domain::KeyMode;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::backend_tests;
use crate::harness::{TestApp, json as body_of, problem};

backend_tests!(
    payee_fields_are_validated_with_pointers,
    account_numbers_are_only_stored_encrypted,
    fingerprints_match_within_a_company_only,
    payees_and_payments_of_another_company_do_not_exist,
    payment_fields_are_validated_and_nothing_is_written,
    idempotency_replays_refuses_reuse_and_is_per_company,
    fifty_concurrent_identical_requests_create_one_payment,
    four_eyes_rules,
    a_content_change_voids_votes,
    reject_is_final_and_cancel_follows_the_machine,
    unapproved_payments_expire,
    concurrent_approvals_reach_the_quorum_once,
    approve_and_cancel_race_to_one_end,
    every_rail_branch_settles_through_the_worker,
    settlement_survives_a_restart,
    live_payments_stop_at_approved,
    test_and_live_data_never_mix,
    approval_policy_is_validated_and_snapshotted,
    one_key_cannot_write_and_approve_by_default,
    rotating_another_principals_key_does_not_add_a_pair_of_eyes,
    a_vote_is_bound_to_the_version_reviewed,
    test_keys_cannot_change_the_live_policy,
    whoever_created_the_payee_cannot_approve_payments_to_it,
    errors_never_echo_an_account_number,
);

const IBAN: &str = "DE89370400440532013000";

struct Company {
    id: paygate_domain::CompanyId,
    /// payments:write, payees:*, payments:read, keys:manage, audit:read (owner "erp").
    initiator: String,
    /// policy:manage (owner "admin"): a writer may not also manage the policy.
    admin: String,
    /// payments:approve + payments:read, owners "alice" and "bob".
    alice: String,
    bob: String,
}

async fn company(app: &TestApp, name: &str) -> Company {
    let c = app.company(name).await;
    let scopes = "payments:write,payments:read,payees:write,payees:read,keys:manage,audit:read";
    Company {
        id: c.id,
        initiator: app.key_owned(c.id, scopes, "erp", KeyMode::Test).await,
        admin: app.key_owned(c.id, "policy:manage,audit:read", "admin", KeyMode::Test).await,
        alice: app.key_owned(c.id, "payments:approve,payments:read", "alice", KeyMode::Test).await,
        bob: app.key_owned(c.id, "payments:approve,payments:read", "bob", KeyMode::Test).await,
    }
}

async fn send(app: &TestApp, method: Method, path: &str, key: &str, body: Option<Value>) -> reqwest::Response {
    let mut request = app.request(method, path, Some(key));
    if let Some(b) = body {
        request = request.json(&b);
    }
    request.send().await.unwrap()
}

async fn payee(app: &TestApp, key: &str) -> String {
    let body = json!({"name": "Lieferant GmbH", "type": "business", "email": "ap@lieferant.test",
        "bank_account": {"scheme": "iban", "iban": IBAN, "bic": "COBADEFFXXX"}});
    let created = body_of(send(app, Method::POST, "/v1/payees", key, Some(body)).await, StatusCode::CREATED).await;
    created["id"].as_str().unwrap().to_owned()
}

fn payment_body(payee: &str, amount: u64) -> Value {
    json!({"payee_id": payee, "amount": amount, "currency": "EUR", "reference": "INV-2026-001"})
}

async fn create_payment(app: &TestApp, key: &str, idem: &str, body: Value) -> reqwest::Response {
    app.post("/v1/payments", key).header("Idempotency-Key", idem).json(&body).send().await.unwrap()
}

async fn new_payment(app: &TestApp, key: &str, payee: &str, amount: u64) -> Value {
    let idem = crate::harness::uuid_like();
    body_of(create_payment(app, key, &idem, payment_body(payee, amount)).await, StatusCode::CREATED).await
}

async fn get_payment(app: &TestApp, key: &str, id: &str) -> Value {
    body_of(app.get(&format!("/v1/payments/{id}"), key).send().await.unwrap(), StatusCode::OK).await
}

/// The demo policy: one approval from 1,000.00, two from 1,000,000.00 EUR.
async fn demo_policy(app: &TestApp, key: &str) {
    let body = json!({"rules": {"EUR": {"one_approval_from": 100000, "two_approvals_from": 100000000}}});
    body_of(send(app, Method::PUT, "/v1/approval-policy", key, Some(body)).await, StatusCode::OK).await;
}

async fn wait_for_status(app: &TestApp, key: &str, id: &str, status: &str) -> Value {
    for _ in 0..200 {
        let p = get_payment(app, key, id).await;
        if p["status"] == status {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("payment {id} never reached {status}: {}", get_payment(app, key, id).await);
}

fn history(p: &Value) -> Vec<String> {
    p["status_history"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap().to_owned()).collect()
}

fn pointers(problem: &Value) -> Vec<String> {
    problem["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap().to_owned()).collect()
}

async fn payee_fields_are_validated_with_pointers(app: TestApp) {
    let c = company(&app, "Acme").await;
    let cases = [
        (json!({"name": "", "type": "business", "bank_account": {"scheme": "iban", "iban": IBAN}}), "/name"),
        (json!({"name": "X", "type": "robot", "bank_account": {"scheme": "iban", "iban": IBAN}}), "/type"),
        (
            json!({"name": "X", "type": "business", "email": "not-an-email", "bank_account": {"scheme": "iban", "iban": IBAN}}),
            "/email",
        ),
        (
            json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": "DE89370400440532013001"}}),
            "/bank_account/iban",
        ),
        (
            json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": "DE8937040044053201300"}}),
            "/bank_account/iban",
        ),
        (
            json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": IBAN, "bic": "12"}}),
            "/bank_account/bic",
        ),
        (json!({"name": "X", "type": "business", "bank_account": {"scheme": "swift"}}), "/bank_account/scheme"),
        (
            json!({"name": "X", "type": "individual", "bank_account": {"scheme": "us_ach", "routing_number": "021000022", "account_number": "123456789", "account_type": "checking"}}),
            "/bank_account/routing_number",
        ),
        (
            json!({"name": "X", "type": "individual", "bank_account": {"scheme": "us_ach", "routing_number": "021000021", "account_number": "12", "account_type": "checking"}}),
            "/bank_account/account_number",
        ),
        (
            json!({"name": "X", "type": "individual", "bank_account": {"scheme": "us_ach", "routing_number": "021000021", "account_number": "1234", "account_type": "brokerage"}}),
            "/bank_account/account_type",
        ),
        (
            json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": IBAN}, "metadata": {"k": 1}}),
            "/metadata/k",
        ),
    ];
    for (body, pointer) in cases {
        let response = send(&app, Method::POST, "/v1/payees", &c.initiator, Some(body.clone())).await;
        let p = problem(response, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(pointers(&p).contains(&pointer.to_owned()), "{body}: {p}");
    }
    let too_many: serde_json::Map<_, _> = (0..21).map(|i| (format!("k{i}"), json!("v"))).collect();
    let response = send(&app, Method::POST, "/v1/payees", &c.initiator,
        Some(json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": IBAN}, "metadata": too_many}))).await;
    problem(response, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    // Nothing was written by any refused request.
    let list = body_of(app.get("/v1/payees", &c.initiator).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list["data"], json!([]));
    // A valid ACH payee shows routing number, type, last4 and fingerprint only.
    let ach = json!({"name": "Supplier Inc", "type": "business", "bank_account": {"scheme": "us_ach",
        "routing_number": "021000021", "account_number": "000123456789", "account_type": "checking"}});
    let created =
        body_of(send(&app, Method::POST, "/v1/payees", &c.initiator, Some(ach)).await, StatusCode::CREATED).await;
    assert_eq!(created["bank_account"]["last4"], "6789");
    assert_eq!(created["bank_account"]["routing_number"], "021000021");
    assert!(!created.to_string().contains("000123456789"));
    assert_eq!(created["status"], "active");
    assert_eq!(created["livemode"], false);
    // Lowercase IBAN with spaces is normalised.
    let spaced = json!({"name": "Y", "type": "business", "bank_account": {"scheme": "iban", "iban": "de89 3704 0044 0532 0130 00"}});
    let created =
        body_of(send(&app, Method::POST, "/v1/payees", &c.initiator, Some(spaced)).await, StatusCode::CREATED).await;
    assert_eq!(created["bank_account"]["country"], "DE");
    assert_eq!(created["bank_account"]["last4"], "3000");
    // Missing scope.
    let response = send(&app, Method::POST, "/v1/payees", &c.alice, Some(json!({}))).await;
    problem(response, StatusCode::FORBIDDEN, "insufficient_scope").await;
}

async fn account_numbers_are_only_stored_encrypted(app: TestApp) {
    let c = company(&app, "Acme").await;
    let id = payee(&app, &c.initiator).await;
    let ach = json!({"name": "Supplier Inc", "type": "business", "bank_account": {"scheme": "us_ach",
        "routing_number": "021000021", "account_number": "998877665544", "account_type": "savings"}});
    body_of(send(&app, Method::POST, "/v1/payees", &c.initiator, Some(ach)).await, StatusCode::CREATED).await;
    let read = body_of(app.get(&format!("/v1/payees/{id}"), &c.initiator).send().await.unwrap(), StatusCode::OK).await;
    assert!(!read.to_string().contains(IBAN));
    // Every table and column, binary columns as their bytes: a number leaking
    // into events, webhook rows or a blob would be found.
    let raw = app.raw_contents().await;
    for table in ["payees", "payments", "events", "webhook_deliveries", "audit_events", "idempotency_keys"] {
        assert!(raw.has_table(table), "{table} scanned");
    }
    assert!(raw.contains("Lieferant GmbH"), "the dump is real");
    assert!(!raw.contains(IBAN), "IBAN in clear in the database");
    assert!(!raw.contains("370400440532013000"), "BBAN in clear in the database");
    assert!(!raw.contains("998877665544"), "ACH account number in clear in the database");
}

async fn fingerprints_match_within_a_company_only(app: TestApp) {
    let a = company(&app, "A").await;
    let b = company(&app, "B").await;
    let a1 = fingerprint(&app, &a.initiator).await;
    let a2 = fingerprint(&app, &a.initiator).await;
    let b1 = fingerprint(&app, &b.initiator).await;
    assert_eq!(a1, a2);
    assert_ne!(a1, b1);
    assert!(a1.starts_with("fp_"));
}

async fn fingerprint(app: &TestApp, key: &str) -> String {
    let id = payee(app, key).await;
    let p = body_of(app.get(&format!("/v1/payees/{id}"), key).send().await.unwrap(), StatusCode::OK).await;
    p["bank_account"]["fingerprint"].as_str().unwrap().to_owned()
}

async fn payees_and_payments_of_another_company_do_not_exist(app: TestApp) {
    let a = company(&app, "A").await;
    let b = company(&app, "B").await;
    let a_payee = payee(&app, &a.initiator).await;
    let a_payment = new_payment(&app, &a.initiator, &a_payee, 500).await;
    let a_payment_id = a_payment["id"].as_str().unwrap();
    let missing_payee = paygate_domain::PayeeId::generate().to_string();
    let missing_payment = paygate_domain::PaymentId::generate().to_string();
    for (theirs, missing) in [
        (format!("/v1/payees/{a_payee}"), format!("/v1/payees/{missing_payee}")),
        (format!("/v1/payments/{a_payment_id}"), format!("/v1/payments/{missing_payment}")),
    ] {
        let r1 =
            problem(app.get(&theirs, &b.initiator).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
        let r2 =
            problem(app.get(&missing, &b.initiator).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
        assert_eq!(crate::harness::without_request_id(r1), crate::harness::without_request_id(r2));
    }
    for path in [format!("/v1/payees/{a_payee}/disable"), format!("/v1/payments/{a_payment_id}/cancel")] {
        problem(send(&app, Method::POST, &path, &b.initiator, None).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    for path in [format!("/v1/payments/{a_payment_id}/approve")] {
        problem(send(&app, Method::POST, &path, &b.alice, None).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    // B cannot pay A's payee: it does not exist for B.
    let p = problem(
        create_payment(&app, &b.initiator, "k1", payment_body(&a_payee, 500)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(pointers(&p), ["/payee_id"]);
    for list in ["/v1/payees", "/v1/payments"] {
        let l = body_of(app.get(list, &b.initiator).send().await.unwrap(), StatusCode::OK).await;
        assert_eq!(l["data"], json!([]), "{list}");
    }
    // A's payment is untouched.
    assert_eq!(get_payment(&app, &a.initiator, a_payment_id).await["status"], a_payment["status"]);
}

async fn payment_fields_are_validated_and_nothing_is_written(app: TestApp) {
    let c = company(&app, "Acme").await;
    let payee_id = payee(&app, &c.initiator).await;
    let base = payment_body(&payee_id, 1000);
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("amount", json!(0)), "/amount"),
        (with("amount", json!(-5)), "/amount"),
        (with("amount", json!(10.5)), "/amount"),
        (with("amount", json!("1000")), "/amount"),
        (with("amount", json!(9007199254740992u64)), "/amount"),
        (with("currency", json!("eur")), "/currency"),
        (with("currency", json!("XAU")), "/currency"),
        (with("currency", json!("ZZZ")), "/currency"),
        (with("reference", json!("")), "/reference"),
        (with("reference", json!("x".repeat(141))), "/reference"),
        (with("payee_id", json!("pye_nope")), "/payee_id"),
        (with("requested_execution_date", json!("2020-01-01")), "/requested_execution_date"),
        (with("requested_execution_date", json!("01/02/2027")), "/requested_execution_date"),
        (with("metadata", json!({"k": "v".repeat(501)})), "/metadata/k"),
    ];
    for (i, (body, pointer)) in cases.into_iter().enumerate() {
        let response = create_payment(&app, &c.initiator, &format!("bad-{i}"), body.clone()).await;
        let p = problem(response, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(pointers(&p).contains(&pointer.to_owned()), "{body}: {p}");
    }
    // JPY has no minor unit, KWD three: both integer amounts are fine.
    for currency in ["JPY", "KWD"] {
        let mut b = base.clone();
        b["currency"] = json!(currency);
        body_of(create_payment(&app, &c.initiator, &format!("ok-{currency}"), b).await, StatusCode::CREATED).await;
    }
    let missing = app.post("/v1/payments", &c.initiator).json(&base).send().await.unwrap();
    problem(missing, StatusCode::BAD_REQUEST, "idempotency_key_missing").await;
    let bad_key = create_payment(&app, &c.initiator, &"x".repeat(256), base.clone()).await;
    problem(bad_key, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;
    let not_json = app
        .post("/v1/payments", &c.initiator)
        .header("Idempotency-Key", "nj")
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    problem(not_json, StatusCode::BAD_REQUEST, "invalid_json").await;
    // A disabled payee refuses new payments.
    body_of(
        send(&app, Method::POST, &format!("/v1/payees/{payee_id}/disable"), &c.initiator, None).await,
        StatusCode::OK,
    )
    .await;
    let again = body_of(
        send(&app, Method::POST, &format!("/v1/payees/{payee_id}/disable"), &c.initiator, None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(again["status"], "disabled");
    problem(
        create_payment(&app, &c.initiator, "to-disabled", base.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "payee_disabled",
    )
    .await;
    let list = body_of(app.get("/v1/payments", &c.initiator).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "only the JPY and KWD payments exist");
    // A refused key can be used again once the request is valid (nothing was stored under it).
    let other_payee = payee(&app, &c.initiator).await;
    body_of(create_payment(&app, &c.initiator, "bad-0", payment_body(&other_payee, 1000)).await, StatusCode::CREATED)
        .await;
}

async fn idempotency_replays_refuses_reuse_and_is_per_company(app: TestApp) {
    let a = company(&app, "A").await;
    let b = company(&app, "B").await;
    let pa = payee(&app, &a.initiator).await;
    let pb = payee(&app, &b.initiator).await;
    let first = create_payment(&app, &a.initiator, "order-42", payment_body(&pa, 1500)).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    // Same key, same body (keys in another order): the first response, replayed.
    let reordered = json!({"reference": "INV-2026-001", "currency": "EUR", "amount": 1500, "payee_id": pa});
    let replay = create_payment(&app, &a.initiator, "order-42", reordered).await;
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.unwrap();
    assert_eq!(replayed, first);
    // Same key, other body.
    let reused = create_payment(&app, &a.initiator, "order-42", payment_body(&pa, 1501)).await;
    problem(reused, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;
    // Another company's identical key is its own.
    let other =
        body_of(create_payment(&app, &b.initiator, "order-42", payment_body(&pb, 1500)).await, StatusCode::CREATED)
            .await;
    assert_ne!(other["id"], first["id"]);
    let list = body_of(app.get("/v1/payments", &a.initiator).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    // Every creation and replay left an audit record.
    let audit =
        body_of(app.get("/v1/audit-events?action=payment.create", &a.initiator).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 3, "{audit}");
}

async fn fifty_concurrent_identical_requests_create_one_payment(app: TestApp) {
    let c = company(&app, "Acme").await;
    let payee_id = payee(&app, &c.initiator).await;
    let body = payment_body(&payee_id, 2500);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (http, url, key, body) =
            (app.http.clone(), format!("{}/v1/payments", app.base), c.initiator.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r =
                http.post(url).bearer_auth(key).header("Idempotency-Key", "race-1").json(&body).send().await.unwrap();
            let status = r.status();
            let value: Value = r.json().await.unwrap();
            (status, value)
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for t in tasks {
        let (status, value) = t.await.unwrap();
        match status {
            StatusCode::CREATED => {
                created += 1;
                ids.insert(value["id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => assert_eq!(value["code"], "idempotency_key_in_use"),
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(value["code"], "concurrency_limited"),
            other => panic!("unexpected {other}: {value}"),
        }
    }
    assert!(created >= 1);
    assert_eq!(ids.len(), 1, "every success names the same payment");
    let list = body_of(app.get("/v1/payments", &c.initiator).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "exactly one payment");
}

async fn four_eyes_rules(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 200_000_000).await;
    let id = p["id"].as_str().unwrap();
    assert_eq!(p["status"], "pending_approval");
    assert_eq!(p["approvals"]["required"], 2);
    let approve = |key: String| {
        let path = format!("/v1/payments/{id}/approve");
        let app = &app;
        async move { send(app, Method::POST, &path, &key, None).await }
    };
    // The initiator lacks the scope; a key of the same owner, and a key the
    // initiator minted through the API (same principal, other owner), are the same eyes.
    problem(approve(c.initiator.clone()).await, StatusCode::FORBIDDEN, "insufficient_scope").await;
    let same_owner = app.key_owned(c.id, "payments:approve", "erp", KeyMode::Test).await;
    problem(approve(same_owner).await, StatusCode::FORBIDDEN, "approver_is_initiator").await;
    let minter = app.key_owned(c.id, "keys:manage,payments:approve", "erp-admin", KeyMode::Test).await;
    let minted = body_of(
        send(
            &app,
            Method::POST,
            "/v1/api-keys",
            &minter,
            Some(json!({"name": "m", "owner": "mallory", "scopes": ["payments:approve"]})),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let p2 = new_payment(&app, &c.initiator, &payee_id, 150_000).await;
    // The minter's principal did not create p2, so its minted key may approve it…
    let ok = send(
        &app,
        Method::POST,
        &format!("/v1/payments/{}/approve", p2["id"].as_str().unwrap()),
        minted["secret"].as_str().unwrap(),
        None,
    )
    .await;
    assert_eq!(body_of(ok, StatusCode::OK).await["status"], "approved");
    // Distinct owners: one vote each; the second owner completes the quorum.
    let after_alice = body_of(approve(c.alice.clone()).await, StatusCode::OK).await;
    assert_eq!(after_alice["status"], "pending_approval");
    assert_eq!(after_alice["approvals"]["received"], 1);
    let alice_again = app.key_owned(c.id, "payments:approve", "alice", KeyMode::Test).await;
    problem(approve(alice_again).await, StatusCode::CONFLICT, "already_approved").await;
    let approved = body_of(approve(c.bob.clone()).await, StatusCode::OK).await;
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["approvals"]["received"], 2);
    let carol = app.key_owned(c.id, "payments:approve", "carol", KeyMode::Test).await;
    problem(approve(carol).await, StatusCode::CONFLICT, "invalid_state").await;
    // Below the first threshold: approved automatically.
    let small = new_payment(&app, &c.initiator, &payee_id, 99_999).await;
    assert_eq!(small["status"], "approved");
    assert_eq!(small["approvals"]["required"], 0);
    // The votes are in the audit log.
    let audit =
        body_of(app.get("/v1/audit-events?action=payment.approve", &c.initiator).send().await.unwrap(), StatusCode::OK)
            .await;
    assert!(audit["data"].as_array().unwrap().len() >= 3, "{audit}");
}

async fn a_content_change_voids_votes(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 200_000_000).await;
    let id = p["id"].as_str().unwrap();
    body_of(send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, None).await, StatusCode::OK)
        .await;
    let editor = app.key_owned(c.id, "payments:write,payments:read", "dave", KeyMode::Test).await;
    let patched = body_of(
        send(&app, Method::PATCH, &format!("/v1/payments/{id}"), &editor, Some(json!({"amount": 300_000_000}))).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(patched["amount"], 300_000_000);
    assert_eq!(patched["approvals"]["received"], 0, "alice's vote was for other content");
    assert_ne!(patched["approvals"]["content_hash"], p["approvals"]["content_hash"]);
    assert_eq!(patched["version"], p["version"].as_u64().unwrap() + 1);
    // The editor (owner dave) joined the initiators.
    let dave_approver = app.key_owned(c.id, "payments:approve", "dave", KeyMode::Test).await;
    problem(
        send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &dave_approver, None).await,
        StatusCode::FORBIDDEN,
        "approver_is_initiator",
    )
    .await;
    body_of(send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.bob, None).await, StatusCode::OK).await;
    let done =
        body_of(send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, None).await, StatusCode::OK)
            .await;
    assert_eq!(done["status"], "approved");
    // No changes once approved; bad edits are 422.
    problem(
        send(&app, Method::PATCH, &format!("/v1/payments/{id}"), &editor, Some(json!({"reference": "x"}))).await,
        StatusCode::CONFLICT,
        "invalid_state",
    )
    .await;
    problem(
        send(&app, Method::PATCH, &format!("/v1/payments/{id}"), &editor, Some(json!({"amount": 0}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
}

async fn reject_is_final_and_cancel_follows_the_machine(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 500_000).await;
    let id = p["id"].as_str().unwrap();
    problem(
        send(&app, Method::POST, &format!("/v1/payments/{id}/reject"), &c.alice, Some(json!({"reason": ""}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    let rejected = body_of(
        send(
            &app,
            Method::POST,
            &format!("/v1/payments/{id}/reject"),
            &c.alice,
            Some(json!({"reason": "wrong invoice"})),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["status_history"][1]["reason"], "wrong invoice");
    problem(
        send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.bob, None).await,
        StatusCode::CONFLICT,
        "invalid_state",
    )
    .await;
    problem(
        send(&app, Method::POST, &format!("/v1/payments/{id}/cancel"), &c.initiator, None).await,
        StatusCode::CONFLICT,
        "invalid_state",
    )
    .await;
    // Cancel from pending and from approved; not twice.
    let q = new_payment(&app, &c.initiator, &payee_id, 500_000).await;
    let qid = q["id"].as_str().unwrap();
    let canceled = body_of(
        send(&app, Method::POST, &format!("/v1/payments/{qid}/cancel"), &c.initiator, None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(history(&canceled), ["pending_approval", "canceled"]);
    problem(
        send(&app, Method::POST, &format!("/v1/payments/{qid}/cancel"), &c.initiator, None).await,
        StatusCode::CONFLICT,
        "invalid_state",
    )
    .await;
    let filtered =
        body_of(app.get("/v1/payments?status=canceled", &c.initiator).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);
    problem(
        app.get("/v1/payments?status=nope", &c.initiator).send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    )
    .await;
    problem(
        app.get("/v1/payments?created_from=yesterday", &c.initiator).send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
    )
    .await;
    let by_payee = body_of(
        app.get(&format!("/v1/payments?payee_id={payee_id}&limit=1"), &c.initiator).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(by_payee["data"].as_array().unwrap().len(), 1);
    assert_eq!(by_payee["has_more"], true);
}

async fn unapproved_payments_expire(app: TestApp) {
    let c = company(&app, "Acme").await;
    let body = json!({"rules": {}, "approval_ttl_seconds": 1});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(body)).await, StatusCode::OK).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 100).await;
    let id = p["id"].as_str().unwrap();
    assert_eq!(p["status"], "pending_approval", "a currency without a rule needs one approval");
    let expired = wait_for_status(&app, &c.initiator, id, "expired").await;
    assert_eq!(expired["status_history"][1]["actor_type"], "system");
    let r = send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, None).await;
    problem(r, StatusCode::CONFLICT, "invalid_state").await;
}

async fn concurrent_approvals_reach_the_quorum_once(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    let payee_id = payee(&app, &c.initiator).await;
    for _ in 0..5 {
        let p = new_payment(&app, &c.initiator, &payee_id, 200_000_000).await;
        let id = p["id"].as_str().unwrap().to_owned();
        let path = format!("/v1/payments/{id}/approve");
        let (a, b) = tokio::join!(
            send(&app, Method::POST, &path, &c.alice, None),
            send(&app, Method::POST, &path, &c.bob, None)
        );
        assert_eq!(a.status(), StatusCode::OK);
        assert_eq!(b.status(), StatusCode::OK);
        let p = get_payment(&app, &c.initiator, &id).await;
        assert_eq!(p["approvals"]["received"], 2);
        let approvals = history(&p).iter().filter(|s| *s == "approved").count();
        assert_eq!(approvals, 1, "approved exactly once: {p}");
    }
}

async fn approve_and_cancel_race_to_one_end(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    // Slow rail: the approved payment stays approved long enough to be canceled.
    let payee_id = payee(&app, &c.initiator).await;
    for _ in 0..6 {
        let p = new_payment(&app, &c.initiator, &payee_id, 150_000).await;
        let id = p["id"].as_str().unwrap().to_owned();
        let (approve_path, cancel_path) = (format!("/v1/payments/{id}/approve"), format!("/v1/payments/{id}/cancel"));
        let (approve, cancel) = tokio::join!(
            send(&app, Method::POST, &approve_path, &c.alice, None),
            send(&app, Method::POST, &cancel_path, &c.initiator, None)
        );
        let (sa, sc) = (approve.status(), cancel.status());
        let p = get_payment(&app, &c.initiator, &id).await;
        let h = history(&p);
        match (sa, sc) {
            // Approved first, then canceled (allowed before settlement), or
            // approved and already settling when the cancel came.
            (StatusCode::OK, StatusCode::OK) => assert_eq!(h, ["pending_approval", "approved", "canceled"]),
            (StatusCode::OK, StatusCode::CONFLICT) => assert_eq!(&h[..2], ["pending_approval", "approved"]),
            (StatusCode::CONFLICT, StatusCode::OK) => assert_eq!(h, ["pending_approval", "canceled"]),
            other => panic!("inconsistent outcome {other:?}: {p}"),
        }
    }
}

async fn every_rail_branch_settles_through_the_worker(app: TestApp) {
    let c = company(&app, "Acme").await;
    let body = json!({"rules": {"EUR": {"one_approval_from": 100000}}});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(body)).await, StatusCode::OK).await;
    let payee_id = payee(&app, &c.initiator).await;
    let ok = new_payment(&app, &c.initiator, &payee_id, 5000).await;
    let fail = new_payment(&app, &c.initiator, &payee_id, 5013).await;
    let invalid = new_payment(&app, &c.initiator, &payee_id, 5021).await;
    let ret = new_payment(&app, &c.initiator, &payee_id, 5066).await;
    let done = wait_for_status(&app, &c.initiator, ok["id"].as_str().unwrap(), "completed").await;
    assert_eq!(history(&done), ["pending_approval", "approved", "processing", "completed"]);
    assert_eq!(done["status_history"][2]["actor_id"], "rail:simulated");
    let failed = wait_for_status(&app, &c.initiator, fail["id"].as_str().unwrap(), "failed").await;
    assert_eq!(failed["failure_reason"], "insufficient_funds");
    let failed = wait_for_status(&app, &c.initiator, invalid["id"].as_str().unwrap(), "failed").await;
    assert_eq!(failed["failure_reason"], "invalid_account");
    let returned = wait_for_status(&app, &c.initiator, ret["id"].as_str().unwrap(), "returned").await;
    assert_eq!(history(&returned), ["pending_approval", "approved", "processing", "completed", "returned"]);
    assert_eq!(returned["failure_reason"], "account_closed");
    // An approved-by-hand payment settles too; completed payments stay completed.
    let big = new_payment(&app, &c.initiator, &payee_id, 250_000).await;
    body_of(
        send(&app, Method::POST, &format!("/v1/payments/{}/approve", big["id"].as_str().unwrap()), &c.alice, None)
            .await,
        StatusCode::OK,
    )
    .await;
    wait_for_status(&app, &c.initiator, big["id"].as_str().unwrap(), "completed").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let still = get_payment(&app, &c.initiator, ok["id"].as_str().unwrap()).await;
    assert_eq!(history(&still).len(), 4, "no step is taken twice");
    problem(
        send(&app, Method::POST, &format!("/v1/payments/{}/cancel", ok["id"].as_str().unwrap()), &c.initiator, None)
            .await,
        StatusCode::CONFLICT,
        "invalid_state",
    )
    .await;
    // The worker's steps are in the company's audit chain.
    let audit =
        body_of(app.get("/v1/audit-events?action=payment.settle", &c.initiator).send().await.unwrap(), StatusCode::OK)
            .await;
    assert!(audit["data"].as_array().unwrap().len() >= 10, "{audit}");
}

async fn settlement_survives_a_restart(mut app: TestApp) {
    let c = company(&app, "Acme").await;
    let body = json!({"rules": {"EUR": {"one_approval_from": 100000}}});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(body)).await, StatusCode::OK).await;
    let payee_id = payee(&app, &c.initiator).await;
    let mut ids = Vec::new();
    for amount in [7000, 7013, 7066] {
        ids.push(new_payment(&app, &c.initiator, &payee_id, amount).await["id"].as_str().unwrap().to_owned());
    }
    // Stop before (or while) the worker acts; a new node picks the work up from the database.
    app.restart().await;
    for (id, end) in ids.iter().zip(["completed", "failed", "returned"]) {
        let p = wait_for_status(&app, &c.initiator, id, end).await;
        let h = history(&p);
        let mut dedup = h.clone();
        dedup.dedup();
        assert_eq!(h, dedup, "no status recorded twice: {h:?}");
    }
}

async fn live_payments_stop_at_approved(app: TestApp) {
    let acme = app.company("Acme").await;
    let live =
        app.key_owned(acme.id, "payments:write,payments:read,payees:write,payees:read", "erp", KeyMode::Live).await;
    let scope = paygate_store::operator_scope(&*app.store, acme.id, KeyMode::Live);
    let policy = paygate_domain::payment::ApprovalPolicy::demo();
    app.store
        .set_approval_policy(&scope, &policy, &crate::harness::op("approval_policy.update", acme.id))
        .await
        .unwrap();
    let payee_id = payee(&app, &live).await;
    let p = new_payment(&app, &live, &payee_id, 1000).await;
    assert_eq!(p["livemode"], true);
    assert_eq!(p["status"], "approved");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = get_payment(&app, &live, p["id"].as_str().unwrap()).await;
    assert_eq!(after["status"], "approved", "no fake settlement of live payments");
}

async fn test_and_live_data_never_mix(app: TestApp) {
    let c = company(&app, "Acme").await;
    let live = app.key_owned(c.id, "payments:read,payees:read", "erp", KeyMode::Live).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 1000).await;
    problem(
        app.get(&format!("/v1/payees/{payee_id}"), &live).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        app.get(&format!("/v1/payments/{}", p["id"].as_str().unwrap()), &live).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let list = body_of(app.get("/v1/payments", &live).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list["data"], json!([]));
}

async fn approval_policy_is_validated_and_snapshotted(app: TestApp) {
    let a = company(&app, "A").await;
    let b = company(&app, "B").await;
    let bad = [
        (json!({"rules": {"eur": {"one_approval_from": 1}}}), "/rules/eur"),
        (json!({"rules": {"EUR": {"one_approval_from": -1}}}), "/rules/EUR/one_approval_from"),
        (
            json!({"rules": {"EUR": {"one_approval_from": 100, "two_approvals_from": 50}}}),
            "/rules/EUR/two_approvals_from",
        ),
        (json!({"rules": {"EUR": {}}}), "/rules/EUR/one_approval_from"),
        (json!({"rules": {"EUR": {"one_approval_from": 1, "three": 2}}}), "/rules/EUR/three"),
        (json!({"rules": {}, "approval_ttl_seconds": 0}), "/approval_ttl_seconds"),
        (json!({"rules": {}, "approval_ttl_seconds": 2592001}), "/approval_ttl_seconds"),
    ];
    for (body, pointer) in bad {
        let p = problem(
            send(&app, Method::PUT, "/v1/approval-policy", &a.admin, Some(body.clone())).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
        assert!(pointers(&p).contains(&pointer.to_owned()), "{body}: {p}");
    }
    problem(
        send(&app, Method::PUT, "/v1/approval-policy", &a.alice, Some(json!({"rules": {}}))).await,
        StatusCode::FORBIDDEN,
        "insufficient_scope",
    )
    .await;
    let default = body_of(app.get("/v1/approval-policy", &a.admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(default["approval_ttl_seconds"], 259200);
    assert_eq!(default["allow_write_and_approve_keys"], false);
    // A payment keeps the rule it was created under.
    demo_policy(&app, &a.admin).await;
    let payee_id = payee(&app, &a.initiator).await;
    let p = new_payment(&app, &a.initiator, &payee_id, 150_000).await;
    assert_eq!(p["approvals"]["required"], 1);
    let stricter = json!({"rules": {"EUR": {"one_approval_from": 0, "two_approvals_from": 0}}});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &a.admin, Some(stricter)).await, StatusCode::OK).await;
    let approved = body_of(
        send(&app, Method::POST, &format!("/v1/payments/{}/approve", p["id"].as_str().unwrap()), &a.alice, None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(approved["status"], "approved", "one approval, as when it was created");
    assert_eq!(new_payment(&app, &a.initiator, &payee_id, 1).await["approvals"]["required"], 2);
    // B's policy is its own.
    let b_policy = body_of(app.get("/v1/approval-policy", &b.admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(b_policy["rules"], json!({}));
    let audit = body_of(
        app.get("/v1/audit-events?action=approval_policy.update&outcome=success", &a.initiator).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 2, "{audit}");
}

async fn one_key_cannot_write_and_approve_by_default(app: TestApp) {
    let c = company(&app, "Acme").await;
    // The harness allows combined keys to issue this one; then the policy forbids them again.
    let manager = app.key(c.id, "keys:manage,payments:write,payments:approve").await;
    let forbid = json!({"rules": {}, "allow_write_and_approve_keys": false});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(forbid)).await, StatusCode::OK).await;
    let body = json!({"name": "both", "owner": "x", "scopes": ["payments:write", "payments:approve"]});
    let p = problem(
        send(&app, Method::POST, "/v1/api-keys", &manager, Some(body.clone())).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "conflicting_scopes",
    )
    .await;
    assert_eq!(pointers(&p), ["/scopes"]);
    let allow = json!({"rules": {}, "allow_write_and_approve_keys": true});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(allow)).await, StatusCode::OK).await;
    let both = body_of(send(&app, Method::POST, "/v1/api-keys", &manager, Some(body)).await, StatusCode::CREATED).await;
    // Even then, the same key cannot approve what it created.
    let key = both["secret"].as_str().unwrap();
    let payee_id = payee(&app, &c.initiator).await;
    let mine = new_payment(&app, key, &payee_id, 100).await;
    let r =
        send(&app, Method::POST, &format!("/v1/payments/{}/approve", mine["id"].as_str().unwrap()), key, None).await;
    problem(r, StatusCode::FORBIDDEN, "approver_is_initiator").await;
    // Nor can two keys minted from one credential with different owners: one principal, one pair of eyes.
    let mint = |owner: &str, scope: &str| json!({"name": "m", "owner": owner, "scopes": [scope]});
    let writer = body_of(
        send(&app, Method::POST, "/v1/api-keys", &manager, Some(mint("system-w", "payments:write"))).await,
        StatusCode::CREATED,
    )
    .await;
    let approver = body_of(
        send(&app, Method::POST, "/v1/api-keys", &manager, Some(mint("person-a", "payments:approve"))).await,
        StatusCode::CREATED,
    )
    .await;
    let theirs = new_payment(&app, writer["secret"].as_str().unwrap(), &payee_id, 100).await;
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/payments/{}/approve", theirs["id"].as_str().unwrap()),
        approver["secret"].as_str().unwrap(),
        None,
    )
    .await;
    problem(r, StatusCode::FORBIDDEN, "approver_is_initiator").await;
    // A key of another principal may.
    let ok =
        send(&app, Method::POST, &format!("/v1/payments/{}/approve", theirs["id"].as_str().unwrap()), &c.alice, None)
            .await;
    assert_eq!(body_of(ok, StatusCode::OK).await["status"], "approved");
}

async fn rotating_another_principals_key_does_not_add_a_pair_of_eyes(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 200_000_000).await;
    let id = p["id"].as_str().unwrap();
    let mallory =
        app.key_owned(c.id, "keys:manage,keys:read,payments:approve,payments:read", "mallory", KeyMode::Test).await;
    body_of(send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &mallory, None).await, StatusCode::OK)
        .await;
    // Mallory rotates Alice's approver key and receives its successor's secret.
    let keys = body_of(app.get("/v1/api-keys?limit=100", &mallory).send().await.unwrap(), StatusCode::OK).await;
    let alice_key = keys["data"].as_array().unwrap().iter().find(|k| k["owner"] == "alice").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rotated = body_of(
        send(&app, Method::POST, &format!("/v1/api-keys/{alice_key}/rotate"), &mallory, None).await,
        StatusCode::CREATED,
    )
    .await;
    let successor = rotated["secret"].as_str().unwrap();
    let second = send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), successor, None).await;
    assert!(second.status() == StatusCode::FORBIDDEN || second.status() == StatusCode::CONFLICT, "{}", second.status());
    assert_eq!(get_payment(&app, &c.initiator, id).await["status"], "pending_approval", "one credential, one vote");
    // Alice herself (her old key, in its grace period) is still another pair of eyes.
    let done =
        body_of(send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, None).await, StatusCode::OK)
            .await;
    assert_eq!(done["status"], "approved");
}

async fn a_vote_is_bound_to_the_version_reviewed(app: TestApp) {
    let c = company(&app, "Acme").await;
    demo_policy(&app, &c.admin).await;
    let payee_id = payee(&app, &c.initiator).await;
    let p = new_payment(&app, &c.initiator, &payee_id, 100_000).await;
    let id = p["id"].as_str().unwrap();
    let seen = p["version"].as_u64().unwrap();
    // The initiator changes the amount after Alice looked at it.
    body_of(
        send(&app, Method::PATCH, &format!("/v1/payments/{id}"), &c.initiator, Some(json!({"amount": 99_999_999})))
            .await,
        StatusCode::OK,
    )
    .await;
    let stale =
        send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, Some(json!({"version": seen}))).await;
    problem(stale, StatusCode::CONFLICT, "payment_changed").await;
    let stale = send(
        &app,
        Method::POST,
        &format!("/v1/payments/{id}/reject"),
        &c.alice,
        Some(json!({"reason": "no", "version": seen})),
    )
    .await;
    problem(stale, StatusCode::CONFLICT, "payment_changed").await;
    assert_eq!(get_payment(&app, &c.initiator, id).await["status"], "pending_approval");
    let ok =
        send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, Some(json!({"version": seen + 1})))
            .await;
    assert_eq!(body_of(ok, StatusCode::OK).await["status"], "approved");
    let bad =
        send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.bob, Some(json!({"version": "x"}))).await;
    problem(bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}

async fn test_keys_cannot_change_the_live_policy(app: TestApp) {
    let c = company(&app, "Acme").await;
    let live_admin = app.key_owned(c.id, "policy:manage", "admin", KeyMode::Live).await;
    let loose = json!({"rules": {"EUR": {"one_approval_from": 9007199254740991u64}}});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(loose)).await, StatusCode::OK).await;
    let live = body_of(app.get("/v1/approval-policy", &live_admin).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(live["rules"], json!({}), "the test key changed only the test policy");
    let live_writer = app.key_owned(c.id, "payments:write,payments:read,payees:write", "erp", KeyMode::Live).await;
    let payee_id = payee(&app, &live_writer).await;
    let p = new_payment(&app, &live_writer, &payee_id, 500_000_000).await;
    assert_eq!(p["status"], "pending_approval");
    // A writer may not also manage the policy (it could waive its own approvals).
    let manager = app.key_owned(c.id, "keys:manage,payments:write,payees:write", "root", KeyMode::Test).await;
    let both = json!({"name": "x", "owner": "x", "scopes": ["payments:write", "keys:manage"]});
    body_of(send(&app, Method::POST, "/v1/api-keys", &manager, Some(both)).await, StatusCode::CREATED).await;
    let policy_admin = app.key(c.id, "keys:manage,payments:write,policy:manage").await;
    let forbid = json!({"rules": {}, "allow_write_and_approve_keys": false});
    body_of(send(&app, Method::PUT, "/v1/approval-policy", &c.admin, Some(forbid)).await, StatusCode::OK).await;
    let combined = json!({"name": "x", "owner": "x", "scopes": ["payments:write", "policy:manage"]});
    let p = problem(
        send(&app, Method::POST, "/v1/api-keys", &policy_admin, Some(combined)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "conflicting_scopes",
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("policy:manage"));
}

async fn whoever_created_the_payee_cannot_approve_payments_to_it(app: TestApp) {
    let c = company(&app, "Acme").await;
    let mallory =
        app.key_owned(c.id, "payees:write,payees:read,payments:approve,payments:read", "mallory", KeyMode::Test).await;
    let own_account = payee(&app, &mallory).await;
    let p = new_payment(&app, &c.initiator, &own_account, 700).await;
    let id = p["id"].as_str().unwrap();
    let r = send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &mallory, None).await;
    problem(r, StatusCode::FORBIDDEN, "approver_is_initiator").await;
    let ok = send(&app, Method::POST, &format!("/v1/payments/{id}/approve"), &c.alice, None).await;
    assert_eq!(body_of(ok, StatusCode::OK).await["status"], "approved");
}

async fn errors_never_echo_an_account_number(app: TestApp) {
    let c = company(&app, "Acme").await;
    let bodies = [
        json!({"name": "X", "type": "business", "bank_account": {"scheme": "us_ach", "routing_number": "021000021", "account_number": 987654321012u64, "account_type": "checking"}}),
        json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": 98765432101234u64}}),
        json!({"name": "X", "type": "business", "bank_account": {"scheme": "iban", "iban": "DE89370400440532013001"}}),
        json!({"name": "X", "type": "business", "bank_account": {"scheme": "us_ach", "routing_number": "021000021", "account_number": "98765432101x", "account_type": "checking"}}),
    ];
    for body in bodies {
        let r = send(&app, Method::POST, "/v1/payees", &c.initiator, Some(body.clone())).await;
        let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        let text = p.to_string();
        for secret in ["987654321012", "98765432101234", "370400440532013001", "98765432101x"] {
            assert!(!text.contains(secret), "{secret} echoed: {text}");
        }
    }
}
