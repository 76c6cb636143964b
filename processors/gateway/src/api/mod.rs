//! The HTTP API: routes, request parsing and the handlers.
//!
//! Invariants:
//! - every request but the health, metrics and document routes carries a valid key
//!   (401 otherwise) whose permission covers the route (403); everything it names is looked
//!   up inside the key's workspace only, so another workspace's workflow or run is 404;
//! - workflow ids are unique per workspace: a workspace may create any id, whether or not
//!   another workspace has one of that name, and no answer depends on other workspaces;
//! - a CAS ref a caller gives (`output_ref`, `result_ref`) is accepted only if its workspace
//!   stored the blob (`weir_cas_owners`), with the same 422 whether or not the blob exists
//!   for another workspace; every blob the gateway puts is recorded as its workspace's first;
//! - a 202 is sent only after the broker acknowledged the request's single event;
//! - every error is an RFC 9457 problem; a client mistake is a 4xx, never a 5xx.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir_model::definition::{self, Limits};
use weir_model::patch::{parse_json_strict, Patch};
use weir_model::CasRef;
use weir_model::Permission;
use weir_runtime::cas::Cas;
use weir_runtime::config::Config;
use weir_runtime::events::{
    self, CacheEvent, CacheStore, CompletionEvent, NodeCompleted, NodeStatus, PatchSubmitted,
    RunCancelRequested, RunRequested,
};

use crate::auth::{Caller, KeyStore, KeyStoreLimits, Resolved};
use crate::guard;
use crate::idempotency::{self, Claim};
use crate::limit::{ClientId, RateLimiter};
use crate::metrics;
use crate::problem::Problem;
use crate::produce::Sender;
use crate::server::{is_body_timeout, PeerAddr};
use crate::sources::{CacheLookupRequest, CacheLookupSource, RunStatusSource};
use crate::trace::RequestTrace;

/// The OpenAPI 3.1 document, served at /openapi.json; the file is docs/openapi.json.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

/// How long a workflow this gateway just accepted a creation for is taken as existing before
/// the materializer has stored it.
const PROVISIONAL_OWNER_TTL: Duration = Duration::from_secs(60);
/// Most known workflows remembered before the map is emptied.
const MAX_OWNERS: usize = 200_000;
/// Bodies larger than this are validated on a blocking thread.
const BLOCKING_VALIDATION_BYTES: usize = 16 * 1024;

/// Read models the process wiring may plug in (see [`crate::sources`]).
#[derive(Clone, Default)]
pub struct Sources {
    /// Run status for `GET /v1/runs/{run_id}` (and the workspace check of cancellations and
    /// completions); without it that route answers 503.
    pub run_status: Option<Arc<dyn RunStatusSource>>,
    /// Synchronous cache lookups; without it `POST /v1/cache/lookup` answers 503.
    pub cache_lookup: Option<Arc<dyn CacheLookupSource>>,
}

/// A workflow known to exist in a workspace.
#[derive(Debug, Clone)]
struct Known {
    /// `None` once Postgres confirmed it (workflows are never deleted), else when a
    /// provisional entry (from a creation this gateway accepted) expires.
    until: Option<Instant>,
}

struct Inner {
    cfg: Arc<Config>,
    pool: PgPool,
    cas: Cas,
    keys: KeyStore,
    limiter: RateLimiter,
    /// Requests per client address, checked before authentication.
    clients: RateLimiter<ClientId>,
    sender: Sender,
    /// Workflows known to exist, by (workspace_id, workflow_id).
    owners: RwLock<HashMap<(String, String), Known>>,
    limits: Limits,
    sources: Sources,
    ready: AtomicBool,
}

