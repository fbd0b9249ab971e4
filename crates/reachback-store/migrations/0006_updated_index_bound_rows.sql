-- The last-updated order lists bound rows only. With `released_at` (NULL exactly
-- for bound rows, by the CHECK on `bindings`) in the index, the index answers
-- "bound?" without reading the row, as the other sort indexes do with their own
-- column (NULL in quarantine): deep pages in this order walk the index alone.
DROP INDEX bindings_updated;
CREATE INDEX bindings_updated ON bindings (last_updated, ip_key, released_at);
