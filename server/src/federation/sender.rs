//! The durable outbound queue: one task per destination sends the destination's queued items
//! (rows of `fed_outbound`, in order) as transactions of at most `max_txn_items` items and
//! `max_txn_bytes` bytes, one transaction in flight at a time. Before a transaction is sent its
//! id and last item are persisted, so after a crash exactly the same transaction is resent and
//! the destination's `(origin, txn_id)` check drops it if it had arrived. Items are deleted only
//! once the destination answered 200.
//!
//! Failures back off exponentially (`retry_min_ms` doubling up to `retry_max_ms`, with jitter)
//! and the backoff is reset as soon as the destination contacts us. Typing and presence are
//! kept in memory only, coalesced, and dropped once the destination has been failing for
//! `drop_ephemeral_after_ms`; presence on its own leaves at most once per
//! `presence_interval_ms` (changes in between are coalesced, newest per user).

use crate::config::FederationConfig;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::storage::{Outbound, Store, StoreError};
use bytes::Bytes;
use parley_federation::transport::FederationClient;
use parley_spec::federation::v1::transaction::{Item, TransactionResponse};
use parley_spec::ServerName;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// An item for `destination`'s queue.
pub fn outbound(destination: &str, item: &Item) -> ApiResult<Outbound> {
    let payload = serde_json::to_vec(item).map_err(ApiError::internal)?;
    Ok(Outbound { destination: Arc::from(destination), payload: Bytes::from(payload) })
}

struct Destination {
    wake: Notify,
    /// Set when the destination contacted us: retry at once.
    reset: AtomicBool,
    ephemeral: Mutex<Vec<Item>>,
}

impl Destination {
    /// Puts back ephemeral items that were taken but not delivered, ahead of newer ones
    /// (a newer presence of the same user still replaces an older one).
    fn requeue(&self, items: Vec<Item>) {
        let mut queue = self.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
        let newer = std::mem::replace(&mut *queue, items);
        for item in newer {
            push_coalesced(&mut queue, item);
        }
    }
}

/// Appends `item`; a presence item replaces the queued presence of the same user.
fn push_coalesced(queue: &mut Vec<Item>, item: Item) {
    if let Item::Presence(new) = &item {
        queue.retain(|old| !matches!(old, Item::Presence(old) if old.presence.user == new.presence.user));
    }
    queue.push(item);
}

struct Inner {
    /// Weak: the writer stops once every strong handle is gone (at shutdown), and the writer's
    /// commit callback leads here.
    store: Weak<Store>,
    shutdown: watch::Receiver<bool>,
    client: FederationClient,
    config: FederationConfig,
    metrics: Metrics,
    txn_prefix: String,
    destinations: Mutex<HashMap<String, Arc<Destination>>>,
}

/// Handle to the per-destination sender tasks. Cheap to clone.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

impl Sender {
    /// A sender over `store`. `txn_prefix` makes transaction ids unique to this database.
    pub fn new(
        store: &Arc<Store>,
        client: FederationClient,
        config: FederationConfig,
        metrics: Metrics,
        txn_prefix: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let store = Arc::downgrade(store);
        Self { inner: Arc::new(Inner { store, shutdown, client, config, metrics, txn_prefix, destinations: Mutex::default() }) }
    }

    /// Starts a task for every destination with queued items (after a restart).
    pub async fn resume(&self) -> Result<(), StoreError> {
        let Some(store) = self.inner.store.upgrade() else { return Ok(()) };
        for destination in store.outbound_destinations().await? {
            self.wake(&destination);
        }
        Ok(())
    }

