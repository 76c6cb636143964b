//! The CAS's errors and how they are classified: S3 and file-system failures sorted into
//! retryable, content and fatal ones.

use std::path::{Path, PathBuf};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;

use weir_model::cas_ref::{CasRef, ParseRefError};

use crate::error::{Classify, Disposition};

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

    pub(super) fn io(op: &'static str, path: &Path, source: std::io::Error) -> CasError {
        CasError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

pub(super) fn io_disposition(e: &std::io::Error) -> Disposition {
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

pub(super) fn s3_error<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> CasError
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
pub(super) fn precondition_failed<E: ProvideErrorMetadata>(
    err: &SdkError<E, HttpResponse>,
) -> bool {
    err.raw_response().map(|r| r.status().as_u16()) == Some(412)
        || err.code() == Some("PreconditionFailed")
}

/// The request may or may not have taken effect: the connection failed or the response
/// could not be read.
pub(super) fn ambiguous<E>(err: &SdkError<E, HttpResponse>) -> bool {
    matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) | SdkError::TimeoutError(_)
    )
}

/// The object is absent (but the bucket exists: a missing bucket is a configuration error).
pub(super) fn missing_key(err: &SdkError<GetObjectError, HttpResponse>) -> bool {
    err.as_service_error().is_some_and(|s| s.is_no_such_key())
        || (err.raw_response().map(|r| r.status().as_u16()) == Some(404)
            && err.code() != Some("NoSuchBucket"))
}

/// A conditional write raced with another write of the same key (AWS answers 409).
pub(super) fn conditional_conflict<E: ProvideErrorMetadata>(
    err: &SdkError<E, HttpResponse>,
) -> bool {
    err.code() == Some("ConditionalRequestConflict")
}
