-- Events for the security team's tools (issue 22), PostgreSQL: as the SQLite script
-- (see there); triggers call functions here.
CREATE TABLE event_sinks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('webhook', 'syslog')),
    target TEXT NOT NULL,
    secret_sealed TEXT,
    ca_certificate TEXT,
    event_types TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    delivered_total BIGINT NOT NULL DEFAULT 0,
    failures BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    last_attempt_at BIGINT,
    last_delivery_at BIGINT,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX event_sinks_name ON event_sinks (lower(name));

CREATE TABLE event_outbox (
    id BIGSERIAL PRIMARY KEY,
    sink_id TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    at BIGINT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX event_outbox_sink ON event_outbox (sink_id, id);

CREATE FUNCTION audit_log_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (sink_id, type, subject, at, data)
    SELECT s.id, 'com.reachback.' || NEW.resource_type || '.' || NEW.action, NEW.resource_id, NEW.at,
        json_build_object('audit_id', NEW.id, 'actor', NEW.actor, 'action', NEW.action, 'resource_type', NEW.resource_type,
            'resource_id', NEW.resource_id, 'before', NEW.before_json::json, 'after', NEW.after_json::json, 'source_ip', NEW.source_ip)::text
    FROM event_sinks s WHERE s.enabled;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_log_events AFTER INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_events();

CREATE FUNCTION binding_history_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO event_outbox (sink_id, type, subject, at, data)
        SELECT s.id, 'com.reachback.binding.bound', NEW.ip, NEW.bound_at,
            json_build_object('interval_id', NEW.id, 'ip', NEW.ip, 'device_id', NEW.device_id, 'username', NEW.username,
                'client_hostname', NEW.client_hostname, 'platform', NEW.platform, 'range_id', NEW.range_id, 'range_name', NEW.range_name,
                'bound_at', NEW.bound_at, 'bound_reason', NEW.bound_reason)::text
        FROM event_sinks s WHERE s.enabled;
    ELSIF OLD.released_at IS NULL AND NEW.released_at IS NOT NULL THEN
        INSERT INTO event_outbox (sink_id, type, subject, at, data)
        SELECT s.id, 'com.reachback.binding.released', NEW.ip, NEW.released_at,
            json_build_object('interval_id', NEW.id, 'ip', NEW.ip, 'device_id', NEW.device_id, 'username', NEW.username,
                'client_hostname', NEW.client_hostname, 'platform', NEW.platform, 'range_id', NEW.range_id, 'range_name', NEW.range_name,
                'bound_at', NEW.bound_at, 'released_at', NEW.released_at, 'reason', NEW.reason)::text
        FROM event_sinks s WHERE s.enabled;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER binding_history_events AFTER INSERT OR UPDATE OF released_at ON binding_history FOR EACH ROW EXECUTE FUNCTION binding_history_events();

CREATE FUNCTION flow_log_denied_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (sink_id, type, subject, at, data)
    SELECT s.id, 'com.reachback.flow.denied', NEW.virtual_ip, NEW.started_at,
        json_build_object('flow_id', NEW.id, 'started_at', NEW.started_at, 'protocol', NEW.protocol, 'policy_id', NEW.policy_id,
            'policy_name', NEW.policy_name, 'connector_id', NEW.connector_id, 'connector_name', NEW.connector_name,
            'server_ip', NEW.server_ip, 'server_port', NEW.server_port, 'virtual_ip', NEW.virtual_ip, 'virtual_port', NEW.virtual_port,
            'device_id', NEW.device_id, 'username', NEW.username, 'client_hostname', NEW.client_hostname, 'socks_user', NEW.socks_user)::text
    FROM event_sinks s WHERE s.enabled;
    RETURN NULL;
END $$;
CREATE TRIGGER flow_log_denied_events AFTER INSERT ON flow_log FOR EACH ROW WHEN (NEW.verdict = 'denied') EXECUTE FUNCTION flow_log_denied_events();
