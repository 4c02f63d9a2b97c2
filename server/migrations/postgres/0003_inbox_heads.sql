-- Each device's last inbox sequence number, for several workers on one database (issue 13).
-- A writer's batch locks the heads of the devices it appends to (`SELECT … FOR UPDATE`, in
-- device order), numbers its new rows from them and moves them on before it commits, so a
-- device's inbox rows become visible in sequence order whichever worker wrote them. The head
-- is a row of its own, not a column of `devices`: a device's acknowledgements and last-seen
-- time update its `devices` row from the worker holding its connection, and must not wait
-- for the other workers appending to its inbox (nor they for it).
--
-- One row per device, created with it (Store::insert_device), gone with it (the foreign key);
-- `parleyd migrate` fills it after copying a SQLite database. No SQLite twin: SQLite has one
-- writer, which keeps the next numbers in memory.
--
-- Upgrading: stop every worker of an older parleyd before the first new one migrates the
-- database. An older parleyd refuses to start on this schema, but one already running would
-- append without moving the heads.
CREATE TABLE inbox_heads (
    device BIGINT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    -- The largest seq ever given to this device's inbox (or its acked_seq, if larger).
    last_seq BIGINT NOT NULL
);

INSERT INTO inbox_heads (device, last_seq)
SELECT d.id, GREATEST(d.acked_seq, coalesce((SELECT max(seq) FROM inbox WHERE device = d.id), 0))
FROM devices d;
