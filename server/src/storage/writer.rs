//! The group-commit writer: one task, one connection, one transaction per batch of whatever
//! operations queued up while the previous batch was committing. It also owns the per-device
//! inbox sequence counters, so sequence numbers are assigned in commit order without locks.
//!
//! Sequence invariant: rows are deleted only at or below a device's persisted `acked_seq`
//! (in the same transaction that raises it), so after a restart the next sequence number is
//! `max(acked_seq, max(seq)) + 1` and is never reused.
//!
//! After each commit, and only then, the writer answers the batch's operations and publishes
//! what the commit made durable to its [`Subscribers`], in commit order: the inbox events to
//! live delivery (called in the writer task, so a live event costs no task switch), and the
//! outbound queues that grew on a channel (their drainer is built after the store).

use super::{DevicePk, InboxRow, StoreError, UserPk};
use bytes::Bytes;
use sqlx::{Connection as _, QueryBuilder, Row as _, Sqlite, SqliteConnection, SqlitePool};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Client operations at most in a commit that carries federation work.
const PRIORITY_BATCH_CLIENT_OPS: usize = 256;

/// Rows per multi-row statement (6 binds a row stays far below SQLite's variable limit).
const ROWS_PER_STATEMENT: usize = 500;

/// An event to append to a device's inbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Target device.
    pub device: DevicePk,
    /// For message events: sender and message id (used for delivered receipts).
    pub origin: Option<super::Origin>,
    /// The event JSON.
    pub payload: Bytes,
}

/// An item for another server's outbound queue (JSON of a federation transaction item).
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The destination server name.
    pub destination: Arc<str>,
    /// The item JSON.
    pub payload: Bytes,
}

/// A message from a user of another server to a local user, recorded so that the local user's
/// read markers can be checked against what that sender really sent them.
#[derive(Debug, Clone)]
pub struct RemoteMessage {
    /// The local recipient.
    pub recipient: UserPk,
    /// The remote sender's user id.
    pub sender: Arc<str>,
    /// The message's id on the sender's server.
    pub id: u64,
}

/// What an operation adds: inbox events for local devices, items for other servers.
#[derive(Debug, Default)]
pub struct Effects {
    /// Local inbox events.
    pub events: Vec<NewEvent>,
    /// Federation items.
    pub outbound: Vec<Outbound>,
    /// Messages received from other servers' users (inbound federation).
    pub received: Vec<RemoteMessage>,
}

impl Effects {
    /// Adds another operation's effects.
    pub fn extend(&mut self, other: Effects) {
        self.events.extend(other.events);
        self.outbound.extend(other.outbound);
        self.received.extend(other.received);
    }
}

/// What one accepted item of an inbound federation transaction adds.
#[derive(Debug, Default)]
pub struct InboundItem {
    /// For a message: its origin server and its id there. The item applies only the first
    /// time this pair is seen (within the retention of `fed_inbound_messages`).
    pub message: Option<(Arc<str>, u64)>,
    /// Its inbox events and federation items.
    pub effects: Effects,
}

/// A message to store: its idempotency record plus one inbox event per target device.
#[derive(Debug)]
pub struct NewMessage {
    /// Pre-assigned server message id (wasted if this turns out to be a duplicate).
    pub id: u64,
    /// Sending device.
    pub sender_device: DevicePk,
    /// Sending user (receipts for the message are checked against it).
    pub sender_user: UserPk,
    /// Client's idempotency key.
    pub client_msg_id: Uuid,
    /// Recipient user id.
    pub recipient: String,
    /// Server timestamp.
    pub ts: i64,
    /// One event per local target device.
    pub events: Vec<NewEvent>,
    /// The signed message for each other server with target devices.
    pub outbound: Vec<Outbound>,
}

/// A small write done by the writer.
#[derive(Debug)]
pub enum Bookkeeping {
    /// Cache (or with `None`, forget) a remote user's devices (JSON of `UserDevices`).
    RemoteDevices {
        /// The remote user id.
        user: String,
        /// The devices.
        json: Option<Vec<u8>>,
    },
    /// `server` fetched the devices of local user `user`.
    Watcher {
        /// The local user.
        user: UserPk,
        /// The watching server.
        server: String,
    },
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOutcome {
    /// Stored now.
    Stored {
        /// Server message id.
        id: u64,
        /// Server timestamp.
        ts: i64,
    },
    /// Stored earlier under the same (device, client_msg_id): nothing new was written.
    Duplicate {
        /// The original id.
        id: u64,
        /// The original timestamp.
        ts: i64,
    },
}

/// An inbox event that is now durable, handed to live delivery.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Target device.
    pub device: DevicePk,
    /// The stored row.
    pub row: InboxRow,
}

