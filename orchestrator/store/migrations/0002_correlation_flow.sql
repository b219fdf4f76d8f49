-- Correlation state of correlated and absence rules, one row per (rule, key).
CREATE TABLE correlations (
    rule       text NOT NULL,
    key        text NOT NULL,
    state      jsonb NOT NULL,
    deadline   timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule, key)
);
CREATE INDEX correlations_deadline_idx ON correlations (deadline) WHERE deadline IS NOT NULL;

-- Flow control per (rule, key): debounce/batch collect events into a pending run until
-- not_before; concurrency caps running runs of the same (rule, flow_key).
ALTER TABLE runs ADD COLUMN flow_key    text;
ALTER TABLE runs ADD COLUMN concurrency integer;
ALTER TABLE runs ADD COLUMN collecting  boolean NOT NULL DEFAULT false;
ALTER TABLE runs ADD COLUMN not_before  timestamptz;
CREATE INDEX runs_flow_idx ON runs (rule, flow_key, status) WHERE flow_key IS NOT NULL;
CREATE INDEX runs_not_before_idx ON runs (not_before) WHERE status = 'pending' AND not_before IS NOT NULL;
