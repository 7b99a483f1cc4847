//! Companies, API keys and authentication.

use super::*;

pub async fn ping_answers(store: Arc<dyn OperatorStore>) {
    store.ping().await.unwrap();
}

pub async fn companies_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme GmbH").await;
    let b = company(&*store, "Globex").await;
    assert_eq!(a.status, CompanyStatus::Active);
    assert_eq!(store.find_company(a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.find_company(CompanyId::generate()).await.unwrap(), None);
    let listed = store.list_companies().await.unwrap();
    assert_eq!(listed.iter().map(|c| c.id).collect::<Vec<_>>(), vec![b.id, a.id], "newest first");
    assert_eq!(store.get_company(&scope(&*store, a.id)).await.unwrap(), a);
}

pub async fn company_status_changes_bump_the_auth_revision(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let r0 = store.auth_revision().await.unwrap();
    let suspended =
        store.set_company_status(a.id, CompanyStatus::Suspended, &noted("company.suspend")).await.unwrap().unwrap();
    assert_eq!(suspended.status, CompanyStatus::Suspended);
    let r1 = store.auth_revision().await.unwrap();
    assert!(r1 > r0);
    let resumed =
        store.set_company_status(a.id, CompanyStatus::Active, &noted("company.suspend")).await.unwrap().unwrap();
    assert_eq!(resumed.status, CompanyStatus::Active);
    assert!(store.auth_revision().await.unwrap() > r1);
    assert_eq!(
        store
            .set_company_status(CompanyId::generate(), CompanyStatus::Suspended, &noted("company.suspend"))
            .await
            .unwrap(),
        None
    );
}

pub async fn api_key_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let expires = paygate_domain::now() + Duration::days(30);
    let issued = issue(&*store, a.id, "keys:read payments:read", Some(expires)).await;
    let got = store.get_api_key(&scope(&*store, a.id), issued.key.id).await.unwrap().unwrap();
    assert_eq!(got, issued.key);
    assert_eq!(got.expires_at, Some(expires));
    assert_eq!(got.scopes.to_storage(), "payments:read keys:read");
    assert_eq!(got.revoked_at, None);
    assert_eq!(got.last_used_at, None);
    assert_eq!(got.company_id, a.id);
}

pub async fn api_key_for_a_missing_company_is_not_found(store: Arc<dyn OperatorStore>) {
    let generated = hasher().generate(KeyMode::Live);
    let err = store
        .create_api_key(
            &scope(&*store, CompanyId::generate()),
            NewApiKey {
                id: generated.id,
                name: label("x"),
                owner: label("y"),
                scopes: ScopeSet::empty(),
                mode: KeyMode::Live,
                created_at: paygate_domain::now(),
                expires_at: None,
                allowed_cidrs: AllowedCidrs::default(),
                rate_limit: None,
                secret_hash: generated.hash,
                pepper_version: 1,
                principal: None,
            },
            &noted("api_key.create"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound("company")), "{err:?}");
}

pub async fn another_companys_key_is_invisible(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let key_a = issue(&*store, a.id, "keys:read", None).await.key;
    let scope_b = scope(&*store, b.id);
    assert_eq!(store.get_api_key(&scope_b, key_a.id).await.unwrap(), None);
    assert_eq!(store.get_api_key(&scope_b, ApiKeyId::generate()).await.unwrap(), None);
    let page = store.list_api_keys(&scope_b, PageRequest { limit: 100, after: None }).await.unwrap();
    assert!(page.items.is_empty());
    // A cursor taken from company A's list leaks nothing either.
    let page =
        store.list_api_keys(&scope_b, PageRequest { limit: 100, after: Some(ApiKeyId::generate()) }).await.unwrap();
    assert!(page.items.is_empty());
}

pub async fn api_keys_paginate_newest_first(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(issue(&*store, a.id, "keys:read", None).await.key.id);
        issue(&*store, b.id, "keys:read", None).await;
    }
    ids.reverse();
    let sa = scope(&*store, a.id);
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page: Page<ApiKey> = store.list_api_keys(&sa, PageRequest { limit: 2, after }).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|k| k.id));
        if !page.has_more {
            break;
        }
        after = page.items.last().map(|k| k.id);
        // A key created mid-walk is newer than every cursor: it never shifts later pages.
        issue(&*store, a.id, "keys:read", None).await;
    }
    assert_eq!(seen, ids);
}

