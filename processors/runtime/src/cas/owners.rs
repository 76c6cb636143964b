//! Blob ownership per workspace (`weir_cas_owners`): which workspace stored which blob.
//!
//! A CAS ref is a capability: whoever holds `sha256:…` of a blob could read it through weir
//! (a cache entry's result, a run's output). So weir accepts a ref from a caller only if the
//! caller's workspace stored that blob itself, and answers an unknown ref the same way whether
//! the blob exists for another workspace or not.
//!
//! Invariants:
//! - **Owner before put.** Every put made for a workspace records its owner row with
//!   [`record`] (or [`record_on_pool`]) *before* the put, so that a blob is never reachable
//!   through weir without an owner, and so that the garbage collector's locks order it.
//! - **Lock order.** [`record`] and [`claim`] lock `cache_blobs` rows (sorted) first and
//!   `weir_cas_owners` rows second, like the collector
//!   (`weir_cache::maintenance::gc_once`): a put or a claim racing a collection of the same
//!   blob waits for it, then puts the blob again or finds the ref unknown; never a deadlock,
//!   never a reference to a deleted blob.
//! - **Pinned is forever.** A blob stored by anything but the cache is `pinned` and never
//!   collected; the flag never goes back to false.

use std::collections::HashSet;

use sqlx::{PgConnection, PgPool};

use weir_model::CasRef;

/// Records that `workspace_id` stored each of `refs` (call it before the puts, in the
/// transaction that will reference them, or on its own). `pinned`: stored by something other
/// than the cache (see the module docs). Bumps `last_used_at` of existing rows.
pub async fn record(
    conn: &mut PgConnection,
    owners: &[(String, CasRef)],
    pinned: bool,
) -> Result<(), sqlx::Error> {
    if owners.is_empty() {
        return Ok(());
    }
    // Sorted and distinct: ON CONFLICT cannot update one row twice, and a fixed order keeps
    // two concurrent recorders from deadlocking.
    let mut pairs: Vec<(String, String)> = owners
        .iter()
        .map(|(ws, r)| (ws.clone(), r.to_string()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let refs: Vec<String> = pairs.iter().map(|(_, r)| r.clone()).collect();
    touch_cache_blobs(conn, &refs).await?;
    let (wss, refs): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    sqlx::query!(
        r#"INSERT INTO weir_cas_owners (workspace_id, blob_ref, pinned)
           SELECT ws, r, $3 FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS t(ws, r, ord)
           ORDER BY ord
           ON CONFLICT (workspace_id, blob_ref) DO UPDATE SET
               pinned = weir_cas_owners.pinned OR EXCLUDED.pinned,
               last_used_at = now()"#,
        &wss,
        &refs,
        pinned,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// [`record`] in a transaction of its own on `pool` (the gateway: it puts the blob after the
/// commit, and a request holds no transaction).
pub async fn record_on_pool(
    pool: &PgPool,
    workspace_id: &str,
    r: &CasRef,
    pinned: bool,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    record(&mut tx, &[(workspace_id.to_string(), *r)], pinned).await?;
    tx.commit().await
}

/// Whether `workspace_id` owns `r`, for a ref a caller hands in (the gateway): if so, marks
/// it used now, so that the collector leaves it alone for the grace period while the event
/// carrying it is in flight. `false` is the same answer whether or not the blob exists for
/// another workspace.
pub async fn claim(pool: &PgPool, workspace_id: &str, r: &CasRef) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let refs = [r.to_string()];
    touch_cache_blobs(&mut tx, &refs).await?;
    let owned = sqlx::query_scalar!(
        r#"UPDATE weir_cas_owners SET last_used_at = now()
           WHERE workspace_id = $1 AND blob_ref = $2
           RETURNING 1 AS "one!""#,
        workspace_id,
        &refs[0],
    )
    .fetch_optional(&mut *tx)
    .await?
    .is_some();
    tx.commit().await?;
    Ok(owned)
}

/// Of the `(workspace, ref)` pairs asked, those owned (one statement): the processors'
/// defensive check of refs in events, which may not have come through the gateway.
pub async fn owned(
    conn: &mut PgConnection,
    pairs: &[(String, String)],
) -> Result<HashSet<(String, String)>, sqlx::Error> {
    if pairs.is_empty() {
        return Ok(HashSet::new());
    }
    let (wss, refs): (Vec<String>, Vec<String>) = pairs.iter().cloned().unzip();
    Ok(sqlx::query!(
        r#"SELECT o.workspace_id AS "workspace_id!", o.blob_ref AS "blob_ref!"
           FROM (SELECT DISTINCT ws, r FROM UNNEST($1::text[], $2::text[]) AS k(ws, r)) AS k
           JOIN weir_cas_owners o ON o.workspace_id = k.ws AND o.blob_ref = k.r"#,
        &wss,
        &refs,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.workspace_id, r.blob_ref))
    .collect())
}

/// Locks (in ref order) and touches the `cache_blobs` rows of `refs`, if any: a collection
/// holding one of them is waited for; a later one sees it referenced just now.
async fn touch_cache_blobs(conn: &mut PgConnection, refs: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"UPDATE cache_blobs b SET last_referenced_at = now()
           FROM (SELECT result_ref FROM cache_blobs WHERE result_ref = ANY($1::text[])
                 ORDER BY result_ref FOR UPDATE) AS l
           WHERE b.result_ref = l.result_ref"#,
        refs,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
