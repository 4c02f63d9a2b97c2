//! The writer's steps on PostgreSQL, in order, in one transaction per batch; beside the other
//! workers' writers, each batch locks what it appends to (see `rows::BatchRows::lock_batch`).
//! The same steps on SQLite are in `sqlite`.

use super::on_postgres::queue_outbound;
use super::rows::{self, BatchRows as _, InboxInsert, MessageRow};
use super::{
    statement_chunks, Bookkeeping, Effects, FedWrite, Hold, InboundTxn, MessageOutcome, NewEvent, NewMessage, Plan,
    RemoteMessage, Reply, Work, DEVICE_TABLES,
};
use crate::storage::{DevicePk, StoreError, UserPk};
use parley_spec::{Seq, ServerMsgId, Timestamp};
use sqlx::{QueryBuilder, Row as _};
use std::collections::{HashMap, HashSet};

type Db = sqlx::Postgres;
type Conn = sqlx::PgConnection;

/// Runs `plan`'s SQL steps in order in one transaction and commits; the inbox rows written.
pub(super) async fn apply_plan(
    conn: &mut Conn,
    plan: Plan,
    now: i64,
    next_seq: &mut HashMap<DevicePk, Seq>,
    keep_history: bool,
    work: &mut Work,
) -> Result<Vec<(NewEvent, Seq)>, StoreError> {
    let Plan { messages, effects, inbound, fed_state, deleted, acks, last_seen, replies: _ } = plan;
    let mut tx = crate::storage::BeginWriteOn::begin_write(conn).await?;
    // Other workers on this database may have appended to any inbox since this worker's last
    // batch: sequence numbers are read afresh, once the inboxes are locked (below).
    next_seq.clear();

    // 1. Messages: idempotency records; only new messages add their events and items.
    let stored = insert_messages(&mut tx, messages, work).await?;
    // Inbox order: new messages' events, then those of the other operations in batch order,
    // then those of inbound transactions. Outbound order: the other operations' items, then
    // new messages', then inbound transactions'.
    let mut events = stored.events;
    events.extend(effects.events);
    let mut outbound = effects.outbound;
    outbound.extend(stored.outbound);
    let mut received = effects.received;
    // 2. Inbound federation transactions, and the remote messages they brought.
    let inbound = apply_inbound(&mut tx, inbound, now, work).await?;
    events.extend(inbound.events);
    outbound.extend(inbound.outbound);
    received.extend(inbound.received);
    record_received(&mut tx, &received).await?;
    if !keep_history {
        // Acknowledged rows go before the inboxes are locked, which keeps the part of the batch
        // that another worker's batch may wait for short. Safe unlocked: a device acknowledges
        // only rows committed before it received them, and only its own connection sends its
        // acknowledgements. (A client acknowledging past what it received loses its own rows
        // early, as it would anyway; one committed meanwhile by another worker then stays below
        // `acked_seq`, deleted with the device. A position past every i64 acknowledges
        // everything; `apply_acks` clamps what is stored.)
        let mut acked: Vec<(DevicePk, i64)> =
            acks.iter().map(|(device, seq)| (*device, i64::try_from(*seq).unwrap_or(i64::MAX))).collect();
        acked.sort_unstable();
        tx.delete_acked(&acked).await?;
    }
    {
        // Beside another worker's batch (both hold the write lock shared): lock the queues this
        // batch adds to and the inbox heads of the devices it appends to or removes, which
        // number its rows (see `BatchRows::lock_batch`). Everything before this point is
        // ordered by unique keys. Acknowledging devices' heads are read unlocked: what they
        // may acknowledge was committed before they received it, so the committed head bounds
        // it whatever another worker appends meanwhile.
        let destinations = outbound.iter().map(|item| rows::destination_lock(&item.destination)).collect();
        let devices = events.iter().map(|event| event.device).chain(deleted.iter().copied());
        let mut heads = tx.lock_batch(destinations, devices.collect()).await?;
        let locked: HashSet<DevicePk> = heads.iter().map(|(device, _)| *device).collect();
        heads.extend(tx.read_heads(acks.keys().copied().filter(|device| !locked.contains(device)).collect()).await?);
        for (device, last) in heads {
            next_seq.insert(device, Seq::try_from(last)?.next());
        }
    }
    // 3. Outbound federation items, and the state of transactions in flight.
    work.destinations = queue_outbound(&mut tx, outbound).await?;
    apply_fed_state(&mut tx, fed_state, now, work).await?;
    // 4. Devices removed in this batch lose their inbox, keys and counters.
    delete_devices(&mut tx, &deleted, next_seq).await?;
    // 5. Inbox events with their sequence numbers (events for unknown devices are dropped).
    let rows = append_inbox(&mut tx, events, next_seq).await?;
    {
        let appended: HashSet<DevicePk> = rows.iter().map(|(event, _)| event.device).collect();
        let mut heads = Vec::with_capacity(appended.len());
        for device in appended {
            if let Some(next) = next_seq.get(&device) {
                heads.push((device, i64::try_from(Seq::new(next.get() - 1))?));
            }
        }
        heads.sort_unstable();
        tx.advance_heads(&heads).await?;
    }
    // 5b. Files the new messages carry, held for the devices they went to.
    hold_media(&mut tx, &std::mem::take(&mut work.holds), &rows).await?;
    // 6. Acks: raise acked_seq (clamped to what exists) and drop acknowledged entries.
    apply_acks(&mut tx, acks, next_seq).await?;
    // 7. Last seen (by user: another worker's batch takes the rows in the same order).
    let mut last_seen = last_seen;
    last_seen.sort_by_key(|(user, _, _)| *user);
    record_last_seen(&mut tx, &last_seen).await?;

    tx.commit().await?;
    Ok(rows)
}

