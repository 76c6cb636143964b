//! Semantic lookups: per request, the nearest unexpired entry of its workspace, node type and
//! config that its level may see, in one statement for a whole batch, which also bumps the
//! hit counts and writes the hits' audit rows.
//!
//! Invariants: a similarity that is not a number is never a hit (the statement says
//! `similarity <> 'NaN'` and the Rust side checks `is_finite`); the statement is built once
//! for the deployment's dimension D and orders by the same expression as the HNSW index
//! (`embedding::vector(D)`), so the planner can use it. Vectors are bound in pgvector's
//! binary form, an array of `vector` (`pgvector::Vector`), never as text to be parsed.

use std::sync::Arc;

use sqlx::{FromRow as _, PgConnection};
use uuid::Uuid;
use weir_model::Permission;

use super::blobs::Found;
use super::{threshold, Cache, LookupRequest, UnitVector};
use crate::error::CacheError;
use crate::key::json_hash;

/// One row of the semantic lookup statement.
#[derive(sqlx::FromRow)]
struct SemanticRow {
    ord: i32,
    #[sqlx(rename = "entry_key")]
    key: Vec<u8>,
    result_ref: String,
    cost_ms: i64,
    similarity: f64,
    hit: bool,
    audit_id: Uuid,
}

impl Cache {
    /// Iterative index scans keep filtered lookups from coming back empty: the scan goes on
    /// past ef_search candidates until one passes the workspace/permission/expiry filter.
    /// set_config(.., true) is SET LOCAL: it ends with the caller's transaction.
    async fn tune(&self, conn: &mut PgConnection) -> Result<(), CacheError> {
        let ef_search = self.cfg.hnsw_ef_search.clamp(1, 1000).to_string();
        sqlx::query!(
            r#"SELECT set_config('hnsw.iterative_scan', 'strict_order', true) AS "a!",
                      set_config('hnsw.ef_search', $1, true) AS "b!""#,
            ef_search
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(())
    }

    /// EXPLAIN ANALYZE of the semantic statement for one vector, on a lookup session (for
    /// `weir bench cache`; it runs the statement, so a hit writes its audit row).
    pub async fn explain_semantic(
        &self,
        workspace: &str,
        node_type: &str,
        v: &UnitVector,
    ) -> Result<String, CacheError> {
        let mut conn = self.lookup_pool.acquire().await?;
        let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", self.semantic_sql);
        let rows: Vec<sqlx::postgres::PgRow> = sqlx::query(&sql)
            .bind(vec![0i32])
            .bind(vec![workspace.to_string()])
            .bind(vec![node_type.to_string()])
            .bind(vec![Permission::Admin.level()])
            .bind(vec!["explain".to_string()])
            .bind(vec!["explain".to_string()])
            .bind(vec![Uuid::now_v7()])
            .bind(vec![2.0f64])
            .bind(vec![v.to_pg()])
            .bind(vec![json_hash(&serde_json::json!({})).to_vec()])
            .fetch_all(&mut *conn)
            .await?;
        let mut lines = Vec::with_capacity(rows.len());
        for r in &rows {
            lines.push(sqlx::Row::try_get::<String, _>(r, 0)?);
        }
        Ok(lines.join("\n"))
    }

    /// The best semantic match of each request in `sem` (index into `reqs`, unit vector), in
    /// one statement; those at or above their threshold are hits (hit count bumped, audit row
    /// written by the same statement). Returns the hits and every request's best similarity.
    pub(super) async fn semantic_probe(
        &self,
        conn: &mut PgConnection,
        reqs: &[LookupRequest],
        sem: &[(usize, UnitVector)],
        tuned: bool,
    ) -> Result<(Vec<Found>, Vec<(usize, f64)>), CacheError> {
        if sem.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if !tuned {
            self.tune(conn).await?;
        }
        let n = sem.len();
        let (
            mut ords,
            mut wss,
            mut types,
            mut perms,
            mut requesters,
            mut request_ids,
            mut audits,
            mut thresholds,
            mut embs,
            mut configs,
        ) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (i, v) in sem {
            let r = &reqs[*i];
            ords.push(*i as i32);
            wss.push(r.workspace_id.clone());
            types.push(r.node_type.clone());
            perms.push(r.permission.level());
            requesters.push(r.requester.clone());
            request_ids.push(r.request_id.clone());
            audits.push(Uuid::now_v7());
            thresholds.push(threshold(&self.cfg, &r.workspace_id, &r.node_type));
            embs.push(v.to_pg());
            configs.push(json_hash(&r.config).to_vec());
        }
        // The dimension is part of the statement text (the index is an expression index on
        // embedding::vector(D)), so this one statement is built at start, not checked by sqlx.
        let sql: Arc<str> = self.semantic_sql.clone();
        let query = sqlx::query(&sql)
            .bind(ords)
            .bind(wss)
            .bind(types)
            .bind(perms)
            .bind(requesters)
            .bind(request_ids)
            .bind(audits)
            .bind(thresholds)
            .bind(embs)
            .bind(configs);
        let rows: Vec<sqlx::postgres::PgRow> = query.fetch_all(&mut *conn).await?;
        let rows = rows
            .iter()
            .map(SemanticRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut found = Vec::new();
        let mut best = Vec::new();
        for SemanticRow {
            ord,
            key,
            result_ref,
            cost_ms,
            similarity,
            hit,
            audit_id,
        } in rows
        {
            best.push((ord as usize, similarity));
            // The statement already refuses NaN; a hit must be a number in any case.
            if hit && similarity.is_finite() {
                found.push(Found {
                    ord: ord as usize,
                    entry_key: key,
                    result_ref,
                    cost_ms,
                    audit_id,
                    similarity: Some(similarity),
                });
            }
        }
        Ok((found, best))
    }
}

/// The semantic lookup statement for dimension `d`: per request, the nearest unexpired entry
/// of its workspace, node type and config that its level may see, with hit = similarity >=
/// threshold (and not NaN: Postgres sorts NaN above every number, so `NaN >= 0.92` is true);
/// hits bump hit_count and get their audit row in the same statement.
pub(super) fn semantic_statement(d: u32) -> String {
    format!(
        r#"WITH req AS (
               -- vector({d}): a vector of another length fails here, not in the index scan.
               SELECT ord, workspace_id, node_type, perm, requester, request_id, audit_id, threshold,
                      emb::vector({d}) AS emb, config_hash
               FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[], $7::uuid[], $8::float8[], $9::vector[], $10::bytea[])
                   AS r(ord, workspace_id, node_type, perm, requester, request_id, audit_id, threshold, emb, config_hash)
           ), best AS (
               SELECT r.ord, r.workspace_id, r.node_type, r.perm, r.requester, r.request_id, r.audit_id, r.threshold,
                      s.entry_key, s.owner, s.result_ref, s.cost_ms, (1 - s.dist)::float8 AS similarity
               FROM req r CROSS JOIN LATERAL (
                   SELECT c.entry_key, c.owner, c.result_ref, c.cost_ms,
                          c.embedding::vector({d}) <=> r.emb AS dist
                   FROM cache_semantic c
                   WHERE c.dims = {d}
                     AND c.workspace_id = r.workspace_id
                     AND c.node_type = r.node_type
                     AND c.config_hash = r.config_hash
                     AND c.required_permission <= r.perm
                     AND c.expires_at > now()
                   ORDER BY c.embedding::vector({d}) <=> r.emb
                   LIMIT 1
               ) s
           ), hit AS (
               SELECT * FROM best WHERE similarity >= threshold AND similarity <> 'NaN'::float8
           ), bump AS (
               UPDATE cache_semantic c SET hit_count = c.hit_count + h.n, last_hit_at = now()
               FROM (SELECT entry_key, count(*) AS n FROM hit GROUP BY entry_key) h
               WHERE c.entry_key = h.entry_key
           ), audit AS (
               INSERT INTO cache_audit (id, workspace_id, node_type, kind, entry_key, owner, requester,
                                        requester_permission, request_id, similarity, saved_ms)
               SELECT audit_id, workspace_id, node_type, 'semantic', entry_key, owner, requester, perm,
                      request_id, similarity, cost_ms
               FROM hit
           )
           SELECT ord, entry_key, result_ref, cost_ms, similarity,
                  similarity >= threshold AND similarity <> 'NaN'::float8 AS hit, audit_id
           FROM best"#
    )
}
