-- Key directory. JSON columns hold the exact objects devices uploaded (signatures intact).
CREATE TABLE device_keys (
    device INTEGER PRIMARY KEY,
    json BLOB NOT NULL
);
CREATE TABLE signed_prekeys (
    device INTEGER PRIMARY KEY,
    json BLOB NOT NULL
);
CREATE TABLE last_resort_prekeys (
    device INTEGER PRIMARY KEY,
    json BLOB NOT NULL
);
-- One-time prekeys: each row is handed out at most once (deleted in the claiming transaction).
CREATE TABLE one_time_prekeys (
    device INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    PRIMARY KEY (device, key_id)
) WITHOUT ROWID;
-- The latest signed device list of each user.
CREATE TABLE device_lists (
    user_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    json BLOB NOT NULL
);