/// The gateway's shared state.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// State over the given handles.
    pub fn new(cfg: Arc<Config>, pool: PgPool, cas: Cas, sender: Sender, sources: Sources) -> Self {
        // Install the process's recorder now: metrics are served by the telemetry listener,
        // which may start later, and what is recorded before a recorder exists is lost.
        weir_runtime::telemetry::metrics_handle();
        metrics::describe();
        let g = &cfg.gateway;
        let m = &cfg.materializer;
        Self(Arc::new(Inner {
            keys: KeyStore::new(
                pool.clone(),
                KeyStoreLimits {
                    ttl: Duration::from_millis(g.key_cache_ttl_ms),
                    negative_ttl: Duration::from_millis(g.negative_key_cache_ttl_ms),
                    max_negative: g.max_negative_keys,
                    unknown_per_sec: g.unknown_key_rate_per_sec,
                    unknown_burst: g.unknown_key_burst,
                },
            ),
            limiter: RateLimiter::new(g.rate_limit_per_sec, g.rate_limit_burst),
            clients: RateLimiter::new(g.client_rate_limit_per_sec, g.client_rate_limit_burst),
            limits: m.limits(),
            owners: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            cfg,
            pool,
            cas,
            sender,
            sources,
        }))
    }

    /// The gateway's Postgres pool (sampled into the `weir_db_pool_*` gauges).
    pub fn pool(&self) -> &PgPool {
        &self.0.pool
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.cfg
    }

    fn retry_after(&self) -> u32 {
        self.0.cfg.gateway.retry_after_secs
    }

    fn db_unavailable(&self, e: &sqlx::Error) -> Problem {
        tracing::error!(error = %e, "a gateway query failed");
        Problem::unavailable("the database is unavailable", self.retry_after())
    }

    /// 503 when the blob store is unreachable (a retry can succeed); 500 when a stored blob
    /// is missing or damaged (no retry will help, so no Retry-After invites one).
    fn cas_unavailable(&self, e: &weir_runtime::cas::CasError) -> Problem {
        use weir_runtime::cas::CasError;
        tracing::error!(error = %e, "a CAS operation failed");
        match e {
            CasError::NotFound(_)
            | CasError::Corrupt { .. }
            | CasError::InvalidRef(_)
            | CasError::Json(_) => Problem::internal("stored data this answer needs is unreadable"),
            _ => Problem::unavailable("the blob store is unavailable", self.retry_after()),
        }
    }

    /// Whether `workflow_id` exists in `workspace_id`: from memory, else Postgres. Other
    /// workspaces' workflows of the same id are neither looked at nor remembered here.
    async fn exists(&self, workspace_id: &str, workflow_id: &str) -> Result<bool, Problem> {
        let now = Instant::now();
        let key = (workspace_id.to_string(), workflow_id.to_string());
        if let Some(o) = self
            .0
            .owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if o.until.is_none_or(|u| u > now) {
                return Ok(true);
            }
        }
        let found = sqlx::query_scalar!(
            r#"SELECT 1 AS "one!" FROM weir_workflow_heads WHERE workspace_id = $1 AND workflow_id = $2"#,
            workspace_id,
            workflow_id
        )
        .fetch_optional(&self.0.pool)
        .await
        .map_err(|e| self.db_unavailable(&e))?
        .is_some();
        if found {
            self.remember_workflow(key, None);
        }
        Ok(found)
    }

    fn remember_workflow(&self, key: (String, String), until: Option<Instant>) {
        let mut owners = self.0.owners.write().unwrap_or_else(|p| p.into_inner());
        if owners.len() >= MAX_OWNERS {
            owners.clear();
        }
        // A confirmed workflow is never replaced by a provisional one.
        if until.is_some() && owners.get(&key).is_some_and(|o| o.until.is_none()) {
            return;
        }
        owners.insert(key, Known { until });
    }

    /// 404 unless `workflow_id` exists in the caller's workspace.
    async fn require_workflow(&self, caller: &Caller, workflow_id: &str) -> Result<(), Problem> {
        if self.exists(&caller.workspace_id, workflow_id).await? {
            Ok(())
        } else {
            Err(no_workflow(workflow_id))
        }
    }

    /// Puts `bytes` in the CAS for the caller's workspace: its owner row first (a blob is
    /// never reachable without one), then the blob.
    async fn put_owned(&self, caller: &Caller, bytes: Bytes) -> Result<CasRef, Problem> {
        let r = CasRef::of(&bytes);
        weir_runtime::cas::owners::record_on_pool(&self.0.pool, &caller.workspace_id, &r, true)
            .await
            .map_err(|e| self.db_unavailable(&e))?;
        self.0
            .cas
            .put(bytes)
            .await
            .map_err(|e| self.cas_unavailable(&e))
    }

    /// 422 unless the caller's workspace stored the blob `r` names (`field` names the body
    /// field). The answer is the same whether or not the blob exists for another workspace.
    async fn require_owned_ref(
        &self,
        caller: &Caller,
        field: &str,
        r: &CasRef,
    ) -> Result<(), Problem> {
        let owned = weir_runtime::cas::owners::claim(&self.0.pool, &caller.workspace_id, r)
            .await
            .map_err(|e| self.db_unavailable(&e))?;
        if owned {
            Ok(())
        } else {
            Err(Problem::unprocessable(format!(
                "{field}: {r} is not a blob of this workspace (send the content inline; the \
                 gateway stores large values in the CAS)"
            ))
            .with_code("unknown_ref"))
        }
    }

    /// The head version of a workflow of the caller's workspace (a Postgres read).
    async fn head_version(&self, caller: &Caller, workflow_id: &str) -> Result<i64, Problem> {
        sqlx::query_scalar!(
            "SELECT version FROM weir_workflow_heads WHERE workflow_id = $1 AND workspace_id = $2",
            workflow_id,
            caller.workspace_id
        )
        .fetch_optional(&self.0.pool)
        .await
        .map_err(|e| self.db_unavailable(&e))?
        .ok_or_else(|| no_workflow(workflow_id))
    }

    /// 404 unless the run exists in the caller's workspace, when a run status source is
    /// configured (without one the coordinator enforces it when it reads the event).
    async fn check_run(&self, caller: &Caller, run_id: Uuid) -> Result<(), Problem> {
        let Some(src) = &self.0.sources.run_status else {
            return Ok(());
        };
        match src.run_status(&caller.workspace_id, run_id).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(Problem::not_found(format!("no run {run_id}"))),
            Err(e) => {
                tracing::error!(error = %e, "run status lookup failed");
                Err(Problem::unavailable(
                    "run status is unavailable",
                    self.retry_after(),
                ))
            }
        }
    }

    /// Runs `send` under the Idempotency-Key `key` of `scope` (see [`idempotency`]): 422
    /// when the key was used with another body; the claim is released when `send` fails.
    async fn once<T>(
        &self,
        caller: &Caller,
        scope: &str,
        key: Option<&str>,
        body: &[u8],
        send: impl std::future::Future<Output = Result<T, Problem>>,
    ) -> Result<T, Problem> {
        let Some(key) = key else {
            return send.await;
        };
        let hash = idempotency::body_hash(body);
        let ttl = Duration::from_secs(self.0.cfg.gateway.idempotency_ttl_secs);
        let ws = &caller.workspace_id;
        let claim = idempotency::claim(&self.0.pool, ws, scope, key, &hash, ttl)
            .await
            .map_err(|e| self.db_unavailable(&e))?;
        match claim {
            Claim::Conflict => {
                ::metrics::counter!(metrics::IDEMPOTENCY_CONFLICTS).increment(1);
                Err(Problem::unprocessable(
                    "this Idempotency-Key was already used with a different body; use a new \
                     key for a new request",
                )
                .with_code("idempotency_key_reused"))
            }
            Claim::Retry => send.await,
            Claim::New => {
                let sent = send.await;
                if sent.is_err() {
                    if let Err(e) = idempotency::release(&self.0.pool, ws, scope, key, &hash).await
                    {
                        tracing::warn!(error = %e, "releasing an idempotency key failed");
                    }
                }
                sent
            }
        }
    }

    /// Forgets revoked keys as Postgres announces them, until `shutdown`.
    pub async fn watch_revocations(self, shutdown: CancellationToken) {
        self.0.keys.watch_revocations(shutdown).await;
    }

    /// Deletes expired idempotency records every minute until `shutdown`.
    pub async fn sweep_idempotency(self, shutdown: CancellationToken) {
        let ttl = Duration::from_secs(self.0.cfg.gateway.idempotency_ttl_secs);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            // Short batches until the expired rows are gone (at most 100 a minute): no long
            // transaction, and the sweep keeps up with a busy gateway.
            const BATCH: u64 = 10_000;
            let mut deleted = 0;
            for _ in 0..100 {
                match idempotency::sweep(&self.0.pool, ttl, BATCH as i64).await {
                    Ok(n) => {
                        deleted += n;
                        if n < BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sweeping idempotency records failed");
                        break;
                    }
                }
            }
            if deleted > 0 {
                tracing::debug!(deleted, "expired idempotency records");
            }
        }
    }

    /// Whether the last readiness check passed.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    /// Checks Postgres and Kafka every `every` until `shutdown`; /readyz answers from it.
    pub async fn watch_readiness(self, every: Duration, shutdown: CancellationToken) {
        loop {
            let db = sqlx::query_scalar!("SELECT 1 AS \"one!\"")
                .fetch_one(&self.0.pool)
                .await
                .is_ok();
            let producer = self.0.sender.producer().clone();
            let kafka = tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            let was = self.0.ready.swap(db && kafka, Ordering::Relaxed);
            ::metrics::gauge!(metrics::READY).set(if db && kafka { 1.0 } else { 0.0 });
            if was != (db && kafka) {
                tracing::info!(postgres = db, kafka, "gateway readiness changed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

fn no_workflow(workflow_id: &str) -> Problem {
    Problem::not_found(format!("no workflow {workflow_id:?} in this workspace"))
}

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

/// The request body, or a problem: 413 over the limit, 408 too slow, 400 when it holds
/// `\u0000` (see [`guard`]).
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

fn json_error(e: serde_json::Error) -> Problem {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => Problem::unprocessable(format!("the body does not fit the schema: {e}")),
        _ => Problem::bad_request(format!("the body is not valid JSON: {e}")),
    }
}

/// Parses a JSON body strictly (duplicate member names are an error, as the materializer
/// treats them).
fn parse_value(body: &[u8]) -> Result<(Value, &str), Problem> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Problem::bad_request("the body is not UTF-8 JSON"))?;
    let v = parse_json_strict(text).map_err(json_error)?;
    Ok((v, text))
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(json_error)
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, Problem> {
    p.map(|Path(v)| v)
        .map_err(|e| Problem::bad_request(format!("bad path parameter: {e}")))
}

/// Workflow and node ids: `^[A-Za-z0-9_.:-]{1,128}$` (node ids without `:`).
fn check_id(kind: &str, id: &str, colon: bool) -> Result<(), Problem> {
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
fn new_id(caller: &Caller, scope: &str, key: Option<&str>) -> Uuid {
    key.map_or_else(Uuid::now_v7, |k| derived_id(&caller.workspace_id, scope, k))
}

/// If-Match: a version, bare or quoted (`3`, `"3"`, `W/"3"`); `0` names a workflow that does
/// not exist yet (a create-only PUT).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
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

fn accepted(v: Value) -> Response {
    (StatusCode::ACCEPTED, Json(v)).into_response()
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let limit = state.0.cfg.gateway.max_body_bytes;
    Router::new()
        .route(
            "/v1/workflows/{workflow_id}",
            get(get_workflow).put(put_workflow),
        )
        .route("/v1/workflows/{workflow_id}/patches", post(post_patches))
        .route(
            "/v1/workflows/{workflow_id}/patches/{patch_id}",
            get(get_patch),
        )
        .route("/v1/runs", post(post_run))
        .route("/v1/runs/{run_id}", get(get_run))
        .route("/v1/runs/{run_id}/cancel", post(cancel_run))
        .route(
            "/v1/runs/{run_id}/nodes/{node_id}/completions",
            post(post_completion),
        )
        .route("/v1/cache/entries", post(post_cache_entry))
        .route("/v1/cache/lookup", post(cache_lookup))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not accept that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            client_gate,
        ))
        .layer(axum::middleware::from_fn(crate::trace::trace_request))
        .layer(axum::middleware::from_fn(track))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Who sent a request, for the per-client limits: the TCP peer, or with
/// `gateway.client_ip_from_forwarded_for` the last `X-Forwarded-For` entry (the one the load
/// balancer appended; entries before it are whatever the client claimed).
fn client_of(req: &Request, forwarded_for: bool) -> Option<ClientId> {
    if forwarded_for {
        let last = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok());
        if let Some(ip) = last {
            return Some(ClientId::new(ip));
        }
    }
    req.extensions()
        .get::<PeerAddr>()
        .map(|p| ClientId::new(p.0.ip()))
}

/// The per-client request limit, before authentication (and before the body is read): a
/// client over it costs one map lookup. Requests that did not come through
/// [`crate::server`] (in-process tests) have no client and are not limited here.
async fn client_gate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Some(client) = client_of(&req, s.0.cfg.gateway.client_ip_from_forwarded_for) {
        if !s.0.clients.allow(&client, Instant::now()) {
            ::metrics::counter!(metrics::CLIENT_LIMITED, "reason" => "requests").increment(1);
            return Problem::client_limited(
                "this address is over its request rate; retry later",
                s.retry_after(),
            )
            .into_response();
        }
        req.extensions_mut().insert(client);
    }
    next.run(req).await
}

