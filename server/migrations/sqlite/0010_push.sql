-- Push (spec/push.md): each device's push endpoint, and the wake-ups still to send (one row
-- per device however many events arrived: a burst is one push), kept across restarts.

CREATE TABLE push_registrations (
    device     INTEGER PRIMARY KEY NOT NULL,
    endpoint   TEXT NOT NULL,
    p256dh     BLOB,                 -- with auth: the RFC 8291 keys; NULL: an empty wake-up
    auth       BLOB,
    created_ts INTEGER NOT NULL
);

CREATE TABLE push_pending (
    device   INTEGER PRIMARY KEY NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    since_ts INTEGER NOT NULL
);
