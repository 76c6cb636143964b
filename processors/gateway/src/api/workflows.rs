//! Workflow routes: `PUT /v1/workflows/{id}` (create or replace), `POST .../patches`,
//! `GET /v1/workflows/{id}` (the head) and `GET .../patches/{patch_id}` (the materializer's
//! decision).
//!
//! Invariants: a definition or patch the materializer would reject without the document
//! (invalid definition, malformed patch, over its budget) is a 422 here, with the
//! materializer's own code; both are one PatchSubmitted (key workflow_id), its operations in
//! the CAS when larger than `gateway.inline_max_bytes`.

use std::time::Instant;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};
use uuid::Uuid;
use weir_model::definition;
use weir_model::patch::Patch;
use weir_model::CasRef;
use weir_runtime::events::{new_event, PatchSubmitted};

use super::extract::{
    accepted, new_id, parse_value, Allowed, Body, IdempotencyKey, IfMatch, PatchAt, Read, Valid,
    WorkflowId, Writer,
};
use super::state::{no_workflow, PROVISIONAL_OWNER_TTL};
use super::AppState;
use crate::problem::Problem;

/// Bodies larger than this are validated on a blocking thread.
const BLOCKING_VALIDATION_BYTES: usize = 16 * 1024;

/// What both routes that submit a patch take, checked in this order: a writer, the
/// workflow id, the Idempotency-Key and If-Match headers, then the body.
pub(super) struct PatchRequest {
    writer: Writer,
    workflow_id: String,
    key: Option<String>,
    /// The If-Match version.
    base: Option<i64>,
    body: Bytes,
}

impl FromRequest<AppState> for PatchRequest {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Problem> {
        let (mut parts, body) = req.into_parts();
        let writer = Writer::from_request_parts(&mut parts, state).await?;
        let Valid(WorkflowId(workflow_id)) = Valid::from_request_parts(&mut parts, state).await?;
        let IdempotencyKey(key) = IdempotencyKey::from_request_parts(&mut parts, state).await?;
        let IfMatch(base) = IfMatch::from_request_parts(&mut parts, state).await?;
        let Body(body) = Body::from_request(Request::from_parts(parts, body), state).await?;
        Ok(Self {
            writer,
            workflow_id,
            key,
            base,
            body,
        })
    }
}

impl PatchRequest {
    /// 412 unless If-Match (when sent) names the head's version; `head` reads it (0: no
    /// workflow yet).
    async fn check_base(
        &self,
        head: impl std::future::Future<Output = Result<i64, Problem>>,
    ) -> Result<(), Problem> {
        let Some(base) = self.base else {
            return Ok(());
        };
        let head = head.await?;
        if head == base {
            Ok(())
        } else {
            Err(Problem::precondition_failed(format!(
                "If-Match names version {base}, the head is version {head}"
            )))
        }
    }

    /// The head version of the workflow (404 when there is none in the caller's workspace).
    async fn head_version(&self) -> Result<i64, Problem> {
        let Writer { s, caller, .. } = &self.writer;
        s.head_version(caller, &self.workflow_id).await
    }

    /// Submits `operations_json` (JSON text of an RFC 6902 array) under the Idempotency-Key
    /// of scope `{kind}:{workflow_id}`: its patch id (derived from the key when there is
    /// one), after the broker acknowledged its PatchSubmitted.
    async fn submit(&self, kind: &str, operations_json: String) -> Result<Uuid, Problem> {
        let Writer { s, caller, .. } = &self.writer;
        let scope = format!("{kind}:{}", self.workflow_id);
        let key = self.key.as_deref();
        let patch_id = new_id(caller, &scope, key);
        let send = self.submit_patch(operations_json, patch_id);
        s.once(caller, &scope, key, &self.body, send).await?;
        Ok(patch_id)
    }

