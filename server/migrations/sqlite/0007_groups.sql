-- MLS groups (spec/groups.md).
--
-- Groups hubbed on this server: openmls' public group state (tree and group context, no secrets)
-- as one blob, rewritten by each accepted commit, with the epoch and the last group_seq given.
CREATE TABLE hub_groups (
    group_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    state BLOB NOT NULL,
    created_ts INTEGER NOT NULL
) WITHOUT ROWID;

-- The group streams this server holds: each message once, whatever the number of local members.
-- On the hub, every accepted message; on a participating server, those from when it had
-- members. `welcome` and `ratchet_tree` only on commits that add members of this server.
CREATE TABLE group_messages (
    group_id TEXT NOT NULL,
    group_seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    message BLOB NOT NULL,
    ts INTEGER NOT NULL,
    welcome BLOB,
    ratchet_tree BLOB,
    PRIMARY KEY (group_id, group_seq)
) WITHOUT ROWID;
-- A retried submission is found by its sender's id (idempotent sends).
CREATE UNIQUE INDEX group_messages_by_client_id ON group_messages (group_id, sender, sender_device, client_msg_id);

-- Local member devices and their cursors: a device receives the positions from `from_seq` (its
-- Welcome; 0 for the creator) to `until_seq` (the commit that removed it) after `acked`. The row
-- goes once the device acknowledged its removal.
CREATE TABLE group_devices (
    group_id TEXT NOT NULL,
    device INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    until_seq INTEGER,
    acked INTEGER NOT NULL,
    PRIMARY KEY (group_id, device)
) WITHOUT ROWID;
CREATE INDEX group_devices_by_device ON group_devices (device);

-- Receipt markers per group and member: the highest position one of the user's devices
-- received and read. On the hub, of every member (from the members' servers); elsewhere, as the
-- hub last sent them.
CREATE TABLE group_markers (
    group_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    delivered INTEGER NOT NULL,
    read INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
