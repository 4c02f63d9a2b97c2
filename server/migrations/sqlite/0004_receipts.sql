-- Receipts are checked against what was sent: a read marker or a receipt names only messages
-- that its author received from that sender.

-- The sending user of each message (its device may be removed later; the user stays).
-- Messages whose device was already removed keep NULL and take no receipts.
ALTER TABLE messages ADD COLUMN sender_user INTEGER;
UPDATE messages SET sender_user = (SELECT user_id FROM devices WHERE devices.id = messages.sender_device);

-- Messages from users of other servers to local users (they have no `messages` row here): a
-- local user's read marker for a remote sender is checked against it. Kept like `messages`.
CREATE TABLE remote_messages (
    recipient INTEGER NOT NULL,
    sender TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    PRIMARY KEY (recipient, sender, msg_id)
) WITHOUT ROWID;
-- What is still in the inboxes (rows of local senders are never consulted: local senders are
-- checked against `messages`).
INSERT OR IGNORE INTO remote_messages (recipient, sender, msg_id)
    SELECT d.user_id, i.sender, i.msg_id FROM inbox i JOIN devices d ON d.id = i.device
    WHERE i.sender IS NOT NULL AND i.msg_id IS NOT NULL;
