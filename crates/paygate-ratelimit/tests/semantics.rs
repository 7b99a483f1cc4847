//! The same behaviour from the in-process and the Redis backend. The Redis
//! cases run when `PAYGATE_TEST_REDIS_URL` is set (CI sets it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use paygate_ratelimit::{Limit, MemoryLimiter, Mode, Quota, RateLimiter, RedisLimiter};

fn unique(prefix: &str) -> String {
    format!("{prefix}:{}:{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ rand_ish())
}

fn rand_ish() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

async fn backends() -> Vec<(&'static str, Arc<dyn RateLimiter>)> {
    let mut out: Vec<(&'static str, Arc<dyn RateLimiter>)> = vec![("memory", Arc::new(MemoryLimiter::new(10_000)))];
    match std::env::var("PAYGATE_TEST_REDIS_URL") {
        Ok(url) => {
            let prefix = format!("paygate:test:{}:", unique("rl"));
            let redis =
                RedisLimiter::connect(&url, &prefix, Duration::from_millis(500)).await.expect("Redis reachable");
            out.push(("redis", Arc::new(redis)));
        }
        Err(_) => assert!(std::env::var_os("CI").is_none(), "CI is set but PAYGATE_TEST_REDIS_URL is not"),
    }
    out
}

fn limit(policy: &'static str, key: &str, rate: u32, burst: u32) -> Limit {
    Limit { policy, key: key.into(), quota: Quota::new(rate, burst) }
}

#[tokio::test]
async fn burst_is_exact_and_the_rate_refills() {
    for (name, limiter) in backends().await {
        let l = [limit("key", &unique("burst"), 20, 5)];
        let mut admitted = 0;
        for _ in 0..8 {
            if limiter.check(&l, Mode::Consume).await.unwrap().allowed() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5, "{name}: burst");
        let refused = limiter.check(&l, Mode::Consume).await.unwrap();
        let retry = refused.tightest().unwrap().retry_after_us;
        assert!(retry > 0 && retry <= 50_000, "{name}: retry after {retry} µs");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(limiter.check(&l, Mode::Consume).await.unwrap().allowed(), "{name}: refilled after one interval");
    }
}

#[tokio::test]
async fn steady_rate_is_accurate() {
    for (name, limiter) in backends().await {
        let l = [limit("key", &unique("steady"), 50, 1)];
        let started = Instant::now();
        let mut admitted = 0u32;
        while started.elapsed() < Duration::from_millis(1000) {
            if limiter.check(&l, Mode::Consume).await.unwrap().allowed() {
                admitted += 1;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // 50/s for 1 s, plus the first request at t=0.
        assert!((45..=56).contains(&admitted), "{name}: admitted {admitted} in 1 s at 50/s");
    }
}

#[tokio::test]
async fn a_refusal_consumes_nothing_anywhere() {
    for (name, limiter) in backends().await {
        let company = unique("company");
        let key_a = unique("a");
        let key_b = unique("b");
        // Two keys of one company: the company limit aggregates them. Slow
        // rates, so nothing refills while the test runs.
        let a = [limit("key", &key_a, 1, 3), limit("company", &company, 1, 4)];
        let b = [limit("key", &key_b, 1, 3), limit("company", &company, 1, 4)];
        for _ in 0..3 {
            assert!(limiter.check(&a, Mode::Consume).await.unwrap().allowed(), "{name}");
        }
        assert!(limiter.check(&b, Mode::Consume).await.unwrap().allowed(), "{name}: company has one left");
        let refused = limiter.check(&b, Mode::Consume).await.unwrap();
        assert!(!refused.allowed());
        assert_eq!(refused.tightest().unwrap().policy, "company", "{name}");
        // Key b's own limit was not charged for the refused request.
        let peek = limiter.check(&[limit("key", &key_b, 1, 3)], Mode::Peek).await.unwrap();
        assert_eq!(peek.outcomes[0].remaining, 1, "{name}: 3 - 1 used - 1 for the peek itself");
    }
}

#[tokio::test]
async fn peeking_never_consumes() {
    for (name, limiter) in backends().await {
        let l = [limit("auth_failures", &unique("peek"), 1, 2)];
        for _ in 0..10 {
            assert!(limiter.check(&l, Mode::Peek).await.unwrap().allowed(), "{name}");
        }
        assert!(limiter.check(&l, Mode::Consume).await.unwrap().allowed());
        assert!(limiter.check(&l, Mode::Consume).await.unwrap().allowed());
        assert!(!limiter.check(&l, Mode::Peek).await.unwrap().allowed(), "{name}");
    }
}

#[tokio::test]
async fn concurrent_checks_never_over_admit() {
    for (name, limiter) in backends().await {
        let key = unique("race");
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let limiter = limiter.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                limiter.check(&[limit("key", &key, 1, 10)], Mode::Consume).await.unwrap().allowed()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap() as u32;
        }
        assert_eq!(admitted, 10, "{name}");
    }
}

/// A client that sends while `remaining` says it may and otherwise waits the
/// advertised time for more quota is never refused, gets exactly the window
/// ceiling from a fresh bucket over several windows, and no window of the
/// advertised length ever holds more than the advertised quota.
#[tokio::test]
async fn a_client_following_the_advertised_quota_gets_exactly_it() {
    for (name, limiter) in backends().await {
        // 4/s, burst 3: the burst refills in 750 ms, so the advertised window
        // is 1 s and its quota 3 + 4 − 1 = 6.
        let quota = Quota::new(4, 3);
        let window = Duration::from_micros(quota.refill_us().div_ceil(1_000_000) * 1_000_000);
        let advertised = quota.max_in_window(window.as_micros() as u64);
        assert_eq!((window, advertised), (Duration::from_secs(1), 6));
        let l = [Limit { policy: "key", key: unique("follow").into(), quota }];
        let run = window * 3;
        let started = Instant::now();
        // (sent, answered) of every admitted request, client clock.
        let mut admitted: Vec<(Instant, Instant)> = Vec::new();
        while started.elapsed() < run {
            let sent = Instant::now();
            let decision = limiter.check(&l, Mode::Consume).await.unwrap();
            let answered = Instant::now();
            let outcome = *decision.tightest().unwrap();
            assert!(decision.allowed(), "{name}: refused after following the headers: {outcome:?}");
            admitted.push((sent, answered));
            if outcome.remaining == 0 {
                tokio::time::sleep(Duration::from_micros(outcome.more_quota_us())).await;
            }
        }
        // From a fresh bucket the run admits its own ceiling: 3 + 12 − 1.
        assert_eq!(admitted.len() as u64, quota.max_in_window(run.as_micros() as u64), "{name}");
        // Requests sent and answered within one window were admitted within
        // it by the limiter's clock too; there are never more than advertised.
        for (i, (first_sent, _)) in admitted.iter().enumerate() {
            let within = admitted[i..].iter().take_while(|(_, answered)| *answered < *first_sent + window).count();
            assert!(within as u64 <= advertised, "{name}: {within} admitted within one window");
        }
        let first_window = admitted.iter().filter(|(sent, _)| *sent < started + window).count();
        assert_eq!(first_window as u64, advertised, "{name}: the first window admits its quota exactly");
    }
}
