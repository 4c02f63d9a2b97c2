//! Prometheus metrics (prometheus-client), served at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The server's metrics. Cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Messages accepted (answered `sent`, not counting duplicates).
    pub messages_stored: Counter,
    /// Inbox events made durable (messages per device, receipts).
    pub events_stored: Counter,
    /// Events written to a device's socket.
    pub events_delivered: Counter,
    /// Seconds from receiving a send to answering `sent`.
    pub send_latency: Histogram,
    /// Seconds from a commit to the event being written to a connected device's socket.
    pub delivery_delay: Histogram,
    /// Seconds one group commit took.
    pub commit_seconds: Histogram,
    /// Operations per group commit.
    pub batch_size: Histogram,
    /// Operations waiting for the writer.
    pub writer_queue_depth: Gauge,
    /// Requests and frames refused by a rate limit.
    pub rate_limited: Counter,
    /// Federation items sent and accepted by their destination.
    pub federation_items_sent: Counter,
    /// Files fetched from other servers for local users (one fetch per file, however many ask).
    pub media_fetches: Counter,
    /// Files moved to the cold media store.
    pub media_cooled: Counter,
    /// Push wake-ups the push service accepted.
    pub pushes_sent: Counter,
    /// Push attempts that failed and will be retried.
    pub push_failures: Counter,
    /// Push registrations dropped because the service said the endpoint is gone.
    pub push_endpoints_gone: Counter,
    /// Federation items received in new inbound transactions.
    pub federation_items_received: Counter,
    /// Outbound transactions that failed (and will be retried).
    pub federation_txn_failures: Counter,
    /// Typing and presence items dropped for an unreachable destination.
    pub federation_ephemeral_dropped: Counter,
    /// Seconds from sending an outbound transaction to its answer.
    pub federation_txn_seconds: Histogram,
    /// Seconds from the commit that queued the oldest item of an outbound transaction to the
    /// destination accepting it (how far behind the queue runs).
    pub federation_queue_wait_seconds: Histogram,
    /// Seconds an outbound queue's read of its items took.
    pub federation_queue_read_seconds: Histogram,
    /// Seconds an outbound queue's write (in-flight record, or items done) took to commit.
    pub federation_queue_write_seconds: Histogram,
    /// Outbound transactions accepted by their destination (federation requests per item).
    pub federation_txns_sent: Counter,
    /// Body bytes of the outbound transactions accepted by their destination.
    pub federation_bytes_sent: Counter,
    /// Connections other servers opened to the federation listener (TLS handshakes completed).
    pub federation_connections_accepted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parley");
        let connections = Gauge::default();
        let messages_stored = Counter::default();
        let events_stored = Counter::default();
        let events_delivered = Counter::default();
        let latency_buckets = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
        let send_latency = Histogram::new(latency_buckets);
        let commit_seconds = Histogram::new(latency_buckets);
        let delivery_delay = Histogram::new(latency_buckets);
        let batch_size = Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0]);
        let writer_queue_depth = Gauge::default();
        let rate_limited = Counter::default();
        let federation_items_sent = Counter::default();
        let federation_items_received = Counter::default();
        let federation_txn_failures = Counter::default();
        let federation_ephemeral_dropped = Counter::default();
        let federation_txn_seconds = Histogram::new(latency_buckets);
        let federation_queue_wait_seconds = Histogram::new(latency_buckets);
        let federation_queue_read_seconds = Histogram::new(latency_buckets);
        let federation_queue_write_seconds = Histogram::new(latency_buckets);
        let federation_txns_sent = Counter::default();
        let media_fetches = Counter::default();
        let media_cooled = Counter::default();
        let pushes_sent = Counter::default();
        let push_failures = Counter::default();
        let push_endpoints_gone = Counter::default();
        registry.register("pushes_sent", "Push wake-ups accepted by push services", pushes_sent.clone());
        registry.register("push_failures", "Push attempts that failed (retried)", push_failures.clone());
        registry.register("push_endpoints_gone", "Push registrations dropped on 404/410", push_endpoints_gone.clone());
        registry.register("media_fetches", "Files fetched from other servers for local users", media_fetches.clone());
        registry.register("media_cooled", "Files moved to the cold media store", media_cooled.clone());
        let federation_bytes_sent = Counter::default();
        let federation_connections_accepted = Counter::default();
        registry.register(
            "federation_connections_accepted",
            "Connections other servers opened to the federation listener (TLS handshakes completed)",
            federation_connections_accepted.clone(),
        );
        registry.register("federation_txns_sent", "Outbound transactions accepted", federation_txns_sent.clone());
        registry.register("federation_bytes_sent", "Body bytes of outbound transactions accepted", federation_bytes_sent.clone());
        registry.register(
            "federation_items_sent",
            "Federation items accepted by their destination",
            federation_items_sent.clone(),
        );
        registry.register(
            "federation_items_received",
            "Federation items received in new inbound transactions",
            federation_items_received.clone(),
        );
        registry.register("federation_txn_failures", "Outbound transactions that failed", federation_txn_failures.clone());
        registry.register(
            "federation_ephemeral_dropped",
            "Typing and presence items dropped for an unreachable destination",
            federation_ephemeral_dropped.clone(),
        );
        registry.register("federation_txn_seconds", "Round trip of one outbound transaction", federation_txn_seconds.clone());
        registry.register(
            "federation_queue_wait_seconds",
            "From the commit that queued the oldest item of an outbound transaction to its acceptance",
            federation_queue_wait_seconds.clone(),
        );
        registry.register(
            "federation_queue_read_seconds",
            "An outbound queue's read of the items of its next transaction",
            federation_queue_read_seconds.clone(),
        );
        registry.register(
            "federation_queue_write_seconds",
            "An outbound queue's write (in-flight record or items done), to its commit",
            federation_queue_write_seconds.clone(),
        );
        registry.register("ws_connections", "Open WebSocket connections", connections.clone());
        registry.register("messages_stored", "Messages accepted and stored", messages_stored.clone());
        registry.register("inbox_events_stored", "Inbox events made durable", events_stored.clone());
        registry.register("inbox_events_delivered", "Inbox events written to device sockets", events_delivered.clone());
        registry.register("send_latency_seconds", "From receiving a send to answering sent", send_latency.clone());
        registry.register(
            "delivery_delay_seconds",
            "From commit to the live event written to the device socket",
            delivery_delay.clone(),
        );
        registry.register("store_commit_seconds", "Duration of one group commit", commit_seconds.clone());
        registry.register("store_batch_operations", "Operations per group commit", batch_size.clone());
        registry.register("store_queue_depth", "Operations waiting for the writer", writer_queue_depth.clone());
        registry.register("rate_limited", "Requests and frames refused by a rate limit", rate_limited.clone());
        Self {
            registry: Arc::new(registry),
            connections,
            messages_stored,
            events_stored,
            events_delivered,
            send_latency,
            delivery_delay,
            commit_seconds,
            batch_size,
            writer_queue_depth,
            rate_limited,
            federation_items_sent,
            federation_items_received,
            federation_txn_failures,
            federation_ephemeral_dropped,
            federation_txn_seconds,
            federation_queue_wait_seconds,
            federation_queue_read_seconds,
            federation_queue_write_seconds,
            federation_txns_sent,
            federation_bytes_sent,
            federation_connections_accepted,
            media_fetches,
            media_cooled,
            pushes_sent,
            push_failures,
            push_endpoints_gone,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
