//! Row builders of the batch's set-based writes: one per table, the columns of its UNNEST
//! statement inside, filled by `push` one row at a time and written by one statement (none
//! when empty). Invariant: every column of a builder has one entry per row.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use super::load::StoredRun;
use super::DefKey;
use crate::machine::NodeRt;

/// The state a run row is written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    /// `RunPhase::as_str`.
    pub status: &'static str,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// The node whose failure failed it.
    pub failed_node_id: Option<String>,
}

/// New pinned snapshots (`weir_coordinator_definitions`), inserted on conflict do nothing.
#[derive(Default)]
pub(super) struct SnapshotRows {
    workflow_ids: Vec<String>,
    versions: Vec<i64>,
    workspace_ids: Vec<String>,
    definitions: Vec<Option<Value>>,
    refs: Vec<Option<String>>,
}

impl SnapshotRows {
    /// The definition `key` pins: inline, or its CAS ref.
    pub(super) fn push(
        &mut self,
        key: &DefKey,
        workspace_id: &str,
        definition: &Option<Value>,
        definition_ref: &Option<String>,
    ) {
        self.workflow_ids.push(key.1.clone());
        self.versions.push(key.2);
        self.workspace_ids.push(workspace_id.to_string());
        self.definitions.push(definition.clone());
        self.refs.push(definition_ref.clone());
    }

    pub(super) async fn insert(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.workflow_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"INSERT INTO weir_coordinator_definitions (workflow_id, version, workspace_id, definition, definition_ref)
               SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[])
               ON CONFLICT DO NOTHING"#,
            &self.workflow_ids,
            &self.versions,
            &self.workspace_ids,
            &self.definitions as &[Option<Value>],
            &self.refs as &[Option<String>],
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Runs stored for the first time (`weir_runs`): started ones and ones that failed at start.
#[derive(Default)]
pub(super) struct NewRunRows {
    run_ids: Vec<String>,
    workspace_ids: Vec<String>,
    workflow_ids: Vec<String>,
    versions: Vec<Option<i64>>,
    requesters: Vec<String>,
    permissions: Vec<String>,
    idempotency_keys: Vec<Option<String>>,
    statuses: Vec<String>,
    reasons: Vec<Option<String>>,
    failed_node_ids: Vec<Option<String>>,
    inputs_json: Vec<Option<String>>,
    inputs_refs: Vec<Option<String>>,
    traceparents: Vec<String>,
}

impl NewRunRows {
    pub(super) fn push(
        &mut self,
        run_id: &str,
        run: &StoredRun,
        idempotency_key: Option<&str>,
        state: RunState,
    ) {
        self.run_ids.push(run_id.to_string());
        self.workspace_ids.push(run.workspace_id.clone());
        self.workflow_ids.push(run.workflow_id.clone());
        self.versions.push(run.version);
        self.requesters.push(run.requester.clone());
        self.permissions.push(run.permission.clone());
        self.idempotency_keys
            .push(idempotency_key.map(str::to_string));
        self.statuses.push(state.status.to_string());
        self.reasons.push(state.reason);
        self.failed_node_ids.push(state.failed_node_id);
        self.inputs_json.push(run.inputs_json.clone());
        self.inputs_refs.push(run.inputs_ref.clone());
        self.traceparents.push(run.traceparent.clone());
    }

    /// How many rows were pushed.
    pub(super) fn len(&self) -> usize {
        self.run_ids.len()
    }

    /// Inserts the runs, started `now` from `completions_topic`; returns the run ids
    /// inserted. ON CONFLICT DO NOTHING is the guard against a concurrent request with the
    /// same idempotency key on another partition: a run not inserted is dropped.
    pub(super) async fn insert(
        self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
        completions_topic: String,
    ) -> Result<HashSet<String>, sqlx::Error> {
        if self.run_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let inserted = sqlx::query_scalar!(
            r#"INSERT INTO weir_runs (run_id, workspace_id, workflow_id, version, requester, permission,
                                      idempotency_key, status, reason, failed_node_id, inputs_json,
                                      inputs_ref, traceparent, started_at, finished_at, last_progress_at,
                                      completions_topic)
               SELECT run_id, workspace_id, workflow_id, version, requester, permission, idempotency_key,
                      status, reason, failed_node_id, inputs_json, inputs_ref, traceparent, $14::timestamptz,
                      CASE WHEN status = 'running' THEN NULL ELSE $14::timestamptz END, $14::timestamptz,
                      $15::text
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                           $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
                    AS t(run_id, workspace_id, workflow_id, version, requester, permission, idempotency_key,
                         status, reason, failed_node_id, inputs_json, inputs_ref, traceparent)
               ON CONFLICT DO NOTHING
               RETURNING run_id"#,
            &self.run_ids,
            &self.workspace_ids,
            &self.workflow_ids,
            &self.versions as &[Option<i64>],
            &self.requesters,
            &self.permissions,
            &self.idempotency_keys as &[Option<String>],
            &self.statuses,
            &self.reasons as &[Option<String>],
            &self.failed_node_ids as &[Option<String>],
            &self.inputs_json as &[Option<String>],
            &self.inputs_refs as &[Option<String>],
            &self.traceparents,
            now,
            completions_topic,
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(inserted.into_iter().collect())
    }
}

/// Stored runs whose state changed or that made progress (`weir_runs`).
#[derive(Default)]
pub(super) struct RunUpdateRows {
    run_ids: Vec<String>,
    statuses: Vec<String>,
    reasons: Vec<Option<String>>,
    failed_node_ids: Vec<Option<String>>,
    /// An attempt started or ended: resets the stall clock and the stalled mark.
    progressed: Vec<bool>,
}

impl RunUpdateRows {
    pub(super) fn push(&mut self, run_id: &str, state: RunState, progressed: bool) {
        self.run_ids.push(run_id.to_string());
        self.statuses.push(state.status.to_string());
        self.reasons.push(state.reason);
        self.failed_node_ids.push(state.failed_node_id);
        self.progressed.push(progressed);
    }

