-- Reachback schema, version 3: the console's saved filters, per admin.
CREATE TABLE saved_filters (
    id TEXT PRIMARY KEY,
    admin_id TEXT NOT NULL REFERENCES admins (id) ON DELETE CASCADE,
    page TEXT NOT NULL,
    name TEXT NOT NULL,
    query TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (admin_id, page, name)
);

-- the dashboard counts enrollments per day
CREATE INDEX devices_created ON devices (created_at);
