-- step_attempts (run_id, step) WHERE status = 'succeeded' served no query the primary key
-- (run_id, step, attempt) does not: every read of attempts is by run_id (resume state, the
-- run's attempts). It cost an entry for every attempt that succeeded.
DROP INDEX IF EXISTS step_attempts_succeeded_idx;
