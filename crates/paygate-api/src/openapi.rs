//! What the handlers' annotations cannot say about the wire, added to the
//! generated document in one pass: the answers and headers of the pipeline
//! every operation runs through, `servers`, named list items, constraints
//! that live in shared code, and a `webhooks` entry per event type.
//!
//! Everything here is derived from code (the pipeline's refusals, the
//! pagination bounds, the event types); the drift test keeps the committed
//! `openapi.json` equal to it.

use paygate_domain::EventType;
use serde_json::{Map, Value, json};

use crate::pagination::MAX_LIMIT;

const PROBLEM: &str = "#/components/schemas/Problem";

/// Applies every addition to `doc` (the document as JSON).
pub fn exact(doc: &mut Value) {
    doc["servers"] = json!([{
        "url": "http://127.0.0.1:8080",
        "description": "A local `paygate serve` on its default address (`PAYGATE_LISTEN`)."
    }]);
    add_components(doc);
    name_list_items(doc);
    problem_status_range(doc);
    let paths = doc["paths"].as_object_mut().expect("paths");
    for (path, item) in paths.iter_mut() {
        for (method, operation) in item.as_object_mut().expect("path item").iter_mut() {
            if matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                pipeline(path, operation);
            }
        }
    }
    webhooks(doc);
}

fn problem_response(description: &str, headers: &[&str]) -> Value {
    let mut response = json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": PROBLEM}}},
    });
    add_headers(&mut response, headers);
    response
}

fn add_headers(response: &mut Value, names: &[&str]) {
    let headers = response.as_object_mut().expect("response").entry("headers").or_insert_with(|| json!({}));
    for name in names {
        headers[*name] = json!({"$ref": format!("#/components/headers/{name}")});
    }
}

/// Headers on every `/v1` answer to an authenticated key.
const KEY_HEADERS: &[&str] = &["X-Request-Id", "RateLimit-Policy", "RateLimit", "Paygate-Key-Expires", "Cache-Control"];

