//! What handlers take from a request, checked once here: the caller and its permission, the
//! path's ids, the Idempotency-Key and If-Match headers, and the body (size, time, `\u0000`,
//! strict JSON). Every rejection is a [`Problem`].
//!
//! Invariants:
//! - a handler's extractors run in the order of its arguments and the first rejection is the
//!   answer, so the order is part of the contract: 401 (no or unknown key), 429, 403 (the
//!   key's permission), then 400 for the path, the headers and the body, then 413/408;
//! - ids derived from an Idempotency-Key depend on the workspace, the scope and the key only,
//!   never on anything another workspace can choose.

use std::marker::PhantomData;
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use weir_model::patch::parse_json_strict;
use weir_model::Permission;

use super::AppState;
use crate::auth::{Caller, Resolved};
use crate::guard;
use crate::limit::ClientId;
use crate::metrics;
use crate::problem::Problem;
use crate::server::is_body_timeout;
use crate::trace::RequestTrace;

// The caller ------------------------------------------------------------------------------------

/// The caller: 401 without a valid key, 429 (without a query) for an address over its budget of
/// unknown keys or a workspace over its rate.
impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(Problem::unauthorized(
                "missing Authorization header: send `Authorization: Bearer <key>`",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .ok_or_else(|| {
                Problem::unauthorized("the Authorization header must be `Bearer <key>`")
            })?;
        let client = parts.extensions.get::<ClientId>().copied();
        let resolved = state.0.keys.resolve(key, client).await.map_err(|e| {
            tracing::error!(error = %e, "API key lookup failed");
            Problem::unavailable("the key store is unavailable", state.retry_after())
        })?;
        let caller = match resolved {
            Resolved::Known(caller) => caller,
            Resolved::Unknown => return Err(Problem::unauthorized("unknown or revoked API key")),
            Resolved::Throttled => {
                return Err(Problem::client_limited(
                    "too many unknown API keys from this address; retry later",
                    state.retry_after(),
                ))
            }
        };
        if !state.0.limiter.allow(&caller.workspace_id, Instant::now()) {
            ::metrics::counter!(metrics::RATE_LIMITED).increment(1);
            return Err(Problem::rate_limited(state.retry_after()));
        }
        Ok(caller)
    }
}

/// A permission a route needs: [`Read`] or [`Write`].
pub(super) trait Needs {
    /// The lowest permission that may call the route.
    const PERMISSION: Permission;
}

/// Routes that read (GET, cache lookups).
pub(super) struct Read;

impl Needs for Read {
    const PERMISSION: Permission = Permission::Read;
}

/// Routes that submit events.
pub(super) struct Write;

impl Needs for Write {
    const PERMISSION: Permission = Permission::Write;
}

/// The caller, whose key holds at least `N`'s permission (403 otherwise).
pub(super) struct Allowed<N>(pub Caller, pub PhantomData<N>);

impl<N: Needs> FromRequestParts<AppState> for Allowed<N> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let caller = Caller::from_request_parts(parts, state).await?;
        require(&caller, N::PERMISSION)?;
        Ok(Self(caller, PhantomData))
    }
}

/// What every route that submits an event takes first: the state, the request's trace
/// context (its event carries it) and a caller with write permission.
pub(super) struct Writer {
    pub s: AppState,
    pub trace: RequestTrace,
    pub caller: Caller,
}

impl FromRequestParts<AppState> for Writer {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let Ok(trace) = RequestTrace::from_request_parts(parts, state).await;
        let Allowed(caller, _) = Allowed::<Write>::from_request_parts(parts, state).await?;
        Ok(Self {
            s: state.clone(),
            trace,
            caller,
        })
    }
}

fn require(caller: &Caller, needed: Permission) -> Result<(), Problem> {
    if caller.permission >= needed {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "this needs {} permission; the key has {}",
            needed.as_str(),
            caller.permission.as_str()
        )))
    }
}

// The path --------------------------------------------------------------------------------------

/// Path parameters with their checks: `Raw` is what the route's pattern captures.
pub(super) trait PathParams: Sized {
    /// The captured segments, as strings.
    type Raw: DeserializeOwned + Send;
    /// 400 unless every segment is a valid id.
    fn check(raw: Self::Raw) -> Result<Self, Problem>;
}

/// Checked path parameters (400 when they do not parse or are not valid ids).
pub(super) struct Valid<T>(pub T);

impl<T: PathParams, S: Send + Sync> FromRequestParts<S> for Valid<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(raw) = Path::<T::Raw>::from_request_parts(parts, state)
            .await
            .map_err(|e| Problem::bad_request(format!("bad path parameter: {e}")))?;
        T::check(raw).map(Valid)
    }
}

/// `{workflow_id}`.
pub(super) struct WorkflowId(pub String);

impl PathParams for WorkflowId {
    type Raw = String;
    fn check(workflow_id: String) -> Result<Self, Problem> {
        check_id("workflow id", &workflow_id, true)?;
        Ok(Self(workflow_id))
    }
}

/// `{workflow_id}/patches/{patch_id}`.
pub(super) struct PatchAt {
    pub workflow_id: String,
    pub patch_id: Uuid,
}