    /// Produces one PatchSubmitted with `operations_json`, via the CAS when larger than
    /// `gateway.inline_max_bytes`.
    async fn submit_patch(&self, operations_json: String, patch_id: Uuid) -> Result<(), Problem> {
        let Writer { s, trace, caller } = &self.writer;
        let (operations_json, operations_ref) =
            if operations_json.len() > s.0.cfg.gateway.inline_max_bytes {
                let r = s.put_owned(caller, Bytes::from(operations_json)).await?;
                (String::new(), Some(r.into()))
            } else {
                (operations_json, None)
            };
        let event = new_event!(PatchSubmitted {
            envelope: trace.envelope(&caller.workspace_id),
            patch_id,
            workflow_id: self.workflow_id.clone(),
            author: caller.key_id.clone(),
            base_version: self.base,
            operations_json,
            operations_ref,
        });
        s.0.sender.send(&event).await
    }
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

/// 422 unless `doc` is a workflow definition the materializer accepts as a patch's value.
async fn check_definition(s: &AppState, doc: Value, len: usize) -> Result<(), Problem> {
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
    let checked = if len > BLOCKING_VALIDATION_BYTES {
        tokio::task::spawn_blocking(move || definition::check(&doc, &limits))
            .await
            .map_err(|_| Problem::unavailable("validation was interrupted", s.retry_after()))?
    } else {
        definition::check(&doc, &limits)
    };
    checked.map_err(|e| {
        Problem::unprocessable(format!("invalid workflow definition: {e}")).with_code(e.code())
    })
}

/// 422 for what the materializer rejects in a patch without the document: a malformed
/// patch, one over its budget (operation count, pointers, the values' size and depth), an
/// empty one; the same function and limits as the materializer's.
fn check_patch(s: &AppState, ops: &Value) -> Result<(), Problem> {
    let patch = Patch::from_value(ops).map_err(|e| {
        Problem::unprocessable(format!("invalid JSON patch: {e}")).with_code(e.code())
    })?;
    let budget = s.0.cfg.materializer.budget();
    if let Err(e) = weir_model::patch::check_static(&patch, &budget) {
        return Err(patch_over_budget(e.to_string()).with_code(e.code()));
    }
    if ops.as_array().is_some_and(Vec::is_empty) {
        return Err(
            Problem::unprocessable("the patch has no operations").with_code("invalid_operation")
        );
    }
    Ok(())
}

/// `PUT /v1/workflows/{workflow_id}`: creating and replacing are the same patch, `add` at
/// the root (which replaces the document, `null` for a workflow that does not exist yet).
pub(super) async fn put_workflow(req: PatchRequest) -> Result<Response, Problem> {
    let (doc, text) = parse_value(&req.body)?;
    let Writer { s, caller, .. } = &req.writer;
    check_definition(s, doc, req.body.len()).await?;
    let exists = s.exists(&caller.workspace_id, &req.workflow_id).await?;
    req.check_base(async {
        if exists {
            req.head_version().await
        } else {
            Ok(0)
        }
    })
    .await?;
    let operations = format!(r#"[{{"op":"add","path":"","value":{text}}}]"#);
    let patch_id = req.submit("put", operations).await?;
    if !exists {
        s.remember_workflow(
            (caller.workspace_id.clone(), req.workflow_id.clone()),
            Some(Instant::now() + PROVISIONAL_OWNER_TTL),
        );
    }
    Ok(accepted(json!({ "patch_id": patch_id })))
}

/// `POST /v1/workflows/{workflow_id}/patches`: an RFC 6902 array, for a workflow of the
/// caller's workspace.
pub(super) async fn post_patches(req: PatchRequest) -> Result<Response, Problem> {
    let (ops, text) = parse_value(&req.body)?;
    let Writer { s, caller, .. } = &req.writer;
    check_patch(s, &ops)?;
    s.require_workflow(caller, &req.workflow_id).await?;
    req.check_base(req.head_version()).await?;
    let patch_id = req.submit("patch", text.to_string()).await?;
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
