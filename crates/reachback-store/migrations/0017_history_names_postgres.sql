-- Nothing on PostgreSQL: its trigram GIN indexes on the history's own columns serve
-- the substring filters (see the SQLite script for what changes there).
SELECT 1;
