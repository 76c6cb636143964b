//! Results in the CAS: reading and verifying the blobs of candidate hits (a missing or
//! corrupt one deletes its entry and takes back the hit's audit row), and putting the blobs
//! of stored results.
//!
//! Invariant: a candidate becomes a hit only with its blob's bytes, read and re-hashed by
//! [`Cas::get`]; the bad ones are deleted on the caller's connection, so in its transaction.

use bytes::Bytes;
use futures::future::join_all;
use sqlx::PgConnection;
use uuid::Uuid;
use weir_model::CasRef;
use weir_runtime::cas::{Cas, CasError};

use crate::error::CacheError;
use crate::metrics as m;

/// A candidate found by a lookup statement, before its blob is verified.
#[derive(Debug, Clone)]
pub(super) struct Found {
    /// Index of the request in its batch.
    pub(super) ord: usize,
    pub(super) entry_key: Vec<u8>,
    pub(super) result_ref: String,
    pub(super) cost_ms: i64,
    /// Id of the hit's audit row, taken back if the blob is bad.
    pub(super) audit_id: Uuid,
    pub(super) similarity: Option<f64>,
}

/// A stored ref that does not parse is data weir did not write.
pub(super) fn parse_ref(s: &str) -> Result<CasRef, CacheError> {
    s.parse()
        .map_err(|e| CacheError::Invalid(format!("stored result_ref: {e}")))
}

/// Reads and verifies the blobs of `found` concurrently; deletes the entries (and takes back
/// the audit rows) of those missing or corrupt. Returns the good ones with their bytes.
pub(super) async fn verify(
    conn: &mut PgConnection,
    cas: &Cas,
    found: Vec<Found>,
    kind: &'static str,
) -> Result<Vec<(Found, Bytes)>, CacheError> {
    let refs: Vec<Option<CasRef>> = found.iter().map(|f| f.result_ref.parse().ok()).collect();
    let reads = read_blobs(cas, refs).await;
    settle(conn, found, reads, kind).await
}

/// Pairs candidates with their blob reads; deletes the entries (and their audit rows) whose
/// blob is missing or corrupt.
pub(super) async fn settle(
    conn: &mut PgConnection,
    found: Vec<Found>,
    reads: Vec<Result<Option<Bytes>, CasError>>,
    kind: &'static str,
) -> Result<Vec<(Found, Bytes)>, CacheError> {
    let mut good = Vec::with_capacity(found.len());
    let (mut bad_keys, mut bad_audits) = (Vec::new(), Vec::new());
    for (f, read) in found.into_iter().zip(reads) {
        match read? {
            Some(b) => good.push((f, b)),
            None => {
                tracing::warn!(entry_key = %hex::encode(&f.entry_key), result_ref = %f.result_ref, kind, "cache entry's blob is missing or corrupt; deleting the entry");
                metrics::counter!(m::BAD_BLOB, "kind" => kind).increment(1);
                bad_keys.push(f.entry_key);
                bad_audits.push(f.audit_id);
            }
        }
    }
    if !bad_keys.is_empty() {
        sqlx::query!(
            r#"WITH a AS (DELETE FROM cache_audit WHERE id = ANY($1::uuid[])),
                    e AS (DELETE FROM cache_entries WHERE entry_key = ANY($2::bytea[]))
               DELETE FROM cache_semantic WHERE entry_key = ANY($2::bytea[])"#,
            &bad_audits,
            &bad_keys,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(good)
}

/// Reads and verifies blobs concurrently: `Ok(None)` for an unparsable ref, a missing or a
/// corrupt blob; other CAS errors as they are.
pub(super) async fn read_blobs(
    cas: &Cas,
    refs: Vec<Option<CasRef>>,
) -> Vec<Result<Option<Bytes>, CasError>> {
    async fn read(cas: &Cas, r: Option<CasRef>) -> Result<Option<Bytes>, CasError> {
        let Some(r) = r else { return Ok(None) };
        match cas.get(&r).await {
            Ok(b) => Ok(Some(b)),
            Err(CasError::NotFound(_) | CasError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
    // A single read (a synchronous lookup) stays on this task: a spawn would add a wake-up
    // on another worker thread to the latency of every hit.
    if refs.len() == 1 {
        let r = refs.into_iter().next().flatten();
        return vec![read(cas, r).await];
    }
    let tasks: Vec<_> = refs
        .into_iter()
        .map(|r| {
            let cas = cas.clone();
            tokio::spawn(async move { read(&cas, r).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in join_all(tasks).await {
        out.push(t.unwrap_or_else(|e| Err(CasError::Task(e.to_string()))));
    }
    out
}

/// Puts blobs concurrently.
pub(super) async fn put_blobs(cas: &Cas, blobs: Vec<Bytes>) -> Vec<Result<CasRef, CasError>> {
    let tasks: Vec<_> = blobs
        .into_iter()
        .map(|b| {
            let cas = cas.clone();
            tokio::spawn(async move { cas.put(b).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in join_all(tasks).await {
        out.push(t.unwrap_or_else(|e| Err(CasError::Task(e.to_string()))));
    }
    out
}
