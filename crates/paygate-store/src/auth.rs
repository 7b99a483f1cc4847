//! Steps 3–5 of the request pipeline: parse the key, look it up (cache, then
//! store), verify the secret in constant time, check its status. The only place
//! a [`CompanyScope`] is made for an API caller.
//!
//! The verified-key cache is safe against revocation because it is never trusted
//! on a clock alone: a watcher polls the store's auth revision (bumped in the
//! same transaction as every revocation and suspension) and drops the cache when
//! it moves, and the cache is bypassed entirely whenever the last successful poll
//! is older than `max_staleness`. A lost or slow poll therefore costs database
//! reads, never a stale accept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use paygate_domain::{ApiKeyId, ApiKeyText, CompanyStatus, KeyHasher, KeyParseError};
use time::OffsetDateTime;

use crate::{AuthStore, CompanyScope, KeyAuthRecord, KeyUsage, StoreError};

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Most verified keys held per node.
    pub cache_capacity: usize,
    /// Upper bound on how long one entry is reused, whatever the watcher says.
    pub cache_ttl: Duration,
    /// How often the auth revision is polled.
    pub revision_poll: Duration,
    /// The cache is bypassed when the last successful poll is older than this.
    pub max_staleness: Duration,
    /// `last_used_at` is written at most this often per key per node.
    pub usage_interval: Duration,
    /// How often noted usage is flushed to the store.
    pub usage_flush: Duration,
    /// Most usage records waiting for a flush; beyond it, usage is dropped
    /// (and counted), never a request.
    pub usage_queue: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cache_capacity: 10_000,
            cache_ttl: Duration::from_secs(30),
            revision_poll: Duration::from_millis(200),
            max_staleness: Duration::from_millis(750),
            usage_interval: Duration::from_secs(60),
            usage_flush: Duration::from_secs(1),
            usage_queue: 10_000,
        }
    }
}

/// Why a request did not authenticate. The HTTP layer maps `Malformed`,
/// `UnknownKey` and `WrongSecret` to one indistinguishable 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    Missing,
    #[error("key text rejected: {0}")]
    Malformed(KeyParseError),
    #[error("unknown key")]
    UnknownKey,
    #[error("secret does not match")]
    WrongSecret,
    #[error("key revoked")]
    Revoked,
    #[error("key expired")]
    Expired,
    #[error("company suspended")]
    CompanySuspended,
    #[error("client address not in the key's allow-list")]
    IpNotAllowed,
    #[error(transparent)]
    Unavailable(StoreError),
}

impl AuthError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed(e) => e.reason(),
            Self::UnknownKey => "unknown_key",
            Self::WrongSecret => "wrong_secret",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::CompanySuspended => "company_suspended",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::Unavailable(_) => "store_unavailable",
        }
    }
}

/// A refused authentication; `key` is set when the secret verified (the
/// refusal is then about the key's state, and belongs to its company's record).
#[derive(Debug)]
pub struct AuthFailure {
    pub error: AuthError,
    pub key: Option<Arc<KeyAuthRecord>>,
}

impl From<AuthError> for AuthFailure {
    fn from(error: AuthError) -> Self {
        Self { error, key: None }
    }
}

/// A caller whose key verified and is usable right now.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub scope: CompanyScope,
    pub record: Arc<KeyAuthRecord>,
}

pub struct Authenticator {
    store: Arc<dyn AuthStore>,
    hasher: KeyHasher,
    cache: KeyCache,
    usage: UsageRecorder,
    config: AuthConfig,
}

impl Authenticator {
    pub fn new(store: Arc<dyn AuthStore>, hasher: KeyHasher, config: AuthConfig) -> Self {
        let cache = KeyCache::new(config.cache_capacity, config.cache_ttl);
        let usage = UsageRecorder::new(config.usage_interval, config.usage_queue);
        Self { store, hasher, cache, usage, config }
    }

