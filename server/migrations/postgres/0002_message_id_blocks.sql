-- Message ids for several workers on one database (issue 13). Each parleyd reserves ids in
-- blocks: nextval hands out the first id of a block of 1024 (Store::next_message_id, ID_BLOCK),
-- so two workers never hand out the same id and a worker takes a block in one round trip.
-- `parleyd migrate` sets it past the largest copied id. No SQLite twin: SQLite is one process
-- per database and counts from the largest id at start.
CREATE SEQUENCE message_id_blocks AS BIGINT INCREMENT BY 1024 MINVALUE 1 START WITH 1;
