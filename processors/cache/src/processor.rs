//! The cache processor: consumes weir.cache.v1 (CacheStore, CacheLookup) and answers every
//! lookup with a CacheAnswer on weir.cache-answers.v1 through the outbox, in the batch's
//! transaction.
//!
//! Invariants: records are applied in partition order — the batch is cut into runs of
//! consecutive stores and consecutive lookups, each run applied with set-based statements, so
//! a lookup sees every store before it. A record whose content is invalid is rejected
//! (dead-lettered with the reason) before any of its effects is written, and costs that
//! record only: the checks of [`store_request`] and [`lookup_request`] (text fields, JSON,
//! permissions, the prompt's size, the vector) run before the batch's statements, and a
//! prompt the embedder refuses rejects its own record ([`StoreOutcome::Rejected`], a lookup's
//! `Err(reason)`). Nothing a record holds can make the processor stop: an embedder that is
//! down or misconfigured is retried with backoff while the `cache-embedder` readiness
//! component reports not ready.

use async_trait::async_trait;
use sqlx::PgConnection;
use weir_model::WireRef;
use weir_runtime::config::CacheConfig;
use weir_runtime::events::{new_event, CacheAnswer, CacheEvent, CacheLookup, CacheStore, Envelope};
use weir_runtime::telemetry::Health;
use weir_runtime::{ApplyError, Outbox, Processor, Record, Rejection};

use crate::cache::{
    check_prompt, Cache, LookupRequest, StoreOutcome, StoreRequest, StoreResult, UnitVector,
};
use crate::error::{CacheError, EmbedClass};
use crate::key::parse_json;
use crate::metrics as m;
use weir_model::cache::MAX_NODE_TYPE_BYTES;
use weir_model::Permission;

/// Base consumer group of the cache processor; the group is
/// [`KafkaConfig::group`](weir_runtime::config::KafkaConfig::group) of it.
pub const GROUP: &str = "weir-cache";

/// Readiness component reporting whether the embedder answers (see [`CacheProcessor::with_health`]).
pub const EMBEDDER_COMPONENT: &str = "cache-embedder";

/// Longest workspace id, requester or request id accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The processor.
pub struct CacheProcessor {
    cache: Cache,
    health: Option<Health>,
    group: String,
}

impl CacheProcessor {
    /// A processor over `cache`, consuming in the group of `kafka`'s environment.
    pub fn new(cache: Cache, kafka: &weir_runtime::config::KafkaConfig) -> Self {
        Self {
            cache,
            health: None,
            group: kafka.group(GROUP),
        }
    }

    /// Reports the embedder's state as the readiness component [`EMBEDDER_COMPONENT`]:
    /// not ready while the embedder is misconfigured or down (the batch is retried with
    /// backoff meanwhile), ready again after the next batch that gets through.
    pub fn with_health(mut self, health: Health) -> Self {
        health.set(EMBEDDER_COMPONENT, true);
        self.health = Some(health);
        self
    }

    fn embedder_ready(&self, ready: bool) {
        if let Some(h) = &self.health {
            h.set(EMBEDDER_COMPONENT, ready);
        }
    }
}

