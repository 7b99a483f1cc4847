//! The client address of a request (design.md §2 step 2): the TCP peer, or the
//! last untrusted hop of `X-Forwarded-For` when the peer is a trusted proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;

/// The resolved client address, as a request extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

pub async fn middleware(State(trusted): State<Arc<Vec<IpNet>>>, mut request: Request, next: Next) -> Response {
    // Without connection info (never the case when served) the address is
    // unspecified, which no allow-list entry except 0.0.0.0/0 matches.
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let forwarded = if trusted.is_empty() {
        None
    } else {
        // Several X-Forwarded-For lines are one comma-separated list (RFC 9110 §5.3).
        // Bytes, not `to_str`: one bad byte spoils only its own hop.
        let values: Vec<String> = request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    let client = paygate_domain::network::client_address(peer, forwarded.as_deref(), &trusted);
    tracing::Span::current().record("client_ip", tracing::field::display(client));
    request.extensions_mut().insert(ClientAddr(client));
    next.run(request).await
}