    fn destination(&self, name: &str) -> Option<Arc<Destination>> {
        let mut destinations = self.inner.destinations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = destinations.get(name) {
            return Some(existing.clone());
        }
        let Ok(server) = ServerName::parse(name) else {
            tracing::warn!(destination = name, "not a server name; nothing will be sent there");
            return None;
        };
        let destination =
            Arc::new(Destination { wake: Notify::new(), reset: AtomicBool::new(false), ephemeral: Mutex::default() });
        destinations.insert(name.to_owned(), destination.clone());
        let inner = self.inner.clone();
        let mut shutdown = self.inner.shutdown.clone();
        let handle = destination.clone();
        tokio::spawn(async move {
            // Stopping drops the task wherever it waits; the in-flight record makes that safe.
            tokio::select! {
                _ = run(inner, server, handle) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
        Some(destination)
    }

    /// New items were committed for `destination`.
    pub fn wake(&self, destination: &str) {
        if let Some(destination) = self.destination(destination) {
            destination.wake.notify_one();
        }
    }

    /// Queues a typing or presence item in memory (coalesced: a newer presence of the same
    /// user replaces the older one).
    pub fn push_ephemeral(&self, destination: &str, item: Item) {
        let Some(handle) = self.destination(destination) else { return };
        {
            let mut queue = handle.ephemeral.lock().unwrap_or_else(|e| e.into_inner());
            push_coalesced(&mut queue, item);
            if queue.len() > self.inner.config.max_txn_items {
                queue.remove(0);
            }
        }
        handle.wake.notify_one();
    }

    /// `origin` sent us a valid request: it is up, so stop backing off.
    pub fn contacted_by(&self, origin: &str) {
        let existing = self.inner.destinations.lock().unwrap_or_else(|e| e.into_inner()).get(origin).cloned();
        if let Some(destination) = existing {
            destination.reset.store(true, Ordering::Release);
            destination.wake.notify_one();
        }
    }
}

/// One transaction's worth of work.
struct Batch {
    txn_id: String,
    last_seq: Option<i64>,
    body: Vec<u8>,
    items: usize,
}

async fn next_batch(
    inner: &Inner,
    store: &Store,
    server: &ServerName,
    ephemeral: &[Item],
    done_up_to: Option<i64>,
) -> Result<Option<Batch>, StoreError> {
    let name = server.as_str();
    let config = &inner.config;
    // A transaction persisted as in flight is resent exactly (same id, same items) — unless it
    // is the one just accepted (`done_up_to`), whose record the next one replaces.
    let inflight = match done_up_to {
        Some(_) => None,
        None => store.inflight(name).await?,
    };
    let rows = match &inflight {
        Some((_, last)) => store.outbound_batch(name, usize::MAX >> 1, None, Some(*last)).await?,
        None => store.outbound_batch(name, config.max_txn_items, done_up_to, None).await?,
    };
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(rows.len());
    let mut size = 256;
    let mut last_seq = None;
    for (seq, payload) in &rows {
        if inflight.is_none() && !payloads.is_empty() && size + payload.len() + 1 > config.max_txn_bytes {
            break;
        }
        size += payload.len() + 1;
        payloads.push(payload);
        last_seq = Some(*seq);
    }
    let ephemeral_json: Vec<Vec<u8>> = ephemeral.iter().filter_map(|item| serde_json::to_vec(item).ok()).collect();
    if payloads.is_empty() {
        // Nothing durable to send: settle the accepted transaction (or a stale record).
        if let Some(done) = done_up_to.or(inflight.as_ref().map(|(_, last)| *last)) {
            store.txn_done(name, done).await?;
        }
        if ephemeral_json.is_empty() {
            return Ok(None);
        }
    }
    let txn_id = match (&inflight, last_seq) {
        (Some((id, _)), _) => id.clone(),
        (None, Some(last)) => {
            let first = rows.first().map(|(seq, _)| *seq).unwrap_or(last);
            let id = format!("{}.{first}-{last}", inner.txn_prefix);
            store.txn_inflight(name, &id, last, done_up_to).await?;
            id
        }
        (None, None) => format!("{}.e{}", inner.txn_prefix, uuid::Uuid::new_v4().simple()),
    };
    let mut body = Vec::with_capacity(size + ephemeral_json.iter().map(|p| p.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"origin\":");
    body.extend_from_slice(&serde_json::to_vec(inner.client.origin()).unwrap_or_default());
    body.extend_from_slice(format!(",\"origin_ts\":{},\"items\":[", crate::storage::now_ms()).as_bytes());
    let mut first = true;
    for payload in payloads.iter().copied().chain(ephemeral_json.iter().map(|p| p.as_slice())) {
        if !first {
            body.push(b',');
        }
        first = false;
        body.extend_from_slice(payload);
    }
    body.extend_from_slice(b"]}");
    Ok(Some(Batch { txn_id, last_seq, body, items: payloads.len() + ephemeral_json.len() }))
}

async fn run(inner: Arc<Inner>, server: ServerName, destination: Arc<Destination>) {
    let name = server.as_str().to_owned();
    let mut failures: u32 = 0;
    let mut failing_since: Option<Instant> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    // The last item of the transaction just accepted, not yet recorded as done.
    let mut accepted: Option<i64> = None;
    let mut last_presence_only: Option<Instant> = None;
    loop {
        if let Some(at) = retry_at {
            if !destination.reset.swap(false, Ordering::AcqRel) {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = destination.wake.notified() => {
                        // New items do not cut a backoff short; only the destination contacting us does.
                        if !destination.reset.swap(false, Ordering::AcqRel) {
                            continue;
                        }
                    }
                }
            }
            retry_at = None;
        }
        let mut ephemeral = std::mem::take(&mut *destination.ephemeral.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(since) = failing_since {
            if since.elapsed() >= Duration::from_millis(inner.config.drop_ephemeral_after_ms) && !ephemeral.is_empty() {
                tracing::debug!(destination = %name, dropped = ephemeral.len(), "dropping typing and presence");
                inner.metrics.federation_ephemeral_dropped.inc_by(ephemeral.len() as u64);
                ephemeral.clear();
            }
        }
        let Some(store) = inner.store.upgrade() else { return };
        let batch = match next_batch(&inner, &store, &server, &ephemeral, accepted.take()).await {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                failures = 0;
                failing_since = None;
                drop(store);
                destination.wake.notified().await;
                continue;
            }
            Err(error) => {
                tracing::error!(destination = %name, %error, "reading the outbound queue failed");
                failures = failures.saturating_add(1);
                retry_at = Some(tokio::time::Instant::now() + backoff(&inner.config, failures));
                continue;
            }
        };
        // Presence alone is throttled: at most one presence-only transaction per interval per
        // destination; changes in between are coalesced (newest per user) and go together.
        let presence_only = batch.last_seq.is_none() && ephemeral.iter().all(|item| matches!(item, Item::Presence(_)));
        if presence_only {
            let interval = Duration::from_millis(inner.config.presence_interval_ms);
            if let Some(last) = last_presence_only.filter(|last| last.elapsed() < interval) {
                drop(store);
                destination.requeue(ephemeral);
                tokio::time::sleep_until((last + interval).into()).await;
                continue;
            }
            last_presence_only = Some(Instant::now());
        }
        let path = format!("/_parley/federation/v1/send/{}", batch.txn_id);
        let started = Instant::now();
        let result: Result<TransactionResponse, _> =
            inner.client.request(&server, reqwest::Method::PUT, &path, Some(batch.body)).await;
        match result {
            Ok(response) => {
                inner.metrics.federation_txn_seconds.observe(started.elapsed().as_secs_f64());
                inner.metrics.federation_items_sent.inc_by(batch.items as u64);
                for rejected in &response.rejected {
                    tracing::warn!(destination = %name, index = rejected.index, code = %rejected.code, message = %rejected.message, "item refused");
                }
                // Recorded with the next transaction's start (one commit), or alone when idle.
                if batch.last_seq.is_some() {
                    accepted = batch.last_seq;
                }
                if failures > 0 {
                    tracing::info!(destination = %name, "destination reachable again");
                }
                failures = 0;
                failing_since = None;
            }
            Err(error) => {
                inner.metrics.federation_txn_failures.inc();
                if failures == 0 {
                    tracing::warn!(destination = %name, %error, "transaction failed; retrying with backoff");
                } else {
                    tracing::debug!(destination = %name, %error, failures, "transaction failed again");
                }
                failures = failures.saturating_add(1);
                failing_since.get_or_insert_with(Instant::now);
                let delay = backoff(&inner.config, failures);
                tracing::debug!(destination = %name, failures, delay_ms = delay.as_millis() as u64, "backing off");
                retry_at = Some(tokio::time::Instant::now() + delay);
                // Ephemeral items that were not delivered go back (dropped later if this lasts).
                destination.requeue(ephemeral);
            }
        }
    }
}

/// The delay before retry number `failures` (≥ 1): exponential, capped, with jitter in
/// [50 %, 100 %] so destinations that failed together do not retry together.
pub fn backoff(config: &FederationConfig, failures: u32) -> Duration {
    let exp = config.retry_min_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(30));
    let capped = exp.min(config.retry_max_ms);
    let jittered = capped / 2 + rand::random::<u64>() % (capped / 2 + 1);
    Duration::from_millis(jittered.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let config = FederationConfig { retry_min_ms: 100, retry_max_ms: 1_000, ..FederationConfig::default() };
        for failures in 1..40 {
            let delay = backoff(&config, failures).as_millis() as u64;
            let ceiling = (100u64 << (failures - 1).min(30)).min(1_000);
            assert!(delay >= ceiling / 2 && delay <= ceiling, "failures {failures}: {delay} not in [{}, {ceiling}]", ceiling / 2);
        }
    }
}
