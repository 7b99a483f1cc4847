//! The scenarios of issue 7, as data: what is sent, to which server, which
//! status every answer must have, and whose CPU is counted.

use crate::oha::{Load, Request};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// 1. Bare axum hello server: the ceiling of the HTTP stack.
    Baseline,
    /// 2. `GET /v1/me` with a valid cached key: auth, scope, limits, audit.
    Me,
    /// 3. `GET /v1/payments/{id}`: pipeline plus a store read (once payments exist).
    PaymentGet,
    /// 4. `POST /v1/payments` with fresh idempotency keys (once payments exist).
    PaymentCreate,
    /// 5a. Keys whose checksum is wrong: refused at parsing.
    FloodBadChecksum,
    /// 5b. Well-formed keys that do not exist: refused after a store lookup.
    FloodUnknownKey,
    /// 5c. A valid key far over its own rate limit.
    FloodOverLimit,
    /// 6. nginx with a key map and limit_req, proxying to the hello server.
    Peer,
    /// Scenario 2 at a fixed offered rate (open loop), for its p99.
    OpenLoop,
}

/// Where a scenario's requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Hello,
    Nginx,
    /// Paygate on each configured backend.
    Paygate {
        also_postgres: bool,
    },
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Self::Baseline,
        Self::Me,
        Self::PaymentGet,
        Self::PaymentCreate,
        Self::FloodBadChecksum,
        Self::FloodUnknownKey,
        Self::FloodOverLimit,
        Self::Peer,
        Self::OpenLoop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "1 baseline (axum hello)",
            Self::Me => "2 GET /v1/me",
            Self::PaymentGet => "3 GET /v1/payments/{id}",
            Self::PaymentCreate => "4 POST /v1/payments",
            Self::FloodBadChecksum => "5a flood: bad checksum",
            Self::FloodUnknownKey => "5b flood: unknown key",
            Self::FloodOverLimit => "5c flood: over rate limit",
            Self::Peer => "6 peer: nginx + hello",
            Self::OpenLoop => "2 at fixed offered rate",
        }
    }

    pub fn server(self) -> Server {
        match self {
            Self::Baseline => Server::Hello,
            Self::Peer => Server::Nginx,
            Self::Me | Self::PaymentGet | Self::PaymentCreate => Server::Paygate { also_postgres: true },
            Self::FloodBadChecksum | Self::FloodUnknownKey | Self::FloodOverLimit | Self::OpenLoop => {
                Server::Paygate { also_postgres: false }
            }
        }
    }

    /// The status every answer must carry; anything else is counted as unexpected.
    pub fn expected_status(self) -> u16 {
        match self {
            Self::PaymentCreate => 201,
            Self::FloodBadChecksum | Self::FloodUnknownKey => 401,
            Self::FloodOverLimit => 429,
            _ => 200,
        }
    }

    /// Sent by our own sender with a fresh `Idempotency-Key` per request, not by oha.
    pub fn fresh_idempotency_keys(self) -> bool {
        self == Self::PaymentCreate
    }

    /// API paths that must exist in the `paygate` build for the scenario to run.
    pub fn needs_paths(self) -> &'static [&'static str] {
        match self {
            Self::PaymentGet => &["/v1/payments/{id}"],
            Self::PaymentCreate => &["/v1/payments"],
            _ => &[],
        }
    }
}

/// What the scenario's requests carry, given the seeded keys.
pub struct Keys<'a> {
    pub valid: &'a str,
    pub bad_checksum: &'a str,
    pub unknown: &'a str,
    pub over_limit: &'a str,
}

/// What `seed_payment` left on a Paygate for scenarios 3 and 4.
#[derive(Debug, Clone)]
pub struct PaymentSeed {
    pub payee_id: String,
    pub payment_id: String,
}

/// The body of scenario 4's payments (each request gets its own Idempotency-Key).
pub fn payment_body(payee_id: &str) -> String {
    serde_json::json!({"payee_id": payee_id, "amount": 1234, "currency": "EUR", "reference": "bench"}).to_string()
}

