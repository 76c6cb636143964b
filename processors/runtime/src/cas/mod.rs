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

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption,
};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::de::DeserializeOwned;
use serde::Serialize;

use weir_model::cas_ref::{CasRef, ParseRefError};

use crate::config::{CasBackend, CasConfig, Config};
use crate::error::{Classify, Disposition};

pub mod owners;

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
/// ones on the blocking pool (`spawn_blocking`). 64 KiB hash and compress in well under a
/// millisecond.
pub const INLINE_LIMIT: usize = 64 * 1024;

/// S3 puts of blobs up to this size (uncompressed) go straight to a conditional PUT
/// (`If-None-Match: *`): one round trip whether the blob is new or already stored. Above
/// it, a HEAD comes first, so that a stored blob is neither compressed nor sent again: the
/// server answers 412 before reading the body and drops the connection, which for bodies of
/// a MiB or more often breaks the client's write instead of delivering the 412. Measured on
/// the local stack (`measure_dedup_strategies` in `it/tests/cas.rs`, figures in
/// `docs/cas.md`): no failure up to 256 KiB, 0–12% at 1 MiB, 10–80% at 4–16 MiB.
pub const HEAD_FIRST_ABOVE: usize = 64 * 1024;

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3's largest single PUT (5 GiB); bigger blobs always go multipart.
const MAX_SINGLE_PUT: u64 = 5 * 1024 * 1024 * 1024;
/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A CAS operation failed. Its [`Classify`] implementation says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// A string is not a valid ref.
    #[error(transparent)]
    InvalidRef(#[from] ParseRefError),
    /// No blob is stored under this ref.
    #[error("CAS blob {0} not found")]
    NotFound(CasRef),
    /// The stored blob does not match its ref: it was altered or damaged after it was
    /// written. `actual` is the ref of what was read, or why it could not be decompressed.
    #[error("CAS blob {expected} is corrupt: its content is {actual}")]
    Corrupt {
        /// The ref that was asked for.
        expected: CasRef,
        /// `sha256:<hex>` of the bytes read, or `undecodable zstd frame (...)`.
        actual: String,
    },
    /// The CAS settings cannot work.
    #[error("CAS configuration: {0}")]
    Config(String),
    /// An S3 request failed (after the SDK's own retries).
    #[error("CAS S3 {op} {key}: {message}")]
    S3 {
        /// The S3 operation (`PutObject`, `HeadObject`, ...).
        op: &'static str,
        /// The object key.
        key: String,
        /// HTTP status, when the server answered.
        status: Option<u16>,
        /// S3 error code (`SlowDown`, `AccessDenied`, ...), when the server sent one.
        code: Option<String>,
        /// The error and its causes (never credentials).
        message: String,
        /// Retry for network, 5xx and throttling; Fatal for configuration and auth.
        disposition: Disposition,
    },
    /// A file operation of the local backend failed.
    #[error("CAS {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A value could not be encoded to, or decoded from, JSON ([`Cas::put_json`],
    /// [`Cas::get_json`]).
    #[error("CAS JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A blocking hash/compression task panicked or was cancelled.
    #[error("CAS blocking task failed: {0}")]
    Task(String),
}

impl Classify for CasError {
    /// What a consumer loop should do: `Retry` for network failures, 5xx, throttling and
    /// full disks; `DeadLetter` for a ref that is not one (only a record can carry it);
    /// `Fatal` for configuration, authorization and bugs. [`CasError::NotFound`] and
    /// [`CasError::Corrupt`] report `Fatal` here: a blob weir wrote is gone or damaged, and
    /// a caller that would rather reject the record that referenced it matches those
    /// variants itself.
    fn disposition(&self) -> Disposition {
        match self {
            CasError::S3 { disposition, .. } => *disposition,
            CasError::Io { source, .. } => io_disposition(source),
            CasError::InvalidRef(e) => e.disposition(),
            CasError::NotFound(_)
            | CasError::Corrupt { .. }
            | CasError::Config(_)
            | CasError::Json(_)
            | CasError::Task(_) => Disposition::Fatal,
        }
    }
}

/// A ref that does not parse came with a record: its content, so it is dead-lettered.
impl Classify for ParseRefError {
    fn disposition(&self) -> Disposition {
        Disposition::DeadLetter
    }
}