/// Receives the inbox events of each commit, in the writer task, right after the commit and
/// in commit order. It must not block or wait: the next batch waits for it.
pub trait LiveEvents: Send + Sync {
    /// `events` are durable (answers for the commit have been sent).
    fn committed(&self, events: Vec<Committed>);
}

/// Who hears about commits, fixed when the store opens; a missing subscriber hears nothing.
#[derive(Default)]
pub struct Subscribers {
    /// Live delivery of durable inbox events (the hub). Called in the writer task: a live
    /// event reaches its connection without a hop through another task.
    pub events: Option<Arc<dyn LiveEvents>>,
    /// The outbound queues (named by destination server) a commit added items to, one message
    /// per commit that grew any. A channel rather than a call, so that its receiver can go to
    /// a service built after the store (the federation sender, which reads the store).
    pub outbound: Option<mpsc::UnboundedSender<Vec<Arc<str>>>>,
}

impl Subscribers {
    fn publish(&self, committed: Vec<Committed>, outbound: Vec<Arc<str>>) {
        if let Some(events) = self.events.as_ref().filter(|_| !committed.is_empty()) {
            events.committed(committed);
        }
        if let Some(channel) = self.outbound.as_ref().filter(|_| !outbound.is_empty()) {
            // Nobody listening (federation off, or shutting down): the items stay queued in
            // the database and are picked up at the next start.
            let _ = channel.send(outbound);
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One queued write.
pub enum WriteOp {
    /// Store a message.
    Message(NewMessage, Reply<MessageOutcome>),
    /// A device acknowledged its inbox up to `seq`; append the resulting receipts.
    Ack {
        /// The acknowledging device.
        device: DevicePk,
        /// Cumulative position.
        seq: u64,
        /// Delivered receipts for senders' devices and servers.
        receipts: Effects,
        /// Answered after commit.
        reply: Reply<()>,
    },
    /// Append events and queue federation items (read receipts, for example).
    Events(Effects, Reply<()>),
    /// Apply an inbound federation transaction once: answers `true` when it was new, `false`
    /// when `(origin, txn_id)` was applied before (and nothing is written). A message item
    /// whose `(origin, id)` was applied before (in another transaction, or earlier in this
    /// one) adds nothing.
    Inbound {
        /// Sending server.
        origin: String,
        /// Its transaction id.
        txn_id: String,
        /// What the transaction's accepted items add, in item order.
        items: Vec<InboundItem>,
        /// Answered after commit.
        reply: Reply<bool>,
    },
    /// A transaction to `destination` is about to be sent (persisted so a retry after a restart
    /// resends the same items under the same id).
    TxnInflight {
        /// Destination.
        destination: String,
        /// Transaction id.
        txn_id: String,
        /// Last queue seq it carries.
        last_seq: i64,
        /// The previous transaction was accepted: drop items up to here.
        done_up_to: Option<i64>,
        /// Answered after commit.
        reply: Reply<()>,
    },
    /// Small federation bookkeeping writes (kept off the pool: a pool write waits for the
    /// writer's lock and, under load, would hold a pool connection that reads need).
    Bookkeeping(Bookkeeping, Reply<()>),
    /// `destination` accepted the transaction ending at `last_seq`: drop those items.
    TxnDone {
        /// Destination.
        destination: String,
        /// Last queue seq it carried.
        last_seq: i64,
        /// Answered after commit.
        reply: Reply<()>,
    },
    /// Remove a device with its inbox and token.
    DeleteDevice(DevicePk, Reply<()>),
    /// Record when a user and device were last online.
    LastSeen {
        /// The user.
        user: UserPk,
        /// The device.
        device: DevicePk,
        /// When.
        ts: i64,
        /// Answered after commit.
        reply: Reply<()>,
    },
}

impl WriteOp {
    /// Federation work (queued through the priority lane).
    fn is_federation(&self) -> bool {
        matches!(self, Self::Inbound { .. } | Self::TxnInflight { .. } | Self::TxnDone { .. } | Self::Bookkeeping(..))
    }
}

pub(super) struct Writer {
    pub conn: SqliteConnection,
    /// The read pool, closed by the writer once it has drained (see [`Writer::close`]).
    pub pool: SqlitePool,
    pub rx: mpsc::Receiver<WriteOp>,
    /// Federation writes, taken before `rx` (see `Store::queue_priority`).
    pub priority: mpsc::Receiver<WriteOp>,
    pub max_batch: usize,
    pub keep_history: bool,
    pub subscribers: Subscribers,
    pub metrics: crate::metrics::Metrics,
    /// Next sequence number per device (loaded on first use).
    pub next_seq: HashMap<DevicePk, u64>,
}

impl Writer {
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        loop {
            let op = tokio::select! {
                biased;
                Some(op) = self.priority.recv() => op,
                Some(op) = self.rx.recv() => op,
                else => break,
            };
            batch.push(op);
            while let Ok(op) = self.priority.try_recv() {
                batch.push(op);
                if batch.len() >= self.max_batch {
                    break;
                }
            }
            // With federation work in the batch, keep the commit short: a destination's answer
            // and the sender's next transaction wait for it (under a backlog of client sends, a
            // full batch would make every federation round trip cost ~100 ms).
            let limit = if batch.iter().any(WriteOp::is_federation) {
                self.max_batch.min(batch.len() + PRIORITY_BATCH_CLIENT_OPS)
            } else {
                self.max_batch
            };
            while batch.len() < limit {
                match self.rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.metrics.writer_queue_depth.set(self.rx.len() as i64);
            let started = std::time::Instant::now();
            let size = batch.len();
            self.commit_batch(&mut batch).await;
            self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.batch_size.observe(size as f64);
        }
        tracing::info!("writer drained and stopped");
        self.close().await;
    }

    /// Runs when every handle on the store is gone: closes the pool, folds the WAL back into the
    /// database file and truncates it, and closes the last connection, so a stopped server leaves
    /// one self-contained file (a backup copies just that) and the next start replays nothing.
    async fn close(mut self) {
        self.pool.close().await;
        let checkpoint: Result<(i64, i64, i64), _> =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&mut self.conn).await;
        match checkpoint {
            Ok((0, _, _)) => tracing::info!("WAL checkpointed"),
            // Another process (`parleyd admin`) has the database open; SQLite folds the WAL
            // back when the last connection closes.
            Ok((_, frames, done)) => tracing::warn!(frames, done, "WAL checkpoint incomplete: the database is in use"),
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed"),
        }
        if let Err(error) = self.conn.close().await {
            tracing::warn!(%error, "closing the database failed");
        }
    }

    async fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let mut work = Work::default();
        match self.apply(batch, &mut work).await {
            Ok(()) => {
                let committed = std::mem::take(&mut work.committed);
                for (reply, outcome) in work.message_replies.drain(..) {
                    let _ = reply.send(Ok(outcome));
                }
                for reply in work.unit_replies.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                for (reply, new) in work.inbound_replies.drain(..) {
                    let _ = reply.send(Ok(new));
                }
                let destinations = std::mem::take(&mut work.destinations);
                self.subscribers.publish(committed, destinations);
            }
            Err(error) => {
                // Dropping the replies answers every operation of the batch with `Unavailable`.
                tracing::error!(%error, "batch failed; rolled back");
                // Sequence numbers handed out in the failed batch were not stored: forget them.
                self.next_seq.clear();
            }
        }
        batch.clear();
    }

    async fn apply(&mut self, batch: &mut Vec<WriteOp>, work: &mut Work) -> Result<(), StoreError> {
        let next_seq = &mut self.next_seq;
        let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
        let mut messages = Vec::new();
        let mut events: Vec<NewEvent> = Vec::new();
        let mut acks: HashMap<DevicePk, u64> = HashMap::new();
        let mut deleted = Vec::new();
        let mut last_seen = Vec::new();
        let mut outbound: Vec<Outbound> = Vec::new();
        let mut inbound = Vec::new();
        let mut received: Vec<RemoteMessage> = Vec::new();
        let mut fed_state = Vec::new();
        for op in batch.drain(..) {
            match op {
                WriteOp::Message(message, reply) => messages.push((message, reply)),
                WriteOp::Ack { device, seq, receipts, reply } => {
                    let entry = acks.entry(device).or_insert(0);
                    *entry = (*entry).max(seq);
                    events.extend(receipts.events);
                    outbound.extend(receipts.outbound);
                    received.extend(receipts.received);
                    work.unit_replies.push(reply);
                }
                WriteOp::Events(effects, reply) => {
                    events.extend(effects.events);
                    outbound.extend(effects.outbound);
                    received.extend(effects.received);
                    work.unit_replies.push(reply);
                }
                WriteOp::Inbound { origin, txn_id, items, reply } => inbound.push((origin, txn_id, items, reply)),
                op @ (WriteOp::TxnInflight { .. } | WriteOp::TxnDone { .. } | WriteOp::Bookkeeping(..)) => fed_state.push(op),
                WriteOp::DeleteDevice(device, reply) => {
                    deleted.push(device);
                    work.unit_replies.push(reply);
                }
                WriteOp::LastSeen { user, device, ts, reply } => {
                    last_seen.push((user, device, ts));
                    work.unit_replies.push(reply);
                }
            }
        }

        // 1. Idempotency records; RETURNING names the rows that are new.
        let mut inserted = HashSet::new();
        for chunk in messages.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO messages (id, sender_device, sender_user, client_msg_id, recipient, ts) ",
            );
            query.push_values(chunk, |mut row, (m, _)| {
                row.push_bind(m.id as i64)
                    .push_bind(m.sender_device)
                    .push_bind(m.sender_user)
                    .push_bind(m.client_msg_id.as_bytes().as_slice())
                    .push_bind(m.recipient.as_str())
                    .push_bind(m.ts);
            });
            query.push(" ON CONFLICT DO NOTHING RETURNING id");
            for row in query.build().fetch_all(&mut *tx).await? {
                inserted.insert(row.try_get::<i64, _>(0)? as u64);
            }
        }
        let mut message_events = Vec::new();
        for (message, reply) in messages {
            if inserted.contains(&message.id) {
                work.message_replies.push((reply, MessageOutcome::Stored { id: message.id, ts: message.ts }));
                message_events.extend(message.events);
                outbound.extend(message.outbound);
            } else {
                let row = sqlx::query("SELECT id, ts FROM messages WHERE sender_device = ? AND client_msg_id = ?")
                    .bind(message.sender_device)
                    .bind(message.client_msg_id.as_bytes().as_slice())
                    .fetch_one(&mut *tx)
                    .await?;
                let outcome = MessageOutcome::Duplicate { id: row.try_get::<i64, _>(0)? as u64, ts: row.try_get(1)? };
                work.message_replies.push((reply, outcome));
            }
        }
        message_events.append(&mut events);
        let mut events = message_events;

