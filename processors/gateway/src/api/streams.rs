//! Live streams (server-sent events) and the patch log read, over [`crate::streams`].
//!
//! - `GET /v1/runs/{run_id}/events`: `state` events, the run's status and nodes after each
//!   change, with `id` its progress number ([`run_state::progress`]); the first one of a
//!   connection also carries the DAG's `edges`. The stream ends after the final state; a
//!   reconnect whose `Last-Event-ID` already covers the final state is 204 (which tells an
//!   EventSource to stop).
//! - `GET /v1/workflows/{workflow_id}/events`: `head` (without `Last-Event-ID`: the version
//!   the stream starts after), then one `version` event per applied version with its
//!   operations, `id` the version; `gap` when the log no longer covers the version after
//!   the client's, and the stream ends.
//! - `GET /v1/workflows/{workflow_id}/patches?after_version=V&limit=N`: the same operations
//!   as one JSON page.
//!
//! Invariants: the same workspace rules as every read (another workspace's run or workflow
//! is 404 before any stream opens, and a stream reads only its workspace's rows); a stream
//! never sends an id at or below one it sent or the client's `Last-Event-ID`; a client that
//! does not read within [`SLOW_CLIENT_AFTER`] heartbeats' time is dropped.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::extract::{Allowed, Read, RunId, Valid, WorkflowId};
use super::state::no_workflow;
use super::AppState;
use crate::auth::Caller;
use crate::metrics;
use crate::problem::Problem;
use crate::streams::{feed, patch_log, run_state, sse, Kind, Refused, Subscription, Wake};

/// A stream's frames waiting for its client: a few, so a client that stops reading is
/// noticed at once rather than buffered for.
const FRAMES_BUFFER: usize = 8;
/// A client that has not taken a frame for this many heartbeat intervals is dropped.
const SLOW_CLIENT_AFTER: u32 = 2;
/// How long a client waits before reconnecting (the SSE `retry` field), in ms.
const RECONNECT_MS: u64 = 1000;
/// Largest page of the patch log (and of one read of a workflow stream).
const MAX_PAGE: i64 = 1000;
/// Default page of the patch log.
const DEFAULT_PAGE: i64 = 100;

fn refused(s: &AppState, r: Refused) -> Problem {
    match r {
        Refused::Instance => Problem::unavailable(r.to_string(), s.retry_after()),
        Refused::Workspace => Problem::client_limited(r.to_string(), s.retry_after()),
    }
}

fn last_id(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    sse::last_event_id(headers).map_err(|e| Problem::bad_request(e.to_string()))
}

/// Writes frames to the client; `false` once the client is gone or too slow.
struct Out {
    tx: mpsc::Sender<Bytes>,
    patience: Duration,
    stream: &'static str,
}

impl Out {
    async fn frame(&self, b: Bytes) -> bool {
        match tokio::time::timeout(self.patience, self.tx.send(b)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                ::metrics::counter!(metrics::STREAMS_DROPPED, "reason" => "slow").increment(1);
                false
            }
        }
    }

    async fn event(&self, id: u64, name: &str, data: &serde_json::Value) -> bool {
        ::metrics::counter!(metrics::STREAM_EVENTS, "stream" => self.stream).increment(1);
        self.frame(sse::event(&id.to_string(), name, data)).await
    }
}

