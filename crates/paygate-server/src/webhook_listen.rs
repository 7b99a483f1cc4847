//! `paygate webhooks listen`: a local receiver for trying webhooks. Prints one
//! line per delivery and checks its signature the way an integrator should
//! (Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use paygate_domain::webhook::{WebhookSecret, verify_with_secret};
use zeroize::Zeroizing;

/// Deliveries older or newer than this (seconds) are refused as replays.
pub const TOLERANCE_SECS: i64 = 300;

struct Listener {
    secret: Option<WebhookSecret>,
}

pub async fn listen(addr: SocketAddr, secret: Option<String>) -> anyhow::Result<()> {
    let secret = secret.map(Zeroizing::new);
    let secret = match secret.as_deref().map(|s| s.trim()) {
        None | Some("") => None,
        Some(text) => {
            Some(WebhookSecret::parse(text).ok_or_else(|| anyhow::anyhow!("--secret is not a whsec_ signing secret"))?)
        }
    };
    let checked = if secret.is_some() { "signatures checked" } else { "signatures NOT checked (no --secret)" };
    let state = Arc::new(Listener { secret });
    let router = axum::Router::new().fallback(axum::routing::post(receive)).with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}/ ({checked}); Ctrl-C stops", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.ok().unwrap_or(()) })
        .await?;
    Ok(())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn receive(State(state): State<Arc<Listener>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = header(&headers, "webhook-id");
    let verdict = match &state.secret {
        None => Ok("unchecked"),
        Some(secret) => verify_with_secret(
            secret,
            id,
            header(&headers, "webhook-timestamp"),
            header(&headers, "webhook-signature"),
            &body,
            time::OffsetDateTime::now_utc().unix_timestamp(),
            TOLERANCE_SECS,
        )
        .map(|()| "verified"),
    };
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |k: &str| event[k].as_str().unwrap_or("?").to_owned();
    let status = event["data"]["object"]["status"].as_str().map(|s| format!(" status={s}")).unwrap_or_default();
    match verdict {
        Ok(v) => {
            println!(
                "{id} {} {} seq={}{status} signature {v}",
                text("type"),
                text("object_id"),
                event["sequence"].as_u64().unwrap_or(0)
            );
            StatusCode::NO_CONTENT
        }
        Err(e) => {
            println!("{id} REFUSED: {e}");
            StatusCode::BAD_REQUEST
        }
    }
}
