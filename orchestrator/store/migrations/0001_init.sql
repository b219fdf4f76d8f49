-- Events: every arrival accepted from Kafka, deduplicated by CloudEvents (source, id).
CREATE TABLE events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source          text NOT NULL,
    event_id        text NOT NULL,
    type            text NOT NULL,
    subject         text,
    event_time      timestamptz,
    dataset         text NOT NULL,
    partition_key   text,
    envelope        jsonb NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    published_at    timestamptz,
    received_at     timestamptz NOT NULL DEFAULT now(),
    traceparent     text,
    tracestate      text,
    UNIQUE (source, event_id)
);
CREATE INDEX events_dataset_idx ON events (dataset, partition_key);
CREATE INDEX events_received_idx ON events (received_at);

-- Runs: one per (rule, trigger key); the unique constraint is what makes creation idempotent.
CREATE TABLE runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule             text NOT NULL,
    trigger_key      text NOT NULL,
    pipeline         text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    priority         integer NOT NULL DEFAULT 0,
    params           jsonb NOT NULL DEFAULT '{}',
    event_ids        bigint[] NOT NULL,
    first_event_at   timestamptz,
    traceparent      text,
    tracestate       text,
    links            text[] NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    claims           integer NOT NULL DEFAULT 0,
    cancel_requested boolean NOT NULL DEFAULT false,
    failed_step      text,
    error            text,
    UNIQUE (rule, trigger_key)
);
CREATE INDEX runs_pending_idx ON runs (priority DESC, id) WHERE status = 'pending';
CREATE INDEX runs_running_idx ON runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_status_idx ON runs (status, id);

-- Step attempts: one row per attempt; a succeeded row's output is what a resumed run reuses.
CREATE TABLE step_attempts (
    run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step        text NOT NULL,
    attempt     integer NOT NULL,
    status      text NOT NULL
                CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    output      jsonb,
    error       text,
    owner       text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (run_id, step, attempt)
);
CREATE INDEX step_attempts_succeeded_idx ON step_attempts (run_id, step) WHERE status = 'succeeded';

-- Dead letters: records that could not be accepted, with the reason. One per Kafka position.
CREATE TABLE dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    key             bytea,
    value           bytea,
    value_size      integer NOT NULL,
    headers         jsonb NOT NULL DEFAULT '[]',
    reason          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    redriven_at     timestamptz,
    UNIQUE (topic, kafka_partition, kafka_offset)
);
