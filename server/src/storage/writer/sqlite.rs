//! The writer on SQLite: its own connection, driven directly (rusqlite on the same SQLite
//! library sqlx links), so that a whole commit runs in one call on the writer's thread.
//!
//! Through sqlx every statement was a round trip to the connection's own thread, two thread
//! switches each (on one core, the runtime's and that thread's) and its arguments boxed on
//! the way: a commit of `BEGIN`, four steps and `COMMIT` cost twelve switches. Here the
//! writer's thread runs the statements itself, row by row through prepared statements kept in
//! the connection's cache (with no round trip per statement, multi-row texts buy nothing), and
//! blocks in the commit's fsync while the connections' runtime goes on.
//! The steps and their order are those of the PostgreSQL writer (`apply_plan` in the parent
//! module); only how each reaches the database differs.

use super::{Effects, FedWrite, Hold, InboundTxn, MessageOutcome, NewEvent, NewMessage, Plan, RemoteMessage, Reply, Work};
use crate::config::Synchronous;
use crate::storage::store::JOURNAL_SIZE_LIMIT;
use crate::storage::{DevicePk, StoreError};
use parley_spec::{Seq, ServerMsgId, ServerName, Timestamp};
use rusqlite::{params, OptionalExtension as _, TransactionBehavior};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Statements the connection keeps prepared (the writer uses about thirty).
const STATEMENT_CACHE: usize = 64;

/// The writer's connection to the SQLite file.
pub(in crate::storage) struct Connection {
    conn: rusqlite::Connection,
}

