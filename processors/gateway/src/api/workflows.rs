//! Workflow routes: `PUT /v1/workflows/{id}` (create or replace), `POST .../patches`,
//! `GET /v1/workflows/{id}` (the head) and `GET .../patches/{patch_id}` (the materializer's
//! decision).
//!
//! Invariants: a definition or patch the materializer would reject without the document
//! (invalid definition, malformed patch, over its budget) is a 422 here, with the
//! materializer's own code; both are one PatchSubmitted (key workflow_id), its operations in
//! the CAS when larger than `gateway.inline_max_bytes`.

use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};
use uuid::Uuid;
use weir_model::definition;
use weir_model::patch::Patch;
use weir_model::CasRef;
use weir_runtime::events::{self, PatchSubmitted};

use super::extract::{
    accepted, new_id, parse_value, Allowed, Body, IdempotencyKey, IfMatch, PatchAt, Read, Valid,
    WorkflowId, Write,
};
use super::state::{no_workflow, PROVISIONAL_OWNER_TTL};
use super::AppState;
use crate::auth::Caller;
use crate::problem::Problem;
use crate::trace::RequestTrace;

/// Bodies larger than this are validated on a blocking thread.
const BLOCKING_VALIDATION_BYTES: usize = 16 * 1024;

/// A patch to submit: what the PatchSubmitted carries besides its envelope.
struct Submission<'a> {
    workflow_id: &'a str,
    base_version: Option<i64>,
    /// JSON text of an RFC 6902 array.
    operations_json: String,
}

/// Submits `patch` under the Idempotency-Key `key` of `scope`: its patch id (derived from the
/// key when there is one), after the broker acknowledged its PatchSubmitted.
async fn submit_once(
    s: &AppState,
    caller: &Caller,
    trace: &RequestTrace,
    scope: &str,
    key: Option<&str>,
    body: &[u8],
    patch: Submission<'_>,
) -> Result<Uuid, Problem> {
    let patch_id = new_id(caller, scope, key);
    let send = submit_patch(s, caller, trace, patch, patch_id);
    s.once(caller, scope, key, body, send).await?;
    Ok(patch_id)
}

/// Produces one PatchSubmitted with the submission's operations, via the CAS when larger
/// than `gateway.inline_max_bytes`.
async fn submit_patch(
    s: &AppState,
    caller: &Caller,
    trace: &RequestTrace,
    patch: Submission<'_>,
    patch_id: Uuid,
) -> Result<(), Problem> {
    let Submission {
        workflow_id,
        base_version,
        operations_json,
    } = patch;
    let (operations_json, operations_ref) =
        if operations_json.len() > s.0.cfg.gateway.inline_max_bytes {
            let r = s.put_owned(caller, Bytes::from(operations_json)).await?;
            (String::new(), Some(r.to_string()))
        } else {
            (operations_json, None)
        };
    let event = PatchSubmitted {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: caller.workspace_id.clone(),
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
        patch_id,
        workflow_id: workflow_id.to_string(),
        author: caller.key_id.clone(),
        base_version,
        operations_json,
        operations_ref,
    };
    s.0.sender.send(&event).await
}

/// 422 for a patch the materializer's budget would reject (`budget_*` codes).
fn patch_over_budget(detail: String) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "patch-over-budget",
        "Patch over budget",
        detail,
    )
}

/// 412 unless If-Match's `base` is the head's version (0: no workflow yet).
fn check_base(base: i64, head: i64) -> Result<(), Problem> {
    if head == base {
        Ok(())
    } else {
        Err(Problem::precondition_failed(format!(
            "If-Match names version {base}, the head is version {head}"
        )))
    }
}

