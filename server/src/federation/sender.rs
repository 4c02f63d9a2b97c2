//! The durable outbound queue's I/O: one task per destination drives that destination's
//! [`DestinationQueue`] (`parley_federation::queue`, where the logic lives: transactions of at
//! most `max_txn_items` items and `max_txn_bytes` bytes, one in flight at a time, the in-flight
//! record that makes a resend after a crash exact, backoff with jitter reset when the
//! destination contacts us, typing and presence in memory, presence throttling). The task does
//! what the queue asks (reads and writes `fed_outbound`/`fed_inflight` through the [`Store`],
//! sends transactions over HTTPS, sleeps) and reports the outcome back. Items are deleted only
//! once the destination answered 200.
//!
//! Notifications: the writer publishes the destinations whose queue a commit grew on a channel
//! that [`Sender::start`] follows; typing and presence come through [`Sender::push_ephemeral`],
//! and valid requests from a destination through [`Sender::contacted_by`]. Each updates the
//! queue under its lock (never held across I/O) and wakes the task, which polls again.
//!
//! Time: the queues take `now` as an argument; the tasks read it from tokio's clock, the one
//! their sleeps use, so `tokio::time::pause()` moves both. The wall clock only dates
//! transactions (`origin_ts`).
//!
//! Several workers (PostgreSQL): a destination's task sends only while it holds the
//! destination's lease ([`DestinationLeases`]), retrying every [`LEASE_RETRY`] until then; a
//! worker that dies loses its leases with its database connection, and the others take its
//! destinations over. Commits of one worker wake the other workers' tasks over NATS
//! ([`crate::cluster::Cluster::fed_wake`]), so the holder of a destination learns of items
//! other workers queued.
//!
//! Shutdown: every task here stops at the shutdown signal, wherever it waits (the in-flight
//! record makes that safe), and so lets go of the store: the writer can then drain and stop.

use crate::config::FederationConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::storage::{DestinationLeases, Outbound, Store, StoreError};
use bytes::Bytes;
use parley_federation::queue::{
    Action, Batch, DestinationQueue, InflightRecord, Load, QueueConfig, QueuedItem, TxnResult, Write,
};
use parley_federation::transport::FederationClient;
use parley_spec::federation::v1::transaction::{Item, RawTransaction, SendTransaction};
use parley_spec::ServerName;
use rand::rngs::OsRng;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// How often a worker asks again for a destination's lease another worker holds: the most a
/// takeover waits once the holder is gone.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// An item for `destination`'s queue.
pub fn outbound(destination: &ServerName, item: &Item) -> Result<Outbound> {
    let payload = serde_json::to_vec(item).map_err(Error::internal)?;
    Ok(Outbound { destination: destination.clone(), payload: Bytes::from(payload) })
}

/// The time the queues see: tokio's clock, which also drives the sleeps (and stops with
/// `tokio::time::pause()`).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// One destination: its queue, and the notification that it has something new.
struct Destination {
    /// Locked only for a synchronous step, never across I/O.
    queue: Mutex<DestinationQueue<OsRng>>,
    wake: Notify,
    /// When the oldest commit that queued items not yet loaded into a transaction was heard
    /// of (for `federation_queue_wait_seconds`; unknown for items queued before a restart).
    queued_since: Mutex<Option<Instant>>,
}

