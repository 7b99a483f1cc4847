//! Paygate's integration suite: the real server on 127.0.0.1:0, real HTTP, a
//! fresh database per test. Every case runs on SQLite, and on PostgreSQL when
//! `PAYGATE_TEST_POSTGRES_URL` is set (CI sets it and fails if unreachable).

mod harness;

mod audit;
mod auth;
mod ceilings;
mod cli;
mod docs;
mod errors;
mod keys;
mod lifecycle;
mod openapi;
mod ops;
mod payments;
mod process;
mod ratelimit;
mod secrets;
mod shared_limits;
mod tenancy;
mod webhooks;
mod wire;
