-- The SDK's local store: one file per account profile.
CREATE TABLE kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- 1:1 ratchet sessions, one per peer device.
CREATE TABLE sessions (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
-- Our own prekey secrets, by kind ('signed', 'one_time', 'last_resort') and id.
CREATE TABLE prekeys (
    kind TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    secret BLOB NOT NULL,
    PRIMARY KEY (kind, key_id)
) WITHOUT ROWID;
-- Verified device lists of contacts, with the pinned identity key.
CREATE TABLE device_lists (
    user_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    identity_key BLOB NOT NULL,
    json BLOB NOT NULL
);
-- Message history, both directions.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    peer TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    server_msg_id INTEGER,
    ts INTEGER NOT NULL,
    body TEXT NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    read INTEGER NOT NULL DEFAULT 0,
    UNIQUE (sender, client_msg_id)
);
CREATE INDEX messages_by_peer ON messages (peer, id);
-- Messages composed but not yet answered `sent`; sent in order, exactly once (same id).
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client_msg_id TEXT NOT NULL UNIQUE,
    to_user TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ts INTEGER NOT NULL
);