        // 1b. Inbound federation transactions: each applies once per (origin, txn_id) ...
        let now = super::now_ms();
        let mut inbound_items = Vec::new();
        for (origin, txn_id, items, reply) in inbound {
            let done =
                sqlx::query("INSERT INTO fed_inbound_txns (origin, txn_id, received_ts) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
                    .bind(&origin)
                    .bind(&txn_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            let new = done.rows_affected() == 1;
            if new {
                inbound_items.extend(items);
            }
            work.inbound_replies.push((reply, new));
        }
        // ... and each message in them once per (origin, message id), whatever transaction
        // carries it: one multi-row insert; RETURNING names the pairs seen for the first time.
        let keys: Vec<&(Arc<str>, u64)> = inbound_items.iter().filter_map(|item| item.message.as_ref()).collect();
        let mut first_seen: HashMap<String, HashSet<u64>> = HashMap::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO fed_inbound_messages (origin, msg_id, received_ts) ");
            query.push_values(chunk, |mut row, (origin, id)| {
                row.push_bind(origin.as_ref()).push_bind(*id as i64).push_bind(now);
            });
            query.push(" ON CONFLICT DO NOTHING RETURNING origin, msg_id");
            for row in query.build().fetch_all(&mut *tx).await? {
                first_seen.entry(row.try_get(0)?).or_default().insert(row.try_get::<i64, _>(1)? as u64);
            }
        }
        let mut duplicates = 0usize;
        for item in inbound_items {
            if let Some((origin, id)) = &item.message {
                // Taken out, so a second copy later in the same batch counts as a repeat too.
                if !first_seen.get_mut(origin.as_ref()).is_some_and(|ids| ids.remove(id)) {
                    duplicates += 1;
                    continue;
                }
            }
            events.extend(item.effects.events);
            outbound.extend(item.effects.outbound);
            received.extend(item.effects.received);
        }
        if duplicates > 0 {
            tracing::debug!(duplicates, "inbound messages already delivered were dropped");
        }
        for chunk in received.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("INSERT OR IGNORE INTO remote_messages (recipient, sender, msg_id) ");
            query.push_values(chunk, |mut row, m| {
                row.push_bind(m.recipient).push_bind(m.sender.as_ref()).push_bind(m.id as i64);
            });
            query.build().execute(&mut *tx).await?;
        }

