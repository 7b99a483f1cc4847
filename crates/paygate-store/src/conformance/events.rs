//! Events, webhook endpoints and deliveries.

use super::*;

pub async fn every_change_writes_its_events(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let now = paygate_domain::now();

    // A key: created, rotated, revoked; revoking again tells nobody.
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let (next, _) = new_key(test, "keys:read", "");
    let Rotation::Rotated { new: successor, .. } =
        store.rotate_api_key(&sa, key.id, next, now + Duration::hours(1), now, &noted("api_key.rotate")).await.unwrap()
    else {
        panic!("rotation refused")
    };
    store.revoke_api_key(&sa, key.id, now, &noted("api_key.revoke")).await.unwrap().unwrap();
    store.revoke_api_key_by_id(key.id, now, &noted("api_key.revoke")).await.unwrap().unwrap();
    let key_trail = vec![
        step("api_key.created", 1, None),
        step("api_key.rotated", 2, None),
        step("api_key.revoked", 3, Some("active")),
    ];
    assert_eq!(trail(&*store, &sa, test, &key.id.to_string()).await, key_trail);
    // Revoke-all: one event per key it revoked, none for the key already revoked.
    assert_eq!(store.revoke_all_api_keys(&sa, now, &noted("api_key.revoke_all")).await.unwrap(), 1);
    assert_eq!(
        trail(&*store, &sa, test, &successor.id.to_string()).await,
        vec![step("api_key.created", 1, None), step("api_key.revoked", 2, Some("active"))]
    );
    assert_eq!(trail(&*store, &sa, test, &key.id.to_string()).await, key_trail);

    // A payee: created, disabled; disabling again tells nobody.
    let payee = payee_in(&*store, a.id).await;
    for _ in 0..2 {
        let audit = entry_for(a.id, "payee.disable", Outcome::Success);
        store.disable_payee(&sa.in_mode(test), payee.payee.id, now, &audit).await.unwrap().unwrap();
    }
    assert_eq!(
        trail(&*store, &sa, test, &payee.payee.id.to_string()).await,
        vec![step("payee.created", 1, None), step("payee.disabled", 2, Some("active"))]
    );

    // The approval policy, per mode.
    let two = ApprovalPolicy {
        rules: [(
            "EUR".to_owned(),
            paygate_domain::payment::ApprovalRule { one_approval_from: 0, two_approvals_from: Some(0) },
        )]
        .into_iter()
        .collect(),
        ..ApprovalPolicy::default()
    };
    for policy in [&ApprovalPolicy::default(), &two, &two] {
        let audit = entry_for(a.id, "approval_policy.update", Outcome::Success);
        store.set_approval_policy(&sa.in_mode(test), policy, &audit).await.unwrap();
    }
    // Setting the same policy again tells nobody.
    let updated = vec![step("approval_policy.updated", 1, None), step("approval_policy.updated", 2, None)];
    assert_eq!(trail(&*store, &sa, test, "approval_policy_test").await, updated);

    // A payment through its life: each status change is named after the new status.
    let active = payee_in(&*store, a.id).await;
    let mut p = draft_payment(active.payee.id, 100, &ApprovalPolicy::default());
    store.create_payments(&[create_item(a.id, &*store, p.clone(), "life")]).await.unwrap();
    let audit = || entry_for(a.id, "payment.approve", Outcome::Success);
    let stale = p.clone();
    let revision = p.revision;
    p.approve(approver(1), paygate_domain::now()).unwrap();
    assert!(store.update_payment(&sa, &p, revision, &audit()).await.unwrap());
    let mut lost = stale.clone();
    lost.cancel(approver(2), paygate_domain::now()).unwrap();
    assert!(!store.update_payment(&sa, &lost, stale.revision, &audit()).await.unwrap(), "a refused write tells nobody");
    use paygate_domain::payment::SettlementStep;
    for settlement in [SettlementStep::Submitted, SettlementStep::Completed] {
        let revision = p.revision;
        p.settle(settlement, "test", paygate_domain::now()).unwrap();
        assert!(store.update_payment(&sa, &p, revision, &audit()).await.unwrap());
    }
    // A worker only rescheduling its next look changes nothing a reader sees: no event.
    let revision = p.revision;
    p.revision += 1;
    p.rail_next_at = Some(paygate_domain::now() + Duration::minutes(1));
    assert!(store.update_payment(&sa, &p, revision, &audit()).await.unwrap());
    assert_eq!(
        trail(&*store, &sa, test, &p.id.to_string()).await,
        vec![
            step("payment.created", 1, None),
            step("payment.approved", 2, Some("pending_approval")),
            step("payment.processing", 3, Some("approved")),
            step("payment.completed", 4, Some("processing")),
        ]
    );
    // A change that keeps the status is an update; an approval at creation is still a creation.
    let mut two_eyes = draft_payment(active.payee.id, 100, &two);
    let auto = draft_payment(active.payee.id, 100, &ApprovalPolicy::demo());
    store
        .create_payments(&[
            create_item(a.id, &*store, two_eyes.clone(), "two"),
            create_item(a.id, &*store, auto.clone(), "auto"),
        ])
        .await
        .unwrap();
    let revision = two_eyes.revision;
    two_eyes.approve(approver(3), paygate_domain::now()).unwrap();
    assert!(store.update_payment(&sa, &two_eyes, revision, &audit()).await.unwrap());
    assert_eq!(
        trail(&*store, &sa, test, &two_eyes.id.to_string()).await,
        vec![step("payment.created", 1, None), step("payment.updated", 2, Some("pending_approval"))]
    );
    assert_eq!(trail(&*store, &sa, test, &auto.id.to_string()).await, vec![step("payment.created", 1, None)]);
    let created = events_of(&*store, &sa, test, &auto.id.to_string()).await;
    let snapshot: serde_json::Value = serde_json::from_str(&created[0].object).unwrap();
    assert_eq!(snapshot["status"], "approved", "the snapshot is the object right after the change");

    // Reads: newest first, filtered, paged, and only in the company and mode they belong to.
    let all = store.list_events(&sa.in_mode(test), &EventFilter::default(), ALL).await.unwrap().items;
    assert_eq!(all.len(), 3 + 2 + 2 + 2 + 4 + 2 + 1 + 1);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(all.iter().all(|e| e.company_id == a.id && e.mode == test));
    let first =
        store.list_events(&sa.in_mode(test), &EventFilter::default(), PageRequest { limit: 5, after: None }).await;
    let first = first.unwrap();
    assert!(first.has_more);
    let rest = PageRequest { limit: 100, after: first.items.last().map(|e| e.id) };
    let rest = store.list_events(&sa.in_mode(test), &EventFilter::default(), rest).await.unwrap();
    assert_eq!([first.items, rest.items].concat(), all);
    let disabled = EventFilter { kind: Some(EventType::PayeeDisabled), ..EventFilter::default() };
    let payees_only =
        EventFilter { types: Some(vec![EventType::PayeeCreated, EventType::PayeeDisabled]), ..EventFilter::default() };
    let readable = store.list_events(&sa.in_mode(test), &payees_only, ALL).await.unwrap().items;
    assert_eq!(readable.len(), 3, "two payees created, one disabled");
    assert!(readable.iter().all(|e| e.kind.object_type() == "payee"));
    assert_eq!(store.list_events(&sa.in_mode(test), &disabled, ALL).await.unwrap().items.len(), 1);
    assert!(store.list_events(&sb.in_mode(test), &EventFilter::default(), ALL).await.unwrap().items.is_empty());
    assert!(
        store.list_events(&sa.in_mode(KeyMode::Live), &EventFilter::default(), ALL).await.unwrap().items.is_empty()
    );
    for event in &all {
        assert_eq!(store.get_event(&sa.in_mode(test), event.id).await.unwrap().as_ref(), Some(event));
        assert_eq!(store.get_event(&sb.in_mode(test), event.id).await.unwrap(), None, "another company's event");
        assert_eq!(
            store.get_event(&sa.in_mode(KeyMode::Live), event.id).await.unwrap(),
            None,
            "the other mode's event"
        );
        let json: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(json["id"], event.id.to_string());
    }
    assert_eq!(store.get_event(&sa.in_mode(test), EventId::generate()).await.unwrap(), None);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn events_fan_out_to_subscribed_enabled_endpoints(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let payees = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let payments = endpoint(&*store, a.id, test, &["payment.created"], true).await;
    let off = endpoint(&*store, a.id, test, &["*"], false).await;
    let live = endpoint(&*store, a.id, KeyMode::Live, &["*"], true).await;
    let other = endpoint(&*store, b.id, test, &["*"], true).await;
    let payee = payee_in(&*store, a.id).await;

    let got = deliveries(&*store, a.id, test, payees.id).await;
    assert_eq!(got.len(), 1);
    let event = &events_of(&*store, &sa, test, &payee.payee.id.to_string()).await[0];
    assert_eq!(
        (got[0].event_id, got[0].event_type, got[0].status),
        (event.id, EventType::PayeeCreated, DeliveryStatus::Pending)
    );
    assert_eq!(got[0].endpoint_id, payees.id);
    assert!(got[0].attempts.is_empty());
    assert!(got[0].next_attempt_at.is_some(), "due at once");
    assert!(deliveries(&*store, a.id, test, payments.id).await.is_empty(), "not subscribed");
    assert!(deliveries(&*store, a.id, test, off.id).await.is_empty(), "disabled");
    assert!(deliveries(&*store, a.id, KeyMode::Live, live.id).await.is_empty(), "the other mode");
    assert!(deliveries(&*store, b.id, test, other.id).await.is_empty(), "another company");

    // Endpoints and their deliveries exist only in their company and mode.
    let page = PageRequest { limit: 100, after: None };
    assert!(store.list_deliveries(&sb.in_mode(test), payees.id, page).await.unwrap().is_none());
    assert!(store.list_deliveries(&sa.in_mode(KeyMode::Live), payees.id, page).await.unwrap().is_none());
    assert!(store.get_webhook_endpoint(&sb.in_mode(test), payees.id).await.unwrap().is_none());
    assert!(store.get_webhook_endpoint(&sa.in_mode(KeyMode::Live), payees.id).await.unwrap().is_none());
    assert_eq!(store.get_webhook_endpoint(&sa.in_mode(test), payees.id).await.unwrap(), Some(payees.clone()));
    let listed =
        store.list_webhook_endpoints(&sa.in_mode(test), PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(listed.items.iter().map(|e| e.id).collect::<Vec<_>>(), vec![off.id, payments.id, payees.id]);

    // Disabled by the company: no new deliveries, and the pending one waits.
    let patch = EndpointPatch { enabled: Some(false), ..EndpointPatch::default() };
    let audit = entry_for(a.id, "webhook_endpoint.update", Outcome::Success);
    let patched = store.update_webhook_endpoint(&sa.in_mode(test), payees.id, &patch, &audit).await.unwrap().unwrap();
    assert!(!patched.enabled);
    assert_eq!(patched.disabled_reason, None, "disabled by the company, not by Paygate");
    payee_in(&*store, a.id).await;
    assert_eq!(deliveries(&*store, a.id, test, payees.id).await.len(), 1);
    let other_deliveries = claim(&*store, paygate_domain::now(), "node").await;
    assert_eq!(
        other_deliveries.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(),
        vec![],
        "nothing due to an enabled endpoint"
    );
}

pub async fn claims_lease_due_deliveries_in_object_order(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let test = KeyMode::Test;
    let hook = endpoint(&*store, a.id, test, &["payee.created", "payee.disabled"], true).await;
    let payee = payee_in(&*store, a.id).await;
    let audit = entry_for(a.id, "payee.disable", Outcome::Success);
    store.disable_payee(&sa.in_mode(test), payee.payee.id, paygate_domain::now(), &audit).await.unwrap();
    let events = events_of(&*store, &sa, test, &payee.payee.id.to_string()).await;
    let long_ago = paygate_domain::now() - Duration::days(1);

    let t = paygate_domain::now();
    let first = claim(&*store, t, "node-a").await;
    assert_eq!(first.len(), 1, "the second event of the payee waits for the first");
    let job = &first[0];
    assert_eq!((job.endpoint_id, job.attempt, job.url.as_str()), (hook.id, 1, hook.url.as_str()));
    assert_eq!(job.event, events[0]);
    assert_eq!(job.event.sequence, 1);
    assert_eq!(job.secret_sealed, b"secret-1");
    assert_eq!(job.previous_secret_sealed, None);
    assert!(claim(&*store, t, "node-b").await.is_empty(), "leased, and the next event waits behind it");

    // Once the lease has passed another node takes the delivery over; the
    // first node's result is then refused and writes nothing.
    let later = t + Duration::seconds(31);
    let taken = claim(&*store, later, "node-b").await;
    assert_eq!(taken.iter().map(|j| (j.delivery_id, j.attempt)).collect::<Vec<_>>(), vec![(job.delivery_id, 1)]);
    let stale = outcome(job, "node-a", later, 200, NextStep::Succeeded, long_ago);
    assert!(!finish(&*store, a.id, &stale).await, "a lease that is no longer ours");
    assert!(deliveries(&*store, a.id, test, hook.id).await.iter().all(|d| d.attempts.is_empty()));
    let done = outcome(job, "node-b", later, 200, NextStep::Succeeded, long_ago);
    assert!(finish(&*store, a.id, &done).await);
    assert!(!finish(&*store, a.id, &done).await, "a finished delivery is not finished again");

    // The next event of the object is due now; a retry waits for its time.
    let second = claim(&*store, later, "node-a").await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].event, events[1]);
    let retry_at = later + Duration::hours(1);
    assert!(
        finish(&*store, a.id, &outcome(&second[0], "node-a", later, 503, NextStep::RetryAt(retry_at), long_ago)).await
    );
    assert!(claim(&*store, later + Duration::minutes(59), "node-a").await.is_empty());
    let retry = claim(&*store, retry_at, "node-b").await;
    assert_eq!(retry.iter().map(|j| (j.delivery_id, j.attempt)).collect::<Vec<_>>(), vec![(second[0].delivery_id, 2)]);
    assert!(finish(&*store, a.id, &outcome(&retry[0], "node-b", retry_at, 500, NextStep::GiveUp, long_ago)).await);
    assert!(claim(&*store, retry_at + Duration::days(1), "node-b").await.is_empty(), "nothing left");

    let listed = deliveries(&*store, a.id, test, hook.id).await;
    assert_eq!(
        listed.iter().map(|d| d.status).collect::<Vec<_>>(),
        vec![DeliveryStatus::Failed, DeliveryStatus::Succeeded]
    );
    assert_eq!(listed[0].next_attempt_at, None);
    let codes = |d: &Delivery| d.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>();
    assert_eq!(codes(&listed[0]), vec![Some(503), Some(500)], "oldest attempt first");
    assert_eq!(codes(&listed[1]), vec![Some(200)]);
    assert_eq!(listed[0].attempts[0].error.as_deref(), Some("http_status: 503"));
    assert_eq!(listed[0].attempts[0].attempted_at, later);
    assert_eq!(listed[0].attempts[0].latency_ms, 12);
    assert_eq!(listed[1].attempts[0].error, None);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn failing_and_gone_endpoints_are_disabled(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let test = KeyMode::Test;
    // Subscribed to payee.created only, so no endpoint receives another's disablement.
    let gone = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let failing = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let flaky = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let get = |id| {
        let store = store.clone();
        async move { store.get_webhook_endpoint(&sa.in_mode(test), id).await.unwrap().unwrap() }
    };

    // 410: disabled at once, with its event and its record.
    ping(&*store, a.id, gone.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![gone.id]);
    let mut result = outcome(&jobs[0], "node", t, 410, NextStep::GiveUp, t - Duration::days(1));
    result.disable = Some("gone");
    let disable_audit = entry_for(a.id, "webhook_endpoint.disable", Outcome::Success);
    let audit = entry_for(a.id, "webhook.deliver", Outcome::Success);
    assert!(store.finish_delivery(&result, &audit, &disable_audit).await.unwrap());
    let e = get(gone.id).await;
    assert_eq!((e.enabled, e.disabled_reason.as_deref()), (false, Some("gone")));
    assert_eq!(
        trail(&*store, &sa, test, &gone.id.to_string()).await,
        vec![step("ping", 1, None), step("webhook_endpoint.disabled", 2, Some("enabled"))]
    );
    let disabled = &events_of(&*store, &sa, test, &gone.id.to_string()).await[1];
    let snapshot: serde_json::Value = serde_json::from_str(&disabled.object).unwrap();
    assert_eq!(snapshot["id"], gone.id.to_string());
    assert!(store.get_audit(&sa, audit.id).await.unwrap().is_some());
    assert!(store.get_audit(&sa, disable_audit.id).await.unwrap().is_some());
    assert_eq!(deliveries(&*store, a.id, test, gone.id).await[0].status, DeliveryStatus::Failed);
    // A disabled endpoint's deliveries wait.
    ping(&*store, a.id, gone.id).await;
    assert!(claim(&*store, paygate_domain::now(), "node").await.is_empty());

    // Failing: the first failure starts the clock; a failure after the threshold disables.
    ping(&*store, a.id, failing.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![failing.id]);
    let retry_at = t + Duration::hours(1);
    let first = outcome(&jobs[0], "node", t, 500, NextStep::RetryAt(retry_at), t - Duration::hours(1));
    assert!(finish(&*store, a.id, &first).await);
    let e = get(failing.id).await;
    assert_eq!((e.enabled, e.failing_since), (true, Some(t)));
    let jobs = claim(&*store, retry_at, "node").await;
    assert_eq!(jobs.iter().map(|j| (j.endpoint_id, j.attempt)).collect::<Vec<_>>(), vec![(failing.id, 2)]);
    let second = outcome(
        &jobs[0],
        "node",
        retry_at,
        500,
        NextStep::RetryAt(retry_at + Duration::hours(1)),
        t + Duration::minutes(30),
    );
    assert!(finish(&*store, a.id, &second).await);
    let e = get(failing.id).await;
    assert_eq!((e.enabled, e.disabled_reason.as_deref()), (false, Some("failing")));
    assert_eq!(trail(&*store, &sa, test, &failing.id.to_string()).await.last().unwrap().0, "webhook_endpoint.disabled");

    // Flaky: a success clears the failure state.
    ping(&*store, a.id, flaky.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![flaky.id]);
    let retry_at = t + Duration::hours(1);
    assert!(
        finish(&*store, a.id, &outcome(&jobs[0], "node", t, 502, NextStep::RetryAt(retry_at), t - Duration::hours(1)))
            .await
    );
    assert_eq!(get(flaky.id).await.failing_since, Some(t));
    let jobs = claim(&*store, retry_at, "node").await;
    assert_eq!(jobs.iter().map(|j| j.endpoint_id).collect::<Vec<_>>(), vec![flaky.id]);
    assert!(finish(&*store, a.id, &outcome(&jobs[0], "node", retry_at, 204, NextStep::Succeeded, retry_at)).await);
    let e = get(flaky.id).await;
    assert_eq!((e.enabled, e.failing_since), (true, None));
    assert_eq!(trail(&*store, &sa, test, &flaky.id.to_string()).await, vec![step("ping", 1, None)]);

    // The company enables a disabled endpoint again: its failure state is gone.
    let patch = EndpointPatch { enabled: Some(true), ..EndpointPatch::default() };
    let audit = entry_for(a.id, "webhook_endpoint.update", Outcome::Success);
    let e = store.update_webhook_endpoint(&sa.in_mode(test), failing.id, &patch, &audit).await.unwrap().unwrap();
    assert_eq!((e.enabled, e.disabled_reason.as_deref(), e.failing_since), (true, None, None));
    assert_eq!(get(failing.id).await, e);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn secret_rotation_signs_with_both_until_the_overlap_ends(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let sa = scope(&*store, a.id);
    let test = KeyMode::Test;
    let hook = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let overlap = paygate_domain::now() + Duration::hours(1);
    let audit = || entry_for(a.id, "webhook_endpoint.rotate_secret", Outcome::Success);
    let rotated =
        store.rotate_webhook_secret(&sa.in_mode(test), hook.id, b"secret-2", overlap, &audit()).await.unwrap();
    let rotated = rotated.unwrap();
    assert_eq!(rotated.previous_secret_expires_at, Some(overlap));
    assert_eq!(store.get_webhook_endpoint(&sa.in_mode(test), hook.id).await.unwrap(), Some(rotated));
    let sb = scope(&*store, b.id);
    assert!(store.rotate_webhook_secret(&sb.in_mode(test), hook.id, b"x", overlap, &audit()).await.unwrap().is_none());
    assert!(
        store
            .rotate_webhook_secret(&sa.in_mode(KeyMode::Live), hook.id, b"x", overlap, &audit())
            .await
            .unwrap()
            .is_none()
    );

    ping(&*store, a.id, hook.id).await;
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].secret_sealed, b"secret-2");
    assert_eq!(jobs[0].previous_secret_sealed.as_deref(), Some(&b"secret-1"[..]));
    // After the overlap (and the lease) the previous secret no longer signs.
    let jobs = claim(&*store, overlap + Duration::seconds(1), "node").await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].secret_sealed, b"secret-2");
    assert_eq!(jobs[0].previous_secret_sealed, None);
}

