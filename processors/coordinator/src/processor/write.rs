//! Writing a stepped batch back, in the batch's transaction, with one set-based statement per
//! table ([`rows`](super::rows)) and the output events through the outbox:
//!
//! 1. stored runs without their definition: failed, their timers dropped, a RunFailed each;
//! 2. new runs inserted (started ones and ones that failed at start); a run the insert skips
//!    lost a race on its idempotency key to another partition and is dropped with all it
//!    would have written (`duplicate_request`);
//! 3. changed stored runs updated, changed nodes upserted;
//! 4. the events: RunFailed of failed starts, then per run its lifecycle events (RunStarted,
//!    CacheStore offers, the one terminal event), NodeRetried, NodeReady;
//! 5. the timers still relevant at the end of the batch, upserted.
//!
//! Invariant: a NodeReady is written only for an attempt that still runs at the end of the
//! batch, in the transaction that moved the node to it, so each attempt is dispatched at
//! most once.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use weir_model::WireRef;
use weir_runtime::events::{
    self, new_event, CacheEvent, CacheStore, CompletionEvent, Envelope, NodeInput, NodeReady,
    NodeRetried, RunCancelled, RunCompleted, RunEvent, RunFailed, RunStarted, TopicEvent,
};
use weir_runtime::Outbox;

use super::load::{FailedStart, StoredRun};
use super::rows::{NewRunRows, NodeRows, RunState, RunUpdateRows, TimerKind, TimerRows};
use super::step::{Active, Stepped, Unrunnable};
use super::{output_value, ts, Advanced, Coordinator};
use crate::error::CoordinatorError;
use crate::machine::{AttemptEnd, Effect, Phase, RunPhase};
use crate::metrics as m;

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// What every event about one run carries besides its own fields: the envelope (time,
/// workspace, trace context) and the run's identity.
struct RunHeader {
    occurred_at: i64,
    workspace_id: String,
    traceparent: String,
    run_id: String,
    workflow_id: String,
    version: i64,
}

impl RunHeader {
    fn new(run_id: &str, run: &StoredRun, version: i64, traceparent: String, at_us: i64) -> Self {
        Self {
            occurred_at: at_us,
            workspace_id: run.workspace_id.clone(),
            traceparent,
            run_id: run_id.to_string(),
            workflow_id: run.workflow_id.clone(),
            version,
        }
    }

    /// The envelope of one more event about the run: a new event id, the batch's time, the
    /// run's workspace and traceparent (a run keeps no tracestate).
    fn envelope(&self) -> Envelope {
        Envelope::new(self.workspace_id.clone(), self.traceparent.clone(), None)
            .at(self.occurred_at)
    }
}

/// An event `$event` about the run of `$header` (a [`RunHeader`]): its envelope, the run's
/// identity, and the event's own fields.
macro_rules! run_event {
    ($event:ident, $header:expr, { $($field:ident: $value:expr),* $(,)? }) => {{
        let header: &RunHeader = $header;
        new_event!($event {
            envelope: header.envelope(),
            run_id: header.run_id.clone(),
            workflow_id: header.workflow_id.clone(),
            version: header.version,
            $($field: $value,)*
        })
    }};
}

/// How a run ended.
enum Ending {
    Completed {
        duration_ms: i64,
        /// The sink nodes' outputs, a JSON object as text.
        outputs_json: String,
    },
    Failed {
        failed_node_id: Option<String>,
        reason: String,
    },
    Cancelled {
        reason: Option<String>,
    },
}

/// The event that ends a run (RunCompleted, RunFailed or RunCancelled), counted in
/// `weir_coordinator_runs_ended_total{status}`.
fn run_ended(header: &RunHeader, ending: Ending, stats: &mut Advanced) -> RunEvent {
    stats.ended += 1;
    let (status, event) = match ending {
        Ending::Completed {
            duration_ms,
            outputs_json,
        } => (
            "completed",
            RunEvent::RunCompleted(run_event!(RunCompleted, header, {
                duration_ms: duration_ms,
                outputs_json: Some(outputs_json),
                outputs_ref: None,
            })),
        ),
        Ending::Failed {
            failed_node_id,
            reason,
        } => (
            "failed",
            RunEvent::RunFailed(run_event!(RunFailed, header, {
                failed_node_id: failed_node_id,
                reason: reason,
            })),
        ),
        Ending::Cancelled { reason } => (
            "cancelled",
            RunEvent::RunCancelled(run_event!(RunCancelled, header, { reason: reason })),
        ),
    };
    metrics::counter!(m::RUNS_ENDED, "status" => status).increment(1);
    event
}

