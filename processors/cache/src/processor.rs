//! The cache processor: consumes weir.cache.v1 (CacheStore, CacheLookup) and answers every
//! lookup with a CacheAnswer on weir.cache-answers.v1 through the outbox, in the batch's
//! transaction.
//!
//! Invariants: records are applied in partition order — the batch is cut into runs of
//! consecutive stores and consecutive lookups, each run applied with set-based statements, so
//! a lookup sees every store before it; an invalid record (bad permission, JSON that does not
//! parse, no result, a vector of the wrong dimension) is rejected (dead-lettered) before any
//! of its effects is written.

use async_trait::async_trait;
use sqlx::PgConnection;
use weir_runtime::cas::CasRef;
use weir_runtime::events::{
    new_event_id, now_micros, CacheAnswer, CacheEvent, CacheLookup, CacheStore,
};
use weir_runtime::{ApplyError, Outbox, Processor, Record, Rejection};

use crate::cache::{Cache, LookupRequest, StoreRequest, StoreResult};
use crate::embed::check_dims;
use crate::error::CacheError;
use crate::key::{parse_json, Permission};

/// Consumer group of the cache processor.
pub const GROUP: &str = "weir-cache";

/// The processor.
pub struct CacheProcessor {
    cache: Cache,
}

impl CacheProcessor {
    /// A processor over `cache`.
    pub fn new(cache: Cache) -> Self {
        Self { cache }
    }
}

fn check_vector(v: &Option<Vec<f32>>, dims: u32) -> Result<(), CacheError> {
    if let Some(v) = v {
        check_dims(v.clone(), dims as usize)?;
    }
    Ok(())
}

/// Turns a CacheLookup into a request, refusing what is invalid.
pub fn lookup_request(e: &CacheLookup, dims: u32) -> Result<LookupRequest, CacheError> {
    if e.workspace_id.is_empty() {
        return Err(CacheError::Invalid("workspace_id is empty".into()));
    }
    check_vector(&e.embedding, dims)?;
    Ok(LookupRequest {
        request_id: e.request_id.clone(),
        workspace_id: e.workspace_id.clone(),
        requester: e.requester.clone(),
        permission: Permission::parse(&e.permission)?,
        node_type: e.node_type.clone(),
        config: parse_json("config_json", &e.config_json)?,
        inputs: parse_json("inputs_json", &e.inputs_json)?,
        prompt: e.prompt.clone(),
        embedding: e.embedding.clone(),
        semantic: e.semantic,
    })
}

/// Turns a CacheStore into a request, refusing what is invalid.
pub fn store_request(e: &CacheStore, dims: u32) -> Result<StoreRequest, CacheError> {
    if e.workspace_id.is_empty() {
        return Err(CacheError::Invalid("workspace_id is empty".into()));
    }
    check_vector(&e.embedding, dims)?;
    let result = match (&e.result_json, &e.result_ref) {
        (Some(text), None) => {
            parse_json("result_json", text)?;
            StoreResult::Json(text.clone())
        }
        (None, Some(r)) => StoreResult::Ref(
            r.parse::<CasRef>()
                .map_err(|e| CacheError::Invalid(format!("result_ref: {e}")))?,
        ),
        _ => {
            return Err(CacheError::Invalid(
                "exactly one of result_json and result_ref must be set".into(),
            ))
        }
    };
    Ok(StoreRequest {
        request_id: e.request_id.clone(),
        workspace_id: e.workspace_id.clone(),
        requester: e.requester.clone(),
        permission: Permission::parse(&e.permission)?,
        node_type: e.node_type.clone(),
        config: parse_json("config_json", &e.config_json)?,
        inputs: parse_json("inputs_json", &e.inputs_json)?,
        result,
        prompt: e.prompt.clone(),
        embedding: e.embedding.clone(),
        cost_ms: e.cost_ms,
        required_permission: Permission::parse(&e.required_permission)?,
    })
}

enum Item {
    Store(StoreRequest),
    Lookup(LookupRequest, String),
}

#[async_trait]
impl Processor for CacheProcessor {
    type Event = CacheEvent;

    fn group(&self) -> String {
        GROUP.to_string()
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<CacheEvent>],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError> {
        let dims = self.cache.config().dimensions;
        let mut rejections = Vec::new();
        let mut items = Vec::with_capacity(records.len());
        for (index, r) in records.iter().enumerate() {
            let item = match &r.event {
                CacheEvent::CacheStore(e) => store_request(e, dims).map(Item::Store),
                CacheEvent::CacheLookup(e) => {
                    lookup_request(e, dims).map(|q| Item::Lookup(q, e.traceparent.clone()))
                }
            };
            match item {
                Ok(i) => items.push(i),
                Err(e) => {
                    tracing::warn!(coords = %r.coords, error = %e, "rejecting cache record");
                    rejections.push(Rejection {
                        index,
                        reason: e.to_string(),
                    });
                }
            }
        }
        // Runs of consecutive stores / lookups, in order.
        let mut i = 0;
        while i < items.len() {
            let is_store = matches!(items[i], Item::Store(_));
            let mut j = i;
            while j < items.len() && matches!(items[j], Item::Store(_)) == is_store {
                j += 1;
            }
            if is_store {
                let reqs: Vec<StoreRequest> = items[i..j]
                    .iter()
                    .filter_map(|x| {
                        if let Item::Store(s) = x {
                            Some(s.clone())
                        } else {
                            None
                        }
                    })
                    .collect();
                self.cache.store_in(conn, &reqs).await?;
            } else {
                let (reqs, traces): (Vec<LookupRequest>, Vec<String>) = items[i..j]
                    .iter()
                    .filter_map(|x| {
                        if let Item::Lookup(q, t) = x {
                            Some((q.clone(), t.clone()))
                        } else {
                            None
                        }
                    })
                    .unzip();
                let answers = self.cache.lookup_in(conn, &reqs).await?;
                let mut events = Vec::with_capacity(answers.len());
                for ((a, q), traceparent) in answers.into_iter().zip(&reqs).zip(traces) {
                    events.push(CacheAnswer {
                        event_id: new_event_id(),
                        occurred_at: now_micros(),
                        workspace_id: q.workspace_id.clone(),
                        traceparent,
                        tracestate: None,
                        request_id: a.request_id,
                        hit: a.hit,
                        kind: a.kind,
                        similarity: a.similarity,
                        result_ref: a.result_ref.map(|r| r.to_string()),
                        saved_ms: a.saved_ms,
                        entry_key: a.entry_key,
                    });
                }
                for event in &events {
                    outbox.push(event).await?;
                }
            }
            i = j;
        }
        Ok(rejections)
    }
}
