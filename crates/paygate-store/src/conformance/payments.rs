//! Payees, payments and idempotency.

use super::*;

pub async fn payment_batches_isolate_items_and_commit_records(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "A").await;
    let b = company(&*store, "B").await;
    let policy = ApprovalPolicy::default();
    let active = new_payee(KeyMode::Test);
    store
        .create_payee(&scope(&*store, a.id), &active, &entry_for(a.id, "payee.create", Outcome::Success))
        .await
        .unwrap();
    let disabled = new_payee(KeyMode::Test);
    let sa = scope(&*store, a.id);
    store.create_payee(&sa, &disabled, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let at = paygate_domain::now();
    let off = store
        .disable_payee(
            &sa.in_mode(KeyMode::Test),
            disabled.payee.id,
            at,
            &entry_for(a.id, "payee.disable", Outcome::Success),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(off.status, PayeeStatus::Disabled);
    let live = new_payee(KeyMode::Live);
    store
        .create_payee(&sa.in_mode(KeyMode::Live), &live, &entry_for(a.id, "payee.create", Outcome::Success))
        .await
        .unwrap();
    let ok1 = draft_payment(active.payee.id, 100, &policy);
    let items = vec![
        create_item(a.id, &*store, ok1.clone(), "k1"),
        create_item(a.id, &*store, draft_payment(disabled.payee.id, 100, &policy), "k2"),
        // Same key as the first item, in the same batch: the first one's response.
        create_item(a.id, &*store, draft_payment(active.payee.id, 100, &policy), "k1"),
        // Company B cannot pay A's payee, nor a payee of the other mode.
        create_item(b.id, &*store, draft_payment(active.payee.id, 100, &policy), "k1"),
        create_item(a.id, &*store, draft_payment(live.payee.id, 100, &policy), "k3"),
        create_item(a.id, &*store, draft_payment(active.payee.id, 200, &policy), "k4"),
    ];
    let outcomes = store.create_payments(&items).await.unwrap();
    assert_eq!(outcomes[0], PaymentCreated::Created);
    assert_eq!(outcomes[1], PaymentCreated::PayeeDisabled);
    assert!(matches!(&outcomes[2], PaymentCreated::Existing(r) if r.payment_id == ok1.id), "{:?}", outcomes[2]);
    assert_eq!(outcomes[3], PaymentCreated::PayeeNotFound);
    assert_eq!(outcomes[4], PaymentCreated::PayeeNotFound);
    assert_eq!(outcomes[5], PaymentCreated::Created);
    let listed = store
        .list_payments(&sa.in_mode(KeyMode::Test), &PaymentFilter::default(), PageRequest { limit: 10, after: None })
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);
    let got = store.get_payment(&sa.in_mode(KeyMode::Test), ok1.id).await.unwrap().unwrap();
    assert_eq!(got, ok1, "a payment reads back as written");
    assert!(store.get_payment(&scope(&*store, b.id).in_mode(KeyMode::Test), ok1.id).await.unwrap().is_none());
    assert!(store.get_payment(&sa.in_mode(KeyMode::Live), ok1.id).await.unwrap().is_none());
    assert_eq!(store.idempotent_response(&sa.in_mode(KeyMode::Test), "k1").await.unwrap().unwrap().payment_id, ok1.id);
    assert!(store.idempotent_response(&scope(&*store, b.id).in_mode(KeyMode::Test), "k1").await.unwrap().is_none());
    assert!(store.idempotent_response(&sa.in_mode(KeyMode::Live), "k1").await.unwrap().is_none(), "keys are per mode");
    // Records only for what was created: 3 payee changes + 2 payments on A's chain.
    let records = assert_chain_intact(&*store, &a.id.to_string()).await;
    assert_eq!(records, 6, "3 payees created, 1 disabled, 2 payments");
    // A later batch with a used key replays it.
    let again = store
        .create_payments(&[create_item(a.id, &*store, draft_payment(active.payee.id, 5, &policy), "k4")])
        .await
        .unwrap();
    assert!(matches!(&again[0], PaymentCreated::Existing(_)));
}