        // 1c. Outbound federation items, and the state of transactions in flight.
        let mut destinations: Vec<Arc<str>> = Vec::new();
        for chunk in outbound.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO fed_outbound (destination, payload) ");
            query.push_values(chunk, |mut row, item| {
                row.push_bind(item.destination.as_ref()).push_bind(item.payload.as_ref());
            });
            query.build().execute(&mut *tx).await?;
        }
        for item in outbound {
            if !destinations.contains(&item.destination) {
                destinations.push(item.destination);
            }
        }
        for op in fed_state {
            match op {
                WriteOp::TxnInflight { destination, txn_id, last_seq, done_up_to, reply } => {
                    if let Some(done) = done_up_to {
                        sqlx::query("DELETE FROM fed_outbound WHERE destination = ? AND seq <= ?")
                            .bind(&destination)
                            .bind(done)
                            .execute(&mut *tx)
                            .await?;
                    }
                    sqlx::query(
                        "INSERT INTO fed_inflight (destination, txn_id, last_seq) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (destination) DO UPDATE SET txn_id = ?2, last_seq = ?3",
                    )
                    .bind(destination)
                    .bind(txn_id)
                    .bind(last_seq)
                    .execute(&mut *tx)
                    .await?;
                    work.unit_replies.push(reply);
                }
                WriteOp::TxnDone { destination, last_seq, reply } => {
                    sqlx::query("DELETE FROM fed_outbound WHERE destination = ? AND seq <= ?")
                        .bind(&destination)
                        .bind(last_seq)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM fed_inflight WHERE destination = ?").bind(&destination).execute(&mut *tx).await?;
                    work.unit_replies.push(reply);
                }
                WriteOp::Bookkeeping(write, reply) => {
                    match write {
                        Bookkeeping::RemoteDevices { user, json: Some(json) } => {
                            sqlx::query(
                                "INSERT INTO remote_devices (user_id, json, fetched_ts) VALUES (?1, ?2, ?3) \
                                 ON CONFLICT (user_id) DO UPDATE SET json = ?2, fetched_ts = ?3",
                            )
                            .bind(user)
                            .bind(json)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Bookkeeping::RemoteDevices { user, json: None } => {
                            sqlx::query("DELETE FROM remote_devices WHERE user_id = ?").bind(user).execute(&mut *tx).await?;
                        }
                        Bookkeeping::Watcher { user, server } => {
                            sqlx::query("INSERT OR IGNORE INTO device_list_watchers (user_id, server) VALUES (?, ?)")
                                .bind(user)
                                .bind(server)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    work.unit_replies.push(reply);
                }
                _ => {}
            }
        }
        work.destinations = destinations;

        // 2. Devices removed in this batch lose their inbox, token and counters.
        for device in &deleted {
            next_seq.remove(device);
            for table in ["inbox", "one_time_prekeys", "signed_prekeys", "last_resort_prekeys", "device_keys"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE device = ?")).bind(device).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM devices WHERE id = ?").bind(device).execute(&mut *tx).await?;
        }

        // 3. Inbox events with their sequence numbers (events for unknown devices are dropped).
        let mut rows = Vec::with_capacity(events.len());
        for event in events {
            if let Some(seq) = allocate_seq(next_seq, &mut tx, event.device).await? {
                rows.push((event, seq));
            }
        }
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO inbox (device, seq, sender, msg_id, payload) ");
            query.push_values(chunk, |mut row, (event, seq)| {
                let (sender, msg_id) = match &event.origin {
                    Some((sender, id)) => (Some(sender.as_ref()), Some(*id as i64)),
                    None => (None, None),
                };
                row.push_bind(event.device)
                    .push_bind(*seq as i64)
                    .push_bind(sender)
                    .push_bind(msg_id)
                    .push_bind(event.payload.as_ref());
            });
            query.build().execute(&mut *tx).await?;
        }

        // 4. Acks: raise acked_seq (clamped to what exists) and drop acknowledged entries.
        let mut clamped = Vec::with_capacity(acks.len());
        for (device, seq) in acks {
            if let Some(next) = peek_next_seq(next_seq, &mut tx, device).await? {
                clamped.push((device, seq.min(next - 1)));
            }
        }
        for chunk in clamped.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("WITH v(d, s) AS (");
            query.push_values(chunk, |mut row, (device, seq)| {
                row.push_bind(*device).push_bind(*seq as i64);
            });
            query.push(") UPDATE devices SET acked_seq = v.s FROM v WHERE devices.id = v.d AND v.s > devices.acked_seq");
            query.build().execute(&mut *tx).await?;
            if !self.keep_history {
                let mut query = QueryBuilder::<Sqlite>::new("WITH v(d, s) AS (");
                query.push_values(chunk, |mut row, (device, seq)| {
                    row.push_bind(*device).push_bind(*seq as i64);
                });
                // Driven by `v` through the primary key: cost follows the rows deleted, not the batch.
                query.push(
                    ") DELETE FROM inbox WHERE (device, seq) IN \
                     (SELECT i.device, i.seq FROM v JOIN inbox i ON i.device = v.d AND i.seq <= v.s)",
                );
                query.build().execute(&mut *tx).await?;
            }
        }

        // 5. Last seen.
        for (user, device, ts) in last_seen {
            sqlx::query("UPDATE users SET last_seen_ts = ? WHERE id = ?").bind(ts).bind(user).execute(&mut *tx).await?;
            sqlx::query("UPDATE devices SET last_seen_ts = ? WHERE id = ?").bind(ts).bind(device).execute(&mut *tx).await?;
        }

        tx.commit().await?;
        let committed_at = Some(std::time::Instant::now());
        self.metrics.events_stored.inc_by(rows.len() as u64);
        work.committed = rows
            .into_iter()
            .map(|(event, seq)| Committed {
                device: event.device,
                row: InboxRow { seq, origin: event.origin, payload: event.payload, committed_at },
            })
            .collect();
        Ok(())
    }
}

