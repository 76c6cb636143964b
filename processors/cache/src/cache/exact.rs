//! Exact-key lookups: the cache's own (inside [`Cache::lookup`](super::Cache::lookup)) and
//! [`exact_lookup_batch`], the coordinator's call inside its batch transaction.
//!
//! Invariants: a requester of level L probes the keys of every level at or below L in one
//! read-only statement that still matches the workspace, `required_permission <= L` and
//! `expires_at > now()`; the hit counts and the audit rows of the hits are written by one
//! more statement, while the blobs are read, and a bad blob takes its audit row back.

use bytes::Bytes;
use sqlx::PgConnection;
use uuid::Uuid;
use weir_model::{CasRef, Permission};
use weir_runtime::cas::Cas;

use super::blobs::{parse_ref, read_blobs, settle, Found};
use super::count_hit;
use super::types::{ExactHit, ExactRequest, LookupRequest, INLINE_RESULT_BYTES};
use crate::error::CacheError;
use crate::key::{entry_key, json_hash};
use crate::metrics as m;

/// Finds exact entries for `reqs` in one statement; then verifies the blobs while one more
/// statement bumps hit counts and writes the audit rows. Entries whose blob is bad are deleted (with their
/// audit rows) and answered as misses. Runs on the caller's connection, so inside the
/// caller's transaction if there is one.
pub async fn exact_lookup_batch(
    conn: &mut PgConnection,
    cas: &Cas,
    reqs: &[ExactRequest],
) -> Result<Vec<Option<ExactHit>>, CacheError> {
    let probes: Vec<ExactProbe> = reqs.iter().map(ExactProbe::from).collect();
    let verified = exact_find_verify(conn, cas, &probes).await?;
    let mut out = vec![None; reqs.len()];
    for (f, bytes) in verified {
        let r = &reqs[f.ord];
        count_hit(m::node_type_label(&r.node_type), "exact", f.cost_ms, None);
        let result_json = if bytes.len() <= INLINE_RESULT_BYTES {
            serde_json::from_slice(&bytes).ok()
        } else {
            None
        };
        out[f.ord] = Some(ExactHit {
            result_json,
            result_ref: parse_ref(&f.result_ref)?,
            saved_ms: f.cost_ms,
            entry_key: hex::encode(&f.entry_key),
        });
    }
    for (r, o) in reqs.iter().zip(&out) {
        if o.is_none() {
            metrics::counter!(m::LOOKUPS, "node_type" => m::node_type_label(&r.node_type), "outcome" => "miss").increment(1);
        }
    }
    Ok(out)
}

/// One exact question: the key's parts (hashed once) and who asks, for the audit row.
pub(super) struct ExactProbe {
    workspace_id: String,
    permission: Permission,
    node_type: String,
    config_hash: [u8; 32],
    inputs_hash: [u8; 32],
    prompt: Option<String>,
    requester: String,
    request_id: String,
}

/// The probe of a request of either kind: both name the key's parts and the audit's who
/// alike.
macro_rules! probe_of {
    ($r:expr) => {{
        let r = $r;
        ExactProbe {
            workspace_id: r.workspace_id.clone(),
            permission: r.permission,
            node_type: r.node_type.clone(),
            config_hash: json_hash(&r.config),
            inputs_hash: json_hash(&r.inputs),
            prompt: r.prompt.clone(),
            requester: r.requester.clone(),
            request_id: r.request_id.clone(),
        }
    }};
}

impl From<&ExactRequest> for ExactProbe {
    fn from(r: &ExactRequest) -> Self {
        probe_of!(r)
    }
}

impl From<&LookupRequest> for ExactProbe {
    fn from(r: &LookupRequest) -> Self {
        probe_of!(r)
    }
}

/// One exact candidate with what its audit row needs.
struct ExactFound {
    found: Found,
    workspace_id: String,
    node_type: String,
    owner: String,
    requester: String,
    request_id: String,
    perm: i16,
}