pub async fn payment_updates_are_guarded_by_revision(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "A").await;
    let sa = scope(&*store, a.id);
    let payee = new_payee(KeyMode::Test);
    store.create_payee(&sa, &payee, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let p = draft_payment(payee.payee.id, 100, &ApprovalPolicy::default());
    store.create_payments(&[create_item(a.id, &*store, p.clone(), "k")]).await.unwrap();
    let approver =
        |n: u8| paygate_domain::payment::Actor::key(ApiKeyId::generate(), &format!("owner{n}"), ApiKeyId::generate());
    // Two writers read the same revision; only the first write lands.
    let (mut first, mut second) = (p.clone(), p.clone());
    first.approve(approver(1), paygate_domain::now()).unwrap();
    second.cancel(approver(2), paygate_domain::now()).unwrap();
    let audit = || entry_for(a.id, "payment.approve", Outcome::Success);
    assert!(store.update_payment(&sa, &first, p.revision, &audit()).await.unwrap());
    assert!(!store.update_payment(&sa, &second, p.revision, &audit()).await.unwrap(), "stale revision");
    let stored = store.get_payment(&sa.in_mode(KeyMode::Test), p.id).await.unwrap().unwrap();
    assert_eq!(stored, first);
    // Another company's scope cannot write it, whatever the revision.
    let b = company(&*store, "B").await;
    let mut third = stored.clone();
    third.cancel(approver(3), paygate_domain::now()).unwrap();
    assert!(!store.update_payment(&scope(&*store, b.id), &third, stored.revision, &audit()).await.unwrap());
    assert_eq!(assert_chain_intact(&*store, &a.id.to_string()).await, 3, "payee, payment, one approval");
}

pub async fn due_payments_and_idempotency_purge(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "A").await;
    let sa = scope(&*store, a.id);
    let payee = new_payee(KeyMode::Test);
    store.create_payee(&sa, &payee, &entry_for(a.id, "payee.create", Outcome::Success)).await.unwrap();
    let short = ApprovalPolicy { approval_ttl_seconds: 1, ..ApprovalPolicy::default() };
    let pending = draft_payment(payee.payee.id, 100, &short);
    let auto = draft_payment(payee.payee.id, 100, &ApprovalPolicy::demo());
    assert!(auto.rail_next_at.is_some(), "auto-approved payments are due for settlement");
    store
        .create_payments(&[
            create_item(a.id, &*store, pending.clone(), "p"),
            create_item(a.id, &*store, auto.clone(), "q"),
        ])
        .await
        .unwrap();
    let now = paygate_domain::now();
    let due: Vec<_> = store.due_payments(now, 100).await.unwrap().into_iter().map(|(c, p)| (c, p.id)).collect();
    assert_eq!(due, vec![(a.id, auto.id)]);
    let later = now + Duration::seconds(2);
    let due: Vec<_> = store.due_payments(later, 100).await.unwrap().into_iter().map(|(_, p)| p.id).collect();
    assert_eq!(due, vec![pending.id, auto.id]);
    assert_eq!(store.purge_idempotency(now).await.unwrap(), 0);
    assert_eq!(store.purge_idempotency(now + Duration::hours(25)).await.unwrap(), 2);
    assert!(store.idempotent_response(&sa.in_mode(KeyMode::Test), "p").await.unwrap().is_none());
}

// ---------------------------------------------------------------------------
// Events and webhooks

pub async fn concurrent_payment_updates_write_one_event(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let payee = payee_in(&*store, a.id).await;
    let p = draft_payment(payee.payee.id, 100, &ApprovalPolicy::default());
    store.create_payments(&[create_item(a.id, &*store, p.clone(), "race")]).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        let mut mine = p.clone();
        tasks.push(tokio::spawn(async move {
            if n % 2 == 0 {
                mine.approve(approver(n), paygate_domain::now()).unwrap();
            } else {
                mine.cancel(approver(n), paygate_domain::now()).unwrap();
            }
            let audit = entry_for(a.id, "payment.approve", Outcome::Success);
            let sa = scope(&*store, a.id);
            store.update_payment(&sa, &mine, p.revision, &audit).await.unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap() as usize;
    }
    assert_eq!(won, 1, "one writer per revision");
    let steps = trail(&*store, &sa, KeyMode::Test, &p.id.to_string()).await;
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0], step("payment.created", 1, None));
    assert!(["payment.approved", "payment.canceled"].contains(&steps[1].0));
    assert_eq!((steps[1].1, steps[1].2.as_deref()), (2, Some("pending_approval")));
    assert_eq!(assert_chain_intact(&*store, &a.id.to_string()).await, 3, "payee, payment, one change");
}
