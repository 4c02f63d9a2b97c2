-- Accounts, devices and their access tokens (stored as SHA-256 hashes only).
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    localpart TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_ts INTEGER NOT NULL,
    last_seen_ts INTEGER,
    last_seen_visibility TEXT NOT NULL DEFAULT 'everyone',
    is_admin INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id),
    device_id TEXT NOT NULL,
    display_name TEXT,
    token_hash BLOB NOT NULL UNIQUE,
    created_ts INTEGER NOT NULL,
    last_seen_ts INTEGER,
    -- Highest inbox seq the device acknowledged; inbox rows at or below it may be deleted.
    acked_seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (user_id, device_id)
);

CREATE TABLE registration_tokens (
    token_hash BLOB PRIMARY KEY,
    uses_left INTEGER,
    expires_ts INTEGER,
    created_ts INTEGER NOT NULL
);

-- One row per accepted message: the idempotency record (sender device, client_msg_id).
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    sender_device INTEGER NOT NULL,
    client_msg_id BLOB NOT NULL,
    recipient TEXT NOT NULL,
    ts INTEGER NOT NULL,
    UNIQUE (sender_device, client_msg_id)
);

-- Per-device inboxes. payload is the JSON of the inbox event for that device.
CREATE TABLE inbox (
    device INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT,
    msg_id INTEGER,
    payload BLOB NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;

-- Presence subscriptions: owner sees contact's presence.
CREATE TABLE contacts (
    owner TEXT NOT NULL,
    contact TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
) WITHOUT ROWID;
CREATE INDEX contacts_by_contact ON contacts (contact, owner);
