//! Wiring: open the store, build the authenticator, bind both listeners, run
//! the background workers, shut down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use paygate_api::audit::{AuditConfig, AuditWriter};
use paygate_api::limits::{LimitsConfig, RateLimits};
use paygate_api::{ApiConfig, AppState};
use paygate_domain::KeyHasher;
use paygate_domain::audit::AuditSigner;
use paygate_ratelimit::{ConcurrencyLimiter, Quota, SharedLimiter};
use paygate_store::Checkpoint;
use paygate_store::auth::{AuthConfig, Authenticator};
use paygate_store::{OperatorStore, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Database};
use crate::{pepper, telemetry};

/// Refuses a SQLite path whose directory does not exist unless asked to
/// create it: a typo in the path must not start a new, empty installation
/// with new keys (the pepper file is created beside the database too).
fn database_dir(config: &Config, path: &std::path::Path) -> anyhow::Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) else { return Ok(()) };
    if !config.create_database_dir {
        anyhow::bail!(
            "the database directory {} does not exist; check the path, or create it with `paygate migrate` \
             or `paygate serve --create`",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Opens the configured backend.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn OperatorStore>> {
    let store: Arc<dyn OperatorStore> = match &config.database {
        Database::Sqlite { url, path } => {
            database_dir(config, path)?;
            Arc::new(paygate_store_sqlite::SqliteStore::connect(url).await.context("cannot open the SQLite database")?)
        }
        Database::Postgres { url } => {
            Arc::new(paygate_store_postgres::PostgresStore::connect(url).await.context("cannot connect to PostgreSQL")?)
        }
    };
    Ok(store)
}

pub async fn build_limits(config: &Config) -> anyhow::Result<RateLimits> {
    let l = &config.limits;
    let limits_config = LimitsConfig {
        key: Quota::new(l.key.0, l.key.1),
        company: Quota::new(l.company.0, l.company.1),
        client: Quota::new(l.client.0, l.client.1),
        auth_failures: Quota::per_window(l.auth_failures.0, l.auth_failures.1),
        write_concurrency: l.write_concurrency,
        max_in_flight: l.max_in_flight as usize,
        enabled: true,
    };
    let slot_lifetime = paygate_api::limits::slot_lifetime(config.request_timeout);
    let (limiter, concurrency) = match &config.redis_url {
        None => (SharedLimiter::in_process(l.capacity as usize), ConcurrencyLimiter::new(None, slot_lifetime, 1)),
        Some(url) => {
            // Never blocks start-up: while Redis is unreachable the node
            // enforces its share in process and keeps trying.
            let prefix = format!("{}rl:", config.redis_prefix);
            let (limiter, slot) = SharedLimiter::connecting(url.clone(), prefix, l.capacity as usize, l.nodes).await;
            tracing::info!(nodes = l.nodes, "rate limits shared through Redis");
            (limiter, ConcurrencyLimiter::new(Some(slot), slot_lifetime, l.nodes))
        }
    };
    Ok(RateLimits::new(limiter, concurrency, limits_config))
}

/// Signs the head of every chain that moved since its last checkpoint.
pub async fn checkpoint(store: &dyn OperatorStore, signer: &AuditSigner) -> anyhow::Result<usize> {
    let mut signed = 0;
    let done: std::collections::HashMap<String, u64> = store.checkpointed_seqs().await?.into_iter().collect();
    for (chain, seq, hash) in store.audit_heads().await? {
        let last = done.get(&chain).copied().unwrap_or(0);
        if last >= seq {
            continue;
        }
        let checkpoint = Checkpoint {
            signature: signer.sign(&chain, seq, &hash).to_vec(),
            chain,
            seq,
            hash,
            signed_at: paygate_domain::now(),
            key_id: signer.key_id(),
        };
        store.add_checkpoint(&checkpoint).await?;
        signed += 1;
    }
    Ok(signed)
}

async fn checkpoint_every(store: Arc<dyn OperatorStore>, signer: Arc<AuditSigner>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(error) = checkpoint(&*store, &signer).await {
            tracing::warn!(%error, "audit checkpoint failed");
        }
    }
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    pub api_addr: SocketAddr,
    /// What the API handlers hold; tests use it to serve extra routers.
    pub state: AppState,
    pub ops_addr: SocketAddr,
    pub store: Arc<dyn OperatorStore>,
    pub hasher: KeyHasher,
    auth: Arc<Authenticator>,
    audit: AuditWriter,
    signer: Arc<AuditSigner>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// Awaited, not aborted, on shutdown: it lets its attempts in flight finish.
    delivery_worker: JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    pub skip_migrations: bool,
}

pub async fn start(config: &Config, options: StartOptions) -> anyhow::Result<Server> {
    crate::install_tls_provider();
    let metrics = telemetry::metrics_handle();
    if let Database::Sqlite { path, .. } = &config.database {
        database_dir(config, path)?;
    }
    let pepper = pepper::load(config)?;
    let hasher = KeyHasher::new(&pepper);
    let store = open_store(config).await?;
    if config.migrate_on_start && !options.skip_migrations {
        store.migrate().await.context("migrations failed")?;
    }

    let auth_config = AuthConfig {
        cache_capacity: config.key_cache_capacity,
        cache_ttl: config.key_cache_ttl,
        ..AuthConfig::default()
    };
    let api_store: Arc<dyn Store> = store.clone();
    let auth = Arc::new(Authenticator::new(api_store.clone(), hasher.clone(), auth_config));
    // One poll before serving, so the cache is usable from the first request.
    if let Err(error) = auth.poll_revision().await {
        tracing::warn!(%error, "first auth revision poll failed; keys will be read from the store");
    }

    let api_listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("listen: cannot bind {}", config.listen))?;
    let ops_listener = TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("ops_listen: cannot bind {}", config.ops_listen))?;
    let api_addr = api_listener.local_addr()?;
    let ops_addr = ops_listener.local_addr()?;

    let limits = Arc::new(build_limits(config).await?);
    let signer = Arc::new(pepper::load_audit_signer(config, true)?);
    let audit_config = AuditConfig { aggregation_interval: config.audit_aggregation, ..AuditConfig::default() };
    let (audit, audit_tasks) = AuditWriter::start(api_store.clone(), audit_config);
    let data_key = Arc::new(pepper::load_data_key(config, true)?);
    let webhook_addresses =
        Arc::new(paygate_domain::webhook::AddressPolicy::new(config.webhooks.allowed_networks.clone()));
    let webhook_client = crate::webhook_client::WebhookClient::new(
        (*webhook_addresses).clone(),
        config.webhooks.connect_timeout,
        config.webhooks.timeout,
    )
    .context("cannot build the webhook HTTP client")?;
    let state = AppState {
        webhook_addresses,
        data_key: data_key.clone(),
        payments: paygate_api::payment_writer::PaymentWriter::spawn(api_store.clone()),
        rail_submit_delay: config.rail_submit_delay,
        store: api_store.clone(),
        auth: auth.clone(),
        limits,
        audit: audit.clone(),
        audit_public_key: signer.public_key(),
    };
    let api_state = state.clone();
    let api_config = ApiConfig {
        max_body_bytes: config.max_body_bytes,
        request_timeout: config.request_timeout,
        trusted_proxies: config.trusted_proxies.clone(),
    };
    let api = paygate_api::router(state, &api_config);
    let ops = crate::ops::router(api_store, metrics);

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let api_task = tokio::spawn(crate::http::serve(
        api_listener,
        api,
        stopped.clone(),
        crate::http::ConnectionLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        },
        config.request_timeout + Duration::from_secs(5),
    ));
    let ops_task = tokio::spawn({
        let stopped = stopped.clone();
        async move {
            if let Err(error) = axum::serve(ops_listener, ops).with_graceful_shutdown(until_stopped(stopped)).await {
                tracing::error!(%error, "ops listener failed");
            }
        }
    });
    let watcher = tokio::spawn(auth.clone().watch_revisions());
    let usage = tokio::spawn(auth.clone().record_usage());
    let checkpoints = tokio::spawn(checkpoint_every(store.clone(), signer.clone(), config.audit_checkpoint));
    let payment_worker = tokio::spawn(
        crate::rail::PaymentWorker {
            store: store.clone(),
            rail: Arc::new(crate::rail::SimulatedRail { settle_delay: config.rail_settle_delay }),
            data_key: data_key.clone(),
            interval: config.payment_worker_interval,
        }
        .run(stopped.clone()),
    );
    let delivery_worker = tokio::spawn(
        crate::webhooks::DeliveryWorker {
            store: store.clone(),
            client: webhook_client,
            data_key,
            config: config.webhooks.clone(),
            node: format!("node_{}", uuid::Uuid::now_v7().simple()),
        }
        .run(stopped.clone()),
    );
    let mut workers = vec![watcher, usage, checkpoints, payment_worker];
    workers.extend(audit_tasks);
    tracing::info!(api = %api_addr, ops = %ops_addr, database = %config.database.redacted(), backend = store.backend().as_str(), "paygate listening");
    Ok(Server {
        state: api_state,
        api_addr,
        ops_addr,
        store,
        hasher,
        auth,
        audit,
        signer,
        stop,
        tasks: vec![api_task, ops_task],
        workers,
        delivery_worker,
    })
}

impl Server {
    /// Stops accepting, lets in-flight requests finish, then stops the workers.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // Webhook attempts in flight are recorded (the worker stops claiming
        // and waits for them, bounded by the attempt timeout).
        let _ = self.delivery_worker.await;
        // Aggregated failure counts still open, then the workers.
        self.audit.flush_aggregated().await;
        for worker in self.workers {
            worker.abort();
        }
        // Key usage noted by the last requests, and a final signed checkpoint.
        self.auth.flush_usage().await;
        if let Err(error) = checkpoint(&*self.store, &self.signer).await {
            tracing::warn!(%error, "final audit checkpoint failed");
        }
        tracing::info!("paygate stopped");
    }
}
