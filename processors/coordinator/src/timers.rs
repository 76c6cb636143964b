//! The durable timer loop: retries, deadlines and stall detection, all due times in Postgres
//! so they survive restarts. Every `coordinator.timer_poll_ms` one transaction:
//!
//! 1. picks runs with due timers and locks them with `FOR UPDATE SKIP LOCKED` (a run the
//!    consumer or another coordinator's loop holds is skipped until the next tick, so they
//!    never race and never wait on each other),
//! 2. deletes (claims) the due timers of the locked runs and applies them through
//!    [`Coordinator::advance`], the consumer's own path (a timer whose node moved on is
//!    ignored),
//! 3. marks running runs idle for longer than `coordinator.stall_after_ms` as stalled (also
//!    `SKIP LOCKED`) and writes one RunStalled per idle period,
//!
//! then commits with its outbox rows. Lock order is always runs, then timers.
//!
//! A tick that fails on data (an error the consumer would bisect and dead-letter) is not
//! retried as a whole forever, which would stop every workspace's timers: the due runs are
//! applied one per transaction, and the due timers of a run that still fails alone are
//! dropped (`weir_coordinator_timers_quarantined_total`, a warning naming the run). An error
//! that only looks transient (a suspect SQLSTATE) is retried `runtime.suspect_retries` times,
//! as a whole tick and then per run, before it is handled the same way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use weir_runtime::codec::Codec;
use weir_runtime::events::{
    new_event, CompletionEvent, Envelope, RunEvent, RunStalled, TopicEvent,
};
use weir_runtime::{ApplyError, Disposition, Outbox};

use crate::machine::Input;
use crate::metrics as m;
use crate::processor::{Coordinator, Item};

/// Counts one more suspect failure; true once there were more than `runtime.suspect_retries`
/// in a row (then the failure is handled as if the data caused it).
fn suspect_failures(count: &mut u32, cfg: &weir_runtime::config::Config) -> bool {
    *count += 1;
    *count > cfg.runtime.suspect_retries
}

/// What one tick did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Timers claimed.
    pub timers: usize,
    /// Runs marked stalled.
    pub stalled: usize,
}

/// The timer loop of one coordinator process.
pub struct TimerLoop {
    coordinator: Arc<Coordinator>,
    pool: sqlx::PgPool,
    codec: Arc<Codec>,
}