    /// The whole of steps 3–5 for a request from `client`: verify the key, check
    /// the key's client address allow-list, and note the use (`last_used_at`).
    /// A refusal of a key whose secret verified (revoked, expired, suspended,
    /// address not allowed) carries the key, so it can be recorded in its
    /// company's audit chain: that is how a company sees a leaked key misused.
    pub async fn authenticate(
        &self,
        text: &str,
        client: IpAddr,
        now: OffsetDateTime,
    ) -> Result<Authenticated, AuthFailure> {
        let caller = self.verify(text, now).await?;
        if !caller.record.key.allowed_cidrs.permits(client) {
            return Err(AuthFailure { error: AuthError::IpNotAllowed, key: Some(caller.record) });
        }
        self.usage.note(caller.record.key.id, client, now);
        Ok(caller)
    }

    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Verifies the text of an `Authorization: Bearer` credential and the key's
    /// status. Does not look at the client address: requests go through
    /// [`Authenticator::authenticate`].
    pub async fn verify_key(&self, text: &str, now: OffsetDateTime) -> Result<Authenticated, AuthError> {
        self.verify(text, now).await.map_err(|f| f.error)
    }

    async fn verify(&self, text: &str, now: OffsetDateTime) -> Result<Authenticated, AuthFailure> {
        let refuse = |error: AuthError, record: &Arc<KeyAuthRecord>| AuthFailure { error, key: Some(record.clone()) };
        // Step 3: a malformed or bad-checksum key never reaches the store.
        let key = ApiKeyText::parse(text).map_err(AuthError::Malformed)?;
        let record = match self.cache.get(key.id(), self.config.max_staleness) {
            Cached::Verified(record) => {
                self.cache.lookups.hit.increment(1);
                record
            }
            Cached::Unknown => {
                self.cache.lookups.negative_hit.increment(1);
                return Err(AuthError::UnknownKey.into());
            }
            Cached::Nothing => {
                self.cache.lookups.miss.increment(1);
                self.load(key.id()).await?
            }
        };
        if !self.hasher.verify(key.secret(), &record.secret_hash, record.pepper_version) {
            return Err(AuthError::WrongSecret.into());
        }
        // A key's mode is part of its text; a mismatch means the text was edited.
        if record.key.mode != key.mode() {
            return Err(AuthError::WrongSecret.into());
        }
        if record.key.revoked_at.is_some() {
            return Err(refuse(AuthError::Revoked, &record));
        }
        if record.key.is_expired_at(now) {
            return Err(refuse(AuthError::Expired, &record));
        }
        if record.company_status == CompanyStatus::Suspended {
            return Err(refuse(AuthError::CompanySuspended, &record));
        }
        Ok(Authenticated { scope: CompanyScope::new(record.key.company_id, record.key.mode), record })
    }

    async fn load(&self, id: ApiKeyId) -> Result<Arc<KeyAuthRecord>, AuthError> {
        // Read the generation before the store: if the cache is dropped while we
        // read, our possibly stale row is inserted under the old generation and
        // never served.
        let generation = self.cache.generation();
        metrics::counter!("paygate_key_store_lookups_total").increment(1);
        let record = self.store.find_key_for_auth(id).await.map_err(AuthError::Unavailable)?;
        let Some(record) = record else {
            // Well-formed but unknown: a flood of one such id costs one read.
            self.cache.insert_unknown(id, generation);
            return Err(AuthError::UnknownKey);
        };
        let record = Arc::new(record);
        self.cache.insert(id, record.clone(), generation);
        Ok(record)
    }

    /// One poll of the auth revision. Returns whether the cache was dropped.
    pub async fn poll_revision(&self) -> Result<bool, StoreError> {
        // Freshness dates from before the read: a revocation committed while the
        // answer travels back must not extend the window past `max_staleness`.
        let asked_at = self.cache.now_ms();
        let revision = self.store.auth_revision().await?;
        Ok(self.cache.observe_revision(revision, asked_at))
    }

