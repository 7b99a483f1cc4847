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
