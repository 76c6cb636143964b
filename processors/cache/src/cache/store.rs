//! Writes: [`Cache::store`] and [`Cache::store_in`] (a batch, inside the caller's
//! transaction).
//!
//! Invariants: everything that can reject or refuse a request (permission, prompt, node type,
//! blob, size, PII, the vector) is decided before anything is written; the blobs of inline
//! results are recorded in `cache_blobs` and `weir_cas_owners` before they are put, so the
//! GC's grace period covers them until commit; exact entries, semantic entries and audit rows
//! are each one set-based statement, the last store of a key in a batch winning; every
//! stored or refused request has one audit row in the same transaction.

use std::time::Duration;

use bytes::Bytes;
use sqlx::PgConnection;
use uuid::Uuid;
use weir_model::CasRef;

use super::blobs::{put_blobs, read_blobs};
use super::{
    check_prompt, embedding_items, exact_ttl, is_cacheable, is_semantic, node_label, semantic_ttl,
    Cache, Refusal, StoreOutcome, StoreRequest, StoreResult, UnitVector,
};
use crate::error::CacheError;
use crate::key::{entry_key, json_hash, semantic_key};
use crate::metrics as m;
use crate::pii;

impl Cache {
    /// One synchronous store: its own transaction.
    /// A rejected request is [`StoreOutcome::Rejected`]; nothing of it is written.
    pub async fn store(&self, req: &StoreRequest) -> Result<StoreOutcome, CacheError> {
        let mut tx = self.pool.begin().await?;
        let mut out = self.store_in(&mut tx, std::slice::from_ref(req)).await?;
        tx.commit().await?;
        out.pop().ok_or(CacheError::Internal(
            "a store of one request returned no outcome",
        ))
    }

