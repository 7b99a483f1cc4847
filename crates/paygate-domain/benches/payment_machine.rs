//! The payment rules a request runs in process: validating a bank account,
//! sealing its number, and a payment's life through the status machine
//! (create, two four-eyes approvals, settlement).
//! Run: `cargo bench -p paygate-domain --bench payment_machine`.

use criterion::{Criterion, criterion_group, criterion_main};
use paygate_domain::bank::{BankAccount, BankAccountInput, DataKey};
use paygate_domain::payment::{Actor, ApprovalPolicy, Metadata, Payment, PaymentDraft, SettlementStep};
use paygate_domain::{Amount, CompanyId, Currency, KeyMode, PayeeId};

fn actor(n: u8, owner: &str) -> Actor {
    Actor {
        kind: "api_key".into(),
        id: format!("key_{n}"),
        owner: Some(owner.into()),
        principal: Some(format!("key_{n}")),
    }
}

fn payment_machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("payment");
    let input = BankAccountInput {
        scheme: "iban".into(),
        iban: Some("DE89 3704 0044 0532 0130 00".into()),
        ..Default::default()
    };
    group.bench_function("iban_parse", |b| b.iter(|| BankAccount::parse(std::hint::black_box(&input)).unwrap()));
    let key = DataKey::new(&[7; 32]).unwrap();
    let account = BankAccount::parse(&input).unwrap();
    let company = CompanyId::generate();
    group.bench_function("seal_and_fingerprint", |b| {
        b.iter(|| (key.seal(&account, company, "pye_1"), key.fingerprint(&account, company, KeyMode::Test)))
    });
    let policy = ApprovalPolicy::demo();
    let draft = PaymentDraft {
        payee_id: PayeeId::generate(),
        amount: Amount::new(200_000_000).unwrap(),
        currency: Currency::parse("EUR").unwrap(),
        reference: "INV-2026-001".into(),
        requested_execution_date: None,
        metadata: Metadata::default(),
    };
    let now = paygate_domain::now();
    group.bench_function("create_approve_twice_settle", |b| {
        b.iter(|| {
            let mut p = Payment::create(draft.clone(), KeyMode::Test, actor(1, "erp"), &policy, now);
            p.approve(actor(2, "alice"), now).unwrap();
            p.approve(actor(3, "bob"), now).unwrap();
            p.settle(SettlementStep::Submitted, "simulated", now).unwrap();
            p.settle(SettlementStep::Completed, "simulated", now).unwrap();
            p
        })
    });
    group.finish();
}

criterion_group!(benches, payment_machine);
criterion_main!(benches);