pub async fn revocation_is_idempotent_and_bumps_the_revision(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let r0 = store.auth_revision().await.unwrap();
    let t1 = paygate_domain::now();
    let revoked = store.revoke_api_key_by_id(key.id, t1, &noted("api_key.revoke")).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(t1));
    assert!(store.auth_revision().await.unwrap() > r0);
    let again =
        store.revoke_api_key_by_id(key.id, t1 + Duration::seconds(5), &noted("api_key.revoke")).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(t1), "the first revocation time stands");
    assert_eq!(store.revoke_api_key_by_id(ApiKeyId::generate(), t1, &noted("api_key.revoke")).await.unwrap(), None);
}

pub async fn scoped_revocation_cannot_reach_another_company(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let key_a = issue(&*store, a.id, "keys:read", None).await.key;
    let r0 = store.auth_revision().await.unwrap();
    let now = paygate_domain::now();
    assert_eq!(
        store.revoke_api_key(&scope(&*store, b.id), key_a.id, now, &noted("api_key.revoke")).await.unwrap(),
        None
    );
    assert_eq!(store.auth_revision().await.unwrap(), r0, "nothing changed, nothing signalled");
    let still = store.get_api_key(&scope(&*store, a.id), key_a.id).await.unwrap().unwrap();
    assert_eq!(still.revoked_at, None);
    let revoked =
        store.revoke_api_key(&scope(&*store, a.id), key_a.id, now, &noted("api_key.revoke")).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(now));
}

pub async fn key_auth_record_carries_company_status(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let record: KeyAuthRecord = store.find_key_for_auth(issued.key.id).await.unwrap().unwrap();
    assert_eq!(record.key, issued.key);
    assert_eq!(record.company_name, "Acme");
    assert_eq!(record.company_status, CompanyStatus::Active);
    assert_eq!(record.pepper_version, 1);
    let secret = issued.text.rsplit('_').next().unwrap();
    assert!(hasher().verify(&secret.as_bytes()[..43], &record.secret_hash, 1));
    store.set_company_status(a.id, CompanyStatus::Suspended, &noted("company.suspend")).await.unwrap();
    let record = store.find_key_for_auth(issued.key.id).await.unwrap().unwrap();
    assert_eq!(record.company_status, CompanyStatus::Suspended);
    assert!(store.find_key_for_auth(ApiKeyId::generate()).await.unwrap().is_none());
}

fn authenticator(store: Arc<dyn AuthStore>) -> Authenticator {
    Authenticator::new(store, hasher(), AuthConfig::default())
}

pub async fn authenticator_accepts_a_valid_key(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let auth = authenticator(store.clone());
    auth.poll_revision().await.unwrap();
    for _ in 0..2 {
        let ok = auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
        assert_eq!(ok.scope.company_id(), a.id);
        assert_eq!(ok.record.key.id, issued.key.id);
    }
    assert_eq!(auth.cached_keys(), 1);
}

pub async fn authenticator_refuses_each_bad_state(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let auth = authenticator(store.clone());
    let now = paygate_domain::now();

    let unknown = hasher().generate(KeyMode::Test);
    assert!(matches!(auth.verify_key(&unknown.text, now).await, Err(AuthError::UnknownKey)));

    let issued = issue(&*store, a.id, "keys:read", None).await;
    let other_pepper = KeyHasher::new(&Pepper::new(1, vec![1u8; 32]).unwrap());
    let wrong = Authenticator::new(store.clone(), other_pepper, AuthConfig::default());
    assert!(matches!(wrong.verify_key(&issued.text, now).await, Err(AuthError::WrongSecret)));

    // The cache is in use (polled) and warm for every key below, so each refusal
    // must come from the cached record or the revision signal.
    auth.poll_revision().await.unwrap();
    let expiring = issue(&*store, a.id, "keys:read", Some(now + Duration::seconds(60))).await;
    assert!(auth.verify_key(&expiring.text, now).await.is_ok());
    assert!(matches!(auth.verify_key(&expiring.text, now + Duration::seconds(60)).await, Err(AuthError::Expired)));

    assert!(auth.verify_key(&issued.text, now).await.is_ok());
    store.revoke_api_key_by_id(issued.key.id, now, &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap());
    assert!(matches!(auth.verify_key(&issued.text, now).await, Err(AuthError::Revoked)));

    let live = issue(&*store, a.id, "keys:read", None).await;
    assert!(auth.verify_key(&live.text, now).await.is_ok());
    store.set_company_status(a.id, CompanyStatus::Suspended, &noted("company.suspend")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap());
    assert!(matches!(auth.verify_key(&live.text, now).await, Err(AuthError::CompanySuspended)));
}

