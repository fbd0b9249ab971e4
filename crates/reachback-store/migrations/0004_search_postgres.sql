-- Substring search on hostnames and usernames (PostgreSQL): trigram GIN indexes on
-- the devices serve `lower(column) LIKE '%…%'`; the bindings listing narrows to the
-- matching devices first (a binding's client_hostname and username are copies of
-- its device's), so two indexes serve both lists. pg_trgm
-- ships with PostgreSQL's contrib and is a trusted extension (a database owner
-- may create it); where it is missing the server still starts and those filters
-- scan, as they did before.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX devices_hostname_trgm ON devices USING gin (lower(hostname) gin_trgm_ops);
    CREATE INDEX devices_username_trgm ON devices USING gin (lower(username) gin_trgm_ops);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'substring search indexes not created (pg_trgm unavailable?): %', SQLERRM;
END
$$;
