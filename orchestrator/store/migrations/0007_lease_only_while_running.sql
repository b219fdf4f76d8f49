-- A run holds a lease only while it is running: every transition out of 'running' clears the
-- lease, and only a claim (which sets 'running') sets one. With the invariant enforced, the
-- statements that finish or renew a daemon's runs look them up by primary key and lease
-- owner alone; their 'running' condition would otherwise lead Postgres to the
-- runs_running_idx partial index and read every running run of every daemon.
ALTER TABLE runs ADD CONSTRAINT runs_lease_only_while_running
    CHECK (lease_owner IS NULL OR status = 'running');
