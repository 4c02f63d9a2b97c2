//! [`Store`] on either backend: SQLite (WAL, a small pool for reads and account writes) or
//! PostgreSQL (a pool of `storage.postgres_connections`), and on both the group-commit
//! [`Writer`](super::writer) for the hot path on a connection of its own.
//!
//! Each method's SQL is written once and compiled for both drivers (`on_pool!`, and
//! `dual!` for helpers that take a connection); sqlx binds `$N` placeholders on both, and the
//! few texts that differ are chosen with [`Pool::is_postgres`] / `PG` (the PostgreSQL
//! schema's header, B list). Write transactions begin with [`BeginWrite::begin_write`]:
//! `BEGIN IMMEDIATE` on SQLite, on PostgreSQL a transaction holding one advisory lock, so
//! read-check-write transactions (device counts, quotas, prekey claims) and the sequence
//! numbers of `fed_outbound` and the inboxes behave the same on both.

mod groups;
mod keypackages;
mod media;
mod push;

use super::writer::{Bookkeeping, Settle, Subscribers, WriteOp, Writer, WriterConn};
use super::*;
use crate::config::{Config, Synchronous};
pub use groups::{GroupDeviceRow, GroupMessageRow, HubUpdate};
pub use keypackages::{KeyPackageUpload, NewKeyPackage};
pub use media::{AdmitError, Admitted, UploadLimits, UploadRow};
pub use push::PushRow;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions as _, Row as _};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, "keys", include_str!("../../migrations/sqlite/0002_keys.sql")),
    (3, "federation", include_str!("../../migrations/sqlite/0003_federation.sql")),
    (4, "receipts", include_str!("../../migrations/sqlite/0004_receipts.sql")),
    (5, "federation_dedupe", include_str!("../../migrations/sqlite/0005_federation_dedupe.sql")),
    (6, "keypackages", include_str!("../../migrations/sqlite/0006_keypackages.sql")),
    (7, "groups", include_str!("../../migrations/sqlite/0007_groups.sql")),
    (8, "inbox_by_arrival", include_str!("../../migrations/sqlite/0008_inbox_by_arrival.sql")),
    (9, "media", include_str!("../../migrations/sqlite/0009_media.sql")),
    (10, "push", include_str!("../../migrations/sqlite/0010_push.sql")),
    (11, "media holds", include_str!("../../migrations/sqlite/0011_media_holds.sql")),
    (12, "media cold", include_str!("../../migrations/sqlite/0012_media_cold.sql")),
    (13, "temporary media", include_str!("../../migrations/sqlite/0013_media_once.sql")),
    (14, "group media holds", include_str!("../../migrations/sqlite/0014_media_group_holds.sql")),
];

/// Rows deleted per statement when pruning remembered inbound message ids.
const PRUNE_SLICE: u64 = 10_000;

/// The database handle shared by all services.
pub struct Store {
    pool: Pool,
    writer: mpsc::Sender<WriteOp>,
    priority: mpsc::Sender<WriteOp>,
    ids: MessageIds,
}

/// First key of the advisory locks that are federation destination leases (the second is the
/// destination's `hashtext`; two names with one hash share a lease, which only serializes
/// their senders).
const LEASE_CLASS: i32 = 0x5046_4544; // "PFED"

/// Exclusive senders per federation destination among the workers sharing a PostgreSQL
/// database (see [`Store::destination_leases`]).
pub struct DestinationLeases {
    conn: tokio::sync::Mutex<sqlx::PgConnection>,
}

impl DestinationLeases {
    /// Takes `destination`'s lease unless another worker holds it; whether this one has it now.
    /// It is held until the process ends (its connection closes).
    pub async fn try_take(&self, destination: &ServerName) -> Result<bool, StoreError> {
        let mut conn = self.conn.lock().await;
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LEASE_CLASS)
            .bind(destination.as_str())
            .fetch_one(&mut *conn)
            .await?)
    }
}

/// Ids a PostgreSQL-backed server reserves at once (the `INCREMENT` of `message_id_blocks`).
const ID_BLOCK: u64 = 1024;

/// Where fresh message ids come from.
enum MessageIds {
    /// SQLite (one process per database): a counter from the largest stored id at start.
    Counter(AtomicU64),
    /// PostgreSQL: blocks of [`ID_BLOCK`] ids reserved from the sequence `message_id_blocks`,
    /// so that workers sharing the database never hand out the same id.
    Blocks { pool: sqlx::PgPool, left: std::sync::Mutex<std::ops::Range<u64>> },
}

impl Store {
    /// Opens (creating if needed) the database, runs migrations and starts the writer task,
    /// which publishes every commit to `subscribers`.
    pub async fn open(
        config: &Config,
        metrics: crate::metrics::Metrics,
        subscribers: Subscribers,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let (pool, conn) = match &config.storage.database_url {
            Some(url) => open_postgres(url, config.storage.postgres_connections).await?,
            None => open_sqlite(config).await?,
        };
        let ids = match &pool {
            Pool::Sqlite(p) => {
                let max_id: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM messages").fetch_one(p).await?;
                MessageIds::Counter(AtomicU64::new(ServerMsgId::try_from(max_id)?.get() + 1))
            }
            Pool::Postgres(p) => MessageIds::Blocks { pool: p.clone(), left: std::sync::Mutex::new(0..0) },
        };
        let (tx, rx) = mpsc::channel(config.storage.writer_queue);
        let restart_wal = Arc::new(tokio::sync::Notify::new());
        let (priority_tx, priority) = mpsc::channel(1024);
        // On SQLite the writer runs on a thread of its own: it executes each commit there in one
        // call, blocking in its fsync while the connections' runtime goes on. On PostgreSQL too
        // with several workers (each statement is a round trip to the server, and on the workers
        // every answer waited behind the connections' tasks); with one worker (one core) it runs
        // on that runtime, where a thread of its own added a wake-up of that thread per answer.
        let own_thread = matches!(conn, WriterConn::Sqlite(_)) || config.runtime.workers() > 1;
        let (settle, settled) = if own_thread {
            let (commits, handed) = mpsc::unbounded_channel();
            (Settle::Handoff(commits), Some(tokio::spawn(super::writer::settle(handed, subscribers))))
        } else {
            (Settle::Inline(subscribers), None)
        };
        let writer = Writer {
            conn,
            pool: pool.clone(),
            rx,
            priority,
            max_batch: config.storage.max_batch,
            commit_interval: Duration::from_micros(config.storage.commit_interval_us),
            keep_history: config.storage.keep_history,
            settle,
            metrics,
            next_seq: Default::default(),
            restart_wal: restart_wal.clone(),
        };
        let handle = if own_thread {
            let (stopped_tx, stopped) = oneshot::channel::<()>();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(StoreError::WriterStart)?;
            std::thread::Builder::new()
                .name("parley-writer".into())
                .spawn(move || {
                    runtime.block_on(writer.run());
                    drop(stopped_tx);
                })
                .map_err(StoreError::WriterStart)?;
            tokio::spawn(async move {
                let _ = stopped.await;
                // The last commits' answers and events, settled.
                if let Some(settled) = settled {
                    let _ = settled.await;
                }
            })
        } else {
            tokio::spawn(writer.run())
        };
        if let Pool::Sqlite(pool) = &pool {
            tokio::spawn(checkpoints(pool.clone(), Duration::from_millis(config.storage.checkpoint_interval_ms), restart_wal));
        }
        Ok((Self { pool, writer: tx, priority: priority_tx, ids }, handle))
    }

