-- Substring search on hostnames and usernames (SQLite): a trigram full-text index
-- over the devices (a binding's client_hostname and username are copies of its
-- device's). It narrows candidates; the listing's LIKE condition stays the exact
-- test. External content: the index holds trigrams only, the text stays in
-- `devices`, keyed by its rowid (stable: the server never runs VACUUM; after a
-- manual VACUUM, `INSERT INTO device_search(device_search) VALUES ('rebuild')`).
CREATE VIRTUAL TABLE device_search USING fts5(hostname, username, content = 'devices', content_rowid = 'rowid', tokenize = 'trigram');
INSERT INTO device_search (device_search) VALUES ('rebuild');
CREATE TRIGGER device_search_insert AFTER INSERT ON devices BEGIN
    INSERT INTO device_search (rowid, hostname, username) VALUES (new.rowid, new.hostname, new.username);
END;
CREATE TRIGGER device_search_delete AFTER DELETE ON devices BEGIN
    INSERT INTO device_search (device_search, rowid, hostname, username) VALUES ('delete', old.rowid, old.hostname, old.username);
END;
CREATE TRIGGER device_search_update AFTER UPDATE OF hostname, username ON devices BEGIN
    INSERT INTO device_search (device_search, rowid, hostname, username) VALUES ('delete', old.rowid, old.hostname, old.username);
    INSERT INTO device_search (rowid, hostname, username) VALUES (new.rowid, new.hostname, new.username);
END;
