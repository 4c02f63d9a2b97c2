//! The local store: one SQLite file per account profile (sqlx, WAL). It keeps what a device
//! must not lose: its session and secrets, ratchet sessions, verified device lists of
//! contacts, message history, the outbox and the sync cursor.
//!
//! Secrets are stored as the crypto layer serializes them. The file (and SQLite's `-wal` and
//! `-shm` files next to it) is readable by its owner only, whatever the umask; disk
//! encryption is the host's job.

use crate::error::Error;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row as _;
use std::borrow::Cow;
use std::path::Path;
use zeroize::Zeroizing;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "store", include_str!("../migrations/0001_store.sql")),
    (2, "server id index", include_str!("../migrations/0002_server_id_index.sql")),
    (3, "previous sessions", include_str!("../migrations/0003_previous_sessions.sql")),
];

/// Superseded sessions kept per peer device.
const PREVIOUS_SESSIONS_KEPT: i64 = 3;

/// A message in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Local row id (history order).
    pub local_id: i64,
    /// The other party of the conversation.
    pub peer: String,
    /// Who sent it.
    pub sender: String,
    /// From which device.
    pub sender_device: String,
    /// The sender's id for it (the same on every device).
    pub client_msg_id: String,
    /// The server's id, once known.
    pub server_msg_id: Option<u64>,
    /// Timestamp (ms).
    pub ts: i64,
    /// Text.
    pub body: String,
    /// A recipient device acknowledged it.
    pub delivered: bool,
    /// The recipient read it.
    pub read: bool,
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its id (kept across retries, so the server stores it once).
    pub client_msg_id: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub body: String,
}