/// The predecessors' outputs of `node`, in definition order (what its NodeReady carries).
fn node_inputs(a: &Active, node: usize) -> Vec<NodeInput> {
    a.plan.preds[node]
        .iter()
        .map(|&p| NodeInput {
            node_id: a.plan.ids[p].clone(),
            output_json: a.rt.nodes[p].output_json.clone(),
            output_ref: a.rt.nodes[p].output_ref.clone().map(WireRef::from),
        })
        .collect()
}

/// `RunCompleted.outputs_json`: an object of the sink nodes' outputs.
fn sink_outputs(a: &Active) -> String {
    let mut outputs = serde_json::Map::new();
    for (i, n) in a.rt.nodes.iter().enumerate() {
        if a.plan.succs[i].is_empty() {
            outputs.insert(
                a.plan.ids[i].clone(),
                output_value(n.output_json.as_deref(), n.output_ref.as_deref()),
            );
        }
    }
    Value::Object(outputs).to_string()
}

/// A worker's successful result of `node` offered to the result cache, with what a later
/// lookup would ask (the cache processor stores it, or refuses it, e.g. PII).
fn cache_store(a: &Active, node: usize, attempt: i32, header: &RunHeader) -> CacheEvent {
    let c = a.candidate(node);
    let n = &a.rt.nodes[node];
    let node_id = &a.plan.ids[node];
    let cost_ms = a.durations.get(&(node_id.clone(), attempt)).copied();
    CacheEvent::CacheStore(new_event!(CacheStore {
        envelope: Envelope {
            workspace_id: c.workspace_id,
            ..header.envelope()
        },
        request_id: format!("{}/{node_id}/{attempt}", a.run_id),
        requester: c.requester,
        permission: c.permission.clone(),
        node_type: c.node_type,
        config_json: c.config.to_string(),
        inputs_json: c.inputs.to_string(),
        result_json: n.output_json.clone(),
        result_ref: n.output_ref.clone().map(WireRef::from),
        prompt: None,
        embedding: None,
        cost_ms: cost_ms.unwrap_or(0),
        required_permission: c.permission,
    }))
}

/// Where the events of a batch go while they are built.
struct Out<'o, 'b> {
    outbox: &'o mut Outbox<'b>,
    timers: TimerRows,
    stats: &'o mut Advanced,
    /// When the events happen, µs since the epoch.
    end_us: i64,
    /// The batch's time, ms since the epoch.
    now_ms: i64,
}