    /// Stops accepting writes and waits until the writer (`writer`, from [`open`](Self::open))
    /// has committed what is queued and closed the database.
    pub async fn close(self, writer: tokio::task::JoinHandle<()>) {
        drop(self);
        if let Err(error) = writer.await {
            tracing::error!(%error, "the writer task failed");
        }
    }

    /// The leases of federation destinations, when workers may share this database
    /// (PostgreSQL): a connection of its own, on which each sender holds a session-level
    /// advisory lock per destination. A worker that dies loses its connection and with it its
    /// leases, so another worker takes its destinations over. `None` on SQLite (one process).
    pub async fn destination_leases(&self) -> Result<Option<DestinationLeases>, StoreError> {
        let Pool::Postgres(pool) = &self.pool else { return Ok(None) };
        let conn = pool.connect_options().connect().await?;
        Ok(Some(DestinationLeases { conn: tokio::sync::Mutex::new(conn) }))
    }

    /// The SQLite pool (unit tests, which run on SQLite).
    #[cfg(test)]
    pub(crate) fn sqlite_pool(&self) -> &SqlitePool {
        match &self.pool {
            Pool::Sqlite(pool) => pool,
            Pool::Postgres(_) => panic!("not SQLite"),
        }
    }

    /// The PostgreSQL pool, if that is the backend (unit tests).
    #[cfg(test)]
    pub(crate) fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.pool {
            Pool::Sqlite(_) => None,
            Pool::Postgres(pool) => Some(pool),
        }
    }

    /// A fresh, never reused message id (on PostgreSQL, never handed out by another worker
    /// either; a round trip once every [`ID_BLOCK`] ids).
    pub async fn next_message_id(&self) -> Result<ServerMsgId, StoreError> {
        let (pool, left) = match &self.ids {
            MessageIds::Counter(next) => return Ok(ServerMsgId::new(next.fetch_add(1, Ordering::Relaxed))),
            MessageIds::Blocks { pool, left } => (pool, left),
        };
        if let Some(id) = left.lock().unwrap_or_else(|e| e.into_inner()).next() {
            return Ok(ServerMsgId::new(id));
        }
        // Two tasks may both reserve a block here; the one that stores its range last wastes
        // the other's rest, and no id is handed out twice.
        let first: i64 = sqlx::query_scalar("SELECT nextval('message_id_blocks')").fetch_one(pool).await?;
        let first = ServerMsgId::try_from(first)?.get();
        *left.lock().unwrap_or_else(|e| e.into_inner()) = first + 1..first + ID_BLOCK;
        Ok(ServerMsgId::new(first))
    }

    /// Queues a write. Waits for room when the queue is full (backpressure).
    async fn queue(&self, op: WriteOp) -> Result<(), StoreError> {
        self.writer.send(op).await.map_err(|_| StoreError::Unavailable)
    }

    /// Queues a federation write ahead of the client writes: it joins the next commit, so a
    /// destination's answer (and the sender's next transaction) never waits behind a backlog
    /// of local sends.
    async fn queue_priority(&self, op: WriteOp) -> Result<(), StoreError> {
        self.priority.send(op).await.map_err(|_| StoreError::Unavailable)
    }

    async fn wait<T>(rx: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
        rx.await.unwrap_or(Err(StoreError::Unavailable))
    }

    /// Stores a message durably (or finds its earlier copy).
    pub async fn store_message(&self, message: NewMessage) -> Result<MessageOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue(WriteOp::Message(message, tx)).await?;
        Self::wait(rx).await
    }

    /// Queues a message and returns a receiver for the outcome, so a connection can pipeline.
    pub async fn queue_message(
        &self,
        message: NewMessage,
    ) -> Result<oneshot::Receiver<Result<MessageOutcome, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue(WriteOp::Message(message, tx)).await?;
        Ok(rx)
    }

    /// Records an acknowledgement and its delivered receipts.
    pub async fn ack(&self, device: DevicePk, seq: Seq, receipts: Effects) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue(WriteOp::Ack { device, seq, receipts, reply }).await?;
        Self::wait(rx).await
    }

    /// Queues an acknowledgement (as [`Store::ack`]) without waiting for its commit: a
    /// connection acknowledges as it reads, and what a failed commit did not record is
    /// delivered again (the writer logs the failure). When the writer's queue is full, the
    /// acknowledgement waits for room in a task of its own.
    pub fn ack_later(self: &Arc<Self>, device: DevicePk, seq: Seq, receipts: Effects) {
        let (reply, _) = oneshot::channel();
        match self.writer.try_send(WriteOp::Ack { device, seq, receipts, reply }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                let store = self.clone();
                tokio::spawn(async move {
                    if store.queue(op).await.is_err() {
                        tracing::warn!("ack not recorded: the store is closing; the events will be redelivered");
                    }
                });
            }
        }
    }

    /// Appends events to inboxes and items to outbound queues, in one commit.
    pub async fn append(&self, effects: Effects) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue(WriteOp::Events(effects, reply)).await?;
        Self::wait(rx).await
    }

    /// Applies an inbound transaction unless `(origin, txn_id)` was applied before; `true` if new.
    /// Within it, a message whose `(origin, id)` was applied before adds nothing.
    pub async fn apply_inbound(&self, origin: &ServerName, txn_id: &str, items: Vec<InboundItem>) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue_priority(WriteOp::Inbound { origin: origin.as_str().to_owned(), txn_id: txn_id.to_owned(), items, reply })
            .await?;
        Self::wait(rx).await
    }

    /// Records the transaction about to be sent to `destination`, and (in the same commit) that
    /// everything up to `done_up_to` was accepted.
    pub async fn txn_inflight(
        &self,
        destination: &ServerName,
        txn_id: &str,
        last_seq: i64,
        done_up_to: Option<i64>,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = WriteOp::TxnInflight {
            destination: destination.as_str().to_owned(),
            txn_id: txn_id.to_owned(),
            last_seq,
            done_up_to,
            reply,
        };
        self.queue_priority(op).await?;
        Self::wait(rx).await
    }

    /// `destination` accepted everything up to `last_seq`.
    pub async fn txn_done(&self, destination: &ServerName, last_seq: i64) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue_priority(WriteOp::TxnDone { destination: destination.as_str().to_owned(), last_seq, reply }).await?;
        Self::wait(rx).await
    }

    /// The oldest queued items for `destination` (seq, payload) after `after`, at most `limit`,
    /// up to `up_to` when given.
    pub async fn outbound_batch(
        &self,
        destination: &ServerName,
        limit: usize,
        after: Option<i64>,
        up_to: Option<i64>,
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows = sqlx::query(
                "SELECT seq, payload FROM fed_outbound WHERE destination = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
            )
            .bind(destination.as_str())
            .bind(after.unwrap_or(0))
            .bind(up_to.unwrap_or(i64::MAX))
            .bind(limit as i64)
            .fetch_all(pool)
            .await?;
            rows.into_iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).collect()
        })
    }

    /// The transaction in flight to `destination`, if one was being sent.
    pub async fn inflight(&self, destination: &ServerName) -> Result<Option<(String, i64)>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let row = sqlx::query("SELECT txn_id, last_seq FROM fed_inflight WHERE destination = $1")
                .bind(destination.as_str())
                .fetch_optional(pool)
                .await?;
            row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).transpose()
        })
    }

    /// Every destination with queued items (to resume sending after a restart).
    pub async fn outbound_destinations(&self) -> Result<Vec<ServerName>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let names: Vec<String> = sqlx::query_scalar("SELECT DISTINCT destination FROM fed_outbound").fetch_all(pool).await?;
            names.iter().map(|name| parse_column(name, ServerName::parse)).collect()
        })
    }

    /// Forgets inbound transaction ids and message ids received before `before` (ms).
    pub async fn prune_inbound(&self, before: Timestamp) -> Result<u64, StoreError> {
        on_pool!(&self.pool, |pool| {
            let before = i64::try_from(before)?;
            let done = sqlx::query("DELETE FROM fed_inbound_txns WHERE received_ts < $1").bind(before).execute(pool).await?;
            let mut pruned = done.rows_affected();
            // Message ids pile up fast under load: delete them in slices, so the database's write
            // lock (which the writer needs for every commit) is never held for long.
            loop {
                let done = sqlx::query(
                    "DELETE FROM fed_inbound_messages WHERE (origin, msg_id) IN \
                 (SELECT origin, msg_id FROM fed_inbound_messages WHERE received_ts < $1 LIMIT $2)",
                )
                .bind(before)
                .bind(PRUNE_SLICE as i64)
                .execute(pool)
                .await?;
                pruned += done.rows_affected();
                if done.rows_affected() < PRUNE_SLICE {
                    return Ok(pruned);
                }
            }
        })
    }

    /// The cached devices of a remote user (JSON of `UserDevices`).
    pub async fn remote_devices(&self, user_id: &UserId) -> Result<Option<Vec<u8>>, StoreError> {
        on_pool!(&self.pool, |pool| {
            Ok(sqlx::query_scalar("SELECT json FROM remote_devices WHERE user_id = $1")
                .bind(user_id.as_str())
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Caches the devices of a remote user.
    pub async fn put_remote_devices(&self, user_id: &UserId, json: &[u8]) -> Result<(), StoreError> {
        self.bookkeeping(Bookkeeping::RemoteDevices { user: user_id.as_str().to_owned(), json: Some(json.to_vec()) }).await
    }

    /// Forgets the cached devices of a remote user.
    pub async fn forget_remote_devices(&self, user_id: &UserId) -> Result<(), StoreError> {
        self.bookkeeping(Bookkeeping::RemoteDevices { user: user_id.as_str().to_owned(), json: None }).await
    }

    /// Remembers that `server` fetched the devices of local user `user`.
    pub async fn add_device_list_watcher(&self, user: UserPk, server: &ServerName) -> Result<(), StoreError> {
        self.bookkeeping(Bookkeeping::Watcher { user, server: server.as_str().to_owned() }).await
    }

    async fn bookkeeping(&self, write: Bookkeeping) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue_priority(WriteOp::Bookkeeping(write, reply)).await?;
        Self::wait(rx).await
    }

    /// Servers that fetched the devices of local user `user`.
    pub async fn device_list_watchers(&self, user: UserPk) -> Result<Vec<ServerName>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let names: Vec<String> = sqlx::query_scalar("SELECT server FROM device_list_watchers WHERE user_id = $1")
                .bind(user)
                .fetch_all(pool)
                .await?;
            names.iter().map(|name| parse_column(name, ServerName::parse)).collect()
        })
    }

    /// Removes a device, its token and its inbox.
    pub async fn delete_device(&self, device: DevicePk) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue(WriteOp::DeleteDevice(device, reply)).await?;
        Self::wait(rx).await
    }

    /// Records when a user and device were last online (batched with everything else).
    pub async fn record_last_seen(&self, user: UserPk, device: DevicePk, ts: Timestamp) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.queue(WriteOp::LastSeen { user, device, ts, reply }).await?;
        Self::wait(rx).await
    }

    /// Inbox entries of `device` after `after`, oldest first.
    pub async fn inbox_after(
        &self,
        device: DevicePk,
        after: Seq,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<InboxRow>, StoreError> {
        on_pool!(&self.pool, |pool| {
            use futures_util::TryStreamExt as _;
            let mut rows = sqlx::query(
                "SELECT seq, sender, msg_id, payload FROM inbox WHERE device = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(device)
            .bind(i64::try_from(after)?)
            .bind(limit as i64)
            .fetch(pool);
            let mut page = Vec::new();
            let mut bytes = 0;
            while bytes < max_bytes {
                let Some(row) = rows.try_next().await? else { break };
                let sender: Option<String> = row.try_get(1)?;
                let msg_id: Option<i64> = row.try_get(2)?;
                let payload: Vec<u8> = row.try_get(3)?;
                bytes += payload.len();
                page.push(InboxRow {
                    seq: Seq::try_from(row.try_get::<i64, _>(0)?)?,
                    origin: sender.zip(msg_id.map(ServerMsgId::try_from).transpose()?).map(|(s, id)| (Arc::from(s), id)),
                    payload: Bytes::from(payload),
                    committed_at: None,
                });
            }
            Ok(page)
        })
    }

    /// Of `ids`, those of messages that local user `sender` sent to `recipient` (a local or
    /// remote user id): what a receipt by `recipient` for `sender`'s messages may name. In the
    /// order given, each once; one query whatever the number of ids.
    pub async fn sent_to(&self, sender: UserPk, recipient: &UserId, ids: &[ServerMsgId]) -> Result<Vec<ServerMsgId>, StoreError> {
        Ok(self.message_routes(ids).await?.sent(ids, sender, recipient))
    }

    /// Who sent each of `ids` that is a message of a local sender (the user), and to whom. One
    /// query, also for a whole inbound transaction's receipts.
    pub async fn message_routes(&self, ids: &[ServerMsgId]) -> Result<MessageRoutes, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows = sqlx::query(if self.pool.is_postgres() {
                "SELECT id, sender_user, recipient FROM messages \
             WHERE id = ANY(CAST($1 AS BIGINT[])) AND sender_user IS NOT NULL"
            } else {
                "SELECT id, sender_user, recipient FROM messages \
             WHERE id IN (SELECT value FROM json_each($1)) AND sender_user IS NOT NULL"
            })
            .bind(id_list(self.pool.is_postgres(), ids))
            .fetch_all(pool)
            .await?;
            let routes = rows
                .into_iter()
                .map(|row| Ok((ServerMsgId::try_from(row.try_get::<i64, _>(0)?)?, (row.try_get(1)?, row.try_get(2)?))))
                .collect::<Result<_, StoreError>>()?;
            Ok(MessageRoutes(routes))
        })
    }

    /// Of `ids`, those of messages that remote user `sender` sent to local user `recipient`:
    /// what `recipient`'s read marker for `sender`'s messages may name. In the order given,
    /// each once; one query whatever the number of ids.
    pub async fn received_from(
        &self,
        recipient: UserPk,
        sender: &UserId,
        ids: &[ServerMsgId],
    ) -> Result<Vec<ServerMsgId>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let found: Vec<i64> = sqlx::query_scalar(if self.pool.is_postgres() {
                "SELECT msg_id FROM remote_messages WHERE recipient = $1 AND sender = $2 \
             AND msg_id = ANY(CAST($3 AS BIGINT[]))"
            } else {
                "SELECT msg_id FROM remote_messages WHERE recipient = $1 AND sender = $2 \
             AND msg_id IN (SELECT value FROM json_each($3))"
            })
            .bind(recipient)
            .bind(sender.as_str())
            .bind(id_list(self.pool.is_postgres(), ids))
            .fetch_all(pool)
            .await?;
            in_request_order(ids, found)
        })
    }

    /// The device's acknowledged position.
    pub async fn acked_seq(&self, device: DevicePk) -> Result<Seq, StoreError> {
        on_pool!(&self.pool, |pool| {
            let seq: Option<i64> =
                sqlx::query_scalar("SELECT acked_seq FROM devices WHERE id = $1").bind(device).fetch_optional(pool).await?;
            Ok(Seq::try_from(seq.unwrap_or(0))?)
        })
    }

    // ---- accounts -------------------------------------------------------------------------

    /// Creates a user; `Conflict` when the localpart is taken.
    pub async fn create_user(&self, localpart: &str, password_hash: &str, is_admin: bool) -> Result<UserPk, StoreError> {
        on_pool!(&self.pool, |pool| {
            let result = sqlx::query_scalar(
                "INSERT INTO users (localpart, password_hash, created_ts, is_admin) VALUES ($1, $2, $3, $4) RETURNING id",
            )
            .bind(localpart)
            .bind(password_hash)
            .bind(stored_now()?)
            .bind(i64::from(is_admin))
            .fetch_one(pool)
            .await;
            match result {
                Ok(id) => Ok(id),
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Creates a user and its first device atomically.
    pub async fn create_user_with_device(
        &self,
        localpart: &str,
        password_hash: &str,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &[u8],
        registration_token: Option<&[u8]>,
    ) -> Result<(UserPk, DevicePk), StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let mut tx = pool.begin_write().await?;
            if let Some(token_hash) = registration_token {
                let now = stored_now()?;
                let used = sqlx::query(
                    "UPDATE registration_tokens SET uses_left = uses_left - 1 WHERE token_hash = $1 \
                 AND (uses_left IS NULL OR uses_left > 0) AND (expires_ts IS NULL OR expires_ts > $2)",
                )
                .bind(token_hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if used.rows_affected() != 1 {
                    return Err(StoreError::TokenRejected);
                }
            }
            let user = match sqlx::query_scalar(
                "INSERT INTO users (localpart, password_hash, created_ts) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(localpart)
            .bind(password_hash)
            .bind(stored_now()?)
            .fetch_one(&mut *tx)
            .await
            {
                Ok(id) => id,
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(StoreError::Conflict),
                Err(e) => return Err(e.into()),
            };
            let device = fns::insert_device(&mut tx, user, device_id, display_name, token_hash).await?;
            tx.commit().await?;
            Ok((user, device))
        })
    }

    /// Adds a device to a user unless it already has `max_devices`.
    pub async fn create_device(
        &self,
        user: UserPk,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &[u8],
        max_devices: usize,
    ) -> Result<DevicePk, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let mut tx = pool.begin_write().await?;
            let count: i64 =
                sqlx::query_scalar("SELECT count(*) FROM devices WHERE user_id = $1").bind(user).fetch_one(&mut *tx).await?;
            if count as usize >= max_devices {
                return Err(StoreError::TooMany);
            }
            let device = fns::insert_device(&mut tx, user, device_id, display_name, token_hash).await?;
            tx.commit().await?;
            Ok(device)
        })
    }

    /// The user with this localpart.
    pub async fn user_by_localpart(&self, localpart: &str) -> Result<Option<UserRow>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let row = sqlx::query(
                "SELECT id, localpart, password_hash, last_seen_visibility, last_seen_ts FROM users WHERE localpart = $1",
            )
            .bind(localpart)
            .fetch_optional(pool)
            .await?;
            row.map(|row| {
                Ok(UserRow {
                    pk: row.try_get(0)?,
                    localpart: row.try_get(1)?,
                    password_hash: row.try_get(2)?,
                    visibility: row.try_get(3)?,
                    last_seen_ts: row.try_get::<Option<i64>, _>(4)?.map(Timestamp::try_from).transpose()?,
                })
            })
            .transpose()
        })
    }

    /// The device an access token hash belongs to.
    pub async fn auth_by_token(&self, token_hash: &[u8]) -> Result<Option<AuthRow>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let row = sqlx::query(
            "SELECT u.id, u.localpart, d.id, d.device_id FROM devices d JOIN users u ON u.id = d.user_id WHERE d.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(pool)
        .await?;
            row.map(|row| {
                Ok(AuthRow {
                    user_pk: row.try_get(0)?,
                    localpart: row.try_get(1)?,
                    device_pk: row.try_get(2)?,
                    device_id: row.try_get(3)?,
                })
            })
            .transpose()
        })
    }

    /// A user's devices, oldest first.
    pub async fn devices_of(&self, user: UserPk) -> Result<Vec<DeviceRow>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows = sqlx::query(
                "SELECT id, device_id, display_name, created_ts, last_seen_ts FROM devices WHERE user_id = $1 ORDER BY id",
            )
            .bind(user)
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|row| {
                    Ok(DeviceRow {
                        pk: row.try_get(0)?,
                        device_id: row.try_get(1)?,
                        display_name: row.try_get(2)?,
                        created_ts: Timestamp::try_from(row.try_get::<i64, _>(3)?)?,
                        last_seen_ts: row.try_get::<Option<i64>, _>(4)?.map(Timestamp::try_from).transpose()?,
                    })
                })
                .collect()
        })
    }

    /// Creates a registration token (stored hashed).
    pub async fn create_registration_token(
        &self,
        token_hash: &[u8],
        uses: Option<u32>,
        expires_ts: Option<Timestamp>,
    ) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let expires_ts = expires_ts.map(i64::try_from).transpose()?;
            sqlx::query(
                "INSERT INTO registration_tokens (token_hash, uses_left, expires_ts, created_ts) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(uses.map(i64::from))
            .bind(expires_ts)
            .bind(stored_now()?)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    // ---- presence -------------------------------------------------------------------------

    /// Sets a user's presence visibility.
    pub async fn set_visibility(&self, user: UserPk, visibility: &str) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            sqlx::query("UPDATE users SET last_seen_visibility = $1 WHERE id = $2")
                .bind(visibility)
                .bind(user)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Adds contacts (presence subscriptions).
    pub async fn add_contacts(&self, owner: &UserId, contacts: &[UserId]) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            for contact in contacts {
                sqlx::query("INSERT INTO contacts (owner, contact) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(owner.as_str())
                    .bind(contact.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Replaces the contacts on server `server` of a remote `owner` (a remote subscription).
    pub async fn replace_remote_contacts(
        &self,
        owner: &UserId,
        server: &ServerName,
        contacts: &[UserId],
    ) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            let current: Vec<String> = sqlx::query_scalar("SELECT contact FROM contacts WHERE owner = $1")
                .bind(owner.as_str())
                .fetch_all(&mut *tx)
                .await?;
            for contact in current {
                if parse_column(&contact, UserId::parse)?.server() == server.as_str() {
                    sqlx::query("DELETE FROM contacts WHERE owner = $1 AND contact = $2")
                        .bind(owner.as_str())
                        .bind(&contact)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            for contact in contacts {
                sqlx::query("INSERT INTO contacts (owner, contact) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(owner.as_str())
                    .bind(contact.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The users `owner` subscribed to.
    pub async fn contacts_of(&self, owner: &UserId) -> Result<Vec<UserId>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let contacts: Vec<String> = sqlx::query_scalar("SELECT contact FROM contacts WHERE owner = $1 ORDER BY contact")
                .bind(owner.as_str())
                .fetch_all(pool)
                .await?;
            contacts.iter().map(|contact| parse_column(contact, UserId::parse)).collect()
        })
    }

    /// Who subscribed to `contact`, each with whether `contact` has them as a contact too.
    pub async fn subscribers_of(&self, contact: &UserId) -> Result<Vec<(UserId, bool)>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows = sqlx::query(
            "SELECT c.owner, EXISTS (SELECT 1 FROM contacts r WHERE r.owner = c.contact AND r.contact = c.owner)              FROM contacts c WHERE c.contact = $1",
        )
        .bind(contact.as_str())
        .fetch_all(pool)
        .await?;
            rows.into_iter().map(|row| Ok((parse_column(row.try_get(0)?, UserId::parse)?, row.try_get(1)?))).collect()
        })
    }

    /// Whether `owner` has `contact` as a contact.
    pub async fn has_contact(&self, owner: &UserId, contact: &UserId) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |pool| {
            Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM contacts WHERE owner = $1 AND contact = $2)")
                .bind(owner.as_str())
                .bind(contact.as_str())
                .fetch_one(pool)
                .await?)
        })
    }
}

