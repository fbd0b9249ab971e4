-- Reachback schema, version 1. Written once for both backends: {BLOB}, {REAL},
-- {BOOL} and {CLUSTERED} are replaced per backend before the script runs.
CREATE TABLE admins (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    username_key TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('superadmin', 'admin', 'viewer')),
    password_hash TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    admin_id TEXT NOT NULL REFERENCES admins (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    key_hash {BLOB} NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    last_ip TEXT
);

CREATE TABLE admin_sessions (
    id TEXT PRIMARY KEY,
    admin_id TEXT NOT NULL REFERENCES admins (id) ON DELETE CASCADE,
    token_hash {BLOB} NOT NULL UNIQUE,
    csrf_token TEXT NOT NULL,
    client_ip TEXT,
    active_since BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE ip_ranges (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    range_text TEXT NOT NULL,
    family BIGINT NOT NULL CHECK (family IN (4, 6)),
    first_key {BLOB} NOT NULL,
    last_key {BLOB} NOT NULL,
    city TEXT,
    state TEXT,
    country TEXT,
    latitude {REAL},
    longitude {REAL},
    enabled {BOOL} NOT NULL,
    used_ips BIGINT NOT NULL DEFAULT 0 CHECK (used_ips >= 0),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CHECK (first_key <= last_key)
);

CREATE TABLE enrollment_keys (
    id TEXT PRIMARY KEY,
    key_hash {BLOB} NOT NULL UNIQUE,
    username TEXT NOT NULL,
    description TEXT NOT NULL,
    reusable {BOOL} NOT NULL,
    expires_at BIGINT,
    used_count BIGINT NOT NULL DEFAULT 0 CHECK (used_count >= 0),
    revoked {BOOL} NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    hostname_key TEXT NOT NULL UNIQUE,
    username TEXT NOT NULL,
    platform TEXT NOT NULL,
    public_key_fingerprint {BLOB} NOT NULL,
    certificate_serial TEXT NOT NULL,
    enrollment_key_id TEXT,
    city TEXT,
    state TEXT,
    country TEXT,
    latitude {REAL},
    longitude {REAL},
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX devices_username ON devices (username);
CREATE INDEX devices_last_seen ON devices (last_seen);

-- One row per address that is bound (device_id set) or in release quarantine
-- (device_id NULL, released_at set). The primary key is the last word: no
-- address is ever bound twice.
CREATE TABLE bindings (
    ip_key {BLOB} PRIMARY KEY,
    ip TEXT NOT NULL,
    range_id TEXT NOT NULL REFERENCES ip_ranges (id) ON DELETE CASCADE,
    device_id TEXT UNIQUE REFERENCES devices (id),
    username TEXT,
    platform TEXT,
    client_hostname TEXT,
    last_updated BIGINT NOT NULL,
    released_at BIGINT,
    CHECK ((device_id IS NULL) = (released_at IS NOT NULL)),
    CHECK ((device_id IS NULL) = (username IS NULL) AND (device_id IS NULL) = (platform IS NULL) AND (device_id IS NULL) = (client_hostname IS NULL))
){CLUSTERED};
CREATE INDEX bindings_range ON bindings (range_id, ip_key);
CREATE INDEX bindings_username ON bindings (username, ip_key);
CREATE INDEX bindings_hostname ON bindings (client_hostname, ip_key);
CREATE INDEX bindings_platform ON bindings (platform, ip_key);
CREATE INDEX bindings_updated ON bindings (last_updated, ip_key);

CREATE TABLE revoked_certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    revoked_at BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    before_json TEXT,
    after_json TEXT,
    source_ip TEXT
);
CREATE INDEX audit_log_at ON audit_log (at, id);

CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE certificate_authority (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    certificate_pem TEXT NOT NULL,
    private_key_pem TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
