-- Flow log (issue 22), SQLite. One row per flow the broker decided on, written when
-- the flow is over (a refusal is over at once): when it started and ended, the
-- connector, the server's source address, the virtual address and port it asked
-- for, who held that address then (copied, not referenced: devices go, their flows
-- stay), the verdict, and the bytes each way. Rows are never updated; retention
-- deletes them by end. A flow spans started_at to ended_at, both inclusive.
CREATE TABLE flow_log (
    id INTEGER PRIMARY KEY,
    started_at BIGINT NOT NULL,
    ended_at BIGINT NOT NULL,
    protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
    verdict TEXT NOT NULL CHECK (verdict IN ('allowed', 'denied', 'offline', 'refused_by_agent', 'failed')),
    -- why an agent refused or a flow failed (port_not_allowed, connect_failed, agent_error, timeout)
    reason TEXT,
    -- the policy that allowed or denied it; NULL with `denied` is the default deny
    policy_id TEXT,
    policy_name TEXT,
    connector_id TEXT NOT NULL,
    connector_name TEXT NOT NULL,
    server_key BLOB NOT NULL,
    server_ip TEXT NOT NULL,
    server_port INTEGER NOT NULL,
    virtual_key BLOB NOT NULL,
    virtual_ip TEXT NOT NULL,
    virtual_port INTEGER NOT NULL,
    -- the device holding the virtual address then; NULL when no agent held it (offline)
    device_id TEXT,
    username TEXT,
    client_hostname TEXT,
    platform TEXT,
    -- the SOCKS5 user the connector authenticated, for flows that came in over SOCKS5
    socks_user TEXT,
    bytes_to_client BIGINT NOT NULL,
    bytes_from_client BIGINT NOT NULL,
    node_name TEXT NOT NULL,
    CHECK (ended_at >= started_at)
);
-- the default order (newest first) and the `to` side of a window; every SQLite
-- index holds the rowid, so (started_at, id) orders are read from it
CREATE INDEX flow_log_started ON flow_log (started_at);
-- the `from` side of a window, the order by end, and retention
CREATE INDEX flow_log_ended ON flow_log (ended_at);
-- `virtual_ip` and `server_ip` (an address or a CIDR: a key range), newest first
CREATE INDEX flow_log_virtual ON flow_log (virtual_key, started_at);
CREATE INDEX flow_log_server ON flow_log (server_key, started_at);
-- a device's recent flows (the console's link from a client session)
CREATE INDEX flow_log_device ON flow_log (device_id, started_at);
-- the rare verdicts (denied, refused, offline) without reading the allowed ones
CREATE INDEX flow_log_verdict ON flow_log (verdict, started_at);
-- substring filters on usernames and hostnames: the log's distinct (device, username,
-- hostname) triples, written with each batch, carry the trigram index — a few rows
-- per device instead of a trigram entry per flow; a filter finds the matching
-- devices there and reads their flows through flow_log_device, and the LIKE on the
-- flow's own copy stays the exact test. Triples outlive their flows (harmless: they
-- can only widen the candidates).
CREATE TABLE flow_log_clients (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    username TEXT NOT NULL,
    client_hostname TEXT NOT NULL,
    UNIQUE (device_id, username, client_hostname)
);
CREATE VIRTUAL TABLE flow_log_clients_search USING fts5(username, client_hostname, content = 'flow_log_clients', content_rowid = 'id', tokenize = 'trigram');
CREATE TRIGGER flow_log_clients_search_insert AFTER INSERT ON flow_log_clients BEGIN
    INSERT INTO flow_log_clients_search (rowid, username, client_hostname) VALUES (new.id, new.username, new.client_hostname);
END;
CREATE TRIGGER flow_log_clients_search_delete AFTER DELETE ON flow_log_clients BEGIN
    INSERT INTO flow_log_clients_search (flow_log_clients_search, rowid, username, client_hostname) VALUES ('delete', old.id, old.username, old.client_hostname);
END;
