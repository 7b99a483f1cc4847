//! The audit chain and its checkpoints.

use super::*;

pub async fn audit_chains_link_filter_and_stay_in_their_company(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let batch = vec![
        entry_for(a.id, "api_key.list", Outcome::Success),
        entry_for(b.id, "api_key.read", Outcome::Success),
        entry_for(a.id, "api_key.read", Outcome::Denied),
        entry_for(a.id, "identity.read", Outcome::Success),
    ];
    let written = store.append_audit(&batch).await.unwrap();
    assert_eq!(written.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 1, 2, 3]);
    assert_eq!(written[2].prev_hash, written[0].hash);
    assert_eq!(assert_chain_intact(&*store, &a.id.to_string()).await, 3);
    assert_eq!(assert_chain_intact(&*store, &b.id.to_string()).await, 1);

    let sa = scope(&*store, a.id);
    let sb = scope(&*store, b.id);
    let all = store.list_audit(&sa, &AuditFilter::default(), PageRequest { limit: 2, after: None }).await.unwrap();
    assert_eq!(all.items.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 2], "newest first");
    assert!(all.has_more);
    let rest = store.list_audit(&sa, &AuditFilter::default(), PageRequest { limit: 2, after: Some(2) }).await.unwrap();
    assert_eq!(rest.items.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
    let denied = AuditFilter { outcome: Some(Outcome::Denied), ..AuditFilter::default() };
    let page = store.list_audit(&sa, &denied, PageRequest { limit: 10, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].entry.action, "api_key.read");
    let reads = AuditFilter { action: Some("api_key.read".into()), ..AuditFilter::default() };
    assert_eq!(store.list_audit(&sb, &reads, PageRequest { limit: 10, after: None }).await.unwrap().items.len(), 1);

    // Another company's record is invisible.
    assert!(store.get_audit(&sa, written[0].entry.id).await.unwrap().is_some());
    assert!(store.get_audit(&sb, written[0].entry.id).await.unwrap().is_none());
    let exported = store.export_audit(&sa, None, None, 0, 100).await.unwrap();
    assert_eq!(exported.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(store.export_audit(&sa, None, None, 2, 100).await.unwrap().len(), 1);
    assert_eq!(store.audit_head(&sa).await.unwrap(), Some((3, written[3].hash)));
    let future = AuditFilter { from: Some(paygate_domain::now() + Duration::hours(1)), ..AuditFilter::default() };
    assert!(store.list_audit(&sa, &future, PageRequest { limit: 10, after: None }).await.unwrap().items.is_empty());
}

pub async fn a_change_and_its_record_commit_together(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let before = store.audit_records(&a.id.to_string(), 0, 1000).await.unwrap().len();
    let record = entry_for(a.id, "api_key.revoke", Outcome::Success);
    store.revoke_api_key(&sa, key.id, paygate_domain::now(), &record).await.unwrap().unwrap();
    let after = store.audit_records(&a.id.to_string(), 0, 1000).await.unwrap();
    assert_eq!(after.len(), before + 1);
    assert_eq!(after.last().unwrap().entry.id, record.id);
    // A change that does not happen leaves no record of having happened.
    let missing = entry_for(a.id, "api_key.revoke", Outcome::Success);
    assert!(store.revoke_api_key(&sa, ApiKeyId::generate(), paygate_domain::now(), &missing).await.unwrap().is_none());
    let refused = entry_for(a.id, "api_key.rotate", Outcome::Success);
    let now = paygate_domain::now();
    let outcome =
        store.rotate_api_key(&sa, key.id, new_key(KeyMode::Test, "", "").0, now, now, &refused).await.unwrap();
    assert_eq!(outcome, Rotation::Revoked);
    assert_eq!(store.audit_records(&a.id.to_string(), 0, 1000).await.unwrap().len(), before + 1);
    assert!(store.get_audit(&sa, missing.id).await.unwrap().is_none());
    assert_chain_intact(&*store, &a.id.to_string()).await;
}

pub async fn concurrent_appends_never_fork_a_chain(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                if (t + i) % 3 == 0 {
                    // Interleave change transactions with batch appends.
                    let key = issue(&*store, a.id, "keys:read", None).await.key;
                    let sa = scope(&*store, a.id);
                    let record = entry_for(a.id, "api_key.revoke", Outcome::Success);
                    store.revoke_api_key(&sa, key.id, paygate_domain::now(), &record).await.unwrap();
                } else {
                    let batch = vec![entry_for(a.id, "api_key.list", Outcome::Success); 3];
                    let batch: Vec<_> =
                        batch.into_iter().map(|e| AuditEntry { id: AuditEventId::generate(), ..e }).collect();
                    store.append_audit(&batch).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = assert_chain_intact(&*store, &a.id.to_string()).await;
    assert!(n >= 80, "{n} records");
    let heads = store.audit_heads().await.unwrap();
    let head = heads.iter().find(|(c, _, _)| *c == a.id.to_string()).unwrap();
    assert_eq!(head.1, n);
}

pub async fn checkpoints_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let written = store.append_audit(&[entry_for(a.id, "identity.read", Outcome::Success)]).await.unwrap();
    let signer = paygate_domain::audit::AuditSigner::from_bytes(&[3; 32]);
    let chain = a.id.to_string();
    let checkpoint = Checkpoint {
        chain: chain.clone(),
        seq: 1,
        hash: written[0].hash,
        signed_at: paygate_domain::now(),
        key_id: signer.key_id(),
        signature: signer.sign(&chain, 1, &written[0].hash).to_vec(),
    };
    store.add_checkpoint(&checkpoint).await.unwrap();
    assert_eq!(store.audit_checkpoints(&chain).await.unwrap(), vec![checkpoint.clone()]);
    assert_eq!(store.latest_checkpoint(&scope(&*store, a.id)).await.unwrap(), Some(checkpoint));
    assert!(store.audit_chains().await.unwrap().contains(&chain));
}
