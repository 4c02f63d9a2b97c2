-- A group's policy as this device holds it, from the group's end-to-end encrypted metadata
-- (JSON: topic, admins, member limit; `spec/groups.md` §3). NULL for a group from before: no
-- admins known, every member may change the membership.
ALTER TABLE groups ADD COLUMN policy TEXT;