    /// Stores `reqs` on `conn` (inside the caller's transaction). In order: rejections (a
    /// required permission above the producer's, a bad prompt), refusals (node type, blob,
    /// size, PII), the vectors of semantic entries (a prompt or vector that gives none
    /// rejects its request) — all before anything is written — then the blobs, all exact
    /// entries in one statement, all semantic entries in one statement, and one audit row
    /// per stored or refused request in one statement.
    pub async fn store_in(
        &self,
        conn: &mut PgConnection,
        reqs: &[StoreRequest],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        let mut outcomes: Vec<Option<StoreOutcome>> = vec![None; reqs.len()];
        for (i, r) in reqs.iter().enumerate() {
            if r.required_permission > r.permission {
                outcomes[i] = Some(StoreOutcome::Rejected(format!(
                    "a {} producer cannot store an entry requiring {}",
                    r.permission.as_str(),
                    r.required_permission.as_str()
                )));
            } else if let Err(e) = check_prompt(&self.cfg, r.prompt.as_deref()) {
                outcomes[i] = Some(StoreOutcome::Rejected(e.to_string()));
            }
        }
        // Result bytes: inline JSON as given, referenced blobs read (and verified) for the guard.
        // A ref is read only if the store's workspace owns the blob (weir_cas_owners): another
        // tenant's ref is refused as a bad blob, unread, whether or not that blob exists.
        let asked: Vec<(String, String)> = reqs
            .iter()
            .filter_map(|r| match &r.result {
                StoreResult::Ref(rf) => Some((r.workspace_id.clone(), rf.to_string())),
                StoreResult::Json(_) => None,
            })
            .collect();
        let owned_refs = weir_runtime::cas::owners::owned(&mut *conn, &asked).await?;
        let given: Vec<Option<CasRef>> = reqs
            .iter()
            .zip(&outcomes)
            .map(|(r, o)| match (&r.result, o) {
                (StoreResult::Ref(rf), None)
                    if is_cacheable(&self.cfg, &r.node_type)
                        && owned_refs.contains(&(r.workspace_id.clone(), rf.to_string())) =>
                {
                    Some(*rf)
                }
                _ => None,
            })
            .collect();
        let blobs = read_blobs(&self.cas, given).await;
        let mut contents: Vec<Option<Bytes>> = vec![None; reqs.len()];
        for (i, (r, b)) in reqs.iter().zip(blobs).enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let content = match &r.result {
                StoreResult::Json(text) => Some(Bytes::from(text.clone())),
                StoreResult::Ref(_) => b?,
            };
            let refusal = if !is_cacheable(&self.cfg, &r.node_type) {
                Some(Refusal::NotCacheable)
            } else {
                match content {
                    None => Some(Refusal::BadBlob),
                    Some(b) if b.len() > self.cfg.max_result_bytes => Some(Refusal::TooLarge),
                    // Bounded by max_result_bytes just above: the scan is linear in it.
                    Some(b) => match scan_off_runtime(b.clone()).await {
                        Some(kind) => Some(Refusal::Pii(kind)),
                        None => {
                            contents[i] = Some(b);
                            None
                        }
                    },
                }
            };
            if let Some(refusal) = refusal {
                let nt = node_label(&self.cfg, &r.node_type);
                match refusal {
                    Refusal::Pii(kind) => metrics::counter!(m::PII_REFUSED, "node_type" => nt, "pattern" => kind.as_str()).increment(1),
                    other => metrics::counter!(m::REFUSED, "reason" => other.as_str()).increment(1),
                }
                outcomes[i] = Some(StoreOutcome::Refused(refusal));
            }
        }
        // Vectors of the semantic entries, before anything is written.
        let wanted: Vec<bool> = reqs
            .iter()
            .zip(&outcomes)
            .map(|(r, o)| {
                o.is_none()
                    && is_semantic(&self.cfg, &r.node_type)
                    && (r.prompt.is_some() || r.embedding.is_some())
            })
            .collect();
        let items = embedding_items(reqs.iter().map(|r| (&r.prompt, &r.embedding)), &wanted);
        let mut vectors: Vec<Option<UnitVector>> = vec![None; reqs.len()];
        for (i, v) in self.embeddings(items).await?.into_iter().enumerate() {
            match v {
                Some(Ok(v)) => vectors[i] = Some(v),
                Some(Err(reason)) => {
                    contents[i] = None;
                    outcomes[i] = Some(StoreOutcome::Rejected(reason));
                }
                None => {}
            }
        }
        // What is left is stored: the blobs of inline results first.
        let mut refs: Vec<Option<CasRef>> = vec![None; reqs.len()];
        let mut owned_puts = Vec::new();
        // (workspace, ref) of each blob put, for weir_cas_owners.
        let mut put_owners: Vec<(String, CasRef)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let Some(b) = contents[i].take() else {
                continue;
            };
            match &r.result {
                StoreResult::Json(_) => {
                    let rf = CasRef::of(&b);
                    refs[i] = Some(rf);
                    put_owners.push((r.workspace_id.clone(), rf));
                    owned_puts.push(b);
                }
                StoreResult::Ref(rf) => refs[i] = Some(*rf),
            }
        }
        // Touch before put: the GC's grace period then covers the window until commit.
        if !owned_puts.is_empty() {
            let owned: Vec<String> = owned_puts
                .iter()
                .map(|b| CasRef::of(b).to_string())
                .collect();
            sqlx::query!(
                r#"INSERT INTO cache_blobs (result_ref)
                   SELECT DISTINCT r FROM UNNEST($1::text[]) AS t(r) ORDER BY r
                   ON CONFLICT (result_ref) DO UPDATE SET last_referenced_at = now()"#,
                &owned
            )
            .execute(&mut *conn)
            .await?;
            // Owned by the storing workspaces, unpinned: the collector may delete the blob
            // once nothing references it (maintenance::gc_once).
            weir_runtime::cas::owners::record(&mut *conn, &put_owners, false).await?;
            for res in put_blobs(&self.cas, owned_puts).await {
                res?;
            }
        }

        let mut exact = EntryRows::default();
        let mut sem = EntryRows::default();
        let mut s_embs = Vec::new();
        let mut s_configs = Vec::new();
        let mut audit = AuditRows::default();
        for (i, r) in reqs.iter().enumerate() {
            let config_hash = json_hash(&r.config);
            let key = entry_key(
                &r.workspace_id,
                r.required_permission,
                &r.node_type,
                &config_hash,
                &json_hash(&r.inputs),
                r.prompt.as_deref(),
            );
            let Some(rf) = refs[i] else {
                if let Some(StoreOutcome::Refused(refusal)) = &outcomes[i] {
                    audit.push(r, &key, "refused", Some(refusal.as_str().to_string()));
                }
                continue;
            };
            exact.push(r, key.to_vec(), rf, exact_ttl(&self.cfg, &r.node_type));
            let mut semantic = false;
            if let Some(v) = &vectors[i] {
                sem.push(
                    r,
                    semantic_entry_key(r, &config_hash).to_vec(),
                    rf,
                    semantic_ttl(&self.cfg, &r.node_type),
                );
                s_embs.push(v.to_pg());
                s_configs.push(config_hash.to_vec());
                semantic = true;
            }
            audit.push(r, &key, "store", semantic.then(|| "semantic".to_string()));
            outcomes[i] = Some(StoreOutcome::Stored {
                entry_key: hex::encode(key),
                semantic,
            });
        }
        if !exact.keys.is_empty() {
            // A later store of the same key replaces the entry (and its expiry); the last row
            // of a batch wins, hence DISTINCT ON over the reversed order.
            sqlx::query!(
                r#"INSERT INTO cache_entries (entry_key, workspace_id, node_type, required_permission, owner,
                                              result_ref, cost_ms, expires_at)
                   SELECT DISTINCT ON (k) k, ws, nt, lvl, own, rf, cost, now() + ttl * interval '1 second'
                   FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[], $7::int8[], $8::float8[])
                        WITH ORDINALITY AS t(k, ws, nt, lvl, own, rf, cost, ttl, ord)
                   ORDER BY k, ord DESC
                   ON CONFLICT (entry_key) DO UPDATE SET
                       owner = EXCLUDED.owner, result_ref = EXCLUDED.result_ref, cost_ms = EXCLUDED.cost_ms,
                       created_at = now(), expires_at = EXCLUDED.expires_at"#,
                &exact.keys,
                &exact.wss,
                &exact.types,
                &exact.levels,
                &exact.owners,
                &exact.refs,
                &exact.costs,
                &exact.ttls,
            )
            .execute(&mut *conn)
            .await?;
            for t in &exact.types {
                metrics::counter!(m::STORED, "node_type" => node_label(&self.cfg, t), "kind" => "exact")
                    .increment(1);
            }
        }
        if !sem.keys.is_empty() {
            sqlx::query!(
                r#"INSERT INTO cache_semantic (entry_key, workspace_id, node_type, required_permission, owner,
                                               result_ref, cost_ms, expires_at, dims, embedding, config_hash)
                   SELECT DISTINCT ON (k) k, ws, nt, lvl, own, rf, cost, now() + ttl * interval '1 second',
                          vector_dims(emb), emb, cfg
                   FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[], $7::int8[], $8::float8[], $9::vector[], $10::bytea[])
                        WITH ORDINALITY AS t(k, ws, nt, lvl, own, rf, cost, ttl, emb, cfg, ord)
                   ORDER BY k, ord DESC
                   ON CONFLICT (entry_key) DO UPDATE SET
                       owner = EXCLUDED.owner, result_ref = EXCLUDED.result_ref, cost_ms = EXCLUDED.cost_ms,
                       created_at = now(), expires_at = EXCLUDED.expires_at, dims = EXCLUDED.dims,
                       embedding = EXCLUDED.embedding, config_hash = EXCLUDED.config_hash"#,
                &sem.keys,
                &sem.wss,
                &sem.types,
                &sem.levels,
                &sem.owners,
                &sem.refs,
                &sem.costs,
                &sem.ttls,
                &s_embs as &[pgvector::Vector],
                &s_configs,
            )
            .execute(&mut *conn)
            .await?;
            for t in &sem.types {
                metrics::counter!(m::STORED, "node_type" => node_label(&self.cfg, t), "kind" => "semantic")
                    .increment(1);
            }
        }
        if !audit.ids.is_empty() {
            // Same transaction as the entries: a store is audited exactly when it happened.
            sqlx::query!(
                r#"INSERT INTO cache_audit (id, workspace_id, node_type, kind, entry_key, owner, requester,
                                            requester_permission, request_id, similarity, saved_ms, detail)
                   SELECT id, ws, nt, kind, k, who, who, perm, rid, NULL, cost, detail
                   FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
                               $7::int2[], $8::text[], $9::int8[], $10::text[])
                        AS t(id, ws, nt, kind, k, who, perm, rid, cost, detail)"#,
                &audit.ids,
                &audit.wss,
                &audit.types,
                &audit.kinds,
                &audit.keys,
                &audit.requesters,
                &audit.perms,
                &audit.request_ids,
                &audit.costs,
                &audit.details as &[Option<String>],
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(StoreOutcome::Refused(Refusal::NotCacheable)))
            .collect())
    }
}