/// Key material uploaded by a device (each part optional).
#[derive(Debug, Default)]
pub struct KeyUpload {
    /// `DeviceKeys` JSON; may be set once.
    pub device_keys: Option<Vec<u8>>,
    /// `SignedPrekey` JSON; replaces the current one.
    pub signed_prekey: Option<Vec<u8>>,
    /// Last-resort `SignedPrekey` JSON; replaces the current one.
    pub last_resort_prekey: Option<Vec<u8>>,
    /// One-time prekeys: (key id, public key).
    pub one_time_prekeys: Vec<(u32, Vec<u8>)>,
}

/// What a claim took from the directory for one device.
#[derive(Debug)]
pub struct ClaimedKeys {
    /// `DeviceKeys` JSON.
    pub device_keys: Vec<u8>,
    /// `SignedPrekey` JSON.
    pub signed_prekey: Vec<u8>,
    /// The one-time prekey handed out (now deleted), if any was left.
    pub one_time_prekey: Option<(u32, Vec<u8>)>,
    /// The last-resort prekey JSON, when no one-time prekey was left.
    pub last_resort_prekey: Option<Vec<u8>>,
    /// One-time prekeys left after this claim.
    pub remaining: u32,
}

impl Store {
    /// Stores uploaded keys; `Conflict` if different device keys were stored before.
    /// Returns the number of unclaimed one-time prekeys.
    pub async fn upload_keys(&self, device: DevicePk, upload: KeyUpload) -> Result<u32, StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            if let Some(json) = &upload.device_keys {
                let existing: Option<Vec<u8>> = sqlx::query_scalar("SELECT json FROM device_keys WHERE device = $1")
                    .bind(device)
                    .fetch_optional(&mut *tx)
                    .await?;
                match existing {
                    Some(existing) if &existing != json => return Err(StoreError::Conflict),
                    Some(_) => {}
                    None => {
                        sqlx::query("INSERT INTO device_keys (device, json) VALUES ($1, $2)")
                            .bind(device)
                            .bind(json)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            if let Some(json) = &upload.signed_prekey {
                sqlx::query("INSERT INTO signed_prekeys (device, json) VALUES ($1, $2) ON CONFLICT (device) DO UPDATE SET json = excluded.json")
                .bind(device)
                .bind(json)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(json) = &upload.last_resort_prekey {
                sqlx::query(
                "INSERT INTO last_resort_prekeys (device, json) VALUES ($1, $2) ON CONFLICT (device) DO UPDATE SET json = excluded.json",
            )
                .bind(device)
                .bind(json)
                .execute(&mut *tx)
                .await?;
            }
            for (key_id, public_key) in &upload.one_time_prekeys {
                // Re-uploading a key id keeps the first copy (a retried upload is harmless).
                sqlx::query(
                    "INSERT INTO one_time_prekeys (device, key_id, public_key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(device)
                .bind(i64::from(*key_id))
                .bind(public_key)
                .execute(&mut *tx)
                .await?;
            }
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM one_time_prekeys WHERE device = $1")
                .bind(device)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(count as u32)
        })
    }

    /// The device keys a device uploaded (JSON), if any.
    pub async fn stored_device_keys(&self, device: DevicePk) -> Result<Option<Vec<u8>>, StoreError> {
        on_pool!(&self.pool, |pool| {
            Ok(sqlx::query_scalar("SELECT json FROM device_keys WHERE device = $1").bind(device).fetch_optional(pool).await?)
        })
    }

    /// Unclaimed one-time prekeys of a device, and whether it has uploaded device keys.
    pub async fn prekey_count(&self, device: DevicePk) -> Result<(bool, u32), StoreError> {
        on_pool!(&self.pool, |pool| {
            let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM device_keys WHERE device = $1), (SELECT count(*) FROM one_time_prekeys WHERE device = $1)",
        )
        .bind(device)
        .fetch_one(pool)
        .await?;
            Ok((row.try_get(0)?, row.try_get::<i64, _>(1)? as u32))
        })
    }