impl TimerLoop {
    /// A loop applying timers with `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>, pool: sqlx::PgPool, codec: Arc<Codec>) -> Self {
        Self {
            coordinator,
            pool,
            codec,
        }
    }

    /// Runs until `shutdown`; a tick in progress finishes (it is one short transaction).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApplyError> {
        let cfg = self.coordinator.config().clone();
        let poll = Duration::from_millis(cfg.coordinator.timer_poll_ms);
        let mut failures = 0u32;
        let mut suspect = 0u32;
        let mut last_gauges = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            let mut delay = poll;
            match self.tick().await {
                Ok(t) => {
                    failures = 0;
                    suspect = 0;
                    // A full batch means more is due: go again at once.
                    if t.timers as i64 >= cfg.coordinator.timer_batch {
                        delay = Duration::ZERO;
                    }
                }
                Err(e) if e.disposition() == Disposition::Fatal => return Err(e),
                // A suspect error that keeps coming back may be caused by one run's data:
                // after `runtime.suspect_retries` ticks it is treated like a data error, so it
                // cannot stop every workspace's timers forever.
                Err(e)
                    if e.disposition() == Disposition::DeadLetter
                        || (e.is_suspect() && suspect_failures(&mut suspect, &cfg)) =>
                {
                    tracing::warn!(error = %e, "timer tick failed on data; applying runs one by one");
                    suspect = 0;
                    if let Err(e) = self.isolate().await {
                        failures += 1;
                        delay = cfg.runtime.backoff(failures);
                        tracing::warn!(error = %e, "isolating timers failed");
                    }
                }
                Err(e) => {
                    failures += 1;
                    delay = cfg.runtime.backoff(failures);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "timer tick failed");
                }
            }
            if last_gauges.elapsed() >= Duration::from_secs(5) {
                last_gauges = std::time::Instant::now();
                if let Err(e) = self.gauges().await {
                    tracing::warn!(error = %e, "reading run gauges failed");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn gauges(&self) -> Result<(), sqlx::Error> {
        let r = sqlx::query!(
            r#"SELECT count(*) AS "running!", count(*) FILTER (WHERE stalled) AS "stalled!"
               FROM weir_runs WHERE status = 'running'"#
        )
        .fetch_one(&self.pool)
        .await?;
        metrics::gauge!(m::RUNS_IN_FLIGHT).set(r.running as f64);
        metrics::gauge!(m::RUNS_STALLED).set(r.stalled as f64);
        Ok(())
    }

    /// One transaction: due timers, then stalls.
    pub async fn tick(&self) -> Result<Tick, ApplyError> {
        self.tick_scoped(None).await
    }

    /// Applies the due timers run by run, each in its own transaction; a run whose timers
    /// fail on data has them dropped. Returns the number of runs quarantined.
    async fn isolate(&self) -> Result<usize, ApplyError> {
        let cfg = self.coordinator.config().clone();
        let topic = cfg.kafka.topic(CompletionEvent::TOPIC);
        let due: Vec<String> = sqlx::query_scalar!(
            r#"SELECT t.run_id AS "run_id!" FROM weir_run_timers t JOIN weir_runs r USING (run_id)
               WHERE t.due_at <= now() AND r.completions_topic = $2
               GROUP BY t.run_id ORDER BY min(t.due_at) LIMIT $1"#,
            cfg.coordinator.timer_batch,
            topic,
        )
        .fetch_all(&self.pool)
        .await?;
        let mut quarantined = 0;
        for run_id in due {
            let mut suspect = 0u32;
            let outcome = loop {
                match self.tick_scoped(Some(&run_id)).await {
                    Err(e) if e.is_suspect() && !suspect_failures(&mut suspect, &cfg) => {
                        tokio::time::sleep(cfg.runtime.backoff(suspect)).await;
                    }
                    other => break other,
                }
            };
            match outcome {
                Ok(_) => {}
                Err(e) if e.disposition() == Disposition::DeadLetter || e.is_suspect() => {
                    let dropped = sqlx::query!(
                        "DELETE FROM weir_run_timers WHERE run_id = $1 AND due_at <= now()",
                        run_id
                    )
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                    quarantined += 1;
                    metrics::counter!(m::TIMERS_QUARANTINED).increment(dropped);
                    tracing::warn!(%run_id, error = %e, dropped, "due timers of a run dropped: applying them fails on its data");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(quarantined)
    }

    /// [`TimerLoop::tick`], or only the due timers of run `only` (no stall detection).
    async fn tick_scoped(&self, only: Option<&str>) -> Result<Tick, ApplyError> {
        let cfg = self.coordinator.config().clone();
        let limit = cfg.coordinator.timer_batch;
        // Only the runs of this deployment's completions topic (see the migration scoping them).
        let topic = cfg.kafka.topic(CompletionEvent::TOPIC);
        let now = Utc::now();
        let mut tick = Tick::default();
        let mut tx = self.pool.begin().await?;
        let mut outbox = Outbox::new(&self.codec, cfg.outbox.lanes);

        let due: Vec<String> = sqlx::query_scalar!(
            r#"SELECT t.run_id AS "run_id!" FROM weir_run_timers t JOIN weir_runs r USING (run_id)
               WHERE t.due_at <= $1 AND r.completions_topic = $3
                 AND ($4::text IS NULL OR t.run_id = $4)
               GROUP BY t.run_id ORDER BY min(t.due_at) LIMIT $2"#,
            now,
            limit,
            topic,
            only,
        )
        .fetch_all(&mut *tx)
        .await?;
        if !due.is_empty() {
            let locked: Vec<String> = sqlx::query_scalar!(
                r#"SELECT run_id FROM weir_runs WHERE run_id = ANY($1::text[])
                   ORDER BY run_id FOR UPDATE SKIP LOCKED"#,
                &due,
            )
            .fetch_all(&mut *tx)
            .await?;
            let claimed = sqlx::query!(
                r#"DELETE FROM weir_run_timers WHERE run_id = ANY($1::text[]) AND due_at <= $2
                   RETURNING run_id, node_id, kind, attempt, due_at"#,
                &locked,
                now,
            )
            .fetch_all(&mut *tx)
            .await?;
            tick.timers = claimed.len();
            let mut claimed = claimed;
            claimed.sort_by_key(|t| t.due_at);
            let mut groups: Vec<(String, Vec<Item>)> = Vec::new();
            let mut at: HashMap<String, usize> = HashMap::new();
            for t in claimed {
                metrics::counter!(m::TIMERS_FIRED, "kind" => t.kind.clone()).increment(1);
                let input = if t.kind == "retry" {
                    Input::RetryDue {
                        node_id: t.node_id,
                        attempt: t.attempt,
                    }
                } else {
                    Input::DeadlineDue {
                        node_id: t.node_id,
                        attempt: t.attempt,
                    }
                };
                let slot = *at.entry(t.run_id.clone()).or_insert_with(|| {
                    groups.push((t.run_id.clone(), Vec::new()));
                    groups.len() - 1
                });
                groups[slot].1.push(Item::Input {
                    input,
                    workspace_id: None,
                    at_us: t.due_at.timestamp_micros(),
                    duration_ms: 0,
                    traceparent: String::new(),
                });
            }
            self.coordinator
                .advance(&mut tx, groups, &mut outbox)
                .await?;
        }

        if only.is_some() {
            outbox.flush(&mut tx).await?;
            tx.commit().await?;
            return Ok(tick);
        }
        let stall_before = now
            - chrono::Duration::milliseconds(
                i64::try_from(cfg.coordinator.stall_after_ms).unwrap_or(i64::MAX / 4),
            );
        let stalled = sqlx::query!(
            r#"WITH s AS (
                 SELECT run_id FROM weir_runs
                 WHERE status = 'running' AND completions_topic = $3 AND NOT stalled
                   AND last_progress_at < $1
                 ORDER BY last_progress_at LIMIT $2 FOR UPDATE SKIP LOCKED)
               UPDATE weir_runs r SET stalled = true FROM s WHERE r.run_id = s.run_id
               RETURNING r.run_id, r.workspace_id, r.workflow_id, r.version AS "version!",
                         r.traceparent, r.last_progress_at"#,
            stall_before,
            limit,
            topic,
        )
        .fetch_all(&mut *tx)
        .await?;
        tick.stalled = stalled.len();
        for s in stalled {
            metrics::counter!(m::STALLS).increment(1);
            tracing::warn!(run_id = %s.run_id, workflow_id = %s.workflow_id, "run stalled");
            outbox
                .push(&RunEvent::RunStalled(new_event!(RunStalled {
                    // The run's stored context; a run keeps no tracestate.
                    envelope: Envelope::new(s.workspace_id, s.traceparent, None),
                    run_id: s.run_id,
                    workflow_id: s.workflow_id,
                    version: s.version,
                    idle_ms: (now - s.last_progress_at).num_milliseconds(),
                    last_progress_at: s.last_progress_at.timestamp_micros(),
                })))
                .await?;
        }
        outbox.flush(&mut tx).await?;
        tx.commit().await?;
        Ok(tick)
    }
}
