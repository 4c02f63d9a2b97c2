-- A message may carry a file: its attachment (where the ciphertext is, and the key, hash,
-- size and type that decrypt it) as JSON, NULL for a text.
ALTER TABLE messages ADD COLUMN file TEXT;
ALTER TABLE outbox ADD COLUMN file TEXT;
ALTER TABLE group_messages ADD COLUMN file TEXT;
