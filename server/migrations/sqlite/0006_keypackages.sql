-- MLS KeyPackage directory (spec/groups.md §4). `bytes` is the TLS-serialized MLSMessage the
-- device uploaded; `reference` its KeyPackageRef. One-time KeyPackages are handed out at most once
-- (deleted in the claiming transaction); a device's last-resort KeyPackage (at most one, replaced
-- by a new upload) is handed out only when no one-time one is left and is never deleted by a
-- claim. `expires` is the end of its lifetime (ms since the Unix epoch): expired rows are never
-- handed out and are deleted when a claim or upload meets them.
CREATE TABLE keypackages (
    id INTEGER PRIMARY KEY,
    device INTEGER NOT NULL,
    is_last_resort INTEGER NOT NULL,
    reference BLOB NOT NULL UNIQUE,
    bytes BLOB NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX keypackages_by_device ON keypackages (device, is_last_resort, id);
CREATE UNIQUE INDEX keypackages_one_last_resort ON keypackages (device) WHERE is_last_resort = 1;
