//! The API's HTTP server: hyper, HTTP/1 and h2c on one port, with the same
//! bounds on both protocols (hyper's `auto` builder configures them
//! separately: HTTP/1 settings do not reach HTTP/2):
//! - a bound on open connections per node (`paygate_http_connections_open`,
//!   refusals counted in `paygate_http_connections_refused_total`);
//! - an idle timeout on every connection, whatever the protocol: a client that
//!   sent only the HTTP/2 preface, or nothing, is closed;
//! - header size: HTTP/1 read buffer and HTTP/2 header list both bounded;
//! - HTTP/2 streams per connection, and keep-alive pings that close a
//!   connection whose peer stopped answering;
//! - graceful shutdown (stop accepting, let in-flight requests finish).
//!
//! Body size and the request timeout are router layers: they apply to both.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Bounds of the API listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A client must send its request headers within this time (HTTP/1).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections per node; beyond it, new ones are closed at once.
    pub max_connections: usize,
}

/// HTTP/1 read buffer: bounds the whole request head (hyper answers a bare
/// 431 beyond it; the router's own check answers problem+json below it).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 header list, decoded.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 100;
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle connection told to close may take to do so.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Requests in flight on one connection and when it last finished one.
struct Activity {
    in_flight: AtomicUsize,
    last_millis: AtomicU64,
    born: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last_millis.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        Some(self.born.elapsed().saturating_sub(last))
    }
}

/// Decrements the in-flight count when the response future ends (or is dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` until `stop` turns true, then waits up to `drain` for the
/// connections in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
    limits: ConnectionLimits,
    drain: Duration,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = metrics::gauge!("paygate_http_connections_open");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics::counter!("paygate_http_connections_refused_total").increment(1);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                open.increment(1.0);
                let activity = Arc::new(Activity {
                    in_flight: AtomicUsize::new(0),
                    last_millis: AtomicU64::new(0),
                    born: Instant::now(),
                });
                let tracked = activity.clone();
                let service = router.clone().layer(axum::Extension(ConnectInfo(peer)));
                // Counted from the call until the response is ready (bodies
                // are buffered), so a slow handler is never mistaken for idleness.
                let service = tower::ServiceBuilder::new()
                    .map_future(move |response| {
                        tracked.in_flight.fetch_add(1, Ordering::AcqRel);
                        let guard = InFlight(tracked.clone());
                        async move {
                            let response = response.await;
                            drop(guard);
                            response
                        }
                    })
                    .service(service);
                let builder = builder.clone();
                let mut stop = stop.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
                    let mut connection = pin!(connection);
                    let mut closing = false;
                    // HTTP/2's graceful close waits for the peer to answer a
                    // PING; a peer that never does is dropped after a grace.
                    let mut drop_at: Option<tokio::time::Instant> = None;
                    let mut check = tokio::time::interval(limits.idle_timeout.min(Duration::from_secs(1)).max(Duration::from_millis(50)));
                    loop {
                        tokio::select! {
                            _ = connection.as_mut() => break,
                            _ = check.tick(), if !closing => {
                                if activity.idle_for().is_some_and(|idle| idle >= limits.idle_timeout) {
                                    metrics::counter!("paygate_http_connections_idle_closed_total").increment(1);
                                    connection.as_mut().graceful_shutdown();
                                    closing = true;
                                    drop_at = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                                }
                            }
                            _ = async { tokio::time::sleep_until(drop_at.unwrap_or_else(tokio::time::Instant::now)).await }, if drop_at.is_some() => break,
                            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) }, if !closing => {
                                connection.as_mut().graceful_shutdown();
                                closing = true;
                            }
                        }
                    }
                    open.decrement(1.0);
                    drop(slot);
                });
            }
            // `wait_for`'s guard is not Send: map it away inside the branch future.
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
        }
    }
    drop(listener);
    // Every connection holds a slot until it ends: all slots back means drained.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("connections still open after the drain period; closing");
    }
}