impl Coordinator {
    /// Writes `batch` back (see the module doc), pushing its events to `outbox` and counting
    /// what it did in `stats`.
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        batch: Stepped,
        outbox: &mut Outbox<'_>,
        stats: &mut Advanced,
    ) -> Result<()> {
        let now_at = ts(batch.now_ms);
        fail_unrunnable(conn, batch.unrunnable, outbox, stats).await?;
        let inserted = self
            .insert_new_runs(conn, &batch.failed_starts, &batch.actives, now_at, stats)
            .await?;
        let actives: Vec<Active> = batch
            .actives
            .into_iter()
            .filter(|a| !a.is_new || inserted.contains(&a.run_id))
            .collect();

        let mut runs = RunUpdateRows::default();
        let mut nodes = NodeRows::default();
        for a in &actives {
            if !a.is_new && (a.rt.dirty || a.rt.progressed) {
                runs.push(&a.run_id, a.state(), a.rt.progressed);
            }
        }
        for a in &actives {
            for (i, n) in a.rt.nodes.iter().enumerate() {
                if n.dirty && n.phase != Phase::Waiting {
                    nodes.push(&a.run_id, &a.plan.ids[i], a.plan.node_types[i], n);
                }
            }
        }
        runs.update(conn, now_at).await?;
        nodes.upsert(conn).await?;

        let mut out = Out {
            outbox,
            timers: TimerRows::default(),
            stats,
            end_us: events::now_micros(),
            now_ms: batch.now_ms,
        };
        for f in batch
            .failed_starts
            .iter()
            .filter(|f| inserted.contains(&f.req.run_id))
        {
            let run = StoredRun::requested(&f.req, None, now_at);
            let version = f.req.version.unwrap_or(0);
            let header = RunHeader::new(
                &f.req.run_id,
                &run,
                version,
                run.traceparent.clone(),
                out.end_us,
            );
            let ending = Ending::Failed {
                failed_node_id: None,
                reason: f.reason.clone(),
            };
            out.outbox
                .push(&run_ended(&header, ending, out.stats))
                .await?;
        }
        for a in &actives {
            self.run_events(a, &mut out).await?;
        }
        out.timers.upsert(conn).await?;
        batch.ignored.record(out.stats);
        Ok(())
    }

    /// Inserts the new runs (see the module doc); returns the run ids inserted.
    async fn insert_new_runs(
        &self,
        conn: &mut PgConnection,
        failed_starts: &[FailedStart],
        actives: &[Active],
        now_at: DateTime<Utc>,
        stats: &mut Advanced,
    ) -> Result<HashSet<String>> {
        let mut rows = NewRunRows::default();
        for f in failed_starts {
            let state = RunState {
                status: RunPhase::Failed.as_str(),
                reason: Some(f.reason.clone()),
                failed_node_id: None,
            };
            let run = StoredRun::requested(&f.req, None, now_at);
            rows.push(&f.req.run_id, &run, f.req.idempotency_key.as_deref(), state);
        }
        for a in actives.iter().filter(|a| a.is_new) {
            rows.push(&a.run_id, &a.run, a.idempotency_key.as_deref(), a.state());
        }
        let pushed = rows.len();
        let topic = self.cfg.kafka.topic(CompletionEvent::TOPIC);
        let inserted = rows.insert(conn, now_at, topic).await?;
        let lost = pushed - inserted.len();
        if lost > 0 {
            metrics::counter!(m::IGNORED, "reason" => "duplicate_request").increment(lost as u64);
            stats.ignored += lost;
        }
        Ok(inserted)
    }

    /// The events of one run, in order: lifecycle, retries, dispatches; with the timers
    /// they need while the run still runs.
    async fn run_events(&self, a: &Active, out: &mut Out<'_, '_>) -> Result<()> {
        let header = RunHeader::new(&a.run_id, &a.run, a.version, a.traceparent(), out.end_us);
        self.lifecycle_events(a, &header, out).await?;
        let running = a.rt.phase == RunPhase::Running;
        for r in &a.retries {
            metrics::counter!(m::NODES_RETRIED).increment(1);
            let node_id = &a.plan.ids[r.node];
            let retried = run_event!(NodeRetried, &header, {
                node_id: node_id.clone(),
                failed_attempt: r.failed_attempt,
                next_attempt: r.next_attempt,
                retry_at: r.retry_at_ms.saturating_mul(1000),
                error: r.error.clone(),
            });
            out.outbox.push(&RunEvent::NodeRetried(retried)).await?;
            let n = &a.rt.nodes[r.node];
            if running && n.phase == Phase::RetryWait && n.attempt == r.failed_attempt {
                let due = ts(r.retry_at_ms);
                out.timers
                    .push(&a.run_id, node_id, TimerKind::Retry, r.next_attempt, due);
            }
        }
        if !running {
            return Ok(());
        }
        for d in a.dispatches.iter().filter(|d| a.pending(d)) {
            let node_id = &a.plan.ids[d.node];
            if let Some(due) = d.deadline_at_ms {
                out.timers
                    .push(&a.run_id, node_id, TimerKind::Deadline, d.attempt, ts(due));
            }
            let to_type = a.plan.node_types[d.node];
            metrics::counter!(m::NODES_DISPATCHED, "type" => to_type).increment(1);
            if let Some(cause) = d.cause {
                metrics::histogram!(m::HOP_LATENCY, "from_type" => a.plan.node_types[cause.from],
                    "to_type" => to_type)
                .record((out.end_us - cause.at_us).max(0) as f64 / 1e3);
            }
            out.stats.dispatched += 1;
            let ready = run_event!(NodeReady, &header, {
                node_id: node_id.clone(),
                node_type: to_type.to_string(),
                config_json: a.plan.configs[d.node].clone(),
                inputs: node_inputs(a, d.node),
                attempt: d.attempt,
                hop: d.hop,
                deadline_at: d.deadline_at_ms.map(|d| d.saturating_mul(1000)),
                run_inputs_json: a.run.inputs_json.clone(),
                run_inputs_ref: a.run.inputs_ref.clone().map(WireRef::from),
            });
            out.outbox.push(&ready).await?;
        }
        Ok(())
    }

    /// The run's lifecycle events in order: RunStarted, the results offered to the cache,
    /// the terminal event.
    async fn lifecycle_events(
        &self,
        a: &Active,
        header: &RunHeader,
        out: &mut Out<'_, '_>,
    ) -> Result<()> {
        for e in &a.lifecycle {
            let ending = match e {
                Effect::Started => {
                    out.stats.started += 1;
                    metrics::counter!(m::WORKFLOWS_STARTED).increment(1);
                    let started = run_event!(RunStarted, header, {
                        requester: a.run.requester.clone(),
                    });
                    out.outbox.push(&RunEvent::RunStarted(started)).await?;
                    continue;
                }
                Effect::AttemptEnded { node, end, attempt } => {
                    let node_type = a.plan.node_types[*node];
                    metrics::counter!(m::NODE_EXECUTIONS, "type" => node_type,
                        "status" => end.as_str())
                    .increment(1);
                    let stores = self.cache.as_ref().is_some_and(|c| c.stores(node_type));
                    if *end == AttemptEnd::Succeeded && stores {
                        out.outbox
                            .push(&cache_store(a, *node, *attempt, header))
                            .await?;
                    }
                    continue;
                }
                Effect::Completed => Ending::Completed {
                    duration_ms: (out.now_ms - a.run.started_at.timestamp_millis()).max(0),
                    outputs_json: sink_outputs(a),
                },
                Effect::Failed { node, reason } => Ending::Failed {
                    failed_node_id: node.map(|i| a.plan.ids[i].clone()),
                    reason: reason.clone(),
                },
                Effect::Cancelled { reason } => Ending::Cancelled {
                    reason: reason.clone(),
                },
                _ => continue,
            };
            out.outbox
                .push(&run_ended(header, ending, out.stats))
                .await?;
        }
        Ok(())
    }
}

