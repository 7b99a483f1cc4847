//! What reaches Paygate before any handler: connections (HTTP/1 and h2c),
//! header and body bounds, one body shape, one `Authorization` header; and
//! text, which is one set of rules wherever it is accepted.

use std::time::Duration;

use paygate_domain::{AllowedCidrs, KeyMode, ScopeSet};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend_tests;
use crate::harness::{Backend, TestApp, json as body_of, problem};

backend_tests!(
    look_alike_owners_are_one_pair_of_eyes,
    json_bodies_are_one_object_without_repeated_keys,
    keys_pasted_into_free_text_are_redacted,
);

/// The HTTP/2 client preface and an empty SETTINGS frame, then nothing.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes; `None` if still open after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut buf)).await.ok().map(|_| buf)
}

async fn metrics(app: &TestApp) -> String {
    app.http.get(format!("{}/metrics", app.ops)).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn idle_h2c_connections_that_sent_only_the_preface_are_closed() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("PAYGATE_IDLE_TIMEOUT_SECS", "1")]).await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(addr(&app)).await.unwrap();
        stream.write_all(H2_PREFACE).await.unwrap();
        idle.push(stream);
    }
    // And an HTTP/1 connection kept alive after one answered request.
    let mut kept = tokio::net::TcpStream::connect(addr(&app)).await.unwrap();
    kept.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: paygate\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(metrics(&app).await.contains("paygate_http_connections_open"), "the open-connection gauge is exported");
    for stream in &mut idle {
        let bytes = closed_within(stream, Duration::from_secs(10)).await;
        assert!(bytes.is_some(), "an idle h2c connection was still open after 10 s");
    }
    assert!(
        closed_within(&mut kept, Duration::from_secs(10)).await.is_some(),
        "idle keep-alive connection stayed open"
    );
    assert!(metrics(&app).await.contains("paygate_http_connections_idle_closed_total"));
    // The server still answers new connections.
    let response = app.http.get(format!("{}/openapi.json", app.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn open_connections_per_node_are_bounded() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("PAYGATE_MAX_CONNECTIONS", "4")]).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(addr(&app)).await.unwrap();
        stream.write_all(H2_PREFACE).await.unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(addr(&app)).await.unwrap();
    let _ = extra.write_all(H2_PREFACE).await;
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await.is_some(), "a fifth connection was kept");
    assert!(metrics(&app).await.contains("paygate_http_connections_refused_total"));
    drop(held);
    // Slots come back when connections close.
    let mut answered = false;
    for _ in 0..50 {
        if let Ok(r) = app.http.get(format!("{}/openapi.json", app.base)).send().await
            && r.status() == StatusCode::OK
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered);
}

