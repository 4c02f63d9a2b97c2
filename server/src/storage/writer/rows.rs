//! The PostgreSQL writer's multi-row statements (SQLite's writer runs prepared single-row
//! statements on its own thread: see `sqlite`).
//!
//! PostgreSQL takes the rows of a step as one array per column (`unnest`): one statement per
//! step whatever the row count, five or six parameters instead of thousands, and one plan,
//! kept with the connection's statement. The writer also locks what the batch writes before it
//! writes it (see [`BatchRows::lock_batch`]), so that two workers' batches commit in parallel.

use super::{MessageOutcome, NewEvent, NewMessage, Reply};
use crate::storage::{DevicePk, StoreError};
use parley_spec::{Seq, ServerName};

/// A new message's idempotency record, as stored.
pub(super) struct MessageRow<'a> {
    pub message: &'a NewMessage,
    /// Its id and time, as stored.
    pub id: i64,
    pub ts: i64,
}

impl<'a> MessageRow<'a> {
    pub fn new((message, _): &'a (NewMessage, Reply<MessageOutcome>)) -> Result<Self, StoreError> {
        Ok(Self { message, id: i64::try_from(message.id)?, ts: i64::try_from(message.ts)? })
    }
}

/// An inbox row, as stored.
pub(super) struct InboxInsert<'a> {
    pub event: &'a NewEvent,
    pub seq: i64,
    pub msg_id: Option<i64>,
}

impl<'a> InboxInsert<'a> {
    pub fn new((event, seq): &'a (NewEvent, Seq)) -> Result<Self, StoreError> {
        let msg_id = event.origin.as_ref().map(|(_, id)| i64::try_from(*id)).transpose()?;
        Ok(Self { event, seq: i64::try_from(*seq)?, msg_id })
    }

    fn sender(&self) -> Option<&'a str> {
        self.event.origin.as_ref().map(|(sender, _)| sender.as_ref())
    }
}

/// The key of the advisory lock that orders the commits adding to `destination`'s outbound
/// queue (see [`BatchRows::lock_batch`]): the first eight bytes of a SHA-256 of its name. Two
/// names that share a key only share a lock.
pub(super) fn destination_lock(destination: &ServerName) -> i64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new().chain_update(b"parley fed_outbound ").chain_update(destination.as_str()).finalize();
    let key = i64::from_be_bytes(digest[..8].try_into().expect("eight bytes"));
    // Never the database-wide lock's key, which the batch holds shared.
    if key == crate::storage::WRITE_LOCK {
        key ^ 1
    } else {
        key
    }
}

