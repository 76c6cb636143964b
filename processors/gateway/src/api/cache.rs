//! Cache routes: `POST /v1/cache/entries` (CacheStore on `weir.cache.v1`, keyed by
//! workspace) and `POST /v1/cache/lookup` (synchronous, from the cache lookup source).
//!
//! Invariants: an entry is checked as the cache processor checks it (a client mistake is a
//! 422 here, not a dead letter it never hears of) before anything goes to the CAS; its
//! `required_permission` is never above the caller's; `config` and `inputs` are sent as
//! canonical JSON, so equal values hash equally.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use weir_model::definition;
use weir_model::CasRef;
use weir_model::Permission;
use weir_runtime::events::{new_event, CacheEvent, CacheStore};

use super::extract::{accepted, new_id, Allowed, IdempotencyKey, JsonBody, Read, Writer};
use super::AppState;
use crate::problem::Problem;
use crate::sources::CacheLookupRequest;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CacheEntryBody {
    node_type: String,
    config: Value,
    inputs: Value,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    result_ref: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    embedding: Option<Vec<f32>>,
    cost_ms: i64,
    #[serde(default)]
    required_permission: Option<Permission>,
}

pub(super) async fn post_cache_entry(
    Writer { s, trace, caller }: Writer,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody { value: e, bytes: b }: JsonBody<CacheEntryBody>,
) -> Result<Response, Problem> {
    if e.node_type.is_empty() || e.node_type.len() > weir_model::cache::MAX_NODE_TYPE_BYTES {
        return Err(Problem::unprocessable(format!(
            "node_type must be 1 to {} bytes",
            weir_model::cache::MAX_NODE_TYPE_BYTES
        )));
    }
    if e.cost_ms < 0 {
        return Err(Problem::unprocessable("cost_ms must not be negative"));
    }
    // The cache processor's own checks, here so a client mistake is a 422 and not a dead
    // letter the client never hears of; before anything is stored in the CAS.
    // The text is the cache processor's own refusal (`invalid cache request: ...`).
    weir_model::cache::check_prompt(e.prompt.as_deref(), s.0.cfg.cache.max_prompt_bytes)
        .map_err(|why| Problem::unprocessable(format!("invalid cache request: {why}")))?;
    if let Some(v) = &e.embedding {
        weir_model::cache::validate_vector(v.clone(), s.0.cfg.cache.dimensions as usize)
            .map_err(Problem::unprocessable)?;
    }
    let required_permission = e.required_permission.unwrap_or(caller.permission);
    if required_permission > caller.permission {
        return Err(Problem::forbidden(format!(
            "required_permission {} is above this key's permission {}: an entry cannot be \
             hidden from its own writer",
            required_permission.as_str(),
            caller.permission.as_str()
        ))
        .with_code("permission_above_caller"));
    }
    let (result_json, result_ref) = match (&e.result, e.result_ref) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(Problem::unprocessable(
                "give exactly one of result and result_ref",
            ))
        }
        (Some(v), None) => s.inline_or_ref(&caller, v).await?,
        (None, Some(r)) => {
            let parsed = r
                .parse::<CasRef>()
                .map_err(|err| Problem::unprocessable(format!("result_ref: {err}")))?;
            s.require_owned_ref(&caller, "result_ref", &parsed).await?;
            // A ref has one text form, so the event carries exactly the text given.
            (None, Some(parsed.into()))
        }
    };
    let request_id = new_id(&caller, "cache-entry", key.as_deref());
    let event = CacheEvent::CacheStore(new_event!(CacheStore {
        envelope: trace.envelope(&caller.workspace_id),
        request_id: request_id.to_string(),
        requester: caller.key_id.clone(),
        permission: caller.permission.as_str().to_string(),
        node_type: e.node_type,
        config_json: definition::canonical_json_verbatim_numbers(&e.config),
        inputs_json: definition::canonical_json_verbatim_numbers(&e.inputs),
        result_json,
        result_ref,
        prompt: e.prompt,
        embedding: e.embedding,
        cost_ms: e.cost_ms,
        required_permission: required_permission.as_str().to_string(),
    }));
    s.once(
        &caller,
        "cache-entry",
        key.as_deref(),
        &b,
        s.0.sender.send(&event),
    )
    .await?;
    Ok(accepted(json!({ "request_id": request_id })))
}

pub(super) async fn cache_lookup(
    State(s): State<AppState>,
    Allowed(caller, _): Allowed<Read>,
    JsonBody { value: req, .. }: JsonBody<CacheLookupRequest>,
) -> Result<Response, Problem> {
    if req.node_type.is_empty() || req.node_type.len() > 128 {
        return Err(Problem::unprocessable(
            "node_type must be 1 to 128 characters",
        ));
    }
    let src = s.source(&s.0.sources.cache_lookup, "cache lookup")?;
    match src.lookup(&caller, &req).await {
        Ok(answer) => Ok((StatusCode::OK, Json(answer)).into_response()),
        // An empty or over-long prompt, a prompt the embedder refuses: the client's mistake.
        Err(e) if e.rejection.is_some() => {
            Err(Problem::unprocessable(e.rejection.unwrap_or_default()))
        }
        Err(e) => {
            tracing::error!(error = %e, "cache lookup failed");
            Err(Problem::unavailable(
                "the cache is unavailable",
                s.retry_after(),
            ))
        }
    }
}