/// The exact path: one read-only statement finds the candidates, then the blob reads and the
/// hit bookkeeping (hit counts, audit rows: one statement) run at the same time, so a hit
/// costs one statement plus the slower of a CAS read and a write, not their sum. Entries
/// whose blob is bad are deleted with their audit rows afterwards, as in [`verify`].
pub(super) async fn exact_find_verify(
    conn: &mut PgConnection,
    cas: &Cas,
    probes: &[ExactProbe],
) -> Result<Vec<(Found, Bytes)>, CacheError> {
    let found = exact_probe(conn, probes).await?;
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let refs: Vec<Option<CasRef>> = found
        .iter()
        .map(|f| f.found.result_ref.parse().ok())
        .collect();
    let (recorded, reads) = tokio::join!(record_exact_hits(conn, &found), read_blobs(cas, refs));
    recorded?;
    settle(
        conn,
        found.into_iter().map(|f| f.found).collect(),
        reads,
        "exact",
    )
    .await
}

async fn exact_probe(
    conn: &mut PgConnection,
    probes: &[ExactProbe],
) -> Result<Vec<ExactFound>, CacheError> {
    if probes.is_empty() {
        return Ok(Vec::new());
    }
    // One row per (probe, level at or below the requester's): the key binds the level.
    let (mut keys, mut ords, mut wss, mut perms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, p) in probes.iter().enumerate() {
        for level in p.permission.and_below() {
            keys.push(
                entry_key(
                    &p.workspace_id,
                    level,
                    &p.node_type,
                    &p.config_hash,
                    &p.inputs_hash,
                    p.prompt.as_deref(),
                )
                .to_vec(),
            );
            ords.push(i as i32);
            wss.push(p.workspace_id.to_string());
            perms.push(p.permission.level());
        }
    }
    let rows = sqlx::query!(
        r#"SELECT DISTINCT ON (r.ord) r.ord AS "ord!", e.entry_key, e.workspace_id, e.node_type,
                  e.owner, e.result_ref, e.cost_ms
           FROM UNNEST($1::bytea[], $2::int4[], $3::text[], $4::int2[])
                    AS r(entry_key, ord, workspace_id, perm)
           JOIN cache_entries e ON e.entry_key = r.entry_key
           WHERE e.workspace_id = r.workspace_id
             AND e.required_permission <= r.perm
             AND e.expires_at > now()
           ORDER BY r.ord, e.required_permission DESC"#,
        &keys,
        &ords,
        &wss,
        &perms,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let p = &probes[r.ord as usize];
            ExactFound {
                found: Found {
                    ord: r.ord as usize,
                    entry_key: r.entry_key,
                    result_ref: r.result_ref,
                    cost_ms: r.cost_ms,
                    audit_id: Uuid::now_v7(),
                    similarity: None,
                },
                workspace_id: r.workspace_id,
                node_type: r.node_type,
                owner: r.owner,
                requester: p.requester.clone(),
                request_id: p.request_id.clone(),
                perm: p.permission.level(),
            }
        })
        .collect())
}

/// Hit counts and audit rows of exact hits, in one statement.
async fn record_exact_hits(
    conn: &mut PgConnection,
    found: &[ExactFound],
) -> Result<(), CacheError> {
    let col = |f: fn(&ExactFound) -> String| found.iter().map(f).collect::<Vec<String>>();
    let keys: Vec<Vec<u8>> = found.iter().map(|f| f.found.entry_key.clone()).collect();
    let ids: Vec<Uuid> = found.iter().map(|f| f.found.audit_id).collect();
    let perms: Vec<i16> = found.iter().map(|f| f.perm).collect();
    let costs: Vec<i64> = found.iter().map(|f| f.found.cost_ms).collect();
    sqlx::query!(
        r#"WITH h AS (
               SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                    $6::text[], $7::int2[], $8::text[], $9::int8[])
                   AS h(entry_key, audit_id, workspace_id, node_type, owner, requester, perm,
                        request_id, cost_ms)
           ), bump AS (
               UPDATE cache_entries e SET hit_count = e.hit_count + c.n, last_hit_at = now()
               FROM (SELECT entry_key, count(*) AS n FROM h GROUP BY entry_key) c
               WHERE e.entry_key = c.entry_key
           )
           INSERT INTO cache_audit (id, workspace_id, node_type, kind, entry_key, owner, requester,
                                    requester_permission, request_id, similarity, saved_ms)
           SELECT audit_id, workspace_id, node_type, 'exact', entry_key, owner, requester, perm,
                  request_id, NULL, cost_ms
           FROM h"#,
        &keys,
        &ids,
        &col(|f| f.workspace_id.clone()),
        &col(|f| f.node_type.clone()),
        &col(|f| f.owner.clone()),
        &col(|f| f.requester.clone()),
        &perms,
        &col(|f| f.request_id.clone()),
        &costs,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