/// Counts and times every request by route.
async fn track(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let start = Instant::now();
    let res = next.run(req).await;
    ::metrics::histogram!(metrics::REQUEST_SECONDS, "route" => route.clone())
        .record(start.elapsed().as_secs_f64());
    ::metrics::counter!(metrics::REQUESTS, "route" => route, "status" => res.status().as_u16().to_string())
        .increment(1);
    res
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

// Workflows ------------------------------------------------------------------------------------

/// Produces one PatchSubmitted with `operations_json` (JSON text of an RFC 6902 array), via
/// the CAS when larger than `gateway.inline_max_bytes`.
async fn submit_patch(
    s: &AppState,
    caller: &Caller,
    trace: &RequestTrace,
    workflow_id: &str,
    base_version: Option<i64>,
    operations_json: String,
    patch_id: Uuid,
) -> Result<(), Problem> {
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

async fn put_workflow(
    State(s): State<AppState>,
    trace: RequestTrace,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Write)?;
    let workflow_id = path(p)?;
    check_id("workflow id", &workflow_id, true)?;
    let key = idempotency_key(&headers)?;
    let base = if_match(&headers)?;
    let b = body(&s, b)?;
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
        if head != base {
            return Err(Problem::precondition_failed(format!(
                "If-Match names version {base}, the head is version {head}"
            )));
        }
    }
    // Creating and replacing are the same patch: `add` at the root replaces the document
    // (`null` for a workflow that does not exist yet).
    let operations = format!(r#"[{{"op":"add","path":"","value":{text}}}]"#);
    let patch_id = new_id(&caller, &format!("put:{workflow_id}"), key.as_deref());
    let send = submit_patch(
        &s,
        &caller,
        &trace,
        &workflow_id,
        base,
        operations,
        patch_id,
    );
    s.once(
        &caller,
        &format!("put:{workflow_id}"),
        key.as_deref(),
        &b,
        send,
    )
    .await?;
    if !exists {
        s.remember_workflow(
            (caller.workspace_id.clone(), workflow_id.clone()),
            Some(Instant::now() + PROVISIONAL_OWNER_TTL),
        );
    }
    Ok(accepted(json!({ "patch_id": patch_id })))
}

async fn post_patches(
    State(s): State<AppState>,
    trace: RequestTrace,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Write)?;
    let workflow_id = path(p)?;
    check_id("workflow id", &workflow_id, true)?;
    let key = idempotency_key(&headers)?;
    let base = if_match(&headers)?;
    let b = body(&s, b)?;
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
        let head = s.head_version(&caller, &workflow_id).await?;
        if head != base {
            return Err(Problem::precondition_failed(format!(
                "If-Match names version {base}, the head is version {head}"
            )));
        }
    }
    let patch_id = new_id(&caller, &format!("patch:{workflow_id}"), key.as_deref());
    let send = submit_patch(
        &s,
        &caller,
        &trace,
        &workflow_id,
        base,
        text.to_string(),
        patch_id,
    );
    s.once(
        &caller,
        &format!("patch:{workflow_id}"),
        key.as_deref(),
        &b,
        send,
    )
    .await?;
    Ok(accepted(json!({ "patch_id": patch_id })))
}

