-- Binding history (issue 22), SQLite. One row per interval an address was bound to
-- a device: opened (released_at NULL) in the transaction that binds the address and
-- closed (released_at, reason) in the one that releases it. What the interval shows
-- is copied, not referenced: devices and ranges are deleted, their history stays.
-- An interval holds from bound_at (inclusive) to released_at (exclusive).
CREATE TABLE binding_history (
    id INTEGER PRIMARY KEY,
    ip_key BLOB NOT NULL,
    ip TEXT NOT NULL,
    device_id TEXT NOT NULL,
    username TEXT NOT NULL,
    client_hostname TEXT NOT NULL,
    platform TEXT NOT NULL,
    range_id TEXT NOT NULL,
    range_name TEXT NOT NULL,
    bound_at BIGINT NOT NULL,
    bound_reason TEXT NOT NULL,
    released_at BIGINT,
    reason TEXT,
    CHECK ((released_at IS NULL) = (reason IS NULL))
);
-- `ip` (+ `at`): the intervals of an address by start, the end in the index so
-- "held at T" is answered without reading rows
CREATE INDEX binding_history_ip ON binding_history (ip_key, bound_at, released_at);
CREATE INDEX binding_history_device ON binding_history (device_id, bound_at);
-- the default order (newest first) and the `to` side of a window
CREATE INDEX binding_history_bound ON binding_history (bound_at);
-- retention deletes closed intervals by end; open ones never enter this index
CREATE INDEX binding_history_released ON binding_history (released_at) WHERE released_at IS NOT NULL;
-- substring filters on usernames and hostnames: a trigram index over the history's
-- own copies (devices are deleted, their history is not); it narrows candidates and
-- the LIKE condition stays the exact test. Usernames and hostnames of an interval
-- never change once written.
CREATE VIRTUAL TABLE binding_history_search USING fts5(username, client_hostname, content = 'binding_history', content_rowid = 'id', tokenize = 'trigram');
CREATE TRIGGER binding_history_search_insert AFTER INSERT ON binding_history BEGIN
    INSERT INTO binding_history_search (rowid, username, client_hostname) VALUES (new.id, new.username, new.client_hostname);
END;
CREATE TRIGGER binding_history_search_delete AFTER DELETE ON binding_history BEGIN
    INSERT INTO binding_history_search (binding_history_search, rowid, username, client_hostname) VALUES ('delete', old.id, old.username, old.client_hostname);
END;
CREATE TRIGGER binding_history_search_update AFTER UPDATE OF username, client_hostname ON binding_history BEGIN
    INSERT INTO binding_history_search (binding_history_search, rowid, username, client_hostname) VALUES ('delete', old.id, old.username, old.client_hostname);
    INSERT INTO binding_history_search (rowid, username, client_hostname) VALUES (new.id, new.username, new.client_hostname);
END;
-- the bindings held when history began: open intervals from their last update (the
-- moment they were bound: a held binding is not updated)
INSERT INTO binding_history (ip_key, ip, device_id, username, client_hostname, platform, range_id, range_name, bound_at, bound_reason)
SELECT b.ip_key, b.ip, b.device_id, b.username, b.client_hostname, b.platform, b.range_id, r.name, b.last_updated, 'migrated'
FROM bindings b JOIN ip_ranges r ON r.id = b.range_id WHERE b.device_id IS NOT NULL ORDER BY b.last_updated, b.ip_key;
