//! Group commit of payment creations. SQLite with `synchronous=FULL` pays one
//! fsync per transaction, so one transaction per payment caps a node at a few
//! hundred payments a second. Concurrent `POST /v1/payments` requests hand
//! their creation to one writer task, which commits whatever has queued up as
//! one transaction (each payment in its own savepoint, so one bad item does
//! not fail the others); every request still gets its answer only after its
//! payment, idempotency record and audit record are durable.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use paygate_domain::CompanyId;
use paygate_store::{PaymentCreate, PaymentCreated, Store, StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

type Job = (PaymentCreate, oneshot::Sender<StoreResult<PaymentCreated>>);

/// Queue bound (invariant I10): beyond it, requests wait for room.
const QUEUE: usize = 4096;
const MAX_BATCH: usize = 256;

#[derive(Clone)]
pub struct PaymentWriter {
    tx: mpsc::Sender<Job>,
    in_flight: Arc<Mutex<HashSet<(CompanyId, String)>>>,
}

/// Holds an idempotency key as "being processed on this node" until dropped.
pub struct InFlight {
    set: Arc<Mutex<HashSet<(CompanyId, String)>>>,
    key: (CompanyId, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

impl PaymentWriter {
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
                let (items, replies): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
                metrics::histogram!("paygate_payment_batch_size").record(items.len() as f64);
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
                            let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                        }
                    }
                }
            }
        });
        Self { tx, in_flight: Arc::default() }
    }

    /// Claims an idempotency key on this node; `None` if a request with the same
    /// key is already being processed here. Other nodes are excluded by the
    /// key's primary key in the database.
    pub fn claim(&self, company: CompanyId, key: &str) -> Option<InFlight> {
        let entry = (company, key.to_owned());
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