/// Results up to this size are scanned for PII on the calling task; larger ones (up to
/// `cache.max_result_bytes`) on tokio's blocking pool, so a megabyte-sized regex scan never
/// holds an async worker.
pub(super) const INLINE_SCAN_BYTES: usize = 64 * 1024;

/// [`pii::scan_result`], off the async workers for large results. A scan that panics counts
/// as a match: the guard errs on the side of not caching.
pub(super) async fn scan_off_runtime(b: Bytes) -> Option<pii::PiiKind> {
    if b.len() <= INLINE_SCAN_BYTES {
        return pii::scan_result(&b);
    }
    tokio::task::spawn_blocking(move || pii::scan_result(&b))
        .await
        .unwrap_or(Some(pii::PiiKind::Secret))
}

/// Columns of the exact or semantic entries of one store statement.
#[derive(Default)]
struct EntryRows {
    keys: Vec<Vec<u8>>,
    wss: Vec<String>,
    types: Vec<String>,
    levels: Vec<i16>,
    owners: Vec<String>,
    refs: Vec<String>,
    costs: Vec<i64>,
    ttls: Vec<f64>,
}

impl EntryRows {
    fn push(&mut self, r: &StoreRequest, key: Vec<u8>, rf: CasRef, ttl: Duration) {
        self.keys.push(key);
        self.wss.push(r.workspace_id.clone());
        self.types.push(r.node_type.clone());
        self.levels.push(r.required_permission.level());
        self.owners.push(r.requester.clone());
        self.refs.push(rf.to_string());
        self.costs.push(r.cost_ms.max(0));
        self.ttls.push(ttl.as_secs_f64());
    }
}