/// Counts every call that reaches the wrapped store's authentication methods.
struct CountingStore {
    inner: Arc<dyn OperatorStore>,
    calls: AtomicUsize,
    /// Makes `auth_revision` fail, as when the database is unreachable.
    fail_revision: std::sync::atomic::AtomicBool,
}

impl CountingStore {
    fn new(inner: Arc<dyn OperatorStore>) -> Arc<Self> {
        Arc::new(Self { inner, calls: AtomicUsize::new(0), fail_revision: Default::default() })
    }
}

#[async_trait]
impl AuthStore for CountingStore {
    async fn find_key_for_auth(&self, id: ApiKeyId) -> StoreResult<Option<KeyAuthRecord>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.find_key_for_auth(id).await
    }
    async fn auth_revision(&self) -> StoreResult<i64> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_revision.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("revision poll refused".into()));
        }
        self.inner.auth_revision().await
    }
    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.record_key_usage(usage).await
    }
}

pub async fn authenticator_never_reads_the_store_for_malformed_keys(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    let mut bad_checksum = issued.text.clone().into_bytes();
    let last = bad_checksum.len() - 1;
    bad_checksum[last] = if bad_checksum[last] == b'A' { b'B' } else { b'A' };
    let bad_checksum = String::from_utf8(bad_checksum).unwrap();
    for text in ["", "pgk_", "Bearer", "pgk_test_key_nope", &bad_checksum, &issued.text.replace("pgk_test", "pgk_live")]
    {
        assert!(matches!(auth.verify_key(text, paygate_domain::now()).await, Err(AuthError::Malformed(_))), "{text:?}");
    }
    assert_eq!(counting.calls.load(Ordering::SeqCst), 0);
    // The counter does count: a well-formed key costs exactly one read.
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
}

pub async fn authenticator_cache_drops_on_revocation(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    auth.poll_revision().await.unwrap();
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    let before = counting.calls.load(Ordering::SeqCst);
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    assert_eq!(counting.calls.load(Ordering::SeqCst), before, "second call is served from the cache");

    store.revoke_api_key_by_id(issued.key.id, paygate_domain::now(), &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap(), "the revision moved");
    assert!(matches!(auth.verify_key(&issued.text, paygate_domain::now()).await, Err(AuthError::Revoked)));
}

pub async fn authenticator_caches_unknown_ids_until_the_revision_moves(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    auth.poll_revision().await.unwrap();
    let unknown = hasher().generate(KeyMode::Test);
    let calls = || counting.calls.load(Ordering::SeqCst);
    let before = calls();
    for _ in 0..3 {
        assert!(matches!(auth.verify_key(&unknown.text, paygate_domain::now()).await, Err(AuthError::UnknownKey)));
    }
    assert_eq!(calls(), before + 1, "a flood of one unknown id costs one store read");
    // Known keys are unaffected by the negative entries.
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    // The same signal that drops verified keys drops unknown ids.
    store.revoke_api_key_by_id(issued.key.id, paygate_domain::now(), &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.unwrap());
    let before = calls();
    assert!(matches!(auth.verify_key(&unknown.text, paygate_domain::now()).await, Err(AuthError::UnknownKey)));
    assert_eq!(calls(), before + 1, "read again after the revision moved");
}