async fn get_workflow(
    State(s): State<AppState>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    require(&caller, Permission::Read)?;
    let workflow_id = path(p)?;
    check_id("workflow id", &workflow_id, true)?;
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

async fn get_patch(
    State(s): State<AppState>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Read)?;
    let (workflow_id, patch_id) = path(p)?;
    check_id("workflow id", &workflow_id, true)?;
    let patch_id = check_uuid("patch id", &patch_id)?;
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

// Runs -----------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    workflow_id: String,
    #[serde(default)]
    version: Option<i64>,
    inputs: serde_json::Map<String, Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// JSON text inline, or its CAS ref (owned by the caller's workspace) when larger than
/// `gateway.inline_max_bytes`.
async fn inline_or_ref(
    s: &AppState,
    caller: &Caller,
    v: &Value,
) -> Result<(Option<String>, Option<String>), Problem> {
    let text = v.to_string();
    if text.len() > s.0.cfg.gateway.inline_max_bytes {
        let r = s.put_owned(caller, Bytes::from(text)).await?;
        Ok((None, Some(r.to_string())))
    } else {
        Ok((Some(text), None))
    }
}

async fn post_run(
    State(s): State<AppState>,
    trace: RequestTrace,
    caller: Caller,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Write)?;
    let header_key = idempotency_key(&headers)?;
    let b = body(&s, b)?;
    let run: RunBody = parse_body(&b)?;
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
    let (inputs_json, inputs_ref) = inline_or_ref(&s, &caller, &Value::Object(run.inputs)).await?;
    let run_id = new_id(&caller, "run", key.as_deref());
    let event = CompletionEvent::RunRequested(RunRequested {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: caller.workspace_id.clone(),
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
        run_id: run_id.to_string(),
        workflow_id: run.workflow_id,
        version: run.version,
        requester: caller.key_id.clone(),
        permission: caller.permission.as_str().to_string(),
        inputs_json,
        inputs_ref,
        idempotency_key: key.clone(),
    });
    s.once(&caller, "run", key.as_deref(), &b, s.0.sender.send(&event))
        .await?;
    Ok(accepted(json!({ "run_id": run_id })))
}

