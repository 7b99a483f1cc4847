//! Events and signed webhooks, against a real HTTP receiver on loopback, on
//! both databases: signatures, order, retries, timeouts, 410, secret
//! rotation, SSRF refusals, restarts and crashes, two nodes, tenancy.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use paygate_domain::KeyMode;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::backend_tests;
use crate::harness::{TestApp, json as body_of, problem};

backend_tests!(
    events_refuse_updates,
    events_never_widen_a_keys_view,
    deliveries_are_signed_and_carry_the_event,
    a_payment_life_arrives_in_order_with_sequences,
    retries_after_500s_and_timeouts_until_delivered,
    gone_disables_the_endpoint_with_an_event,
    an_endpoint_failing_too_long_is_disabled,
    rotation_signs_with_both_secrets_for_the_overlap,
    private_addresses_are_refused_at_creation,
    addresses_are_checked_again_at_connection_time,
    endpoints_and_events_of_another_company_do_not_exist,
    test_and_live_events_never_mix,
    bad_input_is_refused_with_pointers,
    concurrent_changes_each_deliver_one_event_once,
    ping_redelivery_and_the_delivery_log,
    a_restart_resumes_the_backlog,
    events_list_filters_and_pages,
    expiring_keys_get_one_notice,
    webhook_secrets_are_only_stored_encrypted,
    a_hanging_endpoint_does_not_hold_up_another_company,
);

/// What the receiver answers next: a status, after a delay.
#[derive(Clone, Copy)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The status the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    plan: Mutex<VecDeque<Reply>>,
    /// Answer for every request once the plan is used up.
    default_status: Mutex<u16>,
}

/// A webhook receiver on 127.0.0.1: records every request and answers as planned.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    state: Arc<ReceiverState>,
}

