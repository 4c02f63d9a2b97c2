//! Group streams and cursors (migration 0007, `spec/groups.md`): the hub's public state of the
//! groups it orders (`hub_groups`), each group message once per server (`group_messages`), and
//! each local member device's window and cursor (`group_devices`). These writes are not on the
//! 1:1 hot path: they run in their own write transactions beside the group-commit writer.

use crate::storage::writer::Outbound;
use crate::storage::BeginWrite as _;
use crate::storage::{stored_now, DevicePk, Store, StoreError};
use parley_spec::error::DeviceRef;
use parley_spec::v1::groups::{GroupEventKind, GroupReceipt};
use parley_spec::{DeviceId, GroupId, GroupSeq, ServerName, Timestamp, UserId};
use sqlx::{QueryBuilder, Row as _};
use std::collections::HashMap;

/// Rows per multi-row statement (well below SQLite's limit of bound parameters).
const ROWS_PER_STATEMENT: usize = 300;
use uuid::Uuid;

/// One message of a group stream.
#[derive(Debug, Clone)]
pub struct GroupMessageRow {
    /// The group.
    pub group_id: GroupId,
    /// Its position.
    pub seq: GroupSeq,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// Application message or commit.
    pub kind: GroupEventKind,
    /// Who submitted it.
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The sender's id for it.
    pub client_msg_id: Uuid,
    /// The `MLSMessage`.
    pub message: Vec<u8>,
    /// When the hub stored it.
    pub ts: Timestamp,
    /// For a commit that adds devices of this server: its Welcome and the new ratchet tree.
    pub welcome: Option<(Vec<u8>, Vec<u8>)>,
}

/// The hub's record of a group it orders.
#[derive(Debug)]
pub struct HubRecord {
    /// The current epoch.
    pub epoch: u64,
    /// The last position given.
    pub last_seq: GroupSeq,
    /// The public MLS state (`HubGroup::state_bytes`).
    pub state: Vec<u8>,
}

/// What the hub writes with a message it accepted.
#[derive(Debug)]
pub struct HubUpdate {
    /// The epoch after the message.
    pub epoch: u64,
    /// The new public state, when a commit changed it.
    pub state: Option<Vec<u8>>,
}

/// A local device's membership of a group.
#[derive(Debug, Clone)]
pub struct GroupDeviceRow {
    /// The group.
    pub group_id: GroupId,
    /// Its first position for the device (its Welcome; 0 for the creator).
    pub from_seq: GroupSeq,
    /// Its last position for the device (the commit that removed it), if removed.
    pub until_seq: Option<GroupSeq>,
    /// The last position it acknowledged.
    pub acked: GroupSeq,
}

/// Local member devices that receive a position, with whether it is their Welcome.
#[derive(Debug, Clone, Copy)]
pub struct Recipient {
    /// The device.
    pub device: DevicePk,
    /// The position is the commit that added it.
    pub welcome: bool,
}

fn corrupt(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value}"))
}

fn seq(value: i64) -> Result<GroupSeq, StoreError> {
    Ok(GroupSeq::try_from(value)?)
}