async fn get_run(
    State(s): State<AppState>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Read)?;
    let run_id = check_uuid("run id", &path(p)?)?;
    let Some(src) = &s.0.sources.run_status else {
        return Err(Problem::unavailable(
            "run status not configured",
            s.retry_after(),
        ));
    };
    match src.run_status(&caller.workspace_id, run_id).await {
        Ok(Some(status)) => Ok((StatusCode::OK, Json(status)).into_response()),
        Ok(None) => Err(Problem::not_found(format!("no run {run_id}"))),
        Err(e) => {
            tracing::error!(error = %e, "run status lookup failed");
            Err(Problem::unavailable(
                "run status is unavailable",
                s.retry_after(),
            ))
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel_run(
    State(s): State<AppState>,
    trace: RequestTrace,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Write)?;
    let run_id = check_uuid("run id", &path(p)?)?;
    // Cancelling twice is cancelling once: the key derives nothing, it only guards the body.
    let key = idempotency_key(&headers)?;
    let b = body(&s, b)?;
    let cancel: CancelBody = if b.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        parse_body(&b)?
    };
    s.check_run(&caller, run_id).await?;
    let event = CompletionEvent::RunCancelRequested(RunCancelRequested {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: caller.workspace_id.clone(),
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
        run_id: run_id.to_string(),
        reason: cancel.reason,
        requester: caller.key_id.clone(),
    });
    let scope = format!("cancel:{run_id}");
    s.once(&caller, &scope, key.as_deref(), &b, s.0.sender.send(&event))
        .await?;
    Ok(accepted(json!({ "run_id": run_id })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionBody {
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

async fn post_completion(
    State(s): State<AppState>,
    trace: RequestTrace,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Write)?;
    let (run_id, node_id) = path(p)?;
    let run_id = check_uuid("run id", &run_id)?;
    check_id("node id", &node_id, false)?;
    // The coordinator takes one outcome per (run, node, attempt): the key derives nothing, it
    // only guards the body.
    let key = idempotency_key(&headers)?;
    let b = body(&s, b)?;
    let c: CompletionBody = parse_body(&b)?;
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
    let (output_json, output_ref) = match (&c.output, c.output_ref) {
        (Some(v), _) => inline_or_ref(&s, &caller, v).await?,
        (None, r) => (None, r),
    };
    let event = CompletionEvent::NodeCompleted(NodeCompleted {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: caller.workspace_id.clone(),
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
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
    });
    let scope = format!("completion:{run_id}:{node_id}");
    s.once(&caller, &scope, key.as_deref(), &b, s.0.sender.send(&event))
        .await?;
    Ok(accepted(
        json!({ "run_id": run_id, "node_id": node_id, "attempt": c.attempt }),
    ))
}

// Cache ----------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheEntryBody {
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

async fn post_cache_entry(
    State(s): State<AppState>,
    trace: RequestTrace,
    caller: Caller,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Write)?;
    let key = idempotency_key(&headers)?;
    let b = body(&s, b)?;
    let e: CacheEntryBody = parse_body(&b)?;
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
        (Some(v), None) => inline_or_ref(&s, &caller, v).await?,
        (None, Some(r)) => {
            let parsed = r
                .parse::<CasRef>()
                .map_err(|err| Problem::unprocessable(format!("result_ref: {err}")))?;
            s.require_owned_ref(&caller, "result_ref", &parsed).await?;
            (None, Some(r))
        }
    };
    let request_id = new_id(&caller, "cache-entry", key.as_deref());
    let event = CacheEvent::CacheStore(CacheStore {
        event_id: events::new_event_id(),
        occurred_at: events::now_micros(),
        workspace_id: caller.workspace_id.clone(),
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
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
    });
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

async fn cache_lookup(
    State(s): State<AppState>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    require(&caller, Permission::Read)?;
    let b = body(&s, b)?;
    let req: CacheLookupRequest = parse_body(&b)?;
    if req.node_type.is_empty() || req.node_type.len() > 128 {
        return Err(Problem::unprocessable(
            "node_type must be 1 to 128 characters",
        ));
    }
    let Some(src) = &s.0.sources.cache_lookup else {
        return Err(Problem::unavailable(
            "cache lookup not configured",
            s.retry_after(),
        ));
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_scoped() {
        let a = derived_id("ws", "run", "k1");
        assert_eq!(a, derived_id("ws", "run", "k1"), "same key, same id");
        assert_ne!(
            a,
            derived_id("ws2", "run", "k1"),
            "workspaces never share ids"
        );
        assert_ne!(a, derived_id("ws", "patch", "k1"), "scopes never share ids");
        assert_ne!(
            derived_id("w", "sx", "k"),
            derived_id("ws", "x", "k"),
            "no concatenation clash"
        );
        assert_eq!(a.get_version_num(), 8);
    }

    #[test]
    fn if_match_and_ids_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).unwrap(), None);
        for (v, want) in [("3", Some(3)), ("\"4\"", Some(4)), ("W/\"5\"", Some(5))] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(v));
            assert_eq!(if_match(&h).unwrap(), want);
        }
        h.insert(header::IF_MATCH, HeaderValue::from_static("0"));
        assert_eq!(if_match(&h).unwrap(), Some(0), "0: must not exist yet");
        h.insert(header::IF_MATCH, HeaderValue::from_static("-1"));
        assert_eq!(if_match(&h).unwrap_err().status, 400);
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"abc\""));
        assert_eq!(if_match(&h).unwrap_err().status, 400);
        assert!(check_id("workflow id", "orders:v1_a-b.c", true).is_ok());
        assert!(check_id("node id", "a:b", false).is_err());
        assert!(check_id("workflow id", "", true).is_err());
        assert!(check_id("workflow id", &"x".repeat(129), true).is_err());
        assert_eq!(
            json_error(serde_json::from_str::<Value>("{").unwrap_err()).status,
            400
        );
        assert_eq!(
            json_error(serde_json::from_str::<RunBody>(r#"{"workflow_id": 3}"#).unwrap_err())
                .status,
            422
        );
    }
}
