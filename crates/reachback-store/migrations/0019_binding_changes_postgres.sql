-- The bindings listing's change feed (issue 23), PostgreSQL: as the SQLite script
-- (see there), with two differences.
-- * Sequence values are taken before commit, so `seq` order is not commit order: a
--   reader may see seq 11 while seq 10's transaction is still open. Each row records
--   its transaction id (`xid`), and a reader re-reads every row of a transaction
--   that was still running at its last read (xid at or above that read's snapshot
--   xmin); rows it applied already are skipped by `seq`.
-- * Statement-level triggers with transition tables: a bulk load writes its change
--   rows in one statement, not one trigger call per row.
-- The text columns the listing sorts on get the "C" collation (bytewise order, as
-- SQLite's BINARY): the same order on every database whatever its locale, and the
-- order the in-memory index keeps.
ALTER TABLE bindings
    ALTER COLUMN username TYPE TEXT COLLATE "C",
    ALTER COLUMN platform TYPE TEXT COLLATE "C",
    ALTER COLUMN client_hostname TYPE TEXT COLLATE "C";
CREATE TABLE binding_changes (
    seq BIGSERIAL PRIMARY KEY,
    ip_key BYTEA NOT NULL,
    xid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    at BIGINT NOT NULL DEFAULT ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
);
CREATE INDEX binding_changes_xid ON binding_changes (xid);
CREATE INDEX binding_changes_at ON binding_changes (at);
CREATE TABLE binding_changes_pruned (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through_seq BIGINT NOT NULL,
    through_xid BIGINT NOT NULL
);
INSERT INTO binding_changes_pruned (id, through_seq, through_xid) VALUES (1, 0, 0);
CREATE FUNCTION binding_changes_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO binding_changes (ip_key) SELECT ip_key FROM new_rows;
    RETURN NULL;
END $$;
CREATE FUNCTION binding_changes_old() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO binding_changes (ip_key) SELECT ip_key FROM old_rows;
    RETURN NULL;
END $$;
CREATE FUNCTION binding_changes_both() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO binding_changes (ip_key) SELECT ip_key FROM new_rows UNION SELECT ip_key FROM old_rows;
    RETURN NULL;
END $$;
CREATE TRIGGER binding_changes_insert AFTER INSERT ON bindings REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION binding_changes_new();
CREATE TRIGGER binding_changes_update AFTER UPDATE ON bindings REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION binding_changes_both();
CREATE TRIGGER binding_changes_delete AFTER DELETE ON bindings REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION binding_changes_old();
