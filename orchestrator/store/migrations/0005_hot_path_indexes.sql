-- runs (status, id) served no query (claims use the partial indexes on pending and running
-- runs; listings scan the primary key backwards) and cost an entry on every run insert and
-- every status change.
DROP INDEX IF EXISTS runs_status_idx;
