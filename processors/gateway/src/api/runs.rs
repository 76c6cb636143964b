//! Run routes: `POST /v1/runs` (RunRequested), `GET /v1/runs/{run_id}` (from the run status
//! source), `POST .../cancel` (RunCancelRequested) and `POST .../nodes/{node_id}/completions`
//! (NodeCompleted), all on `weir.completions.v1` keyed by run id.
//!
//! Invariants: a run id derived from an Idempotency-Key (header or body) is the same on a
//! retry, so the coordinator starts the run once; a cancellation or completion names a run
//! of the caller's workspace (404 otherwise, when a run status source is configured); an
//! `output_ref` must be a blob of the caller's workspace.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use weir_model::{CasRef, WireRef};
use weir_runtime::events::{
    new_event, CompletionEvent, NodeCompleted, NodeStatus, RunCancelRequested, RunRequested,
};

use super::extract::{
    accepted, check_id, new_id, parse_body, Allowed, Body, IdempotencyKey, JsonBody, NodeAt, Read,
    RunId, Valid, Writer,
};
use super::AppState;
use crate::problem::Problem;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RunBody {
    workflow_id: String,
    #[serde(default)]
    version: Option<i64>,
    inputs: serde_json::Map<String, Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

pub(super) async fn post_run(
    Writer { s, trace, caller }: Writer,
    IdempotencyKey(header_key): IdempotencyKey,
    JsonBody {
        value: run,
        bytes: b,
    }: JsonBody<RunBody>,
) -> Result<Response, Problem> {
    check_id("workflow id", &run.workflow_id, true)?;
    if run.version.is_some_and(|v| v < 1) {
        return Err(Problem::unprocessable("version must be at least 1"));
    }
    if let Some(k) = &run.idempotency_key {
        if !(1..=255).contains(&k.len()) {
            return Err(Problem::unprocessable(
                "idempotency_key must be 1 to 255 characters",
            ));
        }
    }
    let key = run.idempotency_key.clone().or(header_key);
    s.require_workflow(&caller, &run.workflow_id).await?;
    let (inputs_json, inputs_ref) = s.inline_or_ref(&caller, &Value::Object(run.inputs)).await?;
    let run_id = new_id(&caller, "run", key.as_deref());
    let event = CompletionEvent::RunRequested(new_event!(RunRequested {
        envelope: trace.envelope(&caller.workspace_id),
        run_id: run_id.to_string(),
        workflow_id: run.workflow_id,
        version: run.version,
        requester: caller.key_id.clone(),
        permission: caller.permission.as_str().to_string(),
        inputs_json,
        inputs_ref,
        idempotency_key: key.clone(),
    }));
    s.once(&caller, "run", key.as_deref(), &b, s.0.sender.send(&event))
        .await?;
    Ok(accepted(json!({ "run_id": run_id })))
}

pub(super) async fn get_run(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    Valid(RunId(run_id)): Valid<RunId>,
) -> Result<Response, Problem> {
    let src = s.source(&s.0.sources.run_status, "run status")?;
    let status = s.run_status_from(src, &caller, run_id).await?;
    Ok((StatusCode::OK, Json(status)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

pub(super) async fn cancel_run(
    Writer { s, trace, caller }: Writer,
    Valid(RunId(run_id)): Valid<RunId>,
    // Cancelling twice is cancelling once: the key derives nothing, it only guards the body.
    IdempotencyKey(key): IdempotencyKey,
    Body(b): Body,
) -> Result<Response, Problem> {
    let cancel: CancelBody = if b.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        parse_body(&b)?
    };
    s.check_run(&caller, run_id).await?;
    let event = CompletionEvent::RunCancelRequested(new_event!(RunCancelRequested {
        envelope: trace.envelope(&caller.workspace_id),
        run_id: run_id.to_string(),
        reason: cancel.reason,
        requester: caller.key_id.clone(),
    }));
    let scope = format!("cancel:{run_id}");
    s.once(&caller, &scope, key.as_deref(), &b, s.0.sender.send(&event))
        .await?;
    Ok(accepted(json!({ "run_id": run_id })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CompletionBody {
    attempt: i32,
    status: NodeStatus,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    output_ref: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    duration_ms: i64,
    #[serde(default)]
    worker_id: Option<String>,
}

pub(super) async fn post_completion(
    Writer { s, trace, caller }: Writer,
    Valid(NodeAt { run_id, node_id }): Valid<NodeAt>,
    // The coordinator takes one outcome per (run, node, attempt): the key derives nothing, it
    // only guards the body.
    IdempotencyKey(key): IdempotencyKey,
    JsonBody { value: c, bytes: b }: JsonBody<CompletionBody>,
) -> Result<Response, Problem> {
    if c.attempt < 1 {
        return Err(Problem::unprocessable("attempt must be at least 1"));
    }
    if c.duration_ms < 0 {
        return Err(Problem::unprocessable("duration_ms must not be negative"));
    }
    if c.output.is_some() && c.output_ref.is_some() {
        return Err(Problem::unprocessable(
            "give output or output_ref, not both",
        ));
    }
    let given_ref = match &c.output_ref {
        Some(r) => Some(
            r.parse::<CasRef>()
                .map_err(|e| Problem::unprocessable(format!("output_ref: {e}")))?,
        ),
        None => None,
    };
    s.check_run(&caller, run_id).await?;
    if let Some(r) = &given_ref {
        s.require_owned_ref(&caller, "output_ref", r).await?;
    }
    let (output_json, output_ref) = match (&c.output, given_ref) {
        (Some(v), _) => s.inline_or_ref(&caller, v).await?,
        // A ref has one text form, so the event carries exactly the text given.
        (None, r) => (None, r.map(WireRef::from)),
    };
    let event = CompletionEvent::NodeCompleted(new_event!(NodeCompleted {
        envelope: trace.envelope(&caller.workspace_id),
        run_id: run_id.to_string(),
        node_id: node_id.clone(),
        attempt: c.attempt,
        status: c.status,
        output_json,
        output_ref,
        error: c.error,
        duration_ms: c.duration_ms,
        worker_id: c.worker_id.unwrap_or_else(|| caller.key_id.clone()),
        from_cache: false,
    }));
    let scope = format!("completion:{run_id}:{node_id}");
    s.once(&caller, &scope, key.as_deref(), &b, s.0.sender.send(&event))
        .await?;
    Ok(accepted(
        json!({ "run_id": run_id, "node_id": node_id, "attempt": c.attempt }),
    ))
}
