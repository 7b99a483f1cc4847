//! Canonical encoding + chain hashing of one typical audit record.
//! Run: `cargo bench -p paygate-domain --bench audit_hash`.

use criterion::{Criterion, criterion_group, criterion_main};
use paygate_domain::AuditEventId;
use paygate_domain::audit::{ActorKind, AuditEntry, AuditRecord, Outcome, canonical};

fn entry() -> AuditEntry {
    AuditEntry {
        id: AuditEventId::generate(),
        chain: "cmp_0356ArnsZ9yDF66iBcwD6h".into(),
        occurred_at: paygate_domain::now(),
        actor_kind: ActorKind::ApiKey,
        actor_id: Some("key_0356ArnsZ9yDF66iBcwD6h".into()),
        actor_name: Some("erp@acme.test".into()),
        action: "api_key.read",
        resource_type: Some("api_key".into()),
        resource_id: Some("key_0356ArnsZ9yDF66iBcwD6i".into()),
        outcome: Outcome::Success,
        status: 200,
        request_id: Some("req_0356ArnsZ9yDF66iBcwD6j".into()),
        client_ip: Some("203.0.113.7".into()),
        user_agent: Some("erp-sync/2.1 (+https://example.test)".into()),
        details: "{\"method\":\"GET\",\"route\":\"/v1/api-keys/{id}\"}".into(),
    }
}

fn audit_hash(c: &mut Criterion) {
    let e = entry();
    let mut group = c.benchmark_group("audit");
    group.bench_function("canonical_encoding", |b| b.iter(|| canonical(std::hint::black_box(&e), 42)));
    group.bench_function("encode_and_chain_hash", |b| {
        b.iter(|| AuditRecord::append(std::hint::black_box(e.clone()), 41, [7; 32]))
    });
    group.finish();
}

criterion_group!(benches, audit_hash);
criterion_main!(benches);
