//! The outbound HTTP client for webhook deliveries.
//!
//! Every address a delivery may connect to passes the [`AddressPolicy`]: IP
//! literals are checked before sending (reqwest never resolves them), and
//! hostnames go through [`PolicyResolver`], which drops every address the
//! policy refuses, so a DNS answer pointing at an internal network (DNS
//! rebinding included) never gets a connection: the connector only ever sees
//! addresses that passed.
//!
//! Environment proxies are never used, redirects are never followed (a 3xx is
//! a failed attempt), TLS is rustls on the ring provider with the Mozilla roots
//! (webpki-roots), and at most 64 KiB of a response body is read.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use paygate_domain::webhook::{AddressClass, AddressPolicy};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub const USER_AGENT: &str = "Paygate-Webhooks/1";
/// At most this much of a response body is read (then discarded).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;
const MAX_DETAIL: usize = 200;

/// Sends webhook deliveries. Cheap to clone.
#[derive(Clone)]
pub struct WebhookClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    policy: AddressPolicy,
    total_timeout: Duration,
}

impl std::fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookClient")
            .field("policy", &self.inner.policy)
            .field("total_timeout", &self.inner.total_timeout)
            .finish_non_exhaustive()
    }
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The response status, if a response arrived.
    pub status: Option<u16>,
    pub latency: Duration,
    /// None exactly when the attempt succeeded (2xx).
    pub error: Option<AttemptError>,
}

impl Attempt {
    /// A 2xx response.
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    /// Stable: "timeout", "connect", "dns", "address_not_allowed", "tls",
    /// "invalid_url", "http_status", "other".
    pub reason: &'static str,
    /// Short and free of secrets (never the URL, which may carry a token): at most 200 characters.
    pub detail: String,
}

impl AttemptError {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.chars().count() > MAX_DETAIL {
            detail = detail.chars().take(MAX_DETAIL - 1).chain(std::iter::once('…')).collect();
        }
        Self { reason, detail }
    }

    fn not_allowed(class: AddressClass) -> Self {
        Self::new(
            "address_not_allowed",
            format!("the host is a {class} address ({}), which webhook deliveries may not reach", class.as_str()),
        )
    }
}

impl WebhookClient {
    pub fn new(policy: AddressPolicy, connect_timeout: Duration, total_timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            // Retries follow the delivery schedule, never the client's own policy.
            .retry(reqwest::retry::never())
            .referer(false)
            .connect_timeout(connect_timeout)
            .timeout(total_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(USER_AGENT)
            .dns_resolver(PolicyResolver { policy: policy.clone() })
            .build()
            .context("building the webhook HTTP client")?;
        Ok(Self { inner: Arc::new(Inner { http, policy, total_timeout }) })
    }

    pub fn policy(&self) -> &AddressPolicy {
        &self.inner.policy
    }

    /// POSTs `body` (`content-type: application/json`) with the given extra headers to `url`.
    pub async fn post(&self, url: &str, headers: &[(&'static str, String)], body: Bytes) -> Attempt {
        let started = Instant::now();
        let result = self.send(url, headers, body).await;
        let latency = started.elapsed();
        match result {
            Ok(status) if (200..300).contains(&status) => Attempt { status: Some(status), latency, error: None },
            Ok(status) => {
                let detail = if (300..400).contains(&status) {
                    format!("HTTP {status} (redirects are not followed)")
                } else {
                    format!("HTTP {status}")
                };
                Attempt { status: Some(status), latency, error: Some(AttemptError::new("http_status", detail)) }
            }
            Err(error) => Attempt { status: None, latency, error: Some(error) },
        }
    }

    async fn send(&self, url: &str, headers: &[(&'static str, String)], body: Bytes) -> Result<u16, AttemptError> {
        let url = reqwest::Url::parse(url).map_err(|e| AttemptError::new("invalid_url", e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(AttemptError::new("invalid_url", "the URL scheme must be http or https"));
        }
        // reqwest connects to IP literals without asking the resolver: check them here.
        match url.host() {
            None => return Err(AttemptError::new("invalid_url", "the URL has no host")),
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip))?,
            Some(url::Host::Domain(_)) => {}
        }
        let mut request = self.inner.http.post(url).header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let mut response = request.body(body).send().await.map_err(|e| classify(&e, self.inner.total_timeout))?;
        let status = response.status().as_u16();
        // The status decides the attempt; the body is read (bounded by the total
        // timeout and MAX_RESPONSE_BODY) only so the connection can be reused.
        let mut read = 0usize;
        while read < MAX_RESPONSE_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(status)
    }

    fn check(&self, ip: IpAddr) -> Result<(), AttemptError> {
        self.inner.policy.check(ip).map_err(|e| AttemptError::not_allowed(e.0))
    }
}

fn tls_config() -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Resolves with the system resolver (tokio) and keeps only the addresses the policy permits.
struct PolicyResolver {
    policy: AddressPolicy,
}

/// Every address the name resolved to was refused; the class of the first.
#[derive(Debug, thiserror::Error)]
#[error("the host resolves only to {0} addresses, which webhook deliveries may not reach")]
struct AddressNotAllowed(AddressClass);

#[derive(Debug, thiserror::Error)]
#[error("DNS lookup failed: {0}")]
struct DnsFailure(String);

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await.map_err(|e| DnsFailure(e.to_string()))?;
            let mut refused = None;
            let permitted: Vec<_> = resolved
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e.0);
                        false
                    }
                })
                .collect();
            if permitted.is_empty() {
                return Err(match refused {
                    Some(class) => Box::new(AddressNotAllowed(class)) as Box<dyn StdError + Send + Sync>,
                    None => Box::new(DnsFailure("no addresses".into())),
                });
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// The errors in `err`'s source chain, `err` first. `io::Error::source` skips
/// the error it wraps, so that one is visited explicitly.
fn chain<'a>(err: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        if out.len() >= 32 {
            break;
        }
        out.push(e);
        next = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    out
}