impl CasError {
    /// The bounded `kind` label of `weir_cas_errors_total`: `not_found`, `corrupt`,
    /// `unavailable` (retryable: network, 5xx, throttling, full disk), `refused` (fatal S3 or
    /// file errors: configuration, authorization) or `invalid` (bad ref, JSON, task).
    pub fn kind(&self) -> &'static str {
        match self {
            CasError::NotFound(_) => "not_found",
            CasError::Corrupt { .. } => "corrupt",
            CasError::S3 { .. } | CasError::Io { .. } | CasError::Config(_) => {
                match self.disposition() {
                    Disposition::Retry => "unavailable",
                    _ => "refused",
                }
            }
            CasError::InvalidRef(_) | CasError::Json(_) | CasError::Task(_) => "invalid",
        }
    }

    fn io(op: &'static str, path: &Path, source: std::io::Error) -> CasError {
        CasError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

fn io_disposition(e: &std::io::Error) -> Disposition {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied
        | K::ReadOnlyFilesystem
        | K::InvalidInput
        | K::InvalidFilename
        | K::NotADirectory
        | K::IsADirectory
        | K::Unsupported => Disposition::Fatal,
        _ => Disposition::Retry,
    }
}

/// S3 error codes that are worth retrying whatever their HTTP status.
const RETRY_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "ConditionalRequestConflict",
    "ExpiredToken",
    "KMS.ThrottlingException",
    "KMS.KMSInternalException",
];

fn s3_error<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> CasError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let disposition = match &err {
        SdkError::ConstructionFailure(_) => Disposition::Fatal,
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Disposition::Retry,
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => Disposition::Retry,
        // A bad endpoint or no credentials at all: configuration.
        SdkError::DispatchFailure(_) => Disposition::Fatal,
        _ => match (code.as_deref(), status) {
            (Some(c), _) if RETRY_CODES.contains(&c) => Disposition::Retry,
            (_, Some(s)) if s >= 500 || s == 429 || s == 408 || s == 409 => Disposition::Retry,
            // 401/403 (auth), 404 NoSuchBucket, 400 (bad encryption settings, ...).
            _ => Disposition::Fatal,
        },
    };
    CasError::S3 {
        op,
        key: key.to_owned(),
        status,
        code,
        message: DisplayErrorContext(&err).to_string(),
        disposition,
    }
}

/// A conditional write lost because the object already exists.
fn precondition_failed<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    err.raw_response().map(|r| r.status().as_u16()) == Some(412)
        || err.code() == Some("PreconditionFailed")
}

/// The request may or may not have taken effect: the connection failed or the response
/// could not be read.
fn ambiguous<E>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) | SdkError::TimeoutError(_)
    )
}

/// The object is absent (but the bucket exists: a missing bucket is a configuration error).
fn missing_key(err: &SdkError<GetObjectError, HttpResponse>) -> bool {
    err.as_service_error().is_some_and(|s| s.is_no_such_key())
        || (err.raw_response().map(|r| r.status().as_u16()) == Some(404)
            && err.code() != Some("NoSuchBucket"))
}