async fn receive(State(state): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> AxumStatus {
    let reply = state.plan.lock().unwrap().pop_front();
    let status = reply.map(|r| r.status).unwrap_or_else(|| *state.default_status.lock().unwrap());
    if let Some(r) = reply.filter(|r| !r.delay.is_zero()) {
        tokio::time::sleep(r.delay).await;
    }
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    state.received.lock().unwrap().push(Received { headers, body: String::from_utf8_lossy(&body).into(), status });
    AxumStatus::from_u16(status).unwrap()
}

impl Receiver {
    pub async fn start() -> Self {
        let state = Arc::new(ReceiverState { default_status: Mutex::new(200), ..Default::default() });
        let router = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }

    pub fn plan(&self, replies: &[Reply]) {
        self.state.plan.lock().unwrap().extend(replies.iter().copied());
    }

    pub fn answer(&self, status: u16) {
        *self.state.default_status.lock().unwrap() = status;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Requests the receiver answered with 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.received().into_iter().filter(|r| (200..300).contains(&r.status)).collect()
    }

    /// Waits until `done` holds for the accepted requests.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let accepted = self.accepted();
            if done(&accepted) {
                return accepted;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{what}: never happened; received {:?}",
                self.received().iter().map(|r| (r.status, r.json()["type"].clone())).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn types(received: &[Received]) -> Vec<String> {
    received.iter().map(|r| r.json()["type"].as_str().unwrap().to_owned()).collect()
}

struct Company {
    id: paygate_domain::CompanyId,
    /// webhooks:manage, events:read, payees:*, payments:write/read, keys:read (owner "erp").
    key: String,
    /// payments:approve + payments:read (owner "alice").
    approver: String,
}

async fn company(app: &TestApp, name: &str) -> Company {
    company_in(app, name, KeyMode::Test).await
}

async fn company_in(app: &TestApp, name: &str, mode: KeyMode) -> Company {
    let c = app.company(name).await;
    let scopes = "webhooks:manage,events:read,payees:write,payees:read,payments:write,payments:read,keys:read";
    Company {
        id: c.id,
        key: app.key_owned(c.id, scopes, "erp", mode).await,
        approver: app.key_owned(c.id, "payments:approve,payments:read", "alice", mode).await,
    }
}

/// Registers an endpoint; returns (id, secret).
async fn endpoint(app: &TestApp, key: &str, url: &str, event_types: Value) -> (String, String) {
    let body = json!({"url": url, "event_types": event_types, "description": "test receiver"});
    let created =
        body_of(app.post("/v1/webhook-endpoints", key).json(&body).send().await.unwrap(), StatusCode::CREATED).await;
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{created}");
    (created["id"].as_str().unwrap().to_owned(), secret)
}

async fn payee(app: &TestApp, key: &str) -> String {
    let body = json!({"name": "Lieferant GmbH", "type": "business",
        "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000", "bic": "COBADEFFXXX"}});
    let created = body_of(app.post("/v1/payees", key).json(&body).send().await.unwrap(), StatusCode::CREATED).await;
    created["id"].as_str().unwrap().to_owned()
}

async fn payment(app: &TestApp, key: &str, payee: &str, amount: u64) -> Value {
    let body = json!({"payee_id": payee, "amount": amount, "currency": "EUR", "reference": "INV-1"});
    let request = app.post("/v1/payments", key).header("Idempotency-Key", crate::harness::uuid_like()).json(&body);
    body_of(request.send().await.unwrap(), StatusCode::CREATED).await
}

/// Checks a delivery the way an integrator would, with the documented function.
fn verify(received: &Received, secret: &str) -> Result<(), paygate_domain::webhook::VerifyError> {
    paygate_domain::webhook::verify(
        secret,
        received.header("webhook-id"),
        received.header("webhook-timestamp"),
        received.header("webhook-signature"),
        received.body.as_bytes(),
        time::OffsetDateTime::now_utc().unix_timestamp(),
        300,
    )
}

async fn deliveries(app: &TestApp, key: &str, endpoint: &str) -> Vec<Value> {
    let list = body_of(
        app.get(&format!("/v1/webhook-endpoints/{endpoint}/deliveries"), key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    list["data"].as_array().unwrap().clone()
}

async fn get_endpoint(app: &TestApp, key: &str, id: &str) -> Value {
    body_of(app.get(&format!("/v1/webhook-endpoints/{id}"), key).send().await.unwrap(), StatusCode::OK).await
}

async fn wait_for_endpoint(app: &TestApp, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let e = get_endpoint(app, key, id).await;
        if done(&e) {
            return e;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "endpoint never changed as expected: {e}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn deliveries_are_signed_and_carry_the_event(app: TestApp) {
    let c = company(&app, "Signed").await;
    let receiver = Receiver::start().await;
    let (_, secret) = endpoint(&app, &c.key, &receiver.url, json!(["*"])).await;
    let payee_id = payee(&app, &c.key).await;
    let got = receiver.wait_for("payee.created", |r| !r.is_empty()).await;
    let delivery = &got[0];
    verify(delivery, &secret).unwrap();
    // A tampered body, another secret, or a stale timestamp do not verify.
    let mut tampered = delivery.clone();
    tampered.body = tampered.body.replace("Lieferant", "Lieferantx");
    assert!(verify(&tampered, &secret).is_err());
    let other = paygate_domain::webhook::WebhookSecret::generate().to_text();
    assert!(verify(delivery, &other).is_err());
    assert!(
        paygate_domain::webhook::verify(
            &secret,
            delivery.header("webhook-id"),
            delivery.header("webhook-timestamp"),
            delivery.header("webhook-signature"),
            delivery.body.as_bytes(),
            time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
            300,
        )
        .is_err()
    );
    assert_eq!(delivery.header("content-type"), "application/json");
    let event = delivery.json();
    assert_eq!(event["type"], "payee.created");
    assert_eq!(event["object_id"], payee_id.as_str());
    assert_eq!(event["sequence"], 1);
    assert_eq!(event["data"]["object"]["id"], payee_id.as_str());
    assert_eq!(event["company_id"], c.id.to_string());
    // webhook-id is the event id; the body is the event as the API shows it.
    assert_eq!(delivery.header("webhook-id"), event["id"].as_str().unwrap());
    let stored = body_of(
        app.get(&format!("/v1/events/{}", event["id"].as_str().unwrap()), &c.key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(stored, event);
    // The snapshot never carries the account number (invariant I2).
    assert!(!delivery.body.contains("0532013000"), "{}", delivery.body);
    app.shutdown().await;
}

async fn a_payment_life_arrives_in_order_with_sequences(app: TestApp) {
    let c = company(&app, "Ordered").await;
    let receiver = Receiver::start().await;
    endpoint(
        &app,
        &c.key,
        &receiver.url,
        json!(["payment.created", "payment.approved", "payment.processing", "payment.completed"]),
    )
    .await;
    let payee_id = payee(&app, &c.key).await;
    let p = payment(&app, &c.key, &payee_id, 250_000).await;
    let id = p["id"].as_str().unwrap().to_owned();
    let approved = app.post(&format!("/v1/payments/{id}/approve"), &c.approver).json(&json!({})).send().await.unwrap();
    body_of(approved, StatusCode::OK).await;
    let got = receiver.wait_for("four payment events", |r| r.len() >= 4).await;
    assert_eq!(types(&got), ["payment.created", "payment.approved", "payment.processing", "payment.completed"]);
    let sequences: Vec<u64> = got.iter().map(|r| r.json()["sequence"].as_u64().unwrap()).collect();
    assert_eq!(sequences, [1, 2, 3, 4], "one object's events arrive in sequence order");
    let previous: Vec<Value> = got.iter().map(|r| r.json()["previous_status"].clone()).collect();
    assert_eq!(previous, [Value::Null, json!("pending_approval"), json!("approved"), json!("processing")]);
    assert_eq!(got[3].json()["data"]["object"]["status"], "completed");
    // The payee event is not subscribed to: it never arrived.
    assert!(receiver.received().iter().all(|r| r.json()["object_type"] == "payment"));
    app.shutdown().await;
}

async fn retries_after_500s_and_timeouts_until_delivered(app: TestApp) {
    let c = company(&app, "Retries").await;
    let receiver = Receiver::start().await;
    let (endpoint_id, _) = endpoint(&app, &c.key, &receiver.url, json!(["payee.created"])).await;
    // 500, then a reply slower than the 2 s attempt timeout, then 200.
    receiver.plan(&[
        Reply { status: 500, delay: Duration::ZERO },
        Reply { status: 200, delay: Duration::from_secs(3) },
        Reply { status: 200, delay: Duration::ZERO },
    ]);
    payee(&app, &c.key).await;
    receiver
        .wait_for("the third attempt", |r| r.iter().any(|r| r.status == 200 && r.json()["type"] == "payee.created"))
        .await;
    // The attempt log: 500, a timeout without a status, then 200; nothing pending.
    let started = Instant::now();
    let log = loop {
        let d = deliveries(&app, &c.key, &endpoint_id).await;
        if d.len() == 1 && d[0]["status"] == "succeeded" {
            break d;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{d:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let attempts = log[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(attempts[0]["status_code"], 500);
    assert!(attempts[0]["error"].as_str().unwrap().starts_with("http_status"), "{attempts:?}");
    assert_eq!(attempts[1]["status_code"], Value::Null);
    assert!(attempts[1]["error"].as_str().unwrap().starts_with("timeout"), "{attempts:?}");
    assert_eq!(attempts[2]["status_code"], 200);
    assert_eq!(log[0]["next_attempt_at"], Value::Null);
    // Every attempt carried the same webhook-id (receivers deduplicate by it).
    let ids: std::collections::BTreeSet<String> =
        receiver.received().iter().map(|r| r.header("webhook-id").to_owned()).collect();
    assert_eq!(ids.len(), 1);
    // Failures are counted by endpoint and reason.
    let metrics = app.http.get(format!("{}/metrics", app.ops)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("paygate_webhook_delivery_failures_total")
            && l.contains(&endpoint_id)
            && l.contains("reason=\"timeout\"")),
        "{metrics}"
    );
    app.shutdown().await;
}

async fn gone_disables_the_endpoint_with_an_event(app: TestApp) {
    let c = company(&app, "Gone").await;
    let gone = Receiver::start().await;
    gone.answer(410);
    let watcher = Receiver::start().await;
    let (gone_id, _) = endpoint(&app, &c.key, &gone.url, json!(["*"])).await;
    endpoint(&app, &c.key, &watcher.url, json!(["webhook_endpoint.disabled"])).await;
    payee(&app, &c.key).await;
    let e = wait_for_endpoint(&app, &c.key, &gone_id, |e| e["enabled"] == false).await;
    assert_eq!(e["disabled_reason"], "gone");
    // Exactly one attempt: 410 is final.
    let d = deliveries(&app, &c.key, &gone_id).await;
    assert_eq!(d[0]["status"], "failed");
    assert_eq!(d[0]["attempts"].as_array().unwrap().len(), 1);
    // The disabling is an event, delivered to the other endpoint.
    let got = watcher.wait_for("webhook_endpoint.disabled", |r| !r.is_empty()).await;
    assert_eq!(got[0].json()["object_id"], gone_id.as_str());
    assert_eq!(got[0].json()["data"]["object"]["disabled_reason"], "gone");
    // Later events are not delivered to the disabled endpoint.
    payee(&app, &c.key).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gone.received().len(), 1);
    // Re-enabling clears the reason; it receives again.
    gone.answer(200);
    let patched = app
        .request(Method::PATCH, &format!("/v1/webhook-endpoints/{gone_id}"), Some(&c.key))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    let patched = body_of(patched, StatusCode::OK).await;
    assert_eq!(patched["disabled_reason"], Value::Null);
    payee(&app, &c.key).await;
    gone.wait_for("delivery after re-enabling", |r| !r.is_empty()).await;
    app.shutdown().await;
}

async fn an_endpoint_failing_too_long_is_disabled(app: TestApp) {
    let mut app = app;
    app.env.insert("PAYGATE_WEBHOOK_DISABLE_AFTER_SECS".into(), "1".into());
    app.env.insert("PAYGATE_WEBHOOK_RETRY_SCHEDULE".into(), "0s,700ms,700ms,700ms,700ms".into());
    app.restart().await;
    let c = company(&app, "Failing").await;
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let (id, _) = endpoint(&app, &c.key, &receiver.url, json!(["*"])).await;
    payee(&app, &c.key).await;
    let e = wait_for_endpoint(&app, &c.key, &id, |e| e["enabled"] == false).await;
    assert_eq!(e["disabled_reason"], "failing");
    let events =
        body_of(app.get("/v1/events?type=webhook_endpoint.disabled", &c.key).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(events["data"][0]["object_id"], id.as_str());
    assert!(receiver.received().len() >= 2);
    app.shutdown().await;
}

async fn rotation_signs_with_both_secrets_for_the_overlap(app: TestApp) {
    let c = company(&app, "Rotation").await;
    let receiver = Receiver::start().await;
    let (id, old) = endpoint(&app, &c.key, &receiver.url, json!(["payee.created"])).await;
    let rotated = body_of(
        app.post(&format!("/v1/webhook-endpoints/{id}/rotate-secret"), &c.key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].is_string());
    // Reading the endpoint never shows a secret.
    assert!(get_endpoint(&app, &c.key, &id).await.get("secret").is_none());
    payee(&app, &c.key).await;
    let got = receiver.wait_for("a delivery after rotation", |r| !r.is_empty()).await;
    let signatures: Vec<&str> = got[0].header("webhook-signature").split(' ').collect();
    assert_eq!(signatures.len(), 2, "new and old secret both sign during the overlap");
    verify(&got[0], &new).unwrap();
    verify(&got[0], &old).unwrap();
    // After the overlap only the new secret signs.
    let expire = match app.backend {
        crate::harness::Backend::Sqlite => "UPDATE webhook_endpoints SET previous_secret_expires_at = 1",
        crate::harness::Backend::Postgres => {
            "UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second'"
        }
    };
    assert_eq!(app.raw_sql(expire).await.unwrap(), 1);
    payee(&app, &c.key).await;
    let got = receiver.wait_for("a delivery after the overlap", |r| r.len() >= 2).await;
    assert_eq!(got[1].header("webhook-signature").split(' ').count(), 1);
    verify(&got[1], &new).unwrap();
    assert!(verify(&got[1], &old).is_err());
    app.shutdown().await;
}

async fn private_addresses_are_refused_at_creation(app: TestApp) {
    let mut app = app;
    // No operator allow-list: every internal address class is refused.
    app.env.remove("PAYGATE_WEBHOOK_ALLOWED_NETWORKS");
    app.restart().await;
    let c = company(&app, "SSRF").await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://127.1.2.3/hook",
        "http://localhost:9000/hook",
        "http://[::1]/hook",
        "http://10.0.0.1/hook",
        "http://172.16.5.4/hook",
        "http://192.168.1.1/hook",
        "http://[fc00::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:169.254.169.254]/hook",
        "http://[64:ff9b::a00:1]/hook",
        "http://224.0.0.1/hook",
        "http://2130706433/hook",
        "http://0x7f000001/hook",
    ] {
        let response = app
            .post("/v1/webhook-endpoints", &c.key)
            .json(&json!({"url": url, "event_types": ["*"]}))
            .send()
            .await
            .unwrap();
        let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY, "url_not_allowed").await;
        assert_eq!(body["errors"][0]["pointer"], "/url", "{url}: {body}");
    }
    // Live mode requires https.
    let live = company_in(&app, "SSRF live", KeyMode::Live).await;
    let response = app
        .post("/v1/webhook-endpoints", &live.key)
        .json(&json!({"url": "http://hooks.example.com/paygate", "event_types": ["*"]}))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNPROCESSABLE_ENTITY, "url_scheme_not_allowed").await;
    let created = app
        .post("/v1/webhook-endpoints", &live.key)
        .json(&json!({"url": "https://hooks.example.com/paygate", "event_types": ["*"]}))
        .send()
        .await
        .unwrap();
    body_of(created, StatusCode::CREATED).await;
    for url in
        ["ftp://hooks.example.com/", "https://user:pw@hooks.example.com/", "https://hooks.example.com/#x", "nonsense"]
    {
        let response = app
            .post("/v1/webhook-endpoints", &c.key)
            .json(&json!({"url": url, "event_types": ["*"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{url}");
    }
    // PATCH checks the URL the same way; nothing was changed.
    let (id, _) = {
        let created = app
            .post("/v1/webhook-endpoints", &c.key)
            .json(&json!({"url": "https://hooks.example.com/ok", "event_types": ["*"]}))
            .send()
            .await
            .unwrap();
        let v = body_of(created, StatusCode::CREATED).await;
        (v["id"].as_str().unwrap().to_owned(), ())
    };
    let response = app
        .request(Method::PATCH, &format!("/v1/webhook-endpoints/{id}"), Some(&c.key))
        .json(&json!({"url": "http://169.254.169.254/"}))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNPROCESSABLE_ENTITY, "url_not_allowed").await;
    assert_eq!(get_endpoint(&app, &c.key, &id).await["url"], "https://hooks.example.com/ok");
    app.shutdown().await;
}

async fn addresses_are_checked_again_at_connection_time(app: TestApp) {
    let mut app = app;
    let c = company(&app, "Rebinding").await;
    let receiver = Receiver::start().await;
    // Accepted while the operator allow-listed loopback ...
    let (id, _) = endpoint(&app, &c.key, &receiver.url, json!(["*"])).await;
    // ... then the allow-list is removed: the address is refused when connecting.
    app.env.remove("PAYGATE_WEBHOOK_ALLOWED_NETWORKS");
    app.restart().await;
    payee(&app, &c.key).await;
    let attempt = first_attempt(&app, &c.key, &id).await;
    assert!(attempt["error"].as_str().unwrap().starts_with("address_not_allowed"), "{attempt}");
    assert_eq!(attempt["status_code"], Value::Null);
    assert!(receiver.received().is_empty(), "no connection reached the receiver");
    // A name that resolves to loopback (from /etc/hosts) is refused after resolution too.
    if let Some(name) = loopback_host_name() {
        let port = receiver.url.split(':').nth(2).unwrap().split('/').next().unwrap().to_owned();
        let (named, _) = endpoint(&app, &c.key, &format!("http://{name}:{port}/hook"), json!(["*"])).await;
        payee(&app, &c.key).await;
        let a = first_attempt(&app, &c.key, &named).await;
        assert!(a["error"].as_str().unwrap().starts_with("address_not_allowed"), "{a}");
        assert!(receiver.received().is_empty());
    } else {
        eprintln!("no non-localhost loopback name in /etc/hosts: DNS case skipped");
    }
    app.shutdown().await;
}

/// The first recorded attempt of the endpoint's newest delivery, once there is one.
async fn first_attempt(app: &TestApp, key: &str, endpoint: &str) -> Value {
    let started = Instant::now();
    loop {
        let d = deliveries(app, key, endpoint).await;
        if let Some(a) = d.first().and_then(|d| d["attempts"].as_array()).and_then(|a| a.first()).cloned() {
            return a;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no attempt recorded for {endpoint}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A host name other than `localhost` that /etc/hosts maps to 127.0.0.0/8.
fn loopback_host_name() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().filter(|l| l.starts_with("127.")).flat_map(|l| l.split_whitespace().skip(1)).find_map(|name| {
        let ok = !name.contains("localhost") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        ok.then(|| name.to_owned())
    })
}

async fn endpoints_and_events_of_another_company_do_not_exist(app: TestApp) {
    let a = company(&app, "A").await;
    let b = company(&app, "B").await;
    let ra = Receiver::start().await;
    let rb = Receiver::start().await;
    let (ea, _) = endpoint(&app, &a.key, &ra.url, json!(["*"])).await;
    let (eb, _) = endpoint(&app, &b.key, &rb.url, json!(["*"])).await;
    payee(&app, &a.key).await;
    let got = ra.wait_for("A's event", |r| !r.is_empty()).await;
    let event_id = got[0].json()["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rb.received().is_empty(), "B's endpoint never hears of A's changes");
    // B sees neither A's endpoint nor A's event: the same 404 as a missing id.
    let missing_endpoint = paygate_domain::WebhookEndpointId::generate().to_string();
    let missing_event = paygate_domain::EventId::generate().to_string();
    for (path, missing) in [
        (format!("/v1/webhook-endpoints/{ea}"), format!("/v1/webhook-endpoints/{missing_endpoint}")),
        (
            format!("/v1/webhook-endpoints/{ea}/deliveries"),
            format!("/v1/webhook-endpoints/{missing_endpoint}/deliveries"),
        ),
        (format!("/v1/events/{event_id}"), format!("/v1/events/{missing_event}")),
    ] {
        let theirs = problem(app.get(&path, &b.key).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
        let none = problem(app.get(&missing, &b.key).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
        assert_eq!(crate::harness::without_request_id(theirs), crate::harness::without_request_id(none), "{path}");
    }
    for (method, path) in [
        (Method::PATCH, format!("/v1/webhook-endpoints/{ea}")),
        (Method::DELETE, format!("/v1/webhook-endpoints/{ea}")),
        (Method::POST, format!("/v1/webhook-endpoints/{ea}/rotate-secret")),
        (Method::POST, format!("/v1/webhook-endpoints/{ea}/test")),
        (Method::POST, format!("/v1/events/{event_id}/redeliver")),
    ] {
        let response = app.request(method, &path, Some(&b.key)).json(&json!({})).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    // Nor can B redeliver its own events to A's endpoint.
    payee(&app, &b.key).await;
    let b_event = rb.wait_for("B's event", |r| !r.is_empty()).await[0].json()["id"].as_str().unwrap().to_owned();
    let response = app
        .post(&format!("/v1/events/{b_event}/redeliver"), &b.key)
        .json(&json!({"endpoint_id": ea}))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let a_list = body_of(app.get("/v1/webhook-endpoints", &a.key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(a_list["data"].as_array().unwrap().len(), 1);
    assert_eq!(a_list["data"][0]["id"], ea.as_str());
    let b_events = body_of(app.get("/v1/events", &b.key).send().await.unwrap(), StatusCode::OK).await;
    assert!(b_events["data"].as_array().unwrap().iter().all(|e| e["company_id"] == b.id.to_string()));
    assert!(b_events["data"].as_array().unwrap().iter().all(|e| e["id"] != event_id.as_str()));
    assert_eq!(get_endpoint(&app, &b.key, &eb).await["id"], eb.as_str());
    // The untouched endpoint of A still exists.
    assert_eq!(get_endpoint(&app, &a.key, &ea).await["enabled"], true);
    app.shutdown().await;
}

async fn test_and_live_events_never_mix(app: TestApp) {
    let c = app.company("Modes").await;
    let scopes = "webhooks:manage,events:read,payees:write,payees:read";
    let test_key = app.key_owned(c.id, scopes, "erp", KeyMode::Test).await;
    let live_key = app.key_owned(c.id, scopes, "erp", KeyMode::Live).await;
    let receiver = Receiver::start().await;
    endpoint(&app, &test_key, &receiver.url, json!(["*"])).await;
    let live_payee = payee(&app, &live_key).await;
    let test_payee = payee(&app, &test_key).await;
    let got = receiver.wait_for("the test-mode event", |r| !r.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.accepted().len(), 1, "the live payee's event is not sent to a test endpoint");
    assert_eq!(got[0].json()["object_id"], test_payee.as_str());
    assert_eq!(got[0].json()["livemode"], false);
    // Each mode's list holds its own payee's event and not the other's.
    for (key, own, other, livemode) in
        [(&live_key, &live_payee, &test_payee, true), (&test_key, &test_payee, &live_payee, false)]
    {
        let events = body_of(app.get("/v1/events?limit=100", key).send().await.unwrap(), StatusCode::OK).await;
        let events = events["data"].as_array().unwrap();
        let objects: Vec<&str> = events.iter().map(|e| e["object_id"].as_str().unwrap()).collect();
        assert!(objects.contains(&own.as_str()), "livemode {livemode}: {objects:?}");
        assert!(!objects.contains(&other.as_str()), "livemode {livemode}: {objects:?}");
        assert!(events.iter().all(|e| e["livemode"] == livemode), "{events:?}");
        let other_event = app.get(&format!("/v1/events?object_id={other}"), key).send().await.unwrap();
        assert!(body_of(other_event, StatusCode::OK).await["data"].as_array().unwrap().is_empty());
    }
    assert!(
        body_of(app.get("/v1/webhook-endpoints", &live_key).send().await.unwrap(), StatusCode::OK).await["data"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    app.shutdown().await;
}

async fn bad_input_is_refused_with_pointers(app: TestApp) {
    let c = company(&app, "Bad input").await;
    let receiver = Receiver::start().await;
    let post = |body: Value| app.post("/v1/webhook-endpoints", &c.key).json(&body).send();
    let body = problem(
        post(json!({"url": receiver.url, "event_types": ["payment.approved", "payment.nope", "ping"]})).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    let pointers: Vec<&str> =
        body["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
    assert_eq!(pointers, ["/event_types/1", "/event_types/2"]);
    for bad in [
        json!({"url": receiver.url, "event_types": []}),
        json!({"url": receiver.url, "event_types": ["*", "payee.created"]}),
        json!({"url": receiver.url, "event_types": ["*"], "description": "x".repeat(201)}),
    ] {
        problem(post(bad).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    // Unknown fields, wrong types, not JSON: 4xx problems, never 5xx.
    for bad in
        [json!({"url": receiver.url, "event_types": ["*"], "secret": "whsec_mine"}), json!({"url": 5}), json!([])]
    {
        let response = post(bad).await.unwrap();
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    let response = app
        .post("/v1/webhook-endpoints", &c.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Nothing was created by any of those.
    let list = body_of(app.get("/v1/webhook-endpoints", &c.key).send().await.unwrap(), StatusCode::OK).await;
    assert!(list["data"].as_array().unwrap().is_empty());
    // Bad ids are 404s, bad filters 400s.
    problem(app.get("/v1/events/evt_nope", &c.key).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    problem(app.get("/v1/webhook-endpoints/we_x", &c.key).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found")
        .await;
    for query in ["type=payment.nope", "limit=0", "cursor=zzz", "object_id=a%20b", "colour=red"] {
        let response = app.get(&format!("/v1/events?{query}"), &c.key).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    let (id, _) = endpoint(&app, &c.key, &receiver.url, json!(["*"])).await;
    let response = app
        .request(Method::PATCH, &format!("/v1/webhook-endpoints/{id}"), Some(&c.key))
        .json(&json!({"event_types": ["nope"]}))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let response =
        app.post("/v1/events/evt_x/redeliver", &c.key).json(&json!({"endpoint_id": "nope"})).send().await.unwrap();
    assert!(response.status().is_client_error());
    // Scopes: events need events:read, endpoints webhooks:manage.
    let reader = app.key_owned(c.id, "payees:read", "reader", KeyMode::Test).await;
    let body =
        problem(app.get("/v1/events", &reader).send().await.unwrap(), StatusCode::FORBIDDEN, "insufficient_scope")
            .await;
    assert_eq!(body["scope"], "events:read");
    let body = problem(
        app.get("/v1/webhook-endpoints", &reader).send().await.unwrap(),
        StatusCode::FORBIDDEN,
        "insufficient_scope",
    )
    .await;
    assert_eq!(body["scope"], "webhooks:manage");
    // At most 16 endpoints per company and mode.
    for _ in 0..15 {
        endpoint(&app, &c.key, &receiver.url, json!(["*"])).await;
    }
    problem(
        post(json!({"url": receiver.url, "event_types": ["*"]})).await.unwrap(),
        StatusCode::CONFLICT,
        "endpoint_limit_reached",
    )
    .await;
    app.shutdown().await;
}

/// Events never widen a key's view: an event is readable, listable and
/// subscribable only with its object's read scope, in both directions.
async fn events_never_widen_a_keys_view(app: TestApp) {
    let c = company(&app, "Narrow").await;
    let receiver = Receiver::start().await;
    let payee_id = payee(&app, &c.key).await;
    let payment_id = payment(&app, &c.key, &payee_id, 100).await["id"].as_str().unwrap().to_owned();
    let mut first_events = Vec::new();
    for object in [&payee_id, &payment_id] {
        let url = format!("/v1/events?object_id={object}");
        let events = body_of(app.get(&url, &c.key).send().await.unwrap(), StatusCode::OK).await;
        first_events.push(events["data"][0]["id"].as_str().unwrap().to_owned());
    }
    let (payee_event, payment_event) = (first_events[0].as_str(), first_events[1].as_str());
    for (scopes, readable, hidden, hidden_event, hidden_scope) in [
        ("events:read,payments:read", &payment_id, &payee_id, payee_event, "payees:read"),
        ("events:read,payees:read", &payee_id, &payment_id, payment_event, "payments:read"),
    ] {
        let reader = app.key_owned(c.id, scopes, "reader", KeyMode::Test).await;
        let seen = body_of(app.get("/v1/events?limit=100", &reader).send().await.unwrap(), StatusCode::OK).await;
        let objects: Vec<&str> =
            seen["data"].as_array().unwrap().iter().map(|e| e["object_id"].as_str().unwrap()).collect();
        assert!(objects.contains(&readable.as_str()), "{scopes}: {objects:?}");
        assert!(!objects.contains(&hidden.as_str()), "{scopes}: {objects:?}");
        let hidden_type = if hidden_scope == "payees:read" { "payee.created" } else { "payment.created" };
        let response = app.get(&format!("/v1/events/{hidden_event}"), &reader).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND, "not_found").await;
        let response = app.get(&format!("/v1/events?type={hidden_type}"), &reader).send().await.unwrap();
        assert_eq!(problem(response, StatusCode::FORBIDDEN, "insufficient_scope").await["scope"], hidden_scope);
    }
    // The full key reads both.
    body_of(app.get(&format!("/v1/events/{payee_event}"), &c.key).send().await.unwrap(), StatusCode::OK).await;
    // A webhooks:manage key without payees:read cannot subscribe to payee
    // events, and "*" is stored as what it may read.
    let manager = app.key_owned(c.id, "webhooks:manage", "manager", KeyMode::Test).await;
    let body = json!({"url": receiver.url, "event_types": ["payee.created"]});
    let response = app.post("/v1/webhook-endpoints", &manager).json(&body).send().await.unwrap();
    let refused = problem(response, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert_eq!(refused["scope"], "payees:read");
    let (narrow, _) = endpoint(&app, &manager, &receiver.url, json!(["*"])).await;
    assert_eq!(get_endpoint(&app, &manager, &narrow).await["event_types"], json!(["webhook_endpoint.disabled"]));
    app.shutdown().await;
}

async fn concurrent_changes_each_deliver_one_event_once(app: TestApp) {
    let c = company(&app, "Concurrent").await;
    let receiver = Receiver::start().await;
    endpoint(&app, &c.key, &receiver.url, json!(["payee.created"])).await;
    let created: Vec<String> =
        futures_util::future::join_all((0..20).map(|_| payee(&app, &c.key))).await.into_iter().collect();
    let got = receiver.wait_for("20 payee events", |r| r.len() >= 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_ids: Vec<String> = got.iter().map(|r| r.json()["object_id"].as_str().unwrap().to_owned()).collect();
    let mut unique = got_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20);
    assert_eq!(receiver.received().len(), 20, "no event delivered twice");
    let mut expected = created.clone();
    expected.sort();
    assert_eq!(unique, expected);
    app.shutdown().await;
}

async fn ping_redelivery_and_the_delivery_log(app: TestApp) {
    let c = company(&app, "Ping").await;
    let receiver = Receiver::start().await;
    let (id, secret) = endpoint(&app, &c.key, &receiver.url, json!(["payee.created"])).await;
    let ping = body_of(
        app.post(&format!("/v1/webhook-endpoints/{id}/test"), &c.key).send().await.unwrap(),
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(ping["type"], "ping");
    let got = receiver.wait_for("the ping", |r| !r.is_empty()).await;
    assert_eq!(got[0].json()["type"], "ping");
    verify(&got[0], &secret).unwrap();
    payee(&app, &c.key).await;
    let got = receiver.wait_for("the payee event", |r| r.len() >= 2).await;
    let event_id = got[1].json()["id"].as_str().unwrap().to_owned();
    let queued = body_of(
        app.post(&format!("/v1/events/{event_id}/redeliver"), &c.key).send().await.unwrap(),
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(queued["deliveries"], 1);
    let got = receiver.wait_for("the redelivery", |r| r.len() >= 3).await;
    assert_eq!(got[2].header("webhook-id"), event_id, "a redelivery keeps the event id");
    // The receiver answers before Paygate records the outcome: wait for the record.
    let started = Instant::now();
    let log = loop {
        let log = deliveries(&app, &c.key, &id).await;
        if log.len() == 3 && log.iter().all(|d| d["status"] == "succeeded") {
            break log;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{log:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(log[0]["event_id"], event_id.as_str(), "newest first");
    assert!(log[0]["attempts"][0]["latency_ms"].is_u64());
    // A disabled endpoint cannot be pinged.
    let patched = app
        .request(Method::PATCH, &format!("/v1/webhook-endpoints/{id}"), Some(&c.key))
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    body_of(patched, StatusCode::OK).await;
    problem(
        app.post(&format!("/v1/webhook-endpoints/{id}/test"), &c.key).send().await.unwrap(),
        StatusCode::CONFLICT,
        "endpoint_disabled",
    )
    .await;
    // Deleting removes it and its log.
    let deleted =
        app.request(Method::DELETE, &format!("/v1/webhook-endpoints/{id}"), Some(&c.key)).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    problem(
        app.get(&format!("/v1/webhook-endpoints/{id}"), &c.key).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // Every change above left its audit record.
    let audit_key = app.key_owned(c.id, "audit:read", "auditor", KeyMode::Test).await;
    let audit = body_of(app.get("/v1/audit-events?limit=100", &audit_key).send().await.unwrap(), StatusCode::OK).await;
    let actions: Vec<&str> = audit["data"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    for action in [
        "webhook_endpoint.create",
        "webhook_endpoint.test",
        "event.redeliver",
        "webhook.deliver",
        "webhook_endpoint.delete",
    ] {
        assert!(actions.contains(&action), "{action} missing from {actions:?}");
    }
    app.shutdown().await;
}

/// Events are append-only in the database itself (a trigger on each backend),
/// so a receiver's view of what happened cannot be rewritten afterwards.
async fn events_refuse_updates(app: TestApp) {
    let c = company(&app, "Append only").await;
    let id = payee(&app, &c.key).await;
    for sql in ["UPDATE events SET type = 'payee.disabled'", "UPDATE events SET object = '{}'"] {
        let err = app.raw_sql(sql).await.err().unwrap_or_else(|| panic!("{sql} was allowed"));
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let events =
        body_of(app.get(&format!("/v1/events?object_id={id}"), &c.key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(events["data"][0]["type"], "payee.created");
    assert_eq!(events["data"][0]["data"]["object"]["id"], id.as_str(), "{events}");
    app.shutdown().await;
}

async fn a_restart_resumes_the_backlog(app: TestApp) {
    let mut app = app;
    let c = company(&app, "Backlog").await;
    let receiver = Receiver::start().await;
    receiver.answer(503);
    endpoint(&app, &c.key, &receiver.url, json!(["payee.created"])).await;
    for _ in 0..5 {
        payee(&app, &c.key).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.restart().await;
    receiver.answer(200);
    receiver.wait_for("the whole backlog after the restart", |r| r.len() >= 5).await;
    // Past the whole retry schedule: a duplicate would have arrived by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ids: Vec<String> = receiver.accepted().iter().map(|r| r.header("webhook-id").to_owned()).collect();
    ids.sort();
    let events = body_of(app.get("/v1/events?type=payee.created", &c.key).send().await.unwrap(), StatusCode::OK).await;
    let mut created: Vec<String> =
        events["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    created.sort();
    assert_eq!(created.len(), 5);
    assert_eq!(ids, created, "each of the five events accepted exactly once");
    app.shutdown().await;
}

async fn events_list_filters_and_pages(app: TestApp) {
    let c = company(&app, "Events list").await;
    let p1 = payee(&app, &c.key).await;
    let p2 = payee(&app, &c.key).await;
    let disabled = app.post(&format!("/v1/payees/{p1}/disable"), &c.key).send().await.unwrap();
    body_of(disabled, StatusCode::OK).await;
    let again = app.post(&format!("/v1/payees/{p1}/disable"), &c.key).send().await.unwrap();
    body_of(again, StatusCode::OK).await;
    let all = body_of(app.get("/v1/events?limit=100", &c.key).send().await.unwrap(), StatusCode::OK).await;
    let kinds: Vec<&str> = all["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    // The company's two keys were issued first (by the operator): their events too.
    assert_eq!(
        kinds,
        ["payee.disabled", "payee.created", "payee.created", "api_key.created", "api_key.created"],
        "newest first; disabling twice tells once"
    );
    let of_p1 =
        body_of(app.get(&format!("/v1/events?object_id={p1}"), &c.key).send().await.unwrap(), StatusCode::OK).await;
    let seqs: Vec<u64> = of_p1["data"].as_array().unwrap().iter().map(|e| e["sequence"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 1]);
    assert_eq!(of_p1["data"][0]["previous_status"], "active");
    let created =
        body_of(app.get("/v1/events?type=payee.created&limit=1", &c.key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(created["data"][0]["object_id"], p2.as_str());
    assert_eq!(created["has_more"], true);
    let cursor = created["next_cursor"].as_str().unwrap();
    let next = body_of(
        app.get(&format!("/v1/events?type=payee.created&limit=1&cursor={cursor}"), &c.key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(next["data"][0]["object_id"], p1.as_str());
    assert_eq!(next["has_more"], false);
    app.shutdown().await;
}

async fn expiring_keys_get_one_notice(app: TestApp) {
    let c = company(&app, "Expiry").await;
    let receiver = Receiver::start().await;
    endpoint(&app, &c.key, &receiver.url, json!(["api_key.expiring"])).await;
    // A key expiring in 3 days, created before the worker's first scan ran.
    let key = app.key_with(c.id, "payees:read", KeyMode::Test, Some(time::Duration::days(3))).await;
    let mut app = app;
    app.restart().await;
    let got = receiver.wait_for("api_key.expiring", |r| !r.is_empty()).await;
    let key_id = format!("key_{}", key.split('_').nth(3).unwrap());
    assert_eq!(got[0].json()["object_id"], key_id.as_str(), "{}", got[0].body);
    app.restart().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let all = receiver.received();
    assert_eq!(
        all.len(),
        1,
        "one notice per key, across restarts: {:?}",
        all.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    app.shutdown().await;
}

/// Crash and resume: the real binary is killed (SIGKILL) mid-backlog; a new
/// process delivers every event, and nothing a receiver acknowledged before
/// the crash is delivered again except what was in flight at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("paygate.db").display());
    let env = [
        ("PAYGATE_DATABASE_URL", db.as_str()),
        ("PAYGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ("PAYGATE_WEBHOOK_WORKER_INTERVAL_MS", "50"),
        ("PAYGATE_WEBHOOK_TIMEOUT_SECS", "1"),
        ("PAYGATE_WEBHOOK_CONNECT_TIMEOUT_SECS", "1"),
        ("PAYGATE_WEBHOOK_CONCURRENCY", "4"),
        ("PAYGATE_AUTH_FAILURE_LIMIT", "100000/1"),
    ];
    crash_and_resume(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_delivery_on_postgres() {
    let Some(admin_url) = crate::harness::postgres_url() else {
        eprintln!("PAYGATE_TEST_POSTGRES_URL not set: skipped");
        return;
    };
    let deployment = crate::harness::SharedDeployment::create(&admin_url).await;
    let env = deployment.with(&[
        ("PAYGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ("PAYGATE_WEBHOOK_WORKER_INTERVAL_MS", "50"),
        ("PAYGATE_WEBHOOK_TIMEOUT_SECS", "1"),
        ("PAYGATE_WEBHOOK_CONNECT_TIMEOUT_SECS", "1"),
        ("PAYGATE_WEBHOOK_CONCURRENCY", "4"),
        ("PAYGATE_AUTH_FAILURE_LIMIT", "100000/1"),
    ]);
    crash_and_resume(&env).await;
}

/// A company and a `webhooks:manage payees:write payees:read` test key, made with the CLI; the key text.
fn company_key_by_cli(env: &[(&str, &str)], name: &str) -> String {
    use crate::process::cli_json;
    let company =
        cli_json(env, &["admin", "company", "create", "--name", name, "--json"])["id"].as_str().unwrap().to_owned();
    let args = ["admin", "key", "create", "--company", &company, "--name", "k", "--owner", "o"];
    let scopes = ["--scopes", "webhooks:manage,payees:write,payees:read", "--mode", "test", "--json"];
    cli_json(env, &[&args[..], &scopes[..]].concat())["secret"].as_str().unwrap().to_owned()
}

async fn crash_and_resume(env: &[(&str, &str)]) {
    use crate::process::start_with;
    let key = company_key_by_cli(env, "Crash");
    let receiver = Receiver::start().await;
    // Slow acknowledgements, so the kill lands mid-backlog.
    receiver.plan(&vec![Reply { status: 200, delay: Duration::from_millis(40) }; 400]);
    let http = crate::harness::http();
    let node = start_with(&["serve"], "warn,paygate_server=info", env);
    let body = json!({"url": receiver.url, "event_types": ["payee.created"]});
    let created =
        http.post(format!("{}/v1/webhook-endpoints", node.api)).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let total = 40;
    let payee = json!({"name": "P", "type": "business",
        "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000"}});
    for _ in 0..total {
        let r = http.post(format!("{}/v1/payees", node.api)).bearer_auth(&key).json(&payee).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // Kill while some, not all, have been acknowledged.
    let started = Instant::now();
    while receiver.received().len() < 5 {
        assert!(started.elapsed() < Duration::from_secs(20), "no delivery before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut node = node;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let before_kill = receiver.received().len();
    assert!(before_kill < total, "the kill should land mid-backlog ({before_kill} of {total} already delivered)");
    let restarted = start_with(&["serve"], "warn,paygate_server=info", env);
    let got = receiver
        .wait_for("every event after the crash", |r| {
            r.iter().map(|r| r.header("webhook-id")).collect::<std::collections::BTreeSet<_>>().len() >= total
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = receiver.received();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &all {
        *per_id.entry(r.header("webhook-id").to_owned()).or_default() += 1;
    }
    assert_eq!(per_id.len(), total);
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    eprintln!("crash: {before_kill} of {total} acknowledged before the kill, {duplicates} delivered again after it");
    // Only deliveries in flight at the kill (at most one claim: 4) can repeat.
    assert!(duplicates <= 4, "{duplicates} duplicate deliveries after a crash: {per_id:?}");
    drop(got);
    drop(restarted);
}

/// Two nodes on one PostgreSQL database share the backlog: every event is
/// delivered exactly once, both nodes deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_delivery_backlog() {
    use crate::process::{metric, start_with};
    let Some(admin_url) = crate::harness::postgres_url() else {
        eprintln!("PAYGATE_TEST_POSTGRES_URL not set: skipped");
        return;
    };
    let deployment = crate::harness::SharedDeployment::create(&admin_url).await;
    let env = deployment.with(&[
        ("PAYGATE_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8"),
        ("PAYGATE_WEBHOOK_WORKER_INTERVAL_MS", "20"),
        ("PAYGATE_WEBHOOK_CONCURRENCY", "2"),
        ("PAYGATE_AUTH_FAILURE_LIMIT", "100000/1"),
    ]);
    let key = company_key_by_cli(&env, "Two");
    let receiver = Receiver::start().await;
    receiver.plan(&vec![Reply { status: 200, delay: Duration::from_millis(30) }; 200]);
    let a = start_with(&["serve"], "warn,paygate_server=info", &env);
    let b = start_with(&["serve"], "warn,paygate_server=info", &env);
    let http = crate::harness::http();
    let body = json!({"url": receiver.url, "event_types": ["payee.created"]});
    let created =
        http.post(format!("{}/v1/webhook-endpoints", a.api)).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let payee = json!({"name": "P", "type": "business",
        "bank_account": {"scheme": "iban", "iban": "DE89370400440532013000"}});
    let total = 60;
    for i in 0..total {
        let node = if i % 2 == 0 { &a } else { &b };
        let r = http.post(format!("{}/v1/payees", node.api)).bearer_auth(&key).json(&payee).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    receiver.wait_for("every event", |r| r.len() >= total).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = receiver.received();
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), total);
    assert_eq!(all.len(), total, "no delivery attempted by both nodes");
    let delivered = |ops: &str| {
        let http = http.clone();
        let url = format!("{ops}/metrics");
        async move {
            let text = http.get(url).send().await.unwrap().text().await.unwrap();
            metric(&text, "paygate_webhook_deliveries_total{result=\"succeeded\"}")
        }
    };
    let (da, db) = (delivered(&a.ops).await, delivered(&b.ops).await);
    if da + db != total as f64 {
        for ops in [&a.ops, &b.ops] {
            let text = http.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
            eprintln!("{ops}: {}", text.lines().filter(|l| l.contains("webhook")).collect::<Vec<_>>().join("\n"));
        }
    }
    eprintln!("node a delivered {da}, node b {db}");
    assert_eq!(da + db, total as f64);
    assert!(da > 0.0 && db > 0.0, "both nodes took part: {da} / {db}");
}

/// The README's webhook walkthrough on the real demo binary and the real
/// `paygate webhooks listen` receiver: every delivery verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_webhook_walkthrough_verifies_on_the_demo() {
    use crate::process::{collect, start};
    let dir = tempfile::tempdir().unwrap();
    let demo = start(dir.path(), &["serve", "--demo"], "warn,paygate_server=info");
    let (initiator, approver, _) = demo.demo_keys();
    let http = crate::harness::http();
    // A free port for the receiver.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let body =
        json!({"url": format!("http://127.0.0.1:{port}/webhooks"), "event_types": ["*"], "description": "laptop"});
    let created = http
        .post(format!("{}/v1/webhook-endpoints", demo.api))
        .bearer_auth(&initiator)
        .json(&body)
        .send()
        .await
        .unwrap();
    let created = body_of(created, StatusCode::CREATED).await;
    let (id, secret) = (created["id"].as_str().unwrap().to_owned(), created["secret"].as_str().unwrap().to_owned());
    let mut listener = std::process::Command::new(crate::harness::BIN)
        .args(["webhooks", "listen", "--listen", &format!("127.0.0.1:{port}")])
        .env("PAYGATE_WEBHOOK_SECRET", &secret)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = collect(listener.stdout.take().unwrap());
    let wait_line = |needle: String| {
        let lines = lines.clone();
        async move {
            let started = Instant::now();
            loop {
                if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(&needle)).cloned() {
                    return l;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "no line with {needle:?}: {:?}",
                    lines.lock().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_line("signatures checked".into()).await;
    let ping =
        http.post(format!("{}/v1/webhook-endpoints/{id}/test", demo.api)).bearer_auth(&initiator).send().await.unwrap();
    assert_eq!(ping.status(), StatusCode::ACCEPTED);
    assert!(wait_line(" ping ".into()).await.ends_with("signature verified"));
    let payee = json!({"name": "Lieferant GmbH", "type": "business",
        "bank_account": {"scheme": "iban", "iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX"}});
    let payee = http.post(format!("{}/v1/payees", demo.api)).bearer_auth(&initiator).json(&payee).send().await.unwrap();
    let payee_id = body_of(payee, StatusCode::CREATED).await["id"].as_str().unwrap().to_owned();
    let payment = json!({"payee_id": payee_id, "amount": 250000, "currency": "EUR", "reference": "Invoice 2026-0043"});
    let payment = http
        .post(format!("{}/v1/payments", demo.api))
        .bearer_auth(&initiator)
        .header("Idempotency-Key", "inv-2026-0043")
        .json(&payment)
        .send()
        .await
        .unwrap();
    let pay_id = body_of(payment, StatusCode::CREATED).await["id"].as_str().unwrap().to_owned();
    let approved =
        http.post(format!("{}/v1/payments/{pay_id}/approve", demo.api)).bearer_auth(&approver).send().await.unwrap();
    assert_eq!(approved.status(), StatusCode::OK);
    for (kind, seq) in
        [("payment.created", 1), ("payment.approved", 2), ("payment.processing", 3), ("payment.completed", 4)]
    {
        let line = wait_line(format!("{kind} {pay_id} seq={seq}")).await;
        assert!(line.ends_with("signature verified"), "{line}");
    }
    let printed = lines.lock().unwrap().join("\n");
    assert!(!printed.contains("REFUSED"), "{printed}");
    let _ = listener.kill();
    let _ = listener.wait();
    let (status, _, stderr) = demo.terminate();
    assert!(status.success());
    assert!(!stderr.join("\n").contains(&secret), "the signing secret never reaches the logs");
}

/// Invariant I2: a webhook signing secret exists at rest only sealed.
async fn webhook_secrets_are_only_stored_encrypted(app: TestApp) {
    let c = company(&app, "Sealed").await;
    let receiver = Receiver::start().await;
    let (id, secret) = endpoint(&app, &c.key, &receiver.url, json!(["*"])).await;
    let rotated = body_of(
        app.post(&format!("/v1/webhook-endpoints/{id}/rotate-secret"), &c.key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let second = rotated["secret"].as_str().unwrap().to_owned();
    payee(&app, &c.key).await;
    receiver.wait_for("a delivery", |r| !r.is_empty()).await;
    let raw = app.raw_contents().await;
    for s in [&secret, &second] {
        let encoded = s.strip_prefix("whsec_").unwrap();
        assert!(!raw.contains(encoded), "a signing secret is stored in clear");
        let bytes = base64_decode(encoded);
        assert!(!raw.contains(&hex(&bytes)), "a signing secret is stored as hex");
        assert!(!raw.contains_bytes(&bytes), "a signing secret's raw bytes are stored");
    }
    // Nor does any API answer after creation show it.
    let shown = app.get(&format!("/v1/webhook-endpoints/{id}"), &c.key).send().await.unwrap().text().await.unwrap();
    assert!(!shown.contains(&second) && !shown.contains(&secret));
    app.shutdown().await;
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One company's endpoint that never answers holds at most its share of the
/// node's delivery slots: another company's event goes out while the hanging
/// attempts are still waiting for their timeout.
async fn a_hanging_endpoint_does_not_hold_up_another_company(app: TestApp) {
    let slow = company(&app, "Slow").await;
    let fast = company(&app, "Fast").await;
    let hanging = Receiver::start().await;
    hanging.plan(&vec![Reply { status: 200, delay: Duration::from_secs(30) }; 100]);
    let receiver = Receiver::start().await;
    let (hanging_id, _) = endpoint(&app, &slow.key, &hanging.url, json!(["payee.created"])).await;
    endpoint(&app, &fast.key, &receiver.url, json!(["payee.created"])).await;
    // More hanging deliveries than the node has slots (16).
    for _ in 0..24 {
        payee(&app, &slow.key).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    payee(&app, &fast.key).await;
    receiver.wait_for("the other company's event", |r| !r.is_empty()).await;
    // Every hanging attempt is still in flight (each times out after 2 s): the
    // other company did not wait for any of them.
    let log = deliveries(&app, &slow.key, &hanging_id).await;
    assert!(log.iter().all(|d| d["attempts"].as_array().unwrap().is_empty()), "{log:?}");
    app.shutdown().await;
}
