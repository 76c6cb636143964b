//! The content-addressed store (CAS): immutable blobs addressed by the SHA-256 of their
//! content, shared by the materializer (large definitions), the cache and the coordinator
//! (node outputs).
//!
//! Invariants:
//! - **Addressed by content.** A blob's address is [`CasRef`], `sha256:<64 lowercase hex>`,
//!   the SHA-256 of the *uncompressed* bytes. The same content always has the same ref, on
//!   every backend and at every compression level.
//! - **Immutable.** A key is written at most once with the bytes its name promises; nothing
//!   overwrites or appends. [`Cas::put`] is idempotent and deduplicated: putting content
//!   that is already stored does not upload it again. Only [`Cas::delete`] (for the garbage
//!   collector) removes a blob.
//! - **Verified on read.** [`Cas::get`] decompresses and re-hashes every blob and refuses
//!   one whose hash differs from its ref with [`CasError::Corrupt`]; callers never see
//!   bytes that do not match the ref they asked for.
//! - **Owned per workspace.** The store itself has no tenants; [`owners`] records which
//!   workspace stored which blob (before the put), and weir accepts a ref from a caller only
//!   if the caller's workspace owns it.
//!
//! Storage: zstd-compressed (`cas.compression_level`) at `<key_prefix><hex[0..2]>/<hex>`,
//! either in the S3 bucket of the `s3` section (multipart above
//! `cas.multipart_threshold_bytes`, server-side encryption as configured) or under
//! `cas.local_dir` (written atomically: temp file, fsync, rename). See `docs/cas.md`.
//!
//! Hashing and (de)compression of blobs above [`INLINE_LIMIT`] run on the blocking pool so
//! that a large blob does not stall the async workers.
//!
//! Layout: this file holds the [`Cas`] handle and its public operations; `s3` and `local`
//! the two backends, `blob` the hashing, compression and verification, `error` the
//! [`CasError`] and its classification, [`owners`] the workspace ownership, `tests.rs` the
//! unit tests.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use aws_sdk_s3::types::ServerSideEncryption;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use weir_model::cas_ref::CasRef;

use crate::config::{CasBackend, CasConfig, Config};

mod blob;
mod error;
mod local;
pub mod owners;
mod s3;
#[cfg(test)]
mod tests;

pub use error::CasError;

use error::s3_error;
use s3::head;

/// Metric names of the CAS. Every metric carries `backend` (`s3` or `local`).
pub mod metrics {
    /// Blobs put, by `outcome`: `stored` (written) or `deduplicated` (already there) (counter).
    pub const PUTS: &str = "weir_cas_puts_total";
    /// Blobs read, by `outcome`: `ok`, `not_found` or `corrupt` (counter).
    pub const GETS: &str = "weir_cas_gets_total";
    /// Blobs refused on read because their content does not match their ref (counter).
    pub const CORRUPT: &str = "weir_cas_corrupt_total";
    /// Compressed bytes written by puts that stored a blob (counter).
    pub const BYTES_STORED: &str = "weir_cas_bytes_stored_total";
}

/// Blobs up to this size are hashed and (de)compressed inline on the async worker; larger
/// ones on the blocking pool (`spawn_blocking`). A blob this small hashes and compresses
/// faster than a hop to the blocking pool costs.
pub const INLINE_LIMIT: usize = 64 * 1024;

/// S3 puts of blobs up to this size (uncompressed) go straight to a conditional PUT
/// (`If-None-Match: *`): one round trip whether the blob is new or already stored. Above
/// it, a HEAD comes first, so that a stored blob is neither compressed nor sent again: the
/// server answers 412 before reading the body and drops the connection, which for bodies of
/// a MiB or more often breaks the client's write instead of delivering the 412
/// (`measure_dedup_strategies` in `it/tests/cas.rs` measures it; figures in `docs/cas.md`).
pub const HEAD_FIRST_ABOVE: usize = 64 * 1024;

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3's largest single PUT (5 GiB); bigger blobs always go multipart.
const MAX_SINGLE_PUT: u64 = 5 * 1024 * 1024 * 1024;
/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;

// ---------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The blob was new and has been written.
    Stored,
    /// The blob was already stored; nothing was written.
    Deduplicated,
}

impl PutOutcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PutOutcome::Stored => "stored",
            PutOutcome::Deduplicated => "deduplicated",
        }
    }
}

/// The result of [`Cas::put_detailed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutReceipt {
    /// The blob's address.
    pub cas_ref: CasRef,
    /// Whether it was written or already there.
    pub outcome: PutOutcome,
    /// Compressed bytes written (0 when deduplicated).
    pub stored_bytes: u64,
}