/// A conditional write raced with another write of the same key (AWS answers 409).
fn conditional_conflict<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    err.code() == Some("ConditionalRequestConflict")
}

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

    // ---- S3 -----------------------------------------------------------------------------

    async fn put_s3(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        content: Bytes,
    ) -> Result<PutReceipt, CasError> {
        let level = self.inner.level;
        let len = content.len();
        let (cas_ref, compressed) = if len > HEAD_FIRST_ABOVE {
            // Large: ask first, so that a stored blob is neither compressed nor sent again.
            let c = content.clone();
            let cas_ref = off_worker(len, move || CasRef::of(&c)).await?;
            if head(client, bucket, &self.key(&cas_ref)).await? {
                return Ok(deduplicated(cas_ref));
            }
            let compressed = off_worker(len, move || compress(&content, level)).await??;
            (cas_ref, compressed)
        } else {
            off_worker(len, move || -> Result<_, CasError> {
                Ok((CasRef::of(&content), compress(&content, level)?))
            })
            .await??
        };
        let key = self.key(&cas_ref);
        let size = compressed.len() as u64;
        let stored = if size > self.inner.multipart_threshold || size > MAX_SINGLE_PUT {
            self.put_multipart(client, bucket, &key, compressed, len)
                .await?
        } else {
            self.put_single(client, bucket, &key, compressed, len)
                .await?
        };
        Ok(match stored {
            PutOutcome::Stored => PutReceipt {
                cas_ref,
                outcome: PutOutcome::Stored,
                stored_bytes: size,
            },
            PutOutcome::Deduplicated => deduplicated(cas_ref),
        })
    }

    /// One conditional PUT: 412 means the blob is already there.
    async fn put_single(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        compressed: Bytes,
        uncompressed_len: usize,
    ) -> Result<PutOutcome, CasError> {
        let mut req = client
            .put_object()
            .bucket(bucket)
            .key(key)
            .if_none_match("*")
            .content_type("application/zstd")
            .metadata("uncompressed-size", uncompressed_len.to_string())
            .body(ByteStream::from(compressed));
        if let Some(sse) = &self.inner.sse {
            req = req
                .server_side_encryption(sse.mode.clone())
                .set_ssekms_key_id(sse.kms_key_id.clone());
        }
        match req.send().await {
            Ok(_) => Ok(PutOutcome::Stored),
            Err(e) if precondition_failed(&e) => Ok(PutOutcome::Deduplicated),
            // A concurrent write of the same key (409), or a connection dropped under the
            // body (a server may answer 412 before reading it): the object is there or not.
            // Whoever wrote it wrote these bytes, the key being their hash.
            Err(e) if conditional_conflict(&e) || ambiguous(&e) => {
                if head(client, bucket, key).await? {
                    Ok(PutOutcome::Deduplicated)
                } else {
                    Err(s3_error("PutObject", key, e))
                }
            }
            Err(e) => Err(s3_error("PutObject", key, e)),
        }
    }

    /// A multipart upload, completed conditionally and aborted on any failure.
    async fn put_multipart(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        compressed: Bytes,
        uncompressed_len: usize,
    ) -> Result<PutOutcome, CasError> {
        let mut create = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .content_type("application/zstd")
            .metadata("uncompressed-size", uncompressed_len.to_string())
            .checksum_algorithm(ChecksumAlgorithm::Crc32);
        if let Some(sse) = &self.inner.sse {
            create = create
                .server_side_encryption(sse.mode.clone())
                .set_ssekms_key_id(sse.kms_key_id.clone());
        }
        let created = create
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(CasError::S3 {
                op: "CreateMultipartUpload",
                key: key.to_owned(),
                status: None,
                code: None,
                message: "the response has no upload id".into(),
                disposition: Disposition::Retry,
            });
        };
        // Aborts the upload if this future is dropped half-way (e.g. on shutdown).
        let mut guard = AbortGuard {
            client: client.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            upload_id: upload_id.clone(),
            armed: true,
        };
        let result = self
            .upload_parts(client, bucket, key, &upload_id, compressed)
            .await;
        match result {
            Ok(PutOutcome::Stored) => {
                guard.armed = false;
                Ok(PutOutcome::Stored)
            }
            other => {
                guard.armed = false;
                abort_upload(client, bucket, key, &upload_id).await;
                other
            }
        }
    }

    async fn upload_parts(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        upload_id: &str,
        compressed: Bytes,
    ) -> Result<PutOutcome, CasError> {
        let total = compressed.len() as u64;
        let part_size = self.inner.part_bytes.max(total.div_ceil(MAX_PARTS)).max(1) as usize;
        let chunks: Vec<(i32, Bytes)> = (0..compressed.len().max(1))
            .step_by(part_size)
            .enumerate()
            .map(|(i, start)| {
                let end = (start + part_size).min(compressed.len());
                (i as i32 + 1, compressed.slice(start..end))
            })
            .collect();
        let parts: Vec<CompletedPart> = futures::stream::iter(chunks)
            .map(|(number, chunk)| async move {
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(ByteStream::from(chunk))
                    .send()
                    .await
                    .map_err(|e| s3_error("UploadPart", key, e))?;
                Ok::<_, CasError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
                        .build(),
                )
            })
            .buffered(PART_CONCURRENCY)
            .try_collect()
            .await?;
        let done = client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match done {
            Ok(_) => Ok(PutOutcome::Stored),
            Err(e) if precondition_failed(&e) => Ok(PutOutcome::Deduplicated),
            Err(e) if conditional_conflict(&e) && head(client, bucket, key).await? => {
                Ok(PutOutcome::Deduplicated)
            }
            Err(e) => Err(s3_error("CompleteMultipartUpload", key, e)),
        }
    }

    async fn get_s3(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        r: &CasRef,
    ) -> Result<Bytes, CasError> {
        let key = self.key(r);
        let out = match client.get_object().bucket(bucket).key(&key).send().await {
            Ok(out) => out,
            Err(e) if missing_key(&e) => return Err(CasError::NotFound(*r)),
            Err(e) => return Err(s3_error("GetObject", &key, e)),
        };
        let compressed = out
            .body
            .collect()
            .await
            .map_err(|e| CasError::S3 {
                op: "GetObject",
                key: key.clone(),
                status: None,
                code: None,
                message: format!("reading the body: {}", DisplayErrorContext(&e)),
                disposition: Disposition::Retry,
            })?
            .into_bytes();
        decode_verified(*r, compressed).await
    }

    // ---- local directory ----------------------------------------------------------------

    async fn put_local(&self, root: &Path, content: Bytes) -> Result<PutReceipt, CasError> {
        let root = root.to_owned();
        let prefix = self.inner.key_prefix.clone();
        let level = self.inner.level;
        // File I/O blocks anyway: the whole put is one blocking task.
        blocking(move || {
            let cas_ref = CasRef::of(&content);
            let path = root.join(cas_ref.key(&prefix));
            match std::fs::metadata(&path) {
                Ok(_) => return Ok(deduplicated(cas_ref)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CasError::io("stat", &path, e)),
            }
            let compressed = compress(&content, level)?;
            write_atomically(&path, &cas_ref, &compressed)?;
            Ok(PutReceipt {
                cas_ref,
                outcome: PutOutcome::Stored,
                stored_bytes: compressed.len() as u64,
            })
        })
        .await?
    }

    async fn get_local(&self, root: &Path, r: &CasRef) -> Result<Bytes, CasError> {
        let path = root.join(self.key(r));
        let r = *r;
        blocking(move || {
            let compressed = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CasError::NotFound(r))
                }
                Err(e) => return Err(CasError::io("read", &path, e)),
            };
            verify(r, &compressed)
        })
        .await?
    }
}