impl PathParams for PatchAt {
    type Raw = (String, String);
    fn check((workflow_id, patch_id): (String, String)) -> Result<Self, Problem> {
        check_id("workflow id", &workflow_id, true)?;
        let patch_id = check_uuid("patch id", &patch_id)?;
        Ok(Self {
            workflow_id,
            patch_id,
        })
    }
}

/// `{run_id}`.
pub(super) struct RunId(pub Uuid);

impl PathParams for RunId {
    type Raw = String;
    fn check(run_id: String) -> Result<Self, Problem> {
        check_uuid("run id", &run_id).map(Self)
    }
}

/// `{run_id}/nodes/{node_id}`.
pub(super) struct NodeAt {
    pub run_id: Uuid,
    pub node_id: String,
}

impl PathParams for NodeAt {
    type Raw = (String, String);
    fn check((run_id, node_id): (String, String)) -> Result<Self, Problem> {
        let run_id = check_uuid("run id", &run_id)?;
        check_id("node id", &node_id, false)?;
        Ok(Self { run_id, node_id })
    }
}

/// Workflow and node ids: `^[A-Za-z0-9_.:-]{1,128}$` (node ids without `:`).
pub(super) fn check_id(kind: &str, id: &str, colon: bool) -> Result<(), Problem> {
    if weir_model::id::valid_id(id, colon) {
        Ok(())
    } else {
        Err(Problem::bad_request(format!(
            "{kind} {id:?} is invalid: 1 to 128 of A-Z a-z 0-9 _ . -{}",
            if colon { " :" } else { "" }
        )))
    }
}

fn check_uuid(kind: &str, s: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(s).map_err(|_| Problem::bad_request(format!("{kind} {s:?} is not a UUID")))
}

// Headers ---------------------------------------------------------------------------------------

/// The Idempotency-Key header, when sent (400 unless it is 1 to 255 visible ASCII characters).
pub(super) struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        idempotency_key(&parts.headers).map(Self)
    }
}

/// The Idempotency-Key header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if (1..=255).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(s.to_string()))
        }
        _ => Err(Problem::bad_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// An id derived from an idempotency key: the same key in the same workspace and scope
/// always gives the same id, so a retried request produces an event the consumers
/// deduplicate (patch ids, run ids and cache request ids are their dedup keys). Event ids
/// stay fresh UUIDv7s, as the event contract says.
pub fn derived_id(workspace_id: &str, scope: &str, key: &str) -> Uuid {
    let mut h = Sha256::new();
    for part in [workspace_id, scope, key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    // A sha256 digest is 32 bytes: the first 16 always exist.
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The id of a new thing: derived from the idempotency key when there is one, else fresh.
pub(super) fn new_id(caller: &Caller, scope: &str, key: Option<&str>) -> Uuid {
    key.map_or_else(Uuid::now_v7, |k| derived_id(&caller.workspace_id, scope, k))
}

/// The If-Match header's version, when sent (see [`if_match`]).
pub(super) struct IfMatch(pub Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        if_match(&parts.headers).map(Self)
    }
}

/// If-Match: a version, bare or quoted (`3`, `"3"`, `W/"3"`); `0` names a workflow that does
/// not exist yet (a create-only PUT).
pub(super) fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    match s.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(Some(n)),
        _ => Err(Problem::bad_request(
            "If-Match must be a workflow version (an ETag such as \"3\")",
        )),
    }
}

// The body --------------------------------------------------------------------------------------

/// The request body: 413 over `gateway.max_body_bytes`, 408 when it does not arrive within
/// `gateway.body_read_timeout_ms`, 400 when it holds `\u0000` (see [`guard`]).
pub(super) struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Problem> {
        body(state, Bytes::from_request(req, state).await).map(Self)
    }
}

fn body(state: &AppState, b: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    let b = b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large(state.0.cfg.gateway.max_body_bytes)
        } else if is_body_timeout(&e) {
            Problem::request_timeout(format!(
                "the body did not arrive within {} ms",
                state.0.cfg.gateway.body_read_timeout_ms
            ))
        } else {
            Problem::bad_request(format!("cannot read the body: {e}"))
        }
    })?;
    guard::reject_nul(&b)?;
    Ok(b)
}

/// A [`Body`] that is a JSON `T` (400 not JSON, 422 not of `T`'s shape), with its bytes for
/// the Idempotency-Key's body hash.
pub(super) struct JsonBody<T> {
    pub value: T,
    pub bytes: Bytes,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Problem> {
        let Body(bytes) = Body::from_request(req, state).await?;
        Ok(Self {
            value: parse_body(&bytes)?,
            bytes,
        })
    }
}

pub(super) fn json_error(e: serde_json::Error) -> Problem {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => Problem::unprocessable(format!("the body does not fit the schema: {e}")),
        _ => Problem::bad_request(format!("the body is not valid JSON: {e}")),
    }
}

/// Parses a JSON body strictly (duplicate member names are an error, as the materializer
/// treats them).
pub(super) fn parse_value(body: &[u8]) -> Result<(Value, &str), Problem> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Problem::bad_request("the body is not UTF-8 JSON"))?;
    let v = parse_json_strict(text).map_err(json_error)?;
    Ok((v, text))
}

pub(super) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(json_error)
}

/// 202 with `v`: the request's event was acknowledged by the broker.
pub(super) fn accepted(v: Value) -> Response {
    (StatusCode::ACCEPTED, Json(v)).into_response()
}
