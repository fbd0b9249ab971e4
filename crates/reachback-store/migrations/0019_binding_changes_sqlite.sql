-- The bindings listing's change feed (issue 23), SQLite. Each server keeps the bound
-- addresses in an in-memory index (crates/reachback-store/src/listing) and follows
-- this table to stay exact: triggers write one row per changed binding in the very
-- transaction that changes it, so no write path (enrollment, release, idle TTL,
-- device delete, range delete's cascade, raw SQL) can bypass it. SQLite has one
-- writer at a time, so `seq` grows in commit order and a cursor suffices. `seq` is
-- the rowid (no AUTOINCREMENT: that writes `sqlite_sequence` on every change); the
-- pruning always keeps the newest row, so numbering never starts again.
-- Rows older than an hour are pruned; `binding_changes_pruned` remembers how far, so
-- an index that fell behind that reloads instead of missing a change.
CREATE TABLE binding_changes (
    seq INTEGER PRIMARY KEY,
    ip_key BLOB NOT NULL,
    at BIGINT NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000000)
);
CREATE TABLE binding_changes_pruned (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through_seq BIGINT NOT NULL,
    through_xid BIGINT NOT NULL
);
INSERT INTO binding_changes_pruned (id, through_seq, through_xid) VALUES (1, 0, 0);
CREATE TRIGGER binding_changes_insert AFTER INSERT ON bindings BEGIN
    INSERT INTO binding_changes (ip_key) VALUES (NEW.ip_key);
END;
CREATE TRIGGER binding_changes_update AFTER UPDATE ON bindings
WHEN OLD.ip_key IS NOT NEW.ip_key OR OLD.range_id IS NOT NEW.range_id OR OLD.device_id IS NOT NEW.device_id
  OR OLD.username IS NOT NEW.username OR OLD.platform IS NOT NEW.platform OR OLD.client_hostname IS NOT NEW.client_hostname
  OR OLD.last_updated IS NOT NEW.last_updated BEGIN
    INSERT INTO binding_changes (ip_key) VALUES (NEW.ip_key);
    INSERT INTO binding_changes (ip_key) SELECT OLD.ip_key WHERE OLD.ip_key IS NOT NEW.ip_key;
END;
CREATE TRIGGER binding_changes_delete AFTER DELETE ON bindings BEGIN
    INSERT INTO binding_changes (ip_key) VALUES (OLD.ip_key);
END;