fn deduplicated(cas_ref: CasRef) -> PutReceipt {
    PutReceipt {
        cas_ref,
        outcome: PutOutcome::Deduplicated,
        stored_bytes: 0,
    }
}

async fn head(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<bool, CasError> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error().is_some_and(|s| s.is_not_found())
                || e.raw_response().map(|r| r.status().as_u16()) == Some(404) =>
        {
            Ok(false)
        }
        Err(e) => Err(s3_error("HeadObject", key, e)),
    }
}

async fn abort_upload(client: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str) {
    if let Err(e) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        // The bucket's AbortIncompleteMultipartUpload lifecycle rule cleans up eventually.
        tracing::warn!(key, upload_id, error = %DisplayErrorContext(&e),
            "could not abort a CAS multipart upload");
    }
}

/// Aborts a multipart upload whose future was dropped before it finished.
struct AbortGuard {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (client, bucket, key, upload_id) = (
                self.client.clone(),
                std::mem::take(&mut self.bucket),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.upload_id),
            );
            handle.spawn(async move { abort_upload(&client, &bucket, &key, &upload_id).await });
        }
    }
}

// ---- local files ------------------------------------------------------------------------

/// Writes `data` to `path` so that readers see either no file or the whole file: a temp file
/// in the same directory, fsynced, renamed into place, and the directory fsynced.
fn write_atomically(path: &Path, cas_ref: &CasRef, data: &[u8]) -> Result<(), CasError> {
    let dir = path
        .parent()
        .ok_or_else(|| CasError::Config(format!("no parent directory for {}", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| CasError::io("create directory", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        cas_ref.hex(),
        uuid::Uuid::now_v7().simple()
    ));
    let written = (|| {
        let mut file = std::fs::File::create_new(&tmp)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CasError::io("write", &tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CasError::io("rename", path, e));
    }
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CasError::io("sync directory", dir, e))?;
    Ok(())
}

// ---- CPU work -----------------------------------------------------------------------------

/// Runs `f` inline for small inputs, on the blocking pool for large ones.
async fn off_worker<T, F>(len: usize, f: F) -> Result<T, CasError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if len <= INLINE_LIMIT {
        Ok(f())
    } else {
        blocking(f).await
    }
}

async fn blocking<T, F>(f: F) -> Result<T, CasError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CasError::Task(e.to_string()))
}

