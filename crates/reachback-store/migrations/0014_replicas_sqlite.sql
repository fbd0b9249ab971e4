-- The server replicas sharing the database (issue 21). Each process registers
-- under its node name at start (one row per name: a restart takes its row
-- back), writes a heartbeat every second with the database's clock, and marks
-- the replicas whose heartbeat stopped `dead` (their client sessions go in the
-- same transaction). Dead rows are forgotten a day later. On SQLite there is one
-- replica: the process itself.
CREATE TABLE replicas (
    node_name TEXT PRIMARY KEY,
    -- this run of the process (a new one at every start)
    instance_id TEXT NOT NULL,
    tunnel_endpoint TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    last_heartbeat BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('alive', 'dead')),
    -- connectors holding a tunnel to it, as of its last heartbeat
    connectors BIGINT NOT NULL DEFAULT 0
);