impl Destination {
    fn with<T>(&self, step: impl FnOnce(&mut DestinationQueue<OsRng>) -> T) -> T {
        step(&mut self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Applies `step` to the queue and wakes its task.
    fn notify(&self, step: impl FnOnce(&mut DestinationQueue<OsRng>)) {
        self.with(step);
        self.wake.notify_one();
    }
}

struct Inner {
    store: Arc<Store>,
    shutdown: watch::Receiver<bool>,
    client: FederationClient,
    config: FederationConfig,
    metrics: Metrics,
    txn_prefix: String,
    destinations: Mutex<HashMap<ServerName, Arc<Destination>>>,
    /// With several workers: the destination leases, and the link that wakes the others.
    leases: Option<Arc<DestinationLeases>>,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// Handle to the per-destination sender tasks. Cheap to clone.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

impl Sender {
    /// Starts sending: a task for every destination with queued items (after a restart), and
    /// one that follows the writer's commits (`outbound`: the destinations whose queue grew).
    /// `txn_prefix` makes transaction ids unique to this database. Every task stops at
    /// `shutdown`.
    pub async fn start(
        store: Arc<Store>,
        outbound: mpsc::UnboundedReceiver<Vec<ServerName>>,
        client: FederationClient,
        config: FederationConfig,
        metrics: Metrics,
        txn_prefix: String,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, StoreError> {
        let queued = store.outbound_destinations().await?;
        let leases = store.destination_leases().await?.map(Arc::new);
        let cluster = std::sync::OnceLock::new();
        let inner =
            Inner { store, shutdown, client, config, metrics, txn_prefix, destinations: Mutex::default(), leases, cluster };
        let sender = Self { inner: Arc::new(inner) };
        for destination in queued {
            sender.wake(&destination);
        }
        tokio::spawn(follow_commits(sender.clone(), outbound));
        Ok(sender)
    }

    /// Works with the other workers of this homeserver (once, right after [`start`](Self::start)):
    /// tells them of the queues this worker's commits grow, and hears of theirs.
    pub fn join_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let woken = self.clone();
        cluster.on_fed_wake(move |destination| woken.wake(&destination));
        let _ = self.inner.cluster.set(cluster);
    }

    fn destination(&self, server: &ServerName) -> Arc<Destination> {
        let mut destinations = self.inner.destinations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = destinations.get(server) {
            return existing.clone();
        }
        let server = server.clone();
        let queue = DestinationQueue::new(queue_config(&self.inner.config), self.inner.txn_prefix.clone(), OsRng);
        let destination = Arc::new(Destination { queue: Mutex::new(queue), wake: Notify::new(), queued_since: Mutex::new(None) });
        destinations.insert(server.clone(), destination.clone());
        let inner = self.inner.clone();
        let mut shutdown = self.inner.shutdown.clone();
        let handle = destination.clone();
        tokio::spawn(async move {
            // Stopping drops the task wherever it waits; the in-flight record makes that safe.
            tokio::select! {
                _ = async {
                    if let Some(leases) = inner.leases.clone() {
                        take_lease(&leases, &server).await;
                    }
                    run(inner, server, handle).await
                } => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
        destination
    }

    /// New items were committed for `destination`.
    pub fn wake(&self, destination: &ServerName) {
        let destination = self.destination(destination);
        destination.queued_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
        destination.notify(DestinationQueue::on_new_items);
    }

    /// Queues a typing or presence item in memory (coalesced: a newer presence of the same
    /// user replaces the older one).
    pub fn push_ephemeral(&self, destination: &ServerName, item: Item) {
        self.destination(destination).notify(|queue| queue.push_ephemeral(item));
    }

    /// `origin` sent us a valid request: it is up, so stop backing off.
    pub fn contacted_by(&self, origin: &ServerName) {
        let existing = self.inner.destinations.lock().unwrap_or_else(|e| e.into_inner()).get(origin).cloned();
        if let Some(destination) = existing {
            destination.notify(DestinationQueue::on_contact);
        }
    }
}

fn queue_config(config: &FederationConfig) -> QueueConfig {
    QueueConfig {
        max_txn_items: config.max_txn_items,
        max_txn_bytes: config.max_txn_bytes,
        retry_min: Duration::from_millis(config.retry_min_ms),
        retry_max: Duration::from_millis(config.retry_max_ms),
        drop_ephemeral_after: Duration::from_millis(config.drop_ephemeral_after_ms),
        presence_interval: Duration::from_millis(config.presence_interval_ms),
    }
}

/// Wakes the destinations whose queue a commit grew, until shutdown.
async fn follow_commits(sender: Sender, mut outbound: mpsc::UnboundedReceiver<Vec<ServerName>>) {
    let mut shutdown = sender.inner.shutdown.clone();
    loop {
        let grown = tokio::select! {
            grown = outbound.recv() => grown,
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(grown) = grown else { return };
        if let Some(cluster) = sender.inner.cluster.get() {
            cluster.fed_wake(&grown);
        }
        for destination in grown {
            sender.wake(&destination);
        }
    }
}

/// Waits until this worker holds `destination`'s lease.
async fn take_lease(leases: &DestinationLeases, destination: &ServerName) {
    let mut waited = false;
    loop {
        match leases.try_take(destination).await {
            Ok(true) => {
                if waited {
                    tracing::info!(destination = %destination, "took the destination over from another worker");
                }
                return;
            }
            Ok(false) => waited = true,
            Err(error) => tracing::warn!(destination = %destination, %error, "taking the destination's lease failed"),
        }
        tokio::time::sleep(LEASE_RETRY).await;
    }
}

/// Drives one destination's queue: does what it asks, reports back, forever (until the task is
/// dropped at shutdown).
async fn run(inner: Arc<Inner>, server: ServerName, destination: Arc<Destination>) {
    let name = server.as_str();
    let store = &inner.store;
    // When the oldest item of the transaction being formed or sent was queued (see
    // `Destination::queued_since`): carried across retries until the destination accepts.
    let mut oldest: Option<Instant> = None;
    loop {
        let (action, dropped) = destination.with(|queue| (queue.poll(now()), queue.take_dropped()));
        if dropped > 0 {
            tracing::debug!(destination = %name, dropped, "dropping typing and presence");
            inner.metrics.federation_ephemeral_dropped.inc_by(dropped as u64);
        }
        let stored = match action {
            Action::Idle => {
                destination.wake.notified().await;
                Ok(())
            }
            Action::SleepUntil(at) => {
                // Woken early, the queue decides whether that ends the wait (a contact does).
                tokio::select! {
                    _ = tokio::time::sleep_until(Instant::from_std(at)) => {}
                    _ = destination.wake.notified() => {}
                }
                Ok(())
            }
            Action::Load(Load::Inflight) => store.inflight(&server).await.map(|record| {
                let record = record.map(|(txn_id, last_seq)| InflightRecord { txn_id, last_seq });
                destination.with(|queue| queue.on_inflight(record));
            }),
            Action::Load(Load::Items { after, up_to, limit }) => {
                let limit = limit.unwrap_or(usize::MAX >> 1);
                // Taken before the read: a commit heard of later may hold items this read
                // misses, and counts for the next transaction.
                let since = destination.queued_since.lock().unwrap_or_else(|e| e.into_inner()).take();
                oldest = oldest.into_iter().chain(since).min();
                let started = Instant::now();
                let read = store.outbound_batch(&server, limit, after, up_to).await;
                inner.metrics.federation_queue_read_seconds.observe(started.elapsed().as_secs_f64());
                read.map(|rows| {
                    if rows.len() >= limit {
                        // A full batch leaves items behind, queued no later than these.
                        let mut queued_since = destination.queued_since.lock().unwrap_or_else(|e| e.into_inner());
                        *queued_since = queued_since.iter().copied().chain(since).min();
                    }
                    let items = rows.into_iter().map(|(seq, payload)| QueuedItem { seq, payload }).collect();
                    destination.with(|queue| queue.on_items(items));
                })
            }
            Action::Write(write) => {
                let started = Instant::now();
                let written = match write {
                    Write::Inflight { txn_id, last_seq, done_up_to } => {
                        store.txn_inflight(&server, &txn_id, last_seq, done_up_to).await
                    }
                    Write::Done { up_to } => store.txn_done(&server, up_to).await,
                };
                inner.metrics.federation_queue_write_seconds.observe(started.elapsed().as_secs_f64());
                written.map(|()| destination.with(DestinationQueue::on_written))
            }
            Action::Send(batch) => {
                let durable = !batch.durable.is_empty();
                if send(&inner, &server, &destination, batch).await && durable {
                    if let Some(queued) = oldest.take() {
                        inner.metrics.federation_queue_wait_seconds.observe(queued.elapsed().as_secs_f64());
                    }
                }
                Ok(())
            }
        };
        if let Err(error) = stored {
            tracing::error!(destination = %name, %error, "reading or writing the outbound queue failed");
            destination.with(|queue| queue.on_store_error(now()));
        }
    }
}

/// Sends one transaction and reports the answer to the queue; whether it was accepted.
async fn send(inner: &Inner, server: &ServerName, destination: &Destination, batch: Batch) -> bool {
    let name = server.as_str();
    let items = batch.len();
    let body = transaction_body(inner.client.origin(), &batch);
    let body_bytes = body.len() as u64;
    let started = Instant::now();
    let result = inner.client.call::<SendTransaction>(server, &[batch.txn_id.as_str()], Some(body)).await;
    let failures = destination.with(|queue| queue.failures());
    match result {
        Ok(response) => {
            inner.metrics.federation_txn_seconds.observe(started.elapsed().as_secs_f64());
            inner.metrics.federation_items_sent.inc_by(items as u64);
            inner.metrics.federation_txns_sent.inc();
            inner.metrics.federation_bytes_sent.inc_by(body_bytes);
            for rejected in &response.rejected {
                tracing::warn!(destination = %name, index = rejected.index, code = %rejected.code, message = %rejected.message, "item refused");
            }
            if failures > 0 {
                tracing::info!(destination = %name, "destination reachable again");
            }
            destination.with(|queue| queue.on_result(TxnResult::Accepted, now()));
            true
        }
        Err(error) => {
            inner.metrics.federation_txn_failures.inc();
            if failures == 0 {
                tracing::warn!(destination = %name, %error, "transaction failed; retrying with backoff");
            } else {
                tracing::debug!(destination = %name, %error, failures, "transaction failed again");
            }
            let (failures, delay) = destination.with(|queue| {
                let now = now();
                queue.on_result(TxnResult::Failed, now);
                (queue.failures(), queue.retry_at().map(|at| at.saturating_duration_since(now)).unwrap_or_default())
            });
            tracing::debug!(destination = %name, failures, delay_ms = delay.as_millis() as u64, "backing off");
            false
        }
    }
}

/// The transaction's JSON: its durable items' stored JSON as it is, then its ephemeral items.
/// A stored item that is not JSON (a corrupt row) is left out and logged: no peer would accept
/// the transaction with it, and the queue would stall behind it.
fn transaction_body(origin: &ServerName, batch: &Batch) -> Vec<u8> {
    let ephemeral: Vec<Box<RawValue>> =
        batch.ephemeral.iter().filter_map(|item| serde_json::value::to_raw_value(item).ok()).collect();
    let mut items: Vec<&RawValue> = Vec::with_capacity(batch.durable.len() + ephemeral.len());
    for stored in &batch.durable {
        match serde_json::from_slice::<&RawValue>(stored) {
            Ok(item) => items.push(item),
            Err(error) => tracing::error!(txn_id = %batch.txn_id, %error, "a queued item is not JSON; left out"),
        }
    }
    items.extend(ephemeral.iter().map(|item| &**item));
    let transaction = RawTransaction { origin, origin_ts: parley_spec::Timestamp::now(), items };
    serde_json::to_vec(&transaction).expect("a transaction of strings, integers and JSON values serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_spec::federation::v1::transaction::{Transaction, TypingItem};
    use parley_spec::UserId;

    #[test]
    fn the_body_is_a_transaction_with_durable_items_first() {
        let typing =
            Item::Typing(TypingItem::new(UserId::parse("@alice:a.test").unwrap(), UserId::parse("@bob:b.test").unwrap(), true));
        let durable = serde_json::to_vec(&typing).unwrap();
        let batch = Batch { txn_id: "p.1-1".into(), durable: vec![durable], ephemeral: vec![typing.clone()], last_seq: Some(1) };
        let body = transaction_body(&ServerName::parse("a.test").unwrap(), &batch);
        let parsed: Transaction = serde_json::from_slice(&body).expect("a valid transaction");
        assert_eq!(parsed.origin.as_str(), "a.test");
        assert_eq!(parsed.items, [typing.clone(), typing]);
    }
}