/// Fails stored running runs whose pinned definition cannot be had: status failed with the
/// reason, their timers dropped, a RunFailed each. The content of one workflow costs its
/// runs, not the coordinator.
async fn fail_unrunnable(
    conn: &mut PgConnection,
    runs: Vec<Unrunnable>,
    outbox: &mut Outbox<'_>,
    stats: &mut Advanced,
) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = runs.iter().map(|u| u.run_id.clone()).collect();
    let reasons: Vec<String> = runs.iter().map(|u| u.reason.clone()).collect();
    sqlx::query!(
        r#"UPDATE weir_runs r
           SET status = 'failed', reason = u.reason, finished_at = now(), stalled = false
           FROM UNNEST($1::text[], $2::text[]) AS u(run_id, reason)
           WHERE r.run_id = u.run_id"#,
        &ids,
        &reasons,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "DELETE FROM weir_run_timers WHERE run_id = ANY($1::text[])",
        &ids
    )
    .execute(&mut *conn)
    .await?;
    for u in runs {
        tracing::warn!(run_id = %u.run_id, workflow_id = %u.run.workflow_id, reason = %u.reason,
            "run failed: its definition is unavailable");
        let header = RunHeader::new(
            &u.run_id,
            &u.run,
            u.version,
            u.run.traceparent.clone(),
            events::now_micros(),
        );
        let ending = Ending::Failed {
            failed_node_id: None,
            reason: u.reason,
        };
        outbox.push(&run_ended(&header, ending, stats)).await?;
    }
    Ok(())
}
