-- Files moved to the colder store (`[media.cold]`, spec/media.md §5): read from there.
ALTER TABLE media ADD COLUMN cold INTEGER NOT NULL DEFAULT 0;
CREATE INDEX media_to_cool ON media (created_ts) WHERE cold = 0;
