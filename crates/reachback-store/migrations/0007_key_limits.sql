-- Reachback schema, version 7: a connector's provisioning key has an id, expires,
-- and serves one enrollment unless issued reusable; an enrollment key may be
-- limited to one hostname or to the hostnames under a domain (`*.suffix`).
ALTER TABLE connectors ADD COLUMN key_id TEXT;
ALTER TABLE connectors ADD COLUMN key_expires_at BIGINT;
ALTER TABLE connectors ADD COLUMN key_used_at BIGINT;
ALTER TABLE connectors ADD COLUMN key_reusable {BOOL} NOT NULL DEFAULT FALSE;
-- keys issued by earlier versions: named by their connector's id, spent once the
-- connector holds a certificate, expired a day after the connector was created
UPDATE connectors SET key_id = id, key_expires_at = created_at + 86400000000,
    key_used_at = CASE WHEN certificate_serial IS NULL THEN NULL ELSE created_at END;

ALTER TABLE enrollment_keys ADD COLUMN hostname_pattern TEXT;
