-- Scope runs to the completions topic they came from, so a coordinator's timer loop (retries,
-- deadlines, stall detection) drives only the runs of its own deployment when several share
-- one database under different topic prefixes (e.g. test runs, staging beside dev). Rows from
-- before this migration belong to the unprefixed topic.

ALTER TABLE weir_runs ADD COLUMN completions_topic text NOT NULL DEFAULT 'weir.completions.v1';
ALTER TABLE weir_runs ALTER COLUMN completions_topic DROP DEFAULT;

DROP INDEX weir_runs_running;
CREATE INDEX weir_runs_running ON weir_runs (completions_topic, last_progress_at) WHERE status = 'running';