pub async fn redelivery_and_test_events(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let all = endpoint(&*store, a.id, test, &["*"], true).await;
    let payees = endpoint(&*store, a.id, test, &["payee.created"], true).await;
    let payments = endpoint(&*store, a.id, test, &["payment.created"], true).await;
    let payee = payee_in(&*store, a.id).await;
    let event = events_of(&*store, &sa, test, &payee.payee.id.to_string()).await.remove(0);
    let audit = || entry_for(a.id, "event.redeliver", Outcome::Success);

    assert_eq!(store.redeliver_event(&sa.in_mode(test), event.id, None, &audit()).await.unwrap(), Some(2));
    assert_eq!(deliveries(&*store, a.id, test, all.id).await.len(), 2);
    assert_eq!(deliveries(&*store, a.id, test, payees.id).await.len(), 2);
    assert!(deliveries(&*store, a.id, test, payments.id).await.is_empty());
    // Named, an endpoint gets it whatever it subscribes to.
    assert_eq!(store.redeliver_event(&sa.in_mode(test), event.id, Some(payments.id), &audit()).await.unwrap(), Some(1));
    let got = deliveries(&*store, a.id, test, payments.id).await;
    assert_eq!((got.len(), got[0].event_id), (1, event.id));
    assert_eq!(store.redeliver_event(&sa.in_mode(test), EventId::generate(), None, &audit()).await.unwrap(), None);
    let unknown = Some(WebhookEndpointId::generate());
    assert_eq!(store.redeliver_event(&sa.in_mode(test), event.id, unknown, &audit()).await.unwrap(), None);
    assert_eq!(store.redeliver_event(&sb.in_mode(test), event.id, None, &audit()).await.unwrap(), None);
    assert_eq!(store.redeliver_event(&sa.in_mode(KeyMode::Live), event.id, None, &audit()).await.unwrap(), None);
    let other = endpoint(&*store, b.id, test, &["*"], true).await;
    assert_eq!(store.redeliver_event(&sa.in_mode(test), event.id, Some(other.id), &audit()).await.unwrap(), None);

    // A ping is delivered to its endpoint only.
    let pinged = ping(&*store, a.id, payees.id).await;
    assert_eq!((pinged.kind, pinged.object_id.clone(), pinged.sequence), (EventType::Ping, payees.id.to_string(), 1));
    assert_eq!(store.get_event(&sa.in_mode(test), pinged.id).await.unwrap(), Some(pinged.clone()));
    let got = deliveries(&*store, a.id, test, payees.id).await;
    assert_eq!((got.len(), got[0].event_id, got[0].event_type), (3, pinged.id, EventType::Ping));
    assert_eq!(deliveries(&*store, a.id, test, all.id).await.len(), 2, "nobody else hears a ping");
    let test_audit = || entry_for(a.id, "webhook_endpoint.test", Outcome::Success);
    assert!(store.send_test_event(&sb.in_mode(test), payees.id, &test_audit()).await.unwrap().is_none());
    assert!(
        store.send_test_event(&sa.in_mode(test), WebhookEndpointId::generate(), &test_audit()).await.unwrap().is_none()
    );

    // Concurrent pings of one endpoint each get their own number.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { ping(&*store, a.id, payees.id).await.sequence }));
    }
    let mut numbers = Vec::new();
    for t in tasks {
        numbers.push(t.await.unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (2..=9).collect::<Vec<u64>>());
    assert_eq!(deliveries(&*store, a.id, test, payees.id).await.len(), 11);
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn endpoint_limit_updates_and_cascading_delete(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let (sa, sb) = (scope(&*store, a.id), scope(&*store, b.id));
    let test = KeyMode::Test;
    let mut ids = Vec::new();
    for _ in 0..MAX_ENDPOINTS {
        ids.push(endpoint(&*store, a.id, test, &["*"], true).await.id);
    }
    let now = paygate_domain::now();
    let one_more = NewWebhookEndpoint {
        endpoint: WebhookEndpoint {
            id: WebhookEndpointId::generate(),
            company_id: a.id,
            mode: test,
            url: "https://hooks.example.com/17".into(),
            description: None,
            event_types: EventTypes::All,
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            previous_secret_expires_at: None,
            created_at: now,
            updated_at: now,
        },
        secret_sealed: b"secret".to_vec(),
    };
    let audit = || entry_for(a.id, "webhook_endpoint.create", Outcome::Success);
    let refused = audit();
    assert!(!store.create_webhook_endpoint(&sa, &one_more, &refused).await.unwrap(), "at most {MAX_ENDPOINTS}");
    assert!(store.get_audit(&sa, refused.id).await.unwrap().is_none());
    assert!(store.get_webhook_endpoint(&sa.in_mode(test), one_more.endpoint.id).await.unwrap().is_none());
    // The limit is per company and mode.
    endpoint(&*store, a.id, KeyMode::Live, &["*"], true).await;
    endpoint(&*store, b.id, test, &["*"], true).await;
    let first = store.list_webhook_endpoints(&sa.in_mode(test), PageRequest { limit: 10, after: None }).await.unwrap();
    assert!(first.has_more);
    let after = first.items.last().map(|e| e.id);
    let rest = store.list_webhook_endpoints(&sa.in_mode(test), PageRequest { limit: 10, after }).await.unwrap();
    assert!(!rest.has_more);
    let mut listed: Vec<_> = [first.items, rest.items].concat().into_iter().map(|e| e.id).collect();
    listed.reverse();
    assert_eq!(listed, ids, "newest first");

    // Updates replace the fields they carry.
    let patch = EndpointPatch {
        url: Some("https://hooks.example.com/v2".into()),
        description: Some(None),
        event_types: Some(event_types(&["payment.approved"])),
        enabled: None,
    };
    let update = || entry_for(a.id, "webhook_endpoint.update", Outcome::Success);
    let patched = store.update_webhook_endpoint(&sa.in_mode(test), ids[1], &patch, &update()).await.unwrap().unwrap();
    assert_eq!((patched.url.as_str(), patched.description.as_deref()), ("https://hooks.example.com/v2", None));
    assert_eq!(patched.event_types, event_types(&["payment.approved"]));
    assert_eq!(store.get_webhook_endpoint(&sa.in_mode(test), ids[1]).await.unwrap(), Some(patched));
    assert!(store.update_webhook_endpoint(&sb.in_mode(test), ids[1], &patch, &update()).await.unwrap().is_none());
    let unknown = WebhookEndpointId::generate();
    assert!(store.update_webhook_endpoint(&sa.in_mode(test), unknown, &patch, &update()).await.unwrap().is_none());

    // Deleting an endpoint deletes its deliveries and their attempts.
    payee_in(&*store, a.id).await;
    assert_eq!(deliveries(&*store, a.id, test, ids[0]).await.len(), 1);
    let t = paygate_domain::now();
    let jobs = claim(&*store, t, "node").await;
    assert_eq!(jobs.len(), MAX_ENDPOINTS as usize - 1, "every endpoint but the one that unsubscribed");
    let job = jobs.iter().find(|j| j.endpoint_id == ids[0]).unwrap();
    assert!(finish(&*store, a.id, &outcome(job, "node", t, 500, NextStep::RetryAt(t), t - Duration::days(1))).await);
    let delete = || entry_for(a.id, "webhook_endpoint.delete", Outcome::Success);
    assert!(!store.delete_webhook_endpoint(&sb.in_mode(test), ids[0], &delete()).await.unwrap());
    assert!(!store.delete_webhook_endpoint(&sa.in_mode(KeyMode::Live), ids[0], &delete()).await.unwrap());
    assert!(store.delete_webhook_endpoint(&sa.in_mode(test), ids[0], &delete()).await.unwrap());
    assert!(!store.delete_webhook_endpoint(&sa.in_mode(test), ids[0], &delete()).await.unwrap(), "already gone");
    assert!(store.get_webhook_endpoint(&sa.in_mode(test), ids[0]).await.unwrap().is_none());
    let page = PageRequest { limit: 100, after: None };
    assert!(store.list_deliveries(&sa.in_mode(test), ids[0], page).await.unwrap().is_none());
    assert!(claim(&*store, t + Duration::minutes(1), "node").await.iter().all(|j| j.endpoint_id != ids[0]));
    // Room for one again.
    assert!(store.create_webhook_endpoint(&sa, &one_more, &audit()).await.unwrap());
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn concurrent_claims_never_share_a_delivery(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    const ENDPOINTS: usize = 10;
    const PAYEES: usize = 10;
    for _ in 0..ENDPOINTS {
        endpoint(&*store, a.id, KeyMode::Test, &["payee.created"], true).await;
    }
    for _ in 0..PAYEES {
        payee_in(&*store, a.id).await;
    }
    let at = paygate_domain::now();
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("node-{n}");
            let mut mine = Vec::new();
            // Bounded: a store that hands out leased deliveries again must fail, not spin.
            for _ in 0..ENDPOINTS * PAYEES {
                let jobs = store.claim_deliveries(at, &owner, at + Duration::minutes(1), 3).await.unwrap();
                if jobs.is_empty() {
                    break;
                }
                mine.extend(jobs.into_iter().map(|j| (j.delivery_id, j.endpoint_id)));
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let total = claimed.len();
    let mut ids: Vec<_> = claimed.iter().map(|(d, _)| *d).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "a delivery was leased twice");
    // Each endpoint's share: at most MAX_IN_FLIGHT_PER_ENDPOINT leased at once.
    let mut per_endpoint = std::collections::HashMap::new();
    for (_, e) in &claimed {
        *per_endpoint.entry(*e).or_insert(0u32) += 1;
    }
    assert_eq!(per_endpoint.len(), ENDPOINTS);
    assert!(per_endpoint.values().all(|n| *n <= crate::MAX_IN_FLIGHT_PER_ENDPOINT), "{per_endpoint:?}");
    assert_eq!(total, ENDPOINTS * crate::MAX_IN_FLIGHT_PER_ENDPOINT as usize);
    assert!(store.claim_deliveries(at, "late", at + Duration::minutes(1), 100).await.unwrap().is_empty());
    // Once the leases pass, the rest is handed out.
    let later = at + Duration::minutes(2);
    assert!(!store.claim_deliveries(later, "late", later + Duration::minutes(1), 100).await.unwrap().is_empty());
}