    /// Updates the runs as of `now` (a run leaving `running` gets its `finished_at` once).
    pub(super) async fn update(
        self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        if self.run_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"UPDATE weir_runs r
               SET status = u.status, reason = u.reason, failed_node_id = u.failed_node_id,
                   finished_at = CASE WHEN u.status = 'running' THEN NULL ELSE coalesce(r.finished_at, $6::timestamptz) END,
                   last_progress_at = CASE WHEN u.progressed THEN $6::timestamptz ELSE r.last_progress_at END,
                   stalled = r.stalled AND NOT u.progressed
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[])
                    AS u(run_id, status, reason, failed_node_id, progressed)
               WHERE r.run_id = u.run_id"#,
            &self.run_ids,
            &self.statuses,
            &self.reasons as &[Option<String>],
            &self.failed_node_ids as &[Option<String>],
            &self.progressed,
            now,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Changed nodes (`weir_run_nodes`), upserted: a node has a row once dispatched.
#[derive(Default)]
pub(super) struct NodeRows {
    run_ids: Vec<String>,
    node_ids: Vec<String>,
    node_types: Vec<String>,
    statuses: Vec<String>,
    attempts: Vec<i32>,
    hops: Vec<i32>,
    outputs_json: Vec<Option<String>>,
    output_refs: Vec<Option<String>>,
    errors: Vec<Option<String>>,
    from_cache: Vec<bool>,
}

impl NodeRows {
    pub(super) fn push(&mut self, run_id: &str, node_id: &str, node_type: &str, n: &NodeRt) {
        self.run_ids.push(run_id.to_string());
        self.node_ids.push(node_id.to_string());
        self.node_types.push(node_type.to_string());
        self.statuses.push(n.phase.as_str().to_string());
        // A dispatched node's attempt and hop are at least 1 (the table checks it).
        self.attempts.push(n.attempt.max(1));
        self.hops.push(n.hop.max(1));
        self.outputs_json.push(n.output_json.clone());
        self.output_refs.push(n.output_ref.clone());
        self.errors.push(n.error.clone());
        self.from_cache.push(n.from_cache);
    }

    pub(super) async fn upsert(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.run_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"INSERT INTO weir_run_nodes (run_id, node_id, node_type, status, attempt, hop,
                                           output_json, output_ref, error, from_cache)
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                                    $7::text[], $8::text[], $9::text[], $10::bool[])
               ON CONFLICT (run_id, node_id) DO UPDATE
               SET status = EXCLUDED.status, attempt = EXCLUDED.attempt, hop = EXCLUDED.hop,
                   output_json = EXCLUDED.output_json, output_ref = EXCLUDED.output_ref,
                   error = EXCLUDED.error, from_cache = EXCLUDED.from_cache"#,
            &self.run_ids,
            &self.node_ids,
            &self.node_types,
            &self.statuses,
            &self.attempts,
            &self.hops,
            &self.outputs_json as &[Option<String>],
            &self.output_refs as &[Option<String>],
            &self.errors as &[Option<String>],
            &self.from_cache,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// What a durable timer is for (`weir_run_timers.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKind {
    /// Dispatch the next attempt.
    Retry,
    /// The attempt's deadline.
    Deadline,
}

impl TimerKind {
    fn as_str(self) -> &'static str {
        match self {
            TimerKind::Retry => "retry",
            TimerKind::Deadline => "deadline",
        }
    }
}

/// Durable timers (`weir_run_timers`), one per (run, node, kind): a newer one replaces it.
#[derive(Default)]
pub(super) struct TimerRows {
    run_ids: Vec<String>,
    node_ids: Vec<String>,
    kinds: Vec<String>,
    attempts: Vec<i32>,
    due_at: Vec<DateTime<Utc>>,
}

impl TimerRows {
    pub(super) fn push(
        &mut self,
        run_id: &str,
        node_id: &str,
        kind: TimerKind,
        attempt: i32,
        due_at: DateTime<Utc>,
    ) {
        self.run_ids.push(run_id.to_string());
        self.node_ids.push(node_id.to_string());
        self.kinds.push(kind.as_str().to_string());
        self.attempts.push(attempt);
        self.due_at.push(due_at);
    }

    pub(super) async fn upsert(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.run_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"INSERT INTO weir_run_timers (run_id, node_id, kind, attempt, due_at)
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[])
               ON CONFLICT (run_id, node_id, kind) DO UPDATE
               SET attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at"#,
            &self.run_ids,
            &self.node_ids,
            &self.kinds,
            &self.attempts,
            &self.due_at,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
