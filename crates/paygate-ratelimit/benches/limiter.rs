//! One limiter decision: in process (ns) and on Redis over loopback (µs).
//! Run: `cargo bench -p paygate-ratelimit --bench limiter`
//! (the Redis case runs when `PAYGATE_TEST_REDIS_URL` or `PAYGATE_REDIS_URL` is set).

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use paygate_ratelimit::{Limit, MemoryLimiter, Mode, Quota, RateLimiter, RedisLimiter};

fn limits(i: u64) -> Vec<Limit> {
    vec![
        Limit {
            policy: "key",
            key: paygate_ratelimit::LimitKey::format(format_args!("bench:key:{}", i % 1000)),
            quota: Quota::new(1_000_000, 1_000_000),
        },
        Limit { policy: "company", key: "bench:company".into(), quota: Quota::new(1_000_000, 1_000_000) },
    ]
}

fn limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter");
    let memory = MemoryLimiter::new(100_000);
    let mut i = 0u64;
    group.bench_function("memory_key_and_company", |b| {
        b.iter(|| {
            i += 1;
            memory.decide(&limits(i), Mode::Consume)
        })
    });
    let url = std::env::var("PAYGATE_TEST_REDIS_URL").or_else(|_| std::env::var("PAYGATE_REDIS_URL"));
    if let Ok(url) = url {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let redis = runtime
            .block_on(RedisLimiter::connect(&url, "paygate:bench:", Duration::from_millis(500)))
            .expect("Redis reachable");
        let mut j = 0u64;
        group.bench_function("redis_key_and_company", |b| {
            b.to_async(&runtime).iter(|| {
                j += 1;
                let redis = redis.clone();
                let l = limits(j);
                async move { redis.check(&l, Mode::Consume).await.unwrap() }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, limiter);
criterion_main!(benches);