/// The content-addressed store. Cheap to clone (one `Arc`); share it between tasks.
#[derive(Clone)]
pub struct Cas {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    key_prefix: String,
    level: i32,
    multipart_threshold: u64,
    part_bytes: u64,
    sse: Option<Sse>,
}

enum Backend {
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
    },
    Local {
        root: PathBuf,
    },
}

struct Sse {
    mode: ServerSideEncryption,
    kms_key_id: Option<String>,
}

impl fmt::Debug for Cas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Cas");
        match &self.inner.backend {
            Backend::S3 { bucket, .. } => d.field("backend", &"s3").field("bucket", bucket),
            Backend::Local { root } => d.field("backend", &"local").field("root", root),
        };
        d.field("key_prefix", &self.inner.key_prefix).finish()
    }
}

fn check_config(cfg: &CasConfig, s3: bool) -> Result<(), CasError> {
    let bad = |m: String| Err(CasError::Config(m));
    if !(1..=22).contains(&cfg.compression_level) {
        return bad(format!(
            "cas.compression_level {} is not in 1..=22",
            cfg.compression_level
        ));
    }
    let p = &cfg.key_prefix;
    if p.starts_with('/') || p.contains('\\') || p.split('/').any(|seg| seg == "..") {
        return bad(format!(
            "cas.key_prefix {p:?} must be relative, with no `..` segment and no backslash"
        ));
    }
    if s3 {
        if cfg.multipart_part_bytes < 5 * 1024 * 1024 {
            return bad("cas.multipart_part_bytes must be at least 5 MiB (S3's minimum)".into());
        }
        if !["", "AES256", "aws:kms"].contains(&cfg.server_side_encryption.as_str()) {
            return bad(format!(
                "cas.server_side_encryption {:?} is not one of \"\", \"AES256\", \"aws:kms\"",
                cfg.server_side_encryption
            ));
        }
        if !cfg.kms_key_id.is_empty() && cfg.server_side_encryption != "aws:kms" {
            return bad(
                "cas.kms_key_id is set but cas.server_side_encryption is not aws:kms".into(),
            );
        }
    }
    Ok(())
}

impl Cas {
    /// The store of `config.cas`: the S3 bucket of `config.s3`, or `config.cas.local_dir`.
    pub async fn from_config(config: &Config) -> Result<Cas, CasError> {
        match config.cas.backend {
            CasBackend::S3 => {
                if config.s3.bucket.is_empty() {
                    return Err(CasError::Config("s3.bucket is empty".into()));
                }
                check_config(&config.cas, true)?;
                let client = crate::s3::client(&config.s3).await;
                Cas::s3(client, &config.s3.bucket, &config.cas)
            }
            CasBackend::Local => Cas::local(&config.cas),
        }
    }

    /// An S3 store on an existing client (to share a client, or to add interceptors).
    pub fn s3(client: aws_sdk_s3::Client, bucket: &str, cfg: &CasConfig) -> Result<Cas, CasError> {
        check_config(cfg, true)?;
        if bucket.is_empty() {
            return Err(CasError::Config("the bucket name is empty".into()));
        }
        let sse = match cfg.server_side_encryption.as_str() {
            "" => None,
            mode => Some(Sse {
                mode: ServerSideEncryption::from(mode),
                kms_key_id: (!cfg.kms_key_id.is_empty()).then(|| cfg.kms_key_id.clone()),
            }),
        };
        Ok(Cas::new(
            Backend::S3 {
                client,
                bucket: bucket.to_owned(),
            },
            cfg,
            sse,
        ))
    }

    /// A store in the directory `cfg.local_dir` (created on first write).
    pub fn local(cfg: &CasConfig) -> Result<Cas, CasError> {
        check_config(cfg, false)?;
        if cfg.local_dir.is_empty() {
            return Err(CasError::Config("cas.local_dir is empty".into()));
        }
        let root = PathBuf::from(&cfg.local_dir);
        Ok(Cas::new(Backend::Local { root }, cfg, None))
    }

    fn new(backend: Backend, cfg: &CasConfig, sse: Option<Sse>) -> Cas {
        Cas {
            inner: Arc::new(Inner {
                backend,
                key_prefix: cfg.key_prefix.clone(),
                level: cfg.compression_level,
                multipart_threshold: cfg.multipart_threshold_bytes,
                part_bytes: cfg.multipart_part_bytes.max(1),
                sse,
            }),
        }
    }

