-- Files held by group messages (spec/media.md §5): a group message from a local user naming a
-- file that user references keeps the file until no local member device still has to receive
-- that position (group_devices: acked < group_seq within from_seq..until_seq).
CREATE TABLE media_group_holds (
    sha256    BLOB NOT NULL,
    group_id  TEXT NOT NULL,
    group_seq INTEGER NOT NULL,
    PRIMARY KEY (sha256, group_id, group_seq)
) WITHOUT ROWID;
