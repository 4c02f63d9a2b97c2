-- Durable outbound federation queue: one row per item (message, receipt, device list change,
-- presence subscription), in the order queued. Rows are deleted once the destination accepted
-- the transaction that carried them.
CREATE TABLE fed_outbound (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX fed_outbound_by_destination ON fed_outbound (destination, seq);

-- The transaction in flight per destination: a retry after a restart resends exactly the same
-- items under the same id, so the destination's (origin, txn_id) check drops a repeat.
CREATE TABLE fed_inflight (
    destination TEXT PRIMARY KEY,
    txn_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

-- Inbound transactions already applied (idempotency), pruned after federation.txn_retention_ms.
CREATE TABLE fed_inbound_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    received_ts INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
) WITHOUT ROWID;

-- Devices of users on other servers, as their homeserver last told us (checked on every send
-- to them; forgotten when their server says they changed).
CREATE TABLE remote_devices (
    user_id TEXT PRIMARY KEY,
    json BLOB NOT NULL,
    fetched_ts INTEGER NOT NULL
) WITHOUT ROWID;

-- Servers that fetched a local user's devices: they hear when those change.
CREATE TABLE device_list_watchers (
    user_id INTEGER NOT NULL,
    server TEXT NOT NULL,
    PRIMARY KEY (user_id, server)
) WITHOUT ROWID;
