-- Messages received from other servers, by (origin server, message id on the origin): a message
-- is delivered once even when its origin sends it again in a new transaction (after losing its
-- in-flight record, say). Written in the commit that delivers the message; pruned with
-- fed_inbound_txns after federation.txn_retention_ms (the index serves that pruning).
CREATE TABLE fed_inbound_messages (
    origin TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    received_ts INTEGER NOT NULL,
    PRIMARY KEY (origin, msg_id)
) WITHOUT ROWID;
CREATE INDEX fed_inbound_messages_by_ts ON fed_inbound_messages (received_ts);