/// The writer's multi-row steps on one backend.
pub(super) trait BatchRows {
    /// Inserts idempotency records (those already stored are skipped); the rows inserted.
    async fn insert_messages(&mut self, rows: &[MessageRow<'_>]) -> Result<u64, StoreError>;
    /// Appends inbox rows.
    async fn insert_inbox(&mut self, rows: &[InboxInsert<'_>]) -> Result<(), StoreError>;
    /// Raises each device's `acked_seq` to the given position (never lowers it).
    async fn raise_acked(&mut self, acks: &[(DevicePk, i64)]) -> Result<(), StoreError>;
    /// Deletes each device's inbox rows at or below the given position (in the transaction
    /// that raises its `acked_seq` there).
    async fn delete_acked(&mut self, acks: &[(DevicePk, i64)]) -> Result<(), StoreError>;
    /// Takes, to the end of the transaction, the locks that let another worker's batch run
    /// beside this one: each destination queue's advisory lock (its items then become visible
    /// in the order of their sequence numbers), then the inbox head (PostgreSQL migration
    /// 0003) of each device the batch appends to or removes (its inbox rows likewise), both in
    /// ascending key order so that two batches never wait on each other in a cycle. Returns
    /// those heads: each device's last seq, as the last writer to it committed it (a device
    /// without one is gone). Not the `devices` rows: a device's acknowledgements and last-seen
    /// time are written by the worker holding its connection, and must not wait for the
    /// workers appending to its inbox. (SQLite's one writer needs none: its batch holds the
    /// database's one write lock from its `BEGIN IMMEDIATE`.)
    async fn lock_batch(&mut self, destinations: Vec<i64>, devices: Vec<DevicePk>) -> Result<Vec<(DevicePk, i64)>, StoreError>;
    /// The inbox heads of `devices`, unlocked.
    async fn read_heads(&mut self, devices: Vec<DevicePk>) -> Result<Vec<(DevicePk, i64)>, StoreError>;
    /// Moves locked inbox heads to the last seq this batch gave.
    async fn advance_heads(&mut self, heads: &[(DevicePk, i64)]) -> Result<(), StoreError>;
}

impl BatchRows for sqlx::PgConnection {
    async fn insert_messages(&mut self, rows: &[MessageRow<'_>]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "INSERT INTO messages (id, sender_device, sender_user, client_msg_id, recipient, ts) \
             SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BYTEA[], $5::TEXT[], $6::BIGINT[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(rows.iter().map(|row| row.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.message.sender_device).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.message.sender_user).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.message.client_msg_id.as_bytes().as_slice()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.message.recipient.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.ts).collect::<Vec<_>>())
        .execute(&mut *self)
        .await?;
        Ok(done.rows_affected())
    }

    async fn insert_inbox(&mut self, rows: &[InboxInsert<'_>]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO inbox (device, seq, sender, msg_id, payload) \
             SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::BYTEA[])",
        )
        .bind(rows.iter().map(|row| row.event.device).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.seq).collect::<Vec<_>>())
        .bind(rows.iter().map(InboxInsert::sender).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.msg_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.event.payload.as_ref()).collect::<Vec<_>>())
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn delete_acked(&mut self, acks: &[(DevicePk, i64)]) -> Result<(), StoreError> {
        if acks.is_empty() {
            return Ok(());
        }
        let (devices, seqs): (Vec<DevicePk>, Vec<i64>) = acks.iter().copied().unzip();
        // Only above the previous position (so before it moves): below it lie the index
        // entries of rows deleted earlier that vacuum has not removed yet, hundreds per device
        // under load, which `seq <= s` alone would walk through every time.
        sqlx::query(
            "DELETE FROM inbox USING unnest($1::BIGINT[], $2::BIGINT[]) AS v(d, s) \
             JOIN devices ON devices.id = v.d \
             WHERE inbox.device = v.d AND inbox.seq > devices.acked_seq AND inbox.seq <= v.s",
        )
        .bind(&devices)
        .bind(&seqs)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn raise_acked(&mut self, acks: &[(DevicePk, i64)]) -> Result<(), StoreError> {
        if acks.is_empty() {
            return Ok(());
        }
        let (devices, seqs): (Vec<DevicePk>, Vec<i64>) = acks.iter().copied().unzip();
        sqlx::query(
            "UPDATE devices SET acked_seq = v.s FROM unnest($1::BIGINT[], $2::BIGINT[]) AS v(d, s) \
             WHERE devices.id = v.d AND v.s > devices.acked_seq",
        )
        .bind(&devices)
        .bind(&seqs)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn lock_batch(
        &mut self,
        mut destinations: Vec<i64>,
        mut devices: Vec<DevicePk>,
    ) -> Result<Vec<(DevicePk, i64)>, StoreError> {
        destinations.sort_unstable();
        destinations.dedup();
        devices.sort_unstable();
        devices.dedup();
        if !destinations.is_empty() {
            // `unnest` yields the keys in array order: ascending.
            sqlx::query("SELECT pg_advisory_xact_lock(k) FROM unnest($1::BIGINT[]) AS k")
                .bind(&destinations)
                .execute(&mut *self)
                .await?;
        }
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let heads = sqlx::query_as(
            "SELECT device, last_seq FROM inbox_heads WHERE device = ANY($1::BIGINT[]) ORDER BY device FOR UPDATE",
        )
        .bind(&devices)
        .fetch_all(&mut *self)
        .await?;
        Ok(heads)
    }

    async fn read_heads(&mut self, devices: Vec<DevicePk>) -> Result<Vec<(DevicePk, i64)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let heads = sqlx::query_as("SELECT device, last_seq FROM inbox_heads WHERE device = ANY($1::BIGINT[])")
            .bind(&devices)
            .fetch_all(&mut *self)
            .await?;
        Ok(heads)
    }

    async fn advance_heads(&mut self, heads: &[(DevicePk, i64)]) -> Result<(), StoreError> {
        if heads.is_empty() {
            return Ok(());
        }
        let (devices, seqs): (Vec<DevicePk>, Vec<i64>) = heads.iter().copied().unzip();
        sqlx::query(
            "UPDATE inbox_heads SET last_seq = v.s FROM unnest($1::BIGINT[], $2::BIGINT[]) AS v(d, s) WHERE inbox_heads.device = v.d",
        )
        .bind(&devices)
        .bind(&seqs)
        .execute(&mut *self)
        .await?;
        Ok(())
    }
}