/// The SSE response whose body is what `out`'s sender receives, and that sender.
fn sse_response(s: &AppState, stream: &'static str) -> (Response, Out) {
    let (tx, rx) = mpsc::channel::<Bytes>(FRAMES_BUFFER);
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let res = (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response();
    let heartbeat = s.0.streams.limits().heartbeat;
    let out = Out {
        tx,
        patience: heartbeat * SLOW_CLIENT_AFTER,
        stream,
    };
    (res, out)
}

// Runs -------------------------------------------------------------------------------------------

pub(super) async fn run_events(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    Valid(RunId(run_id)): Valid<RunId>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let last = last_id(&headers)?;
    let src = s.source(&s.0.sources.run_status, "run status")?;
    let slot =
        s.0.streams
            .admit(&caller.workspace_id)
            .map_err(|r| refused(&s, r))?;
    // Subscribe before the first read: a change committed after it is announced to us.
    let sub = s.0.streams.subscribe(Kind::Run, &run_id.to_string(), slot);
    let first = s.run_status_from(src, &caller, run_id).await?;
    let p = run_state::progress(&first);
    if run_state::is_final(&first.status) && last.is_some_and(|l| l >= p) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (res, out) = sse_response(&s, "run");
    tokio::spawn(follow_run(
        s,
        caller,
        run_id,
        last.unwrap_or(0),
        first,
        sub,
        out,
    ));
    Ok(res)
}

#[allow(clippy::too_many_arguments)]
async fn follow_run(
    s: AppState,
    caller: Caller,
    run_id: uuid::Uuid,
    mut sent: u64,
    first: weir_model::run::RunStatus,
    mut sub: Subscription,
    out: Out,
) {
    let Some(src) = s.0.sources.run_status.clone() else {
        return;
    };
    let heartbeat = s.0.streams.limits().heartbeat;
    if !out.frame(sse::retry(RECONNECT_MS)).await {
        return;
    }
    let mut edges_sent = false;
    let mut state = Some(first);
    let mut at_ms = feed::now_ms();
    loop {
        if let Some(st) = state.take() {
            let p = run_state::progress(&st);
            if p > sent {
                let mut data = json!({ "progress": p, "at_ms": at_ms, "run": st });
                if !edges_sent {
                    let edges = match st.version {
                        Some(v) => {
                            run_state::edges(
                                &s.0.pool,
                                &s.0.cas,
                                &caller.workspace_id,
                                &st.workflow_id,
                                v,
                            )
                            .await
                        }
                        None => Ok(Vec::new()),
                    };
                    match edges {
                        Ok(e) => data["edges"] = json!(e),
                        Err(e) => tracing::warn!(error = %e, "reading a run's edges failed"),
                    }
                    edges_sent = true;
                }
                if !out.event(p, "state", &data).await {
                    return;
                }
                sent = p;
            }
            if run_state::is_final(&st.status) {
                return;
            }
        }
        match sub.wait(heartbeat).await {
            Wake::Closed => return,
            Wake::Changed(at) => at_ms = at,
            Wake::Heartbeat => {
                if !out.frame(sse::comment("heartbeat")).await {
                    return;
                }
                at_ms = feed::now_ms();
            }
        }
        match src.run_status(&caller.workspace_id, run_id).await {
            Ok(Some(st)) => state = Some(st),
            Ok(None) => return,
            // The next notice or heartbeat reads again.
            Err(e) => tracing::warn!(error = %e, "a run stream's read failed"),
        }
    }
}

// Workflows --------------------------------------------------------------------------------------

pub(super) async fn workflow_events(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    Valid(WorkflowId(workflow_id)): Valid<WorkflowId>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let last = last_id(&headers)?;
    let slot =
        s.0.streams
            .admit(&caller.workspace_id)
            .map_err(|r| refused(&s, r))?;
    let sub = s.0.streams.subscribe(Kind::Workflow, &workflow_id, slot);
    let head = patch_log::head(&s.0.pool, &caller.workspace_id, &workflow_id)
        .await
        .map_err(|e| log_problem(&s, e))?
        .ok_or_else(|| no_workflow(&workflow_id))?;
    let (res, out) = sse_response(&s, "workflow");
    tokio::spawn(follow_workflow(
        s,
        caller,
        workflow_id,
        last,
        head,
        sub,
        out,
    ));
    Ok(res)
}

async fn follow_workflow(
    s: AppState,
    caller: Caller,
    workflow_id: String,
    last: Option<u64>,
    (head_version, head_sha256): (i64, String),
    mut sub: Subscription,
    out: Out,
) {
    let heartbeat = s.0.streams.limits().heartbeat;
    if !out.frame(sse::retry(RECONNECT_MS)).await {
        return;
    }
    let mut sent = match last {
        Some(v) => i64::try_from(v).unwrap_or(i64::MAX),
        None => {
            let head = json!({ "workflow_id": workflow_id, "version": head_version,
                               "definition_sha256": head_sha256 });
            if !out.event(head_version as u64, "head", &head).await {
                return;
            }
            head_version
        }
    };
    loop {
        let page = patch_log::after(
            &s.0.pool,
            &s.0.cas,
            &caller.workspace_id,
            &workflow_id,
            sent,
            MAX_PAGE,
        )
        .await;
        let mut full = false;
        match page {
            Ok(Some(page)) if page.gap => {
                let gap = json!({ "workflow_id": workflow_id, "after_version": sent,
                                  "head_version": page.head_version });
                let _ = out.event(sent.max(0) as u64, "gap", &gap).await;
                return;
            }
            Ok(Some(page)) => {
                full = page.patches.len() as i64 == MAX_PAGE;
                for p in page.patches {
                    let v = p.version;
                    let mut data = json!(p);
                    data["workflow_id"] = json!(workflow_id);
                    if !out.event(v as u64, "version", &data).await {
                        return;
                    }
                    sent = v;
                }
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "a workflow stream's read failed"),
        }
        if full {
            continue;
        }
        match sub.wait(heartbeat).await {
            Wake::Closed => return,
            Wake::Changed(_) => {}
            Wake::Heartbeat => {
                if !out.frame(sse::comment("heartbeat")).await {
                    return;
                }
            }
        }
    }
}

fn log_problem(s: &AppState, e: patch_log::LogError) -> Problem {
    match e {
        patch_log::LogError::Db(e) => s.db_unavailable(&e),
        patch_log::LogError::Cas(e) => s.cas_unavailable(&e),
        e @ patch_log::LogError::Unreadable(_) => {
            tracing::error!(error = %e, "the patch log is unreadable");
            Problem::internal("stored data this answer needs is unreadable")
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchesQuery {
    #[serde(default)]
    after_version: i64,
    #[serde(default)]
    limit: Option<i64>,
}

pub(super) async fn list_patches(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    Valid(WorkflowId(workflow_id)): Valid<WorkflowId>,
    q: Result<Query<PatchesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {e}")))?;
    // The log reads from `after_version + 1`: i64::MAX would overflow, and no version gets there.
    if !(0..i64::MAX).contains(&q.after_version) {
        return Err(Problem::bad_request(
            "after_version must be 0 or more and below 2^63 - 1",
        ));
    }
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let page = patch_log::after(
        &s.0.pool,
        &s.0.cas,
        &caller.workspace_id,
        &workflow_id,
        q.after_version,
        limit,
    )
    .await
    .map_err(|e| log_problem(&s, e))?
    .ok_or_else(|| no_workflow(&workflow_id))?;
    if page.gap {
        return Err(Problem::new(
            StatusCode::GONE,
            "patch-log-gap",
            "Patch log gap",
            format!(
                "the patch log no longer covers version {}; fetch the head (version {})",
                q.after_version + 1,
                page.head_version
            ),
        )
        .with_code("patch_log_gap"));
    }
    let mut body = json!(page);
    body["workflow_id"] = json!(workflow_id);
    body["after_version"] = json!(q.after_version);
    if let Some(obj) = body.as_object_mut() {
        obj.remove("gap");
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}