/// The next sequence number of `device` without taking it; `None` if the device is gone.
async fn peek_next_seq(
    cache: &mut HashMap<DevicePk, u64>,
    tx: &mut SqliteConnection,
    device: DevicePk,
) -> Result<Option<u64>, StoreError> {
    if let Some(next) = cache.get(&device) {
        return Ok(Some(*next));
    }
    let row = sqlx::query(
        "SELECT max(acked_seq, coalesce((SELECT max(seq) FROM inbox WHERE device = ?1), 0)) FROM devices WHERE id = ?1",
    )
    .bind(device)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let next = row.try_get::<i64, _>(0)? as u64 + 1;
    cache.insert(device, next);
    Ok(Some(next))
}

async fn allocate_seq(
    cache: &mut HashMap<DevicePk, u64>,
    tx: &mut SqliteConnection,
    device: DevicePk,
) -> Result<Option<u64>, StoreError> {
    let Some(next) = peek_next_seq(cache, tx, device).await? else { return Ok(None) };
    cache.insert(device, next + 1);
    Ok(Some(next))
}

#[derive(Default)]
struct Work {
    message_replies: Vec<(Reply<MessageOutcome>, MessageOutcome)>,
    unit_replies: Vec<Reply<()>>,
    inbound_replies: Vec<(Reply<bool>, bool)>,
    committed: Vec<Committed>,
    destinations: Vec<Arc<str>>,
}
