-- A temporary chat's file message: the server deletes the file once every device it went to
-- downloaded it (SendRequest.media_once).
ALTER TABLE outbox ADD COLUMN media_once INTEGER NOT NULL DEFAULT 0;