    /// `s3` or `local`.
    pub fn backend_name(&self) -> &'static str {
        match self.inner.backend {
            Backend::S3 { .. } => "s3",
            Backend::Local { .. } => "local",
        }
    }

    /// The object key (S3) or the path relative to `local_dir` of a blob.
    pub fn key(&self, r: &CasRef) -> String {
        r.key(&self.inner.key_prefix)
    }

    /// Stores `content` and returns its ref. Idempotent: content already stored is not
    /// written again.
    pub async fn put(&self, content: impl Into<Bytes>) -> Result<CasRef, CasError> {
        Ok(self.put_detailed(content).await?.cas_ref)
    }

    /// [`Cas::put`] for borrowed bytes (copied once when large).
    pub async fn put_slice(&self, content: &[u8]) -> Result<CasRef, CasError> {
        self.put(Bytes::copy_from_slice(content)).await
    }

    /// Serializes `value` as JSON and stores it. Note that the ref is that of the exact
    /// bytes: two equal values serialized differently (map order) get different refs.
    pub async fn put_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<CasRef, CasError> {
        self.put(serde_json::to_vec(value)?).await
    }

    /// [`Cas::put`], also saying whether the blob was written or already there.
    pub async fn put_detailed(&self, content: impl Into<Bytes>) -> Result<PutReceipt, CasError> {
        let content = content.into();
        let receipt = match &self.inner.backend {
            Backend::S3 { client, bucket } => self.put_s3(client, bucket, content).await,
            Backend::Local { root } => self.put_local(root, content).await,
        }
        .inspect_err(|e| {
            ::metrics::counter!(crate::metrics::CAS_ERRORS, "op" => "put", "kind" => e.kind())
                .increment(1);
        })?;
        let backend = self.backend_name();
        ::metrics::counter!(metrics::PUTS, "backend" => backend, "outcome" => receipt.outcome.as_str())
            .increment(1);
        if receipt.outcome == PutOutcome::Stored {
            ::metrics::counter!(metrics::BYTES_STORED, "backend" => backend)
                .increment(receipt.stored_bytes);
        }
        tracing::debug!(cas_ref = %receipt.cas_ref, outcome = receipt.outcome.as_str(),
            stored_bytes = receipt.stored_bytes, "cas put");
        Ok(receipt)
    }

    /// The content of `r`, verified: [`CasError::NotFound`] when absent,
    /// [`CasError::Corrupt`] when the stored bytes do not hash to `r`.
    pub async fn get(&self, r: &CasRef) -> Result<Bytes, CasError> {
        let result = match &self.inner.backend {
            Backend::S3 { client, bucket } => self.get_s3(client, bucket, r).await,
            Backend::Local { root } => self.get_local(root, r).await,
        };
        let backend = self.backend_name();
        if let Err(e) = &result {
            ::metrics::counter!(crate::metrics::CAS_ERRORS, "op" => "get", "kind" => e.kind())
                .increment(1);
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CasError::NotFound(_)) => "not_found",
            Err(CasError::Corrupt { actual, .. }) => {
                ::metrics::counter!(metrics::CORRUPT, "backend" => backend).increment(1);
                tracing::error!(cas_ref = %r, key = %self.key(r), actual = %actual,
                    "corrupt CAS blob refused");
                "corrupt"
            }
            Err(_) => return result,
        };
        ::metrics::counter!(metrics::GETS, "backend" => backend, "outcome" => outcome).increment(1);
        result
    }

    /// The blob `r` decoded from JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, r: &CasRef) -> Result<T, CasError> {
        let bytes = self.get(r).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Whether a blob is stored under `r` (not verified).
    pub async fn exists(&self, r: &CasRef) -> Result<bool, CasError> {
        let key = self.key(r);
        match &self.inner.backend {
            Backend::S3 { client, bucket } => head(client, bucket, &key).await,
            Backend::Local { root } => {
                let path = root.join(&key);
                tokio::fs::try_exists(&path)
                    .await
                    .map_err(|e| CasError::io("stat", &path, e))
            }
        }
    }

    /// Removes the blob `r`, for the garbage collector. Deleting an absent blob succeeds.
    /// Only a collector that knows no live record references `r` may call this.
    pub async fn delete(&self, r: &CasRef) -> Result<(), CasError> {
        let key = self.key(r);
        match &self.inner.backend {
            Backend::S3 { client, bucket } => {
                client
                    .delete_object()
                    .bucket(bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| s3_error("DeleteObject", &key, e))?;
                Ok(())
            }
            Backend::Local { root } => {
                let path = root.join(&key);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(CasError::io("remove", &path, e)),
                }
            }
        }
    }
}

fn deduplicated(cas_ref: CasRef) -> PutReceipt {
    PutReceipt {
        cas_ref,
        outcome: PutOutcome::Deduplicated,
        stored_bytes: 0,
    }
}
