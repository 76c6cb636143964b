//! The materializer processor: consumes PatchSubmitted from weir.patches.v1 through the
//! runtime and, per batch, in the batch's one transaction:
//!
//! 1. loads the heads of every workflow the batch touches (one query) and the patch ids it
//!    already decided (one query; a re-submitted patch id is not applied twice),
//! 2. folds each workflow's patches in partition order, off the async runtime,
//! 3. writes the new heads (one upsert), the decided patches (one insert) and the output
//!    events (one outbox insert): WorkflowMaterialized per applied version, PatchRejected
//!    per rejected patch.
//!
//! A workflow is keyed by (workspace_id, workflow_id): ids are names a tenant chooses, so two
//! workspaces may each own a workflow "x", and nothing here lets one see or touch the other's.
//! Patches whose operations sit in the CAS must name a blob their workspace stored
//! (`weir_cas_owners`); any other ref is rejected `blob_missing` without being read.
//!
//! No content stops it: each patch is applied within the patch budget
//! (`materializer.patch_max_*`, see [`weir_model::patch::Budget`]); a patch whose operations blob
//! is missing or corrupt is rejected (`blob_missing`, `blob_corrupt`), and the patches of a
//! workflow whose stored head cannot be read are rejected (`head_unavailable`). Only the
//! environment's failures (Postgres, a CAS that does not answer) fail the batch.
//!
//! Definitions larger than `materializer.inline_definition_max_bytes` go to the CAS before
//! the transaction commits (blobs are immutable, so an aborted batch leaves at most an
//! unreferenced blob); Postgres and the events then carry the reference (claim check).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;
use weir_model::{CasRef, WireRef};
use weir_runtime::cas::Cas;
use weir_runtime::config::Config;
use weir_runtime::copy::CopyRows;
use weir_runtime::events::{
    new_event, Envelope, PatchRejected, PatchSubmitted, WorkflowEvent, WorkflowMaterialized,
};
use weir_runtime::{ApplyError, Outbox, Processor, Record, Rejection};

use crate::error::MaterializerError;

use weir_model::definition::Limits;
use weir_model::fold::{self, Decision, Head, Submitted};
use weir_model::patch::Budget;
use weir_model::patch::{Patch, PatchError};

/// Consumer group of the materializer.
pub const GROUP: &str = "weir-materializer";

/// Metric names of the materializer.
pub mod names {
    /// Patches applied (counter).
    pub const PATCHES_APPLIED: &str = "weir_materializer_patches_applied_total";
    /// Patches rejected, by `reason` (counter).
    pub const PATCHES_REJECTED: &str = "weir_materializer_patches_rejected_total";
    /// Patches skipped because their id was already decided (counter).
    pub const PATCHES_DUPLICATE: &str = "weir_materializer_patches_duplicate_total";
    /// Definitions stored in the CAS instead of inline (counter).
    pub const DEFINITIONS_IN_CAS: &str = "weir_materializer_definitions_in_cas_total";
}

/// A new PatchSubmitted event (fresh event and patch ids, now) with inline operations.
pub fn patch_submitted(
    workflow_id: &str,
    workspace_id: &str,
    author: &str,
    base_version: Option<i64>,
    operations: &Value,
) -> PatchSubmitted {
    new_event!(PatchSubmitted {
        envelope: Envelope::at_ingress(workspace_id, "", None),
        patch_id: Uuid::now_v7(),
        workflow_id: workflow_id.into(),
        author: author.into(),
        base_version,
        operations_json: operations.to_string(),
        operations_ref: None,
    })
}

/// A workflow's key: (workspace_id, workflow_id). Workflow ids are names chosen by a tenant,
/// unique within its workspace only.
type WorkflowKey = (String, String);

/// The materializer.
pub struct Materializer {
    cfg: Arc<Config>,
    cas: Cas,
    limits: Limits,
    budget: Budget,
    /// Heads this process wrote, by (workspace, workflow): a batch takes the ones it needs out and puts
    /// back what it committed. Used only when the stored version and sha256 match.
    heads: std::sync::Mutex<HeadCache>,
}

/// Heads as this process last wrote them, with their total canonical size.
#[derive(Default)]
struct HeadCache {
    map: HashMap<WorkflowKey, CachedHead>,
    bytes: usize,
}

/// A head as this process last wrote it.
struct CachedHead {
    version: i64,
    sha256: String,
    definition: Value,
    /// Length of its canonical JSON.
    bytes: usize,
}

