-- Inbox rows are stored in arrival order (a rowid table) and found through a small
-- (device, seq) index, instead of clustered by device with their payload. A commit that adds
-- events for a thousand devices then appends to the table's last pages and touches only index
-- pages (a few hundred entries each), where the clustered table had it rewrite a page per
-- device, payloads and all (measured in BENCHMARKS.md, issue 11).
CREATE TABLE inbox_by_arrival (
    device INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT,
    msg_id INTEGER,
    payload BLOB NOT NULL,
    UNIQUE (device, seq)
);
INSERT INTO inbox_by_arrival (device, seq, sender, msg_id, payload)
    SELECT device, seq, sender, msg_id, payload FROM inbox ORDER BY device, seq;
DROP TABLE inbox;
ALTER TABLE inbox_by_arrival RENAME TO inbox;
