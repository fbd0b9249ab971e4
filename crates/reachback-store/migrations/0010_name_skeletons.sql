-- Names that look alike collide: the TR39 confusable skeleton of each name
-- (reachback_store::name_skeleton), unique per kind. NULL for rows written before
-- this version until the start-up backfill fills them (NULLs do not collide).
ALTER TABLE ip_ranges ADD COLUMN name_skeleton TEXT;
CREATE UNIQUE INDEX ip_ranges_name_skeleton ON ip_ranges (name_skeleton);
ALTER TABLE app_segments ADD COLUMN name_skeleton TEXT;
CREATE UNIQUE INDEX app_segments_name_skeleton ON app_segments (name_skeleton);
ALTER TABLE access_policies ADD COLUMN name_skeleton TEXT;
CREATE UNIQUE INDEX access_policies_name_skeleton ON access_policies (name_skeleton);
ALTER TABLE connectors ADD COLUMN name_skeleton TEXT;
CREATE UNIQUE INDEX connectors_name_skeleton ON connectors (name_skeleton);
ALTER TABLE admins ADD COLUMN username_skeleton TEXT;
CREATE UNIQUE INDEX admins_username_skeleton ON admins (username_skeleton);
