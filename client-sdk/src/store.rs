//! The local store: one SQLite file per account profile (sqlx, WAL). It keeps what a device
//! must not lose: its session and secrets, ratchet sessions, verified device lists of
//! contacts, message history, the outbox and the sync cursor. It also keeps the MLS client's
//! state as opaque key-value pairs ([`Store::mls_state`], [`Store::apply_mls_changes`]).
//!
//! Secrets are stored as the crypto layer serializes them. The file (and SQLite's `-wal` and
//! `-shm` files next to it) is readable by its owner only, whatever the umask; disk
//! encryption is the host's job.

#[cfg(doc)]
use crate::e2ee::CryptoStore;
use crate::e2ee::{
    AccountStore, InitialMessageId, MessageStore, OutboxEntry, PrekeyKind, SessionSlot, SessionStore, StoreError,
    SupersededSession, TrustStore, PREVIOUS_SESSIONS_KEPT,
};
use crate::groups::{GroupChanges, GroupMessage, GroupRecord, GroupState, GroupStore};
use parley_crypto::identity::{DeviceIdentity, UserIdentity, VerifiedDeviceList, DEVICE_IDENTITY_BYTES};
use parley_crypto::mls::StateChange;
use parley_crypto::prekeys::PrekeySecret;
use parley_crypto::PublicKey;
use parley_spec::v1::content::Attachment;
use parley_spec::v1::keys::SignedDeviceList;
use parley_spec::{DeviceId, GroupId, GroupSeq, ServerMsgId, Timestamp, UserId};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row as _;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;
use uuid::Uuid;
use zeroize::Zeroizing;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "store", include_str!("../migrations/0001_store.sql")),
    (2, "server id index", include_str!("../migrations/0002_server_id_index.sql")),
    (3, "previous sessions", include_str!("../migrations/0003_previous_sessions.sql")),
    (4, "mls state", include_str!("../migrations/0004_mls_state.sql")),
    (5, "groups", include_str!("../migrations/0005_groups.sql")),
    (6, "group policy", include_str!("../migrations/0006_group_policy.sql")),
    (7, "files", include_str!("../migrations/0007_files.sql")),
    (8, "temporary files", include_str!("../migrations/0008_media_once.sql")),
];

/// Key-value keys of the device's own keys and of the next one-time prekey id.
const USER_IDENTITY: &str = "user_identity";
const DEVICE_IDENTITY: &str = "device_identity";
const NEXT_PREKEY_ID: &str = "next_prekey_id";

/// A message in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Local row id (history order).
    pub local_id: i64,
    /// The other party of the conversation.
    pub peer: UserId,
    /// Who sent it.
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The sender's id for it (the same on every device).
    pub client_msg_id: Uuid,
    /// The server's id, once known.
    pub server_msg_id: Option<ServerMsgId>,
    /// Timestamp (ms).
    pub ts: Timestamp,
    /// Text (a file's caption).
    pub body: String,
    /// The file, for a file message.
    pub file: Option<Attachment>,
    /// A recipient device acknowledged it.
    pub delivered: bool,
    /// The recipient read it.
    pub read: bool,
}