/// The store of one profile.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating, owner-only) the store file and migrates it.
    pub async fn open(path: &Path) -> Result<Self, Error> {
        make_private(path).map_err(|e| Error::Store(format!("cannot create {}: {e}", path.display())))?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await.map_err(store_error)?;
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
        migrator.run(&pool).await.map_err(|e| Error::Store(e.to_string()))?;
        Ok(Self { pool })
    }

    /// A value of the key-value table (account, identity secrets, cursor).
    pub async fn get(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let value: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM kv WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(value.map(Zeroizing::new))
    }

    /// Sets a value of the key-value table.
    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        sqlx::query("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The ratchet session with a peer device.
    pub async fn session(&self, user: &str, device: &str) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let state: Option<Vec<u8>> = sqlx::query_scalar("SELECT state FROM sessions WHERE user_id = ? AND device_id = ?")
            .bind(user)
            .bind(device)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(state.map(Zeroizing::new))
    }

    /// Saves the ratchet session with a peer device.
    pub async fn save_session(&self, user: &str, device: &str, state: &[u8]) -> Result<(), Error> {
        sqlx::query("INSERT OR REPLACE INTO sessions (user_id, device_id, state) VALUES (?, ?, ?)")
            .bind(user)
            .bind(device)
            .bind(state)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Moves the current session with a peer device to the superseded ones (keeping the newest
    /// few), before a new session replaces it.
    pub async fn archive_session(&self, user: &str, device: &str) -> Result<(), Error> {
        let Some(state) = self.session(user, device).await? else { return Ok(()) };
        let next: i64 =
            sqlx::query_scalar("SELECT coalesce(max(slot), 0) + 1 FROM previous_sessions WHERE user_id = ? AND device_id = ?")
                .bind(user)
                .bind(device)
                .fetch_one(&self.pool)
                .await
                .map_err(store_error)?;
        sqlx::query("INSERT INTO previous_sessions (user_id, device_id, slot, state) VALUES (?, ?, ?, ?)")
            .bind(user)
            .bind(device)
            .bind(next)
            .bind(state.as_slice())
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        sqlx::query("DELETE FROM previous_sessions WHERE user_id = ? AND device_id = ? AND slot <= ?")
            .bind(user)
            .bind(device)
            .bind(next - PREVIOUS_SESSIONS_KEPT)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The superseded sessions with a peer device, newest first: (slot, state).
    pub async fn previous_sessions(&self, user: &str, device: &str) -> Result<Vec<(i64, Zeroizing<Vec<u8>>)>, Error> {
        let rows =
            sqlx::query("SELECT slot, state FROM previous_sessions WHERE user_id = ? AND device_id = ? ORDER BY slot DESC")
                .bind(user)
                .bind(device)
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, Zeroizing::new(r.try_get::<Vec<u8>, _>(1)?))))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    /// Saves a superseded session after it decrypted a message.
    pub async fn save_previous_session(&self, user: &str, device: &str, slot: i64, state: &[u8]) -> Result<(), Error> {
        sqlx::query("UPDATE previous_sessions SET state = ? WHERE user_id = ? AND device_id = ? AND slot = ?")
            .bind(state)
            .bind(user)
            .bind(device)
            .bind(slot)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Stores one of our prekey secrets.
    pub async fn save_prekey(&self, kind: &str, key_id: u32, secret: &[u8]) -> Result<(), Error> {
        sqlx::query("INSERT OR REPLACE INTO prekeys (kind, key_id, secret) VALUES (?, ?, ?)")
            .bind(kind)
            .bind(i64::from(key_id))
            .bind(secret)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// One of our prekey secrets.
    pub async fn prekey(&self, kind: &str, key_id: u32) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let secret: Option<Vec<u8>> = sqlx::query_scalar("SELECT secret FROM prekeys WHERE kind = ? AND key_id = ?")
            .bind(kind)
            .bind(i64::from(key_id))
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(secret.map(Zeroizing::new))
    }

    /// Deletes a used one-time prekey secret (forward secrecy).
    pub async fn delete_prekey(&self, kind: &str, key_id: u32) -> Result<(), Error> {
        sqlx::query("DELETE FROM prekeys WHERE kind = ? AND key_id = ?")
            .bind(kind)
            .bind(i64::from(key_id))
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The highest one-time prekey id used so far.
    pub async fn max_prekey_id(&self, kind: &str) -> Result<u32, Error> {
        let max: Option<i64> = sqlx::query_scalar("SELECT max(key_id) FROM prekeys WHERE kind = ?")
            .bind(kind)
            .fetch_one(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(max.unwrap_or(0) as u32)
    }

    /// The verified device list of a user: (version, pinned identity key, JSON).
    pub async fn device_list(&self, user: &str) -> Result<Option<(u64, Vec<u8>, Vec<u8>)>, Error> {
        let row = sqlx::query("SELECT version, identity_key, json FROM device_lists WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        row.map(|r| Ok((r.try_get::<i64, _>(0)? as u64, r.try_get(1)?, r.try_get(2)?))).transpose().map_err(store_error)
    }

    /// Saves a verified device list.
    pub async fn save_device_list(&self, user: &str, version: u64, identity_key: &[u8], json: &[u8]) -> Result<(), Error> {
        sqlx::query("INSERT OR REPLACE INTO device_lists (user_id, version, identity_key, json) VALUES (?, ?, ?, ?)")
            .bind(user)
            .bind(version as i64)
            .bind(identity_key)
            .bind(json)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Forgets a user's verified device list (the next fetch pins what the server serves).
    pub async fn forget_device_list(&self, user: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM device_lists WHERE user_id = ?").bind(user).execute(&self.pool).await.map_err(store_error)?;
        Ok(())
    }

    /// Adds a message to the history; false if it was there already (same sender and id).
    pub async fn add_message(&self, message: &StoredMessage) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO messages (peer, sender, sender_device, client_msg_id, server_msg_id, ts, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&message.peer)
        .bind(&message.sender)
        .bind(&message.sender_device)
        .bind(&message.client_msg_id)
        .bind(message.server_msg_id.map(|id| id as i64))
        .bind(message.ts)
        .bind(&message.body)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether a message with this sender and server id is in the history already (a message
    /// delivered again after a reconnect).
    pub async fn has_server_message(&self, sender: &str, server_msg_id: u64) -> Result<bool, Error> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM messages WHERE sender = ? AND server_msg_id = ?")
            .bind(sender)
            .bind(server_msg_id as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(found.is_some())
    }

    /// Records the server's id and time for one of our messages.
    pub async fn mark_sent(&self, sender: &str, client_msg_id: &str, server_msg_id: u64, ts: i64) -> Result<(), Error> {
        sqlx::query("UPDATE messages SET server_msg_id = ?, ts = ? WHERE sender = ? AND client_msg_id = ?")
            .bind(server_msg_id as i64)
            .bind(ts)
            .bind(sender)
            .bind(client_msg_id)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Marks messages of `sender` in the conversation with `peer` (by server id) delivered or
    /// read; ids of other messages are ignored. Returns the ids marked, in the order given, each
    /// once. For a receipt, `peer` is the user the receipt is by: it applies only to messages
    /// that went to that user, whoever the server claims read them.
    pub async fn mark_receipt(&self, peer: &str, sender: &str, server_msg_ids: &[u64], read: bool) -> Result<Vec<u64>, Error> {
        let column = if read { "read = 1, delivered = 1" } else { "delivered = 1" };
        let ids: Vec<String> = server_msg_ids.iter().filter_map(|id| i64::try_from(*id).ok()).map(|id| id.to_string()).collect();
        let marked: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE messages SET {column} WHERE peer = ? AND sender = ? \
             AND server_msg_id IN (SELECT value FROM json_each(?)) RETURNING server_msg_id"
        ))
        .bind(peer)
        .bind(sender)
        .bind(format!("[{}]", ids.join(",")))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        let mut marked: std::collections::HashSet<u64> = marked.into_iter().map(|id| id as u64).collect();
        Ok(server_msg_ids.iter().copied().filter(|id| marked.remove(id)).collect())
    }

    /// The last `limit` messages with `peer`, oldest first.
    pub async fn history(&self, peer: &str, limit: u32) -> Result<Vec<StoredMessage>, Error> {
        let rows = sqlx::query(
            "SELECT id, peer, sender, sender_device, client_msg_id, server_msg_id, ts, body, delivered, read FROM \
             (SELECT * FROM messages WHERE peer = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
        )
        .bind(peer)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredMessage {
                    local_id: r.try_get(0)?,
                    peer: r.try_get(1)?,
                    sender: r.try_get(2)?,
                    sender_device: r.try_get(3)?,
                    client_msg_id: r.try_get(4)?,
                    server_msg_id: r.try_get::<Option<i64>, _>(5)?.map(|id| id as u64),
                    ts: r.try_get(6)?,
                    body: r.try_get(7)?,
                    delivered: r.try_get(8)?,
                    read: r.try_get(9)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    /// Queues a message for sending.
    pub async fn enqueue(&self, entry: &OutboxEntry, now: i64) -> Result<(), Error> {
        sqlx::query("INSERT OR IGNORE INTO outbox (client_msg_id, to_user, body, created_ts) VALUES (?, ?, ?, ?)")
            .bind(&entry.client_msg_id)
            .bind(&entry.to)
            .bind(&entry.body)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The outbox, oldest first.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, Error> {
        let rows = sqlx::query("SELECT client_msg_id, to_user, body FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter()
            .map(|r| Ok(OutboxEntry { client_msg_id: r.try_get(0)?, to: r.try_get(1)?, body: r.try_get(2)? }))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    /// Removes an entry once the server answered `sent`.
    pub async fn dequeue(&self, client_msg_id: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM outbox WHERE client_msg_id = ?")
            .bind(client_msg_id)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }
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

fn store_error(error: sqlx::Error) -> Error {
    Error::Store(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn history_outbox_and_secrets_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.db");
        {
            let store = Store::open(&path).await.unwrap();
            store.set("cursor", b"42").await.unwrap();
            store.save_session("@b:x", "D", b"state").await.unwrap();
            store.save_prekey("one_time", 7, b"secret").await.unwrap();
            let message = StoredMessage {
                local_id: 0,
                peer: "@b:x".into(),
                sender: "@a:x".into(),
                sender_device: "A".into(),
                client_msg_id: "m1".into(),
                server_msg_id: None,
                ts: 1,
                body: "hi".into(),
                delivered: false,
                read: false,
            };
            assert!(store.add_message(&message).await.unwrap());
            assert!(!store.add_message(&message).await.unwrap(), "deduplicated");
            store.mark_sent("@a:x", "m1", 99, 2).await.unwrap();
            assert_eq!(store.mark_receipt("@b:x", "@a:x", &[99, 5, 99], false).await.unwrap(), [99]);
            store.enqueue(&OutboxEntry { client_msg_id: "m2".into(), to: "@b:x".into(), body: "later".into() }, 3).await.unwrap();
        }
        let store = Store::open(&path).await.unwrap();
        assert_eq!(store.get("cursor").await.unwrap().unwrap().as_slice(), b"42");
        assert_eq!(store.session("@b:x", "D").await.unwrap().unwrap().as_slice(), b"state");
        assert_eq!(store.prekey("one_time", 7).await.unwrap().unwrap().as_slice(), b"secret");
        assert_eq!(store.max_prekey_id("one_time").await.unwrap(), 7);
        store.delete_prekey("one_time", 7).await.unwrap();
        assert!(store.prekey("one_time", 7).await.unwrap().is_none());
        let history = store.history("@b:x", 10).await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!((history[0].server_msg_id, history[0].delivered, history[0].read), (Some(99), true, false));
        assert_eq!(store.outbox().await.unwrap().len(), 1);
        store.dequeue("m2").await.unwrap();
        assert!(store.outbox().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_receipt_applies_only_to_messages_that_went_to_its_author() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("profile.db")).await.unwrap();
        for (peer, client_msg_id, server_msg_id) in [("@b:x", "m1", 1), ("@c:x", "m2", 2)] {
            let message = StoredMessage {
                local_id: 0,
                peer: peer.into(),
                sender: "@a:x".into(),
                sender_device: "A".into(),
                client_msg_id: client_msg_id.into(),
                server_msg_id: Some(server_msg_id),
                ts: 1,
                body: "hi".into(),
                delivered: false,
                read: false,
            };
            store.add_message(&message).await.unwrap();
        }
        // c read both of a's messages, says the server: only the one a sent to c is marked.
        assert_eq!(store.mark_receipt("@c:x", "@a:x", &[1, 2], true).await.unwrap(), [2]);
        assert!(store.mark_receipt("@c:x", "@a:x", &[1], true).await.unwrap().is_empty());
        let to_b = store.history("@b:x", 10).await.unwrap();
        assert_eq!((to_b[0].delivered, to_b[0].read), (false, false));
        let to_c = store.history("@c:x", 10).await.unwrap();
        assert_eq!((to_c[0].delivered, to_c[0].read), (true, true));
    }
}
