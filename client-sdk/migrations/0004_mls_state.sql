-- The MLS client's state: openmls' key-value pairs, opaque to the SDK (secrets included), kept
-- equal to the client's state by applying its reported changes in one transaction.
CREATE TABLE mls_state (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
