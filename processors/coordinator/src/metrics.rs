//! Every metric the coordinator emits, in one place. The orchestrator's usual names
//! (`workflows_started_total`, `node_executions_total{type,status}`,
//! `hop_latency_ms{from_type,to_type}`) carry the `weir_coordinator_` prefix like every weir
//! metric.

/// Runs started on a pinned version (counter).
pub const WORKFLOWS_STARTED: &str = "weir_coordinator_workflows_started_total";
/// Runs that ended, by `status` (completed, failed, cancelled) (counter).
pub const RUNS_ENDED: &str = "weir_coordinator_runs_ended_total";
/// Node attempts that ended, by `type` and `status` (succeeded, failed, deadline_exceeded,
/// cached) (counter).
pub const NODE_EXECUTIONS: &str = "weir_coordinator_node_executions_total";
/// NodeReady events written, by `type` (counter).
pub const NODES_DISPATCHED: &str = "weir_coordinator_nodes_dispatched_total";
/// Retries scheduled (counter).
pub const NODES_RETRIED: &str = "weir_coordinator_nodes_retried_total";
/// A completion to its successor's NodeReady, measured when the batch that writes the
/// NodeReady finishes (just before its commit), by `from_type` and `to_type` (histogram, ms).
pub const HOP_LATENCY: &str = "weir_coordinator_hop_latency_ms";
/// Inputs that changed nothing, by `reason` (duplicate, stale_attempt, run_finished,
/// unknown_node, unknown_run, foreign_workspace, already_started, duplicate_request,
/// stale_timer) (counter).
pub const IGNORED: &str = "weir_coordinator_ignored_total";
/// Runs in flight (status running), refreshed by the timer loop (gauge).
pub const RUNS_IN_FLIGHT: &str = "weir_coordinator_runs_in_flight";
/// Runs currently stalled, refreshed by the timer loop (gauge).
pub const RUNS_STALLED: &str = "weir_coordinator_runs_stalled";
/// Stalls detected (RunStalled events written) (counter).
pub const STALLS: &str = "weir_coordinator_stalls_total";
/// Timers applied by the timer loop, by `kind` (retry, deadline) (counter).
pub const TIMERS_FIRED: &str = "weir_coordinator_timers_fired_total";
/// Dispatches answered by the result cache instead of a worker (counter).
pub const CACHE_HITS: &str = "weir_coordinator_cache_hits_total";
/// Worker time the cache hits saved, in ms, as the cache reports it (counter).
pub const CACHE_SAVED_MS: &str = "weir_coordinator_cache_saved_ms_total";
/// Due timers dropped because applying them failed on the run's own data, alone in its
/// transaction: the run is left as it is, the other runs' timers go on (counter).
pub const TIMERS_QUARANTINED: &str = "weir_coordinator_timers_quarantined_total";

/// Help text and units of the coordinator's metrics. Call once at start, after the recorder
/// is installed (`weir_runtime::telemetry::metrics_handle`). Labels: `type`, `from_type`,
/// `to_type` are node types of a validated definition (six values); `status`, `reason`,
/// `kind` come from fixed lists.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        WORKFLOWS_STARTED,
        Unit::Count,
        "Runs started on a pinned workflow version."
    );
    describe_counter!(
        RUNS_ENDED,
        Unit::Count,
        "Runs that ended, by status (completed, failed, cancelled)."
    );
    describe_counter!(NODE_EXECUTIONS, Unit::Count,
        "Node attempts that ended, by node type and status (succeeded, failed, deadline_exceeded, cached).");
    describe_counter!(
        NODES_DISPATCHED,
        Unit::Count,
        "NodeReady events written, by node type."
    );
    describe_counter!(NODES_RETRIED, Unit::Count, "Node retries scheduled.");
    describe_histogram!(HOP_LATENCY, Unit::Milliseconds,
        "Milliseconds from a node's completion to its successor's NodeReady (measured before the commit of the batch that writes it), by from_type and to_type.");
    describe_counter!(
        IGNORED,
        Unit::Count,
        "Inputs that changed nothing, by reason."
    );
    describe_gauge!(
        RUNS_IN_FLIGHT,
        Unit::Count,
        "Runs with status running, refreshed by the timer loop."
    );
    describe_gauge!(RUNS_STALLED, Unit::Count,
        "Running runs flagged stalled (no progress within coordinator.stall_after), refreshed by the timer loop.");
    describe_counter!(
        STALLS,
        Unit::Count,
        "Stalls detected (RunStalled events written)."
    );
    describe_counter!(
        TIMERS_FIRED,
        Unit::Count,
        "Timers applied by the timer loop, by kind (retry, deadline)."
    );
    describe_counter!(
        CACHE_HITS,
        Unit::Count,
        "Dispatches answered by the result cache instead of a worker."
    );
    describe_counter!(
        CACHE_SAVED_MS,
        Unit::Milliseconds,
        "Worker milliseconds the cache hits saved, as the cache reports them."
    );
    describe_counter!(
        TIMERS_QUARANTINED,
        Unit::Count,
        "Due timers dropped because applying them failed on the run's own data."
    );
}

/// Creates the coordinator's unlabelled counters, and the run endings by status, at 0 when a
/// coordinator starts: Prometheus' `increase()` cannot see the first increment of a series
/// that appears with it (a first stall would go unseen), and dashboards show 0, not nothing.
pub fn register() {
    for name in [
        WORKFLOWS_STARTED,
        NODES_RETRIED,
        STALLS,
        CACHE_HITS,
        CACHE_SAVED_MS,
        TIMERS_QUARANTINED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for status in ["completed", "failed", "cancelled"] {
        metrics::counter!(RUNS_ENDED, "status" => status).increment(0);
    }
}