/// The request of `scenario` against a server at `base` (`http://host:port`).
/// Payments: `payments` is what was seeded for scenarios 3 and 4.
pub fn request(
    scenario: Scenario,
    base: &str,
    keys: &Keys<'_>,
    payments: Option<&PaymentSeed>,
) -> anyhow::Result<Request> {
    let bearer = |key: &str| vec![("Authorization".to_owned(), format!("Bearer {key}"))];
    Ok(match scenario {
        Scenario::Baseline => Request { method: "GET", url: format!("{base}/"), ..Request::default() },
        Scenario::Me | Scenario::OpenLoop | Scenario::Peer => {
            Request { method: "GET", url: format!("{base}/v1/me"), headers: bearer(keys.valid), body: None }
        }
        Scenario::FloodBadChecksum => {
            Request { method: "GET", url: format!("{base}/v1/me"), headers: bearer(keys.bad_checksum), body: None }
        }
        Scenario::FloodUnknownKey => {
            Request { method: "GET", url: format!("{base}/v1/me"), headers: bearer(keys.unknown), body: None }
        }
        Scenario::FloodOverLimit => {
            Request { method: "GET", url: format!("{base}/v1/me"), headers: bearer(keys.over_limit), body: None }
        }
        Scenario::PaymentGet => {
            let seed = payments.ok_or_else(|| anyhow::anyhow!("no payment seeded for scenario 3"))?;
            let url = format!("{base}/v1/payments/{}", seed.payment_id);
            Request { method: "GET", url, headers: bearer(keys.valid), body: None }
        }
        Scenario::PaymentCreate => {
            // The Idempotency-Key is added per request by our own sender
            // (`sender.rs`): oha 1.16 varies URLs and bodies, not headers.
            let seed = payments.ok_or_else(|| anyhow::anyhow!("no payee seeded for scenario 4"))?;
            Request {
                method: "POST",
                url: format!("{base}/v1/payments"),
                headers: bearer(keys.valid),
                body: Some(payment_body(&seed.payee_id)),
            }
        }
    })
}

/// The load of a scenario.
pub fn load(scenario: Scenario, connections: u32, open_rate: u32) -> Load {
    match scenario {
        // Enough connections that the offered rate does not wait on answers.
        Scenario::OpenLoop => Load::Open { connections: connections.max(open_rate / 50), rate: open_rate },
        _ => Load::Closed { connections },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_has_a_name_and_a_server() {
        for s in Scenario::ALL {
            assert!(!s.name().is_empty());
            let _ = s.server();
        }
        assert_eq!(Scenario::FloodOverLimit.expected_status(), 429);
        assert_eq!(Scenario::FloodUnknownKey.expected_status(), 401);
    }

    #[test]
    fn requests_carry_the_right_key() {
        let keys = Keys { valid: "V", bad_checksum: "B", unknown: "U", over_limit: "L" };
        let r = request(Scenario::FloodUnknownKey, "http://h", &keys, None).unwrap();
        assert_eq!(r.headers[0].1, "Bearer U");
        let r = request(Scenario::Baseline, "http://h", &keys, None).unwrap();
        assert!(r.headers.is_empty() && r.url == "http://h/");
        assert!(request(Scenario::PaymentGet, "http://h", &keys, None).is_err());
        assert!(request(Scenario::PaymentCreate, "http://h", &keys, None).is_err());
    }

    #[test]
    fn payment_requests() {
        let keys = Keys { valid: "V", bad_checksum: "B", unknown: "U", over_limit: "L" };
        let seed = PaymentSeed { payee_id: "pye_1".into(), payment_id: "pay_2".into() };
        let r = request(Scenario::PaymentGet, "http://h", &keys, Some(&seed)).unwrap();
        assert_eq!((r.method, r.url.as_str(), r.body), ("GET", "http://h/v1/payments/pay_2", None));
        let r = request(Scenario::PaymentCreate, "http://h", &keys, Some(&seed)).unwrap();
        assert_eq!((r.method, r.url.as_str()), ("POST", "http://h/v1/payments"));
        assert_eq!(r.headers[0].1, "Bearer V");
        let body: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["payee_id"], "pye_1");
        assert_eq!(body["amount"], 1234);
        assert!(Scenario::PaymentCreate.fresh_idempotency_keys() && !Scenario::PaymentGet.fresh_idempotency_keys());
    }

    #[test]
    fn open_loop_has_enough_connections() {
        match load(Scenario::OpenLoop, 50, 10_000) {
            Load::Open { connections, rate } => assert_eq!((connections, rate), (200, 10_000)),
            other => panic!("{other:?}"),
        }
    }
}
