//! Heap allocations per request on the secured path: the real server
//! (`app::start`, production wiring: audit on, metrics recorder, info-level
//! text logs into a sink) on a fresh SQLite database, driven over loopback
//! HTTP/1.1 keep-alive by a client that allocates nothing per request, with a
//! counting global allocator. The count covers every thread of the process
//! (audit writer, SQLite worker, log formatting), divided by the requests.
//! Run: `cargo bench -p paygate-server --bench allocations`
//! (`BENCH_REQUESTS=20000` to change the sample).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

use paygate_domain::{KeyHasher, KeyMode, Label, Pepper, ScopeSet};
use paygate_server::admin::{KeyRequest, create_key, operator_entry};
use paygate_server::app::{self, StartOptions};
use paygate_server::config::Config;
use paygate_store::NewCompany;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are the only addition.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One keep-alive connection sending a fixed request; reads each answer into a
/// reused buffer (Content-Length framing) and returns its status.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    buffer: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr, request: String) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, request: request.into_bytes(), buffer: vec![0; 64 * 1024] }
    }

    fn send(&mut self) -> u16 {
        self.stream.write_all(&self.request).unwrap();
        let mut filled = 0;
        loop {
            let n = self.stream.read(&mut self.buffer[filled..]).unwrap();
            assert!(n > 0, "server closed the connection");
            filled += n;
            let head = &self.buffer[..filled];
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let text = std::str::from_utf8(&head[..end]).unwrap();
            let length: usize = text
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if filled >= end + 4 + length {
                assert_eq!(filled, end + 4 + length, "one answer per request");
                return text[9..12].parse().unwrap();
            }
        }
    }
}

fn measure(name: &str, client: &mut Client, expected: u16, requests: u64) {
    for _ in 0..requests / 5 + 100 {
        assert_eq!(client.send(), expected, "{name}: warm-up status");
    }
    let (a0, b0) = (ALLOCATIONS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
    for _ in 0..requests {
        assert_eq!(client.send(), expected, "{name}: status");
    }
    let (a1, b1) = (ALLOCATIONS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
    println!(
        "{name:<28} {:>8.1} allocations/request {:>9.0} bytes/request ({requests} requests)",
        (a1 - a0) as f64 / requests as f64,
        (b1 - b0) as f64 / requests as f64,
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let requests: u64 = std::env::var("BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    // The server's own log format and level, into a sink: formatting is counted, output is not.
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_writer(std::io::sink).with_ansi(false).try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unlimited = "1000000/1000000";
    let env: BTreeMap<String, String> = [
        ("PAYGATE_DATABASE_URL", format!("sqlite://{}", dir.path().join("bench.db").display())),
        ("PAYGATE_LISTEN", "127.0.0.1:0".into()),
        ("PAYGATE_OPS_LISTEN", "127.0.0.1:0".into()),
        ("PAYGATE_KEY_RATE_LIMIT", unlimited.into()),
        ("PAYGATE_COMPANY_RATE_LIMIT", unlimited.into()),
        ("PAYGATE_CLIENT_RATE_LIMIT", unlimited.into()),
        ("PAYGATE_AUTH_FAILURE_LIMIT", "1000000/1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = Config::from_sources(None, env).unwrap();
    let (server, key) = runtime.block_on(async {
        let server = app::start(&config, StartOptions::default()).await.unwrap();
        let new = NewCompany::new(Label::parse("Bench").unwrap());
        let record = operator_entry("company.create", new.id, ("company", new.id.to_string()), Default::default());
        let company = server.store.create_company(new, &record).await.unwrap();
        let request = KeyRequest {
            company: company.id,
            name: "bench",
            owner: "bench",
            scopes: ScopeSet::parse_list("payments:read").unwrap(),
            mode: KeyMode::Live,
            expires_in: None,
            allowed_cidrs: Default::default(),
        };
        let (_, text) = create_key(&*server.store, &server.hasher, request).await.unwrap();
        (server, text.to_string())
    });
    let addr = server.api_addr;
    let get = |authorization: &str| {
        format!("GET /v1/me HTTP/1.1\r\nhost: bench\r\nuser-agent: bench\r\nauthorization: {authorization}\r\n\r\n")
    };
    // Same shape as the valid key, last character changed: the checksum fails.
    let mut bad_checksum = key.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'A' { 'B' } else { 'A' });
    // Checksum-valid, found nowhere: a cache miss (and a store read unless cached as absent).
    let other_pepper = Pepper::from_hex(1, &Pepper::generate_hex()).unwrap();
    let unknown = KeyHasher::new(&other_pepper).generate(KeyMode::Live).text.to_string();

    println!("heap allocations per request, whole process, real server over loopback HTTP/1.1");
    measure("GET /v1/me (valid key)", &mut Client::new(addr, get(&format!("Bearer {key}"))), 200, requests);
    measure("bad checksum (401)", &mut Client::new(addr, get(&format!("Bearer {bad_checksum}"))), 401, requests);
    measure("unknown key (401)", &mut Client::new(addr, get(&format!("Bearer {unknown}"))), 401, requests);
    runtime.block_on(server.shutdown());
}