fn classify(err: &reqwest::Error, total_timeout: Duration) -> AttemptError {
    let errors = chain(err);
    for e in &errors {
        if let Some(AddressNotAllowed(class)) = e.downcast_ref::<AddressNotAllowed>() {
            return AttemptError::new("address_not_allowed", format!("{} ({})", e, class.as_str()));
        }
        if e.is::<DnsFailure>() {
            return AttemptError::new("dns", e.to_string());
        }
    }
    if err.is_timeout() {
        let what = if err.is_connect() { "connecting timed out" } else { "timed out" };
        return AttemptError::new("timeout", format!("{what} (total limit {} ms)", total_timeout.as_millis()));
    }
    if let Some(tls) = errors.iter().find(|e| e.is::<rustls::Error>()) {
        return AttemptError::new("tls", format!("TLS: {tls}"));
    }
    // The innermost message says most (e.g. "Connection refused (os error 111)")
    // and, unlike reqwest's own message, never contains the URL.
    let root = errors.last().filter(|e| !e.is::<reqwest::Error>()).map(|e| e.to_string());
    if err.is_connect() {
        return AttemptError::new("connect", root.unwrap_or_else(|| "connection failed".into()));
    }
    if err.is_builder() {
        return AttemptError::new("other", "the request could not be built (invalid header?)");
    }
    let what = if err.is_body() {
        "reading the response failed"
    } else if err.is_decode() {
        "decoding the response failed"
    } else {
        "the request failed"
    };
    AttemptError::new("other", root.unwrap_or_else(|| what.into()))
}