fn compress(content: &[u8], level: i32) -> Result<Bytes, CasError> {
    zstd::bulk::compress(content, level)
        .map(Bytes::from)
        .map_err(|e| CasError::Task(format!("zstd compression: {e}")))
}

/// Decompresses and re-hashes, off the async worker when the blob is large.
async fn decode_verified(r: CasRef, compressed: Bytes) -> Result<Bytes, CasError> {
    let len = zstd::zstd_safe::get_frame_content_size(&compressed)
        .ok()
        .flatten()
        .map_or(compressed.len(), |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
    off_worker(len.max(compressed.len()), move || verify(r, &compressed)).await?
}

/// Frames that declare a content size up to this are decoded in one call with a reused
/// per-thread context (creating a zstd context costs more than decoding a small result);
/// others, and frames without a declared size, are streamed.
const BULK_DECODE_MAX: u64 = 8 << 20;

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(compressed: &[u8]) -> std::io::Result<Vec<u8>> {
    let declared = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten();
    match declared {
        Some(n) if n <= BULK_DECODE_MAX => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let d = match slot.as_mut() {
                Some(d) => d,
                None => slot.insert(zstd::bulk::Decompressor::new()?),
            };
            // n <= BULK_DECODE_MAX, so the cast cannot truncate.
            d.decompress(compressed, n as usize)
        }),
        _ => zstd::stream::decode_all(compressed),
    }
}