    /// Claims a bundle for `device`: its keys and, when `one_time`, one one-time prekey, which
    /// is deleted in the same (write-locked) transaction, so no two claimers ever get the same
    /// one. Without a one-time prekey (none left, or not `one_time`) the bundle carries the
    /// last-resort prekey. `None` when the device has not uploaded keys.
    pub async fn claim_keys(&self, device: DevicePk, one_time: bool) -> Result<Option<ClaimedKeys>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            let row = sqlx::query(
                "SELECT k.json, s.json, l.json FROM device_keys k JOIN signed_prekeys s ON s.device = k.device \
             LEFT JOIN last_resort_prekeys l ON l.device = k.device WHERE k.device = $1",
            )
            .bind(device)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let taken = if one_time {
                sqlx::query(
                    "DELETE FROM one_time_prekeys WHERE device = $1 \
                 AND key_id = (SELECT min(key_id) FROM one_time_prekeys WHERE device = $1) RETURNING key_id, public_key",
                )
                .bind(device)
                .fetch_optional(&mut *tx)
                .await?
            } else {
                None
            };
            let one_time_prekey = match taken {
                Some(r) => Some((r.try_get::<i64, _>(0)? as u32, r.try_get::<Vec<u8>, _>(1)?)),
                None => None,
            };
            let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM one_time_prekeys WHERE device = $1")
                .bind(device)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            let last_resort: Option<Vec<u8>> = row.try_get(2)?;
            Ok(Some(ClaimedKeys {
                device_keys: row.try_get(0)?,
                signed_prekey: row.try_get(1)?,
                last_resort_prekey: if one_time_prekey.is_none() { last_resort } else { None },
                one_time_prekey,
                remaining: remaining as u32,
            }))
        })
    }

    /// Stores a user's signed device list if its version is newer; `Conflict` otherwise.
    pub async fn put_device_list(&self, user: UserPk, version: u64, json: &[u8]) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let version = i64::try_from(version).map_err(|_| StoreError::Conflict)?;
            let done = sqlx::query(
            "INSERT INTO device_lists (user_id, version, json) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, json = excluded.json WHERE excluded.version > device_lists.version",
        )
        .bind(user)
        .bind(version)
        .bind(json)
        .execute(pool)
        .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::Conflict);
            }
            Ok(())
        })
    }

    /// A user's latest signed device list (JSON).
    pub async fn device_list(&self, user: UserPk) -> Result<Option<Vec<u8>>, StoreError> {
        on_pool!(&self.pool, |pool| {
            Ok(sqlx::query_scalar("SELECT json FROM device_lists WHERE user_id = $1").bind(user).fetch_optional(pool).await?)
        })
    }
}