#[cfg(test)]
mod tests {
    //! Every receiver listens on loopback; no test sends traffic anywhere else.

    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    struct Request {
        head: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    struct Receiver {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        requests: mpsc::UnboundedReceiver<Request>,
    }

    /// A raw HTTP/1.1 receiver: answers every request with `response` after `delay`.
    async fn receiver_on(bind: &str, response: Vec<u8>, delay: Duration) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, requests) = mpsc::unbounded_channel();
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                let response = response.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else { return };
                    let _ = tx.send(request);
                    tokio::time::sleep(delay).await;
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Receiver { addr, connections, requests })
    }

    async fn receiver(response: &str) -> Receiver {
        receiver_on("127.0.0.1:0", response.as_bytes().to_vec(), Duration::ZERO).await.unwrap()
    }

    async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Request> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
        let headers: HashMap<String, String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Request { head, headers, body })
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

    fn loopback_allowed() -> AddressPolicy {
        AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()])
    }

    fn client(policy: AddressPolicy) -> WebhookClient {
        WebhookClient::new(policy, Duration::from_secs(2), Duration::from_secs(5)).unwrap()
    }

    fn body() -> Bytes {
        Bytes::from_static(br#"{"type":"payment.settled","data":{"id":"pay_1"}}"#)
    }

    fn reason(attempt: &Attempt) -> &'static str {
        attempt.error.as_ref().map(|e| e.reason).unwrap_or("none")
    }

    #[tokio::test]
    async fn webhook_client_delivers_headers_and_body_intact() {
        let mut rx = receiver(OK).await;
        let headers = [
            ("webhook-id", "msg_1".to_owned()),
            ("webhook-timestamp", "1700000000".to_owned()),
            ("webhook-signature", "v1,abc= v1,def=".to_owned()),
        ];
        let url = format!("http://{}/hooks/paygate?x=1", rx.addr);
        let attempt = client(loopback_allowed()).post(&url, &headers, body()).await;
        assert!(attempt.succeeded(), "{attempt:?}");
        assert_eq!(attempt.status, Some(200));
        assert!(attempt.error.is_none());

        let request = rx.requests.recv().await.unwrap();
        assert!(request.head.starts_with("POST /hooks/paygate?x=1 HTTP/1.1\r\n"), "{}", request.head);
        assert_eq!(request.body, body());
        let h = &request.headers;
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["user-agent"], USER_AGENT);
        assert_eq!(h["webhook-id"], "msg_1");
        assert_eq!(h["webhook-timestamp"], "1700000000");
        assert_eq!(h["webhook-signature"], "v1,abc= v1,def=");
        assert_eq!(h["content-length"], body().len().to_string());
    }

    #[tokio::test]
    async fn webhook_client_resolves_hostnames_through_the_policy() {
        // localhost → 127.0.0.1 passes the allow-list (a ::1 answer is dropped).
        let mut rx = receiver(OK).await;
        let url = format!("http://localhost:{}/", rx.addr.port());
        let attempt = client(loopback_allowed()).post(&url, &[], body()).await;
        assert!(attempt.succeeded(), "{attempt:?}");
        assert_eq!(rx.requests.recv().await.unwrap().body, body());
    }

    #[tokio::test]
    async fn webhook_client_refuses_forbidden_addresses_without_connecting() {
        let rx = receiver(OK).await;
        let port = rx.addr.port();
        let client = client(AddressPolicy::default());
        // IP literal (checked before sending), hostname (through the resolver), IPv6 literal.
        for url in
            [format!("http://127.0.0.1:{port}/"), format!("http://localhost:{port}/"), format!("http://[::1]:{port}/")]
        {
            let attempt = client.post(&url, &[], body()).await;
            assert!(!attempt.succeeded(), "{url}");
            assert_eq!(attempt.status, None, "{url}");
            let error = attempt.error.unwrap();
            assert_eq!(error.reason, "address_not_allowed", "{url}: {error:?}");
            assert!(error.detail.contains("loopback"), "{url}: {error:?}");
            assert!(!error.detail.contains(&port.to_string()), "the detail never carries the URL: {error:?}");
            if url.contains("localhost") {
                assert!(error.detail.contains("resolves only to"), "went through the resolver: {error:?}");
            }
        }
        // Mapped forms and other classes, without any listener.
        for url in
            ["http://[::ffff:127.0.0.1]:1/", "http://169.254.169.254/latest", "http://10.0.0.1/", "http://0.0.0.0:1/"]
        {
            let attempt = client.post(url, &[], body()).await;
            assert_eq!(reason(&attempt), "address_not_allowed", "{url}: {attempt:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(rx.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn webhook_client_refuses_ipv6_loopback_listener() {
        // With a real [::1] listener (when the host has IPv6 loopback): still refused, never connected.
        let Ok(rx) = receiver_on("[::1]:0", OK.as_bytes().to_vec(), Duration::ZERO).await else {
            eprintln!("no IPv6 loopback here; skipped");
            return;
        };
        let attempt = client(loopback_allowed()).post(&format!("http://{}/", rx.addr), &[], body()).await;
        assert_eq!(reason(&attempt), "address_not_allowed", "{attempt:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(rx.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn webhook_client_does_not_follow_redirects() {
        let target = receiver(OK).await;
        let redirect = format!(
            "HTTP/1.1 302 Found\r\nlocation: http://{}/stolen\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            target.addr
        );
        let mut rx = receiver(&redirect).await;
        let attempt = client(loopback_allowed()).post(&format!("http://{}/", rx.addr), &[], body()).await;
        assert!(!attempt.succeeded());
        assert_eq!(attempt.status, Some(302));
        assert_eq!(reason(&attempt), "http_status");
        assert!(rx.requests.recv().await.is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(target.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn webhook_client_times_out_slow_receivers() {
        let rx = receiver_on("127.0.0.1:0", OK.as_bytes().to_vec(), Duration::from_secs(3)).await.unwrap();
        let client =
            WebhookClient::new(loopback_allowed(), Duration::from_secs(1), Duration::from_millis(300)).unwrap();
        let attempt = client.post(&format!("http://{}/", rx.addr), &[], body()).await;
        assert_eq!(attempt.status, None);
        assert_eq!(reason(&attempt), "timeout", "{attempt:?}");
        assert!(attempt.latency >= Duration::from_millis(250), "{attempt:?}");
        assert!(attempt.latency < Duration::from_secs(2), "{attempt:?}");
    }

    #[tokio::test]
    async fn webhook_client_reports_server_errors() {
        let rx =
            receiver("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\noops").await;
        let attempt = client(loopback_allowed()).post(&format!("http://{}/", rx.addr), &[], body()).await;
        assert!(!attempt.succeeded());
        assert_eq!(attempt.status, Some(500));
        let error = attempt.error.unwrap();
        assert_eq!(error.reason, "http_status");
        assert_eq!(error.detail, "HTTP 500");
    }

    #[tokio::test]
    async fn webhook_client_reads_at_most_64_kib_of_a_large_response() {
        // A receiver announcing 1 GiB and sending until the client hangs up;
        // it reports how much it managed to send.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await.unwrap();
            let total = 1usize << 30;
            let mut sent = 0;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n");
            if stream.write_all(head.as_bytes()).await.is_ok() {
                let chunk = vec![b'x'; 64 * 1024];
                while sent < total && stream.write_all(&chunk).await.is_ok() {
                    sent += chunk.len();
                }
            }
            let _ = sent_tx.send(sent);
        });
        let attempt = client(loopback_allowed()).post(&format!("http://{addr}/"), &[], body()).await;
        assert!(attempt.succeeded(), "{attempt:?}");
        let sent = tokio::time::timeout(Duration::from_secs(10), sent_rx).await.unwrap().unwrap();
        // What the client read plus what the kernel's socket buffers held when
        // it closed the connection; an unbounded read takes the whole GiB (or
        // as much as the total timeout allows).
        assert!(sent < 32 * 1024 * 1024, "the receiver could send {sent} bytes");
    }

    #[tokio::test]
    async fn webhook_client_classifies_refused_connections_and_bad_urls() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let client = client(loopback_allowed());
        let attempt = client.post(&format!("http://127.0.0.1:{port}/"), &[], body()).await;
        assert_eq!(reason(&attempt), "connect", "{attempt:?}");
        assert!(attempt.error.unwrap().detail.len() <= MAX_DETAIL);

        for bad in ["not a url", "ftp://127.0.0.1/", "http://"] {
            assert_eq!(reason(&client.post(bad, &[], body()).await), "invalid_url", "{bad}");
        }
    }

    #[tokio::test]
    async fn webhook_client_classifies_tls_failures() {
        // A plain-text server answering a TLS ClientHello.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let attempt = client(loopback_allowed()).post(&format!("https://{addr}/"), &[], body()).await;
        assert_eq!(reason(&attempt), "tls", "{attempt:?}");
    }

    #[test]
    fn webhook_client_tls_is_ring_backed() {
        let config = tls_config().unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        let suites = |p: &rustls::crypto::CryptoProvider| p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>();
        let ring = rustls::crypto::ring::default_provider();
        assert!(!ring.cipher_suites.is_empty());
        assert_eq!(suites(config.crypto_provider()), suites(&ring));
    }
}
