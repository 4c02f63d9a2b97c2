//! The group-commit writer: one task, one connection, one transaction per batch of whatever
//! operations queued up while the previous batch was committing. It also owns the per-device
//! inbox sequence counters, so sequence numbers are assigned in commit order without locks.
//! A batch is first sorted into a `Plan` (pure, so unit-tested), then applied by one
//! function per SQL step, in a fixed order, in one transaction.
//!
//! Sequence invariant: rows are deleted only at or below a device's persisted `acked_seq`
//! (in the same transaction that raises it), so after a restart the next sequence number is
//! `max(acked_seq, max(seq)) + 1` and is never reused.
//!
//! After each commit, and only then, the writer answers the batch's operations and publishes
//! what the commit made durable to its [`Subscribers`], in commit order: the inbox events to
//! live delivery, and the outbound queues that grew on a channel (their drainer is built after
//! the store). When the writer has a thread of its own, it hands each commit's answers and
//! events to one task on the connections' runtime ([`Settle::Handoff`]), which wakes the
//! waiting connections from there: one cross-thread wake-up per commit instead of one per
//! waiting connection (each a write to the runtime's eventfd and often a switch of threads).

use super::{DevicePk, InboxRow, StoreError, UserPk};
use bytes::Bytes;
use parley_spec::{Seq, ServerMsgId, ServerName, Timestamp};
use sqlx::{Connection as _, QueryBuilder};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

mod postgres;
mod rows;
mod sqlite;
pub(super) use sqlite::Connection as SqliteConnection;

/// Longest wait of a WAL restart for readers, in milliseconds.
const WAL_RESTART_WAIT_MS: u64 = 20;

/// The tables whose rows a removed device loses (by their `device` column), before its
/// `devices` row.
const DEVICE_TABLES: [&str; 8] = [
    "inbox",
    "one_time_prekeys",
    "signed_prekeys",
    "last_resort_prekeys",
    "device_keys",
    "keypackages",
    "push_registrations",
    "push_pending",
];

/// Client operations at most in a commit that carries federation work.
const PRIORITY_BATCH_CLIENT_OPS: usize = 256;

/// Rows at most per multi-row statement (6 binds a row stays far below SQLite's variable
/// limit). A power of two: see [`statement_chunks`].
const ROWS_PER_STATEMENT: usize = 512;

/// Splits `rows` into slices whose lengths are powers of two, at most [`ROWS_PER_STATEMENT`],
/// largest first (the multi-row statements built with sqlx: the PostgreSQL writer's federation
/// steps, and `queue_outbound` on either pool). A multi-row statement's SQL depends on its row
/// count; with these sizes at most ten texts per statement are used, which stay in the
/// connection's statement cache instead of being parsed and planned again for every batch
/// (measured: 8 % of the SQLite writer's time, when it used sqlx, with a text per row count).
fn statement_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let len = ROWS_PER_STATEMENT.min(1 << rows.len().ilog2());
        let (chunk, rest) = rows.split_at(len);
        rows = rest;
        Some(chunk)
    })
}

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
    /// The destination server.
    pub destination: ServerName,
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
    pub id: ServerMsgId,
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
    pub message: Option<(Arc<str>, ServerMsgId)>,
    /// Its inbox events and federation items.
    pub effects: Effects,
}