/// Columns of the audit rows of one store statement.
#[derive(Default)]
struct AuditRows {
    ids: Vec<Uuid>,
    wss: Vec<String>,
    types: Vec<String>,
    kinds: Vec<String>,
    keys: Vec<Vec<u8>>,
    requesters: Vec<String>,
    perms: Vec<i16>,
    request_ids: Vec<String>,
    costs: Vec<i64>,
    details: Vec<Option<String>>,
}

impl AuditRows {
    fn push(&mut self, r: &StoreRequest, key: &[u8; 32], kind: &str, detail: Option<String>) {
        self.ids.push(Uuid::now_v7());
        self.wss.push(r.workspace_id.clone());
        self.types.push(r.node_type.clone());
        self.kinds.push(kind.to_string());
        self.keys.push(key.to_vec());
        self.requesters.push(r.requester.clone());
        self.perms.push(r.permission.level());
        self.request_ids.push(r.request_id.clone());
        self.costs.push(r.cost_ms.max(0));
        self.details.push(detail);
    }
}

/// The key of a semantic entry.
fn semantic_entry_key(r: &StoreRequest, config_hash: &[u8; 32]) -> [u8; 32] {
    // Keyed by the prompt; a producer that sent only a vector is keyed by the exact key's
    // inputs instead (same inputs, same entry). Tagged, so a prompt that spells some inputs'
    // JSON is not the same entry.
    let basis = match &r.prompt {
        Some(p) => format!("prompt:{p}"),
        None => format!(
            "inputs:{}",
            crate::key::canonical_json_normalized_numbers(&r.inputs)
        ),
    };
    semantic_key(
        &r.workspace_id,
        r.required_permission,
        &r.node_type,
        config_hash,
        &basis,
    )
}