pub async fn concurrent_key_creation_and_revocation(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { issue(&*store, a.id, "keys:read", None).await.key }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.push(t.await.unwrap());
    }
    let now = paygate_domain::now();
    let mut tasks = Vec::new();
    for key in &keys {
        // Each key revoked twice at once: both calls succeed, one timestamp stands.
        for offset in [0, 1] {
            let store = store.clone();
            let id = key.id;
            tasks.push(tokio::spawn(async move {
                store.revoke_api_key_by_id(id, now + Duration::seconds(offset), &noted("api_key.revoke")).await
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap().unwrap());
    }
    for pair in results.chunks(2) {
        assert_eq!(pair[0].revoked_at, pair[1].revoked_at, "both callers see the one timestamp that stands");
    }
    let page = store.list_api_keys(&scope(&*store, a.id), PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 16);
    for key in &page.items {
        let seen = results.iter().find(|r| r.id == key.id).unwrap();
        assert_eq!(key.revoked_at, seen.revoked_at);
    }
}

pub async fn rotation_links_keys_and_shortens_the_old_expiry(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let (first, _) = new_key(KeyMode::Test, "keys:read", "203.0.113.0/24");
    let old = store.create_api_key(&sa, first, &noted("api_key.create")).await.unwrap();
    assert_eq!(old.allowed_cidrs.to_storage(), "203.0.113.0/24");
    let r0 = store.auth_revision().await.unwrap();
    let now = paygate_domain::now();
    let grace = now + Duration::hours(24);
    let (second, _) = new_key(KeyMode::Test, "keys:read", "203.0.113.0/24");
    let second_id = second.id;
    let Rotation::Rotated { old: rotated, new } =
        store.rotate_api_key(&sa, old.id, second, grace, now, &noted("api_key.rotate")).await.unwrap()
    else {
        panic!("rotation refused")
    };
    assert_eq!(rotated.replaced_by, Some(second_id));
    assert_eq!(rotated.expires_at, Some(grace));
    assert_eq!(new.replaces, Some(old.id));
    assert_eq!(store.get_api_key(&sa, second_id).await.unwrap().unwrap(), *new);
    assert!(store.auth_revision().await.unwrap() > r0, "cached copies of the old key must drop");

    // An earlier expiry is never extended by the grace period.
    let soon = now + Duration::minutes(5);
    let expiring = issue(&*store, a.id, "keys:read", Some(soon)).await.key;
    let (third, _) = new_key(KeyMode::Test, "keys:read", "");
    let Rotation::Rotated { old, .. } =
        store.rotate_api_key(&sa, expiring.id, third, grace, now, &noted("api_key.rotate")).await.unwrap()
    else {
        panic!("rotation refused")
    };
    assert_eq!(old.expires_at, Some(soon));
}

pub async fn rotation_refuses_revoked_expired_rotated_and_foreign_keys(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let sa = scope(&*store, a.id);
    let now = paygate_domain::now();
    let later = now + Duration::hours(1);
    let revoked = issue(&*store, a.id, "keys:read", None).await.key;
    store.revoke_api_key(&sa, revoked.id, now, &noted("api_key.revoke")).await.unwrap();
    assert_eq!(
        store
            .rotate_api_key(&sa, revoked.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::Revoked
    );
    let expired = issue(&*store, a.id, "keys:read", Some(now)).await.key;
    assert_eq!(
        store
            .rotate_api_key(&sa, expired.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::Expired
    );
    let live = issue(&*store, a.id, "keys:read", None).await.key;
    assert_eq!(
        store
            .rotate_api_key(
                &scope(&*store, b.id),
                live.id,
                new_key(KeyMode::Test, "", "").0,
                later,
                now,
                &noted("api_key.rotate")
            )
            .await
            .unwrap(),
        Rotation::NotFound
    );
    assert!(matches!(
        store
            .rotate_api_key(&sa, live.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::Rotated { .. }
    ));
    assert_eq!(
        store
            .rotate_api_key(&sa, live.id, new_key(KeyMode::Test, "", "").0, later, now, &noted("api_key.rotate"))
            .await
            .unwrap(),
        Rotation::AlreadyRotated
    );
    let page = store.list_api_keys(&sa, PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 4, "refused rotations wrote nothing");
}

pub async fn concurrent_rotations_produce_one_successor(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let key = issue(&*store, a.id, "keys:read", None).await.key;
    let now = paygate_domain::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let sa = scope(&*store, a.id);
        tasks.push(tokio::spawn(async move {
            store
                .rotate_api_key(
                    &sa,
                    key.id,
                    new_key(KeyMode::Test, "keys:read", "").0,
                    now + Duration::hours(1),
                    now,
                    &noted("api_key.rotate"),
                )
                .await
        }));
    }
    let mut rotated = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Rotation::Rotated { .. } => rotated += 1,
            Rotation::AlreadyRotated => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rotated, 1);
    let page = store.list_api_keys(&scope(&*store, a.id), PageRequest { limit: 100, after: None }).await.unwrap();
    assert_eq!(page.items.len(), 2);
}

pub async fn revoke_all_touches_only_the_company(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let b = company(&*store, "Globex").await;
    let now = paygate_domain::now();
    for _ in 0..3 {
        issue(&*store, a.id, "keys:read", None).await;
    }
    let already = issue(&*store, a.id, "keys:read", None).await.key;
    store.revoke_api_key_by_id(already.id, now - Duration::hours(1), &noted("api_key.revoke")).await.unwrap();
    let other = issue(&*store, b.id, "keys:read", None).await.key;
    let r0 = store.auth_revision().await.unwrap();
    assert_eq!(store.revoke_all_api_keys(&scope(&*store, a.id), now, &noted("api_key.revoke_all")).await.unwrap(), 3);
    assert!(store.auth_revision().await.unwrap() > r0);
    let page = store.list_api_keys(&scope(&*store, a.id), PageRequest { limit: 100, after: None }).await.unwrap();
    assert!(page.items.iter().all(|k| k.revoked_at.is_some()));
    let kept = page.items.iter().find(|k| k.id == already.id).unwrap();
    assert_eq!(kept.revoked_at, Some(now - Duration::hours(1)), "earlier revocation time stands");
    assert_eq!(store.get_api_key(&scope(&*store, b.id), other.id).await.unwrap().unwrap().revoked_at, None);
}

pub async fn key_usage_is_recorded_and_never_moves_backwards(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let k1 = issue(&*store, a.id, "keys:read", None).await.key;
    let k2 = issue(&*store, a.id, "keys:read", None).await.key;
    let now = paygate_domain::now();
    let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let ip6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
    store
        .record_key_usage(&[KeyUsage { id: k2.id, at: now, ip: ip6 }, KeyUsage { id: k1.id, at: now, ip }])
        .await
        .unwrap();
    store.record_key_usage(&[KeyUsage { id: k1.id, at: now - Duration::minutes(5), ip: ip6 }]).await.unwrap();
    store.record_key_usage(&[]).await.unwrap();
    let sa = scope(&*store, a.id);
    let got = store.get_api_key(&sa, k1.id).await.unwrap().unwrap();
    assert_eq!((got.last_used_at, got.last_used_ip), (Some(now), Some(ip)));
    let got = store.get_api_key(&sa, k2.id).await.unwrap().unwrap();
    assert_eq!((got.last_used_at, got.last_used_ip), (Some(now), Some(ip6)));
}

pub async fn key_policy_round_trip(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    assert_eq!(a.key_policy, KeyPolicy::default());
    let policy = KeyPolicy::new(Some(Duration::days(30)), Some(Duration::days(90))).unwrap();
    let updated = store.set_key_policy(a.id, policy, &noted("company.set_key_policy")).await.unwrap().unwrap();
    assert_eq!(updated.key_policy, policy);
    assert_eq!(store.get_company(&scope(&*store, a.id)).await.unwrap().key_policy, policy);
    assert_eq!(
        store.set_key_policy(CompanyId::generate(), policy, &noted("company.set_key_policy")).await.unwrap(),
        None
    );
    store.set_key_policy(a.id, KeyPolicy::default(), &noted("company.set_key_policy")).await.unwrap();
    assert_eq!(store.find_company(a.id).await.unwrap().unwrap().key_policy, KeyPolicy::default());
}

/// A node that cannot read the revision must stop trusting its cache: a lost
/// signal costs database reads, never a stale accept.
pub async fn authenticator_bypasses_the_cache_when_revision_polls_fail(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let issued = issue(&*store, a.id, "keys:read", None).await;
    let counting = CountingStore::new(store.clone());
    let auth = authenticator(counting.clone());
    auth.poll_revision().await.unwrap();
    auth.verify_key(&issued.text, paygate_domain::now()).await.unwrap();
    counting.fail_revision.store(true, Ordering::SeqCst);
    store.revoke_api_key_by_id(issued.key.id, paygate_domain::now(), &noted("api_key.revoke")).await.unwrap();
    assert!(auth.poll_revision().await.is_err());
    tokio::time::sleep(AuthConfig::default().max_staleness + std::time::Duration::from_millis(50)).await;
    assert!(matches!(auth.verify_key(&issued.text, paygate_domain::now()).await, Err(AuthError::Revoked)));
}

/// Emergency revocation racing key creation and rotation completes without
/// errors or deadlocks on both backends. (The ordering itself is by locking:
/// on PostgreSQL revoke-all holds the company row exclusively and creation and
/// rotation hold it shared, so no key committed before revoke-all's update is
/// missed; SQLite serialises every write with BEGIN IMMEDIATE. A precise
/// interleaving test needs two sessions driven step by step; see the note in
/// ADR 0001.)
/// Revoke-all racing creation and rotation: it must finish (a deadlock fails
/// the timeout instead of hanging), and a key that existed before it started
/// (the seed) is revoked whatever the rotation did. Keys created concurrently
/// may land on either side; that is the it-suite's ordered race test.
pub async fn revoke_all_races_creation_and_rotation_without_deadlock(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    for round in 0..5 {
        let seed = issue(&*store, a.id, "keys:read", None).await.key;
        let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
        let creator = tokio::spawn(async move {
            for _ in 0..5 {
                issue(&*s1, a.id, "keys:read", None).await;
            }
        });
        let rotator = tokio::spawn(async move {
            let now = paygate_domain::now();
            let sa = scope(&*s2, a.id);
            let _ = s2
                .rotate_api_key(
                    &sa,
                    seed.id,
                    new_key(KeyMode::Test, "keys:read", "").0,
                    now + Duration::hours(1),
                    now,
                    &noted("api_key.rotate"),
                )
                .await;
        });
        let revoker = tokio::spawn(async move {
            tokio::task::yield_now().await;
            let sa = scope(&*s3, a.id);
            s3.revoke_all_api_keys(&sa, paygate_domain::now(), &noted("api_key.revoke_all")).await.unwrap();
        });
        let all = async {
            revoker.await.unwrap();
            creator.await.unwrap();
            rotator.await.unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .unwrap_or_else(|_| panic!("round {round}: revoke-all, creation and rotation deadlocked"));
        let sa = scope(&*store, a.id);
        let seed_now = store.get_api_key(&sa, seed.id).await.unwrap().expect("the seed exists");
        assert!(seed_now.revoked_at.is_some(), "round {round}: a key older than revoke-all survived it");
    }
}

// ---------------------------------------------------------------------------
// Payments

pub async fn expiring_keys_are_noticed_once(store: Arc<dyn OperatorStore>) {
    let a = company(&*store, "Acme").await;
    let sa = scope(&*store, a.id);
    let now = paygate_domain::now();
    let soon = issue(&*store, a.id, "keys:read", Some(now + Duration::days(1))).await.key;
    issue(&*store, a.id, "keys:read", Some(now + Duration::days(10))).await;
    issue(&*store, a.id, "keys:read", None).await;
    issue(&*store, a.id, "keys:read", Some(now - Duration::minutes(1))).await;
    let revoked = issue(&*store, a.id, "keys:read", Some(now + Duration::days(1))).await.key;
    store.revoke_api_key(&sa, revoked.id, now, &noted("api_key.revoke")).await.unwrap();
    let rotated = issue(&*store, a.id, "keys:read", Some(now + Duration::days(1))).await.key;
    let (next, _) = new_key(KeyMode::Test, "keys:read", "");
    let grace = now + Duration::hours(1);
    store.rotate_api_key(&sa, rotated.id, next, grace, now, &noted("api_key.rotate")).await.unwrap();

    let until = now + Duration::days(2);
    let due = store.expiring_keys(now, until, 100).await.unwrap();
    assert_eq!(due.iter().map(|k| k.id).collect::<Vec<_>>(), vec![soon.id], "unrevoked, unrotated, in the window");
    let first = entry_for(a.id, "api_key.expiry_notice", Outcome::Success);
    assert!(store.note_key_expiring(soon.id, &first).await.unwrap());
    let second = entry_for(a.id, "api_key.expiry_notice", Outcome::Success);
    assert!(!store.note_key_expiring(soon.id, &second).await.unwrap(), "noticed once");
    assert!(!store.note_key_expiring(ApiKeyId::generate(), &second).await.unwrap());
    assert!(store.expiring_keys(now, until, 100).await.unwrap().is_empty());
    assert_eq!(
        trail(&*store, &sa, KeyMode::Test, &soon.id.to_string()).await,
        vec![step("api_key.created", 1, None), step("api_key.expiring", 2, None)]
    );
    assert!(store.get_audit(&sa, first.id).await.unwrap().is_some());
    assert!(store.get_audit(&sa, second.id).await.unwrap().is_none(), "nothing happened, nothing recorded");
}
