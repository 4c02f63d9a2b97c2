-- Files held by messages (spec/media.md §5): a message that names a file its sender
-- references keeps the file for each local device it went to until that device acknowledged
-- past the message's inbox position (devices.acked_seq >= seq), whatever the references'
-- retention says. The media sweep drops holds that ended.
CREATE TABLE media_holds (
    sha256 BLOB NOT NULL,
    device INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (sha256, device, seq)
) WITHOUT ROWID;

CREATE INDEX media_holds_by_device ON media_holds (device, seq);