/// `ids` as one bound parameter, so one cached statement serves any number of ids: a JSON
/// array for SQLite's `json_each`, an array literal for PostgreSQL's `CAST(… AS BIGINT[])`.
/// Ids beyond the databases' integers cannot name a stored message and are left out.
fn id_list(postgres: bool, ids: &[ServerMsgId]) -> String {
    let ids: Vec<String> = ids.iter().filter_map(|id| i64::try_from(*id).ok()).map(|id| id.to_string()).collect();
    if postgres {
        format!("{{{}}}", ids.join(","))
    } else {
        format!("[{}]", ids.join(","))
    }
}

/// Senders and recipients of messages of local senders, by message id
/// ([`Store::message_routes`]).
#[derive(Debug, Default)]
pub struct MessageRoutes(std::collections::HashMap<ServerMsgId, (UserPk, String)>);

impl MessageRoutes {
    /// Of `ids`, those of messages `sender` sent to `recipient`: in the order given, each once.
    pub fn sent(&self, ids: &[ServerMsgId], sender: UserPk, recipient: &UserId) -> Vec<ServerMsgId> {
        let mut seen = std::collections::HashSet::new();
        ids.iter()
            .copied()
            .filter(|id| self.0.get(id).is_some_and(|(from, to)| *from == sender && to == recipient.as_str()) && seen.insert(*id))
            .collect()
    }
}