impl Materializer {
    /// A materializer with limits from `cfg.materializer`.
    pub fn new(cfg: Arc<Config>, cas: Cas) -> Self {
        let limits = cfg.materializer.limits();
        let budget = cfg.materializer.budget();
        Self {
            cfg,
            cas,
            limits,
            budget,
            heads: std::sync::Mutex::new(HeadCache::default()),
        }
    }

    fn cached_heads(&self) -> std::sync::MutexGuard<'_, HeadCache> {
        // The cache holds plain data; a panic elsewhere cannot leave it inconsistent.
        self.heads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the cached heads of `ids` out of the cache.
    fn take_heads(&self, ids: &[WorkflowKey]) -> HashMap<WorkflowKey, CachedHead> {
        let mut cache = self.cached_heads();
        let mut out = HashMap::new();
        for id in ids {
            if let Some(h) = cache.map.remove(id) {
                cache.bytes = cache.bytes.saturating_sub(h.bytes);
                out.insert(id.clone(), h);
            }
        }
        out
    }

    /// Remembers the heads a batch wrote, within `materializer.head_cache_bytes`: when they
    /// do not fit, the cache starts over.
    fn remember(&self, fresh: Vec<(WorkflowKey, CachedHead)>) {
        let cap = self.cfg.materializer.head_cache_bytes;
        let mut cache = self.cached_heads();
        for (id, h) in fresh {
            if h.bytes > cap / 8 {
                continue;
            }
            if cache.bytes + h.bytes > cap {
                cache.map.clear();
                cache.bytes = 0;
            }
            cache.bytes += h.bytes;
            if let Some(old) = cache.map.insert(id, h) {
                cache.bytes = cache.bytes.saturating_sub(old.bytes);
            }
        }
    }
}

/// A stored head as loaded from Postgres.
struct StoredHead {
    workspace_id: String,
    version: i64,
    definition: Option<Value>,
    definition_ref: Option<WireRef>,
    /// The cached copy matches (same version and sha256): the definition was not sent.
    cached: bool,
}

/// One workflow's work in a batch.
struct WorkflowBatch {
    workflow_id: String,
    head: Head,
    /// Indices into the batch's records, in partition order.
    records: Vec<usize>,
    /// Why the stored head cannot be read (its CAS blob is missing, corrupt or not JSON):
    /// every patch of the workflow is then rejected `head_unavailable`, instead of the
    /// whole materializer stopping on one workflow's lost blob.
    unavailable: Option<String>,
    /// Whether each patch's operations are valid JSON (the log then stores their text).
    operations: Vec<bool>,
    decisions: Vec<Decision>,
}

/// At most `max` bytes of `s` (on a char boundary), for a dead letter's reason.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A blob that could not be read, with the rejection code of the patch that needed it.
type Unreadable = (&'static str, String);

/// The rejection code for a CAS failure caused by the blob itself (absent or damaged):
/// retrying cannot help, so the patch that needs it is rejected. `None` for the
/// environment's failures (network, throttling, configuration), which keep their
/// disposition.
fn unreadable(e: &weir_runtime::cas::CasError) -> Option<&'static str> {
    use weir_runtime::cas::CasError as E;
    match e {
        E::NotFound(_) | E::InvalidRef(_) => Some("blob_missing"),
        E::Corrupt { .. } => Some("blob_corrupt"),
        _ => None,
    }
}

/// Parses a patch's operations (inline JSON text or a CAS blob); also says whether the text
/// is valid JSON, which decides how the patch log stores it.
fn parse_operations(text: &[u8]) -> (bool, Result<Patch, PatchError>) {
    match weir_model::patch::parse_json_strict(&String::from_utf8_lossy(text)) {
        Ok(v) => (true, Patch::from_owned(v)),
        Err(e) => (
            false,
            Err(PatchError::InvalidJson {
                message: e.to_string(),
            }),
        ),
    }
}

#[async_trait]
impl Processor for Materializer {
    type Event = PatchSubmitted;

    fn group(&self) -> String {
        self.cfg.kafka.group(GROUP)
    }

    /// `materializer.fetch_min_bytes` (default 1: the broker answers as soon as a patch is
    /// there). A larger value makes fetches wait for that many bytes or `fetch.wait.max.ms`,
    /// whichever comes first: fewer fetch requests at a high sustained rate, for up to
    /// `fetch.wait.max.ms` more latency when the rate is low (see the field's doc).
    fn consumer_defaults(&self) -> Vec<(&'static str, String)> {
        vec![(
            "fetch.min.bytes",
            self.cfg.materializer.fetch_min_bytes.to_string(),
        )]
    }

