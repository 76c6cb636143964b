//! The gateway's shared state: configuration, pools and clients, the key store and rate
//! limiters, the workflows known to exist per workspace, and the helpers handlers share
//! (workspace-scoped existence checks, CAS puts and owned refs, Idempotency-Key claims).
//!
//! Invariants:
//! - every lookup is keyed by the caller's workspace: a workflow, run or blob of another
//!   workspace is never looked at, remembered or told apart from one that does not exist;
//! - a blob the gateway puts gets its workspace's owner row first, so it is never reachable
//!   without one;
//! - a workflow is taken as existing from memory only when Postgres confirmed it, or for
//!   [`PROVISIONAL_OWNER_TTL`] after this gateway accepted its creation;
//! - a run is taken as existing from memory only when its source confirmed it (runs are
//!   never deleted and never change workspace, so the answer cannot go stale).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir_model::definition::Limits;
use weir_model::run::RunStatus;
use weir_model::{CasRef, WireRef};
use weir_runtime::cas::Cas;
use weir_runtime::config::Config;

use crate::auth::{Caller, KeyStore, KeyStoreLimits};
use crate::idempotency::{self, Claim};
use crate::limit::{ClientId, RateLimiter};
use crate::metrics;
use crate::problem::Problem;
use crate::produce::Sender;
use crate::sources::{CacheLookupSource, RunStatusSource};

/// How long a workflow this gateway just accepted a creation for is taken as existing before
/// the materializer has stored it.
pub(super) const PROVISIONAL_OWNER_TTL: Duration = Duration::from_secs(60);
/// Most known workflows remembered before the map is emptied.
const MAX_OWNERS: usize = 200_000;
/// Most known runs remembered before the set is emptied.
const MAX_KNOWN_RUNS: usize = 200_000;

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

pub(super) struct Inner {
    pub(super) cfg: Arc<Config>,
    pub(super) pool: PgPool,
    pub(super) cas: Cas,
    pub(super) keys: KeyStore,
    pub(super) limiter: RateLimiter,
    /// Requests per client address, checked before authentication.
    pub(super) clients: RateLimiter<ClientId>,
    pub(super) sender: Sender,
    /// Workflows known to exist, by (workspace_id, workflow_id).
    owners: RwLock<HashMap<(String, String), Known>>,
    /// Runs confirmed to exist, by (workspace_id, run_id).
    runs: RwLock<HashSet<(String, Uuid)>>,
    pub(super) limits: Limits,
    pub(super) sources: Sources,
    /// The live streams' fan-out (fed by [`crate::streams::feed`], started by `spawn`).
    pub(super) streams: crate::streams::Hub,
    ready: AtomicBool,
}