/// A column written from a typed value, parsed back; a value that does not parse means the
/// database was changed by something else.
fn parse_column<T, E: std::fmt::Display>(value: &str, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<T, StoreError> {
    parse(value).map_err(|error| StoreError::Corrupt(format!("{value:?}: {error}")))
}

/// The `requested` ids that were `found`, in the requested order, without repeats.
fn in_request_order(requested: &[ServerMsgId], found: Vec<i64>) -> Result<Vec<ServerMsgId>, StoreError> {
    let mut found: std::collections::HashSet<ServerMsgId> =
        found.into_iter().map(ServerMsgId::try_from).collect::<Result<_, _>>()?;
    Ok(requested.iter().copied().filter(|id| found.remove(id)).collect())
}

/// How long a connection waits for a lock another holds.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of WAL that SQLite keeps after a checkpoint truncates it (both connection kinds).
pub(super) const JOURNAL_SIZE_LIMIT: u64 = 64 * 1024 * 1024;

/// WAL frames past which the writer is asked to start the WAL over (16 MiB of 4 KiB pages).
const WAL_RESTART_FRAMES: i64 = 4096;

/// Copies the WAL back into the database file every `interval` (`storage.checkpoint_interval_ms`,
/// 25 ms by default), on a pool connection, so
/// the writer's commits never pay for copying. PASSIVE never blocks the writer, but SQLite
/// starts the WAL over only when a write begins after a checkpoint that copied everything,
/// which under steady writes (one every few ms) almost never happens: the WAL would grow to
/// the journal size limit, be truncated (a 100+ ms `ftruncate`) and grow again, each growth
/// making the commit's fsync write metadata too (fsyncs of 200–500 ms were seen). So once the
/// WAL is past [`WAL_RESTART_FRAMES`] and copied, `restart_wal` asks the writer to finish the
/// job between two commits, or at once when it is idle (a RESTART checkpoint: the few frames
/// left, then the next commit writes the WAL from its start, over blocks already allocated).
async fn checkpoints(pool: SqlitePool, interval: Duration, restart_wal: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&pool).await {
            Ok((_, frames, _)) if frames > WAL_RESTART_FRAMES => {
                restart_wal.notify_one();
            }
            Ok(_) => {}
            Err(error) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(%error, "WAL checkpoint failed");
            }
        }
    }
}

/// Creates the database file (empty, which SQLite takes as a new database) readable and
/// writable by its owner only, before SQLite would create it with the umask's mode (0644
/// usually): it holds password hashes and the federation queue. SQLite gives the `-wal` and
/// `-shm` files the database file's mode; existing ones (from an older version) are
/// tightened too.
fn make_private(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            let mode = match std::fs::metadata(&file) {
                Ok(meta) => meta.permissions().mode(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The SQLite file in the data directory (created if missing, private to its owner, WAL),
/// migrated: the pool and the writer's connection.
async fn open_sqlite(config: &Config) -> Result<(Pool, WriterConn), StoreError> {
    make_private(&config.database_path())?;
    let options = SqliteConnectOptions::new()
        .filename(config.database_path())
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match config.storage.synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(BUSY_TIMEOUT)
        // Checkpoints run in a background task (below), never inside a hot-path commit.
        .pragma("wal_autocheckpoint", "0")
        .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT.to_string())
        // Statement journals (a multi-row statement's undo, needed to roll back just that
        // statement) stay in memory: on disk they were 11 % of the writer's time.
        .pragma("temp_store", "memory")
        .statement_cache_capacity(256)
        .disable_statement_logging();
    let pool = SqlitePoolOptions::new().max_connections(4).min_connections(1).connect_with(options).await?;
    refuse_newer_schema(&pool).await?;
    migrator().run(&pool).await?;
    let conn = super::writer::SqliteConnection::open(&config.database_path(), config.storage.synchronous, BUSY_TIMEOUT)?;
    Ok((Pool::Sqlite(pool), WriterConn::Sqlite(conn)))
}

/// The PostgreSQL database at `url`, migrated (`server/migrations/postgres/`): a pool of
/// `connections` and the writer's own connection.
async fn open_postgres(url: &str, connections: u32) -> Result<(Pool, WriterConn), StoreError> {
    let options = url.parse::<PgConnectOptions>()?.statement_cache_capacity(256).disable_statement_logging();
    let pool = PgPoolOptions::new().max_connections(connections.max(1)).min_connections(1).connect_with(options.clone()).await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&pool).await?;
    if exists {
        let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&pool).await?;
        let known = super::migrate::POSTGRES_VERSION;
        if let Some(found) = found.filter(|found| *found > known) {
            return Err(StoreError::SchemaTooNew { found, known });
        }
    }
    super::migrate::postgres_migrator().run(&pool).await?;
    let conn = options.connect().await?;
    Ok((Pool::Postgres(pool), WriterConn::Postgres(conn)))
}

