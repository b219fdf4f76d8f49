-- step_attempts.run_id no longer has a foreign key. Its check ran once per attempt row (a
-- lookup and a KEY SHARE lock of the run), about a third of Postgres' CPU in the
-- statement that records a finished run and its attempts. That statement already joins each
-- attempt to its run, leased to the writing daemon, and the run's row is locked by the
-- same statement when it finishes; no other statement writes attempts.
ALTER TABLE step_attempts DROP CONSTRAINT IF EXISTS step_attempts_run_id_fkey;

-- Deleting runs still deletes their attempts (what ON DELETE CASCADE did), once per
-- statement rather than once per row. The function keeps the migration's search_path (this
-- schema), whatever the search_path of the session deleting runs.
CREATE OR REPLACE FUNCTION delete_attempts_of_deleted_runs() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM step_attempts a USING deleted_runs d WHERE a.run_id = d.id;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS runs_delete_attempts ON runs;
CREATE TRIGGER runs_delete_attempts
    AFTER DELETE ON runs
    REFERENCING OLD TABLE AS deleted_runs
    FOR EACH STATEMENT EXECUTE FUNCTION delete_attempts_of_deleted_runs();

-- TRUNCATE runs, which the foreign key refused without CASCADE, empties the attempts too.
CREATE OR REPLACE FUNCTION truncate_attempts_of_runs() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    TRUNCATE step_attempts;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS runs_truncate_attempts ON runs;
CREATE TRIGGER runs_truncate_attempts
    AFTER TRUNCATE ON runs
    FOR EACH STATEMENT EXECUTE FUNCTION truncate_attempts_of_runs();
