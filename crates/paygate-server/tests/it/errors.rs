//! Bad input (invariant I9): a problem+json 4xx with a stable code, never a 5xx.

use reqwest::{Method, StatusCode};

use crate::backend_tests;
use crate::harness::{TestApp, json, problem};

backend_tests!(
    framework_rejections_are_problems,
    request_ids_are_accepted_only_when_safe,
    bad_list_parameters_are_400,
    every_problem_type_points_at_its_section_of_the_errors_page,
);

async fn every_problem_type_points_at_its_section_of_the_errors_page(app: TestApp) {
    let page = app.request(Method::GET, "/errors", None).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/markdown; charset=utf-8");
    let page = page.text().await.unwrap();
    // The served page is the committed one.
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md")).unwrap();
    assert_eq!(page, committed);
    let body = problem(
        app.request(Method::GET, "/v1/me", None).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    let (path, anchor) = body["type"].as_str().unwrap().split_once('#').unwrap();
    assert_eq!(path, "/errors");
    assert!(page.contains(&format!("<a id=\"{anchor}\"></a>\n## {anchor}\n")), "no section for {anchor}");
    for code in paygate_api::error_code::ErrorCode::ALL {
        assert!(page.contains(&format!("<a id=\"{code}\"></a>")), "{code}");
    }
}

async fn framework_rejections_are_problems(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read,keys:manage").await;
    // Unknown /v1 path: 401 without a key (route existence is no oracle), 404 with one.
    problem(
        app.request(Method::GET, "/v1/nope", None).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    problem(app.get("/v1/nope", &key).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    problem(app.request(Method::GET, "/nope", None).send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    problem(
        app.request(Method::DELETE, "/v1/me", Some(&key)).send().await.unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    let r = app.post("/v1/api-keys", &key).header("content-type", "text/plain").body("{}").send().await.unwrap();
    problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let r = app.post("/v1/api-keys", &key).body("{}").send().await.unwrap();
    problem(r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let r = app
        .post("/v1/api-keys", &key)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_json").await;
    let r =
        app.post("/v1/api-keys", &key).header("content-type", "application/json").body("[1,2]").send().await.unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(70 * 1024));
    let declared = app.post("/v1/api-keys", &key).header("content-type", "application/json").body(huge.clone());
    expect_too_large(declared.send().await).await;
    // Chunked, without a Content-Length: the limit still holds while reading.
    let chunked = app
        .post("/v1/api-keys", &key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_stream(huge.into_bytes())));
    expect_too_large(chunked.send().await).await;
    // Still healthy afterwards.
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
}

/// The server answers 413 as soon as it knows the body is too large and may
/// close the connection before the client has finished writing; the client
/// then sees either the 413 or a failed body write. Anything else fails.
async fn expect_too_large(result: reqwest::Result<reqwest::Response>) {
    match result {
        Ok(response) => {
            problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
        }
        Err(e) => {
            let chain = format!("{e:?}");
            assert!(
                chain.contains("BodyWrite") || chain.contains("BrokenPipe") || chain.contains("ConnectionReset"),
                "{chain}"
            );
        }
    }
}

fn futures_stream(
    bytes: Vec<u8>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let parts: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(parts)
}

async fn request_ids_are_accepted_only_when_safe(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    let r = app.get("/v1/me", &key).header("x-request-id", "erp-run-42.7_a").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "erp-run-42.7_a");
    for bad in ["has space", "semi;colon", &"a".repeat(65), "ünïcode"] {
        let r = app.get("/v1/me", &key).header("x-request-id", bad).send().await.unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(id.starts_with("req_") && id.len() == 26, "{bad:?} replaced, got {id}");
    }
    let r = app.request(Method::GET, "/v1/me", None).send().await.unwrap();
    assert!(r.headers()["x-request-id"].to_str().unwrap().starts_with("req_"));
}

async fn bad_list_parameters_are_400(app: TestApp) {
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    for (query, parameter) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("cursor=bogus", "cursor"),
        ("cursor=cmp_0000000000000000000000", "cursor"),
        ("colour=blue", "colour"),
    ] {
        let r = app.get(&format!("/v1/api-keys?{query}"), &key).send().await.unwrap();
        let body = problem(r, StatusCode::BAD_REQUEST, "invalid_parameter").await;
        assert_eq!(body["errors"][0]["parameter"], parameter, "{query}: {body}");
    }
}

/// A client that never finishes its request headers is cut off
/// (`header_read_timeout_secs`), instead of holding a connection forever.
#[tokio::test]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(crate::harness::Backend::Sqlite, &[("PAYGATE_HEADER_READ_TIMEOUT_SECS", "1")])
        .await
        .unwrap();
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.write_all(b"GET /v1/me HTTP/1.1\r\nHost: paygate\r\nX-Slow: ").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 5 s");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    // The server is still fine for everyone else.
    let acme = app.company("Acme").await;
    let key = app.key(acme.id, "keys:read").await;
    json(app.get("/v1/me", &key).send().await.unwrap(), StatusCode::OK).await;
}
