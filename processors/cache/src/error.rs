//! Errors of the cache, each with its retry-vs-dead-letter classification.
//!
//! No error a tenant's content can cause is Fatal: an invalid request, a bad vector or a
//! prompt the embedder refuses is a dead letter (one record), and an embedder that is down
//! or misconfigured is retried with backoff while the processor reports not ready — a wrong
//! API key must not turn into a crash loop that a restart cannot end.

use weir_runtime::cas::CasError;
use weir_runtime::{Classify, Disposition};

/// What can go wrong looking up or storing a result.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The request itself is invalid (bad permission name, JSON that does not parse, empty
    /// workspace): the record is dead-lettered, the gateway answers 400.
    #[error("invalid cache request: {0}")]
    Invalid(String),
    /// The configured dimension differs from the embedder's or from the stored embedding
    /// space (at start). A caller's vector of the wrong length is [`CacheError::Invalid`].
    #[error("embedding dimension mismatch: {0}")]
    Dimension(String),
    /// A broken invariant of the cache itself (a batch call that returned fewer answers than
    /// requests): never the caller's fault.
    #[error("internal: {0}")]
    Internal(&'static str),
    /// The embedder as a whole failed (not one prompt: a refused prompt is a rejection of
    /// its record, see [`crate::embed::Embedder::embed`]).
    #[error("embedder: {message}")]
    Embed {
        /// Detail.
        message: String,
        /// Down or misconfigured.
        class: EmbedClass,
    },
    /// Postgres failed. The message is logged; API callers see only "database unavailable".
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The CAS failed (other than a missing or corrupt blob, which is a miss).
    #[error("cas: {0}")]
    Cas(#[from] CasError),
}

/// Why the embedder as a whole failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedClass {
    /// Unreachable, rate limited, 5xx while a canary fails too: waiting fixes it.
    Unavailable,
    /// The key, model, URL or model files are wrong (401/403/404, vectors of another
    /// dimension, files missing): an operator fixes it. Retried with backoff, readiness down.
    Misconfigured,
}

impl Classify for CacheError {
    /// What the consumer loop does with this error.
    fn disposition(&self) -> Disposition {
        match self {
            CacheError::Invalid(_) => Disposition::DeadLetter,
            // Only at start (Cache::new, Embedder::from_config): the process refuses to run.
            CacheError::Dimension(_) | CacheError::Internal(_) => Disposition::Fatal,
            // Both retried: nothing in a record can fix or cause them (a misconfiguration
            // is fixed by an operator while the consumer waits, not by a restart loop).
            CacheError::Embed { .. } => Disposition::Retry,
            CacheError::Postgres(e) => e.disposition(),
            CacheError::Cas(e) => e.disposition(),
        }
    }

    /// A Postgres error keeps its SQLSTATE class: a suspect one is retried a bounded number
    /// of times, then bisected.
    fn is_suspect(&self) -> bool {
        match self {
            CacheError::Postgres(e) => e.is_suspect(),
            CacheError::Cas(e) => e.is_suspect(),
            _ => false,
        }
    }
}

impl CacheError {
    /// A message safe to show an API caller: database and storage details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            CacheError::Invalid(_) | CacheError::Dimension(_) => self.to_string(),
            CacheError::Embed { .. } => "embedder unavailable".into(),
            CacheError::Internal(_) => "internal error".into(),
            CacheError::Postgres(_) => "database unavailable".into(),
            CacheError::Cas(_) => "result store unavailable".into(),
        }
    }
}

/// An unknown permission name in a request is the request's fault.
impl From<weir_model::permission::UnknownPermission> for CacheError {
    fn from(e: weir_model::permission::UnknownPermission) -> Self {
        CacheError::Invalid(e.to_string())
    }
}
