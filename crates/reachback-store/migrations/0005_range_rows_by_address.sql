-- A range's rows are found by address: ranges do not overlap and every row of a
-- range lies inside it, so `ip_key BETWEEN first_key AND last_key` on the primary
-- key finds exactly them. The (range_id, ip_key) index cost every enrollment one
-- more B-tree insert at a place of its own (about a fifth of SQLite's write time).
DROP INDEX bindings_range;
