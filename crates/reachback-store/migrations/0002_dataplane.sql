-- Reachback schema, version 2: the data plane. Segments and policies keep their
-- list-valued fields as one JSON document (`spec`): they are read whole, never
-- searched inside.
CREATE TABLE app_segments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    position BIGINT NOT NULL DEFAULT 0,
    enabled {BOOL} NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE access_policies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    position BIGINT NOT NULL,
    enabled {BOOL} NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE connectors (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    key_hash {BLOB} NOT NULL UNIQUE,
    certificate_serial TEXT,
    revoked {BOOL} NOT NULL DEFAULT FALSE,
    version TEXT,
    mode TEXT,
    last_seen BIGINT,
    created_at BIGINT NOT NULL
);

-- Live tunnels of agents, one row per session, removed when it ends; a replica
-- clears its own rows at start (a crash leaves them behind).
CREATE TABLE client_sessions (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    virtual_ip TEXT,
    broker_node TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    connected_at BIGINT NOT NULL
);
CREATE INDEX client_sessions_device ON client_sessions (device_id);
CREATE INDEX client_sessions_node ON client_sessions (broker_node);
