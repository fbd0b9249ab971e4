-- The server replicas sharing the database (issue 21): as the SQLite script (see
-- there), plus the change notifications replicas listen to.
CREATE TABLE replicas (
    node_name TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    tunnel_endpoint TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    last_heartbeat BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('alive', 'dead')),
    connectors BIGINT NOT NULL DEFAULT 0
);

-- Changes other replicas must see are announced on the channel `reachback_changes`
-- by statement-level triggers: a NOTIFY is queued in the writing transaction and
-- delivered only when it commits (never for a rollback), identical payloads of one
-- transaction are delivered once, and the payload is only the topic (a few bytes,
-- far from PostgreSQL's 8,000-byte limit). Triggers rather than calls in the
-- store's write paths: every write reaches them, including cascades (a device
-- deleted takes its sessions) and writes added later.
CREATE FUNCTION reachback_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('reachback_changes', TG_ARGV[0]);
    RETURN NULL;
END $$;
-- not on `used_ips` alone: enrollments change it in every batch and the engine needs no reload for it
CREATE TRIGGER ip_ranges_notify AFTER INSERT OR DELETE OR UPDATE OF updated_at ON ip_ranges
    FOR EACH STATEMENT EXECUTE FUNCTION reachback_notify('ranges');
CREATE TRIGGER settings_notify AFTER INSERT OR UPDATE OR DELETE ON settings
    FOR EACH STATEMENT EXECUTE FUNCTION reachback_notify('settings');
CREATE TRIGGER app_segments_notify AFTER INSERT OR UPDATE OR DELETE ON app_segments
    FOR EACH STATEMENT EXECUTE FUNCTION reachback_notify('policy');
CREATE TRIGGER access_policies_notify AFTER INSERT OR UPDATE OR DELETE ON access_policies
    FOR EACH STATEMENT EXECUTE FUNCTION reachback_notify('policy');
-- a session row gone (deleted, its device deleted, its binding released, its replica dead):
-- the replica holding the tunnel disconnects it
CREATE TRIGGER client_sessions_notify AFTER DELETE ON client_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION reachback_notify('sessions');
-- revoked, or enrolled anew with another key (not `last_seen`, written at every connect)
CREATE TRIGGER connectors_notify AFTER DELETE OR UPDATE OF revoked, key_fingerprint ON connectors
    FOR EACH STATEMENT EXECUTE FUNCTION reachback_notify('connectors');