fn verify(expected: CasRef, compressed: &[u8]) -> Result<Bytes, CasError> {
    let content = decompress(compressed).map_err(|e| CasError::Corrupt {
        expected,
        actual: format!("undecodable zstd frame ({e})"),
    })?;
    let actual = CasRef::of(&content);
    if actual != expected {
        return Err(CasError::Corrupt {
            expected,
            actual: actual.to_string(),
        });
    }
    Ok(Bytes::from(content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_cas(dir: &Path) -> Cas {
        let cfg = CasConfig {
            backend: CasBackend::Local,
            local_dir: dir.to_string_lossy().into_owned(),
            ..CasConfig::default()
        };
        Cas::local(&cfg).unwrap()
    }

    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn cas_is_send_sync_clone() {
        assert_send_sync_clone::<Cas>();
        assert_send_sync_clone::<CasRef>();
    }

    #[test]
    fn bad_ref_strings_are_rejected() {
        let good = CasRef::of(b"x").hex();
        let cases = [
            ("".to_string(), "scheme"),
            (good.clone(), "scheme"),
            (format!("sha1:{good}"), "scheme"),
            (format!("SHA256:{good}"), "scheme"),
            (format!(" sha256:{good}"), "scheme"),
            (format!("sha256:{good} "), "64"),
            (format!("sha256:{}", &good[..63]), "64"),
            (format!("sha256:{good}0"), "64"),
            (format!("sha256:{}", good.to_uppercase()), "lowercase"),
            (format!("sha256:{}g", &good[..63]), "lowercase"),
            ("sha256:".to_string() + &"é".repeat(32), "lowercase"),
        ];
        for (input, why) in cases {
            let err = input.parse::<CasRef>().unwrap_err();
            assert!(err.to_string().contains(why), "{input:?}: {err}");
        }
        let long = "x".repeat(10_000);
        let err = long.parse::<CasRef>().unwrap_err();
        assert!(err.input.chars().count() <= weir_model::cas_ref::MAX_REF_ECHO + 1);
        assert_eq!(err.disposition(), Disposition::DeadLetter);
        let err: CasError = err.into();
        assert_eq!(
            err.disposition(),
            Disposition::DeadLetter,
            "a bad ref is the record's"
        );
    }

    #[tokio::test]
    async fn put_twice_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let first = cas.put_detailed(&b"hello, weir"[..]).await.unwrap();
        assert_eq!(first.outcome, PutOutcome::Stored);
        assert!(first.stored_bytes > 0);
        let path = dir.path().join(cas.key(&first.cas_ref));
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let second = cas.put_detailed(b"hello, weir".to_vec()).await.unwrap();
        assert_eq!(second.outcome, PutOutcome::Deduplicated);
        assert_eq!(second.stored_bytes, 0);
        assert_eq!(second.cas_ref, first.cas_ref);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(cas.put_slice(b"hello, weir").await.unwrap(), first.cas_ref);
        // Exactly one file in the shard directory: no temp files left behind.
        let shard = path.parent().unwrap();
        assert_eq!(std::fs::read_dir(shard).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn layout_is_prefix_shard_hex_and_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let content = b"abc".repeat(10_000);
        let r = cas.put(content.clone()).await.unwrap();
        let hex = r.hex();
        let path = dir.path().join("cas").join(&hex[..2]).join(&hex);
        let stored = std::fs::read(&path).unwrap();
        assert!(stored.len() < content.len() / 10, "{} bytes", stored.len());
        assert_eq!(zstd::stream::decode_all(&stored[..]).unwrap(), content);
    }

    #[tokio::test]
    async fn get_verifies_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        // Small (inline) and large (blocking pool) blobs.
        for size in [1, 1000, INLINE_LIMIT + 1, 3 * 1024 * 1024] {
            let content: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let r = cas.put(content.clone()).await.unwrap();
            assert_eq!(r, CasRef::of(&content));
            assert_eq!(cas.get(&r).await.unwrap(), content);
            assert!(cas.exists(&r).await.unwrap());
        }
    }

    #[tokio::test]
    async fn corrupted_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let r = cas.put(&b"the original"[..]).await.unwrap();
        let other = cas.put(&b"something else"[..]).await.unwrap();
        let path = dir.path().join(cas.key(&r));

        // A valid zstd frame of other content.
        std::fs::copy(dir.path().join(cas.key(&other)), &path).unwrap();
        match cas.get(&r).await {
            Err(CasError::Corrupt { expected, actual }) => {
                assert_eq!(expected, r);
                assert_eq!(actual, other.to_string());
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }

        // Not zstd at all.
        std::fs::write(&path, b"garbage").unwrap();
        let err = cas.get(&r).await.unwrap_err();
        assert!(
            matches!(&err, CasError::Corrupt { expected, actual }
                if *expected == r && actual.starts_with("undecodable")),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Fatal);

        // A flipped bit in a valid blob.
        let mut stored = zstd::bulk::compress(b"the original", 3).unwrap();
        let last = stored.len() - 1;
        stored[last] ^= 1;
        std::fs::write(&path, &stored).unwrap();
        assert!(matches!(cas.get(&r).await, Err(CasError::Corrupt { .. })));
    }

    #[tokio::test]
    async fn missing_blob_is_not_found_and_delete_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let r = CasRef::of(b"never stored");
        assert!(matches!(cas.get(&r).await, Err(CasError::NotFound(x)) if x == r));
        assert!(!cas.exists(&r).await.unwrap());
        cas.delete(&r).await.unwrap();

        let r = cas.put(&b"short-lived"[..]).await.unwrap();
        cas.delete(&r).await.unwrap();
        assert!(!cas.exists(&r).await.unwrap());
        assert!(matches!(cas.get(&r).await, Err(CasError::NotFound(_))));
        // Put after delete stores it again.
        let receipt = cas.put_detailed(&b"short-lived"[..]).await.unwrap();
        assert_eq!(receipt.outcome, PutOutcome::Stored);
    }

    #[tokio::test]
    async fn empty_blob_works() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let r = cas.put(Bytes::new()).await.unwrap();
        assert_eq!(
            r.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(cas.get(&r).await.unwrap().is_empty());
        let again = cas.put_detailed(Vec::new()).await.unwrap();
        assert_eq!(again.outcome, PutOutcome::Deduplicated);
    }

    #[tokio::test]
    async fn json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let value = serde_json::json!({"nodes": {"a": {"type": "pure"}}, "edges": []});
        let r = cas.put_json(&value).await.unwrap();
        let back: serde_json::Value = cas.get_json(&r).await.unwrap();
        assert_eq!(back, value);
        let err = cas.get_json::<Vec<u32>>(&r).await.unwrap_err();
        assert!(matches!(err, CasError::Json(_)), "{err:?}");
    }

    #[tokio::test]
    async fn concurrent_puts_of_the_same_blob_agree() {
        let dir = tempfile::tempdir().unwrap();
        let cas = local_cas(dir.path());
        let content = Bytes::from(vec![7u8; 200_000]);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cas, content) = (cas.clone(), content.clone());
                tokio::spawn(async move { cas.put(content).await })
            })
            .collect();
        let mut refs = Vec::new();
        for t in tasks {
            refs.push(t.await.unwrap().unwrap());
        }
        assert!(refs.iter().all(|r| *r == refs[0]));
        assert_eq!(cas.get(&refs[0]).await.unwrap(), content);
        let shard = dir.path().join(cas.key(&refs[0]));
        assert_eq!(
            std::fs::read_dir(shard.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn bad_settings_are_rejected() {
        let base = CasConfig {
            local_dir: "/tmp/x".into(),
            ..CasConfig::default()
        };
        for bad in [
            CasConfig {
                key_prefix: "../escape/".into(),
                ..base.clone()
            },
            CasConfig {
                key_prefix: "/abs/".into(),
                ..base.clone()
            },
            CasConfig {
                compression_level: 0,
                ..base.clone()
            },
            CasConfig {
                local_dir: String::new(),
                ..base.clone()
            },
        ] {
            let err = Cas::local(&bad).unwrap_err();
            assert!(matches!(err, CasError::Config(_)), "{err:?}");
            assert_eq!(err.disposition(), Disposition::Fatal);
        }
        assert!(matches!(
            check_config(
                &CasConfig {
                    server_side_encryption: "rot13".into(),
                    ..base.clone()
                },
                true
            ),
            Err(CasError::Config(_))
        ));
        assert!(matches!(
            check_config(
                &CasConfig {
                    multipart_part_bytes: 1024,
                    ..base.clone()
                },
                true
            ),
            Err(CasError::Config(_))
        ));
    }

    #[test]
    fn s3_errors_are_classified() {
        use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
        use aws_sdk_s3::primitives::SdkBody;

        let service = |status: u16, code: &str| {
            SdkError::service_error(
                GetObjectError::generic(ErrorMetadata::builder().code(code).build()),
                HttpResponse::new(status.try_into().unwrap(), SdkBody::empty()),
            )
        };
        let hint = |e| s3_error("GetObject", "k", e).disposition();
        for (status, code, want) in [
            (503, "SlowDown", Disposition::Retry),
            (500, "InternalError", Disposition::Retry),
            (400, "RequestTimeout", Disposition::Retry),
            (429, "", Disposition::Retry),
            (409, "ConditionalRequestConflict", Disposition::Retry),
            (400, "KMS.ThrottlingException", Disposition::Retry),
            (403, "AccessDenied", Disposition::Fatal),
            (403, "InvalidAccessKeyId", Disposition::Fatal),
            (404, "NoSuchBucket", Disposition::Fatal),
            (400, "InvalidArgument", Disposition::Fatal),
            (400, "KMS.NotFoundException", Disposition::Fatal),
        ] {
            assert_eq!(hint(service(status, code)), want, "{status} {code}");
        }
        assert!(missing_key(&service(404, "NoSuchKey")));
        assert!(missing_key(&service(404, "")));
        assert!(!missing_key(&service(404, "NoSuchBucket")));
        assert!(precondition_failed(&service(412, "PreconditionFailed")));
        assert!(!precondition_failed(&service(
            409,
            "ConditionalRequestConflict"
        )));
        assert!(conditional_conflict(&service(
            409,
            "ConditionalRequestConflict"
        )));

        let io = SdkError::<GetObjectError, HttpResponse>::dispatch_failure(ConnectorError::io(
            Box::new(std::io::Error::other("connection reset")),
        ));
        assert!(ambiguous(&io));
        assert!(!ambiguous(&service(412, "PreconditionFailed")));
        assert_eq!(hint(io), Disposition::Retry);
        let timeout = SdkError::<GetObjectError, HttpResponse>::timeout_error("slow");
        assert_eq!(hint(timeout), Disposition::Retry);
        let user = SdkError::<GetObjectError, HttpResponse>::dispatch_failure(
            ConnectorError::user(Box::new(std::io::Error::other("bad endpoint"))),
        );
        assert_eq!(hint(user), Disposition::Fatal);
        let built = SdkError::<GetObjectError, HttpResponse>::construction_failure("no bucket");
        assert_eq!(hint(built), Disposition::Fatal);
    }

    #[test]
    fn io_errors_are_classified() {
        use std::io::{Error, ErrorKind};
        let p = Path::new("/x");
        let e = |k| CasError::io("write", p, Error::from(k)).disposition();
        assert_eq!(e(ErrorKind::PermissionDenied), Disposition::Fatal);
        assert_eq!(e(ErrorKind::StorageFull), Disposition::Retry);
        assert_eq!(e(ErrorKind::Interrupted), Disposition::Retry);
    }
}