/// A message to store: its idempotency record plus one inbox event per target device.
#[derive(Debug)]
pub struct NewMessage {
    /// Pre-assigned server message id (wasted if this turns out to be a duplicate).
    pub id: ServerMsgId,
    /// Sending device.
    pub sender_device: DevicePk,
    /// Sending user (receipts for the message are checked against it).
    pub sender_user: UserPk,
    /// Client's idempotency key.
    pub client_msg_id: Uuid,
    /// Recipient user id.
    pub recipient: String,
    /// Server timestamp.
    pub ts: Timestamp,
    /// One event per local target device.
    pub events: Vec<NewEvent>,
    /// The signed message for each other server with target devices.
    pub outbound: Vec<Outbound>,
    /// Files (SHA-256) the message carries: each is held while a local device it went to has
    /// not acknowledged it, if the sender references the file (`spec/media.md` §5).
    pub media: Vec<[u8; 32]>,
    /// A temporary chat's message: its holds last until each device downloaded the file, and
    /// then the sender's reference goes (only for a message with no remote recipients).
    pub media_once: bool,
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
        id: ServerMsgId,
        /// Server timestamp.
        ts: Timestamp,
    },
    /// Stored earlier under the same (device, client_msg_id): nothing new was written.
    Duplicate {
        /// The original id.
        id: ServerMsgId,
        /// The original timestamp.
        ts: Timestamp,
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

/// Receives the inbox events of each commit, right after the commit and in commit order (in
/// the writer's task, or in the task that settles its commits: see [`Settle`]). It must not
/// block or wait: the next commits wait for it.
pub trait LiveEvents: Send + Sync {
    /// `events` are durable (answers for the commit have been sent).
    fn committed(&self, events: Vec<Committed>);
}

/// Who hears about commits, fixed when the store opens; a missing subscriber hears nothing.
#[derive(Default)]
pub struct Subscribers {
    /// Live delivery of durable inbox events (the hub), called right after each commit.
    pub events: Option<Arc<dyn LiveEvents>>,
    /// The outbound queues (named by destination server) a commit added items to, one message
    /// per commit that grew any. A channel rather than a call, so that its receiver can go to
    /// a service built after the store (the federation sender, which reads the store).
    pub outbound: Option<mpsc::UnboundedSender<Vec<ServerName>>>,
}

impl Subscribers {
    fn publish(&self, committed: Vec<Committed>, outbound: Vec<ServerName>) {
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

/// Where the writer settles its commits.
pub(super) enum Settle {
    /// In the writer's task (the writer runs on the connections' runtime).
    Inline(Subscribers),
    /// On the connections' runtime, by [`settle`], in commit order (the writer has a thread of
    /// its own).
    Handoff(mpsc::UnboundedSender<Work>),
}

/// Settles, on the runtime it is spawned on, the commits a writer on its own thread hands
/// over, in commit order; returns when the writer has stopped and everything is settled.
pub(super) async fn settle(mut commits: mpsc::UnboundedReceiver<Work>, subscribers: Subscribers) {
    let mut ready = Vec::new();
    while commits.recv_many(&mut ready, 64).await > 0 {
        for work in ready.drain(..) {
            work.tell(&subscribers);
        }
    }
}

/// One queued write. Every `reply` is answered after the commit that made the write durable.
pub enum WriteOp {
    /// Store a message.
    Message(NewMessage, Reply<MessageOutcome>),
    /// A device acknowledged its inbox up to `seq`; append the resulting receipts.
    Ack {
        device: DevicePk,
        seq: Seq,
        /// Delivered receipts for senders' devices and servers.
        receipts: Effects,
        reply: Reply<()>,
    },
    /// Append events and queue federation items (read receipts, for example).
    Events(Effects, Reply<()>),
    /// Apply an inbound federation transaction once: answers `true` when it was new, `false`
    /// when `(origin, txn_id)` was applied before (and nothing is written). A message item
    /// whose `(origin, id)` was applied before (in another transaction, or earlier in this
    /// one) adds nothing.
    Inbound {
        origin: String,
        txn_id: String,
        /// What the transaction's accepted items add, in item order.
        items: Vec<InboundItem>,
        reply: Reply<bool>,
    },
    /// A transaction to `destination` is about to be sent (persisted so a retry after a restart
    /// resends the same items under the same id).
    TxnInflight {
        destination: String,
        txn_id: String,
        /// Last queue seq it carries.
        last_seq: i64,
        /// The previous transaction was accepted: drop items up to here.
        done_up_to: Option<i64>,
        reply: Reply<()>,
    },
    /// Small federation bookkeeping writes (kept off the pool: a pool write waits for the
    /// writer's lock and, under load, would hold a pool connection that reads need).
    Bookkeeping(Bookkeeping, Reply<()>),
    /// `destination` accepted the transaction ending at `last_seq`: drop those items.
    TxnDone {
        destination: String,
        /// Last queue seq it carried.
        last_seq: i64,
        reply: Reply<()>,
    },
    /// Remove a device with its inbox and token.
    DeleteDevice(DevicePk, Reply<()>),
    /// Record when a user and device were last online.
    LastSeen { user: UserPk, device: DevicePk, ts: Timestamp, reply: Reply<()> },
}

impl WriteOp {
    /// Federation work (queued through the priority lane).
    fn is_federation(&self) -> bool {
        matches!(self, Self::Inbound { .. } | Self::TxnInflight { .. } | Self::TxnDone { .. } | Self::Bookkeeping(..))
    }
}

/// The writer's own connection.
pub(super) enum WriterConn {
    /// To the SQLite file (WAL), driven on the writer's thread (see `sqlite`).
    Sqlite(sqlite::Connection),
    /// To PostgreSQL.
    Postgres(sqlx::PgConnection),
}

pub(super) struct Writer {
    pub conn: WriterConn,
    /// The read pool, closed by the writer once it has drained (see [`Writer::close`]).
    pub pool: super::Pool,
    pub rx: mpsc::Receiver<WriteOp>,
    /// Federation writes, taken before `rx` (see `Store::queue_priority`).
    pub priority: mpsc::Receiver<WriteOp>,
    pub max_batch: usize,
    /// Shortest time between the starts of two commits (see `storage.commit_interval_us`).
    pub commit_interval: std::time::Duration,
    pub keep_history: bool,
    /// Where answers and events go after each commit.
    pub settle: Settle,
    pub metrics: crate::metrics::Metrics,
    /// Next sequence number per device (loaded on first use; on PostgreSQL, within a batch only).
    pub next_seq: HashMap<DevicePk, Seq>,
    /// Notified by the checkpoint task when the WAL should start over (see `checkpoints`).
    pub restart_wal: Arc<tokio::sync::Notify>,
}

impl Writer {
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut last_commit: Option<tokio::time::Instant> = None;
        let (mut priority_open, mut rx_open) = (true, true);
        while priority_open || rx_open {
            let op = tokio::select! {
                biased;
                // Between two commits, or at once when idle (a burst of pool writes such as
                // registrations grows the WAL too, with no commit of the writer's to follow).
                () = self.restart_wal.notified() => {
                    self.restart_wal().await;
                    continue;
                }
                op = self.priority.recv(), if priority_open => match op {
                    Some(op) => op,
                    None => {
                        priority_open = false;
                        continue;
                    }
                },
                op = self.rx.recv(), if rx_open => match op {
                    Some(op) => op,
                    None => {
                        rx_open = false;
                        continue;
                    }
                },
            };
            batch.push(op);
            // Under load (the previous commit started less than an interval ago), let more
            // operations join this one.
            if let Some(due) = last_commit.map(|at| at + self.commit_interval) {
                if due > tokio::time::Instant::now() && self.rx.len() + self.priority.len() + 1 < self.max_batch {
                    tokio::time::sleep_until(due).await;
                }
            }
            last_commit = Some(tokio::time::Instant::now());
            fill_batch(&mut batch, &mut self.priority, &mut self.rx, self.max_batch);
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

    /// Copies what is left of the WAL and makes the next commit write it from its start. It
    /// waits for readers still on the old frames, at most [`WAL_RESTART_WAIT_MS`]: past that
    /// it gives up until the checkpoint task asks again, rather than hold up commits.
    async fn restart_wal(&mut self) {
        let WriterConn::Sqlite(conn) = &mut self.conn else { return };
        let wait = std::time::Duration::from_millis(WAL_RESTART_WAIT_MS);
        match conn.restart_wal(wait, super::store::BUSY_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => tracing::debug!("WAL restart postponed: a reader is still on it"),
            Err(error) => tracing::warn!(%error, "WAL restart failed"),
        }
    }

    /// Runs when every handle on the store is gone: closes the pool, folds the WAL back into the
    /// database file and truncates it, and closes the last connection, so a stopped server leaves
    /// one self-contained file (a backup copies just that) and the next start replays nothing.
    async fn close(self) {
        on_pool!(&self.pool, |pool| pool.close().await);
        match self.conn {
            WriterConn::Sqlite(conn) => match conn.close() {
                Ok((0, _, _)) => tracing::info!("WAL checkpointed"),
                // Another process (`parleyd admin`) has the database open; SQLite folds the WAL
                // back when the last connection closes.
                Ok((_, frames, done)) => tracing::warn!(frames, done, "WAL checkpoint incomplete: the database is in use"),
                Err(error) => tracing::warn!(%error, "checkpointing and closing the database failed"),
            },
            WriterConn::Postgres(conn) => {
                if let Err(error) = conn.close().await {
                    tracing::warn!(%error, "closing the database connection failed");
                }
            }
        }
    }

    async fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let mut work = Work::default();
        match self.apply(batch, &mut work).await {
            Ok(()) => match &self.settle {
                Settle::Inline(subscribers) => work.tell(subscribers),
                Settle::Handoff(commits) => {
                    // Fails only once the runtime is gone (the process is stopping): the
                    // answers are dropped, as with a failed batch.
                    let _ = commits.send(work);
                }
            },
            Err(error) => {
                // Dropping the replies answers every operation of the batch with `Unavailable`.
                tracing::error!(%error, "batch failed; rolled back");
                // Sequence numbers handed out in the failed batch were not stored: forget them.
                self.next_seq.clear();
            }
        }
        batch.clear();
    }

    /// Applies `batch` in one transaction: sorts it into a [`Plan`], then runs the plan's SQL
    /// steps in order and commits. Replies are collected into `work`, sent by the caller after
    /// the commit (dropped unanswered if anything fails: the whole batch rolls back).
    async fn apply(&mut self, batch: &mut Vec<WriteOp>, work: &mut Work) -> Result<(), StoreError> {
        let mut plan: Plan = batch.drain(..).collect();
        work.unit_replies.extend(std::mem::take(&mut plan.replies));
        let now = super::stored_now()?;
        let (next_seq, keep_history) = (&mut self.next_seq, self.keep_history);
        let rows = match &mut self.conn {
            // Synchronous: the writer has a thread of its own on SQLite (see `Store::open`).
            WriterConn::Sqlite(conn) => conn.apply_plan(plan, now, next_seq, keep_history, work)?,
            WriterConn::Postgres(conn) => postgres::apply_plan(conn, plan, now, next_seq, keep_history, work).await?,
        };
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

/// Adds what else is queued to `batch` (which holds the operation just received): federation
/// writes first, up to `max_batch`; then client writes up to `max_batch` in all, or, when the
/// batch carries federation work, at most [`PRIORITY_BATCH_CLIENT_OPS`] of them. That keeps
/// such commits short: a destination's answer and the sender's next transaction wait for them
/// (under a backlog of client sends, a full batch would make every federation round trip cost
/// ~100 ms).
fn fill_batch(
    batch: &mut Vec<WriteOp>,
    priority: &mut mpsc::Receiver<WriteOp>,
    rx: &mut mpsc::Receiver<WriteOp>,
    max_batch: usize,
) {
    while let Ok(op) = priority.try_recv() {
        batch.push(op);
        if batch.len() >= max_batch {
            break;
        }
    }
    let limit =
        if batch.iter().any(WriteOp::is_federation) { max_batch.min(batch.len() + PRIORITY_BATCH_CLIENT_OPS) } else { max_batch };
    while batch.len() < limit {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Federation bookkeeping done in the writer's commit.
#[derive(Debug)]
enum FedWrite {
    /// See [`WriteOp::TxnInflight`].
    Inflight { destination: String, txn_id: String, last_seq: i64, done_up_to: Option<i64> },
    /// See [`WriteOp::TxnDone`].
    Done { destination: String, last_seq: i64 },
    /// See [`WriteOp::Bookkeeping`].
    Other(Bookkeeping),
}

/// An inbound transaction to apply once.
struct InboundTxn {
    origin: String,
    txn_id: String,
    items: Vec<InboundItem>,
    reply: Reply<bool>,
}

/// A batch sorted by the SQL step that applies it. Pure: building it runs no SQL, so what goes
/// where is unit-tested.
#[derive(Default)]
struct Plan {
    /// Step 1: messages to store once per (device, client_msg_id).
    messages: Vec<(NewMessage, Reply<MessageOutcome>)>,
    /// The effects of acks' receipts and of appended events, in batch order.
    effects: Effects,
    /// Step 2: inbound federation transactions, in batch order.
    inbound: Vec<InboundTxn>,
    /// Step 3: in-flight records, accepted transactions and other federation bookkeeping.
    fed_state: Vec<(FedWrite, Reply<()>)>,
    /// Step 4: devices to remove.
    deleted: Vec<DevicePk>,
    /// Step 6: the highest acknowledged position per device.
    acks: HashMap<DevicePk, Seq>,
    /// Step 7: last-seen times.
    last_seen: Vec<(UserPk, DevicePk, Timestamp)>,
    /// Replies to acks, appends, removals and last-seen updates, answered after the commit.
    replies: Vec<Reply<()>>,
}

impl FromIterator<WriteOp> for Plan {
    fn from_iter<I: IntoIterator<Item = WriteOp>>(ops: I) -> Self {
        let mut plan = Plan::default();
        for op in ops {
            match op {
                WriteOp::Message(message, reply) => plan.messages.push((message, reply)),
                WriteOp::Ack { device, seq, receipts, reply } => {
                    let acked = plan.acks.entry(device).or_insert(Seq::ZERO);
                    *acked = (*acked).max(seq);
                    plan.effects.extend(receipts);
                    plan.replies.push(reply);
                }
                WriteOp::Events(effects, reply) => {
                    plan.effects.extend(effects);
                    plan.replies.push(reply);
                }
                WriteOp::Inbound { origin, txn_id, items, reply } => {
                    plan.inbound.push(InboundTxn { origin, txn_id, items, reply })
                }
                WriteOp::TxnInflight { destination, txn_id, last_seq, done_up_to, reply } => {
                    plan.fed_state.push((FedWrite::Inflight { destination, txn_id, last_seq, done_up_to }, reply));
                }
                WriteOp::TxnDone { destination, last_seq, reply } => {
                    plan.fed_state.push((FedWrite::Done { destination, last_seq }, reply));
                }
                WriteOp::Bookkeeping(write, reply) => plan.fed_state.push((FedWrite::Other(write), reply)),
                WriteOp::DeleteDevice(device, reply) => {
                    plan.deleted.push(device);
                    plan.replies.push(reply);
                }
                WriteOp::LastSeen { user, device, ts, reply } => {
                    plan.last_seen.push((user, device, ts));
                    plan.replies.push(reply);
                }
            }
        }
        plan
    }
}

/// A new message's files, to hold for the devices it went to.
struct Hold {
    id: ServerMsgId,
    sender: UserPk,
    media: Vec<[u8; 32]>,
    /// A temporary chat's: held until downloaded, not only until delivered.
    once: bool,
}

impl Hold {
    /// The devices the message went to, with the inbox position of its event in each.
    fn targets(&self, rows: &[(NewEvent, Seq)]) -> Result<Vec<(DevicePk, i64)>, StoreError> {
        rows.iter()
            .filter(|(event, _)| event.origin.as_ref().is_some_and(|(_, origin)| *origin == self.id))
            .map(|(event, seq)| Ok((event.device, i64::try_from(*seq)?)))
            .collect()
    }
}

/// What applying a batch produced: the answers to its operations (in batch order within each
/// kind) and what to publish, settled once the commit is durable ([`Work::tell`]).
#[derive(Default)]
pub(super) struct Work {
    message_replies: Vec<(Reply<MessageOutcome>, MessageOutcome)>,
    /// New messages that carry files.
    holds: Vec<Hold>,
    unit_replies: Vec<Reply<()>>,
    inbound_replies: Vec<(Reply<bool>, bool)>,
    committed: Vec<Committed>,
    destinations: Vec<ServerName>,
}

impl Work {
    /// Answers the operations, then publishes the commit.
    fn tell(self, subscribers: &Subscribers) {
        for (reply, outcome) in self.message_replies {
            let _ = reply.send(Ok(outcome));
        }
        for reply in self.unit_replies {
            let _ = reply.send(Ok(()));
        }
        for (reply, new) in self.inbound_replies {
            let _ = reply.send(Ok(new));
        }
        subscribers.publish(self.committed, self.destinations);
    }

    /// Step 1's result for one message (both writers): its answer after the commit and, when
    /// it was stored now, its events, federation items and file holds.
    fn settle_message(
        &mut self,
        effects: &mut Effects,
        message: NewMessage,
        reply: Reply<MessageOutcome>,
        outcome: MessageOutcome,
    ) {
        if matches!(outcome, MessageOutcome::Stored { .. }) {
            if !message.media.is_empty() {
                let once = message.media_once && message.outbound.is_empty();
                self.holds.push(Hold { id: message.id, sender: message.sender_user, media: message.media, once });
            }
            effects.events.extend(message.events);
            effects.outbound.extend(message.outbound);
        }
        self.message_replies.push((reply, outcome));
    }
}

dual! {
/// Step 3: appends outbound federation items, in order; returns the destinations whose queue
/// grew (each once, in order of first appearance).
pub(in crate::storage) async fn queue_outbound(conn: &mut Conn, outbound: Vec<Outbound>) -> Result<Vec<ServerName>, StoreError> {
    for chunk in statement_chunks(&outbound) {
        let mut query = QueryBuilder::<Db>::new("INSERT INTO fed_outbound (destination, payload) ");
        query.push_values(chunk, |mut row, item| {
            row.push_bind(item.destination.as_str()).push_bind(item.payload.as_ref());
        });
        query.build().execute(&mut *conn).await?;
    }
    let mut destinations: Vec<ServerName> = Vec::new();
    for item in outbound {
        if !destinations.contains(&item.destination) {
            destinations.push(item.destination);
        }
    }
    Ok(destinations)
}
}

#[cfg(test)]
mod tests {
    use super::rows::BatchRows as _;
    use super::*;
    use std::collections::HashSet;

    fn reply<T>() -> Reply<T> {
        oneshot::channel().0
    }

    fn event(device: DevicePk) -> NewEvent {
        NewEvent { device, origin: None, payload: Bytes::from_static(b"{}") }
    }

    fn outbound(destination: &str) -> Outbound {
        Outbound { destination: ServerName::parse(destination).unwrap(), payload: Bytes::from_static(b"{}") }
    }

    fn effects(device: DevicePk, destination: &str) -> Effects {
        Effects { events: vec![event(device)], outbound: vec![outbound(destination)], received: vec![] }
    }

    fn last_seen(device: DevicePk) -> WriteOp {
        WriteOp::LastSeen { user: 1, device, ts: Timestamp::from_millis(42), reply: reply() }
    }

    fn txn_done(last_seq: i64) -> WriteOp {
        WriteOp::TxnDone { destination: "b.test".into(), last_seq, reply: reply() }
    }

    #[test]
    fn the_plan_sorts_each_operation_into_its_step_keeping_batch_order() {
        let message = NewMessage {
            id: ServerMsgId::new(11),
            sender_device: 1,
            sender_user: 1,
            client_msg_id: Uuid::new_v4(),
            recipient: "@bob:a.test".into(),
            ts: Timestamp::from_millis(5),
            events: vec![event(3)],
            outbound: vec![outbound("d.test")],
            media: Vec::new(),
            media_once: false,
        };
        let mut receipts = effects(2, "c.test");
        receipts.received.push(RemoteMessage { recipient: 1, sender: Arc::from("@carol:c.test"), id: ServerMsgId::new(9) });
        let batch = vec![
            WriteOp::Events(effects(1, "b.test"), reply()),
            WriteOp::Message(message, reply()),
            WriteOp::Ack { device: 5, seq: Seq::new(3), receipts, reply: reply() },
            WriteOp::Inbound { origin: "c.test".into(), txn_id: "t1".into(), items: vec![], reply: reply() },
            WriteOp::TxnInflight {
                destination: "b.test".into(),
                txn_id: "p.1-2".into(),
                last_seq: 2,
                done_up_to: None,
                reply: reply(),
            },
            WriteOp::DeleteDevice(7, reply()),
            WriteOp::Ack { device: 5, seq: Seq::new(9), receipts: Effects::default(), reply: reply() },
            WriteOp::Ack { device: 6, seq: Seq::new(1), receipts: Effects::default(), reply: reply() },
            WriteOp::Ack { device: 6, seq: Seq::ZERO, receipts: Effects::default(), reply: reply() },
            last_seen(2),
            txn_done(2),
            WriteOp::Bookkeeping(Bookkeeping::Watcher { user: 1, server: "c.test".into() }, reply()),
        ];
        let plan: Plan = batch.into_iter().collect();

        assert_eq!(
            plan.messages.iter().map(|(m, _)| m.id).collect::<Vec<_>>(),
            [ServerMsgId::new(11)],
            "a message keeps its effects until step 1 says it is new"
        );
        assert_eq!(plan.effects.events.iter().map(|e| e.device).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(plan.effects.outbound.iter().map(|o| o.destination.as_ref()).collect::<Vec<_>>(), ["b.test", "c.test"]);
        assert_eq!(plan.effects.received.len(), 1);
        assert_eq!(plan.inbound.iter().map(|t| (t.origin.as_str(), t.txn_id.as_str())).collect::<Vec<_>>(), [("c.test", "t1")]);
        let fed: Vec<&str> = plan
            .fed_state
            .iter()
            .map(|(write, _)| match write {
                FedWrite::Inflight { .. } => "inflight",
                FedWrite::Done { .. } => "done",
                FedWrite::Other(_) => "other",
            })
            .collect();
        assert_eq!(fed, ["inflight", "done", "other"]);
        assert_eq!(plan.deleted, [7]);
        assert_eq!(plan.acks, HashMap::from([(5, Seq::new(9)), (6, Seq::new(1))]), "the highest ack per device");
        assert_eq!(plan.last_seen, [(1, 2, Timestamp::from_millis(42))]);
        assert_eq!(plan.replies.len(), 7, "events, four acks, the removal and last-seen answer Ok(()) after the commit");
    }

    fn queue(ops: impl IntoIterator<Item = WriteOp>) -> mpsc::Receiver<WriteOp> {
        let ops: Vec<WriteOp> = ops.into_iter().collect();
        let (tx, rx) = mpsc::channel(ops.len().max(1));
        for op in ops {
            tx.try_send(op).map_err(|_| "full").expect("room");
        }
        rx
    }

    #[test]
    fn federation_work_takes_at_most_the_priority_share_of_client_writes() {
        let mut priority = queue([txn_done(1), txn_done(2), txn_done(3)]);
        let mut clients = queue((0..600).map(last_seen));
        let mut batch = vec![priority.try_recv().expect("queued")];
        fill_batch(&mut batch, &mut priority, &mut clients, 1_000);
        assert_eq!(batch.len(), 3 + PRIORITY_BATCH_CLIENT_OPS, "all federation writes, then the client share");
        assert!(batch[..3].iter().all(WriteOp::is_federation));
        assert!(!batch[3..].iter().any(WriteOp::is_federation));

        // Without federation work, a commit takes client writes up to the batch size.
        let mut batch = vec![clients.try_recv().expect("queued")];
        fill_batch(&mut batch, &mut priority, &mut clients, 300);
        assert_eq!(batch.len(), 300);
        let mut batch = vec![clients.try_recv().expect("queued")];
        fill_batch(&mut batch, &mut priority, &mut clients, 300);
        assert_eq!(batch.len(), 600 - PRIORITY_BATCH_CLIENT_OPS - 300, "what is left");
    }

    #[test]
    fn federation_writes_come_first_and_stop_at_the_batch_size() {
        let mut priority = queue((0..10).map(txn_done));
        let mut clients = queue((0..10).map(last_seen));
        // A client write arrived first: federation writes queued behind it still join.
        let mut batch = vec![clients.try_recv().expect("queued")];
        fill_batch(&mut batch, &mut priority, &mut clients, 4);
        assert_eq!(batch.iter().filter(|op| op.is_federation()).count(), 3);
        assert_eq!(batch.len(), 4, "no room left for clients");
        let mut batch = vec![priority.try_recv().expect("queued")];
        fill_batch(&mut batch, &mut priority, &mut clients, 100);
        assert_eq!(batch.iter().filter(|op| op.is_federation()).count(), 7);
        assert_eq!(batch.len(), 7 + 9, "then every client write (fewer than the share)");
    }

    #[test]
    fn rows_are_split_into_power_of_two_statements_largest_first_in_order() {
        let sizes = |n: usize| {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows).collect();
            assert_eq!(chunks.concat(), rows, "every row once, in order");
            chunks.iter().map(|chunk| chunk.len()).collect::<Vec<_>>()
        };
        assert_eq!(sizes(0), [0usize; 0]);
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(70), [64, 4, 2]);
        assert_eq!(sizes(512), [512]);
        assert_eq!(sizes(1500), [512, 512, 256, 128, 64, 16, 8, 4]);
        // Whatever the count, the texts used are among ten sizes.
        let all: HashSet<usize> = (0..3000).flat_map(sizes).collect();
        assert!(all.iter().all(|size| size.is_power_of_two() && *size <= ROWS_PER_STATEMENT), "{all:?}");
    }

    /// Waits until some transaction waits for a lock.
    async fn someone_waits_for_a_lock(pool: &sqlx::PgPool) {
        let waiting = async {
            loop {
                let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
                    .fetch_one(pool)
                    .await
                    .expect("pg_locks");
                if waiting > 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.expect("the append waits for the lock");
    }

    #[tokio::test]
    async fn on_postgres_a_device_acknowledges_while_another_worker_appends_to_its_inbox() {
        // Two workers' batches: one (here a transaction of the test's) is appending to a
        // device's inbox; the worker holding that device's connection commits its
        // acknowledgement meanwhile, and its own append to the inbox waits for the other's
        // rows and goes above them. (SQLite: one writer, nothing to test.)
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(crate::storage::testing::open(dir.path()).await);
        let Some(pool) = store.postgres_pool() else { return };
        let device = crate::storage::testing::device_with_three_events(&store).await;
        let event = |text: &str| crate::storage::testing::event(device, text);

        // The other worker's batch, as far as its inbox row.
        let mut conn = pool.acquire().await.unwrap();
        let mut other = crate::storage::BeginWriteOn::begin_write(&mut *conn).await.unwrap();
        let heads = other.lock_batch(Vec::new(), vec![device]).await.unwrap();
        assert_eq!(heads, [(device, 3)]);
        sqlx::query("INSERT INTO inbox (device, seq, payload) VALUES ($1, 4, 'four')")
            .bind(device)
            .execute(&mut *other)
            .await
            .unwrap();
        other.advance_heads(&[(device, 4)]).await.unwrap();

        tokio::time::timeout(std::time::Duration::from_secs(10), store.ack(device, Seq::new(3), Effects::default()))
            .await
            .expect("the acknowledgement does not wait for the other worker's batch")
            .unwrap();
        assert_eq!(store.acked_seq(device).await.unwrap(), Seq::new(3));

        let append = tokio::spawn({
            let five = event("five");
            let store = store.clone();
            async move { store.append(five).await }
        });
        someone_waits_for_a_lock(pool).await;
        other.commit().await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), append).await.expect("appended").expect("task").unwrap();
        let rows = store.inbox_after(device, Seq::new(3), 10, usize::MAX).await.unwrap();
        let rows: Vec<(u64, &[u8])> = rows.iter().map(|row| (row.seq.get(), row.payload.as_ref())).collect();
        assert_eq!(rows, [(4, b"four".as_slice()), (5, b"five".as_slice())]);
    }
}