    fn max_batch(&self) -> Option<usize> {
        Some(self.cfg.materializer.max_batch)
    }

    fn max_wait_ms(&self) -> Option<u64> {
        Some(self.cfg.materializer.max_wait_ms)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<PatchSubmitted>],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError> {
        let started = std::time::Instant::now();
        // Already decided patch ids (a client retry, or the same patch produced twice).
        let (ws_ids, (wf_ids, patch_ids)): (Vec<String>, (Vec<String>, Vec<Uuid>)) = records
            .iter()
            .map(|r| {
                (
                    r.event.workspace_id.clone(),
                    (r.event.workflow_id.clone(), r.event.patch_id),
                )
            })
            .unzip();
        // One primary-key probe per patch, whatever the statistics say: the LIMIT keeps the
        // planner from turning this into a hash join over the whole log, which it does while
        // the table's statistics still describe it as small (a fresh or fast-growing log).
        let known: HashSet<(WorkflowKey, Uuid)> = sqlx::query!(
            r#"SELECT b.workspace_id AS "workspace_id!", b.workflow_id AS "workflow_id!",
                      b.patch_id AS "patch_id!"
               FROM UNNEST($1::text[], $2::text[], $3::uuid[]) AS b(workspace_id, workflow_id, patch_id)
               CROSS JOIN LATERAL (
                   SELECT 1 FROM weir_workflow_patches p
                   WHERE p.workspace_id = b.workspace_id AND p.workflow_id = b.workflow_id
                     AND p.patch_id = b.patch_id
                   LIMIT 1) AS hit"#,
            &ws_ids,
            &wf_ids,
            &patch_ids,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| ((r.workspace_id, r.workflow_id), r.patch_id))
        .collect();

        // Operations held in the CAS must be a blob the patch's workspace stored (the gateway
        // records it before the put). Any other ref is rejected `blob_missing`, unread, with
        // the same reason whether or not the blob exists for another workspace.
        let op_refs: Vec<(String, String)> = records
            .iter()
            .filter_map(|r| {
                r.event
                    .operations_ref
                    .as_ref()
                    .map(|o| (r.event.workspace_id.clone(), o.to_string()))
            })
            .collect();
        let owned_refs = weir_runtime::cas::owners::owned(conn, &op_refs).await?;
        let unowned: HashSet<usize> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.event.operations_ref.as_ref().is_some_and(|o| {
                    !owned_refs.contains(&(r.event.workspace_id.clone(), o.to_string()))
                })
            })
            .map(|(i, _)| i)
            .collect();

        let known_at = started.elapsed();
        // Group by workflow, keeping partition order; drop duplicates (also within the batch).
        let mut order: Vec<WorkflowKey> = Vec::new();
        let mut groups: HashMap<WorkflowKey, Vec<usize>> = HashMap::new();
        let mut seen = known;
        let mut duplicates = 0u64;
        for (i, r) in records.iter().enumerate() {
            let wf = (r.event.workspace_id.clone(), r.event.workflow_id.clone());
            if !seen.insert((wf.clone(), r.event.patch_id)) {
                duplicates += 1;
                continue;
            }
            groups
                .entry(wf)
                .or_insert_with_key(|wf| {
                    order.push(wf.clone());
                    Vec::new()
                })
                .push(i);
        }
        if duplicates > 0 {
            metrics::counter!(names::PATCHES_DUPLICATE).increment(duplicates);
        }
        if order.is_empty() {
            return Ok(Vec::new());
        }

        // Cached heads of this batch's workflows, taken out: on success the batch puts back
        // what it committed; on failure they are simply gone and get loaded again.
        let mut cached = self.take_heads(&order);
        let (c_keys, (c_versions, c_shas)): (Vec<WorkflowKey>, (Vec<i64>, Vec<String>)) = cached
            .iter()
            .map(|(k, h)| (k.clone(), (h.version, h.sha256.clone())))
            .unzip();
        let (c_wss, c_ids): (Vec<String>, Vec<String>) = c_keys.into_iter().unzip();
        let (o_wss, o_ids): (Vec<String>, Vec<String>) = order.iter().cloned().unzip();

        // Current heads, one query (a key probe each, as above); the definition only where the
        // cached copy is not current.
        let mut stored: HashMap<WorkflowKey, StoredHead> = sqlx::query!(
            r#"SELECT h.workflow_id AS "workflow_id!", h.workspace_id AS "workspace_id!",
                      h.version AS "version!", h.definition_ref,
                      (c.sha IS NOT NULL AND c.sha = h.definition_sha256 AND c.version = h.version)
                          AS "cached!",
                      CASE WHEN c.sha IS NOT NULL AND c.sha = h.definition_sha256
                                AND c.version = h.version
                           THEN NULL ELSE h.definition END AS definition
               FROM UNNEST($1::text[], $2::text[]) AS w(workspace_id, workflow_id)
               CROSS JOIN LATERAL (
                   SELECT * FROM weir_workflow_heads h
                   WHERE h.workspace_id = w.workspace_id AND h.workflow_id = w.workflow_id
                   LIMIT 1) AS h
               LEFT JOIN UNNEST($3::text[], $4::text[], $5::bigint[], $6::text[])
                      AS c(workspace_id, workflow_id, version, sha)
                 ON c.workspace_id = h.workspace_id AND c.workflow_id = h.workflow_id"#,
            &o_wss,
            &o_ids,
            &c_wss,
            &c_ids,
            &c_versions,
            &c_shas,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            (
                (r.workspace_id.clone(), r.workflow_id),
                StoredHead {
                    workspace_id: r.workspace_id,
                    version: r.version,
                    definition: r.definition,
                    definition_ref: r.definition_ref.map(WireRef::from),
                    cached: r.cached,
                },
            )
        })
        .collect();

        // Blobs needed before folding: heads and operations kept in the CAS.
        let mut blobs: HashMap<WireRef, Result<bytes::Bytes, Unreadable>> = HashMap::new();
        let refs = stored
            .values()
            .filter(|h| !h.cached)
            .filter_map(|h| h.definition_ref.clone())
            .chain(
                records
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !unowned.contains(i))
                    .filter_map(|(_, r)| r.event.operations_ref.clone()),
            );
        for r in refs {
            if blobs.contains_key(&r) {
                continue;
            }
            // A ref that does not parse, a blob that is gone or damaged: the patches that
            // need it are rejected below; only the environment's failures fail the batch.
            let got = match r.get() {
                Err(e) => Err(("blob_missing", format!("bad CAS ref: {e}"))),
                Ok(parsed) => match self.cas.get(&parsed).await {
                    Ok(bytes) => Ok(bytes),
                    Err(e) => match unreadable(&e) {
                        Some(code) => Err((code, e.to_string())),
                        None => return Err(MaterializerError::Cas(e).into()),
                    },
                },
            };
            blobs.insert(r, got);
        }

        let loaded = started.elapsed();
        let mut batches = Vec::with_capacity(order.len());
        for key in order {
            let indices = groups.remove(&key).unwrap_or_default();
            let workflow_id = key.1.clone();
            // Each workflow's stored head is taken out, so its definition moves into the fold.
            let mut unavailable = None;
            let head = match stored.remove(&key) {
                None => Head::empty(&key.0),
                Some(h) => {
                    let from_cache = if h.cached {
                        cached.remove(&key).map(|c| c.definition)
                    } else {
                        None
                    };
                    let definition = match (from_cache, h.definition, &h.definition_ref) {
                        (Some(d), _, _) | (None, Some(d), _) => d,
                        (None, None, Some(r)) => {
                            let blob =
                                blobs.get(r).ok_or_else(|| MaterializerError::HeadNotHeld {
                                    workflow_id: workflow_id.clone(),
                                })?;
                            let parsed = match blob {
                                Ok(blob) => serde_json::from_slice(blob)
                                    .map_err(|e| format!("its definition {r} is not JSON: {e}")),
                                Err((_, why)) => Err(format!("its definition {r}: {why}")),
                            };
                            parsed.unwrap_or_else(|why| {
                                tracing::error!(workflow_id = %workflow_id, reason = %why,
                                    "a stored head cannot be read; rejecting the workflow's patches");
                                unavailable = Some(format!(
                                    "the stored head of the workflow cannot be read: {why}"
                                ));
                                Value::Null
                            })
                        }
                        // The table's CHECK rules out neither; `cached` without a copy
                        // cannot happen either (the flag comes from the copies sent).
                        (None, None, None) => {
                            return Err(
                                MaterializerError::HeadWithoutDefinition { workflow_id }.into()
                            )
                        }
                    };
                    Head {
                        workspace_id: h.workspace_id,
                        version: h.version,
                        definition,
                    }
                }
            };
            batches.push(WorkflowBatch {
                workflow_id,
                head,
                records: indices,
                unavailable,
                operations: Vec::new(),
                decisions: Vec::new(),
            });
        }

        // Parse and fold off the async runtime: this is the CPU-heavy part.
        type Input = (String, Option<i64>, Result<Vec<u8>, Unreadable>);
        let inputs: Vec<Vec<Input>> = batches
            .iter()
            .map(|b| {
                b.records
                    .iter()
                    .map(|&i| {
                        let e = &records[i].event;
                        let text = match &e.operations_ref {
                            Some(r) if unowned.contains(&i) => Err((
                                "blob_missing",
                                format!(
                                    "operations_ref {}: not a blob of this workspace",
                                    truncate(r, 80)
                                ),
                            )),
                            Some(r) => match blobs.get(r) {
                                Some(Ok(blob)) => Ok(blob.to_vec()),
                                Some(Err((code, why))) => {
                                    Err((*code, format!("operations_ref {r}: {why}")))
                                }
                                None => {
                                    Err(("blob_missing", format!("operations_ref {r}: not loaded")))
                                }
                            },
                            None => Ok(e.operations_json.as_bytes().to_vec()),
                        };
                        (e.workspace_id.clone(), e.base_version, text)
                    })
                    .collect()
            })
            .collect();
        let (limits, budget) = (self.limits, self.budget);
        let mut batches = tokio::task::spawn_blocking(move || {
            let mut batches = batches;
            for (b, input) in batches.iter_mut().zip(inputs) {
                for (workspace_id, base_version, text) in input {
                    let (json, operations) = match text {
                        Ok(text) => {
                            let (json, operations) = parse_operations(&text);
                            (json, Ok(operations))
                        }
                        Err(unreadable) => (false, Err(unreadable)),
                    };
                    b.operations.push(json);
                    let head_version = b.head.version;
                    let rejected = |code, reason| Decision::Rejected {
                        head_version,
                        code,
                        reason,
                    };
                    let decision = match (&b.unavailable, operations) {
                        (Some(why), _) => rejected("head_unavailable", why.clone()),
                        (None, Err((code, why))) => rejected(code, why),
                        (None, Ok(operations)) => fold::step_with(
                            &mut b.head,
                            &Submitted {
                                workspace_id,
                                base_version,
                                operations,
                            },
                            &limits,
                            &budget,
                        ),
                    };
                    b.decisions.push(decision);
                }
            }
            batches
        })
        .await
        .map_err(MaterializerError::FoldTask)?;

        let folded = started.elapsed();
        let fresh = self.write(conn, records, &mut batches, outbox).await?;
        // Not committed yet: if the commit fails, the next attempt finds the stored sha256
        // different (or the version behind) and loads the stored head instead.
        self.remember(fresh);
        tracing::debug!(
            patches = records.len(),
            workflows = batches.len(),
            known_ms = known_at.as_secs_f64() * 1e3,
            load_ms = loaded.as_secs_f64() * 1e3,
            fold_ms = (folded - loaded).as_secs_f64() * 1e3,
            write_ms = (started.elapsed() - folded).as_secs_f64() * 1e3,
            "materialized batch"
        );
        Ok(Vec::new())
    }
}