/// Refuses a text field Postgres or the metrics cannot take: empty (when required), longer
/// than `max` bytes, or holding NUL (Postgres text refuses it: a data error mid-batch).
fn check_text(what: &str, s: &str, max: usize, required: bool) -> Result<(), CacheError> {
    if required && s.is_empty() {
        return Err(CacheError::Invalid(format!("{what} is empty")));
    }
    if s.len() > max {
        return Err(CacheError::Invalid(format!(
            "{what} is {} bytes, at most {max}",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(CacheError::Invalid(format!("{what} holds a NUL character")));
    }
    Ok(())
}

/// The common checks of both record kinds.
fn check_names(
    workspace_id: &str,
    requester: &str,
    request_id: &str,
    node_type: &str,
) -> Result<(), CacheError> {
    check_text("workspace_id", workspace_id, MAX_NAME_BYTES, true)?;
    check_text("requester", requester, MAX_NAME_BYTES, false)?;
    check_text("request_id", request_id, MAX_NAME_BYTES, false)?;
    check_text("node_type", node_type, MAX_NODE_TYPE_BYTES, true)
}

/// A record's vector, validated and scaled to unit length: the one validation it gets.
fn check_vector(v: &Option<Vec<f32>>, dims: u32) -> Result<Option<UnitVector>, CacheError> {
    v.as_ref()
        .map(|v| UnitVector::new(v.clone(), dims as usize).map_err(CacheError::Invalid))
        .transpose()
}

/// Turns a CacheLookup into a request, refusing what is invalid.
pub fn lookup_request(e: &CacheLookup, cfg: &CacheConfig) -> Result<LookupRequest, CacheError> {
    check_names(&e.workspace_id, &e.requester, &e.request_id, &e.node_type)?;
    check_prompt(cfg, e.prompt.as_deref())?;
    let embedding = check_vector(&e.embedding, cfg.dimensions)?;
    Ok(LookupRequest {
        request_id: e.request_id.clone(),
        workspace_id: e.workspace_id.clone(),
        requester: e.requester.clone(),
        permission: Permission::parse(&e.permission)?,
        node_type: e.node_type.clone(),
        config: parse_json("config_json", &e.config_json)?,
        inputs: parse_json("inputs_json", &e.inputs_json)?,
        prompt: e.prompt.clone(),
        embedding,
        semantic: e.semantic,
    })
}

/// Turns a CacheStore into a request, refusing what is invalid.
pub fn store_request(e: &CacheStore, cfg: &CacheConfig) -> Result<StoreRequest, CacheError> {
    check_names(&e.workspace_id, &e.requester, &e.request_id, &e.node_type)?;
    check_prompt(cfg, e.prompt.as_deref())?;
    let embedding = check_vector(&e.embedding, cfg.dimensions)?;
    let result = match (&e.result_json, &e.result_ref) {
        (Some(text), None) => {
            parse_json("result_json", text)?;
            StoreResult::Json(text.clone())
        }
        (None, Some(r)) => StoreResult::Ref(
            r.get()
                .map_err(|e| CacheError::Invalid(format!("result_ref: {e}")))?,
        ),
        _ => {
            return Err(CacheError::Invalid(
                "exactly one of result_json and result_ref must be set".into(),
            ))
        }
    };
    let permission = Permission::parse(&e.permission)?;
    let required_permission = Permission::parse(&e.required_permission)?;
    if required_permission > permission {
        return Err(CacheError::Invalid(format!(
            "a {} producer cannot store an entry requiring {}",
            permission.as_str(),
            required_permission.as_str()
        )));
    }
    Ok(StoreRequest {
        request_id: e.request_id.clone(),
        workspace_id: e.workspace_id.clone(),
        requester: e.requester.clone(),
        permission,
        node_type: e.node_type.clone(),
        config: parse_json("config_json", &e.config_json)?,
        inputs: parse_json("inputs_json", &e.inputs_json)?,
        result,
        prompt: e.prompt.clone(),
        embedding,
        cost_ms: e.cost_ms,
        required_permission,
    })
}

enum Item {
    Store(StoreRequest),
    /// A lookup and the trace context (traceparent, tracestate) its answer continues.
    Lookup(LookupRequest, String, Option<String>),
}

fn reject(rejections: &mut Vec<Rejection>, index: usize, reason: &'static str, message: String) {
    metrics::counter!(m::REJECTED, "reason" => reason).increment(1);
    rejections.push(Rejection {
        index,
        reason: message,
    });
}

#[async_trait]
impl Processor for CacheProcessor {
    type Event = CacheEvent;

    fn group(&self) -> String {
        self.group.clone()
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<CacheEvent>],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError> {
        let cfg = self.cache.config();
        let mut rejections = Vec::new();
        // (index of the record, item), in order.
        let mut items: Vec<(usize, Item)> = Vec::with_capacity(records.len());
        for (index, r) in records.iter().enumerate() {
            let item = match &r.event {
                CacheEvent::CacheStore(e) => store_request(e, cfg).map(Item::Store),
                CacheEvent::CacheLookup(e) => lookup_request(e, cfg)
                    .map(|q| Item::Lookup(q, e.traceparent.clone(), e.tracestate.clone())),
            };
            match item {
                Ok(i) => items.push((index, i)),
                Err(e) => {
                    tracing::warn!(coords = %r.coords, error = %e, "rejecting cache record");
                    reject(&mut rejections, index, "invalid", e.to_string());
                }
            }
        }
        self.apply_items(conn, records, &items, outbox, &mut rejections)
            .await?;
        self.embedder_ready(true);
        rejections.sort_by_key(|r| r.index);
        Ok(rejections)
    }
}

impl CacheProcessor {
    /// Applies the valid records: runs of consecutive stores / lookups, in order.
    async fn apply_items(
        &self,
        conn: &mut PgConnection,
        records: &[Record<CacheEvent>],
        items: &[(usize, Item)],
        outbox: &mut Outbox<'_>,
        rejections: &mut Vec<Rejection>,
    ) -> Result<(), ApplyError> {
        let mut i = 0;
        while i < items.len() {
            let is_store = matches!(items[i].1, Item::Store(_));
            let mut j = i;
            while j < items.len() && matches!(items[j].1, Item::Store(_)) == is_store {
                j += 1;
            }
            let run = &items[i..j];
            if is_store {
                let (index, reqs): (Vec<usize>, Vec<StoreRequest>) = run
                    .iter()
                    .filter_map(|(index, x)| match x {
                        Item::Store(s) => Some((*index, s.clone())),
                        Item::Lookup(..) => None,
                    })
                    .unzip();
                let outcomes = self
                    .cache
                    .store_in(conn, &reqs)
                    .await
                    .map_err(|e| self.cache_error(e))?;
                for (index, outcome) in index.into_iter().zip(outcomes) {
                    if let StoreOutcome::Rejected(reason) = outcome {
                        tracing::warn!(coords = %records[index].coords, %reason, "rejecting cache store");
                        reject(rejections, index, "embedding", reason);
                    }
                }
            } else {
                let mut index = Vec::with_capacity(run.len());
                let mut reqs = Vec::with_capacity(run.len());
                let mut traces = Vec::with_capacity(run.len());
                for (ix, x) in run {
                    if let Item::Lookup(q, traceparent, tracestate) = x {
                        index.push(*ix);
                        reqs.push(q.clone());
                        traces.push((traceparent.clone(), tracestate.clone()));
                    }
                }
                let answers = self
                    .cache
                    .lookup_in(conn, &reqs)
                    .await
                    .map_err(|e| self.cache_error(e))?;
                for (((a, q), (traceparent, tracestate)), ix) in
                    answers.into_iter().zip(&reqs).zip(traces).zip(index)
                {
                    let a = match a {
                        Ok(a) => a,
                        Err(reason) => {
                            tracing::warn!(coords = %records[ix].coords, %reason, "rejecting cache lookup");
                            reject(rejections, ix, "embedding", reason);
                            continue;
                        }
                    };
                    outbox
                        .push(&new_event!(CacheAnswer {
                            // The lookup's workspace and trace context.
                            envelope: Envelope::new(
                                q.workspace_id.clone(),
                                traceparent,
                                tracestate,
                            ),
                            request_id: a.request_id,
                            hit: a.hit,
                            kind: a.kind,
                            similarity: a.similarity,
                            result_ref: a.result_ref.map(WireRef::from),
                            saved_ms: a.saved_ms,
                            entry_key: a.entry_key,
                        }))
                        .await?;
                }
            }
            i = j;
        }
        Ok(())
    }

    /// A batch-level cache error: the embedder's state goes to readiness and metrics.
    fn cache_error(&self, e: CacheError) -> ApplyError {
        if let CacheError::Embed { class, message } = &e {
            let label = match class {
                EmbedClass::Unavailable => "unavailable",
                EmbedClass::Misconfigured => "misconfigured",
            };
            metrics::counter!(m::EMBEDDER_ERRORS, "class" => label).increment(1);
            tracing::error!(class = label, %message, "the embedder failed; the batch is retried");
            self.embedder_ready(false);
        }
        e.into()
    }
}