/// The store of one profile. Besides what [`Store`]'s own methods offer to the application
/// (history, outbox, the profile's key-value table), it is the SQLite [`CryptoStore`] of the
/// [`E2eeMachine`](crate::e2ee::E2eeMachine).
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating, owner-only) the store file and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        make_private(path).map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", path.display()).into()))?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await.map_err(backend)?;
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                sqlx::migrate::Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    sqlx::migrate::MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect::<Vec<_>>();
        let migrator =
            sqlx::migrate::Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false };
        migrator.run(&pool).await.map_err(backend)?;
        Ok(Self { pool })
    }

    /// A value of the key-value table (account, identity secrets, cursor).
    pub async fn get(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let value: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM kv WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(value.map(Zeroizing::new))
    }

    /// Sets a value of the key-value table.
    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// The last `limit` messages with `peer`, oldest first.
    pub async fn history(&self, peer: &UserId, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, peer, sender, sender_device, client_msg_id, server_msg_id, ts, body, delivered, read, file FROM \
             (SELECT * FROM messages WHERE peer = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
        )
        .bind(peer.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let text = |i: usize| r.try_get::<&str, _>(i).map_err(backend);
                Ok(StoredMessage {
                    local_id: r.try_get(0).map_err(backend)?,
                    peer: UserId::parse(text(1)?).map_err(|_| StoreError::Damaged("message peer"))?,
                    sender: UserId::parse(text(2)?).map_err(|_| StoreError::Damaged("message sender"))?,
                    sender_device: DeviceId::parse(text(3)?).map_err(|_| StoreError::Damaged("message sender device"))?,
                    client_msg_id: Uuid::parse_str(text(4)?).map_err(|_| StoreError::Damaged("message client_msg_id"))?,
                    server_msg_id: r
                        .try_get::<Option<i64>, _>(5)
                        .map_err(backend)?
                        .map(ServerMsgId::try_from)
                        .transpose()
                        .map_err(|_| StoreError::Damaged("message server_msg_id"))?,
                    ts: Timestamp::try_from(r.try_get::<i64, _>(6).map_err(backend)?)
                        .map_err(|_| StoreError::Damaged("message ts"))?,
                    body: r.try_get(7).map_err(backend)?,
                    delivered: r.try_get(8).map_err(backend)?,
                    read: r.try_get(9).map_err(backend)?,
                    file: file_of(r.try_get(10).map_err(backend)?, "message file")?,
                })
            })
            .collect()
    }

    /// The outbox, oldest first.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query("SELECT client_msg_id, to_user, body, file, media_once FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let (id, to, body): (String, String, String) =
                    (r.try_get(0).map_err(backend)?, r.try_get(1).map_err(backend)?, r.try_get(2).map_err(backend)?);
                Ok(OutboxEntry {
                    client_msg_id: id.parse().map_err(|_| StoreError::Damaged("outbox message id"))?,
                    to: to.parse().map_err(|_| StoreError::Damaged("outbox recipient"))?,
                    body,
                    file: file_of(r.try_get(3).map_err(backend)?, "outbox file")?,
                    media_once: r.try_get(4).map_err(backend)?,
                })
            })
            .collect()
    }

    /// Removes an entry from the outbox (answered `sent`, refused for good, or given up).
    pub async fn dequeue(&self, client_msg_id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM outbox WHERE client_msg_id = ?")
            .bind(client_msg_id.to_string())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// The MLS client's stored state, to build it from
    /// ([`MlsClient::with_state`](parley_crypto::mls::MlsClient::with_state)).
    pub async fn mls_state(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let rows = sqlx::query("SELECT key, value FROM mls_state").fetch_all(&self.pool).await.map_err(backend)?;
        rows.into_iter().map(|r| Ok((r.try_get(0).map_err(backend)?, r.try_get(1).map_err(backend)?))).collect()
    }

    /// Writes what the MLS client reported as changed
    /// ([`MlsClient::take_state_changes`](parley_crypto::mls::MlsClient::take_state_changes)),
    /// all or nothing: a crash never leaves half of an operation's state on disk.
    pub async fn apply_mls_changes(&self, changes: &[StateChange]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        for change in changes {
            let query = match &change.value {
                Some(value) => sqlx::query("INSERT OR REPLACE INTO mls_state (key, value) VALUES (?, ?)")
                    .bind(change.key.as_slice())
                    .bind(value.as_slice()),
                None => sqlx::query("DELETE FROM mls_state WHERE key = ?").bind(change.key.as_slice()),
            };
            query.execute(&mut *tx).await.map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    /// The pinned identity key of `user` (from the verified device list), if any.
    pub async fn pinned_identity_key(&self, user: &UserId) -> Result<Option<PublicKey>, StoreError> {
        let key: Option<Vec<u8>> = sqlx::query_scalar("SELECT identity_key FROM device_lists WHERE user_id = ?")
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        key.map(|key| PublicKey::from_bytes(&key).map_err(|_| StoreError::Damaged("pinned identity key"))).transpose()
    }
}

impl AccountStore for Store {
    async fn account(&self) -> Result<Option<(UserIdentity, DeviceIdentity)>, StoreError> {
        let (Some(user), Some(device)) = (self.get(USER_IDENTITY).await?, self.get(DEVICE_IDENTITY).await?) else {
            return Ok(None);
        };
        let user: &[u8; 32] = user.as_slice().try_into().map_err(|_| StoreError::Damaged("user identity"))?;
        let device: &[u8; DEVICE_IDENTITY_BYTES] =
            device.as_slice().try_into().map_err(|_| StoreError::Damaged("device keys"))?;
        Ok(Some((UserIdentity::from_bytes(user), DeviceIdentity::from_bytes(device))))
    }

    async fn save_account(&self, identity: &UserIdentity, device: &DeviceIdentity) -> Result<(), StoreError> {
        self.set(USER_IDENTITY, identity.to_bytes().as_slice()).await?;
        self.set(DEVICE_IDENTITY, device.to_bytes().as_slice()).await
    }

    async fn prekey(&self, kind: PrekeyKind, key_id: u32) -> Result<Option<PrekeySecret>, StoreError> {
        let secret: Option<Vec<u8>> = sqlx::query_scalar("SELECT secret FROM prekeys WHERE kind = ? AND key_id = ?")
            .bind(kind.as_str())
            .bind(i64::from(key_id))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        let secret = secret.map(Zeroizing::new);
        secret.map(|s| PrekeySecret::from_bytes(&s).map_err(|_| StoreError::Damaged("prekey secret"))).transpose()
    }

    async fn save_prekey(&self, kind: PrekeyKind, key_id: u32, secret: &PrekeySecret) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO prekeys (kind, key_id, secret) VALUES (?, ?, ?)")
            .bind(kind.as_str())
            .bind(i64::from(key_id))
            .bind(secret.to_bytes().as_slice())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn delete_prekey(&self, kind: PrekeyKind, key_id: u32) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM prekeys WHERE kind = ? AND key_id = ?")
            .bind(kind.as_str())
            .bind(i64::from(key_id))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn next_one_time_prekey_id(&self) -> Result<Option<u32>, StoreError> {
        let Some(bytes) = self.get(NEXT_PREKEY_ID).await? else { return Ok(None) };
        // Older versions read an unparsable value as "none yet"; so does this one.
        Ok(std::str::from_utf8(&bytes).ok().and_then(|s| s.parse().ok()))
    }

    async fn set_next_one_time_prekey_id(&self, next: u32) -> Result<(), StoreError> {
        self.set(NEXT_PREKEY_ID, next.to_string().as_bytes()).await
    }
}

impl SessionStore for Store {
    async fn session(&self, user: &UserId, device: &DeviceId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let state: Option<Vec<u8>> = sqlx::query_scalar("SELECT state FROM sessions WHERE user_id = ? AND device_id = ?")
            .bind(user.as_str())
            .bind(device.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(state.map(Zeroizing::new))
    }

    async fn save_session(&self, user: &UserId, device: &DeviceId, state: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO sessions (user_id, device_id, state) VALUES (?, ?, ?)")
            .bind(user.as_str())
            .bind(device.as_str())
            .bind(state)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn archive_session(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        let Some(state) = self.session(user, device).await? else { return Ok(()) };
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let next: i64 =
            sqlx::query_scalar("SELECT coalesce(max(slot), 0) + 1 FROM previous_sessions WHERE user_id = ? AND device_id = ?")
                .bind(user.as_str())
                .bind(device.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(backend)?;
        sqlx::query("INSERT INTO previous_sessions (user_id, device_id, slot, state) VALUES (?, ?, ?, ?)")
            .bind(user.as_str())
            .bind(device.as_str())
            .bind(next)
            .bind(state.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        sqlx::query("DELETE FROM previous_sessions WHERE user_id = ? AND device_id = ? AND slot <= ?")
            .bind(user.as_str())
            .bind(device.as_str())
            .bind(next - PREVIOUS_SESSIONS_KEPT as i64)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)
    }

    async fn previous_sessions(&self, user: &UserId, device: &DeviceId) -> Result<Vec<SupersededSession>, StoreError> {
        let rows =
            sqlx::query("SELECT slot, state FROM previous_sessions WHERE user_id = ? AND device_id = ? ORDER BY slot DESC")
                .bind(user.as_str())
                .bind(device.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                Ok(SupersededSession { slot: SessionSlot(r.try_get(0)?), state: Zeroizing::new(r.try_get::<Vec<u8>, _>(1)?) })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(backend)
    }

    async fn save_previous_session(
        &self,
        user: &UserId,
        device: &DeviceId,
        slot: SessionSlot,
        state: &[u8],
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE previous_sessions SET state = ? WHERE user_id = ? AND device_id = ? AND slot = ?")
            .bind(state)
            .bind(user.as_str())
            .bind(device.as_str())
            .bind(slot.0)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn initial_message_seen(&self, id: &InitialMessageId) -> Result<bool, StoreError> {
        Ok(self.get(&initial_key(id)).await?.is_some())
    }

    async fn mark_initial_message_seen(&self, id: &InitialMessageId) -> Result<(), StoreError> {
        self.set(&initial_key(id), b"1").await
    }
}

impl TrustStore for Store {
    async fn device_list(&self, user: &UserId) -> Result<Option<SignedDeviceList>, StoreError> {
        let json: Option<Vec<u8>> = sqlx::query_scalar("SELECT json FROM device_lists WHERE user_id = ?")
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        json.map(|json| serde_json::from_slice(&json).map_err(|_| StoreError::Damaged("device list"))).transpose()
    }

    async fn save_device_list(&self, list: &VerifiedDeviceList) -> Result<(), StoreError> {
        let json = serde_json::to_vec(list.signed()).map_err(backend)?;
        sqlx::query("INSERT OR REPLACE INTO device_lists (user_id, version, identity_key, json) VALUES (?, ?, ?, ?)")
            .bind(list.user_id().as_str())
            .bind(list.version() as i64)
            .bind(list.identity_key().as_bytes().as_slice())
            .bind(json)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn forget_device_list(&self, user: &UserId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM device_lists WHERE user_id = ?")
            .bind(user.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

impl MessageStore for Store {
    async fn enqueue(&self, entry: &OutboxEntry, now: Timestamp) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR IGNORE INTO outbox (client_msg_id, to_user, body, created_ts, file, media_once) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(entry.client_msg_id.to_string())
        .bind(entry.to.as_str())
        .bind(&entry.body)
        .bind(i64::try_from(now).map_err(backend)?)
        .bind(file_json(entry.file.as_ref())?)
        .bind(entry.media_once)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        Store::outbox(self).await
    }

    async fn dequeue(&self, client_msg_id: Uuid) -> Result<(), StoreError> {
        Store::dequeue(self, client_msg_id).await
    }

    async fn add_message(&self, message: &StoredMessage) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO messages (peer, sender, sender_device, client_msg_id, server_msg_id, ts, body, file) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(message.peer.as_str())
        .bind(message.sender.as_str())
        .bind(message.sender_device.as_str())
        .bind(message.client_msg_id.to_string())
        .bind(message.server_msg_id.map(i64::try_from).transpose().map_err(backend)?)
        .bind(i64::try_from(message.ts).map_err(backend)?)
        .bind(&message.body)
        .bind(file_json(message.file.as_ref())?)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn has_server_message(&self, sender: &UserId, server_msg_id: ServerMsgId) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM messages WHERE sender = ? AND server_msg_id = ?")
            .bind(sender.as_str())
            .bind(i64::try_from(server_msg_id).map_err(backend)?)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(found.is_some())
    }

    async fn mark_sent(
        &self,
        sender: &UserId,
        client_msg_id: Uuid,
        server_msg_id: ServerMsgId,
        ts: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE messages SET server_msg_id = ?, ts = ? WHERE sender = ? AND client_msg_id = ?")
            .bind(i64::try_from(server_msg_id).map_err(backend)?)
            .bind(i64::try_from(ts).map_err(backend)?)
            .bind(sender.as_str())
            .bind(client_msg_id.to_string())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn mark_receipt(
        &self,
        peer: &UserId,
        sender: &UserId,
        server_msg_ids: &[ServerMsgId],
        read: bool,
    ) -> Result<Vec<ServerMsgId>, StoreError> {
        let column = if read { "read = 1, delivered = 1" } else { "delivered = 1" };
        let ids: Vec<String> = server_msg_ids.iter().filter_map(|id| i64::try_from(*id).ok()).map(|id| id.to_string()).collect();
        let marked: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE messages SET {column} WHERE peer = ? AND sender = ? \
             AND server_msg_id IN (SELECT value FROM json_each(?)) RETURNING server_msg_id"
        ))
        .bind(peer.as_str())
        .bind(sender.as_str())
        .bind(format!("[{}]", ids.join(",")))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        let mut marked: BTreeSet<ServerMsgId> =
            marked.into_iter().map(ServerMsgId::try_from).collect::<Result<_, _>>().map_err(backend)?;
        Ok(server_msg_ids.iter().copied().filter(|id| marked.remove(id)).collect())
    }
}

/// A conversation of the history: a 1:1 peer or a group, with its latest message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The peer, or the group (as its id text, `!…`).
    pub id: String,
    /// The time of its latest message (or of the group's creation or last change).
    pub last_ts: Timestamp,
    /// Its latest message, if any.
    pub last_body: Option<String>,
    /// The group's name, for a group that has one.
    pub name: Option<String>,
}

impl Store {
    /// Every conversation, 1:1 and group together, latest first.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let rows = sqlx::query(
            "SELECT peer, ts, body, NULL FROM messages m WHERE id = (SELECT max(id) FROM messages WHERE peer = m.peer) \
             UNION ALL \
             SELECT g.group_id, max(g.last_ts, coalesce(gm.ts, 0)), gm.body, g.name FROM groups g \
             LEFT JOIN group_messages gm ON gm.id = (SELECT max(id) FROM group_messages WHERE group_id = g.group_id) \
             ORDER BY 2 DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                Ok(Conversation {
                    id: r.try_get(0).map_err(backend)?,
                    last_ts: Timestamp::try_from(r.try_get::<i64, _>(1).map_err(backend)?)
                        .map_err(|_| StoreError::Damaged("conversation ts"))?,
                    last_body: r.try_get(2).map_err(backend)?,
                    name: r.try_get(3).map_err(backend)?,
                })
            })
            .collect()
    }
}

fn group_record(r: &sqlx::sqlite::SqliteRow) -> Result<GroupRecord, StoreError> {
    let text = |i: usize| r.try_get::<&str, _>(i).map_err(backend);
    let number = |i: usize, what: &'static str| {
        r.try_get::<i64, _>(i).map_err(backend).and_then(|n| u64::try_from(n).map_err(|_| StoreError::Damaged(what)))
    };
    let pending: Option<Vec<u8>> = r.try_get(6).map_err(backend)?;
    Ok(GroupRecord {
        group_id: GroupId::parse(text(0)?).map_err(|_| StoreError::Damaged("group id"))?,
        name: r.try_get(1).map_err(backend)?,
        state: GroupState::parse(text(2)?).ok_or(StoreError::Damaged("group state"))?,
        problem: r.try_get(3).map_err(backend)?,
        cursor: GroupSeq::new(number(4, "group cursor")?),
        epoch: number(5, "group epoch")?,
        pending: pending
            .map(|json| serde_json::from_slice(&json).map_err(|_| StoreError::Damaged("pending group commit")))
            .transpose()?,
        created_ts: Timestamp::from_millis(number(7, "group created_ts")?),
        last_ts: Timestamp::from_millis(number(8, "group last_ts")?),
        policy: r
            .try_get::<Option<&str>, _>(9)
            .map_err(backend)?
            .map(|json| serde_json::from_str(json).map_err(|_| StoreError::Damaged("group policy")))
            .transpose()?
            .unwrap_or_default(),
    })
}

const GROUP_COLUMNS: &str = "group_id, name, state, problem, cursor, epoch, pending, created_ts, last_ts, policy";

impl GroupStore for Store {
    async fn mls_state(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        Store::mls_state(self).await
    }

    async fn apply_group_changes(&self, changes: &GroupChanges) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        for change in &changes.mls {
            let query = match &change.value {
                Some(value) => sqlx::query("INSERT OR REPLACE INTO mls_state (key, value) VALUES (?, ?)")
                    .bind(change.key.as_slice())
                    .bind(value.as_slice()),
                None => sqlx::query("DELETE FROM mls_state WHERE key = ?").bind(change.key.as_slice()),
            };
            query.execute(&mut *tx).await.map_err(backend)?;
        }
        if let Some(record) = &changes.record {
            let pending = record.pending.as_ref().map(serde_json::to_vec).transpose().map_err(backend)?;
            sqlx::query(&format!("INSERT OR REPLACE INTO groups ({GROUP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"))
                .bind(record.group_id.as_str())
                .bind(record.name.as_deref())
                .bind(record.state.as_str())
                .bind(record.problem.as_deref())
                .bind(i64::try_from(record.cursor).map_err(backend)?)
                .bind(i64::try_from(record.epoch).map_err(backend)?)
                .bind(pending)
                .bind(i64::try_from(record.created_ts).map_err(backend)?)
                .bind(i64::try_from(record.last_ts).map_err(backend)?)
                .bind(serde_json::to_string(&record.policy).map_err(backend)?)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        for message in &changes.messages {
            sqlx::query(
                "INSERT INTO group_messages (group_id, group_seq, sender, sender_device, client_msg_id, ts, body, file) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (group_id, sender, client_msg_id) DO UPDATE \
                 SET group_seq = excluded.group_seq, ts = excluded.ts WHERE group_seq IS NULL",
            )
            .bind(message.group_id.as_str())
            .bind(message.group_seq.map(i64::try_from).transpose().map_err(backend)?)
            .bind(message.sender.as_str())
            .bind(message.sender_device.as_str())
            .bind(message.client_msg_id.to_string())
            .bind(i64::try_from(message.ts).map_err(backend)?)
            .bind(&message.body)
            .bind(file_json(message.file.as_ref())?)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        for confirmed in &changes.confirmations {
            sqlx::query(
                "UPDATE group_messages SET group_seq = ?, ts = ? \
                 WHERE group_id = ? AND sender = ? AND client_msg_id = ? AND group_seq IS NULL",
            )
            .bind(i64::try_from(confirmed.group_seq).map_err(backend)?)
            .bind(i64::try_from(confirmed.ts).map_err(backend)?)
            .bind(confirmed.group_id.as_str())
            .bind(confirmed.sender.as_str())
            .bind(confirmed.client_msg_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        if let Some(group_id) = &changes.delete {
            for table in ["groups", "group_messages"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE group_id = ?"))
                    .bind(group_id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
            }
        }
        tx.commit().await.map_err(backend)
    }

    async fn group(&self, group_id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {GROUP_COLUMNS} FROM groups WHERE group_id = ?"))
            .bind(group_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.as_ref().map(group_record).transpose()
    }

    async fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {GROUP_COLUMNS} FROM groups ORDER BY last_ts DESC"))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(group_record).collect()
    }

    async fn group_history(&self, group_id: &GroupId, limit: u32) -> Result<Vec<GroupMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, group_id, group_seq, sender, sender_device, client_msg_id, ts, body, file FROM \
             (SELECT * FROM group_messages WHERE group_id = ? \
              ORDER BY group_seq IS NULL DESC, group_seq DESC, id DESC LIMIT ?) \
             ORDER BY group_seq IS NULL, group_seq, id",
        )
        .bind(group_id.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|r| {
                let text = |i: usize| r.try_get::<&str, _>(i).map_err(backend);
                Ok(GroupMessage {
                    local_id: r.try_get(0).map_err(backend)?,
                    group_id: GroupId::parse(text(1)?).map_err(|_| StoreError::Damaged("group message group"))?,
                    group_seq: r
                        .try_get::<Option<i64>, _>(2)
                        .map_err(backend)?
                        .map(GroupSeq::try_from)
                        .transpose()
                        .map_err(|_| StoreError::Damaged("group message group_seq"))?,
                    sender: UserId::parse(text(3)?).map_err(|_| StoreError::Damaged("group message sender"))?,
                    sender_device: DeviceId::parse(text(4)?).map_err(|_| StoreError::Damaged("group message device"))?,
                    client_msg_id: Uuid::parse_str(text(5)?).map_err(|_| StoreError::Damaged("group message id"))?,
                    ts: Timestamp::try_from(r.try_get::<i64, _>(6).map_err(backend)?)
                        .map_err(|_| StoreError::Damaged("group message ts"))?,
                    body: r.try_get(7).map_err(backend)?,
                    file: file_of(r.try_get(8).map_err(backend)?, "group message file")?,
                })
            })
            .collect()
    }
}

/// The key-value key that marks an accepted session start (as earlier versions wrote it).
/// An attachment column's JSON (`NULL` for a text).
fn file_json(file: Option<&Attachment>) -> Result<Option<String>, StoreError> {
    file.map(serde_json::to_string).transpose().map_err(backend)
}

/// An attachment column's value.
fn file_of(json: Option<String>, what: &'static str) -> Result<Option<Attachment>, StoreError> {
    json.map(|json| serde_json::from_str(&json).map_err(|_| StoreError::Damaged(what))).transpose()
}

fn initial_key(id: &InitialMessageId) -> String {
    let hex: String = id.0.iter().map(|b| format!("{b:02x}")).collect();
    format!("initial:{hex}")
}

/// Creates the SQLite file `path` (empty, which SQLite takes as a new database) readable and
/// writable by its owner only, before SQLite would create it with the umask's mode; SQLite
/// gives the `-wal` and `-shm` files the database file's mode. Existing files (from an older
/// version) lose group and other permissions.
pub fn make_private(path: &Path) -> std::io::Result<()> {
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

fn backend(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        s.parse().unwrap()
    }

    fn id(n: u64) -> ServerMsgId {
        ServerMsgId::new(n)
    }

    /// An attachment with every optional field set.
    fn attachment() -> Attachment {
        use parley_spec::v1::content::{MediaRef, Thumbnail};
        let media = MediaRef::from_parts(vec![1; 32], vec![2; 7], vec![3; 32], 1234, "image/png");
        Attachment::new("x", "03".repeat(32), media)
            .with_name("cat.png")
            .with_image((640, 480), Some(Thumbnail::new("image/jpeg", 64, 48, vec![4; 100])))
    }

    fn message_to(peer: &str, client_msg_id: u128, server_msg_id: Option<u64>) -> StoredMessage {
        message(peer, client_msg_id, server_msg_id)
    }

    fn message(peer: &str, client_msg_id: u128, server_msg_id: Option<u64>) -> StoredMessage {
        StoredMessage {
            local_id: 0,
            peer: user(peer),
            sender: user("@a:x"),
            sender_device: "A".parse().unwrap(),
            client_msg_id: Uuid::from_u128(client_msg_id),
            server_msg_id: server_msg_id.map(id),
            ts: Timestamp::from_millis(1),
            body: "hi".into(),
            file: None,
            delivered: false,
            read: false,
        }
    }

    #[tokio::test]
    async fn history_outbox_and_secrets_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.db");
        let (b, d): (UserId, DeviceId) = (user("@b:x"), "D".parse().unwrap());
        let secret = PrekeySecret::from_bytes(&[7; 32]).unwrap();
        let m1 = Uuid::from_u128(1);
        let m2 = Uuid::from_u128(2);
        {
            let store = Store::open(&path).await.unwrap();
            store.set("cursor", b"42").await.unwrap();
            store.save_session(&b, &d, b"state").await.unwrap();
            store.save_prekey(PrekeyKind::OneTime, 7, &secret).await.unwrap();
            store.set_next_one_time_prekey_id(8).await.unwrap();
            assert!(store.add_message(&message("@b:x", 1, None)).await.unwrap());
            assert!(!store.add_message(&message("@b:x", 1, None)).await.unwrap(), "deduplicated");
            store.mark_sent(&user("@a:x"), m1, id(99), Timestamp::from_millis(2)).await.unwrap();
            assert_eq!(store.mark_receipt(&b, &user("@a:x"), &[id(99), id(5), id(99)], false).await.unwrap(), [id(99)]);
            let later = OutboxEntry {
                client_msg_id: m2,
                to: b.clone(),
                body: "later".into(),
                file: Some(attachment()),
                media_once: true,
            };
            store.enqueue(&later, Timestamp::from_millis(3)).await.unwrap();
            store.mark_initial_message_seen(&InitialMessageId([9; 32])).await.unwrap();
        }
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.get("cursor").await.unwrap().unwrap().as_slice(), b"42");
        assert_eq!(store.session(&b, &d).await.unwrap().unwrap().as_slice(), b"state");
        let stored = store.prekey(PrekeyKind::OneTime, 7).await.unwrap().unwrap();
        assert_eq!(stored.public_key(), secret.public_key());
        assert!(store.prekey(PrekeyKind::LastResort, 7).await.unwrap().is_none(), "kinds are separate namespaces");
        assert_eq!(store.next_one_time_prekey_id().await.unwrap(), Some(8));
        store.delete_prekey(PrekeyKind::OneTime, 7).await.unwrap();
        assert!(store.prekey(PrekeyKind::OneTime, 7).await.unwrap().is_none());
        assert!(store.initial_message_seen(&InitialMessageId([9; 32])).await.unwrap());
        assert!(!store.initial_message_seen(&InitialMessageId([8; 32])).await.unwrap());
        let history = store.history(&user("@b:x"), 10).await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!((history[0].server_msg_id, history[0].delivered, history[0].read), (Some(id(99)), true, false));
        assert!(store.has_server_message(&user("@a:x"), id(99)).await.unwrap());
        assert_eq!(
            store.outbox().await.unwrap(),
            [OutboxEntry { client_msg_id: m2, to: b, body: "later".into(), file: Some(attachment()), media_once: true }]
        );
        store.dequeue(m2).await.unwrap();
        assert!(store.outbox().await.unwrap().is_empty());
    }

    /// A profile written by earlier versions (rows as they wrote them) reads the same through
    /// the typed store.
    #[tokio::test]
    async fn rows_written_by_earlier_versions_read_through_the_typed_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("profile.db")).await.unwrap();
        for (kind, id) in [("signed", 1), ("last_resort", 2), ("one_time", 1000)] {
            sqlx::query("INSERT INTO prekeys (kind, key_id, secret) VALUES (?, ?, ?)")
                .bind(kind)
                .bind(id)
                .bind(vec![id as u8; 32])
                .execute(&store.pool)
                .await
                .unwrap();
        }
        let digest = [0xab; 32];
        store.set(&format!("initial:{}", "ab".repeat(32)), b"1").await.unwrap();
        store.set("next_prekey_id", b"1050").await.unwrap();
        store.set("user_identity", &[1; 32]).await.unwrap();
        store.set("device_identity", &[2; 64]).await.unwrap();
        sqlx::query("INSERT INTO outbox (client_msg_id, to_user, body, created_ts) VALUES (?, '@b:x', 'queued', 1)")
            .bind(Uuid::from_u128(5).to_string())
            .execute(&store.pool)
            .await
            .unwrap();
        for (kind, id) in [(PrekeyKind::Signed, 1), (PrekeyKind::LastResort, 2), (PrekeyKind::OneTime, 1000)] {
            let secret = store.prekey(kind, id).await.unwrap().unwrap();
            assert_eq!(secret.to_bytes().as_slice(), [id as u8; 32], "{kind:?}");
        }
        assert!(store.initial_message_seen(&InitialMessageId(digest)).await.unwrap());
        assert_eq!(store.next_one_time_prekey_id().await.unwrap(), Some(1050));
        let (identity, device) = store.account().await.unwrap().unwrap();
        assert_eq!(identity.public(), UserIdentity::from_bytes(&[1; 32]).public());
        assert_eq!(device.signing_public(), DeviceIdentity::from_bytes(&[2; 64]).signing_public());
        assert_eq!(store.outbox().await.unwrap()[0].client_msg_id, Uuid::from_u128(5));
    }

    #[tokio::test]
    async fn superseded_sessions_are_kept_newest_first_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("profile.db")).await.unwrap();
        let (b, d): (UserId, DeviceId) = (user("@b:x"), "D".parse().unwrap());
        store.archive_session(&b, &d).await.unwrap();
        assert!(store.previous_sessions(&b, &d).await.unwrap().is_empty(), "nothing to archive");
        for state in 1..=5u8 {
            store.save_session(&b, &d, &[state]).await.unwrap();
            store.archive_session(&b, &d).await.unwrap();
        }
        let previous = store.previous_sessions(&b, &d).await.unwrap();
        let states: Vec<u8> = previous.iter().map(|p| p.state[0]).collect();
        assert_eq!(states, [5, 4, 3], "the newest {PREVIOUS_SESSIONS_KEPT}, newest first");
        store.save_previous_session(&b, &d, previous[1].slot, &[40]).await.unwrap();
        assert_eq!(store.previous_sessions(&b, &d).await.unwrap()[1].state.as_slice(), [40]);
    }

    #[tokio::test]
    async fn a_receipt_applies_only_to_messages_that_went_to_its_author() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("profile.db")).await.unwrap();
        for (peer, client_msg_id, server_msg_id) in [("@b:x", 1, 1), ("@c:x", 2, 2)] {
            store.add_message(&message(peer, client_msg_id, Some(server_msg_id))).await.unwrap();
        }
        // c read both of a's messages, says the server: only the one a sent to c is marked.
        let (a, c) = (user("@a:x"), user("@c:x"));
        assert_eq!(store.mark_receipt(&c, &a, &[id(1), id(2)], true).await.unwrap(), [id(2)]);
        assert!(store.mark_receipt(&c, &a, &[id(1)], true).await.unwrap().is_empty());
        let to_b = store.history(&user("@b:x"), 10).await.unwrap();
        assert_eq!((to_b[0].delivered, to_b[0].read), (false, false));
        let to_c = store.history(&user("@c:x"), 10).await.unwrap();
        assert_eq!((to_c[0].delivered, to_c[0].read), (true, true));
    }

    #[tokio::test]
    async fn numbers_beyond_sqlite_integers_are_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("profile.db")).await.unwrap();
        assert!(store.add_message(&message("@b:x", 1, Some(1))).await.unwrap());
        let (a, m1) = (user("@a:x"), Uuid::from_u128(1));
        assert!(store.mark_sent(&a, m1, id(u64::MAX), Timestamp::from_millis(2)).await.is_err());
        assert!(store.mark_sent(&a, m1, id(2), Timestamp::from_millis(u64::MAX)).await.is_err());
        assert!(store.has_server_message(&a, id(u64::MAX)).await.is_err());
        assert!(store.add_message(&message("@b:x", 2, Some(u64::MAX))).await.is_err());
        // A negative stored value (a damaged row) is an error, not a huge id.
        sqlx::query("UPDATE messages SET server_msg_id = -1").execute(&store.pool).await.unwrap();
        assert!(store.history(&user("@b:x"), 10).await.is_err());
    }

    /// An MLS client built from the store's state, its changes written back, survives closing
    /// the profile: rebuilt from the reopened file, it loads its group and keeps talking.
    #[tokio::test]
    async fn mls_state_survives_reopening_the_profile() {
        use parley_crypto::mls::{Incoming, KeyPackage, Lifetime, MlsClient};
        const GROUP: &[u8] = b"!room:hub.example";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.db");
        let (alice, alice_device) = (user("@alice:x"), DeviceId::parse("A").unwrap());
        let alice_keys = DeviceIdentity::generate(&mut rand::rngs::OsRng);
        let bob_keys = DeviceIdentity::generate(&mut rand::rngs::OsRng);
        let bob = MlsClient::with_state([], user("@bob:x"), DeviceId::parse("B").unwrap(), &bob_keys);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let kp = bob.create_key_package(&bob_keys, Lifetime::starting_at(now, 3600), false).unwrap();
        let mut b = {
            let store = Store::open(&path).await.unwrap();
            let state = store.mls_state().await.unwrap();
            assert!(state.is_empty());
            let client = MlsClient::with_state(state, alice.clone(), alice_device.clone(), &alice_keys);
            let mut a = client.create_group(&alice_keys, GROUP).unwrap();
            let bundle = a.add_members(&client, &alice_keys, &[KeyPackage::from_bytes(kp.to_bytes()).unwrap()]).unwrap();
            a.merge_pending_commit(&client).unwrap();
            store.apply_mls_changes(&client.take_state_changes()).await.unwrap();
            bob.join(&bundle.welcome.unwrap(), &a.ratchet_tree().unwrap()).unwrap().accept(&bob).unwrap()
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }

        let store = Store::open(&path).await.unwrap();
        let client = MlsClient::with_state(store.mls_state().await.unwrap(), alice, alice_device, &alice_keys);
        let mut a = client.load_group(GROUP).unwrap().expect("the group was stored");
        assert_eq!(a.epoch(), 1);
        let message = a.encrypt(&client, &alice_keys, b"after reopening").unwrap();
        let Incoming::Application { plaintext, .. } = b.process(&bob, &message).unwrap() else { panic!("expected a message") };
        assert_eq!(plaintext, b"after reopening");
        let reply = b.encrypt(&bob, &bob_keys, b"hi").unwrap();
        let Incoming::Application { plaintext, .. } = a.process(&client, &reply).unwrap() else { panic!("expected a message") };
        assert_eq!(plaintext, b"hi");
        store.apply_mls_changes(&client.take_state_changes()).await.unwrap();
    }

    /// Groups, their history in the hub's order, confirmations and the pending commit survive
    /// reopening; conversations list 1:1 and groups together, latest first.
    #[tokio::test]
    async fn groups_and_their_history_survive_reopening() {
        use crate::groups::{Confirmation, GroupChanges, GroupMessage, GroupRecord, GroupState, GroupStore};
        use parley_spec::v1::groups::GroupSendRequest;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.db");
        let group_id = GroupId::parse("!abc:x").unwrap();
        let record = GroupRecord {
            group_id: group_id.clone(),
            name: Some("team".into()),
            policy: crate::groups::GroupPolicy { topic: Some("plans".into()), admins: vec![user("@a:x")], max_members: Some(10) },
            state: GroupState::Active,
            problem: None,
            cursor: GroupSeq::new(3),
            epoch: 2,
            pending: Some(GroupSendRequest::commit(Uuid::from_u128(9), vec![1], vec![2], Some(vec![3]))),
            created_ts: Timestamp::from_millis(1),
            last_ts: Timestamp::from_millis(50),
        };
        let message = |id: u128, seq: Option<u64>, body: &str| GroupMessage {
            local_id: 0,
            group_id: group_id.clone(),
            group_seq: seq.map(GroupSeq::new),
            sender: user("@a:x"),
            sender_device: "A".parse().unwrap(),
            client_msg_id: Uuid::from_u128(id),
            ts: Timestamp::from_millis(10),
            body: body.into(),
            file: (id == 2).then(attachment),
        };
        {
            let store = Store::open(&path).await.unwrap();
            store.add_message(&message_to("@b:x", 1, Some(1))).await.unwrap();
            let changes = GroupChanges {
                mls: vec![StateChange { key: b"k".to_vec(), value: Some(b"v".to_vec()) }],
                record: Some(record.clone()),
                messages: vec![message(1, None, "mine"), message(2, Some(2), "theirs")],
                ..GroupChanges::default()
            };
            store.apply_group_changes(&changes).await.unwrap();
            let confirm = Confirmation {
                group_id: group_id.clone(),
                sender: user("@a:x"),
                client_msg_id: Uuid::from_u128(1),
                group_seq: GroupSeq::new(3),
                ts: Timestamp::from_millis(20),
            };
            let unknown = Confirmation { client_msg_id: Uuid::from_u128(7), ..confirm.clone() };
            let changes = GroupChanges { confirmations: vec![confirm, unknown], ..GroupChanges::default() };
            store.apply_group_changes(&changes).await.unwrap();
        }
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.group(&group_id).await.unwrap(), Some(record.clone()));
        assert_eq!(store.groups().await.unwrap(), [record]);
        assert_eq!(GroupStore::mls_state(&store).await.unwrap(), [(b"k".to_vec(), b"v".to_vec())]);
        let history = store.group_history(&group_id, 10).await.unwrap();
        let seen: Vec<_> = history.iter().map(|m| (m.body.as_str(), m.group_seq.map(GroupSeq::get))).collect();
        assert_eq!(seen, [("theirs", Some(2)), ("mine", Some(3))], "in the hub's order; nothing added by a confirmation");
        assert_eq!((history[0].file.as_ref(), history[1].file.as_ref()), (Some(&attachment()), None));
        let conversations = store.conversations().await.unwrap();
        let ids: Vec<&str> = conversations.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["!abc:x", "@b:x"]);
        assert_eq!(conversations[0].name.as_deref(), Some("team"));
        store.apply_group_changes(&GroupChanges { delete: Some(group_id.clone()), ..GroupChanges::default() }).await.unwrap();
        assert!(store.group(&group_id).await.unwrap().is_none());
        assert!(store.group_history(&group_id, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn mls_changes_upsert_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("profile.db")).await.unwrap();
        let change = |key: &[u8], value: Option<&[u8]>| StateChange { key: key.to_vec(), value: value.map(<[u8]>::to_vec) };
        store.apply_mls_changes(&[change(b"a", Some(b"1")), change(b"b", Some(b"2"))]).await.unwrap();
        store.apply_mls_changes(&[change(b"a", None), change(b"b", Some(b"3")), change(b"c", None)]).await.unwrap();
        assert_eq!(store.mls_state().await.unwrap(), [(b"b".to_vec(), b"3".to_vec())]);
        store.apply_mls_changes(&[]).await.unwrap();
        assert_eq!(store.mls_state().await.unwrap().len(), 1);
    }
}
