-- MLS groups this device is (or was) a member of. The name travels end-to-end encrypted
-- (a `group_meta` application message) and is kept only here. `cursor` is the last position of
-- the group's stream whose result is stored (MLS state and history): acknowledged to the
-- server after that, and events at or before it are repeats. `state` is 'active', 'removed'
-- (a commit removed this device) or 'stuck' (a commit was refused; `problem` says why).
-- `pending` is the submission of this device's commit that awaits its position in the stream
-- (JSON of the `GroupSendRequest`), re-sent with the same id if its answer was lost.
CREATE TABLE groups (
    group_id TEXT PRIMARY KEY,
    name TEXT,
    state TEXT NOT NULL,
    problem TEXT,
    cursor INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    pending BLOB,
    created_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL
);
-- Group message history, both directions. `group_seq` is the hub's position, unknown for an
-- own message until the hub stored it.
CREATE TABLE group_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id TEXT NOT NULL,
    group_seq INTEGER,
    sender TEXT NOT NULL,
    sender_device TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (group_id, sender, client_msg_id)
);
CREATE INDEX group_messages_by_group ON group_messages (group_id, id);