/// Refuses a database a newer parleyd migrated (sqlx would only say a migration is missing).
async fn refuse_newer_schema(pool: &SqlitePool) -> Result<(), StoreError> {
    let exists: bool =
        sqlx::query_scalar("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'")
            .fetch_one(pool)
            .await?;
    if !exists {
        return Ok(());
    }
    let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(pool).await?;
    let known = MIGRATIONS.last().map_or(0, |(version, _, _)| *version);
    match found {
        Some(found) if found > known => Err(StoreError::SchemaTooNew { found, known }),
        _ => Ok(()),
    }
}

fn migrator() -> Migrator {
    let migrations: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(*version, Cow::Borrowed(*description), MigrationType::Simple, Cow::Borrowed(*sql), false)
        })
        .collect();
    Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false }
}

dual! {
pub(super) async fn insert_device(
    tx: &mut Conn,
    user: UserPk,
    device_id: &str,
    display_name: Option<&str>,
    token_hash: &[u8],
) -> Result<DevicePk, StoreError> {
    let result = sqlx::query_scalar(
        "INSERT INTO devices (user_id, device_id, display_name, token_hash, created_ts) VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(user)
    .bind(device_id)
    .bind(display_name)
    .bind(token_hash)
    .bind(stored_now()?)
    .fetch_one(&mut *tx)
    .await;
    let id = match result {
        Ok(id) => id,
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(StoreError::Conflict),
        Err(e) => return Err(e.into()),
    };
    if PG {
        // Its inbox head, which the writers' batches lock and number its inbox from
        // (PostgreSQL migration 0003).
        sqlx::query("INSERT INTO inbox_heads (device, last_seq) VALUES ($1, 0)").bind(id).execute(&mut *tx).await?;
    }
    Ok(id)
}}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::{self, open, open_with};
    use uuid::Uuid;

    fn message(origin: &str, id: u64) -> InboundItem {
        InboundItem { message: Some((Arc::from(origin), ServerMsgId::new(id))), effects: Effects::default() }
    }

    async fn remembered(store: &Store) -> Vec<(String, i64)> {
        on_pool!(&store.pool, |pool| sqlx::query_as("SELECT origin, msg_id FROM fed_inbound_messages ORDER BY origin, msg_id")
            .fetch_all(pool)
            .await
            .expect("query"))
    }

    #[tokio::test]
    async fn inbound_message_ids_are_remembered_once_and_pruned_with_the_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        let a = ServerName::parse("a.test").unwrap();
        assert!(store.apply_inbound(&a, "t1", vec![message("a.test", 7), message("a.test", 7)]).await.unwrap());
        assert!(store.apply_inbound(&a, "t2", vec![message("a.test", 7), message("c.test", 7)]).await.unwrap());
        assert!(!store.apply_inbound(&a, "t2", vec![message("a.test", 8)]).await.unwrap(), "a repeated txn_id");
        assert_eq!(remembered(&store).await, [("a.test".to_owned(), 7), ("c.test".to_owned(), 7)]);
        // Nothing is older than the start of the test; everything is older than a moment from now.
        let now = Timestamp::now();
        assert_eq!(store.prune_inbound(now.saturating_sub(Duration::from_secs(60))).await.unwrap(), 0);
        assert_eq!(
            store.prune_inbound(now.saturating_add(Duration::from_millis(1))).await.unwrap(),
            4,
            "2 transactions and 2 message ids"
        );
        assert_eq!(remembered(&store).await, []);
    }

    #[tokio::test]
    async fn with_a_commit_interval_writes_queued_under_load_wait_for_the_next_commit_and_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(open_with(dir.path(), |config| config.storage.commit_interval_us = 200_000).await);
        let a = ServerName::parse("a.test").unwrap();
        assert!(store.apply_inbound(&a, "t0", vec![message("a.test", 1)]).await.unwrap());
        // Within the interval: these wait for the next commit, together.
        let writes = (2..6).map(|i| {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move { store.apply_inbound(&a, &format!("t{i}"), vec![message("a.test", i)]).await })
        });
        for write in writes.collect::<Vec<_>>() {
            let applied = tokio::time::timeout(Duration::from_secs(10), write).await.expect("answered").expect("task");
            assert!(applied.unwrap(), "a new transaction");
        }
        assert!(!store.apply_inbound(&a, "t3", vec![message("a.test", 9)]).await.unwrap(), "committed: t3 is known");
        assert_eq!(remembered(&store).await.len(), 5);
    }

    #[tokio::test]
    async fn a_remote_subscription_replaces_only_the_contacts_on_the_named_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        let user = |s: &str| UserId::parse(s).unwrap();
        let owner = user("@olga:remote.test");
        let here = ServerName::parse("a.test").unwrap();
        store.add_contacts(&owner, &[user("@ann:a.test"), user("@bob:a.test:8448"), user("@cid:b.a.test")]).await.unwrap();
        store.replace_remote_contacts(&owner, &here, &[user("@dan:a.test")]).await.unwrap();
        assert_eq!(
            store.contacts_of(&owner).await.unwrap(),
            [user("@bob:a.test:8448"), user("@cid:b.a.test"), user("@dan:a.test")],
            "a.test:8448 and b.a.test are other servers"
        );
        assert!(store.has_contact(&owner, &user("@dan:a.test")).await.unwrap());
        assert_eq!(store.subscribers_of(&user("@dan:a.test")).await.unwrap(), [(owner.clone(), false)]);
    }

    #[tokio::test]
    async fn a_stored_name_that_does_not_parse_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        on_pool!(&store.pool, |pool| sqlx::query("INSERT INTO fed_outbound (destination, payload) VALUES ('not a name', $1)")
            .bind(b"{}".to_vec())
            .execute(pool)
            .await
            .expect("insert")
            .rows_affected());
        assert!(matches!(store.outbound_destinations().await, Err(StoreError::Corrupt(_))));
    }

    #[tokio::test]
    async fn an_ack_beyond_stored_integers_is_clamped_not_a_failed_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        let user = store.create_user("alice", "hash", false).await.unwrap();
        let device = store.create_device(user, "DEV", None, b"token", 10).await.unwrap();
        store.ack(device, Seq::new(u64::MAX), Effects::default()).await.unwrap();
        assert_eq!(store.acked_seq(device).await.unwrap(), Seq::ZERO, "clamped to the empty inbox");
        // A position beyond SQLite's integers is refused, never read as a wrapped one.
        assert!(matches!(store.inbox_after(device, Seq::new(u64::MAX), 10, usize::MAX).await, Err(StoreError::OutOfRange(_))));
    }

    #[tokio::test]
    async fn events_committed_with_an_acknowledgement_of_everything_follow_it() {
        // After a commit, writes queued within the interval share the next commit: here an
        // acknowledgement of the whole inbox and a new event for the same device.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(open_with(dir.path(), |config| config.storage.commit_interval_us = 200_000).await);
        let device = crate::storage::testing::device_with_three_events(&store).await;
        let event = |text: &str| crate::storage::testing::event(device, text);
        let (ack, append) = {
            let (a, b) = (store.clone(), store.clone());
            let four = event("four");
            (
                tokio::spawn(async move { a.ack(device, Seq::new(3), Effects::default()).await }),
                tokio::spawn(async move { b.append(four).await }),
            )
        };
        ack.await.expect("task").unwrap();
        append.await.expect("task").unwrap();
        assert_eq!(store.acked_seq(device).await.unwrap(), Seq::new(3));
        let rows = store.inbox_after(device, Seq::new(3), 10, usize::MAX).await.unwrap();
        let rows: Vec<(u64, &[u8])> = rows.iter().map(|row| (row.seq.get(), row.payload.as_ref())).collect();
        assert_eq!(rows, [(4, b"four".as_slice())], "the new event after the acknowledged ones, never a number used before");
    }

    async fn new_message(store: &Store, sender: (UserPk, DevicePk), client_msg_id: Uuid, to: DevicePk) -> NewMessage {
        let id = store.next_message_id().await.unwrap();
        NewMessage {
            id,
            sender_device: sender.1,
            sender_user: sender.0,
            client_msg_id,
            recipient: "@bob:a.test".into(),
            ts: Timestamp::now(),
            events: vec![NewEvent { device: to, origin: None, payload: Bytes::from(format!("event of {id}")) }],
            outbound: Vec::new(),
            media: Vec::new(),
            media_once: false,
        }
    }

    #[tokio::test]
    async fn a_repeat_in_the_same_commit_is_answered_with_the_first_copy_and_stores_nothing() {
        // The writer on the connections' runtime (one worker), and on a thread of its own.
        for workers in [1, 2] {
            a_repeat_in_the_same_commit(workers).await;
        }
    }

    async fn a_repeat_in_the_same_commit(workers: usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_with(dir.path(), |config| {
            config.storage.commit_interval_us = 200_000;
            config.runtime.worker_threads = workers;
        })
        .await;
        let alice = store.create_user("alice", "hash", false).await.unwrap();
        let alice = (alice, store.create_device(alice, "A", None, b"token-a", 10).await.unwrap());
        let bob = store.create_user("bob", "hash", false).await.unwrap();
        let bob = store.create_device(bob, "B", None, b"token-b", 10).await.unwrap();
        let (once, again, other) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        // An earlier commit: the four below arrive within the interval after it, so they
        // share the next commit (and one multi-row statement).
        let earlier = store.store_message(new_message(&store, alice, once, bob).await).await.unwrap();
        let first = new_message(&store, alice, again, bob).await;
        let (first_id, first_ts) = (first.id, first.ts);
        let replies = [
            store.queue_message(first).await.unwrap(),
            store.queue_message(new_message(&store, alice, again, bob).await).await.unwrap(),
            store.queue_message(new_message(&store, alice, other, bob).await).await.unwrap(),
            store.queue_message(new_message(&store, alice, once, bob).await).await.unwrap(),
        ];
        let mut outcomes = Vec::new();
        for reply in replies {
            outcomes.push(reply.await.unwrap().unwrap());
        }
        assert_eq!(outcomes[0], MessageOutcome::Stored { id: first_id, ts: first_ts });
        assert_eq!(outcomes[1], MessageOutcome::Duplicate { id: first_id, ts: first_ts });
        assert!(matches!(outcomes[2], MessageOutcome::Stored { .. }));
        let MessageOutcome::Stored { id, ts } = earlier else { panic!("the first send is stored: {earlier:?}") };
        assert_eq!(outcomes[3], MessageOutcome::Duplicate { id, ts });
        let inbox = store.inbox_after(bob, Seq::ZERO, 100, usize::MAX).await.unwrap();
        let payloads: Vec<_> = inbox.iter().map(|row| row.payload.clone()).collect();
        let MessageOutcome::Stored { id: other_id, .. } = outcomes[2] else { unreachable!() };
        assert_eq!(
            payloads,
            [format!("event of {id}"), format!("event of {first_id}"), format!("event of {other_id}")].map(Bytes::from),
            "one event per stored message, none for the repeats"
        );
    }

    #[tokio::test]
    async fn a_database_migrated_by_a_newer_parleyd_is_refused_with_both_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, _database) = testing::config(dir.path()).await;
        let store = Store::open(&config, crate::metrics::Metrics::new(), Subscribers::default()).await.expect("opens").0;
        let known = match store.pool {
            Pool::Sqlite(_) => MIGRATIONS.last().map_or(0, |(version, _, _)| *version),
            Pool::Postgres(_) => crate::storage::migrate::POSTGRES_VERSION,
        };
        on_pool!(&store.pool, |pool| sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'from the future', $2, $3, 0)",
        )
        .bind(known + 1)
        .bind(true)
        .bind(vec![0u8])
        .execute(pool)
        .await
        .expect("a newer migration recorded")
        .rows_affected());
        drop(store);
        let refused = Store::open(&config, crate::metrics::Metrics::new(), Subscribers::default()).await.err();
        match refused {
            Some(StoreError::SchemaTooNew { found, known: k }) => assert_eq!((found, k), (known + 1, known)),
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_inbox_stored_before_the_arrival_order_migration_reads_the_same_after_it() {
        if testing::postgres() {
            return; // a migration of the SQLite schema (PostgreSQL starts at its final shape)
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let options = SqliteConnectOptions::new().filename(config.database_path()).create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        let before = MIGRATIONS.iter().position(|(_, name, _)| *name == "inbox_by_arrival").unwrap();
        let mut old = migrator();
        old.migrations = Cow::Owned(old.migrations[..before].to_vec());
        old.run(&pool).await.unwrap();
        // Two devices' rows, written interleaved.
        for (device, seq) in [(2, 1), (1, 1), (2, 2), (1, 2), (2, 3)] {
            sqlx::query("INSERT INTO inbox (device, seq, sender, msg_id, payload) VALUES ($1, $2, $3, $4, $5)")
                .bind(device)
                .bind(seq)
                .bind((seq == 2).then_some("@carol:b.test"))
                .bind((seq == 2).then_some(40 + device))
                .bind(format!("{device}/{seq}").into_bytes())
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;

        let store = open(dir.path()).await;
        for (device, seqs) in [(1, vec![1, 2]), (2, vec![1, 2, 3])] {
            let rows = store.inbox_after(device, Seq::ZERO, 100, usize::MAX).await.unwrap();
            let got: Vec<_> = rows.iter().map(|row| (row.seq.get(), row.payload.clone(), row.origin.clone())).collect();
            let want: Vec<_> = seqs
                .iter()
                .map(|&seq| {
                    let origin = (seq == 2).then(|| (Arc::from("@carol:b.test"), ServerMsgId::new(40 + device as u64)));
                    (seq, Bytes::from(format!("{device}/{seq}")), origin)
                })
                .collect();
            assert_eq!(got, want, "device {device}");
        }
        // The (device, seq) key still holds.
        let repeat =
            sqlx::query("INSERT INTO inbox (device, seq, payload) VALUES (1, 2, x'00')").execute(store.sqlite_pool()).await;
        assert!(repeat.is_err(), "a second row at the same (device, seq) is refused");
    }
}