impl Store {
    /// The hub's record of `group`, if this server orders it.
    pub async fn hub_group(&self, group: &GroupId) -> Result<Option<HubRecord>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let row = sqlx::query("SELECT epoch, last_seq, state FROM hub_groups WHERE group_id = $1")
                .bind(group.as_str())
                .fetch_optional(pool)
                .await?;
            row.map(|row| {
                Ok(HubRecord {
                    epoch: u64::try_from(row.try_get::<i64, _>(0)?).map_err(|e| corrupt("epoch", e))?,
                    last_seq: seq(row.try_get(1)?)?,
                    state: row.try_get(2)?,
                })
            })
            .transpose()
        })
    }

    /// Registers a new group ordered by this server at epoch 0 with its creator's device as the
    /// only member. `Conflict` if the id is taken.
    pub async fn create_hub_group(&self, group: &GroupId, state: &[u8], creator: DevicePk) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let now = stored_now()?;
            let mut tx = pool.begin_write().await?;
            let inserted =
            sqlx::query("INSERT INTO hub_groups (group_id, epoch, last_seq, state, created_ts) VALUES ($1, 0, 0, $2, $3) ON CONFLICT DO NOTHING")
                .bind(group.as_str())
                .bind(state)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            if inserted.rows_affected() == 0 {
                return Err(StoreError::Conflict);
            }
            sqlx::query(
                "INSERT INTO group_devices (group_id, device, from_seq, until_seq, acked) VALUES ($1, $2, 0, NULL, 0) \
             ON CONFLICT (group_id, device) DO UPDATE SET from_seq = excluded.from_seq, until_seq = excluded.until_seq, \
             acked = excluded.acked",
            )
            .bind(group.as_str())
            .bind(creator)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The stored message `client_msg_id` of `sender_device` in `group`, if any (a retried
    /// submission).
    pub async fn group_message_by_client_id(
        &self,
        group: &GroupId,
        sender: &UserId,
        sender_device: &DeviceId,
        client_msg_id: Uuid,
    ) -> Result<Option<GroupMessageRow>, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let row = sqlx::query(
                "SELECT * FROM group_messages WHERE group_id = $1 AND sender = $2 AND sender_device = $3 AND client_msg_id = $4",
            )
            .bind(group.as_str())
            .bind(sender.as_str())
            .bind(sender_device.as_str())
            .bind(client_msg_id.to_string())
            .fetch_optional(pool)
            .await?;
            row.map(|row| fns::message_row(&row, group)).transpose()
        })
    }

    /// Stores a group message in one transaction with everything that goes with it: on the hub
    /// the new epoch, last position and public state (`hub`) and the fan-out items to the other
    /// participating servers (`outbound`); on any server the windows of the local devices the
    /// message adds (`added`: their stream starts here, with their Welcome) and removes
    /// (`removed`: their stream ends here). Devices of other servers in `added` and `removed`
    /// are skipped. Returns false, and writes nothing, if the position was stored before.
    pub async fn store_group_message(
        &self,
        message: &GroupMessageRow,
        hub: Option<HubUpdate>,
        added: &[DeviceRef],
        removed: &[DeviceRef],
        local: &ServerName,
        outbound: Vec<Outbound>,
    ) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let group = message.group_id.as_str();
            let position = i64::try_from(message.seq)?;
            let (welcome, tree) = message.welcome.clone().unzip();
            let mut tx = pool.begin_write().await?;
            let inserted = sqlx::query(
                "INSERT INTO group_messages (group_id, group_seq, epoch, kind, sender, sender_device, client_msg_id, \
             message, ts, welcome, ratchet_tree) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT DO NOTHING",
            )
            .bind(group)
            .bind(position)
            .bind(i64::try_from(message.epoch).map_err(|e| corrupt("epoch", e))?)
            .bind(message.kind.as_str())
            .bind(message.sender.as_str())
            .bind(message.sender_device.as_str())
            .bind(message.client_msg_id.to_string())
            .bind(&message.message)
            .bind(i64::try_from(message.ts)?)
            .bind(welcome)
            .bind(tree)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Ok(false);
            }
            if let Some(hub) = hub {
                let epoch = i64::try_from(hub.epoch).map_err(|e| corrupt("epoch", e))?;
                sqlx::query("UPDATE hub_groups SET epoch = $1, last_seq = $2, state = coalesce($3, state) WHERE group_id = $4")
                    .bind(epoch)
                    .bind(position)
                    .bind(hub.state)
                    .bind(group)
                    .execute(&mut *tx)
                    .await?;
            }
            for device in added.iter().filter(|d| d.user.is_of(local)) {
                if let Some(pk) = fns::local_device(&mut tx, device).await? {
                    sqlx::query(
                        "INSERT INTO group_devices (group_id, device, from_seq, until_seq, acked) VALUES ($1, $2, $3, NULL, $4) \
                     ON CONFLICT (group_id, device) DO UPDATE SET from_seq = excluded.from_seq, \
                     until_seq = excluded.until_seq, acked = excluded.acked",
                    )
                    .bind(group)
                    .bind(pk)
                    .bind(position)
                    .bind(position - 1)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            for device in removed.iter().filter(|d| d.user.is_of(local)) {
                if let Some(pk) = fns::local_device(&mut tx, device).await? {
                    sqlx::query(
                        "UPDATE group_devices SET until_seq = $1 WHERE group_id = $2 AND device = $3 AND until_seq IS NULL",
                    )
                    .bind(position)
                    .bind(group)
                    .bind(pk)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            fns::writer_steps::queue_outbound(&mut tx, outbound).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// The local devices that receive position `seq` of `group`.
    pub async fn group_recipients(&self, group: &GroupId, seq: GroupSeq) -> Result<Vec<Recipient>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let position = i64::try_from(seq)?;
            let rows = sqlx::query(
                "SELECT device, from_seq FROM group_devices WHERE group_id = $1 AND from_seq <= $2 \
             AND (until_seq IS NULL OR until_seq >= $3)",
            )
            .bind(group.as_str())
            .bind(position)
            .bind(position)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|row| Ok(Recipient { device: row.try_get(0)?, welcome: row.try_get::<i64, _>(1)? == position }))
                .collect()
        })
    }

    /// The groups of a local device, with its window and cursor in each.
    pub async fn groups_of_device(&self, device: DevicePk) -> Result<Vec<GroupDeviceRow>, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let rows =
                sqlx::query("SELECT group_id, from_seq, until_seq, acked FROM group_devices WHERE device = $1 ORDER BY group_id")
                    .bind(device)
                    .fetch_all(pool)
                    .await?;
            rows.iter().map(fns::device_row).collect()
        })
    }

    /// The window and cursor of a local device in one group, if it is (or was, until it
    /// acknowledged its removal) a member.
    pub async fn group_device(&self, group: &GroupId, device: DevicePk) -> Result<Option<GroupDeviceRow>, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let row =
                sqlx::query("SELECT group_id, from_seq, until_seq, acked FROM group_devices WHERE group_id = $1 AND device = $2")
                    .bind(group.as_str())
                    .bind(device)
                    .fetch_optional(pool)
                    .await?;
            row.as_ref().map(fns::device_row).transpose()
        })
    }

    /// Up to `limit` messages of `group` after `after` and at most `until`, in order.
    pub async fn group_messages_after(
        &self,
        group: &GroupId,
        after: GroupSeq,
        until: Option<GroupSeq>,
        limit: u32,
    ) -> Result<Vec<GroupMessageRow>, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let until = match until {
                Some(until) => i64::try_from(until)?,
                None => i64::MAX,
            };
            let rows = sqlx::query(
            "SELECT * FROM group_messages WHERE group_id = $1 AND group_seq > $2 AND group_seq <= $3 ORDER BY group_seq LIMIT $4",
        )
        .bind(group.as_str())
        .bind(i64::try_from(after)?)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
            rows.iter().map(|row| fns::message_row(row, group)).collect()
        })
    }

    /// The last position this server holds of `group` (0 if none).
    pub async fn latest_group_seq(&self, group: &GroupId) -> Result<GroupSeq, StoreError> {
        on_pool!(&self.pool, |pool| {
            let latest: Option<i64> = sqlx::query_scalar("SELECT max(group_seq) FROM group_messages WHERE group_id = $1")
                .bind(group.as_str())
                .fetch_one(pool)
                .await?;
            seq(latest.unwrap_or(0))
        })
    }

    /// Moves device cursors forward (never back), in one transaction of one statement per
    /// [`ROWS_PER_STATEMENT`] cursors; a device that acknowledged the commit that removed it
    /// leaves the group's table.
    pub async fn save_group_acks(&self, acks: &[(DevicePk, GroupId, GroupSeq)]) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            if acks.is_empty() {
                return Ok(());
            }
            let rows = acks
                .iter()
                .map(|(device, group, acked)| Ok((*device, group.as_str(), i64::try_from(*acked)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let mut tx = pool.begin_write().await?;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new("WITH v (device, group_id, acked) AS (");
                query.push_values(chunk, |mut row, (device, group, acked)| {
                    row.push_bind(*device).push_bind(*group).push_bind(*acked);
                });
                query.push(if self.pool.is_postgres() {
                ") UPDATE group_devices SET acked = GREATEST(acked, (SELECT max(v.acked) FROM v WHERE v.device = group_devices.device \
                 AND v.group_id = group_devices.group_id)) WHERE (device, group_id) IN (SELECT device, group_id FROM v)"
            } else {
                ") UPDATE group_devices SET acked = max(acked, (SELECT max(v.acked) FROM v WHERE v.device = group_devices.device \
                 AND v.group_id = group_devices.group_id)) WHERE (device, group_id) IN (SELECT device, group_id FROM v)"
            });
                query.build().execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM group_devices WHERE until_seq IS NOT NULL AND acked >= until_seq").execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

impl Store {
    /// Moves receipt markers of `group` forward (never back), in one transaction; returns the
    /// markers that moved, as they are now. One read and one write statement per
    /// [`ROWS_PER_STATEMENT`] markers: the write lock is held for as short a time as possible.
    pub async fn merge_group_markers(&self, group: &GroupId, markers: &[GroupReceipt]) -> Result<Vec<GroupReceipt>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut moved = Vec::new();
            if markers.is_empty() {
                return Ok(moved);
            }
            let mut tx = pool.begin_write().await?;
            for chunk in markers.chunks(ROWS_PER_STATEMENT) {
                let mut read = QueryBuilder::new("SELECT user_id, delivered, read FROM group_markers WHERE group_id = ");
                read.push_bind(group.as_str()).push(" AND user_id IN (");
                let mut users = read.separated(", ");
                for marker in chunk {
                    users.push_bind(marker.user.as_str());
                }
                read.push(")");
                let mut old: HashMap<String, (GroupSeq, GroupSeq)> = HashMap::with_capacity(chunk.len());
                for row in read.build().fetch_all(&mut *tx).await? {
                    old.insert(row.try_get(0)?, (seq(row.try_get(1)?)?, seq(row.try_get(2)?)?));
                }
                let mut changed = Vec::new();
                for marker in chunk {
                    let (old_delivered, old_read) = old.get(marker.user.as_str()).copied().unwrap_or_default();
                    let read = old_read.max(marker.read);
                    let delivered = old_delivered.max(marker.delivered).max(read);
                    if (delivered, read) != (old_delivered, old_read) {
                        old.insert(marker.user.as_str().to_owned(), (delivered, read));
                        changed.push(GroupReceipt::new(marker.user.clone(), delivered, read));
                    }
                }
                if changed.is_empty() {
                    continue;
                }
                // One row per user (a chunk may name a user twice): the last values, which `old` holds.
                let mut written = std::collections::HashSet::new();
                let rows = changed
                    .iter()
                    .filter(|m| written.insert(m.user.as_str()))
                    .map(|m| {
                        let (delivered, read) = old.get(m.user.as_str()).copied().unwrap_or((m.delivered, m.read));
                        Ok((m.user.as_str(), i64::try_from(delivered)?, i64::try_from(read)?))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                let mut write = QueryBuilder::new("INSERT INTO group_markers (group_id, user_id, delivered, read) ");
                write.push_values(rows, |mut row, (user, delivered, read)| {
                    row.push_bind(group.as_str()).push_bind(user).push_bind(delivered).push_bind(read);
                });
                write.push(" ON CONFLICT (group_id, user_id) DO UPDATE SET delivered = excluded.delivered, read = excluded.read");
                write.build().execute(&mut *tx).await?;
                moved.extend(changed);
            }
            tx.commit().await?;
            Ok(moved)
        })
    }

    /// The local devices in `group` now whose user sent one of the group's last `window`
    /// application messages (`local` is this server's name): who is shown receipts.
    pub async fn group_recent_sender_devices(
        &self,
        group: &GroupId,
        local: &ServerName,
        window: u64,
    ) -> Result<Vec<DevicePk>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let latest = i64::try_from(self.latest_group_seq(group).await?)?;
            let since = latest.saturating_sub(i64::try_from(window).unwrap_or(i64::MAX));
            Ok(sqlx::query_scalar(
                "SELECT gd.device FROM group_devices gd JOIN devices d ON d.id = gd.device JOIN users u ON u.id = d.user_id \
             WHERE gd.group_id = $1 AND gd.until_seq IS NULL AND ('@' || u.localpart || ':' || $2) IN \
             (SELECT DISTINCT sender FROM group_messages WHERE group_id = $3 AND kind = 'application' AND group_seq > $4)",
            )
            .bind(group.as_str())
            .bind(local.as_str())
            .bind(group.as_str())
            .bind(since)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Appends items to the durable federation queue, in one transaction (the caller wakes the
    /// sender for their destinations).
    pub async fn queue_outbound(&self, outbound: Vec<Outbound>) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let mut tx = pool.begin_write().await?;
            fns::writer_steps::queue_outbound(&mut tx, outbound).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

dual! {
pub(super) fn message_row(row: &DbRow, group_id: &GroupId) -> Result<GroupMessageRow, StoreError> {
    let kind: String = row.try_get("kind")?;
    let sender: String = row.try_get("sender")?;
    let sender_device: String = row.try_get("sender_device")?;
    let client_msg_id: String = row.try_get("client_msg_id")?;
    let welcome: Option<Vec<u8>> = row.try_get("welcome")?;
    let tree: Option<Vec<u8>> = row.try_get("ratchet_tree")?;
    Ok(GroupMessageRow {
        group_id: group_id.clone(),
        seq: seq(row.try_get("group_seq")?)?,
        epoch: u64::try_from(row.try_get::<i64, _>("epoch")?).map_err(|e| corrupt("epoch", e))?,
        kind: GroupEventKind::parse(&kind).ok_or_else(|| corrupt("group message kind", &kind))?,
        sender: UserId::parse(&sender).map_err(|e| corrupt("sender", e))?,
        sender_device: DeviceId::parse(&sender_device).map_err(|e| corrupt("sender device", e))?,
        client_msg_id: client_msg_id.parse().map_err(|e| corrupt("client_msg_id", e))?,
        message: row.try_get("message")?,
        ts: Timestamp::try_from(row.try_get::<i64, _>("ts")?)?,
        welcome: welcome.zip(tree),
    })
}
/// The local device `device` of `user`, if it exists.
pub(super) async fn local_device(conn: &mut Conn, device: &DeviceRef) -> Result<Option<DevicePk>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT d.id FROM devices d JOIN users u ON u.id = d.user_id WHERE u.localpart = $1 AND d.device_id = $2",
    )
    .bind(device.user.localpart())
    .bind(device.device.as_str())
    .fetch_optional(conn)
    .await?)
}
pub(super) fn device_row(row: &DbRow) -> Result<GroupDeviceRow, StoreError> {
    let group: String = row.try_get(0)?;
    Ok(GroupDeviceRow {
        group_id: GroupId::parse(&group).map_err(|e| corrupt("group id", e))?,
        from_seq: seq(row.try_get(1)?)?,
        until_seq: row.try_get::<Option<i64>, _>(2)?.map(seq).transpose()?,
        acked: seq(row.try_get(3)?)?,
    })
}}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::testing::open;

    fn user(name: &str) -> UserId {
        UserId::parse(&format!("@{name}:b.test")).unwrap()
    }

    fn marker(name: &str, delivered: u64, read: u64) -> GroupReceipt {
        GroupReceipt::new(user(name), GroupSeq::new(delivered), GroupSeq::new(read))
    }

    #[tokio::test]
    async fn markers_only_move_forward_in_batches_larger_than_one_statement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        let group = GroupId::parse("!g:a.test").unwrap();
        let many: Vec<_> = (0..ROWS_PER_STATEMENT + 5).map(|i| marker(&format!("u{i}"), 5, 2)).collect();
        assert_eq!(store.merge_group_markers(&group, &many).await.unwrap().len(), many.len());
        // Nothing moved: nothing reported; a lower marker never moves one back; read implies delivered.
        assert!(store.merge_group_markers(&group, &many).await.unwrap().is_empty());
        assert!(store.merge_group_markers(&group, &[marker("u1", 3, 1)]).await.unwrap().is_empty());
        assert_eq!(store.merge_group_markers(&group, &[marker("u1", 4, 9)]).await.unwrap(), vec![marker("u1", 9, 9)]);
        assert_eq!(store.merge_group_markers(&group, &[marker("u2", 7, 0)]).await.unwrap(), vec![marker("u2", 7, 2)]);
        // A user named twice in one call: both moves are answered, the later values stored.
        let twice = [marker("v1", 1, 0), marker("v1", 5, 2)];
        assert_eq!(store.merge_group_markers(&group, &twice).await.unwrap(), vec![marker("v1", 1, 0), marker("v1", 5, 2)]);
        assert!(store.merge_group_markers(&group, &[marker("v1", 5, 2)]).await.unwrap().is_empty(), "(5, 2) is stored");
    }

    #[tokio::test]
    async fn group_cursors_only_move_forward_and_a_removed_device_goes_once_it_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        let (a, b) = (GroupId::parse("!a:a.test").unwrap(), GroupId::parse("!b:a.test").unwrap());
        for device in 1..=ROWS_PER_STATEMENT as i64 + 2 {
            store.create_hub_group(&GroupId::parse(&format!("!g{device}:a.test")).unwrap(), b"state", device).await.unwrap();
        }
        store.create_hub_group(&a, b"state", 1).await.unwrap();
        store.create_hub_group(&b, b"state", 1).await.unwrap();
        on_pool!(&store.pool, |pool| sqlx::query("UPDATE group_devices SET until_seq = 4 WHERE group_id = $1")
            .bind(b.as_str())
            .execute(pool)
            .await
            .unwrap()
            .rows_affected());
        let mut acks: Vec<_> = (1..=ROWS_PER_STATEMENT as i64 + 2)
            .map(|device| (device, GroupId::parse(&format!("!g{device}:a.test")).unwrap(), GroupSeq::new(3)))
            .collect();
        acks.extend([(1, a.clone(), GroupSeq::new(7)), (1, b.clone(), GroupSeq::new(3))]);
        store.save_group_acks(&acks).await.unwrap();
        store.save_group_acks(&[(1, a.clone(), GroupSeq::new(2))]).await.unwrap();
        assert_eq!(store.group_device(&a, 1).await.unwrap().unwrap().acked, GroupSeq::new(7), "never back");
        let last = GroupId::parse(&format!("!g{}:a.test", ROWS_PER_STATEMENT + 2)).unwrap();
        assert_eq!(store.group_device(&last, ROWS_PER_STATEMENT as i64 + 2).await.unwrap().unwrap().acked, GroupSeq::new(3));
        assert!(store.group_device(&b, 1).await.unwrap().is_some(), "removed at 4, acknowledged 3: still there");
        store.save_group_acks(&[(1, b.clone(), GroupSeq::new(4))]).await.unwrap();
        assert!(store.group_device(&b, 1).await.unwrap().is_none(), "acknowledged its removal: gone");
    }
}