    /// Polls forever; run it as a background task next to the server.
    pub async fn watch_revisions(self: Arc<Self>) {
        let mut ticker = tokio_interval(self.config.revision_poll);
        let mut failing = false;
        loop {
            ticker.tick().await;
            match self.poll_revision().await {
                Ok(_) => {
                    if failing {
                        tracing::info!("auth revision poll recovered; key cache back in use");
                    }
                    failing = false;
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "auth revision poll failed; key cache bypassed until it recovers");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Drops every cached key on this node at once. Called after a change made
    /// through this node, so it is refused here without waiting for the poll.
    pub fn invalidate(&self) {
        self.cache.drop_all();
    }

    /// Flushes noted key usage forever; run it as a background task.
    pub async fn record_usage(self: Arc<Self>) {
        let mut ticker = tokio_interval(self.config.usage_flush);
        loop {
            ticker.tick().await;
            self.flush_usage().await;
        }
    }

    /// Writes the usage noted since the last flush. On failure the batch is
    /// dropped: usage is informational and will be noted again.
    pub async fn flush_usage(&self) {
        let batch = self.usage.take();
        if batch.is_empty() {
            return;
        }
        if let Err(error) = self.store.record_key_usage(&batch).await {
            metrics::counter!("paygate_key_usage_dropped_total", "reason" => "store").increment(batch.len() as u64);
            tracing::warn!(%error, keys = batch.len(), "could not record key usage");
        }
    }

    pub fn cached_keys(&self) -> usize {
        self.cache.len()
    }
}

fn tokio_interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

struct Entry {
    record: Arc<KeyAuthRecord>,
    generation: u64,
    inserted: Instant,
}

/// What the cache knows about a key id.
enum Cached {
    Verified(Arc<KeyAuthRecord>),
    /// Read from the store under the current generation and not found.
    Unknown,
    Nothing,
}

/// The lookup counters, registered once (they are bumped on every request).
struct LookupCounters {
    hit: metrics::Counter,
    negative_hit: metrics::Counter,
    miss: metrics::Counter,
}

/// Unknown key ids, kept apart from verified keys with their own bound, so a
/// flood of made-up ids can evict only other made-up ids. Same freshness and
/// generation rules as verified entries: dropped on every revision change.
/// (A key id is random and never known before its key exists, so caching
/// its absence cannot refuse a key created later, and a revision change
/// clears it anyway.)
struct UnknownEntry {
    generation: u64,
    inserted: Instant,
}

struct KeyCache {
    entries: Mutex<HashMap<ApiKeyId, Entry>>,
    unknown: Mutex<HashMap<ApiKeyId, UnknownEntry>>,
    lookups: LookupCounters,
    entries_gauge: metrics::Gauge,
    unknown_gauge: metrics::Gauge,
    generation: AtomicU64,
    last_revision: Mutex<Option<i64>>,
    /// Milliseconds since `epoch` at which the last revision poll succeeded; 0 = never.
    fresh_at_ms: AtomicU64,
    epoch: Instant,
    capacity: usize,
    ttl: Duration,
}

impl KeyCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        let lookups = |result: &'static str| metrics::counter!("paygate_key_cache_lookups_total", "result" => result);
        Self {
            entries: Mutex::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
            lookups: LookupCounters {
                hit: lookups("hit"),
                negative_hit: lookups("negative_hit"),
                miss: lookups("miss"),
            },
            entries_gauge: metrics::gauge!("paygate_key_cache_entries"),
            unknown_gauge: metrics::gauge!("paygate_key_cache_unknown_entries"),
            generation: AtomicU64::new(0),
            last_revision: Mutex::new(None),
            fresh_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn get(&self, id: ApiKeyId, max_staleness: Duration) -> Cached {
        let fresh_at = self.fresh_at_ms.load(Ordering::Acquire);
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if fresh_at == 0 || now_ms.saturating_sub(fresh_at) > max_staleness.as_millis() as u64 {
            return Cached::Nothing;
        }
        let generation = self.generation();
        if let Some(entry) = self.entries.lock().get(&id)
            && entry.generation == generation
            && entry.inserted.elapsed() < self.ttl
        {
            return Cached::Verified(entry.record.clone());
        }
        if let Some(entry) = self.unknown.lock().get(&id)
            && entry.generation == generation
            && entry.inserted.elapsed() < self.ttl
        {
            return Cached::Unknown;
        }
        Cached::Nothing
    }

    fn insert_unknown(&self, id: ApiKeyId, generation: u64) {
        let mut unknown = self.unknown.lock();
        if unknown.len() >= self.capacity && !unknown.contains_key(&id) {
            let current = self.generation();
            let ttl = self.ttl;
            unknown.retain(|_, e| e.generation == current && e.inserted.elapsed() < ttl);
            if unknown.len() >= self.capacity
                && let Some(victim) = unknown.keys().next().copied()
            {
                unknown.remove(&victim);
            }
        }
        unknown.insert(id, UnknownEntry { generation, inserted: Instant::now() });
        self.unknown_gauge.set(unknown.len() as f64);
    }

    fn insert(&self, id: ApiKeyId, record: Arc<KeyAuthRecord>, generation: u64) {
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&id) {
            let current = self.generation();
            let ttl = self.ttl;
            entries.retain(|_, e| e.generation == current && e.inserted.elapsed() < ttl);
            if entries.len() >= self.capacity {
                // Still full of live entries: drop an arbitrary one. Misses cost a
                // store read, never correctness.
                if let Some(victim) = entries.keys().next().copied() {
                    entries.remove(&victim);
                }
            }
        }
        entries.insert(id, Entry { record, generation, inserted: Instant::now() });
        self.entries_gauge.set(entries.len() as f64);
    }

    /// Milliseconds since `epoch`, at least 1 (0 means "never polled").
    fn now_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    fn observe_revision(&self, revision: i64, asked_at_ms: u64) -> bool {
        let mut last = self.last_revision.lock();
        // The first observation counts as a change: entries cached before it were
        // read under an unknown revision.
        let changed = *last != Some(revision);
        if changed {
            self.drop_all();
        }
        *last = Some(revision);
        self.fresh_at_ms.fetch_max(asked_at_ms, Ordering::AcqRel);
        changed
    }

    fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.lock().clear();
        self.unknown.lock().clear();
        self.unknown_gauge.set(0.0);
    }

    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// Notes successful key use at most once per `interval` per key on this node,
/// so `last_used_at` never costs a database write per request.
struct UsageRecorder {
    interval: Duration,
    capacity: usize,
    state: Mutex<UsageState>,
}

#[derive(Default)]
struct UsageState {
    last_noted: HashMap<ApiKeyId, Instant>,
    pending: Vec<KeyUsage>,
}

impl UsageRecorder {
    fn new(interval: Duration, capacity: usize) -> Self {
        Self { interval, capacity: capacity.max(1), state: Mutex::new(UsageState::default()) }
    }

    fn note(&self, id: ApiKeyId, ip: IpAddr, at: OffsetDateTime) {
        let mut state = self.state.lock();
        if state.last_noted.get(&id).is_some_and(|t| t.elapsed() < self.interval) {
            return;
        }
        if state.pending.len() >= self.capacity {
            metrics::counter!("paygate_key_usage_dropped_total", "reason" => "queue_full").increment(1);
            return;
        }
        if state.last_noted.len() >= self.capacity {
            let interval = self.interval;
            state.last_noted.retain(|_, t| t.elapsed() < interval);
            if state.last_noted.len() >= self.capacity {
                // All fresh: forget them (a few extra writes) rather than grow.
                state.last_noted.clear();
            }
        }
        state.last_noted.insert(id, Instant::now());
        state.pending.push(KeyUsage { id, at, ip });
        metrics::gauge!("paygate_key_usage_pending").set(state.pending.len() as f64);
    }

    fn take(&self) -> Vec<KeyUsage> {
        let batch = std::mem::take(&mut self.state.lock().pending);
        metrics::gauge!("paygate_key_usage_pending").set(0.0);
        batch
    }
}
