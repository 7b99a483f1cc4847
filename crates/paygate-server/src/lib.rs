//! The `paygate` binary's library: configuration, wiring, CLI commands. The
//! integration tests start the real server through [`app::start`].

pub mod admin;
pub mod app;
pub mod audit_verify;
pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
pub mod ops;
pub mod pepper;
pub mod rail;
pub mod telemetry;
pub mod webhook_client;
pub mod webhook_listen;
pub mod webhooks;

/// reqwest is built without a TLS provider of its own (ring only, never
/// aws-lc): installs ring as the process default, for every client that is
/// not handed a configuration. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
