-- Sessions replaced by a newer one with the same device (both sides started a session at
-- once, or the peer started over), kept to decrypt messages still in flight on them.
CREATE TABLE previous_sessions (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    slot INTEGER NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id, slot)
) WITHOUT ROWID;
