-- Outbox: arrival events produced by steps, written in the transaction that records the
-- step's success and published to Kafka afterwards (at least once, stable event ids).
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     text NOT NULL UNIQUE,
    topic        text NOT NULL,
    key          bytea,
    value        bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '[]',
    run_id       bigint,
    step         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE published_at IS NULL;

-- A skipped step is recorded as succeeded with a null output; this says it was skipped.
ALTER TABLE step_attempts ADD COLUMN skipped boolean NOT NULL DEFAULT false;