fn add_components(doc: &mut Value) {
    let components = doc["components"].as_object_mut().expect("components");
    let header = |description: &str, schema: Value| json!({"description": description, "schema": schema});
    components.insert(
        "headers".into(),
        json!({
            "X-Request-Id": header(
                "This request's id (the client's `X-Request-Id` if it was at most 64 characters of `[A-Za-z0-9._-]`, else `req_…`); it is in the audit record and the logs.",
                json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"})),
            "RateLimit-Policy": header(
                "The tightest of the limits that apply, as a structured field: `\"<policy>\";q=<requests>;w=<seconds>` (draft-ietf-httpapi-ratelimit-headers).",
                json!({"type": "string", "example": "\"key\";q=100;w=1"})),
            "RateLimit": header(
                "What remains of that limit: `\"<policy>\";r=<remaining>;t=<seconds>`.",
                json!({"type": "string", "example": "\"key\";r=99;t=1"})),
            "Retry-After": header("Seconds to wait before retrying.", json!({"type": "integer", "minimum": 0})),
            "Paygate-Key-Expires": header(
                "Sent when the calling key expires within 7 days: its expiry, RFC 3339.",
                json!({"type": "string", "format": "date-time"})),
            "Cache-Control": header("Always `no-store`: answers are private to the caller.", json!({"type": "string", "const": "no-store"})),
            "Location": header("The created resource (`/v1/…/{id}`).", json!({"type": "string"})),
            "Idempotent-Replayed": header(
                "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`.",
                json!({"type": "string", "enum": ["true"]})),
        }),
    );
    components.insert(
        "parameters".into(),
        json!({
            "X-Request-Id": {
                "name": "X-Request-Id",
                "in": "header",
                "required": false,
                "description": "Your id for this request, echoed back and recorded if it is at most 64 characters of `[A-Za-z0-9._-]`; otherwise Paygate makes one.",
                "schema": {"type": "string"},
            }
        }),
    );
}

/// Generic lists are generated with their item schema inlined; point at the
/// named schema instead, so a client gets one type per resource.
fn name_list_items(doc: &mut Value) {
    let Some(schemas) = doc["components"]["schemas"].as_object_mut() else { return };
    let names: Vec<String> = schemas.keys().cloned().collect();
    for name in names {
        let Some(item) = name.strip_prefix("List_").map(str::to_owned) else { continue };
        if schemas.contains_key(&item) {
            schemas[&name]["properties"]["data"]["items"] = json!({"$ref": format!("#/components/schemas/{item}")});
        }
    }
}

fn problem_status_range(doc: &mut Value) {
    let status = &mut doc["components"]["schemas"]["Problem"]["properties"]["status"];
    if status.is_object() {
        status["minimum"] = json!(100);
        status["maximum"] = json!(599);
    }
}

/// The answers every operation can give because of the pipeline it runs
/// through (authentication, scope, limits, audit, body and time limits), with
/// the headers each carries. An operation's own description of a status wins.
fn pipeline(path: &str, operation: &mut Value) {
    let has_body = operation.get("requestBody").is_some();
    let params = operation["parameters"].as_array().cloned().unwrap_or_default();
    let has_query = params.iter().any(|p| p["in"] == "query");
    let has_path_id = path.contains("{id}");
    for param in operation.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten() {
        if param["in"] == "query" && param["name"] == "limit" {
            param["schema"] = json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": crate::pagination::DEFAULT_LIMIT});
        }
    }
    operation
        .as_object_mut()
        .expect("operation")
        .entry("parameters")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .expect("parameters")
        .push(json!({"$ref": "#/components/parameters/X-Request-Id"}));

    let responses = operation["responses"].as_object_mut().expect("responses");
    let mut standard: Vec<(&str, Value)> = vec![
        (
            "401",
            problem_response(
                "`unauthenticated` (missing, malformed or unknown key), `api_key_revoked` or `api_key_expired`; with `WWW-Authenticate: Bearer`",
                &["X-Request-Id"],
            ),
        ),
        (
            "403",
            problem_response(
                "`insufficient_scope` (naming the scope), `company_suspended` or `ip_not_allowed`",
                KEY_HEADERS,
            ),
        ),
        (
            "429",
            problem_response(
                "`rate_limited`, `auth_throttled` or `concurrency_limited`, naming the `policy`",
                &["X-Request-Id", "RateLimit-Policy", "RateLimit", "Retry-After"],
            ),
        ),
        ("500", problem_response("`internal_error`: a bug", &["X-Request-Id"])),
        (
            "503",
            problem_response(
                "`audit_unavailable` (nothing was done), `overloaded`, or `timeout` (it may or may not have taken effect)",
                &["X-Request-Id", "Retry-After"],
            ),
        ),
    ];
    if has_body || has_query {
        standard.push((
            "400",
            problem_response(
                "`invalid_json`, `invalid_body`, `invalid_parameter` or `bad_request`, with a pointer to each problem",
                KEY_HEADERS,
            ),
        ));
    }
    if has_body {
        standard.push(("413", problem_response("`payload_too_large`: the body exceeds the limit", &["X-Request-Id"])));
        standard.push((
            "415",
            problem_response("`unsupported_media_type`: the body is not `application/json`", KEY_HEADERS),
        ));
        standard
            .push(("422", problem_response("`validation_failed`, with a pointer to each invalid field", KEY_HEADERS)));
    }
    if has_path_id {
        standard.push(("404", problem_response("No such object (another company's answers the same)", KEY_HEADERS)));
    }
    for (status, response) in standard {
        responses.entry(status).or_insert(response);
    }
    for (status, response) in responses.iter_mut() {
        let names: &[&str] = match status.as_str() {
            "401" => &["X-Request-Id"],
            "429" => &["X-Request-Id", "RateLimit-Policy", "RateLimit", "Retry-After"],
            "413" | "500" => &["X-Request-Id"],
            "503" => &["X-Request-Id", "Retry-After"],
            _ => KEY_HEADERS,
        };
        add_headers(response, names);
        if status == "201" {
            add_headers(response, &["Location"]);
        }
        if status == "201" && path == "/v1/payments" {
            add_headers(response, &["Idempotent-Replayed"]);
        }
    }
}

/// OpenAPI 3.1 `webhooks`: what a subscribed endpoint receives for each event
/// type, signed per Standard Webhooks.
fn webhooks(doc: &mut Value) {
    let mut hooks = Map::new();
    for event in EventType::ALL {
        let name = event.as_str();
        hooks.insert(
            name.to_owned(),
            json!({"post": {
                "summary": format!("`{name}`"),
                "description": format!(
                    "Sent to every enabled endpoint subscribed to `{name}` (or to every type). The body is the event, as `GET /v1/events/{{id}}` returns it, with `object_type` `{}`. Verify `webhook-signature` over `webhook-id.webhook-timestamp.body` before trusting it; answer 2xx within the timeout, or the delivery is retried.",
                    event.object_type()
                ),
                "operationId": format!("webhook_{}", name.replace('.', "_")),
                // Paygate calls the receiver; the signature, not a credential, proves the sender.
                "security": [],
                "tags": ["webhooks"],
                "parameters": [
                    {"name": "webhook-id", "in": "header", "required": true, "description": "The event id (`evt_…`): the same on every retry; deduplicate on it.", "schema": {"type": "string"}},
                    {"name": "webhook-timestamp", "in": "header", "required": true, "description": "Unix seconds when this attempt was signed; refuse old ones.", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                    {"name": "webhook-signature", "in": "header", "required": true, "description": "Space-separated `v1,<base64 HMAC-SHA256>` signatures, one per active secret.", "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": {"allOf": [
                        {"$ref": "#/components/schemas/EventView"},
                        {"type": "object", "properties": {"type": {"type": "string", "const": name}}},
                    ]}}},
                },
                "responses": {
                    "2XX": {"description": "Received: the delivery is done."},
                    "default": {"description": "Anything else (or no answer in time): the delivery is retried on its schedule."},
                },
            }}),
        );
    }
    doc["webhooks"] = Value::Object(hooks);
}

#[cfg(test)]
mod tests {
    use paygate_domain::audit::Outcome;
    use paygate_domain::bank::{AchAccountType, BankScheme};
    use paygate_domain::payment::PaymentStatus;
    use paygate_domain::{EventType, KeyMode, Scope};
    use paygate_store::views::KeyStatus;
    use paygate_store::{DeliveryStatus, PayeeStatus, PayeeType};
    use serde_json::{Value, json};

    /// serde's text of every variant; the match fails to compile when a variant is added.
    macro_rules! variants {
        ($ty:ty: $($variant:path),+ $(,)?) => {{
            let _every_variant_listed = |v: $ty| match v { $($variant)|+ => () };
            vec![$(serde_json::to_value($variant).unwrap()),+]
        }};
    }

    fn doc() -> Value {
        serde_json::from_str(&crate::openapi_json()).unwrap()
    }

    /// Every enum in the document lists exactly what serde writes on the
    /// wire, in order, and no enum schema goes unchecked.
    #[test]
    fn every_schema_enum_is_what_serde_writes() {
        let expected: Vec<(&str, Vec<Value>)> = vec![
            ("Scope", Scope::ALL.iter().map(|s| serde_json::to_value(s).unwrap()).collect()),
            ("EventType", EventType::ALL.iter().map(|e| serde_json::to_value(e).unwrap()).collect()),
            ("BankScheme", BankScheme::ALL.iter().map(|s| serde_json::to_value(s).unwrap()).collect()),
            ("PaymentStatus", PaymentStatus::ALL.iter().map(|s| serde_json::to_value(s).unwrap()).collect()),
            ("KeyMode", variants!(KeyMode: KeyMode::Live, KeyMode::Test)),
            ("KeyStatus", variants!(KeyStatus: KeyStatus::Active, KeyStatus::Expired, KeyStatus::Revoked)),
            ("Outcome", variants!(Outcome: Outcome::Success, Outcome::Denied, Outcome::Failed)),
            ("PayeeStatus", variants!(PayeeStatus: PayeeStatus::Active, PayeeStatus::Disabled)),
            ("PayeeType", variants!(PayeeType: PayeeType::Business, PayeeType::Individual)),
            ("AchAccountType", variants!(AchAccountType: AchAccountType::Checking, AchAccountType::Savings)),
            (
                "DeliveryStatus",
                variants!(DeliveryStatus: DeliveryStatus::Pending, DeliveryStatus::Succeeded, DeliveryStatus::Failed),
            ),
        ];
        let doc = doc();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for (name, wire) in &expected {
            assert_eq!(schemas[*name]["enum"].as_array().unwrap(), wire, "{name}");
        }
        for (name, schema) in schemas {
            if schema.get("enum").is_some() {
                assert!(expected.iter().any(|(n, _)| n == name), "enum schema {name} is not compared with serde");
            }
        }
        // What a payee's `bank_account.scheme` accepts is that enum.
        assert_eq!(schemas["BankAccountInput"]["properties"]["scheme"]["$ref"], "#/components/schemas/BankScheme");
    }

    /// Each operation lists the pipeline's answers with problem+json bodies and
    /// the headers they carry; every operation has a description.
    #[test]
    fn every_operation_lists_the_pipelines_answers_and_headers() {
        let doc = doc();
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                let at = format!("{method} {path}");
                assert!(op["description"].as_str().is_some_and(|d| !d.is_empty()), "{at}: no description");
                let responses = op["responses"].as_object().unwrap();
                let mut statuses = vec!["401", "403", "429", "500", "503"];
                if op.get("requestBody").is_some() {
                    statuses.extend(["400", "413", "415", "422"]);
                }
                if path.contains("{id}") {
                    statuses.push("404");
                }
                for status in statuses {
                    let response = responses.get(status).unwrap_or_else(|| panic!("{at}: no {status}"));
                    assert_eq!(
                        response["content"]["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{at} {status}"
                    );
                }
                for (status, response) in responses {
                    let headers = response["headers"].as_object().unwrap_or_else(|| panic!("{at} {status}"));
                    assert!(headers.contains_key("X-Request-Id"), "{at} {status}");
                    if status.starts_with('2') {
                        for name in ["RateLimit", "RateLimit-Policy", "Paygate-Key-Expires", "Cache-Control"] {
                            assert!(headers.contains_key(name), "{at} {status}: {name}");
                        }
                    }
                    if status == "429" || status == "503" {
                        assert!(headers.contains_key("Retry-After"), "{at} {status}");
                    }
                    if status == "201" {
                        assert!(headers.contains_key("Location"), "{at} {status}");
                    }
                }
            }
        }
        assert!(operations > 30);
        let create = &doc["paths"]["/v1/payments"]["post"];
        assert!(create["responses"]["201"]["headers"].get("Idempotent-Replayed").is_some());
        let key = create["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "Idempotency-Key").unwrap();
        assert_eq!(key["schema"]["pattern"], "^[!-~]{1,255}$");
    }

    /// The constraints the code enforces are in the schema.
    #[test]
    fn enforced_constraints_are_in_the_schema() {
        let doc = doc();
        let limit = doc["paths"]["/v1/payments"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap()
            .clone();
        assert_eq!(limit["schema"]["minimum"], json!(1));
        assert_eq!(limit["schema"]["maximum"], json!(crate::pagination::MAX_LIMIT));
        let status = &doc["components"]["schemas"]["Problem"]["properties"]["status"];
        assert_eq!((status["minimum"].clone(), status["maximum"].clone()), (json!(100), json!(599)));
        let name = &doc["components"]["schemas"]["CreatePayee"]["properties"]["name"];
        assert_eq!(name["maxLength"], json!(paygate_domain::Label::MAX_CHARS));
        let list = &doc["components"]["schemas"]["List_PaymentView"]["properties"]["data"]["items"];
        assert_eq!(list["$ref"], "#/components/schemas/PaymentView");
        assert!(doc["servers"][0]["url"].is_string());
    }

    #[test]
    fn webhooks_describe_every_event_type() {
        let doc = doc();
        let hooks = doc["webhooks"].as_object().unwrap();
        assert_eq!(hooks.len(), EventType::ALL.len());
        for event in EventType::ALL {
            let post = &hooks[event.as_str()]["post"];
            let body = &post["requestBody"]["content"]["application/json"]["schema"]["allOf"];
            assert_eq!(body[0]["$ref"], "#/components/schemas/EventView");
            assert_eq!(body[1]["properties"]["type"]["const"], event.as_str());
        }
    }
}