pub(super) async fn put_workflow(
    State(s): State<AppState>,
    trace: RequestTrace,
    Allowed(caller, _): Allowed<Write>,
    Valid(WorkflowId(workflow_id)): Valid<WorkflowId>,
    IdempotencyKey(key): IdempotencyKey,
    IfMatch(base): IfMatch,
    Body(b): Body,
) -> Result<Response, Problem> {
    let (doc, text) = parse_value(&b)?;
    // The definition becomes the value of one `add` at the root: the patch budget's depth
    // limit applies to it (its size is bounded by the definition limit below).
    let max_depth = s.0.cfg.materializer.patch_max_depth;
    if definition::measure(&doc, usize::MAX, max_depth).depth > max_depth {
        return Err(patch_over_budget(format!(
            "the definition is nested more than {max_depth} levels deep"
        ))
        .with_code("budget_depth"));
    }
    let limits = s.0.limits;
    let checked = if b.len() > BLOCKING_VALIDATION_BYTES {
        tokio::task::spawn_blocking(move || definition::check(&doc, &limits))
            .await
            .map_err(|_| Problem::unavailable("validation was interrupted", s.retry_after()))?
    } else {
        definition::check(&doc, &limits)
    };
    if let Err(e) = checked {
        return Err(
            Problem::unprocessable(format!("invalid workflow definition: {e}")).with_code(e.code()),
        );
    }
    let exists = s.exists(&caller.workspace_id, &workflow_id).await?;
    if let Some(base) = base {
        let head = if exists {
            s.head_version(&caller, &workflow_id).await?
        } else {
            0
        };
        check_base(base, head)?;
    }
    // Creating and replacing are the same patch: `add` at the root replaces the document
    // (`null` for a workflow that does not exist yet).
    let patch = Submission {
        workflow_id: &workflow_id,
        base_version: base,
        operations_json: format!(r#"[{{"op":"add","path":"","value":{text}}}]"#),
    };
    let scope = format!("put:{workflow_id}");
    let patch_id = submit_once(&s, &caller, &trace, &scope, key.as_deref(), &b, patch).await?;
    if !exists {
        s.remember_workflow(
            (caller.workspace_id.clone(), workflow_id.clone()),
            Some(Instant::now() + PROVISIONAL_OWNER_TTL),
        );
    }
    Ok(accepted(json!({ "patch_id": patch_id })))
}

pub(super) async fn post_patches(
    State(s): State<AppState>,
    trace: RequestTrace,
    Allowed(caller, _): Allowed<Write>,
    Valid(WorkflowId(workflow_id)): Valid<WorkflowId>,
    IdempotencyKey(key): IdempotencyKey,
    IfMatch(base): IfMatch,
    Body(b): Body,
) -> Result<Response, Problem> {
    let (ops, text) = parse_value(&b)?;
    let patch = match Patch::from_value(&ops) {
        Ok(patch) => patch,
        Err(e) => {
            return Err(
                Problem::unprocessable(format!("invalid JSON patch: {e}")).with_code(e.code())
            )
        }
    };
    // What the materializer's patch budget rejects without the document (operation count,
    // pointers, the values' size and depth) is a 422 now instead of a PatchRejected later:
    // the same function and limits as the materializer's.
    let budget = s.0.cfg.materializer.budget();
    if let Err(e) = weir_model::patch::check_static(&patch, &budget) {
        return Err(patch_over_budget(e.to_string()).with_code(e.code()));
    }
    if ops.as_array().is_some_and(Vec::is_empty) {
        return Err(
            Problem::unprocessable("the patch has no operations").with_code("invalid_operation")
        );
    }
    s.require_workflow(&caller, &workflow_id).await?;
    if let Some(base) = base {
        check_base(base, s.head_version(&caller, &workflow_id).await?)?;
    }
    let patch = Submission {
        workflow_id: &workflow_id,
        base_version: base,
        operations_json: text.to_string(),
    };
    let scope = format!("patch:{workflow_id}");
    let patch_id = submit_once(&s, &caller, &trace, &scope, key.as_deref(), &b, patch).await?;
    Ok(accepted(json!({ "patch_id": patch_id })))
}

pub(super) async fn get_workflow(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    Valid(WorkflowId(workflow_id)): Valid<WorkflowId>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let row = sqlx::query!(
        "SELECT version, definition, definition_ref FROM weir_workflow_heads
         WHERE workflow_id = $1 AND workspace_id = $2",
        workflow_id,
        caller.workspace_id
    )
    .fetch_optional(&s.0.pool)
    .await
    .map_err(|e| s.db_unavailable(&e))?
    .ok_or_else(|| no_workflow(&workflow_id))?;
    let etag = format!("\"{}\"", row.version);
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == etag)
        })
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let definition = match (row.definition, row.definition_ref) {
        (Some(d), _) => d,
        (None, Some(r)) => {
            let r: CasRef = r.parse().map_err(|e| {
                tracing::error!(error = %e, %workflow_id, "a stored definition ref does not parse");
                Problem::internal("stored data this answer needs is unreadable")
            })?;
            s.0.cas
                .get_json(&r)
                .await
                .map_err(|e| s.cas_unavailable(&e))?
        }
        (None, None) => Value::Null,
    };
    let body =
        json!({ "workflow_id": workflow_id, "version": row.version, "definition": definition });
    Ok((StatusCode::OK, [(header::ETAG, etag_value)], Json(body)).into_response())
}

pub(super) async fn get_patch(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    Valid(PatchAt {
        workflow_id,
        patch_id,
    }): Valid<PatchAt>,
) -> Result<Response, Problem> {
    let row = sqlx::query!(
        "SELECT status, version, reason_code, reason FROM weir_workflow_patches
         WHERE workflow_id = $1 AND patch_id = $2 AND workspace_id = $3",
        workflow_id,
        patch_id,
        caller.workspace_id
    )
    .fetch_optional(&s.0.pool)
    .await
    .map_err(|e| s.db_unavailable(&e))?;
    let body = match row {
        Some(r) => json!({
            "workflow_id": workflow_id, "patch_id": patch_id, "status": r.status,
            "version": r.version, "code": r.reason_code, "reason": r.reason,
        }),
        None => {
            // Not decided yet. A creation this gateway accepted counts as existing.
            s.require_workflow(&caller, &workflow_id).await?;
            json!({
                "workflow_id": workflow_id, "patch_id": patch_id, "status": "pending",
                "version": null, "code": null, "reason": null,
            })
        }
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}