/// Step 1: inserts the idempotency records. New messages are answered `Stored` and bring
/// their events and items; repeats are answered with the original's id and time and bring
/// nothing. When every row went in (the common case) nothing more is needed; when some did
/// not, each message of the batch is looked up: the row found carries this message's fresh id
/// only if it is this message's. (Not `RETURNING`: SQLite's worker thread hands each returned
/// row over on its own, a wake-up per message.)
pub(super) async fn insert_messages(
    conn: &mut Conn,
    messages: Vec<(NewMessage, Reply<MessageOutcome>)>,
    work: &mut Work,
) -> Result<Effects, StoreError> {
    let mut effects = Effects::default();
    let all_new = {
        let rows: Vec<MessageRow<'_>> = messages.iter().map(MessageRow::new).collect::<Result<_, _>>()?;
        conn.insert_messages(&rows).await? == rows.len() as u64
    };
    for (message, reply) in messages {
        let outcome = if all_new {
            MessageOutcome::Stored { id: message.id, ts: message.ts }
        } else {
            let row = sqlx::query("SELECT id, ts FROM messages WHERE sender_device = $1 AND client_msg_id = $2")
                .bind(message.sender_device)
                .bind(message.client_msg_id.as_bytes().as_slice())
                .fetch_one(&mut *conn)
                .await?;
            let id = ServerMsgId::try_from(row.try_get::<i64, _>(0)?)?;
            if id == message.id {
                MessageOutcome::Stored { id, ts: message.ts }
            } else {
                MessageOutcome::Duplicate { id, ts: Timestamp::try_from(row.try_get::<i64, _>(1)?)? }
            }
        };
        work.settle_message(&mut effects, message, reply, outcome);
    }
    Ok(effects)
}
/// Step 2: each inbound transaction applies once per (origin, txn_id), and each message in
/// them once per (origin, message id), whatever transaction carries it. Returns the effects of
/// what applies, in item order.
pub(super) async fn apply_inbound(
    conn: &mut Conn,
    inbound: Vec<InboundTxn>,
    now: i64,
    work: &mut Work,
) -> Result<Effects, StoreError> {
    let mut inbound_items = Vec::new();
    for InboundTxn { origin, txn_id, items, reply } in inbound {
        let done =
            sqlx::query("INSERT INTO fed_inbound_txns (origin, txn_id, received_ts) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(&origin)
                .bind(&txn_id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
        let new = done.rows_affected() == 1;
        if new {
            inbound_items.extend(items);
        }
        work.inbound_replies.push((reply, new));
    }
    // One multi-row insert; RETURNING names the pairs seen for the first time.
    let keys: Vec<(&str, i64)> = inbound_items
        .iter()
        .filter_map(|item| item.message.as_ref())
        .map(|(origin, id)| Ok((origin.as_ref(), i64::try_from(*id)?)))
        .collect::<Result<_, StoreError>>()?;
    let mut first_seen: HashMap<String, HashSet<ServerMsgId>> = HashMap::new();
    for chunk in statement_chunks(&keys) {
        let mut query = QueryBuilder::<Db>::new("INSERT INTO fed_inbound_messages (origin, msg_id, received_ts) ");
        query.push_values(chunk, |mut row, (origin, id)| {
            row.push_bind(*origin).push_bind(*id).push_bind(now);
        });
        query.push(" ON CONFLICT DO NOTHING RETURNING origin, msg_id");
        for row in query.build().fetch_all(&mut *conn).await? {
            first_seen.entry(row.try_get(0)?).or_default().insert(ServerMsgId::try_from(row.try_get::<i64, _>(1)?)?);
        }
    }
    let mut effects = Effects::default();
    let mut duplicates = 0usize;
    for item in inbound_items {
        if let Some((origin, id)) = &item.message {
            // Taken out, so a second copy later in the same batch counts as a repeat too.
            if !first_seen.get_mut(origin.as_ref()).is_some_and(|ids| ids.remove(id)) {
                duplicates += 1;
                continue;
            }
        }
        effects.extend(item.effects);
    }
    if duplicates > 0 {
        tracing::debug!(duplicates, "inbound messages already delivered were dropped");
    }
    Ok(effects)
}
/// Remembers the messages received from other servers' users (for read-marker checks).
pub(super) async fn record_received(conn: &mut Conn, received: &[RemoteMessage]) -> Result<(), StoreError> {
    for chunk in statement_chunks(received) {
        let ids: Vec<i64> = chunk.iter().map(|m| i64::try_from(m.id)).collect::<Result<_, _>>()?;
        let mut query = QueryBuilder::<Db>::new("INSERT INTO remote_messages (recipient, sender, msg_id) ");
        query.push_values(chunk.iter().zip(ids), |mut row, (m, id)| {
            row.push_bind(m.recipient).push_bind(m.sender.as_ref()).push_bind(id);
        });
        query.push(" ON CONFLICT DO NOTHING");
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}
/// Deletes the items queued for `destination` up to `seq`: a transaction carrying them was
/// accepted.
pub(super) async fn delete_sent(conn: &mut Conn, destination: &str, seq: i64) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM fed_outbound WHERE destination = $1 AND seq <= $2")
        .bind(destination)
        .bind(seq)
        .execute(conn)
        .await?;
    Ok(())
}
/// Step 3 (continued): in-flight records, accepted transactions, and the remote-device cache
/// and watchers.
pub(super) async fn apply_fed_state(
    conn: &mut Conn,
    writes: Vec<(FedWrite, Reply<()>)>,
    now: i64,
    work: &mut Work,
) -> Result<(), StoreError> {
    for (write, reply) in writes {
        match write {
            FedWrite::Inflight { destination, txn_id, last_seq, done_up_to } => {
                if let Some(done) = done_up_to {
                    delete_sent(conn, &destination, done).await?;
                }
                sqlx::query(
                    "INSERT INTO fed_inflight (destination, txn_id, last_seq) VALUES ($1, $2, $3) \
                     ON CONFLICT (destination) DO UPDATE SET txn_id = $2, last_seq = $3",
                )
                .bind(destination)
                .bind(txn_id)
                .bind(last_seq)
                .execute(&mut *conn)
                .await?;
            }
            FedWrite::Done { destination, last_seq } => {
                delete_sent(conn, &destination, last_seq).await?;
                sqlx::query("DELETE FROM fed_inflight WHERE destination = $1").bind(&destination).execute(&mut *conn).await?;
            }
            FedWrite::Other(Bookkeeping::RemoteDevices { user, json: Some(json) }) => {
                sqlx::query(
                    "INSERT INTO remote_devices (user_id, json, fetched_ts) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id) DO UPDATE SET json = $2, fetched_ts = $3",
                )
                .bind(user)
                .bind(json)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            FedWrite::Other(Bookkeeping::RemoteDevices { user, json: None }) => {
                sqlx::query("DELETE FROM remote_devices WHERE user_id = $1").bind(user).execute(&mut *conn).await?;
            }
            FedWrite::Other(Bookkeeping::Watcher { user, server }) => {
                sqlx::query("INSERT INTO device_list_watchers (user_id, server) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(user)
                    .bind(server)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        work.unit_replies.push(reply);
    }
    Ok(())
}
/// Step 4: removes devices with their inbox, keys and sequence counters.
pub(super) async fn delete_devices(
    conn: &mut Conn,
    deleted: &[DevicePk],
    next_seq: &mut HashMap<DevicePk, Seq>,
) -> Result<(), StoreError> {
    for device in deleted {
        next_seq.remove(device);
        for table in DEVICE_TABLES {
            sqlx::query(&format!("DELETE FROM {table} WHERE device = $1")).bind(device).execute(&mut *conn).await?;
        }
        sqlx::query("DELETE FROM devices WHERE id = $1").bind(device).execute(&mut *conn).await?;
    }
    Ok(())
}
/// Step 5: appends inbox events in order, each with the next sequence number of its device
/// (events for unknown devices are dropped); returns the stored events with their numbers.
pub(super) async fn append_inbox(
    conn: &mut Conn,
    events: Vec<NewEvent>,
    next_seq: &mut HashMap<DevicePk, Seq>,
) -> Result<Vec<(NewEvent, Seq)>, StoreError> {
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        if let Some(seq) = allocate_seq(next_seq, event.device) {
            rows.push((event, seq));
        }
    }
    let inserts: Vec<InboxInsert<'_>> = rows.iter().map(InboxInsert::new).collect::<Result<_, _>>()?;
    conn.insert_inbox(&inserts).await?;
    Ok(rows)
}
/// Step 5b: holds each file a new message carries for every local device the message went to
/// (`media_holds`, released by the media sweep once the device acknowledged past it), if the
/// sender references the file; a file already marked unreferenced is referenced again.
pub(super) async fn hold_media(conn: &mut Conn, holds: &[Hold], rows: &[(NewEvent, Seq)]) -> Result<(), StoreError> {
    for hold in holds {
        let targets = hold.targets(rows)?;
        let Hold { id: _, sender, media, once } = hold;
        for sha256 in media {
            let referenced: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM media_refs r JOIN media m ON m.sha256 = r.sha256 \
                 WHERE r.user_id = $1 AND r.sha256 = $2)",
            )
            .bind(sender)
            .bind(sha256.as_slice())
            .fetch_one(&mut *conn)
            .await?;
            if !referenced {
                continue;
            }
            for (device, seq) in &targets {
                sqlx::query("INSERT INTO media_holds (sha256, device, seq, once, sender) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
                    .bind(sha256.as_slice())
                    .bind(device)
                    .bind(seq)
                    .bind(i64::from(*once))
                    .bind(sender)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query("UPDATE media SET unreferenced_ts = NULL WHERE sha256 = $1")
                .bind(sha256.as_slice())
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}
/// Step 6: raises each device's `acked_seq` (clamped to what exists).
pub(super) async fn apply_acks(
    conn: &mut Conn,
    acks: HashMap<DevicePk, Seq>,
    next_seq: &mut HashMap<DevicePk, Seq>,
) -> Result<(), StoreError> {
    let mut clamped = Vec::with_capacity(acks.len());
    for (device, seq) in acks {
        if let Some(next) = peek_next_seq(next_seq, device) {
            // `next` is at least 1, and the clamped position fits: it is stored already.
            clamped.push((device, i64::try_from(seq.min(Seq::new(next.get() - 1)))?));
        }
    }
    // In device order: two workers acknowledging for one device (its connection moving from
    // one to the other) then take its row in the same order.
    clamped.sort_unstable();
    // (Acknowledged rows were deleted before the batch locked its devices: see `apply_plan`.)
    conn.raise_acked(&clamped).await?;
    Ok(())
}
/// Step 7: records when users and devices were last online.
pub(super) async fn record_last_seen(conn: &mut Conn, last_seen: &[(UserPk, DevicePk, Timestamp)]) -> Result<(), StoreError> {
    for (user, device, ts) in last_seen {
        let ts = i64::try_from(*ts)?;
        sqlx::query("UPDATE users SET last_seen_ts = $1 WHERE id = $2").bind(ts).bind(user).execute(&mut *conn).await?;
        sqlx::query("UPDATE devices SET last_seen_ts = $1 WHERE id = $2").bind(ts).bind(device).execute(&mut *conn).await?;
    }
    Ok(())
}
/// The next sequence number of `device` without taking it; `None` if the device is gone (the
/// batch read the heads of every device it appends to or acknowledges for).
fn peek_next_seq(cache: &HashMap<DevicePk, Seq>, device: DevicePk) -> Option<Seq> {
    cache.get(&device).copied()
}

/// Takes the next sequence number of `device`; `None` if the device is gone.
fn allocate_seq(cache: &mut HashMap<DevicePk, Seq>, device: DevicePk) -> Option<Seq> {
    let next = peek_next_seq(cache, device)?;
    cache.insert(device, next.next());
    Some(next)
}