impl Connection {
    /// Opens the (created and migrated) database at `path` with the settings the pool's
    /// connections have.
    pub fn open(path: &Path, synchronous: Synchronous, busy_timeout: Duration) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // `journal_mode` answers with the mode, so it is read rather than executed.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!("the database would not switch to WAL (journal mode {mode})")));
        }
        let synchronous = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {synchronous};
             PRAGMA foreign_keys = ON;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};
             PRAGMA temp_store = MEMORY;"
        ))?;
        Ok(Self { conn })
    }

    /// Copies what is left of the WAL and makes the next commit write it from its start,
    /// waiting at most `wait` for readers still on it. Whether it did.
    pub fn restart_wal(&mut self, wait: Duration, busy_timeout: Duration) -> Result<bool, StoreError> {
        self.conn.busy_timeout(wait)?;
        let done = self.checkpoint("RESTART");
        self.conn.busy_timeout(busy_timeout)?;
        Ok(done?.0 == 0)
    }

    /// Folds the WAL back into the database file and truncates it, then closes the connection.
    /// `(busy, frames, copied)` of the checkpoint.
    pub fn close(self) -> Result<(i64, i64, i64), StoreError> {
        let done = self.checkpoint("TRUNCATE");
        self.conn.close().map_err(|(_, error)| error)?;
        done
    }

    /// `(busy, frames, copied)` of a `wal_checkpoint(mode)`: `busy` is 0 when it completed.
    fn checkpoint(&self, mode: &str) -> Result<(i64, i64, i64), StoreError> {
        let sql = format!("PRAGMA wal_checkpoint({mode})");
        Ok(self.conn.query_row(&sql, [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?)
    }

    /// Runs `plan`'s steps in order in one transaction and commits; the inbox rows written.
    /// On error the transaction rolls back (dropped uncommitted).
    pub(super) fn apply_plan(
        &mut self,
        plan: Plan,
        now: i64,
        next_seq: &mut HashMap<DevicePk, Seq>,
        keep_history: bool,
        work: &mut Work,
    ) -> Result<Vec<(NewEvent, Seq)>, StoreError> {
        let Plan { messages, effects, inbound, fed_state, deleted, acks, last_seen, replies: _ } = plan;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;

        // 1. Messages: idempotency records; only new messages add their events and items.
        let stored = insert_messages(&tx, messages, work)?;
        // Inbox and outbound order as in the PostgreSQL writer (`apply_plan`).
        let mut events = stored.events;
        events.extend(effects.events);
        let mut outbound = effects.outbound;
        outbound.extend(stored.outbound);
        let mut received = effects.received;
        // 2. Inbound federation transactions, and the remote messages they brought.
        let inbound = apply_inbound(&tx, inbound, now, work)?;
        events.extend(inbound.events);
        outbound.extend(inbound.outbound);
        received.extend(inbound.received);
        record_received(&tx, &received)?;
        // 3. Outbound federation items, and the state of transactions in flight.
        work.destinations = queue_outbound(&tx, outbound)?;
        apply_fed_state(&tx, fed_state, now, work)?;
        // 4. Devices removed in this batch lose their inbox, keys and counters.
        delete_devices(&tx, &deleted, next_seq)?;
        // 5. Inbox events with their sequence numbers (events for unknown devices are dropped).
        let rows = append_inbox(&tx, events, next_seq)?;
        // 5b. Files the new messages carry, held for the devices they went to.
        hold_media(&tx, &std::mem::take(&mut work.holds), &rows)?;
        // 6. Acks: raise acked_seq (clamped to what exists) and drop acknowledged entries.
        apply_acks(&tx, acks, next_seq, keep_history)?;
        // 7. Last seen.
        record_last_seen(&tx, &last_seen)?;
        tx.commit()?;
        Ok(rows)
    }
}

/// Step 1: inserts each idempotency record. A new one is answered `Stored` and brings its
/// events and items; a repeat (stored earlier, or earlier in this batch) is answered with the
/// original's id and time and brings nothing.
fn insert_messages(
    tx: &rusqlite::Transaction<'_>,
    messages: Vec<(NewMessage, Reply<MessageOutcome>)>,
    work: &mut Work,
) -> Result<Effects, StoreError> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages (id, sender_device, sender_user, client_msg_id, recipient, ts) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
    )?;
    let mut effects = Effects::default();
    for (message, reply) in messages {
        let (id, ts) = (i64::try_from(message.id)?, i64::try_from(message.ts)?);
        let client_msg_id = message.client_msg_id.as_bytes().as_slice();
        let new =
            insert.execute(params![id, message.sender_device, message.sender_user, client_msg_id, message.recipient, ts])? == 1;
        let outcome = if new {
            MessageOutcome::Stored { id: message.id, ts: message.ts }
        } else {
            let (id, ts): (i64, i64) = tx
                .prepare_cached("SELECT id, ts FROM messages WHERE sender_device = ?1 AND client_msg_id = ?2")?
                .query_row(params![message.sender_device, client_msg_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
            MessageOutcome::Duplicate { id: ServerMsgId::try_from(id)?, ts: Timestamp::try_from(ts)? }
        };
        work.settle_message(&mut effects, message, reply, outcome);
    }
    Ok(effects)
}

/// Step 2: each inbound transaction applies once per (origin, txn_id), and each message in
/// them once per (origin, message id), whatever transaction carries it (a second copy in the
/// same batch is a repeat too). Returns the effects of what applies, in item order.
fn apply_inbound(
    tx: &rusqlite::Transaction<'_>,
    inbound: Vec<InboundTxn>,
    now: i64,
    work: &mut Work,
) -> Result<Effects, StoreError> {
    let mut effects = Effects::default();
    let mut duplicates = 0usize;
    for InboundTxn { origin, txn_id, items, reply } in inbound {
        let new = tx
            .prepare_cached(
                "INSERT INTO fed_inbound_txns (origin, txn_id, received_ts) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )?
            .execute(params![origin, txn_id, now])?
            == 1;
        work.inbound_replies.push((reply, new));
        if !new {
            continue;
        }
        let mut first_seen = tx.prepare_cached(
            "INSERT INTO fed_inbound_messages (origin, msg_id, received_ts) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?;
        for item in items {
            if let Some((origin, id)) = &item.message {
                if first_seen.execute(params![origin.as_ref(), i64::try_from(*id)?, now])? == 0 {
                    duplicates += 1;
                    continue;
                }
            }
            effects.extend(item.effects);
        }
    }
    if duplicates > 0 {
        tracing::debug!(duplicates, "inbound messages already delivered were dropped");
    }
    Ok(effects)
}

/// Remembers the messages received from other servers' users (for read-marker checks).
fn record_received(tx: &rusqlite::Transaction<'_>, received: &[RemoteMessage]) -> Result<(), StoreError> {
    let mut insert =
        tx.prepare_cached("INSERT INTO remote_messages (recipient, sender, msg_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")?;
    for message in received {
        insert.execute(params![message.recipient, message.sender.as_ref(), i64::try_from(message.id)?])?;
    }
    Ok(())
}

/// Step 3: appends outbound federation items, in order; returns the destinations whose queue
/// grew (each once, in order of first appearance).
fn queue_outbound(tx: &rusqlite::Transaction<'_>, outbound: Vec<super::Outbound>) -> Result<Vec<ServerName>, StoreError> {
    let mut insert = tx.prepare_cached("INSERT INTO fed_outbound (destination, payload) VALUES (?1, ?2)")?;
    let mut destinations: Vec<ServerName> = Vec::new();
    for item in outbound {
        insert.execute(params![item.destination.as_str(), item.payload.as_ref()])?;
        if !destinations.contains(&item.destination) {
            destinations.push(item.destination);
        }
    }
    Ok(destinations)
}

/// Deletes the items queued for `destination` up to `seq`: a transaction carrying them was
/// accepted.
fn delete_sent(tx: &rusqlite::Transaction<'_>, destination: &str, seq: i64) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM fed_outbound WHERE destination = ?1 AND seq <= ?2")?.execute(params![destination, seq])?;
    Ok(())
}

/// Step 3 (continued): in-flight records, accepted transactions, and the remote-device cache
/// and watchers.
fn apply_fed_state(
    tx: &rusqlite::Transaction<'_>,
    writes: Vec<(FedWrite, Reply<()>)>,
    now: i64,
    work: &mut Work,
) -> Result<(), StoreError> {
    use super::Bookkeeping;
    for (write, reply) in writes {
        match write {
            FedWrite::Inflight { destination, txn_id, last_seq, done_up_to } => {
                if let Some(done) = done_up_to {
                    delete_sent(tx, &destination, done)?;
                }
                tx.prepare_cached(
                    "INSERT INTO fed_inflight (destination, txn_id, last_seq) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (destination) DO UPDATE SET txn_id = ?2, last_seq = ?3",
                )?
                .execute(params![destination, txn_id, last_seq])?;
            }
            FedWrite::Done { destination, last_seq } => {
                delete_sent(tx, &destination, last_seq)?;
                tx.prepare_cached("DELETE FROM fed_inflight WHERE destination = ?1")?.execute(params![destination])?;
            }
            FedWrite::Other(Bookkeeping::RemoteDevices { user, json: Some(json) }) => {
                tx.prepare_cached(
                    "INSERT INTO remote_devices (user_id, json, fetched_ts) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (user_id) DO UPDATE SET json = ?2, fetched_ts = ?3",
                )?
                .execute(params![user, json, now])?;
            }
            FedWrite::Other(Bookkeeping::RemoteDevices { user, json: None }) => {
                tx.prepare_cached("DELETE FROM remote_devices WHERE user_id = ?1")?.execute(params![user])?;
            }
            FedWrite::Other(Bookkeeping::Watcher { user, server }) => {
                tx.prepare_cached("INSERT INTO device_list_watchers (user_id, server) VALUES (?1, ?2) ON CONFLICT DO NOTHING")?
                    .execute(params![user, server])?;
            }
        }
        work.unit_replies.push(reply);
    }
    Ok(())
}

/// Step 4: removes devices with their inbox, keys and sequence counters.
fn delete_devices(
    tx: &rusqlite::Transaction<'_>,
    deleted: &[DevicePk],
    next_seq: &mut HashMap<DevicePk, Seq>,
) -> Result<(), StoreError> {
    for device in deleted {
        next_seq.remove(device);
        for table in super::DEVICE_TABLES {
            tx.prepare_cached(&format!("DELETE FROM {table} WHERE device = ?1"))?.execute(params![device])?;
        }
        tx.prepare_cached("DELETE FROM devices WHERE id = ?1")?.execute(params![device])?;
    }
    Ok(())
}

/// Step 5: appends inbox events in order, each with the next sequence number of its device
/// (events for unknown devices are dropped); returns the stored events with their numbers.
fn append_inbox(
    tx: &rusqlite::Transaction<'_>,
    events: Vec<NewEvent>,
    next_seq: &mut HashMap<DevicePk, Seq>,
) -> Result<Vec<(NewEvent, Seq)>, StoreError> {
    let mut insert = tx.prepare_cached("INSERT INTO inbox (device, seq, sender, msg_id, payload) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        let Some(seq) = peek_next_seq(tx, next_seq, event.device)? else { continue };
        next_seq.insert(event.device, seq.next());
        let (sender, msg_id) = match &event.origin {
            Some((sender, id)) => (Some(sender.as_ref()), Some(i64::try_from(*id)?)),
            None => (None, None),
        };
        insert.execute(params![event.device, i64::try_from(seq)?, sender, msg_id, event.payload.as_ref()])?;
        rows.push((event, seq));
    }
    Ok(rows)
}

/// Step 5b: holds each file a new message carries for every local device the message went to
/// (`media_holds`, released by the media sweep once the device acknowledged past it), if the
/// sender references the file; a file already marked unreferenced is referenced again.
fn hold_media(tx: &rusqlite::Transaction<'_>, holds: &[Hold], rows: &[(NewEvent, Seq)]) -> Result<(), StoreError> {
    for hold in holds {
        let targets = hold.targets(rows)?;
        let Hold { id: _, sender, media, once } = hold;
        for sha256 in media {
            let referenced: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM media_refs r JOIN media m ON m.sha256 = r.sha256 \
                     WHERE r.user_id = ?1 AND r.sha256 = ?2)",
                )?
                .query_row(params![sender, sha256.as_slice()], |row| row.get(0))?;
            if !referenced {
                continue;
            }
            let mut hold = tx.prepare_cached(
                "INSERT INTO media_holds (sha256, device, seq, once, sender) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )?;
            for (device, seq) in &targets {
                hold.execute(params![sha256.as_slice(), device, seq, i64::from(*once), sender])?;
            }
            tx.prepare_cached("UPDATE media SET unreferenced_ts = NULL WHERE sha256 = ?1")?
                .execute(params![sha256.as_slice()])?;
        }
    }
    Ok(())
}

/// Step 6: raises each device's `acked_seq` (clamped to what exists) and, unless history is
/// kept, deletes the entries at or below it (in this transaction: see the parent module's
/// sequence invariant).
fn apply_acks(
    tx: &rusqlite::Transaction<'_>,
    acks: HashMap<DevicePk, Seq>,
    next_seq: &mut HashMap<DevicePk, Seq>,
    keep_history: bool,
) -> Result<(), StoreError> {
    let mut raise = tx.prepare_cached("UPDATE devices SET acked_seq = ?2 WHERE id = ?1 AND ?2 > acked_seq")?;
    let mut delete = tx.prepare_cached("DELETE FROM inbox WHERE device = ?1 AND seq <= ?2")?;
    for (device, seq) in acks {
        let Some(next) = peek_next_seq(tx, next_seq, device)? else { continue };
        // `next` is at least 1, and the clamped position fits: it is stored already.
        let acked = i64::try_from(seq.min(Seq::new(next.get() - 1)))?;
        raise.execute(params![device, acked])?;
        if !keep_history {
            delete.execute(params![device, acked])?;
        }
    }
    Ok(())
}

/// Step 7: records when users and devices were last online.
fn record_last_seen(
    tx: &rusqlite::Transaction<'_>,
    last_seen: &[(crate::storage::UserPk, DevicePk, Timestamp)],
) -> Result<(), StoreError> {
    for (user, device, ts) in last_seen {
        let ts = i64::try_from(*ts)?;
        tx.prepare_cached("UPDATE users SET last_seen_ts = ?1 WHERE id = ?2")?.execute(params![ts, user])?;
        tx.prepare_cached("UPDATE devices SET last_seen_ts = ?1 WHERE id = ?2")?.execute(params![ts, device])?;
    }
    Ok(())
}

/// The next sequence number of `device` without taking it; `None` if the device is gone.
fn peek_next_seq(
    tx: &rusqlite::Transaction<'_>,
    cache: &mut HashMap<DevicePk, Seq>,
    device: DevicePk,
) -> Result<Option<Seq>, StoreError> {
    if let Some(next) = cache.get(&device) {
        return Ok(Some(*next));
    }
    let last: Option<i64> = tx
        .prepare_cached(
            "SELECT max(acked_seq, coalesce((SELECT max(seq) FROM inbox WHERE device = ?1), 0)) FROM devices WHERE id = ?1",
        )?
        .query_row(params![device], |row| row.get(0))
        .optional()?;
    let Some(last) = last else { return Ok(None) };
    let next = Seq::try_from(last)?.next();
    cache.insert(device, next);
    Ok(Some(next))
}
