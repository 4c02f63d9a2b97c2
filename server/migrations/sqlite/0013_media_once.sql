-- Temporary chats (SendRequest.media_once, spec/media.md §5): such a hold lasts until its
-- device downloaded the whole file (fetched = 1), not only until it acknowledged the message;
-- when a sender's last one ends, the sender's reference to the file goes.
ALTER TABLE media_holds ADD COLUMN once INTEGER NOT NULL DEFAULT 0;
ALTER TABLE media_holds ADD COLUMN fetched INTEGER NOT NULL DEFAULT 0;
ALTER TABLE media_holds ADD COLUMN sender INTEGER NOT NULL DEFAULT 0;
