-- Workflow runs, advanced by the coordinator from completion events.

-- Definitions pinned by runs: a snapshot per (workflow, version), written once (insert on
-- conflict do nothing) when a run first pins it, so a run never depends on later heads.
-- Inline (jsonb) or, like the heads, a CAS reference: never both.
CREATE TABLE weir_coordinator_definitions (
    workflow_id    text        NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 1),
    workspace_id   text        NOT NULL,
    definition     jsonb,
    definition_ref text,
    pinned_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, version),
    CHECK ((definition IS NULL) <> (definition_ref IS NULL))
);

-- One row per run. version is NULL only for a run that failed at start (unknown workflow or
-- version). last_progress_at moves whenever a node attempt starts or ends; the stall scan
-- reads it. stalled is set once per idle period (reset by progress).
CREATE TABLE weir_runs (
    run_id           text        PRIMARY KEY,
    workspace_id     text        NOT NULL,
    workflow_id      text        NOT NULL,
    version          bigint,
    requester        text        NOT NULL,
    permission       text        NOT NULL,
    idempotency_key  text,
    status           text        NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    reason           text,
    failed_node_id   text,
    inputs_json      text,
    inputs_ref       text,
    traceparent      text        NOT NULL DEFAULT '',
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    last_progress_at timestamptz NOT NULL DEFAULT now(),
    stalled          boolean     NOT NULL DEFAULT false,
    CHECK ((status = 'running') = (finished_at IS NULL))
);
-- RunRequested is idempotent on its idempotency key, per workspace.
CREATE UNIQUE INDEX weir_runs_idempotency ON weir_runs (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The stall scan and the runs-in-flight gauge read running runs only.
CREATE INDEX weir_runs_running ON weir_runs (last_progress_at) WHERE status = 'running';

-- Nodes of a run that have been dispatched at least once (a missing row is a node still
-- waiting for its predecessors). attempt is the current attempt (1-based). Nodes still running
-- or waiting for a retry when their run ends become cancelled.
CREATE TABLE weir_run_nodes (
    run_id      text    NOT NULL REFERENCES weir_runs (run_id) ON DELETE CASCADE,
    node_id     text    NOT NULL,
    node_type   text    NOT NULL,
    status      text    NOT NULL CHECK (status IN ('running', 'retry_wait', 'succeeded', 'failed', 'cancelled')),
    attempt     integer NOT NULL CHECK (attempt >= 1),
    hop         integer NOT NULL CHECK (hop >= 1),
    output_json text,
    output_ref  text,
    error       text,
    from_cache  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, node_id)
);

-- Durable timers: a retry to dispatch or an attempt's deadline, one per (run, node, kind).
-- A timer is applied only if the node is still in the state it was set for (same attempt);
-- otherwise it is dropped, so stale timers are harmless.
CREATE TABLE weir_run_timers (
    run_id  text        NOT NULL REFERENCES weir_runs (run_id) ON DELETE CASCADE,
    node_id text        NOT NULL,
    kind    text        NOT NULL CHECK (kind IN ('retry', 'deadline')),
    attempt integer     NOT NULL,
    due_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, node_id, kind)
);
CREATE INDEX weir_run_timers_due ON weir_run_timers (due_at);
