-- The history's substring search without a trigram entry per interval (SQLite,
-- issue 22). Writing one in every enrollment transaction cost two thirds of what
-- the history cost an enrollment. An interval's username and hostname are its
-- device's when it is written (the enrollment writes both in one transaction), and
-- the devices have a trigram index already (device_search). What a device no longer
-- shows — it was deleted, or its names changed — is kept here, once per device and
-- names, with a trigram index of its own: rare writes, by trigger. A search takes
-- the devices whose current or former names match and reads their intervals; the
-- LIKE on the interval's own copy decides, so answers stay exact.
DROP TRIGGER binding_history_search_insert;
DROP TRIGGER binding_history_search_delete;
DROP TRIGGER binding_history_search_update;
DROP TABLE binding_history_search;
CREATE TABLE history_names (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    username TEXT NOT NULL,
    client_hostname TEXT NOT NULL,
    UNIQUE (device_id, username, client_hostname)
);
CREATE VIRTUAL TABLE history_names_search USING fts5(username, client_hostname, content = 'history_names', content_rowid = 'id', tokenize = 'trigram');
CREATE TRIGGER history_names_search_insert AFTER INSERT ON history_names BEGIN
    INSERT INTO history_names_search (rowid, username, client_hostname) VALUES (new.id, new.username, new.client_hostname);
END;
CREATE TRIGGER history_names_search_delete AFTER DELETE ON history_names BEGIN
    INSERT INTO history_names_search (history_names_search, rowid, username, client_hostname) VALUES ('delete', old.id, old.username, old.client_hostname);
END;
-- a device deleted, or its names changed: its former names stay findable for its history
CREATE TRIGGER devices_history_names_delete AFTER DELETE ON devices BEGIN
    INSERT OR IGNORE INTO history_names (device_id, username, client_hostname) VALUES (old.id, old.username, old.hostname);
END;
CREATE TRIGGER devices_history_names_update AFTER UPDATE OF hostname, username ON devices
WHEN old.hostname <> new.hostname OR old.username <> new.username
BEGIN
    INSERT OR IGNORE INTO history_names (device_id, username, client_hostname) VALUES (old.id, old.username, old.hostname);
END;
-- intervals written before: the names no device shows now
INSERT OR IGNORE INTO history_names (device_id, username, client_hostname)
SELECT DISTINCT h.device_id, h.username, h.client_hostname FROM binding_history h
WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = h.device_id AND d.username = h.username AND lower(d.hostname) = lower(h.client_hostname));
