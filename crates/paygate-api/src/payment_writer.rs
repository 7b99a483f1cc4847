//! Group commit of payment creations. SQLite with `synchronous=FULL` pays one
//! fsync per transaction, so one transaction per payment caps a node at a few
//! hundred payments a second. Concurrent `POST /v1/payments` requests hand
//! their creation to a writer task (one on SQLite, four on PostgreSQL), which
//! commits whatever has queued up as one transaction. An item refused for its
//! payee or a used key leaves no trace and does not fail the others (every
//! check comes before any write). Every request gets its answer only after
//! its payment, idempotency record and audit record are durable.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use paygate_domain::{CompanyId, KeyMode};
use paygate_store::{PaymentCreate, PaymentCreated, Store, StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

type Job = (PaymentCreate, oneshot::Sender<StoreResult<PaymentCreated>>);

/// Queue bound (invariant I10): beyond it, requests wait for room.
const QUEUE: usize = 4096;
const MAX_BATCH: usize = 256;

#[derive(Clone)]
pub struct PaymentWriter {
    tx: mpsc::Sender<Job>,
    in_flight: Arc<Mutex<HashSet<(CompanyId, KeyMode, String)>>>,
}

/// Holds an idempotency key as "being processed on this node" until dropped.
pub struct InFlight {
    set: Arc<Mutex<HashSet<(CompanyId, KeyMode, String)>>>,
    key: (CompanyId, KeyMode, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

impl PaymentWriter {
    /// One writer on SQLite (it has one write lock anyway); several on
    /// PostgreSQL, whose batches can commit side by side.
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let writers = match store.backend() {
            paygate_store::Backend::Sqlite => 1,
            paygate_store::Backend::Postgres => 4,
        };
        Self::spawn_with(store, MAX_BATCH, writers)
    }

    /// With at most `max_batch` payments a transaction (1: no group commit;
    /// the benchmark's comparison point) and `writers` batches in flight.
    pub fn spawn_with(store: Arc<dyn Store>, max_batch: usize, writers: usize) -> Self {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers.max(1) {
            let (store, rx) = (store.clone(), rx.clone());
            tokio::spawn(async move {
                let mut jobs = Vec::with_capacity(max_batch);
                loop {
                    // Take what has queued up, then let another writer take the next batch.
                    if rx.lock().await.recv_many(&mut jobs, max_batch).await == 0 {
                        return;
                    }
                    let (items, replies): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
                    write_batch(&*store, items, replies).await;
                }
            });
        }
        Self { tx, in_flight: Arc::default() }
    }

    /// Claims an idempotency key on this node; `None` if a request with the same
    /// key is already being processed here. Other nodes are excluded by the
    /// key's primary key in the database.
    pub fn claim(&self, company: CompanyId, mode: KeyMode, key: &str) -> Option<InFlight> {
        let entry = (company, mode, key.to_owned());
        let mut set = self.in_flight.lock();
        if !set.insert(entry.clone()) {
            return None;
        }
        Some(InFlight { set: self.in_flight.clone(), key: entry })
    }

    pub async fn create(&self, item: PaymentCreate) -> StoreResult<PaymentCreated> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.map_err(|_| StoreError::Unavailable("payment writer stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("payment writer stopped".into()))?
    }
}

async fn write_batch(
    store: &dyn Store,
    items: Vec<PaymentCreate>,
    replies: Vec<oneshot::Sender<StoreResult<PaymentCreated>>>,
) {
    metrics::histogram!("paygate_payment_batch_payments").record(items.len() as f64);
    match store.create_payments(&items).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, batch = items.len(), "payment batch failed");
            let message = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(StoreError::Unavailable(message.clone().into())));
            }
        }
    }
}