impl Materializer {
    async fn write(
        &self,
        conn: &mut PgConnection,
        records: &[Record<PatchSubmitted>],
        batches: &mut [WorkflowBatch],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<(WorkflowKey, CachedHead)>, ApplyError> {
        let inline_max = self.cfg.materializer.inline_definition_max_bytes;
        let mut fresh = Vec::new();
        // Definitions going to the CAS, put after their owners are recorded (below).
        let mut puts: Vec<(String, CasRef, bytes::Bytes)> = Vec::new();
        let mut heads = HeadRows::default();
        let mut log = PatchRows::default();
        let (mut applied, mut rejected) = (0u64, HashMap::<&'static str, u64>::new());

        for b in batches.iter_mut() {
            let mut last_applied: Option<LastApplied> = None;
            let operations = std::mem::take(&mut b.operations);
            let decisions = std::mem::take(&mut b.decisions);
            for ((&i, decision), json) in b.records.iter().zip(decisions).zip(operations) {
                let r = &records[i];
                let e = &r.event;
                // Blob-held operations stay in the CAS; the log keeps the ref. Inline ones are
                // logged as sent (Postgres parses the text into jsonb; serializing the parsed
                // value again would only cost time); text that is not JSON is logged as a
                // JSON string so the log shows what was sent.
                let ops = match (&e.operations_ref, json) {
                    (Some(_), _) => None,
                    (None, true) => Some(e.operations_json.clone()),
                    (None, false) => Some(Value::String(e.operations_json.clone()).to_string()),
                };
                let submitted_at = chrono::DateTime::from_timestamp_micros(e.occurred_at)
                    .unwrap_or_else(chrono::Utc::now);
                match decision {
                    Decision::Applied {
                        version,
                        canonical,
                        sha256,
                    } => {
                        applied += 1;
                        let bytes = canonical.len();
                        let (definition_json, definition_ref) = if bytes > inline_max {
                            metrics::counter!(names::DEFINITIONS_IN_CAS).increment(1);
                            // The fold hashed the canonical text: that is its CAS ref.
                            let r: CasRef = format!("sha256:{sha256}")
                                .parse()
                                .map_err(MaterializerError::DefinitionRef)?;
                            puts.push((
                                b.head.workspace_id.clone(),
                                r,
                                bytes::Bytes::from(canonical),
                            ));
                            (None, Some(r.into()))
                        } else {
                            (Some(canonical), None)
                        };
                        let event =
                            WorkflowEvent::WorkflowMaterialized(new_event!(WorkflowMaterialized {
                                // The batch's head is keyed by the patch's workspace: the same.
                                envelope: Envelope::caused_by(e),
                                workflow_id: b.workflow_id.clone(),
                                version,
                                definition_json,
                                definition_ref,
                                patch_ids: vec![e.patch_id],
                                definition_sha256: sha256,
                            }));
                        outbox.push(&event).await?;
                        // The event is encoded; its text and hash move on to the log and head.
                        let WorkflowEvent::WorkflowMaterialized(m) = event else {
                            // Built as WorkflowMaterialized just above; an error, not a panic.
                            return Err(MaterializerError::EventKind.into());
                        };
                        log.push(
                            r,
                            ops,
                            "applied",
                            Some(version),
                            Some(m.definition_sha256.clone()),
                            None,
                            version - 1,
                            submitted_at,
                        );
                        last_applied = Some(LastApplied {
                            version,
                            sha256: m.definition_sha256,
                            definition_ref: m.definition_ref,
                            canonical: m.definition_json,
                            bytes,
                        });
                    }
                    Decision::Rejected {
                        head_version,
                        code,
                        reason,
                    } => {
                        *rejected.entry(code).or_default() += 1;
                        outbox
                            .push(&WorkflowEvent::PatchRejected(new_event!(PatchRejected {
                                envelope: Envelope::caused_by(e),
                                workflow_id: b.workflow_id.clone(),
                                patch_id: e.patch_id,
                                base_version: e.base_version,
                                head_version,
                                reason_code: code.to_string(),
                                reason: reason.clone(),
                            })))
                            .await?;
                        log.push(
                            r,
                            ops,
                            "rejected",
                            None,
                            None,
                            Some((code, reason)),
                            head_version,
                            submitted_at,
                        );
                    }
                }
            }
            if let Some(LastApplied {
                version,
                sha256,
                definition_ref,
                canonical,
                bytes,
            }) = last_applied
            {
                heads.workflow_ids.push(b.workflow_id.clone());
                heads.workspace_ids.push(b.head.workspace_id.clone());
                heads.versions.push(version);
                heads.refs.push(definition_ref.map(WireRef::into_string));
                heads.definitions.push(canonical);
                heads.shas.push(sha256.clone());
                fresh.push((
                    (b.head.workspace_id.clone(), b.workflow_id.clone()),
                    CachedHead {
                        version,
                        sha256,
                        definition: std::mem::take(&mut b.head.definition),
                        bytes,
                    },
                ));
            }
        }

        // Owners first (the blob is never reachable without one, and the order keeps the
        // cache's collector off a blob being put), then the blobs, before the commit: an
        // aborted batch leaves at most an owned, unreferenced, pinned blob.
        if !puts.is_empty() {
            let owners: Vec<(String, CasRef)> =
                puts.iter().map(|(ws, r, _)| (ws.clone(), *r)).collect();
            weir_runtime::cas::owners::record(conn, &owners, true).await?;
            for (_, _, blob) in puts {
                self.cas.put(blob).await.map_err(MaterializerError::Cas)?;
            }
        }
        let encoded = std::time::Instant::now();
        if log.len() <= weir_runtime::outbox::SMALL_BATCH {
            // An idle pipeline's batch of a patch or a few: heads and log in one round trip.
            log.insert_with_heads(conn, &heads).await?;
        } else {
            heads.upsert(conn).await?;
            log.insert(conn).await?;
        }
        let written = encoded.elapsed();
        tracing::trace!(
            write_ms = written.as_secs_f64() * 1e3,
            "materializer writes"
        );

        metrics::counter!(names::PATCHES_APPLIED).increment(applied);
        for (code, n) in rejected {
            metrics::counter!(names::PATCHES_REJECTED, "reason" => code).increment(n);
        }
        Ok(fresh)
    }
}

/// The newest version a batch made of one workflow: what its head row and cache entry get.
struct LastApplied {
    version: i64,
    sha256: String,
    /// CAS ref of the definition when it is too large to keep inline.
    definition_ref: Option<WireRef>,
    /// Canonical JSON text of the definition when inline.
    canonical: Option<String>,
    /// Length of its canonical JSON.
    bytes: usize,
}

#[derive(Default)]
struct HeadRows {
    workflow_ids: Vec<String>,
    workspace_ids: Vec<String>,
    versions: Vec<i64>,
    /// Canonical JSON text of inline definitions (Postgres parses it into jsonb).
    definitions: Vec<Option<String>>,
    refs: Vec<Option<String>>,
    shas: Vec<String>,
}

impl HeadRows {
    /// Upserts the heads with one statement.
    async fn upsert(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.workflow_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"INSERT INTO weir_workflow_heads
                 (workflow_id, workspace_id, version, definition, definition_ref, definition_sha256, updated_at)
               SELECT workflow_id, workspace_id, version, definition::jsonb, definition_ref, definition_sha256, now()
               FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[])
                    AS t(workflow_id, workspace_id, version, definition, definition_ref, definition_sha256)
               ON CONFLICT (workspace_id, workflow_id) DO UPDATE SET
                 version = EXCLUDED.version,
                 definition = EXCLUDED.definition,
                 definition_ref = EXCLUDED.definition_ref,
                 definition_sha256 = EXCLUDED.definition_sha256,
                 updated_at = EXCLUDED.updated_at"#,
            &self.workflow_ids,
            &self.workspace_ids,
            &self.versions,
            &self.definitions as &[Option<String>],
            &self.refs as &[Option<String>],
            &self.shas,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Columns of the patch log rows of one batch, inserted with one statement.
#[derive(Default)]
struct PatchRows {
    workflow_ids: Vec<String>,
    patch_ids: Vec<Uuid>,
    workspace_ids: Vec<String>,
    authors: Vec<String>,
    base_versions: Vec<Option<i64>>,
    head_versions: Vec<i64>,
    statuses: Vec<String>,
    versions: Vec<Option<i64>>,
    shas: Vec<Option<String>>,
    /// JSON text of the operations (None when they are in the CAS).
    operations: Vec<Option<String>>,
    operation_refs: Vec<Option<String>>,
    reason_codes: Vec<Option<String>>,
    reasons: Vec<Option<String>>,
    topics: Vec<String>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    submitted: Vec<chrono::DateTime<chrono::Utc>>,
}

impl PatchRows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        r: &Record<PatchSubmitted>,
        operations: Option<String>,
        status: &str,
        version: Option<i64>,
        sha: Option<String>,
        reason: Option<(&str, String)>,
        head_version: i64,
        submitted_at: chrono::DateTime<chrono::Utc>,
    ) {
        let e = &r.event;
        self.workflow_ids.push(e.workflow_id.clone());
        self.patch_ids.push(e.patch_id);
        self.workspace_ids.push(e.workspace_id.clone());
        self.authors.push(e.author.clone());
        self.base_versions.push(e.base_version);
        self.head_versions.push(head_version);
        self.statuses.push(status.to_string());
        self.versions.push(version);
        self.shas.push(sha);
        self.operations.push(operations);
        // A ref rejected `blob_missing` (not this workspace's, unparsable, or lost) is not
        // logged: it would pin another workspace's blob against the collector, and an
        // unbounded one could overflow the index on the column. The reason names it.
        let missing = matches!(reason, Some(("blob_missing", _)));
        self.operation_refs.push(
            e.operations_ref
                .clone()
                .map(WireRef::into_string)
                .filter(|_| !missing),
        );
        let (code, text) = match reason {
            Some((c, t)) => (Some(c.to_string()), Some(t)),
            None => (None, None),
        };
        self.reason_codes.push(code);
        self.reasons.push(text);
        self.topics.push(r.coords.topic.clone());
        self.partitions.push(r.coords.partition);
        self.offsets.push(r.coords.offset);
        self.submitted.push(submitted_at);
    }

    /// Rows queued.
    fn len(&self) -> usize {
        self.workflow_ids.len()
    }

    /// Inserts the rows and upserts `heads` with one statement (one round trip; the heads in
    /// a data-modifying `WITH`). For small batches: past a few dozen rows COPY parses cheaper.
    async fn insert_with_heads(
        &self,
        conn: &mut PgConnection,
        heads: &HeadRows,
    ) -> Result<(), sqlx::Error> {
        if self.workflow_ids.is_empty() {
            return heads.upsert(conn).await;
        }
        sqlx::query!(
            r#"WITH heads AS (
                 INSERT INTO weir_workflow_heads
                   (workflow_id, workspace_id, version, definition, definition_ref, definition_sha256, updated_at)
                 SELECT workflow_id, workspace_id, version, definition::jsonb, definition_ref, definition_sha256, now()
                 FROM UNNEST($18::text[], $19::text[], $20::bigint[], $21::text[], $22::text[], $23::text[])
                      AS t(workflow_id, workspace_id, version, definition, definition_ref, definition_sha256)
                 ON CONFLICT (workspace_id, workflow_id) DO UPDATE SET
                   version = EXCLUDED.version,
                   definition = EXCLUDED.definition,
                   definition_ref = EXCLUDED.definition_ref,
                   definition_sha256 = EXCLUDED.definition_sha256,
                   updated_at = EXCLUDED.updated_at)
               INSERT INTO weir_workflow_patches (workflow_id, patch_id, workspace_id, author,
                 base_version, head_version, status, version, definition_sha256, operations,
                 operations_ref, reason_code, reason, source_topic, source_partition,
                 source_offset, submitted_at)
               SELECT workflow_id, patch_id, workspace_id, author, base_version, head_version,
                 status, version, definition_sha256, operations::jsonb, operations_ref,
                 reason_code, reason, source_topic, source_partition, source_offset,
                 submitted_at
               FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                 $6::bigint[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[],
                 $12::text[], $13::text[], $14::text[], $15::int[], $16::bigint[],
                 $17::timestamptz[])
                 AS t(workflow_id, patch_id, workspace_id, author, base_version, head_version,
                 status, version, definition_sha256, operations, operations_ref, reason_code,
                 reason, source_topic, source_partition, source_offset, submitted_at)"#,
            &self.workflow_ids,
            &self.patch_ids,
            &self.workspace_ids,
            &self.authors,
            &self.base_versions as &[Option<i64>],
            &self.head_versions,
            &self.statuses,
            &self.versions as &[Option<i64>],
            &self.shas as &[Option<String>],
            &self.operations as &[Option<String>],
            &self.operation_refs as &[Option<String>],
            &self.reason_codes as &[Option<String>],
            &self.reasons as &[Option<String>],
            &self.topics,
            &self.partitions,
            &self.offsets,
            &self.submitted,
            &heads.workflow_ids,
            &heads.workspace_ids,
            &heads.versions,
            &heads.definitions as &[Option<String>],
            &heads.refs as &[Option<String>],
            &heads.shas,
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Inserts the rows with one binary COPY.
    async fn insert(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.workflow_ids.is_empty() {
            return Ok(());
        }
        let mut copy = CopyRows::new(17);
        for i in 0..self.workflow_ids.len() {
            copy.row()
                .text(&self.workflow_ids[i])
                .uuid(&self.patch_ids[i])
                .text(&self.workspace_ids[i])
                .text(&self.authors[i])
                .opt_int8(self.base_versions[i])
                .int8(self.head_versions[i])
                .text(&self.statuses[i])
                .opt_int8(self.versions[i])
                .opt_text(self.shas[i].as_deref())
                .opt_jsonb(self.operations[i].as_deref())
                .opt_text(self.operation_refs[i].as_deref())
                .opt_text(self.reason_codes[i].as_deref())
                .opt_text(self.reasons[i].as_deref())
                .text(&self.topics[i])
                .int4(self.partitions[i])
                .int8(self.offsets[i])
                .timestamptz(self.submitted[i]);
        }
        copy.copy_in(
            conn,
            "COPY weir_workflow_patches (workflow_id, patch_id, workspace_id, author, base_version, \
             head_version, status, version, definition_sha256, operations, operations_ref, \
             reason_code, reason, source_topic, source_partition, source_offset, submitted_at) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
        Ok(())
    }
}
