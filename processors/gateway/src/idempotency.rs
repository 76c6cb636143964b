//! Idempotency-Key records: the same key with the same body is a retry (the same derived
//! ids, so the same answer, and the consumers deduplicate the event); the same key with
//! another body is a client mistake, answered 422 instead of silently answering for the
//! first body.
//!
//! A record is (workspace, scope, key) → sha256 of the body, in
//! `weir_gateway_idempotency`, kept `gateway.idempotency_ttl_secs`. A key is claimed only
//! once the request is valid and released if its event could not be produced, so a rejected
//! or failed first attempt never blocks a corrected retry. Only requests that carry a key
//! pay the one Postgres round trip.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What claiming a key found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use (or the previous record expired): the record is this request's.
    New,
    /// A retry with the same body.
    Retry,
    /// The key was used with another body.
    Conflict,
}

/// The sha256 of a request body.
pub fn body_hash(body: &[u8]) -> Vec<u8> {
    Sha256::digest(body).to_vec()
}

/// Claims `key` in `scope` of `workspace_id` for a body hashing to `hash`.
pub async fn claim(
    pool: &PgPool,
    workspace_id: &str,
    scope: &str,
    key: &str,
    hash: &[u8],
    ttl: Duration,
) -> Result<Claim, sqlx::Error> {
    let ttl_secs = ttl.as_secs_f64();
    // Insert, or take over an expired record; a live record is left alone and read back.
    let took = sqlx::query_scalar!(
        r#"INSERT INTO weir_gateway_idempotency (workspace_id, scope, idem_key, body_sha256)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (workspace_id, scope, idem_key) DO UPDATE
               SET body_sha256 = EXCLUDED.body_sha256, created_at = now()
               WHERE weir_gateway_idempotency.created_at < now() - make_interval(secs => $5)
           RETURNING 1 AS "one!""#,
        workspace_id,
        scope,
        key,
        hash,
        ttl_secs,
    )
    .fetch_optional(pool)
    .await?;
    if took.is_some() {
        return Ok(Claim::New);
    }
    let stored = sqlx::query_scalar!(
        "SELECT body_sha256 FROM weir_gateway_idempotency
         WHERE workspace_id = $1 AND scope = $2 AND idem_key = $3",
        workspace_id,
        scope,
        key,
    )
    .fetch_optional(pool)
    .await?;
    Ok(match stored {
        Some(h) if h == hash => Claim::Retry,
        Some(_) => Claim::Conflict,
        // Deleted in between (released by a failed first attempt): a retry may claim it.
        None => Claim::Retry,
    })
}

/// Releases a record this request claimed (its event was not produced).
pub async fn release(
    pool: &PgPool,
    workspace_id: &str,
    scope: &str,
    key: &str,
    hash: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM weir_gateway_idempotency
         WHERE workspace_id = $1 AND scope = $2 AND idem_key = $3 AND body_sha256 = $4",
        workspace_id,
        scope,
        key,
        hash,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes up to `batch` expired records; returns how many.
pub async fn sweep(pool: &PgPool, ttl: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query!(
        "DELETE FROM weir_gateway_idempotency WHERE ctid IN (
             SELECT ctid FROM weir_gateway_idempotency
             WHERE created_at < now() - make_interval(secs => $1)
             LIMIT $2)",
        ttl.as_secs_f64(),
        batch,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