/// The gateway's shared state.
#[derive(Clone)]
pub struct AppState(pub(super) Arc<Inner>);

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
            runs: RwLock::new(HashSet::new()),
            ready: AtomicBool::new(false),
            streams: crate::streams::Hub::new(crate::streams::StreamLimits::from_config(g)),
            cfg,
            pool,
            cas,
            sender,
            sources,
        }))
    }

    /// The live streams' fan-out.
    pub fn streams(&self) -> &crate::streams::Hub {
        &self.0.streams
    }

    /// The gateway's Postgres pool (sampled into the `weir_db_pool_*` gauges).
    pub fn pool(&self) -> &PgPool {
        &self.0.pool
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.cfg
    }

    pub(super) fn retry_after(&self) -> u32 {
        self.0.cfg.gateway.retry_after_secs
    }

    pub(super) fn db_unavailable(&self, e: &sqlx::Error) -> Problem {
        tracing::error!(error = %e, "a gateway query failed");
        Problem::unavailable("the database is unavailable", self.retry_after())
    }

    /// 503 when the blob store is unreachable (a retry can succeed); 500 when a stored blob
    /// is missing or damaged (no retry will help, so no Retry-After invites one).
    pub(super) fn cas_unavailable(&self, e: &weir_runtime::cas::CasError) -> Problem {
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
    pub(super) async fn exists(
        &self,
        workspace_id: &str,
        workflow_id: &str,
    ) -> Result<bool, Problem> {
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

    pub(super) fn remember_workflow(&self, key: (String, String), until: Option<Instant>) {
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
    pub(super) async fn require_workflow(
        &self,
        caller: &Caller,
        workflow_id: &str,
    ) -> Result<(), Problem> {
        if self.exists(&caller.workspace_id, workflow_id).await? {
            Ok(())
        } else {
            Err(no_workflow(workflow_id))
        }
    }

    /// Puts `bytes` in the CAS for the caller's workspace: its owner row first (a blob is
    /// never reachable without one), then the blob.
    pub(super) async fn put_owned(&self, caller: &Caller, bytes: Bytes) -> Result<CasRef, Problem> {
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
    pub(super) async fn require_owned_ref(
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
    pub(super) async fn head_version(
        &self,
        caller: &Caller,
        workflow_id: &str,
    ) -> Result<i64, Problem> {
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
    /// configured (without one the coordinator enforces it when it reads the event). A run
    /// once confirmed is answered from memory: a worker's completions for one run cost one
    /// lookup, not one each.
    pub(super) async fn check_run(&self, caller: &Caller, run_id: Uuid) -> Result<(), Problem> {
        let Some(src) = &self.0.sources.run_status else {
            return Ok(());
        };
        let key = (caller.workspace_id.clone(), run_id);
        if self
            .0
            .runs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return Ok(());
        }
        match src.run_exists(&caller.workspace_id, run_id).await {
            Ok(true) => {
                let mut runs = self.0.runs.write().unwrap_or_else(|p| p.into_inner());
                if runs.len() >= MAX_KNOWN_RUNS {
                    runs.clear();
                }
                runs.insert(key);
                Ok(())
            }
            Ok(false) => Err(Problem::not_found(format!("no run {run_id}"))),
            Err(e) => Err(self.run_source_failed(&e)),
        }
    }

    /// 503 for a run status source that failed (its error logged, never returned).
    fn run_source_failed(&self, e: &crate::sources::SourceError) -> Problem {
        tracing::error!(error = %e, "run status lookup failed");
        Problem::unavailable("run status is unavailable", self.retry_after())
    }

    /// The run `run_id` of the caller's workspace from `src`: 404 when there is none there,
    /// 503 when the source fails.
    pub(super) async fn run_status_from(
        &self,
        src: &dyn RunStatusSource,
        caller: &Caller,
        run_id: Uuid,
    ) -> Result<RunStatus, Problem> {
        match src.run_status(&caller.workspace_id, run_id).await {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(Problem::not_found(format!("no run {run_id}"))),
            Err(e) => Err(self.run_source_failed(&e)),
        }
    }

    /// The configured source `src`, or 503 `{what} not configured`.
    pub(super) fn source<'a, T: ?Sized>(
        &self,
        src: &'a Option<Arc<T>>,
        what: &str,
    ) -> Result<&'a T, Problem> {
        src.as_deref().ok_or_else(|| {
            Problem::unavailable(format!("{what} not configured"), self.retry_after())
        })
    }

    /// JSON text inline, or its CAS ref (owned by the caller's workspace) when larger than
    /// `gateway.inline_max_bytes`.
    pub(super) async fn inline_or_ref(
        &self,
        caller: &Caller,
        v: &Value,
    ) -> Result<(Option<String>, Option<WireRef>), Problem> {
        let text = v.to_string();
        if text.len() > self.0.cfg.gateway.inline_max_bytes {
            let r = self.put_owned(caller, Bytes::from(text)).await?;
            Ok((None, Some(r.into())))
        } else {
            Ok((Some(text), None))
        }
    }

    /// Runs `send` under the Idempotency-Key `key` of `scope` (see [`idempotency`]): 422
    /// when the key was used with another body; the claim is released when `send` fails.
    pub(super) async fn once<T>(
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

pub(super) fn no_workflow(workflow_id: &str) -> Problem {
    Problem::not_found(format!("no workflow {workflow_id:?} in this workspace"))
}
