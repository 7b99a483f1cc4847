//! Scenario 1's server: bare axum on the same tokio/hyper/axum as Paygate,
//! multi-thread runtime, nothing else. The ceiling of the HTTP stack, and the
//! upstream behind nginx in the peer scenario.

use std::io::Write;
use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;

async fn hello() -> &'static str {
    "hello"
}

/// Serves until killed; prints `listening on ADDR` once bound.
pub fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // `/v1/me` too, so nginx can pass the path through unchanged.
        let app = Router::new().route("/", get(hello)).route("/v1/me", get(hello));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}