#[tokio::test]
async fn big_headers_get_431_as_problems_and_the_database_is_private() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("PAYGATE_HEADER_READ_TIMEOUT_SECS", "1")]).await.unwrap();
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let big = "x".repeat(10 * 1024);
    let r = app.get("/v1/me", &key).header("X-Big", &big).send().await.unwrap();
    problem(r, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large").await;
    let mut request = app.get("/v1/me", &key);
    for i in 0..6 {
        request = request.header(format!("x-part-{i}"), "y".repeat(7 * 1024));
    }
    problem(request.send().await.unwrap(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large").await;
    // Beyond hyper's read buffer the refusal is hyper's own, still a 431.
    let huge = "z".repeat(100 * 1024);
    let r = app.get("/v1/me", &key).header("X-Huge", &huge).send().await;
    assert!(r.is_err() || r.unwrap().status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Under the bounds, the same request is fine.
    body_of(app.get("/v1/me", &key).header("X-Small", "ok").send().await.unwrap(), StatusCode::OK).await;

    // Two Authorization headers: neither is believed, whatever their order.
    let other = app.key(acme.id, "keys:read").await;
    let r =
        app.get("/v1/me", &key).header(reqwest::header::AUTHORIZATION, format!("Bearer {other}")).send().await.unwrap();
    problem(r, StatusCode::UNAUTHORIZED, "unauthenticated").await;

    // The database and its WAL files are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(app.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("paygate.db") {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
    }
}

async fn json_bodies_are_one_object_without_repeated_keys(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:manage,keys:read,payments:read").await;
    let post = |body: &'static str| {
        app.post("/v1/api-keys", &key).header("content-type", "application/json").body(body).send()
    };
    let array = problem(
        post(r#"["n", "o", ["payments:read"]]"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert!(!array.to_string().contains("CreateApiKey"), "{array}");
    let duplicate = problem(
        post(r#"{"name": "n", "owner": "o", "scopes": ["payments:read"], "scopes": ["keys:manage"]}"#).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    )
    .await;
    assert!(duplicate["detail"].as_str().unwrap().contains("duplicate key \"scopes\""), "{duplicate}");
    let nested = problem(
        post(r#"{"name": "n", "owner": "o", "scopes": [], "allowed_cidrs": [], "x": {"a": 1, "a": 2}}"#).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    )
    .await;
    assert!(nested["detail"].as_str().unwrap().contains("\"a\""), "{nested}");
    // Wrong types are described in JSON terms, never Rust's.
    let typed = problem(
        app.post("/v1/api-keys/key_00000000000000000000000000/rotate", &key)
            .json(&json!({"grace_period_seconds": "soon"}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    let text = typed.to_string();
    assert!(!text.contains("i64") && !text.contains("RotateApiKey"), "{typed}");
    // Nothing was created by any of these.
    let keys = body_of(app.get("/v1/api-keys", &key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 1);
    // Another company's valid body still works: the shape rule rejects only shapes.
    let other = app.company("Other").await;
    let other_key = app.key(other.id, "keys:manage,payments:read").await;
    let ok = app
        .post("/v1/api-keys", &other_key)
        .json(&json!({"name": "n", "owner": "o", "scopes": ["payments:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
}

/// Owners a reader takes for "alice" (the set in the domain's text tests).
const ALICE_LOOKALIKES: [&str; 24] = [
    "\u{430}lice",
    "alic\u{435}",
    "\u{430}li\u{441}\u{435}",
    "\u{FF41}\u{FF4C}\u{FF49}\u{FF43}\u{FF45}",
    "\u{1D41A}\u{1D425}\u{1D422}\u{1D41C}\u{1D41E}",
    "\u{1D4B6}\u{1D4C1}\u{1D4BE}\u{1D4B8}\u{212F}",
    "al\u{131}ce",
    "AL\u{130}CE",
    "Alice",
    "\u{251}lice",
    "alice\u{E0041}",
    "al\u{E0020}ice",
    "al\u{34F}ice",
    "alice\u{FE0F}",
    "alice\u{FE00}",
    "al\u{3164}ice",
    "alice\u{115F}",
    "alice\u{FFA0}",
    "al\u{2800}ice",
    "alice\u{180B}",
    "alice\u{180E}",
    "alice\u{17B4}",
    "al\u{200D}ice",
    "alice\u{1D173}",
];

async fn look_alike_owners_are_one_pair_of_eyes(app: TestApp) {
    let acme = app.company("Acme").await;
    let admin = app.key_owned(acme.id, "policy:manage", "admin", KeyMode::Test).await;
    let body = json!({"rules": {"EUR": {"one_approval_from": 100000, "two_approvals_from": 100000000}}});
    body_of(
        app.request(reqwest::Method::PUT, "/v1/approval-policy", Some(&admin)).json(&body).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let alice = app.key_owned(acme.id, "payments:write,payments:read,payees:write", "alice", KeyMode::Test).await;
    let payee = body_of(
        app.post("/v1/payees", &alice)
            .json(&json!({"name": "Lieferant GmbH", "type": "business",
                "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000", "bic": "COBADEFFXXX"}}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let payment = body_of(
        app.post("/v1/payments", &alice)
            .header("Idempotency-Key", crate::harness::uuid_like())
            .json(&json!({"payee_id": payee["id"], "amount": 200_000, "currency": "EUR", "reference": "INV-1"}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let approve = format!("/v1/payments/{}/approve", payment["id"].as_str().unwrap());
    // The API refuses the invisible ones outright, with a pointer.
    let minter = app.key_owned(acme.id, "keys:manage,payments:read", "it", KeyMode::Test).await;
    let (mut refused, mut same_eyes) = (0, 0);
    for variant in ALICE_LOOKALIKES {
        let r = app
            .post("/v1/api-keys", &minter)
            .json(&json!({"name": "approver", "owner": variant, "scopes": ["payments:read"]}))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::UNPROCESSABLE_ENTITY {
            let body = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
            assert_eq!(body["errors"][0]["pointer"], "/owner", "{variant:?}");
            refused += 1;
            continue;
        }
        assert_eq!(r.status(), StatusCode::CREATED, "{variant:?}");
        // An operator-issued approver with the look-alike owner (its own
        // principal, so only the owner comparison stands between it and
        // alice's payment) is the same pair of eyes.
        let request = paygate_server::admin::KeyRequest {
            company: acme.id,
            name: "approver",
            owner: variant,
            scopes: ScopeSet::parse_list("payments:approve,payments:read").unwrap(),
            mode: KeyMode::Test,
            expires_in: None,
            allowed_cidrs: AllowedCidrs::default(),
        };
        let (_, approver) = paygate_server::admin::create_key(&*app.store, &app.hasher, request).await.unwrap();
        let r = app.post(&approve, &approver).send().await.unwrap();
        problem(r, StatusCode::FORBIDDEN, "approver_is_initiator").await;
        same_eyes += 1;
    }
    assert_eq!(refused + same_eyes, 24);
    assert!(refused >= 10 && same_eyes >= 8, "refused {refused}, same eyes {same_eyes}");
    // A second, genuinely different owner approves.
    let bob = app.key_owned(acme.id, "payments:approve,payments:read", "bob", KeyMode::Test).await;
    let approved = body_of(app.post(&approve, &bob).send().await.unwrap(), StatusCode::OK).await;
    assert_ne!(approved["status"], "pending_approval", "{approved}");

    // References and metadata follow the same rules.
    for (field, value) in [
        ("reference", json!("INV \u{202E}1002")),
        ("reference", json!("INV\u{200B}-1")),
        ("metadata", json!({"note": "a\u{0}b"})),
        ("metadata", json!({"note": "\u{1b}[31mred"})),
    ] {
        let mut body = json!({"payee_id": payee["id"], "amount": 500, "currency": "EUR", "reference": "INV-2"});
        body[field] = value;
        let r = app
            .post("/v1/payments", &alice)
            .header("Idempotency-Key", crate::harness::uuid_like())
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem_body = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(
            problem_body["errors"][0]["pointer"].as_str().unwrap().starts_with(&format!("/{field}")),
            "{problem_body}"
        );
    }
}

async fn keys_pasted_into_free_text_are_redacted(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "audit:read,payments:write,payments:read,payees:write").await;
    let pasted = app.key(acme.id, "payments:read").await;
    let r = app.get("/v1/me", &key).header("User-Agent", format!("sync/1 {pasted}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let payee = body_of(
        app.post("/v1/payees", &key)
            .json(&json!({"name": "Lieferant GmbH", "type": "business", "metadata": {"note": format!("key {pasted}")},
                "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000"}}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(payee["metadata"]["note"], "key pgk_[redacted]", "{payee}");
    let payment: Value = body_of(
        app.post("/v1/payments", &key)
            .header("Idempotency-Key", crate::harness::uuid_like())
            .json(&json!({"payee_id": payee["id"], "amount": 500, "currency": "EUR", "reference": format!("INV {pasted}")}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(payment["reference"], "INV pgk_[redacted]");
    let log = body_of(app.get("/v1/audit-events?limit=100", &key).send().await.unwrap(), StatusCode::OK).await;
    assert!(log.to_string().contains("pgk_[redacted]"), "the user agent was recorded, redacted");
    let raw = app.raw_contents().await;
    assert!(!raw.contains(crate::harness::secret_of(&pasted)), "a pasted key reached the database");
}
