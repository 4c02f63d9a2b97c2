-- Media (spec/media.md): files stored by the SHA-256 of their ciphertext (uploaded here, or
-- fetched from another server for a local user and kept a while), the users who hold a
-- reference to each (uploaders and forwarders; quota is counted over these), and uploads in
-- progress with the parts received so far. The bytes live in the object store, not here.

CREATE TABLE media (
    sha256          BLOB PRIMARY KEY NOT NULL,  -- 32 bytes: the media id
    size            INTEGER NOT NULL,
    created_ts      INTEGER NOT NULL,
    keep_until      INTEGER NOT NULL DEFAULT 0, -- a copy of another server's file is kept until then
    unreferenced_ts INTEGER                     -- when its last reference went; NULL while referenced
) WITHOUT ROWID;

CREATE INDEX media_unreferenced ON media (unreferenced_ts) WHERE unreferenced_ts IS NOT NULL;

CREATE TABLE media_refs (
    user_id    INTEGER NOT NULL,
    sha256     BLOB NOT NULL,
    expires_ts INTEGER NOT NULL,
    PRIMARY KEY (user_id, sha256)
) WITHOUT ROWID;

CREATE INDEX media_refs_by_media ON media_refs (sha256);
CREATE INDEX media_refs_by_expiry ON media_refs (expires_ts);

CREATE TABLE media_uploads (
    id         TEXT PRIMARY KEY NOT NULL,
    user_id    INTEGER NOT NULL,
    sha256     BLOB NOT NULL,
    size       INTEGER NOT NULL,
    part_bytes INTEGER NOT NULL,
    created_ts INTEGER NOT NULL,
    expires_ts INTEGER NOT NULL,
    store_upload_id TEXT                        -- the S3 multipart upload's id (S3 store only)
);

CREATE INDEX media_uploads_by_user ON media_uploads (user_id, sha256);
CREATE INDEX media_uploads_by_expiry ON media_uploads (expires_ts);

CREATE TABLE media_upload_parts (
    upload_id TEXT NOT NULL,
    part      INTEGER NOT NULL,
    PRIMARY KEY (upload_id, part)
) WITHOUT ROWID;
